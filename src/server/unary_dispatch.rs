//! `Dispatch`, the one call nearly every request is, served straight from
//! the connection's HTTP/2 request rather than through tonic's generic
//! unary path (its router, a boxed service per call, a streaming decoder
//! and encoder for one message, the request and response wrappers): that
//! machinery was a fifth of the instructions the dispatcher spends beyond
//! a bare HTTP/2 relay (docs/PERFORMANCE.md). The wire stays gRPC over
//! hyper's HTTP/2: one length-prefixed protobuf message each way, the
//! status in the trailers (or alone, trailers-only, on an error), as tonic
//! answers. Everything else (`DispatchStream`, `Route`, the other
//! services, reflection) still goes through tonic's routes.
//!
//! What tonic's path checked is checked here the same way, with the same
//! codes: the message's size against the limit before it is buffered
//! (OUT_OF_RANGE), a compressed message (INTERNAL, none is accepted),
//! a body with no message or a message that does not decode (INTERNAL).

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use http::HeaderMap;
use http_body::Frame;
use prost::Message;
use tonic::Status;
use tonic::body::Body;
use tracing::Instrument;

use super::activity::Busy;
use super::dispatcher::{caller_from, reply, request_span};
use super::status::to_status;
use crate::dispatch::Engine;
use crate::grpc_unary;
use crate::pb;
use crate::tls::identity::PeerIdentity;

const GRPC_ENCODING: http::HeaderName = http::HeaderName::from_static("grpc-encoding");

/// The path of `dispatch.v1.Dispatcher/Dispatch`.
pub const PATH: &str = "/dispatch.v1.Dispatcher/Dispatch";

pub struct UnaryDispatch {
    engine: Arc<Engine>,
    /// The largest request message decoded (`super::max_message_bytes`).
    max_message: usize,
}

impl UnaryDispatch {
    pub fn new(engine: Arc<Engine>, max_message: usize) -> Self {
        Self { engine, max_message }
    }

    /// Answers one `Dispatch` request; `busy` counts it as in progress on
    /// its connection until the answer's body has been sent.
    pub async fn serve<B>(
        &self,
        parts: http::request::Parts,
        body: B,
        identity: Option<PeerIdentity>,
        busy: Busy,
    ) -> http::Response<Body>
    where
        B: http_body::Body<Data = Bytes, Error = Status> + Unpin,
    {
        match self.answer(parts, body, identity).await {
            Ok(reply) => ok(reply, busy),
            Err(status) => status.into_http(),
        }
    }

    async fn answer<B>(
        &self,
        parts: http::request::Parts,
        mut body: B,
        identity: Option<PeerIdentity>,
    ) -> Result<pb::DispatchReply, Status>
    where
        B: http_body::Body<Data = Bytes, Error = Status> + Unpin,
    {
        if let Some(encoding) = parts.headers.get(GRPC_ENCODING)
            && encoding.as_bytes() != b"identity"
        {
            return Err(Status::unimplemented(format!(
                "grpc-encoding {} is not supported: send messages uncompressed",
                crate::excerpt::excerpt(&String::from_utf8_lossy(encoding.as_bytes()))
            )));
        }
        let message = grpc_unary::read(&mut body, self.max_message)
            .await?
            .message
            .ok_or_else(|| Status::internal("Missing request message."))?;
        drop(body);
        let r = pb::DispatchRequest::decode(message).map_err(|e| Status::internal(e.to_string()))?;
        let timeout = crate::grpc::grpc_timeout_header(&parts.headers);
        let caller = caller_from(&parts.headers, identity.as_ref());
        let span = request_span("Dispatch");
        crate::telemetry::continue_trace_headers(&span, &parts.headers);
        let dispatched = self
            .engine
            .dispatch(r, timeout, caller)
            .instrument(span)
            .await
            .map_err(|e| to_status(&e))?;
        Ok(reply(dispatched))
    }
}

/// A successful answer: the reply, then `grpc-status: 0` in the trailers.
fn ok(reply: pb::DispatchReply, busy: Busy) -> http::Response<Body> {
    let mut response = http::Response::new(Body::new(Unary {
        data: Some(grpc_unary::frame(&reply)),
        trailers: true,
        _busy: busy,
    }));
    response.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/grpc"),
    );
    response
}

/// One message, then the trailers; the request is in progress until then.
struct Unary {
    data: Option<Bytes>,
    trailers: bool,
    _busy: Busy,
}

impl http_body::Body for Unary {
    type Data = Bytes;
    type Error = Status;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Status>>> {
        if let Some(data) = self.data.take() {
            return Poll::Ready(Some(Ok(Frame::data(data))));
        }
        if std::mem::take(&mut self.trailers) {
            let mut trailers = HeaderMap::with_capacity(1);
            trailers.insert(Status::GRPC_STATUS, http::HeaderValue::from_static("0"));
            return Poll::Ready(Some(Ok(Frame::trailers(trailers))));
        }
        Poll::Ready(None)
    }

    fn is_end_stream(&self) -> bool {
        self.data.is_none() && !self.trailers
    }
}

#[cfg(test)]
mod tests {
    use http_body_util::BodyExt;

    use super::*;

    #[tokio::test]
    async fn the_answer_is_one_message_then_status_zero() {
        let reply = pb::DispatchReply {
            region: "us-east-1".into(),
            ..Default::default()
        };
        let mut body = ok(reply.clone(), super::super::activity::Activity::new().begin()).into_body();
        let data = body.frame().await.unwrap().unwrap().into_data().unwrap();
        assert_eq!(data[0], 0);
        assert_eq!(
            pb::DispatchReply::decode(&data[grpc_unary::HEADER..]).unwrap(),
            reply
        );
        let trailers = body.frame().await.unwrap().unwrap().into_trailers().unwrap();
        assert_eq!(trailers["grpc-status"], "0");
        assert!(body.frame().await.is_none());
    }
}
