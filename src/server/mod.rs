//! The dispatcher's gRPC server: `Dispatcher`, health and reflection.
//! Services convert between wire types and the engine; nothing else.

mod admin;
mod admin_policy;
mod dispatcher;
mod idle;
mod status;

use std::future::Future;
use std::sync::Arc;

use tonic_health::server::HealthReporter;

pub use crate::accept::{Accepted, Acceptor};
pub use admin::{AdminService, ReloadHandle, admin_guard};
pub use dispatcher::DispatcherService;
pub use status::to_status;

use crate::config::ConnectionLimits;
use crate::dispatch::Engine;
use crate::pb::admin_server::AdminServer;
use crate::pb::dispatcher_server::DispatcherServer;

/// Concurrent requests one HTTP/2 connection may have open.
const MAX_STREAMS_PER_CONNECTION: u32 = 1024;
/// Metadata (headers) of one request, at most.
const MAX_HEADER_LIST_BYTES: u32 = 64 << 10;

/// Headroom for the rest of a request message (labels, ids, names).
const MESSAGE_OVERHEAD: usize = 64 << 10;

/// The largest request message the transport decodes: twice the payload
/// limit plus `MESSAGE_OVERHEAD` (as the README says), so a payload well
/// over its limit still reaches the validator and gets INVALID_ARGUMENT with
/// a BadRequest naming the field and the limit, like any other field. Only
/// beyond this does tonic refuse it, with OUT_OF_RANGE, before decoding.
/// Fixed at start: a reload that changes the payload limit does not move it.
pub fn max_message_bytes(max_payload_bytes: usize) -> usize {
    max_payload_bytes
        .saturating_mul(2)
        .saturating_add(MESSAGE_OVERHEAD)
}

/// Serves until `shutdown` resolves; in-flight calls then finish. `reload`
/// lets the Admin API reload the configuration. `limits` bound what client
/// connections may hold (see `ConnectionLimits`).
pub async fn serve(
    engine: Arc<Engine>,
    reload: Option<Arc<dyn ReloadHandle>>,
    listener: tokio::net::TcpListener,
    limits: ConnectionLimits,
    health: (
        HealthReporter,
        tonic_health::pb::health_server::HealthServer<impl tonic_health::pb::health_server::Health>,
    ),
    shutdown: impl Future<Output = ()>,
) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    let (reporter, health_service) = health;
    let max_message = max_message_bytes(engine.settings().limits.max_payload_bytes);
    reporter
        .set_serving::<DispatcherServer<DispatcherService>>()
        .await;
    let mut routes = tonic::service::RoutesBuilder::default();
    routes
        .add_service(health_service)
        .add_service(
            DispatcherServer::new(DispatcherService::new(engine.clone()))
                .max_decoding_message_size(max_message),
        )
        .add_service(AdminServer::with_interceptor(
            AdminService::new(engine.clone(), reload),
            admin_guard(engine),
        ));
    crate::grpc::add_reflection(
        &mut routes,
        &[
            crate::grpc::HEALTH_SERVICE,
            "dispatch.v1.Dispatcher",
            "dispatch.v1.Admin",
        ],
    )?;
    let incoming = idle::Incoming::new(
        Acceptor::new(listener, limits.max_connections, "gRPC"),
        idle::Timeouts {
            handshake: limits.handshake_timeout,
            idle: limits.idle_timeout,
        },
    );
    tonic::transport::Server::builder()
        // Bounds on what one client can make the server hold.
        .max_concurrent_streams(MAX_STREAMS_PER_CONNECTION)
        .http2_max_header_list_size(MAX_HEADER_LIST_BYTES)
        .http2_max_pending_accept_reset_streams(Some(100))
        // A peer that stops answering PINGs is gone: drop it and what it held.
        .http2_keepalive_interval(Some(limits.keepalive_interval))
        .http2_keepalive_timeout(Some(limits.keepalive_timeout))
        .layer(idle::TrackLayer)
        .add_routes(routes.routes())
        .serve_with_incoming_shutdown(incoming, shutdown)
        .await?;
    Ok(())
}
