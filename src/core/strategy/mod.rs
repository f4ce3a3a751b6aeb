//! Routing strategies: small synchronous types behind one trait, picked by
//! `routing.strategy`. A strategy scores each eligible region from a snapshot
//! (higher is better) and says which one to take; the score and its factors are
//! plain data that `Route` shows to operators.

mod balance;
mod rotation;
mod weighted_load;

use std::fmt;
use std::str::FromStr;

use rand::RngCore;

pub use balance::{LeastOutstanding, Performance, PowerOfTwo, Predictive};
pub use rotation::{RoundRobin, WeightedRoundRobin};
pub use weighted_load::{NEAR_EQUAL, WeightedLoad, WeightedLoadParams};

/// What a strategy sees of one eligible region for one request.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct CandidateView<'a> {
    pub name: &'a str,
    /// Position among all configured regions (name order), stable between decisions.
    pub index: usize,
    /// How many regions are configured.
    pub regions: usize,
    /// Effective weight (configured, or an operator's override).
    pub weight: f64,
    /// Quota left after this request, as a fraction of the bucket, in [0, 1].
    pub headroom: f64,
    /// `max(in_flight / capacity, reported utilisation)`, in [0, 1].
    pub utilization: f64,
    pub in_flight: u32,
    pub capacity: u32,
    /// Work the cluster says it has queued.
    pub queued: u32,
    /// Smoothed ms per 1,000 tokens; `None` before the first reply.
    pub latency_per_1k_ms: Option<f64>,
    pub error_rate: f64,
    /// The request came from this region.
    pub is_origin: bool,
    /// Tokens this request reserves.
    pub request_tokens: u64,
}

/// At most this many named factors per score; kept inline so scoring a
/// candidate does not allocate.
pub const MAX_FACTORS: usize = 10;

/// The inputs of a score, by name.
#[derive(Clone, Copy, PartialEq)]
pub struct Factors {
    items: [(&'static str, f64); MAX_FACTORS],
    len: usize,
}

impl Factors {
    pub fn new() -> Self {
        Self {
            items: [("", 0.0); MAX_FACTORS],
            len: 0,
        }
    }

    /// Adds a factor; past `MAX_FACTORS` the extra ones are dropped (a
    /// programming error caught by the strategies' tests).
    pub fn with(mut self, name: &'static str, value: f64) -> Self {
        debug_assert!(self.len < MAX_FACTORS, "too many factors");
        if self.len < MAX_FACTORS {
            self.items[self.len] = (name, value);
            self.len += 1;
        }
        self
    }

    pub fn iter(&self) -> impl Iterator<Item = (&'static str, f64)> + '_ {
        self.items[..self.len].iter().copied()
    }

    pub fn get(&self, name: &str) -> Option<f64> {
        self.iter().find(|(n, _)| *n == name).map(|(_, v)| v)
    }
}

impl Default for Factors {
    fn default() -> Self {
        Self::new()
    }
}

impl fmt::Debug for Factors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_map().entries(self.iter()).finish()
    }
}

/// A candidate's score: higher is better.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Score {
    pub value: f64,
    pub factors: Factors,
}

impl Score {
    pub fn new(value: f64, factors: Factors) -> Self {
        // A NaN would make every comparison false and the pick arbitrary.
        let value = if value.is_nan() { 0.0 } else { value };
        Self { value, factors }
    }
}

/// An eligible candidate once scored: all `pick` and `commit` need, small
/// enough to keep the decision path free of allocation and copies.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Scored {
    /// Position among all configured regions (name order).
    pub index: usize,
    pub weight: f64,
    pub value: f64,
    /// How many regions are configured.
    pub regions: usize,
    /// Our requests in flight there (`weighted_load` breaks near-ties on it).
    pub in_flight: u32,
}

/// One routing strategy.
pub trait Strategy: Send + Sync + fmt::Debug {
    fn kind(&self) -> StrategyKind;

    /// Scores one eligible candidate, with the factors `Route` shows. Pure.
    fn score(&self, candidate: &CandidateView<'_>) -> Score;

    /// The score alone, for the decision path (no factor table to fill).
    /// Must equal `score(candidate).value`.
    fn value(&self, candidate: &CandidateView<'_>) -> f64 {
        self.score(candidate).value
    }

    /// An upper bound on `value` for a candidate with this weight and
    /// headroom (from the origin or not), known before the rest of its view
    /// is worked out. With `floor`, it lets the decision path skip scoring a
    /// region that could not be picked whatever its load and averages. Must
    /// never be below `value` (in floating point too). The default: no bound.
    fn bound(&self, weight: f64, headroom: f64, is_origin: bool) -> f64 {
        let _ = (weight, headroom, is_origin);
        f64::INFINITY
    }

    /// The lowest value `pick` can still choose when the best value is
    /// `best`; monotone in `best`. The default: any value can be chosen.
    fn floor(&self, best: f64) -> f64 {
        let _ = best;
        f64::NEG_INFINITY
    }

    /// Picks one of `scored` (eligible candidates in name order, never empty).
    /// The default takes the highest score; ties go to the first name.
    fn pick(&self, scored: &[Scored], rng: &mut dyn RngCore) -> usize {
        let _ = rng;
        best_index(scored.iter().map(|s| s.value))
    }

    /// Called once the pick has been reserved, for strategies with a memory
    /// (round robin's turn). A dry run never calls it.
    /// `chosen` indexes `scored`, as returned by `pick`.
    fn commit(&mut self, chosen: usize, scored: &[Scored]) {
        let _ = (chosen, scored);
    }
}

/// Index of the highest value; the first one on ties.
pub fn best_index(values: impl Iterator<Item = f64>) -> usize {
    let mut best = (0, f64::NEG_INFINITY);
    for (i, v) in values.enumerate() {
        if v > best.1 {
            best = (i, v);
        }
    }
    best.0
}

/// The strategies `routing.strategy` can name.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum StrategyKind {
    RoundRobin,
    WeightedRoundRobin,
    LeastOutstanding,
    PowerOfTwo,
    Performance,
    #[default]
    WeightedLoad,
    Predictive,
}

impl StrategyKind {
    pub const ALL: [StrategyKind; 7] = [
        StrategyKind::RoundRobin,
        StrategyKind::WeightedRoundRobin,
        StrategyKind::LeastOutstanding,
        StrategyKind::PowerOfTwo,
        StrategyKind::Performance,
        StrategyKind::WeightedLoad,
        StrategyKind::Predictive,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            StrategyKind::RoundRobin => "round_robin",
            StrategyKind::WeightedRoundRobin => "weighted_round_robin",
            StrategyKind::LeastOutstanding => "least_outstanding",
            StrategyKind::PowerOfTwo => "power_of_two",
            StrategyKind::Performance => "performance",
            StrategyKind::WeightedLoad => "weighted_load",
            StrategyKind::Predictive => "predictive",
        }
    }
}

impl fmt::Display for StrategyKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for StrategyKind {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::ALL.into_iter().find(|k| k.as_str() == s).ok_or_else(|| {
            let names: Vec<_> = Self::ALL.iter().map(|k| k.as_str()).collect();
            format!("unknown strategy {s:?}; expected one of {}", names.join(", "))
        })
    }
}

/// Tunables shared by the strategies that look at latency and errors.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct StrategyParams {
    pub weighted_load: WeightedLoadParams,
    /// How fast a region's error rate and latency averages relax toward a
    /// new region's (zero) while it is idle (nothing of ours in flight
    /// there): they halve every `load_half_life` (`routing.load_half_life`,
    /// 5 s by default). From the worst (every request failed, latency at the
    /// failure penalty) an idle region's `weighted_load` score is within
    /// 10 % of an equally fast healthy peer's after six half-lives (30 s by
    /// default); see `core::recovery_tests`.
    pub load_half_life: std::time::Duration,
}

impl Default for StrategyParams {
    fn default() -> Self {
        Self {
            weighted_load: WeightedLoadParams::default(),
            load_half_life: super::load::DEFAULT_HALF_LIFE,
        }
    }
}

/// The strategy a config names, as a closed set: calls on it are a match
/// the branch predictor learns, not a call through a vtable, so the
/// decision path's per-region `bound`, `value` and `floor` inline.
#[derive(Debug, Clone)]
pub enum Configured {
    RoundRobin(RoundRobin),
    WeightedRoundRobin(WeightedRoundRobin),
    LeastOutstanding(LeastOutstanding),
    PowerOfTwo(PowerOfTwo),
    Performance(Performance),
    WeightedLoad(WeightedLoad),
    Predictive(Predictive),
}

/// Calls `$call` on whichever strategy `$self` holds.
macro_rules! each {
    ($self:expr, $s:ident => $call:expr) => {
        match $self {
            Configured::RoundRobin($s) => $call,
            Configured::WeightedRoundRobin($s) => $call,
            Configured::LeastOutstanding($s) => $call,
            Configured::PowerOfTwo($s) => $call,
            Configured::Performance($s) => $call,
            Configured::WeightedLoad($s) => $call,
            Configured::Predictive($s) => $call,
        }
    };
}

impl Strategy for Configured {
    fn kind(&self) -> StrategyKind {
        each!(self, s => s.kind())
    }

    fn score(&self, candidate: &CandidateView<'_>) -> Score {
        each!(self, s => s.score(candidate))
    }

    #[inline]
    fn value(&self, candidate: &CandidateView<'_>) -> f64 {
        each!(self, s => s.value(candidate))
    }

    #[inline]
    fn bound(&self, weight: f64, headroom: f64, is_origin: bool) -> f64 {
        each!(self, s => s.bound(weight, headroom, is_origin))
    }

    #[inline]
    fn floor(&self, best: f64) -> f64 {
        each!(self, s => s.floor(best))
    }

    fn pick(&self, scored: &[Scored], rng: &mut dyn RngCore) -> usize {
        each!(self, s => s.pick(scored, rng))
    }

    fn commit(&mut self, chosen: usize, scored: &[Scored]) {
        each!(self, s => s.commit(chosen, scored))
    }
}

/// Builds the strategy a config names.
pub fn build(kind: StrategyKind, params: &StrategyParams) -> Configured {
    let p = params.weighted_load;
    match kind {
        StrategyKind::RoundRobin => Configured::RoundRobin(RoundRobin::default()),
        StrategyKind::WeightedRoundRobin => Configured::WeightedRoundRobin(WeightedRoundRobin::default()),
        StrategyKind::LeastOutstanding => Configured::LeastOutstanding(LeastOutstanding),
        StrategyKind::PowerOfTwo => Configured::PowerOfTwo(PowerOfTwo),
        StrategyKind::Performance => {
            Configured::Performance(Performance::new(p.latency_ref_ms, p.error_exponent))
        }
        StrategyKind::WeightedLoad => Configured::WeightedLoad(WeightedLoad::new(p)),
        StrategyKind::Predictive => Configured::Predictive(Predictive::new(p.latency_ref_ms)),
    }
}

#[cfg(test)]
pub(crate) mod test_support {
    use super::*;

    pub fn view(name: &'static str, index: usize) -> CandidateView<'static> {
        CandidateView {
            name,
            index,
            regions: 3,
            weight: 1.0,
            headroom: 1.0,
            utilization: 0.0,
            in_flight: 0,
            capacity: 100,
            queued: 0,
            latency_per_1k_ms: None,
            error_rate: 0.0,
            is_origin: false,
            request_tokens: 1000,
        }
    }

    /// Runs `n` committed picks over `views` and returns the chosen names.
    pub fn run(
        s: &mut dyn Strategy,
        views: &[CandidateView<'static>],
        n: usize,
        rng: &mut dyn RngCore,
    ) -> Vec<&'static str> {
        (0..n)
            .map(|_| {
                let scored: Vec<Scored> = views
                    .iter()
                    .map(|v| {
                        let value = s.value(v);
                        assert_eq!(value, s.score(v).value, "value() and score() agree");
                        Scored {
                            index: v.index,
                            weight: v.weight,
                            value,
                            regions: v.regions,
                            in_flight: v.in_flight,
                        }
                    })
                    .collect();
                let i = s.pick(&scored, rng);
                s.commit(i, &scored);
                views[i].name
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kinds_round_trip_through_their_names() {
        for k in StrategyKind::ALL {
            assert_eq!(k.as_str().parse::<StrategyKind>(), Ok(k));
            assert_eq!(build(k, &StrategyParams::default()).kind(), k);
        }
        let err = "fastest".parse::<StrategyKind>().unwrap_err();
        assert!(err.contains("weighted_load"), "{err}");
    }

    #[test]
    fn best_index_breaks_ties_on_the_first() {
        assert_eq!(best_index([1.0, 3.0, 3.0, 2.0].into_iter()), 1);
        assert_eq!(best_index([f64::NAN, 0.5].into_iter()), 1);
    }

    #[test]
    fn nan_scores_become_zero() {
        assert_eq!(Score::new(f64::NAN, Factors::new()).value, 0.0);
    }
}
