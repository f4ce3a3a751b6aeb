//! Deadlines, in process on a paused clock: a caller's deadline ends a slow
//! call (unary or streamed) at exactly that deadline with DEADLINE_EXCEEDED,
//! cancels the call upstream, and is not held against the region; the
//! dispatcher's own deadline (`server.default_timeout`) is the region's
//! failure. The deadline goes to the region as `grpc-timeout`.

mod common;

use std::time::Duration;

use common::engine::*;
use dispatcher::dispatch::DispatchError;
use tokio::time::Instant;
use tokio_stream::StreamExt;
use tonic::Code;

fn secs(s: f64) -> Duration {
    Duration::from_secs_f64(s)
}

/// One region with tokens to spare; the dispatcher's own deadline is 3 s.
fn world() -> World {
    World::start(&config(
        &dispatcher_toml("[server]\ndefault_timeout = \"3s\""),
        &[gpt_region("r", 6_000_000, 6_000_000, "")],
    ))
}

#[tokio::test(start_paused = true)]
async fn a_callers_deadline_ends_a_slow_call_at_the_deadline() {
    let w = world();
    w.cluster("r").always(Reply::ok().after(secs(10.0)));
    let (result, took) = w
        .spawn_dispatch(request(10, 10), Some(secs(2.0)), KEY_A)
        .await
        .unwrap();
    let e = result.unwrap_err();
    assert!(matches!(e, DispatchError::DeadlineExceeded(_)), "{e}");
    assert_eq!(status(&e).0, Code::DeadlineExceeded);
    assert_eq!(took, secs(2.0), "exactly at the deadline");
    assert_eq!(w.cluster("r").seen()[0].timeout, Some(secs(2.0)), "propagated");

    w.cluster("r").wait_for_idle().await;
    assert_eq!(w.elapsed(), secs(2.0), "the call upstream ended at once");
    assert_eq!(
        (w.cluster("r").cancelled(), w.cluster("r").answered()),
        (1, 0),
        "cancelled upstream"
    );
    assert_eq!(
        w.blame("r"),
        Blame::NONE,
        "the caller's deadline is not the region's failure"
    );
}

#[tokio::test(start_paused = true)]
async fn the_dispatchers_own_deadline_is_the_regions_failure() {
    let w = world();
    w.cluster("r").always(Reply::ok().after(secs(10.0)));
    let (result, took) = w.spawn_dispatch(request(10, 10), None, KEY_A).await.unwrap();
    let e = result.unwrap_err();
    assert_eq!(status(&e).0, Code::DeadlineExceeded, "{e}");
    assert_eq!(took, secs(3.0), "server.default_timeout");
    assert_eq!(w.cluster("r").seen()[0].timeout, Some(secs(3.0)));
    let blame = w.blame("r");
    assert_eq!((blame.failed, blame.in_flight), (1, 0), "{blame:?}");
    assert!(blame.error_rate > 0.0, "{blame:?}");
}

#[tokio::test(start_paused = true)]
async fn a_stream_ends_at_the_callers_deadline() {
    let w = world();
    // A chunk every 150 ms: six before the deadline at 1 s, fourteen after.
    w.cluster("r").always(Reply::ok().chunks(20, secs(0.15)));
    let t0 = Instant::now();
    let mut stream = match w
        .engine
        .dispatch_stream(request(10, 200), Some(secs(1.0)), KEY_A)
        .await
    {
        Ok(s) => s,
        Err(e) => panic!("{e}"),
    };
    let mut chunks = Vec::new();
    let end = loop {
        match stream.next().await {
            Some(Ok(chunk)) => chunks.push((t0.elapsed(), chunk)),
            Some(Err(e)) => break e,
            None => panic!("the stream ended without its final chunk or an error"),
        }
    };
    assert_eq!(t0.elapsed(), secs(1.0), "ended at the deadline");
    assert!(matches!(end, DispatchError::DeadlineExceeded(_)), "{end}");
    let times: Vec<_> = chunks.iter().map(|(at, _)| *at).collect();
    assert_eq!(
        times,
        (1..=6).map(|i| secs(0.15) * i).collect::<Vec<_>>(),
        "relayed as they came"
    );
    assert!(chunks.iter().all(|(_, c)| !c.done));
    assert!(stream.next().await.is_none());

    w.cluster("r").wait_for_idle().await;
    assert_eq!(w.elapsed(), secs(1.0));
    assert_eq!(w.cluster("r").cancelled(), 1, "cancelled upstream");
    assert_eq!(w.blame("r"), Blame::NONE);
    assert_eq!(w.engine.running(), 0, "the relay has ended");
}

/// A region whose one slot is taken for 10 s.
async fn busy_world() -> (World, tokio::task::JoinHandle<(Dispatch, Duration)>) {
    let w = World::start(&config(
        &dispatcher_toml("[routing]\nmax_queue_wait = \"5s\""),
        &[gpt_region("r", 6_000_000, 6_000_000, "max_concurrent = 1")],
    ));
    w.cluster("r").then([Reply::ok().after(secs(10.0))]);
    let first = w.spawn_dispatch(request(10, 10), None, KEY_A);
    w.cluster("r").wait_for_calls(1).await;
    (w, first)
}

type Dispatch = Result<dispatcher::dispatch::Dispatched, DispatchError>;

#[tokio::test(start_paused = true)]
async fn a_callers_deadline_ends_a_wait_for_quota() {
    let (w, first) = busy_world().await;
    // No slot for 10 s; this caller gives it 2 (it may wait 5).
    let (result, took) = w
        .spawn_dispatch(request(10, 10), Some(secs(2.0)), KEY_B)
        .await
        .unwrap();
    assert!(result.is_err());
    assert_eq!(took, secs(2.0), "the wait ends at the caller's deadline");
    assert_eq!(w.cluster("r").calls(), 1, "never sent");
    first.await.unwrap().0.unwrap();
    assert_eq!(w.blame("r"), Blame::NONE);
}

#[tokio::test(start_paused = true)]
async fn a_wait_cut_by_the_callers_deadline_is_answered_deadline_exceeded() {
    let (w, _first) = busy_world().await;
    let (result, _) = w
        .spawn_dispatch(request(10, 10), Some(secs(2.0)), KEY_B)
        .await
        .unwrap();
    let e = result.unwrap_err();
    assert_eq!(status(&e).0, Code::DeadlineExceeded, "{e}");
}
