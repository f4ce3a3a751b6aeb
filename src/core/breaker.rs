//! Per-region failure handling as state machines on a passed-in clock: the
//! circuit breaker (error rate over a sliding window, or consecutive
//! connection failures), the active health check's thresholds, and the retry
//! budget that keeps failover from multiplying load during an outage.

use std::time::{Duration, Instant};

/// `[routing.breaker]`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct BreakerConfig {
    /// Opens when the error rate over `window` passes this ...
    pub error_threshold: f64,
    /// ... with at least this many requests in the window.
    pub min_requests: u32,
    pub window: Duration,
    /// Or after this many failures in a row (a dead region fails fast and
    /// would otherwise take the window to notice).
    pub consecutive_failures: u32,
    /// Open this long before trying again.
    pub cool_down: Duration,
    /// Trial requests let through while half-open.
    pub half_open_trials: u32,
}

impl Default for BreakerConfig {
    fn default() -> Self {
        Self {
            error_threshold: 0.05,
            min_requests: 20,
            window: Duration::from_secs(10),
            consecutive_failures: 5,
            cool_down: Duration::from_secs(5),
            half_open_trials: 3,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CircuitState {
    Closed,
    Open {
        until: Instant,
    },
    /// Trials sent and successes seen so far.
    HalfOpen {
        sent: u32,
        succeeded: u32,
    },
}

impl CircuitState {
    pub fn kind(&self) -> Circuit {
        match self {
            CircuitState::Closed => Circuit::Closed,
            CircuitState::Open { .. } => Circuit::Open,
            CircuitState::HalfOpen { .. } => Circuit::HalfOpen,
        }
    }

    pub fn name(&self) -> &'static str {
        self.kind().name()
    }
}

/// Which of its states a circuit is in, without the state's data.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Circuit {
    Closed,
    Open,
    HalfOpen,
}

impl Circuit {
    /// As logs, metrics and the Admin API spell it.
    pub fn name(self) -> &'static str {
        match self {
            Circuit::Closed => "closed",
            Circuit::Open => "open",
            Circuit::HalfOpen => "half_open",
        }
    }
}

const SLOTS: usize = 10;

/// Successes and failures over a sliding window of `SLOTS` time slots.
#[derive(Debug, Clone)]
struct Window {
    /// A slot's length in nanoseconds: a u64, so finding the slot is one
    /// 64-bit division (`Duration::as_nanos` is a u128, and dividing those
    /// is a slow library call on every settlement).
    slot_nanos: u64,
    /// (slot number, successes, failures)
    slots: [(u64, u32, u32); SLOTS],
    epoch: Instant,
}

impl Window {
    fn new(window: Duration, epoch: Instant) -> Self {
        Self {
            slot_nanos: u64::try_from((window / SLOTS as u32).max(Duration::from_millis(1)).as_nanos())
                .unwrap_or(u64::MAX),
            slots: [(u64::MAX, 0, 0); SLOTS],
            epoch,
        }
    }

    /// The slot `now` falls in.
    fn index(&self, now: Instant) -> u64 {
        let since = now.saturating_duration_since(self.epoch);
        let nanos = since
            .as_secs()
            .saturating_mul(1_000_000_000)
            .saturating_add(u64::from(since.subsec_nanos()));
        nanos / self.slot_nanos
    }

    /// Counts one result in slot `n` (from `index`).
    fn add(&mut self, success: bool, n: u64) {
        let s = &mut self.slots[n as usize % SLOTS];
        if s.0 != n {
            *s = (n, 0, 0);
        }
        if success {
            s.1 += 1;
        } else {
            s.2 += 1;
        }
    }

    /// Successes and failures in the window ending with slot `n`.
    fn totals(&self, n: u64) -> (u32, u32) {
        self.slots
            .iter()
            .filter(|(i, _, _)| *i != u64::MAX && *i + SLOTS as u64 > n && *i <= n)
            .fold((0, 0), |(s, f), (_, ok, bad)| (s + ok, f + bad))
    }

    fn clear(&mut self) {
        self.slots = [(u64::MAX, 0, 0); SLOTS];
    }
}

#[derive(Debug, Clone)]
pub struct CircuitBreaker {
    config: BreakerConfig,
    state: CircuitState,
    window: Window,
    consecutive: u32,
}

/// A breaker changed state (for logs and metrics).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Transition {
    pub from: Circuit,
    pub to: Circuit,
}

impl CircuitBreaker {
    pub fn new(config: BreakerConfig, now: Instant) -> Self {
        Self {
            window: Window::new(config.window, now),
            config,
            state: CircuitState::Closed,
            consecutive: 0,
        }
    }

    #[inline]
    pub fn state(&self, now: Instant) -> CircuitState {
        match self.state {
            CircuitState::Open { until } if now >= until => CircuitState::HalfOpen {
                sent: 0,
                succeeded: 0,
            },
            s => s,
        }
    }

    /// Closed (whatever the time: only results move a closed circuit), so
    /// no trial is due. Lets the decision path skip looking for trials.
    #[inline]
    pub fn is_closed(&self) -> bool {
        self.state == CircuitState::Closed
    }

    /// Whether a request may go to the region now. Changes nothing.
    #[inline]
    pub fn allows(&self, now: Instant) -> bool {
        match self.state(now) {
            CircuitState::Closed => true,
            CircuitState::Open { .. } => false,
            CircuitState::HalfOpen { sent, .. } => sent < self.config.half_open_trials,
        }
    }

    /// Half-open with a trial slot free: the router sends the region its
    /// next request on purpose, whatever its score. Left to the score, a
    /// region just back from failing (its averages still poor) would never
    /// be picked, never get its trials, and stay half-open for good.
    pub fn wants_trial(&self, now: Instant) -> bool {
        matches!(self.state(now), CircuitState::HalfOpen { sent, .. } if sent < self.config.half_open_trials)
    }

    /// A request was sent (counts half-open trials).
    pub fn on_send(&mut self, now: Instant) {
        if let CircuitState::HalfOpen { sent, succeeded } = self.state(now) {
            self.state = CircuitState::HalfOpen {
                sent: sent + 1,
                succeeded,
            };
        }
    }

    /// A request sent earlier ended without a verdict on the region (the
    /// caller went away, the provider was out of quota): a half-open trial
    /// slot is given back.
    pub fn on_abandon(&mut self, now: Instant) {
        if let CircuitState::HalfOpen { sent, succeeded } = self.state(now) {
            self.state = CircuitState::HalfOpen {
                sent: sent.saturating_sub(1),
                succeeded,
            };
        }
    }

    /// A request sent earlier ended. Returns the transition, if any.
    pub fn on_result(&mut self, success: bool, now: Instant) -> Option<Transition> {
        let before = self.state(now);
        let slot = self.window.index(now);
        self.window.add(success, slot);
        self.consecutive = if success { 0 } else { self.consecutive + 1 };
        let after = match before {
            CircuitState::Closed => {
                let (ok, bad) = self.window.totals(slot);
                let total = ok + bad;
                let rate_trips = total >= self.config.min_requests
                    && bad as f64 > self.config.error_threshold * total as f64;
                if rate_trips || self.consecutive >= self.config.consecutive_failures {
                    self.open(now)
                } else {
                    CircuitState::Closed
                }
            }
            CircuitState::Open { until } => CircuitState::Open { until },
            CircuitState::HalfOpen { sent, succeeded } => {
                if !success {
                    self.open(now)
                } else if succeeded + 1 >= self.config.half_open_trials {
                    self.window.clear();
                    self.consecutive = 0;
                    CircuitState::Closed
                } else {
                    CircuitState::HalfOpen {
                        sent,
                        succeeded: succeeded + 1,
                    }
                }
            }
        };
        self.state = after;
        (before.kind() != after.kind()).then_some(Transition {
            from: before.kind(),
            to: after.kind(),
        })
    }

    fn open(&mut self, now: Instant) -> CircuitState {
        CircuitState::Open {
            until: now + self.config.cool_down,
        }
    }

    pub fn set_config(&mut self, config: BreakerConfig) {
        self.config = config;
    }
}

/// Active health checks' verdict: unhealthy after `unhealthy_threshold`
/// failed checks in a row, healthy again after `healthy_threshold` passed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HealthTracker {
    healthy: bool,
    streak: u32,
    healthy_threshold: u32,
    unhealthy_threshold: u32,
}

impl HealthTracker {
    /// Starts healthy: a region is presumed up until checks say otherwise.
    pub fn new(healthy_threshold: u32, unhealthy_threshold: u32) -> Self {
        Self {
            healthy: true,
            streak: 0,
            healthy_threshold: healthy_threshold.max(1),
            unhealthy_threshold: unhealthy_threshold.max(1),
        }
    }

    /// Starts from a verdict already reached (a checker replaced for new
    /// settings at the same address carries on from where the old one was).
    pub fn starting_at(mut self, healthy: bool) -> Self {
        self.healthy = healthy;
        self
    }

    pub fn healthy(&self) -> bool {
        self.healthy
    }

    /// Records one check; returns the new verdict when it flips.
    pub fn record(&mut self, passed: bool) -> Option<bool> {
        if passed == self.healthy {
            self.streak = 0;
            return None;
        }
        self.streak += 1;
        let needed = if self.healthy {
            self.unhealthy_threshold
        } else {
            self.healthy_threshold
        };
        if self.streak >= needed {
            self.healthy = passed;
            self.streak = 0;
            Some(passed)
        } else {
            None
        }
    }
}

/// Retries may be at most `ratio` of recent requests, plus `min_per_sec`
/// (so a quiet service can still retry): every request deposits `ratio`, a
/// retry withdraws one. Deposits decay over `window`, so a burst of
/// failures cannot spend credit earned long ago.
#[derive(Debug, Clone)]
pub struct RetryBudget {
    ratio: f64,
    min_per_sec: f64,
    window: Duration,
    balance: f64,
    updated: Instant,
}

impl RetryBudget {
    pub fn new(ratio: f64, min_per_sec: f64, window: Duration, now: Instant) -> Self {
        Self {
            ratio: ratio.max(0.0),
            min_per_sec: min_per_sec.max(0.0),
            window: window.max(Duration::from_millis(1)),
            balance: 0.0,
            updated: now,
        }
    }

    fn advance(&mut self, now: Instant) {
        if now <= self.updated {
            return;
        }
        let dt = now.saturating_duration_since(self.updated).as_secs_f64();
        if dt > 0.0 {
            // Exponential decay bounds the credit: steady deposits converge to
            // about `rate × window`, the floor to `min_per_sec × window`.
            let decay = (-dt / self.window.as_secs_f64()).exp();
            self.balance = self.balance * decay + self.min_per_sec * dt;
            self.updated = now;
        }
    }

    /// A first attempt: earns `ratio` of a retry.
    pub fn deposit(&mut self, now: Instant) {
        self.advance(now);
        self.balance += self.ratio;
    }

    /// Takes one retry if the budget has it.
    pub fn try_withdraw(&mut self, now: Instant) -> bool {
        self.advance(now);
        // (A hair of tolerance: 100 deposits of 0.2 are 19.999… in floating point.)
        if self.balance >= 1.0 - 1e-9 {
            self.balance -= 1.0;
            true
        } else {
            false
        }
    }

    pub fn balance(&self) -> f64 {
        self.balance
    }

    pub fn set_limits(&mut self, ratio: f64, min_per_sec: f64) {
        self.ratio = ratio.max(0.0);
        self.min_per_sec = min_per_sec.max(0.0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    fn config() -> BreakerConfig {
        BreakerConfig {
            error_threshold: 0.1,
            min_requests: 10,
            window: Duration::from_secs(10),
            consecutive_failures: 3,
            cool_down: Duration::from_secs(5),
            half_open_trials: 2,
        }
    }

    #[test]
    fn stays_closed_below_the_threshold_or_the_minimum() {
        let t0 = crate::testing::epoch();
        let mut b = CircuitBreaker::new(config(), t0);
        // 2 failures out of 5: above 10 %, but fewer than min_requests.
        for i in 0..5 {
            assert_eq!(b.on_result(i % 3 != 0, t0), None);
        }
        assert_eq!(b.state(t0), CircuitState::Closed);
        let mut b = CircuitBreaker::new(config(), t0);
        // 18 successes, then 2 failures: 10 %, not above it.
        for _ in 0..18 {
            b.on_result(true, t0);
        }
        assert_eq!(b.on_result(false, t0), None);
        assert_eq!(b.on_result(false, t0), None);
        assert!(b.allows(t0));
    }

    #[test]
    fn opens_on_error_rate_then_half_opens_then_closes() {
        let t0 = crate::testing::epoch();
        let mut b = CircuitBreaker::new(config(), t0);
        for _ in 0..9 {
            b.on_result(true, t0);
        }
        b.on_result(false, t0);
        assert_eq!(b.state(t0), CircuitState::Closed, "1 of 10 is not above 10 %");
        let t = b.on_result(false, t0);
        assert_eq!(
            t,
            Some(Transition {
                from: Circuit::Closed,
                to: Circuit::Open
            })
        );
        assert!(!b.allows(t0 + ms(4999)));
        // Cool-down over: half-open, two trials allowed.
        let t1 = t0 + Duration::from_secs(5);
        assert_eq!(
            b.state(t1),
            CircuitState::HalfOpen {
                sent: 0,
                succeeded: 0
            }
        );
        assert!(b.allows(t1) && b.wants_trial(t1));
        b.on_send(t1);
        b.on_send(t1);
        assert!(!b.allows(t1), "only two trials");
        assert!(!b.wants_trial(t1));
        assert_eq!(b.on_result(true, t1), None);
        assert_eq!(
            b.on_result(true, t1),
            Some(Transition {
                from: Circuit::HalfOpen,
                to: Circuit::Closed
            })
        );
        assert!(b.allows(t1));
    }

    #[test]
    fn consecutive_failures_open_it_at_once() {
        let t0 = crate::testing::epoch();
        let mut b = CircuitBreaker::new(config(), t0);
        b.on_result(false, t0);
        b.on_result(false, t0);
        assert!(b.allows(t0));
        assert_eq!(
            b.on_result(false, t0),
            Some(Transition {
                from: Circuit::Closed,
                to: Circuit::Open
            })
        );
    }

    #[test]
    fn a_failed_trial_opens_it_again_for_a_full_cool_down() {
        let t0 = crate::testing::epoch();
        let mut b = CircuitBreaker::new(config(), t0);
        for _ in 0..3 {
            b.on_result(false, t0);
        }
        let t1 = t0 + Duration::from_secs(5);
        b.on_send(t1);
        assert_eq!(
            b.on_result(false, t1),
            Some(Transition {
                from: Circuit::HalfOpen,
                to: Circuit::Open
            })
        );
        assert!(!b.allows(t1 + ms(4999)));
        assert!(b.allows(t1 + Duration::from_secs(5)));
    }

    #[test]
    fn old_failures_leave_the_window() {
        let t0 = crate::testing::epoch();
        let mut c = config();
        c.consecutive_failures = 100;
        let mut b = CircuitBreaker::new(c, t0);
        for _ in 0..5 {
            b.on_result(false, t0);
        }
        // Eleven seconds later the window holds only new successes.
        let t1 = t0 + Duration::from_secs(11);
        for _ in 0..20 {
            assert_eq!(b.on_result(true, t1), None);
        }
        assert_eq!(b.state(t1), CircuitState::Closed);
    }

    #[test]
    fn health_flips_only_after_the_thresholds() {
        let mut h = HealthTracker::new(2, 3);
        assert!(h.healthy());
        assert_eq!(h.record(false), None);
        assert_eq!(h.record(false), None);
        assert_eq!(h.record(true), None, "a pass resets the streak");
        assert_eq!(h.record(false), None);
        assert_eq!(h.record(false), None);
        assert_eq!(h.record(false), Some(false));
        assert!(!h.healthy());
        assert_eq!(h.record(true), None);
        assert_eq!(h.record(true), Some(true));
        // Carrying on from an unhealthy verdict: passes can turn it.
        let mut h = HealthTracker::new(1, 1).starting_at(false);
        assert_eq!(h.record(true), Some(true));
    }

    #[test]
    fn retry_budget_is_a_fraction_of_recent_requests() {
        let t0 = crate::testing::epoch();
        let mut b = RetryBudget::new(0.2, 0.0, Duration::from_secs(10), t0);
        for _ in 0..100 {
            b.deposit(t0);
        }
        let retries = (0..100).filter(|_| b.try_withdraw(t0)).count();
        assert_eq!(retries, 20);
        // A minute later the old credit is gone.
        for _ in 0..5 {
            b.deposit(t0 + Duration::from_secs(60));
        }
        assert_eq!(
            (0..10)
                .filter(|_| b.try_withdraw(t0 + Duration::from_secs(60)))
                .count(),
            1
        );
    }

    #[test]
    fn retry_budget_has_a_floor_per_second() {
        let t0 = crate::testing::epoch();
        let mut b = RetryBudget::new(0.0, 2.0, Duration::from_secs(10), t0);
        assert!(!b.try_withdraw(t0));
        let t1 = t0 + Duration::from_secs(1);
        assert!(b.try_withdraw(t1));
        assert!(b.try_withdraw(t1));
        assert!(!b.try_withdraw(t1));
    }
}
