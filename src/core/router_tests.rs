//! The routing decision, on a virtual clock.

use std::sync::Arc;
use std::time::Duration;

use super::breaker::Circuit;
use super::load::Outcome;
use super::model::ModelSpec;
use super::model_quota::{Accounting, ModelLimits, ProviderHint, Settlement};
use super::region::RegionSpec;
use super::router::{Completion, RouteError, RouteRequest, Router, RouterSpec};
use super::strategy::{StrategyKind, StrategyParams};

fn limits(tpm: u64, rpm: u64) -> ModelLimits {
    ModelLimits {
        tokens_per_minute: tpm,
        requests_per_minute: rpm,
        burst_tokens: None,
        burst_requests: None,
        accounting: Accounting::Usage,
    }
}

fn region(name: &str, models: &[(&str, u64)]) -> RegionSpec {
    RegionSpec {
        name: name.into(),
        weight: 1.0,
        max_concurrent: 100,
        models: models
            .iter()
            .map(|(m, tpm)| (m.to_string(), limits(*tpm, 1000)))
            .collect(),
    }
}

fn spec(strategy: StrategyKind) -> RouterSpec {
    RouterSpec {
        models: vec![
            ModelSpec {
                name: "small".into(),
                default_max_output_tokens: 10,
                chars_per_token: 4.0,
                max_request_tokens: 1_000_000,
            },
            ModelSpec {
                name: "big".into(),
                default_max_output_tokens: 10,
                chars_per_token: 4.0,
                max_request_tokens: 1_000_000,
            },
        ],
        regions: vec![
            region("c", &[("small", 6_000)]),
            region("a", &[("small", 60_000), ("big", 60_000)]),
            region("b", &[("small", 60_000)]),
        ],
        strategy,
        params: StrategyParams::default(),
        seed: 7,
        breaker: crate::core::BreakerConfig::default(),
        sharing: None,
    }
}

fn req(model: &str, tokens: u64) -> RouteRequest<'_> {
    RouteRequest {
        model,
        tokens,
        origin: None,
    }
}

fn used(prompt: u64, completion: u64) -> Completion {
    Completion {
        settlement: Settlement::Used { prompt, completion },
        outcome: Some(Outcome::Success),
        latency: Duration::from_millis(100),
        hint: None,
        load: None,
        provider_refused: None,
    }
}

#[test]
fn regions_are_kept_in_name_order() {
    let r = Router::try_new(spec(StrategyKind::RoundRobin), crate::testing::epoch()).unwrap();
    let names: Vec<_> = r.regions().iter().map(|r| r.name()).collect();
    assert_eq!(names, ["a", "b", "c"]);
}

#[test]
fn only_regions_serving_the_model_are_candidates() {
    let t0 = crate::testing::epoch();
    let mut r = Router::try_new(spec(StrategyKind::RoundRobin), t0).unwrap();
    for _ in 0..3 {
        assert_eq!(&*r.reserve(&req("big", 10), &[], t0).unwrap().region, "a");
    }
    let p = r.preview(&req("big", 10), t0).unwrap();
    assert_eq!(
        p.candidates[1].excluded.as_deref(),
        Some("does not serve this model")
    );
}

#[test]
fn unknown_model_and_oversized_requests_are_refused_with_reasons() {
    let t0 = crate::testing::epoch();
    let mut r = Router::try_new(spec(StrategyKind::WeightedLoad), t0).unwrap();
    match r.reserve(&req("gpt-9", 1), &[], t0) {
        Err(RouteError::UnknownModel { known, .. }) => assert_eq!(known, "big, small"),
        other => panic!("{other:?}"),
    }
    match r.reserve(&req("small", 60_001), &[], t0) {
        Err(RouteError::TooLarge {
            need: 60_001,
            largest: 60_000,
            ..
        }) => {}
        other => panic!("{other:?}"),
    }
}

#[test]
fn a_region_without_quota_is_skipped_and_the_earliest_refill_is_reported() {
    let t0 = crate::testing::epoch();
    let mut r = Router::try_new(spec(StrategyKind::RoundRobin), t0).unwrap();
    // 6,000 tokens/min in c: 100/s. Take all of c, then everything elsewhere.
    let mut seen = std::collections::BTreeMap::new();
    while let Ok(res) = r.reserve(&req("small", 3_000), &[], t0) {
        *seen.entry(res.region.to_string()).or_insert(0) += 1;
    }
    assert_eq!(seen["a"], 20);
    assert_eq!(seen["b"], 20);
    assert_eq!(seen["c"], 2);
    match r.reserve(&req("small", 3_000), &[], t0) {
        Err(RouteError::NoCapacity { retry_after, summary }) => {
            // c refills 3,000 tokens in 30 s, a and b in 3 s.
            assert_eq!(retry_after, Some(Duration::from_secs(3)));
            assert!(
                summary.contains("c: token quota: needs 3000, 0 left"),
                "{summary}"
            );
        }
        other => panic!("{other:?}"),
    }
    assert!(
        r.reserve(&req("small", 3_000), &[], t0 + Duration::from_secs(3))
            .is_ok()
    );
}

#[test]
fn max_concurrent_caps_a_region() {
    let t0 = crate::testing::epoch();
    let mut s = spec(StrategyKind::LeastOutstanding);
    s.regions = vec![region("a", &[("small", 600_000)])];
    s.regions[0].max_concurrent = 2;
    let mut r = Router::try_new(s, t0).unwrap();
    let first = r.reserve(&req("small", 1), &[], t0).unwrap();
    r.reserve(&req("small", 1), &[], t0).unwrap();
    match r.reserve(&req("small", 1), &[], t0) {
        Err(RouteError::NoCapacity {
            retry_after: None,
            summary,
        }) => {
            assert!(summary.contains("at max_concurrent (2/2"), "{summary}")
        }
        other => panic!("{other:?}"),
    }
    r.settle(&first, used(1, 0), t0);
    assert!(r.reserve(&req("small", 1), &[], t0).is_ok());
}

#[test]
fn preview_consumes_nothing() {
    let t0 = crate::testing::epoch();
    for kind in StrategyKind::ALL {
        let mut a = Router::try_new(spec(kind), t0).unwrap();
        let mut b = Router::try_new(spec(kind), t0).unwrap();
        let mut picks_a = Vec::new();
        let mut picks_b = Vec::new();
        for _ in 0..12 {
            let p = a.preview(&req("small", 500), t0).unwrap();
            let chosen = a.reserve(&req("small", 500), &[], t0).unwrap();
            assert_eq!(
                p.chosen.as_deref(),
                Some(&*chosen.region),
                "{kind}: preview shows the next pick"
            );
            picks_a.push(chosen.region.to_string());
            picks_b.push(b.reserve(&req("small", 500), &[], t0).unwrap().region.to_string());
        }
        assert_eq!(picks_a, picks_b, "{kind}: previews changed the decisions");
        for (ra, rb) in a.regions().iter().zip(b.regions()) {
            let id = 1; // "small"
            assert_eq!(
                ra.quota(id).unwrap().tokens().available(t0),
                rb.quota(id).unwrap().tokens().available(t0)
            );
        }
    }
}

#[test]
fn preview_explains_every_region() {
    let t0 = crate::testing::epoch();
    let mut r = Router::try_new(spec(StrategyKind::WeightedLoad), t0).unwrap();
    r.set_drained("b", true);
    let p = r.preview(&req("big", 10), t0).unwrap();
    assert_eq!(p.chosen.as_deref(), Some("a"));
    assert_eq!(p.candidates.len(), 3);
    assert!(p.candidates[0].eligible);
    assert!(p.candidates[0].factors.get("headroom").is_some());
    assert!(p.candidates[0].score > 0.0);
    let p = r.preview(&req("small", 10), t0).unwrap();
    assert_eq!(
        p.candidates[1].excluded.as_deref(),
        Some("drained by an operator")
    );
}

#[test]
fn failover_skips_tried_regions_and_reports_unavailable_when_none_left() {
    let t0 = crate::testing::epoch();
    let mut r = Router::try_new(spec(StrategyKind::RoundRobin), t0).unwrap();
    let tried: Vec<Arc<str>> = vec!["a".into(), "b".into(), "c".into()];
    assert!(matches!(
        r.reserve(&req("small", 1), &tried, t0),
        Err(RouteError::Unavailable { .. })
    ));
    let first = r.reserve(&req("small", 1), &tried[..1], t0).unwrap();
    assert_eq!(&*first.region, "b");
}

#[test]
fn settle_refunds_under_usage_accounting_and_feeds_the_load_state() {
    let t0 = crate::testing::epoch();
    let mut r = Router::try_new(spec(StrategyKind::RoundRobin), t0).unwrap();
    let res = r.reserve(&req("big", 1_000), &[], t0).unwrap();
    let q = |r: &Router| r.region("a").unwrap().quota(0).unwrap().tokens().available(t0);
    assert_eq!(q(&r), 59_000);
    assert_eq!(r.region("a").unwrap().load().in_flight(), 1);
    let settled = r.settle(&res, used(100, 200), t0);
    assert_eq!(settled.charged, 300);
    assert_eq!(q(&r), 59_700);
    let load = r.region("a").unwrap().load();
    assert_eq!(load.in_flight(), 0);
    assert_eq!(load.latency_per_1k_ms(t0), Some(100.0));
    // Settling twice changes nothing.
    r.settle(&res, used(0, 0), t0);
    assert_eq!(q(&r), 59_700);
}

#[test]
fn provider_refusal_takes_the_region_out_until_that_request_fits() {
    let t0 = crate::testing::epoch();
    let mut s = spec(StrategyKind::RoundRobin);
    s.regions.truncate(2); // c, a
    let mut r = Router::try_new(s, t0).unwrap();
    let res = r.reserve(&req("small", 10), &[], t0).unwrap();
    assert_eq!(&*res.region, "a");
    r.settle(
        &res,
        Completion {
            settlement: Settlement::NotRun,
            outcome: None,
            provider_refused: Some(Duration::from_secs(2)),
            ..Completion::abandoned()
        },
        t0,
    );
    for _ in 0..3 {
        assert_eq!(&*r.reserve(&req("small", 10), &[], t0).unwrap().region, "c");
    }
    let p = r.preview(&req("small", 10), t0).unwrap();
    let why = p.candidates[0].excluded.as_deref().unwrap();
    assert!(why.ends_with("fits in 2000.0ms"), "{why}");
    let later = t0 + Duration::from_secs(2);
    assert!(r.preview(&req("small", 10), later).unwrap().candidates[0].eligible);
}

#[test]
fn hints_from_the_provider_lower_the_level() {
    let t0 = crate::testing::epoch();
    let mut r = Router::try_new(spec(StrategyKind::RoundRobin), t0).unwrap();
    let res = r.reserve(&req("big", 1_000), &[], t0).unwrap();
    let mut c = used(1_000, 0);
    c.hint = Some(ProviderHint {
        remaining_tokens: 5_000,
        remaining_requests: 900,
        ..Default::default()
    });
    r.settle(&res, c, t0);
    assert_eq!(
        r.region("a").unwrap().quota(0).unwrap().tokens().available(t0),
        5_000
    );
}

#[test]
fn reload_keeps_fill_fraction_and_load_and_drops_removed_regions() {
    let t0 = crate::testing::epoch();
    let mut r = Router::try_new(spec(StrategyKind::RoundRobin), t0).unwrap();
    let on_c = {
        let mut res;
        loop {
            res = r.reserve(&req("small", 1_500), &[], t0).unwrap();
            if &*res.region == "c" {
                break;
            }
        }
        res
    };
    // c is at 4,500 / 6,000 = 75 %. Halve its limit; remove b.
    let mut next = spec(StrategyKind::RoundRobin);
    next.regions[0].models[0].1.tokens_per_minute = 3_000;
    next.regions.remove(2);
    r.apply(next, t0).unwrap();
    let c = r.region("c").unwrap();
    assert_eq!(c.quota(1).unwrap().tokens().available(t0), 2_250);
    assert_eq!(c.load().in_flight(), 1, "in-flight work survives the reload");
    assert!(r.region("b").is_none());
    let settled = r.settle(&on_c, used(1_500, 0), t0);
    assert!(settled.found);
    assert_eq!(r.region("c").unwrap().load().in_flight(), 0);
}

#[test]
fn work_on_a_removed_region_settles_into_nothing() {
    let t0 = crate::testing::epoch();
    let mut r = Router::try_new(spec(StrategyKind::RoundRobin), t0).unwrap();
    let on_a = r.reserve(&req("small", 10), &[], t0).unwrap();
    let mut next = spec(StrategyKind::RoundRobin);
    next.regions.remove(1);
    r.apply(next, t0).unwrap();
    assert!(!r.settle(&on_a, used(10, 0), t0).found);
}

#[test]
fn locality_prefers_the_callers_region() {
    let t0 = crate::testing::epoch();
    let mut r = Router::try_new(spec(StrategyKind::WeightedLoad), t0).unwrap();
    let from_b = RouteRequest {
        model: "small",
        tokens: 10,
        origin: Some("b"),
    };
    assert_eq!(&*r.reserve(&from_b, &[], t0).unwrap().region, "b");
}

#[test]
fn an_open_circuit_takes_a_region_out_until_its_cool_down() {
    let t0 = crate::testing::epoch();
    let mut s = spec(StrategyKind::RoundRobin);
    s.regions.truncate(2); // c, a
    let mut r = Router::try_new(s, t0).unwrap();
    let failed = Completion {
        settlement: Settlement::NotRun,
        outcome: Some(Outcome::Failure),
        ..Completion::abandoned()
    };
    // Five failures in a row on a open the circuit (the default threshold).
    let mut opened = None;
    for _ in 0..5 {
        let res = r.reserve(&req("small", 1), &["c".into()], t0).unwrap();
        assert_eq!(&*res.region, "a");
        opened = r.settle(&res, failed, t0).transition.or(opened);
    }
    assert_eq!(opened.map(|t| t.to), Some(Circuit::Open));
    for _ in 0..3 {
        assert_eq!(&*r.reserve(&req("small", 1), &[], t0).unwrap().region, "c");
    }
    let p = r.preview(&req("small", 1), t0).unwrap();
    assert!(
        p.candidates[0]
            .excluded
            .as_deref()
            .unwrap()
            .starts_with("circuit open"),
        "{p:?}"
    );
    // After the cool-down a trial goes through; a success closes it again.
    let t1 = t0 + Duration::from_secs(5);
    let trial = r.reserve(&req("small", 1), &["c".into()], t1).unwrap();
    assert_eq!(&*trial.region, "a");
    let mut closed = r.settle(&trial, used(1, 0), t1).transition.map(|t| t.to);
    assert_eq!(closed, None, "one of three trials");
    assert_eq!(r.region("a").unwrap().circuit(t1).name(), "half_open");
    for _ in 0..2 {
        let trial = r.reserve(&req("small", 1), &["c".into()], t1).unwrap();
        closed = r
            .settle(&trial, used(1, 0), t1)
            .transition
            .map(|t| t.to)
            .or(closed);
    }
    assert_eq!(closed, Some(Circuit::Closed), "three good trials close it");
}
