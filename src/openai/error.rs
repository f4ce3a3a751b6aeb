//! OpenAI's error body, `{"error": {"message", "type", "param", "code"}}`,
//! which the SDKs read for the exception they raise.

use serde_json::{Value, json};

/// The longest message an error body carries (a provider's or ours).
pub const MAX_MESSAGE_BYTES: usize = 512;

/// The error body; `message` is cut to `MAX_MESSAGE_BYTES`.
pub fn body(message: &str, kind: &str, code: Option<&str>, param: Option<&str>) -> Vec<u8> {
    let message = crate::excerpt::truncate(message, MAX_MESSAGE_BYTES);
    let v = json!({"error": {"message": message, "type": kind, "param": param, "code": code}});
    serde_json::to_vec(&v).unwrap_or_default()
}

/// The message of an error body, when it has one.
pub fn message(body: &[u8]) -> Option<String> {
    let v: Value = serde_json::from_slice(body).ok()?;
    let m = v.get("error")?.get("message")?.as_str()?;
    Some(crate::excerpt::truncate(m, MAX_MESSAGE_BYTES).into_owned())
}
