//! dispatcher: routes LLM agent work across regions by quota and load.
#![forbid(unsafe_code)]

pub mod accept;
pub mod app;
pub mod check;
pub mod clock;
pub mod cluster;
pub mod config;
pub mod core;
pub mod dispatch;
pub mod excerpt;
pub mod forward;
pub mod grpc;
pub mod grpc_unary;
pub mod health;
pub mod jobs;
pub mod metrics;
pub mod openai;
pub mod openai_door;
pub mod server;
pub mod sim;
pub mod slots;
pub mod spend_metric;
pub mod state;
pub mod telemetry;
#[cfg(test)]
mod testing;
pub mod tls;

/// Generated protobuf and gRPC code for `dispatch.v1`.
pub mod pb {
    #![allow(clippy::all, missing_docs)]
    tonic::include_proto!("dispatch.v1");

    /// Descriptor set of `dispatch.v1`, for server reflection.
    pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("dispatch_descriptor");
}
