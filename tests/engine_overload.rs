//! Overload control through the engine, in process on a paused clock: a
//! queue that stands for the interval refuses newcomers at once with
//! RESOURCE_EXHAUSTED and RetryInfo, the region view (what ListRegions and
//! the metrics read) says it is shedding and how many it refused early, and
//! a tenant under its share still waits.

mod common;

use std::time::Duration;

use common::engine::*;
use dispatcher::core::QueueState;
use dispatcher::dispatch::DispatchError;
use tonic::Code;

fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

/// One region refilling 100 tokens a second (bucket 600); requests may
/// wait 5 s; a queue standing above 500 ms for 2 s sheds, without holds.
fn world() -> World {
    World::start(&config(
        &dispatcher_toml(
            "[routing]\nmax_queue_wait = \"5s\"\n[routing.overload]\ntarget = \"500ms\"\ninterval = \"2s\"\nhold_share = 0.0",
        ),
        &[gpt_region("r", 6000, 600, "")],
    ))
}

#[tokio::test(start_paused = true)]
async fn a_standing_queue_refuses_newcomers_at_once_and_the_view_says_so() {
    let w = world();
    w.engine.dispatch(request(100, 500), None, KEY_A).await.unwrap();
    // Tenant a: 20 tokens every 100 ms, twice the refill, for 4 s.
    let mut sent = Vec::new();
    for i in 1..=40u64 {
        tokio::time::sleep(ms(100)).await;
        sent.push((ms(100 * i), w.spawn_dispatch(request(10, 10), None, KEY_A)));
    }
    tokio::task::yield_now().await;
    let quota = w
        .region("r")
        .models
        .into_iter()
        .find(|m| m.model == "gpt-4o")
        .unwrap();
    assert_eq!(quota.queue_state, QueueState::Shedding, "{quota:?}");
    assert!(quota.refused_early >= 5, "{quota:?}");

    // Tenant b has nothing queued: under its share, it still waits and is served.
    let b = w.spawn_dispatch(request(10, 10), None, KEY_B);

    let mut first_refused = None;
    for (at, h) in sent {
        let (result, took) = h.await.unwrap();
        match result {
            Ok(_) => assert!(first_refused.is_none() || took < ms(500), "served after {took:?}"),
            Err(e) => {
                assert!(matches!(e, DispatchError::WouldWaitInVain { .. }), "{e}");
                assert_eq!(took, Duration::ZERO, "refused at once: {e}");
                assert!(e.to_string().contains("shedding"), "{e}");
                let (code, retry) = status(&e);
                assert_eq!(code, Code::ResourceExhausted);
                assert!(retry.is_some_and(|r| r >= ms(100)), "RetryInfo {retry:?}");
                first_refused.get_or_insert(at);
            }
        }
    }
    let first = first_refused.expect("some were refused");
    // The head passed 500 ms about 1 s in; 2 s later the queue stood.
    assert!(
        first >= ms(2500) && first <= ms(3500),
        "first refused at {first:?}"
    );
    let (b, took) = b.await.unwrap();
    b.unwrap();
    assert!(took <= ms(2500), "b waited {took:?}");
}
