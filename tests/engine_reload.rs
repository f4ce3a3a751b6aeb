//! Reloading while requests wait, in process on a paused clock: requests
//! already waiting for quota are served by the new limits from the moment
//! `Engine::apply` takes them, whether the limits rose or fell.

mod common;

use std::time::Duration;

use common::engine::*;
use dispatcher::config::Config;
use dispatcher::dispatch::DispatchError;
use tonic::Code;

fn secs(s: f64) -> Duration {
    Duration::from_secs_f64(s)
}

/// Region "r" refilling `tokens_per_minute` into a bucket of 600, with
/// `extra` region keys; requests may wait 5 s.
fn config_with(tokens_per_minute: u64, extra: &str) -> Config {
    config(
        &dispatcher_toml("[routing]\nmax_queue_wait = \"5s\""),
        &[gpt_region("r", tokens_per_minute, 600, extra)],
    )
}

fn reload(w: &World, c: &Config) {
    w.engine.apply(c, &endpoints(c)).unwrap();
}

/// Empties the bucket (600 tokens), then queues a request for 300 that
/// needs 3 s of refill at 100 tokens/s; returns it after 1 s of waiting.
async fn waiting(w: &World) -> tokio::task::JoinHandle<(Result<Dispatched, DispatchError>, Duration)> {
    w.engine.dispatch(request(100, 500), None, KEY_A).await.unwrap();
    let waiting = w.spawn_dispatch(request(100, 200), None, KEY_B);
    tokio::time::sleep(secs(1.0)).await;
    assert_eq!(w.cluster("r").calls(), 1, "still waiting");
    waiting
}

type Dispatched = dispatcher::dispatch::Dispatched;

#[tokio::test(start_paused = true)]
async fn a_raised_limit_serves_requests_already_waiting_sooner() {
    let w = World::start(&config_with(6000, ""));
    let waiting = waiting(&w).await;
    // Ten times the refill: the 200 tokens still missing at 1 s take 0.2 s.
    reload(&w, &config_with(60_000, ""));
    let (served, took) = waiting.await.unwrap();
    assert_eq!(served.unwrap().queue_wait, secs(1.2));
    assert_eq!(took, secs(1.2), "not the 3 s of the old limit");
}

#[tokio::test(start_paused = true)]
async fn a_lowered_limit_holds_requests_already_waiting_to_it() {
    let w = World::start(&config_with(6000, ""));
    let waiting = waiting(&w).await;
    // A tenth of the refill: the 200 tokens missing at 1 s take 20 s, past
    // the wait allowed (until 5 s).
    reload(&w, &config_with(600, ""));
    let (refused, took) = waiting.await.unwrap();
    let e = refused.unwrap_err();
    assert!(matches!(e, DispatchError::QueueTimeout { .. }), "{e}");
    assert_eq!(status(&e).0, Code::ResourceExhausted);
    assert_eq!(
        took,
        secs(5.0),
        "routing.max_queue_wait, not the 3 s of the old limit"
    );
    assert_eq!(w.cluster("r").calls(), 1);
}

#[tokio::test(start_paused = true)]
async fn a_wait_that_runs_out_says_when_the_quota_comes_back() {
    let w = World::start(&config_with(6000, ""));
    let waiting = waiting(&w).await;
    reload(&w, &config_with(600, ""));
    let e = waiting.await.unwrap().0.unwrap_err();
    // When it gives up at 5 s, 160 tokens are still missing: 16 s at 10 tokens/s.
    assert_eq!(status(&e), (Code::ResourceExhausted, Some(secs(16.0))), "{e}");
}

#[tokio::test(start_paused = true)]
async fn a_raised_concurrency_limit_lets_a_waiting_request_through_at_once() {
    let w = World::start(&config_with(6_000_000, "max_concurrent = 1"));
    w.cluster("r").then([Reply::ok().after(secs(10.0))]);
    let first = w.spawn_dispatch(request(10, 10), None, KEY_A);
    w.cluster("r").wait_for_calls(1).await;
    let second = w.spawn_dispatch(request(10, 10), None, KEY_B);
    tokio::time::sleep(secs(1.0)).await;
    assert_eq!(w.cluster("r").calls(), 1);

    reload(&w, &config_with(6_000_000, "max_concurrent = 2"));
    let (second, took) = second.await.unwrap();
    assert_eq!(
        second.unwrap().queue_wait,
        secs(1.0),
        "sent as the reload took effect"
    );
    assert_eq!(took, secs(1.0));
    assert_eq!(w.cluster("r").max_in_flight(), 2);
    first.await.unwrap().0.unwrap();
}
