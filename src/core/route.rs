//! Budget-aware routes: an alias (`[[routes]]`) that chooses its model per
//! request from a list of candidates, by rules on the request's labels, the
//! caller's cost ceiling and its latency budget. Pure: the edge works out
//! each candidate's facts (its worst-case cost at its price, its estimated
//! time from the latency averages the router keeps) and passes them in; this
//! says which candidate serves and why. The chosen model's rollout and
//! fallbacks apply after it (`dispatch::route`).
//!
//! The order, on the candidates of the first rule whose labels all match
//! (all of them when none matches):
//! 1. a candidate the request cannot use (too large for it, not allowed to
//!    the tenant) is out;
//! 2. with `max_cost`, a candidate whose worst case (prompt + max output at
//!    its dearest price) passes it is out, and if none is left the request
//!    is refused;
//! 3. with a latency budget, a candidate whose estimated time passes it is
//!    out, unless none would be left: then the fastest known stays (a time
//!    is an estimate; the deadline itself still holds the request);
//! 4. of those left: with `max_cost`, the cheapest (the caller asked to
//!    spend little); else the first in the route's order (the operator's
//!    preference). Ties keep the route's order.

use std::time::{Duration, Instant};

use super::router::Router;

/// A rule: requests whose labels all match use `candidates` (some of the
/// route's).
#[derive(Debug, Clone, PartialEq)]
pub struct RouteRule {
    pub labels: Vec<(String, String)>,
    pub candidates: Vec<String>,
}

/// A route, validated: its candidates are models or rollout aliases, each
/// once; each rule names some of them.
#[derive(Debug, Clone, PartialEq)]
pub struct RouteSpec {
    pub name: String,
    /// In order of preference.
    pub candidates: Vec<String>,
    pub rules: Vec<RouteRule>,
}

/// What the edge knows of one candidate for one request.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct CandidateFacts {
    /// The most the request can cost with it (micro-units; 0 unpriced).
    pub worst_case: u64,
    /// How long it would take, from the observed latency of the regions
    /// serving it (`None`: none has answered yet).
    pub time: Option<Duration>,
    /// Why the request cannot use it (`None`: it can).
    pub unusable: Option<String>,
}

/// What the caller asked of the route.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct RouteAsk {
    pub max_cost: Option<u64>,
    pub latency_budget: Option<Duration>,
}

/// Why a candidate was or was not chosen.
#[derive(Debug, Clone, PartialEq)]
pub enum Verdict {
    Chosen,
    /// Not among the matching rule's candidates.
    NotInRule,
    Unusable(String),
    OverCost {
        worst_case: u64,
        max_cost: u64,
    },
    TooSlow {
        time: Duration,
        budget: Duration,
    },
    /// It fits, but another was preferred (cheaper, or earlier in order).
    Passed,
}

impl Verdict {
    pub fn describe(&self) -> String {
        match self {
            Verdict::Chosen => "chosen".into(),
            Verdict::NotInRule => "not a candidate of the matching rule".into(),
            Verdict::Unusable(why) => why.clone(),
            Verdict::OverCost { worst_case, max_cost } => format!(
                "may cost up to {}, above max_cost {}",
                super::cost::format_micros(*worst_case),
                super::cost::format_micros(*max_cost)
            ),
            Verdict::TooSlow { time, budget } => {
                format!("estimated {time:?}, above the latency budget {budget:?}")
            }
            Verdict::Passed => "fits; another was preferred".into(),
        }
    }
}

/// A route's decision for one request.
#[derive(Debug, Clone, PartialEq)]
pub struct RouteChoice {
    /// Index into the route's candidates; `None`: refused (see `reason`).
    pub chosen: Option<usize>,
    /// The rule that matched (index into the route's rules).
    pub rule: Option<usize>,
    /// Why this one (or why none), in a sentence.
    pub reason: String,
    /// One per candidate, in the route's order.
    pub verdicts: Vec<Verdict>,
}

/// Chooses `spec`'s candidate for a request. `facts` are per candidate,
/// in the route's order; `label` looks up a request label by name.
pub fn choose<'a>(
    spec: &RouteSpec,
    label: impl Fn(&str) -> Option<&'a str>,
    facts: &[CandidateFacts],
    ask: RouteAsk,
) -> RouteChoice {
    debug_assert_eq!(facts.len(), spec.candidates.len());
    let rule = spec
        .rules
        .iter()
        .position(|r| r.labels.iter().all(|(k, v)| label(k) == Some(v.as_str())));
    let mut verdicts: Vec<Option<Verdict>> = spec
        .candidates
        .iter()
        .zip(facts)
        .map(|(c, f)| {
            if rule.is_some_and(|i| !spec.rules[i].candidates.contains(c)) {
                Some(Verdict::NotInRule)
            } else {
                f.unusable.clone().map(Verdict::Unusable)
            }
        })
        .collect();
    let open = |v: &[Option<Verdict>]| -> Vec<usize> { (0..v.len()).filter(|i| v[*i].is_none()).collect() };
    let refuse = |verdicts: Vec<Option<Verdict>>, reason: String| RouteChoice {
        chosen: None,
        rule,
        reason,
        verdicts: verdicts
            .into_iter()
            .map(|v| v.unwrap_or(Verdict::Passed))
            .collect(),
    };
    if open(&verdicts).is_empty() {
        return refuse(verdicts, "no candidate can take the request".into());
    }
    if let Some(max_cost) = ask.max_cost {
        for i in open(&verdicts) {
            if facts[i].worst_case > max_cost {
                verdicts[i] = Some(Verdict::OverCost {
                    worst_case: facts[i].worst_case,
                    max_cost,
                });
            }
        }
        if open(&verdicts).is_empty() {
            return refuse(
                verdicts,
                format!(
                    "every candidate may cost more than max_cost {}",
                    super::cost::format_micros(max_cost)
                ),
            );
        }
    }
    let mut slow_kept = false;
    if let Some(budget) = ask.latency_budget {
        let left = open(&verdicts);
        let slow: Vec<usize> = left
            .iter()
            .copied()
            .filter(|i| facts[*i].time.is_some_and(|t| t > budget))
            .collect();
        // None would be left: the fastest stays (estimates are estimates).
        let keep = (slow.len() == left.len())
            .then(|| slow.iter().copied().min_by_key(|i| facts[*i].time))
            .flatten();
        for i in slow {
            if Some(i) != keep {
                verdicts[i] = Some(Verdict::TooSlow {
                    time: facts[i].time.unwrap_or_default(),
                    budget,
                });
            }
        }
        slow_kept = keep.is_some();
    }
    let left = open(&verdicts);
    let chosen = if ask.max_cost.is_some() {
        *left
            .iter()
            .min_by_key(|i| facts[**i].worst_case)
            .expect("one is left")
    } else {
        left[0]
    };
    let reason = match (rule, ask.max_cost, slow_kept) {
        (_, _, true) => "no candidate is estimated within the latency budget: the fastest".to_string(),
        (_, Some(_), _) => "the cheapest candidate within max_cost".to_string(),
        (Some(r), None, _) => format!("rule {r} matched: its first candidate that fits"),
        (None, None, _) if ask.latency_budget.is_some() => {
            "the first candidate within the latency budget".to_string()
        }
        (None, None, _) => "the route's first candidate that can take it".to_string(),
    };
    verdicts[chosen] = Some(Verdict::Chosen);
    RouteChoice {
        chosen: Some(chosen),
        rule,
        reason,
        verdicts: verdicts
            .into_iter()
            .map(|v| v.unwrap_or(Verdict::Passed))
            .collect(),
    }
}

/// How long `tokens` of `model` would take now in the fastest region that
/// serves it and could take work (not drained, healthy, circuit not open),
/// from its smoothed latency per 1,000 tokens. `None`: no such region has
/// answered yet (or `model` is unknown).
pub fn estimated_time(router: &Router, model: &str, tokens: u64, now: Instant) -> Option<Duration> {
    let id = router.model_index(model)?;
    router
        .regions()
        .iter()
        .filter(|r| {
            r.quota(id).is_some()
                && !r.drained()
                && r.healthy()
                && !matches!(r.circuit(now), super::CircuitState::Open { .. })
        })
        .filter_map(|r| r.load().latency_per_1k_ms(now))
        .map(|ms_per_1k| ms_per_1k * tokens as f64 / 1000.0)
        .min_by(f64::total_cmp)
        .map(|ms| Duration::from_secs_f64(ms.max(0.0) / 1000.0))
}

#[cfg(test)]
#[path = "route_tests.rs"]
mod tests;
