//! An OpenAI-compatible region behind the forwarder's "send one attempt"
//! seam (DESIGN §15): the encoded `ExecuteRequest` an AgentCluster would
//! receive becomes a chat-completions call (the payload is the body; the
//! provider's model, the output bound, `stream` and
//! `stream_options.include_usage` are set here), and the answer comes back
//! as an `ExecuteReply` / `ExecuteChunk`s (output verbatim, usage, the
//! rate-limit headers as the quota hint) or as a status the forwarder
//! already reads: 429 RESOURCE_EXHAUSTED with its reset, 400
//! INVALID_ARGUMENT, 401/403/404 FAILED_PRECONDITION (the region is
//! misconfigured: flagged here, reported once by whoever sees it first),
//! 5xx as a cluster's. It decides no routing, quota or tenants.
//!
//! Owner: the region's misconfiguration flag and the provider limits it
//! saw (`Inner`, a lock each, held for one read or write).

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderValue, Method, StatusCode};
use http_body_util::{BodyExt, Full, Limited};
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioTimer};
use parking_lot::Mutex;
use prost::Message;
use serde_json::{Map, Value};
use tonic::{Code, Status};

use super::http_connect::HttpConnect;
use super::sse::{SseChunks, usage_of};
use super::{Call, Connector};
use crate::config::OpenAiRegion;
use crate::openai::Dialect;
use crate::openai::rate_limit::RateLimits;
use crate::pb;

/// The most of a whole (not streamed) answer read back.
const MAX_ANSWER_BYTES: usize = 64 << 20;
/// The most of an error answer read, for its message.
const MAX_ERROR_BYTES: usize = 64 << 10;

/// A model and the provider's limits of it (tokens, requests a minute),
/// as its `x-ratelimit-limit-*` headers said.
pub type ProviderLimits = (String, Option<u64>, Option<u64>);

#[derive(Clone)]
pub struct OpenAiClient {
    inner: Arc<Inner>,
}

struct Inner {
    region: String,
    client: Client<HttpConnect, Full<Bytes>>,
    settings: OpenAiRegion,
    /// `{endpoint}/v1/chat/completions` or `{endpoint}/openai/deployments/`.
    chat: String,
    health: http::Uri,
    /// The region file's limits of each model (tokens, requests a minute),
    /// to compare with the provider's `x-ratelimit-limit-*`.
    configured: Vec<(String, u64, u64)>,
    misconfigured: Mutex<Misconfig>,
    /// Models whose provider limits disagreed with the region file, with
    /// what the provider said (tokens, requests a minute): told once each.
    disagreements: Mutex<Vec<ProviderLimits>>,
}

/// Why a region is out of service until fixed.
#[derive(Debug, Default)]
struct Misconfig {
    why: Option<(Cause, String)>,
    reported: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Cause {
    /// 401 / 403: the health check (which sends the key) clears it.
    Key,
    /// 404: an unknown model or deployment, until the region file changes.
    Model,
}

/// What a health probe found.
#[derive(Debug, PartialEq, Eq)]
pub enum ProbeOutcome {
    Passed,
    Failed(String),
    /// The region cannot serve until its configuration is fixed.
    Misconfigured,
}

impl OpenAiClient {
    pub fn new(
        region: &str,
        endpoint: &str,
        settings: OpenAiRegion,
        configured: Vec<(String, u64, u64)>,
        connector: Arc<dyn Connector>,
        tls: Option<crate::tls::client::ClientTls>,
    ) -> Result<Self, String> {
        let base = endpoint.trim_end_matches('/');
        let chat = match settings.dialect {
            Dialect::OpenAi => format!("{base}/v1/chat/completions"),
            Dialect::Azure => format!("{base}/openai/deployments/"),
        };
        let health: http::Uri = format!("{base}{}", settings.health_path)
            .parse()
            .map_err(|e| format!("health path: {e}"))?;
        let https = health.scheme_str() == Some("https");
        if https != tls.is_some() {
            return Err("an https:// endpoint needs TLS settings, and only it".into());
        }
        let client = Client::builder(TokioExecutor::new())
            .timer(TokioTimer::new())
            .pool_timer(TokioTimer::new())
            .pool_idle_timeout(Duration::from_secs(90))
            .http2_keep_alive_interval(Duration::from_secs(30))
            .http2_keep_alive_while_idle(true)
            .build(HttpConnect::new(connector, tls));
        Ok(Self {
            inner: Arc::new(Inner {
                region: region.to_string(),
                client,
                settings,
                chat,
                health,
                configured,
                misconfigured: Mutex::default(),
                disagreements: Mutex::default(),
            }),
        })
    }

    /// Whether the client was made from these settings (a reload keeps it).
    pub fn same_settings(&self, settings: &OpenAiRegion, configured: &[(String, u64, u64)]) -> bool {
        self.inner.settings == *settings && self.inner.configured == configured
    }

    /// The misconfiguration not yet reported, if any: the caller reports it
    /// (one error log, the region out of service); later callers get `None`.
    pub fn take_unreported(&self) -> Option<String> {
        let mut m = self.inner.misconfigured.lock();
        if m.reported {
            return None;
        }
        m.reported = true;
        m.why.as_ref().map(|(_, why)| why.clone())
    }

    /// Whether the region is flagged as misconfigured.
    pub fn misconfigured(&self) -> bool {
        self.inner.misconfigured.lock().why.is_some()
    }

    /// Models whose provider limits disagree with the region file: the
    /// model and the provider's tokens and requests a minute.
    pub fn disagreements(&self) -> Vec<ProviderLimits> {
        self.inner.disagreements.lock().clone()
    }

    fn flag(&self, cause: Cause, why: String) {
        let mut m = self.inner.misconfigured.lock();
        if m.why.is_none() {
            *m = Misconfig {
                why: Some((cause, why)),
                reported: false,
            };
        }
    }

    pub async fn execute(&self, call: Call) -> Result<tonic::Response<pb::ExecuteReply>, Status> {
        let exec = decode(&call)?;
        let response = self.send(call, &exec, false).await?;
        let (parts, body) = response.into_parts();
        let limits = self.read_limits(&parts.headers, &exec.model);
        let body = Limited::new(body, MAX_ANSWER_BYTES)
            .collect()
            .await
            .map_err(|e| Status::unavailable(format!("reading the provider's answer: {e}")))?
            .to_bytes();
        let v: Value = serde_json::from_slice(&body)
            .map_err(|_| Status::internal("the provider's answer is not JSON"))?;
        // No usage: the worst case the reservation allowed.
        let usage = v.get("usage").filter(|u| u.is_object()).map_or(
            pb::Usage {
                prompt_tokens: exec.prompt_tokens,
                completion_tokens: exec.max_output_tokens,
                cached_prompt_tokens: 0,
            },
            usage_of,
        );
        Ok(tonic::Response::new(pb::ExecuteReply {
            output: body,
            usage: Some(usage),
            provider_quota: quota(&limits),
            load: None,
        }))
    }

    pub async fn execute_stream(&self, call: Call) -> Result<tonic::Response<SseChunks>, Status> {
        let exec = decode(&call)?;
        let response = self.send(call, &exec, true).await?;
        let (parts, body) = response.into_parts();
        let limits = self.read_limits(&parts.headers, &exec.model);
        Ok(tonic::Response::new(SseChunks::new(
            body,
            exec.prompt_tokens,
            quota(&limits),
        )))
    }

    /// Sends the chat call; a non-2xx answer comes back as its status.
    async fn send(
        &self,
        call: Call,
        exec: &pb::ExecuteRequest,
        stream: bool,
    ) -> Result<http::Response<hyper::body::Incoming>, Status> {
        let s = &self.inner.settings;
        let Some(provider_model) = s.provider_model(&exec.model) else {
            return Err(Status::unavailable(format!(
                "region {} does not serve model {}",
                self.inner.region, exec.model
            )));
        };
        let body = chat_body(
            &exec.payload,
            provider_model,
            exec.max_output_tokens,
            stream,
            s.dialect,
        )?;
        let uri = match s.dialect {
            Dialect::OpenAi => self.inner.chat.clone(),
            Dialect::Azure => format!(
                "{}{provider_model}/chat/completions?api-version={}",
                self.inner.chat, s.api_version
            ),
        };
        let mut request = http::Request::new(Full::new(body));
        *request.method_mut() = Method::POST;
        *request.uri_mut() = uri
            .parse()
            .map_err(|e| Status::internal(format!("chat URI: {e}")))?;
        let h = request.headers_mut();
        *h = call.headers;
        h.insert(
            http::header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        self.authorize(h);
        if let Ok(id) = HeaderValue::from_str(&exec.request_id) {
            h.insert("x-request-id", id);
        }
        let response = self
            .inner
            .client
            .request(request)
            .await
            .map_err(|e| Status::unavailable(format!("{}: {}", self.inner.region, error_chain(&e))))?;
        if response.status().is_success() {
            return Ok(response);
        }
        Err(self.refusal(response, provider_model).await)
    }

    fn authorize(&self, h: &mut http::HeaderMap) {
        let key = &self.inner.settings.key;
        match self.inner.settings.dialect {
            Dialect::OpenAi => h.insert(http::header::AUTHORIZATION, key.header(true)),
            Dialect::Azure => h.insert("api-key", key.header(false)),
        };
    }

    /// A non-2xx answer as the status the forwarder acts on.
    async fn refusal(&self, response: http::Response<hyper::body::Incoming>, provider_model: &str) -> Status {
        let (parts, body) = response.into_parts();
        let limits = RateLimits::from_headers(&parts.headers);
        let code = parts.status;
        let body = match Limited::new(body, MAX_ERROR_BYTES).collect().await {
            Ok(b) => b.to_bytes(),
            Err(_) => Bytes::new(),
        };
        let message = || crate::openai::error::message(&body).unwrap_or_default();
        let region = &self.inner.region;
        match code {
            StatusCode::TOO_MANY_REQUESTS => {
                let reset = limits
                    .retry_after
                    .or(limits.reset_tokens.max(limits.reset_requests))
                    .unwrap_or(super::DEFAULT_PROVIDER_RESET);
                <Status as tonic_types::StatusExt>::with_error_details(
                    Code::ResourceExhausted,
                    format!("the provider refused for quota (429): {}", message()),
                    tonic_types::ErrorDetails::with_retry_info(Some(reset)),
                )
            }
            StatusCode::BAD_REQUEST | StatusCode::UNPROCESSABLE_ENTITY | StatusCode::PAYLOAD_TOO_LARGE => {
                Status::invalid_argument(format!(
                    "the provider refused the request ({}): {}",
                    code.as_u16(),
                    message()
                ))
            }
            // The provider's message may quote part of the key: not passed on.
            StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN => {
                let why = format!(
                    "the provider refused the API key ({}); check api_key_env / api_key_file in the region file",
                    code.as_u16()
                );
                self.flag(Cause::Key, why.clone());
                Status::failed_precondition(format!("region {region} is misconfigured: {why}"))
            }
            StatusCode::NOT_FOUND => {
                let why = format!(
                    "the provider does not know the model or deployment {provider_model:?} (404); check provider_model and endpoint in the region file"
                );
                self.flag(Cause::Model, why.clone());
                Status::failed_precondition(format!("region {region} is misconfigured: {why}"))
            }
            // Overloaded or down: it did not run the work.
            StatusCode::BAD_GATEWAY | StatusCode::SERVICE_UNAVAILABLE => {
                Status::unavailable(format!("the provider answered {}: {}", code.as_u16(), message()))
            }
            // Cut off or failed inside: it may have run.
            _ => Status::internal(format!("the provider answered {}: {}", code.as_u16(), message())),
        }
    }

    /// The response's rate-limit headers; a limit that disagrees with the
    /// region file is told once per model (and kept for Admin).
    fn read_limits(&self, headers: &http::HeaderMap, model: &str) -> RateLimits {
        let limits = RateLimits::from_headers(headers);
        if limits.limit_tokens.is_none() && limits.limit_requests.is_none() {
            return limits;
        }
        let Some((_, tpm, rpm)) = self.inner.configured.iter().find(|(m, _, _)| m == model) else {
            return limits;
        };
        let differs = |said: Option<u64>, ours: u64| said.is_some_and(|s| s != ours);
        if differs(limits.limit_tokens, *tpm) || differs(limits.limit_requests, *rpm) {
            let mut seen = self.inner.disagreements.lock();
            if !seen.iter().any(|(m, _, _)| m == model) {
                seen.push((model.to_string(), limits.limit_tokens, limits.limit_requests));
                tracing::warn!(
                    region = %self.inner.region,
                    %model,
                    provider_tokens_per_minute = ?limits.limit_tokens,
                    provider_requests_per_minute = ?limits.limit_requests,
                    configured_tokens_per_minute = tpm,
                    configured_requests_per_minute = rpm,
                    "the provider's rate limits differ from the region file; the region file's are the ones routed on"
                );
            }
        }
        limits
    }

    /// GETs the health path with the key: 2xx passes (and, for OpenAI's
    /// `/v1/models`, every provider model must be listed); 401 / 403 / an
    /// unlisted model flag the region misconfigured.
    pub async fn probe(&self, timeout: Duration) -> ProbeOutcome {
        let mut request = http::Request::new(Full::new(Bytes::new()));
        *request.uri_mut() = self.inner.health.clone();
        self.authorize(request.headers_mut());
        let answer = tokio::time::timeout(timeout, async {
            let response = self
                .inner
                .client
                .request(request)
                .await
                .map_err(|e| error_chain(&e))?;
            let status = response.status();
            let body = Limited::new(response.into_body(), MAX_ANSWER_BYTES)
                .collect()
                .await
                .map_err(|e| e.to_string())?
                .to_bytes();
            Ok::<_, String>((status, body))
        })
        .await;
        let (status, body) = match answer {
            Err(_) => return ProbeOutcome::Failed("no answer within the timeout".into()),
            Ok(Err(e)) => return ProbeOutcome::Failed(e),
            Ok(Ok(x)) => x,
        };
        if matches!(status, StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN) {
            self.flag(
                Cause::Key,
                format!(
                    "the provider refused the API key ({}) on the health check; check api_key_env / api_key_file in the region file",
                    status.as_u16()
                ),
            );
            return ProbeOutcome::Misconfigured;
        }
        if !status.is_success() {
            return ProbeOutcome::Failed(format!(
                "GET {} answered {status}",
                self.inner.settings.health_path
            ));
        }
        if self.inner.settings.health_lists_models
            && let Some(missing) = self.unlisted_model(&body)
        {
            self.flag(
                Cause::Model,
                format!("the provider does not list the model {missing:?}; check provider_model in the region file"),
            );
            return ProbeOutcome::Misconfigured;
        }
        // The key works: a flag for the key is over. One for a model
        // stays until the region file changes.
        let mut m = self.inner.misconfigured.lock();
        match m.why {
            Some((Cause::Model, _)) => ProbeOutcome::Misconfigured,
            Some((Cause::Key, _)) => {
                *m = Misconfig::default();
                ProbeOutcome::Passed
            }
            None => ProbeOutcome::Passed,
        }
    }

    /// A provider model `/v1/models` does not list (a list it can read).
    fn unlisted_model(&self, body: &[u8]) -> Option<String> {
        let v: Value = serde_json::from_slice(body).ok()?;
        let data = v.get("data")?.as_array()?;
        let listed = |name: &str| {
            data.iter()
                .any(|m| m.get("id").and_then(Value::as_str) == Some(name))
        };
        self.inner
            .settings
            .models
            .iter()
            .find(|(_, p)| !listed(p))
            .map(|(_, p)| p.clone())
    }
}

/// The request as an AgentCluster would read it.
fn decode(call: &Call) -> Result<pb::ExecuteRequest, Status> {
    pb::ExecuteRequest::decode(call.message.slice(crate::grpc_unary::HEADER..))
        .map_err(|e| Status::internal(format!("decoding the request: {e}")))
}

/// The chat body sent: the caller's, with the provider's model, the output
/// bound (in `max_completion_tokens` when the caller used it, else
/// `max_tokens`, which every compatible server knows), and the streaming
/// fields.
pub fn chat_body(
    payload: &[u8],
    provider_model: &str,
    max_output_tokens: u64,
    stream: bool,
    dialect: Dialect,
) -> Result<Bytes, Status> {
    let mut body: Map<String, Value> = serde_json::from_slice(payload).map_err(|_| {
        Status::invalid_argument("payload: not an OpenAI chat-completions body (a JSON object)")
    })?;
    if dialect == Dialect::OpenAi {
        body.insert("model".into(), provider_model.into());
    }
    let bound = Value::from(max_output_tokens);
    if body.contains_key("max_completion_tokens") {
        body.insert("max_completion_tokens".into(), bound.clone());
        if body.contains_key("max_tokens") {
            body.insert("max_tokens".into(), bound);
        }
    } else {
        body.insert("max_tokens".into(), bound);
    }
    body.insert("stream".into(), stream.into());
    if stream {
        let options = body
            .entry("stream_options")
            .or_insert_with(|| Value::Object(Map::new()));
        if !options.is_object() {
            *options = Value::Object(Map::new());
        }
        options
            .as_object_mut()
            .map(|o| o.insert("include_usage".into(), true.into()));
    } else {
        // OpenAI refuses stream_options without stream.
        body.remove("stream_options");
    }
    serde_json::to_vec(&body)
        .map(Bytes::from)
        .map_err(|e| Status::internal(e.to_string()))
}

fn quota(limits: &RateLimits) -> Option<pb::ProviderQuota> {
    let h = limits.hint()?;
    let d = |d: Duration| prost_types::Duration::try_from(d).ok();
    Some(pb::ProviderQuota {
        remaining_tokens: h.remaining_tokens,
        remaining_requests: h.remaining_requests,
        reset_tokens: d(h.reset_tokens),
        reset_requests: d(h.reset_requests),
    })
}

/// An error and its causes ("client error (Connect): connection refused").
fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        out.push_str(": ");
        out.push_str(&s.to_string());
        source = s.source();
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn body(b: &Bytes) -> Value {
        serde_json::from_slice(b).unwrap()
    }

    #[test]
    fn the_dispatcher_sets_model_bound_and_streaming() {
        let payload = br#"{"model":"mine","messages":[{"role":"user","content":"hi"}],"max_tokens":9000,"stream_options":{"include_usage":false}}"#;
        let b = body(&chat_body(payload, "gpt-4o-2024", 50, true, Dialect::OpenAi).unwrap());
        assert_eq!(b["model"], "gpt-4o-2024");
        assert_eq!(b["max_tokens"], 50);
        assert!(b.get("max_completion_tokens").is_none());
        assert_eq!(b["stream"], true);
        assert_eq!(b["stream_options"]["include_usage"], true);
        let b = body(&chat_body(payload, "dep", 50, false, Dialect::Azure).unwrap());
        assert_eq!(b["model"], "mine", "Azure names the deployment in the path");
        assert_eq!(b["stream"], false);
        assert!(b.get("stream_options").is_none());
        let newer = br#"{"messages":[],"max_completion_tokens":9000}"#;
        let b = body(&chat_body(newer, "o1", 70, false, Dialect::OpenAi).unwrap());
        assert_eq!(b["max_completion_tokens"], 70);
        assert!(b.get("max_tokens").is_none());
        assert_eq!(
            chat_body(b"[1]", "m", 1, false, Dialect::OpenAi)
                .unwrap_err()
                .code(),
            Code::InvalidArgument
        );
    }

    #[test]
    fn usage_reads_cached_tokens() {
        let u: Value = serde_json::from_str(
            r#"{"prompt_tokens":10,"completion_tokens":5,"prompt_tokens_details":{"cached_tokens":4}}"#,
        )
        .unwrap();
        assert_eq!(
            usage_of(&u),
            pb::Usage {
                prompt_tokens: 10,
                completion_tokens: 5,
                cached_prompt_tokens: 4
            }
        );
    }
}
