//! `weighted_load` at light load, on a virtual clock: near-equal scores
//! spread the work (fewest outstanding, then rotation) instead of sending
//! it all to the first name; a clear score difference still wins.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use super::load::Outcome;
use super::model::ModelSpec;
use super::model_quota::{Accounting, ModelLimits, Settlement};
use super::region::RegionSpec;
use super::router::{Completion, Reservation, RouteRequest, Router, RouterSpec};
use super::strategy::{StrategyKind, StrategyParams};

fn region(name: &str, weight: f64) -> RegionSpec {
    RegionSpec {
        name: name.into(),
        weight,
        max_concurrent: 100,
        models: vec![(
            "m".into(),
            ModelLimits {
                tokens_per_minute: 600_000,
                requests_per_minute: 6_000,
                burst_tokens: None,
                burst_requests: None,
                accounting: Accounting::Usage,
            },
        )],
    }
}

fn router(regions: Vec<RegionSpec>, params: StrategyParams, t0: Instant) -> Router {
    Router::try_new(
        RouterSpec {
            models: vec![ModelSpec {
                name: "m".into(),
                default_max_output_tokens: 10,
                chars_per_token: 4.0,
                max_request_tokens: 1_000_000,
            }],
            regions,
            strategy: StrategyKind::WeightedLoad,
            params,
            seed: 1,
            breaker: crate::core::BreakerConfig::default(),
            sharing: None,
        },
        t0,
    )
    .unwrap()
}

fn identical() -> Vec<RegionSpec> {
    vec![region("a", 1.0), region("b", 1.0), region("c", 1.0)]
}

const REQ: RouteRequest<'static> = RouteRequest {
    model: "m",
    tokens: 1_000,
    origin: None,
};

fn done(latency: Duration) -> Completion {
    Completion {
        settlement: Settlement::Used {
            prompt: 100,
            completion: 200,
        },
        outcome: Some(Outcome::Success),
        latency,
        hint: None,
        load: None,
        provider_refused: None,
    }
}

/// `n` requests one second apart (the buckets are full again before each),
/// each settled with `latency` before the next is sent; picks per region.
fn sequential(r: &mut Router, n: u64, latency: Duration, t0: Instant) -> BTreeMap<String, u32> {
    let mut seen = BTreeMap::new();
    for i in 0..n {
        let now = t0 + Duration::from_secs(i);
        let res = r.reserve(&REQ, &[], now).unwrap();
        *seen.entry(res.region.to_string()).or_insert(0) += 1;
        r.settle(&res, done(latency), now);
    }
    seen
}

fn counts(seen: &BTreeMap<String, u32>) -> Vec<u32> {
    ["a", "b", "c"]
        .iter()
        .map(|n| seen.get(*n).copied().unwrap_or(0))
        .collect()
}

#[test]
fn identical_idle_regions_share_sequential_requests_evenly() {
    let t0 = crate::testing::epoch();
    // Replies too quick to measure: every score is exactly equal.
    let mut r = router(identical(), StrategyParams::default(), t0);
    let seen = sequential(&mut r, 30, Duration::ZERO, t0);
    assert_eq!(counts(&seen), [10, 10, 10], "{seen:?}");
    // Equal latencies that are kept (no idle decay): equal after the first round.
    let params = StrategyParams {
        load_half_life: Duration::ZERO,
        ..StrategyParams::default()
    };
    let mut r = router(identical(), params, t0);
    let seen = sequential(&mut r, 30, Duration::from_millis(100), t0);
    assert_eq!(counts(&seen), [10, 10, 10], "{seen:?}");
}

#[test]
fn a_clearly_better_score_still_takes_all_the_work() {
    let t0 = crate::testing::epoch();
    // c's weight makes its score 10 % higher than a's and b's.
    let regions = vec![region("a", 1.0), region("b", 1.0), region("c", 1.1)];
    let mut r = router(regions, StrategyParams::default(), t0);
    let seen = sequential(&mut r, 30, Duration::ZERO, t0);
    assert_eq!(counts(&seen), [0, 0, 30], "{seen:?}");
}

#[test]
fn among_near_equal_scores_the_fewest_outstanding_wins() {
    let t0 = crate::testing::epoch();
    // b scores 1 % higher than a (weight 1.01): near-equal, so what each
    // has in flight decides, not the score (which would put two on b first).
    let mut r = router(
        vec![region("a", 1.0), region("b", 1.01)],
        StrategyParams::default(),
        t0,
    );
    let mut held: Vec<Reservation> = Vec::new();
    for _ in 0..10 {
        held.push(r.reserve(&REQ, &[], t0).unwrap());
        let a = r.region("a").unwrap().load().in_flight();
        let b = r.region("b").unwrap().load().in_flight();
        assert!(
            a.abs_diff(b) <= 1,
            "a {a} and b {b} in flight after {}",
            held.len()
        );
    }
    let placed: Vec<&str> = held.iter().map(|h| &*h.region).collect();
    assert_eq!(placed, ["a", "b", "a", "b", "a", "b", "a", "b", "a", "b"]);
    // Settle two of a's (3 in flight against b's 5): a until they are
    // even, whatever the rotation says, then the rotation again.
    r.settle(&held[0], done(Duration::ZERO), t0);
    r.settle(&held[2], done(Duration::ZERO), t0);
    let next: Vec<_> = (0..4)
        .map(|_| r.reserve(&REQ, &[], t0).unwrap().region.to_string())
        .collect();
    assert_eq!(next, ["a", "a", "b", "a"]);
}

/// The decision path skips scoring regions whose bound (weight, headroom,
/// locality) is below what could still be picked; `preview` scores every
/// region. Over many mixed states (weights, fill levels, latencies, errors,
/// requests in flight, an origin) both must choose the same region.
#[test]
fn skipping_hopeless_regions_never_changes_the_pick() {
    use rand::rngs::SmallRng;
    use rand::{Rng, SeedableRng};

    let t0 = crate::testing::epoch();
    let names: Vec<String> = (0..12).map(|i| format!("r{i:02}")).collect();
    let mut rng = SmallRng::seed_from_u64(42);
    let regions = names
        .iter()
        .map(|n| region(n, [0.5, 1.0, 1.0, 2.0, 3.0][rng.random_range(0..5)]))
        .collect();
    let mut r = router(regions, StrategyParams::default(), t0);
    let mut open: Vec<(Reservation, Duration)> = Vec::new();
    let mut now = t0;
    for step in 0..5_000 {
        now += Duration::from_millis(rng.random_range(0..40));
        let origin = names[rng.random_range(0..names.len())].as_str();
        let req = RouteRequest {
            model: "m",
            tokens: rng.random_range(100..20_000),
            origin: rng.random_bool(0.5).then_some(origin),
        };
        let preview = r.preview(&req, now).unwrap();
        match r.reserve(&req, &[], now) {
            Ok(res) => {
                assert_eq!(preview.chosen.as_deref(), Some(&*res.region), "step {step}");
                let latency = Duration::from_millis(rng.random_range(50..3_000));
                open.push((res, latency));
            }
            Err(e) => assert_eq!(preview.chosen, None, "step {step}: {e}"),
        }
        // Finish some of what is in flight, a few as failures.
        while open.len() > 8 || (!open.is_empty() && rng.random_bool(0.5)) {
            let (res, latency) = open.swap_remove(rng.random_range(0..open.len()));
            let mut c = done(latency);
            if rng.random_bool(0.1) {
                c.outcome = Some(Outcome::Failure);
            }
            r.settle(&res, c, now);
        }
    }
}
