//! The OpenAI-compatible front door (`[openai] listen`): code written
//! against an OpenAI SDK calls the dispatcher by changing its base URL.
//! An adapter in front of the same engine entry as gRPC's `Dispatch` and
//! `DispatchStream` (DESIGN §15): it maps OpenAI's HTTP API to a
//! `DispatchRequest` and the engine's answer or error back; tenants, keys,
//! limits, fair share, fallbacks, rollouts and the cache are the engine's.
//!
//! * `chat.rs`: `POST /v1/chat/completions`, streamed and not;
//! * `models.rs`: `GET /v1/models` (and one model);
//! * `request.rs`: a call's body and headers as a `DispatchRequest`;
//! * `reply.rs`, `sse.rs`: the answer as OpenAI's JSON or events;
//! * `errors.rs`: `DispatchError` as OpenAI's error and status.
//!
//! Served over HTTP/1.1 (what the SDKs speak) with the listener's guards:
//! connection slots (`server.max_connections`, per peer, untrusted ones
//! making room), request headers within `server.handshake_timeout` (an idle
//! keep-alive connection is closed after it too), the body within
//! `server.body_timeout` (408) and `limits.max_payload_bytes` (413),
//! headers at most 64 KiB (431).

mod chat;
mod errors;
mod models;
mod reply;
mod request;
mod sse;

use std::convert::Infallible;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::routing::{get, post};
use http::{Response, StatusCode};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tower_service::Service;

use crate::config::ConnectionLimits;
use crate::dispatch::Engine;
use crate::slots::Slot;
use errors::DoorError;

pub use reply::{ALIAS, ATTEMPTS, CACHED, MODEL, QUEUE_WAIT_MS, REGION, REQUEST_ID};

/// Request headers at most (the read buffer; beyond: 431).
const MAX_HEADER_BYTES: usize = 64 << 10;

/// What every request of the door shares.
pub struct Door {
    engine: Arc<Engine>,
    body_timeout: Duration,
    /// Names error answers the engine gave no request id (`x-request-id`).
    error_ids: AtomicU64,
    id_prefix: String,
}

/// A request's connection: its slot, trusted once a request names a tenant.
#[derive(Clone)]
struct Conn(Arc<Slot>);

impl Door {
    /// An error answer, logged at debug with the id it carries.
    fn error(&self, e: &DoorError) -> Response<Body> {
        let id = format!(
            "oai-{}-{}",
            self.id_prefix,
            self.error_ids.fetch_add(1, Ordering::Relaxed)
        );
        tracing::debug!(request_id = %id, status = e.status.as_u16(), error = %e.message, "openai front door error");
        e.response(&id)
    }
}

/// Counts an answer by endpoint and HTTP status: gRPC calls are counted by
/// tonic's routes and `dispatcher_requests_total`; this says which came
/// through the OpenAI door (the engine counts those there too).
fn observe(endpoint: &'static str, status: StatusCode) {
    if crate::metrics::enabled() {
        metrics::counter!(
            "dispatcher_openai_requests_total",
            "endpoint" => endpoint,
            "status" => status.as_str().to_string(),
        )
        .increment(1);
    }
}

fn routes(door: Arc<Door>) -> Router {
    let answer = |door: &Arc<Door>, e: DoorError| {
        let door = door.clone();
        move || {
            let (door, e) = (door.clone(), e.clone());
            async move { door.error(&e) }
        }
    };
    let unknown =
        DoorError::not_found("no such path: POST /v1/chat/completions and GET /v1/models are served");
    let method = DoorError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        "invalid_request_error",
        "method_not_allowed",
        "method not allowed on this path",
    );
    Router::new()
        .route("/v1/chat/completions", post(chat::completions))
        .route("/v1/models", get(models::list))
        .route("/v1/models/{id}", get(models::one))
        .fallback(answer(&door, unknown))
        .method_not_allowed_fallback(answer(&door, method))
        .with_state(door)
}

/// Serves the door on `listener` until `stop`; then closes each
/// connection once its request in progress has been answered.
pub async fn serve(
    listener: TcpListener,
    engine: Arc<Engine>,
    limits: ConnectionLimits,
    stop: CancellationToken,
) {
    let door = Arc::new(Door {
        engine,
        body_timeout: limits.body_timeout,
        error_ids: AtomicU64::new(1),
        id_prefix: format!("{:x}", crate::clock::unix_secs()),
    });
    let router = routes(door);
    let mut acceptor = crate::accept::Acceptor::new(
        listener,
        crate::slots::Limits {
            max: limits.max_connections,
            per_peer: limits.max_connections_per_peer,
        },
        "openai",
    );
    loop {
        let accepted = tokio::select! {
            _ = stop.cancelled() => return,
            accepted = acceptor.accept() => accepted,
        };
        let (router, stop) = (router.clone(), stop.clone());
        tokio::spawn(async move {
            let conn = Conn(Arc::new(accepted.slot));
            let slot = conn.0.clone();
            let service = hyper::service::service_fn(move |mut r: http::Request<hyper::body::Incoming>| {
                r.extensions_mut().insert(conn.clone());
                let mut router = router.clone();
                async move { Ok::<_, Infallible>(router.call(r).await.unwrap_or_else(|e| match e {})) }
            });
            let served = hyper::server::conn::http1::Builder::new()
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(limits.handshake_timeout)
                .max_buf_size(MAX_HEADER_BYTES)
                .serve_connection(hyper_util::rt::TokioIo::new(accepted.stream), service);
            tokio::pin!(served);
            tokio::select! {
                served = served.as_mut() => {
                    // Headers that did not arrive within the timeout (an
                    // idle keep-alive connection ends the same way).
                    if served.is_err_and(|e| e.is_timeout()) {
                        slot.closed("handshake_timeout");
                    }
                }
                _ = slot.evicted() => {}
                _ = stop.cancelled() => {
                    served.as_mut().graceful_shutdown();
                    let _ = served.await;
                }
            }
        });
    }
}
