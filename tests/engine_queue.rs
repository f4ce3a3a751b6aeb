//! Waiting for quota, in process on a paused clock: a request that cannot be
//! reserved now waits for the refill and is sent the moment it fits; one
//! that could not fit within the time it may wait is refused at once, with
//! RetryInfo saying when it would; a wait for a free slot ends at
//! `routing.max_queue_wait`. Times are exact: the virtual clock moves only
//! when every task waits for a timer.

mod common;

use std::time::Duration;

use common::engine::*;
use dispatcher::dispatch::DispatchError;
use tonic::Code;

const MS: Duration = Duration::from_millis(1);

fn secs(s: f64) -> Duration {
    Duration::from_secs_f64(s)
}

/// One region refilling 100 tokens a second into a bucket of 600, with
/// `extra` region keys; requests may wait 5 s.
fn world(extra: &str) -> World {
    World::start(&config(
        &dispatcher_toml("[routing]\nmax_queue_wait = \"5s\""),
        &[gpt_region("r", 6000, 600, extra)],
    ))
}

#[tokio::test(start_paused = true)]
async fn a_request_waiting_for_quota_is_served_after_the_refill() {
    let w = world("");
    let first = w.engine.dispatch(request(100, 500), None, KEY_A).await.unwrap();
    assert_eq!(first.queue_wait, Duration::ZERO, "the full bucket");

    // 300 tokens more: three seconds of refill.
    let waiting = w.spawn_dispatch(request(100, 200), None, KEY_B);
    tokio::time::sleep(secs(2.99)).await;
    assert_eq!(w.cluster("r").calls(), 1, "not sent before it fits");

    let (served, took) = waiting.await.unwrap();
    let served = served.unwrap();
    assert_eq!(served.region, "r");
    assert_eq!(served.queue_wait, secs(3.0), "sent the moment the refill allows");
    assert_eq!(took, secs(3.0));
    let seen = w.cluster("r").seen();
    assert_eq!(seen.len(), 2);
    assert_eq!(seen[1].at - w.t0, secs(3.0));
    assert_eq!(seen[1].tenant, "b");
}

#[tokio::test(start_paused = true)]
async fn a_request_that_would_wait_in_vain_is_refused_at_once() {
    let w = world("");
    w.engine.dispatch(request(100, 500), None, KEY_A).await.unwrap();

    // 600 tokens: six seconds of refill, past the five it may wait.
    let (refused, took) = w.spawn_dispatch(request(100, 500), None, KEY_A).await.unwrap();
    let e = refused.unwrap_err();
    assert!(matches!(e, DispatchError::WouldWaitInVain { .. }), "{e}");
    assert_eq!(took, Duration::ZERO, "refused without waiting");
    assert_eq!(
        status(&e),
        (Code::ResourceExhausted, Some(secs(6.0))),
        "RetryInfo says when it fits: {e}"
    );

    // The caller's own deadline bounds the wait as well: 300 tokens need
    // 3 s, the caller gives 2.
    let (refused, took) = w
        .spawn_dispatch(request(100, 200), Some(secs(2.0)), KEY_A)
        .await
        .unwrap();
    let e = refused.unwrap_err();
    assert_eq!(took, Duration::ZERO);
    assert_eq!(status(&e), (Code::ResourceExhausted, Some(secs(3.0))), "{e}");
    assert_eq!(w.cluster("r").calls(), 1, "nothing refused was sent");

    // Nothing was taken for them: 300 tokens fit 3 s after the first.
    tokio::time::sleep(secs(3.0)).await;
    let served = w.engine.dispatch(request(100, 200), None, KEY_A).await.unwrap();
    assert_eq!(served.queue_wait, Duration::ZERO);
}

#[tokio::test(start_paused = true)]
async fn a_request_waiting_for_a_slot_is_sent_when_one_frees() {
    let w = world("max_concurrent = 1");
    w.cluster("r").then([Reply::ok().after(secs(2.0))]);
    let first = w.spawn_dispatch(request(10, 10), None, KEY_A);
    w.cluster("r").wait_for_calls(1).await;

    let second = w.spawn_dispatch(request(10, 10), None, KEY_B);
    let (first, took) = first.await.unwrap();
    first.unwrap();
    assert_eq!(took, secs(2.0));
    let (second, took) = second.await.unwrap();
    assert_eq!(second.unwrap().queue_wait, secs(2.0));
    assert_eq!(took, secs(2.0), "sent as the slot freed");
    assert_eq!(w.cluster("r").max_in_flight(), 1);
}

#[tokio::test(start_paused = true)]
async fn a_wait_for_a_slot_ends_at_max_queue_wait() {
    let w = world("max_concurrent = 1");
    w.cluster("r").then([Reply::ok().after(secs(10.0))]);
    let first = w.spawn_dispatch(request(10, 10), None, KEY_A);
    w.cluster("r").wait_for_calls(1).await;

    let (second, took) = w.spawn_dispatch(request(10, 10), None, KEY_B).await.unwrap();
    let e = second.unwrap_err();
    assert!(matches!(e, DispatchError::QueueTimeout { .. }), "{e}");
    assert_eq!(took, secs(5.0), "routing.max_queue_wait");
    assert_eq!(status(&e), (Code::ResourceExhausted, Some(100 * MS)), "{e}");
    assert_eq!(w.cluster("r").calls(), 1);

    let (first, took) = first.await.unwrap();
    first.unwrap();
    assert_eq!(took, secs(10.0));
}

#[tokio::test(start_paused = true)]
async fn a_providers_refusal_says_when_to_retry() {
    let w = world("");
    w.cluster("r").then([Reply::exhausted(secs(2.5))]);
    let (refused, took) = w.spawn_dispatch(request(10, 10), None, KEY_A).await.unwrap();
    let e = refused.unwrap_err();
    assert!(matches!(e, DispatchError::ProvidersRefused { .. }), "{e}");
    assert_eq!(took, Duration::ZERO);
    assert_eq!(status(&e), (Code::ResourceExhausted, Some(secs(2.5))), "{e}");
    assert_eq!(
        w.circuit("r"),
        dispatcher::core::CircuitState::Closed,
        "a 429 is about quota, not the region's health"
    );
}

/// `routing.max_queue_wait` is one budget per request, not per attempt: a
/// request that waited 3 s for r1, was refused there by the provider and
/// would need 3 s more for r2 has 2 s of its 5 left, so it is refused at
/// once instead of waiting 6 s in all.
#[tokio::test(start_paused = true)]
async fn a_retry_after_a_provider_refusal_waits_only_what_is_left_of_the_budget() {
    let w = World::start(&config(
        &dispatcher_toml("[routing]\nmax_queue_wait = \"5s\""),
        &[gpt_region("r1", 6000, 600, ""), gpt_region("r2", 3000, 600, "")],
    ));
    // Both buckets empty; 300 tokens fit r1 in 3 s and r2 in 6 s.
    w.cluster("r1").then([Reply::ok(), Reply::exhausted(secs(3.0))]);
    w.cluster("r2").then([Reply::ok(), Reply::ok()]);
    for _ in 0..2 {
        w.engine.dispatch(request(100, 500), None, KEY_A).await.unwrap();
    }

    let (result, took) = w.spawn_dispatch(request(100, 200), None, KEY_A).await.unwrap();
    assert!(
        took <= secs(5.0),
        "waited {took:?} in all, past max_queue_wait: {result:?}"
    );
    let e = result.unwrap_err();
    assert_eq!(
        took,
        secs(3.0),
        "refused when r1 refused, as r2 needs 3 s more: {e}"
    );
    assert_eq!(status(&e).0, Code::ResourceExhausted, "{e}");
    assert_eq!(w.cluster("r2").calls(), 1, "not sent to r2");
}
