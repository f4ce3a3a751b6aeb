//! Quota accounting end to end, with region-sim processes whose provider
//! limits are the configured ones: under load above the total quota, in both
//! accounting modes, no region-sim refuses a request it had not warned about
//! in a quota hint; every request is answered. And a provider that has less
//! than configured (another consumer shares the account) loses traffic before
//! it has to refuse.

mod common;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use common::{
    ConfigDir, Lcg, SimRegion, client, dispatcher, region_sim, region_status, region_toml, sim_stats,
};
use dispatcher::pb;
use tokio::sync::Mutex;
use tonic::Code;
use tonic_types::StatusExt;

const DISPATCHER_TOML: &str = r#"
[auth]
allow_anonymous = true
[routing]
max_queue_wait = "1s"
[[models]]
name = "gpt-4o"
max_request_tokens = 20000
"#;

#[derive(Default, Debug)]
struct Tally {
    ok: u64,
    exhausted: u64,
    unclear: Vec<String>,
    tokens_by_region: BTreeMap<String, u64>,
}

/// Sends `n` requests open-loop, one every `every`, heavy-tailed sizes.
async fn load(addr: std::net::SocketAddr, n: usize, every: Duration, seed: u64) -> Tally {
    let grpc = client(addr).await;
    let tally = Arc::new(Mutex::new(Tally::default()));
    let mut rng = Lcg(seed);
    let mut tick = tokio::time::interval(every);
    let mut calls = tokio::task::JoinSet::new();
    for _ in 0..n {
        tick.tick().await;
        let req = pb::DispatchRequest {
            model: "gpt-4o".into(),
            payload: "work".into(),
            prompt_tokens: rng.heavy_tail(100.0, 1.3, 6_000.0),
            max_output_tokens: rng.heavy_tail(32.0, 1.5, 2_000.0),
            ..Default::default()
        };
        let mut grpc = grpc.clone();
        let tally = tally.clone();
        calls.spawn(async move {
            let result = grpc.dispatch(req).await;
            let mut t = tally.lock().await;
            match result {
                Ok(r) => {
                    let r = r.into_inner();
                    let u = r.usage.unwrap();
                    t.ok += 1;
                    *t.tokens_by_region.entry(r.region).or_default() += u.prompt_tokens + u.completion_tokens;
                }
                Err(s) if s.code() == Code::ResourceExhausted && s.get_details_retry_info().is_some() => {
                    t.exhausted += 1
                }
                Err(s) => t.unclear.push(format!("{:?}: {}", s.code(), s.message())),
            }
        });
    }
    while calls.join_next().await.is_some() {}
    Arc::try_unwrap(tally).unwrap().into_inner()
}

async fn above_total_quota(accounting: &str) {
    let cfg = ConfigDir::new(DISPATCHER_TOML);
    let regions = [("r1", 120_000u64), ("r2", 60_000)];
    let mut sims = Vec::new();
    for (name, tpm) in regions {
        let sim = cfg.start_region(SimRegion {
            name,
            tokens_per_minute: tpm,
            requests_per_minute: 100_000,
            burst_tokens: Some(20_000),
            accounting,
            max_concurrent: 512,
            sim_args: &["--ms-per-1k-tokens", "20", "--base-latency-ms", "2"],
            ..Default::default()
        });
        sims.push(sim);
    }
    let d = dispatcher(&cfg.config());
    // ~700 tokens a request, 33 a second: ~23,000 tokens/s offered against
    // 3,000/s of quota (plus 40,000 of burst), for 9 s.
    let t = load(d.addr, 300, Duration::from_millis(30), 3).await;
    let mut refused = 0;
    let mut unannounced = 0;
    for sim in &sims {
        let m = &sim_stats(sim.addr).await.models[0];
        refused += m.rejected;
        unannounced += m.rejected - m.rejected_after_hint;
    }
    println!(
        "accounting = {accounting}: replies {}, RESOURCE_EXHAUSTED {}, region-sim refusals {refused} ({unannounced} unannounced), tokens by region {:?}",
        t.ok, t.exhausted, t.tokens_by_region
    );
    assert_eq!(t.ok + t.exhausted + t.unclear.len() as u64, 300);
    assert!(t.unclear.is_empty(), "{:?}", &t.unclear[..t.unclear.len().min(5)]);
    assert!(t.exhausted > 0, "the load must exceed the quota");
    assert_eq!(
        unannounced, 0,
        "a region-sim refused without a hint having said so first"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn above_total_quota_with_admission_accounting() {
    above_total_quota("admission").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn above_total_quota_with_usage_accounting() {
    above_total_quota("usage").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_provider_with_less_than_configured_loses_traffic_before_refusing() {
    let cfg = ConfigDir::new(DISPATCHER_TOML);
    // Both regions are configured with 240,000 tokens a minute, but the
    // provider account behind "shared" is shared: only 30,000 are ours.
    let solo = region_sim(
        cfg.path(),
        "solo",
        &[
            "--model",
            "gpt-4o:240000:100000:usage",
            "--ms-per-1k-tokens",
            "20",
        ],
    );
    let shared = region_sim(
        cfg.path(),
        "shared",
        &["--model", "gpt-4o:30000:100000:usage", "--ms-per-1k-tokens", "20"],
    );
    for (name, sim) in [("solo", &solo), ("shared", &shared)] {
        cfg.write_region(
            name,
            &region_toml(
                name,
                &sim.endpoint(),
                512,
                &[("gpt-4o", 240_000, 100_000, "usage")],
            ),
        );
    }
    let d = dispatcher(&cfg.config());
    // ~700 tokens a request, 20 a second for 10 s: ~140,000 tokens. Split
    // evenly, shared would get more than the ~35,000 it really has; solo
    // alone can take all of it.
    let t = load(d.addr, 200, Duration::from_millis(50), 11).await;
    let shared_stats = &sim_stats(shared.addr).await.models[0];
    let solo_stats = &sim_stats(solo.addr).await.models[0];
    let status = region_status(d.addr, "shared").await.unwrap();
    let hint = status.models[0].last_hint.unwrap_or_default();
    let to_shared = t.tokens_by_region.get("shared").copied().unwrap_or(0) as f64;
    let total: u64 = t.tokens_by_region.values().sum();
    println!(
        "replies {}; tokens by region {:?}; shared got {:.1} % (configured share 50 %); shared refused {}, solo refused {}; last hint from shared: {} tokens left; dispatcher's view: {}",
        t.ok,
        t.tokens_by_region,
        100.0 * to_shared / total as f64,
        shared_stats.rejected,
        solo_stats.rejected,
        hint.remaining_tokens,
        status.models[0].tokens_available
    );
    assert!(status.models[0].last_hint.is_some(), "shared sent quota hints");
    assert_eq!(t.ok, 200, "everything fits the quota that is really there");
    assert_eq!(
        shared_stats.rejected, 0,
        "shared had to refuse: the dispatcher did not listen to its hints"
    );
    assert!(
        hint.remaining_tokens <= 30_000,
        "shared hinted at what is really left"
    );
    assert!(
        to_shared < 0.3 * total as f64,
        "traffic did not shift away from shared"
    );
}

/// When the provider behind every region refuses the request for quota,
/// the caller hears RESOURCE_EXHAUSTED with when to retry, not UNAVAILABLE
/// as in an outage.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_by_every_provider_is_resource_exhausted_with_a_retry_hint() {
    let cfg = ConfigDir::new(DISPATCHER_TOML);
    // Configured for 100,000 requests a minute; the providers take one.
    let mut sims = Vec::new();
    for name in ["p1", "p2"] {
        let sim = region_sim(
            cfg.path(),
            name,
            &["--model", "gpt-4o:240000:1:admission", "--ms-per-1k-tokens", "1"],
        );
        cfg.write_region(
            name,
            &region_toml(
                name,
                &sim.endpoint(),
                64,
                &[("gpt-4o", 240_000, 100_000, "admission")],
            ),
        );
        sims.push(sim);
    }
    let d = dispatcher(&cfg.config());
    let mut grpc = client(d.addr).await;
    let req = pb::DispatchRequest {
        model: "gpt-4o".into(),
        payload: "work".into(),
        max_output_tokens: 10,
        ..Default::default()
    };
    for _ in 0..2 {
        grpc.dispatch(req.clone()).await.expect("each provider takes one");
    }
    let status = grpc.dispatch(req).await.unwrap_err();
    assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
    let retry = status.get_details_retry_info().expect("RetryInfo");
    let delay = retry.retry_delay.expect("a delay");
    assert!(
        delay > Duration::from_secs(30) && delay <= Duration::from_secs(60),
        "{delay:?}"
    );
    assert!(status.message().contains("refused"), "{}", status.message());
    let mut rejected = 0;
    for sim in &sims {
        rejected += sim_stats(sim.addr).await.models[0].rejected;
    }
    assert!(rejected >= 1, "the providers refused");
}
