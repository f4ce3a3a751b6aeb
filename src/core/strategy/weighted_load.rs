//! The default strategy: quota headroom, load, latency, errors, weight and
//! locality multiplied into one score, each factor in [0, 1] (locality a bonus).
//! Near-equal scores are a tie, broken so that light traffic spreads.

use rand::RngCore;

use super::{CandidateView, Factors, Score, Scored, Strategy, StrategyKind};

/// Scores within this fraction of the best one (2 %, relative) count as
/// equal. At light load identical regions score the same, or differ by
/// noise (a request's worth of headroom, one request in flight, a few ms
/// of smoothed latency); taking the strictly highest then sends every
/// request to the first name, or wherever the noise points. Among the
/// near-equal the fewest of our requests in flight wins, then the next in
/// rotation (name order, after the region picked last). A clear difference
/// (more than 2 %: a 10 % weight or locality bonus, a visibly fuller bucket
/// or faster region) still wins outright.
pub const NEAR_EQUAL: f64 = 0.02;

/// `routing.weighted_load` in the config.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct WeightedLoadParams {
    /// `a`: how strongly a full bucket is preferred over a nearly empty one.
    pub headroom_exponent: f64,
    /// How much utilisation counts, in [0, 1]; 1 makes a saturated region score 0.
    pub load_weight: f64,
    /// The latency (ms per 1,000 tokens) that halves the latency factor.
    pub latency_ref_ms: f64,
    /// `b`: how strongly errors count.
    pub error_exponent: f64,
    /// Extra score for the caller's own region (0.2 = 20 %).
    pub locality_bonus: f64,
}

impl Default for WeightedLoadParams {
    fn default() -> Self {
        Self {
            headroom_exponent: 1.0,
            load_weight: 0.8,
            latency_ref_ms: 500.0,
            error_exponent: 2.0,
            locality_bonus: 0.1,
        }
    }
}

/// `x^e`, without `powf` for the common exponents (the decision path runs
/// this for every region).
#[derive(Debug, Clone, Copy, PartialEq)]
enum Power {
    Zero,
    One,
    Two,
    Any(f64),
}

impl Power {
    fn new(e: f64) -> Self {
        if e == 0.0 {
            Power::Zero
        } else if e == 1.0 {
            Power::One
        } else if e == 2.0 {
            Power::Two
        } else {
            Power::Any(e)
        }
    }

    #[inline]
    fn of(self, x: f64) -> f64 {
        match self {
            Power::Zero => 1.0,
            Power::One => x,
            Power::Two => x * x,
            Power::Any(e) => x.powf(e),
        }
    }
}

/// ```text
/// score = weight × headroom^a × (1 − load_weight × utilization)
///       × 1 / (1 + latency / latency_ref) × (1 − error_rate)^b × (origin ? 1 + bonus : 1)
/// ```
///
/// The pick: the highest score, except that every score within
/// [`NEAR_EQUAL`] of it ties, and ties go to the fewest in flight, then to
/// the next in rotation. The rotation is the strategy's only memory; it
/// moves on `commit` (a real pick), never on a dry run.
#[derive(Debug, Clone, Copy)]
pub struct WeightedLoad {
    p: WeightedLoadParams,
    headroom_power: Power,
    error_power: Power,
    inverse_latency_ref: f64,
    /// The region (configured index) picked last, where the rotation resumes.
    last: Option<usize>,
}

/// The factors of one score, each in [0, 1] (locality a bonus).
struct Parts {
    headroom: f64,
    load: f64,
    latency_ms: f64,
    latency: f64,
    errors: f64,
    locality: f64,
}

impl WeightedLoad {
    pub fn new(p: WeightedLoadParams) -> Self {
        Self {
            headroom_power: Power::new(p.headroom_exponent),
            error_power: Power::new(p.error_exponent),
            inverse_latency_ref: 1.0 / p.latency_ref_ms.max(f64::MIN_POSITIVE),
            p,
            last: None,
        }
    }

    #[inline]
    fn parts(&self, c: &CandidateView<'_>) -> Parts {
        let latency_ms = c.latency_per_1k_ms.unwrap_or(0.0);
        Parts {
            headroom: self.headroom_power.of(c.headroom.clamp(0.0, 1.0)),
            load: 1.0 - self.p.load_weight * c.utilization.clamp(0.0, 1.0),
            latency_ms,
            // Exactly 1 without a latency: no division (most regions at light load).
            latency: if latency_ms == 0.0 {
                1.0
            } else {
                1.0 / (1.0 + latency_ms * self.inverse_latency_ref)
            },
            errors: self.error_power.of((1.0 - c.error_rate).clamp(0.0, 1.0)),
            locality: if c.is_origin {
                1.0 + self.p.locality_bonus
            } else {
                1.0
            },
        }
    }
}

impl Strategy for WeightedLoad {
    fn kind(&self) -> StrategyKind {
        StrategyKind::WeightedLoad
    }

    fn score(&self, c: &CandidateView<'_>) -> Score {
        let f = self.parts(c);
        Score::new(
            c.weight * f.headroom * f.load * f.latency * f.errors * f.locality,
            Factors::new()
                .with("weight", c.weight)
                .with("headroom", f.headroom)
                .with("load", f.load)
                .with("latency", f.latency)
                .with("errors", f.errors)
                .with("locality", f.locality)
                .with("utilization", c.utilization)
                .with("latency_ms_per_1k", f.latency_ms)
                .with("in_flight", c.in_flight as f64),
        )
    }

    fn value(&self, c: &CandidateView<'_>) -> f64 {
        let f = self.parts(c);
        let v = c.weight * f.headroom * f.load * f.latency * f.errors * f.locality;
        if v.is_nan() { 0.0 } else { v }
    }

    /// Every other factor is in [0, 1], so the product with them is at most
    /// this one. (In floating point too: multiplying by a factor ≤ 1 never
    /// rounds up past the value multiplied.)
    fn bound(&self, weight: f64, headroom: f64, is_origin: bool) -> f64 {
        let locality = if is_origin {
            1.0 + self.p.locality_bonus
        } else {
            1.0
        };
        weight * self.headroom_power.of(headroom.clamp(0.0, 1.0)) * locality
    }

    fn floor(&self, best: f64) -> f64 {
        best * (1.0 - NEAR_EQUAL)
    }

    fn pick(&self, scored: &[Scored], _rng: &mut dyn RngCore) -> usize {
        let best = scored.iter().fold(0.0_f64, |m, s| m.max(s.value));
        let floor = self.floor(best);
        // Rotation distance from `next`, in configured positions (all of
        // `scored` count the same regions). No division per candidate.
        let n = scored.first().map_or(1, |s| s.regions.max(1));
        let next = self.last.map_or(0, |l| (l + 1) % n);
        let turns = |s: &Scored| {
            if s.index >= next {
                s.index - next
            } else {
                s.index + n - next
            }
        };
        let mut pick = 0;
        let mut key = (u32::MAX, usize::MAX);
        for (i, s) in scored.iter().enumerate() {
            if s.value >= floor {
                let k = (s.in_flight, turns(s));
                if k < key {
                    (pick, key) = (i, k);
                }
            }
        }
        pick
    }

    fn commit(&mut self, chosen: usize, scored: &[Scored]) {
        self.last = Some(scored[chosen].index);
    }
}

#[cfg(test)]
mod tests {
    use super::super::test_support::{run, view};
    use super::*;
    use rand::SeedableRng;
    use rand::rngs::SmallRng;

    fn params() -> WeightedLoadParams {
        WeightedLoadParams {
            headroom_exponent: 1.0,
            load_weight: 0.5,
            latency_ref_ms: 100.0,
            error_exponent: 2.0,
            locality_bonus: 0.2,
        }
    }

    #[test]
    fn score_is_the_product_of_its_factors() {
        let mut c = view("a", 0);
        c.weight = 2.0;
        c.headroom = 0.5;
        c.utilization = 0.4;
        c.latency_per_1k_ms = Some(100.0);
        c.error_rate = 0.1;
        c.is_origin = true;
        let s = WeightedLoad::new(params()).score(&c);
        let expected = 2.0 * 0.5 * (1.0 - 0.5 * 0.4) * 0.5 * 0.81 * 1.2;
        assert!((s.value - expected).abs() < 1e-12, "{} vs {expected}", s.value);
        assert_eq!(s.factors.get("headroom"), Some(0.5));
        assert_eq!(s.factors.get("locality"), Some(1.2));
    }

    #[test]
    fn prefers_headroom_then_breaks_ties_on_name() {
        let mut views = [view("a", 0), view("b", 1), view("c", 2)];
        views[0].headroom = 0.2;
        views[1].headroom = 0.9;
        views[2].headroom = 0.9;
        let mut s = WeightedLoad::new(params());
        let mut rng = SmallRng::seed_from_u64(1);
        assert_eq!(run(&mut s, &views, 1, &mut rng), ["b"]);
    }

    #[test]
    fn locality_bonus_wins_a_close_call() {
        let mut views = [view("a", 0), view("b", 1)];
        views[0].headroom = 1.0;
        views[1].headroom = 0.9;
        views[1].is_origin = true;
        let mut rng = SmallRng::seed_from_u64(1);
        assert_eq!(run(&mut WeightedLoad::new(params()), &views, 1, &mut rng), ["b"]);
    }

    #[test]
    fn every_factor_stays_in_range_for_wild_inputs() {
        let mut c = view("a", 0);
        c.headroom = 7.0;
        c.utilization = -3.0;
        c.error_rate = 2.0;
        c.latency_per_1k_ms = Some(f64::INFINITY);
        let s = WeightedLoad::new(params()).score(&c);
        assert!(s.value.is_finite() && s.value >= 0.0, "{s:?}");
    }

    #[test]
    fn near_equal_scores_rotate_and_clear_differences_win() {
        let mut rng = SmallRng::seed_from_u64(1);
        let views = [view("a", 0), view("b", 1), view("c", 2)];
        let mut s = WeightedLoad::new(params());
        let picks = run(&mut s, &views, 6, &mut rng);
        assert_eq!(picks, ["a", "b", "c", "a", "b", "c"]);
        // 1.5 % apart: still a tie.
        let mut close = views;
        close[2].weight = 1.015;
        assert_eq!(run(&mut s, &close, 3, &mut rng), ["a", "b", "c"]);
        // 10 % apart: the better one, every time.
        let mut clear = views;
        clear[1].weight = 1.1;
        assert_eq!(run(&mut s, &clear, 4, &mut rng), ["b"; 4]);
    }

    #[test]
    fn among_near_equal_scores_fewest_in_flight_then_rotation() {
        let mut rng = SmallRng::seed_from_u64(1);
        let mut views = [view("a", 0), view("b", 1), view("c", 2)];
        // a scores 1 % higher but has two in flight; c has one, b none.
        views[0].weight = 1.01;
        views[0].in_flight = 2;
        views[2].in_flight = 1;
        let mut s = WeightedLoad::new(params());
        assert_eq!(run(&mut s, &views, 1, &mut rng), ["b"]);
        // Equal in flight: the rotation, resuming after b.
        views[1].in_flight = 1;
        assert_eq!(run(&mut s, &views, 1, &mut rng), ["c"]);
        // Outside the tolerance, fewer in flight does not help.
        views[0].weight = 1.1;
        assert_eq!(run(&mut s, &views, 1, &mut rng), ["a"]);
    }

    #[test]
    fn picking_alone_moves_nothing() {
        let scored: Vec<Scored> = (0..3)
            .map(|index| Scored {
                index,
                weight: 1.0,
                value: 1.0,
                regions: 3,
                in_flight: 0,
            })
            .collect();
        let s = WeightedLoad::new(params());
        let mut rng = SmallRng::seed_from_u64(1);
        assert_eq!(s.pick(&scored, &mut rng), 0);
        assert_eq!(s.pick(&scored, &mut rng), 0, "only commit moves the rotation");
    }
}
