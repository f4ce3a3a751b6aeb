//! The request path at the edge: validate, reserve (the core decides),
//! forward over the pooled channel, settle with what the region reports, fail
//! over on a retryable error. The clock is read here and passed into the core.

mod error;
mod validate;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use parking_lot::{Mutex, RwLock};

pub use error::{DispatchError, Violation};

use crate::config::{Config, RequestLimits};
use crate::core::{
    Completion, Outcome, ProviderHint, ReportedLoad, Reservation, RoutePreview, RouteRequest, Router,
    Settlement, TokenEstimate,
};
use crate::forward::{ClusterPool, FailureKind, classify};
use crate::pb;

/// Settings the request path reads on every request; swapped whole on reload.
#[derive(Debug, Clone, PartialEq)]
pub struct Settings {
    pub limits: RequestLimits,
    pub max_attempts: u32,
    pub default_timeout: Duration,
}

impl Settings {
    fn from_config(c: &Config) -> Self {
        Self {
            limits: c.limits,
            max_attempts: c.server.max_attempts,
            default_timeout: c.server.default_timeout,
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
    router: Mutex<Router>,
    pool: ClusterPool,
    settings: RwLock<Arc<Settings>>,
    next_id: AtomicU64,
    id_prefix: String,
    shutting_down: AtomicBool,
}

impl Engine {
    /// `endpoints` maps each region to its cluster's address (simulated
    /// regions already started by the caller).
    pub fn new(config: &Config, endpoints: &[(String, String)]) -> Result<Self, String> {
        let router = Router::try_new(config.router_spec(), Instant::now()).map_err(|e| e.to_string())?;
        let pool = ClusterPool::new();
        pool.set(endpoints)?;
        let started = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        Ok(Self {
            router: Mutex::new(router),
            pool,
            settings: RwLock::new(Arc::new(Settings::from_config(config))),
            next_id: AtomicU64::new(1),
            id_prefix: format!("{started:x}"),
            shutting_down: AtomicBool::new(false),
        })
    }

    /// Applies a new configuration live (all or nothing).
    pub fn apply(&self, config: &Config, endpoints: &[(String, String)]) -> Result<(), String> {
        let mut router = self.router.lock();
        // Check the endpoints before touching the router, so a bad one changes nothing.
        self.pool.set(endpoints)?;
        router
            .apply(config.router_spec(), Instant::now())
            .map_err(|e| e.to_string())?;
        *self.settings.write() = Arc::new(Settings::from_config(config));
        Ok(())
    }

    /// Read access to the router, for operators' views and tests.
    pub fn with_router<T>(&self, f: impl FnOnce(&Router) -> T) -> T {
        f(&self.router.lock())
    }

    /// Mutable access to the router (drain, weight overrides, health).
    pub fn with_router_mut<T>(&self, f: impl FnOnce(&mut Router) -> T) -> T {
        f(&mut self.router.lock())
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
        let router = self.router.lock();
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
        let req = route_request(r, estimate);
        Ok(self.router.lock().preview(&req, Instant::now())?)
    }

    /// Routes, forwards and settles one unit of work. `timeout` is the
    /// caller's deadline (the configured default when it set none).
    pub async fn dispatch(
        &self,
        r: pb::DispatchRequest,
        timeout: Option<Duration>,
    ) -> Result<Dispatched, DispatchError> {
        if self.shutting_down.load(Ordering::SeqCst) {
            return Err(DispatchError::ShuttingDown);
        }
        let start = Instant::now();
        let settings = self.settings();
        let deadline = start + timeout.unwrap_or(settings.default_timeout);
        let estimate = self.check(&r)?;
        let request_id = if r.request_id.is_empty() {
            self.new_id()
        } else {
            r.request_id.clone()
        };
        let exec = pb::ExecuteRequest {
            request_id: request_id.clone(),
            tenant: r.tenant.clone(),
            model: r.model.clone(),
            payload: r.payload.clone(),
            prompt_tokens: estimate.prompt,
            max_output_tokens: estimate.max_output,
            labels: r.labels.clone(),
        };
        let req = route_request(&r, estimate);
        let mut tried: Vec<Arc<str>> = Vec::new();
        let mut last_failure: Option<String> = None;
        let queue_wait = Duration::ZERO;
        for attempt in 1..=settings.max_attempts {
            let now = Instant::now();
            if now >= deadline {
                return Err(DispatchError::DeadlineExceeded(format!(
                    "after {attempt} attempts and {:?}",
                    now - start
                )));
            }
            let reservation = match self.router.lock().reserve(&req, &tried, now) {
                Ok(r) => r,
                Err(e) => {
                    return Err(match last_failure {
                        Some(last) if !tried.is_empty() => DispatchError::AttemptsExhausted {
                            attempts: attempt - 1,
                            last: format!("{last}; no other region can take it: {e}"),
                        },
                        _ => e.into(),
                    });
                }
            };
            let held = Held::new(self, reservation);
            let region = held.reservation().region.clone();
            let Some(mut client) = self.pool.get(&region) else {
                held.settle(Completion::abandoned());
                last_failure = Some(format!("region {region} has no endpoint"));
                tried.push(region);
                continue;
            };
            let mut call = tonic::Request::new(exec.clone());
            let remaining = deadline.saturating_duration_since(Instant::now());
            call.set_timeout(remaining);
            let sent = Instant::now();
            let held = held.sent();
            let result = tokio::time::timeout(remaining, client.execute(call)).await;
            let latency = sent.elapsed();
            match result {
                Ok(Ok(reply)) => {
                    let reply = reply.into_inner();
                    let usage = reply.usage.unwrap_or_default();
                    held.settle(Completion {
                        settlement: Settlement::Used {
                            prompt: usage.prompt_tokens,
                            completion: usage.completion_tokens,
                        },
                        outcome: Some(Outcome::Success),
                        latency,
                        hint: reply.provider_quota.map(hint_from_pb),
                        load: reply.load.map(load_from_pb),
                        provider_refused: None,
                    });
                    return Ok(Dispatched {
                        request_id,
                        region: region.to_string(),
                        output: reply.output,
                        usage,
                        attempts: attempt,
                        queue_wait,
                    });
                }
                Ok(Err(status)) => {
                    let kind = classify(&status);
                    held.settle(failure_completion(kind, latency));
                    let message = format!("region {region}: {} ({:?})", status.message(), status.code());
                    match kind {
                        FailureKind::NotRun | FailureKind::ProviderRefused { .. } => {
                            tracing::debug!(%region, attempt, error = %message, "retryable failure; failing over");
                            last_failure = Some(message);
                            tried.push(region);
                        }
                        FailureKind::Rejected | FailureKind::MayHaveRun => {
                            return Err(DispatchError::Upstream {
                                region: region.to_string(),
                                code: status.code(),
                                message: status.message().to_string(),
                            });
                        }
                    }
                }
                Err(_elapsed) => {
                    held.settle(failure_completion(FailureKind::MayHaveRun, latency));
                    return Err(DispatchError::DeadlineExceeded(format!(
                        "waiting for region {region} after {:?}",
                        start.elapsed()
                    )));
                }
            }
        }
        Err(DispatchError::AttemptsExhausted {
            attempts: settings.max_attempts,
            last: last_failure.unwrap_or_default(),
        })
    }
}

fn route_request<'a>(r: &'a pb::DispatchRequest, estimate: TokenEstimate) -> RouteRequest<'a> {
    RouteRequest {
        model: &r.model,
        tokens: estimate.total(),
        origin: (!r.origin_region.is_empty()).then_some(r.origin_region.as_str()),
    }
}

fn failure_completion(kind: FailureKind, latency: Duration) -> Completion {
    let (settlement, outcome, provider_refused) = match kind {
        FailureKind::NotRun => (Settlement::NotRun, Some(Outcome::Failure), None),
        // A provider saying "not now" is about quota, not the region's health.
        FailureKind::ProviderRefused { reset } => (Settlement::NotRun, None, Some(reset)),
        FailureKind::Rejected => (Settlement::NotRun, None, None),
        FailureKind::MayHaveRun => (Settlement::Unknown, Some(Outcome::Failure), None),
    };
    Completion {
        settlement,
        outcome,
        latency,
        hint: None,
        load: None,
        provider_refused,
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

/// A reservation that is settled exactly once, even when the caller goes
/// away mid-request and the future holding it is dropped: then it is
/// refunded if it was never sent, and kept (it may have run) if it was.
struct Held<'a> {
    engine: &'a Engine,
    reservation: Option<Reservation>,
    sent: bool,
}

impl<'a> Held<'a> {
    fn new(engine: &'a Engine, reservation: Reservation) -> Self {
        Self {
            engine,
            reservation: Some(reservation),
            sent: false,
        }
    }

    fn reservation(&self) -> &Reservation {
        self.reservation.as_ref().expect("held until settled")
    }

    fn sent(mut self) -> Self {
        self.sent = true;
        self
    }

    fn settle(mut self, c: Completion) {
        if let Some(r) = self.reservation.take() {
            self.engine.settle(&r, c);
        }
    }
}

impl Drop for Held<'_> {
    fn drop(&mut self) {
        if let Some(r) = self.reservation.take() {
            let c = if self.sent {
                Completion {
                    settlement: Settlement::Unknown,
                    ..Completion::abandoned()
                }
            } else {
                Completion::abandoned()
            };
            self.engine.settle(&r, c);
        }
    }
}

impl Engine {
    fn settle(&self, r: &Reservation, c: Completion) {
        let settled = self.router.lock().settle(r, c, Instant::now());
        if let Some(crate::core::HintOutcome::Ignored { reason, first: true }) = &settled.hint {
            tracing::warn!(region = %r.region, model = %r.model, %reason, "ignoring an impossible provider quota hint (logged once per region and model)");
        }
        if !settled.found {
            tracing::info!(region = %r.region, model = %r.model, "settled work on a region or model removed by a reload");
        }
    }
}
