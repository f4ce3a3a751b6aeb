//! Rollouts at the edge: a request naming an alias is sent to one of its
//! targets (`core::rollout`), counted per alias and target; operators
//! change the weights live (Admin) and a reload puts the configured ones
//! back.
//!
//! Owner: `RolloutDesk::rollouts`, one `Mutex`, held for one pick, one
//! weight change or one copy for Admin.

use std::sync::atomic::{AtomicBool, Ordering};

use parking_lot::Mutex;

use crate::config::Config;
use crate::core::{RolloutError, RolloutPick, RolloutSpec, Rollouts};
use crate::pb;

pub struct RolloutDesk {
    rollouts: Mutex<Rollouts>,
    /// Whether any alias is configured: without one, requests skip the lock.
    any: AtomicBool,
}

impl RolloutDesk {
    pub fn new(config: &Config) -> Self {
        Self {
            rollouts: Mutex::new(Rollouts::new(config.policy.rollouts.clone(), config.routing.seed)),
            any: AtomicBool::new(!config.policy.rollouts.is_empty()),
        }
    }

    /// After a reload: the configured weights win over live changes.
    pub fn apply(&self, config: &Config) {
        let mut rollouts = self.rollouts.lock();
        rollouts.apply(config.policy.rollouts.clone());
        self.any.store(!rollouts.specs().is_empty(), Ordering::Relaxed);
    }

    /// When `r` names an alias: sets its model to the target picked and
    /// returns the alias (empty when it names a model).
    pub fn resolve(&self, r: &mut pb::DispatchRequest) -> String {
        if !self.any.load(Ordering::Relaxed) {
            return String::new();
        }
        let pick = {
            let mut rollouts = self.rollouts.lock();
            if !rollouts.is_alias(&r.model) {
                return String::new();
            }
            rollouts.pick(&r.model, |label| r.labels.get(label).map(String::as_str))
        };
        let Some(RolloutPick {
            alias,
            target,
            sticky,
        }) = pick
        else {
            return String::new();
        };
        tracing::debug!(%alias, %target, sticky, "rollout target picked");
        if crate::metrics::enabled() {
            metrics::counter!(
                "dispatcher_rollout_requests_total",
                "alias" => alias.clone(),
                "target" => target.clone(),
            )
            .increment(1);
        }
        r.model = target;
        alias
    }

    /// The models `name` may be served by: an alias's targets with a
    /// weight above zero, or `name` itself.
    pub fn targets(&self, name: &str) -> Vec<String> {
        if self.any.load(Ordering::Relaxed)
            && let Some(spec) = self.rollouts.lock().specs().iter().find(|s| s.alias == name)
        {
            return spec
                .targets
                .iter()
                .filter(|(_, w)| *w > 0.0)
                .map(|(m, _)| m.clone())
                .collect();
        }
        vec![name.to_string()]
    }

    /// Like `resolve`, consuming no draw (for `Route`).
    pub fn peek(&self, r: &pb::DispatchRequest) -> Option<RolloutPick> {
        self.rollouts
            .lock()
            .peek(&r.model, |label| r.labels.get(label).map(String::as_str))
    }

    pub fn set_weights(&self, alias: &str, weights: &[(String, f64)]) -> Result<RolloutSpec, RolloutError> {
        let mut rollouts = self.rollouts.lock();
        rollouts.set_weights(alias, weights)?;
        Ok(rollouts
            .specs()
            .iter()
            .find(|s| s.alias == alias)
            .cloned()
            .expect("the alias just changed"))
    }

    pub fn list(&self) -> Vec<RolloutSpec> {
        self.rollouts.lock().specs().to_vec()
    }
}
