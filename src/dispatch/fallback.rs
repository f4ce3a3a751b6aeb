//! Fallback chains at the edge: which failures are the typed triggers a
//! chain falls back on, and how a request moves to the next model of its
//! plan: its tenant's hold for the step it leaves is settled, then the next
//! model is checked on its own (the request's size against that model's
//! limits, the tenant's allow-list and limits), its tokens estimated with
//! that model's settings, and a new hold taken. A step the tenant may not
//! use, or that the request is too large for, is skipped.
//!
//! Owns no state: each request carries its own plan (`Prepared`).

use std::sync::Arc;
use std::time::Instant;

use super::front_door::Snapshot;
use super::lease::Lease;
use super::prepare::Prepared;
use super::{DispatchError, Engine};
use crate::core::{Plan, RoutePreview, RouteRequest, TenantHold, TokenEstimate, Trigger};
use crate::pb;

/// The trigger a failure of one step is, if any. `step_expired`: the
/// step's own budget (`first_byte_timeout`) ran out before the request's
/// deadline.
pub(super) fn trigger(e: &DispatchError, step_expired: bool) -> Option<Trigger> {
    use crate::core::RouteError as R;
    match e {
        DispatchError::Route(R::NoCapacity { .. } | R::Shed { .. })
        | DispatchError::QueueTimeout { .. }
        | DispatchError::WouldWaitInVain { .. }
        | DispatchError::QueueFull { .. }
        | DispatchError::ProvidersRefused { .. } => Some(Trigger::NoQuota),
        DispatchError::Route(R::Unavailable { .. }) | DispatchError::AttemptsExhausted { .. } => {
            Some(Trigger::Unavailable)
        }
        DispatchError::Route(R::TooLarge { .. }) => Some(Trigger::TooLarge),
        DispatchError::DeadlineExceeded(_) if step_expired => Some(Trigger::FirstByteTimeout),
        _ => None,
    }
}

/// The field an over-ceiling refusal names.
const OVER_COST: &str = "max_cost";

/// `model`'s worst case passes the caller's `max_cost`.
fn over_cost(model: &str, worst_case: u64, max: u64) -> DispatchError {
    use crate::core::cost::format_micros;
    DispatchError::InvalidArgument(vec![super::Violation::new(
        OVER_COST,
        format!(
            "{model} may cost up to {} for this request (prompt + max output at its dearest price), above max_cost {}",
            format_micros(worst_case),
            format_micros(max)
        ),
    )])
}

/// A step admitted: its index, estimate, tenant hold and the tenant's
/// `max_queued`.
pub(super) type Admitted = (usize, TokenEstimate, TenantHold, usize);

impl Engine {
    /// Admits `r` for step `from` of `plan`, or the first later step that
    /// takes it (setting `r.model`), skipping steps it is too large for
    /// (when the plan falls back on `too_large`) and, after the first,
    /// steps the tenant may not use. `path` records the models given up.
    pub(super) fn admit_step(
        &self,
        config: &Snapshot,
        tenant: &Arc<str>,
        r: &mut pb::DispatchRequest,
        plan: &Plan,
        from: usize,
        path: &mut super::ModelPath,
    ) -> Result<Admitted, DispatchError> {
        let mut step = from;
        loop {
            r.model.clone_from(&plan.steps[step]);
            let admitted = config.check(r).and_then(|estimate| {
                let worst_case = config
                    .prices
                    .worst_case(&r.model, estimate.prompt, estimate.max_output);
                if let Some(max) = super::route::max_cost(r)?
                    && worst_case > max
                {
                    return Err(over_cost(&r.model, worst_case, max));
                }
                let (hold, max_queued) =
                    self.desk
                        .admit_tenant(tenant, &r.model, estimate.total(), worst_case, super::today())?;
                Ok((estimate, hold, max_queued))
            });
            let e = match admitted {
                Ok((estimate, hold, max_queued)) => return Ok((step, estimate, hold, max_queued)),
                Err(e) => e,
            };
            let skip = match &e {
                DispatchError::InvalidArgument(_) if config.too_large(r) => {
                    plan.falls_back(step, Trigger::TooLarge)
                }
                // A fallback the tenant may not use is passed over.
                DispatchError::PermissionDenied(_) => step > from && step + 1 < plan.steps.len(),
                // So is one that may cost more than the caller's ceiling.
                DispatchError::InvalidArgument(v) if v.first().is_some_and(|v| v.field == OVER_COST) => {
                    step > 0 && step + 1 < plan.steps.len()
                }
                _ => false,
            };
            if !skip {
                return Err(e);
            }
            tracing::debug!(model = %r.model, error = %e, "skipping a step of the fallback plan");
            path.tried.push(r.model.clone());
            step += 1;
        }
    }

    /// Moves `p` to the next model of its plan after its step failed with
    /// `e`, if a trigger of its chain says so: `lease` (the step's tenant
    /// hold) is settled first. Returns the next step's lease, or `e` (or
    /// what stopped the next step: a tenant limit, say).
    pub(super) fn fall_back(
        &self,
        p: &mut Prepared,
        lease: Lease,
        e: DispatchError,
        step_deadline: Instant,
    ) -> Result<Lease, DispatchError> {
        let now = crate::clock::now();
        let step_expired = step_deadline < p.deadline && now < p.deadline;
        let Some(t) = trigger(&e, step_expired).filter(|t| p.plan.falls_back(p.step, *t)) else {
            lease.finish();
            return Err(e);
        };
        lease.finish();
        let from = p.exec.model.clone();
        p.path.tried.push(from.clone());
        let mut r = pb::DispatchRequest {
            model: String::new(),
            payload: p.exec.payload.clone(),
            prompt_tokens: p.asked.0,
            max_output_tokens: p.asked.1,
            labels: p.exec.labels.clone(),
            max_cost: p.max_cost.clone(),
            ..Default::default()
        };
        let admitted = self.admit_step(&p.config, &p.tenant, &mut r, &p.plan, p.step + 1, &mut p.path);
        let (step, estimate, hold, max_queued) = match admitted {
            Ok(a) => a,
            // Nothing after it would take the request: the first failure
            // is the answer, unless a limit of the caller's own stopped it.
            Err(next @ (DispatchError::TenantLimit { .. } | DispatchError::Unauthenticated(_))) => {
                return Err(next);
            }
            Err(next) => {
                tracing::debug!(error = %next, "no later step of the fallback plan takes the request");
                return Err(e);
            }
        };
        tracing::info!(from = %from, to = %r.model, trigger = %t, "falling back to the next model");
        if crate::metrics::enabled() {
            metrics::counter!(
                "dispatcher_fallbacks_total",
                "from" => from,
                "to" => r.model.clone(),
                "trigger" => t.as_str(),
            )
            .increment(1);
        }
        p.step = step;
        p.estimate = estimate;
        p.tenant_max_queued = max_queued;
        p.exec.model = r.model;
        p.exec.prompt_tokens = estimate.prompt;
        p.exec.max_output_tokens = estimate.max_output;
        Ok(Lease::new(self.desk.clone(), hold))
    }

    /// The deadline of `p`'s current step: the request's, or sooner when
    /// its chain falls back on `first_byte_timeout`.
    pub(super) fn step_deadline(p: &Prepared) -> Instant {
        match p.plan.step_budget(p.step) {
            Some(budget) => p.deadline.min(crate::clock::now() + budget),
            None => p.deadline,
        }
    }

    /// `Route`'s whole plan: each step's model with where it would go now
    /// and why (or why it is left out). Consumes nothing.
    /// A request naming a route shows the route's decision first (each
    /// candidate's estimated cost and time, and why), then the plan of the
    /// model it chose; `timeout` is the call's deadline (a latency budget).
    pub fn route_plan(
        &self,
        r: &pb::DispatchRequest,
        timeout: Option<std::time::Duration>,
        caller: impl Into<super::Caller>,
    ) -> Result<super::RoutePlanView, DispatchError> {
        let config = self.front.snapshot();
        let tenant = config.authenticate(&caller.into())?;
        config.check_tenant_field(&r.tenant, &tenant)?;
        let mut r = r.clone();
        let now = crate::clock::now();
        let route = match config.route(&r.model) {
            Some(spec) => Some(self.decide_route(&config, spec, &tenant, &mut r, timeout, now)?),
            None => None,
        };
        if let Some(view) = &route {
            match view.chosen() {
                Some(chosen) => r.model = chosen.to_string(),
                None => {
                    return Ok(super::RoutePlanView {
                        route: Some(view.to_pb(&config.currency)),
                        steps: Vec::new(),
                    });
                }
            }
        }
        let route = route.map(|v| v.to_pb(&config.currency));
        if let Some(pick) = self.rollouts.peek(&r) {
            r.model = pick.target;
        }
        let plan = config.plan(&r.model, !r.no_fallback);
        let mut steps = Vec::new();
        for (i, model) in plan.steps.iter().enumerate() {
            r.model.clone_from(model);
            let fall_back_on = if i + 1 < plan.steps.len() {
                plan.on.clone()
            } else {
                Vec::new()
            };
            let checked = config.check(&r).and_then(|estimate| {
                self.desk.tenant_may_use(&tenant, model)?;
                Ok(estimate)
            });
            let step = match checked {
                // The first step's own error is the caller's answer.
                Err(e) if i == 0 && !(config.too_large(&r) && plan.falls_back(0, Trigger::TooLarge)) => {
                    return Err(e);
                }
                Err(e) => RouteStepView {
                    model: model.clone(),
                    preview: None,
                    error: Some(e.to_string()),
                    fall_back_on,
                },
                Ok(estimate) => {
                    let req = RouteRequest {
                        model,
                        tokens: estimate.total(),
                        origin: (!r.origin_region.is_empty()).then_some(r.origin_region.as_str()),
                    };
                    let preview = self.desk.preview(&req, now)?;
                    RouteStepView {
                        model: model.clone(),
                        error: preview.error.as_ref().map(|e| e.to_string()),
                        preview: Some(preview),
                        fall_back_on,
                    }
                }
            };
            steps.push(step);
        }
        Ok(super::RoutePlanView { route, steps })
    }
}

/// One step of `Route`'s plan.
#[derive(Debug, Clone)]
pub struct RouteStepView {
    pub model: String,
    /// Where it would go now (`None`: left out of the plan, see `error`).
    pub preview: Option<RoutePreview>,
    pub error: Option<String>,
    pub fall_back_on: Vec<Trigger>,
}

impl super::QuotaDesk {
    /// Whether `tenant`'s allow-list lets it use `model` (for `Route`).
    pub(super) fn tenant_may_use(&self, tenant: &str, model: &str) -> Result<(), DispatchError> {
        let desk = self.lock();
        let allowed = desk
            .tenants
            .spec(tenant)
            .and_then(|s| s.models.as_ref())
            .is_none_or(|m| m.iter().any(|x| x == model));
        if allowed {
            Ok(())
        } else {
            Err(DispatchError::PermissionDenied(format!(
                "tenant {tenant:?} may not use model {model:?}"
            )))
        }
    }
}

impl Prepared {
    /// Brings the deadline forward to a step's; returns what to `restore`.
    /// A deadline brought forward is the dispatcher's, not the caller's.
    pub(super) fn step_in(&mut self, step_deadline: Instant) -> (Instant, bool) {
        let saved = (self.deadline, self.callers_deadline);
        self.callers_deadline = saved.1 && step_deadline == saved.0;
        self.deadline = step_deadline;
        saved
    }

    pub(super) fn restore(&mut self, saved: (Instant, bool)) {
        (self.deadline, self.callers_deadline) = saved;
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::core::RouteError;

    #[test]
    fn failures_map_to_their_triggers_and_others_to_none() {
        let no_cap = DispatchError::Route(RouteError::NoCapacity {
            retry_after: None,
            summary: String::new(),
        });
        assert_eq!(trigger(&no_cap, false), Some(Trigger::NoQuota));
        let refused = DispatchError::ProvidersRefused {
            attempts: 2,
            retry_after: Duration::from_secs(1),
            last: String::new(),
        };
        assert_eq!(trigger(&refused, false), Some(Trigger::NoQuota));
        let down = DispatchError::Route(RouteError::Unavailable {
            model: "m".into(),
            summary: String::new(),
        });
        assert_eq!(trigger(&down, false), Some(Trigger::Unavailable));
        let exhausted = DispatchError::AttemptsExhausted {
            attempts: 3,
            last: String::new(),
        };
        assert_eq!(trigger(&exhausted, false), Some(Trigger::Unavailable));
        let large = DispatchError::Route(RouteError::TooLarge {
            model: "m".into(),
            need: 2,
            largest: 1,
        });
        assert_eq!(trigger(&large, false), Some(Trigger::TooLarge));
        let late = DispatchError::DeadlineExceeded("x".into());
        assert_eq!(trigger(&late, true), Some(Trigger::FirstByteTimeout));
        // The caller's own deadline is not a trigger: nothing is left of it.
        assert_eq!(trigger(&late, false), None);
        // Work that may have run, a bad request, a tenant's limit: never.
        let upstream = DispatchError::Upstream {
            region: "r".into(),
            code: tonic::Code::Internal,
            message: String::new(),
        };
        assert_eq!(trigger(&upstream, false), None);
        assert_eq!(trigger(&DispatchError::InvalidArgument(Vec::new()), false), None);
        assert_eq!(trigger(&DispatchError::PermissionDenied("x".into()), false), None);
    }
}
