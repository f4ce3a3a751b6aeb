//! The two AgentCluster calls the forwarder makes, with the request encoded
//! once per step of a request's plan (`encode`) rather than cloned and
//! encoded again for every attempt: an attempt sends the same bytes
//! (`Bytes`, shared) to whichever region takes it. Replies are decoded with
//! prost as the generated client does.

use std::marker::PhantomData;

use bytes::{BufMut, Bytes};
use prost::Message;
use tonic::Status;
use tonic::codec::{BufferSettings, Codec, EncodeBuf, Encoder, Streaming};
use tonic::codegen::http::uri::PathAndQuery;
use tonic_prost::ProstCodec;

use super::Connection;
use crate::pb;

const EXECUTE: &str = "/dispatch.v1.AgentCluster/Execute";
const EXECUTE_STREAM: &str = "/dispatch.v1.AgentCluster/ExecuteStream";

/// An `ExecuteRequest` as it goes on the wire.
pub fn encode(r: &pb::ExecuteRequest) -> Bytes {
    r.encode_to_vec().into()
}

/// A region's cluster, over its connection.
#[derive(Clone)]
pub struct ClusterClient {
    grpc: tonic::client::Grpc<Connection>,
}

impl ClusterClient {
    pub fn new(connection: Connection, origin: tonic::transport::Uri) -> Self {
        Self {
            // The dispatcher passes on what its clusters produce; its own
            // limits are on what callers send.
            grpc: tonic::client::Grpc::with_origin(connection, origin).max_decoding_message_size(usize::MAX),
        }
    }

    pub async fn execute(
        &mut self,
        request: tonic::Request<Bytes>,
    ) -> Result<tonic::Response<pb::ExecuteReply>, Status> {
        self.ready().await?;
        let path = PathAndQuery::from_static(EXECUTE);
        self.grpc.unary(request, path, Encoded::default()).await
    }

    pub async fn execute_stream(
        &mut self,
        request: tonic::Request<Bytes>,
    ) -> Result<tonic::Response<Streaming<pb::ExecuteChunk>>, Status> {
        self.ready().await?;
        let path = PathAndQuery::from_static(EXECUTE_STREAM);
        self.grpc.server_streaming(request, path, Encoded::default()).await
    }

    async fn ready(&mut self) -> Result<(), Status> {
        self.grpc
            .ready()
            .await
            .map_err(|e| Status::unavailable(format!("service was not ready: {e}")))
    }
}

/// Sends bytes already encoded; decodes `R` with prost.
struct Encoded<R>(PhantomData<R>);

impl<R> Default for Encoded<R> {
    fn default() -> Self {
        Self(PhantomData)
    }
}

impl<R: Message + Default + Send + 'static> Codec for Encoded<R> {
    type Encode = Bytes;
    type Decode = R;
    type Encoder = BytesEncoder;
    type Decoder = <ProstCodec<R, R> as Codec>::Decoder;

    fn encoder(&mut self) -> BytesEncoder {
        BytesEncoder
    }

    fn decoder(&mut self) -> Self::Decoder {
        ProstCodec::<R, R>::default().decoder()
    }
}

struct BytesEncoder;

impl Encoder for BytesEncoder {
    type Item = Bytes;
    type Error = Status;

    fn encode(&mut self, item: Bytes, dst: &mut EncodeBuf<'_>) -> Result<(), Status> {
        dst.put(item);
        Ok(())
    }

    /// Requests are small: tonic's default first buffer is 8 KiB (its
    /// yield threshold, 32 KiB, is kept).
    fn buffer_settings(&self) -> BufferSettings {
        BufferSettings::new(1024, 32 * 1024)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_bytes_sent_are_the_request_prost_would_send() {
        let r = pb::ExecuteRequest {
            request_id: "r-1".into(),
            tenant: "team-a".into(),
            model: "gpt-4o".into(),
            payload: Bytes::from_static(b"hello"),
            prompt_tokens: 3,
            max_output_tokens: 50,
            ..Default::default()
        };
        let wire = encode(&r);
        assert_eq!(pb::ExecuteRequest::decode(wire).unwrap(), r);
    }
}
