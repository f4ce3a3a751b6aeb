//! An API key: held where nothing prints it. It has no `Display`, its
//! `Debug` says only that a key is there, and the one way to its text is
//! the header value it goes out in (`header`), marked sensitive so hyper
//! keeps it out of its own logs (and HPACK tables).

use http::HeaderValue;
use subtle::ConstantTimeEq;

#[derive(Clone)]
pub struct ApiKey(HeaderValue);

/// Why a text cannot be a key (never echoing the text).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BadKey {
    Empty,
    /// Characters a header cannot carry (a control character, say).
    NotHeaderText,
}

impl std::fmt::Display for BadKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            BadKey::Empty => "the key is empty",
            BadKey::NotHeaderText => "the key holds characters an HTTP header cannot carry",
        })
    }
}

impl ApiKey {
    /// The key in `text`, surrounding whitespace (a file's last newline)
    /// trimmed.
    pub fn new(text: &str) -> Result<Self, BadKey> {
        let t = text.trim();
        if t.is_empty() {
            return Err(BadKey::Empty);
        }
        let mut v = HeaderValue::from_str(t).map_err(|_| BadKey::NotHeaderText)?;
        v.set_sensitive(true);
        Ok(Self(v))
    }

    /// The key as it goes in `header` of the dialect: the whole value
    /// (`Bearer KEY` for OpenAI's `authorization`, the key itself for
    /// Azure's `api-key`). Sensitive, as the key is.
    pub fn header(&self, bearer: bool) -> HeaderValue {
        if !bearer {
            return self.0.clone();
        }
        let mut v = Vec::with_capacity(7 + self.0.len());
        v.extend_from_slice(b"Bearer ");
        v.extend_from_slice(self.0.as_bytes());
        let mut v = HeaderValue::from_bytes(&v).unwrap_or_else(|_| self.0.clone());
        v.set_sensitive(true);
        v
    }
}

impl std::fmt::Debug for ApiKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ApiKey(<redacted>)")
    }
}

impl PartialEq for ApiKey {
    fn eq(&self, other: &Self) -> bool {
        self.0.as_bytes().ct_eq(other.0.as_bytes()).into()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_key_never_prints() {
        let k = ApiKey::new("sk-very-secret\n").unwrap();
        assert_eq!(format!("{k:?}"), "ApiKey(<redacted>)");
        assert_eq!(k.header(false), "sk-very-secret");
        assert_eq!(k.header(true), "Bearer sk-very-secret");
        assert!(k.header(true).is_sensitive() && k.header(false).is_sensitive());
        // The header value's own Debug says "Sensitive", not the key.
        assert!(!format!("{:?}", k.header(true)).contains("secret"));
        assert_eq!(ApiKey::new("  "), Err(BadKey::Empty));
        assert_eq!(ApiKey::new("a\u{7}b"), Err(BadKey::NotHeaderText));
        assert_eq!(k, ApiKey::new("sk-very-secret").unwrap());
        assert_ne!(k, ApiKey::new("sk-other").unwrap());
    }
}
