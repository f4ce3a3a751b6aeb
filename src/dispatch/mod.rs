//! The request path at the edge: validate, reserve or wait for quota (the
//! core decides), forward over the pooled channel, settle with what the
//! region reports, fail over on a retryable error. The clock is read here and
//! passed into the core.

mod attempt;
mod error;
mod held;
mod queue;
mod stream;
mod unary;
mod validate;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use parking_lot::{Mutex, RwLock};
use tokio::sync::Notify;

pub use error::{DispatchError, Violation};
pub use queue::{Grant, Ticket};
pub use stream::{ChunkStream, StreamChunk};

use crate::config::{Config, RequestLimits};
use crate::core::{
    Completion, HintOutcome, ProviderHint, ReportedLoad, Reservation, RoutePreview, RouteRequest, Router,
    Scheduler, TokenEstimate,
};
use crate::forward::ClusterPool;
use crate::pb;

/// Settings the request path reads on every request; swapped whole on reload.
#[derive(Debug, Clone, PartialEq)]
pub struct Settings {
    pub limits: RequestLimits,
    pub max_attempts: u32,
    pub default_timeout: Duration,
    pub max_queue_wait: Duration,
}

impl Settings {
    fn from_config(c: &Config) -> Self {
        Self {
            limits: c.limits,
            max_attempts: c.server.max_attempts,
            default_timeout: c.server.default_timeout,
            max_queue_wait: c.routing.max_queue_wait,
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
    pool: ClusterPool,
    settings: RwLock<Arc<Settings>>,
    pump_wake: Arc<Notify>,
    next_id: AtomicU64,
    id_prefix: String,
    shutting_down: AtomicBool,
}

impl Engine {
    /// `endpoints` maps each region to its cluster's address (simulated
    /// regions already started by the caller). Start the queue pump with
    /// `spawn_pump` once a runtime is running.
    pub fn new(config: &Config, endpoints: &[(String, String)]) -> Result<Arc<Self>, String> {
        let router = Router::try_new(config.router_spec(), Instant::now()).map_err(|e| e.to_string())?;
        let pool = ClusterPool::new();
        pool.set(endpoints)?;
        let started = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        Ok(Arc::new(Self {
            state: Mutex::new(Scheduler::fifo(router, config.routing.max_queued as usize)),
            pool,
            settings: RwLock::new(Arc::new(Settings::from_config(config))),
            pump_wake: Arc::new(Notify::new()),
            next_id: AtomicU64::new(1),
            id_prefix: format!("{started:x}"),
            shutting_down: AtomicBool::new(false),
        }))
    }

    /// Applies a new configuration live (all or nothing).
    pub fn apply(&self, config: &Config, endpoints: &[(String, String)]) -> Result<(), String> {
        {
            let mut state = self.state.lock();
            // Check the endpoints before touching the router, so a bad one changes nothing.
            self.pool.set(endpoints)?;
            state
                .router_mut()
                .apply(config.router_spec(), Instant::now())
                .map_err(|e| e.to_string())?;
            state.set_max_queued(config.routing.max_queued as usize);
            *self.settings.write() = Arc::new(Settings::from_config(config));
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
                format!("unknown model {:?}; configured: {}", r.model, known.join(", ")),
            )]));
        };
        validate::check_tokens(r, model).map_err(DispatchError::InvalidArgument)
    }

    /// The dry run behind `Route`: consumes nothing.
    pub fn route(&self, r: &pb::DispatchRequest) -> Result<RoutePreview, DispatchError> {
        let estimate = self.check(r)?;
        let req = RouteRequest {
            model: &r.model,
            tokens: estimate.total(),
            origin: (!r.origin_region.is_empty()).then_some(r.origin_region.as_str()),
        };
        Ok(self.state.lock().router().preview(&req, Instant::now())?)
    }

    fn settle(&self, r: &Reservation, c: Completion) {
        let settled = self.state.lock().router_mut().settle(r, c, Instant::now());
        self.wake_pump();
        if let Some(HintOutcome::Ignored { reason, first: true }) = &settled.hint {
            tracing::warn!(region = %r.region, model = %r.model, %reason, "ignoring an impossible provider quota hint (logged once per region and model)");
        }
        if !settled.found {
            tracing::info!(region = %r.region, model = %r.model, "settled work on a region or model removed by a reload");
        }
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
