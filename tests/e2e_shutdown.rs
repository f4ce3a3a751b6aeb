//! Shutdown under load: on SIGTERM the dispatcher stops taking new work
//! (UNAVAILABLE), every request already in flight completes, and the process
//! exits 0 within the drain timeout.

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{ConfigDir, SimRegion, client, dispatcher};
use dispatcher::pb;
use tokio::sync::Mutex;
use tonic::Code;

const DISPATCHER_TOML: &str = r#"
[auth]
allow_anonymous = true
[server]
shutdown_grace = "5s"
[[models]]
name = "gpt-4o"
"#;

/// When a request was sent and how it ended.
type Sent = (Instant, Result<(), Code>);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_drains_in_flight_work_and_exits_zero() {
    let cfg = ConfigDir::new(DISPATCHER_TOML);
    // A second a request: plenty in flight when the signal comes.
    let sim = cfg.start_region(SimRegion {
        name: "slow",
        max_concurrent: 1024,
        sim_args: &["--base-latency-ms", "1000", "--ms-per-1k-tokens", "0"],
        ..Default::default()
    });
    let mut d = dispatcher(&cfg.config());
    let grpc = client(d.addr).await;
    let results: Arc<Mutex<Vec<Sent>>> = Arc::default();
    let mut calls = tokio::task::JoinSet::new();
    let mut tick = tokio::time::interval(Duration::from_millis(20));
    let start = Instant::now();
    let mut term_at = None;
    while start.elapsed() < Duration::from_millis(2500) {
        tick.tick().await;
        if term_at.is_none() && start.elapsed() >= Duration::from_millis(1500) {
            d.terminate();
            term_at = Some(Instant::now());
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
                .map(|_| ())
                .map_err(|s| s.code());
            results.lock().await.push((sent, r));
        });
    }
    while calls.join_next().await.is_some() {}
    let term_at = term_at.unwrap();
    let exit = d.wait(Duration::from_secs(6));
    let exited_after = term_at.elapsed();
    let exited_at = term_at + exited_after;
    let results = results.lock().await;
    // Sent at least a moment before the signal, so surely in flight.
    let before: Vec<_> = results
        .iter()
        .filter(|(sent, _)| *sent + Duration::from_millis(50) < term_at)
        .collect();
    // Sent after the signal while the process still answered (after it
    // exits, clients see a closed connection, not an answer).
    let after: Vec<_> = results
        .iter()
        .filter(|(sent, _)| {
            *sent > term_at + Duration::from_millis(50) && *sent + Duration::from_millis(100) < exited_at
        })
        .collect();
    let before_ok = before.iter().filter(|(_, r)| r.is_ok()).count();
    println!(
        "{} requests sent before SIGTERM: {before_ok} completed; {} sent after it: {:?}; exit {:?} after {exited_after:?}",
        before.len(),
        after.len(),
        after
            .iter()
            .map(|(_, r)| format!("{r:?}"))
            .collect::<std::collections::BTreeSet<_>>(),
        exit
    );
    assert!(before.len() > 50);
    assert!(
        before
            .iter()
            .all(|(_, r)| r.is_ok() || *r == Err(Code::Unavailable)),
        "in-flight work completes (or is refused clearly)"
    );
    assert!(
        before_ok >= before.len() - 5,
        "the work in flight was finished, not dropped"
    );
    assert!(
        !after.is_empty() && after.iter().all(|(_, r)| *r == Err(Code::Unavailable)),
        "new work gets UNAVAILABLE"
    );
    assert!(exit.is_some_and(|s| s.success()), "exits 0");
    assert!(
        exited_after < Duration::from_secs(5) + Duration::from_millis(500),
        "within the drain timeout"
    );
    drop(sim);
}
