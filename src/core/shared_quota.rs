//! One replica's part of a (region, model) quota shared with other
//! replicas through a central bucket (`central.rs`, Redis in production).
//!
//! Requests never wait on Redis: they spend what the sync task was granted
//! (the replica's *holding*). Every call tells the central bucket what the
//! replica holds and, in running totals, what it spent; the bucket counts
//! the holding against the provider's burst and takes back what the
//! replica gives back. So tokens granted are spent, given back (the part
//! of the holding beyond what the replica needs, when others need it), or
//! still held: none is lost while Redis answers. A holding stays
//! spendable `chunk_ttl` after the call that last answered; without an
//! answer for that long it lapses (counted as expired; Redis takes it back
//! at the next answer if it still knows the replica).
//!
//! What finished requests give back or use beyond their reservation, what
//! the provider says and its refusals are kept here and ride on the next
//! call; the running totals make a call that is lost, repeated or applied
//! late count once.
//!
//! When Redis has not answered for `unreachable_after`, the replica falls
//! back: it spends its holding while it lasts, then a local bucket that
//! starts empty and refills at the provider's rate divided by the replicas
//! it last knew of (at least `replicas_floor`). What it spends there goes
//! into a running total that Redis charges, once, when it answers again.
//!
//! This sits beside the replica's own model of the provider (`ModelQuota`'s
//! buckets, which keep working as in one process): a request needs room in
//! both.

use std::time::{Duration, Instant};

use super::central::{CentralLimits, SyncCall, SyncGrant, Totals};
use super::quota::QuotaBucket;

/// How a replica shares quota (`[cluster]` in the config).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SharingSettings {
    /// What a replica holds lapses this long after the last call answered.
    pub chunk_ttl: Duration,
    /// How often the sync task calls Redis.
    pub tick: Duration,
    /// Without a reply for this long, the replica falls back.
    pub unreachable_after: Duration,
    /// The fewest replicas to assume when dividing the fallback rate.
    pub replicas_floor: u32,
    /// Always true in service; false only in tests, to show that the bound
    /// depends on holdings lapsing when Redis does not answer.
    pub expire_chunks: bool,
}

impl Default for SharingSettings {
    fn default() -> Self {
        Self {
            chunk_ttl: Duration::from_secs(1),
            tick: Duration::from_millis(100),
            unreachable_after: Duration::from_millis(500),
            replicas_floor: 1,
            expire_chunks: true,
        }
    }
}

/// Where the replica's quota comes from now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SharingMode {
    /// Granted by the central bucket.
    Shared,
    /// Redis unreachable: the holding while it lasts, then the local
    /// fallback bucket.
    Fallback,
}

impl SharingMode {
    pub fn as_str(self) -> &'static str {
        match self {
            SharingMode::Shared => "shared",
            SharingMode::Fallback => "fallback",
        }
    }
}

/// How far ahead a replica asks, in its recent spending, at least.
const HORIZON_TICKS: u32 = 3;

/// Spending over the last two whole seconds, for sizing asks: tokens and
/// requests, and the largest request.
#[derive(Debug, Clone, Copy, Default)]
struct Demand {
    window_start: Option<Instant>,
    current: (u64, u64, u64),
    previous: (u64, u64, u64),
}

impl Demand {
    fn roll(&mut self, now: Instant) {
        let start = *self.window_start.get_or_insert(now);
        let age = now.saturating_duration_since(start);
        if age >= Duration::from_secs(2) {
            self.previous = (0, 0, 0);
            self.current = (0, 0, 0);
            self.window_start = Some(now);
        } else if age >= Duration::from_secs(1) {
            self.previous = self.current;
            self.current = (0, 0, 0);
            self.window_start = Some(start + Duration::from_secs(1));
        }
    }

    fn add(&mut self, tokens: u64, now: Instant) {
        self.roll(now);
        self.current.0 += tokens;
        self.current.1 += 1;
        self.current.2 = self.current.2.max(tokens);
    }

    /// Tokens and requests a second (the larger of the two windows), and
    /// the largest request of either.
    fn recent(&self) -> (u64, u64, u64) {
        (
            self.current.0.max(self.previous.0),
            self.current.1.max(self.previous.1),
            self.current.2.max(self.previous.2),
        )
    }
}

/// What the requests waiting for this (region, model) need, as the queue
/// has them when the sync task calls.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Waiting {
    /// The oldest one's tokens.
    pub first: u64,
    /// All of them together.
    pub tokens: u64,
    pub requests: u64,
}

/// Totals since start, for metrics.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct SharingTotals {
    pub granted_tokens: u64,
    /// Spent from what was granted (not from the fallback bucket).
    pub spent_tokens: u64,
    /// Given back to the level, not needed here.
    pub returned_tokens: u64,
    /// Lapsed while Redis did not answer (Redis takes them back when it
    /// answers again, if it still knows this replica).
    pub expired_tokens: u64,
    pub calls: u64,
    pub failed_calls: u64,
    pub fallback_time: Duration,
}

/// What operators see of one (region, model)'s sharing.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SharingView {
    pub mode: SharingMode,
    /// This replica's holding, and the fallback bucket's level.
    pub balance_tokens: u64,
    pub balance_requests: u64,
    /// The central levels at the last reply (`None` before one).
    pub central_tokens: Option<i64>,
    pub central_requests: Option<i64>,
    pub replicas: u32,
    /// Replicas whose calls carry other limits than this one's (the central
    /// bucket applies the lowest).
    pub disagreeing: u32,
    pub blocked_for: Option<Duration>,
    pub totals: SharingTotals,
}

#[derive(Debug, Clone)]
pub struct SharedQuota {
    settings: SharingSettings,
    limits: CentralLimits,
    mode: SharingMode,
    /// Granted, not spent, given back or lapsed; spendable until `valid_until`.
    held_tokens: u64,
    held_requests: u64,
    valid_until: Option<Instant>,
    /// The local bucket while in fallback (starts empty).
    fallback: Option<(QuotaBucket, QuotaBucket)>,
    fallback_since: Option<Instant>,
    /// Numbers the calls.
    seq: u64,
    /// Running totals since start, never reset (see `central::Totals`).
    spent: (u64, u64),
    running: Totals,
    /// `running` as of the last call answered.
    acked: Totals,
    hint: Option<(i64, i64)>,
    block: Duration,
    blocked_until: Option<Instant>,
    demand: Demand,
    /// What the requests waiting for this quota need (set before each call).
    waiting: Waiting,
    /// The last call asked for more than it was granted: the level is short.
    short: bool,
    last_ok: Instant,
    central: Option<SyncGrant>,
    totals: SharingTotals,
}

impl SharedQuota {
    pub fn new(limits: CentralLimits, settings: SharingSettings, now: Instant) -> Self {
        Self {
            limits,
            settings,
            mode: SharingMode::Shared,
            held_tokens: 0,
            held_requests: 0,
            valid_until: None,
            fallback: None,
            fallback_since: None,
            seq: 0,
            spent: (0, 0),
            running: Totals::default(),
            acked: Totals::default(),
            hint: None,
            block: Duration::ZERO,
            blocked_until: None,
            demand: Demand::default(),
            waiting: Waiting::default(),
            short: false,
            last_ok: now,
            central: None,
            totals: SharingTotals::default(),
        }
    }

    pub fn set_limits(&mut self, limits: CentralLimits) {
        self.limits = limits;
    }

    pub fn limits(&self) -> &CentralLimits {
        &self.limits
    }

    pub fn settings(&self) -> &SharingSettings {
        &self.settings
    }

    pub fn mode(&self) -> SharingMode {
        self.mode
    }

    /// This replica's part of the provider's rate, for estimating waits:
    /// one over the replicas Redis last knew of (before any answer, over
    /// the configured floor).
    pub fn part(&self) -> f64 {
        let n = self.central.map_or(self.settings.replicas_floor, |g| g.replicas);
        1.0 / n.max(1) as f64
    }

    fn holding(&self, now: Instant) -> (u64, u64) {
        if self.valid_until.is_some_and(|v| v > now) {
            (self.held_tokens, self.held_requests)
        } else {
            (0, 0)
        }
    }

    /// Tokens and requests this replica holds now (and its fallback bucket).
    pub fn balance(&self, now: Instant) -> (u64, u64) {
        let (mut t, mut r) = self.holding(now);
        if let Some((ft, fr)) = &self.fallback {
            t += ft.available(now).max(0) as u64;
            r += fr.available(now).max(0) as u64;
        }
        (t, r)
    }

    /// What this replica could have by its next grant: its balance and
    /// the central level as last seen, less what the other replicas'
    /// waiting requests lack (they are served first when they waited
    /// longer). Negative: how far they are behind.
    fn reach(&self, now: Instant) -> (i64, i64) {
        let (t, r) = self.balance(now);
        let (t, r) = (t as i64, r as i64);
        match self.central {
            Some(g) if self.mode == SharingMode::Shared => (
                t + g.level_tokens.max(0) - g.others_need as i64,
                r + g.level_requests.max(0),
            ),
            _ => (t, r),
        }
    }

    /// `reach`, at least zero: what the scheduler counts on for the
    /// requests waiting here.
    pub fn reachable(&self, now: Instant) -> (u64, u64) {
        let (t, r) = self.reach(now);
        (t.max(0) as u64, r.max(0) as u64)
    }

    /// Whether `tokens` and one request fit now; if so the headroom (the
    /// central level as last seen plus this replica's balance, less the
    /// request, as a fraction of the central capacity); if not, roughly
    /// when they may: the next grant when the level as last seen has them
    /// (`Err((wait, true))`), else after the refill of what it lacks (or
    /// the fallback bucket's). A request waiting here is served from the
    /// whole refill once it is the oldest, as in one process.
    pub fn fit(&self, tokens: u64, now: Instant) -> Result<f64, (Duration, bool)> {
        if let Some(until) = self.blocked_until.filter(|u| *u > now) {
            return Err((until - now, false));
        }
        let (t, r) = self.balance(now);
        if tokens <= t && r >= 1 {
            let central = self.central.map_or(0, |g| g.level_tokens.max(0) as u64);
            let room = (central + t - tokens) as f64 / self.limits.token_capacity.max(1) as f64;
            return Ok(room.min(1.0));
        }
        if let Some((ft, fr)) = &self.fallback {
            let need_t = tokens.saturating_sub(self.holding(now).0);
            let wt = ft.time_until(need_t, now).unwrap_or(Duration::MAX);
            let wr = fr.time_until(1, now).unwrap_or(Duration::MAX);
            return Err((wt.max(wr), false));
        }
        let (reach_t, reach_r) = self.reach(now);
        let refill = |short: i64, per_minute: u64| {
            Duration::try_from_secs_f64(short.max(0) as f64 * 60.0 / per_minute.max(1) as f64)
                .unwrap_or(Duration::MAX)
        };
        let later = refill(tokens as i64 - reach_t, self.limits.tokens_per_minute)
            .max(refill(1 - reach_r, self.limits.requests_per_minute));
        Err((self.settings.tick.saturating_add(later), later.is_zero()))
    }

    /// Takes `tokens` and one request (after `fit` said they fit).
    pub fn take(&mut self, tokens: u64, now: Instant) {
        self.demand.add(tokens, now);
        let (have_t, have_r) = self.holding(now);
        let from_held = (tokens.min(have_t), 1.min(have_r));
        self.held_tokens -= from_held.0;
        self.held_requests -= from_held.1;
        self.spent.0 += from_held.0;
        self.spent.1 += from_held.1;
        self.totals.spent_tokens += from_held.0;
        let short = (tokens - from_held.0, 1 - from_held.1);
        if let Some((ft, fr)) = &mut self.fallback {
            if short.0 > 0 {
                ft.charge(short.0, now);
            }
            if short.1 > 0 {
                fr.charge(short.1, now);
            }
            self.running.fallback_tokens += short.0 as i64;
            self.running.fallback_requests += short.1 as i64;
        }
    }

    /// A finished request gave back `tokens` (and `requests`) it had reserved.
    pub fn give_back(&mut self, tokens: u64, requests: u64, now: Instant) {
        match &mut self.fallback {
            Some((ft, fr)) => {
                ft.refund(tokens, now);
                fr.refund(requests, now);
                self.running.fallback_tokens -= tokens as i64;
                self.running.fallback_requests -= requests as i64;
            }
            None => {
                self.running.settled_tokens += tokens as i64;
                self.running.settled_requests += requests as i64;
            }
        }
    }

    /// A finished request used `tokens` beyond its reservation.
    pub fn use_extra(&mut self, tokens: u64, now: Instant) {
        match &mut self.fallback {
            Some((ft, _)) => {
                ft.charge(tokens, now);
                self.running.fallback_tokens += tokens as i64;
            }
            None => self.running.settled_tokens -= tokens as i64,
        }
    }

    /// The provider has at most this much left (our later spending taken off).
    pub fn hint(&mut self, tokens: i64, requests: i64) {
        let (t, r) = self
            .hint
            .map_or((tokens, requests), |(t, r)| (t.min(tokens), r.min(requests)));
        self.hint = Some((t, r));
    }

    /// The provider refused a request: nothing here until `reset` has passed,
    /// and the other replicas hear of it on the next call.
    pub fn refused(&mut self, reset: Duration, now: Instant) {
        self.block = self.block.max(reset);
        let until = now + reset;
        self.blocked_until = Some(self.blocked_until.map_or(until, |u| u.max(until)));
    }

    /// What the requests waiting for this quota need now (the queue's
    /// view, set before each call).
    pub fn set_waiting(&mut self, waiting: Waiting) {
        self.waiting = waiting;
    }

    /// The next call to the central bucket. Hand it back to `on_reply` or
    /// `on_failure`.
    pub fn sync_call(&mut self, now: Instant) -> SyncCall {
        if self.valid_until.is_some_and(|v| v <= now) && (self.held_tokens, self.held_requests) != (0, 0) {
            // Lapsed without an answer: Redis takes it back when it answers.
            self.totals.expired_tokens += self.held_tokens;
            self.held_tokens = 0;
            self.held_requests = 0;
        }
        self.demand.roll(now);
        let (rate_t, rate_r, largest) = self.demand.recent();
        // Enough to last until the fallback would take over if Redis went
        // away now (`unreachable_after` and the next tick), so requests do
        // not wait in between; at least three ticks, and spent within a
        // holding's life.
        let s = &self.settings;
        let horizon = (s.unreachable_after + 2 * s.tick)
            .max(s.tick * HORIZON_TICKS)
            .min(s.chunk_ttl.saturating_sub(s.tick));
        let ahead = |rate: u64| (rate as u128 * horizon.as_millis() / 1000) as u64;
        let others_need = self.central.is_some_and(|g| g.others_need > 0);
        // While the level is short or others wait, this replica keeps what
        // its spending and its waiting requests need, and gives the rest
        // back; otherwise it also keeps room for its largest recent request,
        // so that one is not made to wait for a grant.
        let scarce = self.short || others_need;
        let cushion = if scarce { 0 } else { largest };
        let w = self.waiting;
        let target_t = (ahead(rate_t) + w.tokens + cushion).clamp(1, self.limits.token_capacity);
        let target_r = (ahead(rate_r) + w.requests + 1).min(self.limits.request_capacity);
        let keep_t = if scarce {
            target_t
        } else {
            target_t.max(self.held_tokens)
        };
        let keep_r = if scarce {
            target_r
        } else {
            target_r.max(self.held_requests)
        };
        let (have_t, have_r) = self.holding(now);
        let give_t = have_t.saturating_sub(keep_t);
        let give_r = have_r.saturating_sub(keep_r);
        self.held_tokens = have_t - give_t;
        self.held_requests = have_r - give_r;
        self.totals.returned_tokens += give_t;
        self.seq += 1;
        SyncCall {
            incarnation: 0,
            seq: self.seq,
            ask_tokens: target_t.saturating_sub(self.held_tokens),
            ask_requests: target_r.saturating_sub(self.held_requests),
            need_tokens: w
                .first
                .min(self.limits.token_capacity)
                .saturating_sub(self.held_tokens),
            held_tokens: self.held_tokens,
            held_requests: self.held_requests,
            spent_tokens: self.spent.0,
            spent_requests: self.spent.1,
            totals: self.running,
            acked: self.acked,
            hint: self.hint.take(),
            block: std::mem::take(&mut self.block),
            generation: self.central.map_or(0, |g| g.generation),
        }
    }

    /// The central bucket answered `call`, sent at `sent_at`.
    pub fn on_reply(&mut self, call: &SyncCall, grant: SyncGrant, sent_at: Instant, now: Instant) {
        self.totals.calls += 1;
        self.totals.granted_tokens += grant.tokens;
        self.last_ok = now;
        self.acked = call.totals;
        // Redis counts the holding as of the call: it stays spendable for a
        // holding's life from then.
        self.valid_until = Some(if self.settings.expire_chunks {
            sent_at + self.settings.chunk_ttl
        } else {
            sent_at + Duration::from_secs(100 * 365 * 86_400)
        });
        self.held_tokens += grant.tokens;
        self.held_requests += grant.requests;
        self.short = grant.tokens < call.ask_tokens;
        if !grant.blocked_for.is_zero() {
            let until = now + grant.blocked_for;
            self.blocked_until = Some(self.blocked_until.map_or(until, |u| u.max(until)));
        }
        if self.mode == SharingMode::Fallback {
            // What the fallback bucket spent is in the running totals: Redis
            // charges it once, as they reach it.
            self.fallback = None;
            if let Some(since) = self.fallback_since.take() {
                self.totals.fallback_time += now.saturating_duration_since(since);
            }
            self.mode = SharingMode::Shared;
        }
        self.central = Some(grant);
    }

    /// `call` got no answer (timeout, connection lost); it may or may not
    /// have been applied: the running totals go again with the next call,
    /// which counts them once either way. Without an answer for
    /// `unreachable_after`, the replica falls back.
    pub fn on_failure(&mut self, call: SyncCall, now: Instant) {
        self.totals.calls += 1;
        self.totals.failed_calls += 1;
        self.block = self.block.max(call.block);
        if self.mode == SharingMode::Shared
            && now.saturating_duration_since(self.last_ok) >= self.settings.unreachable_after
        {
            self.enter_fallback(now);
        }
    }

    fn enter_fallback(&mut self, now: Instant) {
        let n = self
            .central
            .map_or(0, |g| g.replicas)
            .max(self.settings.replicas_floor)
            .max(1) as u64;
        let bucket = |per_minute: u64, burst: u64| {
            let mut b = QuotaBucket::try_new((per_minute / n).max(1), Some((burst / n).max(1)), now)
                .expect("limits at least 1");
            // Starts empty: the other replicas may have spent the provider's burst.
            b.charge(b.capacity(), now);
            b
        };
        self.fallback = Some((
            bucket(self.limits.tokens_per_minute, self.limits.token_capacity),
            bucket(self.limits.requests_per_minute, self.limits.request_capacity),
        ));
        self.fallback_since = Some(now);
        self.mode = SharingMode::Fallback;
    }

    pub fn view(&self, now: Instant) -> SharingView {
        let (t, r) = self.balance(now);
        let mut totals = self.totals;
        if let Some(since) = self.fallback_since {
            totals.fallback_time += now.saturating_duration_since(since);
        }
        SharingView {
            mode: self.mode,
            balance_tokens: t,
            balance_requests: r,
            central_tokens: self.central.map(|g| g.level_tokens),
            central_requests: self.central.map(|g| g.level_requests),
            replicas: self.central.map_or(0, |g| g.replicas),
            disagreeing: self.central.map_or(0, |g| g.disagreeing),
            blocked_for: self.blocked_until.filter(|u| *u > now).map(|u| u - now),
            totals,
        }
    }
}
