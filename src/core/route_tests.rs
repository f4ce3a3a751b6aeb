use std::collections::HashMap;
use std::time::Duration;

use super::*;

fn spec() -> RouteSpec {
    RouteSpec {
        name: "assistant".into(),
        candidates: vec!["large".into(), "small".into(), "medium".into()],
        rules: vec![RouteRule {
            labels: vec![("class".into(), "classify".into())],
            candidates: vec!["small".into()],
        }],
    }
}

fn facts(costs: [u64; 3], times_ms: [Option<u64>; 3]) -> Vec<CandidateFacts> {
    costs
        .iter()
        .zip(times_ms)
        .map(|(c, t)| CandidateFacts {
            worst_case: *c,
            time: t.map(Duration::from_millis),
            unusable: None,
        })
        .collect()
}

fn labels(pairs: &[(&str, &str)]) -> HashMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

fn pick(l: &HashMap<String, String>, f: &[CandidateFacts], ask: RouteAsk) -> RouteChoice {
    choose(&spec(), |k| l.get(k).map(String::as_str), f, ask)
}

#[test]
fn without_asks_the_first_candidate_and_a_rule_restricts_the_candidates() {
    let f = facts([900, 100, 400], [None; 3]);
    let c = pick(&labels(&[]), &f, RouteAsk::default());
    assert_eq!(c.chosen, Some(0));
    assert_eq!(c.rule, None);
    assert_eq!(c.verdicts[0], Verdict::Chosen);
    assert_eq!(c.verdicts[1], Verdict::Passed);

    let c = pick(
        &labels(&[("class", "classify"), ("x", "y")]),
        &f,
        RouteAsk::default(),
    );
    assert_eq!(c.chosen, Some(1), "{c:?}");
    assert_eq!(c.rule, Some(0));
    assert_eq!(c.verdicts[0], Verdict::NotInRule);
    // A label with another value matches no rule.
    let c = pick(&labels(&[("class", "chat")]), &f, RouteAsk::default());
    assert_eq!(c.chosen, Some(0));
}

#[test]
fn a_cost_ceiling_takes_the_cheapest_that_fits_or_refuses() {
    let f = facts([900, 500, 400], [None; 3]);
    let ask = |max| RouteAsk {
        max_cost: Some(max),
        latency_budget: None,
    };
    let c = pick(&labels(&[]), &f, ask(600));
    assert_eq!(c.chosen, Some(2), "the cheapest within the ceiling: {c:?}");
    assert_eq!(
        c.verdicts[0],
        Verdict::OverCost {
            worst_case: 900,
            max_cost: 600
        }
    );
    assert_eq!(c.verdicts[1], Verdict::Passed);
    // Exactly at the ceiling fits.
    assert_eq!(pick(&labels(&[]), &f, ask(400)).chosen, Some(2));
    let c = pick(&labels(&[]), &f, ask(399));
    assert_eq!(c.chosen, None);
    assert!(c.reason.contains("max_cost 0.000399"), "{}", c.reason);
    assert!(c.verdicts.iter().all(|v| matches!(v, Verdict::OverCost { .. })));
    // Ties keep the route's order.
    let f = facts([900, 400, 400], [None; 3]);
    assert_eq!(pick(&labels(&[]), &f, ask(1000)).chosen, Some(1));
}

#[test]
fn a_latency_budget_leaves_out_the_slow_unless_all_are_slow() {
    let f = facts([900, 100, 400], [Some(3000), Some(800), None]);
    let ask = |ms| RouteAsk {
        max_cost: None,
        latency_budget: Some(Duration::from_millis(ms)),
    };
    let c = pick(&labels(&[]), &f, ask(1000));
    assert_eq!(c.chosen, Some(1), "{c:?}");
    assert!(matches!(c.verdicts[0], Verdict::TooSlow { .. }));
    // Unknown time is no evidence against a candidate.
    assert_eq!(c.verdicts[2], Verdict::Passed);
    // All known ones slow, but an unknown one left: it is taken.
    let c = pick(&labels(&[]), &f, ask(500));
    assert_eq!(c.chosen, Some(2));
    // All slow: the fastest.
    let f = facts([900, 100, 400], [Some(3000), Some(800), Some(2000)]);
    let c = pick(&labels(&[]), &f, ask(500));
    assert_eq!(c.chosen, Some(1));
    assert!(c.reason.contains("fastest"), "{}", c.reason);
    assert!(matches!(c.verdicts[2], Verdict::TooSlow { .. }));
}

#[test]
fn unusable_candidates_are_out_and_none_usable_refuses() {
    let mut f = facts([900, 100, 400], [None; 3]);
    f[0].unusable = Some("too large".into());
    let c = pick(&labels(&[]), &f, RouteAsk::default());
    assert_eq!(c.chosen, Some(1));
    assert_eq!(c.verdicts[0], Verdict::Unusable("too large".into()));
    f[1].unusable = Some("not allowed".into());
    let c = pick(&labels(&[("class", "classify")]), &f, RouteAsk::default());
    assert_eq!(c.chosen, None, "the rule's only candidate is unusable");
    assert!(c.reason.contains("no candidate"));
}

#[test]
fn cost_then_latency_then_cheapest() {
    // Large fits neither; medium is cheapest within both.
    let f = facts([900, 300, 250], [Some(100), Some(2000), Some(500)]);
    let c = pick(
        &labels(&[]),
        &f,
        RouteAsk {
            max_cost: Some(500),
            latency_budget: Some(Duration::from_secs(1)),
        },
    );
    assert_eq!(c.chosen, Some(2), "{c:?}");
    assert!(matches!(c.verdicts[0], Verdict::OverCost { .. }));
    assert!(matches!(c.verdicts[1], Verdict::TooSlow { .. }));
}
