//! Budget-aware routes through the engine, in process on a paused clock:
//! a `classify` request goes to the small model by a label rule; a large
//! request under a cost ceiling to the cheaper model (and one under no
//! candidate's worst case is refused, nothing sent); a tight deadline to
//! the model whose region answers fast, from the latency the router
//! observed; a candidate that is a rollout alias is resolved after the
//! route, and the chosen model's fallback chain applies; `Route` shows
//! each candidate's estimated cost and time and why one was chosen.

mod common;

use std::collections::HashMap;
use std::time::Duration;

use common::engine::*;
use dispatcher::dispatch::{Dispatched, hash_key};
use dispatcher::pb;
use tonic::Code;

/// "large" (10 / 30 per million) is served by region "slow" only, "small"
/// (0.15 / 0.60) by "quick" only; route "assistant" prefers large, and
/// sends `class = classify` to small. Rollout "chat" is all "small";
/// route "tiered" prefers it. large falls back to small when unavailable.
fn world() -> World {
    World::start(&world_config("\"large\", \"small\""))
}

/// The world's configuration, with route "assistant"'s `candidates`.
fn world_config(candidates: &str) -> dispatcher::config::Config {
    let d = format!(
        r#"[pricing]
currency = "EUR"
[[models]]
name = "large"
price = {{ input = 10.0, output = 30.0 }}
[[models]]
name = "small"
price = {{ input = 0.15, output = 0.60 }}
[[rollouts]]
alias = "chat"
targets = [{{ model = "small", weight = 1 }}]
[[fallbacks]]
model = "large"
then = ["small"]
on = ["unavailable"]
[[routes]]
name = "assistant"
candidates = [{candidates}]
[[routes.rules]]
labels = {{ class = "classify" }}
use = ["small"]
[[routes]]
name = "tiered"
candidates = ["chat", "large"]
[[tenants]]
name = "a"
keys = ["{a}"]
"#,
        a = hash_key("key-a"),
    );
    let serve = |model: &str| {
        format!(
            "[[models]]\nname = \"{model}\"\ntokens_per_minute = 60000000\nrequests_per_minute = 1000000\n"
        )
    };
    config(
        &d,
        &[
            region_toml("slow", &serve("large")),
            region_toml("quick", &serve("small")),
        ],
    )
}

fn ask(route: &str, prompt: u64, max_output: u64) -> pb::DispatchRequest {
    pb::DispatchRequest {
        model: route.into(),
        payload: "work".into(),
        prompt_tokens: prompt,
        max_output_tokens: max_output,
        ..Default::default()
    }
}

/// `r` served for tenant "a" (`timeout`: its deadline).
async fn served(w: &World, r: pb::DispatchRequest, timeout: Option<Duration>) -> Dispatched {
    w.engine.dispatch(r, timeout, KEY_A).await.unwrap()
}

fn labelled(mut r: pb::DispatchRequest, k: &str, v: &str) -> pb::DispatchRequest {
    r.labels = HashMap::from([(k.to_string(), v.to_string())]);
    r
}

#[tokio::test(start_paused = true)]
async fn a_classify_request_goes_to_the_small_model_by_its_label() {
    let w = world();
    let d = served(&w, ask("assistant", 100, 100), None).await;
    assert_eq!(
        (d.path.route.as_str(), d.path.model.as_str()),
        ("assistant", "large")
    );
    let d = served(
        &w,
        labelled(ask("assistant", 100, 100), "class", "classify"),
        None,
    )
    .await;
    assert_eq!(
        (d.path.route.as_str(), d.path.model.as_str()),
        ("assistant", "small")
    );
    assert_eq!(d.region, "quick");
    assert_eq!(
        w.cluster("quick").seen()[0].model,
        "small",
        "the cluster ran the small model"
    );
    // Another class matches no rule: the route's first candidate.
    let d = served(&w, labelled(ask("assistant", 100, 100), "class", "reason"), None).await;
    assert_eq!(d.path.model, "large");
}

#[tokio::test(start_paused = true)]
async fn a_large_request_under_a_cost_ceiling_goes_to_the_cheaper_model() {
    let w = world();
    // 10,000 + 10,000 tokens: large may cost 0.4, small 0.0075.
    let big = |max_cost: &str| pb::DispatchRequest {
        max_cost: max_cost.into(),
        ..ask("assistant", 10_000, 10_000)
    };
    let d = served(&w, big(""), None).await;
    assert_eq!(d.path.model, "large", "no ceiling: the preferred candidate");
    let d = served(&w, big("0.05"), None).await;
    assert_eq!(d.path.model, "small");
    assert!(d.cost.micros <= 7_500, "{:?}", d.cost);

    // Below every candidate's worst case: refused at once, nothing sent.
    let calls = w.calls();
    let e = w.engine.dispatch(big("0.001"), None, KEY_A).await.unwrap_err();
    let s = dispatcher::server::to_status(&e);
    assert_eq!(s.code(), Code::InvalidArgument, "{e}");
    assert!(s.message().contains("max_cost"), "{}", s.message());
    assert!(
        s.message().contains("small: may cost up to 0.007500"),
        "{}",
        s.message()
    );
    assert_eq!(w.calls(), calls);
    let e = w.engine.dispatch(big("1e3"), None, KEY_A).await.unwrap_err();
    assert_eq!(status(&e).0, Code::InvalidArgument, "a malformed ceiling: {e}");

    // A ceiling on a model named directly holds too.
    let direct = pb::DispatchRequest {
        model: "large".into(),
        ..big("0.05")
    };
    let e = w.engine.dispatch(direct, None, KEY_A).await.unwrap_err();
    assert!(e.to_string().contains("large may cost up to 0.400000"), "{e}");
    assert_eq!(w.calls(), calls);
}

#[tokio::test(start_paused = true)]
async fn a_tight_deadline_goes_to_the_region_model_observed_faster() {
    let w = world();
    w.cluster("slow")
        .always(Reply::ok().after(Duration::from_secs(4)));
    w.cluster("quick")
        .always(Reply::ok().after(Duration::from_millis(100)));
    // Warm up: each region answers once (1,000 + 1,000 tokens each).
    for model in ["large", "small"] {
        served(&w, ask(model, 1_000, 1_000), None).await;
    }
    // Without a budget, large (the preferred); with 3 s, large's observed
    // 4 s for this size does not fit: small.
    let plan = w
        .engine
        .route_plan(
            &ask("assistant", 1_000, 1_000),
            Some(Duration::from_secs(3)),
            KEY_A,
        )
        .unwrap();
    let route = plan.route.expect("the route's decision");
    assert_eq!(route.chosen, "small");
    let time = |i: usize| Duration::try_from(route.candidates[i].estimated_time.unwrap()).unwrap();
    assert!(time(0) > Duration::from_secs(3), "{route:?}");
    assert!(time(1) < Duration::from_millis(200), "{route:?}");
    assert!(
        route.candidates[0].verdict.contains("latency budget"),
        "{route:?}"
    );
    assert_eq!(route.candidates[0].worst_case.as_ref().unwrap().micros, 40_000);
    assert_eq!(route.candidates[1].worst_case.as_ref().unwrap().micros, 750);
    assert_eq!(plan.steps[0].model, "small", "then the chosen model's plan");

    let d = served(&w, ask("assistant", 1_000, 1_000), Some(Duration::from_secs(3))).await;
    assert_eq!(d.path.model, "small");
    // The latency_budget field does the same without a deadline.
    let r = pb::DispatchRequest {
        latency_budget: Some(prost_types::Duration { seconds: 3, nanos: 0 }),
        ..ask("assistant", 1_000, 1_000)
    };
    assert_eq!(served(&w, r, None).await.path.model, "small");
    let d = served(&w, ask("assistant", 1_000, 1_000), None).await;
    assert_eq!(d.path.model, "large", "no budget: the preferred candidate");
}

#[tokio::test(start_paused = true)]
async fn a_routes_choice_is_then_resolved_by_rollouts_and_falls_back_by_its_chain() {
    let w = world();
    // "tiered" prefers rollout alias "chat", whose only target is small.
    let d = served(&w, ask("tiered", 100, 100), None).await;
    assert_eq!(
        (
            d.path.route.as_str(),
            d.path.alias.as_str(),
            d.path.model.as_str()
        ),
        ("tiered", "chat", "small")
    );
    // The route chose large; its region is down: large's chain to small.
    w.cluster("slow").always(Reply::unavailable());
    let d = served(&w, ask("assistant", 100, 100), None).await;
    assert_eq!(d.path.route, "assistant");
    assert_eq!(d.path.tried, ["large"]);
    assert_eq!(d.path.model, "small");
}

#[tokio::test(start_paused = true)]
async fn a_reload_changes_a_route_for_the_next_request() {
    let w = world();
    let d = served(&w, ask("assistant", 100, 100), None).await;
    assert_eq!(d.path.model, "large");
    let c = world_config("\"small\", \"large\"");
    w.engine.apply(&c, &endpoints(&c)).unwrap();
    let d = served(&w, ask("assistant", 100, 100), None).await;
    assert_eq!(d.path.model, "small", "the reloaded order");
}
