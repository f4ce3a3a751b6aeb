//! `loadgen` against real processes: open loop through the dispatcher with
//! two tenants (and a caller with a wrong key), a request-count bound, closed
//! loop straight at a region-sim, and its refusals of bad arguments. Checks
//! the JSON report: counts, status codes, the split by region and tenant.

mod common;

use std::process::Command;

use common::{ConfigDir, SimRegion, dispatcher};
use dispatcher::dispatch::hash_key;
use serde_json::Value;

fn config() -> String {
    format!(
        r#"
[[models]]
name = "gpt-4o"
[[tenants]]
name = "small"
weight = 1
keys = ["{}"]
[[tenants]]
name = "large"
weight = 3
keys = ["{}"]
"#,
        hash_key("k-small"),
        hash_key("k-large")
    )
}

fn loadgen(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_loadgen"))
        .args(args)
        .output()
        .expect("running loadgen")
}

fn report(args: &[&str]) -> Value {
    let out = loadgen(args);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "loadgen failed: {stderr}");
    println!("{stderr}");
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "stdout is the JSON report alone ({e}): {}",
            String::from_utf8_lossy(&out.stdout)
        )
    })
}

fn count(v: &Value) -> u64 {
    v.as_u64().unwrap_or_else(|| panic!("not a count: {v}"))
}

#[test]
fn reports_what_it_sent_and_how_it_split() {
    let cfg = ConfigDir::new(&config());
    let mut sims = Vec::new();
    for (name, tpm) in [("east", 60_000_000u64), ("west", 30_000_000)] {
        let sim = cfg.start_region(SimRegion {
            name,
            tokens_per_minute: tpm,
            requests_per_minute: 1_000_000,
            accounting: "usage",
            max_concurrent: 1000,
            sim_args: &["--ms-per-1k-tokens", "0", "--base-latency-ms", "1"],
            ..Default::default()
        });
        sims.push(sim);
    }
    let d = dispatcher(&cfg.config());
    let target = d.endpoint();

    // 200/s for 2 s: 400 requests, a tenth from a caller with a wrong key.
    let page = cfg.path().join("report.html");
    let r = report(&[
        "--target",
        &target,
        "--rate",
        "200",
        "--duration",
        "2s",
        "--sizes",
        "mix",
        "--quiet",
        "--tenant",
        "small:k-small:3",
        "--tenant",
        "large:k-large:6",
        "--tenant",
        "stranger:k-wrong:1",
        "--json",
        "-",
        "--html",
        page.to_str().unwrap(),
    ]);
    assert_eq!(count(&r["sent"]), 400, "{r:#}");
    let codes = &r["status_codes"];
    let (ok, unauthenticated) = (count(&codes["Ok"]), count(&codes["Unauthenticated"]));
    assert_eq!(ok + unauthenticated, 400, "only these two outcomes: {codes}");
    assert!((20..=70).contains(&unauthenticated), "about a tenth: {codes}");
    assert_eq!(count(&r["ok"]), ok);
    let tenants = r["tenants"].as_object().unwrap();
    assert_eq!(
        tenants.keys().collect::<Vec<_>>(),
        ["large", "small", "stranger"],
        "{r:#}"
    );
    // Per tenant: its status codes, and the latency of its successes.
    assert_eq!(count(&tenants["stranger"]["requests"]), 0, "no replies");
    assert_eq!(
        count(&tenants["stranger"]["status_codes"]["Unauthenticated"]),
        unauthenticated
    );
    assert!(tenants["small"]["latency_ok"]["p50_ms"].as_f64().unwrap() > 0.0);
    // Successes are timed apart from refusals.
    assert_eq!(count(&r["latency_ok"]["count"]), ok);
    assert_eq!(count(&r["latency_failed"]["count"]), unauthenticated);
    // The page: self-contained (nothing fetched), both charts, both splits.
    let html = std::fs::read_to_string(&page).unwrap();
    assert!(html.starts_with("<!doctype html>") && html.trim_end().ends_with("</html>"));
    for fetch in ["<script", "src=", "href=", "@import"] {
        assert!(!html.contains(fetch), "the page fetches nothing: {fetch}");
    }
    for part in [
        "Latency of successes, per second",
        "Successes per second",
        "Failures per second",
        "By region",
        "By tenant",
        ">stranger<",
        ">east<",
    ] {
        assert!(html.contains(part), "the page shows {part}");
    }
    let (small, large) = (
        count(&tenants["small"]["requests"]),
        count(&tenants["large"]["requests"]),
    );
    assert_eq!(small + large, ok);
    let large_share = large as f64 / ok as f64;
    assert!(
        (0.55..=0.78).contains(&large_share),
        "drawn 6:3: {large_share:.2}"
    );
    let regions = r["regions"].as_object().unwrap();
    assert_eq!(regions.keys().collect::<Vec<_>>(), ["east", "west"], "{r:#}");
    let shares: f64 = regions
        .values()
        .map(|s| s["share_of_tokens"].as_f64().unwrap())
        .sum();
    assert!((shares - 1.0).abs() < 1e-9);
    let l = &r["latency"];
    let p: Vec<f64> = ["p50_ms", "p90_ms", "p99_ms", "p999_ms", "max_ms"]
        .iter()
        .map(|k| l[k].as_f64().unwrap())
        .collect();
    assert!(p[0] > 0.0 && p.windows(2).all(|w| w[0] <= w[1]), "{l}");

    // A request-count bound stops it early.
    let r = report(&[
        "--target",
        &target,
        "--rate",
        "500",
        "--duration",
        "30s",
        "--requests",
        "50",
        "--quiet",
        "--tenant",
        "small:k-small:1",
        "--json",
        "-",
    ]);
    assert_eq!((count(&r["sent"]), count(&r["ok"])), (50, 50), "{r:#}");

    // Closed loop straight at a region-sim (as for a baseline).
    let r = report(&[
        "--target",
        &sims[0].endpoint(),
        "--mode",
        "cluster",
        "--concurrency",
        "4",
        "--duration",
        "1s",
        "--requests",
        "200",
        "--sizes",
        "heavy",
        "--quiet",
        "--json",
        "-",
    ]);
    assert_eq!(count(&r["ok"]), 200, "{r:#}");
    assert!(r["regions"].as_object().unwrap().is_empty());
    assert_eq!(r["concurrency"], 4);
}

#[test]
fn refuses_bad_arguments_with_a_reason() {
    for (args, says) in [
        (&["--tenant", "only-a-name"][..], "expected NAME:KEY:WEIGHT"),
        (&["--tenant", "a:k:0"][..], "weight must be above zero"),
        (&["--tenant", "a:clé:1"][..], "printable ASCII"),
        (&["--tenant", "a:k y:1"][..], "printable ASCII"),
        (&["--rate", "0"][..], "--rate must be a number above zero"),
        (&["--connections", "0"][..], "--connections must be at least 1"),
        (
            &["--warmup", "5s", "--duration", "2s"][..],
            "must be shorter than --duration",
        ),
        (&["--duration", "soon"][..], "--duration"),
    ] {
        let out = loadgen(args);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{args:?} was accepted");
        assert!(stderr.contains(says), "{args:?}: {stderr}");
    }
}
