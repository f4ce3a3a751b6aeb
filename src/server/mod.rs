//! The dispatcher's gRPC server: `Dispatcher`, health and reflection.
//! Services convert between wire types and the engine; nothing else.

mod activity;
mod admin;
mod admin_cache;
mod admin_cost;
mod admin_policy;
mod conn;
mod conn_info;
mod dispatcher;
mod guard;
mod jobs;
mod status;
mod unary_dispatch;

use std::future::Future;
use std::sync::Arc;

use tonic_health::server::HealthReporter;

pub use crate::accept::{Accepted, Acceptor};
pub use admin::{AdminService, ReloadHandle, admin_guard};
pub use dispatcher::DispatcherService;
pub use jobs::JobsService;
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

/// Where the dispatcher listens, and how.
pub struct Listeners {
    /// `Dispatcher` (and `Admin` unless it has its own listener).
    pub main: tokio::net::TcpListener,
    /// `server.admin_listen`: the Admin API here only, so it can stay private.
    pub admin: Option<tokio::net::TcpListener>,
    /// `[server.tls]`, on both listeners; `None`: plaintext.
    pub tls: Option<tokio_rustls::TlsAcceptor>,
}

/// Serves until `shutdown` resolves; in-flight calls then finish. `reload`
/// lets the Admin API reload the configuration. `limits` bound what client
/// connections may hold (see `ConnectionLimits`).
pub async fn serve(
    engine: Arc<Engine>,
    jobs: Option<Arc<crate::jobs::Jobs>>,
    reload: Option<Arc<dyn ReloadHandle>>,
    listeners: Listeners,
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
    let admin = AdminServer::with_interceptor(
        AdminService::new(engine.clone(), reload),
        admin_guard(engine.clone()),
    );
    let mut routes = tonic::service::RoutesBuilder::default();
    routes.add_service(health_service.clone()).add_service(
        DispatcherServer::new(DispatcherService::new(engine.clone())).max_decoding_message_size(max_message),
    );
    routes.add_service(
        crate::pb::jobs_server::JobsServer::new(JobsService::new(jobs))
            .max_decoding_message_size(max_message),
    );
    let mut names = vec![
        crate::grpc::HEALTH_SERVICE,
        "dispatch.v1.Dispatcher",
        "dispatch.v1.Jobs",
    ];
    let admin_routes = match listeners.admin {
        None => {
            routes.add_service(admin);
            names.push("dispatch.v1.Admin");
            None
        }
        Some(listener) => {
            let mut r = tonic::service::RoutesBuilder::default();
            r.add_service(health_service).add_service(admin);
            crate::grpc::add_reflection(&mut r, &[crate::grpc::HEALTH_SERVICE, "dispatch.v1.Admin"])?;
            Some((listener, r.routes()))
        }
    };
    crate::grpc::add_reflection(&mut routes, &names)?;
    let authenticates: conn_info::Authenticates = {
        let engine = engine.clone();
        Arc::new(move |caller| engine.authenticate(caller).is_ok())
    };
    let unary_dispatch = Arc::new(unary_dispatch::UnaryDispatch::new(engine.clone(), max_message));
    let listener = |what, routes, dispatch| {
        Arc::new(conn::Settings {
            timeouts: conn::Timeouts {
                handshake: limits.handshake_timeout,
                idle: limits.idle_timeout,
                body: limits.body_timeout,
            },
            tls: listeners.tls.clone(),
            http2: http2(&limits),
            routes,
            dispatch,
            authenticates: authenticates.clone(),
            what,
        })
    };
    let stop = tokio_util::sync::CancellationToken::new();
    let main = serve_on(
        listeners.main,
        limits,
        listener("gRPC", routes.routes(), Some(unary_dispatch)),
        stop.clone().cancelled_owned(),
    );
    let admin = async {
        match admin_routes {
            None => {}
            Some((admin, routes)) => {
                serve_on(
                    admin,
                    limits,
                    listener("admin", routes, None),
                    stop.clone().cancelled_owned(),
                )
                .await
            }
        }
    };
    let signal = async {
        shutdown.await;
        stop.cancel();
    };
    tokio::join!(main, admin, signal);
    Ok(())
}

/// HTTP/2 as the dispatcher serves it: bounds on what one client can make
/// the server hold, and keepalive PINGs (a peer that stops answering is
/// gone: drop it and what it held).
fn http2(limits: &ConnectionLimits) -> hyper::server::conn::http2::Builder<hyper_util::rt::TokioExecutor> {
    let mut b = hyper::server::conn::http2::Builder::new(hyper_util::rt::TokioExecutor::new());
    b.timer(hyper_util::rt::TokioTimer::new())
        .max_concurrent_streams(MAX_STREAMS_PER_CONNECTION)
        .max_header_list_size(MAX_HEADER_LIST_BYTES)
        .max_pending_accept_reset_streams(Some(100))
        .keep_alive_interval(Some(limits.keepalive_interval))
        .keep_alive_timeout(limits.keepalive_timeout);
    b
}

/// One listener: accepts connections into its slots and serves each in
/// its own task (`conn`) until `shutdown`; then stops accepting, lets every
/// connection finish what it has in progress (GOAWAY), and returns when
/// all have closed.
async fn serve_on(
    listener: tokio::net::TcpListener,
    limits: ConnectionLimits,
    settings: Arc<conn::Settings>,
    shutdown: impl Future<Output = ()>,
) {
    let mut acceptor = Acceptor::new(
        listener,
        crate::slots::Limits {
            max: limits.max_connections,
            per_peer: limits.max_connections_per_peer,
        },
        settings.what,
    );
    let stop = tokio_util::sync::CancellationToken::new();
    // Each connection's task holds a sender; all gone: all closed.
    let (open, mut all_closed) = tokio::sync::mpsc::channel::<()>(1);
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            _ = &mut shutdown => break,
            accepted = acceptor.accept() => {
                let (settings, stop, open) = (settings.clone(), stop.clone(), open.clone());
                tokio::spawn(async move {
                    conn::serve(accepted, settings, stop).await;
                    drop(open);
                });
            }
        }
    }
    drop(acceptor);
    drop(open);
    stop.cancel();
    let _ = all_closed.recv().await;
}
