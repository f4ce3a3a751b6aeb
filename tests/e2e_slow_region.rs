//! A region that turns slow (region-sim told to add two seconds a request):
//! traffic shifts away from it, and the other regions' requests stay fast.

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{ConfigDir, SimRegion, client, dispatcher, sim_configure};
use dispatcher::pb;
use tokio::sync::Mutex;

const DISPATCHER_TOML: &str = r#"
[auth]
allow_anonymous = true
[[models]]
name = "gpt-4o"
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn traffic_moves_off_a_slow_region() {
    let cfg = ConfigDir::new(DISPATCHER_TOML);
    let mut sims = Vec::new();
    for name in ["a", "b", "c"] {
        let sim = cfg.start_region(SimRegion {
            name,
            sim_args: &["--base-latency-ms", "10", "--ms-per-1k-tokens", "1000"],
            ..Default::default()
        });
        sims.push(sim);
    }
    let d = dispatcher(&cfg.config());
    let grpc = client(d.addr).await;
    // (sent since start, region, latency)
    let seen: Arc<Mutex<Vec<(Duration, String, Duration)>>> = Arc::default();
    let start = Instant::now();
    let mut calls = tokio::task::JoinSet::new();
    let mut tick = tokio::time::interval(Duration::from_millis(20));
    let mut slowed = false;
    while start.elapsed() < Duration::from_secs(8) {
        tick.tick().await;
        if !slowed && start.elapsed() >= Duration::from_secs(2) {
            sim_configure(
                sims[1].addr,
                pb::SimSettings {
                    extra_latency_ms: Some(2000),
                    ..Default::default()
                },
            )
            .await;
            slowed = true;
        }
        let mut g = grpc.clone();
        let seen = seen.clone();
        calls.spawn(async move {
            let sent = Instant::now();
            let r = g
                .dispatch(pb::DispatchRequest {
                    model: "gpt-4o".into(),
                    prompt_tokens: 200,
                    max_output_tokens: 100,
                    ..Default::default()
                })
                .await
                .expect("every request is answered")
                .into_inner();
            seen.lock().await.push((sent - start, r.region, sent.elapsed()));
        });
    }
    while calls.join_next().await.is_some() {}
    let seen = seen.lock().await;
    let share_b = |from: u64, to: u64| {
        let window: Vec<_> = seen
            .iter()
            .filter(|(t, _, _)| *t >= Duration::from_secs(from) && *t < Duration::from_secs(to))
            .collect();
        window.iter().filter(|(_, r, _)| r == "b").count() as f64 / window.len() as f64
    };
    let mut others: Vec<Duration> = seen
        .iter()
        .filter(|(t, r, _)| *t >= Duration::from_secs(2) && r != "b")
        .map(|(_, _, l)| *l)
        .collect();
    others.sort();
    let p99 = others[others.len() * 99 / 100];
    println!(
        "share of requests to b: {:.1} % before it slowed, {:.1} % in the last 4 s; p99 of the others' requests after: {p99:?}",
        100.0 * share_b(0, 2),
        100.0 * share_b(4, 8)
    );
    assert!(share_b(0, 2) > 0.2, "b had its share before");
    assert!(share_b(4, 8) < 0.05, "traffic moved off the slow region");
    assert!(
        p99 < Duration::from_millis(1000),
        "the other regions' p99 stayed bounded: {p99:?}"
    );
    drop(sims);
}
