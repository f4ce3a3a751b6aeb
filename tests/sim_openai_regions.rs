//! Three `region-sim --openai` regions (OpenAI, Azure, OpenAI dialects;
//! 60k / 30k / 15k tokens a minute, bursts of 5 s) behind the dispatcher,
//! strict providers (prompt + max_tokens charged at admission, refused when
//! it does not fit), offered twice their quota: the rate-limit headers and
//! the first refusals keep the dispatcher within the providers' quota, so
//! they refuse nothing after the first second. Once with one process, once
//! with three replicas sharing the quota through a real redis-server.
//!
//! Ignored (20 s of load each, more with SECONDS): run with
//!   cargo test --release --test sim_openai_regions -- --ignored --nocapture

mod common;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use common::openai::{openai_sim, region_head};
use common::redis::RedisServer;
use common::{ConfigDir, Proc, dispatcher, sim_stats};
use dispatcher::pb;

const KEY: &str = "sk-sim-openai-regions";
/// (region, dialect, tokens a minute)
const REGIONS: [(&str, &str, u64); 3] = [
    ("east", "openai", 60_000),
    ("west", "azure", 30_000),
    ("north", "openai", 15_000),
];

/// 780 characters: a 203-token prompt by the estimate both ends use.
fn payload() -> bytes::Bytes {
    let content = "x".repeat(780);
    serde_json::json!({"messages": [{"role": "user", "content": content}]})
        .to_string()
        .into()
}
const TOKENS: u64 = 203 + 100;

fn seconds() -> u64 {
    std::env::var("SECONDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(20)
}

/// The region-sims, their key in `dir`.
fn providers(dir: &std::path::Path) -> Vec<Proc> {
    let key_file = dir.join("provider.key");
    std::fs::write(&key_file, KEY).unwrap();
    REGIONS
        .iter()
        .map(|(name, dialect, tpm)| {
            let model = format!("gpt-4o:{tpm}:100000:admission");
            let burst = (tpm / 12).to_string();
            let quick = [
                "--burst-tokens",
                &burst,
                "--base-latency-ms",
                "50",
                "--ms-per-1k-tokens",
                "0",
            ];
            openai_sim(dir, name, dialect, &key_file, &model, &quick)
        })
        .collect()
}

fn write_regions(cfg: &ConfigDir, sims: &[Proc], key_file: &std::path::Path) {
    for ((name, dialect, tpm), sim) in REGIONS.iter().zip(sims) {
        let models = format!(
            "[[models]]\nname = \"gpt-4o\"\ntokens_per_minute = {tpm}\nrequests_per_minute = 100000\nburst_tokens = {}\naccounting = \"admission\"\n",
            tpm / 12
        );
        cfg.write_region(
            name,
            &(region_head(name, &sim.endpoint(), dialect, key_file) + &models),
        );
    }
}

fn chat_request() -> tonic::Request<pb::DispatchRequest> {
    tonic::Request::new(pb::DispatchRequest {
        model: "gpt-4o".into(),
        payload: payload(),
        max_output_tokens: 100,
        ..Default::default()
    })
}

async fn refusals(sims: &[Proc]) -> Vec<u64> {
    let mut out = Vec::new();
    for s in sims {
        out.push(sim_stats(s.addr).await.models[0].rejected);
    }
    out
}

/// Twice the quota on `replicas` for SECONDS; prints and checks the
/// refusals after the first second.
async fn run(replicas: &[SocketAddr], sims: &[Proc]) {
    let quota_per_sec: u64 = REGIONS.iter().map(|(_, _, t)| t).sum::<u64>() / 60;
    let rate = 2.0 * quota_per_sec as f64 / TOKENS as f64;
    let every = Duration::from_secs_f64(replicas.len() as f64 / rate);
    let stop = Arc::new(AtomicBool::new(false));
    let tally = Arc::new(common::replicas::Tally::default());
    let start = Instant::now();
    let loads: Vec<_> = replicas
        .iter()
        .map(|a| common::replicas::load_with(*a, every, stop.clone(), tally.clone(), chat_request))
        .collect();
    tokio::time::sleep(Duration::from_secs(1)).await;
    let early = refusals(sims).await;
    tokio::time::sleep(Duration::from_secs(seconds() - 1)).await;
    stop.store(true, Ordering::Relaxed);
    for l in loads {
        l.await.unwrap();
    }
    let took = start.elapsed();
    let end = refusals(sims).await;
    let late: u64 = end.iter().zip(&early).map(|(e, b)| e - b).sum();
    let ok = tally.ok.load(Ordering::Relaxed);
    let quota = quota_per_sec as f64 * took.as_secs_f64()
        + REGIONS.iter().map(|(_, _, t)| t / 12).sum::<u64>() as f64;
    println!(
        "{} replica(s), {:.0} s at {rate:.1} requests/s ({} tokens/s offered, quota {quota_per_sec}/s): \
         served {ok} ({:.0} % of the quota), refused by the dispatcher {}, other {}; \
         provider refusals in the first second {:?}, after it {late}",
        replicas.len(),
        took.as_secs_f64(),
        2 * quota_per_sec,
        100.0 * (ok * TOKENS) as f64 / quota,
        tally.exhausted.load(Ordering::Relaxed),
        tally.other.load(Ordering::Relaxed),
        early,
    );
    assert_eq!(late, 0, "provider refusals after the first second");
    assert_eq!(tally.other.load(Ordering::Relaxed), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "20 s of load; run with --ignored --nocapture"]
async fn one_process_twice_the_quota_no_refusals_after_the_first_second() {
    let cfg = ConfigDir::new(
        "[auth]\nallow_anonymous = true\n[routing]\nmax_queue_wait = \"2s\"\n[[models]]\nname = \"gpt-4o\"\nmax_request_tokens = 20000\n",
    );
    let sims = providers(cfg.path());
    write_regions(&cfg, &sims, &cfg.path().join("provider.key"));
    let d = dispatcher(&cfg.config());
    run(&[d.addr], &sims).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "20 s of load; run with --ignored --nocapture"]
async fn three_replicas_on_redis_twice_the_quota_no_refusals_after_the_first_second() {
    let redis = RedisServer::start();
    let dirs: Vec<ConfigDir> = (1..=3)
        .map(|i| ConfigDir::new(&common::replicas::config(&redis.url(), &format!("r{i}"))))
        .collect();
    let sims = providers(dirs[0].path());
    let key_file = dirs[0].path().join("provider.key");
    for d in &dirs {
        write_regions(d, &sims, &key_file);
    }
    let procs: Vec<Proc> = dirs.iter().map(|d| dispatcher(&d.config())).collect();
    let addrs: Vec<SocketAddr> = procs.iter().map(|p| p.addr).collect();
    // Every replica in shared mode before the load.
    let shared = common::eventually(Duration::from_secs(5), || async {
        let mut all = true;
        for a in &addrs {
            for (name, _, _) in REGIONS {
                let s = common::region_status(*a, name).await.unwrap();
                all &= s.models[0].shared.as_ref().is_some_and(|s| s.mode == "shared");
            }
        }
        all
    })
    .await;
    assert!(shared.is_some(), "every replica shares the quota");
    run(&addrs, &sims).await;
}
