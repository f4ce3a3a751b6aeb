//! `core::central`: shares split evenly, and the fence (a failover or a
//! reloaded snapshot restarts the level empty).

use super::*;
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};

/// Three replicas with equal, endless demand for 100-token requests
/// against 200 tokens of refill a tick; `calls` are (µs, replica).
/// Requests served per replica.
fn serve(mut calls: Vec<(u64, usize)>) -> [u64; 3] {
    let limits = CentralLimits {
        tokens_per_minute: 120_000,
        token_capacity: 8_000,
        requests_per_minute: 1_000_000,
        request_capacity: 100_000,
        replicas_floor: 3,
        hold_for: Duration::from_secs(1),
    };
    calls.sort();
    let mut bucket = None;
    let mut have = [0u64; 3];
    let mut spent = [0u64; 3];
    let mut served = [0u64; 3];
    for (seq, (now_us, r)) in calls.into_iter().enumerate() {
        let call = SyncCall {
            seq: seq as u64 + 1,
            ask_tokens: 2_666u64.saturating_sub(have[r]),
            ask_requests: 100,
            need_tokens: 100u64.saturating_sub(have[r]),
            held_tokens: have[r],
            spent_tokens: spent[r],
            ..SyncCall::default()
        };
        let grant = call_or_create(&mut bucket, &format!("r{r}"), &limits, &call, now_us);
        have[r] += grant.tokens;
        // Every request waiting goes as soon as it fits.
        served[r] += have[r] / 100;
        spent[r] += have[r] / 100 * 100;
        have[r] %= 100;
    }
    served
}

fn assert_even(served: [u64; 3], case: &str) {
    let (lo, hi) = (*served.iter().min().unwrap(), *served.iter().max().unwrap());
    assert!(lo > 300, "{case}: {served:?}");
    assert!(hi as f64 <= lo as f64 * 1.05, "{case}: served {served:?}");
}

/// Calls at fixed phases of a 100 ms tick, as in one benches/replicas
/// run: each replica is served a third. Before a replica served queued
/// from its grant (not its next call) and behind every older need (not
/// only the oldest), [12, 38, 70] served 500, 300 and 399. Other fixed
/// phases still skew ([40, 10, 95]: 359, 360, 479): see the next test.
#[test]
fn equal_demand_is_served_equally_at_fixed_phases() {
    for phases in [[12u64, 38, 70], [0, 33, 66]] {
        let calls = (0..600u64)
            .flat_map(|tick| (0..3).map(move |r| (tick * 100_000 + phases[r] * 1_000, r)))
            .collect();
        assert_even(serve(calls), &format!("phases {phases:?}"));
    }
}

/// Replicas calling a few ms apart after a long gap: at fixed phases the
/// first after the gap is served up to twice as often (it sees the
/// refill first and fits behind one older need). The sync task's tick
/// is jittered (90-110 ms, `cluster::sync`), so phases move and every
/// replica gets its third.
#[test]
fn jittered_ticks_serve_every_phase_equally() {
    for (seed, phases) in [[0u64, 5, 10], [40, 10, 95], [12, 38, 70]]
        .into_iter()
        .enumerate()
    {
        let mut rng = SmallRng::seed_from_u64(seed as u64);
        let mut calls = Vec::new();
        for (r, phase) in phases.iter().enumerate() {
            let mut t = phase * 1_000;
            while t < 300_000_000 {
                calls.push((t, r));
                t += rng.random_range(90_000..110_000);
            }
        }
        assert_even(serve(calls), &format!("jittered from phases {phases:?}"));
    }
}

/// How the calls after a failover reach the bucket in the tests below.
#[derive(Clone, Copy, PartialEq)]
enum Fence {
    /// `call_in_epoch`: the bucket restarts when behind or from another epoch.
    On,
    /// The bucket as found, applied (the code before the fence).
    Off,
}

/// Two replicas spending at once all they are granted against a strict
/// provider (burst 1,000, 1,000 tokens a second). Quiet for 3 s (the level
/// fills to the burst); the Redis replica's copy is taken then; only
/// replica "a" then asks for 1,000 and spends it on the primary; the
/// primary dies and the copy answers from `promoted_at` (µs) on, in
/// `epoch`, first to "b" (which saw nothing newer than the copy). Returns
/// the provider's lowest level (below zero: it refused) and how the
/// promoted bucket restarted at its first call.
fn failover(epoch: &str, fence: Fence, promoted_at: u64) -> (f64, Option<Restart>) {
    let limits = CentralLimits {
        tokens_per_minute: 60_000,
        token_capacity: 1_000,
        requests_per_minute: 60_000,
        request_capacity: 1_000,
        replicas_floor: 2,
        hold_for: Duration::from_secs(1),
    };
    let names = ["a", "b"];
    let mut seq = [0u64; 2];
    let mut spent = [0u64; 2];
    let mut seen = [0u64; 2];
    let (mut provider, mut provider_at, mut lowest) = (1_000.0f64, 0u64, f64::MAX);
    let mut call =
        |bucket: &mut Option<CentralBucket>, r: usize, ask: u64, now_us: u64, on: &str, fence: Fence| {
            seq[r] += 1;
            let c = SyncCall {
                seq: seq[r],
                ask_tokens: ask,
                ask_requests: ask.min(1),
                spent_tokens: spent[r],
                spent_requests: spent[r].min(1),
                generation: seen[r],
                ..SyncCall::default()
            };
            let restarted = restart(bucket, on, &c);
            let g = match fence {
                Fence::On => call_in_epoch(bucket, on, names[r], &limits, &c, now_us),
                Fence::Off => bucket
                    .as_mut()
                    .expect("the copy")
                    .apply(names[r], &limits, &c, now_us, false),
            };
            seen[r] = seen[r].max(g.generation);
            // Spent at once at the provider, which refills at its rate.
            provider = (provider + (now_us - provider_at) as f64 / 1_000.0).min(1_000.0) - g.tokens as f64;
            provider_at = now_us;
            lowest = lowest.min(provider);
            spent[r] += g.tokens;
            restarted
        };
    let mut primary = None;
    for tick in 0..30u64 {
        for r in 0..2 {
            call(
                &mut primary,
                r,
                0,
                tick * 100_000 + r as u64 * 10_000,
                "primary",
                Fence::On,
            );
        }
    }
    let copy = primary.clone();
    call(&mut primary, 0, 1_000, 3_050_000, "primary", Fence::On);
    let mut promoted = copy;
    let mut first = None;
    for tick in 0..30u64 {
        for r in [1, 0] {
            let at = promoted_at + tick * 100_000 + (1 - r as u64) * 10_000;
            let restarted = call(&mut promoted, r, 1_000, at, epoch, fence);
            if tick == 0 && r == 1 {
                first = restarted;
            }
        }
    }
    (lowest, first)
}

/// A replica promoted with a level from before the grants it never saw:
/// another epoch, so the first call there restarts the bucket empty, even
/// from a replica that saw nothing newer, and the provider never refuses.
/// Without the fence the promoted copy hands the spent burst out again: the
/// provider is 800 tokens short.
#[test]
fn a_promoted_replica_that_lags_restarts_empty_and_never_overshoots() {
    let (lowest, first) = failover("promoted", Fence::On, 3_200_000);
    assert_eq!(first, Some(Restart::NewEpoch));
    assert!(lowest >= 0.0, "the provider refused: {lowest}");
    let (lowest, _) = failover("promoted", Fence::Off, 3_200_000);
    assert!(lowest < -700.0, "without the fence the copy overshoots: {lowest}");
}

/// A snapshot reloaded into the same server (no new epoch): a caller that
/// saw a later generation finds the bucket behind and restarts it.
#[test]
fn a_bucket_behind_a_callers_generation_restarts_empty() {
    let limits = CentralLimits {
        tokens_per_minute: 60_000,
        token_capacity: 1_000,
        requests_per_minute: 600,
        request_capacity: 10,
        replicas_floor: 1,
        hold_for: Duration::from_secs(1),
    };
    let call = |seq: u64, generation: u64| SyncCall {
        seq,
        ask_tokens: 500,
        generation,
        ..SyncCall::default()
    };
    let mut bucket = None;
    let first = call_in_epoch(&mut bucket, "e", "a", &limits, &call(1, 0), 0);
    assert!(first.fresh && first.generation == 1, "{first:?}");
    let snapshot = bucket.clone();
    let mut seen = first.generation;
    for seq in 2..30 {
        seen = call_in_epoch(&mut bucket, "e", "a", &limits, &call(seq, seen), seq * 100_000).generation;
    }
    assert_eq!(seen, 29, "every applied call advances the generation");
    // A repeated call changes nothing, the generation included.
    let repeated = call_in_epoch(&mut bucket, "e", "a", &limits, &call(29, seen), 3_000_000);
    assert!(repeated.stale && repeated.generation == 29);

    let mut reloaded = snapshot;
    assert_eq!(restart(&reloaded, "e", &call(30, seen)), Some(Restart::Behind));
    let g = call_in_epoch(&mut reloaded, "e", "a", &limits, &call(30, seen), 3_100_000);
    assert!(g.fresh && g.tokens == 0 && g.level_tokens == -1_000, "{g:?}");
    assert_eq!(g.generation, seen + GENERATION_JUMP + 1);
    // Another caller that saw the lost calls does not restart it again.
    let other = SyncCall {
        generation: seen,
        ..call(1, seen)
    };
    assert_eq!(restart(&reloaded, "e", &other), None);
    // Nor does a caller that saw nothing newer than the bucket.
    assert_eq!(restart(&reloaded, "e", &call(31, 2)), None);
}
