//! The simulation's traffic (`vsim.rs`): arrivals, the generators the
//! simulations draw them from (Poisson, loadgen's heavy sizes), what became
//! of them in a run, and the figures the simulations print of it
//! (percentiles, Jain's index).

use std::collections::BTreeMap;
use std::time::Duration;

use dispatcher::core::SharingTotals;

use super::Lcg;

#[derive(Debug, Clone)]
pub struct Arrival {
    pub at: Duration,
    pub tenant: usize,
    pub prompt: u64,
    pub max_output: u64,
    /// With `Deployment::models_per_region`: the region-model it asks for
    /// (index into `World::regions`). Otherwise unused (0).
    pub region_model: usize,
}

impl Arrival {
    pub fn tokens(&self) -> u64 {
        self.prompt + self.max_output
    }
}

pub fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    sorted[((sorted.len() as f64 * p) as usize).min(sorted.len() - 1)]
}

/// Jain's fairness index of `x`: 1 when all equal, 1/n at worst.
pub fn jain(x: &[f64]) -> f64 {
    let sum: f64 = x.iter().sum();
    let squares: f64 = x.iter().map(|v| v * v).sum();
    sum * sum / (x.len() as f64 * squares)
}

/// Poisson arrivals of `tenant` at `rate` per second over [from, to), sizes
/// from `size`.
pub fn poisson(
    rng: &mut Lcg,
    tenant: usize,
    rate: impl Fn(f64) -> f64,
    from: Duration,
    to: Duration,
    mut size: impl FnMut(&mut Lcg) -> (u64, u64),
) -> Vec<Arrival> {
    let mut out = Vec::new();
    let mut t = from.as_secs_f64();
    loop {
        t += -(1.0 - rng.unit()).ln() / rate(t);
        if t >= to.as_secs_f64() {
            return out;
        }
        let (prompt, max_output) = size(rng);
        out.push(Arrival {
            at: Duration::from_secs_f64(t),
            tenant,
            prompt,
            max_output,
            region_model: 0,
        });
    }
}

/// loadgen's `--sizes heavy`: prompts Pareto-distributed from 100 tokens,
/// outputs from 50, up to 10,000 together.
pub fn heavy_size(rng: &mut Lcg) -> (u64, u64) {
    (
        rng.heavy_tail(100.0, 1.3, 8_000.0),
        rng.heavy_tail(50.0, 1.5, 2_000.0),
    )
}

/// What became of one arrival.
#[derive(Debug, Clone, Default)]
pub struct Fate {
    /// When it was reserved and sent (None: refused or expired).
    pub granted: Option<Duration>,
    /// When its reply came back.
    pub done: Option<Duration>,
    pub why_not: Option<&'static str>,
    /// The replica it arrived at.
    pub replica: usize,
}

pub struct Run {
    pub arrivals: Vec<Arrival>,
    pub fates: Vec<Fate>,
    pub overruns: u64,
    /// When each provider refusal happened.
    pub overrun_times: Vec<Duration>,
    /// Tokens the providers charged, and what they could have at most.
    pub used: u64,
    pub capacity: u64,
    pub end: Duration,
    pub refusals: BTreeMap<&'static str, u64>,
    /// Per replica, its sharing totals summed over the regions (`[cluster]`
    /// only; empty for one process without it).
    pub sharing: Vec<SharingTotals>,
    /// Every second: the tokens the providers had left, all regions together.
    pub unused_level: Vec<i64>,
    /// Per region: (when, tokens) of every admission by its provider.
    pub admitted: Vec<Vec<(Duration, u64)>>,
    /// `[cluster]`: the central calls the replicas made (one per shared
    /// (region, model) per replica tick), and the bytes they would send and
    /// receive through `RedisCentral` (`central_wire`), before `redis_until`.
    pub redis_calls: u64,
    pub redis_bytes_sent: u64,
    pub redis_bytes_received: u64,
    /// The end of the span the Redis figures count (the last arrival).
    pub redis_until: Duration,
}

impl Run {
    /// Tokens reserved for `tenant`'s granted requests within [from, to).
    pub fn granted_tokens(&self, tenant: usize, from: Duration, to: Duration) -> u64 {
        self.arrivals
            .iter()
            .zip(&self.fates)
            .filter(|(a, f)| a.tenant == tenant && f.granted.is_some_and(|g| g >= from && g < to))
            .map(|(a, _)| a.tokens())
            .sum()
    }

    /// Queue waits of `tenant`'s served requests, sorted.
    pub fn waits(&self, tenant: usize) -> Vec<Duration> {
        let mut w: Vec<Duration> = self
            .arrivals
            .iter()
            .zip(&self.fates)
            .filter(|(a, _)| a.tenant == tenant)
            .filter_map(|(a, f)| f.granted.map(|g| g - a.at))
            .collect();
        w.sort();
        w
    }
}
