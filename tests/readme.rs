//! The README's walk-through, run as written: every `grpcurl` command in it
//! against a dispatcher started on the repository's own config (on a free
//! port instead of 50051), with real grpcurl.

mod common;

use std::process::Command;

use common::{Proc, tools};

/// The `grpcurl` lines of the walk-through section's `sh` blocks.
fn walkthrough_commands() -> Vec<String> {
    commands("Walk-through")
}

fn section(title: &str) -> String {
    let readme = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md")).unwrap();
    readme
        .split("\n## ")
        .find(|s| s.starts_with(title))
        .unwrap_or_else(|| panic!("README has a section {title:?}"))
        .to_string()
}

/// The `grpcurl` and `curl` lines of the `sh` blocks of the README section
/// `title`.
fn commands(title: &str) -> Vec<String> {
    let mut commands = Vec::new();
    let mut in_sh = false;
    for line in section(title).lines() {
        match line.trim() {
            "```sh" => in_sh = true,
            "```" => in_sh = false,
            l if in_sh && (l.starts_with("grpcurl ") || l.starts_with("curl ")) => {
                commands.push(l.to_string())
            }
            _ => {}
        }
    }
    commands
}

/// The output the README shows for `command` in section `title`: the first
/// `text` or `json` block after it.
fn shown_output(title: &str, command: &str) -> String {
    let section = section(title);
    let after = &section[section.find(command).expect("the command is in the section")..];
    let start = ["```text\n", "```json\n"]
        .iter()
        .filter_map(|fence| after.find(fence))
        .min()
        .expect("an output block follows the command");
    let block = &after[start..];
    let body = &block[block.find('\n').unwrap() + 1..];
    body[..body.find("```").unwrap()].to_string()
}

/// A dispatcher on the repository's own config, on free ports, its job
/// store and logs under `dir`.
fn repository_dispatcher(dir: &std::path::Path) -> Proc {
    let config = concat!(env!("CARGO_MANIFEST_DIR"), "/dispatcher.toml");
    Proc::start(
        env!("CARGO_BIN_EXE_dispatcher"),
        &[
            "--config",
            config,
            "--listen",
            "127.0.0.1:0",
            "--metrics-listen",
            "127.0.0.1:0",
            "--openai-listen",
            "127.0.0.1:0",
            "--data-dir",
            dir.join("data").to_str().unwrap(),
        ],
        dir,
        "dispatcher",
    )
}

struct Run {
    ok: bool,
    out: String,
}

fn run(command: &str, addr: &str, metrics: Option<&str>) -> Run {
    let grpcurl = tools::grpcurl();
    let mut command = command
        .replacen("grpcurl", &grpcurl.display().to_string(), 1)
        .replace("127.0.0.1:50051", addr);
    if let Some(m) = metrics {
        command = command.replace("127.0.0.1:9464", m);
    }
    let o = Command::new("sh").arg("-c").arg(&command).output().unwrap();
    Run {
        ok: o.status.success(),
        out: format!(
            "{}{}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        ),
    }
}

#[test]
fn readme_walkthrough_works_as_written() {
    let commands = walkthrough_commands();
    assert_eq!(
        commands.len(),
        6,
        "the walk-through's commands changed: {commands:#?}"
    );
    let logs = tempfile::tempdir().unwrap();
    let d = repository_dispatcher(logs.path());
    let addr = d.addr.to_string();
    let metrics = d.listener("metrics").to_string();
    let regions = ["us-east-1", "eu-west-1", "ap-southeast-1"];
    for command in &commands {
        let r = run(command, &addr, Some(&metrics));
        println!("$ {command}\n{}", r.out);
        if command.ends_with(" list") {
            assert!(r.ok, "{}", r.out);
            assert_eq!(
                r.out.trim(),
                shown_output("Walk-through", command).trim(),
                "the services listed are those the README shows"
            );
        } else if command.contains("gpt-5") {
            assert!(!r.ok, "an unknown model must fail");
            assert!(r.out.contains("Code: InvalidArgument"), "{}", r.out);
            assert!(
                r.out.contains("google.rpc.BadRequest"),
                "grpcurl decodes the details: {}",
                r.out
            );
            assert!(r.out.contains("\"field\":\"model\""), "{}", r.out);
        } else if command.ends_with("dispatch.v1.Dispatcher/Dispatch") {
            assert!(r.ok, "{}", r.out);
            let v: serde_json::Value = serde_json::from_str(&r.out).unwrap();
            assert!(regions.contains(&v["region"].as_str().unwrap()), "{v}");
            assert!(!v["output"].as_str().unwrap().is_empty());
            assert_eq!(v["usage"]["promptTokens"], "8", "30 bytes at 4 chars per token");
            let completion: u64 = v["usage"]["completionTokens"].as_str().unwrap().parse().unwrap();
            assert!((1..=200).contains(&completion));
            assert_eq!(v["attempts"], 1);
        } else if command.ends_with("dispatch.v1.Dispatcher/Route") {
            assert!(r.ok, "{}", r.out);
            let v: serde_json::Value = serde_json::from_str(&r.out).unwrap();
            assert_eq!(v["strategy"], "weighted_load");
            assert_eq!(v["estimatedTokens"], "1500");
            let candidates = v["candidates"].as_array().unwrap();
            assert_eq!(candidates.len(), 3);
            for c in candidates {
                assert_eq!(c["eligible"], true, "{c}");
                for f in ["headroom", "load", "latency", "errors", "locality", "weight"] {
                    assert!(c["factors"][f].is_number(), "{f} in {c}");
                }
            }
            let eu = candidates.iter().find(|c| c["region"] == "eu-west-1").unwrap();
            assert_eq!(eu["factors"]["locality"], 1.1);
            assert!(regions.contains(&v["region"].as_str().unwrap()));
        } else if command.ends_with("Health/Check") {
            assert!(r.ok, "{}", r.out);
            assert_eq!(r.out.trim(), shown_output("Walk-through", command).trim());
        } else if command.starts_with("curl ") {
            // After the commands above: one request served, one refused
            // before it had a model or a region.
            assert!(r.ok, "{}", r.out);
            let shown = shown_output("Walk-through", command);
            let sample = |out: &str, outcome: &str| {
                out.lines()
                    .find(|l| l.contains(&format!("outcome=\"{outcome}\"")))
                    .map(|l| l.to_string())
                    .unwrap_or_else(|| panic!("no {outcome} sample in:\n{out}"))
            };
            let ok = sample(&r.out, "ok");
            assert!(
                ok.starts_with("dispatcher_requests_total{model=\"gpt-4o\",tenant=\"anonymous\",region=\""),
                "{ok}"
            );
            assert!(ok.ends_with("} 1"), "{ok}");
            assert_eq!(
                sample(&r.out, "invalid_argument"),
                sample(&shown, "invalid_argument")
            );
        } else {
            panic!("no check for README command {command}");
        }
    }
}

#[test]
fn readme_admin_commands_work_as_written() {
    let commands = commands("Operating it");
    assert_eq!(
        commands.len(),
        10,
        "the operations section's commands changed: {commands:#?}"
    );
    let logs = tempfile::tempdir().unwrap();
    let d = repository_dispatcher(logs.path());
    let addr = d.addr.to_string();
    for command in &commands {
        let r = run(command, &addr, None);
        println!("$ {command}\n{}", r.out);
        assert!(r.ok, "{command}: {}", r.out);
        if command.contains("describe") {
            assert!(r.out.contains("rpc ReloadConfig"), "{}", r.out);
            continue;
        }
        let v: serde_json::Value =
            serde_json::from_str(&r.out).unwrap_or_else(|e| panic!("{command}: {e}: {}", r.out));
        let rpc = command.rsplit('/').next().unwrap();
        match rpc {
            "ListRegions" => assert_eq!(v["regions"].as_array().unwrap().len(), 3),
            "GetRegion" | "ResumeRegion" => assert_eq!(v["name"], "eu-west-1"),
            "DrainRegion" => assert_eq!(v["drained"], true),
            "SetRegionWeight" if command.contains("clear") => assert_eq!(v["weight"], 1.0),
            "SetRegionWeight" => assert_eq!(v["weight"], 2.5),
            "ListTenants" => assert!(v["tenants"].as_array().unwrap().len() >= 3),
            "ReloadConfig" => assert!(v.get("errors").is_none(), "{v}"),
            other => panic!("no check for {other}"),
        }
    }
}

#[test]
fn readme_jobs_commands_work_as_written() {
    let commands = commands("Jobs");
    assert_eq!(
        commands.len(),
        6,
        "the jobs section's commands changed: {commands:#?}"
    );
    let logs = tempfile::tempdir().unwrap();
    let d = repository_dispatcher(logs.path());
    let addr = d.addr.to_string();
    // The README's example ids stand for the ones the submissions answer.
    let mut ids: Vec<(&str, String)> = Vec::new();
    let examples = ["job-5f0c3e2a9b1d4c77", "job-0a1b2c3d4e5f6a7b"];
    for command in &commands {
        let mut command = command.clone();
        for (example, real) in &ids {
            command = command.replace(example, real);
        }
        let r = run(&command, &addr, None);
        println!("$ {command}\n{}", r.out);
        assert!(r.ok, "{command}: {}", r.out);
        let rpc = command.rsplit('/').next().unwrap();
        if rpc == "WatchJob" {
            // A stream of JSON objects, the last the job's end.
            assert!(r.out.contains("\"queued\""), "{}", r.out);
            assert!(r.out.contains("\"routed\""), "{}", r.out);
            assert!(r.out.contains("\"running\""), "{}", r.out);
            assert!(r.out.contains("\"state\": \"DONE\""), "{}", r.out);
            continue;
        }
        let v: serde_json::Value =
            serde_json::from_str(&r.out).unwrap_or_else(|e| panic!("{command}: {e}: {}", r.out));
        match rpc {
            "SubmitJob" => {
                assert_eq!(v["state"], "QUEUED", "answered before any work: {v}");
                let id = v["jobId"].as_str().unwrap().to_string();
                ids.push((examples[ids.len()], id));
            }
            "GetJob" => {
                assert_eq!(v["state"], "DONE", "{v}");
                assert!(!v["output"].as_str().unwrap().is_empty());
                assert_eq!(v["idempotencyKey"], "q3-report");
            }
            "ListJobs" => {
                let jobs = v["jobs"].as_array().unwrap();
                assert_eq!(jobs.len(), 1, "{v}");
                assert_eq!(jobs[0]["jobId"], ids[0].1.as_str());
            }
            "CancelJob" => {
                assert_eq!(v["state"], "CANCELLED", "{v}");
                assert_eq!(v["errorCode"], 1);
            }
            other => panic!("no check for {other}"),
        }
    }
}

/// The `loadgen` commands of the Performance section (continuation lines
/// joined), as argument lists.
fn loadgen_commands() -> Vec<Vec<String>> {
    let section = section("Performance");
    let joined = section.replace("\\\n", " ");
    let mut in_sh = false;
    let mut out = Vec::new();
    for line in joined.lines() {
        match line.trim() {
            "```sh" => in_sh = true,
            "```" => in_sh = false,
            l if in_sh && l.starts_with("cargo run --release --bin loadgen -- ") => out.push(
                l["cargo run --release --bin loadgen -- ".len()..]
                    .split_whitespace()
                    .map(String::from)
                    .collect(),
            ),
            _ => {}
        }
    }
    out
}

/// The README's loadgen examples teach what they say: the first, within
/// the demo tenant's limit, is all served; the second shows the limit
/// biting: a share refused with RESOURCE_EXHAUSTED, most served (not a
/// page of 99 % refusals). Run against the repository's config, shortened
/// to 5 s each, the report as JSON.
#[test]
fn readme_loadgen_examples_are_served_then_limited() {
    let examples = loadgen_commands();
    assert_eq!(examples.len(), 2, "the loadgen examples changed: {examples:#?}");
    let logs = tempfile::tempdir().unwrap();
    let d = repository_dispatcher(logs.path());
    let mut codes = Vec::new();
    for args in &examples {
        let mut args: Vec<String> = args
            .iter()
            .map(|a| a.replace("target/", &format!("{}/", logs.path().display())))
            .collect();
        let at = args.iter().position(|a| a == "--duration").unwrap() + 1;
        args[at] = "5s".into();
        args.extend([
            "--target".into(),
            d.endpoint(),
            "--quiet".into(),
            "--json".into(),
            "-".into(),
        ]);
        let out = Command::new(env!("CARGO_BIN_EXE_loadgen"))
            .args(&args)
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        println!("loadgen {}: {}", args.join(" "), v["status_codes"]);
        if let Some(page) = args.iter().position(|a| a == "--html") {
            assert!(
                std::path::Path::new(&args[page + 1]).exists(),
                "{args:?} wrote its page"
            );
        }
        codes.push(v["status_codes"].clone());
    }
    let count = |v: &serde_json::Value, code: &str| v[code].as_u64().unwrap_or(0);
    assert!(
        count(&codes[0], "Ok") > 0 && codes[0].as_object().unwrap().len() == 1,
        "the first example is all served: {}",
        codes[0]
    );
    // Only these two outcomes, and a share refused that a reader learns
    // from (the closed loop this replaced was 97 % refused).
    let (ok, refused) = (count(&codes[1], "Ok"), count(&codes[1], "ResourceExhausted"));
    let share = refused as f64 / (ok + refused).max(1) as f64;
    assert_eq!(codes[1].as_object().unwrap().len(), 2, "{}", codes[1]);
    assert!(
        (0.1..=0.6).contains(&share),
        "the second shows the limit biting, most served: {}",
        codes[1]
    );
}

/// The README's OpenAI SDK example, run as written with the official SDK
/// against the repository's config (the front door on a free port instead
/// of 8080): a completion, then a stream ending with its usage.
#[test]
fn readme_openai_sdk_example_works_as_written() {
    let section = section("OpenAI SDK callers");
    let start = section.find("```python\n").expect("a python block") + "```python\n".len();
    let script = &section[start..];
    let script = &script[..script.find("```").unwrap()];
    assert!(script.contains("http://127.0.0.1:8080/v1"), "{script}");
    let logs = tempfile::tempdir().unwrap();
    let d = repository_dispatcher(logs.path());
    let script = script.replace("127.0.0.1:8080", &d.listener("openai").to_string());
    let out = Command::new(tools::python_with_openai())
        .args(["-c", &script])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    println!("{stdout}");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let lines: Vec<&str> = stdout.lines().collect();
    assert!(lines[0].contains("gpt-4o completed"), "{stdout}");
    assert!(lines[0].contains("CompletionUsage("), "{stdout}");
    assert!(stdout.contains("tokens 0.."), "the stream's text: {stdout}");
    assert!(
        lines.last().unwrap().starts_with("CompletionUsage("),
        "the stream ends with its usage: {stdout}"
    );
}
