//! The circuit breaker through the engine, on a paused clock: failures open a
//! region's circuit (so no work is sent there), the cool-down ends in
//! half-open, exactly `half_open_trials` trials go, and their successes
//! close it again; a failed trial opens it for another cool-down.

mod common;

use std::time::Duration;

use common::engine::*;
use dispatcher::core::CircuitState;
use tonic::Code;

fn secs(s: f64) -> Duration {
    Duration::from_secs_f64(s)
}

/// Region "r" opens after 3 failures in a row (or 30 % of at least 10
/// requests), cools down for 5 s, then lets 2 trials through.
fn world(regions: &[&str]) -> World {
    let breaker = r#"
[routing.breaker]
consecutive_failures = 3
error_threshold = 0.3
min_requests = 10
window = "10s"
cool_down = "5s"
half_open_trials = 2
"#;
    let regions: Vec<String> = regions
        .iter()
        .map(|r| gpt_region(r, 6_000_000, 6_000_000, ""))
        .collect();
    World::start(&config(&dispatcher_toml(breaker), &regions))
}

/// Dispatches one request and says how it ended (the gRPC code) and when.
async fn one(w: &World) -> Code {
    match w.engine.dispatch(request(10, 10), None, KEY_A).await {
        Ok(_) => Code::Ok,
        Err(e) => status(&e).0,
    }
}

/// Opens "r" with three failures (INTERNAL: the work may have run, so it is
/// not retried elsewhere).
async fn open(w: &World) {
    w.cluster("r")
        .then([Reply::internal(), Reply::internal(), Reply::internal()]);
    for i in 0..3 {
        assert_eq!(w.circuit("r"), CircuitState::Closed, "after {i} failures");
        assert_eq!(one(w).await, Code::Unavailable);
    }
    let until = tokio::time::Instant::now().into_std() + secs(5.0);
    assert_eq!(w.circuit("r"), CircuitState::Open { until });
}

#[tokio::test(start_paused = true)]
async fn failures_open_the_circuit_and_trials_close_it() {
    let w = world(&["r"]);
    open(&w).await;

    // Open: nothing is sent there.
    assert_eq!(one(&w).await, Code::Unavailable);
    assert_eq!(w.cluster("r").calls(), 3);

    tokio::time::sleep(secs(5.0)).await;
    assert_eq!(
        w.circuit("r"),
        CircuitState::HalfOpen {
            sent: 0,
            succeeded: 0
        }
    );
    // Half-open: two trials go (each takes 1 s); a third, while they are
    // out, is refused at once rather than sent.
    w.cluster("r").always(Reply::ok().after(secs(1.0)));
    let trials: Vec<_> = (0..3)
        .map(|_| w.spawn_dispatch(request(10, 10), None, KEY_A))
        .collect();
    w.cluster("r").wait_for_calls(5).await;
    assert_eq!(
        w.circuit("r"),
        CircuitState::HalfOpen {
            sent: 2,
            succeeded: 0
        }
    );
    let mut served = Vec::new();
    for t in trials {
        let (result, took) = t.await.unwrap();
        served.push((result.map(|d| d.queue_wait).map_err(|e| status(&e)), took));
    }
    assert_eq!(
        served,
        [
            (Ok(Duration::ZERO), secs(1.0)),
            (Ok(Duration::ZERO), secs(1.0)),
            (Err((Code::Unavailable, None)), Duration::ZERO),
        ],
        "two trials, no more"
    );
    assert_eq!(
        w.circuit("r"),
        CircuitState::Closed,
        "closed by the trials' success"
    );
    assert_eq!(w.cluster("r").calls(), 5);
    assert_eq!(one(&w).await, Code::Ok);
}

#[tokio::test(start_paused = true)]
async fn a_failed_trial_opens_the_circuit_again() {
    let w = world(&["r"]);
    open(&w).await;
    tokio::time::sleep(secs(5.0)).await;

    w.cluster("r").then([Reply::internal()]);
    assert_eq!(one(&w).await, Code::Unavailable);
    let until = tokio::time::Instant::now().into_std() + secs(5.0);
    assert_eq!(w.circuit("r"), CircuitState::Open { until }, "another cool-down");
    assert_eq!(one(&w).await, Code::Unavailable);
    assert_eq!(w.cluster("r").calls(), 4, "nothing sent while open");

    tokio::time::sleep(secs(5.0)).await;
    assert_eq!(one(&w).await, Code::Ok);
    assert_eq!(one(&w).await, Code::Ok);
    assert_eq!(w.circuit("r"), CircuitState::Closed);
}

#[tokio::test(start_paused = true)]
async fn an_open_region_is_passed_over_for_the_others() {
    let w = world(&["r", "s"]);
    // Everything to "r" while it fails.
    w.engine.desk().drain("s", true);
    open(&w).await;
    w.engine.desk().drain("s", false);
    for _ in 0..10 {
        assert_eq!(one(&w).await, Code::Ok);
    }
    assert_eq!(w.cluster("r").calls(), 3, "nothing more went to the open region");
    assert_eq!(w.cluster("s").calls(), 10);
}

#[tokio::test(start_paused = true)]
async fn an_error_rate_over_the_threshold_opens_the_circuit() {
    let w = world(&["r"]);
    // Failures never three in a row; the tenth request makes 4 of 10 (40 %).
    let ok = Reply::ok;
    let bad = Reply::internal;
    w.cluster("r")
        .then([ok(), bad(), ok(), bad(), ok(), bad(), ok(), ok(), ok(), bad()]);
    for i in 0..10 {
        assert_eq!(w.circuit("r"), CircuitState::Closed, "after {i} requests");
        one(&w).await;
    }
    assert!(
        matches!(w.circuit("r"), CircuitState::Open { .. }),
        "{:?}",
        w.circuit("r")
    );
}
