//! A region's kind behind the one "send one attempt" seam (DESIGN §15): an
//! AgentCluster over gRPC or an OpenAI-compatible provider over HTTP, each
//! turning the same encoded request into a call and its answer into the
//! same reply, chunks or status. A match, not a trait object: the gRPC
//! path allocates nothing more for there being two kinds.

use tonic::Status;
use tonic::codec::Streaming;
use tonic_health::pb::health_client::HealthClient;

use super::Connection;
use super::openai::OpenAiClient;
use super::sse::SseChunks;
use super::wire::{Call, ClusterClient};
use crate::pb;

/// What a region is, for whoever must speak its protocol back (the OpenAI
/// front door relays an OpenAI region's output as is).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RegionKind {
    AgentCluster,
    OpenAi,
}

impl RegionKind {
    pub fn as_str(self) -> &'static str {
        match self {
            RegionKind::AgentCluster => "agent_cluster",
            RegionKind::OpenAi => "openai",
        }
    }
}

/// One region's client, as an attempt gets it. Unboxed on purpose: the
/// cluster variant is what nearly every attempt takes, and boxing it would
/// cost each one an allocation.
#[derive(Clone)]
#[allow(clippy::large_enum_variant)]
pub enum RegionClient {
    Cluster(ClusterClient),
    OpenAi(OpenAiClient),
}

impl RegionClient {
    pub async fn execute(&mut self, call: Call) -> Result<tonic::Response<pb::ExecuteReply>, Status> {
        match self {
            RegionClient::Cluster(c) => c.execute(call).await,
            // Boxed: its state would otherwise widen every cluster call's.
            RegionClient::OpenAi(c) => Box::pin(c.execute(call)).await,
        }
    }

    pub async fn execute_stream(&mut self, call: Call) -> Result<tonic::Response<Chunks>, Status> {
        match self {
            RegionClient::Cluster(c) => Ok(c.execute_stream(call).await?.map(Chunks::Grpc)),
            RegionClient::OpenAi(c) => Ok(Box::pin(c.execute_stream(call))
                .await?
                .map(|s| Chunks::OpenAi(Box::new(s)))),
        }
    }
}

/// A streamed answer, chunk by chunk (the gRPC stream unboxed, as above).
#[allow(clippy::large_enum_variant)]
pub enum Chunks {
    Grpc(Streaming<pb::ExecuteChunk>),
    OpenAi(Box<SseChunks>),
}

impl Chunks {
    /// The next chunk; `None` at the end. Cancel-safe.
    pub async fn message(&mut self) -> Result<Option<pb::ExecuteChunk>, Status> {
        match self {
            Chunks::Grpc(s) => s.message().await,
            Chunks::OpenAi(s) => s.message().await,
        }
    }
}

/// How a region's health is checked.
pub enum Probe {
    Grpc(HealthClient<Connection>),
    OpenAi(OpenAiClient),
}
