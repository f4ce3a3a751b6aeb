//! A deterministic simulation on a virtual clock, with the real core (the
//! scheduler, router and buckets) and the region-sim's provider limiter:
//! three regions, ten simulated minutes of bursty, heavy-tailed load at twice
//! the total quota, in both accounting modes. No provider limit is ever
//! overshot, at least 97 % of the token capacity is used, and large requests
//! are not starved by small ones.

mod common;

use std::cmp::Reverse;
use std::collections::{BTreeMap, BinaryHeap, HashMap};
use std::time::{Duration, Instant};

use common::Lcg;
use dispatcher::core::{
    Accounting, Completion, ModelLimits, ModelSpec, Outcome, RegionSpec, Released, Reservation, Router,
    RouterSpec, Scheduler, Settlement, StrategyKind, StrategyParams, Submission, SubmitError, Submitted,
};
use dispatcher::sim::Provider;

const REGIONS: [(&str, u64); 3] = [("a", 600_000), ("b", 300_000), ("c", 150_000)];
const RUN: Duration = Duration::from_secs(600);
const MAX_WAIT: Duration = Duration::from_secs(10);
const MS_PER_1K: f64 = 200.0;

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Event {
    Arrive(usize),
    Complete(usize),
    Wake,
}

struct Request {
    prompt: u64,
    max_output: u64,
    arrived: Duration,
    outcome: Option<bool>,
    wait: Duration,
}

struct Flight {
    reservation: Reservation,
    region: usize,
    admission: dispatcher::sim::Admission,
    completion: u64,
}

#[derive(Debug)]
struct Report {
    requests: usize,
    overruns: u64,
    used: u64,
    capacity: u64,
    success: [(u64, u64); 3],
    wait_p50: Duration,
    wait_p99: Duration,
    end: Duration,
    failures: BTreeMap<&'static str, u64>,
}

fn spec(accounting: Accounting) -> RouterSpec {
    RouterSpec {
        models: vec![ModelSpec {
            name: "m".into(),
            default_max_output_tokens: 256,
            chars_per_token: 4.0,
            max_request_tokens: 100_000,
        }],
        regions: REGIONS
            .iter()
            .map(|(name, tpm)| RegionSpec {
                name: name.to_string(),
                weight: 1.0,
                max_concurrent: 10_000,
                models: vec![("m".into(), limits(*tpm, accounting))],
            })
            .collect(),
        strategy: StrategyKind::WeightedLoad,
        params: StrategyParams::default(),
        seed: 1,
    }
}

fn limits(tpm: u64, accounting: Accounting) -> ModelLimits {
    ModelLimits {
        tokens_per_minute: tpm,
        requests_per_minute: 1_000_000,
        burst_tokens: None,
        burst_requests: None,
        accounting,
    }
}

fn class(tokens: u64) -> usize {
    match tokens {
        0..500 => 0,
        500..2000 => 1,
        _ => 2,
    }
}

fn simulate(accounting: Accounting) -> Report {
    let t0 = Instant::now();
    let at = |d: Duration| t0 + d;
    let router = Router::try_new(spec(accounting), t0).unwrap();
    let mut sched: Scheduler<usize> = Scheduler::fifo(router, 1_000_000);
    let mut providers: Vec<Provider> = REGIONS
        .iter()
        .map(|(_, tpm)| Provider::new(&[("m".to_string(), limits(*tpm, accounting))], 0, t0))
        .collect();
    let region_index: HashMap<&str, usize> = REGIONS.iter().enumerate().map(|(i, (n, _))| (*n, i)).collect();

    // Arrivals: Poisson, alternating 15 s at 3x and 15 s at 1x the base rate
    // (2x on average), sized so the offered tokens are twice the total quota.
    let quota_per_sec: f64 = REGIONS.iter().map(|(_, q)| *q as f64 / 60.0).sum();
    let mut rng = Lcg(42);
    let mut requests = Vec::new();
    let mut sizes = Lcg(7);
    let mean_tokens = {
        let mut s = Lcg(7);
        let n = 20_000;
        (0..n)
            .map(|_| s.heavy_tail(200.0, 1.3, 12_000.0) + s.heavy_tail(50.0, 1.5, 4_000.0))
            .sum::<u64>() as f64
            / n as f64
    };
    let base_rate = quota_per_sec / mean_tokens; // requests/s at 1x
    let mut t = 0.0f64;
    while t < RUN.as_secs_f64() {
        let phase_fast = (t / 15.0) as u64 % 2 == 0;
        let rate = base_rate * if phase_fast { 3.0 } else { 1.0 };
        t += -(1.0 - rng.unit()).ln() / rate;
        requests.push(Request {
            prompt: sizes.heavy_tail(200.0, 1.3, 12_000.0),
            max_output: sizes.heavy_tail(50.0, 1.5, 4_000.0),
            arrived: Duration::from_secs_f64(t),
            outcome: None,
            wait: Duration::ZERO,
        });
    }

    let mut events: BinaryHeap<Reverse<(Duration, u64, Event)>> = BinaryHeap::new();
    let mut seq = 0u64;
    let mut push = |events: &mut BinaryHeap<_>, when: Duration, e: Event| {
        seq += 1;
        events.push(Reverse((when, seq, e)));
    };
    for (i, r) in requests.iter().enumerate() {
        push(&mut events, r.arrived, Event::Arrive(i));
    }
    let mut flights: HashMap<usize, Flight> = HashMap::new();
    let mut overruns = 0;
    let mut completions = Lcg(99);
    let mut scheduled_wake: Option<Duration> = None;
    let mut now = Duration::ZERO;

    let mut failures: BTreeMap<&'static str, u64> = BTreeMap::new();
    while let Some(Reverse((when, _, event))) = events.pop() {
        now = when;
        let mut granted: Vec<(usize, Reservation)> = Vec::new();
        match event {
            Event::Arrive(i) => {
                let r = &requests[i];
                let sub = Submission {
                    model: "m".into(),
                    tokens: r.prompt + r.max_output,
                    origin: None,
                    tenant: "t".into(),
                    tried: Vec::new(),
                    wait_until: at(now + MAX_WAIT),
                    tenant_max_queued: usize::MAX,
                };
                match sched.submit(sub, at(now), || i) {
                    Ok(Submitted::Reserved(res)) => granted.push((i, res)),
                    Ok(Submitted::Queued { .. }) => {}
                    Err(e) => {
                        let why = match e {
                            SubmitError::WouldExpire { .. } => "refused at once: would wait in vain",
                            SubmitError::QueueFull { .. } | SubmitError::TenantQueueFull { .. } => {
                                "refused at once: queue full"
                            }
                            SubmitError::Route(_) => "refused at once: no region",
                        };
                        *failures.entry(why).or_default() += 1;
                        requests[i].outcome = Some(false)
                    }
                }
            }
            Event::Complete(i) => {
                let f = flights.remove(&i).unwrap();
                let r = &requests[i];
                let p = &mut providers[f.region];
                p.complete(f.admission, r.prompt, f.completion, at(now));
                let hint = p.hint("m", at(now));
                sched.router_mut().settle(
                    &f.reservation,
                    Completion {
                        settlement: Settlement::Used {
                            prompt: r.prompt,
                            completion: f.completion,
                        },
                        outcome: Some(Outcome::Success),
                        latency: latency(r.prompt + f.completion),
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
                    *failures.entry("expired while waiting").or_default() += 1;
                    requests[w.ticket].outcome = Some(false)
                }
            }
        }
        for (i, res) in granted {
            let region = region_index[&*res.region];
            let r = &mut requests[i];
            r.wait = now - r.arrived;
            match providers[region].admit("m", r.prompt, r.max_output, at(now)) {
                Ok(admission) => {
                    let completion = ((r.max_output as f64) * (0.2 + 0.8 * completions.unit())).ceil() as u64;
                    push(
                        &mut events,
                        now + latency(r.prompt + completion),
                        Event::Complete(i),
                    );
                    r.outcome = Some(true);
                    flights.insert(
                        i,
                        Flight {
                            reservation: res,
                            region,
                            admission,
                            completion,
                        },
                    );
                }
                Err(refusal) => {
                    overruns += 1;
                    r.outcome = Some(false);
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
    let capacity: u64 = REGIONS
        .iter()
        .map(|(_, tpm)| tpm + (*tpm as f64 * now.as_secs_f64() / 60.0) as u64)
        .sum();
    let mut success = [(0u64, 0u64); 3];
    let mut waits: Vec<Duration> = Vec::new();
    for r in &requests {
        let c = class(r.prompt + r.max_output);
        success[c].1 += 1;
        if r.outcome == Some(true) {
            success[c].0 += 1;
            waits.push(r.wait);
        }
    }
    waits.sort();
    Report {
        requests: requests.len(),
        overruns,
        used,
        capacity,
        success,
        wait_p50: waits[waits.len() / 2],
        wait_p99: waits[waits.len() * 99 / 100],
        end: now,
        failures,
    }
}

fn latency(tokens: u64) -> Duration {
    Duration::from_secs_f64(MS_PER_1K * tokens as f64 / 1000.0 / 1000.0)
}

fn check(accounting: Accounting) {
    let r = simulate(accounting);
    let rate = |(ok, all): (u64, u64)| ok as f64 / all.max(1) as f64;
    let utilisation = r.used as f64 / r.capacity as f64;
    println!(
        "accounting = {accounting:?}: {} requests over {:.0} simulated s",
        r.requests,
        r.end.as_secs_f64()
    );
    println!("  provider quota overruns: {}", r.overruns);
    println!(
        "  tokens charged by the providers: {} of a capacity of {} ({:.2} %)",
        r.used,
        r.capacity,
        100.0 * utilisation
    );
    for (name, c) in ["< 500 tokens", "500-1999", ">= 2000"].iter().zip(r.success) {
        println!(
            "  success {name:>12}: {:>6} of {:>6} ({:.1} %)",
            c.0,
            c.1,
            100.0 * rate(c)
        );
    }
    println!(
        "  queue wait of served requests: p50 {:?}, p99 {:?}",
        r.wait_p50, r.wait_p99
    );
    println!("  refusals: {:?}", r.failures);
    assert_eq!(r.overruns, 0, "a provider limit was overshot");
    assert!(
        utilisation >= 0.97,
        "only {:.2} % of the capacity was used",
        100.0 * utilisation
    );
    assert!(
        rate(r.success[2]) >= 0.5 * rate(r.success[0]),
        "large requests starved: {:.3} vs {:.3}",
        rate(r.success[2]),
        rate(r.success[0])
    );
    assert!(r.success[2].1 > 100, "the workload must contain large requests");
}

#[test]
fn twice_oversubscribed_admission_accounting() {
    check(Accounting::Admission);
}

#[test]
fn twice_oversubscribed_usage_accounting() {
    check(Accounting::Usage);
}
