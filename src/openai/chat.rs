//! The chat-completions request body: the fields the dispatcher and the
//! simulated provider act on, read from the JSON with errors that name the
//! field, and the prompt's size estimated from its messages.

use serde_json::{Map, Value};

/// Tokens counted per message for its role and framing, and once for the
/// reply's priming (OpenAI's published rule of thumb for chat models).
const TOKENS_PER_MESSAGE: u64 = 4;
const TOKENS_FOR_REPLY: u64 = 3;
/// Characters per token in English text, the usual estimate.
const CHARS_PER_TOKEN: u64 = 4;

/// What a chat-completions body asks for.
#[derive(Debug, Clone, PartialEq)]
pub struct ChatRequest {
    /// `model`, when given (Azure names the deployment in the path instead).
    pub model: Option<String>,
    /// `max_completion_tokens`, else `max_tokens`, when given.
    pub max_output_tokens: Option<u64>,
    pub stream: bool,
    /// `stream_options.include_usage`.
    pub include_usage: bool,
    /// The prompt's tokens, estimated from the messages.
    pub prompt_tokens: u64,
    /// The whole body, to pass on.
    pub body: Map<String, Value>,
}

/// A body that is not a chat-completions request: the field at fault and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BadBody {
    pub field: String,
    pub reason: &'static str,
}

impl std::fmt::Display for BadBody {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.field, self.reason)
    }
}

fn bad(field: impl Into<String>, reason: &'static str) -> BadBody {
    BadBody {
        field: field.into(),
        reason,
    }
}

/// Reads a chat-completions body.
pub fn parse(body: &[u8]) -> Result<ChatRequest, BadBody> {
    let value: Value = serde_json::from_slice(body).map_err(|_| bad("body", "not valid JSON"))?;
    let Value::Object(body) = value else {
        return Err(bad("body", "not a JSON object"));
    };
    let model = match body.get("model") {
        None | Some(Value::Null) => None,
        Some(Value::String(s)) if !s.is_empty() => Some(s.clone()),
        Some(_) => return Err(bad("model", "must be a non-empty string")),
    };
    let count = |name: &'static str| match body.get(name) {
        None | Some(Value::Null) => Ok(None),
        Some(v) => v
            .as_u64()
            .map(Some)
            .ok_or_else(|| bad(name, "must be a non-negative integer")),
    };
    let max_output_tokens = match count("max_completion_tokens")? {
        Some(n) => Some(n),
        None => count("max_tokens")?,
    };
    let stream = match body.get("stream") {
        None | Some(Value::Null) => false,
        Some(Value::Bool(b)) => *b,
        Some(_) => return Err(bad("stream", "must be true or false")),
    };
    let include_usage = match body.get("stream_options") {
        None | Some(Value::Null) => false,
        Some(Value::Object(o)) => match o.get("include_usage") {
            None | Some(Value::Null) => false,
            Some(Value::Bool(b)) => *b,
            Some(_) => return Err(bad("stream_options.include_usage", "must be true or false")),
        },
        Some(_) => return Err(bad("stream_options", "must be an object")),
    };
    let prompt_tokens = estimate_prompt(body.get("messages"))?;
    Ok(ChatRequest {
        model,
        max_output_tokens,
        stream,
        include_usage,
        prompt_tokens,
        body,
    })
}

/// The prompt's tokens: a few per message, and a token per four characters
/// of its text (string content, or the text parts of an array).
fn estimate_prompt(messages: Option<&Value>) -> Result<u64, BadBody> {
    let Some(Value::Array(messages)) = messages else {
        return Err(bad("messages", "must be an array of messages"));
    };
    if messages.is_empty() {
        return Err(bad("messages", "must not be empty"));
    }
    let mut chars = 0u64;
    for (i, m) in messages.iter().enumerate() {
        let Value::Object(m) = m else {
            return Err(bad(format!("messages[{i}]"), "must be an object"));
        };
        match m.get("role") {
            Some(Value::String(r)) if !r.is_empty() => chars += r.len() as u64,
            _ => return Err(bad(format!("messages[{i}].role"), "must be a non-empty string")),
        }
        if let Some(Value::String(name)) = m.get("name") {
            chars += name.len() as u64;
        }
        match m.get("content") {
            None | Some(Value::Null) => {}
            Some(Value::String(s)) => chars += s.chars().count() as u64,
            Some(Value::Array(parts)) => {
                for part in parts {
                    if let Some(Value::String(t)) = part.get("text") {
                        chars += t.chars().count() as u64;
                    }
                }
            }
            Some(_) => {
                return Err(bad(
                    format!("messages[{i}].content"),
                    "must be a string or an array of parts",
                ));
            }
        }
    }
    Ok(TOKENS_FOR_REPLY + TOKENS_PER_MESSAGE * messages.len() as u64 + chars.div_ceil(CHARS_PER_TOKEN))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_fields_it_acts_on() {
        let r = parse(
            br#"{"model":"gpt-4o","messages":[{"role":"user","content":"Hello there, how are you?"}],
                "max_tokens":50,"max_completion_tokens":70,"stream":true,"stream_options":{"include_usage":true}}"#,
        )
        .unwrap();
        assert_eq!(r.model.as_deref(), Some("gpt-4o"));
        assert_eq!(r.max_output_tokens, Some(70), "max_completion_tokens wins");
        assert!(r.stream && r.include_usage);
        // 3 + 4 per message + ceil((4 + 25) / 4).
        assert_eq!(r.prompt_tokens, 3 + 4 + 8);
    }

    #[test]
    fn text_parts_count_and_other_parts_do_not() {
        let r = parse(
            br#"{"messages":[{"role":"user","content":[{"type":"text","text":"abcdefgh"},{"type":"image_url","image_url":{"url":"x"}}]}]}"#,
        )
        .unwrap();
        assert_eq!(r.model, None);
        assert_eq!(r.max_output_tokens, None);
        assert_eq!(r.prompt_tokens, 3 + 4 + 3);
    }

    #[test]
    fn a_bad_body_names_its_field() {
        let field = |b: &[u8]| parse(b).unwrap_err().field;
        assert_eq!(field(b"{"), "body");
        assert_eq!(field(b"[1]"), "body");
        assert_eq!(field(br#"{"model":"m"}"#), "messages");
        assert_eq!(field(br#"{"messages":[]}"#), "messages");
        assert_eq!(field(br#"{"messages":[{"role":"user"}, 3]}"#), "messages[1]");
        assert_eq!(field(br#"{"messages":[{"content":"x"}]}"#), "messages[0].role");
        assert_eq!(
            field(br#"{"messages":[{"role":"user","content":5}]}"#),
            "messages[0].content"
        );
        let ok = r#""messages":[{"role":"user","content":"x"}]"#;
        assert_eq!(field(format!(r#"{{{ok},"model":7}}"#).as_bytes()), "model");
        assert_eq!(
            field(format!(r#"{{{ok},"max_tokens":-1}}"#).as_bytes()),
            "max_tokens"
        );
        assert_eq!(
            field(format!(r#"{{{ok},"max_completion_tokens":"9"}}"#).as_bytes()),
            "max_completion_tokens"
        );
        assert_eq!(field(format!(r#"{{{ok},"stream":"yes"}}"#).as_bytes()), "stream");
        assert_eq!(
            field(format!(r#"{{{ok},"stream_options":1}}"#).as_bytes()),
            "stream_options"
        );
        assert_eq!(
            field(format!(r#"{{{ok},"stream_options":{{"include_usage":1}}}}"#).as_bytes()),
            "stream_options.include_usage"
        );
    }
}
