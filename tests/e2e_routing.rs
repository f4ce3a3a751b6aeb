//! End to end: the dispatcher and three region-sim processes on loopback,
//! several concurrent clients sending heavy-tailed requests at a rate above
//! the smallest region's quota. No region-sim ever refuses (the dispatcher
//! never overshoots a provider quota), every request gets a reply or a clear
//! status, and the work splits as the quotas do.

mod common;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use common::{ConfigDir, Lcg, SimRegion, client, dispatcher, sim_stats};
use dispatcher::pb;
use tokio::sync::Mutex;
use tonic::Code;
use tonic_types::StatusExt;

const DISPATCHER_TOML: &str = r#"
[auth]
allow_anonymous = true
[server]
max_attempts = 3
[routing]
strategy = "weighted_load"
max_queue_wait = "2s"
[[models]]
name = "gpt-4o"
max_request_tokens = 20000
"#;

/// (region, tokens per minute): the smallest takes 1/10 of the total.
const REGIONS: [(&str, u64); 3] = [("big", 300_000), ("mid", 180_000), ("small", 60_000)];
const CLIENTS: usize = 8;
const PER_CLIENT: usize = 375;
/// Each client sends one request every this long: 8 / 40 ms = 200 requests/s.
const INTERVAL: Duration = Duration::from_millis(40);

#[derive(Default, Debug)]
struct Tally {
    ok: u64,
    by_code: BTreeMap<String, u64>,
    tokens_by_region: BTreeMap<String, u64>,
    unclear: Vec<String>,
    sent_tokens: u64,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn never_overshoots_a_provider_quota_and_splits_by_quota() {
    let cfg = ConfigDir::new(DISPATCHER_TOML);
    let mut sims = Vec::new();
    for (name, tpm) in REGIONS {
        let sim = cfg.start_region(SimRegion {
            name,
            tokens_per_minute: tpm,
            requests_per_minute: 100_000,
            max_concurrent: 512,
            sim_args: &["--ms-per-1k-tokens", "2", "--base-latency-ms", "1"],
            ..Default::default()
        });
        sims.push(sim);
    }
    let d = dispatcher(&cfg.config());
    let tally = Arc::new(Mutex::new(Tally::default()));
    let started = std::time::Instant::now();
    let mut tasks = Vec::new();
    for c in 0..CLIENTS {
        let tally = tally.clone();
        let grpc = client(d.addr).await;
        tasks.push(tokio::spawn(async move {
            let mut rng = Lcg(c as u64 + 1);
            let mut tick = tokio::time::interval(INTERVAL);
            // Open loop: requests go out on the clock, whatever the replies do.
            let mut calls = tokio::task::JoinSet::new();
            for _ in 0..PER_CLIENT {
                tick.tick().await;
                let prompt = rng.heavy_tail(100.0, 1.2, 8_000.0);
                let output = rng.heavy_tail(16.0, 1.5, 2_000.0);
                let req = pb::DispatchRequest {
                    model: "gpt-4o".into(),
                    payload: vec![b'x'; 64].into(),
                    prompt_tokens: prompt,
                    max_output_tokens: output,
                    ..Default::default()
                };
                let mut call = tonic::Request::new(req);
                call.set_timeout(Duration::from_secs(10));
                let mut grpc = grpc.clone();
                let tally = tally.clone();
                calls.spawn(async move {
                    let result = grpc.dispatch(call).await;
                    let mut t = tally.lock().await;
                    t.sent_tokens += prompt + output;
                    match result {
                        Ok(reply) => {
                            let r = reply.into_inner();
                            let u = r.usage.unwrap();
                            assert!(!r.output.is_empty());
                            assert!(u.completion_tokens <= output);
                            t.ok += 1;
                            *t.tokens_by_region.entry(r.region).or_default() +=
                                u.prompt_tokens + u.completion_tokens;
                        }
                        Err(status) => {
                            *t.by_code.entry(format!("{:?}", status.code())).or_default() += 1;
                            let clear = status.code() == Code::ResourceExhausted
                                && status.get_details_retry_info().is_some()
                                && status.message().contains("no region");
                            if !clear {
                                t.unclear
                                    .push(format!("{:?}: {}", status.code(), status.message()));
                            }
                        }
                    }
                });
            }
            while calls.join_next().await.is_some() {}
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let elapsed = started.elapsed();
    let t = tally.lock().await;
    let total = (CLIENTS * PER_CLIENT) as u64;
    let answered = t.ok + t.by_code.values().sum::<u64>();

    let mut charged = BTreeMap::new();
    let mut refused = 0;
    for (sim, (name, _)) in sims.iter().zip(REGIONS) {
        let stats = sim_stats(sim.addr).await;
        let m = &stats.models[0];
        refused += m.rejected;
        charged.insert(name, m.charged_tokens);
    }
    let charged_total: u64 = charged.values().sum();
    let quota_total: u64 = REGIONS.iter().map(|(_, q)| q).sum();
    println!(
        "{total} requests in {:.1}s ({:.0}/s), {} tokens offered ({:.0}/s; smallest quota {}/s, all quotas {}/s)",
        elapsed.as_secs_f64(),
        total as f64 / elapsed.as_secs_f64(),
        t.sent_tokens,
        t.sent_tokens as f64 / elapsed.as_secs_f64(),
        REGIONS[2].1 / 60,
        quota_total / 60
    );
    println!(
        "replies {}; statuses {:?}; region-sim refusals {refused}",
        t.ok, t.by_code
    );
    for (name, quota) in REGIONS {
        println!(
            "  {name:6} quota share {:5.1} %  charged share {:5.1} %  ({} tokens charged, {} used by replies)",
            100.0 * quota as f64 / quota_total as f64,
            100.0 * charged[name] as f64 / charged_total as f64,
            charged[name],
            t.tokens_by_region.get(name).copied().unwrap_or(0)
        );
    }

    assert_eq!(answered, total, "every request is answered");
    assert!(
        t.unclear.is_empty(),
        "unclear statuses: {:?}",
        &t.unclear[..t.unclear.len().min(5)]
    );
    assert_eq!(
        refused, 0,
        "a region-sim refused: the dispatcher overshot a provider quota"
    );
    assert!(
        t.by_code.get("ResourceExhausted").copied().unwrap_or(0) > 0,
        "the load must be above the total quota for this test to mean anything"
    );
    for (name, quota) in REGIONS {
        let want = quota as f64 / quota_total as f64;
        let got = charged[name] as f64 / charged_total as f64;
        assert!(
            (got - want).abs() <= 0.1 * want,
            "{name}: charged share {got:.3}, quota share {want:.3}"
        );
    }
    drop(d);
}
