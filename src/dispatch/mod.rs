//! The request path at the edge: validate, reserve or wait for quota (the
//! core decides), forward over the pooled channel, settle with what the
//! region reports, fail over on a retryable error. The clock is read here and
//! passed into the core.

mod attempt;
mod auth;
mod error;
mod held;
mod idempotency;
mod observe;
mod queue;
mod rates;
mod stream;
mod unary;
mod validate;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use parking_lot::{Mutex, RwLock};
use tokio::sync::Notify;

pub use auth::{AuthError, hash_key};
pub use error::{DispatchError, Violation};
pub use queue::{Grant, Ticket};
pub use stream::{ChunkStream, StreamChunk};

use crate::config::{Config, RequestLimits};
use crate::core::RetryBudget;
use crate::core::{
    Completion, Day, HintOutcome, ProviderHint, ReportedLoad, Reservation, RoutePreview, RouteRequest,
    Router, Scheduler, TenantHold, TenantRefusal, TenantReport, Tenants, TokenEstimate,
};
use crate::forward::{ClusterPool, Connector};
use crate::pb;
use auth::Auth;
use rates::TenantRates;

/// Settings the request path reads on every request; swapped whole on reload.
#[derive(Debug, Clone, PartialEq)]
pub struct Settings {
    pub limits: RequestLimits,
    pub max_attempts: u32,
    pub default_timeout: Duration,
    pub max_queue_wait: Duration,
    pub idempotency_capacity: usize,
}

impl Settings {
    fn from_config(c: &Config) -> Self {
        Self {
            limits: c.limits,
            max_attempts: c.server.max_attempts,
            default_timeout: c.server.default_timeout,
            max_queue_wait: c.routing.max_queue_wait,
            idempotency_capacity: c.server.idempotency_capacity,
        }
    }
}

/// A successful dispatch.
#[derive(Debug, Clone, PartialEq)]
pub struct Dispatched {
    pub request_id: String,
    pub region: String,
    pub output: bytes::Bytes,
    pub usage: pb::Usage,
    pub attempts: u32,
    pub queue_wait: Duration,
}

pub struct Engine {
    state: Mutex<Scheduler<Ticket>>,
    tenants: Mutex<Tenants>,
    auth: RwLock<Arc<Auth>>,
    admin_token: RwLock<Option<[u8; 32]>>,
    rates: RwLock<Arc<TenantRates>>,
    pool: ClusterPool,
    settings: RwLock<Arc<Settings>>,
    pump_wake: Arc<Notify>,
    idempotency: idempotency::Idempotency,
    retry_budget: Mutex<RetryBudget>,
    next_id: AtomicU64,
    id_prefix: String,
    shutting_down: AtomicBool,
    /// Dispatches running (streams until their relay ends), for draining.
    running: AtomicUsize,
    idle: Notify,
}

/// Counts one running dispatch until dropped.
pub(crate) struct Running(Arc<Engine>);

impl Running {
    fn enter(engine: &Arc<Engine>) -> Self {
        engine.running.fetch_add(1, Ordering::SeqCst);
        Self(engine.clone())
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        if self.0.running.fetch_sub(1, Ordering::SeqCst) == 1 {
            self.0.idle.notify_waiters();
        }
    }
}

impl Engine {
    /// `endpoints` maps each region to its cluster's address (simulated
    /// regions already started by the caller). Start the queue pump with
    /// `spawn_pump` once a runtime is running.
    pub fn new(config: &Config, endpoints: &[(String, String)]) -> Result<Arc<Self>, String> {
        Self::with_connector(config, endpoints, crate::forward::tcp())
    }

    /// Like `new`, reaching the clusters through `connector` rather than
    /// TCP: the engine's tests run it against in-memory clusters.
    pub fn with_connector(
        config: &Config,
        endpoints: &[(String, String)],
        connector: Arc<dyn Connector>,
    ) -> Result<Arc<Self>, String> {
        let now = crate::clock::now();
        let router = Router::try_new(config.router_spec(), now).map_err(|e| e.to_string())?;
        let tenants = Tenants::try_new(&config.tenant_specs(), now).map_err(|e| e.to_string())?;
        let pool = ClusterPool::with_connector(connector);
        pool.set(endpoints)?;
        let started = crate::clock::unix_secs();
        Ok(Arc::new(Self {
            state: Mutex::new(Scheduler::fair(
                router,
                config.routing.max_queued as usize,
                tenants.weights(),
            )),
            auth: RwLock::new(Arc::new(Auth::from_config(config))),
            admin_token: RwLock::new(config.admin_token),
            rates: RwLock::new(Arc::new(TenantRates::from_config(config))),
            tenants: Mutex::new(tenants),
            pool,
            settings: RwLock::new(Arc::new(Settings::from_config(config))),
            pump_wake: Arc::new(Notify::new()),
            idempotency: idempotency::Idempotency::new(
                config.server.idempotency_window,
                config.server.idempotency_capacity,
            ),
            retry_budget: Mutex::new(RetryBudget::new(
                config.routing.retry_budget.ratio,
                config.routing.retry_budget.min_per_second,
                config.routing.retry_budget.window,
                now,
            )),
            next_id: AtomicU64::new(1),
            id_prefix: format!("{started:x}"),
            shutting_down: AtomicBool::new(false),
            running: AtomicUsize::new(0),
            idle: Notify::new(),
        }))
    }

    /// Applies a new configuration live (all or nothing).
    pub fn apply(&self, config: &Config, endpoints: &[(String, String)]) -> Result<(), String> {
        {
            let now = crate::clock::now();
            let mut state = self.state.lock();
            let mut tenants = self.tenants.lock();
            // Build everything that can fail before changing anything.
            let mut next_tenants = tenants.clone();
            next_tenants
                .apply(&config.tenant_specs(), now)
                .map_err(|e| e.to_string())?;
            self.pool.set(endpoints)?;
            // All or nothing by itself; fails only on limits validation has
            // already refused.
            state
                .router_mut()
                .apply(config.router_spec(), now)
                .map_err(|e| e.to_string())?;
            state.set_weights(next_tenants.weights());
            state.set_max_queued(config.routing.max_queued as usize);
            *tenants = next_tenants;
            *self.auth.write() = Arc::new(Auth::from_config(config));
            *self.admin_token.write() = config.admin_token;
            *self.rates.write() = Arc::new(TenantRates::from_config(config));
            *self.settings.write() = Arc::new(Settings::from_config(config));
            let b = config.routing.retry_budget;
            self.retry_budget.lock().set_limits(b.ratio, b.min_per_second);
        }
        // Limits may have grown: let waiters through.
        self.wake_pump();
        Ok(())
    }

    /// Read access to the router and the queue together, for operators' views.
    pub fn with_scheduler<T>(&self, f: impl FnOnce(&Scheduler<Ticket>) -> T) -> T {
        f(&self.state.lock())
    }

    /// Read access to the router, for operators' views and tests.
    pub fn with_router<T>(&self, f: impl FnOnce(&Router) -> T) -> T {
        f(self.state.lock().router())
    }

    /// Mutable access to the router (drain, weight overrides, health).
    pub fn with_router_mut<T>(&self, f: impl FnOnce(&mut Router) -> T) -> T {
        let out = f(self.state.lock().router_mut());
        self.wake_pump();
        out
    }

    /// Requests waiting for quota, for `model` or in all.
    pub fn queued(&self, model: Option<&str>) -> usize {
        let state = self.state.lock();
        match model {
            Some(m) => state.queued_for(m),
            None => state.queued(),
        }
    }

    pub fn endpoint(&self, region: &str) -> Option<String> {
        self.pool.endpoint(region)
    }

    pub fn settings(&self) -> Arc<Settings> {
        self.settings.read().clone()
    }

    /// New requests are refused from now on.
    pub fn begin_shutdown(&self) {
        self.shutting_down.store(true, Ordering::SeqCst);
    }

    /// Dispatches running now.
    pub fn running(&self) -> usize {
        self.running.load(Ordering::SeqCst)
    }

    /// Waits until no dispatch is running (after `begin_shutdown`, nothing
    /// new starts).
    pub async fn drained(&self) {
        loop {
            let idle = self.idle.notified();
            if self.running() == 0 {
                return;
            }
            idle.await;
        }
    }

    pub(crate) fn enter(self: &Arc<Self>) -> Running {
        Running::enter(self)
    }

    fn new_id(&self) -> String {
        format!(
            "{}-{}",
            self.id_prefix,
            self.next_id.fetch_add(1, Ordering::Relaxed)
        )
    }

    /// Validates a request and estimates its reservation.
    pub fn check(&self, r: &pb::DispatchRequest) -> Result<TokenEstimate, DispatchError> {
        let settings = self.settings();
        let violations = validate::check_fields(r, &settings.limits);
        if !violations.is_empty() {
            return Err(DispatchError::InvalidArgument(violations));
        }
        let state = self.state.lock();
        let router = state.router();
        let Some(model) = router.model(&r.model) else {
            let known: Vec<_> = router.models().iter().map(|m| m.name.as_str()).collect();
            return Err(DispatchError::InvalidArgument(vec![Violation::new(
                "model",
                format!(
                    "unknown model {}; configured: {}",
                    crate::excerpt::excerpt(&r.model),
                    known.join(", ")
                ),
            )]));
        };
        validate::check_tokens(r, model).map_err(DispatchError::InvalidArgument)
    }

    /// The dry run behind `Route`: consumes nothing.
    pub fn route(
        &self,
        r: &pb::DispatchRequest,
        authorization: Option<&str>,
    ) -> Result<RoutePreview, DispatchError> {
        let tenant = self.authenticate(authorization)?;
        self.check_tenant_field(&r.tenant, &tenant)?;
        let estimate = self.check(r)?;
        let req = RouteRequest {
            model: &r.model,
            tokens: estimate.total(),
            origin: (!r.origin_region.is_empty()).then_some(r.origin_region.as_str()),
        };
        Ok(self.state.lock().router().preview(&req, crate::clock::now())?)
    }

    /// Each tenant's limits and use, for operators.
    pub fn tenant_report(&self) -> Vec<TenantReport> {
        self.tenants.lock().report(crate::clock::now())
    }

    /// The tenant behind an `authorization` header (or none).
    pub fn authenticate(&self, authorization: Option<&str>) -> Result<Arc<str>, DispatchError> {
        let auth = self.auth.read().clone();
        auth.authenticate(authorization)
            .map_err(|e| DispatchError::Unauthenticated(e.to_string()))
    }

    /// Whether an `authorization` header carries the admin token (always
    /// true when none is configured). Compared in constant time.
    pub fn admin_allowed(&self, authorization: Option<&str>) -> bool {
        let Some(expected) = *self.admin_token.read() else {
            return true;
        };
        auth::bearer_matches(authorization, &expected)
    }

    /// Checks a request's claimed tenant against the authenticated one.
    fn check_tenant_field(&self, claimed: &str, tenant: &str) -> Result<(), DispatchError> {
        // Length first: an oversized claim is a bad field, and is never quoted.
        if claimed.len() > validate::MAX_NAME_BYTES {
            return Err(DispatchError::InvalidArgument(vec![Violation::new(
                "tenant",
                format!("longer than {} bytes", validate::MAX_NAME_BYTES),
            )]));
        }
        if claimed.is_empty() || claimed == tenant {
            Ok(())
        } else {
            Err(DispatchError::PermissionDenied(format!(
                "the request names tenant {} but the credential is tenant {tenant:?}",
                crate::excerpt::excerpt(claimed)
            )))
        }
    }

    /// The tenant's requests-per-second limit (governor).
    fn check_rate(&self, tenant: &Arc<str>) -> Result<(), DispatchError> {
        let rates = self.rates.read().clone();
        rates
            .check(tenant)
            .map_err(|(retry_after, limit)| DispatchError::TenantLimit {
                tenant: tenant.to_string(),
                limit: "requests_per_second",
                message: format!("requests_per_second limit {limit} reached"),
                retry_after: Some(retry_after),
            })
    }

    /// Holds `tokens` against the tenant's hard limits.
    /// Admits the request against its tenant's limits; returns the hold and
    /// the tenant's `max_queued`, read under the same lock.
    fn admit_tenant(
        &self,
        tenant: &str,
        model: &str,
        tokens: u64,
    ) -> Result<(TenantHold, usize), DispatchError> {
        let now = crate::clock::now();
        let mut tenants = self.tenants.lock();
        let hold = tenants
            .admit(tenant, model, tokens, now, today())
            .map_err(|refusal| match refusal {
                TenantRefusal::ModelNotAllowed { .. } => {
                    DispatchError::PermissionDenied(format!("tenant {tenant:?}: {refusal}"))
                }
                TenantRefusal::Unknown => {
                    DispatchError::Unauthenticated(format!("tenant {tenant:?} is not configured"))
                }
                other => DispatchError::TenantLimit {
                    tenant: tenant.to_string(),
                    limit: other.limit(),
                    message: other.to_string(),
                    retry_after: other.retry_after(),
                },
            })?;
        let max_queued = tenants.spec(tenant).map_or(usize::MAX, |s| s.max_queued as usize);
        Ok((hold, max_queued))
    }

    fn settle_tenant(&self, hold: TenantHold, charged: u64) {
        self.tenants.lock().settle(hold, charged, crate::clock::now());
    }

    /// Reclaims rate-limiter state of idle tenants.
    pub fn sweep_idle(&self) {
        self.rates.read().retain_recent();
    }

    fn settle(&self, r: &Reservation, c: Completion) -> u64 {
        // Whether anyone waits is read under the same lock as the settlement:
        // a request queued after it wakes the pump itself. Waking the pump
        // for every settlement cost two context switches per request.
        let (settled, waiting) = {
            let mut state = self.state.lock();
            let settled = state.router_mut().settle(r, c, crate::clock::now());
            (settled, state.queued() > 0)
        };
        observe::settled(
            &r.region,
            &r.model,
            r.hold.tokens,
            settled.charged,
            settled.hint.as_ref(),
        );
        if let Some(t) = settled.transition {
            observe::circuit(&r.region, t.to.name());
            if t.to == crate::core::Circuit::Open {
                tracing::warn!(region = %r.region, from = t.from.name(), "circuit opened: too many errors; no work goes there until the cool-down");
            } else {
                tracing::info!(region = %r.region, from = t.from.name(), to = t.to.name(), "circuit changed");
            }
        }
        if waiting {
            self.wake_pump();
        }
        if let Some(HintOutcome::Ignored { reason, first: true }) = &settled.hint {
            tracing::warn!(region = %r.region, model = %r.model, %reason, "ignoring an impossible provider quota hint (logged once per region and model)");
        }
        if !settled.found {
            tracing::info!(region = %r.region, model = %r.model, "settled work on a region or model removed by a reload");
        }
        settled.charged
    }
}

/// Today as UTC days since the epoch, for daily budgets.
fn today() -> Day {
    const DAY: u64 = 86_400;
    let secs = crate::clock::unix_secs();
    Day {
        number: secs / DAY,
        next_in: Duration::from_secs(DAY - secs % DAY),
    }
}

pub fn hint_from_pb(q: pb::ProviderQuota) -> ProviderHint {
    let d = |d: Option<prost_types::Duration>| d.and_then(|d| Duration::try_from(d).ok()).unwrap_or_default();
    ProviderHint {
        remaining_tokens: q.remaining_tokens,
        remaining_requests: q.remaining_requests,
        reset_tokens: d(q.reset_tokens),
        reset_requests: d(q.reset_requests),
    }
}

pub fn load_from_pb(l: pb::LoadReport) -> ReportedLoad {
    ReportedLoad {
        in_flight: l.in_flight,
        queued: l.queued,
        capacity: l.capacity,
        utilization: if l.utilization.is_finite() {
            l.utilization.clamp(0.0, 1.0)
        } else {
            0.0
        },
    }
}
