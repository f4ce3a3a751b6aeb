//! How loaded and how healthy-looking a region is: our requests in flight
//! against its capacity, smoothed latency and error rate, and what the
//! cluster itself reports.

use std::time::{Duration, Instant};

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

#[derive(Debug, Clone)]
pub struct LoadState {
    in_flight: u32,
    capacity: u32,
    /// Milliseconds per 1,000 tokens, so a big request does not make a region look slow.
    latency_per_1k: Ewma,
    error_rate: Ewma,
    reported: Option<(ReportedLoad, Instant)>,
    completed: u64,
    failed: u64,
}

impl LoadState {
    pub fn new(capacity: u32) -> Self {
        Self {
            in_flight: 0,
            capacity: capacity.max(1),
            latency_per_1k: Ewma::new(0.1),
            error_rate: Ewma::new(0.05),
            reported: None,
            completed: 0,
            failed: 0,
        }
    }

    pub fn set_capacity(&mut self, capacity: u32) {
        self.capacity = capacity.max(1);
    }

    pub fn capacity(&self) -> u32 {
        self.capacity
    }

    pub fn in_flight(&self) -> u32 {
        self.in_flight
    }

    pub fn has_room(&self) -> bool {
        self.in_flight < self.capacity
    }

    pub fn start(&mut self) {
        self.in_flight += 1;
    }

    /// Ends a request started with `start`. `latency` is only fed to the
    /// average for successes: a fast failure must not make a region look quick.
    pub fn finish(&mut self, outcome: Outcome, latency: Duration, tokens: u64) {
        self.in_flight = self.in_flight.saturating_sub(1);
        match outcome {
            Outcome::Success => {
                self.completed += 1;
                self.error_rate.observe(0.0);
                let per_1k = latency.as_secs_f64() * 1000.0 * 1000.0 / tokens.max(1) as f64;
                self.latency_per_1k.observe(per_1k);
            }
            Outcome::Failure => {
                self.failed += 1;
                self.error_rate.observe(1.0);
                // A fast failure must not make the region look quick: it
                // counts as at least twice the smoothed latency.
                let penalty = self
                    .latency_per_1k
                    .get()
                    .map_or(FAILURE_PENALTY_MS, |l| (2.0 * l).max(FAILURE_PENALTY_MS));
                self.latency_per_1k.observe(penalty);
            }
        }
    }

    /// Ends a request started with `start` that never reached the cluster's
    /// judgement (the caller went away, a reload removed it): no sample.
    pub fn abandon(&mut self) {
        self.in_flight = self.in_flight.saturating_sub(1);
    }

    pub fn report(&mut self, load: ReportedLoad, now: Instant) {
        self.reported = Some((load, now));
    }

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
    pub fn utilization_with(&self, reported: Option<ReportedLoad>) -> f64 {
        let ours = self.in_flight as f64 / self.capacity as f64;
        let theirs = reported.map_or(0.0, |r| r.utilization);
        ours.max(theirs).clamp(0.0, 1.0)
    }

    /// Smoothed milliseconds per 1,000 tokens; `None` before the first success.
    pub fn latency_per_1k_ms(&self) -> Option<f64> {
        self.latency_per_1k.get()
    }

    pub fn error_rate(&self) -> f64 {
        self.error_rate.get().unwrap_or(0.0)
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
    fn ewma_moves_toward_samples() {
        let mut e = Ewma::new(0.5);
        assert_eq!(e.get(), None);
        e.observe(10.0);
        assert_eq!(e.get(), Some(10.0));
        e.observe(20.0);
        assert_eq!(e.get(), Some(15.0));
    }

    #[test]
    fn utilization_is_the_larger_of_ours_and_reported() {
        let t0 = crate::testing::epoch();
        let mut l = LoadState::new(4);
        l.start();
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
        let mut l = LoadState::new(4);
        l.start();
        l.finish(Outcome::Success, Duration::from_millis(600), 2000);
        assert_eq!(l.latency_per_1k_ms(), Some(300.0));
        l.start();
        l.finish(Outcome::Failure, Duration::from_millis(1), 2000);
        assert!(
            l.latency_per_1k_ms().unwrap() > 300.0,
            "a 1 ms failure made the region look slower, not faster"
        );
        assert!(l.error_rate() > 0.0);
        assert_eq!(l.in_flight(), 0);
    }
}
