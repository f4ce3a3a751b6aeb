//! Errors as OpenAI's API answers them: `{"error": {"message", "type",
//! "param", "code"}}` with the HTTP status an OpenAI SDK acts on (400
//! `BadRequestError`, 401 `AuthenticationError`, 403
//! `PermissionDeniedError`, 404 `NotFoundError`, 413, 429
//! `RateLimitError` retried after `retry-after-ms`, 5xx retried). One
//! mapping from the engine's `DispatchError`, as `server::status` is for
//! gRPC; messages are the engine's (bounded, input quoted only as an
//! excerpt), cut again to `openai::error::MAX_MESSAGE_BYTES`.

use std::time::Duration;

use axum::body::Body;
use http::{HeaderValue, Response, StatusCode, header};

use crate::core::RouteError;
use crate::dispatch::DispatchError;
use crate::openai::error;
use crate::openai::rate_limit::RateLimits;

/// The retry hint when the engine knows no refill time (as gRPC's
/// `RetryInfo` default in `server::status`).
const DEFAULT_RETRY: Duration = Duration::from_millis(100);

/// An error answer, before it is written.
#[derive(Debug, Clone, PartialEq)]
pub struct DoorError {
    pub status: StatusCode,
    /// OpenAI's `error.type`.
    pub kind: &'static str,
    pub code: Option<&'static str>,
    pub param: Option<String>,
    pub message: String,
    /// 429: `retry-after-ms` and `retry-after`.
    pub retry_after: Option<Duration>,
}

impl DoorError {
    pub fn new(
        status: StatusCode,
        kind: &'static str,
        code: &'static str,
        message: impl Into<String>,
    ) -> Self {
        Self {
            status,
            kind,
            code: Some(code),
            param: None,
            message: message.into(),
            retry_after: None,
        }
    }

    /// The body field at fault (none when empty).
    pub fn param(mut self, param: &str) -> Self {
        self.param = (!param.is_empty()).then(|| param.to_string());
        self
    }

    pub fn bad_request(param: &str, message: impl Into<String>) -> Self {
        Self::new(
            StatusCode::BAD_REQUEST,
            "invalid_request_error",
            "invalid_request",
            message,
        )
        .param(param)
    }

    pub fn not_found(message: impl Into<String>) -> Self {
        Self::new(
            StatusCode::NOT_FOUND,
            "invalid_request_error",
            "not_found",
            message,
        )
    }

    /// `model` names no configured model or alias.
    pub fn unknown_model(model: &str) -> Self {
        Self::new(
            StatusCode::NOT_FOUND,
            "invalid_request_error",
            "model_not_found",
            format!(
                "The model {} does not exist or you do not have access to it.",
                crate::excerpt::excerpt(model)
            ),
        )
        .param("model")
    }

    /// The engine's error. `known_model` says whether the request's model
    /// is configured: an "unknown model" is a 404 here, not a 400.
    pub fn from_dispatch(e: &DispatchError, model: &str, known_model: bool) -> Self {
        use StatusCode as S;
        let message = e.to_string();
        let too_many = |code| Self {
            retry_after: Some(e.retry_after().unwrap_or(DEFAULT_RETRY)),
            ..Self::new(S::TOO_MANY_REQUESTS, "rate_limit_error", code, message.clone())
        };
        match e {
            DispatchError::InvalidArgument(v) if !known_model && v.iter().any(|v| v.field == "model") => {
                Self::unknown_model(model)
            }
            DispatchError::Route(RouteError::UnknownModel { .. }) => Self::unknown_model(model),
            DispatchError::InvalidArgument(v) => {
                let param = v.first().and_then(|v| openai_param(v.field)).unwrap_or("");
                Self::bad_request(param, message)
            }
            DispatchError::Route(RouteError::TooLarge { .. }) => Self::new(
                S::BAD_REQUEST,
                "invalid_request_error",
                "context_length_exceeded",
                message,
            )
            .param("max_tokens"),
            DispatchError::Unauthenticated(_) => Self::new(
                S::UNAUTHORIZED,
                "invalid_request_error",
                "invalid_api_key",
                message,
            ),
            DispatchError::PermissionDenied(_) => {
                Self::new(S::FORBIDDEN, "permission_error", "permission_denied", message)
            }
            DispatchError::TenantLimit { limit, .. } if limit.contains("budget") => {
                too_many("insufficient_quota")
            }
            DispatchError::TenantLimit { .. }
            | DispatchError::Route(RouteError::NoCapacity { .. } | RouteError::Shed { .. })
            | DispatchError::QueueTimeout { .. }
            | DispatchError::WouldWaitInVain { .. }
            | DispatchError::QueueFull { .. }
            | DispatchError::ProvidersRefused { .. }
            | DispatchError::IdempotencyFull { .. } => too_many("rate_limit_exceeded"),
            DispatchError::DeadlineExceeded(_) => {
                Self::new(S::GATEWAY_TIMEOUT, "timeout", "timeout", message)
            }
            DispatchError::Upstream { code, .. } => match code {
                tonic::Code::InvalidArgument | tonic::Code::OutOfRange => Self::new(
                    S::BAD_REQUEST,
                    "invalid_request_error",
                    "invalid_request",
                    message,
                ),
                _ => Self::new(S::SERVICE_UNAVAILABLE, "server_error", "upstream_failed", message),
            },
            DispatchError::Route(RouteError::Unavailable { .. })
            | DispatchError::AttemptsExhausted { .. }
            | DispatchError::ShuttingDown => Self::new(
                S::SERVICE_UNAVAILABLE,
                "server_error",
                "service_unavailable",
                message,
            ),
            DispatchError::Internal(_) => Self::new(
                S::INTERNAL_SERVER_ERROR,
                "server_error",
                "internal_error",
                message,
            ),
        }
    }

    /// The body, as JSON bytes (also a stream's error event).
    pub fn body(&self) -> Vec<u8> {
        error::body(&self.message, self.kind, self.code, self.param.as_deref())
    }

    /// The whole answer, with `x-request-id` when one is known.
    pub fn response(&self, request_id: &str) -> Response<Body> {
        let mut r = Response::new(Body::from(self.body()));
        *r.status_mut() = self.status;
        let h = r.headers_mut();
        h.insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
        if let Ok(v) = HeaderValue::from_str(request_id) {
            h.insert("x-request-id", v);
        }
        RateLimits {
            retry_after: self.retry_after,
            ..RateLimits::default()
        }
        .to_headers(h);
        r
    }
}

/// The body field an engine field stands for (`None`: the body itself).
fn openai_param(field: &str) -> Option<&'static str> {
    match field {
        "model" => Some("model"),
        "max_output_tokens" => Some("max_tokens"),
        "prompt_tokens" => Some("messages"),
        "labels" => Some("metadata"),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dispatch::Violation;

    fn status(e: DispatchError) -> (u16, Option<&'static str>) {
        let d = DoorError::from_dispatch(&e, "gpt-4o", true);
        (d.status.as_u16(), d.code)
    }

    #[test]
    fn each_error_gets_the_status_an_sdk_acts_on() {
        let d = Duration::from_millis(1500);
        let route = DispatchError::Route;
        assert_eq!(
            status(DispatchError::Unauthenticated("unknown API key".into())),
            (401, Some("invalid_api_key"))
        );
        assert_eq!(status(DispatchError::PermissionDenied("x".into())).0, 403);
        assert_eq!(
            status(route(RouteError::UnknownModel {
                model: "m".into(),
                known: "k".into()
            })),
            (404, Some("model_not_found"))
        );
        assert_eq!(
            status(route(RouteError::TooLarge {
                model: "m".into(),
                need: 2,
                largest: 1
            })),
            (400, Some("context_length_exceeded"))
        );
        for e in [
            DispatchError::TenantLimit {
                tenant: "t".into(),
                limit: "requests_per_second",
                message: "m".into(),
                retry_after: Some(d),
            },
            route(RouteError::NoCapacity {
                retry_after: Some(d),
                summary: "s".into(),
            }),
            DispatchError::QueueFull {
                queued: 1,
                retry_after: d,
            },
            DispatchError::ProvidersRefused {
                attempts: 2,
                retry_after: d,
                last: "l".into(),
            },
        ] {
            let door = DoorError::from_dispatch(&e, "gpt-4o", true);
            assert_eq!(door.status, StatusCode::TOO_MANY_REQUESTS, "{e:?}");
            assert_eq!(door.retry_after, Some(d), "{e:?}");
            let r = door.response("req-1");
            assert_eq!(r.headers()["retry-after-ms"], "1500");
            assert_eq!(r.headers()["retry-after"], "2");
        }
        let budget = DispatchError::TenantLimit {
            tenant: "t".into(),
            limit: "daily_token_budget",
            message: "m".into(),
            retry_after: None,
        };
        let door = DoorError::from_dispatch(&budget, "gpt-4o", true);
        assert_eq!(
            (door.status.as_u16(), door.code),
            (429, Some("insufficient_quota"))
        );
        assert_eq!(
            door.retry_after,
            Some(DEFAULT_RETRY),
            "a hint even when none is known"
        );
        assert_eq!(status(DispatchError::DeadlineExceeded("x".into())).0, 504);
        assert_eq!(status(DispatchError::ShuttingDown).0, 503);
        assert_eq!(
            status(DispatchError::AttemptsExhausted {
                attempts: 3,
                last: "l".into()
            })
            .0,
            503
        );
        assert_eq!(
            status(DispatchError::Upstream {
                region: "r".into(),
                code: tonic::Code::FailedPrecondition,
                message: "m".into()
            })
            .0,
            503
        );
        assert_eq!(
            status(DispatchError::Upstream {
                region: "r".into(),
                code: tonic::Code::InvalidArgument,
                message: "m".into()
            })
            .0,
            400
        );
        assert_eq!(status(DispatchError::Internal("x".into())).0, 500);
    }

    #[test]
    fn an_unknown_model_is_404_and_a_bad_field_400_naming_it() {
        let e = DispatchError::InvalidArgument(vec![Violation::new("model", "unknown model \"gpt-9\"")]);
        let door = DoorError::from_dispatch(&e, "gpt-9", false);
        assert_eq!(
            (door.status.as_u16(), door.param.as_deref()),
            (404, Some("model"))
        );
        let e = DispatchError::InvalidArgument(vec![Violation::new("max_output_tokens", "too many")]);
        let door = DoorError::from_dispatch(&e, "gpt-4o", true);
        assert_eq!(
            (door.status.as_u16(), door.param.as_deref()),
            (400, Some("max_tokens"))
        );
        let e = DispatchError::InvalidArgument(vec![Violation::new("payload", "too large")]);
        assert_eq!(DoorError::from_dispatch(&e, "gpt-4o", true).param, None);
    }

    #[test]
    fn the_body_is_openais_shape_and_bounded() {
        let long = "x".repeat(10_000);
        let door = DoorError::bad_request("messages", long);
        let body: serde_json::Value = serde_json::from_slice(&door.body()).unwrap();
        let e = &body["error"];
        assert_eq!(e["type"], "invalid_request_error");
        assert_eq!(e["param"], "messages");
        assert_eq!(e["code"], "invalid_request");
        assert!(e["message"].as_str().unwrap().len() <= error::MAX_MESSAGE_BYTES);
        let r = door.response("req-7");
        assert_eq!(r.status(), 400);
        assert_eq!(r.headers()["x-request-id"], "req-7");
        assert!(r.headers().get("retry-after-ms").is_none());
    }
}
