//! `POST /v1/chat/completions`: the body read within its limits, made a
//! `DispatchRequest` (`request.rs`), sent through the engine's `dispatch`
//! or `dispatch_stream` exactly as a gRPC call is, and the answer written
//! as OpenAI's JSON or server-sent events (`reply.rs`, `sse.rs`), or an
//! OpenAI error (`errors.rs`).

use std::sync::Arc;

use axum::body::Body;
use axum::extract::{Request, State};
use http::{HeaderValue, Response, StatusCode, header};
use tokio_stream::StreamExt;
use tracing::Instrument;

use super::errors::DoorError;
use super::reply::{self, Served, Shape};
use super::sse::Sse;
use super::{Conn, Door, request};
use crate::dispatch::DispatchError;

pub async fn completions(State(door): State<Arc<Door>>, r: Request) -> Response<Body> {
    let span =
        crate::dispatch::work_span!("dispatch", "server", rpc = "ChatCompletions", protocol = "openai");
    crate::telemetry::continue_trace_headers(&span, r.headers());
    let answer = door.chat(r).instrument(span.clone()).await;
    let response = answer.unwrap_or_else(|e| span.in_scope(|| door.error(&e)));
    super::observe("chat_completions", response.status());
    response
}

fn json(body: Vec<u8>, served: &Served<'_>) -> Response<Body> {
    let mut r = Response::new(Body::from(body));
    r.headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
    served.headers(r.headers_mut());
    r
}

impl Door {
    async fn chat(&self, r: Request) -> Result<Response<Body>, DoorError> {
        let (parts, body) = r.into_parts();
        let headers = &parts.headers;
        let caller = request::caller(headers);
        let timeout = request::timeout(headers)?;
        let limit = self.engine.settings().limits.max_payload_bytes;
        let body = request::read_body(body, headers, limit, self.body_timeout).await?;
        // A connection whose request named a tenant keeps its slot when
        // the listener is full (as on the gRPC listener).
        if let Some(conn) = parts.extensions.get::<Conn>()
            && !conn.0.is_trusted()
            && self.engine.authenticate(&caller).is_ok()
        {
            conn.0.trust();
        }
        let call = request::chat_call(body, headers)?;
        let model = call.request.model.clone();
        let fail = |e: DispatchError| {
            let known = !matches!(e, DispatchError::InvalidArgument(_)) || self.engine.knows_model(&model);
            DoorError::from_dispatch(&e, &model, known)
        };
        if !call.stream {
            let d = self
                .engine
                .dispatch(call.request, timeout, caller)
                .await
                .map_err(fail)?;
            let body = match reply::shape(&self.engine, &d.region) {
                Shape::Wrap => reply::completion(&d, call.max_output),
                Shape::PassThrough => d.output.to_vec(),
            };
            return Ok(json(body, &Served::of_reply(&d)));
        }
        let mut chunks = self
            .engine
            .dispatch_stream(call.request, timeout, caller)
            .await
            .map_err(fail)?;
        let first = match chunks.next().await {
            Some(Ok(c)) => c,
            Some(Err(e)) => return Err(fail(e)),
            None => {
                return Err(DoorError::new(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "server_error",
                    "internal_error",
                    "the stream ended before its first chunk",
                ));
            }
        };
        let shape = reply::shape(&self.engine, &first.region);
        let writer = reply::Chunks::new(&first, call.max_output, call.include_usage);
        let mut response = Response::new(Body::empty());
        {
            let h = response.headers_mut();
            h.insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("text/event-stream"),
            );
            h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
            Served::of_chunk(&first).headers(h);
        }
        *response.body_mut() = Body::from_stream(Sse::new(first, chunks, writer, shape));
        Ok(response)
    }
}
