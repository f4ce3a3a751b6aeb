//! What a cached reply is stored under: a digest of the facts that decide
//! what the reply is and who may see it, and nothing the caller could use
//! to reach another caller's entry.
//!
//! The key covers the authenticated tenant (never the request's `tenant`
//! field), the model actually asked for (a rollout alias resolved), the
//! caller's scope (role, permission scope, data version), the payload,
//! `max_output_tokens`, and the version of that model's routing
//! configuration: a reload that changes the model's settings, its fallback
//! chain or an alias naming it changes the key, so nothing decided under
//! the old configuration is served under the new one. Every field is
//! length-prefixed, so no two different sets of fields hash the same input.

use sha2::{Digest, Sha256};

use super::{FallbackSpec, ModelSpec, RolloutSpec};

/// A cache key: SHA-256 over the fields above.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct CacheKey(pub [u8; 32]);

impl CacheKey {
    /// Lower-case hex, for the shared layer's keys.
    pub fn hex(&self) -> String {
        hex(&self.0)
    }
}

/// Bumped when the key's inputs or their encoding change, so an old
/// replica's entries are never read as a new one's.
const DOMAIN: &[u8] = b"dispatcher.cache.v1";

/// What a reply's key is made of.
#[derive(Debug, Clone, Copy)]
pub struct KeyFacts<'a> {
    /// The authenticated tenant.
    pub tenant: &'a str,
    /// The model asked for, after rollout resolution.
    pub model: &'a str,
    /// `routing_version` of that model in the configuration in force.
    pub model_version: u64,
    pub scope: &'a str,
    pub payload: &'a [u8],
    /// As the caller gave it (0: the model's default, which the model's
    /// version covers).
    pub max_output_tokens: u64,
}

impl KeyFacts<'_> {
    pub fn key(&self) -> CacheKey {
        let mut h = Sha256::new();
        field(&mut h, DOMAIN);
        field(&mut h, self.tenant.as_bytes());
        field(&mut h, self.model.as_bytes());
        field(&mut h, &self.model_version.to_le_bytes());
        field(&mut h, self.scope.as_bytes());
        field(&mut h, self.payload);
        field(&mut h, &self.max_output_tokens.to_le_bytes());
        CacheKey(h.finalize().into())
    }
}

fn field(h: &mut Sha256, bytes: &[u8]) {
    h.update((bytes.len() as u64).to_le_bytes());
    h.update(bytes);
}

/// A scope's tag, to purge one tenant's entries under one scope.
pub fn scope_tag(scope: &str) -> u64 {
    let d = Sha256::digest(scope.as_bytes());
    u64::from_le_bytes(d[..8].try_into().expect("eight bytes"))
}

/// The version of `model`'s routing configuration: its own settings, its
/// prices (`prices`: `core::Prices::describe`), its fallback chain, and the
/// rollout aliases that name it. Equal
/// configurations give equal versions in every process (no per-process
/// seed), so replicas share keys.
pub fn routing_version(
    model: &ModelSpec,
    fallbacks: &[FallbackSpec],
    rollouts: &[RolloutSpec],
    prices: &str,
) -> u64 {
    let mut h = Sha256::new();
    field(&mut h, format!("{model:?}").as_bytes());
    field(&mut h, prices.as_bytes());
    for f in fallbacks.iter().filter(|f| f.model == model.name) {
        field(&mut h, format!("{f:?}").as_bytes());
    }
    for r in rollouts
        .iter()
        .filter(|r| r.targets.iter().any(|(m, _)| *m == model.name))
    {
        field(&mut h, format!("{r:?}").as_bytes());
    }
    let d = h.finalize();
    u64::from_le_bytes(d[..8].try_into().expect("eight bytes"))
}

/// Lower-case hex of `bytes`.
pub fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write;
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        let _ = write!(s, "{b:02x}");
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::Trigger;

    fn facts() -> KeyFacts<'static> {
        KeyFacts {
            tenant: "a",
            model: "gpt-4o",
            model_version: 7,
            scope: "role=reader",
            payload: b"hello",
            max_output_tokens: 100,
        }
    }

    #[test]
    fn every_fact_changes_the_key() {
        let base = facts().key();
        assert_eq!(base, facts().key());
        let changed = [
            KeyFacts {
                tenant: "b",
                ..facts()
            },
            KeyFacts {
                model: "mini",
                ..facts()
            },
            KeyFacts {
                model_version: 8,
                ..facts()
            },
            KeyFacts {
                scope: "role=admin",
                ..facts()
            },
            KeyFacts {
                payload: b"hellO",
                ..facts()
            },
            KeyFacts {
                max_output_tokens: 101,
                ..facts()
            },
        ];
        for f in changed {
            assert_ne!(f.key(), base, "{f:?}");
        }
    }

    #[test]
    fn fields_cannot_be_shifted_into_each_other() {
        // Without length prefixes "ab" + "" and "a" + "b" would hash alike.
        let one = KeyFacts {
            tenant: "ab",
            scope: "",
            ..facts()
        };
        let two = KeyFacts {
            tenant: "a",
            scope: "b",
            ..facts()
        };
        assert_ne!(one.key(), two.key());
    }

    fn model(name: &str, default_max_output_tokens: u64) -> ModelSpec {
        ModelSpec {
            name: name.into(),
            default_max_output_tokens,
            chars_per_token: 4.0,
            max_request_tokens: 1000,
        }
    }

    #[test]
    fn the_version_follows_the_model_its_chain_and_its_aliases_only() {
        let m = model("gpt-4o", 100);
        let base = routing_version(&m, &[], &[], "");
        assert_eq!(base, routing_version(&model("gpt-4o", 100), &[], &[], ""));
        assert_ne!(base, routing_version(&model("gpt-4o", 200), &[], &[], ""));
        let chain = FallbackSpec {
            model: "gpt-4o".into(),
            then: vec!["mini".into()],
            on: vec![Trigger::NoQuota],
            first_byte_timeout: None,
        };
        assert_ne!(base, routing_version(&m, std::slice::from_ref(&chain), &[], ""));
        // Another model's chain is not this model's routing.
        let other = FallbackSpec {
            model: "mini".into(),
            ..chain
        };
        assert_eq!(base, routing_version(&m, &[other], &[], ""));
        let alias = RolloutSpec {
            alias: "smart".into(),
            session_label: None,
            targets: vec![("gpt-4o".into(), 90.0), ("mini".into(), 10.0)],
        };
        assert_ne!(base, routing_version(&m, &[], std::slice::from_ref(&alias), ""));
        let elsewhere = RolloutSpec {
            targets: vec![("mini".into(), 1.0)],
            ..alias
        };
        assert_eq!(base, routing_version(&m, &[], &[elsewhere], ""));
        // A reload that changes its price.
        let priced =
            crate::core::Prices::new("USD", [("gpt-4o".to_string(), crate::core::Price::default())], []);
        assert_ne!(base, routing_version(&m, &[], &[], &priced.describe("gpt-4o")));
    }
}
