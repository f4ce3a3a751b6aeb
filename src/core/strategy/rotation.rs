//! Strategies that take turns: plain and smooth weighted round robin.

use super::{CandidateView, Factors, Score, Scored, Strategy, StrategyKind};

/// Each region in turn, in name order, skipping the ones that cannot take the
/// request now.
#[derive(Debug, Default, Clone)]
pub struct RoundRobin {
    last: Option<usize>,
}

impl Strategy for RoundRobin {
    fn kind(&self) -> StrategyKind {
        StrategyKind::RoundRobin
    }

    /// The region right after the last one picked scores 1; each further
    /// step in the rotation scores 1/n less.
    fn score(&self, c: &CandidateView<'_>) -> Score {
        let n = c.regions.max(1);
        let next = self.last.map_or(0, |l| l + 1);
        let distance = (c.index + n - next % n) % n;
        Score::new(
            1.0 - distance as f64 / n as f64,
            Factors::new().with("turns_away", distance as f64),
        )
    }

    fn commit(&mut self, chosen: usize, scored: &[Scored]) {
        self.last = Some(scored[chosen].index);
    }
}

/// Smooth weighted round robin, as nginx does it: every pick adds each
/// eligible region's weight to its running credit, takes the region with the
/// most credit and charges it the total weight. Over a cycle each region gets
/// exactly its weight's share, interleaved rather than in runs.
#[derive(Debug, Default, Clone)]
pub struct WeightedRoundRobin {
    credit: Vec<f64>,
}

impl WeightedRoundRobin {
    fn credit(&self, index: usize) -> f64 {
        self.credit.get(index).copied().unwrap_or(0.0)
    }
}

impl Strategy for WeightedRoundRobin {
    fn kind(&self) -> StrategyKind {
        StrategyKind::WeightedRoundRobin
    }

    fn score(&self, c: &CandidateView<'_>) -> Score {
        let credit = self.credit(c.index);
        Score::new(
            credit + c.weight,
            Factors::new().with("weight", c.weight).with("credit", credit),
        )
    }

    fn commit(&mut self, chosen: usize, scored: &[Scored]) {
        let regions = scored.iter().map(|c| c.regions).max().unwrap_or(0);
        if self.credit.len() < regions {
            self.credit.resize(regions, 0.0);
        }
        let mut total = 0.0;
        for c in scored {
            self.credit[c.index] += c.weight;
            total += c.weight;
        }
        self.credit[scored[chosen].index] -= total;
    }
}

#[cfg(test)]
mod tests {
    use super::super::test_support::{run, view};
    use super::*;
    use rand::SeedableRng;
    use rand::rngs::SmallRng;

    #[test]
    fn round_robin_cycles_in_name_order() {
        let views = [view("a", 0), view("b", 1), view("c", 2)];
        let mut rng = SmallRng::seed_from_u64(1);
        let picks = run(&mut RoundRobin::default(), &views, 7, &mut rng);
        assert_eq!(picks, ["a", "b", "c", "a", "b", "c", "a"]);
    }

    #[test]
    fn round_robin_skips_regions_that_cannot_take_it() {
        let mut rr = RoundRobin::default();
        let mut rng = SmallRng::seed_from_u64(1);
        let all = [view("a", 0), view("b", 1), view("c", 2)];
        assert_eq!(run(&mut rr, &all, 1, &mut rng), ["a"]);
        // b is out (no quota): the turn passes to c, then back to a.
        let without_b = [view("a", 0), view("c", 2)];
        assert_eq!(run(&mut rr, &without_b, 3, &mut rng), ["c", "a", "c"]);
        assert_eq!(run(&mut rr, &all, 2, &mut rng), ["a", "b"]);
    }

    #[test]
    fn smooth_wrr_matches_weights_exactly_over_a_cycle_and_interleaves() {
        let mut views = [view("a", 0), view("b", 1), view("c", 2)];
        views[0].weight = 5.0;
        let mut rng = SmallRng::seed_from_u64(1);
        let mut wrr = WeightedRoundRobin::default();
        // nginx's documented sequence for weights 5, 1, 1.
        let cycle = run(&mut wrr, &views, 7, &mut rng);
        assert_eq!(cycle, ["a", "a", "b", "a", "c", "a", "a"]);
        // And every following cycle matches the weights exactly.
        for _ in 0..10 {
            let cycle = run(&mut wrr, &views, 7, &mut rng);
            let count = |n| cycle.iter().filter(|x| **x == n).count();
            assert_eq!((count("a"), count("b"), count("c")), (5, 1, 1));
        }
    }

    #[test]
    fn smooth_wrr_with_fractional_weights() {
        let mut views = [view("a", 0), view("b", 1)];
        views[0].weight = 0.75;
        views[1].weight = 0.25;
        let mut rng = SmallRng::seed_from_u64(1);
        let picks = run(&mut WeightedRoundRobin::default(), &views, 400, &mut rng);
        assert_eq!(picks.iter().filter(|x| **x == "a").count(), 300);
    }

    #[test]
    fn scoring_is_pure() {
        let wrr = WeightedRoundRobin::default();
        let v = view("a", 0);
        assert_eq!(wrr.score(&v), wrr.score(&v));
        let rr = RoundRobin::default();
        assert_eq!(rr.score(&v).value, 1.0);
    }
}
