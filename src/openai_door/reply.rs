//! What an answer's body is: an AgentCluster's output and usage wrapped in
//! OpenAI's `chat.completion` (or `chat.completion.chunk` events), or, when
//! the region that served it speaks OpenAI's API itself, the provider's
//! JSON passed through unchanged. And the headers that say who served it.

use http::{HeaderMap, HeaderValue};
use serde_json::{Value, json};

use crate::dispatch::{Dispatched, Engine, StreamChunk};
use crate::pb;

/// Response headers naming what served a request (docs/OPENAI.md).
pub const REQUEST_ID: &str = "x-request-id";
pub const REGION: &str = "x-dispatcher-region";
pub const MODEL: &str = "x-dispatcher-model";
pub const ALIAS: &str = "x-dispatcher-alias";
pub const ATTEMPTS: &str = "x-dispatcher-attempts";
pub const QUEUE_WAIT_MS: &str = "x-dispatcher-queue-wait-ms";
pub const CACHED: &str = "x-dispatcher-cached";

/// How a region's output becomes the answer's body.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Shape {
    /// An AgentCluster's output: wrapped in OpenAI's JSON here.
    Wrap,
    /// An OpenAI-compatible region's output is already the provider's
    /// `chat.completion` (a stream's chunk: one SSE `data:` payload).
    PassThrough,
}

/// The one place that decides it: the provider's own JSON from a region of
/// `kind = "openai"` (`Engine::region_kind`), a wrapped AgentCluster output
/// otherwise.
pub fn shape(engine: &Engine, region: &str) -> Shape {
    match engine.region_kind(region) {
        Some(crate::forward::RegionKind::OpenAi) => Shape::PassThrough,
        _ => Shape::Wrap,
    }
}

/// What the engine said about the attempt that served a request.
pub struct Served<'a> {
    pub request_id: &'a str,
    pub region: &'a str,
    pub model: &'a str,
    pub alias: &'a str,
    pub attempts: u32,
    pub queue_wait_ms: u128,
    pub cached: bool,
}

impl<'a> Served<'a> {
    pub fn of_reply(d: &'a Dispatched) -> Self {
        Self {
            request_id: &d.request_id,
            region: &d.region,
            model: &d.path.model,
            alias: &d.path.alias,
            attempts: d.attempts,
            queue_wait_ms: d.queue_wait.as_millis(),
            cached: d.cached.is_some(),
        }
    }

    pub fn of_chunk(c: &'a StreamChunk) -> Self {
        Self {
            request_id: &c.request_id,
            region: &c.region,
            model: &c.path.model,
            alias: &c.path.alias,
            attempts: c.attempts,
            queue_wait_ms: c.queue_wait.as_millis(),
            cached: c.cached.is_some(),
        }
    }

    /// The headers; a name that is no valid header value is left out.
    pub fn headers(&self, h: &mut HeaderMap) {
        let mut put = |name: &'static str, v: &str| {
            if !v.is_empty()
                && let Ok(v) = HeaderValue::from_str(v)
            {
                h.insert(name, v);
            }
        };
        put(REQUEST_ID, self.request_id);
        put(REGION, self.region);
        put(MODEL, self.model);
        put(ALIAS, self.alias);
        put(ATTEMPTS, &self.attempts.to_string());
        put(QUEUE_WAIT_MS, &self.queue_wait_ms.to_string());
        if self.cached {
            put(CACHED, "true");
        }
    }
}

fn created() -> u64 {
    crate::clock::unix_secs()
}

fn usage(u: &pb::Usage) -> Value {
    json!({
        "prompt_tokens": u.prompt_tokens,
        "completion_tokens": u.completion_tokens,
        "total_tokens": u.prompt_tokens + u.completion_tokens,
        "prompt_tokens_details": {"cached_tokens": u.cached_prompt_tokens},
    })
}

/// `length` when the output reached its bound, else `stop`.
fn finish_reason(u: &pb::Usage, max_output: Option<u64>) -> &'static str {
    match max_output {
        Some(max) if u.completion_tokens >= max => "length",
        _ => "stop",
    }
}

/// A `chat.completion` around a reply's output (lossy UTF-8: an
/// AgentCluster's output is bytes).
pub fn completion(d: &Dispatched, max_output: Option<u64>) -> Vec<u8> {
    let v = json!({
        "id": format!("chatcmpl-{}", d.request_id),
        "object": "chat.completion",
        "created": created(),
        "model": d.path.model,
        "choices": [{
            "index": 0,
            "message": {"role": "assistant", "content": String::from_utf8_lossy(&d.output), "refusal": null},
            "logprobs": null,
            "finish_reason": finish_reason(&d.usage, max_output),
        }],
        "usage": usage(&d.usage),
        "system_fingerprint": null,
    });
    serde_json::to_vec(&v).unwrap_or_default()
}

/// Writes `chat.completion.chunk` events for one stream.
pub struct Chunks {
    id: String,
    model: String,
    created: u64,
    max_output: Option<u64>,
    include_usage: bool,
    /// The role goes in the first content chunk only.
    role_sent: bool,
    /// The bytes of a character a chunk boundary split, until the next.
    carry: Vec<u8>,
}

impl Chunks {
    pub fn new(first: &StreamChunk, max_output: Option<u64>, include_usage: bool) -> Self {
        Self {
            id: format!("chatcmpl-{}", first.request_id),
            model: first.path.model.clone(),
            created: created(),
            max_output,
            include_usage,
            role_sent: false,
            carry: Vec::new(),
        }
    }

    fn event(&self, choices: Value, usage: Option<Value>) -> Value {
        let mut v = json!({
            "id": self.id,
            "object": "chat.completion.chunk",
            "created": self.created,
            "model": self.model,
            "choices": choices,
            "system_fingerprint": null,
        });
        if let Some(u) = usage {
            v["usage"] = u;
        }
        v
    }

    /// The events for one chunk of output (none when it held only part
    /// of a character, or nothing).
    pub fn content(&mut self, output: &[u8]) -> Vec<Value> {
        self.carry.extend_from_slice(output);
        let text = match std::str::from_utf8(&self.carry) {
            Ok(s) => s.to_string(),
            Err(e) if e.error_len().is_none() => {
                // An incomplete character at the end: keep it for later.
                let valid = e.valid_up_to();
                let text = String::from_utf8_lossy(&self.carry[..valid]).into_owned();
                self.carry.drain(..valid);
                return self.text_event(text);
            }
            Err(_) => String::from_utf8_lossy(&self.carry).into_owned(),
        };
        self.carry.clear();
        self.text_event(text)
    }

    fn text_event(&mut self, text: String) -> Vec<Value> {
        if text.is_empty() {
            return Vec::new();
        }
        let mut delta = json!({"content": text});
        if !std::mem::replace(&mut self.role_sent, true) {
            delta["role"] = json!("assistant");
        }
        vec![self.event(
            json!([{"index": 0, "delta": delta, "logprobs": null, "finish_reason": null}]),
            None,
        )]
    }

    /// The events that end a stream: what was left of the text, the
    /// finish reason, and the usage when asked (`stream_options`).
    pub fn end(&mut self, usage_so_far: &pb::Usage) -> Vec<Value> {
        let rest = String::from_utf8_lossy(&std::mem::take(&mut self.carry)).into_owned();
        let mut out = self.text_event(rest);
        let reason = finish_reason(usage_so_far, self.max_output);
        let mut delta = json!({});
        if !self.role_sent {
            delta["role"] = json!("assistant");
        }
        out.push(self.event(
            json!([{"index": 0, "delta": delta, "logprobs": null, "finish_reason": reason}]),
            None,
        ));
        if self.include_usage {
            out.push(self.event(json!([]), Some(usage(usage_so_far))));
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chunk() -> StreamChunk {
        StreamChunk {
            request_id: "r-1".into(),
            region: "eu".into(),
            output: bytes::Bytes::new(),
            usage: pb::Usage::default(),
            done: false,
            attempts: 1,
            queue_wait: std::time::Duration::ZERO,
            path: crate::dispatch::ModelPath {
                model: "gpt-4o".into(),
                alias: String::new(),
                route: String::new(),
                tried: Vec::new(),
            },
            cost: None,
            cached: None,
        }
    }

    #[test]
    fn a_character_split_across_chunks_arrives_whole() {
        let mut c = Chunks::new(&chunk(), None, false);
        let e = "é".as_bytes();
        let first = c.content(&[b'a', e[0]]);
        assert_eq!(first[0]["choices"][0]["delta"]["content"], "a");
        assert_eq!(first[0]["choices"][0]["delta"]["role"], "assistant");
        let second = c.content(&[e[1], b'b']);
        assert_eq!(second[0]["choices"][0]["delta"]["content"], "éb");
        assert!(second[0]["choices"][0]["delta"].get("role").is_none());
        assert!(c.content(&[]).is_empty());
    }

    #[test]
    fn the_end_has_a_finish_reason_and_usage_when_asked() {
        let mut c = Chunks::new(&chunk(), Some(10), true);
        let u = pb::Usage {
            prompt_tokens: 7,
            completion_tokens: 10,
            cached_prompt_tokens: 0,
        };
        let end = c.end(&u);
        assert_eq!(end.len(), 2);
        assert_eq!(end[0]["choices"][0]["finish_reason"], "length");
        assert_eq!(end[1]["choices"], json!([]));
        assert_eq!(end[1]["usage"]["total_tokens"], 17);
        let mut c = Chunks::new(&chunk(), None, false);
        assert_eq!(c.end(&u).len(), 1, "no usage chunk unless asked");
    }
}
