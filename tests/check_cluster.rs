//! `dispatcher check-cluster` against real clusters over loopback: it
//! passes region-sim (plain and over mTLS) and the Python example
//! (echoing, and calling a stand-in OpenAI-compatible provider), and fails
//! on each of region-sim's `--faulty` modes, naming exactly the check meant
//! to catch it and no other. The README's run is run as written.

mod common;

use std::collections::BTreeMap;
use std::process::Command;

use common::certs::Ca;
use common::{Proc, region_sim, tools};

/// A region-sim that streams slowly enough (3 ms a token) for the cancel
/// and deadline checks to see its work, writes every token it is allowed
/// (as the check's payload asks), and has a provider limit the refusal
/// check can get past within its budget.
const SIM: [&str; 6] = [
    "--model",
    "gpt-4o:3000:100",
    "--ms-per-1k-tokens",
    "3000",
    "--completion-min-fraction",
    "1",
];

/// The budget that lets the refusal check get past a 3,000-token limit.
const BUDGET: [&str; 2] = ["--max-tokens", "4000"];

const CHECKS: [&str; 13] = [
    "health",
    "execute",
    "stream",
    "usage",
    "stream.usage",
    "load",
    "load.concurrency",
    "provider_quota",
    "cancel",
    "deadline",
    "refusal",
    "unknown_model",
    "request_id",
];

struct Checked {
    code: Option<i32>,
    out: String,
    /// check → PASS / WARN / FAIL, from the table.
    verdicts: BTreeMap<String, String>,
}

impl Checked {
    fn with(&self, verdict: &str) -> Vec<&str> {
        self.verdicts
            .iter()
            .filter(|(_, v)| *v == verdict)
            .map(|(c, _)| c.as_str())
            .collect()
    }
}

/// The table's rows: each check's verdict, read under the RESULT header.
fn verdicts(table: &str) -> BTreeMap<String, String> {
    let mut lines = table.lines();
    let header = lines.next().unwrap_or_default();
    let at = header
        .find("RESULT")
        .unwrap_or_else(|| panic!("no table header in:\n{table}"));
    lines
        .take_while(|l| !l.contains(" checks: "))
        .map(|l| {
            let check = l.split_whitespace().next().unwrap().to_string();
            (check, l[at..at + 4].to_string())
        })
        .collect()
}

fn check_cluster(endpoint: &str, args: &[&str]) -> Checked {
    let o = Command::new(env!("CARGO_BIN_EXE_dispatcher"))
        .arg("check-cluster")
        .arg(endpoint)
        .args(args)
        .output()
        .unwrap();
    let out = String::from_utf8_lossy(&o.stdout).to_string();
    println!("$ dispatcher check-cluster {endpoint} {}\n{out}", args.join(" "));
    eprint!("{}", String::from_utf8_lossy(&o.stderr));
    Checked {
        code: o.status.code(),
        verdicts: verdicts(&out),
        out,
    }
}

#[test]
fn region_sim_passes_every_check() {
    let dir = tempfile::tempdir().unwrap();
    let sim = region_sim(dir.path(), "us-west-2", &SIM);
    let c = check_cluster(&sim.endpoint(), &BUDGET);
    assert_eq!(c.verdicts.keys().count(), CHECKS.len(), "{}", c.out);
    for check in CHECKS {
        assert_eq!(c.verdicts[check], "PASS", "{check}: {}", c.out);
    }
    assert_eq!(c.code, Some(0));
    assert!(c.out.contains("13 checks: 13 PASS, 0 WARN, 0 FAIL"), "{}", c.out);
    // Within the budget it was given.
    let summary = c.out.lines().last().unwrap();
    let reserved: u64 = summary
        .split(" of --max-tokens")
        .next()
        .unwrap()
        .rsplit(' ')
        .next()
        .unwrap()
        .parse()
        .unwrap();
    assert!(reserved <= 4000, "{summary}");
}

#[test]
fn each_faulty_mode_fails_exactly_the_check_meant_to_catch_it() {
    let dir = tempfile::tempdir().unwrap();
    for (mode, caught) in [
        ("no-load-report", "load"),
        ("wrong-usage", "usage"),
        ("ignore-cancel", "cancel"),
        ("refusal-unavailable", "refusal"),
        ("ignore-deadline", "deadline"),
    ] {
        let mut args = SIM.to_vec();
        args.extend(["--faulty", mode]);
        let sim = region_sim(dir.path(), mode, &args);
        let c = check_cluster(&sim.endpoint(), &BUDGET);
        assert_eq!(c.with("FAIL"), vec![caught], "--faulty {mode}:\n{}", c.out);
        assert_eq!(c.code, Some(1), "a FAIL exits 1");
        // What the breach hides from the other checks is said, not failed:
        // without load reports nothing can read in_flight.
        let warned = c.with("WARN");
        if mode == "no-load-report" {
            assert_eq!(
                warned,
                vec!["cancel", "deadline", "load.concurrency"],
                "{}",
                c.out
            );
        } else {
            assert!(warned.is_empty(), "--faulty {mode}:\n{}", c.out);
        }
    }
}

#[test]
fn region_sim_over_mtls_passes_with_the_ca_and_a_client_certificate() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new(dir.path(), "ca");
    let server = ca.server(dir.path(), "sim");
    let client = ca.client(dir.path(), "checker", &["checker.clients.example"]);
    let mut args = SIM.to_vec();
    let (cert, key, ca_file) = (
        server.cert.to_str().unwrap(),
        server.key.to_str().unwrap(),
        ca.cert.to_str().unwrap(),
    );
    args.extend(["--tls-cert", cert, "--tls-key", key, "--tls-client-ca", ca_file]);
    let sim = region_sim(dir.path(), "tls", &args);
    let endpoint = format!("https://localhost:{}", sim.addr.port());
    let tls = [
        "--ca-file",
        ca_file,
        "--cert-file",
        client.cert.to_str().unwrap(),
        "--key-file",
        client.key.to_str().unwrap(),
    ];
    let mut with_identity = BUDGET.to_vec();
    with_identity.extend(tls);
    let c = check_cluster(&endpoint, &with_identity);
    assert_eq!(c.with("PASS").len(), CHECKS.len(), "{}", c.out);
    // Without the client certificate the cluster refuses the connection,
    // and every check that needed a call says so.
    let c = check_cluster(&endpoint, &["--ca-file", ca_file]);
    assert_eq!(c.code, Some(1));
    assert_eq!(c.verdicts["health"], "FAIL", "{}", c.out);
    assert_eq!(c.verdicts["execute"], "FAIL", "{}", c.out);
}

#[test]
fn bad_arguments_are_refused_before_any_call() {
    let o = Command::new(env!("CARGO_BIN_EXE_dispatcher"))
        .args(["check-cluster", "ftp://127.0.0.1:1"])
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(2));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("only http:// and https:// endpoints"), "{err}");
    let o = Command::new(env!("CARGO_BIN_EXE_dispatcher"))
        .args([
            "check-cluster",
            "https://localhost:1",
            "--ca-file",
            "/nonexistent/ca.pem",
        ])
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(2));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("/nonexistent/ca.pem"), "{err}");
}

/// The Python example (examples/python-cluster/cluster.py), its packages
/// installed when missing; `env` says what it calls.
fn python_cluster(dir: &std::path::Path, env: &[(&str, &str)], name: &str) -> Proc {
    tools::python_cluster();
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/examples/python-cluster/cluster.py");
    Proc::start_with_env(script, &["--listen", "127.0.0.1:0"], env, dir, name)
}

#[test]
fn the_python_example_passes_while_echoing() {
    let dir = tempfile::tempdir().unwrap();
    let cluster = python_cluster(dir.path(), &[], "python-echo");
    let c = check_cluster(&cluster.endpoint(), &[]);
    assert_eq!(c.code, Some(0), "{}", c.out);
    assert!(c.with("FAIL").is_empty());
    // With no provider there is no quota to relay or run out of: said,
    // with what to do about it.
    assert_eq!(c.with("WARN"), vec!["provider_quota", "refusal"], "{}", c.out);
    assert!(c.out.contains("no provider_quota to size a request"), "{}", c.out);
}

#[test]
fn the_python_example_passes_calling_a_provider() {
    let dir = tempfile::tempdir().unwrap();
    tools::python_cluster();
    let fake = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/examples/python-cluster/fake_provider.py"
    );
    let provider = Proc::start(
        fake,
        &["--listen", "127.0.0.1:0", "--tokens-per-minute", "3000"],
        dir.path(),
        "fake-provider",
    );
    let base = format!("http://{}/v1", provider.addr);
    let cluster = python_cluster(dir.path(), &[("OPENAI_BASE_URL", &base)], "python-provider");
    let c = check_cluster(&cluster.endpoint(), &BUDGET);
    assert_eq!(c.with("PASS").len(), CHECKS.len(), "{}", c.out);
    assert_eq!(c.code, Some(0));
    // The refusal was the provider's 429, relayed with its retry time.
    assert!(c.out.contains("RESOURCE_EXHAUSTED, RetryInfo"), "{}", c.out);
}

/// The README's `check-cluster` run, as written: its region-sim, then the
/// check, whose table must show what the README shows (checks and
/// verdicts; what was seen varies with timing).
#[test]
fn readme_check_cluster_run_works_as_written() {
    let readme = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md")).unwrap();
    let section = readme
        .split("\n## ")
        .find(|s| s.starts_with("Checking a cluster"))
        .expect("README has a section \"Checking a cluster\"");
    assert!(
        section.contains("docs/CLUSTERS.md"),
        "the section links the contract"
    );
    let sh = section
        .split("```sh\n")
        .nth(1)
        .and_then(|b| b.split("```").next())
        .expect("an sh block");
    let commands: Vec<String> = sh.replace("\\\n", " ").lines().map(str::to_string).collect();
    assert_eq!(commands.len(), 2, "{commands:#?}");
    let words = |c: &str, prefix: &str| -> Vec<String> {
        c.strip_prefix(prefix)
            .unwrap_or_else(|| panic!("{c:?} starts with {prefix:?}"))
            .split_whitespace()
            .map(str::to_string)
            .collect()
    };
    let mut sim_args = words(&commands[0], "cargo run --release --bin region-sim -- ");
    let listen = sim_args.iter().position(|a| a == "--listen").unwrap() + 1;
    let shown_addr = std::mem::replace(&mut sim_args[listen], "127.0.0.1:0".into());
    let dir = tempfile::tempdir().unwrap();
    let args: Vec<&str> = sim_args.iter().map(String::as_str).collect();
    let sim = Proc::start(env!("CARGO_BIN_EXE_region-sim"), &args, dir.path(), "region-sim");
    let check_args = words(
        &commands[1],
        "cargo run --release --bin dispatcher -- check-cluster ",
    );
    assert_eq!(check_args[0], format!("http://{shown_addr}"));
    let rest: Vec<&str> = check_args[1..].iter().map(String::as_str).collect();
    let c = check_cluster(&sim.endpoint(), &rest);
    let shown = section
        .split("```text\n")
        .nth(1)
        .and_then(|b| b.split("```").next())
        .expect("the run's output follows the commands");
    assert_eq!(c.verdicts, verdicts(shown), "the README's table:\n{shown}");
    assert_eq!(c.out.lines().next(), shown.lines().next(), "the header");
    let summary = |t: &str| t.lines().last().unwrap().split(';').next().unwrap().to_string();
    assert_eq!(summary(c.out.trim()), summary(shown.trim()));
    assert_eq!(c.code, Some(0));
}
