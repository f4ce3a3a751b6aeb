//! The Admin API as an operator uses it: real grpcurl (1.8.6, reflection
//! v1alpha) against a running dispatcher with an admin token: list, describe,
//! and every Admin call, checking the JSON it prints.

mod common;

use std::process::Command;

use common::{ConfigDir, Proc, tools};
use dispatcher::dispatch::hash_key;

const ADMIN_TOKEN: &str = "admin-secret-token";

fn config() -> String {
    format!(
        r#"
[auth]
allow_anonymous = true
[admin]
token = "{}"
[[models]]
name = "gpt-4o"
[[tenants]]
name = "team-a"
weight = 2
requests_per_second = 10
keys = ["{}"]
"#,
        hash_key(ADMIN_TOKEN),
        hash_key("k-team-a")
    )
}

const REGION: &str = r#"
name = "NAME"
max_concurrent = 32
[[models]]
name = "gpt-4o"
tokens_per_minute = TPM
requests_per_minute = 1000
[simulate]
ms_per_1k_tokens = 1
"#;

struct Grpcurl {
    addr: String,
}

impl Grpcurl {
    /// Runs grpcurl with `args` before the address and `rpc` after it.
    fn run(&self, token: Option<&str>, data: Option<&str>, rpc: &[&str]) -> (bool, String) {
        let mut cmd = Command::new(tools::grpcurl());
        cmd.arg("-plaintext");
        if let Some(t) = token {
            cmd.args(["-H", &format!("authorization: Bearer {t}")]);
        }
        if let Some(d) = data {
            cmd.args(["-d", d]);
        }
        cmd.arg(&self.addr).args(rpc);
        let o = cmd.output().unwrap();
        let out = String::from_utf8_lossy(&o.stdout).to_string() + &String::from_utf8_lossy(&o.stderr);
        (o.status.success(), out)
    }

    fn json(&self, data: &str, rpc: &str) -> serde_json::Value {
        let (ok, out) = self.run(Some(ADMIN_TOKEN), Some(data), &[rpc]);
        println!("$ grpcurl -d '{data}' {rpc}\n{out}");
        assert!(ok, "{rpc} failed: {out}");
        serde_json::from_str(&out).unwrap_or_else(|e| panic!("{rpc}: not JSON ({e}): {out}"))
    }
}

#[test]
fn every_admin_call_works_from_grpcurl() {
    let cfg = ConfigDir::new(&config());
    cfg.write_region("east", &REGION.replace("NAME", "east").replace("TPM", "600000"));
    cfg.write_region("west", &REGION.replace("NAME", "west").replace("TPM", "300000"));
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
    let g = Grpcurl {
        addr: d.addr.to_string(),
    };

    let (ok, out) = g.run(None, None, &["list"]);
    assert!(
        ok && out.contains("dispatch.v1.Admin") && out.contains("dispatch.v1.Dispatcher"),
        "{out}"
    );
    let (ok, out) = g.run(None, None, &["describe", "dispatch.v1.Admin"]);
    println!("{out}");
    assert!(ok, "{out}");
    for rpc in [
        "ListRegions",
        "GetRegion",
        "DrainRegion",
        "ResumeRegion",
        "SetRegionWeight",
        "ListTenants",
        "ReloadConfig",
    ] {
        assert!(out.contains(&format!("rpc {rpc}")), "describe shows {rpc}: {out}");
    }

    // Without the admin token, or with a tenant's key: refused.
    let (ok, out) = g.run(None, Some("{}"), &["dispatch.v1.Admin/ListRegions"]);
    assert!(!ok && out.contains("Unauthenticated"), "{out}");
    let (ok, out) = g.run(Some("k-team-a"), Some("{}"), &["dispatch.v1.Admin/ListRegions"]);
    assert!(!ok && out.contains("Unauthenticated"), "{out}");

    // Some traffic first, so the figures are not all zero.
    let (ok, out) = g.run(
        Some("k-team-a"),
        Some(r#"{"model": "gpt-4o", "prompt_tokens": 100, "max_output_tokens": 50}"#),
        &["dispatch.v1.Dispatcher/Dispatch"],
    );
    assert!(ok, "{out}");

    let v = g.json("{}", "dispatch.v1.Admin/ListRegions");
    let regions = v["regions"].as_array().unwrap();
    assert_eq!(regions.len(), 2);
    assert_eq!(regions[0]["name"], "east");
    let m = &regions[0]["models"][0];
    assert_eq!(m["model"], "gpt-4o");
    assert_eq!(m["tokensPerMinute"], "600000");
    assert_eq!(m["accounting"], "admission");
    assert!(m["tokensAvailable"].is_string());
    assert_eq!(m["queueState"], "absorbing", "overload control's state: {m}");
    assert!(regions[0]["maxConcurrent"] == 32);

    let v = g.json(r#"{"region": "west"}"#, "dispatch.v1.Admin/GetRegion");
    assert_eq!(v["name"], "west");
    assert!(v["endpoint"].as_str().unwrap().starts_with("http://127.0.0.1:"));
    assert_eq!(v["weight"], 1.0);

    let v = g.json(r#"{"region": "west"}"#, "dispatch.v1.Admin/DrainRegion");
    assert_eq!(v["drained"], true);
    let v = g.json(r#"{"region": "west"}"#, "dispatch.v1.Admin/ResumeRegion");
    assert!(v.get("drained").is_none() || v["drained"] == false, "{v}");

    let v = g.json(
        r#"{"region": "west", "weight": 2.5}"#,
        "dispatch.v1.Admin/SetRegionWeight",
    );
    assert_eq!(v["weight"], 2.5);
    assert_eq!(v["weightOverride"], 2.5);
    assert_eq!(v["configuredWeight"], 1.0);
    let v = g.json(
        r#"{"region": "west", "clear": true}"#,
        "dispatch.v1.Admin/SetRegionWeight",
    );
    assert_eq!(v["weight"], 1.0);
    assert!(v.get("weightOverride").is_none(), "{v}");
    let (ok, out) = g.run(
        Some(ADMIN_TOKEN),
        Some(r#"{"region": "west", "weight": -1}"#),
        &["dispatch.v1.Admin/SetRegionWeight"],
    );
    assert!(!ok && out.contains("InvalidArgument"), "{out}");
    let (ok, out) = g.run(
        Some(ADMIN_TOKEN),
        Some(r#"{"region": "north"}"#),
        &["dispatch.v1.Admin/GetRegion"],
    );
    assert!(
        !ok && out.contains("NotFound") && out.contains("east, west"),
        "{out}"
    );

    let v = g.json("{}", "dispatch.v1.Admin/ListTenants");
    let tenants = v["tenants"].as_array().unwrap();
    let a = tenants.iter().find(|t| t["name"] == "team-a").unwrap();
    assert_eq!(a["weight"], 2.0);
    assert_eq!(a["requestsPerSecond"], 10);
    assert_eq!(a["requestsLastMinute"], "1");
    assert!(a["tokensLastMinute"].as_str().unwrap().parse::<u64>().unwrap() > 100);
    assert_eq!(a["share"], 1.0);
    assert!(tenants.iter().any(|t| t["name"] == "anonymous"));

    // ReloadConfig: a dry run shows the diff and changes nothing; a real
    // one applies it; a broken file is reported and nothing applies. The dry
    // run uses a dispatcher.toml edit: only ReloadConfig reads that file,
    // while the region watcher may apply a region edit at any moment.
    std::fs::write(cfg.config(), config().replace("weight = 2", "weight = 3")).unwrap();
    let v = g.json(r#"{"dry_run": true}"#, "dispatch.v1.Admin/ReloadConfig");
    assert_eq!(v["dryRun"], true);
    assert!(v.get("applied").is_none() || v["applied"] == false);
    let text = serde_json::to_string(&v["changes"]).unwrap();
    assert!(text.contains("weight: 2.0 → 3.0"), "{text}");
    let v = g.json("{}", "dispatch.v1.Admin/ListTenants");
    let weight = |v: &serde_json::Value| {
        v["tenants"]
            .as_array()
            .unwrap()
            .iter()
            .find(|t| t["name"] == "team-a")
            .unwrap()["weight"]
            .clone()
    };
    assert_eq!(weight(&v), 2.0, "a dry run changes nothing");
    std::fs::write(cfg.config(), config()).unwrap();
    // Region edits: the watcher or ReloadConfig applies them, whichever comes
    // first; after ReloadConfig answers, the files are in force either way.
    cfg.write_region("west", &REGION.replace("NAME", "west").replace("TPM", "150000"));
    cfg.write_region("south", &REGION.replace("NAME", "south").replace("TPM", "60000"));
    let v = g.json("{}", "dispatch.v1.Admin/ReloadConfig");
    let applied = serde_json::to_string(&v["changes"]).unwrap() + &d.logs();
    assert!(applied.contains("region south"), "{applied}");
    assert!(
        applied.contains("gpt-4o.tokens_per_minute: 300000 → 150000"),
        "{applied}"
    );
    let v = g.json(r#"{"region": "west"}"#, "dispatch.v1.Admin/GetRegion");
    assert_eq!(v["models"][0]["tokensPerMinute"], "150000");
    let v = g.json(r#"{"region": "south"}"#, "dispatch.v1.Admin/GetRegion");
    assert_eq!(v["models"][0]["tokensPerMinute"], "60000");
    let broken = config().replace("weight = 2", "weight = \"heavy\"");
    std::fs::write(cfg.config(), broken).unwrap();
    // Refused: FAILED_PRECONDITION with a BadRequest naming file and key;
    // a dry run still answers with the problems as data.
    let (ok, out) = g.run(Some(ADMIN_TOKEN), Some("{}"), &["dispatch.v1.Admin/ReloadConfig"]);
    println!("$ grpcurl -d '{{}}' dispatch.v1.Admin/ReloadConfig\n{out}");
    assert!(!ok, "a refused reload is an error: {out}");
    assert!(out.contains("Code: FailedPrecondition"), "{out}");
    assert!(out.contains("google.rpc.BadRequest"), "{out}");
    assert!(out.contains("dispatcher.toml: tenants[0].weight"), "{out}");
    let v = g.json(r#"{"dry_run": true}"#, "dispatch.v1.Admin/ReloadConfig");
    assert!(v.get("applied").is_none() || v["applied"] == false);
    let errors = v["errors"].as_array().unwrap();
    assert_eq!(errors[0]["key"], "tenants[0].weight");
    assert!(errors[0]["file"].as_str().unwrap().ends_with("dispatcher.toml"));
    let v = g.json("{}", "dispatch.v1.Admin/ListTenants");
    assert_eq!(weight(&v), 2.0, "the last good config stays");
    // A weight change in dispatcher.toml applies on ReloadConfig.
    std::fs::write(cfg.config(), config().replace("weight = 2", "weight = 5")).unwrap();
    let v = g.json("{}", "dispatch.v1.Admin/ReloadConfig");
    assert_eq!(v["applied"], true);
    assert!(
        serde_json::to_string(&v["changes"])
            .unwrap()
            .contains("weight: 2.0 → 5.0"),
        "{v}"
    );
    // A raised payload limit applies to the checks at once, but the
    // transport's decode limit moves only with a restart: said so.
    let raised = config().replace("[[models]]", "[limits]\nmax_payload_bytes = 4000000\n[[models]]");
    std::fs::write(cfg.config(), raised).unwrap();
    let v = g.json(r#"{"dry_run": true}"#, "dispatch.v1.Admin/ReloadConfig");
    let restart = serde_json::to_string(&v["needsRestart"]).unwrap();
    assert!(restart.contains("limits.max_payload_bytes"), "{v}");
    // Connection limits are the listener's, read at start.
    std::fs::write(
        cfg.config(),
        format!(
            "{}[server]\nbody_timeout = \"2s\"\nmax_connections_per_peer = 8\n",
            config()
        ),
    )
    .unwrap();
    let v = g.json(r#"{"dry_run": true}"#, "dispatch.v1.Admin/ReloadConfig");
    let restart = serde_json::to_string(&v["needsRestart"]).unwrap();
    assert!(restart.contains("server connection limits"), "{v}");
    assert!(
        !d.logs().contains(ADMIN_TOKEN),
        "the admin token never reaches the log"
    );
}
