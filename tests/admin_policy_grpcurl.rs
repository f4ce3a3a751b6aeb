//! The policy calls of the Admin API as an operator uses them: real grpcurl
//! against a running dispatcher (simulated regions): list the rollouts,
//! change an alias's weights live (and see traffic follow), refuse bad
//! weights (and a target named twice) naming the field, list capacity
//! rules; a reload whose fallback chains loop is refused; a Dispatch through
//! grpcurl names the model that served it.

mod common;

use std::process::Command;

use common::{ConfigDir, Proc, tools};

const CONFIG: &str = r#"
[auth]
allow_anonymous = true
[[models]]
name = "gpt-4o"
[[models]]
name = "mini"
[[rollouts]]
alias = "chat"
targets = [{ model = "mini", weight = 90 }, { model = "gpt-4o", weight = 10 }]
"#;

const REGION: &str = r#"
name = "east"
max_concurrent = 32
[[models]]
name = "gpt-4o"
tokens_per_minute = 6000000
requests_per_minute = 100000
[[models]]
name = "mini"
tokens_per_minute = 6000000
requests_per_minute = 100000
[[capacity]]
action = "alert"
enter = 0.9
exit = 0.5
for = "10s"
[simulate]
ms_per_1k_tokens = 1
"#;

fn grpcurl(addr: &str, data: &str, rpc: &str) -> (bool, String) {
    let o = Command::new(tools::grpcurl())
        .args(["-plaintext", "-d", data, addr, rpc])
        .output()
        .unwrap();
    let out = String::from_utf8_lossy(&o.stdout).to_string() + &String::from_utf8_lossy(&o.stderr);
    println!("$ grpcurl -d '{data}' {rpc}\n{out}");
    (o.status.success(), out)
}

fn json(addr: &str, data: &str, rpc: &str) -> serde_json::Value {
    let (ok, out) = grpcurl(addr, data, rpc);
    assert!(ok, "{rpc} failed: {out}");
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("{rpc}: not JSON ({e}): {out}"))
}

#[test]
fn rollouts_and_capacity_rules_from_grpcurl() {
    let cfg = ConfigDir::new(CONFIG);
    cfg.write_region("east", REGION);
    let d = Proc::start(
        env!("CARGO_BIN_EXE_dispatcher"),
        &[
            "--config",
            cfg.config().to_str().unwrap(),
            "--listen",
            "127.0.0.1:0",
        ],
        cfg.path(),
        "dispatcher",
    );
    let addr = d.addr.to_string();

    let v = json(&addr, "{}", "dispatch.v1.Admin/ListRollouts");
    assert_eq!(v["rollouts"][0]["alias"], "chat");
    assert_eq!(v["rollouts"][0]["targets"][0]["weight"], 90.0);

    // All of it to gpt-4o, live.
    let v = json(
        &addr,
        r#"{"alias":"chat","targets":[{"model":"mini","weight":0},{"model":"gpt-4o","weight":1}]}"#,
        "dispatch.v1.Admin/SetRolloutWeights",
    );
    assert_eq!(
        v["targets"][0]["weight"],
        serde_json::Value::Null,
        "0 is omitted in JSON: {v}"
    );
    for _ in 0..5 {
        let v = json(
            &addr,
            r#"{"model":"chat","payload":"aGk=","max_output_tokens":10}"#,
            "dispatch.v1.Dispatcher/Dispatch",
        );
        assert_eq!(
            (v["model"].as_str(), v["alias"].as_str()),
            (Some("gpt-4o"), Some("chat")),
            "{v}"
        );
    }

    // Bad weights: refused, naming the field; an unknown alias: NotFound.
    let (ok, out) = grpcurl(
        &addr,
        r#"{"alias":"chat","targets":[{"model":"mini","weight":-1}]}"#,
        "dispatch.v1.Admin/SetRolloutWeights",
    );
    assert!(
        !ok && out.contains("InvalidArgument") && out.contains("weight"),
        "{out}"
    );
    // A target named twice, which the config file refuses too.
    let (ok, out) = grpcurl(
        &addr,
        r#"{"alias":"chat","targets":[{"model":"mini","weight":1},{"model":"mini","weight":0}]}"#,
        "dispatch.v1.Admin/SetRolloutWeights",
    );
    assert!(
        !ok && out.contains("InvalidArgument") && out.contains("target \"mini\" is listed twice"),
        "{out}"
    );
    let (ok, out) = grpcurl(
        &addr,
        r#"{"alias":"nope"}"#,
        "dispatch.v1.Admin/SetRolloutWeights",
    );
    assert!(!ok && out.contains("NotFound") && out.contains("chat"), "{out}");

    let v = json(&addr, "{}", "dispatch.v1.Admin/ListCapacityRules");
    let rule = &v["rules"][0];
    assert_eq!(
        (rule["region"].as_str(), rule["action"].as_str()),
        (Some("east"), Some("alert")),
        "{v}"
    );
    assert_eq!(rule["duration"], "10s");

    // A reload whose fallback chains loop (gpt-4o → mini → gpt-4o) is
    // refused naming the loop; the running config stays.
    let looped = format!(
        "{CONFIG}[[fallbacks]]\nmodel = \"gpt-4o\"\nthen = [\"mini\"]\n[[fallbacks]]\nmodel = \"mini\"\nthen = [\"gpt-4o\"]\n"
    );
    std::fs::write(cfg.config(), looped).unwrap();
    let (ok, out) = grpcurl(&addr, "{}", "dispatch.v1.Admin/ReloadConfig");
    assert!(
        !ok && out.contains("fallbacks[1].then[0]") && out.contains("gpt-4o → mini → gpt-4o"),
        "{out}"
    );
    let v = json(&addr, "{}", "dispatch.v1.Admin/ListRollouts");
    assert_eq!(v["rollouts"][0]["alias"], "chat", "{v}");
}
