//! Who is calling: `authorization: Bearer <key>` → tenant. Keys are stored
//! only as SHA-256 hashes and compared in constant time; a key never reaches
//! a log line or a trace.

use std::sync::Arc;

use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use crate::config::Config;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    #[error("missing credential: send `authorization: Bearer <key>`")]
    Missing,
    #[error("malformed authorization header: expected `Bearer <key>`")]
    Malformed,
    #[error("unknown API key")]
    Unknown,
}

pub struct Auth {
    keys: Vec<([u8; 32], Arc<str>)>,
    anonymous: Option<Arc<str>>,
}

/// The SHA-256 of a key, as the config stores it: `sha256:<hex>`.
pub fn hash_key(key: &str) -> String {
    let digest = Sha256::digest(key.as_bytes());
    let hex: String = digest.iter().map(|b| format!("{b:02x}")).collect();
    format!("sha256:{hex}")
}

/// Whether `Bearer <key>` hashes to `expected`, in constant time.
pub fn bearer_matches(header: Option<&str>, expected: &[u8; 32]) -> bool {
    let Some((scheme, key)) = header.and_then(|h| h.trim().split_once(' ')) else {
        return false;
    };
    let presented: [u8; 32] = Sha256::digest(key.trim().as_bytes()).into();
    scheme.eq_ignore_ascii_case("bearer") && bool::from(expected.ct_eq(&presented))
}

impl Auth {
    pub fn from_config(c: &Config) -> Self {
        Self {
            keys: c
                .tenants
                .iter()
                .flat_map(|t| t.key_hashes.iter().map(|h| (*h, Arc::from(t.spec.name.as_str()))))
                .collect(),
            anonymous: c
                .auth
                .allow_anonymous
                .then(|| Arc::from(c.auth.anonymous_tenant.as_str())),
        }
    }

    /// The tenant behind an `authorization` header value (or its absence).
    pub fn authenticate(&self, header: Option<&str>) -> Result<Arc<str>, AuthError> {
        let Some(header) = header else {
            return self.anonymous.clone().ok_or(AuthError::Missing);
        };
        let (scheme, key) = header.trim().split_once(' ').ok_or(AuthError::Malformed)?;
        if !scheme.eq_ignore_ascii_case("bearer") || key.trim().is_empty() {
            return Err(AuthError::Malformed);
        }
        let presented: [u8; 32] = Sha256::digest(key.trim().as_bytes()).into();
        // Every stored hash is compared, match or not, in constant time.
        let mut found: Option<&Arc<str>> = None;
        for (hash, tenant) in &self.keys {
            if bool::from(hash.ct_eq(&presented)) {
                found = Some(tenant);
            }
        }
        found.cloned().ok_or(AuthError::Unknown)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::validate_key_hash;

    fn auth(anonymous: bool) -> Auth {
        Auth {
            keys: vec![
                (validate_key_hash(&hash_key("k-alpha")).unwrap(), "alpha".into()),
                (validate_key_hash(&hash_key("k-beta")).unwrap(), "beta".into()),
            ],
            anonymous: anonymous.then(|| "anon".into()),
        }
    }

    #[test]
    fn keys_map_to_tenants() {
        let a = auth(false);
        assert_eq!(a.authenticate(Some("Bearer k-alpha")).unwrap().as_ref(), "alpha");
        assert_eq!(a.authenticate(Some("bearer k-beta")).unwrap().as_ref(), "beta");
        assert_eq!(a.authenticate(Some("Bearer nope")), Err(AuthError::Unknown));
        assert_eq!(a.authenticate(Some("k-alpha")), Err(AuthError::Malformed));
        assert_eq!(a.authenticate(Some("Basic k-alpha")), Err(AuthError::Malformed));
        assert_eq!(a.authenticate(None), Err(AuthError::Missing));
    }

    #[test]
    fn anonymous_only_without_a_credential() {
        let a = auth(true);
        assert_eq!(a.authenticate(None).unwrap().as_ref(), "anon");
        assert_eq!(a.authenticate(Some("Bearer wrong")), Err(AuthError::Unknown));
    }

    #[test]
    fn hashes_are_sha256_hex() {
        assert_eq!(
            hash_key("abc"),
            "sha256:ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }
}
