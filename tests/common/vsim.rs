//! A discrete-event simulation on a virtual clock around the real core (the
//! scheduler with its fair queue, the router, the buckets) and the
//! region-sim's provider limiter. Arrivals are given up front; the harness
//! submits them, dispatches what the scheduler grants to the simulated
//! providers, completes them after a latency proportional to their tokens,
//! and settles with the usage and the provider's hints, exactly as the edge
//! does, only with time passed in.

use std::cmp::Reverse;
use std::collections::{BTreeMap, BinaryHeap, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant};

use dispatcher::core::{
    Accounting, Completion, ModelLimits, ModelSpec, Outcome, RegionSpec, Released, Reservation, Router,
    RouterSpec, Scheduler, Settlement, StrategyKind, StrategyParams, Submission, SubmitError, Submitted,
    Weights,
};
use dispatcher::sim::{Admission, Provider};

use super::Lcg;

pub struct World {
    /// (region, tokens per minute)
    pub regions: Vec<(&'static str, u64)>,
    pub accounting: Accounting,
    /// (tenant, weight)
    pub tenants: Vec<(&'static str, f64)>,
    pub max_wait: Duration,
    pub ms_per_1k: f64,
    /// How replies come back. `Proportional`: after a latency proportional
    /// to the tokens, with the provider's hint as of the reply. `Delayed`:
    /// after a delay drawn uniformly from the range, carrying the hint the
    /// provider computed when it admitted the request (as a real provider's
    /// rate-limit headers do).
    pub replies: Replies,
    /// The part of each provider's limit another consumer, unseen by the
    /// dispatcher, takes as it refills (0: none).
    pub foreign_share: f64,
}

#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub enum Replies {
    #[default]
    Proportional,
    Delayed {
        min: Duration,
        max: Duration,
    },
}

#[derive(Debug, Clone)]
pub struct Arrival {
    pub at: Duration,
    pub tenant: usize,
    pub prompt: u64,
    pub max_output: u64,
}

impl Arrival {
    pub fn tokens(&self) -> u64 {
        self.prompt + self.max_output
    }
}

/// What became of one arrival.
#[derive(Debug, Clone, Default)]
pub struct Fate {
    /// When it was reserved and sent (None: refused or expired).
    pub granted: Option<Duration>,
    /// When its reply came back.
    pub done: Option<Duration>,
    pub why_not: Option<&'static str>,
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
        });
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Event {
    Arrive(usize),
    Complete(usize),
    Wake,
}

struct Flight {
    reservation: Reservation,
    region: usize,
    admission: Admission,
    completion: u64,
    /// The hint the provider gave at admission (`Replies::Delayed`).
    hint: Option<dispatcher::core::ProviderHint>,
}

impl World {
    fn limits(&self, tpm: u64) -> ModelLimits {
        ModelLimits {
            tokens_per_minute: tpm,
            requests_per_minute: 10_000_000,
            burst_tokens: None,
            burst_requests: None,
            accounting: self.accounting,
        }
    }

    fn latency(&self, tokens: u64) -> Duration {
        Duration::from_secs_f64(self.ms_per_1k * tokens as f64 / 1_000_000.0)
    }

    /// With the default overload control (`routing.overload`), as deployed.
    pub fn run(&self, arrivals: Vec<Arrival>) -> Run {
        self.run_with(arrivals, Some(dispatcher::core::OverloadSettings::default()))
    }

    /// `run` with other overload settings (`None`: off, the plain queue).
    pub fn run_with(
        &self,
        mut arrivals: Vec<Arrival>,
        overload: Option<dispatcher::core::OverloadSettings>,
    ) -> Run {
        arrivals.sort_by_key(|a| a.at);
        let t0 = Instant::now();
        let at = |d: Duration| t0 + d;
        let spec = RouterSpec {
            models: vec![ModelSpec {
                name: "m".into(),
                default_max_output_tokens: 256,
                chars_per_token: 4.0,
                max_request_tokens: 1_000_000,
            }],
            regions: self
                .regions
                .iter()
                .map(|(name, tpm)| RegionSpec {
                    name: name.to_string(),
                    weight: 1.0,
                    max_concurrent: 100_000,
                    models: vec![("m".into(), self.limits(*tpm))],
                })
                .collect(),
            strategy: StrategyKind::WeightedLoad,
            params: StrategyParams::default(),
            seed: 1,
            breaker: dispatcher::core::BreakerConfig::default(),
            sharing: None,
        };
        let weights = Arc::new(Weights {
            by_tenant: self.tenants.iter().map(|(n, w)| (Arc::from(*n), *w)).collect(),
            default: 1.0,
        });
        let mut sched: Scheduler<usize> =
            Scheduler::fair(Router::try_new(spec, t0).unwrap(), 10_000_000, weights);
        sched.set_overload(overload);
        let mut providers: Vec<Provider> = self
            .regions
            .iter()
            .map(|(_, tpm)| {
                let foreign = (*tpm as f64 * self.foreign_share) as u64;
                Provider::new(&[("m".to_string(), self.limits(*tpm))], foreign, t0)
            })
            .collect();
        let region_index: HashMap<&str, usize> = self
            .regions
            .iter()
            .enumerate()
            .map(|(i, (n, _))| (*n, i))
            .collect();
        let tenant_names: Vec<Arc<str>> = self.tenants.iter().map(|(n, _)| Arc::from(*n)).collect();

        let mut events: BinaryHeap<Reverse<(Duration, u64, Event)>> = BinaryHeap::new();
        let mut seq = 0u64;
        let mut push = |events: &mut BinaryHeap<_>, when: Duration, e: Event| {
            seq += 1;
            events.push(Reverse((when, seq, e)));
        };
        for (i, a) in arrivals.iter().enumerate() {
            push(&mut events, a.at, Event::Arrive(i));
        }
        let mut fates = vec![Fate::default(); arrivals.len()];
        let mut flights: HashMap<usize, Flight> = HashMap::new();
        let mut overruns = 0;
        let mut overrun_times = Vec::new();
        let mut refusals: BTreeMap<&'static str, u64> = BTreeMap::new();
        let mut completions = Lcg(99);
        let mut scheduled_wake: Option<Duration> = None;
        let mut now = Duration::ZERO;
        let model: Arc<str> = Arc::from("m");

        while let Some(Reverse((when, _, event))) = events.pop() {
            now = when;
            let mut granted: Vec<(usize, Reservation)> = Vec::new();
            match event {
                Event::Arrive(i) => {
                    let a = &arrivals[i];
                    let sub = Submission {
                        model: model.clone(),
                        tokens: a.tokens(),
                        origin: None,
                        tenant: tenant_names[a.tenant].clone(),
                        tried: Vec::new(),
                        wait_until: at(now + self.max_wait),
                        tenant_max_queued: usize::MAX,
                    };
                    match sched.submit(sub, at(now), || i) {
                        Ok(Submitted::Reserved(res)) => granted.push((i, res)),
                        Ok(Submitted::Queued { .. }) => {}
                        Err(e) => {
                            let why = match e {
                                SubmitError::WouldExpire { .. } => "refused at once: would wait in vain",
                                SubmitError::Shedding { .. } => "refused at once: shedding",
                                SubmitError::QueueFull { .. } | SubmitError::TenantQueueFull { .. } => {
                                    "refused at once: queue full"
                                }
                                SubmitError::Route(_) => "refused at once: no region",
                            };
                            fates[i].why_not = Some(why);
                            *refusals.entry(why).or_default() += 1;
                        }
                    }
                }
                Event::Complete(i) => {
                    let f = flights.remove(&i).unwrap();
                    fates[i].done = Some(now);
                    let a = &arrivals[i];
                    let p = &mut providers[f.region];
                    p.complete(f.admission, a.prompt, f.completion, at(now));
                    let hint = match self.replies {
                        Replies::Proportional => p.hint("m", at(now)),
                        Replies::Delayed { .. } => f.hint,
                    };
                    sched.router_mut().settle(
                        &f.reservation,
                        Completion {
                            settlement: Settlement::Used {
                                prompt: a.prompt,
                                completion: f.completion,
                            },
                            outcome: Some(Outcome::Success),
                            latency: self.latency(a.prompt + f.completion),
                            hint,
                            load: None,
                            provider_refused: None,
                        },
                        at(now),
                    );
                }
                // Only the latest wake counts; older ones are stale but harmless.
                Event::Wake if scheduled_wake == Some(now) => scheduled_wake = None,
                Event::Wake => {}
            }
            for released in sched.release(at(now), |_| false) {
                match released {
                    Released::Granted(w, res) => granted.push((w.ticket, res)),
                    Released::Expired(w, _) | Released::Failed(w, _) | Released::Gone(w) => {
                        fates[w.ticket].why_not = Some("expired while waiting");
                        *refusals.entry("expired while waiting").or_default() += 1;
                    }
                }
            }
            for (i, res) in granted {
                let region = region_index[&*res.region];
                let a = &arrivals[i];
                match providers[region].admit("m", a.prompt, a.max_output, at(now)) {
                    Ok(admission) => {
                        let completion =
                            ((a.max_output as f64) * (0.2 + 0.8 * completions.unit())).ceil() as u64;
                        let (delay, hint) = match self.replies {
                            Replies::Proportional => (self.latency(a.prompt + completion), None),
                            Replies::Delayed { min, max } => (
                                min + (max - min).mul_f64(completions.unit()),
                                providers[region].hint("m", at(now)),
                            ),
                        };
                        push(&mut events, now + delay, Event::Complete(i));
                        fates[i].granted = Some(now);
                        flights.insert(
                            i,
                            Flight {
                                reservation: res,
                                region,
                                admission,
                                completion,
                                hint,
                            },
                        );
                    }
                    Err(refusal) => {
                        overruns += 1;
                        overrun_times.push(now);
                        fates[i].why_not = Some("provider refused");
                        sched.router_mut().settle(
                            &res,
                            Completion {
                                provider_refused: Some(refusal.retry_after.min(Duration::from_secs(60))),
                                ..Completion::abandoned()
                            },
                            at(now),
                        );
                    }
                }
            }
            if let Some(wake) = sched.next_wake() {
                let wake = wake.duration_since(t0).max(now);
                if scheduled_wake.is_none_or(|s| wake < s) {
                    scheduled_wake = Some(wake);
                    push(&mut events, wake, Event::Wake);
                }
            }
        }

        let used: u64 = providers
            .iter_mut()
            .map(|p| p.counters(at(now))[0].1.charged_tokens)
            .sum();
        let capacity = self.capacity(now);
        Run {
            arrivals,
            fates,
            overruns,
            overrun_times,
            used,
            capacity,
            end: now,
            refusals,
        }
    }

    /// The most the providers could admit over `span`: a full bucket each
    /// (one minute's worth) plus the refill.
    pub fn capacity(&self, span: Duration) -> u64 {
        self.regions
            .iter()
            .map(|(_, tpm)| tpm + (*tpm as f64 * span.as_secs_f64() / 60.0) as u64)
            .sum()
    }

    /// Tokens a second the regions refill, all together.
    pub fn supply_per_sec(&self) -> f64 {
        self.regions.iter().map(|(_, q)| *q as f64 / 60.0).sum()
    }
}
