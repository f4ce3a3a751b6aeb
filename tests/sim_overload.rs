//! Overload control, measured on a virtual clock with the real core and
//! the region-sim's provider limiter (issue 18): three regions of 60k / 30k
//! / 15k tokens a minute behind a strict provider (it charges prompt +
//! max_tokens at admission), prompts lognormal around 400 tokens clipped
//! to 50-4,000, max_tokens from {64, 256, 1024}, Poisson arrivals. Four
//! policies see the same arrivals: the default (5 s queue with overload
//! control), no queue, the old 5 s queue, and an oracle that sends each
//! request where it fits now and drops what fits nowhere.
//!
//! `cargo test --test sim_overload -- --ignored --nocapture` prints the
//! table in docs/OVERLOAD.md.

mod common;

use std::time::Duration;

use common::Lcg;
use common::vsim::{Arrival, Replies, Run, World, percentile, poisson};
use dispatcher::core::{Accounting, ModelLimits, OverloadSettings};
use dispatcher::sim::Provider;

const RUN: Duration = Duration::from_secs(600);
const SEEDS: [u64; 3] = [1, 2, 3];
const MAX_WAIT: Duration = Duration::from_secs(5);
const REGIONS: [(&str, u64); 3] = [("a", 60_000), ("b", 30_000), ("c", 15_000)];
const MS_PER_1K: f64 = 100.0;
/// Requests at least this large are "large".
const LARGE: u64 = 2_000;

/// A standard normal deviate (Box-Muller).
fn normal(rng: &mut Lcg) -> f64 {
    let u1 = 1.0 - rng.unit();
    let u2 = rng.unit();
    (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()
}

/// (prompt, max_tokens): prompt lognormal, median 400, σ = 1, clipped.
fn size(rng: &mut Lcg) -> (u64, u64) {
    let prompt = (400.0 * normal(rng).exp()).clamp(50.0, 4_000.0) as u64;
    let max_tokens = [64, 256, 1024][(rng.next_u64() % 3) as usize];
    (prompt, max_tokens)
}

#[derive(Debug, Clone, Copy)]
enum Load {
    Steady(f64),
    /// 10 s at 3x every minute over a 0.7x base.
    Bursts,
    /// `len` seconds at 3x every two minutes over a 0.5x base.
    Long(f64),
}

impl Load {
    fn name(self) -> String {
        match self {
            Load::Steady(x) => format!("{x}x"),
            Load::Bursts => "0.7x + 10 s at 3x each minute".into(),
            Load::Long(len) => format!("0.5x + {len} s at 3x every two minutes"),
        }
    }

    fn factor(self, t: f64) -> f64 {
        match self {
            Load::Steady(x) => x,
            Load::Bursts if t % 60.0 < 10.0 => 3.0,
            Load::Bursts => 0.7,
            Load::Long(len) if t % 120.0 < len => 3.0,
            Load::Long(_) => 0.5,
        }
    }
}

fn world(max_wait: Duration) -> World {
    World {
        regions: REGIONS.to_vec(),
        accounting: Accounting::Admission,
        tenants: vec![("t", 1.0)],
        max_wait,
        ms_per_1k: MS_PER_1K,
        replies: Replies::Proportional,
        foreign_share: 0.0,
    }
}

fn arrivals(load: Load, seed: u64) -> Vec<Arrival> {
    let mean_tokens = {
        let mut s = Lcg(7);
        (0..20_000).map(|_| size(&mut s)).map(|(p, o)| p + o).sum::<u64>() as f64 / 20_000.0
    };
    let base = world(MAX_WAIT).supply_per_sec() / mean_tokens;
    poisson(
        &mut Lcg(seed),
        0,
        |t| base * load.factor(t),
        Duration::ZERO,
        RUN,
        size,
    )
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Policy {
    Default,
    NoQueue,
    Old,
    Oracle,
}

impl Policy {
    const ALL: [Policy; 4] = [Policy::Default, Policy::NoQueue, Policy::Old, Policy::Oracle];

    fn name(self) -> &'static str {
        match self {
            Policy::Default => "default (5 s queue, overload control)",
            Policy::NoQueue => "no queue",
            Policy::Old => "old 5 s queue",
            Policy::Oracle => "oracle (fits now or dropped)",
        }
    }
}

/// What one policy did with one set of arrivals.
struct Outcome {
    /// Per arrival: when its reply came back (`None`: not served).
    done: Vec<Option<Duration>>,
    arrivals: Vec<Arrival>,
    refused_early: u64,
    /// Refused after waiting (the wait ran out).
    expired: u64,
}

impl Outcome {
    fn successes(&self) -> usize {
        self.done.iter().filter(|d| d.is_some()).count()
    }

    /// (served, all) of requests of at least `LARGE` tokens.
    fn large(&self) -> (usize, usize) {
        let large = self
            .arrivals
            .iter()
            .zip(&self.done)
            .filter(|(a, _)| a.tokens() >= LARGE);
        let all: Vec<_> = large.collect();
        (all.iter().filter(|(_, d)| d.is_some()).count(), all.len())
    }

    /// Latencies of the successes, arrival to reply, sorted.
    fn latencies(&self) -> Vec<Duration> {
        let mut l: Vec<Duration> = self
            .arrivals
            .iter()
            .zip(&self.done)
            .filter_map(|(a, d)| d.map(|d| d - a.at))
            .collect();
        l.sort();
        l
    }
}

fn from_run(r: Run) -> Outcome {
    Outcome {
        done: r
            .fates
            .iter()
            .map(|f| f.done.or(f.granted.map(|_| RUN * 2)))
            .collect(),
        refused_early: r.refusals.get("refused at once: shedding").copied().unwrap_or(0),
        expired: r.refusals.get("expired while waiting").copied().unwrap_or(0),
        arrivals: r.arrivals,
    }
}

/// Each request goes to the first region whose provider admits it now;
/// what fits nowhere is dropped. The most any dispatcher without a queue
/// can do with these arrivals.
fn oracle(mut arrivals: Vec<Arrival>) -> Outcome {
    arrivals.sort_by_key(|a| a.at);
    let t0 = std::time::Instant::now();
    let mut providers: Vec<Provider> = REGIONS
        .iter()
        .map(|(_, tpm)| {
            let limits = ModelLimits {
                tokens_per_minute: *tpm,
                requests_per_minute: 10_000_000,
                burst_tokens: None,
                burst_requests: None,
                accounting: Accounting::Admission,
            };
            Provider::new(&[("m".to_string(), limits)], 0, t0)
        })
        .collect();
    let mut completions = Lcg(99);
    let done = arrivals
        .iter()
        .map(|a| {
            let now = t0 + a.at;
            providers
                .iter_mut()
                .find_map(|p| p.admit("m", a.prompt, a.max_output, now).ok())
                .map(|_| {
                    let completion = ((a.max_output as f64) * (0.2 + 0.8 * completions.unit())).ceil();
                    a.at + Duration::from_secs_f64(MS_PER_1K * (a.prompt as f64 + completion) / 1e6)
                })
        })
        .collect();
    Outcome {
        done,
        arrivals,
        refused_early: 0,
        expired: 0,
    }
}

fn run(policy: Policy, arrivals: Vec<Arrival>) -> Outcome {
    match policy {
        Policy::Default => {
            let mut o = OverloadSettings::default();
            // For sweeping the settings (docs/OVERLOAD.md).
            if let Some(ms) = std::env::var("OVERLOAD_TARGET_MS")
                .ok()
                .and_then(|v| v.parse().ok())
            {
                o.target = Duration::from_millis(ms);
            }
            if let Some(s) = std::env::var("OVERLOAD_INTERVAL_S")
                .ok()
                .and_then(|v| v.parse().ok())
            {
                o.interval = Duration::from_secs(s);
            }
            if let Some(f) = std::env::var("OVERLOAD_HOLD_SHARE")
                .ok()
                .and_then(|v| v.parse().ok())
            {
                o.hold_share = f;
            }
            from_run(world(MAX_WAIT).run_with(arrivals, Some(o)))
        }
        Policy::NoQueue => from_run(world(Duration::ZERO).run_with(arrivals, None)),
        Policy::Old => from_run(world(MAX_WAIT).run_with(arrivals, None)),
        Policy::Oracle => oracle(arrivals),
    }
}

/// One cell: the figure of each seed, " / " between.
fn cell(outcomes: &[Outcome], figure: impl Fn(&Outcome) -> String) -> String {
    outcomes.iter().map(figure).collect::<Vec<_>>().join(" / ")
}

/// Prints the table of docs/OVERLOAD.md: per load and policy, each seed's
/// figures.
#[test]
#[ignore = "prints the table of docs/OVERLOAD.md (a second in debug)"]
fn overload_table() {
    let loads = [
        Load::Steady(2.0),
        Load::Steady(1.0),
        Load::Bursts,
        Load::Steady(1.2),
        Load::Long(60.0),
    ];
    for load in loads {
        let arrivals: Vec<Vec<Arrival>> = SEEDS.iter().map(|seed| arrivals(load, *seed)).collect();
        let counts: Vec<String> = arrivals.iter().map(|a| a.len().to_string()).collect();
        println!(
            "\n{}, {:?}, seeds {SEEDS:?}: {} requests",
            load.name(),
            RUN,
            counts.join(" / ")
        );
        println!(
            "\n| policy | successes | requests >= {LARGE} tokens served | p50 latency (s) | p99 latency (s) | refused early | refused after waiting |"
        );
        println!("| --- | --- | --- | --- | --- | --- | --- |");
        for p in Policy::ALL {
            let o: Vec<Outcome> = arrivals.iter().map(|a| run(p, a.clone())).collect();
            println!(
                "| {} | {} | {} | {} | {} | {} | {} |",
                p.name(),
                cell(&o, |o| o.successes().to_string()),
                cell(&o, |o| {
                    let (ok, all) = o.large();
                    format!("{:.0} %", 100.0 * ok as f64 / all.max(1) as f64)
                }),
                cell(&o, |o| format!(
                    "{:.2}",
                    percentile(&o.latencies(), 0.5).as_secs_f64()
                )),
                cell(&o, |o| format!(
                    "{:.2}",
                    percentile(&o.latencies(), 0.99).as_secs_f64()
                )),
                cell(&o, |o| o.refused_early.to_string()),
                cell(&o, |o| o.expired.to_string()),
            );
        }
    }
}

/// At twice the quota for ten minutes: nearly every success the oracle
/// gets, at a median latency a caller does not notice.
#[test]
fn at_twice_the_quota_successes_near_the_oracle_at_low_latency() {
    for seed in SEEDS {
        let a = arrivals(Load::Steady(2.0), seed);
        let default = run(Policy::Default, a.clone());
        let ceiling = run(Policy::Oracle, a).successes();
        let p50 = percentile(&default.latencies(), 0.5);
        println!(
            "seed {seed}: {} successes against the oracle's {ceiling}, p50 {p50:?}, {} refused early",
            default.successes(),
            default.refused_early
        );
        assert!(
            default.successes() as f64 >= 0.97 * ceiling as f64,
            "seed {seed}: {} successes, under the oracle's {ceiling} - 3 %",
            default.successes()
        );
        assert!(p50 <= Duration::from_millis(500), "seed {seed}: p50 {p50:?}");
        assert!(default.refused_early > 0, "seed {seed}: the queue never shed");
    }
}

/// At 1x, and with 10 s bursts of 3x over 0.7x: as many successes as with
/// no queue, and nobody the old 5 s queue served is refused.
#[test]
fn at_1x_and_in_bursts_nothing_the_old_queue_served_is_refused() {
    for load in [Load::Steady(1.0), Load::Bursts] {
        for seed in SEEDS {
            let a = arrivals(load, seed);
            let default = run(Policy::Default, a.clone());
            let none = run(Policy::NoQueue, a.clone());
            let old = run(Policy::Old, a);
            assert!(
                default.successes() >= none.successes(),
                "{}, seed {seed}: {} successes, fewer than no queue's {}",
                load.name(),
                default.successes(),
                none.successes()
            );
            let lost: Vec<Duration> = old
                .done
                .iter()
                .zip(&default.done)
                .zip(&old.arrivals)
                .filter(|((o, d), _)| o.is_some() && d.is_none())
                .map(|(_, a)| a.at)
                .collect();
            assert!(
                lost.is_empty(),
                "{}, seed {seed}: {} requests the old queue served were refused, the first at {:?}",
                load.name(),
                lost.len(),
                lost.first()
            );
        }
    }
}

/// Requests of 2,000 tokens or more succeed at least as often as under
/// the oracle, at every load.
#[test]
fn large_requests_succeed_at_least_as_often_as_under_the_oracle() {
    for load in [Load::Steady(2.0), Load::Steady(1.0), Load::Bursts] {
        for seed in SEEDS {
            let a = arrivals(load, seed);
            let (ok, all) = run(Policy::Default, a.clone()).large();
            let (oracle_ok, oracle_all) = run(Policy::Oracle, a).large();
            assert_eq!(all, oracle_all);
            assert!(
                all >= 30,
                "{}, seed {seed}: only {all} large requests",
                load.name()
            );
            assert!(
                ok >= oracle_ok,
                "{}, seed {seed}: {ok} of {all} large requests served, the oracle {oracle_ok}",
                load.name()
            );
        }
    }
}
