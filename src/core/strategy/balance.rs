//! Strategies that balance on load and speed: least outstanding, power of two
//! choices, performance (latency and success) and predictive (expected
//! completion time).

use rand::{Rng, RngCore};

use super::{CandidateView, Factors, Score, Scored, Strategy, StrategyKind};

fn outstanding_score(c: &CandidateView<'_>) -> Score {
    Score::new(
        1.0 / (1.0 + c.in_flight as f64),
        Factors::new().with("in_flight", c.in_flight as f64),
    )
}

/// The region with the fewest of our requests in flight; ties by name.
#[derive(Debug, Clone, Copy, Default)]
pub struct LeastOutstanding;

impl Strategy for LeastOutstanding {
    fn kind(&self) -> StrategyKind {
        StrategyKind::LeastOutstanding
    }

    fn score(&self, c: &CandidateView<'_>) -> Score {
        outstanding_score(c)
    }
}

/// Power of two choices: two regions drawn at random, the one with fewer
/// requests in flight wins. Near least-outstanding balance without herding
/// every dispatcher onto the same region.
#[derive(Debug, Clone, Copy, Default)]
pub struct PowerOfTwo;

impl Strategy for PowerOfTwo {
    fn kind(&self) -> StrategyKind {
        StrategyKind::PowerOfTwo
    }

    fn score(&self, c: &CandidateView<'_>) -> Score {
        outstanding_score(c)
    }

    fn pick(&self, scored: &[Scored], rng: &mut dyn RngCore) -> usize {
        let n = scored.len();
        if n < 2 {
            return 0;
        }
        let a = rng.random_range(0..n);
        let b = (a + rng.random_range(1..n)) % n;
        let (lo, hi) = (a.min(b), a.max(b));
        if scored[hi].value > scored[lo].value {
            hi
        } else {
            lo
        }
    }
}

/// Latency and success: `(1 − error_rate)^b / (1 + latency / latency_ref)`.
#[derive(Debug, Clone, Copy)]
pub struct Performance {
    latency_ref_ms: f64,
    error_exponent: f64,
}

impl Performance {
    pub fn new(latency_ref_ms: f64, error_exponent: f64) -> Self {
        Self {
            latency_ref_ms: latency_ref_ms.max(f64::MIN_POSITIVE),
            error_exponent,
        }
    }
}

impl Strategy for Performance {
    fn kind(&self) -> StrategyKind {
        StrategyKind::Performance
    }

    fn score(&self, c: &CandidateView<'_>) -> Score {
        let latency = c.latency_per_1k_ms.unwrap_or(0.0);
        let speed = 1.0 / (1.0 + latency / self.latency_ref_ms);
        let success = (1.0 - c.error_rate).clamp(0.0, 1.0).powf(self.error_exponent);
        Score::new(
            speed * success,
            Factors::new()
                .with("latency_ms_per_1k", latency)
                .with("latency", speed)
                .with("error_rate", c.error_rate)
                .with("success", success),
        )
    }
}

/// Expected completion time: the time this request would take at the
/// region's smoothed speed, stretched by the work already ahead of it.
/// Score `1 / (1 + expected / reference)`, where the reference is what the
/// request would take at `latency_ref` on an idle region.
#[derive(Debug, Clone, Copy)]
pub struct Predictive {
    latency_ref_ms: f64,
}

impl Predictive {
    pub fn new(latency_ref_ms: f64) -> Self {
        Self {
            latency_ref_ms: latency_ref_ms.max(f64::MIN_POSITIVE),
        }
    }

    /// Expected milliseconds until this request completes on `c`.
    pub fn expected_ms(&self, c: &CandidateView<'_>) -> f64 {
        let per_1k = c.latency_per_1k_ms.unwrap_or(0.0);
        let service = per_1k * c.request_tokens as f64 / 1000.0;
        let ahead = (c.in_flight as f64 + c.queued as f64) / c.capacity.max(1) as f64;
        service * (1.0 + ahead)
    }
}

impl Strategy for Predictive {
    fn kind(&self) -> StrategyKind {
        StrategyKind::Predictive
    }

    fn score(&self, c: &CandidateView<'_>) -> Score {
        let expected = self.expected_ms(c);
        let reference = self.latency_ref_ms * (c.request_tokens.max(1) as f64 / 1000.0);
        Score::new(
            1.0 / (1.0 + expected / reference),
            Factors::new()
                .with("expected_ms", expected)
                .with("in_flight", c.in_flight as f64)
                .with("queued", c.queued as f64),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::super::test_support::{run, view};
    use super::*;
    use rand::SeedableRng;
    use rand::rngs::SmallRng;

    #[test]
    fn least_outstanding_picks_the_minimum_and_ties_on_name() {
        let mut views = [view("a", 0), view("b", 1), view("c", 2)];
        views[0].in_flight = 5;
        views[1].in_flight = 2;
        views[2].in_flight = 2;
        let mut rng = SmallRng::seed_from_u64(1);
        assert_eq!(run(&mut LeastOutstanding, &views, 1, &mut rng), ["b"]);
        views[0].in_flight = 0;
        assert_eq!(run(&mut LeastOutstanding, &views, 1, &mut rng), ["a"]);
    }

    #[test]
    fn power_of_two_never_picks_the_busiest_of_three() {
        let mut views = [view("a", 0), view("b", 1), view("c", 2)];
        views[0].in_flight = 9;
        views[1].in_flight = 1;
        views[2].in_flight = 3;
        let mut rng = SmallRng::seed_from_u64(7);
        let picks = run(&mut PowerOfTwo, &views, 300, &mut rng);
        assert!(
            !picks.contains(&"a"),
            "the worst of three loses every pair it is in"
        );
        let b = picks.iter().filter(|x| **x == "b").count();
        // b wins both pairs it is in: 2/3 of draws.
        assert!((170..=230).contains(&b), "b picked {b} of 300");
    }

    #[test]
    fn power_of_two_is_reproducible_for_a_seed() {
        let views = [view("a", 0), view("b", 1), view("c", 2)];
        let a = run(&mut PowerOfTwo, &views, 50, &mut SmallRng::seed_from_u64(3));
        let b = run(&mut PowerOfTwo, &views, 50, &mut SmallRng::seed_from_u64(3));
        assert_eq!(a, b);
    }

    #[test]
    fn performance_prefers_fast_and_reliable() {
        let mut views = [view("a", 0), view("b", 1), view("c", 2)];
        views[0].latency_per_1k_ms = Some(400.0);
        views[1].latency_per_1k_ms = Some(100.0);
        views[2].latency_per_1k_ms = Some(100.0);
        views[2].error_rate = 0.5;
        let p = Performance::new(200.0, 2.0);
        let mut rng = SmallRng::seed_from_u64(1);
        assert_eq!(run(&mut p.clone(), &views, 1, &mut rng), ["b"]);
        let s = p.score(&views[0]);
        assert!((s.value - 1.0 / 3.0).abs() < 1e-12);
        assert_eq!(s.factors.get("latency_ms_per_1k"), Some(400.0));
    }

    #[test]
    fn predictive_accounts_for_work_ahead() {
        let mut views = [view("a", 0), view("b", 1)];
        // a is twice as fast per token but has 3 capacities' worth of work ahead.
        views[0].latency_per_1k_ms = Some(100.0);
        views[0].in_flight = 100;
        views[0].queued = 200;
        views[1].latency_per_1k_ms = Some(200.0);
        let p = Predictive::new(200.0);
        assert_eq!(p.expected_ms(&views[0]), 400.0);
        assert_eq!(p.expected_ms(&views[1]), 200.0);
        let mut rng = SmallRng::seed_from_u64(1);
        assert_eq!(run(&mut p.clone(), &views, 1, &mut rng), ["b"]);
    }
}
