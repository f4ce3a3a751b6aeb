//! Who is calling: `authorization: Bearer <key>` → tenant, or a verified
//! client certificate (mTLS) whose name (a SAN) a tenant lists in its
//! `identities`; both kinds of caller in one deployment. A bearer key, when
//! sent, is what counts. Keys are stored only as SHA-256 hashes and compared
//! in constant time; a key never reaches a log line or a trace.

use std::collections::HashMap;
use std::sync::Arc;

use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use crate::config::Config;
use crate::tls::identity::PeerIdentity;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    #[error("missing credential: send `authorization: Bearer <key>`")]
    Missing,
    #[error("malformed authorization header: expected `Bearer <key>`")]
    Malformed,
    #[error("unknown API key")]
    Unknown,
    #[error("the client certificate names no tenant (no tenant lists its names in `identities`)")]
    UnknownIdentity,
}

/// What a caller presented: its `authorization` header, and the names of
/// its client certificate (verified by the TLS handshake).
#[derive(Debug, Clone, Default)]
pub struct Caller {
    pub authorization: Option<String>,
    pub identity: PeerIdentity,
    /// A job's run: the tenant authenticated when the job was submitted
    /// (set by the jobs desk only, never from the wire).
    pub submitted_as: Option<Arc<str>>,
}

impl From<Option<&str>> for Caller {
    fn from(authorization: Option<&str>) -> Self {
        Self {
            authorization: authorization.map(str::to_string),
            identity: PeerIdentity::default(),
            submitted_as: None,
        }
    }
}

pub struct Auth {
    keys: Vec<([u8; 32], Arc<str>)>,
    /// Client certificate name → tenant.
    identities: HashMap<String, Arc<str>>,
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
            identities: c
                .tenants
                .iter()
                .flat_map(|t| {
                    t.identities
                        .iter()
                        .map(|i| (i.clone(), Arc::from(t.spec.name.as_str())))
                })
                .collect(),
            anonymous: c
                .auth
                .allow_anonymous
                .then(|| Arc::from(c.auth.anonymous_tenant.as_str())),
        }
    }

    /// The tenant behind a caller's credentials: its bearer key if it sent
    /// one, else its certificate's names, else anonymous if allowed.
    pub fn authenticate(&self, caller: &Caller) -> Result<Arc<str>, AuthError> {
        if let Some(tenant) = &caller.submitted_as {
            return Ok(tenant.clone());
        }
        let Some(header) = caller.authorization.as_deref() else {
            let names = caller.identity.names();
            if names.is_empty() {
                return self.anonymous.clone().ok_or(AuthError::Missing);
            }
            return names
                .iter()
                .find_map(|n| self.identities.get(n).cloned())
                .ok_or(AuthError::UnknownIdentity);
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
            identities: [("client-a.example".to_string(), Arc::from("alpha"))].into(),
            anonymous: anonymous.then(|| "anon".into()),
        }
    }

    fn bearer(h: &str) -> Caller {
        Some(h).into()
    }

    fn certified(names: &[&str]) -> Caller {
        Caller {
            authorization: None,
            identity: PeerIdentity(names.iter().map(|n| n.to_string()).collect()),
            submitted_as: None,
        }
    }

    #[test]
    fn certificate_names_map_to_tenants_and_a_key_wins() {
        let a = auth(true);
        assert_eq!(
            a.authenticate(&certified(&["other.example", "client-a.example"]))
                .unwrap()
                .as_ref(),
            "alpha"
        );
        assert_eq!(
            a.authenticate(&certified(&["stranger.example"])),
            Err(AuthError::UnknownIdentity),
            "a certificate naming no tenant is refused, not taken as anonymous"
        );
        let both = Caller {
            authorization: Some("Bearer k-beta".into()),
            ..certified(&["client-a.example"])
        };
        assert_eq!(a.authenticate(&both).unwrap().as_ref(), "beta");
    }

    #[test]
    fn keys_map_to_tenants() {
        let a = auth(false);
        assert_eq!(
            a.authenticate(&bearer("Bearer k-alpha")).unwrap().as_ref(),
            "alpha"
        );
        assert_eq!(a.authenticate(&bearer("bearer k-beta")).unwrap().as_ref(), "beta");
        assert_eq!(a.authenticate(&bearer("Bearer nope")), Err(AuthError::Unknown));
        assert_eq!(a.authenticate(&bearer("k-alpha")), Err(AuthError::Malformed));
        assert_eq!(
            a.authenticate(&bearer("Basic k-alpha")),
            Err(AuthError::Malformed)
        );
        assert_eq!(a.authenticate(&Caller::default()), Err(AuthError::Missing));
    }

    #[test]
    fn anonymous_only_without_a_credential() {
        let a = auth(true);
        assert_eq!(a.authenticate(&Caller::default()).unwrap().as_ref(), "anon");
        assert_eq!(a.authenticate(&bearer("Bearer wrong")), Err(AuthError::Unknown));
    }

    #[test]
    fn hashes_are_sha256_hex() {
        assert_eq!(
            hash_key("abc"),
            "sha256:ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }
}
