//! Drain under load: after DrainRegion returns, no request sent afterwards
//! goes to the drained region, and every request already there completes.

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{ConfigDir, SimRegion, admin, client, dispatcher, region_status};
use dispatcher::pb;
use tokio::sync::Mutex;

const DISPATCHER_TOML: &str = r#"
[auth]
allow_anonymous = true
[routing]
strategy = "round_robin"
[[models]]
name = "gpt-4o"
"#;

/// When a request was sent, and the region that answered it (or the error).
type Sent = (Instant, Result<String, String>);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drained_region_gets_no_new_work_and_finishes_its_own() {
    let cfg = ConfigDir::new(DISPATCHER_TOML);
    let mut sims = Vec::new();
    for name in ["east", "west"] {
        // 300 ms a request: plenty in flight at any moment.
        let sim = cfg.start_region(SimRegion {
            name,
            tokens_per_minute: 10_000_000,
            requests_per_minute: 1_000_000,
            sim_args: &["--base-latency-ms", "300", "--ms-per-1k-tokens", "0"],
            ..Default::default()
        });
        sims.push(sim);
    }
    let d = dispatcher(&cfg.config());
    let grpc = client(d.addr).await;
    let results: Arc<Mutex<Vec<Sent>>> = Arc::default();
    let start = Instant::now();
    let mut calls = tokio::task::JoinSet::new();
    let mut drained_at = None;
    let mut in_flight_at_drain = 0;
    let mut tick = tokio::time::interval(Duration::from_millis(10));
    while start.elapsed() < Duration::from_secs(3) {
        tick.tick().await;
        if drained_at.is_none() && start.elapsed() >= Duration::from_secs(1) {
            in_flight_at_drain = region_status(d.addr, "west").await.unwrap().in_flight;
            let status = admin(d.addr)
                .await
                .drain_region(pb::RegionRequest {
                    region: "west".into(),
                })
                .await
                .unwrap()
                .into_inner();
            assert!(status.drained);
            drained_at = Some(Instant::now());
        }
        let mut g = grpc.clone();
        let results = results.clone();
        calls.spawn(async move {
            let sent = Instant::now();
            let r = g
                .dispatch(pb::DispatchRequest {
                    model: "gpt-4o".into(),
                    prompt_tokens: 10,
                    max_output_tokens: 10,
                    ..Default::default()
                })
                .await
                .map(|r| r.into_inner().region)
                .map_err(|s| format!("{:?}: {}", s.code(), s.message()));
            results.lock().await.push((sent, r));
        });
    }
    while calls.join_next().await.is_some() {}
    let drained_at = drained_at.unwrap();
    let results = results.lock().await;
    let failed: Vec<_> = results.iter().filter_map(|(_, r)| r.as_ref().err()).collect();
    let after_to_west = results
        .iter()
        .filter(|(sent, r)| *sent > drained_at && r.as_deref() == Ok("west"))
        .count();
    let before_on_west = results
        .iter()
        .filter(|(sent, r)| *sent < drained_at && r.as_deref() == Ok("west"))
        .count();
    let after = results.iter().filter(|(sent, _)| *sent > drained_at).count();
    println!(
        "{} requests; {in_flight_at_drain} in flight on west when it was drained; {before_on_west} served by west before; \
         {after} sent after the drain, {after_to_west} of them to west; {} failed",
        results.len(),
        failed.len()
    );
    assert!(in_flight_at_drain > 0, "the drain happened under load");
    assert!(failed.is_empty(), "every request completes: {failed:?}");
    assert_eq!(after_to_west, 0, "no new work for a drained region");
    assert!(after > 100);
    let west = region_status(d.addr, "west").await.unwrap();
    assert_eq!(west.in_flight, 0, "what was there finished");
    assert!(west.drained);
    drop(sims);
}
