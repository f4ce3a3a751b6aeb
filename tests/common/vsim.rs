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

use dispatcher::core::central::{CentralBucket, call_or_create};
use dispatcher::core::{
    Accounting, Completion, ModelLimits, ModelSpec, Outcome, OverloadSettings, RegionSpec, Released,
    Reservation, Router, RouterSpec, Scheduler, Settlement, SharingSettings, SharingTotals, StrategyKind,
    StrategyParams, Submission, SubmitError, Submitted, Weights,
};
use dispatcher::sim::{Admission, Provider};

use super::Lcg;
// The simulations reach the traffic through this module; not every test
// target that includes `common` uses all of it.
#[allow(unused_imports)]
pub use super::vsim_traffic::{Arrival, Fate, Run, heavy_size, jain, percentile, poisson};

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
    /// After a latency proportional to the tokens, carrying the hint the
    /// provider computed when it admitted the request, as region-sim does.
    ProportionalHintAtAdmission,
    Delayed {
        min: Duration,
        max: Duration,
    },
}

/// How the dispatcher is deployed in front of the providers, and how they
/// start.
#[derive(Debug, Clone)]
pub struct Deployment {
    /// Processes, each with its own scheduler; arrivals go to one at random.
    pub replicas: usize,
    /// `[cluster]`: each region's quota shared through a central bucket
    /// (`core::central`, what Redis runs), every replica calling it once a
    /// tick at its own phase, the tick jittered as `cluster::sync` does.
    /// `None`: each process alone (one process is the quick start).
    pub sharing: Option<SharingSettings>,
    /// `routing.overload` (`None`: the plain queue).
    pub overload: Option<OverloadSettings>,
    /// Requests a minute of each region, in `World::regions` order (`None`:
    /// no request limit that matters).
    pub requests_per_minute: Option<Vec<u64>>,
    /// The providers start with an empty bucket (a new key, or one somebody
    /// just spent), not a full one.
    pub providers_start_empty: bool,
    /// Picks each arrival's replica and jitters the ticks.
    pub seed: u64,
    /// `Some(n)`: each entry of `World::regions` is a region-model of its
    /// own, a model named as the entry that only it serves, `n` of them to
    /// a region (so a request, which asks for one of them, is routed among
    /// the regions, not among every region-model), and each arrival asks
    /// for its `region_model`'s. `None`: each entry is a region, and every
    /// region serves the one model `m`.
    pub models_per_region: Option<usize>,
    /// Each provider's burst, as this much of its refill (`None`: a
    /// minute's, the default).
    pub burst: Option<Duration>,
    /// `Some(p)`: a replica's queue is pumped (released, its next wake
    /// computed) at most once per `p`, as the edge's pump, busy with one
    /// release, takes the notifications that came meanwhile in its next;
    /// an arrival's own reservation is still made at once. `None`: after
    /// every event.
    pub pump_every: Option<Duration>,
}

impl Deployment {
    /// One process without `[cluster]`, providers full at the start.
    pub fn one_process(overload: Option<OverloadSettings>) -> Self {
        Self {
            replicas: 1,
            sharing: None,
            overload,
            requests_per_minute: None,
            providers_start_empty: false,
            seed: 1,
            models_per_region: None,
            burst: None,
            pump_every: None,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Event {
    Arrive(usize),
    Complete(usize),
    /// A replica's pump wakes.
    Wake(usize),
    /// A replica's sync task calls the central buckets.
    Sync(usize),
    /// The providers' unused level is sampled.
    Sample,
}

struct Flight {
    reservation: Reservation,
    region: usize,
    replica: usize,
    admission: Admission,
    completion: u64,
    /// The hint the provider gave at admission (`Replies::Delayed`).
    hint: Option<dispatcher::core::ProviderHint>,
}

impl World {
    /// Issue 25's world over `regions`: strict providers that charge at
    /// admission, one tenant, the default 5 s queue, replies after a second
    /// per 1,000 tokens carrying the hint of their admission (as region-sim).
    pub fn charged_at_admission(regions: Vec<(&'static str, u64)>) -> Self {
        Self {
            regions,
            accounting: Accounting::Admission,
            tenants: vec![("t", 1.0)],
            max_wait: Duration::from_secs(5),
            ms_per_1k: 1_000.0,
            replies: Replies::ProportionalHintAtAdmission,
            foreign_share: 0.0,
        }
    }

    fn limits(&self, tpm: u64, rpm: u64, burst: Option<Duration>) -> ModelLimits {
        let of = |per_minute: u64| burst.map(|b| (per_minute as f64 * b.as_secs_f64() / 60.0).ceil() as u64);
        ModelLimits {
            tokens_per_minute: tpm,
            requests_per_minute: rpm,
            burst_tokens: of(tpm),
            burst_requests: of(rpm),
            accounting: self.accounting,
        }
    }

    fn latency(&self, tokens: u64) -> Duration {
        Duration::from_secs_f64(self.ms_per_1k * tokens as f64 / 1_000_000.0)
    }

    /// With the default overload control (`routing.overload`), as deployed.
    pub fn run(&self, arrivals: Vec<Arrival>) -> Run {
        self.run_with(arrivals, Some(OverloadSettings::default()))
    }

    /// `run` with other overload settings (`None`: off, the plain queue).
    pub fn run_with(&self, arrivals: Vec<Arrival>, overload: Option<OverloadSettings>) -> Run {
        self.run_deployed(arrivals, &Deployment::one_process(overload))
    }

    /// The arrivals through `d`: one process, or replicas (sharing the
    /// quota or not).
    pub fn run_deployed(&self, mut arrivals: Vec<Arrival>, d: &Deployment) -> Run {
        arrivals.sort_by_key(|a| a.at);
        let t0 = Instant::now();
        let at = |d: Duration| t0 + d;
        let rpm = |i: usize| d.requests_per_minute.as_ref().map_or(10_000_000, |r| r[i]);
        // Where each entry of `self.regions` runs: (region, model).
        let placed: Vec<(Arc<str>, Arc<str>)> = self
            .regions
            .iter()
            .enumerate()
            .map(|(i, (name, _))| match d.models_per_region {
                Some(n) => (Arc::from(format!("region-{:02}", i / n.max(1))), Arc::from(*name)),
                None => (Arc::from(*name), Arc::from("m")),
            })
            .collect();
        let mut model_names: Vec<Arc<str>> = placed.iter().map(|(_, m)| m.clone()).collect();
        model_names.sort();
        model_names.dedup();
        let mut region_specs: Vec<RegionSpec> = Vec::new();
        for (i, (region, model)) in placed.iter().enumerate() {
            let limits = self.limits(self.regions[i].1, rpm(i), d.burst);
            match region_specs.last_mut() {
                Some(last) if *last.name == **region => last.models.push((model.to_string(), limits)),
                _ => region_specs.push(RegionSpec {
                    name: region.to_string(),
                    weight: 1.0,
                    max_concurrent: 100_000,
                    models: vec![(model.to_string(), limits)],
                }),
            }
        }
        let spec = RouterSpec {
            models: model_names
                .iter()
                .map(|name| ModelSpec {
                    name: name.to_string(),
                    default_max_output_tokens: 256,
                    chars_per_token: 4.0,
                    max_request_tokens: 1_000_000,
                })
                .collect(),
            regions: region_specs,
            strategy: StrategyKind::WeightedLoad,
            params: StrategyParams::default(),
            seed: 1,
            breaker: dispatcher::core::BreakerConfig::default(),
            sharing: d.sharing,
        };
        let weights = Arc::new(Weights {
            by_tenant: self.tenants.iter().map(|(n, w)| (Arc::from(*n), *w)).collect(),
            default: 1.0,
        });
        let replicas = d.replicas.max(1);
        let mut scheds: Vec<Scheduler<usize>> = (0..replicas)
            .map(|_| {
                let mut s = Scheduler::fair(
                    Router::try_new(spec.clone(), t0).unwrap(),
                    10_000_000,
                    weights.clone(),
                );
                s.set_overload(d.overload);
                s
            })
            .collect();
        let names: Vec<String> = (0..replicas).map(|r| format!("replica-{r}")).collect();
        let mut central: Vec<Option<CentralBucket>> = vec![None; self.regions.len()];
        let mut providers: Vec<Provider> = self
            .regions
            .iter()
            .enumerate()
            .map(|(i, (_, tpm))| {
                let foreign = (*tpm as f64 * self.foreign_share) as u64;
                let limits = self.limits(*tpm, rpm(i), d.burst);
                let mut p = Provider::new(&[(placed[i].1.to_string(), limits)], foreign, t0);
                if d.providers_start_empty {
                    p.empty(t0);
                }
                p
            })
            .collect();
        let region_index: HashMap<(&str, &str), usize> = placed
            .iter()
            .enumerate()
            .map(|(i, (region, model))| ((&**region, &**model), i))
            .collect();
        let tenant_names: Vec<Arc<str>> = self.tenants.iter().map(|(n, _)| Arc::from(*n)).collect();

        let mut events: BinaryHeap<Reverse<(Duration, u64, Event)>> = BinaryHeap::new();
        let mut seq = 0u64;
        let mut push = |events: &mut BinaryHeap<_>, when: Duration, e: Event| {
            seq += 1;
            events.push(Reverse((when, seq, e)));
        };
        let mut pick = Lcg(d.seed.wrapping_mul(7919).wrapping_add(17));
        let mut fates = vec![Fate::default(); arrivals.len()];
        for (i, a) in arrivals.iter().enumerate() {
            fates[i].replica = if replicas > 1 {
                (pick.next_u64() % replicas as u64) as usize
            } else {
                0
            };
            push(&mut events, a.at, Event::Arrive(i));
        }
        // Ticks and samples stop once the last arrival could have been served.
        let last = arrivals.last().map_or(Duration::ZERO, |a| a.at) + self.max_wait + Duration::from_secs(10);
        let tick = d.sharing.map(|s| s.tick);
        if let Some(tick) = tick {
            for r in 0..replicas {
                // Each sync task started at its own moment.
                push(&mut events, tick.mul_f64(pick.unit()), Event::Sync(r));
            }
        }
        push(&mut events, Duration::from_secs(1), Event::Sample);
        let mut flights: HashMap<usize, Flight> = HashMap::new();
        let mut overruns = 0;
        let mut overrun_times = Vec::new();
        let mut refusals: BTreeMap<&'static str, u64> = BTreeMap::new();
        let mut completions = Lcg(99);
        let mut scheduled_wake: Vec<Option<Duration>> = vec![None; replicas];
        let mut unused_level = Vec::new();
        let mut admitted: Vec<Vec<(Duration, u64)>> = vec![Vec::new(); self.regions.len()];
        let mut now = Duration::ZERO;
        let mut end = Duration::ZERO;
        let mut redis_calls = 0;
        let mut redis_bytes_sent = 0;
        let mut redis_bytes_received = 0;
        let redis_until = arrivals.last().map_or(Duration::ZERO, |a| a.at);
        // What the replicas are called in Redis and draw as their process's
        // run, as the sync task does (`cluster::sync`): for the bytes only,
        // the simulated buckets know them as `names`.
        let wire_names: Vec<String> = (0..replicas).map(super::central_wire::replica_id).collect();
        let mut draw = Lcg(d.seed.wrapping_add(4_242));
        let incarnations: Vec<u32> = (0..replicas).map(|_| (draw.next_u64() >> 32) as u32).collect();

        while let Some(Reverse((when, _, event))) = events.pop() {
            now = when;
            if matches!(event, Event::Arrive(_) | Event::Complete(_) | Event::Wake(_)) {
                // The run ends with the last request's fate, not the ticks
                // and samples that go on a little longer.
                end = now;
            }
            let mut granted: Vec<(usize, usize, Reservation)> = Vec::new();
            // The replica the event concerns: only its scheduler changed, so
            // only it is pumped (the others' wakes are scheduled).
            let pumped = match event {
                Event::Arrive(i) => {
                    let a = &arrivals[i];
                    let r = fates[i].replica;
                    let sub = Submission {
                        model: placed[if d.models_per_region.is_some() {
                            a.region_model
                        } else {
                            0
                        }]
                        .1
                        .clone(),
                        tokens: a.tokens(),
                        origin: None,
                        tenant: tenant_names[a.tenant].clone(),
                        tried: Vec::new(),
                        wait_until: at(now + self.max_wait),
                        tenant_max_queued: usize::MAX,
                    };
                    match scheds[r].submit(sub, at(now), || i) {
                        Ok(Submitted::Reserved(res)) => granted.push((r, i, res)),
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
                    r
                }
                Event::Complete(i) => {
                    let f = flights.remove(&i).unwrap();
                    fates[i].done = Some(now);
                    let a = &arrivals[i];
                    let p = &mut providers[f.region];
                    p.complete(f.admission, a.prompt, f.completion, at(now));
                    let hint = match self.replies {
                        Replies::Proportional => p.hint(&placed[f.region].1, at(now)),
                        Replies::ProportionalHintAtAdmission | Replies::Delayed { .. } => f.hint,
                    };
                    scheds[f.replica].router_mut().settle(
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
                    f.replica
                }
                // Only the latest wake counts; older ones are stale but harmless.
                Event::Wake(r) => {
                    if scheduled_wake[r] == Some(now) {
                        scheduled_wake[r] = None;
                    }
                    r
                }
                Event::Sync(r) => {
                    let calls = scheds[r].sync_calls(at(now));
                    let counted = now < redis_until;
                    let done = calls
                        .into_iter()
                        .map(|mut item| {
                            item.call.incarnation = incarnations[r];
                            let region = region_index[&(&*item.region, &*item.model)];
                            let grant = call_or_create(
                                &mut central[region],
                                &names[r],
                                &item.limits,
                                &item.call,
                                now.as_micros() as u64,
                            );
                            if counted {
                                redis_calls += 1;
                                redis_bytes_sent +=
                                    super::central_wire::call_bytes(&wire_names[r], &item, None);
                                redis_bytes_received += super::central_wire::answer_bytes(&grant);
                            }
                            (item, Some(grant))
                        })
                        .collect();
                    scheds[r].router_mut().sync_done(done, at(now), at(now));
                    if let Some(tick) = tick
                        && now < last
                    {
                        push(
                            &mut events,
                            now + tick.mul_f64(0.9 + 0.2 * pick.unit()),
                            Event::Sync(r),
                        );
                    }
                    r
                }
                Event::Sample => {
                    let level: i64 = providers
                        .iter_mut()
                        .map(|p| p.counters(at(now))[0].2.max(0))
                        .sum();
                    unused_level.push(level);
                    if now < last {
                        push(&mut events, now + Duration::from_secs(1), Event::Sample);
                    }
                    // A look changes nothing: no pump runs for it.
                    continue;
                }
            };
            // With `pump_every`, only a wake pumps; other events schedule one.
            let deferred = d.pump_every.filter(|_| !matches!(event, Event::Wake(_)));
            if let Some(every) = deferred {
                let when = now + every;
                if scheduled_wake[pumped].is_none_or(|s| when < s) {
                    scheduled_wake[pumped] = Some(when);
                    push(&mut events, when, Event::Wake(pumped));
                }
            }
            let released = if deferred.is_none() {
                scheds[pumped].release(at(now), |_| false)
            } else {
                Vec::new()
            };
            for released in released {
                match released {
                    Released::Granted(w, res) => granted.push((pumped, w.ticket, res)),
                    Released::Expired(w, _) | Released::Failed(w, _) | Released::Gone(w) => {
                        fates[w.ticket].why_not = Some("expired while waiting");
                        *refusals.entry("expired while waiting").or_default() += 1;
                    }
                }
            }
            for (r, i, res) in granted {
                let region = region_index[&(&*res.region, &*res.model)];
                let a = &arrivals[i];
                match providers[region].admit(&placed[region].1, a.prompt, a.max_output, at(now)) {
                    Ok(admission) => {
                        admitted[region].push((now, a.tokens()));
                        let completion =
                            ((a.max_output as f64) * (0.2 + 0.8 * completions.unit())).ceil() as u64;
                        let (delay, hint) = match self.replies {
                            Replies::Proportional => (self.latency(a.prompt + completion), None),
                            Replies::ProportionalHintAtAdmission => (
                                self.latency(a.prompt + completion),
                                providers[region].hint(&placed[region].1, at(now)),
                            ),
                            Replies::Delayed { min, max } => (
                                min + (max - min).mul_f64(completions.unit()),
                                providers[region].hint(&placed[region].1, at(now)),
                            ),
                        };
                        push(&mut events, now + delay, Event::Complete(i));
                        fates[i].granted = Some(now);
                        flights.insert(
                            i,
                            Flight {
                                reservation: res,
                                region,
                                replica: r,
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
                        scheds[r].router_mut().settle(
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
            if let Some(wake) = scheds[pumped].next_wake().filter(|_| deferred.is_none()) {
                let wake = wake.duration_since(t0).max(now);
                if scheduled_wake[pumped].is_none_or(|s| wake < s) {
                    scheduled_wake[pumped] = Some(wake);
                    push(&mut events, wake, Event::Wake(pumped));
                }
            }
        }

        let used: u64 = providers
            .iter_mut()
            .map(|p| p.counters(at(now))[0].1.charged_tokens)
            .sum();
        let capacity = if d.providers_start_empty {
            self.capacity(end) - self.regions.iter().map(|(_, tpm)| tpm).sum::<u64>()
        } else {
            self.capacity(end)
        };
        let sharing = if d.sharing.is_some() {
            scheds
                .iter()
                .map(|s| {
                    let mut sum = SharingTotals::default();
                    for region in s.router().regions() {
                        if let Some(t) = region
                            .quota(0)
                            .and_then(|q| q.shared())
                            .map(|q| q.view(at(now)).totals)
                        {
                            sum.granted_tokens += t.granted_tokens;
                            sum.spent_tokens += t.spent_tokens;
                            sum.returned_tokens += t.returned_tokens;
                            sum.expired_tokens += t.expired_tokens;
                            sum.calls += t.calls;
                            sum.failed_calls += t.failed_calls;
                        }
                    }
                    sum
                })
                .collect()
        } else {
            Vec::new()
        };
        Run {
            arrivals,
            fates,
            overruns,
            overrun_times,
            used,
            capacity,
            end,
            refusals,
            sharing,
            unused_level,
            admitted,
            redis_calls,
            redis_bytes_sent,
            redis_bytes_received,
            redis_until,
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
