//! `region-sim`: a regional agent cluster in front of a simulated LLM
//! provider, served over real gRPC. The `region-sim` binary runs one as a
//! process; the dispatcher starts one in-process for each region file with a
//! `[simulate]` table and no endpoint, on its own loopback port, so the request
//! path is the same as with a real cluster.

mod calls;
mod control;
mod faults;
mod openai;
mod provider;
mod request_ids;
mod service;

use std::net::SocketAddr;

use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::config::{RegionConfig, SimulateConfig};
use crate::core::ModelLimits;

pub use faults::{Fault, Faults};
pub use openai::{DEFAULT_MAX_OUTPUT_TOKENS, OpenAiSettings};
pub use provider::{Admission, ModelCounters, Provider, Refusal};
pub use service::SimService;

/// What a simulated cluster is: its region, the provider limits per model
/// (by default the region's configured ones) and how it behaves.
#[derive(Debug, Clone, PartialEq)]
pub struct SimSpec {
    pub region: String,
    pub models: Vec<(String, ModelLimits)>,
    pub settings: SimulateConfig,
}

impl SimSpec {
    /// The simulation a region file describes: provider limits equal to the
    /// configured ones, behaviour from `[simulate]` (defaults without one).
    pub fn from_region(r: &RegionConfig) -> Self {
        Self {
            region: r.spec.name.clone(),
            models: r.spec.models.clone(),
            settings: r.simulate.unwrap_or_default(),
        }
    }
}

/// A simulated cluster serving in the background.
#[derive(Debug)]
pub struct SimHandle {
    pub addr: SocketAddr,
    cancel: CancellationToken,
    task: JoinHandle<()>,
}

impl SimHandle {
    pub fn endpoint(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Stops serving and waits for the server to finish.
    pub async fn stop(self) {
        self.cancel.cancel();
        let _ = self.task.await;
    }
}

/// Binds `addr` (port 0 picks one) and serves `spec` until stopped.
pub async fn spawn(spec: SimSpec, addr: SocketAddr) -> std::io::Result<SimHandle> {
    spawn_with_tls(spec, addr, None).await
}

/// Like `spawn`, serving TLS with `tls` when given (region-sim's `--tls-*`).
pub async fn spawn_with_tls(
    spec: SimSpec,
    addr: SocketAddr,
    tls: Option<tokio_rustls::TlsAcceptor>,
) -> std::io::Result<SimHandle> {
    spawn_faulty(spec, addr, tls, Faults::default()).await
}

/// Like `spawn_with_tls`, committing `faults` (region-sim's `--faulty`).
pub async fn spawn_faulty(
    spec: SimSpec,
    addr: SocketAddr,
    tls: Option<tokio_rustls::TlsAcceptor>,
    faults: Faults,
) -> std::io::Result<SimHandle> {
    serve(spec, addr, tls, faults, None).await
}

/// Serves `spec` over OpenAI's HTTP API (`region-sim --openai`), with the
/// gRPC control services (`RegionSimControl`, health) on the same port.
pub async fn spawn_openai(
    spec: SimSpec,
    addr: SocketAddr,
    tls: Option<tokio_rustls::TlsAcceptor>,
    faults: Faults,
    settings: OpenAiSettings,
) -> std::io::Result<SimHandle> {
    serve(spec, addr, tls, faults, Some(settings)).await
}

async fn serve(
    spec: SimSpec,
    addr: SocketAddr,
    tls: Option<tokio_rustls::TlsAcceptor>,
    faults: Faults,
    openai: Option<OpenAiSettings>,
) -> std::io::Result<SimHandle> {
    use tokio_stream::StreamExt;
    let (incoming, local) = crate::grpc::bind(addr)?;
    let incoming = incoming.map(move |s| s.map(|s| crate::tls::accept::ServerIo::new(s, tls.as_ref())));
    let cancel = CancellationToken::new();
    let (mut routes, sim) = service::routes(spec, faults)
        .await
        .map_err(std::io::Error::other)?;
    let http1 = openai.is_some();
    if let Some(settings) = openai {
        let grpc = routes.into_axum_router().fallback(openai::not_found);
        routes = openai::router(sim, settings).merge(grpc).into();
    }
    let token = cancel.clone();
    let task = tokio::spawn(async move {
        let served = tonic::transport::Server::builder()
            .accept_http1(http1)
            .add_routes(routes)
            .serve_with_incoming_shutdown(incoming, token.cancelled())
            .await;
        if let Err(e) = served {
            tracing::error!(error = %e, "simulated region stopped serving");
        }
    });
    Ok(SimHandle {
        addr: local,
        cancel,
        task,
    })
}
