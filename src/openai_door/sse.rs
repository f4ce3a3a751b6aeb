//! A streamed dispatch as server-sent events: `chat.completion.chunk`
//! events as the output arrives, then the finish (and usage, when asked),
//! then `data: [DONE]`. An error after the stream has begun is an
//! `{"error": …}` event and no `[DONE]` (the SDKs raise it). The caller
//! leaving drops this stream and, with it, the engine's: the region's call
//! is cancelled and only what was produced is charged.

use std::collections::VecDeque;
use std::convert::Infallible;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use bytes::Bytes;
use serde_json::Value;
use tokio_stream::Stream;

use super::errors::DoorError;
use super::reply::{Chunks, Shape};
use crate::dispatch::{ChunkStream, StreamChunk};

const DONE: &[u8] = b"data: [DONE]\n\n";

pub struct Sse {
    inner: ChunkStream,
    /// Read before the answer's headers were written; sent first.
    first: Option<StreamChunk>,
    chunks: Chunks,
    shape: Shape,
    pending: VecDeque<Bytes>,
    finished: bool,
}

impl Sse {
    pub fn new(first: StreamChunk, inner: ChunkStream, chunks: Chunks, shape: Shape) -> Self {
        Self {
            inner,
            first: Some(first),
            chunks,
            shape,
            pending: VecDeque::new(),
            finished: false,
        }
    }

    fn data(&mut self, payload: &[u8]) {
        let mut event = Vec::with_capacity(payload.len() + 8);
        event.extend_from_slice(b"data: ");
        event.extend_from_slice(payload);
        event.extend_from_slice(b"\n\n");
        self.pending.push_back(Bytes::from(event));
    }

    fn json(&mut self, events: Vec<Value>) {
        for e in events {
            self.data(&serde_json::to_vec(&e).unwrap_or_default());
        }
    }

    fn take(&mut self, c: StreamChunk) {
        match self.shape {
            Shape::Wrap => {
                let events = self.chunks.content(&c.output);
                self.json(events);
                if c.done {
                    let events = self.chunks.end(&c.usage);
                    self.json(events);
                }
            }
            Shape::PassThrough => {
                if !c.output.is_empty() {
                    self.data(&c.output);
                }
            }
        }
        if c.done {
            self.pending.push_back(Bytes::from_static(DONE));
            self.finished = true;
        }
    }

    fn fail(&mut self, e: DoorError) {
        self.data(&e.body());
        self.finished = true;
    }
}

impl Stream for Sse {
    type Item = Result<Bytes, Infallible>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        loop {
            if let Some(b) = self.pending.pop_front() {
                return Poll::Ready(Some(Ok(b)));
            }
            if self.finished {
                return Poll::Ready(None);
            }
            if let Some(first) = self.first.take() {
                self.take(first);
                continue;
            }
            match ready!(self.inner.as_mut().poll_next(cx)) {
                Some(Ok(c)) => self.take(c),
                Some(Err(e)) => self.fail(DoorError::from_dispatch(&e, "", true)),
                None => self.fail(DoorError::new(
                    http::StatusCode::INTERNAL_SERVER_ERROR,
                    "server_error",
                    "internal_error",
                    "the stream ended without its last chunk",
                )),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use tokio_stream::StreamExt;

    use super::*;
    use crate::dispatch::DispatchError;
    use crate::pb;

    fn chunk(text: &str, done: bool) -> StreamChunk {
        StreamChunk {
            request_id: "r-1".into(),
            region: "eu".into(),
            output: Bytes::from(text.to_string()),
            usage: pb::Usage {
                prompt_tokens: 5,
                completion_tokens: 3,
                cached_prompt_tokens: 0,
            },
            done,
            attempts: 1,
            queue_wait: std::time::Duration::ZERO,
            path: Default::default(),
            cost: None,
            cached: None,
        }
    }

    async fn events(
        first: StreamChunk,
        rest: Vec<Result<StreamChunk, DispatchError>>,
        shape: Shape,
    ) -> String {
        let chunks = Chunks::new(&first, None, true);
        let sse = Sse::new(first, Box::pin(tokio_stream::iter(rest)), chunks, shape);
        let parts: Vec<_> = sse.map(|b| b.unwrap()).collect().await;
        parts
            .iter()
            .map(|b| String::from_utf8_lossy(b).into_owned())
            .collect()
    }

    #[tokio::test]
    async fn a_stream_ends_with_usage_then_done() {
        let text = events(chunk("he", false), vec![Ok(chunk("llo", true))], Shape::Wrap).await;
        let data: Vec<&str> = text.split("\n\n").filter(|e| !e.is_empty()).collect();
        assert_eq!(data.len(), 5, "{text}");
        assert!(data[0].contains(r#""content":"he""#), "{text}");
        assert!(data[2].contains(r#""finish_reason":"stop""#), "{text}");
        assert!(data[3].contains(r#""total_tokens":8"#), "{text}");
        assert_eq!(data[4], "data: [DONE]");
    }

    #[tokio::test]
    async fn an_error_mid_stream_is_an_error_event_and_no_done() {
        let e = DispatchError::Upstream {
            region: "eu".into(),
            code: tonic::Code::Unavailable,
            message: "gone".into(),
        };
        let text = events(chunk("he", false), vec![Err(e)], Shape::Wrap).await;
        assert!(text.contains(r#"data: {"error":"#), "{text}");
        assert!(!text.contains("[DONE]"), "{text}");
    }

    #[tokio::test]
    async fn a_provider_stream_passes_through() {
        let text = events(
            chunk(r#"{"a":1}"#, false),
            vec![Ok(chunk(r#"{"b":2}"#, true))],
            Shape::PassThrough,
        )
        .await;
        assert_eq!(text, "data: {\"a\":1}\n\ndata: {\"b\":2}\n\ndata: [DONE]\n\n");
    }
}
