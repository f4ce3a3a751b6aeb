//! An OpenAI chat-completions call as a `DispatchRequest`: the body is the
//! payload, `model` the model, `max_completion_tokens` / `max_tokens` the
//! output bound, the prompt estimated from the messages
//! (`openai::chat`); `metadata` (and `user`) become labels, so a rollout's
//! `session_label` can keep a conversation on one target. The headers
//! give the credential, the deadline (`x-stainless-timeout`, or the read
//! timeout newer SDKs send) and the cache options. The body is read
//! within a time and size limit.

use std::collections::HashMap;
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, StatusCode};
use http_body_util::{BodyExt, LengthLimitError, Limited};
use serde_json::Value;

use super::errors::DoorError;
use crate::dispatch::Caller;
use crate::openai::chat;
use crate::pb;

/// The SDK's timeout for the call, in seconds (`600`, `12.5`).
pub const STAINLESS_TIMEOUT: &str = "x-stainless-timeout";
pub const STAINLESS_READ_TIMEOUT: &str = "x-stainless-read-timeout";
/// Opt in to the response cache (docs/CACHE.md): how long a reply may be
/// served (`300s`, `10m`), what else must match, and skip the lookup.
pub const CACHE_TTL: &str = "x-dispatcher-cache-ttl";
pub const CACHE_SCOPE: &str = "x-dispatcher-cache-scope";
pub const CACHE_REFRESH: &str = "x-dispatcher-cache-refresh";

/// A deadline longer than this is taken as this.
const MAX_TIMEOUT: Duration = Duration::from_secs(86_400);

/// What a chat call asks for.
#[derive(Debug)]
pub struct ChatCall {
    pub request: pb::DispatchRequest,
    pub stream: bool,
    pub include_usage: bool,
    pub max_output: Option<u64>,
}

/// The caller's credential (`Authorization: Bearer KEY`, as on gRPC).
pub fn caller(headers: &HeaderMap) -> Caller {
    Caller {
        authorization: headers.get(http::header::AUTHORIZATION).map(|v| {
            v.to_str()
                .map(str::to_string)
                .unwrap_or_else(|_| "invalid".into())
        }),
        ..Caller::default()
    }
}

fn text<'a>(headers: &'a HeaderMap, name: &'static str) -> Result<Option<&'a str>, DoorError> {
    headers
        .get(name)
        .map(|v| {
            v.to_str()
                .map(str::trim)
                .map_err(|_| DoorError::bad_request("", format!("header {name} is not text")))
        })
        .transpose()
}

/// The caller's deadline, from the SDK's timeout header (`None`: the
/// configured `server.default_timeout`).
pub fn timeout(headers: &HeaderMap) -> Result<Option<Duration>, DoorError> {
    let (name, value) = match text(headers, STAINLESS_TIMEOUT)? {
        Some(v) => (STAINLESS_TIMEOUT, v),
        None => match text(headers, STAINLESS_READ_TIMEOUT)? {
            Some(v) => (STAINLESS_READ_TIMEOUT, v),
            None => return Ok(None),
        },
    };
    match value.parse::<f64>() {
        Ok(s) if s.is_finite() && s > 0.0 => {
            Ok(Some(Duration::from_secs_f64(s.min(MAX_TIMEOUT.as_secs_f64()))))
        }
        _ => Err(DoorError::bad_request(
            "",
            format!(
                "header {name} must be a positive number of seconds, not {}",
                crate::excerpt::excerpt(value)
            ),
        )),
    }
}

/// Reads the body: at most `limit` bytes (413 beyond, never buffered
/// past it), in full within `within` (408 otherwise, as the gRPC side's
/// `server.body_timeout`).
pub async fn read_body<B>(
    body: B,
    headers: &HeaderMap,
    limit: usize,
    within: Duration,
) -> Result<Bytes, DoorError>
where
    B: http_body::Body<Data = Bytes>,
    B::Error: std::error::Error + Send + Sync + 'static,
{
    let too_large = || {
        DoorError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "invalid_request_error",
            "request_too_large",
            format!("the request body is larger than {limit} bytes (limits.max_payload_bytes)"),
        )
    };
    let declared = headers
        .get(http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok()?.parse::<u64>().ok());
    if declared.is_some_and(|n| n > limit as u64) {
        return Err(too_large());
    }
    match tokio::time::timeout(within, Limited::new(body, limit).collect()).await {
        Err(_) => Err(DoorError::new(
            StatusCode::REQUEST_TIMEOUT,
            "invalid_request_error",
            "timeout",
            "the request body did not arrive in full within server.body_timeout",
        )),
        Ok(Err(e)) if e.downcast_ref::<LengthLimitError>().is_some() => Err(too_large()),
        Ok(Err(_)) => Err(DoorError::bad_request("", "the request body could not be read")),
        Ok(Ok(collected)) => Ok(collected.to_bytes()),
    }
}

/// The labels a body's `metadata` (strings) and `user` give.
fn labels(body: &serde_json::Map<String, Value>) -> Result<HashMap<String, String>, DoorError> {
    let mut labels = HashMap::new();
    match body.get("metadata") {
        None | Some(Value::Null) => {}
        Some(Value::Object(m)) => {
            for (k, v) in m {
                let Value::String(v) = v else {
                    return Err(DoorError::bad_request(
                        "metadata",
                        "metadata values must be strings",
                    ));
                };
                labels.insert(k.clone(), v.clone());
            }
        }
        Some(_) => return Err(DoorError::bad_request("metadata", "metadata must be an object")),
    }
    if let Some(Value::String(user)) = body.get("user") {
        labels.entry("user".to_string()).or_insert_with(|| user.clone());
    }
    Ok(labels)
}

fn cache(headers: &HeaderMap) -> Result<Option<pb::CacheOptions>, DoorError> {
    let Some(ttl) = text(headers, CACHE_TTL)? else {
        return Ok(None);
    };
    let ttl = humantime::parse_duration(ttl).map_err(|_| {
        DoorError::bad_request(
            "",
            format!(
                "header {CACHE_TTL} must be a duration like \"300s\", not {}",
                crate::excerpt::excerpt(ttl)
            ),
        )
    })?;
    Ok(Some(pb::CacheOptions {
        ttl: prost_types::Duration::try_from(ttl).ok(),
        scope: text(headers, CACHE_SCOPE)?.unwrap_or_default().to_string(),
        refresh: text(headers, CACHE_REFRESH)? == Some("true"),
        accept_fallback: false,
    }))
}

/// The call a body and its headers make.
pub fn chat_call(body: Bytes, headers: &HeaderMap) -> Result<ChatCall, DoorError> {
    // `chat` names the field by its path (`messages[2].content`), never
    // by the body's own text.
    let parsed = chat::parse(&body).map_err(|bad| {
        let param = if bad.field == "body" {
            ""
        } else {
            bad.field.as_str()
        };
        DoorError::bad_request(param, bad.to_string())
    })?;
    let Some(model) = parsed.model.clone() else {
        return Err(DoorError::bad_request("model", "model: required"));
    };
    Ok(ChatCall {
        stream: parsed.stream,
        include_usage: parsed.include_usage,
        max_output: parsed.max_output_tokens,
        request: pb::DispatchRequest {
            model,
            labels: labels(&parsed.body)?,
            payload: body,
            prompt_tokens: parsed.prompt_tokens,
            max_output_tokens: parsed.max_output_tokens.unwrap_or(0),
            cache: cache(headers)?,
            ..Default::default()
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.insert(*k, v.parse().unwrap());
        }
        h
    }

    const BODY: &str = r#"{"model":"gpt-4o","messages":[{"role":"user","content":"Hello there, how are you?"}],"max_tokens":50}"#;

    #[test]
    fn a_body_becomes_a_dispatch() {
        let call = chat_call(Bytes::from(BODY), &HeaderMap::new()).unwrap();
        assert_eq!(call.request.model, "gpt-4o");
        assert_eq!(call.request.max_output_tokens, 50);
        assert_eq!(call.request.prompt_tokens, 3 + 4 + 8);
        assert_eq!(
            call.request.payload,
            BODY.as_bytes(),
            "the body is the payload, unchanged"
        );
        assert!(!call.stream && call.request.cache.is_none());
        let with = r#"{"model":"m","messages":[{"role":"user","content":"x"}],"user":"u-1","metadata":{"session":"s-9"}}"#;
        let call = chat_call(Bytes::from(with), &headers(&[(CACHE_TTL, "300s")])).unwrap();
        assert_eq!(call.request.labels["user"], "u-1");
        assert_eq!(call.request.labels["session"], "s-9");
        assert_eq!(call.request.max_output_tokens, 0, "the model's default");
        assert_eq!(call.request.cache.unwrap().ttl.unwrap().seconds, 300);
    }

    #[test]
    fn a_bad_body_is_400_naming_its_field() {
        let param = |b: &str| {
            chat_call(Bytes::from(b.to_string()), &HeaderMap::new())
                .unwrap_err()
                .param
        };
        assert_eq!(param("{"), None);
        assert_eq!(param(r#"{"model":"m"}"#), Some("messages".into()));
        assert_eq!(param(r#"{"messages":[{"role":"user"}]}"#), Some("model".into()));
        assert_eq!(
            param(r#"{"model":"m","messages":[{"role":"user"}],"max_tokens":-1}"#),
            Some("max_tokens".into())
        );
        assert_eq!(
            param(r#"{"model":"m","messages":[{"role":"user"}],"metadata":{"a":1}}"#),
            Some("metadata".into())
        );
        let e = chat_call(Bytes::from(BODY), &headers(&[(CACHE_TTL, "soon")])).unwrap_err();
        assert_eq!(e.status, 400);
    }

    #[test]
    fn the_sdks_timeout_is_the_deadline() {
        assert_eq!(timeout(&HeaderMap::new()).unwrap(), None);
        assert_eq!(
            timeout(&headers(&[(STAINLESS_TIMEOUT, "12.5")])).unwrap(),
            Some(Duration::from_millis(12_500))
        );
        assert_eq!(
            timeout(&headers(&[(STAINLESS_READ_TIMEOUT, "600")])).unwrap(),
            Some(Duration::from_secs(600))
        );
        assert_eq!(
            timeout(&headers(&[(STAINLESS_TIMEOUT, "1e12")])).unwrap(),
            Some(MAX_TIMEOUT)
        );
        for bad in ["0", "-1", "NaN", "soon"] {
            let e = timeout(&headers(&[(STAINLESS_TIMEOUT, bad)])).unwrap_err();
            assert!(e.message.contains(STAINLESS_TIMEOUT), "{bad}: {}", e.message);
        }
    }

    #[tokio::test]
    async fn a_body_over_the_limit_is_413_and_a_slow_one_408() {
        let body = http_body_util::Full::new(Bytes::from(vec![b'x'; 2000]));
        let e = read_body(body, &HeaderMap::new(), 1000, Duration::from_secs(5))
            .await
            .unwrap_err();
        assert_eq!(e.status, 413);
        let declared = headers(&[("content-length", "5000")]);
        let e = read_body(
            http_body_util::Empty::<Bytes>::new(),
            &declared,
            1000,
            Duration::from_secs(5),
        )
        .await
        .unwrap_err();
        assert_eq!(e.status, 413, "refused from its declared length, unread");
        let ok = read_body(
            http_body_util::Full::new(Bytes::from("abc")),
            &HeaderMap::new(),
            1000,
            Duration::from_secs(5),
        )
        .await
        .unwrap();
        assert_eq!(ok, "abc");
    }

    #[tokio::test(start_paused = true)]
    async fn a_body_that_never_ends_is_408() {
        let (_tx, body) = {
            let (tx, rx) = tokio::sync::mpsc::channel::<Result<http_body::Frame<Bytes>, std::io::Error>>(1);
            (
                tx,
                http_body_util::StreamBody::new(tokio_stream::wrappers::ReceiverStream::new(rx)),
            )
        };
        let e = read_body(body, &HeaderMap::new(), 1000, Duration::from_secs(5))
            .await
            .unwrap_err();
        assert_eq!(e.status, 408);
    }
}
