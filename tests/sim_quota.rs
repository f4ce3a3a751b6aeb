//! A deterministic simulation on a virtual clock, with the real core (the
//! scheduler, router and buckets) and the region-sim's provider limiter:
//! three regions, ten simulated minutes of bursty, heavy-tailed load at twice
//! the total quota, in both accounting modes. No provider limit is ever
//! overshot, at least 97 % of the token capacity is used, and large requests
//! are not starved by small ones.

mod common;

use std::time::Duration;

use common::Lcg;
use common::vsim::{Arrival, Replies, World, percentile, poisson};
use dispatcher::core::Accounting;

const RUN: Duration = Duration::from_secs(600);

fn size(rng: &mut Lcg) -> (u64, u64) {
    (
        rng.heavy_tail(200.0, 1.3, 12_000.0),
        rng.heavy_tail(50.0, 1.5, 4_000.0),
    )
}

fn class(tokens: u64) -> usize {
    match tokens {
        0..500 => 0,
        500..2000 => 1,
        _ => 2,
    }
}

fn check(accounting: Accounting) {
    let world = World {
        regions: vec![("a", 600_000), ("b", 300_000), ("c", 150_000)],
        accounting,
        tenants: vec![("t", 1.0)],
        max_wait: Duration::from_secs(10),
        ms_per_1k: 200.0,
        replies: Replies::Proportional,
        foreign_share: 0.0,
    };
    // Sized so the offered tokens are twice the total quota on average,
    // alternating 15 s at 3x and 15 s at 1x the base rate.
    let mean_tokens = {
        let mut s = Lcg(7);
        (0..20_000).map(|_| size(&mut s)).map(|(p, o)| p + o).sum::<u64>() as f64 / 20_000.0
    };
    let base = world.supply_per_sec() / mean_tokens;
    let arrivals: Vec<Arrival> = poisson(
        &mut Lcg(42),
        0,
        |t| {
            base * if ((t / 15.0) as u64).is_multiple_of(2) {
                3.0
            } else {
                1.0
            }
        },
        Duration::ZERO,
        RUN,
        size,
    );
    let r = world.run(arrivals);
    let mut success = [(0u64, 0u64); 3];
    for (a, f) in r.arrivals.iter().zip(&r.fates) {
        let c = class(a.tokens());
        success[c].1 += 1;
        success[c].0 += f.granted.is_some() as u64;
    }
    let rate = |(ok, all): (u64, u64)| ok as f64 / all.max(1) as f64;
    let utilisation = r.used as f64 / r.capacity as f64;
    let waits = r.waits(0);
    println!(
        "accounting = {accounting:?}: {} requests over {:.0} simulated s",
        r.arrivals.len(),
        r.end.as_secs_f64()
    );
    println!("  provider quota overruns: {}", r.overruns);
    println!(
        "  tokens charged by the providers: {} of a capacity of {} ({:.2} %)",
        r.used,
        r.capacity,
        100.0 * utilisation
    );
    for (name, c) in ["< 500 tokens", "500-1999", ">= 2000"].iter().zip(success) {
        println!(
            "  success {name:>12}: {:>6} of {:>6} ({:.1} %)",
            c.0,
            c.1,
            100.0 * rate(c)
        );
    }
    println!(
        "  queue wait of served requests: p50 {:?}, p99 {:?}",
        percentile(&waits, 0.5),
        percentile(&waits, 0.99)
    );
    println!("  refusals: {:?}", r.refusals);
    assert_eq!(r.overruns, 0, "a provider limit was overshot");
    assert!(
        utilisation >= 0.97,
        "only {:.2} % of the capacity was used",
        100.0 * utilisation
    );
    assert!(
        rate(success[2]) >= 0.5 * rate(success[0]),
        "large requests starved: {:.3} vs {:.3}",
        rate(success[2]),
        rate(success[0])
    );
    assert!(success[2].1 > 100, "the workload must contain large requests");
}

#[test]
fn twice_oversubscribed_admission_accounting() {
    check(Accounting::Admission);
}

#[test]
fn twice_oversubscribed_usage_accounting() {
    check(Accounting::Usage);
}
