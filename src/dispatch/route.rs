//! Budget-aware routes at the edge: a request naming a `[[routes]]` alias
//! gets its model chosen here (`core::route::choose`), from each
//! candidate's facts for this request: its token estimate, its worst-case
//! cost at its dearest price, its estimated time from the latency averages
//! the router keeps (`core::route::estimated_time`), and whether the request
//! can use it (its size, the tenant's allow-list). Then the chosen model's
//! rollout (a candidate may be a rollout alias) and fallback chain apply, as
//! for a request that named it.
//!
//! A request that names no route pays for one probe of the snapshot's
//! route table, and nothing when no route is configured.
//!
//! Owns no state: the routes are in the configuration snapshot.

use std::sync::Arc;
use std::time::{Duration, Instant};

use super::front_door::Snapshot;
use super::{DispatchError, Engine, Violation};
use crate::core::route::{self, CandidateFacts, RouteAsk, RouteChoice, RouteSpec};
use crate::pb;

/// `max_cost` in micro-units (`None`: no ceiling).
pub(super) fn max_cost(r: &pb::DispatchRequest) -> Result<Option<u64>, DispatchError> {
    if r.max_cost.is_empty() {
        return Ok(None);
    }
    parse_amount(&r.max_cost).map(Some).ok_or_else(|| {
        DispatchError::InvalidArgument(vec![Violation::new(
            "max_cost",
            format!(
                "{} is not an amount; expected a decimal such as \"0.05\" with at most six decimals",
                crate::excerpt::excerpt(&r.max_cost)
            ),
        )])
    })
}

/// "12.345678" → 12_345_678 micro-units; refuses signs, exponents, a
/// seventh decimal and anything above a million units.
fn parse_amount(s: &str) -> Option<u64> {
    let (whole, frac) = s.split_once('.').unwrap_or((s, ""));
    let digits = |d: &str| d.bytes().all(|b| b.is_ascii_digit());
    if whole.is_empty() && frac.is_empty() || !digits(whole) || !digits(frac) || frac.len() > 6 {
        return None;
    }
    if whole.len() > 6 {
        return None;
    }
    let whole: u64 = if whole.is_empty() { 0 } else { whole.parse().ok()? };
    let frac: u64 = if frac.is_empty() {
        0
    } else {
        format!("{frac:0<6}").parse().ok()?
    };
    Some(whole * crate::core::cost::MICROS_PER_UNIT + frac)
}

/// The caller's latency budget: `latency_budget`, or its deadline, the
/// smaller when both are given.
fn latency_budget(
    r: &pb::DispatchRequest,
    timeout: Option<Duration>,
) -> Result<Option<Duration>, DispatchError> {
    let field = match r.latency_budget {
        None => None,
        Some(d) => Some(Duration::try_from(d).map_err(|_| {
            DispatchError::InvalidArgument(vec![Violation::new(
                "latency_budget",
                "must be a positive duration",
            )])
        })?),
    };
    Ok(match (field, timeout) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    })
}

/// `Route`'s answer: the route's decision, if the request named one, then
/// the plan of the model it names (or the route chose).
pub struct RoutePlanView {
    pub route: Option<pb::RouteChoice>,
    pub steps: Vec<super::RouteStepView>,
}

/// A route's decision for one request, with each candidate's facts.
pub struct RouteView {
    pub spec: Arc<RouteSpec>,
    pub facts: Vec<CandidateFacts>,
    pub choice: RouteChoice,
}

impl RouteView {
    /// The model (or rollout alias) chosen.
    pub fn chosen(&self) -> Option<&str> {
        self.choice.chosen.map(|i| self.spec.candidates[i].as_str())
    }

    /// `Route`'s account of it.
    pub fn to_pb(&self, currency: &str) -> pb::RouteChoice {
        let rule = self.choice.rule.map_or(String::new(), |i| {
            self.spec.rules[i]
                .labels
                .iter()
                .map(|(k, v)| format!("{k}={v}"))
                .collect::<Vec<_>>()
                .join(",")
        });
        pb::RouteChoice {
            name: self.spec.name.clone(),
            chosen: self.chosen().unwrap_or_default().to_string(),
            reason: self.choice.reason.clone(),
            rule,
            candidates: self
                .spec
                .candidates
                .iter()
                .zip(&self.facts)
                .zip(&self.choice.verdicts)
                .map(|((model, f), v)| pb::RouteCandidate {
                    model: model.clone(),
                    chosen: *v == crate::core::Verdict::Chosen,
                    worst_case: Some(super::spend::wire(f.worst_case, currency, f.worst_case > 0)),
                    estimated_time: f.time.and_then(|t| t.try_into().ok()),
                    verdict: v.describe(),
                })
                .collect(),
        }
    }
}

impl Engine {
    /// Route `spec`'s decision for `r` (named by `r.model`, unchanged).
    pub(super) fn decide_route(
        &self,
        config: &Snapshot,
        spec: Arc<RouteSpec>,
        tenant: &str,
        r: &mut pb::DispatchRequest,
        timeout: Option<Duration>,
        now: Instant,
    ) -> Result<RouteView, DispatchError> {
        let ask = RouteAsk {
            max_cost: max_cost(r)?,
            latency_budget: latency_budget(r, timeout)?,
        };
        let name = std::mem::take(&mut r.model);
        let facts: Vec<CandidateFacts> = spec
            .candidates
            .iter()
            .map(|c| self.candidate_facts(config, tenant, r, c, now))
            .collect();
        r.model = name;
        let choice = route::choose(&spec, |l| r.labels.get(l).map(String::as_str), &facts, ask);
        Ok(RouteView { spec, facts, choice })
    }

    /// Chooses the model of a request naming a route (sets `r.model`) and
    /// returns the route's name; a request naming none is left alone.
    pub(super) fn resolve_route(
        &self,
        config: &Snapshot,
        tenant: &str,
        r: &mut pb::DispatchRequest,
        timeout: Option<Duration>,
    ) -> Result<String, DispatchError> {
        // The one probe a request naming no route pays for.
        let Some(spec) = config.route(&r.model) else {
            return Ok(String::new());
        };
        let view = self.decide_route(config, spec, tenant, r, timeout, crate::clock::now())?;
        let Some(chosen) = view.chosen() else {
            let field = if view.choice.reason.contains("max_cost") {
                "max_cost"
            } else {
                "model"
            };
            let why: Vec<String> = view
                .spec
                .candidates
                .iter()
                .zip(&view.choice.verdicts)
                .map(|(c, v)| format!("{c}: {}", v.describe()))
                .collect();
            return Err(DispatchError::InvalidArgument(vec![Violation::new(
                field,
                format!(
                    "route {:?}: {} ({})",
                    view.spec.name,
                    view.choice.reason,
                    why.join("; ")
                ),
            )]));
        };
        tracing::debug!(route = %view.spec.name, model = %chosen, reason = %view.choice.reason, "route chose");
        if crate::metrics::enabled() {
            metrics::counter!(
                "dispatcher_route_requests_total",
                "route" => view.spec.name.clone(),
                "model" => chosen.to_string(),
            )
            .increment(1);
        }
        r.model = chosen.to_string();
        Ok(view.spec.name.clone())
    }

    /// One candidate's facts for `r` (whose `model` is empty here). A
    /// rollout alias stands for its targets: its worst case and time are
    /// its dearest and slowest target's (any of them may be drawn).
    fn candidate_facts(
        &self,
        config: &Snapshot,
        tenant: &str,
        r: &mut pb::DispatchRequest,
        candidate: &str,
        now: Instant,
    ) -> CandidateFacts {
        let targets = self.rollouts.targets(candidate);
        let mut facts = CandidateFacts::default();
        for target in targets {
            r.model = target;
            let checked = config.check(r).and_then(|estimate| {
                self.desk.tenant_may_use(tenant, &r.model)?;
                Ok(estimate)
            });
            match checked {
                Err(e) => {
                    facts.unusable = Some(e.to_string());
                    break;
                }
                Ok(estimate) => {
                    let worst = config
                        .prices
                        .worst_case(&r.model, estimate.prompt, estimate.max_output);
                    facts.worst_case = facts.worst_case.max(worst);
                    let time = self.desk.estimated_time(&r.model, estimate.total(), now);
                    facts.time = facts.time.max(time);
                }
            }
        }
        r.model.clear();
        facts
    }
}

impl super::QuotaDesk {
    /// `core::route::estimated_time` on the router now.
    pub(super) fn estimated_time(&self, model: &str, tokens: u64, now: Instant) -> Option<Duration> {
        route::estimated_time(self.lock().scheduler.router(), model, tokens, now)
    }
}

#[cfg(test)]
mod tests {
    use super::parse_amount;

    #[test]
    fn amounts_parse_exactly() {
        assert_eq!(parse_amount("0.05"), Some(50_000));
        assert_eq!(parse_amount("12"), Some(12_000_000));
        assert_eq!(parse_amount(".5"), Some(500_000));
        assert_eq!(parse_amount("1.000001"), Some(1_000_001));
        for bad in ["", ".", "-1", "1e3", "0.0000001", "1,5", " 1", "1234567", "0x10"] {
            assert_eq!(parse_amount(bad), None, "{bad:?}");
        }
    }
}
