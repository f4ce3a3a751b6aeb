//! `region-sim --openai`: the simulated provider served over OpenAI's HTTP
//! API (or Azure OpenAI's, `--dialect azure`), beside the gRPC control
//! services on the same port. The same strict provider as the gRPC side
//! admits each call (prompt estimated from the messages plus the output
//! bound); every answer carries the `x-ratelimit-*` headers as of its
//! admission; a refusal is a 429 with `retry-after-ms` and `retry-after`;
//! a stream is server-sent events ending with a usage chunk when asked
//! (`stream_options.include_usage`), and a caller leaving stops the work,
//! which is charged for what was produced.

use std::convert::Infallible;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::extract::{Path, State};
use axum::routing::{get, post};
use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Response, StatusCode, Uri, header};
use serde_json::{Value, json};
use subtle::ConstantTimeEq;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::Code;
use tracing::Instrument;

use super::service::{Admitted, Cancelled, NotAdmitted, SimService};
use crate::openai::rate_limit::RateLimits;
use crate::openai::{Dialect, chat, error};
use crate::pb;

/// The output bound of a request that names none.
pub const DEFAULT_MAX_OUTPUT_TOKENS: u64 = 256;
/// The longest `x-request-id` a caller's is echoed as.
const MAX_REQUEST_ID_BYTES: usize = 128;

/// How the simulated provider speaks OpenAI's API.
#[derive(Debug, Clone, Default)]
pub struct OpenAiSettings {
    pub dialect: Dialect,
    /// The key callers must present; none accepts any caller.
    pub api_key: Option<String>,
}

struct Api {
    sim: SimService,
    settings: OpenAiSettings,
    next_id: AtomicU64,
}

type Shared = State<Arc<Api>>;

/// The OpenAI routes, answering unknown paths with an OpenAI 404.
pub fn router(sim: SimService, settings: OpenAiSettings) -> Router {
    let chat = match settings.dialect {
        Dialect::OpenAi => Router::new().route("/v1/chat/completions", post(chat_openai)),
        Dialect::Azure => Router::new().route(
            "/openai/deployments/{deployment}/chat/completions",
            post(chat_azure),
        ),
    };
    let api = Arc::new(Api {
        sim,
        settings,
        next_id: AtomicU64::new(1),
    });
    chat.route("/v1/models", get(models))
        .route("/openai/models", get(models))
        .with_state(api)
}

/// The answer to a path no route takes.
pub async fn not_found(uri: Uri) -> Response<Body> {
    let message = format!("unknown path {}", crate::excerpt::excerpt(uri.path()));
    error_response(
        StatusCode::NOT_FOUND,
        &message,
        "invalid_request_error",
        Some("not_found"),
        None,
    )
}

fn error_response(
    status: StatusCode,
    message: &str,
    kind: &str,
    code: Option<&str>,
    param: Option<&str>,
) -> Response<Body> {
    let mut r = Response::new(Body::from(error::body(message, kind, code, param)));
    *r.status_mut() = status;
    r.headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
    r
}

impl Api {
    /// Whether the caller presented the key, in the dialect's header.
    fn authorized(&self, headers: &HeaderMap) -> bool {
        let Some(key) = &self.settings.api_key else {
            return true;
        };
        let presented = match self.settings.dialect {
            Dialect::OpenAi => headers
                .get(header::AUTHORIZATION)
                .and_then(|v| v.as_bytes().strip_prefix(b"Bearer ")),
            Dialect::Azure => headers.get("api-key").map(HeaderValue::as_bytes),
        };
        presented.is_some_and(|p| bool::from(p.ct_eq(key.as_bytes())))
    }

    fn unauthorized() -> Response<Body> {
        error_response(
            StatusCode::UNAUTHORIZED,
            "Incorrect API key provided.",
            "invalid_request_error",
            Some("invalid_api_key"),
            None,
        )
    }

    /// The caller's `x-request-id` when it is a short header, else a new one.
    fn request_id(&self, headers: &HeaderMap) -> String {
        headers
            .get("x-request-id")
            .and_then(|v| v.to_str().ok())
            .filter(|v| !v.is_empty() && v.len() <= MAX_REQUEST_ID_BYTES)
            .map(str::to_string)
            .unwrap_or_else(|| format!("req_{}", self.next_id.fetch_add(1, Ordering::Relaxed)))
    }

    /// The rate-limit headers for `model`: its limits, and what is left as
    /// of `hint` (the admission's, or now).
    fn rate_limits(&self, model: &str, hint: Option<&pb::ProviderQuota>) -> RateLimits {
        let (limit_tokens, limit_requests) = self.sim.limits(model).unzip();
        let now = match hint {
            Some(_) => None,
            None => self.sim.hint(model),
        };
        let hint = hint.or(now.as_ref());
        let reset = |d: Option<prost_types::Duration>| d.and_then(|d| Duration::try_from(d).ok());
        RateLimits {
            limit_tokens,
            limit_requests,
            remaining_tokens: hint.map(|h| h.remaining_tokens.max(0) as u64),
            remaining_requests: hint.map(|h| h.remaining_requests.max(0) as u64),
            reset_tokens: hint.and_then(|h| reset(h.reset_tokens)),
            reset_requests: hint.and_then(|h| reset(h.reset_requests)),
            retry_after: None,
        }
    }
}

async fn models(State(api): Shared, headers: HeaderMap) -> Response<Body> {
    if !api.authorized(&headers) {
        return Api::unauthorized();
    }
    let data: Vec<Value> = api
        .sim
        .model_names()
        .into_iter()
        .map(|id| json!({"id": id, "object": "model", "created": 0, "owned_by": "region-sim"}))
        .collect();
    json_response(json!({"object": "list", "data": data}))
}

fn json_response(v: Value) -> Response<Body> {
    let mut r = Response::new(Body::from(serde_json::to_vec(&v).unwrap_or_default()));
    r.headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
    r
}

async fn chat_openai(State(api): Shared, headers: HeaderMap, body: Bytes) -> Response<Body> {
    chat(api, None, headers, body).await
}

async fn chat_azure(
    State(api): Shared,
    Path(deployment): Path<String>,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response<Body> {
    let versioned = uri.query().is_some_and(|q| {
        q.split('&')
            .any(|p| p.starts_with("api-version=") && p.len() > 12)
    });
    if !api.authorized(&headers) {
        return Api::unauthorized();
    }
    if !versioned {
        return error_response(
            StatusCode::BAD_REQUEST,
            "Missing required query parameter api-version.",
            "invalid_request_error",
            Some("missing_api_version"),
            Some("api-version"),
        );
    }
    chat(api, Some(deployment), headers, body).await
}

async fn chat(api: Arc<Api>, deployment: Option<String>, headers: HeaderMap, body: Bytes) -> Response<Body> {
    if !api.authorized(&headers) {
        return Api::unauthorized();
    }
    let request = match chat::parse(&body) {
        Ok(r) => r,
        Err(bad) => {
            return error_response(
                StatusCode::BAD_REQUEST,
                &bad.to_string(),
                "invalid_request_error",
                None,
                Some(&bad.field),
            );
        }
    };
    let Some(model) = deployment.or_else(|| request.model.clone()) else {
        return error_response(
            StatusCode::BAD_REQUEST,
            "you must provide a model parameter",
            "invalid_request_error",
            None,
            Some("model"),
        );
    };
    if !api.sim.serves(&model) {
        let (message, code) = match api.settings.dialect {
            Dialect::OpenAi => (
                format!(
                    "The model {} does not exist or you do not have access to it.",
                    crate::excerpt::excerpt(&model)
                ),
                "model_not_found",
            ),
            Dialect::Azure => (
                format!(
                    "The API deployment {} does not exist.",
                    crate::excerpt::excerpt(&model)
                ),
                "DeploymentNotFound",
            ),
        };
        return error_response(
            StatusCode::NOT_FOUND,
            &message,
            "invalid_request_error",
            Some(code),
            None,
        );
    }
    let request_id = api.request_id(&headers);
    let span = tracing::debug_span!(
        "execute",
        otel.kind = "server",
        rpc = "chat.completions",
        region = %api.sim.region(),
        model = tracing::field::Empty,
        prompt_tokens = tracing::field::Empty,
        completion_tokens = tracing::field::Empty,
    );
    crate::telemetry::continue_trace_headers(&span, &headers);
    let execute = pb::ExecuteRequest {
        model: model.clone(),
        prompt_tokens: request.prompt_tokens,
        max_output_tokens: request.max_output_tokens.unwrap_or(DEFAULT_MAX_OUTPUT_TOKENS),
        request_id: request_id.clone(),
        payload: body,
        ..Default::default()
    };
    let mut response = answer(&api, &model, execute, &request).instrument(span).await;
    if let Ok(id) = HeaderValue::from_str(&request_id) {
        response.headers_mut().insert("x-request-id", id);
    }
    response
}

/// Admits the call and runs it, or answers why not.
async fn answer(
    api: &Arc<Api>,
    model: &str,
    r: pb::ExecuteRequest,
    request: &chat::ChatRequest,
) -> Response<Body> {
    let admitted = match api.sim.admit_or_refuse(&r).await {
        Ok(a) => a,
        Err(NotAdmitted::Refused { message, retry_after }) => {
            let mut response = error_response(
                StatusCode::TOO_MANY_REQUESTS,
                &message,
                "requests",
                Some("rate_limit_exceeded"),
                None,
            );
            RateLimits {
                retry_after: Some(retry_after),
                ..api.rate_limits(model, None)
            }
            .to_headers(response.headers_mut());
            return response;
        }
        Err(NotAdmitted::Status(s)) => {
            let (status, kind) = match s.code() {
                Code::InvalidArgument => (StatusCode::BAD_REQUEST, "invalid_request_error"),
                Code::Unavailable => (StatusCode::SERVICE_UNAVAILABLE, "server_error"),
                _ => (StatusCode::INTERNAL_SERVER_ERROR, "server_error"),
            };
            return error_response(status, s.message(), kind, None, None);
        }
    };
    let limits = api.rate_limits(model, admitted.hint.as_ref());
    let mut response = if request.stream {
        stream(api, r, admitted, request.include_usage)
    } else {
        complete(api, r, admitted).await
    };
    limits.to_headers(response.headers_mut());
    response
}

fn unix_now() -> u64 {
    crate::clock::unix_secs()
}

fn usage(prompt: u64, completion: u64) -> Value {
    json!({"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion})
}

fn finish_reason(completion: u64, max_output: u64) -> &'static str {
    if completion >= max_output {
        "length"
    } else {
        "stop"
    }
}

/// A whole completion, answered when the work is done.
async fn complete(api: &Arc<Api>, r: pb::ExecuteRequest, a: Admitted) -> Response<Body> {
    let sim = &api.sim;
    let _in_flight = sim.in_flight();
    // The caller leaving drops this future; the provider counts the whole
    // completion it had started, as on the gRPC side.
    let mut guard = Cancelled {
        sim,
        admission: Some(a.admission),
        prompt: r.prompt_tokens,
        produced: a.completion,
    };
    let latency = sim.latency(&a.knobs, r.prompt_tokens + a.completion);
    if !latency.is_zero() {
        tokio::time::sleep(latency).await;
    }
    guard.admission = None;
    sim.finish(a.admission, r.prompt_tokens, a.completion);
    json_response(json!({
        "id": format!("chatcmpl-{}", r.request_id),
        "object": "chat.completion",
        "created": unix_now(),
        "model": r.model,
        "choices": [{
            "index": 0,
            "message": {"role": "assistant", "content": sim.output_text(&r.model, a.completion, r.payload.len())},
            "finish_reason": finish_reason(a.completion, r.max_output_tokens),
        }],
        "usage": usage(r.prompt_tokens, a.completion),
    }))
}

/// One server-sent event.
fn event(v: &Value) -> Result<Bytes, Infallible> {
    let mut line = b"data: ".to_vec();
    line.extend(serde_json::to_vec(v).unwrap_or_default());
    line.extend(b"\n\n");
    Ok(Bytes::from(line))
}

/// A chunk's text at four characters a token (spaces in front), the rule
/// a client counting a stream's tokens as they arrive goes by (the
/// dispatcher does).
fn sized_text(text: String, tokens: u64) -> String {
    let want = usize::try_from(tokens.saturating_mul(4)).unwrap_or(usize::MAX);
    match want.checked_sub(text.len()) {
        Some(pad) if pad > 0 => " ".repeat(pad) + &text,
        _ => text,
    }
}

/// A streamed completion: a chunk per few tokens as they are produced, the
/// finish reason, the usage when asked, then `[DONE]`.
fn stream(api: &Arc<Api>, r: pb::ExecuteRequest, a: Admitted, include_usage: bool) -> Response<Body> {
    let (tx, rx) = mpsc::channel::<Result<Bytes, Infallible>>(4);
    let api = api.clone();
    let span = tracing::Span::current();
    tokio::spawn(
        async move {
            let sim = &api.sim;
            let _in_flight = sim.in_flight();
            let id = format!("chatcmpl-{}", r.request_id);
            let created = unix_now();
            let chunk = |delta: Value, finish: Option<&str>| {
                json!({
                    "id": id, "object": "chat.completion.chunk", "created": created, "model": r.model,
                    "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
                })
            };
            let _ = tx
                .send(event(&chunk(json!({"role": "assistant", "content": ""}), None)))
                .await;
            let run = sim.produce(&a.knobs, r.prompt_tokens, a.completion, &tx, None, |from, to| {
                event(&chunk(
                    json!({"content": sized_text(sim.chunk_text(from, to), to - from)}),
                    None,
                ))
            });
            match run.await {
                Ok(produced) => {
                    sim.finish(a.admission, r.prompt_tokens, produced);
                    let reason = finish_reason(produced, r.max_output_tokens);
                    let _ = tx.send(event(&chunk(json!({}), Some(reason)))).await;
                    if include_usage {
                        let last = json!({
                            "id": id, "object": "chat.completion.chunk", "created": created,
                            "model": r.model, "choices": [], "usage": usage(r.prompt_tokens, produced),
                        });
                        let _ = tx.send(event(&last)).await;
                    }
                    let _ = tx.send(Ok(Bytes::from_static(b"data: [DONE]\n\n"))).await;
                }
                Err((produced, _)) => {
                    // The caller left: the provider stops and counts what it produced.
                    sim.count_cancelled();
                    sim.finish(a.admission, r.prompt_tokens, produced);
                }
            }
        }
        .instrument(span),
    );
    let mut response = Response::new(Body::from_stream(ReceiverStream::new(rx)));
    let h = response.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/event-stream"),
    );
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    response
}
