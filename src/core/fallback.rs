//! Fallback chains: when a model cannot serve a request, the next model of
//! its chain may, but only on the typed triggers the chain names; any other
//! failure (a bad request, a tenant limit, an error after the work ran) is
//! the caller's answer as is. Plain data: the edge classifies its errors
//! into triggers (`dispatch::fallback`).

use std::fmt;
use std::time::Duration;

/// Why a step may give way to the next model.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Trigger {
    /// No region had quota for it within its wait.
    NoQuota,
    /// Every region serving it is down, drained, open-circuit or failed it
    /// without running the work.
    Unavailable,
    /// The request is larger than the model's limit.
    TooLarge,
    /// The region did not answer (its first output, for a stream) within
    /// the chain's `first_byte_timeout`.
    FirstByteTimeout,
}

impl Trigger {
    pub const ALL: [Trigger; 4] = [
        Trigger::NoQuota,
        Trigger::Unavailable,
        Trigger::TooLarge,
        Trigger::FirstByteTimeout,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Trigger::NoQuota => "no_quota",
            Trigger::Unavailable => "unavailable",
            Trigger::TooLarge => "too_large",
            Trigger::FirstByteTimeout => "first_byte_timeout",
        }
    }

    pub fn parse(s: &str) -> Option<Trigger> {
        Trigger::ALL.into_iter().find(|t| t.as_str() == s)
    }
}

impl fmt::Display for Trigger {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One model's chain, validated: every model is declared, none repeats.
#[derive(Debug, Clone, PartialEq)]
pub struct FallbackSpec {
    pub model: String,
    /// The models to try next, in order.
    pub then: Vec<String>,
    /// Which triggers move to the next model.
    pub on: Vec<Trigger>,
    /// With `first_byte_timeout` among the triggers: how long a step (its
    /// wait for quota included) may go without a first answer before the
    /// next model is tried. The last step has the request's whole deadline.
    pub first_byte_timeout: Option<Duration>,
}

/// The models a request may be served by, in order.
#[derive(Debug, Clone, PartialEq)]
pub struct Plan {
    pub steps: Vec<String>,
    pub on: Vec<Trigger>,
    pub first_byte_timeout: Option<Duration>,
}

impl Plan {
    /// `model`'s chain from `chains` (just `model` when it has none, or
    /// when the request forbids fallback).
    pub fn for_model(chains: &[FallbackSpec], model: &str, allow_fallback: bool) -> Plan {
        match chains
            .iter()
            .find(|c| c.model == model)
            .filter(|_| allow_fallback)
        {
            Some(c) => Plan {
                steps: std::iter::once(c.model.clone())
                    .chain(c.then.iter().cloned())
                    .collect(),
                on: c.on.clone(),
                first_byte_timeout: c.first_byte_timeout,
            },
            None => Plan {
                steps: vec![model.to_string()],
                on: Vec::new(),
                first_byte_timeout: None,
            },
        }
    }

    /// Whether `trigger` moves step `index` on to the next.
    pub fn falls_back(&self, index: usize, trigger: Trigger) -> bool {
        index + 1 < self.steps.len() && self.on.contains(&trigger)
    }

    /// The first-byte budget of step `index` (`None`: the request's deadline).
    pub fn step_budget(&self, index: usize) -> Option<Duration> {
        if index + 1 < self.steps.len() && self.on.contains(&Trigger::FirstByteTimeout) {
            self.first_byte_timeout
        } else {
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chain() -> Vec<FallbackSpec> {
        vec![FallbackSpec {
            model: "gpt-4o".into(),
            then: vec!["mini".into(), "local".into()],
            on: vec![Trigger::NoQuota, Trigger::FirstByteTimeout],
            first_byte_timeout: Some(Duration::from_secs(2)),
        }]
    }

    #[test]
    fn a_plan_follows_its_chain_on_its_triggers_only() {
        let p = Plan::for_model(&chain(), "gpt-4o", true);
        assert_eq!(p.steps, ["gpt-4o", "mini", "local"]);
        assert!(p.falls_back(0, Trigger::NoQuota));
        assert!(p.falls_back(1, Trigger::FirstByteTimeout));
        assert!(
            !p.falls_back(0, Trigger::Unavailable),
            "not a trigger of this chain"
        );
        assert!(!p.falls_back(2, Trigger::NoQuota), "nothing after the last step");
        assert_eq!(p.step_budget(0), Some(Duration::from_secs(2)));
        assert_eq!(p.step_budget(2), None, "the last step has the whole deadline");
    }

    #[test]
    fn no_chain_or_no_fallback_is_one_step() {
        assert_eq!(Plan::for_model(&chain(), "mini", true).steps, ["mini"]);
        let p = Plan::for_model(&chain(), "gpt-4o", false);
        assert_eq!(p.steps, ["gpt-4o"]);
        assert!(!p.falls_back(0, Trigger::NoQuota));
        assert_eq!(p.step_budget(0), None);
    }

    #[test]
    fn triggers_parse_their_names() {
        for t in Trigger::ALL {
            assert_eq!(Trigger::parse(t.as_str()), Some(t));
        }
        assert_eq!(Trigger::parse("anything"), None);
    }
}
