//! Capacity rules on a simulated clock: one sample a second.

use std::time::{Duration, Instant};

use super::*;

fn rule(action: CapacityAction) -> CapacityRuleSpec {
    CapacityRuleSpec {
        region: "eu".into(),
        model: None,
        signal: CapacitySignal::Utilization,
        enter: 0.9,
        exit: 0.7,
        duration: Duration::from_secs(30),
        cool_down: Duration::from_secs(60),
        action,
        weight_factor: 0.25,
    }
}

/// Runs `rules` one sample a second from `t0 + from` for `secs`, the value
/// at second `s` being `value(s)`; returns (second, event kind) for each
/// transition.
fn run(
    rules: &mut CapacityRules,
    t0: Instant,
    from: u64,
    secs: u64,
    value: impl Fn(u64) -> f64,
) -> Vec<(u64, CapacityEventKind)> {
    let mut out = Vec::new();
    for s in from..from + secs {
        let v = value(s);
        for e in rules.step(t0 + Duration::from_secs(s), |_| Some(v)) {
            out.push((s, e.kind));
        }
    }
    out
}

#[test]
fn held_at_95_percent_enters_once_after_the_duration_and_exits_below_exit() {
    let t0 = crate::testing::epoch();
    let mut rules = CapacityRules::new(vec![rule(CapacityAction::RejectNew)]);
    // Held at 95 % for two minutes: one entry, after exactly 30 s.
    let events = run(&mut rules, t0, 0, 120, |_| 0.95);
    assert_eq!(events, vec![(30, CapacityEventKind::Entered)]);
    assert!(rules.pressure()[0].shed_all);
    // 80 %: below enter, above exit: still active.
    assert!(run(&mut rules, t0, 120, 30, |_| 0.8).is_empty());
    assert!(rules.views()[0].active);
    // 60 %: exits at once, and only once.
    let events = run(&mut rules, t0, 150, 60, |_| 0.6);
    assert_eq!(events, vec![(150, CapacityEventKind::Exited)]);
    assert!(!rules.pressure()[0].shed_all);
    assert_eq!(rules.events().count(), 2);
}

#[test]
fn a_short_spike_does_not_enter() {
    let t0 = crate::testing::epoch();
    let mut rules = CapacityRules::new(vec![rule(CapacityAction::Alert)]);
    let events = run(&mut rules, t0, 0, 200, |s| if s % 40 < 29 { 0.99 } else { 0.5 });
    assert!(events.is_empty(), "{events:?}");
}

#[test]
fn oscillating_around_the_enter_threshold_never_enters() {
    let t0 = crate::testing::epoch();
    let mut rules = CapacityRules::new(vec![rule(CapacityAction::Redistribute)]);
    let events = run(&mut rules, t0, 0, 600, |s| if s % 2 == 0 { 0.91 } else { 0.89 });
    assert!(events.is_empty(), "{events:?}");
    assert_eq!(rules.pressure()[0].weight_factor, 1.0);
}

#[test]
fn oscillating_around_the_exit_threshold_exits_once_and_does_not_flap() {
    let t0 = crate::testing::epoch();
    let mut rules = CapacityRules::new(vec![rule(CapacityAction::Redistribute)]);
    assert_eq!(
        run(&mut rules, t0, 0, 31, |_| 0.95),
        vec![(30, CapacityEventKind::Entered)]
    );
    assert_eq!(rules.pressure()[0].weight_factor, 0.25);
    let events = run(&mut rules, t0, 31, 600, |s| if s % 2 == 0 { 0.71 } else { 0.69 });
    // 31 is odd: 0.69, below exit.
    assert_eq!(events, vec![(31, CapacityEventKind::Exited)]);
    assert_eq!(rules.pressure()[0].weight_factor, 1.0);
}

#[test]
fn after_exiting_it_cannot_enter_again_before_the_cool_down() {
    let t0 = crate::testing::epoch();
    let mut rules = CapacityRules::new(vec![rule(CapacityAction::ScaleOut)]);
    run(&mut rules, t0, 0, 31, |_| 0.95);
    assert!(rules.views()[0].scale_out > 1.0);
    assert_eq!(
        run(&mut rules, t0, 31, 1, |_| 0.1),
        vec![(31, CapacityEventKind::Exited)]
    );
    assert_eq!(rules.views()[0].scale_out, 0.0);
    // Back at 95 % at once: the duration passes at 62 s, but the cool-down
    // holds it until 91 s.
    let events = run(&mut rules, t0, 32, 100, |_| 0.95);
    assert_eq!(events, vec![(91, CapacityEventKind::Entered)]);
}

#[test]
fn region_model_rules_shed_only_their_model_and_reload_keeps_unchanged_rules() {
    let t0 = crate::testing::epoch();
    let mut per_model = rule(CapacityAction::RejectNew);
    per_model.model = Some("gpt-4o".into());
    let mut rules = CapacityRules::new(vec![per_model.clone(), rule(CapacityAction::Alert)]);
    run(&mut rules, t0, 0, 31, |_| 0.95);
    let p = &rules.pressure()[0];
    assert!(!p.shed_all);
    assert_eq!(p.shed_models, vec!["gpt-4o".to_string()]);
    assert_eq!(p.retry_after, Duration::from_secs(30));
    // The same rule stays active across a reload; a changed one starts idle.
    let mut changed = rule(CapacityAction::Alert);
    changed.enter = 0.95;
    rules.apply(vec![per_model, changed]);
    let views = rules.views();
    assert!(views[0].active);
    assert!(!views[1].active);
}

/// The router under pressure: a shed region-model is excluded (only that
/// model), a request nothing else can take is refused as shed with a
/// retry hint, and a redistribute factor lowers the region's weight.
#[test]
fn the_router_applies_pressure_per_region_and_model() {
    use super::super::model::ModelSpec;
    use super::super::model_quota::{Accounting, ModelLimits};
    use super::super::region::RegionSpec;
    use super::super::router::{RouteError, RouteRequest, Router, RouterSpec};
    use super::super::strategy::{StrategyKind, StrategyParams};

    let limits = ModelLimits {
        tokens_per_minute: 60_000,
        requests_per_minute: 1000,
        burst_tokens: None,
        burst_requests: None,
        accounting: Accounting::Usage,
    };
    let model = |name: &str| ModelSpec {
        name: name.into(),
        default_max_output_tokens: 10,
        chars_per_token: 4.0,
        max_request_tokens: 1_000_000,
    };
    let spec = RouterSpec {
        models: vec![model("m1"), model("m2")],
        regions: vec![RegionSpec {
            name: "eu".into(),
            weight: 2.0,
            max_concurrent: 100,
            models: vec![("m1".into(), limits.clone()), ("m2".into(), limits)],
        }],
        strategy: StrategyKind::WeightedLoad,
        params: StrategyParams::default(),
        seed: 1,
        breaker: crate::core::BreakerConfig::default(),
        sharing: None,
    };
    let t0 = crate::testing::epoch();
    let mut router = Router::try_new(spec, t0).unwrap();
    let mut per_model = rule(CapacityAction::RejectNew);
    per_model.model = Some("m1".into());
    let mut down = rule(CapacityAction::Redistribute);
    down.weight_factor = 0.25;
    let mut rules = CapacityRules::new(vec![per_model, down]);
    run(&mut rules, t0, 0, 31, |_| 0.95);
    for p in rules.pressure() {
        assert!(router.set_pressure(&p));
    }
    let req = |model| RouteRequest {
        model,
        tokens: 100,
        origin: None,
    };
    match router.reserve(&req("m1"), &[], t0) {
        Err(RouteError::Shed { retry_after, .. }) => assert_eq!(retry_after, Duration::from_secs(30)),
        other => panic!("m1 should be shed: {other:?}"),
    }
    assert!(router.reserve(&req("m2"), &[], t0).is_ok(), "m2 is not shed");
    assert_eq!(router.region("eu").unwrap().weight(), 0.5);
    // Pressure lifted: served again, weight back.
    run(&mut rules, t0, 31, 1, |_| 0.1);
    for p in rules.pressure() {
        router.set_pressure(&p);
    }
    assert!(router.reserve(&req("m1"), &[], t0).is_ok());
    assert_eq!(router.region("eu").unwrap().weight(), 2.0);
}
