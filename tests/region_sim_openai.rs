//! `region-sim --openai`: the simulated provider over OpenAI's HTTP API and
//! Azure OpenAI's, as a real process on loopback: completions and streams
//! with usage, the rate-limit headers on every answer, a 429 with its
//! retry hints when the limit is spent, the key checked, unknown models
//! and bad bodies refused with OpenAI's error shape, and a stream the
//! caller cuts charged for what was produced.

mod common;

use std::time::Duration;

use common::http_client::{call, events, send};
use http::{Method, StatusCode};

const KEY: &str = "sk-test-region-sim";
const CHAT: &str = "/v1/chat/completions";

fn body(model: &str, max_tokens: u64, stream: bool) -> String {
    serde_json::json!({
        "model": model,
        "messages": [{"role": "user", "content": "Say hello to the simulated provider."}],
        "max_tokens": max_tokens,
        "stream": stream,
        "stream_options": {"include_usage": stream},
    })
    .to_string()
}

fn start(dir: &std::path::Path, region: &str, extra: &[&str]) -> common::Proc {
    let key_file = dir.join(format!("{region}.key"));
    std::fs::write(&key_file, format!("{KEY}\n")).unwrap();
    let mut args = vec!["--openai", "--api-key-file", key_file.to_str().unwrap()];
    args.extend_from_slice(extra);
    common::region_sim(dir, region, &args)
}

#[tokio::test]
async fn openai_dialect_serves_completions_streams_and_refusals() {
    let dir = tempfile::tempdir().unwrap();
    let sim = start(
        dir.path(),
        "sim-openai",
        &[
            "--model",
            "gpt-4o:100000:600",
            // A small limit: three 1,000-token requests fill it.
            "--model",
            "small:3000:600",
            "--base-latency-ms",
            "0",
            "--ms-per-1k-tokens",
            "0",
        ],
    );
    let auth = format!("Bearer {KEY}");
    let ok = [("authorization", auth.as_str()), ("x-request-id", "req-abc")];

    // The models, behind the key.
    let models = call(sim.addr, Method::GET, "/v1/models", &ok, "").await;
    assert_eq!(models.status, StatusCode::OK);
    let ids: Vec<_> = models.json()["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["id"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(ids, ["gpt-4o", "small"]);
    let anonymous = call(sim.addr, Method::GET, "/v1/models", &[], "").await;
    assert_eq!(anonymous.status, StatusCode::UNAUTHORIZED);

    // A completion: usage, the request id echoed, the rate-limit headers.
    let done = call(sim.addr, Method::POST, CHAT, &ok, &body("gpt-4o", 100, false)).await;
    assert_eq!(done.status, StatusCode::OK, "{:?}", done.body);
    let json = done.json();
    assert_eq!(json["object"], "chat.completion");
    assert_eq!(json["model"], "gpt-4o");
    let usage = &json["usage"];
    let prompt = usage["prompt_tokens"].as_u64().unwrap();
    let completion = usage["completion_tokens"].as_u64().unwrap();
    // 3 + 4 for the message + ceil((4 + 36) / 4) characters.
    assert_eq!(prompt, 17);
    assert!((1..=100).contains(&completion), "{usage}");
    assert_eq!(usage["total_tokens"].as_u64().unwrap(), prompt + completion);
    assert_eq!(done.header("x-request-id"), "req-abc");
    assert_eq!(done.header("x-ratelimit-limit-tokens"), "100000");
    assert_eq!(done.header("x-ratelimit-limit-requests"), "600");
    let remaining: u64 = done.header("x-ratelimit-remaining-tokens").parse().unwrap();
    assert!(
        remaining <= 100_000 - 117,
        "admission counts prompt + max_tokens: {remaining}"
    );
    assert!(done.headers.contains_key("x-ratelimit-reset-tokens"));
    assert!(done.headers.contains_key("x-ratelimit-reset-requests"));

    // A stream: a role chunk, content chunks, the finish reason, a usage chunk, [DONE].
    let streamed = call(sim.addr, Method::POST, CHAT, &ok, &body("gpt-4o", 100, true)).await;
    assert_eq!(streamed.status, StatusCode::OK);
    assert_eq!(streamed.header("content-type"), "text/event-stream");
    assert!(streamed.headers.contains_key("x-ratelimit-remaining-tokens"));
    let (chunks, finished) = events(&streamed.body);
    assert!(finished, "the stream ends with [DONE]");
    assert!(chunks.iter().all(|c| c["object"] == "chat.completion.chunk"));
    let last = chunks.last().unwrap();
    assert_eq!(
        last["choices"].as_array().unwrap().len(),
        0,
        "the usage chunk has no choices"
    );
    let produced = last["usage"]["completion_tokens"].as_u64().unwrap();
    let finish = &chunks[chunks.len() - 2]["choices"][0]["finish_reason"];
    assert!(finish == "stop" || finish == "length", "{finish}");
    let text: String = chunks
        .iter()
        .filter_map(|c| c["choices"][0]["delta"]["content"].as_str())
        .collect();
    assert!(text.ends_with(&format!("..{produced}\n")), "{text}");

    // The small model's limit spent: a 429 with retry-after-ms, retry-after
    // and what is left, in OpenAI's error shape.
    let mut refused = None;
    for _ in 0..5 {
        let r = call(
            sim.addr,
            Method::POST,
            CHAT,
            &ok,
            &body("small", 1000 - prompt, false),
        )
        .await;
        if r.status == StatusCode::TOO_MANY_REQUESTS {
            refused = Some(r);
            break;
        }
        assert_eq!(r.status, StatusCode::OK);
    }
    let refused = refused.expect("the fourth 1,000-token request is refused");
    assert_eq!(refused.json()["error"]["code"], "rate_limit_exceeded");
    let retry_ms: u64 = refused.header("retry-after-ms").parse().unwrap();
    assert!((1..=20_000).contains(&retry_ms), "{retry_ms}");
    let retry_s: u64 = refused.header("retry-after").parse().unwrap();
    assert_eq!(retry_s, retry_ms.div_ceil(1000));
    let left: u64 = refused.header("x-ratelimit-remaining-tokens").parse().unwrap();
    assert!(left < 1000, "{left}");
    assert_eq!(refused.header("x-ratelimit-limit-tokens"), "3000");

    // The key, the model and the body checked.
    let wrong = call(
        sim.addr,
        Method::POST,
        CHAT,
        &[("authorization", "Bearer sk-wrong")],
        &body("gpt-4o", 10, false),
    )
    .await;
    assert_eq!(wrong.status, StatusCode::UNAUTHORIZED);
    assert_eq!(wrong.json()["error"]["code"], "invalid_api_key");
    assert!(!String::from_utf8_lossy(&wrong.body).contains(KEY));
    let unknown = call(sim.addr, Method::POST, CHAT, &ok, &body("gpt-9", 10, false)).await;
    assert_eq!(unknown.status, StatusCode::NOT_FOUND);
    assert_eq!(unknown.json()["error"]["code"], "model_not_found");
    let bad = call(
        sim.addr,
        Method::POST,
        CHAT,
        &ok,
        r#"{"model":"gpt-4o","messages":"hi"}"#,
    )
    .await;
    assert_eq!(bad.status, StatusCode::BAD_REQUEST);
    assert_eq!(bad.json()["error"]["param"], "messages");

    // The gRPC control on the same port counts what the HTTP side did.
    let stats = common::sim_stats(sim.addr).await;
    let small = stats.models.iter().find(|m| m.model == "small").unwrap();
    assert_eq!((small.accepted, small.rejected), (3, 1));
    let gpt = stats.models.iter().find(|m| m.model == "gpt-4o").unwrap();
    assert_eq!(gpt.accepted, 2);
    assert_eq!(gpt.completion_tokens, completion + produced);
}

#[tokio::test]
async fn azure_dialect_takes_the_deployment_from_the_path_and_the_key_from_api_key() {
    let dir = tempfile::tempdir().unwrap();
    let sim = start(
        dir.path(),
        "sim-azure",
        &[
            "--dialect",
            "azure",
            "--model",
            "gpt-4o:100000:600",
            "--base-latency-ms",
            "0",
            "--ms-per-1k-tokens",
            "0",
        ],
    );
    let path = "/openai/deployments/gpt-4o/chat/completions?api-version=2024-10-21";
    let key = [("api-key", KEY)];
    // Azure's body names no model; the deployment does.
    let no_model = r#"{"messages":[{"role":"user","content":"hi"}],"max_tokens":20}"#;
    let done = call(sim.addr, Method::POST, path, &key, no_model).await;
    assert_eq!(done.status, StatusCode::OK, "{:?}", done.body);
    assert_eq!(done.json()["model"], "gpt-4o");
    assert!(done.headers.contains_key("x-ratelimit-remaining-tokens"));

    let bearer = format!("Bearer {KEY}");
    let wrong_header = call(
        sim.addr,
        Method::POST,
        path,
        &[("authorization", &bearer)],
        no_model,
    )
    .await;
    assert_eq!(
        wrong_header.status,
        StatusCode::UNAUTHORIZED,
        "Azure's key goes in api-key"
    );
    let unversioned = call(
        sim.addr,
        Method::POST,
        "/openai/deployments/gpt-4o/chat/completions",
        &key,
        no_model,
    )
    .await;
    assert_eq!(unversioned.status, StatusCode::BAD_REQUEST);
    let missing = call(
        sim.addr,
        Method::POST,
        "/openai/deployments/gpt-9/chat/completions?api-version=2024-10-21",
        &key,
        no_model,
    )
    .await;
    assert_eq!(missing.status, StatusCode::NOT_FOUND);
    assert_eq!(missing.json()["error"]["code"], "DeploymentNotFound");
    // The OpenAI path is not served in this dialect.
    let other = call(sim.addr, Method::POST, CHAT, &key, &body("gpt-4o", 10, false)).await;
    assert_eq!(other.status, StatusCode::NOT_FOUND);
    let models = call(
        sim.addr,
        Method::GET,
        "/openai/models?api-version=2024-10-21",
        &key,
        "",
    )
    .await;
    assert_eq!(models.status, StatusCode::OK);
}

#[tokio::test]
async fn a_stream_the_caller_cuts_is_charged_for_what_was_produced() {
    let dir = tempfile::tempdir().unwrap();
    // A 32-token chunk every 320 ms: 3,000 tokens would take 30 s.
    let sim = start(
        dir.path(),
        "sim-cut",
        &[
            "--model",
            "gpt-4o:1000000:600:usage",
            "--base-latency-ms",
            "0",
            "--ms-per-1k-tokens",
            "10000",
            "--completion-min-fraction",
            "1",
        ],
    );
    let auth = format!("Bearer {KEY}");
    let response = send(
        sim.addr,
        Method::POST,
        CHAT,
        &[("authorization", auth.as_str())],
        &body("gpt-4o", 3000, true),
    )
    .await;
    assert_eq!(response.status(), StatusCode::OK);
    let mut body = response.into_body();
    let mut content_chunks = 0;
    while content_chunks < 2 {
        use http_body_util::BodyExt;
        let frame = tokio::time::timeout(Duration::from_secs(10), body.frame())
            .await
            .expect("a chunk within 10 s")
            .expect("the stream goes on")
            .unwrap();
        if let Some(data) = frame.data_ref() {
            content_chunks += String::from_utf8_lossy(data).matches("tokens ").count();
        }
    }
    drop(body);
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let stats = loop {
        let s = common::sim_stats(sim.addr).await;
        if s.cancelled == 1 && s.in_flight == 0 {
            break s;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the cut stream did not end: {s:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let m = &stats.models[0];
    // Two or three chunks were produced, not 3,000 tokens.
    assert!((64..=160).contains(&m.completion_tokens), "{m:?}");
    assert_eq!(
        m.charged_tokens,
        m.prompt_tokens + m.completion_tokens,
        "usage accounting"
    );
}

/// The official openai SDK (pip-installed when missing) against the
/// simulated provider in `dialect`: a completion, a stream with usage, a
/// 429 it retries by itself (after `retry-after-ms`) and then succeeds,
/// `NotFoundError` and `AuthenticationError`.
async fn sdk_against_sim(dialect: &str) {
    let dir = tempfile::tempdir().unwrap();
    let sim = start(
        dir.path(),
        &format!("sim-sdk-{dialect}"),
        &[
            "--dialect",
            dialect,
            "--model",
            "gpt-4o:100000:600",
            "--model",
            "tight:6000:600",
            "--base-latency-ms",
            "0",
            "--ms-per-1k-tokens",
            "0",
        ],
    );
    common::tools::run_openai_sdk_script("against_sim.py", &[&sim.endpoint(), KEY, dialect]);
    let stats = common::sim_stats(sim.addr).await;
    let tight = stats.models.iter().find(|m| m.model == "tight").unwrap();
    assert_eq!(tight.accepted, 2, "{tight:?}");
    assert!(tight.rejected >= 1, "the SDK met a 429: {tight:?}");
}

#[tokio::test]
async fn the_openai_sdk_takes_the_simulated_provider_for_openai() {
    sdk_against_sim("openai").await;
}

#[tokio::test]
async fn the_openai_sdk_takes_the_simulated_provider_for_azure_openai() {
    sdk_against_sim("azure").await;
}
