//! A request at the front door: authenticated, its tenant's limits applied,
//! validated, its id, estimate and deadline fixed, all with one snapshot of
//! the configuration.

use std::sync::Arc;
use std::time::{Duration, Instant};

use super::front_door::Snapshot;
use super::lease::{Lease, RegionHold};
use super::{DispatchError, Engine};
use crate::core::TokenEstimate;
use crate::pb;

/// What is known of a request so far, for its metrics and span: the tenant
/// once authenticated, the model once validated, the region once reached.
#[derive(Debug, Default)]
pub(super) struct Labels {
    pub tenant: Option<Arc<str>>,
    pub model: Option<Arc<str>>,
    pub region: Option<Arc<str>>,
}

impl Labels {
    /// Records the finished request's outcome.
    pub fn finish(&self, result: Result<(), &DispatchError>, start: Instant) {
        let outcome = super::observe::outcome(&result);
        tracing::Span::current().record("outcome", outcome);
        if let Err(e) = result {
            tracing::Span::current().record("error", tracing::field::display(e));
        }
        super::observe::request(
            self.model.as_ref(),
            self.tenant.as_ref(),
            self.region.as_ref(),
            outcome,
            crate::clock::since(start),
        );
    }
}

/// A validated request, ready to be forwarded.
pub(super) struct Prepared {
    /// The configuration it was decided with, kept to the end.
    pub config: Arc<Snapshot>,
    /// What goes to the region; its `request_id` and `model` are the
    /// request's id and the model serving it.
    pub exec: pb::ExecuteRequest,
    pub estimate: TokenEstimate,
    pub origin: Option<Arc<str>>,
    pub tenant: Arc<str>,
    pub tenant_max_queued: usize,
    pub start: Instant,
    pub deadline: Instant,
    /// The caller chose the deadline (`grpc-timeout`): running out of it is
    /// the caller's outcome, never the region's. Without one the deadline is
    /// the dispatcher's own (`server.default_timeout`), and a region that
    /// outlasts it has failed.
    pub callers_deadline: bool,
    /// The caller gave a request_id: work that may have run elsewhere can
    /// be retried, because a repeat of the id is answered once.
    pub retry_may_have_run: bool,
    /// The models it may be served by (its fallback chain), the step it is
    /// at, and the caller's own token fields, to estimate the next step.
    pub plan: Arc<crate::core::Plan>,
    pub step: usize,
    pub asked: (u64, u64),
    /// The caller's `max_cost` as it wrote it (empty: none), for each step.
    pub max_cost: String,
    pub path: super::ModelPath,
    /// A job's: told before each send to a region, and may stop it.
    pub on_send: Option<super::OnSend>,
}

/// The cluster accepted the work.
pub(super) struct Forwarded<T> {
    pub value: T,
    pub held: RegionHold,
    pub region: Arc<str>,
    pub attempts: u32,
    pub queue_wait: Duration,
    pub sent: Instant,
}

/// A request past the front door's own checks: who sent it, the route
/// and the rollout alias it named (its model now the one chosen), when it
/// arrived.
pub(super) struct Front {
    pub tenant: Arc<str>,
    pub alias: String,
    pub route: String,
    pub start: Instant,
}

impl Front {
    /// The rollout alias and the route, for a reply.
    pub fn path(&self) -> (String, String) {
        (self.alias.clone(), self.route.clone())
    }
}

impl Engine {
    /// The checks before the cache is consulted: who the caller is, its
    /// tenant's request rate (a cache hit counts towards it), which model a
    /// rollout alias names.
    pub(super) fn front(
        &self,
        config: &Snapshot,
        r: &mut pb::DispatchRequest,
        timeout: Option<Duration>,
        caller: &super::auth::Caller,
        labels: &mut Labels,
    ) -> Result<Front, DispatchError> {
        if self.drain.shutting_down() {
            return Err(DispatchError::ShuttingDown);
        }
        let start = crate::clock::now();
        let span = tracing::Span::current();
        let tenant = tracing::debug_span!("authenticate").in_scope(|| config.authenticate(caller))?;
        span.record("tenant", &*tenant);
        labels.tenant = Some(tenant.clone());
        config.check_tenant_field(&r.tenant, &tenant)?;
        config.check_rate(&tenant)?;
        // A route chooses its candidate; a rollout alias (named, or the
        // route's choice) its target; then the target's chain.
        let route = self.resolve_route(config, &tenant, r, timeout)?;
        let alias = self.rollouts.resolve(r);
        Ok(Front {
            tenant,
            alias,
            route,
            start,
        })
    }

    /// After `front` (and a cache miss): validates `r`, applies its
    /// tenant's token limits and fixes its plan, id, estimate and deadline.
    /// The tenant's hold comes back with it, to be settled with what the
    /// regions charge.
    pub(super) fn admit(
        &self,
        config: Arc<Snapshot>,
        mut r: pb::DispatchRequest,
        timeout: Option<Duration>,
        front: Front,
        labels: &mut Labels,
    ) -> Result<(Prepared, Lease), DispatchError> {
        let Front {
            tenant,
            alias,
            route,
            start,
        } = front;
        let span = tracing::Span::current();
        let plan = config.plan(&r.model, !r.no_fallback);
        // `model` is filled in when the request is answered (`exec.model`
        // is the model that served it): no copy per request.
        let mut path = super::ModelPath {
            model: String::new(),
            alias,
            route,
            tried: Vec::new(),
        };
        let asked = (r.prompt_tokens, r.max_output_tokens);
        let (step, estimate, hold, tenant_max_queued) =
            self.admit_step(&config, &tenant, &mut r, &plan, 0, &mut path)?;
        labels.model = config.model_name(&r.model);
        span.record("model", r.model.as_str());
        let lease = Lease::new(self.desk.clone(), hold);
        let retry_may_have_run = !r.request_id.is_empty();
        let request_id = if r.request_id.is_empty() {
            self.new_id()
        } else {
            r.request_id
        };
        span.record("request_id", request_id.as_str());
        let deadline = start + timeout.unwrap_or(config.settings.default_timeout);
        let prepared = Prepared {
            config,
            origin: (!r.origin_region.is_empty()).then(|| Arc::from(r.origin_region.as_str())),
            exec: pb::ExecuteRequest {
                request_id,
                tenant: tenant.to_string(),
                model: r.model,
                payload: r.payload,
                prompt_tokens: estimate.prompt,
                max_output_tokens: estimate.max_output,
                labels: r.labels,
            },
            tenant,
            tenant_max_queued,
            estimate,
            start,
            deadline,
            callers_deadline: timeout.is_some(),
            retry_may_have_run,
            plan,
            step,
            asked,
            max_cost: r.max_cost,
            path,
            on_send: None,
        };
        Ok((prepared, lease))
    }
}
