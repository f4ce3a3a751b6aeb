//! Weighted rollouts: a model alias splits traffic across target models
//! by weight (90 % to a cheap model, 10 % to a premium one).
//!
//! A request that carries the alias's session label is sticky: its key is
//! hashed with each target (rendezvous hashing, weighted), so one
//! conversation stays on one target while the weights stay, and a weight
//! change moves only the sessions it must. Without the label, a weighted
//! draw from a seeded RNG (replayable). Pure: the RNG lives here, seeded
//! from `routing.seed`.

use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use thiserror::Error;

/// An alias and its targets, validated: target models exist, weights are
/// finite, not negative, and at least one is above zero.
#[derive(Debug, Clone, PartialEq)]
pub struct RolloutSpec {
    pub alias: String,
    /// The request label whose value keeps a session on one target.
    pub session_label: Option<String>,
    /// (model, weight), in config order.
    pub targets: Vec<(String, f64)>,
}

#[derive(Debug, Clone, PartialEq, Error)]
pub enum RolloutError {
    #[error("no rollout alias {alias:?}; configured: {known}")]
    UnknownAlias { alias: String, known: String },
    #[error("alias {alias:?} has no target {model:?}; its targets: {known}")]
    UnknownTarget {
        alias: String,
        model: String,
        known: String,
    },
    #[error("alias {alias:?}: target {model:?} is listed twice")]
    DuplicateTarget { alias: String, model: String },
    #[error("weight {weight} of {model:?} must be finite, at least 0 and at most 1e6")]
    BadWeight { model: String, weight: f64 },
    #[error("alias {alias:?}: at least one target needs a weight above 0")]
    AllZero { alias: String },
}

/// Which target a request goes to.
#[derive(Debug, Clone, PartialEq)]
pub struct RolloutPick {
    pub alias: String,
    pub target: String,
    /// Chosen by the session key (not by a draw).
    pub sticky: bool,
}

#[derive(Debug, Clone)]
pub struct Rollouts {
    specs: Vec<RolloutSpec>,
    rng: SmallRng,
}

impl Rollouts {
    pub fn new(specs: Vec<RolloutSpec>, seed: u64) -> Self {
        Self {
            specs,
            rng: SmallRng::seed_from_u64(seed),
        }
    }

    /// New aliases after a reload: the configured weights win over weights
    /// set live; the RNG goes on.
    pub fn apply(&mut self, specs: Vec<RolloutSpec>) {
        self.specs = specs;
    }

    pub fn specs(&self) -> &[RolloutSpec] {
        &self.specs
    }

    pub fn is_alias(&self, name: &str) -> bool {
        self.specs.iter().any(|s| s.alias == name)
    }

    /// Sets some of `alias`'s target weights live (the others keep theirs).
    /// All or nothing.
    pub fn set_weights(&mut self, alias: &str, weights: &[(String, f64)]) -> Result<(), RolloutError> {
        let known = self.known();
        let spec =
            self.specs
                .iter_mut()
                .find(|s| s.alias == alias)
                .ok_or_else(|| RolloutError::UnknownAlias {
                    alias: alias.to_string(),
                    known,
                })?;
        let mut next = spec.targets.clone();
        for (i, (model, weight)) in weights.iter().enumerate() {
            if !weight.is_finite() || !(0.0..=1e6).contains(weight) {
                return Err(RolloutError::BadWeight {
                    model: model.clone(),
                    weight: *weight,
                });
            }
            let target =
                next.iter_mut()
                    .find(|(m, _)| m == model)
                    .ok_or_else(|| RolloutError::UnknownTarget {
                        alias: alias.to_string(),
                        model: model.clone(),
                        known: spec
                            .targets
                            .iter()
                            .map(|(m, _)| m.as_str())
                            .collect::<Vec<_>>()
                            .join(", "),
                    })?;
            // Named after the lookup, so the name quoted is a configured one.
            if weights[..i].iter().any(|(m, _)| m == model) {
                return Err(RolloutError::DuplicateTarget {
                    alias: alias.to_string(),
                    model: model.clone(),
                });
            }
            target.1 = *weight;
        }
        if next.iter().all(|(_, w)| *w <= 0.0) {
            return Err(RolloutError::AllZero {
                alias: alias.to_string(),
            });
        }
        spec.targets = next;
        Ok(())
    }

    fn known(&self) -> String {
        let names: Vec<_> = self.specs.iter().map(|s| s.alias.as_str()).collect();
        if names.is_empty() {
            "none".into()
        } else {
            names.join(", ")
        }
    }

    /// The target for a request naming `model` (`None`: not an alias).
    /// `label` looks up a request label by name.
    pub fn pick<'a>(&mut self, model: &str, label: impl Fn(&str) -> Option<&'a str>) -> Option<RolloutPick> {
        let spec = self.specs.iter().find(|s| s.alias == model)?;
        let key = spec
            .session_label
            .as_deref()
            .and_then(label)
            .filter(|k| !k.is_empty());
        let (index, sticky) = match key {
            Some(key) => (sticky_index(&spec.targets, key), true),
            None => (drawn_index(&spec.targets, self.rng.random::<f64>()), false),
        };
        Some(RolloutPick {
            alias: spec.alias.clone(),
            target: spec.targets[index].0.clone(),
            sticky,
        })
    }

    /// Like `pick`, consuming no draw (for `Route`, a dry run).
    pub fn peek<'a>(&self, model: &str, label: impl Fn(&str) -> Option<&'a str>) -> Option<RolloutPick> {
        self.clone().pick(model, label)
    }
}

/// The target a uniform draw `u` in [0, 1) lands on, by weight.
fn drawn_index(targets: &[(String, f64)], u: f64) -> usize {
    let total: f64 = targets.iter().map(|(_, w)| w.max(0.0)).sum();
    let mut left = u * total;
    let mut last = 0;
    for (i, (_, w)) in targets.iter().enumerate() {
        if *w <= 0.0 {
            continue;
        }
        last = i;
        if left < *w {
            return i;
        }
        left -= w;
    }
    last
}

/// Weighted rendezvous hashing: each target scores `-ln(u) / weight`, `u`
/// a hash of (key, target) in (0, 1); the lowest wins. A target wins with
/// probability weight / total, and changing one weight moves only the
/// sessions that must move.
fn sticky_index(targets: &[(String, f64)], key: &str) -> usize {
    let mut best = (f64::INFINITY, 0);
    for (i, (model, w)) in targets.iter().enumerate() {
        if *w <= 0.0 {
            continue;
        }
        let h = fnv1a(key.as_bytes(), model.as_bytes());
        let u = ((h >> 11) as f64 + 0.5) / (1u64 << 53) as f64;
        let score = -u.ln() / w;
        if score < best.0 {
            best = (score, i);
        }
    }
    best.1
}

/// FNV-1a over `a`, a separator and `b`, then a final mix (splitmix64), so
/// nearby keys spread over the whole range. Stable across builds and
/// processes, unlike std's `DefaultHasher`.
fn fnv1a(a: &[u8], b: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for byte in a.iter().chain([0u8].iter()).chain(b) {
        h ^= u64::from(*byte);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h ^= h >> 30;
    h = h.wrapping_mul(0xbf58_476d_1ce4_e5b9);
    h ^= h >> 27;
    h = h.wrapping_mul(0x94d0_49bb_1331_11eb);
    h ^ (h >> 31)
}

#[cfg(test)]
#[path = "rollout_tests.rs"]
mod tests;
