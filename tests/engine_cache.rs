//! The response cache, in process on a paused clock: a second identical
//! request is a hit the cluster never sees, charged no region quota and no
//! tenant tokens (but counted against the request rate); another tenant,
//! another scope, another payload or max_output_tokens, or a reload that
//! changes the model's routing miss; entries expire at their TTL; the
//! tenant's bound evicts; a fallback model's reply is stored under that
//! model's key; streams are served from stored complete replies and store
//! only complete ones.

mod common;

use std::time::Duration;

use common::engine::*;
use dispatcher::dispatch::{CacheLayer, DispatchError, Dispatched, hash_key};
use dispatcher::pb;
use tokio_stream::StreamExt;
use tonic::Code;

fn secs(s: f64) -> Duration {
    Duration::from_secs_f64(s)
}

/// gpt-4o (in region "big", `gpt_tokens` a minute and as burst) falls
/// back to mini (region "small") when unavailable. Tenant "a" has
/// `a_extra` in its table; `extra` goes first (its own tables).
fn toml(extra: &str, a_extra: &str) -> String {
    format!(
        r#"[server]
default_timeout = "30s"
[routing]
max_queue_wait = "1s"
{extra}
[[models]]
name = "gpt-4o"
max_request_tokens = 100000
default_max_output_tokens = 100
[[models]]
name = "mini"
max_request_tokens = 100000
[[fallbacks]]
model = "gpt-4o"
then = ["mini"]
on = ["unavailable"]
[[tenants]]
name = "a"
keys = ["{a}"]
{a_extra}
[[tenants]]
name = "b"
keys = ["{b}"]
"#,
        a = hash_key("key-a"),
        b = hash_key("key-b"),
    )
}

fn regions(gpt_tokens: u64) -> Vec<String> {
    vec![
        region_toml(
            "big",
            &format!(
                "[[models]]\nname = \"gpt-4o\"\ntokens_per_minute = {gpt_tokens}\nburst_tokens = {gpt_tokens}\nrequests_per_minute = 100000\naccounting = \"admission\"\n"
            ),
        ),
        region_toml(
            "small",
            "[[models]]\nname = \"mini\"\ntokens_per_minute = 6000000\nrequests_per_minute = 100000\n",
        ),
    ]
}

fn world(extra: &str, a_extra: &str, gpt_tokens: u64) -> World {
    World::start(&config(&toml(extra, a_extra), &regions(gpt_tokens)))
}

fn cached(payload: &str, ttl: f64, scope: &str) -> pb::DispatchRequest {
    pb::DispatchRequest {
        model: "gpt-4o".into(),
        payload: payload.to_string().into(),
        max_output_tokens: 10,
        cache: Some(pb::CacheOptions {
            ttl: Some(prost_types::Duration {
                seconds: ttl.trunc() as i64,
                nanos: (ttl.fract() * 1e9) as i32,
            }),
            scope: scope.into(),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// Dispatches `r` as the tenant of `key`; it must succeed.
async fn send(w: &World, r: pb::DispatchRequest, key: Option<&'static str>) -> Dispatched {
    w.engine.dispatch(r, None, key).await.unwrap()
}

fn layer(d: &Dispatched) -> Option<CacheLayer> {
    d.cached.as_ref().map(|h| h.layer)
}

#[tokio::test(start_paused = true)]
async fn a_second_identical_request_is_a_hit_the_cluster_never_sees() {
    let w = world("", "", 6_000_000);
    let first = send(&w, cached("hello", 60.0, ""), KEY_A).await;
    assert_eq!(layer(&first), None, "the first is a miss");
    assert_eq!(w.cluster("big").calls(), 1);
    let second = send(&w, cached("hello", 60.0, ""), KEY_A).await;
    assert_eq!(layer(&second), Some(CacheLayer::Local));
    assert_eq!(w.cluster("big").calls(), 1, "a hit is not forwarded");
    assert_eq!(second.output, first.output);
    assert_eq!(
        (second.region.as_str(), second.path.model.as_str()),
        ("big", "gpt-4o")
    );
    assert_eq!(second.attempts, 0);
    assert_eq!(second.usage, pb::Usage::default(), "a hit consumed nothing");
    let hit = second.cached.unwrap();
    assert_eq!(hit.entry.usage, first.usage, "what producing it took");
    assert_eq!(hit.entry.expires_at_ms - hit.entry.stored_at_ms, 60_000);
    assert_ne!(second.request_id, first.request_id, "each request has its own id");
}

#[tokio::test(start_paused = true)]
async fn another_tenant_scope_payload_or_output_limit_misses() {
    let w = world("", "", 6_000_000);
    send(&w, cached("hello", 60.0, "role=reader"), KEY_A).await;
    let misses = [
        (cached("hello", 60.0, "role=reader"), KEY_B),
        (cached("hello", 60.0, "role=admin"), KEY_A),
        (cached("hello", 60.0, ""), KEY_A),
        (cached("hellO", 60.0, "role=reader"), KEY_A),
        (
            pb::DispatchRequest {
                max_output_tokens: 11,
                ..cached("hello", 60.0, "role=reader")
            },
            KEY_A,
        ),
    ];
    for (i, (r, key)) in misses.into_iter().enumerate() {
        let d = w.engine.dispatch(r, None, key).await.unwrap();
        assert_eq!(layer(&d), None, "request {i} must miss");
        assert_eq!(w.cluster("big").calls(), 2 + i as u64);
    }
    // Tenant b's own copy is now a hit for b, and a's still for a.
    let d = send(&w, cached("hello", 60.0, "role=reader"), KEY_B).await;
    assert_eq!(layer(&d), Some(CacheLayer::Local));
    let d = send(&w, cached("hello", 60.0, "role=reader"), KEY_A).await;
    assert_eq!(layer(&d), Some(CacheLayer::Local));
    // A request that did not opt in neither reads nor stores.
    let plain = pb::DispatchRequest {
        cache: None,
        ..cached("hello", 60.0, "role=reader")
    };
    let calls = w.cluster("big").calls();
    let d = send(&w, plain, KEY_A).await;
    assert_eq!(layer(&d), None);
    assert_eq!(w.cluster("big").calls(), calls + 1);
}

#[tokio::test(start_paused = true)]
async fn entries_expire_at_their_ttl_on_the_callers_clock() {
    let w = world("", "", 6_000_000);
    send(&w, cached("hello", 10.0, ""), KEY_A).await;
    tokio::time::advance(secs(9.9)).await;
    let d = send(&w, cached("hello", 10.0, ""), KEY_A).await;
    assert_eq!(layer(&d), Some(CacheLayer::Local), "9.9 s into a 10 s TTL");
    tokio::time::advance(secs(0.1)).await;
    let d = send(&w, cached("hello", 10.0, ""), KEY_A).await;
    assert_eq!(layer(&d), None, "at 10 s it has expired");
    assert_eq!(w.cluster("big").calls(), 2);
    // `refresh` skips the lookup and replaces the entry.
    let mut r = cached("hello", 10.0, "");
    r.cache.as_mut().unwrap().refresh = true;
    let d = send(&w, r, KEY_A).await;
    assert_eq!(layer(&d), None);
    assert_eq!(w.cluster("big").calls(), 3);
}

#[tokio::test(start_paused = true)]
async fn a_hit_charges_no_quota_and_no_tenant_tokens_but_counts_as_a_request() {
    // gpt-4o's bucket holds one request of 1 + 10 tokens and refills
    // 11 a minute; tenant a may send 1000 tokens a minute, 3 requests a second.
    let w = world("", "tokens_per_minute = 1000\nrequests_per_second = 3", 11);
    send(&w, cached("hi", 60.0, ""), KEY_A).await;
    let region_level = |w: &World| w.region("big").models[0].tokens_available;
    let tenant_tokens = |w: &World| {
        let v = w.engine.view(dispatcher::clock::now());
        let a = v.tenants.iter().find(|t| t.report.spec.name == "a").unwrap();
        (a.report.tokens_last_minute, a.report.tokens_available)
    };
    let (level, tokens) = (region_level(&w), tenant_tokens(&w));
    assert!(level <= 0, "the one request's worth is spent: {level}");
    let d = send(&w, cached("hi", 60.0, ""), KEY_A).await;
    assert_eq!(layer(&d), Some(CacheLayer::Local));
    assert_eq!(region_level(&w), level, "no region quota taken");
    assert_eq!(tenant_tokens(&w), tokens, "no tenant tokens taken");
    // A request that is not cached waits for quota and gets none.
    let e = w
        .engine
        .dispatch(cached("ho", 60.0, ""), None, KEY_A)
        .await
        .unwrap_err();
    assert_eq!(status(&e).0, Code::ResourceExhausted, "{e}");
    // Three requests this second already (a miss, a hit, a refusal): the
    // fourth, a hit, is over the rate.
    let e = w
        .engine
        .dispatch(cached("hi", 60.0, ""), None, KEY_A)
        .await
        .unwrap_err();
    assert!(
        matches!(
            e,
            DispatchError::TenantLimit {
                limit: "requests_per_second",
                ..
            }
        ),
        "{e}"
    );
}

#[tokio::test(start_paused = true)]
async fn the_tenants_bound_evicts_its_least_recently_used_entry() {
    let w = world("[cache]\nmax_entries_per_tenant = 2", "", 6_000_000);
    for p in ["one", "two"] {
        send(&w, cached(p, 60.0, ""), KEY_A).await;
    }
    // Reading "one" makes "two" the least recently used; "three" evicts it.
    let d = send(&w, cached("one", 60.0, ""), KEY_A).await;
    assert_eq!(layer(&d), Some(CacheLayer::Local));
    send(&w, cached("three", 60.0, ""), KEY_A).await;
    assert_eq!(w.cluster("big").calls(), 3);
    let d = send(&w, cached("one", 60.0, ""), KEY_A).await;
    assert_eq!(layer(&d), Some(CacheLayer::Local));
    let d = send(&w, cached("two", 60.0, ""), KEY_A).await;
    assert_eq!(layer(&d), None, "evicted");
    assert_eq!(w.cluster("big").calls(), 4);
    // Tenant b's entries are bounded apart: a's do not evict them.
    send(&w, cached("one", 60.0, ""), KEY_B).await;
    assert_eq!(
        w.engine.cache().usage("b").1,
        (1, 4 + 640),
        "\"done\" and its accounting"
    );
    assert_eq!(w.engine.cache().usage("a").1.0, 2);
}

#[tokio::test(start_paused = true)]
async fn a_reload_that_changes_the_models_routing_misses_and_one_that_does_not_hits() {
    let w = world("", "", 6_000_000);
    send(&w, cached("hello", 60.0, ""), KEY_A).await;
    // Another tenant's settings changed: gpt-4o's routing did not.
    let unrelated = toml("", "").replace("name = \"b\"", "name = \"b\"\nweight = 2.0");
    let c = config(&unrelated, &regions(6_000_000));
    w.engine.apply(&c, &endpoints(&c)).unwrap();
    let d = send(&w, cached("hello", 60.0, ""), KEY_A).await;
    assert_eq!(layer(&d), Some(CacheLayer::Local));
    // gpt-4o's fallback chain changed.
    let changed = toml("", "").replace(r#"on = ["unavailable"]"#, r#"on = ["unavailable", "no_quota"]"#);
    let c = config(&changed, &regions(6_000_000));
    w.engine.apply(&c, &endpoints(&c)).unwrap();
    let d = send(&w, cached("hello", 60.0, ""), KEY_A).await;
    assert_eq!(layer(&d), None, "decided under the old routing: not served");
    assert_eq!(w.cluster("big").calls(), 2);
}

#[tokio::test(start_paused = true)]
async fn a_fallback_models_reply_is_stored_under_that_models_key() {
    let w = world("", "", 6_000_000);
    w.cluster("big").always(Reply::unavailable());
    let d = send(&w, cached("hello", 60.0, ""), KEY_A).await;
    assert_eq!(d.path.model, "mini");
    assert_eq!(w.cluster("small").calls(), 1);
    // Asked for gpt-4o again: not mini's reply (gpt-4o is still down, so
    // mini serves it again).
    let d = send(&w, cached("hello", 60.0, ""), KEY_A).await;
    assert_eq!(layer(&d), None);
    assert_eq!(w.cluster("small").calls(), 2);
    // Asked for mini: mini's own reply is there.
    let mini = pb::DispatchRequest {
        model: "mini".into(),
        ..cached("hello", 60.0, "")
    };
    let d = send(&w, mini, KEY_A).await;
    assert_eq!(layer(&d), Some(CacheLayer::Local));
    assert_eq!(d.path.model, "mini");
    // With accept_fallback, gpt-4o's key holds it too.
    let mut r = cached("again", 60.0, "");
    r.cache.as_mut().unwrap().accept_fallback = true;
    send(&w, r.clone(), KEY_A).await;
    let d = send(&w, r, KEY_A).await;
    assert_eq!(layer(&d), Some(CacheLayer::Local));
    assert_eq!(d.path.model, "mini", "the hit says which model produced it");
}

async fn chunks(
    s: Result<dispatcher::dispatch::ChunkStream, DispatchError>,
) -> (Vec<dispatcher::dispatch::StreamChunk>, Option<DispatchError>) {
    let mut s = s.unwrap();
    let mut out = Vec::new();
    while let Some(c) = s.next().await {
        match c {
            Ok(c) => out.push(c),
            Err(e) => return (out, Some(e)),
        }
    }
    (out, None)
}

#[tokio::test(start_paused = true)]
async fn streams_are_served_from_complete_replies_and_store_only_complete_ones() {
    let w = world("", "", 6_000_000);
    // A unary reply serves a stream: one chunk, done, marked.
    send(&w, cached("u", 60.0, ""), KEY_A).await;
    let (c, end) = chunks(w.engine.dispatch_stream(cached("u", 60.0, ""), None, KEY_A).await).await;
    assert!(end.is_none());
    assert_eq!(c.len(), 1);
    assert!(c[0].done && c[0].cached.is_some());
    assert_eq!(c[0].output, "done");
    assert_eq!(w.cluster("big").calls(), 1);
    // A complete stream is stored whole and serves a unary request.
    w.cluster("big").always(Reply::ok().chunks(3, secs(0.1)));
    let (c, end) = chunks(w.engine.dispatch_stream(cached("s", 60.0, ""), None, KEY_A).await).await;
    assert!(end.is_none());
    let streamed: Vec<u8> = c.iter().flat_map(|c| c.output.to_vec()).collect();
    let d = send(&w, cached("s", 60.0, ""), KEY_A).await;
    assert_eq!(layer(&d), Some(CacheLayer::Local));
    assert_eq!(d.output.to_vec(), streamed);
    assert_eq!(w.cluster("big").calls(), 2);
    // A stream cut short is never stored.
    w.cluster("big")
        .always(Reply::ok().chunks(3, secs(0.1)).break_after(2, Outcome::Ok));
    let (_, end) = chunks(
        w.engine
            .dispatch_stream(cached("cut", 60.0, ""), None, KEY_A)
            .await,
    )
    .await;
    assert!(end.is_some(), "the cut is the caller's error");
    w.cluster("big").always(Reply::ok());
    let d = send(&w, cached("cut", 60.0, ""), KEY_A).await;
    assert_eq!(layer(&d), None, "nothing was stored");
}

#[tokio::test(start_paused = true)]
async fn bad_cache_options_are_refused_naming_the_field() {
    let w = world("[cache]\nmax_ttl = \"1m\"\nmax_scope_bytes = 8", "", 6_000_000);
    let e = w
        .engine
        .dispatch(cached("x", 61.0, ""), None, KEY_A)
        .await
        .unwrap_err();
    assert_eq!(status(&e).0, Code::InvalidArgument);
    assert!(e.to_string().contains("cache.ttl"), "{e}");
    let e = w
        .engine
        .dispatch(cached("x", 1.0, "123456789"), None, KEY_A)
        .await
        .unwrap_err();
    assert!(e.to_string().contains("cache.scope"), "{e}");
    let mut r = cached("x", 1.0, "");
    r.cache.as_mut().unwrap().ttl = Some(prost_types::Duration {
        seconds: -1,
        nanos: 0,
    });
    let e = w.engine.dispatch(r, None, KEY_A).await.unwrap_err();
    assert!(e.to_string().contains("cache.ttl"), "{e}");
    // An unknown model is refused, cached or not.
    let r = pb::DispatchRequest {
        model: "nope".into(),
        ..cached("x", 1.0, "")
    };
    let e = w.engine.dispatch(r, None, KEY_A).await.unwrap_err();
    assert_eq!(status(&e).0, Code::InvalidArgument);
    assert_eq!(w.calls(), 0);
}
