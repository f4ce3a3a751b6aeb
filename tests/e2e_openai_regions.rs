//! OpenAI-compatible regions (`kind = "openai"`) in front of real
//! `region-sim --openai` processes over loopback, in both dialects: a
//! completion and a stream served (the provider's JSON passed on verbatim),
//! the rate-limit headers moving the buckets, a 429 sending the request to
//! the next region, a stream the caller cuts charged for what was produced,
//! and a wrong key or an unknown deployment taking the region out of
//! service with one error log line that never shows the key.

mod common;

use std::path::Path;
use std::time::Duration;

use common::http_client::call;
use common::openai::region_head;
use common::{ConfigDir, Proc, client, dispatcher, eventually, region_status, sim_stats};
use dispatcher::pb;
use http::Method;
use tonic::Code;

const KEY: &str = "sk-e2e-openai-region-0123456789";

const DISPATCHER_TOML: &str = r#"
[auth]
allow_anonymous = true
[routing]
max_queue_wait = "2s"
[[models]]
name = "gpt-4o"
max_request_tokens = 20000
"#;

/// A `region-sim --openai` serving `provider_model`, its key in a file.
fn openai_sim(
    dir: &Path,
    name: &str,
    dialect: &str,
    provider_model: &str,
    limits: &str,
    extra: &[&str],
) -> Proc {
    let key_file = dir.join(format!("{name}.sim-key"));
    std::fs::write(&key_file, format!("{KEY}\n")).unwrap();
    let model = format!("{provider_model}:{limits}");
    common::openai::openai_sim(dir, name, dialect, &key_file, &model, extra)
}

/// A region file for an OpenAI-compatible region, its key (`key`) in a
/// file beside it.
fn region(
    cfg: &ConfigDir,
    name: &str,
    sim: &Proc,
    dialect: &str,
    provider_model: &str,
    key: &str,
    rest: &str,
) {
    let key_file = cfg.path().join(format!("{name}.key"));
    std::fs::write(&key_file, format!("{key}\n")).unwrap();
    let text = region_head(name, &sim.endpoint(), dialect, &key_file) + rest;
    cfg.write_region(name, &text.replace("PROVIDER_MODEL", provider_model));
}

fn model_toml(tpm: u64, rpm: u64, accounting: &str) -> String {
    format!(
        "[[models]]\nname = \"gpt-4o\"\nprovider_model = \"PROVIDER_MODEL\"\ntokens_per_minute = {tpm}\nrequests_per_minute = {rpm}\naccounting = \"{accounting}\"\n"
    )
}

fn chat(content: &str) -> bytes::Bytes {
    serde_json::json!({"messages": [{"role": "user", "content": content}]})
        .to_string()
        .into()
}

fn request(max_output: u64) -> pb::DispatchRequest {
    pb::DispatchRequest {
        model: "gpt-4o".into(),
        payload: chat("Say hello to the simulated provider."),
        max_output_tokens: max_output,
        ..Default::default()
    }
}

fn json(b: &[u8]) -> serde_json::Value {
    serde_json::from_slice(b).unwrap_or_else(|_| panic!("not JSON: {}", String::from_utf8_lossy(b)))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn both_dialects_serve_completions_and_streams_and_their_headers_move_the_buckets() {
    for (dialect, provider_model) in [("openai", "gpt-4o-2024-08-06"), ("azure", "gpt4o-eastus")] {
        let cfg = ConfigDir::new(DISPATCHER_TOML);
        let sim = openai_sim(
            cfg.path(),
            "east",
            dialect,
            provider_model,
            "100000:600",
            &["--base-latency-ms", "0", "--ms-per-1k-tokens", "0"],
        );
        // The region file says 1,000 requests a minute, the provider 600:
        // said once in the log.
        region(
            &cfg,
            "east",
            &sim,
            dialect,
            provider_model,
            KEY,
            &model_toml(100_000, 1000, "admission"),
        );
        let d = dispatcher(&cfg.config());
        let mut grpc = client(d.addr).await;

        // A completion: the provider's JSON verbatim, its usage settled.
        let reply = grpc.dispatch(request(50)).await.unwrap().into_inner();
        assert_eq!(reply.region, "east");
        let body = json(&reply.output);
        assert_eq!(body["object"], "chat.completion", "{dialect}");
        assert_eq!(
            body["model"], provider_model,
            "the provider's model or deployment"
        );
        let usage = reply.usage.unwrap();
        // The dispatcher's estimate is the provider's: 3 + 4 + ⌈40 / 4⌉.
        assert_eq!(usage.prompt_tokens, 17);
        assert_eq!(body["usage"]["prompt_tokens"], 17);
        assert_eq!(body["usage"]["completion_tokens"], usage.completion_tokens);
        assert!(usage.completion_tokens <= 50, "the bound was sent: {usage:?}");

        // A stream: each chunk one event's JSON, the last the usage event.
        let mut stream = grpc.dispatch_stream(request(200)).await.unwrap().into_inner();
        let mut chunks = Vec::new();
        while let Some(c) = stream.message().await.unwrap() {
            chunks.push(c);
        }
        let last = chunks.last().unwrap();
        assert!(last.done && chunks.len() >= 4, "{} chunks", chunks.len());
        for c in &chunks {
            let v = json(&c.output);
            assert_eq!(v["object"], "chat.completion.chunk", "{dialect}: {v}");
        }
        let final_usage = &json(&last.output)["usage"];
        let counted = last.usage.unwrap();
        assert_eq!(final_usage["completion_tokens"], counted.completion_tokens);
        assert_eq!(final_usage["prompt_tokens"], counted.prompt_tokens);
        // Counted as they arrived: rising through the stream.
        let rising: Vec<u64> = chunks
            .iter()
            .map(|c| c.usage.unwrap().completion_tokens)
            .collect();
        assert!(rising.windows(2).all(|w| w[0] <= w[1]), "{rising:?}");
        assert!(chunks[chunks.len() - 2].usage.unwrap().completion_tokens > 0);

        // Someone else spends 60,000 of the provider's tokens; the next
        // answer's x-ratelimit-remaining-tokens brings the bucket down.
        let before = region_status(d.addr, "east").await.unwrap().models[0].tokens_available;
        assert!(before > 90_000, "{before}");
        let path = match dialect {
            "openai" => "/v1/chat/completions".to_string(),
            _ => format!("/openai/deployments/{provider_model}/chat/completions?api-version=2024-10-21"),
        };
        let auth = format!("Bearer {KEY}");
        let headers = [("authorization", auth.as_str()), ("api-key", KEY)];
        let foreign = serde_json::json!({
            "model": provider_model,
            "messages": [{"role": "user", "content": "x"}],
            "max_tokens": 60_000,
        });
        let spent = call(sim.addr, Method::POST, &path, &headers, &foreign.to_string()).await;
        assert!(spent.status.is_success(), "{:?}", spent.body);
        grpc.dispatch(request(50)).await.unwrap();
        let after = region_status(d.addr, "east").await.unwrap().models[0].tokens_available;
        eprintln!("{dialect}: bucket {before} before the foreign spend, {after} after the next answer");
        assert!(after < 41_000, "the hint moved the bucket: {after}");

        // Not a chat body: refused before anything is sent, naming the field.
        for (payload, field) in [
            ("not json", "body"),
            (r#"{"messages":[{"content":"x"}]}"#, "messages[0].role"),
        ] {
            let mut r = request(50);
            r.payload = payload.into();
            let e = grpc.dispatch(r).await.unwrap_err();
            assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
            assert!(e.message().contains(field), "{}", e.message());
        }
        let logs = d.logs();
        assert_eq!(
            logs.matches("rate limits differ from the region file").count(),
            1,
            "{logs}"
        );
        // Admin shows the kind and what the provider said.
        let status = region_status(d.addr, "east").await.unwrap();
        assert_eq!(status.kind, "openai");
        assert_eq!(status.models[0].provider_requests_per_minute, Some(600));
        assert_eq!(status.models[0].provider_tokens_per_minute, Some(100_000));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_429_sends_the_request_to_the_next_region() {
    // A fresh process has no retries saved up yet.
    let cfg = ConfigDir::new(&format!(
        "{DISPATCHER_TOML}[routing.retry_budget]\nratio = 1.0\nmin_per_second = 100.0\n"
    ));
    // "tight" (Azure) has 3,000 tokens a minute at the provider but claims
    // far more, and is preferred; "roomy" (OpenAI) has plenty.
    let quick = ["--base-latency-ms", "0", "--ms-per-1k-tokens", "0"];
    let tight = openai_sim(cfg.path(), "tight", "azure", "dep-tight", "3000:600", &quick);
    let roomy = openai_sim(cfg.path(), "roomy", "openai", "gpt-4o", "1000000:6000", &quick);
    region(
        &cfg,
        "tight",
        &tight,
        "azure",
        "dep-tight",
        KEY,
        &format!("weight = 1000\n{}", model_toml(1_000_000, 6000, "admission")),
    );
    region(
        &cfg,
        "roomy",
        &roomy,
        "openai",
        "gpt-4o",
        KEY,
        &format!("weight = 0.001\n{}", model_toml(1_000_000, 6000, "admission")),
    );
    let d = dispatcher(&cfg.config());
    let mut grpc = client(d.addr).await;
    let mut served = Vec::new();
    for _ in 0..6 {
        let mut r = request(1000);
        r.origin_region = "tight".into();
        let reply = grpc.dispatch(r).await.unwrap().into_inner();
        served.push((reply.region, reply.attempts));
    }
    eprintln!("served: {served:?}");
    let refused = sim_stats(tight.addr).await.models[0].rejected;
    assert!(refused >= 1, "the tight provider refused");
    assert!(
        served.iter().any(|(r, a)| r == "roomy" && *a == 2),
        "a refused request went on to the next region: {served:?}"
    );
    assert!(served.iter().all(|(r, _)| r == "tight" || r == "roomy"));
    // The refusal emptied tight's bucket until its reset: no more 429s
    // from requests sent straight after.
    assert_eq!(sim_stats(tight.addr).await.models[0].rejected, refused);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_the_caller_cuts_is_charged_for_what_was_produced() {
    let cfg = ConfigDir::new(DISPATCHER_TOML);
    // 32 tokens a chunk, 500 ms per 1,000 tokens: a chunk every 16 ms.
    let sim = openai_sim(
        cfg.path(),
        "slow",
        "openai",
        "gpt-4o",
        "60:60000:usage",
        &[
            "--burst-tokens",
            "1000000",
            "--ms-per-1k-tokens",
            "500",
            "--completion-min-fraction",
            "1",
        ],
    );
    region(
        &cfg,
        "slow",
        &sim,
        "openai",
        "gpt-4o",
        KEY,
        &(model_toml(60, 60000, "usage") + "burst_tokens = 1000000\n"),
    );
    let d = dispatcher(&cfg.config());
    let mut grpc = client(d.addr).await;
    let before = region_status(d.addr, "slow").await.unwrap().models[0].tokens_available;
    let sim_before = sim_stats(sim.addr).await.models[0].clone();
    let mut stream = grpc.dispatch_stream(request(2000)).await.unwrap().into_inner();
    let mut received = 0;
    for _ in 0..10 {
        let c = stream.message().await.unwrap().unwrap();
        received = c.usage.unwrap().completion_tokens;
    }
    drop(stream);
    let cancelled = eventually(Duration::from_secs(3), || async {
        sim_stats(sim.addr).await.cancelled >= 1
    })
    .await;
    assert!(cancelled.is_some(), "the HTTP request was cancelled");
    let settled = eventually(Duration::from_secs(3), || async {
        region_status(d.addr, "slow").await.unwrap().models[0].tokens_reserved == 0
    })
    .await;
    assert!(settled.is_some(), "the cut stream was settled");
    let after = region_status(d.addr, "slow").await.unwrap().models[0].tokens_available;
    let sim_after = sim_stats(sim.addr).await.models[0].clone();
    let produced = sim_after.completion_tokens - sim_before.completion_tokens;
    let provider_charged = sim_after.charged_tokens - sim_before.charged_tokens;
    let dispatcher_charged = before - after;
    eprintln!(
        "read {received} tokens; the provider produced {produced} and charged {provider_charged}; \
         the dispatcher charged {dispatcher_charged} (the reservation was {})",
        17 + 2000
    );
    assert!(received >= 250, "nine content chunks of 32 tokens: {received}");
    assert!(produced < 1000, "generation stopped when the caller went away");
    assert_eq!(provider_charged, 17 + produced);
    // The bucket refills a token a second, and the provider may have
    // produced a chunk or two that never reached the dispatcher.
    assert!(
        dispatcher_charged.abs_diff(provider_charged as i64) <= 80,
        "the dispatcher charged {dispatcher_charged}, the provider {provider_charged}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_key_or_deployment_takes_the_region_out_with_one_log_line() {
    const WRONG: &str = "sk-wrong-key-must-never-be-printed-42";
    let cfg = ConfigDir::new(DISPATCHER_TOML);
    let quick = ["--base-latency-ms", "0", "--ms-per-1k-tokens", "0"];
    let keyed = openai_sim(cfg.path(), "keyed", "openai", "gpt-4o", "100000:600", &quick);
    let deployed = openai_sim(cfg.path(), "deployed", "azure", "dep-real", "100000:600", &quick);
    let health = "[health]\ninterval = \"200ms\"\n";
    region(
        &cfg,
        "keyed",
        &keyed,
        "openai",
        "gpt-4o",
        WRONG,
        &format!("{}{health}", model_toml(100_000, 600, "admission")),
    );
    // The key is right, the deployment is not (Azure lists no deployments:
    // only a request finds out).
    region(
        &cfg,
        "deployed",
        &deployed,
        "azure",
        "dep-missing",
        KEY,
        &format!("{}{health}", model_toml(100_000, 600, "admission")),
    );
    let d = dispatcher(&cfg.config());
    let out = eventually(Duration::from_secs(3), || async {
        !region_status(d.addr, "keyed").await.unwrap().healthy
    })
    .await;
    assert!(out.is_some(), "the health check found the refused key");

    // The request meets the unknown deployment: FAILED_PRECONDITION.
    let mut grpc = client(d.addr).await;
    let e = grpc.dispatch(request(50)).await.unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition, "{e:?}");
    assert!(
        e.message().contains("deployed") && e.message().contains("dep-missing"),
        "{}",
        e.message()
    );
    assert!(!region_status(d.addr, "deployed").await.unwrap().healthy);
    // Both out: the next request finds no region to take it.
    let e = grpc.dispatch(request(50)).await.unwrap_err();
    assert!(
        !e.message().contains(WRONG) && !e.message().contains(KEY),
        "{}",
        e.message()
    );

    // More checks pass by: still one line per region, and no key anywhere.
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert!(!region_status(d.addr, "keyed").await.unwrap().healthy);
    assert!(!region_status(d.addr, "deployed").await.unwrap().healthy);
    let logs = d.logs();
    let lines: Vec<&str> = logs
        .lines()
        .filter(|l| l.contains("region misconfigured"))
        .collect();
    assert_eq!(lines.len(), 2, "{logs}");
    assert!(
        lines.iter().any(|l| l.contains("keyed") && l.contains("API key")),
        "{lines:?}"
    );
    assert!(
        lines
            .iter()
            .any(|l| l.contains("deployed") && l.contains("dep-missing")),
        "{lines:?}"
    );
    assert!(lines.iter().all(|l| l.contains("ERROR")), "{lines:?}");
    assert!(!logs.contains(WRONG) && !logs.contains(KEY), "a key in the log");
    assert!(!logs.contains("wrong-key"), "part of a key in the log");

    // The key fixed (the region file rewritten: a reload reads the key
    // again): healthy again.
    std::fs::write(cfg.path().join("keyed.key"), format!("{KEY}\n")).unwrap();
    let text = std::fs::read_to_string(cfg.region_file("keyed")).unwrap();
    cfg.write_region("keyed", &format!("{text}\n# key rotated\n"));
    let back = eventually(Duration::from_secs(10), || async {
        region_status(d.addr, "keyed").await.unwrap().healthy
    })
    .await;
    assert!(back.is_some(), "healthy again once the key is right");
}

/// One quick OpenAI-dialect region, `east`, serving `provider_model` with
/// room to spare; its region file written into `cfg`.
fn east(cfg: &ConfigDir, provider_model: &str) -> Proc {
    let sim = openai_sim(
        cfg.path(),
        "east",
        "openai",
        provider_model,
        "100000:600",
        &["--base-latency-ms", "0", "--ms-per-1k-tokens", "0"],
    );
    region(
        cfg,
        "east",
        &sim,
        "openai",
        provider_model,
        KEY,
        &model_toml(100_000, 600, "admission"),
    );
    sim
}

/// Both of issue 27's ends at once: a request to the OpenAI front door
/// served by an OpenAI-compatible region comes back as the provider's own
/// JSON (its model name, its usage), not re-wrapped; a stream as the
/// provider's own events, then `[DONE]`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_front_door_relays_an_openai_regions_own_answer() {
    let provider_model = "gpt-4o-2024-08-06";
    let cfg = ConfigDir::new(&format!("{DISPATCHER_TOML}[openai]\nlisten = \"127.0.0.1:0\"\n"));
    let _sim = east(&cfg, provider_model);
    let d = dispatcher(&cfg.config());
    let door = d.listener("openai");
    let path = "/v1/chat/completions";

    let body = r#"{"model":"gpt-4o","messages":[{"role":"user","content":"hi"}],"max_tokens":20}"#;
    let a = call(door, Method::POST, path, &[], body).await;
    assert_eq!(
        a.status,
        http::StatusCode::OK,
        "{}",
        String::from_utf8_lossy(&a.body)
    );
    assert_eq!(a.header("x-dispatcher-region"), "east");
    let reply = json(&a.body);
    assert_eq!(reply["object"], "chat.completion");
    assert_eq!(
        reply["model"], provider_model,
        "the provider's JSON, not a wrapper: {reply}"
    );
    assert!(
        reply["usage"]["completion_tokens"].as_u64().unwrap() <= 20,
        "{reply}"
    );

    let body =
        r#"{"model":"gpt-4o","messages":[{"role":"user","content":"hi"}],"max_tokens":80,"stream":true}"#;
    let a = call(door, Method::POST, path, &[], body).await;
    assert_eq!(
        a.status,
        http::StatusCode::OK,
        "{}",
        String::from_utf8_lossy(&a.body)
    );
    let (events, done) = common::http_client::events(&a.body);
    assert!(done, "{}", String::from_utf8_lossy(&a.body));
    assert!(
        events
            .iter()
            .all(|e| e["object"] == "chat.completion.chunk" && e["model"] == provider_model),
        "the provider's events: {events:?}"
    );
    assert!(
        events
            .iter()
            .any(|e| e["choices"][0]["delta"]["content"].is_string()),
        "{events:?}"
    );
}

/// A stream from an OpenAI-compatible region is the provider's events:
/// replayed from the cache as one chunk it would be their concatenation,
/// which no client reads. Such streams neither read nor feed the cache; a
/// unary reply (one JSON body) is stored and served again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streams_from_an_openai_region_are_never_replayed_from_the_cache() {
    let cfg = ConfigDir::new(DISPATCHER_TOML);
    let _sim = east(&cfg, "gpt-4o-2024-08-06");
    let d = dispatcher(&cfg.config());
    let mut grpc = client(d.addr).await;
    let cached = || pb::DispatchRequest {
        cache: Some(pb::CacheOptions {
            ttl: Some(prost_types::Duration {
                seconds: 60,
                nanos: 0,
            }),
            ..Default::default()
        }),
        ..request(60)
    };
    let stream = |round: &'static str, mut grpc: pb::dispatcher_client::DispatcherClient<_>| async move {
        let mut s = grpc.dispatch_stream(cached()).await.unwrap().into_inner();
        while let Some(c) = s.message().await.unwrap() {
            assert!(c.cached.is_none(), "{round}: a stream replayed from the cache");
            if !c.output.is_empty() {
                assert_eq!(json(&c.output)["object"], "chat.completion.chunk", "{round}");
            }
        }
    };
    stream("first stream", grpc.clone()).await;
    stream("second stream", grpc.clone()).await;
    let first = grpc.dispatch(cached()).await.unwrap().into_inner();
    assert!(first.cached.is_none());
    let second = grpc.dispatch(cached()).await.unwrap().into_inner();
    assert!(
        second.cached.is_some(),
        "a unary reply is stored and served again"
    );
    assert_eq!(json(&second.output)["object"], "chat.completion");
    // Not even a unary reply's body comes back to a stream.
    stream("a stream after a stored reply", grpc.clone()).await;
}
