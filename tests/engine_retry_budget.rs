//! The retry budget through the engine, on a paused clock: during an outage
//! of every region, failover retries are paid for by first attempts
//! (`routing.retry_budget.ratio`, plus `min_per_second`), so the regions get
//! a bounded multiple of the offered load, not `max_attempts` times it.

mod common;

use std::time::Duration;

use common::engine::*;
use dispatcher::dispatch::DispatchError;
use tonic::Code;

/// Three regions, three attempts per request, a breaker that never opens
/// (so that only the budget limits retries).
fn world(min_per_second: f64) -> World {
    let extra = format!(
        r#"
[server]
max_attempts = 3

[routing.retry_budget]
ratio = 0.2
min_per_second = {min_per_second}
window = "10s"

[routing.breaker]
consecutive_failures = 1000000
min_requests = 1000000
"#
    );
    let regions: Vec<String> = ["a", "b", "c"]
        .iter()
        .map(|r| gpt_region(r, 6_000_000, 6_000_000, ""))
        .collect();
    let w = World::start(&config(&dispatcher_toml(&extra), &regions));
    for c in w.clusters.values() {
        c.always(Reply::unavailable());
    }
    w
}

#[tokio::test(start_paused = true)]
async fn an_outage_gets_a_fifth_more_attempts_not_three_times_as_many() {
    let w = world(0.0);
    let mut budget_spent = 0;
    for _ in 0..50 {
        let e = w.engine.dispatch(request(10, 10), None, KEY_A).await.unwrap_err();
        assert!(matches!(e, DispatchError::AttemptsExhausted { .. }), "{e}");
        assert_eq!(status(&e).0, Code::Unavailable);
        if e.to_string().contains("retry budget is spent") {
            budget_spent += 1;
        }
    }
    // Each request earns a fifth of a retry: every fifth one gets one.
    assert_eq!(w.calls(), 50 + 10, "50 first attempts and 10 retries");
    assert_eq!(
        budget_spent, 50,
        "each stopped by the budget, none by max_attempts"
    );
    assert_eq!(w.elapsed(), Duration::ZERO);
}

#[tokio::test(start_paused = true)]
async fn a_long_outage_is_retried_at_the_budgets_rate() {
    let w = world(1.0);
    // 20 requests a second for 10 s: 200 first attempts. Without a budget,
    // 400 retries; with it, about 0.2 × 200 + 1 × 10 = 50 (less what
    // decays meanwhile).
    for _ in 0..200 {
        let e = w.engine.dispatch(request(10, 10), None, KEY_A).await.unwrap_err();
        assert_eq!(status(&e).0, Code::Unavailable, "{e}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let retries = w.calls() - 200;
    assert!((45..=50).contains(&retries), "{retries} retries");
}

#[tokio::test(start_paused = true)]
async fn a_retry_fails_over_to_another_region() {
    let w = world(0.0);
    // Four failing requests earn four fifths of a retry; the fifth has one.
    for _ in 0..4 {
        w.engine.dispatch(request(10, 10), None, KEY_A).await.unwrap_err();
    }
    assert_eq!(w.calls(), 4);
    for c in w.clusters.values() {
        c.always(Reply::ok());
    }
    // The region it goes to first fails; the retry goes to another.
    let preview = w.engine.route(&request(10, 10), KEY_A).unwrap();
    let first = preview.chosen.expect("a region");
    w.cluster(&first).then([Reply::unavailable()]);
    let served = w.engine.dispatch(request(10, 10), None, KEY_A).await.unwrap();
    assert_eq!(served.attempts, 2);
    assert_ne!(served.region, first);
    assert_eq!(w.calls(), 6);
}
