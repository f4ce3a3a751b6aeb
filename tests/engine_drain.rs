//! Draining, in process on a paused clock: after `begin_shutdown` new work is
//! refused at once, and `drained` returns only when the work already taken
//! has ended: calls in flight, requests still waiting for quota, streams
//! still relaying, and a request_id's leader that runs on after its caller
//! left (its answer is kept for a repeat of the id).

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

/// One region with one slot; calls take 3 s.
fn world() -> World {
    let w = World::start(&config(
        &dispatcher_toml("[routing]\nmax_queue_wait = \"5s\""),
        &[gpt_region("r", 6_000_000, 6_000_000, "max_concurrent = 1")],
    ));
    w.cluster("r").always(Reply::ok().after(secs(3.0)));
    w
}

fn with_id(id: &str) -> dispatcher::pb::DispatchRequest {
    dispatcher::pb::DispatchRequest {
        request_id: id.into(),
        ..request(10, 10)
    }
}

#[tokio::test(start_paused = true)]
async fn drained_waits_for_calls_in_flight_and_requests_waiting_for_quota() {
    let w = world();
    let sent = w.spawn_dispatch(request(10, 10), None, KEY_A);
    w.cluster("r").wait_for_calls(1).await;
    let waiting = w.spawn_dispatch(request(10, 10), None, KEY_B);
    tokio::time::sleep(secs(1.0)).await;
    assert_eq!(w.engine.running(), 2);

    w.engine.begin_shutdown();
    let e = w.engine.dispatch(request(10, 10), None, KEY_A).await.unwrap_err();
    assert!(matches!(e, DispatchError::ShuttingDown), "{e}");
    assert_eq!(status(&e).0, Code::Unavailable);

    w.engine.drained().await;
    assert_eq!(
        w.elapsed(),
        secs(6.0),
        "the first call ends at 3 s, the one that waited at 6 s"
    );
    assert_eq!(w.engine.running(), 0);
    assert_eq!(sent.await.unwrap().0.unwrap().queue_wait, Duration::ZERO);
    assert_eq!(waiting.await.unwrap().0.unwrap().queue_wait, secs(3.0));
    assert_eq!((w.cluster("r").answered(), w.cluster("r").cancelled()), (2, 0));
}

#[tokio::test(start_paused = true)]
async fn drained_waits_for_a_stream_to_end() {
    let w = world();
    w.cluster("r").always(Reply::ok().chunks(4, secs(0.5)));
    let stream = match w.engine.dispatch_stream(request(10, 100), None, KEY_A).await {
        Ok(s) => s,
        Err(e) => panic!("{e}"),
    };
    let reader = tokio::spawn(async move {
        let items: Vec<_> = stream.collect().await;
        (items, Instant::now())
    });
    w.engine.begin_shutdown();
    w.engine.drained().await;
    assert_eq!(w.elapsed(), secs(2.0), "the relay ends with the last chunk");
    let (items, _) = reader.await.unwrap();
    assert_eq!(items.len(), 4);
    assert!(items.last().unwrap().as_ref().unwrap().done);
}

#[tokio::test(start_paused = true)]
async fn a_request_id_leader_runs_on_after_its_caller_left() {
    let w = world();
    let caller = w.spawn_dispatch(with_id("job-1"), None, KEY_A);
    w.cluster("r").wait_for_calls(1).await;
    tokio::time::sleep(secs(1.0)).await;
    caller.abort();
    assert!(caller.await.unwrap_err().is_cancelled());

    w.cluster("r").wait_for_idle().await;
    assert_eq!(w.elapsed(), secs(3.0));
    assert_eq!(
        (w.cluster("r").answered(), w.cluster("r").cancelled()),
        (1, 0),
        "the work ran to its end"
    );
    // A repeat of the id gets that answer without running it again.
    let again = w.engine.dispatch(with_id("job-1"), None, KEY_A).await.unwrap();
    assert_eq!(again.request_id, "job-1");
    assert_eq!(w.cluster("r").calls(), 1);
}

#[tokio::test(start_paused = true)]
async fn drained_waits_for_a_request_id_leader_whose_caller_left() {
    let w = world();
    let caller = w.spawn_dispatch(with_id("job-1"), None, KEY_A);
    w.cluster("r").wait_for_calls(1).await;
    tokio::time::sleep(secs(1.0)).await;
    caller.abort();
    let _ = caller.await;

    w.engine.begin_shutdown();
    w.engine.drained().await;
    assert_eq!(
        (w.elapsed(), w.cluster("r").answered()),
        (secs(3.0), 1),
        "drained once the leader's call was answered"
    );
}
