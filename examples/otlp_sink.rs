//! A local OTLP trace receiver that counts and discards what it is sent, for
//! `benches/instr` (the dispatcher's cost per request with its exporter on):
//! the bench needs an exporter that really encodes and sends its batches, and
//! a receiver that costs nothing it measures.
//!
//!     cargo run --release --example otlp_sink -- 127.0.0.1:0
#![forbid(unsafe_code)]

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use tokio_stream::wrappers::TcpListenerStream;

#[derive(Default, Clone)]
struct Sink {
    spans: Arc<AtomicU64>,
}

#[tonic::async_trait]
impl TraceService for Sink {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        let spans: usize = request
            .into_inner()
            .resource_spans
            .iter()
            .flat_map(|rs| &rs.scope_spans)
            .map(|ss| ss.spans.len())
            .sum();
        let total = self.spans.fetch_add(spans as u64, Ordering::Relaxed) + spans as u64;
        eprintln!("spans received: {total}");
        Ok(tonic::Response::new(ExportTraceServiceResponse::default()))
    }
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    let listen = std::env::args().nth(1).unwrap_or_else(|| "127.0.0.1:0".into());
    let listener = tokio::net::TcpListener::bind(&listen).await?;
    println!("otlp-sink listening on {}", listener.local_addr()?);
    tonic::transport::Server::builder()
        .add_service(TraceServiceServer::new(Sink::default()))
        .serve_with_incoming(TcpListenerStream::new(listener))
        .await?;
    Ok(())
}
