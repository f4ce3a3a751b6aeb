//! A token bucket that can reserve, refund, charge and be told by the provider
//! that it is emptier than it looks.
//!
//! `governor` cannot give tokens back or change a limit live, and an LLM quota
//! needs both, so this small type is our own. The level is kept in exact integer
//! units (a token is `NANOS_PER_MINUTE` units and a nanosecond of refill adds
//! `per_minute` units), so no sequence of operations drifts by rounding: the
//! envelope "capacity + rate × t" holds to the unit.

use std::time::{Duration, Instant};

use thiserror::Error;

const NANOS_PER_MINUTE: i128 = 60_000_000_000;

/// Rejected bucket parameters.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum QuotaError {
    #[error("the per-minute limit must be at least 1")]
    ZeroRate,
    #[error("the burst must be at least 1")]
    ZeroBurst,
}

/// Why `n` tokens cannot be taken now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Shortfall {
    /// They will fit after this long, if nothing else is taken meanwhile.
    Wait(Duration),
    /// They never fit: `n` is larger than the bucket's capacity.
    TooLarge { capacity: u64 },
}

/// A continuously refilled bucket: `per_minute` tokens a minute, holding at most
/// `capacity` (the burst). The level may go below zero after an over-charge;
/// reservations then wait until it has recovered.
#[derive(Debug, Clone)]
pub struct QuotaBucket {
    per_minute: u64,
    capacity: u64,
    /// Tokens × `NANOS_PER_MINUTE`.
    level: i128,
    updated: Instant,
    /// `1 / full()`, kept so the decision path multiplies instead of divides.
    inverse_full: f64,
    /// `capacity × NANOS_PER_MINUTE`, kept: every read compares with it.
    full: i128,
}

impl QuotaBucket {
    /// A full bucket. `burst` defaults to one minute's worth.
    pub fn try_new(per_minute: u64, burst: Option<u64>, now: Instant) -> Result<Self, QuotaError> {
        let capacity = Self::check(per_minute, burst)?;
        Ok(Self {
            per_minute,
            capacity,
            level: capacity as i128 * NANOS_PER_MINUTE,
            updated: now,
            inverse_full: Self::inverse(capacity),
            full: capacity as i128 * NANOS_PER_MINUTE,
        })
    }

    fn check(per_minute: u64, burst: Option<u64>) -> Result<u64, QuotaError> {
        if per_minute == 0 {
            return Err(QuotaError::ZeroRate);
        }
        match burst {
            Some(0) => Err(QuotaError::ZeroBurst),
            Some(b) => Ok(b),
            None => Ok(per_minute),
        }
    }

    pub fn per_minute(&self) -> u64 {
        self.per_minute
    }

    pub fn capacity(&self) -> u64 {
        self.capacity
    }

    #[inline]
    fn full(&self) -> i128 {
        self.full
    }

    fn inverse(capacity: u64) -> f64 {
        1.0 / (capacity as f64 * NANOS_PER_MINUTE as f64)
    }

    /// The level at `now` in scaled units, without changing anything.
    #[inline]
    fn level_at(&self, now: Instant) -> i128 {
        let full = self.full();
        // A full bucket stays full: no clock arithmetic needed.
        if self.level >= full {
            return self.level;
        }
        // Asked again at the same instant (a request reads a bucket several
        // times at one `now`): nothing has refilled. Comparing is a tenth
        // of the subtraction's cost.
        if now <= self.updated {
            return self.level;
        }
        let elapsed = now.saturating_duration_since(self.updated).as_nanos() as i128;
        (self.level + elapsed * self.per_minute as i128).min(full)
    }

    fn refill(&mut self, now: Instant) {
        self.level = self.level_at(now);
        if now > self.updated {
            self.updated = now;
        }
    }

    /// Whole tokens available at `now` (negative while recovering from an over-charge).
    pub fn available(&self, now: Instant) -> i64 {
        let level = self.level_at(now);
        clamp_i64(level.div_euclid(NANOS_PER_MINUTE))
    }

    /// The fill fraction at `now`, in [.., 1] (below zero after an over-charge).
    pub fn fill(&self, now: Instant) -> f64 {
        self.level_at(now) as f64 / self.full() as f64
    }

    /// How long until `n` tokens fit, `Ok(ZERO)` if they fit now.
    pub fn time_until(&self, n: u64, now: Instant) -> Result<Duration, Shortfall> {
        if n > self.capacity {
            return Err(Shortfall::TooLarge {
                capacity: self.capacity,
            });
        }
        let need = n as i128 * NANOS_PER_MINUTE - self.level_at(now);
        if need <= 0 {
            return Ok(Duration::ZERO);
        }
        let rate = self.per_minute as i128;
        let nanos = (need + rate - 1) / rate;
        Ok(Duration::from_nanos(nanos.min(u64::MAX as i128) as u64))
    }

    /// Whether `n` tokens fit now, and if so the fraction of the bucket left
    /// after them. One read of the level and no integer division: this runs
    /// for every region on every decision.
    #[inline]
    pub fn fit(&self, n: u64, now: Instant) -> Result<f64, Shortfall> {
        if n > self.capacity {
            return Err(Shortfall::TooLarge {
                capacity: self.capacity,
            });
        }
        let level = self.level_at(now);
        let need = n as i128 * NANOS_PER_MINUTE;
        if level >= need {
            Ok((to_f64(level - need) * self.inverse_full).min(1.0))
        } else {
            let rate = self.per_minute as i128;
            let nanos = (need - level + rate - 1) / rate;
            Err(Shortfall::Wait(Duration::from_nanos(
                nanos.min(u64::MAX as i128) as u64
            )))
        }
    }

    /// What `fit` says when `n` fit without counting the refill since the
    /// last change: a lower bound of `fit`'s fraction at any later time
    /// (the refill only adds), with no clock arithmetic. `None` when that
    /// is not enough to tell.
    #[inline]
    pub fn room_at_least(&self, n: u64) -> Option<f64> {
        let need = n as i128 * NANOS_PER_MINUTE;
        (n <= self.capacity && self.level >= need)
            .then(|| (to_f64(self.level - need) * self.inverse_full).min(1.0))
    }

    /// Takes `n` tokens if they fit now; otherwise takes nothing and says why.
    pub fn try_take(&mut self, n: u64, now: Instant) -> Result<(), Shortfall> {
        match self.time_until(n, now)? {
            Duration::ZERO => {
                self.refill(now);
                self.level -= n as i128 * NANOS_PER_MINUTE;
                Ok(())
            }
            wait => Err(Shortfall::Wait(wait)),
        }
    }

    /// Gives `n` unused tokens back, never above capacity.
    pub fn refund(&mut self, n: u64, now: Instant) {
        self.refill(now);
        self.level = (self.level + n as i128 * NANOS_PER_MINUTE).min(self.full());
    }

    /// Takes `n` tokens whether or not they are there (usage above the
    /// reservation): the level may go negative.
    pub fn charge(&mut self, n: u64, now: Instant) {
        self.refill(now);
        self.level -= n as i128 * NANOS_PER_MINUTE;
    }

    /// Lowers the level to `tokens` if it is above (a provider knows of less).
    /// Returns whether it changed anything.
    pub fn lower_to(&mut self, tokens: i64, now: Instant) -> bool {
        self.refill(now);
        self.lower_scaled(tokens as i128 * NANOS_PER_MINUTE)
    }

    /// Changes the limit, keeping the fill fraction (a half-full bucket stays
    /// half full), so a live edit neither grants a burst nor strands quota.
    pub fn set_limit(&mut self, per_minute: u64, burst: Option<u64>, now: Instant) -> Result<(), QuotaError> {
        let capacity = Self::check(per_minute, burst)?;
        self.refill(now);
        let new_full = capacity as i128 * NANOS_PER_MINUTE;
        // level / old_full == new_level / new_full, in exact integers.
        self.level = self.level * capacity as i128 / self.capacity as i128;
        self.level = self.level.min(new_full);
        self.per_minute = per_minute;
        self.capacity = capacity;
        self.inverse_full = Self::inverse(capacity);
        self.full = new_full;
        Ok(())
    }

    /// What a provider that had `remaining` tokens `age` ago, with `spent`
    /// taken by us since, can have now at most (in scaled units): that plus
    /// its refill since, and no more than capacity.
    fn most_since(&self, remaining: i64, age: Duration, spent: u64) -> i128 {
        let then = remaining as i128 * NANOS_PER_MINUTE;
        let spent = spent as i128 * NANOS_PER_MINUTE;
        (then + age.as_nanos() as i128 * self.per_minute as i128 - spent).min(self.full())
    }

    /// Whether such a provider can still be in step with this bucket (its
    /// most is not below our level). Applying its figure as of now,
    /// without the refill, would cut a correct level with every late reply.
    pub fn in_step(&self, remaining: i64, age: Duration, spent: u64, now: Instant) -> bool {
        // A provider's figure is a whole number, rounded down.
        self.most_since(remaining, age, spent) + NANOS_PER_MINUTE > self.level_at(now)
    }

    /// Lowers the level to the most such a provider can have, when it is
    /// out of step; returns whether it was.
    pub fn lower_to_most(&mut self, remaining: i64, age: Duration, spent: u64, now: Instant) -> bool {
        if self.in_step(remaining, age, spent, now) {
            return false;
        }
        self.refill(now);
        self.lower_scaled(self.most_since(remaining, age, spent))
    }

    /// Lowers the level so that `n` tokens fit only after `after` (a
    /// provider refused them and said when they would fit).
    pub fn lower_until_fits(&mut self, n: u64, after: Duration, now: Instant) -> bool {
        self.refill(now);
        self.lower_scaled(n as i128 * NANOS_PER_MINUTE - after.as_nanos() as i128 * self.per_minute as i128)
    }

    fn lower_scaled(&mut self, target: i128) -> bool {
        if target < self.level {
            self.level = target;
            true
        } else {
            false
        }
    }

    /// How long the refill takes to add `n` tokens.
    pub fn refill_time(&self, n: u64) -> Duration {
        let rate = self.per_minute as i128;
        let nanos = (n as i128 * NANOS_PER_MINUTE + rate - 1) / rate;
        Duration::from_nanos(nanos.min(u64::MAX as i128) as u64)
    }

    /// Time until the bucket is full again.
    pub fn time_to_full(&self, now: Instant) -> Duration {
        self.time_until(self.capacity, now).unwrap_or(Duration::ZERO)
    }
}

/// i128 → f64 is a slow library call; this is two instructions, exact for
/// anything that fits an i64 and within 2^-31 of it beyond (capacities above
/// about 150 million tokens), which a fraction of a bucket does not notice.
fn to_f64(v: i128) -> f64 {
    match i64::try_from(v) {
        Ok(v) => v as f64,
        Err(_) => ((v >> 32) as i64) as f64 * 4_294_967_296.0,
    }
}

fn clamp_i64(v: i128) -> i64 {
    v.clamp(i64::MIN as i128, i64::MAX as i128) as i64
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn secs(s: f64) -> Duration {
        Duration::from_secs_f64(s)
    }

    #[test]
    fn rejects_zero_limits() {
        let now = crate::testing::epoch();
        assert_eq!(
            QuotaBucket::try_new(0, None, now).unwrap_err(),
            QuotaError::ZeroRate
        );
        assert_eq!(
            QuotaBucket::try_new(10, Some(0), now).unwrap_err(),
            QuotaError::ZeroBurst
        );
    }

    #[test]
    fn starts_full_and_refills_at_rate() {
        let t0 = crate::testing::epoch();
        let mut b = QuotaBucket::try_new(600, None, t0).unwrap();
        assert_eq!(b.available(t0), 600);
        b.try_take(600, t0).unwrap();
        assert_eq!(b.available(t0), 0);
        // 600/min = 10/s
        assert_eq!(b.available(t0 + secs(1.0)), 10);
        assert_eq!(b.time_until(25, t0), Ok(secs(2.5)));
        assert_eq!(b.try_take(25, t0 + secs(2.0)), Err(Shortfall::Wait(secs(0.5))));
        b.try_take(25, t0 + secs(2.5)).unwrap();
        assert_eq!(b.available(t0 + secs(2.5)), 0);
    }

    #[test]
    fn never_exceeds_capacity() {
        let t0 = crate::testing::epoch();
        let b = QuotaBucket::try_new(600, Some(100), t0).unwrap();
        assert_eq!(b.available(t0 + secs(3600.0)), 100);
        assert_eq!(b.time_until(101, t0), Err(Shortfall::TooLarge { capacity: 100 }));
    }

    #[test]
    fn refund_returns_capacity_and_charge_can_go_negative() {
        let t0 = crate::testing::epoch();
        let mut b = QuotaBucket::try_new(60, None, t0).unwrap();
        b.try_take(50, t0).unwrap();
        b.refund(30, t0);
        assert_eq!(b.available(t0), 40);
        b.refund(1000, t0);
        assert_eq!(b.available(t0), 60, "refund is capped at capacity");
        b.charge(100, t0);
        assert_eq!(b.available(t0), -40);
        // 1 token/s: 41 s until one token fits.
        assert_eq!(b.time_until(1, t0), Ok(secs(41.0)));
    }

    #[test]
    fn limit_change_keeps_fill_fraction() {
        let t0 = crate::testing::epoch();
        let mut b = QuotaBucket::try_new(1000, None, t0).unwrap();
        b.try_take(750, t0).unwrap();
        b.set_limit(400, None, t0).unwrap();
        assert_eq!(b.available(t0), 100);
        assert_eq!(b.capacity(), 400);
        b.set_limit(2000, None, t0).unwrap();
        assert_eq!(b.available(t0), 500);
        assert!(b.set_limit(0, None, t0).is_err());
    }

    #[test]
    fn fit_says_what_is_left_or_how_long_to_wait() {
        let t0 = crate::testing::epoch();
        let mut b = QuotaBucket::try_new(600, None, t0).unwrap();
        assert_eq!(b.fit(150, t0), Ok(0.75));
        b.try_take(600, t0).unwrap();
        assert_eq!(b.fit(25, t0), Err(Shortfall::Wait(secs(2.5))));
        assert_eq!(b.fit(601, t0), Err(Shortfall::TooLarge { capacity: 600 }));
        assert_eq!(b.fit(10, t0 + secs(1.0)), Ok(0.0));
    }

    #[test]
    fn headroom_fractions_stay_exact_enough_for_huge_buckets() {
        let t0 = crate::testing::epoch();
        let mut b = QuotaBucket::try_new(1 << 39, None, t0).unwrap();
        b.try_take(1 << 38, t0).unwrap();
        let f = b.fit(1 << 37, t0).unwrap();
        assert!((f - 0.25).abs() < 1e-9, "{f}");
    }

    #[test]
    fn room_without_the_refill_is_a_lower_bound_of_fit() {
        let t0 = crate::testing::epoch();
        let mut b = QuotaBucket::try_new(600, None, t0).unwrap();
        assert_eq!(b.room_at_least(100), b.fit(100, t0).ok());
        b.try_take(500, t0).unwrap();
        assert_eq!(b.room_at_least(100), b.fit(100, t0).ok(), "no time passed");
        let later = t0 + secs(3.0);
        assert!(b.room_at_least(100).unwrap() < b.fit(100, later).unwrap());
        assert_eq!(b.room_at_least(120), None, "fits only with the refill");
        assert!(b.fit(120, later).is_ok());
        assert_eq!(b.room_at_least(601), None);
    }

    #[test]
    fn provider_hint_only_lowers() {
        let t0 = crate::testing::epoch();
        let mut b = QuotaBucket::try_new(1000, None, t0).unwrap();
        assert!(b.lower_to(300, t0));
        assert_eq!(b.available(t0), 300);
        assert!(!b.lower_to(900, t0));
        assert_eq!(b.available(t0), 300);
    }

    #[test]
    fn judging_a_late_figure_and_lowering_until_a_fit() {
        let t0 = crate::testing::epoch();
        // 10 tokens a second.
        let mut b = QuotaBucket::try_new(600, None, t0).unwrap();
        assert_eq!(b.refill_time(15), secs(1.5));
        b.try_take(500, t0).unwrap();
        // In step: 100 left 1.5 s ago, 20 spent since, 15 refilled: 95.
        let later = t0 + secs(1.5);
        b.try_take(20, later).unwrap();
        assert_eq!(b.available(later), 95);
        assert!(b.in_step(100, secs(1.5), 20, later));
        assert!(!b.in_step(99, secs(1.5), 20, later));
        // A figure from now, with nothing spent since: plainly below.
        let c = QuotaBucket::try_new(600, None, t0).unwrap();
        assert!(c.in_step(600, Duration::ZERO, 0, t0));
        assert!(!c.in_step(590, Duration::ZERO, 0, t0));
        assert!(c.in_step(590, secs(1.0), 0, t0), "10 refilled since");
        // 30 tokens fit only in 2.5 s.
        let mut d = QuotaBucket::try_new(600, None, t0).unwrap();
        assert!(d.lower_until_fits(30, secs(2.5), t0));
        assert_eq!(d.time_until(30, t0), Ok(secs(2.5)));
        assert!(!d.lower_until_fits(30, secs(1.0), t0), "never raises");
    }

    #[derive(Debug, Clone)]
    enum Op {
        Take(u64),
        Refund(u64),
        Charge(u64),
        Advance(u64),
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            (1u64..400).prop_map(Op::Take),
            (0u64..400).prop_map(Op::Refund),
            (0u64..200).prop_map(Op::Charge),
            (0u64..3_000_000_000).prop_map(Op::Advance),
        ]
    }

    proptest! {
        /// No interleaving of take / refund / charge lets the tokens taken over
        /// any window [a, b] exceed capacity + rate × (b − a) + what was given
        /// back and charged within the window's past.
        #[test]
        fn taken_tokens_stay_within_envelope(
            per_minute in 60u64..100_000,
            burst in proptest::option::of(1u64..5_000),
            ops in proptest::collection::vec(op(), 1..200),
        ) {
            let t0 = crate::testing::epoch();
            let mut b = QuotaBucket::try_new(per_minute, burst, t0).unwrap();
            let cap = b.capacity() as i128;
            let mut now = t0;
            // (ns since t0, taken, refunded) per op
            let mut log: Vec<(i128, i128, i128)> = Vec::new();
            for op in ops {
                let mut entry = (now.duration_since(t0).as_nanos() as i128, 0, 0);
                match op {
                    Op::Take(n) => if b.try_take(n, now).is_ok() { entry.1 = n as i128 },
                    Op::Refund(n) => { b.refund(n, now); entry.2 = n as i128 },
                    Op::Charge(n) => b.charge(n, now),
                    Op::Advance(ns) => now += Duration::from_nanos(ns),
                }
                log.push(entry);
                prop_assert!(b.available(now) as i128 <= cap);
            }
            // For every window [i, j]: what was taken within it fits in a full
            // bucket plus the refill over the window plus what was refunded in it.
            for i in 0..log.len() {
                let (mut taken, mut refunded) = (0i128, 0i128);
                for j in i..log.len() {
                    taken += log[j].1;
                    refunded += log[j].2;
                    let span = log[j].0 - log[i].0;
                    prop_assert!(
                        taken * NANOS_PER_MINUTE
                            <= (cap + refunded) * NANOS_PER_MINUTE + span * per_minute as i128,
                        "window {i}..={j}: took {taken}, capacity {cap}, refunded {refunded}"
                    );
                }
            }
        }
    }
}
