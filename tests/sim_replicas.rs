//! Several replicas sharing one provider's quota through the central bucket
//! (`core::central`, what the Redis script does), simulated on a virtual
//! clock: skewed demand at twice the quota, refunds and extra charges,
//! Redis outages, restarts (empty) and a partitioned replica. The provider
//! is strict: it charges the reservation at admission, adjusts to the real
//! usage at the end, and refuses what does not fit its bucket.
//!
//! The bound: no request is refused by the provider, and in every window
//! the tokens the provider admitted (net of refunds) stay within its burst
//! plus its rate over the window. Shown to fail when chunks do not expire.
//! Issue 25's heavy-tailed three-region case is in `sim_replicas_heavy.rs`.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use dispatcher::core::SharedQuota;
use dispatcher::core::central::{CentralBucket, call_or_create};
use dispatcher::core::{
    Accounting, Completion, ModelLimits, ModelSpec, Outcome, RegionSpec, Reservation, RouteRequest, Router,
    RouterSpec, Settlement, SharingSettings, StrategyKind, StrategyParams, Waiting, WaitingByQuota,
};
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};

const RATE: u64 = 60_000; // tokens a minute: 1,000 a second
const BURST: u64 = 10_000;
const STEP: Duration = Duration::from_millis(10);

fn limits() -> ModelLimits {
    ModelLimits {
        tokens_per_minute: RATE,
        requests_per_minute: 6_000,
        burst_tokens: Some(BURST),
        burst_requests: None,
        accounting: Accounting::Usage,
    }
}

fn replica(sharing: SharingSettings, t0: Instant) -> Router {
    Router::try_new(
        RouterSpec {
            models: vec![ModelSpec {
                name: "m".into(),
                default_max_output_tokens: 256,
                chars_per_token: 4.0,
                max_request_tokens: 100_000,
            }],
            regions: vec![RegionSpec {
                name: "r".into(),
                weight: 1.0,
                max_concurrent: 10_000,
                models: vec![("m".into(), limits())],
            }],
            strategy: StrategyKind::WeightedLoad,
            params: StrategyParams::default(),
            seed: 1,
            breaker: dispatcher::core::BreakerConfig::default(),
            sharing: Some(sharing),
        },
        t0,
    )
    .unwrap()
}

/// The provider: a strict bucket in exact thousandths of a token.
struct Provider {
    level: i128,
    at: Duration,
    refused: u64,
    /// (time, net tokens admitted) per event, for the window check.
    admitted: Vec<(Duration, i64)>,
}

impl Provider {
    /// Full, as a provider nobody used for a while is.
    fn full() -> Self {
        Self {
            level: BURST as i128 * 1000,
            at: Duration::ZERO,
            refused: 0,
            admitted: Vec::new(),
        }
    }

    fn refill(&mut self, at: Duration) {
        let dt = (at - self.at).as_micros() as i128;
        // RATE tokens a minute = RATE / 60e6 tokens a µs = RATE / 60e3 milli-tokens a µs.
        self.level = (self.level + dt * RATE as i128 / 60_000).min(BURST as i128 * 1000);
        self.at = at;
    }

    fn admit(&mut self, tokens: u64, at: Duration) -> bool {
        self.refill(at);
        if self.level >= tokens as i128 * 1000 {
            self.level -= tokens as i128 * 1000;
            self.admitted.push((at, tokens as i64));
            true
        } else {
            self.refused += 1;
            false
        }
    }

    fn adjust(&mut self, reserved: u64, used: u64, at: Duration) {
        self.refill(at);
        let delta = used as i64 - reserved as i64;
        self.level = (self.level - delta as i128 * 1000).min(BURST as i128 * 1000);
        self.admitted.push((at, delta));
    }

    /// The largest excess over `burst + rate × w` of the net tokens admitted
    /// in any window of length `w` starting at an admission.
    fn worst_excess(&self, w: Duration) -> i64 {
        let allowed = BURST as i64 + (RATE as u128 * w.as_millis() / 60_000) as i64;
        let mut worst = i64::MIN;
        let mut sum = 0i64;
        let mut j = 0;
        for i in 0..self.admitted.len() {
            while j < self.admitted.len() && self.admitted[j].0 < self.admitted[i].0 + w {
                sum += self.admitted[j].1;
                j += 1;
            }
            worst = worst.max(sum - allowed);
            sum -= self.admitted[i].1;
        }
        worst
    }
}

#[derive(Clone, Copy, PartialEq)]
enum Redis {
    Up,
    Down,
}

struct Scenario {
    replicas: usize,
    seconds: u64,
    /// Offered load as a multiple of the provider's rate, by second.
    load: fn(u64) -> f64,
    /// A request not sent within this long is given up by its caller.
    give_up: Duration,
    /// Share of the load on the busiest replica (which one moves every 20 s).
    skew: f64,
    /// (from s, to s, restarted empty at the end)
    outages: Vec<(u64, u64, bool)>,
    /// (replica, from s, to s): that replica alone cannot reach Redis.
    partitions: Vec<(usize, u64, u64)>,
    sharing: SharingSettings,
    seed: u64,
}

struct Result_ {
    refused: u64,
    worst_1s: i64,
    worst_10s: i64,
    worst_60s: i64,
    /// Net tokens admitted over the provider's tokens for the run.
    used: f64,
    /// Tokens reserved by the requests each replica sent.
    sent: Vec<u64>,
    /// Tokens granted to each replica that expired unspent.
    expired: Vec<u64>,
}

struct Running {
    reservation: Reservation,
    done_at: Duration,
    reserved: u64,
    used: u64,
    replica: usize,
}

fn run(s: &Scenario) -> Result_ {
    let t0 = Instant::now();
    let mut rng = SmallRng::seed_from_u64(s.seed);
    let mut routers: Vec<Router> = (0..s.replicas).map(|_| replica(s.sharing, t0)).collect();
    let names: Vec<String> = (0..s.replicas).map(|i| format!("replica-{i}")).collect();
    let mut central: Option<CentralBucket> = None;
    let mut provider = Provider::full();
    let mut queues: Vec<VecDeque<(u64, u64, u64, Duration)>> = vec![VecDeque::new(); s.replicas];
    let mut running: Vec<Running> = Vec::new();
    let mut sent = vec![0u64; s.replicas];
    // Mean request: prompt ~1,000 + max ~450 reserved, ~700 used.
    let mean_reserved = 1_450.0;
    let per_step = |second: u64| (s.load)(second) * RATE as f64 / 60.0 * STEP.as_secs_f64() / mean_reserved;
    let steps = s.seconds * 1000 / STEP.as_millis() as u64;
    let ticks = (s.sharing.tick.as_millis() / STEP.as_millis()) as u64;
    for step in 0..steps {
        let at = STEP * step as u32;
        let now = t0 + at;
        let second = at.as_secs();
        // Arrivals: Poisson-ish (Bernoulli splits of the mean), skewed.
        let busy = ((second / 20) as usize) % s.replicas;
        let mut arrivals = per_step(second);
        while arrivals > 0.0 {
            if rng.random_bool(arrivals.min(1.0)) {
                let r = if s.replicas == 1 || rng.random_bool(s.skew) {
                    busy
                } else {
                    rng.random_range(0..s.replicas)
                };
                let prompt = (50.0 * (rng.random::<f64>() * 4.4).exp()).min(4_000.0) as u64;
                let max = [64, 256, 1024][rng.random_range(0..3)];
                // Mostly under the reservation; one in twenty over it.
                let completion = if rng.random_bool(0.05) {
                    max + max / 5
                } else {
                    rng.random_range(0..=max)
                };
                queues[r].push_back((prompt, max, completion, at));
            }
            arrivals -= 1.0;
        }
        // Completions.
        let mut i = 0;
        while i < running.len() {
            if running[i].done_at <= at {
                let w = running.swap_remove(i);
                provider.adjust(w.reserved, w.used, at);
                let prompt = w.used.min(w.reserved);
                routers[w.replica].settle(
                    &w.reservation,
                    Completion {
                        settlement: Settlement::Used {
                            prompt,
                            completion: w.used - prompt,
                        },
                        outcome: Some(Outcome::Success),
                        latency: Duration::from_millis(500),
                        hint: None,
                        load: None,
                        provider_refused: None,
                    },
                    now,
                );
            } else {
                i += 1;
            }
        }
        // Admission: each replica sends what its shared quota lets through;
        // what waited 5 s is given up.
        for (r, q) in queues.iter_mut().enumerate() {
            while let Some(&(prompt, max, completion, arrived)) = q.front() {
                if at.saturating_sub(arrived) > s.give_up {
                    q.pop_front();
                    continue;
                }
                let req = RouteRequest {
                    model: "m",
                    tokens: prompt + max,
                    origin: None,
                };
                let Ok(res) = routers[r].reserve(&req, &[], now) else {
                    break;
                };
                q.pop_front();
                sent[r] += prompt + max;
                if provider.admit(prompt + max, at) {
                    running.push(Running {
                        reservation: res,
                        done_at: at + Duration::from_millis(rng.random_range(100..1_500)),
                        reserved: prompt + max,
                        used: prompt + completion,
                        replica: r,
                    });
                } else {
                    routers[r].settle(&res, Completion::abandoned(), now);
                }
            }
        }
        // Sync ticks.
        {
            let outage = s.outages.iter().find(|(a, b, _)| (*a..*b).contains(&second));
            let redis = if outage.is_some() { Redis::Down } else { Redis::Up };
            if step % ticks == 0
                && let Some((_, b, true)) = s.outages.iter().find(|(_, b, _)| *b == second)
            {
                let _ = b;
                central = None; // restarted empty
            }
            for (r, router) in routers.iter_mut().enumerate() {
                // Each replica calls at its own phase of the tick, as real
                // ones do (their sync tasks started at different times).
                if step % ticks != (r as u64 * 37 / 10) % ticks {
                    continue;
                }
                let cut = s
                    .partitions
                    .iter()
                    .any(|(p, a, b)| *p == r && (*a..*b).contains(&second));
                // What its queue waits for (all of it in the one region).
                let waiting = queues[r]
                    .iter()
                    .filter(|w| at.saturating_sub(w.3) <= s.give_up)
                    .fold(Waiting::default(), |acc, w| Waiting {
                        first: if acc.requests == 0 { w.0 + w.1 } else { acc.first },
                        tokens: acc.tokens + w.0 + w.1,
                        requests: acc.requests + 1,
                    });
                let waiting: WaitingByQuota = [(("r".into(), "m".into()), waiting)].into();
                let calls = router.sync_calls(&waiting, now);
                let done = calls
                    .into_iter()
                    .map(|item| {
                        let grant = (redis == Redis::Up && !cut).then(|| {
                            call_or_create(
                                &mut central,
                                &names[r],
                                &item.limits,
                                &item.call,
                                at.as_micros() as u64,
                            )
                        });
                        (item, grant)
                    })
                    .collect();
                router.sync_done(done, now, now);
            }
        }
    }
    let net: i64 = provider.admitted.iter().map(|(_, t)| t).sum();
    Result_ {
        refused: provider.refused,
        worst_1s: provider.worst_excess(Duration::from_secs(1)),
        worst_10s: provider.worst_excess(Duration::from_secs(10)),
        worst_60s: provider.worst_excess(Duration::from_secs(60)),
        used: net as f64 / (RATE as f64 / 60.0 * s.seconds as f64),
        sent,
        expired: routers
            .iter()
            .map(|r| {
                r.regions()[0]
                    .quota(0)
                    .and_then(|q| q.shared())
                    .map_or(0, |q| q.view(t0).totals.expired_tokens)
            })
            .collect(),
    }
}

fn scenario(replicas: usize, seed: u64) -> Scenario {
    Scenario {
        replicas,
        seconds: 120,
        load: |_| 2.0,
        give_up: Duration::from_secs(5),
        skew: 0.8,
        outages: vec![(40, 45, false), (70, 76, true)],
        partitions: if replicas > 1 { vec![(1, 90, 91)] } else { vec![] },
        sharing: SharingSettings {
            replicas_floor: replicas as u32,
            ..SharingSettings::default()
        },
        seed,
    }
}

#[test]
fn replicas_never_overshoot_the_provider() {
    for replicas in 1..=5 {
        for seed in [1, 2] {
            let r = run(&scenario(replicas, seed));
            eprintln!(
                "{replicas} replicas, seed {seed}: refused {}, worst excess 1 s {} / 10 s {} / 60 s {}, used {:.3}",
                r.refused, r.worst_1s, r.worst_10s, r.worst_60s, r.used
            );
            assert_eq!(
                r.refused, 0,
                "{replicas} replicas, seed {seed}: provider refusals"
            );
            for (w, excess) in [(1, r.worst_1s), (10, r.worst_10s), (60, r.worst_60s)] {
                assert!(
                    excess <= 0,
                    "{replicas} replicas, seed {seed}: a {w} s window admitted {excess} tokens over burst + rate × window"
                );
            }
            // Not idle either: most of the provider's quota is used, outages
            // included (0.79 to 0.93 over these runs).
            assert!(
                r.used > 0.7,
                "{replicas} replicas, seed {seed}: used {:.3} of the quota",
                r.used
            );
        }
    }
}

/// Bursts after quiet spells, with callers that give up after 20 ms: a
/// replica may be granted what its largest waiting request lacks just
/// before that caller leaves, and the central level fills up while nobody
/// asks. Expiring chunks keep the bound through it.
fn bursts(replicas: usize, seed: u64) -> Scenario {
    Scenario {
        seconds: 90,
        load: |second| if (second / 15) % 2 == 0 { 3.0 } else { 0.0 },
        give_up: Duration::from_millis(20),
        outages: vec![],
        partitions: vec![],
        ..scenario(replicas, seed)
    }
}

#[test]
fn bursts_after_quiet_spells_stay_within_the_bound() {
    for replicas in 1..=5 {
        let r = run(&bursts(replicas, 3));
        eprintln!(
            "bursts, {replicas} replicas: refused {}, worst excess 1 s {} / 10 s {} / 60 s {}, used {:.3}",
            r.refused, r.worst_1s, r.worst_10s, r.worst_60s, r.used
        );
        assert_eq!(r.refused, 0, "{replicas} replicas: provider refusals");
        assert!(
            r.worst_1s.max(r.worst_10s).max(r.worst_60s) <= 0,
            "{replicas} replicas: over the bound"
        );
    }
}

/// A replica granted 6,000 tokens for a request whose caller then left is
/// cut off from Redis for 4 s, long enough to be forgotten (its holding no
/// longer counted against the burst), and spends what it held when the
/// load comes back, while the other replica takes the whole level. `spent`
/// is what the two spend within one second at the end.
fn hoard_then_burst(expire_chunks: bool) -> (u64, Provider) {
    let t0 = Instant::now();
    let sharing = SharingSettings {
        replicas_floor: 2,
        expire_chunks,
        ..SharingSettings::default()
    };
    let limits = limits();
    let central_limits = limits.central(&sharing);
    let mut a = SharedQuota::new(central_limits, sharing, t0);
    let mut b = SharedQuota::new(central_limits, sharing, t0);
    let mut central: Option<CentralBucket> = None;
    let mut provider = Provider::full();
    let call = |q: &mut SharedQuota, id: &str, at: Duration, central: &mut Option<CentralBucket>| {
        let c = q.sync_call(t0 + at);
        let g = call_or_create(central, id, &central_limits, &c, at.as_micros() as u64);
        q.on_reply(&c, g, t0 + at, t0 + at);
    };
    let tick = |at: u64| Duration::from_millis(100 * at);
    // Both replicas call every tick; the level fills for 20 s.
    for t in 0..200 {
        call(&mut a, "a", tick(t), &mut central);
        call(&mut b, "b", tick(t), &mut central);
    }
    // A 6,000-token request waits on `a`, which is granted it; its caller
    // gives up before it is sent.
    a.set_waiting(Waiting {
        first: 6_000,
        tokens: 6_000,
        requests: 1,
    });
    call(&mut a, "a", tick(200), &mut central);
    a.set_waiting(Waiting::default());
    assert!(
        a.fit(6_000, t0 + tick(200)).is_ok(),
        "granted what the request lacked"
    );
    // `a` cut off for 4 s; `b` calls on.
    for t in 201..=240 {
        let c = a.sync_call(t0 + tick(t));
        a.on_failure(c, t0 + tick(t));
        call(&mut b, "b", tick(t), &mut central);
    }
    // The burst, `a` back: within one second each sends what fits.
    let mut spent = 0;
    for ms in (0..1_000).step_by(10) {
        let at = tick(240) + Duration::from_millis(ms);
        if ms % 100 == 0 {
            // `b` has a whole bucket's worth of 500-token requests waiting.
            b.set_waiting(Waiting {
                first: 500,
                tokens: BURST,
                requests: BURST / 500,
            });
            call(&mut b, "b", at, &mut central);
            call(&mut a, "a", at, &mut central);
        }
        for q in [&mut a, &mut b] {
            while q.fit(500, t0 + at).is_ok() {
                q.take(500, t0 + at);
                provider.admit(500, at);
                spent += 500;
            }
        }
    }
    (spent, provider)
}

#[test]
fn without_expiring_chunks_the_bound_breaks() {
    // What one second may take at most: the burst and a second's refill.
    let bound = BURST + RATE / 60;
    let (spent, provider) = hoard_then_burst(true);
    eprintln!(
        "expiring chunks: {spent} tokens in the burst's first second, {} refused",
        provider.refused
    );
    assert!(spent <= bound, "{spent} > {bound}");
    assert_eq!(provider.refused, 0);
    let (spent, provider) = hoard_then_burst(false);
    eprintln!(
        "chunks kept for ever: {spent} tokens in the burst's first second, {} refused",
        provider.refused
    );
    assert!(spent > bound, "kept chunks should overshoot: {spent} <= {bound}");
    assert!(provider.refused > 0, "the provider should have refused some");
}

/// Scarce quota is split about evenly between replicas with the same
/// demand. Ten simulated minutes; requests are heavy-tailed (50 to 5,000
/// tokens), so even a fair split differs by chance: two and three replicas
/// within 15 % are checked; five are shown (up to 1.35x apart by chance
/// with these sizes). A sanity bound, not a fine one: the real replicas'
/// imbalance (docs/SCALING.md) does not show here.
#[test]
fn replicas_with_equal_demand_get_equal_parts() {
    for replicas in [2, 3, 5] {
        let s = Scenario {
            seconds: 600,
            skew: 0.0,
            outages: vec![],
            partitions: vec![],
            ..scenario(replicas, 5)
        };
        let r = run(&s);
        let (lo, hi) = (*r.sent.iter().min().unwrap(), *r.sent.iter().max().unwrap());
        eprintln!(
            "{replicas} replicas, equal demand: tokens sent {:?}, expired {:?}, used {:.3}",
            r.sent, r.expired, r.used
        );
        if replicas <= 3 {
            assert!(hi as f64 <= lo as f64 * 1.15, "{replicas} replicas: {:?}", r.sent);
        }
    }
}
