//! A retry storm: every region failing, a burst of requests. Total attempts
//! upstream stay within the retry budget instead of multiplying by
//! max_attempts.

mod common;

use std::time::{Duration, Instant};

use common::{ConfigDir, SimRegion, client, dispatcher, sim_stats};
use dispatcher::pb;
use tonic::Code;

const BURST: u64 = 200;

// The breakers are set out of the way, so the budget alone bounds retries.
const DISPATCHER_TOML: &str = r#"
[auth]
allow_anonymous = true
[server]
max_attempts = 3
[routing.breaker]
consecutive_failures = 1000000
min_requests = 1000000
[routing.retry_budget]
ratio = 0.2
min_per_second = 5
[[models]]
name = "gpt-4o"
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retries_stay_within_the_budget_when_everything_fails() {
    let cfg = ConfigDir::new(DISPATCHER_TOML);
    let mut sims = Vec::new();
    for name in ["a", "b", "c"] {
        let sim = cfg.start_region(SimRegion {
            name,
            max_concurrent: 1024,
            sim_args: &["--failure-rate", "1"],
            ..Default::default()
        });
        sims.push(sim);
    }
    let d = dispatcher(&cfg.config());
    let grpc = client(d.addr).await;
    let start = Instant::now();
    let mut calls = tokio::task::JoinSet::new();
    for _ in 0..BURST {
        let mut g = grpc.clone();
        calls.spawn(async move {
            g.dispatch(pb::DispatchRequest {
                model: "gpt-4o".into(),
                prompt_tokens: 10,
                max_output_tokens: 10,
                ..Default::default()
            })
            .await
        });
    }
    let mut unavailable = 0;
    while let Some(r) = calls.join_next().await {
        let s = r.unwrap().expect_err("every region fails");
        assert_eq!(s.code(), Code::Unavailable, "{s:?}");
        assert!(s.message().contains("attempt"), "{}", s.message());
        unavailable += 1;
    }
    let elapsed = start.elapsed();
    let mut attempts = 0;
    for sim in &sims {
        attempts += sim_stats(sim.addr).await.failed;
    }
    let budget = BURST as f64 * 0.2 + 5.0 * elapsed.as_secs_f64() + 1.0;
    println!(
        "{BURST} requests, all answered UNAVAILABLE ({unavailable}); {attempts} attempts upstream in {elapsed:?} \
         (first attempts {BURST} + retry budget {budget:.0}; without a budget up to {})",
        BURST * 3
    );
    assert_eq!(unavailable, BURST);
    assert!(attempts >= BURST, "every request was tried once");
    assert!(
        attempts as f64 <= BURST as f64 + budget,
        "{attempts} attempts exceed the budget"
    );
    let _ = Duration::ZERO;
    drop(sims);
}
