//! OpenAI's HTTP API as the dispatcher meets it: the chat-completions body
//! (`chat`), the rate-limit headers and their duration strings
//! (`rate_limit`), and the error body (`error`). Shared by `region-sim
//! --openai` (the provider side) and the dispatcher's OpenAI-compatible
//! regions and front door, so both ends read and write the same wire.
//! Pure: no I/O, no clock.

pub mod chat;
pub mod error;
pub mod key;
pub mod rate_limit;

/// Which flavour of the API a provider speaks: where the chat call goes and
/// which header carries the key.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Dialect {
    /// `POST /v1/chat/completions`, `Authorization: Bearer KEY`.
    #[default]
    OpenAi,
    /// `POST /openai/deployments/{deployment}/chat/completions?api-version=…`,
    /// `api-key: KEY`.
    Azure,
}

impl Dialect {
    pub fn as_str(self) -> &'static str {
        match self {
            Dialect::OpenAi => "openai",
            Dialect::Azure => "azure",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "openai" => Some(Dialect::OpenAi),
            "azure" => Some(Dialect::Azure),
            _ => None,
        }
    }
}
