//! One replica's part of a (region, model) quota shared with other
//! replicas through a central bucket (`central.rs`, Redis in production).
//!
//! Requests never wait on Redis: they spend *chunks* the sync task was
//! granted on its last call, oldest first, and a chunk not spent within
//! `chunk_ttl` of the call that asked for it is dropped (counted as
//! wasted), never carried on: that is what keeps every replica together
//! within the provider's limit. What finished requests give back or use
//! beyond their reservation, what the provider says and its refusals are
//! kept here and ride on the next call.
//!
//! When Redis has not answered for `unreachable_after`, the replica falls
//! back: it spends its unexpired chunks, then a local bucket that starts
//! empty and refills at the provider's rate divided by the replicas it last
//! knew of (at least `replicas_floor`). The first successful call reports
//! what the fallback bucket spent, so the central level counts it once, and
//! ends the fallback.
//!
//! This sits beside the replica's own model of the provider (`ModelQuota`'s
//! buckets, which keep working as in one process): a request needs room in
//! both.

use std::cell::Cell;
use std::collections::VecDeque;
use std::time::{Duration, Instant};

use super::central::{CentralLimits, SyncCall, SyncGrant};
use super::model_quota::ModelLimits;
use super::quota::QuotaBucket;

/// How a replica shares quota (`[cluster]` in the config).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SharingSettings {
    /// A granted chunk not spent within this long is dropped.
    pub chunk_ttl: Duration,
    /// How often the sync task calls Redis.
    pub tick: Duration,
    /// Without a reply for this long, the replica falls back.
    pub unreachable_after: Duration,
    /// The fewest replicas to assume when dividing the fallback rate.
    pub replicas_floor: u32,
    /// Always true in service; false only in tests, to show that the bound
    /// depends on chunks expiring.
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
    /// Chunks granted by the central bucket.
    Shared,
    /// Redis unreachable: unexpired chunks, then the local fallback bucket.
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

/// Granted amounts not yet spent, oldest first, each with its expiry.
#[derive(Debug, Clone, Default)]
struct Chunks {
    chunks: VecDeque<(u64, Instant)>,
}

impl Chunks {
    fn push(&mut self, amount: u64, expires: Instant) {
        if amount > 0 {
            self.chunks.push_back((amount, expires));
        }
    }

    fn available(&self, now: Instant) -> u64 {
        self.chunks.iter().filter(|(_, e)| *e > now).map(|(a, _)| a).sum()
    }

    /// Drops the expired chunks; returns what they still held.
    fn expire(&mut self, now: Instant) -> u64 {
        let before: u64 = self.chunks.iter().map(|(a, _)| a).sum();
        self.chunks.retain(|(_, e)| *e > now);
        before - self.chunks.iter().map(|(a, _)| a).sum::<u64>()
    }

    /// Takes up to `n` from the unexpired chunks, oldest first; returns
    /// what it could not take.
    fn take(&mut self, mut n: u64, now: Instant) -> u64 {
        for (amount, expires) in self.chunks.iter_mut() {
            if n == 0 {
                break;
            }
            if *expires > now {
                let t = n.min(*amount);
                *amount -= t;
                n -= t;
            }
        }
        while self.chunks.front().is_some_and(|(a, _)| *a == 0) {
            self.chunks.pop_front();
        }
        n
    }

    fn len(&self) -> usize {
        self.chunks.len()
    }
}

/// Spending over the last two whole seconds, for sizing asks.
#[derive(Debug, Clone, Copy, Default)]
struct Demand {
    window_start: Option<Instant>,
    current: (u64, u64),
    previous: (u64, u64),
}

impl Demand {
    fn roll(&mut self, now: Instant) {
        let start = *self.window_start.get_or_insert(now);
        let age = now.saturating_duration_since(start);
        if age >= Duration::from_secs(2) {
            self.previous = (0, 0);
            self.current = (0, 0);
            self.window_start = Some(now);
        } else if age >= Duration::from_secs(1) {
            self.previous = self.current;
            self.current = (0, 0);
            self.window_start = Some(start + Duration::from_secs(1));
        }
    }

    fn add(&mut self, tokens: u64, requests: u64, now: Instant) {
        self.roll(now);
        self.current.0 += tokens;
        self.current.1 += requests;
    }

    /// Tokens and requests a second, the larger of the two windows.
    fn per_second(&self) -> (u64, u64) {
        (
            self.current.0.max(self.previous.0),
            self.current.1.max(self.previous.1),
        )
    }
}

/// Totals since start, for metrics.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct SharingTotals {
    pub granted_tokens: u64,
    pub expired_tokens: u64,
    pub calls: u64,
    pub failed_calls: u64,
    pub fallback_time: Duration,
}

/// What operators see of one (region, model)'s sharing.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SharingView {
    pub mode: SharingMode,
    /// This replica's unexpired chunks, and the fallback bucket's level.
    pub balance_tokens: u64,
    pub balance_requests: u64,
    pub chunks: usize,
    /// The central levels at the last reply (`None` before one).
    pub central_tokens: Option<i64>,
    pub central_requests: Option<i64>,
    pub replicas: u32,
    pub blocked_for: Option<Duration>,
    pub totals: SharingTotals,
}

#[derive(Debug, Clone)]
pub struct SharedQuota {
    settings: SharingSettings,
    limits: CentralLimits,
    burst_tokens: u64,
    burst_requests: u64,
    mode: SharingMode,
    tokens: Chunks,
    requests: Chunks,
    /// The local bucket while in fallback (starts empty).
    fallback: Option<(QuotaBucket, QuotaBucket)>,
    fallback_since: Option<Instant>,
    /// Spent from the fallback bucket, not yet reported to Redis.
    fallback_spent: (u64, u64),
    settle_tokens: i64,
    settle_requests: i64,
    hint: Option<(i64, i64)>,
    block: Duration,
    blocked_until: Option<Instant>,
    demand: Demand,
    /// The largest request that did not fit since the last call: asked for
    /// on top of the recent spending, so a large request is not starved by
    /// chunks sized to small ones. (A cell: admission checks are reads.)
    largest_miss: Cell<u64>,
    last_ok: Instant,
    central: Option<SyncGrant>,
    totals: SharingTotals,
}

/// The central bucket's capacity: the provider's burst less one chunk
/// lifetime of refill (what may still be spent from chunks granted before).
pub fn central_limits(limits: &ModelLimits, settings: &SharingSettings) -> CentralLimits {
    let ttl_ms = settings.chunk_ttl.as_millis() as u64;
    let burst_t = limits.burst_tokens.unwrap_or(limits.tokens_per_minute);
    let burst_r = limits.burst_requests.unwrap_or(limits.requests_per_minute);
    let less = |burst: u64, per_minute: u64| burst.saturating_sub(per_minute * ttl_ms / 60_000).max(1);
    CentralLimits {
        tokens_per_minute: limits.tokens_per_minute,
        token_capacity: less(burst_t, limits.tokens_per_minute),
        requests_per_minute: limits.requests_per_minute,
        request_capacity: less(burst_r, limits.requests_per_minute),
        replicas_floor: settings.replicas_floor,
    }
}

impl SharedQuota {
    pub fn new(limits: &ModelLimits, settings: SharingSettings, now: Instant) -> Self {
        Self {
            limits: central_limits(limits, &settings),
            burst_tokens: limits.burst_tokens.unwrap_or(limits.tokens_per_minute),
            burst_requests: limits.burst_requests.unwrap_or(limits.requests_per_minute),
            settings,
            mode: SharingMode::Shared,
            tokens: Chunks::default(),
            requests: Chunks::default(),
            fallback: None,
            fallback_since: None,
            fallback_spent: (0, 0),
            settle_tokens: 0,
            settle_requests: 0,
            hint: None,
            block: Duration::ZERO,
            blocked_until: None,
            demand: Demand::default(),
            largest_miss: Cell::new(0),
            last_ok: now,
            central: None,
            totals: SharingTotals::default(),
        }
    }

    pub fn set_limits(&mut self, limits: &ModelLimits) {
        self.limits = central_limits(limits, &self.settings);
        self.burst_tokens = limits.burst_tokens.unwrap_or(limits.tokens_per_minute);
        self.burst_requests = limits.burst_requests.unwrap_or(limits.requests_per_minute);
    }

    pub fn limits(&self) -> &CentralLimits {
        &self.limits
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

    /// Tokens and requests this replica holds now (chunks and fallback).
    pub fn balance(&self, now: Instant) -> (u64, u64) {
        let (mut t, mut r) = (self.tokens.available(now), self.requests.available(now));
        if let Some((ft, fr)) = &self.fallback {
            t += ft.available(now).max(0) as u64;
            r += fr.available(now).max(0) as u64;
        }
        (t, r)
    }

    /// Whether `tokens` and one request fit now; if so the headroom (the
    /// central level as last seen plus this replica's balance, less the
    /// request, as a fraction of the central capacity); if not, roughly
    /// when they may (the next grant, or the fallback bucket's refill).
    pub fn fit(&self, tokens: u64, now: Instant) -> Result<f64, Duration> {
        if let Some(until) = self.blocked_until.filter(|u| *u > now) {
            return Err(until - now);
        }
        let (t, r) = self.balance(now);
        if tokens <= t && r >= 1 {
            let central = self.central.map_or(0, |g| g.level_tokens.max(0) as u64);
            let room = (central + t - tokens) as f64 / self.limits.token_capacity.max(1) as f64;
            return Ok(room.min(1.0));
        }
        self.largest_miss.set(self.largest_miss.get().max(tokens));
        let wait = match &self.fallback {
            Some((ft, fr)) => {
                let need_t = tokens.saturating_sub(self.tokens.available(now));
                let wt = ft.time_until(need_t, now).unwrap_or(Duration::MAX);
                let wr = fr.time_until(1, now).unwrap_or(Duration::MAX);
                wt.max(wr)
            }
            None => self.settings.tick,
        };
        Err(wait)
    }

    /// Takes `tokens` and one request (after `fit` said they fit).
    pub fn take(&mut self, tokens: u64, now: Instant) {
        self.demand.add(tokens, 1, now);
        let short_t = self.tokens.take(tokens, now);
        let short_r = self.requests.take(1, now);
        if let Some((ft, fr)) = &mut self.fallback {
            if short_t > 0 {
                ft.charge(short_t, now);
            }
            if short_r > 0 {
                fr.charge(short_r, now);
            }
            self.fallback_spent.0 += short_t;
            self.fallback_spent.1 += short_r;
        }
    }

    /// A finished request gave back `tokens` (and `requests`) it had reserved.
    pub fn give_back(&mut self, tokens: u64, requests: u64, now: Instant) {
        match &mut self.fallback {
            Some((ft, fr)) => {
                ft.refund(tokens, now);
                fr.refund(requests, now);
                self.fallback_spent.0 = self.fallback_spent.0.saturating_sub(tokens);
                self.fallback_spent.1 = self.fallback_spent.1.saturating_sub(requests);
            }
            None => {
                self.settle_tokens += tokens as i64;
                self.settle_requests += requests as i64;
            }
        }
    }

    /// A finished request used `tokens` beyond its reservation.
    pub fn use_extra(&mut self, tokens: u64, now: Instant) {
        match &mut self.fallback {
            Some((ft, _)) => {
                ft.charge(tokens, now);
                self.fallback_spent.0 += tokens;
            }
            None => self.settle_tokens -= tokens as i64,
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

    /// The next call to the central bucket. Moves what it carries out of
    /// this quota: hand it back to `on_reply` or `on_failure`.
    pub fn sync_call(&mut self, now: Instant) -> SyncCall {
        self.totals.expired_tokens += self.tokens.expire(now);
        self.requests.expire(now);
        self.demand.roll(now);
        let (rate_t, rate_r) = self.demand.per_second();
        // Enough to last until the fallback would take over if Redis went
        // away now (`unreachable_after` and the next tick), so requests do
        // not wait in between; at least three ticks, and spent within a
        // chunk's life.
        let s = &self.settings;
        let horizon = (s.unreachable_after + 2 * s.tick)
            .max(s.tick * HORIZON_TICKS)
            .min(s.chunk_ttl.saturating_sub(s.tick));
        let want = |rate: u64, miss: u64, cap: u64| -> u64 {
            let ahead = (rate as u128 * horizon.as_millis() / 1000) as u64;
            (ahead + miss).max(1).min(cap)
        };
        // Asked for once: a request still waiting is checked again after
        // the reply (the desk's pump runs after every sync) and misses again.
        // (One gone meanwhile, its caller having left, is not asked for.)
        let miss = self.largest_miss.replace(0);
        // What will still be there after the next grant: chunks expiring
        // before then are asked for again now, so the balance does not run
        // dry for a tick every time a large chunk expires.
        let later = now + 2 * self.settings.tick;
        let (have_t, have_r) = (self.tokens.available(later), self.requests.available(later));
        let mut target_t = want(rate_t, miss, self.limits.token_capacity);
        let mut target_r = want(rate_r, u64::from(miss > 0), self.limits.request_capacity);
        if miss > 0 {
            // Work is waiting: ask for at least an equal part of the whole
            // level, tokens and requests, so that every replica short of
            // quota asks alike and scarce quota is split evenly (asks sized
            // by past spending alone would keep a replica that got less on
            // less), and work arriving at once after a quiet spell does not
            // wait while asks grow from what was spent (threefold a second:
            // a chunk is three ticks of spending).
            let n = self
                .central
                .map_or(self.settings.replicas_floor, |g| g.replicas)
                .max(1) as u64;
            target_t = target_t.max(self.limits.token_capacity / n);
            target_r = target_r.max(self.limits.request_capacity / n);
        }
        SyncCall {
            ask_tokens: target_t.saturating_sub(have_t),
            ask_requests: target_r.saturating_sub(have_r),
            need_tokens: miss.min(self.limits.token_capacity).saturating_sub(have_t),
            settle_tokens: std::mem::take(&mut self.settle_tokens),
            settle_requests: std::mem::take(&mut self.settle_requests),
            hint: self.hint.take(),
            block: std::mem::take(&mut self.block),
            fallback_spent: (self.mode == SharingMode::Fallback).then_some(self.fallback_spent),
        }
    }

    /// The central bucket answered `call`, sent at `sent_at`.
    pub fn on_reply(&mut self, call: &SyncCall, grant: SyncGrant, sent_at: Instant, now: Instant) {
        self.totals.calls += 1;
        self.totals.granted_tokens += grant.tokens;
        self.last_ok = now;
        let expires = if self.settings.expire_chunks {
            sent_at + self.settings.chunk_ttl
        } else {
            sent_at + Duration::from_secs(100 * 365 * 86_400)
        };
        self.tokens.push(grant.tokens, expires);
        self.requests.push(grant.requests, expires);
        if !grant.blocked_for.is_zero() {
            let until = now + grant.blocked_for;
            self.blocked_until = Some(self.blocked_until.map_or(until, |u| u.max(until)));
        }
        if self.mode == SharingMode::Fallback {
            // Reported: what was spent since the call left stays to report.
            let (t, r) = call.fallback_spent.unwrap_or((0, 0));
            let left = (
                self.fallback_spent.0.saturating_sub(t),
                self.fallback_spent.1.saturating_sub(r),
            );
            if left != (0, 0) {
                self.settle_tokens -= left.0 as i64;
                self.settle_requests -= left.1 as i64;
            }
            self.fallback_spent = (0, 0);
            self.fallback = None;
            if let Some(since) = self.fallback_since.take() {
                self.totals.fallback_time += now.saturating_duration_since(since);
            }
            self.mode = SharingMode::Shared;
        }
        self.central = Some(grant);
    }

    /// `call` got no answer (timeout, connection lost). A settlement that
    /// charges more is kept for the next call (charging it twice errs on the
    /// safe side); what it gave back may have been applied and is dropped.
    /// Without an answer for `unreachable_after`, the replica falls back.
    pub fn on_failure(&mut self, call: SyncCall, now: Instant) {
        self.totals.calls += 1;
        self.totals.failed_calls += 1;
        self.settle_tokens += call.settle_tokens.min(0);
        self.settle_requests += call.settle_requests.min(0);
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
            bucket(self.limits.tokens_per_minute, self.burst_tokens),
            bucket(self.limits.requests_per_minute, self.burst_requests),
        ));
        self.fallback_since = Some(now);
        self.fallback_spent = (0, 0);
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
            chunks: self.tokens.len(),
            central_tokens: self.central.map(|g| g.level_tokens),
            central_requests: self.central.map(|g| g.level_requests),
            replicas: self.central.map_or(0, |g| g.replicas),
            blocked_for: self.blocked_until.filter(|u| *u > now).map(|u| u - now),
            totals,
        }
    }
}
