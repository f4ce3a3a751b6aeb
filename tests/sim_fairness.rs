//! Tenant fairness, deterministically on a virtual clock with the real core
//! (fair queue, scheduler, router, buckets) and the simulated providers:
//! shares by weight, Jain's index across very different request sizes, a
//! flooding tenant against a polite one, and an idle tenant returning.

mod common;

use std::time::Duration;

use common::Lcg;
use common::vsim::{Arrival, Replies, World, jain, percentile, poisson};
use dispatcher::core::Accounting;

fn world(tenants: Vec<(&'static str, f64)>) -> World {
    World {
        regions: vec![("a", 600_000), ("b", 300_000), ("c", 150_000)],
        accounting: Accounting::Usage,
        tenants,
        max_wait: Duration::from_secs(10),
        ms_per_1k: 200.0,
        replies: Replies::Proportional,
        foreign_share: 0.0,
    }
}

fn secs(s: u64) -> Duration {
    Duration::from_secs(s)
}

fn heavy(rng: &mut Lcg) -> (u64, u64) {
    (
        rng.heavy_tail(150.0, 1.3, 6_000.0),
        rng.heavy_tail(50.0, 1.5, 2_000.0),
    )
}

/// The mean size `heavy` draws (prompt + output).
fn mean_heavy() -> f64 {
    let mut rng = Lcg(9);
    (0..50_000)
        .map(|_| heavy(&mut rng))
        .map(|(p, o)| (p + o) as f64)
        .sum::<f64>()
        / 50_000.0
}

#[test]
fn backlogged_tenants_share_tokens_by_weight() {
    let w = world(vec![("w1", 1.0), ("w1b", 1.0), ("w2", 2.0), ("w4", 4.0)]);
    let mut rng = Lcg(1);
    // Each tenant alone offers twice what all regions refill: all saturate.
    let rate = 2.0 * w.supply_per_sec() / mean_heavy();

    let arrivals: Vec<Arrival> = (0..4)
        .flat_map(|t| poisson(&mut rng, t, |_| rate, Duration::ZERO, secs(660), heavy))
        .collect();
    let r = w.run(arrivals);
    // A minute of warm-up drains the buckets' initial burst; then ten minutes.
    let got: Vec<u64> = (0..4).map(|t| r.granted_tokens(t, secs(60), secs(660))).collect();
    let total: u64 = got.iter().sum();
    let entitlement = [0.125, 0.125, 0.25, 0.5];
    println!("tokens dispatched over ten simulated minutes, by tenant (weights 1:1:2:4):");
    for (t, (name, _)) in w.tenants.iter().enumerate() {
        let share = got[t] as f64 / total as f64;
        println!(
            "  {name:4} {:>10} tokens  share {:6.2} %  entitlement {:5.1} %  off by {:+.2} % of it",
            got[t],
            100.0 * share,
            100.0 * entitlement[t],
            100.0 * (share - entitlement[t]) / entitlement[t]
        );
    }
    println!("  provider overruns {}, refusals {:?}", r.overruns, r.refusals);
    assert_eq!(r.overruns, 0);
    for t in 0..4 {
        let share = got[t] as f64 / total as f64;
        assert!(
            (share - entitlement[t]).abs() <= 0.03 * entitlement[t],
            "tenant {t}: share {share:.4}, entitlement {}",
            entitlement[t]
        );
    }
}

#[test]
fn very_different_request_sizes_get_equal_tokens() {
    let sizes = [50u64, 120, 300, 700, 1500, 3000, 5500, 8000];
    let names = ["s50", "s120", "s300", "s700", "s1500", "s3000", "s5500", "s8000"];
    let w = world(names.iter().map(|n| (*n, 1.0)).collect());
    let mut rng = Lcg(2);
    let arrivals: Vec<Arrival> = sizes
        .iter()
        .enumerate()
        .flat_map(|(t, size)| {
            // Each offers the whole supply: eight times oversubscribed.
            let rate = w.supply_per_sec() / *size as f64;
            let prompt = size * 3 / 4;
            poisson(
                &mut rng,
                t,
                |_| rate,
                Duration::ZERO,
                secs(660),
                move |_| (prompt, size - prompt),
            )
        })
        .collect();
    let r = w.run(arrivals);
    let got: Vec<f64> = (0..8)
        .map(|t| r.granted_tokens(t, secs(60), secs(660)) as f64)
        .collect();
    let index = jain(&got);
    println!("tokens received over ten simulated minutes by tenants whose requests are 50 .. 8,000 tokens:");
    for (name, g) in names.iter().zip(&got) {
        println!("  {name:6} {g:>10.0}");
    }
    println!(
        "  Jain's fairness index: {index:.4}; provider overruns {}",
        r.overruns
    );
    assert_eq!(r.overruns, 0);
    assert!(index >= 0.99, "Jain's index {index:.4}");
}

#[test]
fn a_flooding_tenant_barely_delays_a_polite_one() {
    // The regions are busy in both runs: two tenants keep more than their
    // share queued. The polite one sends half its share. The fourth sends
    // its share, then twenty times its share.
    let w = world(vec![
        ("polite", 1.0),
        ("busy1", 1.0),
        ("busy2", 1.0),
        ("flood", 1.0),
    ]);
    let share = w.supply_per_sec() / 4.0;
    let mean = mean_heavy();
    let run = |flood_factor: f64| {
        let mut rng = Lcg(3);
        let mut arrivals = poisson(
            &mut rng,
            0,
            |_| 0.5 * share / mean,
            Duration::ZERO,
            secs(660),
            heavy,
        );
        for t in 1..3 {
            arrivals.extend(poisson(
                &mut rng,
                t,
                |_| 2.0 * share / mean,
                Duration::ZERO,
                secs(660),
                heavy,
            ));
        }
        arrivals.extend(poisson(
            &mut rng,
            3,
            |_| flood_factor * share / mean,
            Duration::ZERO,
            secs(660),
            heavy,
        ));
        w.run(arrivals)
    };
    let calm = run(1.0);
    let flooded = run(20.0);
    // Waits after the first minute (the buckets' initial burst).
    let waits = |r: &common::vsim::Run| {
        let mut waits: Vec<Duration> = r
            .arrivals
            .iter()
            .zip(&r.fates)
            .filter(|(a, _)| a.tenant == 0 && a.at >= secs(60))
            .filter_map(|(a, f)| f.granted.map(|g| g - a.at))
            .collect();
        waits.sort();
        waits
    };
    let served = |r: &common::vsim::Run| {
        let polite: Vec<_> = r
            .arrivals
            .iter()
            .zip(&r.fates)
            .filter(|(a, _)| a.tenant == 0)
            .collect();
        polite.iter().filter(|(_, f)| f.granted.is_some()).count() as f64 / polite.len() as f64
    };
    // Under contention a request waits for its tokens to refill in one
    // region; one refill interval is the time the fastest region takes to
    // refill the largest request of the workload.
    let fastest = w
        .regions
        .iter()
        .map(|(_, tpm)| *tpm as f64 / 60.0)
        .fold(0.0, f64::max);
    let refill_interval = Duration::from_secs_f64(8_000.0 / fastest);
    let (calm_waits, flooded_waits) = (waits(&calm), waits(&flooded));
    let (calm_p99, flooded_p99) = (percentile(&calm_waits, 0.99), percentile(&flooded_waits, 0.99));
    println!(
        "polite tenant's queue wait: p50 {:?} / p99 {calm_p99:?} while the fourth tenant sends its share, \
         p50 {:?} / p99 {flooded_p99:?} while it sends 20x its share; the p99 rose {:?} (one refill interval is {refill_interval:?}); \
         served {:.1} % vs {:.1} %",
        percentile(&calm_waits, 0.5),
        percentile(&flooded_waits, 0.5),
        flooded_p99.saturating_sub(calm_p99),
        100.0 * served(&calm),
        100.0 * served(&flooded)
    );
    println!("  flooded run refusals: {:?}", flooded.refusals);
    assert_eq!(flooded.overruns, 0);
    assert!(
        flooded_p99.saturating_sub(calm_p99) <= refill_interval,
        "the flood raised the polite tenant's p99 wait by more than one refill interval"
    );
    assert!(
        served(&flooded) >= 0.99,
        "the polite tenant's requests were refused"
    );
}

#[test]
fn an_idle_tenant_gets_its_share_back_within_a_second() {
    let w = world(vec![("steady", 1.0), ("returning", 1.0)]);
    let mut rng = Lcg(4);
    let small = |_: &mut Lcg| (150u64, 50u64);
    let rate = 2.0 * w.supply_per_sec() / 200.0;
    let mut arrivals = poisson(&mut rng, 0, |_| rate, Duration::ZERO, secs(300), small);
    arrivals.extend(poisson(&mut rng, 1, |_| rate, Duration::ZERO, secs(120), small));
    arrivals.extend(poisson(&mut rng, 1, |_| rate, secs(240), secs(300), small));
    let r = w.run(arrivals);
    let share = |from: Duration, to: Duration| {
        let a = r.granted_tokens(0, from, to) as f64;
        let b = r.granted_tokens(1, from, to) as f64;
        b / (a + b)
    };
    let back = secs(240);
    println!(
        "returning tenant's share: {:.1} % before going idle, {:.1} % while idle, {:.1} % in its first second back, {:.1} % in the next minute",
        100.0 * share(secs(60), secs(120)),
        100.0 * share(secs(150), secs(240)),
        100.0 * share(back, back + secs(1)),
        100.0 * share(back + secs(1), back + secs(61))
    );
    assert_eq!(r.overruns, 0);
    assert_eq!(share(secs(150), secs(240)), 0.0);
    assert!(
        share(secs(180), secs(240)) == 0.0 && r.granted_tokens(0, secs(180), secs(240)) > 0,
        "the idle share went to the other"
    );
    assert!(
        share(back, back + secs(1)) >= 0.45,
        "not its full share within a second"
    );
    assert!(share(back + secs(1), back + secs(61)) >= 0.48);
}
