//! Provider hints that arrive late, on a virtual clock with the real core:
//! a strict provider that charges prompt + max_tokens at admission, twice
//! its quota offered, requests of 50–4,000 tokens, and replies (carrying the
//! provider's remaining quota as of admission) coming back 0.1–5 s later.
//! The dispatcher must neither overshoot (no provider refusal once the
//! first second is over) nor stay too cautious because of the stale hints
//! (at least 97 % of the quota admitted) — also when another consumer we
//! do not see spends from the same provider quota.

mod common;

use std::time::Duration;

use common::Lcg;
use common::vsim::{Replies, Run, World, poisson};
use dispatcher::core::Accounting;

const RUN: Duration = Duration::from_secs(300);

fn size(rng: &mut Lcg) -> (u64, u64) {
    (
        rng.heavy_tail(34.0, 1.1, 3_000.0),
        rng.heavy_tail(16.0, 1.3, 1_000.0),
    )
}

fn world(foreign_share: f64) -> World {
    World {
        regions: vec![("a", 60_000), ("b", 30_000), ("c", 15_000)],
        accounting: Accounting::Admission,
        tenants: vec![("t", 1.0)],
        max_wait: Duration::from_secs(5),
        ms_per_1k: 0.0,
        replies: Replies::Delayed {
            min: Duration::from_millis(100),
            max: Duration::from_secs(5),
        },
        foreign_share,
    }
}

/// Runs twice the quota at the providers; returns the run, the provider
/// refusals after the first second, and the part of the quota admitted up
/// to the last admission (the refill after it is nobody's to use).
fn run(world: &World) -> (Run, usize, f64) {
    let mean_tokens = {
        let mut s = Lcg(11);
        (0..20_000).map(|_| size(&mut s)).map(|(p, o)| p + o).sum::<u64>() as f64 / 20_000.0
    };
    let rate = 2.0 * world.supply_per_sec() / mean_tokens;
    let arrivals = poisson(&mut Lcg(5), 0, |_| rate, Duration::ZERO, RUN, size);
    assert!(arrivals.iter().all(|a| (50..=4_000).contains(&a.tokens())));
    let r = world.run(arrivals);
    let late_refusals = r
        .overrun_times
        .iter()
        .filter(|t| **t > Duration::from_secs(1))
        .count();
    let last = r.fates.iter().filter_map(|f| f.granted).max().unwrap();
    let capacity = world.capacity(last);
    let admitted = r.used as f64 / capacity as f64;
    println!(
        "foreign share {:.0} %: {} requests over {:.0} simulated s: provider refusals {} ({late_refusals} after the first second), \
         quota admitted {:.2} % ({} of {} tokens), refused by the dispatcher {:?}",
        100.0 * world.foreign_share,
        r.arrivals.len(),
        r.end.as_secs_f64(),
        r.overruns,
        100.0 * admitted,
        r.used,
        capacity,
        r.refusals
    );
    (r, late_refusals, admitted)
}

#[test]
fn late_hints_neither_overshoot_nor_strand_quota() {
    let (_, late_refusals, admitted) = run(&world(0.0));
    assert_eq!(late_refusals, 0, "the provider refused after the first second");
    assert!(
        admitted >= 0.97,
        "only {:.2} % of the quota was admitted",
        100.0 * admitted
    );
}

/// Another consumer takes a fifth of each provider's refill: the hints are
/// all that tells, and crediting the provider's refill since a hint would
/// overshoot.
#[test]
fn an_unseen_consumer_of_the_same_quota_is_not_overshot() {
    let (_, late_refusals, admitted) = run(&world(0.2));
    assert_eq!(late_refusals, 0, "the provider refused after the first second");
    assert!(
        admitted >= 0.97 * 0.8,
        "only {:.2} % of the quota was admitted",
        100.0 * admitted
    );
}
