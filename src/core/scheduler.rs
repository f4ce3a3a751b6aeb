//! Reserve now or wait for quota: the router plus the queue of requests
//! waiting for a refill. A request is reserved at once only if nobody waits
//! for its model (newcomers never jump the queue); otherwise it waits, and the
//! refill is held for the head of its model's queue, so a large request is
//! not starved by small ones that would fit sooner. With overload control
//! (`overload.rs`), a queue that stands sheds instead: newcomers that cannot
//! be served now, beside the head, are refused at once, tenants over their
//! share first, but for a bounded share of the refill they may still hold.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use thiserror::Error;

use super::fair::FairQueue;
use super::overload::{OverloadSettings, QueueState, StandingWait};
use super::queue::{DisciplineFactory, WaitQueue, Waiter};
use super::router::{Reservation, RouteError, RouteRequest, Router, SyncItem, WaitingByQuota};
use super::tenant::Weights;

/// How often queued waiters whose caller went away or whose wait ran out
/// are swept out (heads are checked on every release).
pub const SWEEP_INTERVAL: Duration = Duration::from_millis(250);

/// The part of a request's wait kept for its own refill once it is at the
/// head: a request is queued only if the quota queued ahead of it comes back
/// within the rest.
pub const HEAD_ROOM: f64 = 0.2;

/// How many waiters behind a held head are tried for regions it does not
/// hold, per model and release.
pub const BACKFILL: usize = 32;

/// A request as the scheduler takes it.
#[derive(Debug, Clone)]
pub struct Submission {
    pub model: Arc<str>,
    pub tokens: u64,
    pub origin: Option<Arc<str>>,
    pub tenant: Arc<str>,
    pub tried: Vec<Arc<str>>,
    /// It may wait for quota until then (its deadline and the configured max wait).
    pub wait_until: Instant,
    /// How many of its tenant's requests may wait at once.
    pub tenant_max_queued: usize,
}

#[derive(Debug, Clone, PartialEq, Error)]
pub enum SubmitError {
    #[error(transparent)]
    Route(RouteError),
    /// The quota queued ahead of it will not come back before it must stop
    /// waiting: refused now rather than after waiting in vain.
    #[error(
        "{model} quota for this request would come back in about {projected:.1?} ({queued_tokens} tokens and {queued_requests} requests queued ahead, refilling at {tokens_per_sec:.0} tokens/s in all; then its own refill in one region), past the {may_wait:.1?} it may wait"
    )]
    WouldExpire {
        model: String,
        projected: Duration,
        may_wait: Duration,
        queued_tokens: u64,
        queued_requests: u64,
        tokens_per_sec: f64,
    },
    /// The model's queue is standing (its shortest wait stayed above the
    /// target for an interval): a newcomer over its tenant's share that
    /// cannot be served now is refused at once.
    #[error(
        "no region has {model} quota for this request now, and its queue is shedding load: the shortest wait stayed above {target:.1?} for {interval:.1?}; retry in about {retry_after:.1?}"
    )]
    Shedding {
        model: String,
        retry_after: Duration,
        target: Duration,
        interval: Duration,
    },
    #[error("{queued} requests of tenant {tenant} are already waiting for quota (its max_queued)")]
    TenantQueueFull {
        tenant: String,
        queued: usize,
        retry_after: Option<Duration>,
    },
    #[error("{queued} requests are already waiting for quota")]
    QueueFull {
        queued: usize,
        /// When the earliest waiter could be served.
        retry_after: Option<Duration>,
    },
}

#[derive(Debug)]
pub enum Submitted {
    Reserved(Reservation),
    /// Waiting; the ticket comes back through `release`.
    Queued {
        id: u64,
    },
}

/// What became of a waiter.
#[derive(Debug)]
pub enum Released<T> {
    Granted(Waiter<T>, Reservation),
    /// Its wait ran out; `retry_after` is when it could have fit.
    Expired(Waiter<T>, Option<Duration>),
    /// Its caller went away; nothing was consumed for it.
    Gone(Waiter<T>),
    /// Waiting stopped making sense (every region drained, model removed).
    Failed(Waiter<T>, RouteError),
}

pub struct Scheduler<T> {
    router: Router,
    queue: WaitQueue<T>,
    max_queued: usize,
    next_id: u64,
    next_sweep: Option<Instant>,
    /// `None`: newcomers always wait as long as they may (the old queue).
    overload: Option<OverloadSettings>,
    standing: HashMap<Arc<str>, StandingWait>,
}

impl<T: Send + 'static> Scheduler<T> {
    pub fn fifo(router: Router, max_queued: usize) -> Self {
        Self::new(
            router,
            max_queued,
            Box::new(|| Box::new(super::queue::Fifo::default())),
        )
    }

    /// Weighted fair queuing across tenants on token cost; `weights` can be
    /// replaced later with `set_weights`.
    pub fn fair(router: Router, max_queued: usize, weights: Arc<Weights>) -> Self {
        let mut s = Self::new(
            router,
            max_queued,
            Box::new(|| Box::new(FairQueue::new(Arc::new(Weights::default())))),
        );
        s.set_weights(weights);
        s
    }
}

impl<T> Scheduler<T> {
    pub fn new(router: Router, max_queued: usize, discipline: DisciplineFactory<T>) -> Self {
        Self {
            router,
            queue: WaitQueue::new(discipline),
            max_queued,
            next_id: 1,
            next_sweep: None,
            overload: None,
            standing: HashMap::new(),
        }
    }

    /// Overload control (`None`: off); trackers keep their state.
    pub fn set_overload(&mut self, overload: Option<OverloadSettings>) {
        self.overload = overload;
    }

    /// Whether `model`'s queue absorbs or sheds, and how many newcomers it
    /// refused early so far.
    pub fn queue_state(&self, model: &str) -> (QueueState, u64) {
        self.standing
            .get(model)
            .map_or((QueueState::Absorbing, 0), |w| (w.state(), w.refused_early()))
    }

    /// Brings `model`'s standing-wait tracker up to `now`; whether its
    /// queue sheds.
    fn observe(&mut self, model: &Arc<str>, now: Instant) -> bool {
        let Some(settings) = self.overload else {
            return false;
        };
        let head = self.queue.head(model).map(|h| h.enqueued);
        let w = self.standing.entry(model.clone()).or_default();
        w.observe(&settings, head, now);
        w.state() == QueueState::Shedding
    }

    pub fn router(&self) -> &Router {
        &self.router
    }

    pub fn router_mut(&mut self) -> &mut Router {
        &mut self.router
    }

    pub fn queued(&self) -> usize {
        self.queue.len()
    }

    pub fn queued_for(&self, model: &str) -> usize {
        self.queue.waiting(model)
    }

    /// How long the longest-waiting request for `model` has waited (zero
    /// with nobody waiting): with the depth, what an autoscaler reads.
    pub fn oldest_wait(&self, model: &str, now: Instant) -> Duration {
        self.queue
            .oldest(model)
            .map_or(Duration::ZERO, |t| now.saturating_duration_since(t))
    }

    pub fn set_max_queued(&mut self, max_queued: usize) {
        self.max_queued = max_queued;
    }

    /// Tenant weights for the fair queue (after a reload).
    pub fn set_weights(&mut self, weights: Arc<Weights>) {
        self.queue.set_weights(weights);
    }

    pub fn queued_for_tenant(&self, tenant: &str) -> usize {
        self.queue.queued_for_tenant(tenant)
    }

    /// Reserves at once if nobody waits for the model and a region has room;
    /// otherwise queues the request (with the ticket `make_ticket` gives)
    /// when waiting could help and it may wait at all.
    pub fn submit(
        &mut self,
        s: Submission,
        now: Instant,
        make_ticket: impl FnOnce() -> T,
    ) -> Result<Submitted, SubmitError> {
        let req = RouteRequest {
            model: &s.model,
            tokens: s.tokens,
            origin: s.origin.as_deref(),
        };
        // A standing queue of only the newcomer's tenant serves it at once
        // in a region the head does not hold the refill of (it overtakes
        // only its own tenant's waiters; with others waiting, the fair
        // queue decides who is next).
        let shedding = self.observe(&s.model, now);
        if shedding
            && self.queue.tenant_alone(&s.model, &s.tenant)
            && let Some(r) = self.reserve_beside_head(&req, &s.tried, now)
        {
            return Ok(Submitted::Reserved(r));
        }
        let error = if self.queue.is_waiting(&s.model) {
            // Behind others: only the router's verdict on whether it could
            // ever fit matters (a too-large request must not wait for nothing).
            match self.router.preview(&req, now) {
                Ok(p) => match p.error {
                    None => RouteError::NoCapacity {
                        retry_after: None,
                        summary: "others are waiting for this model's quota".into(),
                    },
                    Some(e) => e,
                },
                Err(e) => e,
            }
        } else {
            match self.router.reserve(&req, &s.tried, now) {
                Ok(r) => return Ok(Submitted::Reserved(r)),
                Err(e) => e,
            }
        };
        let RouteError::NoCapacity { retry_after, .. } = &error else {
            return Err(SubmitError::Route(error));
        };
        if s.wait_until <= now {
            return Err(SubmitError::Route(error));
        }
        // A standing queue takes no newcomer over its tenant's share: it
        // is refused at once, while it can still go elsewhere.
        // Otherwise it is refused at once if its tenant is over its share,
        // unless it may hold the refill (within the hold share).
        // Not when only the split of a shared quota between replicas keeps
        // it from fitting now: one process would serve it, and it is served
        // at the next grant (refusing it would also keep the queue shedding).
        if shedding
            && self.queue.over_share(&s.model, &s.tenant)
            && !self.router.fits_next_grant(&req, &s.tried, now)
            && !self.may_hold(&s, now)
        {
            return Err(self.shed(&s, *retry_after, now));
        }
        if let Some(supply) = self.router.supply(&s.model, s.tokens, &s.tried, now) {
            // When will the quota queued ahead have come back, in tokens and
            // in requests (either limit may bind)? The estimate is blind to
            // the request's own size on purpose: under overload the backlog
            // settles at whatever the admission test allows, and a
            // size-dependent test would then admit only the smallest
            // requests. The request's own share of the refill is covered by
            // keeping `HEAD_ROOM` of its wait in reserve.
            let queued_tokens = self.queue.tokens_ahead(&s.model, &s.tenant);
            let queued_requests = self.queue.requests_ahead(&s.model, &s.tenant);
            let drain = |queued: u64, available: i64, per_sec: f64| {
                Duration::from_secs_f64(((queued as f64 - available as f64) / per_sec).max(0.0))
            };
            let projected = drain(queued_tokens, supply.available, supply.tokens_per_sec).max(drain(
                queued_requests,
                supply.requests_available,
                supply.requests_per_sec,
            ));
            let may_wait = s.wait_until.saturating_duration_since(now);
            // Its own refill, in one region: with nobody waiting, exactly when
            // it fits first; behind others, the fastest region's refill of
            // its size at the tenant's share. Beyond the head room this
            // request would expire in the queue whatever the backlog does.
            let own = if !self.queue.is_waiting(&s.model) {
                self.router
                    .earliest_fit(&req, &s.tried, now)
                    .map_or(Duration::ZERO, |(_, wait)| wait)
            } else {
                let share = self.queue.share(&s.model, &s.tenant).max(f64::MIN_POSITIVE);
                Duration::try_from_secs_f64(supply.own_refill.as_secs_f64() / share).unwrap_or(Duration::MAX)
            };
            if projected > may_wait.mul_f64(1.0 - HEAD_ROOM) || projected.saturating_add(own) > may_wait {
                return Err(SubmitError::WouldExpire {
                    model: s.model.to_string(),
                    projected: projected.saturating_add(own),
                    may_wait,
                    queued_tokens,
                    queued_requests,
                    tokens_per_sec: supply.tokens_per_sec,
                });
            }
        }
        let tenant_queued = self.queue.queued_for_tenant(&s.tenant);
        if tenant_queued >= s.tenant_max_queued {
            return Err(SubmitError::TenantQueueFull {
                tenant: s.tenant.to_string(),
                queued: tenant_queued,
                retry_after: *retry_after,
            });
        }
        if self.queue.len() >= self.max_queued {
            return Err(SubmitError::QueueFull {
                queued: self.queue.len(),
                retry_after: self
                    .queue
                    .earliest_retry()
                    .map(|t| t.saturating_duration_since(now))
                    .or(*retry_after),
            });
        }
        let id = self.next_id;
        self.next_id += 1;
        self.queue.push(Waiter {
            id,
            model: s.model,
            tokens: s.tokens,
            origin: s.origin,
            tenant: s.tenant,
            tried: s.tried,
            enqueued: now,
            deadline: s.wait_until,
            retry_at: retry_after.map(|d| now + d),
            ticket: make_ticket(),
        });
        Ok(Submitted::Queued { id })
    }

    /// A reservation for `req` in a region the head of its model's queue
    /// does not wait for (`None`: nobody waits, or nothing fits there now).
    fn reserve_beside_head(
        &mut self,
        req: &RouteRequest<'_>,
        tried: &[Arc<str>],
        now: Instant,
    ) -> Option<Reservation> {
        let head = self.queue.head(req.model)?;
        let head_req = RouteRequest {
            model: &head.model,
            tokens: head.tokens,
            origin: head.origin.as_deref(),
        };
        let mut excluded = tried.to_vec();
        excluded.extend(
            self.router
                .earliest_fit(&head_req, &head.tried, now)
                .map(|(held, _)| held),
        );
        self.router.reserve(req, &excluded, now).ok()
    }

    /// Whether `s`, which does not fit now, may wait for the refill while
    /// its model's queue sheds: only as the queue's head (nobody else holds
    /// the refill) and within the hold share.
    fn may_hold(&mut self, s: &Submission, now: Instant) -> bool {
        let Some(settings) = self.overload else {
            return true;
        };
        if self.queue.is_waiting(&s.model) {
            return false;
        }
        let per_sec = self
            .router
            .supply(&s.model, s.tokens, &s.tried, now)
            .map_or(0.0, |supply| supply.tokens_per_sec);
        self.standing
            .get_mut(&s.model)
            .is_some_and(|w| w.take_hold(&settings, s.tokens, per_sec, now))
    }

    /// Refuses `s` early (its model's queue is shedding), with a retry hint:
    /// when the queue ahead will have drained and it could fit.
    fn shed(&mut self, s: &Submission, fits_in: Option<Duration>, now: Instant) -> SubmitError {
        let settings = self.overload.unwrap_or_default();
        let drained_in = self
            .router
            .supply(&s.model, s.tokens, &s.tried, now)
            .map(|supply| {
                let queued = self.queue.tokens_ahead(&s.model, &s.tenant) as f64;
                Duration::try_from_secs_f64(
                    ((queued - supply.available as f64) / supply.tokens_per_sec).max(0.0),
                )
                .unwrap_or(Duration::MAX)
            });
        if let Some(w) = self.standing.get_mut(&s.model) {
            w.refused(now);
        }
        SubmitError::Shedding {
            model: s.model.to_string(),
            retry_after: drained_in
                .unwrap_or_default()
                .max(fits_in.unwrap_or_default())
                .max(Duration::from_millis(100)),
            target: settings.target,
            interval: settings.interval,
        }
    }

    /// Serves every queue head that fits now, in order, and drops waiters
    /// that expired or whose caller is `gone`. Call it whenever quota may
    /// have come back (a settlement, a refill time, a config change).
    pub fn release(&mut self, now: Instant, mut gone: impl FnMut(&T) -> bool) -> Vec<Released<T>> {
        let mut out = Vec::new();
        if self.next_sweep.is_none_or(|t| t <= now) {
            // Heads are checked below on every call; the rest only now and
            // then, so a long queue costs nothing per settlement.
            for w in self.queue.remove_where(|w| gone(&w.ticket) || w.deadline <= now) {
                if w.deadline <= now {
                    out.push(Released::Expired(w, None));
                } else {
                    out.push(Released::Gone(w));
                }
            }
            self.next_sweep = Some(now + SWEEP_INTERVAL);
        }
        for model in self.queue.models() {
            while let Some(head) = self.queue.head(&model) {
                if gone(&head.ticket) {
                    let w = self.queue.pop(&model).expect("head exists");
                    out.push(Released::Gone(w));
                    continue;
                }
                let req = RouteRequest {
                    model: &head.model,
                    tokens: head.tokens,
                    origin: head.origin.as_deref(),
                };
                match self.router.reserve(&req, &head.tried, now) {
                    Ok(r) => {
                        let w = self.queue.pop(&model).expect("head exists");
                        out.push(Released::Granted(w, r));
                    }
                    Err(RouteError::NoCapacity { retry_after, .. }) => {
                        let held = self
                            .router
                            .earliest_fit(&req, &head.tried, now)
                            .map(|(region, _)| region);
                        let head = self.queue.head_mut(&model).expect("head exists");
                        if head.deadline <= now {
                            let w = self.queue.pop(&model).expect("head exists");
                            out.push(Released::Expired(w, retry_after));
                            continue;
                        }
                        head.retry_at = retry_after.map(|d| now + d);
                        if let Some(held) = held {
                            self.backfill(&model, held, now, &mut out);
                        }
                        break;
                    }
                    Err(e) => {
                        let w = self.queue.pop(&model).expect("head exists");
                        out.push(Released::Failed(w, e));
                    }
                }
            }
        }
        if let Some(settings) = self.overload {
            for (model, w) in &mut self.standing {
                w.observe(&settings, self.queue.head(model).map(|h| h.enqueued), now);
            }
        }
        out
    }

    /// The head holds the refill of region `held`. The requests next in
    /// line, in order, take what fits now in a region nobody ahead of them
    /// holds; one that does not fit holds the region it will fit in first.
    /// So nobody is overtaken on the refill it waits for, and no refill
    /// lies idle while someone could use it.
    fn backfill(&mut self, model: &Arc<str>, held: Arc<str>, now: Instant, out: &mut Vec<Released<T>>) {
        let mut held = vec![held];
        for id in self.queue.candidates(model, BACKFILL).into_iter().skip(1) {
            let Some(w) = self.queue.get(model, id) else {
                continue;
            };
            if w.deadline <= now {
                continue;
            }
            let mut excluded = w.tried.clone();
            excluded.extend(held.iter().cloned());
            let req = RouteRequest {
                model: &w.model,
                tokens: w.tokens,
                origin: w.origin.as_deref(),
            };
            match self.router.reserve(&req, &excluded, now) {
                Ok(r) => {
                    let w = self.queue.take(model, id).expect("candidate exists");
                    out.push(Released::Granted(w, r));
                }
                Err(_) => match self.router.earliest_fit(&req, &excluded, now) {
                    Some((region, _)) => held.push(region),
                    // Every region is held by someone ahead: nothing more fits.
                    None => break,
                },
            }
        }
    }

    /// The next calls to the central buckets (quota shared with other
    /// replicas), each sized with what the requests waiting for it need.
    /// Each waiter (the head and up to `BACKFILL` behind it) counts in one
    /// region, as `backfill` serves them: the head in the region it would
    /// fit in first, each next one in the region it would fit in first
    /// among those nobody ahead of it waits for (once every region is
    /// waited for, where it fits first). Asking in every region a request
    /// could go to would hold their quota from the other replicas.
    pub fn sync_calls(&mut self, now: Instant) -> Vec<SyncItem> {
        let mut waiting = WaitingByQuota::new();
        for model in self.queue.models() {
            let mut held: Vec<Arc<str>> = Vec::new();
            for id in self.queue.candidates(&model, BACKFILL) {
                let Some(w) = self.queue.get(&model, id) else {
                    continue;
                };
                let req = RouteRequest {
                    model: &w.model,
                    tokens: w.tokens,
                    origin: w.origin.as_deref(),
                };
                let mut excluded = w.tried.clone();
                excluded.extend(held.iter().cloned());
                let region = match self.router.earliest_fit(&req, &excluded, now) {
                    Some((region, _)) => {
                        held.push(region.clone());
                        Some(region)
                    }
                    None => self.router.earliest_fit(&req, &w.tried, now).map(|(r, _)| r),
                };
                if let Some(region) = region {
                    let e = waiting.entry((region, model.clone())).or_default();
                    if e.requests == 0 {
                        e.first = w.tokens;
                    }
                    e.tokens += w.tokens;
                    e.requests += 1;
                }
            }
        }
        self.router.sync_calls(&waiting, now)
    }

    /// When `release` should run next if nothing else happens: the earliest
    /// refill or deadline a head waits for. `None`: only an event (a
    /// settlement) can help. Callers with waiters also wake every
    /// `SWEEP_INTERVAL` so that gone callers are reclaimed.
    pub fn next_wake(&self) -> Option<Instant> {
        self.queue
            .models()
            .iter()
            .filter_map(|m| self.queue.head(m))
            .flat_map(|h| [h.retry_at, Some(h.deadline)])
            .flatten()
            .min()
    }
}

#[cfg(test)]
#[path = "scheduler_tests.rs"]
mod tests;
