//! How loaded and how healthy-looking a region is: our requests in flight
//! against its capacity, smoothed latency and error rate, and what the
//! cluster itself reports.

use std::time::{Duration, Instant};

/// How fast an idle region's error rate and latency averages forget
/// (`routing.load_half_life`): the default.
pub const DEFAULT_HALF_LIFE: Duration = Duration::from_secs(5);

/// An exponentially weighted moving average over samples.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Ewma {
    alpha: f64,
    value: Option<f64>,
}

impl Ewma {
    /// `alpha` is the weight of each new sample, in (0, 1].
    pub fn new(alpha: f64) -> Self {
        Self {
            alpha: alpha.clamp(f64::MIN_POSITIVE, 1.0),
            value: None,
        }
    }

    pub fn observe(&mut self, sample: f64) {
        self.value = Some(match self.value {
            None => sample,
            Some(v) => v + self.alpha * (sample - v),
        });
    }

    pub fn get(&self) -> Option<f64> {
        self.value
    }

    /// Moves the average toward zero by `factor` (1 keeps it).
    pub fn scale(&mut self, factor: f64) {
        if let Some(v) = &mut self.value {
            *v *= factor;
        }
    }
}

/// What the cluster said about its own load.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct ReportedLoad {
    pub in_flight: u32,
    pub queued: u32,
    pub capacity: u32,
    pub utilization: f64,
}

/// How a forwarded request ended, for the load state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Success,
    /// The region failed or refused it.
    Failure,
}

/// What a failure counts as in the latency average, at least (ms per 1k tokens).
pub const FAILURE_PENALTY_MS: f64 = 1000.0;

/// A cluster report older than this no longer says anything about now.
pub const REPORT_TTL: Duration = Duration::from_secs(5);

/// The averages forget while the region is idle: with nothing of ours in
/// flight there they relax toward zero, halving every `half_life` (tower's
/// peak-EWMA decays toward zero the same way). Without that, a region that
/// stopped getting work after a bad minute would be judged by that minute
/// for ever, since only new replies could move it. Zero is what a region
/// nobody has heard from looks like (no errors, no latency known), so an
/// idle region drifts back toward a new one's score, draws work again and
/// is judged afresh by real replies. Only idle time counts: a region whose
/// requests have not answered yet is silent, not recovered (a region that
/// turned slow would otherwise look better the longer it keeps us waiting).
#[derive(Debug, Clone)]
pub struct LoadState {
    in_flight: u32,
    capacity: u32,
    /// Milliseconds per 1,000 tokens, so a big request does not make a region look slow.
    latency_per_1k: Ewma,
    /// The same over successes only: what a failure's penalty is twice of.
    /// (Twice the average with penalties in it would compound: a hundred
    /// failures in a row made it 1.1^99 times the first penalty, which no
    /// decay brings back in reasonable time.)
    success_latency_per_1k: Ewma,
    error_rate: Ewma,
    half_life: Duration,
    /// `half_life` in seconds, kept: converting it is a division.
    half_life_secs: f64,
    /// The averages are decayed up to this instant; idle time after it
    /// (while nothing is in flight) is still to be applied.
    decayed_to: Instant,
    reported: Option<(ReportedLoad, Instant)>,
    completed: u64,
    failed: u64,
}

/// `2^-halvings`. Every scored region works this out on the decision
/// path, and at the rates where that path's cost matters a region is idle
/// for a small part of a half-life: below 1/64 of one a cubic is as exact
/// as `exp2` (the next term is under 6e-10) at a fraction of its cost.
#[inline]
fn decay(halvings: f64) -> f64 {
    if halvings < 1.0 / 64.0 {
        let y = -halvings * std::f64::consts::LN_2;
        ((y * (1.0 / 6.0) + 0.5) * y + 1.0) * y + 1.0
    } else {
        (-halvings).exp2()
    }
}

impl LoadState {
    /// `half_life`: how fast the averages forget while the region is idle;
    /// zero keeps them.
    pub fn new(capacity: u32, half_life: Duration, now: Instant) -> Self {
        Self {
            in_flight: 0,
            capacity: capacity.max(1),
            latency_per_1k: Ewma::new(0.1),
            success_latency_per_1k: Ewma::new(0.1),
            error_rate: Ewma::new(0.05),
            half_life,
            half_life_secs: half_life.as_secs_f64(),
            decayed_to: now,
            reported: None,
            completed: 0,
            failed: 0,
        }
    }

    pub fn set_capacity(&mut self, capacity: u32) {
        self.capacity = capacity.max(1);
    }

    #[inline]
    pub fn capacity(&self) -> u32 {
        self.capacity
    }

    pub fn set_half_life(&mut self, half_life: Duration) {
        self.half_life = half_life;
        self.half_life_secs = half_life.as_secs_f64();
    }

    /// How much of the averages is left at `now` after the idle time not
    /// yet applied: 1 while anything is in flight.
    #[inline]
    fn idle_factor(&self, now: Instant) -> f64 {
        if self.in_flight > 0 || self.half_life.is_zero() || now <= self.decayed_to {
            return 1.0;
        }
        let idle = now.saturating_duration_since(self.decayed_to);
        decay(idle.as_secs_f64() / self.half_life_secs)
    }

    /// Applies the idle time up to `now`; call before `in_flight` changes.
    fn catch_up(&mut self, now: Instant) {
        let factor = self.idle_factor(now);
        if factor < 1.0 {
            self.latency_per_1k.scale(factor);
            self.success_latency_per_1k.scale(factor);
            self.error_rate.scale(factor);
        }
        self.decayed_to = self.decayed_to.max(now);
    }

    #[inline]
    pub fn in_flight(&self) -> u32 {
        self.in_flight
    }

    #[inline]
    pub fn has_room(&self) -> bool {
        self.in_flight < self.capacity
    }

    pub fn start(&mut self, now: Instant) {
        self.catch_up(now);
        self.in_flight += 1;
    }

    /// Ends a request started with `start`. `latency` is only fed to the
    /// average for successes: a fast failure must not make a region look quick.
    pub fn finish(&mut self, outcome: Outcome, latency: Duration, tokens: u64, now: Instant) {
        self.catch_up(now);
        self.in_flight = self.in_flight.saturating_sub(1);
        match outcome {
            Outcome::Success => {
                self.completed += 1;
                self.error_rate.observe(0.0);
                let per_1k = latency.as_secs_f64() * 1000.0 * 1000.0 / tokens.max(1) as f64;
                self.latency_per_1k.observe(per_1k);
                self.success_latency_per_1k.observe(per_1k);
            }
            Outcome::Failure => {
                self.failed += 1;
                self.error_rate.observe(1.0);
                // A fast failure must not make the region look quick: it
                // counts as at least twice the smoothed latency of successes.
                let penalty = self
                    .success_latency_per_1k
                    .get()
                    .map_or(FAILURE_PENALTY_MS, |l| (2.0 * l).max(FAILURE_PENALTY_MS));
                self.latency_per_1k.observe(penalty);
            }
        }
    }

    /// Ends a request started with `start` that never reached the cluster's
    /// judgement (the caller went away, a reload removed it): no sample.
    pub fn abandon(&mut self, now: Instant) {
        self.catch_up(now);
        self.in_flight = self.in_flight.saturating_sub(1);
    }

    /// The load a reply reported. It was counted while the request it
    /// answers was in flight there, and that request is done: it is taken
    /// out, so an idle region reads 0, not one request's share.
    pub fn report(&mut self, mut load: ReportedLoad, now: Instant) {
        if load.in_flight > 0 && load.capacity > 0 {
            load.in_flight -= 1;
            load.utilization = (load.utilization - 1.0 / load.capacity as f64).max(0.0);
        }
        self.reported = Some((load, now));
    }

    #[inline]
    pub fn reported(&self, now: Instant) -> Option<ReportedLoad> {
        self.reported
            .filter(|(_, at)| now.saturating_duration_since(*at) <= REPORT_TTL)
            .map(|(load, _)| load)
    }

    /// `max(in_flight / capacity, reported utilisation)`, in [0, 1].
    pub fn utilization(&self, now: Instant) -> f64 {
        self.utilization_with(self.reported(now))
    }

    /// `utilization` with the fresh report already looked up.
    #[inline]
    pub fn utilization_with(&self, reported: Option<ReportedLoad>) -> f64 {
        // 0 / capacity is 0: no division for an idle region.
        let ours = if self.in_flight == 0 {
            0.0
        } else {
            self.in_flight as f64 / self.capacity as f64
        };
        let theirs = reported.map_or(0.0, |r| r.utilization);
        ours.max(theirs).clamp(0.0, 1.0)
    }

    /// `latency_per_1k_ms` and `error_rate` together, with the idle decay
    /// worked out once (an `exp2`): the decision path reads both for every
    /// region. Nothing to decay before the first reply.
    #[inline]
    pub fn averages(&self, now: Instant) -> (Option<f64>, f64) {
        let (latency, errors) = (self.latency_per_1k.get(), self.error_rate.get());
        if latency.is_none() && errors.is_none() {
            return (None, 0.0);
        }
        let factor = self.idle_factor(now);
        (latency.map(|l| l * factor), errors.map_or(0.0, |e| e * factor))
    }

    /// Smoothed milliseconds per 1,000 tokens as of `now`; `None` before
    /// the first reply.
    pub fn latency_per_1k_ms(&self, now: Instant) -> Option<f64> {
        self.latency_per_1k.get().map(|l| l * self.idle_factor(now))
    }

    /// Smoothed share of failed replies as of `now`, in [0, 1].
    pub fn error_rate(&self, now: Instant) -> f64 {
        self.error_rate.get().map_or(0.0, |e| e * self.idle_factor(now))
    }

    pub fn completed(&self) -> u64 {
        self.completed
    }

    pub fn failed(&self) -> u64 {
        self.failed
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decay_is_exp2_to_within_1e9_across_the_switch() {
        for i in 0..=4096 {
            let h = i as f64 / 65536.0 * 16.0; // 0 .. 1 half-life, fine steps
            let (fast, exact) = (decay(h), (-h).exp2());
            assert!((fast - exact).abs() <= 1e-9 * exact, "{h}: {fast} vs {exact}");
        }
        assert_eq!(decay(0.0), 1.0);
        assert_eq!(decay(1.0), 0.5);
    }

    #[test]
    fn ewma_moves_toward_samples() {
        let mut e = Ewma::new(0.5);
        assert_eq!(e.get(), None);
        e.observe(10.0);
        assert_eq!(e.get(), Some(10.0));
        e.observe(20.0);
        assert_eq!(e.get(), Some(15.0));
    }

    #[test]
    fn averages_halve_every_half_life_while_idle_and_only_then() {
        let t0 = crate::testing::epoch();
        let h = Duration::from_secs(4);
        let mut l = LoadState::new(4, h, t0);
        l.start(t0);
        l.finish(Outcome::Failure, Duration::from_millis(1), 1000, t0);
        assert_eq!(l.error_rate(t0), 1.0);
        assert_eq!(l.latency_per_1k_ms(t0), Some(FAILURE_PENALTY_MS));
        assert_eq!(l.error_rate(t0 + h), 0.5);
        assert_eq!(l.latency_per_1k_ms(t0 + 2 * h), Some(FAILURE_PENALTY_MS / 4.0));
        // Waiting on a request is not idleness: nothing decays meanwhile.
        l.start(t0 + h);
        assert_eq!(l.error_rate(t0 + 3 * h), 0.5);
        // A reply blends with the decayed value, not the stale one.
        l.finish(Outcome::Success, Duration::from_millis(100), 1000, t0 + 3 * h);
        assert_eq!(l.error_rate(t0 + 3 * h), 0.475);
        assert_eq!(l.error_rate(t0 + 4 * h), 0.2375);
        // A zero half-life keeps them.
        let mut l = LoadState::new(4, Duration::ZERO, t0);
        l.start(t0);
        l.finish(Outcome::Failure, Duration::from_millis(1), 1000, t0);
        assert_eq!(l.error_rate(t0 + Duration::from_secs(3600)), 1.0);
    }

    #[test]
    fn a_reply_s_report_does_not_count_the_request_it_answers() {
        let t0 = crate::testing::epoch();
        let mut l = LoadState::new(4, DEFAULT_HALF_LIFE, t0);
        l.report(
            ReportedLoad {
                in_flight: 1,
                queued: 0,
                capacity: 1024,
                utilization: 1.0 / 1024.0,
            },
            t0,
        );
        assert_eq!(l.utilization(t0), 0.0, "an idle region reads 0");
        l.report(
            ReportedLoad {
                in_flight: 512,
                queued: 0,
                capacity: 1024,
                utilization: 0.5,
            },
            t0,
        );
        assert_eq!(l.reported(t0).unwrap().in_flight, 511);
        assert_eq!(l.utilization(t0), 511.0 / 1024.0);
    }

    #[test]
    fn utilization_is_the_larger_of_ours_and_reported() {
        let t0 = crate::testing::epoch();
        let mut l = LoadState::new(4, DEFAULT_HALF_LIFE, t0);
        l.start(t0);
        assert_eq!(l.utilization(t0), 0.25);
        l.report(
            ReportedLoad {
                utilization: 0.9,
                ..Default::default()
            },
            t0,
        );
        assert_eq!(l.utilization(t0), 0.9);
        assert_eq!(
            l.utilization(t0 + REPORT_TTL + Duration::from_millis(1)),
            0.25,
            "stale report ignored"
        );
    }

    #[test]
    fn latency_is_normalised_per_1k_tokens_and_fast_failures_are_penalised() {
        let t0 = crate::testing::epoch();
        let mut l = LoadState::new(4, DEFAULT_HALF_LIFE, t0);
        l.start(t0);
        l.finish(Outcome::Success, Duration::from_millis(600), 2000, t0);
        assert_eq!(l.latency_per_1k_ms(t0), Some(300.0));
        l.start(t0);
        l.finish(Outcome::Failure, Duration::from_millis(1), 2000, t0);
        assert!(
            l.latency_per_1k_ms(t0).unwrap() > 300.0,
            "a 1 ms failure made the region look slower, not faster"
        );
        assert!(l.error_rate(t0) > 0.0);
        assert_eq!(l.in_flight(), 0);
        // Penalties do not compound: however many failures, the average
        // stays within twice the successes' latency (or the floor).
        for _ in 0..1000 {
            l.start(t0);
            l.finish(Outcome::Failure, Duration::from_millis(1), 2000, t0);
        }
        let worst = l.latency_per_1k_ms(t0).unwrap();
        assert!(worst <= FAILURE_PENALTY_MS + 1e-6, "{worst}");
        assert!(l.error_rate(t0) > 0.999);
    }
}
