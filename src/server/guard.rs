//! Every request on a dispatcher connection passes here before tonic's
//! routes (the gRPC-over-HTTP/2 rules tonic leaves to the server):
//!
//! * a `content-type` other than `application/grpc` (or
//!   `application/grpc+…`) is answered HTTP 415, as the spec says, so a
//!   client that is not speaking gRPC does not read an answer as success;
//! * the request's body must arrive in full within `server.body_timeout`,
//!   else the request ends DEADLINE_EXCEEDED, and a connection that has not
//!   authenticated is closed, freeing its slot (a caller that sends HEADERS
//!   and nothing more held its connection for ever);
//! * the caller's `grpc-timeout` ends the request DEADLINE_EXCEEDED when it
//!   passes, body or not (tonic's own timer said CANCELLED);
//! * the connection becomes trusted (`slots`) once a request on it whose
//!   credential authenticates has arrived in full;
//! * the request counts as in progress (`activity`) until its response
//!   ends, and carries the connection's address and client certificate.

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, HeaderValue, StatusCode};
use tokio::time::Sleep;
use tonic::Status;
use tonic::body::Body;

use super::activity::Busy;
use super::conn_info::{Authenticates, ConnInfo};
use super::unary_dispatch::{self, UnaryDispatch};
use crate::dispatch::Caller;
use crate::slots::Slot;

/// Reflection is a stream the client keeps open while it works (grpcurl
/// holds it for the whole call): its body never ends, by design.
const REFLECTION: &str = "/grpc.reflection.";

type Response = http::Response<Body>;

/// The service hyper calls for each request of one connection.
#[derive(Clone)]
pub struct Guard {
    routes: tonic::service::Routes,
    dispatch: Option<Arc<UnaryDispatch>>,
    conn: Arc<ConnInfo>,
    body_timeout: Duration,
    authenticates: Authenticates,
}

impl Guard {
    pub fn new(
        routes: tonic::service::Routes,
        dispatch: Option<Arc<UnaryDispatch>>,
        conn: Arc<ConnInfo>,
        body_timeout: Duration,
        authenticates: Authenticates,
    ) -> Self {
        Self {
            routes,
            dispatch,
            conn,
            body_timeout,
            authenticates,
        }
    }

    /// The connection's slot, when this request could earn it trust: the
    /// connection has none yet and the request's credential authenticates.
    fn may_trust(&self, headers: &HeaderMap) -> Option<Arc<Slot>> {
        if self.conn.slot.is_trusted() {
            return None;
        }
        let caller = Caller {
            authorization: headers
                .get(http::header::AUTHORIZATION)
                .map(|v| v.to_str().unwrap_or("invalid").to_string()),
            identity: self.conn.identity.clone().unwrap_or_default(),
            submitted_as: None,
        };
        (self.authenticates)(&caller).then(|| self.conn.slot.clone())
    }
}

impl tower_service::Service<http::Request<hyper::body::Incoming>> for Guard {
    type Response = Response;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Response, Infallible>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        tower_service::Service::<http::Request<Body>>::poll_ready(&mut self.routes, cx)
    }

    fn call(&mut self, request: http::Request<hyper::body::Incoming>) -> Self::Future {
        let content_type = request.headers().get(http::header::CONTENT_TYPE);
        if !is_grpc(content_type) {
            return Box::pin(std::future::ready(Ok(unsupported_media_type(content_type))));
        }
        let (mut parts, body) = request.into_parts();
        let busy = self.conn.activity.begin();
        let now = crate::clock::tokio_now();
        let callers_deadline = crate::grpc::grpc_timeout_header(&parts.headers).map(|t| now + t);
        let trust = self.may_trust(&parts.headers);
        let timed = |inner, callers_deadline| TimedBody {
            inner,
            timer: None,
            body_deadline: now + self.body_timeout,
            callers_deadline,
            limit: self.body_timeout,
            trust,
            conn: self.conn.clone(),
            complete: false,
            tell: None,
            expired: false,
        };
        if let Some(dispatch) = self
            .dispatch
            .as_ref()
            .filter(|_| parts.uri.path() == unary_dispatch::PATH)
        {
            // The engine keeps the caller's deadline from here on; until the
            // body is in, the body's own timer does (one timer, not two).
            let dispatch = dispatch.clone();
            let body = timed(body, callers_deadline);
            let identity = self.conn.identity.clone();
            return Box::pin(async move { Ok(dispatch.serve(parts, body, identity, busy).await) });
        }
        // So `Request::remote_addr()` works as with tonic's own server.
        parts.extensions.insert(self.conn.tcp.clone());
        // Who the client certificate says the caller is (for auth).
        if let Some(identity) = &self.conn.identity {
            parts.extensions.insert(identity.clone());
        }
        let arrived = Arc::new(AtomicBool::new(false));
        let body = if parts.uri.path().starts_with(REFLECTION) {
            Body::new(body)
        } else {
            let mut timed = timed(body, None);
            timed.tell = Some(arrived.clone());
            Body::new(timed)
        };
        let call = tower_service::Service::call(&mut self.routes, http::Request::from_parts(parts, body));
        Box::pin(respond(call, callers_deadline, arrived, busy))
    }
}

/// The answer to `call`, or DEADLINE_EXCEEDED when the caller's deadline
/// passes first; the request counts as in progress until its body ends.
async fn respond(
    call: impl Future<Output = Result<Response, Infallible>>,
    deadline: Option<tokio::time::Instant>,
    arrived: Arc<AtomicBool>,
    busy: Busy,
) -> Result<Response, Infallible> {
    let response = match deadline {
        None => call.await?,
        Some(at) => match tokio::time::timeout_at(at, call).await {
            Ok(response) => response?,
            Err(_) => deadline_passed(arrived.load(Ordering::Relaxed)).into_http(),
        },
    };
    Ok(response.map(|body| Body::new(Tracked { body, _busy: busy })))
}

/// gRPC over HTTP/2: `application/grpc`, optionally followed by `+format`
/// (`+proto`) or parameters, in any case.
fn is_grpc(content_type: Option<&HeaderValue>) -> bool {
    const GRPC: &[u8] = b"application/grpc";
    let Some(v) = content_type.map(HeaderValue::as_bytes) else {
        return false;
    };
    v.len() >= GRPC.len()
        && v[..GRPC.len()].eq_ignore_ascii_case(GRPC)
        && matches!(v.get(GRPC.len()), None | Some(b'+' | b';'))
}

/// HTTP 415, with a gRPC status too for a gRPC client that sent a wrong type.
fn unsupported_media_type(content_type: Option<&HeaderValue>) -> Response {
    let sent = match content_type {
        None => "no content-type".to_string(),
        Some(v) => format!(
            "content-type {}",
            crate::excerpt::excerpt(&String::from_utf8_lossy(v.as_bytes()))
        ),
    };
    let mut response = Status::invalid_argument(format!(
        "{sent}: gRPC requests are sent as application/grpc (or application/grpc+proto)"
    ))
    .into_http();
    *response.status_mut() = StatusCode::UNSUPPORTED_MEDIA_TYPE;
    response
}

fn deadline_passed(body_arrived: bool) -> Status {
    Status::deadline_exceeded(if body_arrived {
        "the caller's deadline (grpc-timeout) passed before the answer"
    } else {
        "the caller's deadline (grpc-timeout) passed before the request's body arrived"
    })
}

/// A request body that must arrive in full within the body timeout (and,
/// when it carries it, the caller's deadline).
pub struct TimedBody {
    inner: hyper::body::Incoming,
    /// Made only if the body is not all there when first read.
    timer: Option<Pin<Box<Sleep>>>,
    body_deadline: tokio::time::Instant,
    callers_deadline: Option<tokio::time::Instant>,
    limit: Duration,
    /// Trusted once the body has arrived (its credential authenticated).
    trust: Option<Arc<Slot>>,
    conn: Arc<ConnInfo>,
    complete: bool,
    /// Told when the body has arrived (for the answer at the caller's
    /// deadline, when the guard keeps it).
    tell: Option<Arc<AtomicBool>>,
    expired: bool,
}

impl TimedBody {
    fn arrived(&mut self) {
        self.complete = true;
        if let Some(tell) = &self.tell {
            tell.store(true, Ordering::Relaxed);
        }
        if let Some(slot) = self.trust.take() {
            slot.trust();
        }
    }

    /// The timer's end, and whether it is the caller's deadline.
    fn ends(&self) -> (tokio::time::Instant, bool) {
        match self.callers_deadline {
            Some(at) if at < self.body_deadline => (at, true),
            _ => (self.body_deadline, false),
        }
    }
}

impl http_body::Body for TimedBody {
    type Data = Bytes;
    type Error = Status;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Bytes>, Status>>> {
        let this = self.get_mut();
        if this.expired {
            return Poll::Ready(None);
        }
        match Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Ready(None) => {
                this.arrived();
                Poll::Ready(None)
            }
            Poll::Ready(Some(Ok(frame))) => {
                if this.inner.is_end_stream() {
                    this.arrived();
                }
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(Some(Err(e))) => Poll::Ready(Some(Err(Status::from_error(Box::new(e))))),
            Poll::Pending if this.complete => Poll::Pending,
            Poll::Pending => {
                let (at, callers) = this.ends();
                let timer = this
                    .timer
                    .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(at)));
                std::task::ready!(timer.as_mut().poll(cx));
                this.expired = true;
                if callers {
                    return Poll::Ready(Some(Err(deadline_passed(false))));
                }
                if !this.conn.slot.is_trusted() {
                    // It authenticated nothing and stalls: free its slot.
                    this.conn.slot.closed("body_timeout");
                    this.conn.close.cancel();
                }
                Poll::Ready(Some(Err(Status::deadline_exceeded(format!(
                    "the request's body did not arrive in full within server.body_timeout ({})",
                    humantime::format_duration(this.limit)
                )))))
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.expired || self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

/// A response body that keeps its request counted until it is done.
struct Tracked {
    body: Body,
    _busy: Busy,
}

impl http_body::Body for Tracked {
    type Data = Bytes;
    type Error = Status;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Bytes>, Self::Error>>> {
        Pin::new(&mut self.body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.body.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ct(v: &str) -> bool {
        is_grpc(Some(&HeaderValue::from_str(v).unwrap()))
    }

    #[test]
    fn only_grpc_content_types_pass() {
        assert!(ct("application/grpc"));
        assert!(ct("application/grpc+proto"));
        assert!(ct("Application/GRPC+json"));
        assert!(ct("application/grpc; charset=utf-8"));
        assert!(!ct("application/json"));
        assert!(!ct("application/grpc-web"));
        assert!(!ct("application/grpcx"));
        assert!(!ct("text/plain"));
        assert!(!is_grpc(None));
    }

    #[test]
    fn a_refusal_is_http_415_with_a_bounded_grpc_status() {
        let long = "x".repeat(10_000);
        let r = unsupported_media_type(Some(&HeaderValue::from_str(&long).unwrap()));
        assert_eq!(r.status(), StatusCode::UNSUPPORTED_MEDIA_TYPE);
        assert_eq!(r.headers()["grpc-status"], "3");
        assert!(r.headers()["grpc-message"].len() < 300);
        let r = unsupported_media_type(None);
        assert!(
            r.headers()["grpc-message"]
                .to_str()
                .unwrap()
                .contains("no%20content-type")
        );
    }
}
