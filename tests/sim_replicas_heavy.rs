//! Issue 25's case on the virtual clock: heavy-tailed requests on three
//! regions of unequal size whose strict providers start empty, the same
//! arrivals sent to one process without `[cluster]`, to one with it and to
//! three replicas sharing the quota (`core::central`, what Redis runs), and
//! to one process with and without its queue. The bound (every window within
//! `burst + rate × window`, no provider refusal) is checked here as in
//! `sim_replicas.rs`; docs/SCALING.md and docs/OVERLOAD.md print the tables.

mod common;

use std::time::Duration;

/// Issue 25's case: heavy-tailed sizes (loadgen's `heavy`: prompts Pareto
/// from 100 tokens, outputs from 50, up to 10,000 together), Poisson
/// arrivals, three regions of 60k / 30k / 15k tokens and 600 / 300 / 150
/// requests a minute behind strict providers that start empty and charge
/// at admission, the default queue (5 s, overload control). The same
/// arrivals go to one process without `[cluster]` and to `replicas`
/// sharing the quota.
mod heavy {
    use std::time::Duration;

    use crate::common::Lcg;
    use crate::common::vsim::{Arrival, Deployment, Run, World, heavy_size as size, percentile, poisson};
    use dispatcher::core::{OverloadSettings, SharingSettings};

    pub const REGIONS: [(&str, u64); 3] = [("d0", 60_000), ("d1", 30_000), ("d2", 15_000)];
    pub const RPM: [u64; 3] = [600, 300, 150];
    pub const SECONDS: u64 = 60;

    pub fn world() -> World {
        World::charged_at_admission(REGIONS.to_vec())
    }

    pub fn arrivals(load: f64, seed: u64) -> Vec<Arrival> {
        let mean = {
            let mut s = Lcg(7);
            (0..50_000).map(|_| size(&mut s)).map(|(p, o)| p + o).sum::<u64>() as f64 / 50_000.0
        };
        let rate = load * world().supply_per_sec() / mean;
        poisson(
            &mut Lcg(seed),
            0,
            |_| rate,
            Duration::ZERO,
            Duration::from_secs(SECONDS),
            size,
        )
    }

    /// `replicas` processes, sharing the quota (`[cluster]`) or not.
    pub fn run(arrivals: Vec<Arrival>, replicas: usize, shared: bool, seed: u64) -> Run {
        world().run_deployed(
            arrivals,
            &Deployment {
                replicas,
                sharing: shared.then(|| SharingSettings {
                    replicas_floor: replicas as u32,
                    ..SharingSettings::default()
                }),
                overload: Some(OverloadSettings::default()),
                requests_per_minute: Some(RPM.to_vec()),
                providers_start_empty: true,
                seed,
                models_per_region: None,
                pump_every: None,
                burst: None,
            },
        )
    }

    pub struct Figures {
        pub successes: usize,
        /// Tokens admitted after the first second over the refill since.
        pub used: f64,
        pub p50: Duration,
        pub unused_p50: i64,
        pub refused: u64,
        /// The largest excess of any 1 s / 10 s window over what a provider
        /// allows in it (burst + rate × window, a minute's worth of burst),
        /// over the regions.
        pub worst_excess: i64,
    }

    pub fn figures(r: &Run) -> Figures {
        let successes = r.fates.iter().filter(|f| f.done.is_some()).count();
        let mut latencies: Vec<Duration> = r
            .arrivals
            .iter()
            .zip(&r.fates)
            .filter_map(|(a, f)| f.done.map(|d| d - a.at))
            .collect();
        latencies.sort();
        let end = Duration::from_secs(SECONDS);
        let after_first: u64 = r
            .admitted
            .iter()
            .flatten()
            .filter(|(t, _)| *t >= Duration::from_secs(1) && *t < end)
            .map(|(_, n)| n)
            .sum();
        let refill = world().supply_per_sec() * (SECONDS - 1) as f64;
        let mut unused = r.unused_level.clone();
        unused.truncate(SECONDS as usize);
        unused.sort();
        let mut worst_excess = i64::MIN;
        for (i, admitted) in r.admitted.iter().enumerate() {
            let tpm = REGIONS[i].1;
            for w in [Duration::from_secs(1), Duration::from_secs(10)] {
                let allowed = (tpm + tpm * w.as_millis() as u64 / 60_000) as i64;
                let mut j = 0;
                let mut sum = 0i64;
                for k in 0..admitted.len() {
                    while j < admitted.len() && admitted[j].0 < admitted[k].0 + w {
                        sum += admitted[j].1 as i64;
                        j += 1;
                    }
                    worst_excess = worst_excess.max(sum - allowed);
                    sum -= admitted[k].1 as i64;
                }
            }
        }
        Figures {
            successes,
            used: after_first as f64 / refill,
            p50: percentile(&latencies, 0.5),
            unused_p50: unused.get(unused.len() / 2).copied().unwrap_or(0),
            refused: r.overruns,
            worst_excess,
        }
    }
}

/// Issue 25: replicas use the quota one process uses on realistic traffic.
/// The same arrivals to one process without `[cluster]`, to one with it,
/// and to three replicas, at 1x and 2x the quota, two seeds: no provider
/// refusal with `[cluster]`, every window within `burst + rate × window`,
/// and the successes and latency of one process.
#[test]
fn heavy_tailed_three_regions_use_the_quota_one_process_uses() {
    use common::vsim::{Run, percentile};
    let mut short = Vec::new();
    for load in [1.0, 2.0] {
        for seed in [1, 2] {
            let arrivals = heavy::arrivals(load, seed);
            let alone_run = heavy::run(arrivals.clone(), 1, false, seed);
            let alone = heavy::figures(&alone_run);
            // Why the others were not served, and how long the served waited
            // for quota (p50 / p90): the refusals and waits the split causes.
            let why = |r: &Run| {
                let waits = r.waits(0);
                format!(
                    "{:?}; waited p50 {:.2} s, p90 {:.2} s",
                    r.refusals,
                    percentile(&waits, 0.5).as_secs_f64(),
                    percentile(&waits, 0.9).as_secs_f64()
                )
            };
            // The tokens offered after the first second against the refill
            // (what "used" counts): at 1x, the most any policy could use.
            let offered = arrivals
                .iter()
                .filter(|a| a.at >= Duration::from_secs(1))
                .map(|a| a.tokens())
                .sum::<u64>() as f64
                / (heavy::world().supply_per_sec() * (heavy::SECONDS - 1) as f64);
            eprintln!(
                "{load}x seed {seed}, {} requests, offered {:.1} % of the quota: one process without [cluster]: {} served, used {:.1} %, p50 {:.2} s, provider unused p50 {}, refused {}",
                arrivals.len(),
                100.0 * offered,
                alone.successes,
                100.0 * alone.used,
                alone.p50.as_secs_f64(),
                alone.unused_p50,
                alone.refused
            );
            eprintln!("    not served: {}", why(&alone_run));
            for replicas in [1, 3] {
                let run = heavy::run(arrivals.clone(), replicas, true, seed);
                let f = heavy::figures(&run);
                let share = f.successes as f64 / alone.successes as f64;
                eprintln!(
                    "  {replicas} with [cluster]: {} served ({:.1} % of one process), used {:.1} %, p50 {:.2} s ({:.2} x), provider unused p50 {}, refused {}, worst window excess {}",
                    f.successes,
                    100.0 * share,
                    100.0 * f.used,
                    f.p50.as_secs_f64(),
                    f.p50.as_secs_f64() / alone.p50.as_secs_f64(),
                    f.unused_p50,
                    f.refused,
                    f.worst_excess,
                );
                eprintln!("    not served: {}", why(&run));
                for (r, t) in run.sharing.iter().enumerate() {
                    eprintln!(
                        "    replica {r}: granted {} / spent {} / given back {} / expired {} tokens",
                        t.granted_tokens, t.spent_tokens, t.returned_tokens, t.expired_tokens
                    );
                }
                let case = format!("{load}x, seed {seed}, {replicas} replica(s)");
                assert_eq!(f.refused, 0, "{case}: provider refusals");
                assert!(f.worst_excess <= 0, "{case}: a window over burst + rate x window");
                // Nothing lapses while Redis answers.
                assert!(run.sharing.iter().all(|t| t.expired_tokens == 0), "{case}");
                // One process's successes (one replica: within 3 %; three,
                // whose quota is split tick by tick: within 5 %).
                // Printed for every case before failing on any.
                let floor = if replicas == 1 { 0.97 } else { 0.95 };
                if share < floor {
                    short.push(format!(
                        "{case}: {:.1} % of one process's successes",
                        100.0 * share
                    ));
                }
                if load >= 2.0 {
                    assert!(
                        f.used >= 0.95,
                        "{case}: {:.1} % of the quota used",
                        100.0 * f.used
                    );
                }
            }
        }
    }
    assert!(short.is_empty(), "{short:#?}");
}

/// One process without `[cluster]` on the same heavy-tailed arrivals: the
/// default queue against `max_queue_wait = "0s"` (issue 25's one-process
/// part; docs/OVERLOAD.md), with who each one served by size and when.
/// Printed, not asserted: the default queue does not reach the no-queue
/// successes at twice the quota (see the table). `OVERLOAD_HOLD_SHARE`
/// changes the queue's hold share, as in `sim_overload.rs`.
#[test]
#[ignore = "prints the one-process table of docs/OVERLOAD.md"]
fn one_process_queue_against_no_queue() {
    use common::vsim::{Deployment, Run};
    use dispatcher::core::OverloadSettings;
    let mut settings = OverloadSettings::default();
    if let Some(f) = std::env::var("OVERLOAD_HOLD_SHARE")
        .ok()
        .and_then(|v| v.parse().ok())
    {
        settings.hold_share = f;
    }
    // Served of offered, by size: < 500, 500-1,999, >= 2,000 tokens; and
    // served in each 10 s of the minute (by when they were sent).
    let by_size = |r: &Run| {
        let mut classes = [(0, 0); 3];
        for (a, f) in r.arrivals.iter().zip(&r.fates) {
            let c = &mut classes[match a.tokens() {
                0..500 => 0,
                500..2_000 => 1,
                _ => 2,
            }];
            c.1 += 1;
            c.0 += f.granted.is_some() as u64;
        }
        classes.map(|(ok, all)| format!("{ok}/{all}")).join(", ")
    };
    let by_time = |r: &Run| {
        let mut tens = [0; 6];
        for g in r.fates.iter().filter_map(|f| f.granted) {
            tens[(g.as_secs() / 10).min(5) as usize] += 1;
        }
        tens.map(|n| n.to_string()).join(" ")
    };
    for load in [1.0, 2.0] {
        for seed in [1, 2] {
            let arrivals = heavy::arrivals(load, seed);
            let deployment = |overload| Deployment {
                replicas: 1,
                sharing: None,
                overload,
                requests_per_minute: Some(heavy::RPM.to_vec()),
                providers_start_empty: true,
                seed,
                models_per_region: None,
                pump_every: None,
                burst: None,
            };
            let queue = heavy::world().run_deployed(arrivals.clone(), &deployment(Some(settings)));
            let mut no_queue = heavy::world();
            no_queue.max_wait = Duration::ZERO;
            let none = no_queue.run_deployed(arrivals, &deployment(None));
            let (q, n) = (heavy::figures(&queue), heavy::figures(&none));
            let count = |r: &Run, why: &str| r.refusals.get(why).copied().unwrap_or(0);
            println!(
                "| {load}x, seed {seed} | {} / {} ({:.1} %) | {:.2} / {:.2} s | {} | {} | {} | {} / {} | {} / {} |",
                q.successes,
                n.successes,
                100.0 * q.successes as f64 / n.successes as f64,
                q.p50.as_secs_f64(),
                n.p50.as_secs_f64(),
                count(&queue, "refused at once: would wait in vain"),
                count(&queue, "refused at once: shedding"),
                count(&queue, "expired while waiting"),
                by_size(&queue),
                by_size(&none),
                by_time(&queue),
                by_time(&none),
            );
        }
    }
}
