//! The two AgentCluster calls the forwarder makes. The request is encoded
//! once per step of a request's plan (`encode`) and every attempt sends
//! those bytes (`Bytes`, shared) to whichever region takes it.
//!
//! `Execute`, the call nearly every request makes, is sent straight over the
//! region's HTTP/2 connection: one framed message out, one back, the status
//! from the trailers (`crate::grpc_unary`, statuses as tonic reads them).
//! tonic's generic client (a streaming encoder and decoder for one message,
//! metadata conversions, a boxed body each way) cost more than the decision
//! itself (docs/PERFORMANCE.md). `ExecuteStream` keeps tonic's client.

use std::marker::PhantomData;
use std::time::Duration;

use bytes::{BufMut, Bytes};
use http::{HeaderMap, HeaderValue};
use prost::Message;
use tonic::Status;
use tonic::codec::{BufferSettings, Codec, EncodeBuf, Encoder, Streaming};
use tonic::codegen::Service;
use tonic::codegen::http::uri::PathAndQuery;
use tonic_prost::ProstCodec;

use super::Connection;
use crate::grpc_unary;
use crate::pb;

const EXECUTE: &str = "/dispatch.v1.AgentCluster/Execute";
const EXECUTE_STREAM: &str = "/dispatch.v1.AgentCluster/ExecuteStream";

/// An `ExecuteRequest` as it goes in a request body (framed).
pub fn encode(r: &pb::ExecuteRequest) -> Bytes {
    grpc_unary::frame(r)
}

/// One attempt: the encoded request, the time it has, and the metadata
/// (trace context) it carries.
pub struct Call {
    pub message: Bytes,
    pub timeout: Duration,
    pub headers: HeaderMap,
}

/// A region's cluster, over its connection.
#[derive(Clone)]
pub struct ClusterClient {
    connection: Connection,
    /// The whole URI of `Execute` at this region.
    execute: http::Uri,
    /// `ExecuteStream`, through tonic.
    grpc: tonic::client::Grpc<Connection>,
}

impl ClusterClient {
    pub fn new(connection: Connection, origin: tonic::transport::Uri) -> Result<Self, String> {
        let mut parts = origin.clone().into_parts();
        parts.path_and_query = Some(PathAndQuery::from_static(EXECUTE));
        let execute = http::Uri::from_parts(parts).map_err(|e| e.to_string())?;
        Ok(Self {
            connection: connection.clone(),
            execute,
            // The dispatcher passes on what its clusters produce; its own
            // limits are on what callers send.
            grpc: tonic::client::Grpc::with_origin(connection, origin).max_decoding_message_size(usize::MAX),
        })
    }

    pub async fn execute(&mut self, call: Call) -> Result<tonic::Response<pb::ExecuteReply>, Status> {
        let mut request = http::Request::new(tonic::body::Body::new(http_body_util::Full::new(call.message)));
        *request.method_mut() = http::Method::POST;
        *request.uri_mut() = self.execute.clone();
        let headers = request.headers_mut();
        *headers = call.headers;
        headers.insert(
            http::header::CONTENT_TYPE,
            HeaderValue::from_static("application/grpc"),
        );
        headers.insert(http::header::TE, HeaderValue::from_static("trailers"));
        headers.insert("grpc-timeout", grpc_unary::timeout_value(call.timeout));
        let response = self.connection.call(request).await?;
        let (parts, mut body) = response.into_parts();
        // Trailers-only: the status came with the headers.
        let in_headers = grpc_unary::status_in(&parts.headers);
        if let Some(Err(status)) = in_headers {
            return Err(status);
        }
        let unary = grpc_unary::read(&mut body, usize::MAX).await?;
        match unary.trailers.as_ref().and_then(grpc_unary::status_in) {
            Some(Err(status)) => return Err(status),
            Some(Ok(())) => {}
            None if in_headers.is_some() => {}
            None => {
                if let Some(status) = grpc_unary::status_from_http(parts.status) {
                    return Err(status);
                }
            }
        }
        let message = unary
            .message
            .ok_or_else(|| Status::internal("Missing response message."))?;
        let reply = pb::ExecuteReply::decode(message).map_err(|e| Status::internal(e.to_string()))?;
        Ok(tonic::Response::new(reply))
    }

    pub async fn execute_stream(
        &mut self,
        call: Call,
    ) -> Result<tonic::Response<Streaming<pb::ExecuteChunk>>, Status> {
        self.grpc
            .ready()
            .await
            .map_err(|e| Status::unavailable(format!("service was not ready: {e}")))?;
        // tonic frames the message itself.
        let mut request = tonic::Request::new(call.message.slice(grpc_unary::HEADER..));
        *request.metadata_mut() = tonic::metadata::MetadataMap::from_headers(call.headers);
        request.set_timeout(call.timeout);
        let path = PathAndQuery::from_static(EXECUTE_STREAM);
        self.grpc
            .server_streaming(request, path, Encoded::default())
            .await
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
        assert_eq!(
            pb::ExecuteRequest::decode(&wire[grpc_unary::HEADER..]).unwrap(),
            r
        );
    }
}
