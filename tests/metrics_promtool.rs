//! Prometheus metrics: `promtool check metrics` passes on a scrape taken
//! under load, and the counters agree with the replies the test received.

mod common;

use std::collections::BTreeMap;
use std::io::Write;
use std::process::{Command, Stdio};
use std::time::Duration;

use common::{ConfigDir, Proc, SimRegion, tools};
use dispatcher::dispatch::hash_key;
use dispatcher::pb;

/// Sums of `name{...}` samples by the value of `by`, over samples whose
/// labels contain every `(label, value)` of `filter`.
fn sum(text: &str, name: &str, filter: &[(&str, &str)], by: &str) -> BTreeMap<String, f64> {
    let mut out = BTreeMap::new();
    for line in text.lines().filter(|l| l.starts_with(&format!("{name}{{"))) {
        let (labels, value) = line.rsplit_once(' ').unwrap();
        let labels = &labels[name.len() + 1..labels.len() - 1];
        let pairs: Vec<(&str, &str)> = labels
            .split("\",")
            .filter_map(|kv| kv.split_once("=\""))
            .map(|(k, v)| (k.trim(), v.trim_end_matches('"')))
            .collect();
        if filter.iter().all(|f| pairs.contains(f)) {
            let key = pairs
                .iter()
                .find(|(k, _)| *k == by)
                .map_or("", |(_, v)| v)
                .to_string();
            *out.entry(key).or_insert(0.0) += value.parse::<f64>().unwrap();
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_pass_promtool_and_agree_with_replies() {
    let cfg = ConfigDir::new(&format!(
        "[telemetry]\nmetrics_listen = \"127.0.0.1:0\"\n[[models]]\nname = \"gpt-4o\"\n[[tenants]]\nname = \"team-a\"\nkeys = [\"{}\"]\n",
        hash_key("k-a")
    ));
    let mut sims = Vec::new();
    for (name, tpm) in [("east", 600_000u64), ("west", 300_000)] {
        let sim = cfg.start_region(SimRegion {
            name,
            tokens_per_minute: tpm,
            requests_per_minute: 100_000,
            max_concurrent: 64,
            sim_args: &["--ms-per-1k-tokens", "200"],
            ..Default::default()
        });
        sims.push(sim);
    }
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
    let metrics = d.listener("metrics");
    let grpc = common::client(d.addr).await;

    let mut calls = tokio::task::JoinSet::new();
    for i in 0..80u64 {
        let mut g = grpc.clone();
        let mut req = tonic::Request::new(pb::DispatchRequest {
            model: if i % 10 == 9 {
                "nope".into()
            } else {
                "gpt-4o".into()
            },
            payload: "measure me".into(),
            prompt_tokens: 200 + i,
            max_output_tokens: 300,
            ..Default::default()
        });
        req.metadata_mut()
            .insert("authorization", "Bearer k-a".parse().unwrap());
        calls.spawn(async move { (200 + i + 300, g.dispatch(req).await) });
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    // Taken while requests are in flight.
    let under_load = common::scrape_metrics(metrics);
    let mut replies: BTreeMap<String, f64> = BTreeMap::new();
    let mut reserved: BTreeMap<String, f64> = BTreeMap::new();
    let mut invalid = 0.0;
    while let Some(r) = calls.join_next().await {
        match r.unwrap() {
            (tokens, Ok(reply)) => {
                let region = reply.into_inner().region;
                *replies.entry(region.clone()).or_default() += 1.0;
                *reserved.entry(region).or_default() += tokens as f64;
            }
            (_, Err(s)) => {
                assert_eq!(s.code(), tonic::Code::InvalidArgument, "{s:?}");
                invalid += 1.0;
            }
        }
    }

    let mut promtool = Command::new(tools::promtool())
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    promtool
        .stdin
        .take()
        .unwrap()
        .write_all(under_load.as_bytes())
        .unwrap();
    let out = promtool.wait_with_output().unwrap();
    let said = String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    println!("promtool check metrics: {}\n{said}", out.status);
    assert!(
        out.status.success(),
        "promtool refused the scrape:\n{said}\n{under_load}"
    );
    assert!(under_load.contains("dispatcher_region_in_flight"), "{under_load}");
    assert!(
        under_load.contains("dispatcher_queue_oldest_wait_seconds{model=\"gpt-4o\"}"),
        "{under_load}"
    );
    assert!(
        under_load.contains("dispatcher_queue_shedding{model=\"gpt-4o\"} 0"),
        "{under_load}"
    );
    assert!(
        under_load.contains("# TYPE dispatcher_queue_refused_early_total counter"),
        "{under_load}"
    );

    // Counters after the load agree with what the replies said.
    let text = common::scrape_metrics(metrics);
    let ok = sum(
        &text,
        "dispatcher_requests_total",
        &[("outcome", "ok"), ("tenant", "team-a")],
        "region",
    );
    let bad = sum(
        &text,
        "dispatcher_requests_total",
        &[("outcome", "invalid_argument")],
        "outcome",
    );
    let tokens = sum(
        &text,
        "dispatcher_tokens_reserved_total",
        &[("model", "gpt-4o")],
        "region",
    );
    let charged = sum(
        &text,
        "dispatcher_tokens_charged_total",
        &[("model", "gpt-4o")],
        "region",
    );
    let latency = sum(
        &text,
        "dispatcher_request_duration_seconds_count",
        &[("outcome", "ok")],
        "region",
    );
    println!("replies by region {replies:?}; counted {ok:?}; reserved {reserved:?} vs {tokens:?}");
    assert_eq!(
        ok, replies,
        "dispatcher_requests_total{{outcome=\"ok\"}} by region"
    );
    assert_eq!(bad.get("invalid_argument").copied().unwrap_or(0.0), invalid);
    assert_eq!(tokens, reserved, "dispatcher_tokens_reserved_total by region");
    assert_eq!(charged, reserved, "admission accounting charges the reservation");
    assert_eq!(latency, replies, "one latency sample per reply");
    // No empty label: the invalid requests never reached a model or a
    // region, and say so.
    let empty: Vec<&str> = text
        .lines()
        .filter(|l| !l.starts_with('#') && l.contains("=\"\""))
        .collect();
    assert!(empty.is_empty(), "samples with an empty label: {empty:#?}");
    let none = sum(
        &text,
        "dispatcher_requests_total",
        &[("outcome", "invalid_argument"), ("region", "none")],
        "model",
    );
    assert_eq!(none.get("none").copied().unwrap_or(0.0), invalid, "{none:?}");
    drop(sims);
}

/// The value of the one sample `series` (name and labels as rendered).
fn sample(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
}

/// `dispatcher_circuit_state` (which the shipped alert and dashboard read)
/// is there for every region from the start, before any request or
/// breaker transition; a region removed by a reload leaves `/metrics`,
/// with its other gauges, instead of reporting its last values for ever.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_regions_circuit_state_is_exported_from_the_start_and_dropped_with_the_region() {
    let cfg = ConfigDir::new(&format!(
        "[telemetry]\nmetrics_listen = \"127.0.0.1:0\"\n[[models]]\nname = \"gpt-4o\"\n[[tenants]]\nname = \"team-a\"\nkeys = [\"{}\"]\n",
        hash_key("k-a")
    ));
    let _east = cfg.start_region(SimRegion {
        name: "east",
        ..Default::default()
    });
    let _west = cfg.start_region(SimRegion {
        name: "west",
        ..Default::default()
    });
    let d = common::dispatcher(&cfg.config());
    let metrics = d.listener("metrics");
    let circuit = |r: &str| format!("dispatcher_circuit_state{{region=\"{r}\"}}");

    // No request has been sent: both regions' breakers are closed, and say so.
    let mut text = String::new();
    let shown = common::eventually(Duration::from_secs(5), || {
        text = common::scrape_metrics(metrics);
        let ready = sample(&text, &circuit("east")).is_some() && sample(&text, &circuit("west")).is_some();
        async move { ready }
    })
    .await;
    assert!(shown.is_some(), "no circuit state for a healthy cluster:\n{text}");
    assert_eq!(sample(&text, &circuit("east")), Some(0.0), "closed");
    assert_eq!(sample(&text, &circuit("west")), Some(0.0), "closed");

    // A reload removes west: its gauges go (a sample unchanged for
    // GAUGE_IDLE is dropped), east's stay.
    std::fs::remove_file(cfg.region_file("west")).unwrap();
    let gone = common::eventually(dispatcher::metrics::GAUGE_IDLE + Duration::from_secs(10), || {
        text = common::scrape_metrics(metrics);
        let gone = !text
            .lines()
            .any(|l| !l.starts_with('#') && l.contains("region=\"west\""));
        async move { gone }
    })
    .await;
    println!("west's gauges gone after {gone:?}");
    assert!(gone.is_some(), "a removed region's gauges stay:\n{text}");
    assert_eq!(sample(&text, &circuit("east")), Some(0.0), "{text}");
    assert!(
        text.contains("dispatcher_region_in_flight{region=\"east\"}"),
        "{text}"
    );
}
