//! The quota desk: every region-model's quota, the tenants' limits, and the
//! requests waiting for quota (the core's `Scheduler` and `Tenants`), with
//! the pump that serves waiters (`queue.rs`).
//!
//! Owner: `QuotaDesk::state`, one `Mutex<Desk>` over the scheduler and the
//! tenants. It is never held across an await, never while formatting for
//! operators (they get a plain `EngineView`, taken in one pass), and never
//! taken in a `Drop`: an unsettled `Lease` or `RegionHold` that is dropped
//! sends its settlement through `returns` (no lock), and whoever takes the
//! desk next applies it first. Holds reach the desk only through
//! `lease::Settle`, implemented here. Commands (`drain`, `set_weight`,
//! `set_health`) are named; nobody else gets the router.

use std::sync::Arc;
use std::sync::mpsc;
use std::time::Instant;

use parking_lot::{Mutex, MutexGuard};
use tokio::sync::Notify;

use tokio::sync::oneshot;

use super::lease::{RegionHold, Returned, Settle};
use super::{DispatchError, observe};
use crate::config::Config;
use crate::core::{
    Completion, Day, HintOutcome, Reservation, RoutePreview, RouteRequest, Router, Scheduler, Settled,
    SyncGrant, SyncItem, TenantHold, TenantRefusal, TenantTotals, TenantUsage, Tenants,
};
use crate::state::{EngineView, QuotaView, RegionView, TenantView};

/// What the pump (`queue.rs`) hands a waiting request.
#[derive(Debug)]
pub enum Grant {
    Reserved(RegionHold),
    Expired(Option<std::time::Duration>),
    Failed(crate::core::RouteError),
}

/// How a waiting request is reached when the pump serves it.
pub type Ticket = oneshot::Sender<Grant>;

pub(super) struct Desk {
    pub scheduler: Scheduler<Ticket>,
    pub tenants: Tenants,
    /// Capacity rules (`capacity.rs`), applied to the scheduler's router.
    pub capacity: crate::core::CapacityRules,
    returns: mpsc::Receiver<Returned>,
}

pub struct QuotaDesk {
    state: Mutex<Desk>,
    returns: mpsc::Sender<Returned>,
    /// Wakes the pump: quota may have come back, or someone new waits.
    pub(super) pump_wake: Arc<Notify>,
}

impl QuotaDesk {
    pub fn new(config: &Config, now: Instant) -> Result<Arc<Self>, String> {
        let router = Router::try_new(config.router_spec(), now).map_err(|e| e.to_string())?;
        let tenants = Tenants::try_new(&config.tenant_specs(), now).map_err(|e| e.to_string())?;
        let (tx, rx) = mpsc::channel();
        let mut scheduler = Scheduler::fair(router, config.routing.max_queued as usize, tenants.weights());
        scheduler.set_overload(config.routing.overload);
        Ok(Arc::new(Self {
            state: Mutex::new(Desk {
                scheduler,
                tenants,
                capacity: crate::core::CapacityRules::new(config.capacity_rules()),
                returns: rx,
            }),
            returns: tx,
            pump_wake: Arc::new(Notify::new()),
        }))
    }

    /// The desk, with every settlement dropped holds sent applied first.
    pub(super) fn lock(&self) -> MutexGuard<'_, Desk> {
        let mut desk = self.state.lock();
        while let Ok(returned) = desk.returns.try_recv() {
            let now = crate::clock::now();
            match returned {
                Returned::Region(r, c) => {
                    let settled = desk.scheduler.router_mut().settle(&r, c, now);
                    record(&r, &settled);
                }
                Returned::Tenant(hold, charged, cost) => desk.tenants.settle_costed(hold, charged, cost, now),
            }
        }
        desk
    }

    pub(super) fn wake(&self) {
        self.pump_wake.notify_one();
    }

    /// Admits a request against its tenant's limits (`cost`: its worst
    /// case, micro-units); returns the hold and the tenant's `max_queued`,
    /// read under the same lock.
    pub(super) fn admit_tenant(
        &self,
        tenant: &str,
        model: &str,
        tokens: u64,
        cost: u64,
        day: Day,
    ) -> Result<(TenantHold, usize), DispatchError> {
        let now = crate::clock::now();
        let mut desk = self.lock();
        let hold = desk
            .tenants
            .admit_costed(tenant, model, tokens, cost, now, day)
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
        let max_queued = desk
            .tenants
            .spec(tenant)
            .map_or(usize::MAX, |s| s.max_queued as usize);
        Ok((hold, max_queued))
    }

    /// The dry run behind `Route`: consumes nothing.
    pub(super) fn preview(
        &self,
        req: &RouteRequest<'_>,
        now: Instant,
    ) -> Result<RoutePreview, DispatchError> {
        Ok(self.lock().scheduler.router().preview(req, now)?)
    }

    /// Applies a new configuration (all or nothing).
    pub(super) fn apply(&self, config: &Config, now: Instant) -> Result<(), String> {
        {
            let mut desk = self.lock();
            // Build everything that can fail before changing anything.
            let mut next_tenants = desk.tenants.clone();
            next_tenants
                .apply(&config.tenant_specs(), now)
                .map_err(|e| e.to_string())?;
            // All or nothing by itself; fails only on limits validation has
            // already refused.
            desk.scheduler
                .router_mut()
                .apply(config.router_spec(), now)
                .map_err(|e| e.to_string())?;
            desk.scheduler.set_weights(next_tenants.weights());
            desk.scheduler.set_max_queued(config.routing.max_queued as usize);
            desk.scheduler.set_overload(config.routing.overload);
            desk.tenants = next_tenants;
            let rules = config.capacity_rules();
            desk.capacity.apply(rules);
            desk.apply_pressure();
        }
        // Limits may have grown: let waiters through.
        self.wake();
        Ok(())
    }

    /// Stops (or resumes) sending new work to `region`; false if unknown.
    pub fn drain(&self, region: &str, drained: bool) -> bool {
        let known = self.lock().scheduler.router_mut().set_drained(region, drained);
        self.wake();
        known
    }

    /// Overrides `region`'s weight until the next reload (`None` clears it).
    pub fn set_weight(&self, region: &str, weight: Option<f64>) -> bool {
        let known = self
            .lock()
            .scheduler
            .router_mut()
            .set_weight_override(region, weight);
        self.wake();
        known
    }

    /// The calls to the central buckets (quota shared with other replicas):
    /// taken under the lock, sent without it.
    pub fn sync_calls(&self, now: Instant) -> Vec<SyncItem> {
        self.lock().scheduler.sync_calls(now)
    }

    /// The answers to `sync_calls` (`None`: no answer); wakes the pump, as
    /// a grant may let waiting requests through.
    pub fn sync_done(&self, done: Vec<(SyncItem, Option<SyncGrant>)>, sent_at: Instant, now: Instant) {
        self.lock().scheduler.router_mut().sync_done(done, sent_at, now);
        self.wake();
    }

    /// Each limited tenant's charges since the last sync (`[cluster]`).
    pub fn tenant_usage(&self) -> Vec<TenantUsage> {
        self.lock().tenants.usage_to_sync(super::today())
    }

    /// Redis' running totals after adding `usage` (`None`: no answer; the
    /// charges go again next time).
    pub fn tenants_synced(&self, usage: &[TenantUsage], totals: Option<&[TenantTotals]>, now: Instant) {
        let mut desk = self.lock();
        for (i, u) in usage.iter().enumerate() {
            match totals.and_then(|t| t.get(i)) {
                Some(&totals) => desk.tenants.synced(u, totals, now),
                None => desk.tenants.unsynced(u),
            }
        }
    }

    /// What the health checks concluded about `region`.
    pub fn set_health(&self, region: &str, healthy: bool) -> bool {
        let known = self.lock().scheduler.router_mut().set_healthy(region, healthy);
        self.wake();
        known
    }

    /// Whether `region` is in service as far as health checks go (`None`:
    /// no such region).
    pub fn healthy(&self, region: &str) -> Option<bool> {
        self.lock().scheduler.router().region(region).map(|r| r.healthy())
    }

    /// How many regions are out (unhealthy or circuit open) of how many.
    pub fn availability(&self, now: Instant) -> (usize, usize) {
        let desk = self.lock();
        let regions = desk.scheduler.router().regions();
        let down = regions
            .iter()
            .filter(|r| !r.healthy() || r.circuit(now).kind() == crate::core::Circuit::Open)
            .count();
        (down, regions.len())
    }

    /// Everything operators see, in one pass under the lock; `endpoint`
    /// names each region's cluster.
    pub fn view(&self, now: Instant, endpoint: impl Fn(&str) -> String) -> EngineView {
        let mut guard = self.lock();
        // Spend is reported for today and this month, not the last day a
        // tenant was admitted.
        guard.tenants.roll(super::today());
        let desk = &*guard;
        let sched = &desk.scheduler;
        let router = sched.router();
        let regions = router
            .regions()
            .iter()
            .map(|r| {
                let load = r.load();
                let models = router
                    .models()
                    .iter()
                    .enumerate()
                    .filter_map(|(id, m)| r.quota(id).map(|q| (m, q)))
                    .map(|(m, q)| QuotaView {
                        model: m.name.clone(),
                        accounting: q.limits().accounting.as_str(),
                        tokens_per_minute: q.tokens().per_minute(),
                        requests_per_minute: q.requests().per_minute(),
                        burst_tokens: q.tokens().capacity(),
                        burst_requests: q.requests().capacity(),
                        tokens_available: q.tokens().available(now),
                        requests_available: q.requests().available(now),
                        tokens_reserved: q.in_flight_tokens(),
                        requests_in_flight: q.in_flight_requests(),
                        tokens_full_in: q.tokens().time_to_full(now),
                        last_hint: q
                            .last_hint()
                            .map(|h| (h.hint, now.saturating_duration_since(h.at))),
                        provider_blocked_for: q.blocked_for(now),
                        queued: sched.queued_for(&m.name),
                        queue_state: sched.queue_state(&m.name).0,
                        refused_early: sched.queue_state(&m.name).1,
                        sharing: q.shared().map(|s| s.view(now)),
                    })
                    .collect();
                RegionView {
                    name: r.name().to_string(),
                    endpoint: endpoint(r.name()),
                    weight: r.weight(),
                    configured_weight: r.configured_weight(),
                    weight_override: r.weight_override(),
                    drained: r.drained(),
                    healthy: r.healthy(),
                    in_flight: load.in_flight(),
                    max_concurrent: load.capacity(),
                    utilization: load.utilization(now),
                    latency_ms_per_1k: load.latency_per_1k_ms(now),
                    error_rate: load.error_rate(now),
                    completed: load.completed(),
                    failed: load.failed(),
                    circuit: r.circuit(now),
                    models,
                }
            })
            .collect();
        let queued = router
            .models()
            .iter()
            .map(|m| {
                (
                    m.name.clone(),
                    sched.queued_for(&m.name),
                    sched.oldest_wait(&m.name, now),
                )
            })
            .collect();
        let overload = router
            .models()
            .iter()
            .map(|m| {
                let (state, refused) = sched.queue_state(&m.name);
                (m.name.clone(), state, refused)
            })
            .collect();
        let tenants = desk
            .tenants
            .report(now)
            .into_iter()
            .map(|report| TenantView {
                queued: sched.queued_for_tenant(&report.spec.name),
                report,
            })
            .collect();
        EngineView {
            at: now,
            regions,
            queued,
            overload,
            tenants,
        }
    }
}

impl Settle for QuotaDesk {
    fn settle_region(&self, r: &Reservation, c: Completion) -> u64 {
        // Whether anyone waits is read under the same lock as the settlement:
        // a request queued after it wakes the pump itself. Waking the pump
        // for every settlement cost two context switches per request.
        let (settled, waiting) = {
            let mut desk = self.lock();
            let settled = desk.scheduler.router_mut().settle(r, c, crate::clock::now());
            (settled, desk.scheduler.queued() > 0)
        };
        record(r, &settled);
        if waiting {
            self.wake();
        }
        settled.charged
    }

    fn settle_tenant(&self, hold: TenantHold, charged: u64, cost: u64) {
        self.lock()
            .tenants
            .settle_costed(hold, charged, cost, crate::clock::now());
    }

    fn give_back(&self, returned: Returned) {
        // The receiver lives as long as the desk; a send can only fail
        // while the whole desk is going away.
        let _ = self.returns.send(returned);
        self.wake();
    }
}

impl Desk {
    /// Sets every named region's pressure from the capacity rules (after a
    /// rule changed state, and after a reload).
    pub(super) fn apply_pressure(&mut self) {
        for p in self.capacity.pressure() {
            self.scheduler.router_mut().set_pressure(&p);
        }
    }
}

/// Metrics and logs for a settlement (after the fact, cheap).
fn record(r: &Reservation, settled: &Settled) {
    observe::settled(
        &r.region,
        &r.model,
        r.hold.tokens,
        settled.charged,
        settled.hint.as_ref(),
    );
    if let Some(t) = settled.transition {
        if t.to == crate::core::Circuit::Open {
            tracing::warn!(region = %r.region, from = t.from.name(), "circuit opened: too many errors; no work goes there until the cool-down");
        } else {
            tracing::info!(region = %r.region, from = t.from.name(), to = t.to.name(), "circuit changed");
        }
    }
    if let Some(HintOutcome::Ignored { reason, first: true }) = &settled.hint {
        tracing::warn!(region = %r.region, model = %r.model, %reason, "ignoring an impossible provider quota hint (logged once per region and model)");
    }
    if !settled.found {
        tracing::info!(region = %r.region, model = %r.model, "settled work on a region or model removed by a reload");
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;
    use std::path::Path;

    use super::*;
    use crate::dispatch::lease::Lease;

    fn desk() -> Arc<QuotaDesk> {
        let toml = "[auth]\nallow_anonymous = true\nanonymous_tenant = \"t\"\n[[models]]\nname = \"m\"\n[[tenants]]\nname = \"t\"\nmax_concurrent = 1\n";
        let c = crate::config::parse_dispatcher(toml, Path::new("dispatcher.toml"), Some(HashMap::new()))
            .unwrap();
        QuotaDesk::new(&c, crate::testing::epoch()).unwrap()
    }

    fn in_flight(desk: &QuotaDesk) -> u32 {
        desk.view(crate::clock::now(), |_| String::new()).tenants[0]
            .report
            .in_flight
    }

    /// A lease dropped while its desk's lock is held (by the pump, say)
    /// does not wait for that lock: its settlement is applied at the desk's
    /// next turn. A Drop that locked would deadlock here.
    #[test]
    fn a_lease_dropped_under_the_desks_lock_settles_at_its_next_turn() {
        let desk = desk();
        let day = crate::core::Day::at_unix(0);
        let (hold, _) = desk.admit_tenant("t", "m", 10, 0, day).unwrap();
        let lease = Lease::new(desk.clone(), hold);
        assert_eq!(in_flight(&desk), 1);
        let guard = desk.lock();
        drop(lease);
        drop(guard);
        assert_eq!(in_flight(&desk), 0, "settled at the next turn");
        assert!(
            desk.admit_tenant("t", "m", 10, 0, day).is_ok(),
            "its max_concurrent slot is free again"
        );
    }
}
