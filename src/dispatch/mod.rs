//! The request path at the edge, as a facade over its owners, each with one
//! lock (or none) named in its file:
//!
//! * `front_door`: who the caller is, its tenant's rates, request checks;
//!   one configuration snapshot per request, swapped whole on reload;
//! * `desk`: region quota, tenant limits and the wait queue (the pure core's
//!   `Scheduler` and `Tenants`) with its pump (`queue`);
//! * `lease`: what one request holds, settled exactly once, and never by
//!   taking a lock in `Drop`;
//! * `forwarder`: the attempt loop, the retry budget and the connections;
//! * `idempotency`: requests answered once per id;
//! * `Drain` here: what runs, for a graceful shutdown.
//!
//! Time is read through `crate::clock` and passed into the core.

mod auth;
mod cache;
mod capacity;
mod catalog;
mod desk;
mod error;
mod fallback;
mod forwarder;
mod front_door;
mod handles;
mod idempotency;
mod lease;
mod observe;
mod prepare;
mod queue;
mod rates;
mod rollout;
mod route;
mod shared_ids;
mod spend;
mod stream;
mod unary;
mod validate;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

pub use auth::{AuthError, Caller, hash_key};
pub use cache::{
    CacheHit, CacheLayer, CachedEntry, ENTRY_OVERHEAD as CACHE_ENTRY_OVERHEAD, ResponseCache, SharedCache,
    cached_reply, encode as cache_encode,
};
pub use capacity::{CAPACITY_TICK, CapacityReport};
pub use catalog::CatalogEntry;
pub use desk::{Grant, QuotaDesk, Ticket};
pub use error::{DispatchError, Violation};
pub use fallback::RouteStepView;
pub use front_door::Settings;
pub(crate) use observe::work_span;
pub use rollout::RolloutDesk;
pub use route::RoutePlanView;
pub use shared_ids::{Pending, SharedIds, Stored};
pub use spend::{Cost, wire as wire_cost};
pub use stream::{ChunkStream, StreamChunk};

use crate::config::Config;
use crate::core::{Day, ProviderHint, ReportedLoad, RoutePreview, RouteRequest, TokenEstimate};
use crate::forward::Connector;
use crate::pb;
use crate::state::EngineView;
use forwarder::Forwarder;
use front_door::FrontDoor;

/// Told before work is sent to a region (`SendNotice`); an error stops the
/// send and ends the request with it. Jobs record that they are running
/// before they run, so a restart never runs a job twice unknowingly.
pub type OnSend = Arc<
    dyn Fn(SendNotice) -> std::pin::Pin<Box<dyn std::future::Future<Output = Result<(), String>> + Send>>
        + Send
        + Sync,
>;

/// How a job's run differs from a plain request.
pub struct JobRun {
    pub on_send: OnSend,
    /// Work that may have run may be sent again (a `repeatable` job).
    pub may_run_twice: bool,
}

/// A send about to happen.
#[derive(Debug, Clone)]
pub struct SendNotice {
    pub region: Arc<str>,
    /// Which try of this request (failover moves it to another region).
    pub attempt: u32,
    pub model: String,
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
    /// The configuration version the request was decided with.
    pub config_version: u64,
    /// Which model served it, after rollouts and fallbacks.
    pub path: ModelPath,
    /// What the attempt that served it cost.
    pub cost: Cost,
    /// Set when it was served from the response cache (boxed behind an
    /// `Arc`: most replies have none, and the reply stays small).
    pub cached: Option<Arc<CacheHit>>,
}

/// The models a request went through: the alias it named (if any), the
/// models tried and given up on, and the one that served it.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct ModelPath {
    pub model: String,
    /// The rollout alias the request named (or its route chose); empty
    /// when none.
    pub alias: String,
    /// The `[[routes]]` alias the request named; empty when none.
    pub route: String,
    pub tried: Vec<String>,
}

pub struct Engine {
    front: FrontDoor,
    desk: Arc<QuotaDesk>,
    rollouts: RolloutDesk,
    forwarder: Forwarder,
    idempotency: idempotency::Idempotency,
    drain: Arc<Drain>,
    next_id: AtomicU64,
    id_prefix: String,
    /// With `[cluster]`: request ids claimed across replicas (set once at start).
    shared_ids: std::sync::OnceLock<Arc<dyn SharedIds>>,
    /// Replies stored for requests that opt in (`cache.rs`).
    cache: Arc<ResponseCache>,
}

/// What is running, for a graceful shutdown. Atomics only.
#[derive(Default)]
struct Drain {
    shutting_down: AtomicBool,
    /// Dispatches running (streams until their relay ends, a request-id
    /// leader until it has answered, whether or not its caller stayed).
    running: AtomicUsize,
    idle: Notify,
}

impl Drain {
    fn shutting_down(&self) -> bool {
        self.shutting_down.load(Ordering::SeqCst)
    }
}

/// Counts one running dispatch until dropped.
pub(crate) struct Running(Arc<Drain>);

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
        Ok(Arc::new(Self {
            desk: QuotaDesk::new(config, now)?,
            forwarder: Forwarder::new(config, endpoints, connector, now)?,
            front: FrontDoor::new(config),
            rollouts: RolloutDesk::new(config),
            idempotency: idempotency::Idempotency::new(
                config.server.idempotency_window,
                config.server.idempotency_capacity,
            ),
            drain: Arc::default(),
            next_id: AtomicU64::new(1),
            id_prefix: format!("{:x}", crate::clock::unix_secs()),
            shared_ids: std::sync::OnceLock::new(),
            cache: Arc::new(ResponseCache::new(config.cache.limits)),
        }))
    }

    /// Answers each `request_id` once across replicas through `ids` (once,
    /// at start; later calls change nothing).
    pub fn share_request_ids(&self, ids: Arc<dyn SharedIds>) {
        let _ = self.shared_ids.set(ids);
    }

    /// Applies a new configuration live: connections, then quota and
    /// tenants, then the front door's snapshot. Each step is all or nothing
    /// and the first two fail only on what validation already refuses.
    pub fn apply(&self, config: &Config, endpoints: &[(String, String)]) -> Result<(), String> {
        self.forwarder.apply(config, endpoints)?;
        self.desk.apply(config, crate::clock::now())?;
        self.rollouts.apply(config);
        self.cache.set_limits(config.cache.limits);
        self.front.replace(config);
        Ok(())
    }

    /// Runs the quota desk's pump until `cancel` fires.
    pub fn spawn_pump(self: &Arc<Self>, cancel: CancellationToken) -> tokio::task::JoinHandle<()> {
        // Capacity rules tick beside the pump, until the same cancellation;
        // so does the cache's sweep of expired entries.
        self.desk.spawn_capacity(cancel.clone());
        self.cache.spawn_sweeper(cancel.clone());
        let engine = Arc::downgrade(self);
        self.desk.spawn_pump(cancel, move || {
            if let Some(e) = engine.upgrade() {
                e.front.snapshot().sweep_idle();
            }
        })
    }

    /// Everything operators see, taken in one pass.
    pub fn view(&self, now: Instant) -> EngineView {
        self.desk
            .view(now, |region| self.forwarder.endpoint(region).unwrap_or_default())
    }

    /// How to check `region`'s health over the client work to it takes.
    pub fn probe(&self, region: &str) -> Option<crate::forward::Probe> {
        self.forwarder.probe(region)
    }

    /// The kind of `region` (an AgentCluster or an OpenAI-compatible
    /// provider): what protocol its replies' `output` speaks. The OpenAI
    /// front door relays an `OpenAi` region's output (the provider's JSON)
    /// as is.
    pub fn region_kind(&self, region: &str) -> Option<crate::forward::RegionKind> {
        self.forwarder.kind(region)
    }

    /// Reports an OpenAI-compatible region's misconfiguration, if one is
    /// flagged and not yet reported (the health checks find them too).
    pub fn report_misconfigured(&self, region: &str) {
        self.forwarder.report_misconfigured(&self.desk, region);
    }

    /// Models of `region` whose provider rate limits (its
    /// `x-ratelimit-limit-*` headers) disagree with the region file: the
    /// model and the provider's tokens and requests a minute.
    pub fn provider_limits(&self, region: &str) -> Vec<crate::forward::ProviderLimits> {
        self.forwarder
            .openai(region)
            .map(|c| c.disagreements())
            .unwrap_or_default()
    }

    /// The response cache (Admin's purge; its shared layer, set at start).
    pub fn cache(&self) -> &ResponseCache {
        &self.cache
    }

    /// The rollouts, for Admin (list, change weights live).
    pub fn rollouts(&self) -> &RolloutDesk {
        &self.rollouts
    }

    /// The quota desk, for its named commands (drain, weight, health).
    /// The prices in force (and their currency).
    pub fn prices(&self) -> crate::core::Prices {
        self.front.snapshot().prices.clone()
    }

    pub fn desk(&self) -> &QuotaDesk {
        &self.desk
    }

    /// The settings in force now.
    pub fn settings(&self) -> Settings {
        self.front.snapshot().settings.clone()
    }

    /// New requests are refused from now on.
    pub fn begin_shutdown(&self) {
        self.drain.shutting_down.store(true, Ordering::SeqCst);
    }

    /// Dispatches running now.
    pub fn running(&self) -> usize {
        self.drain.running.load(Ordering::SeqCst)
    }

    /// Waits until no dispatch is running (after `begin_shutdown`, nothing
    /// new starts).
    pub async fn drained(&self) {
        loop {
            let idle = self.drain.idle.notified();
            if self.running() == 0 {
                return;
            }
            idle.await;
        }
    }

    pub(crate) fn enter(&self) -> Running {
        self.drain.running.fetch_add(1, Ordering::SeqCst);
        Running(self.drain.clone())
    }

    fn new_id(&self) -> String {
        // Sized once (`format!` grew the string twice on every request),
        // and written without the formatting machinery (`core::digits`).
        let mut id = String::with_capacity(self.id_prefix.len() + 21);
        id.push_str(&self.id_prefix);
        id.push('-');
        crate::core::digits::push_decimal(&mut id, self.next_id.fetch_add(1, Ordering::Relaxed));
        id
    }

    /// Validates a request and estimates its reservation.
    pub fn check(&self, r: &pb::DispatchRequest) -> Result<TokenEstimate, DispatchError> {
        self.front.snapshot().check(r)
    }

    /// A job at submission: its caller's tenant and the request's tokens,
    /// checked as `Dispatch` checks them (the rest is checked when it runs).
    pub fn check_job(
        &self,
        r: &pb::DispatchRequest,
        caller: &Caller,
    ) -> Result<(std::sync::Arc<str>, TokenEstimate), DispatchError> {
        let config = self.front.snapshot();
        let tenant = config.authenticate(caller)?;
        config.check_tenant_field(&r.tenant, &tenant)?;
        let estimate = config.check(r)?;
        Ok((tenant, estimate))
    }

    /// The caller's tenant (Jobs: Get, Watch, Cancel, List).
    pub fn authenticate(&self, caller: &Caller) -> Result<std::sync::Arc<str>, DispatchError> {
        self.front.snapshot().authenticate(caller)
    }

    /// Whether a shutdown has begun.
    pub fn shutting_down(&self) -> bool {
        self.drain.shutting_down()
    }

    /// The dry run behind `Route`: consumes nothing.
    pub fn route(
        &self,
        r: &pb::DispatchRequest,
        caller: impl Into<Caller>,
    ) -> Result<RoutePreview, DispatchError> {
        let config = self.front.snapshot();
        let tenant = config.authenticate(&caller.into())?;
        config.check_tenant_field(&r.tenant, &tenant)?;
        let estimate = config.check(r)?;
        let req = RouteRequest {
            model: &r.model,
            tokens: estimate.total(),
            origin: (!r.origin_region.is_empty()).then_some(r.origin_region.as_str()),
        };
        self.desk.preview(&req, crate::clock::now())
    }

    /// Whether an `authorization` header carries the admin token (always
    /// true when none is configured). Compared in constant time.
    pub fn admin_allowed(&self, authorization: Option<&str>) -> bool {
        self.front.snapshot().admin_allowed(authorization)
    }
}

/// Today as UTC days since the epoch, for daily budgets.
fn today() -> Day {
    Day::at_unix(crate::clock::calendar_secs())
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
