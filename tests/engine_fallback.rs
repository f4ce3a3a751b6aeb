//! Fallback chains, in process on a paused clock: each typed trigger (no
//! quota within the wait, every region unavailable, too large for the
//! model, no first byte within the step's budget) moves a request to the
//! next model, which is estimated and admitted on its own; a trigger the
//! chain does not name, or a request that forbids fallback, does not. A
//! stream commits at its first chunk: a failure before it falls back,
//! after it the caller gets an error, never a truncated success.

mod common;

use std::time::Duration;

use common::engine::*;
use dispatcher::dispatch::{DispatchError, Dispatched, hash_key};
use dispatcher::pb;
use tokio_stream::StreamExt;
use tonic::Code;

fn secs(s: f64) -> Duration {
    Duration::from_secs_f64(s)
}

/// gpt-4o (at most 1000 tokens a request, 4 chars a token) falls back to
/// mini (2 chars a token), then local, on `on`. Tenant "a" may use every
/// model; tenant "b" not mini.
fn toml(on: &str, extra: &str) -> String {
    format!(
        r#"[server]
default_timeout = "30s"
[routing]
max_queue_wait = "1s"
{extra}
[[models]]
name = "gpt-4o"
max_request_tokens = 1000
default_max_output_tokens = 100
chars_per_token = 4.0
[[models]]
name = "mini"
max_request_tokens = 100000
chars_per_token = 2.0
[[models]]
name = "local"
[[fallbacks]]
model = "gpt-4o"
then = ["mini", "local"]
on = {on}
first_byte_timeout = "2s"
[[tenants]]
name = "a"
keys = ["{a}"]
[[tenants]]
name = "b"
keys = ["{b}"]
models = ["gpt-4o", "local"]
"#,
        a = hash_key("key-a"),
        b = hash_key("key-b"),
    )
}

const ALL: &str = r#"["no_quota", "unavailable", "too_large", "first_byte_timeout"]"#;

/// Region "big" serves gpt-4o (a bucket of `gpt_tokens`), "small" mini and
/// local, with tokens to spare.
fn world(on: &str, gpt_tokens: u64) -> World {
    let big = region_toml(
        "big",
        &format!(
            "[[models]]\nname = \"gpt-4o\"\ntokens_per_minute = {gpt_tokens}\nburst_tokens = {gpt_tokens}\nrequests_per_minute = 100000\n"
        ),
    );
    let small = region_toml(
        "small",
        "[[models]]\nname = \"mini\"\ntokens_per_minute = 6000000\nrequests_per_minute = 100000\n\
         [[models]]\nname = \"local\"\ntokens_per_minute = 6000000\nrequests_per_minute = 100000\n",
    );
    World::start(&config(&toml(on, ""), &[big, small]))
}

fn gpt(payload_chars: usize, max_output: u64) -> pb::DispatchRequest {
    pb::DispatchRequest {
        model: "gpt-4o".into(),
        payload: "x".repeat(payload_chars).into(),
        max_output_tokens: max_output,
        ..Default::default()
    }
}

fn served(d: &Dispatched) -> (&str, Vec<&str>, &str) {
    (
        d.path.model.as_str(),
        d.path.tried.iter().map(String::as_str).collect(),
        d.region.as_str(),
    )
}

#[tokio::test(start_paused = true)]
async fn no_quota_within_the_wait_falls_back_and_re_estimates_with_the_next_model() {
    let w = world(ALL, 300);
    // 400 chars: 100 tokens for gpt-4o, 200 for mini; + 100 output.
    let first = w.engine.dispatch(gpt(400, 100), None, KEY_A).await.unwrap();
    assert_eq!(served(&first), ("gpt-4o", vec![], "big"));
    assert_eq!(first.usage.prompt_tokens, 100);
    // gpt-4o's bucket has 100 left: no quota within the 1 s wait.
    let second = w.engine.dispatch(gpt(400, 100), None, KEY_A).await.unwrap();
    assert_eq!(served(&second), ("mini", vec!["gpt-4o"], "small"));
    assert_eq!(
        second.usage.prompt_tokens, 200,
        "estimated with mini's chars_per_token"
    );
    let seen = w.cluster("small").seen();
    assert_eq!(seen.len(), 1);
    assert_eq!(seen[0].model, "mini");
    // Forbidden by the request: the caller gets gpt-4o's answer.
    let e = w
        .engine
        .dispatch(
            pb::DispatchRequest {
                no_fallback: true,
                ..gpt(400, 100)
            },
            None,
            KEY_A,
        )
        .await
        .unwrap_err();
    assert_eq!(status(&e).0, Code::ResourceExhausted, "{e}");
    assert_eq!(w.cluster("small").calls(), 1);
}

#[tokio::test(start_paused = true)]
async fn a_trigger_the_chain_does_not_name_does_not_fall_back() {
    let w = world(r#"["unavailable"]"#, 300);
    w.engine.dispatch(gpt(400, 100), None, KEY_A).await.unwrap();
    let e = w.engine.dispatch(gpt(400, 100), None, KEY_A).await.unwrap_err();
    assert_eq!(status(&e).0, Code::ResourceExhausted, "{e}");
    assert_eq!(w.cluster("small").calls(), 0);
}

#[tokio::test(start_paused = true)]
async fn every_region_unavailable_falls_back() {
    let w = world(ALL, 6_000_000);
    w.cluster("big").always(Reply::unavailable());
    let d = w.engine.dispatch(gpt(40, 10), None, KEY_A).await.unwrap();
    assert_eq!(served(&d), ("mini", vec!["gpt-4o"], "small"));
    assert!(w.cluster("big").calls() >= 1);
    // Work that may have run (INTERNAL) is not a trigger: its error stands.
    w.cluster("big").always(Reply::internal());
    let e = w.engine.dispatch(gpt(40, 10), None, KEY_A).await.unwrap_err();
    assert!(matches!(e, DispatchError::Upstream { .. }), "{e}");
    assert_eq!(w.cluster("small").calls(), 1);
}

#[tokio::test(start_paused = true)]
async fn a_request_too_large_for_the_model_falls_back_and_the_allow_list_is_checked_per_step() {
    let w = world(ALL, 6_000_000);
    // 4000 output tokens: above gpt-4o's max_request_tokens (1000).
    let d = w.engine.dispatch(gpt(40, 4000), None, KEY_A).await.unwrap();
    assert_eq!(served(&d), ("mini", vec!["gpt-4o"], "small"));
    assert_eq!(w.cluster("big").calls(), 0, "never sent to gpt-4o");
    // Tenant b may not use mini: that step is skipped, local serves it.
    let d = w.engine.dispatch(gpt(40, 4000), None, KEY_B).await.unwrap();
    assert_eq!(served(&d), ("local", vec!["gpt-4o", "mini"], "small"));
    // Without too_large among the triggers: INVALID_ARGUMENT, as before.
    let w = world(r#"["no_quota"]"#, 6_000_000);
    let e = w.engine.dispatch(gpt(40, 4000), None, KEY_A).await.unwrap_err();
    assert_eq!(status(&e).0, Code::InvalidArgument, "{e}");
}

#[tokio::test(start_paused = true)]
async fn no_first_byte_within_the_steps_budget_falls_back() {
    let w = world(ALL, 6_000_000);
    w.cluster("big").always(Reply::ok().after(secs(10.0)));
    let (result, took) = w.spawn_dispatch(gpt(40, 10), None, KEY_A).await.unwrap();
    let d = result.unwrap();
    assert_eq!(served(&d), ("mini", vec!["gpt-4o"], "small"));
    assert_eq!(took, secs(2.0), "after the 2 s first_byte_timeout");
    w.cluster("big").wait_for_idle().await;
    assert_eq!(w.cluster("big").cancelled(), 1, "the slow call was cancelled");
    // Streams: no first chunk within 2 s.
    w.cluster("big").always(Reply::ok().chunks(2, secs(10.0)));
    let mut s = w.engine.dispatch_stream(gpt(40, 10), None, KEY_A).await.unwrap();
    let mut models = Vec::new();
    while let Some(c) = s.next().await {
        models.push(c.unwrap().path.model);
    }
    assert!(
        models.iter().all(|m| m == "mini") && !models.is_empty(),
        "{models:?}"
    );
}

/// Collects a stream: its chunks' outputs, then how it ended.
async fn collect(mut s: dispatcher::dispatch::ChunkStream) -> (Vec<(String, bool)>, Option<DispatchError>) {
    let mut chunks = Vec::new();
    while let Some(c) = s.next().await {
        match c {
            Ok(c) => chunks.push((c.path.model, c.done)),
            Err(e) => return (chunks, Some(e)),
        }
    }
    (chunks, None)
}

#[tokio::test(start_paused = true)]
async fn a_stream_failing_before_its_first_chunk_falls_back() {
    let w = world(ALL, 6_000_000);
    w.cluster("big").always(
        Reply::ok()
            .chunks(3, secs(0.1))
            .break_after(0, Outcome::Unavailable),
    );
    let s = w.engine.dispatch_stream(gpt(40, 30), None, KEY_A).await.unwrap();
    let (chunks, end) = collect(s).await;
    assert!(end.is_none(), "{end:?}");
    assert_eq!(chunks.last(), Some(&("mini".to_string(), true)));
    assert_eq!(w.cluster("big").calls(), 1);
}

#[tokio::test(start_paused = true)]
async fn after_its_first_chunk_a_failing_stream_ends_in_an_error_not_a_fallback() {
    let w = world(ALL, 6_000_000);
    w.cluster("big").always(
        Reply::ok()
            .chunks(3, secs(0.1))
            .break_after(1, Outcome::Unavailable),
    );
    let s = w.engine.dispatch_stream(gpt(40, 30), None, KEY_A).await.unwrap();
    let (chunks, end) = collect(s).await;
    assert_eq!(chunks, [("gpt-4o".to_string(), false)]);
    let e = end.expect("an error after the first chunk");
    assert_eq!(status(&e).0, Code::Unavailable, "{e}");
    assert_eq!(w.cluster("small").calls(), 0, "committed: no fallback");
}

#[tokio::test(start_paused = true)]
async fn a_stream_cut_short_without_its_final_chunk_is_an_error_not_ok() {
    let w = world(ALL, 6_000_000);
    // Ends cleanly after one chunk, without the final one.
    w.cluster("big")
        .always(Reply::ok().chunks(3, secs(0.1)).break_after(1, Outcome::Ok));
    let s = w.engine.dispatch_stream(gpt(40, 30), None, KEY_A).await.unwrap();
    let (chunks, end) = collect(s).await;
    assert_eq!(chunks, [("gpt-4o".to_string(), false)], "no done chunk");
    let e = end.expect("the caller learns the output is incomplete");
    assert_eq!(status(&e).0, Code::Unavailable, "{e}");
    assert!(e.to_string().contains("final chunk"), "{e}");
}

#[tokio::test(start_paused = true)]
async fn route_shows_the_whole_plan() {
    let w = world(ALL, 300);
    let steps = w.engine.route_plan(&gpt(40, 4000), None, KEY_B).unwrap().steps;
    let models: Vec<_> = steps.iter().map(|s| s.model.as_str()).collect();
    assert_eq!(models, ["gpt-4o", "mini", "local"]);
    assert!(steps[0].error.as_deref().unwrap().contains("max_request_tokens"));
    assert!(steps[1].error.as_deref().unwrap().contains("may not use"));
    let last = steps[2].preview.as_ref().expect("local is routed");
    assert_eq!(last.chosen.as_deref(), Some("small"));
    assert!(steps[2].fall_back_on.is_empty());
    assert_eq!(steps[0].fall_back_on.len(), 4);
}
