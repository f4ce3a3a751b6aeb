//! The OpenAI-compatible front door (`[openai] listen`) end to end: a real
//! dispatcher in front of real region-sim processes, called by the
//! official `openai` Python SDK (pip-installed when missing) and by a
//! plain HTTP/1.1 client for what the SDK would never send: bodies that
//! are not chat requests, bodies over the limit, unknown paths, a deadline
//! from `x-stainless-timeout`.

mod common;

use std::net::SocketAddr;
use std::time::Duration;

use common::http_client::{self, call};
use common::{ConfigDir, Proc, SimRegion, dispatcher};
use dispatcher::dispatch::hash_key;
use http::{Method, StatusCode};

fn config(extra: &str) -> String {
    format!(
        r#"
[limits]
max_payload_bytes = 8192
[openai]
listen = "127.0.0.1:0"
[telemetry]
metrics_listen = "127.0.0.1:0"
[[models]]
name = "gpt-4o"
max_request_tokens = 20000
[[rollouts]]
alias = "chat"
targets = [{{ model = "gpt-4o", weight = 1 }}]
[[tenants]]
name = "alpha"
keys = ["{}"]
[[tenants]]
name = "slow"
requests_per_second = 1
keys = ["{}"]
{extra}"#,
        hash_key("k-alpha"),
        hash_key("k-slow"),
    )
}

struct Setup {
    _dir: ConfigDir,
    sim: Proc,
    dispatcher: Proc,
}

impl Setup {
    fn start(sim_args: &[&str]) -> Self {
        Self::start_with(sim_args, "")
    }

    /// `extra`: more dispatcher.toml (a `[server]` table).
    fn start_with(sim_args: &[&str], extra: &str) -> Self {
        let dir = ConfigDir::new(&config(extra));
        let sim = dir.start_region(SimRegion {
            name: "east",
            sim_args,
            ..Default::default()
        });
        let dispatcher = dispatcher(&dir.config());
        Self {
            _dir: dir,
            sim,
            dispatcher,
        }
    }

    fn door(&self) -> SocketAddr {
        self.dispatcher.listener("openai")
    }
}

const ALPHA: (&str, &str) = ("authorization", "Bearer k-alpha");
const PATH: &str = "/v1/chat/completions";
const HELLO: &str = r#"{"model":"gpt-4o","messages":[{"role":"user","content":"hi"}],"max_tokens":20}"#;

#[test]
fn the_openai_sdk_is_served_by_the_front_door() {
    let s = Setup::start(&["--base-latency-ms", "0", "--ms-per-1k-tokens", "0"]);
    let base = format!("http://{}", s.door());
    common::tools::run_openai_sdk_script("against_door.py", &[&base]);
    // The door's own counter says what it answered; the engine's counts
    // the same requests by outcome.
    let metrics = common::scrape_metrics(s.dispatcher.listener("metrics"));
    for status in ["200", "429", "404", "401", "400"] {
        let line =
            format!(r#"dispatcher_openai_requests_total{{endpoint="chat_completions",status="{status}"}}"#);
        assert!(metrics.contains(&line), "no {line} in\n{metrics}");
    }
    assert!(
        metrics.contains(r#"dispatcher_openai_requests_total{endpoint="models",status="200"}"#),
        "{metrics}"
    );
    assert!(metrics.contains(r#"outcome="tenant_limit""#), "{metrics}");
}

#[tokio::test]
async fn bad_requests_get_openai_errors_that_name_the_field() {
    let s = Setup::start(&[]);
    let door = s.door();
    // Each bad body: its status, `param`, and never the body's own text.
    let secret = "SECRET-TEXT-NOT-ECHOED";
    let cases = [
        (
            format!("{{\"model\":\"gpt-4o\",\"messages\":\"{secret}\"}}"),
            400,
            Some("messages"),
        ),
        (format!("not json {secret}"), 400, None),
        (
            format!(
                "{{\"model\":\"gpt-4o\",\"messages\":[{{\"role\":\"user\",\"content\":\"{secret}\"}}],\"max_tokens\":\"many\"}}"
            ),
            400,
            Some("max_tokens"),
        ),
        (
            r#"{"model":"gpt-4o","messages":[{"role":"user","content":"x"}],"max_tokens":999999}"#.into(),
            400,
            Some("max_tokens"),
        ),
        (
            format!("{{\"model\":\"{secret}\",\"messages\":[{{\"role\":\"user\",\"content\":\"x\"}}]}}"),
            404,
            Some("model"),
        ),
    ];
    for (body, status, param) in cases {
        let a = call(door, Method::POST, PATH, &[ALPHA], &body).await;
        assert_eq!(
            a.status.as_u16(),
            status,
            "{body}: {}",
            String::from_utf8_lossy(&a.body)
        );
        let e = &a.json()["error"];
        assert_eq!(e["param"].as_str(), param, "{body}: {e}");
        assert!(e["type"].is_string() && e["code"].is_string(), "{e}");
        assert!(!a.header("x-request-id").is_empty());
        if status == 400 {
            assert!(!e["message"].as_str().unwrap().contains(secret), "{e}");
        }
    }
    // The model's name is quoted as an excerpt, however long.
    let long = "m".repeat(5000);
    let body = format!("{{\"model\":\"{long}\",\"messages\":[{{\"role\":\"user\",\"content\":\"x\"}}]}}");
    let a = call(door, Method::POST, PATH, &[ALPHA], &body).await;
    assert_eq!(a.status, StatusCode::NOT_FOUND);
    assert!(a.body.len() < 1024, "{}", a.body.len());

    // Over limits.max_payload_bytes: 413, refused from its declared length.
    let big = format!(
        "{{\"model\":\"gpt-4o\",\"messages\":[{{\"role\":\"user\",\"content\":\"{}\"}}]}}",
        "x".repeat(10_000)
    );
    let a = call(door, Method::POST, PATH, &[ALPHA], &big).await;
    assert_eq!(a.status, StatusCode::PAYLOAD_TOO_LARGE);
    assert_eq!(a.json()["error"]["code"], "request_too_large");

    // No key, a wrong one: 401 before anything else is looked at.
    for auth in [&[][..], &[("authorization", "Bearer nope")][..]] {
        let a = call(door, Method::POST, PATH, auth, HELLO).await;
        assert_eq!(a.status, StatusCode::UNAUTHORIZED);
        assert_eq!(a.json()["error"]["code"], "invalid_api_key");
    }
    let a = call(door, Method::GET, "/v1/models", &[], "").await;
    assert_eq!(a.status, StatusCode::UNAUTHORIZED);

    // Paths and methods the door does not serve, in OpenAI's shape.
    let a = call(door, Method::POST, "/v1/embeddings", &[ALPHA], "{}").await;
    assert_eq!(a.status, StatusCode::NOT_FOUND);
    assert_eq!(a.json()["error"]["code"], "not_found");
    let a = call(door, Method::GET, PATH, &[ALPHA], "").await;
    assert_eq!(a.status, StatusCode::METHOD_NOT_ALLOWED);
    assert!(a.json()["error"]["message"].is_string());

    // The SDK's timeout header is the deadline; a malformed one is refused.
    let bad = call(
        door,
        Method::POST,
        PATH,
        &[ALPHA, ("x-stainless-timeout", "soon")],
        HELLO,
    )
    .await;
    assert_eq!(bad.status, StatusCode::BAD_REQUEST);
    let ok = call(
        door,
        Method::POST,
        PATH,
        &[ALPHA, ("x-stainless-timeout", "30")],
        HELLO,
    )
    .await;
    assert_eq!(ok.status, StatusCode::OK, "{}", String::from_utf8_lossy(&ok.body));
    assert_eq!(ok.json()["object"], "chat.completion");
    assert_eq!(ok.header("x-dispatcher-model"), "gpt-4o");
}

#[tokio::test]
async fn the_sdks_timeout_header_is_the_deadline() {
    // Every call takes at least two seconds at the region.
    let s = Setup::start(&["--base-latency-ms", "2000"]);
    let started = std::time::Instant::now();
    let a = call(
        s.door(),
        Method::POST,
        PATH,
        &[ALPHA, ("x-stainless-timeout", "0.3")],
        HELLO,
    )
    .await;
    assert_eq!(
        a.status,
        StatusCode::GATEWAY_TIMEOUT,
        "{}",
        String::from_utf8_lossy(&a.body)
    );
    assert_eq!(a.json()["error"]["code"], "timeout");
    assert!(
        started.elapsed() < Duration::from_millis(1900),
        "{:?}",
        started.elapsed()
    );
}

#[tokio::test]
async fn a_stream_is_server_sent_events_ending_in_done() {
    let s = Setup::start(&["--base-latency-ms", "0", "--ms-per-1k-tokens", "0"]);
    let body =
        r#"{"model":"chat","messages":[{"role":"user","content":"hi"}],"max_tokens":80,"stream":true}"#;
    let a = call(s.door(), Method::POST, PATH, &[ALPHA], body).await;
    assert_eq!(a.status, StatusCode::OK);
    assert_eq!(a.header("content-type"), "text/event-stream");
    assert_eq!(a.header("x-dispatcher-alias"), "chat");
    assert_eq!(a.header("x-dispatcher-region"), "east");
    let (events, done) = http_client::events(&a.body);
    assert!(done, "{}", String::from_utf8_lossy(&a.body));
    assert!(
        events.iter().all(|e| e["object"] == "chat.completion.chunk"),
        "{events:?}"
    );
    assert!(
        events.iter().all(|e| e.get("usage").is_none()),
        "no usage chunk unless stream_options.include_usage"
    );
    let last = events.last().unwrap();
    assert!(last["choices"][0]["finish_reason"].is_string(), "{last}");
}

/// The raw bytes of a POST to the door, as a client would write them.
fn raw_post(body: &str) -> String {
    format!(
        "POST {PATH} HTTP/1.1\r\nhost: door\r\nauthorization: Bearer k-alpha\r\n\
         content-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
        body.len()
    )
}

#[tokio::test]
async fn a_caller_cutting_a_stream_stops_the_work_and_pays_for_what_was_produced() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    // 3,000 tokens at 1 ms a token: three seconds of output, if all ran.
    let s = Setup::start(&["--base-latency-ms", "0", "--ms-per-1k-tokens", "1000"]);
    let body =
        r#"{"model":"gpt-4o","messages":[{"role":"user","content":"long"}],"max_tokens":3000,"stream":true}"#;
    let mut tcp = tokio::net::TcpStream::connect(s.door()).await.unwrap();
    tcp.write_all(raw_post(body).as_bytes()).await.unwrap();
    let mut seen = Vec::new();
    let mut buf = [0u8; 4096];
    while !String::from_utf8_lossy(&seen).contains("tokens 0..") {
        let n = tokio::time::timeout(Duration::from_secs(10), tcp.read(&mut buf))
            .await
            .expect("the first event within 10 s")
            .unwrap();
        assert!(n > 0, "closed early: {}", String::from_utf8_lossy(&seen));
        seen.extend_from_slice(&buf[..n]);
    }
    assert!(String::from_utf8_lossy(&seen).starts_with("HTTP/1.1 200"));
    drop(tcp);
    let stats = common::eventually(Duration::from_secs(5), || async {
        common::sim_stats(s.sim.addr).await.cancelled >= 1
    })
    .await;
    assert!(stats.is_some(), "the region's call was cancelled");
    let m = &common::sim_stats(s.sim.addr).await.models[0];
    assert!(
        m.completion_tokens < 1500,
        "charged for what was produced, not 3,000: {m:?}"
    );
}

#[tokio::test]
async fn a_connection_that_sends_no_whole_request_is_closed() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let s = Setup::start_with(&[], "[server]\nhandshake_timeout = \"1s\"\n");
    for sent in ["", "POST /v1/chat/completions HTTP/1.1\r\nhost: door\r\n"] {
        let mut tcp = tokio::net::TcpStream::connect(s.door()).await.unwrap();
        tcp.write_all(sent.as_bytes()).await.unwrap();
        let mut buf = [0u8; 1024];
        let read = tokio::time::timeout(Duration::from_secs(5), tcp.read(&mut buf)).await;
        match read {
            Ok(Ok(_)) | Ok(Err(_)) => {} // closed (maybe with a 408 first)
            Err(_) => panic!("{sent:?}: still open after 5 s with a 1 s header timeout"),
        }
    }
    // A keep-alive connection is served, then closed once idle as long.
    let mut tcp = tokio::net::TcpStream::connect(s.door()).await.unwrap();
    tcp.write_all(raw_post(HELLO).as_bytes()).await.unwrap();
    let mut seen = Vec::new();
    let mut buf = [0u8; 4096];
    let closed = tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            match tcp.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => seen.extend_from_slice(&buf[..n]),
            }
        }
    })
    .await;
    assert!(
        String::from_utf8_lossy(&seen).starts_with("HTTP/1.1 200"),
        "{}",
        String::from_utf8_lossy(&seen)
    );
    assert!(closed.is_ok(), "an idle keep-alive connection stays open");
}
