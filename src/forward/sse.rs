//! A streamed chat completion read back as the chunks an AgentCluster's
//! `ExecuteStream` sends: each server-sent event's `data:` JSON is one
//! chunk's output, verbatim (a `chat.completion.chunk`); the tokens are
//! counted as they arrive (a token per four characters of the text the
//! event carries, at least one for an event with text); the event with a
//! `usage` object (asked for with `stream_options.include_usage`) is the
//! last, `done`, with the provider's usage and the response's quota
//! figures. `[DONE]` is not passed on; a provider that sends no usage
//! event ends with an empty `done` chunk counting what arrived.
//!
//! After the last chunk the rest of the body (`[DONE]`, the end of the
//! chunked body) is still on the wire: dropped half-read, an HTTP/1.1
//! connection can only be closed. So a stream dropped after its last chunk
//! reads that rest in a task of its own, bounded in bytes and time, and
//! the connection goes back to the region's pool; a stream dropped before
//! it (the caller left) is closed at once, which is what stops the
//! provider's generation.

use bytes::{Bytes, BytesMut};
use http_body_util::BodyExt;
use serde_json::Value;
use tonic::Status;

use crate::pb;

/// Longest event accepted: past it the stream is broken, not slow.
const MAX_EVENT_BYTES: usize = 8 << 20;
const CHARS_PER_TOKEN: u64 = 4;
/// What is read after the last chunk to hand the connection back; a
/// provider sending more is not waited for (the connection is closed).
const MAX_TAIL_BYTES: usize = 64 << 10;
const TAIL_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(2);

pub struct SseChunks {
    /// `None` once read to its end.
    body: Option<hyper::body::Incoming>,
    buf: BytesMut,
    prompt: u64,
    produced: u64,
    /// The response headers' quota figures, for the last chunk.
    hint: Option<pb::ProviderQuota>,
    /// The last chunk went out: nothing more is read.
    ended: bool,
}

impl SseChunks {
    pub fn new(body: hyper::body::Incoming, prompt: u64, hint: Option<pb::ProviderQuota>) -> Self {
        Self {
            body: Some(body),
            buf: BytesMut::new(),
            prompt,
            produced: 0,
            hint,
            ended: false,
        }
    }

    /// The next chunk; `None` when the stream ended (without a `done`
    /// chunk only if the provider cut it short). Cancel-safe: what was
    /// read stays buffered.
    pub async fn message(&mut self) -> Result<Option<pb::ExecuteChunk>, Status> {
        loop {
            if self.ended {
                return Ok(None);
            }
            if let Some(event) = self.next_event() {
                if let Some(chunk) = self.chunk(event)? {
                    return Ok(Some(chunk));
                }
                continue;
            }
            if self.buf.len() > MAX_EVENT_BYTES {
                return Err(Status::internal("the provider sent an event longer than 8 MiB"));
            }
            let Some(body) = self.body.as_mut() else {
                return Ok(None);
            };
            match body.frame().await {
                None => {
                    self.body = None;
                    return Ok(None);
                }
                Some(Err(e)) => {
                    return Err(Status::unavailable(format!("reading the provider's stream: {e}")));
                }
                Some(Ok(frame)) => {
                    if let Ok(data) = frame.into_data() {
                        self.buf.extend_from_slice(&data);
                    }
                }
            }
        }
    }

    /// The next whole event's `data:` field, if one has arrived.
    fn next_event(&mut self) -> Option<Bytes> {
        let (end, sep) = find_event_end(&self.buf)?;
        let event = self.buf.split_to(end + sep).freeze();
        Some(data_of(event.slice(..end)))
    }

    fn chunk(&mut self, data: Bytes) -> Result<Option<pb::ExecuteChunk>, Status> {
        if data.is_empty() {
            // A comment or keep-alive.
            return Ok(None);
        }
        if &data[..] == b"[DONE]" {
            // No usage event came: the count so far is what there is.
            self.ended = true;
            return Ok(Some(pb::ExecuteChunk {
                output: Bytes::new(),
                usage: Some(self.usage()),
                done: true,
                provider_quota: self.hint,
                load: None,
            }));
        }
        let v: Value = serde_json::from_slice(&data)
            .map_err(|_| Status::internal("the provider's stream carried an event that is not JSON"))?;
        if let Some(e) = v.get("error") {
            let message = e
                .get("message")
                .and_then(Value::as_str)
                .unwrap_or("an error event");
            return Err(Status::internal(format!(
                "the provider's stream failed: {}",
                crate::excerpt::truncate(message, crate::openai::error::MAX_MESSAGE_BYTES)
            )));
        }
        if let Some(u) = v.get("usage").filter(|u| u.is_object()) {
            self.ended = true;
            let usage = usage_of(u);
            return Ok(Some(pb::ExecuteChunk {
                output: data,
                usage: Some(usage),
                done: true,
                provider_quota: self.hint,
                load: None,
            }));
        }
        self.produced += tokens_in(&v);
        Ok(Some(pb::ExecuteChunk {
            output: data,
            usage: Some(self.usage()),
            done: false,
            provider_quota: None,
            load: None,
        }))
    }

    fn usage(&self) -> pb::Usage {
        pb::Usage {
            prompt_tokens: self.prompt,
            completion_tokens: self.produced,
            cached_prompt_tokens: 0,
        }
    }
}

impl Drop for SseChunks {
    fn drop(&mut self) {
        let Some(body) = self.body.take() else {
            return;
        };
        if !self.ended {
            // Cut short: closing the connection is what stops the provider.
            return;
        }
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            runtime.spawn(read_tail(body));
        }
    }
}

/// Reads what follows the last chunk to the body's end (the connection
/// then goes back to the pool), or gives up past the bounds.
async fn read_tail(mut body: hyper::body::Incoming) {
    let tail = async {
        let mut read = 0usize;
        while let Some(Ok(frame)) = body.frame().await {
            read += frame.data_ref().map_or(0, |d| d.len());
            if read > MAX_TAIL_BYTES {
                return;
            }
        }
    };
    let _ = tokio::time::timeout(TAIL_TIMEOUT, tail).await;
}

/// OpenAI's `usage` object (a completion's, or a stream's last event's).
pub fn usage_of(u: &Value) -> pb::Usage {
    let n = |p: &str| u.pointer(p).and_then(Value::as_u64).unwrap_or(0);
    pb::Usage {
        prompt_tokens: n("/prompt_tokens"),
        completion_tokens: n("/completion_tokens"),
        cached_prompt_tokens: n("/prompt_tokens_details/cached_tokens"),
    }
}

/// Where the first event ends (a blank line) and how long the blank line is.
fn find_event_end(buf: &[u8]) -> Option<(usize, usize)> {
    let lf = buf.windows(2).position(|w| w == b"\n\n").map(|i| (i, 2));
    let crlf = buf.windows(4).position(|w| w == b"\r\n\r\n").map(|i| (i, 4));
    match (lf, crlf) {
        (Some(a), Some(b)) => Some(if a.0 <= b.0 { a } else { b }),
        (a, b) => a.or(b),
    }
}

/// An event's `data:` lines, joined by newlines (one line: a slice of the
/// event, no copy).
fn data_of(event: Bytes) -> Bytes {
    let mut lines = event
        .split(|b| *b == b'\n')
        .map(|l| l.strip_suffix(b"\r").unwrap_or(l))
        .filter_map(|l| l.strip_prefix(b"data:"))
        .map(|l| l.strip_prefix(b" ").unwrap_or(l));
    let Some(first) = lines.next() else {
        return Bytes::new();
    };
    let rest: Vec<&[u8]> = lines.collect();
    if rest.is_empty() {
        return event.slice_ref(first);
    }
    let mut joined = first.to_vec();
    for l in rest {
        joined.push(b'\n');
        joined.extend_from_slice(l);
    }
    Bytes::from(joined)
}

/// The tokens one chunk carries: its text (content, refusal, tool call
/// arguments) at four characters a token, at least one if it has any.
fn tokens_in(v: &Value) -> u64 {
    let mut chars = 0u64;
    for choice in v.get("choices").and_then(Value::as_array).into_iter().flatten() {
        let Some(delta) = choice.get("delta") else {
            continue;
        };
        for field in ["content", "refusal", "reasoning_content"] {
            if let Some(s) = delta.get(field).and_then(Value::as_str) {
                chars += s.chars().count() as u64;
            }
        }
        for call in delta
            .get("tool_calls")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
        {
            if let Some(s) = call.pointer("/function/arguments").and_then(Value::as_str) {
                chars += s.chars().count() as u64;
            }
        }
    }
    if chars == 0 {
        0
    } else {
        chars.div_ceil(CHARS_PER_TOKEN).max(1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_split_on_blank_lines_and_data_is_kept_verbatim() {
        assert_eq!(find_event_end(b"data: {}\n\nrest"), Some((8, 2)));
        assert_eq!(find_event_end(b"data: {}\r\n\r\n"), Some((8, 4)));
        assert_eq!(find_event_end(b"data: {}\n"), None);
        let e = Bytes::from_static(b"event: x\ndata: {\"a\":1}");
        assert_eq!(data_of(e), Bytes::from_static(b"{\"a\":1}"));
        assert_eq!(
            data_of(Bytes::from_static(b"data:a\r\ndata: b")),
            Bytes::from_static(b"a\nb")
        );
        assert_eq!(data_of(Bytes::from_static(b": keep-alive")), Bytes::new());
    }

    #[test]
    fn tokens_are_counted_from_the_text_of_each_chunk() {
        let v: Value = serde_json::from_str(
            r#"{"choices":[{"delta":{"content":"12345678"}},{"delta":{"tool_calls":[{"function":{"arguments":"abc"}}]}}]}"#,
        )
        .unwrap();
        assert_eq!(tokens_in(&v), 3, "11 characters");
        let role: Value =
            serde_json::from_str(r#"{"choices":[{"delta":{"role":"assistant","content":""}}]}"#).unwrap();
        assert_eq!(tokens_in(&role), 0);
        let one: Value = serde_json::from_str(r#"{"choices":[{"delta":{"content":"a"}}]}"#).unwrap();
        assert_eq!(tokens_in(&one), 1);
    }
}
