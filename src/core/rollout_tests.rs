//! Rollouts: the split matches the weights, sessions stick.

use std::collections::HashMap;

use super::*;

fn ninety_ten() -> Rollouts {
    Rollouts::new(
        vec![RolloutSpec {
            alias: "chat".into(),
            session_label: Some("session".into()),
            targets: vec![("mini".into(), 90.0), ("gpt-4o".into(), 10.0)],
        }],
        7,
    )
}

fn share_of_mini(picks: &[RolloutPick]) -> f64 {
    picks.iter().filter(|p| p.target == "mini").count() as f64 / picks.len() as f64
}

#[test]
fn a_90_10_alias_over_10000_requests_lands_within_1_5_percent() {
    let mut r = ninety_ten();
    let picks: Vec<_> = (0..10_000).map(|_| r.pick("chat", |_| None).unwrap()).collect();
    let share = share_of_mini(&picks);
    println!("mini share over 10,000: {share:.4}");
    assert!((share - 0.9).abs() <= 0.015, "mini got {share}");
    assert!(picks.iter().all(|p| !p.sticky && p.alias == "chat"));
}

#[test]
fn sessions_split_by_weight_too() {
    let mut r = ninety_ten();
    let picks: Vec<_> = (0..10_000)
        .map(|i| {
            let key = format!("conversation-{i}");
            r.pick("chat", |l| (l == "session").then_some(key.as_str()))
                .unwrap()
        })
        .collect();
    let share = share_of_mini(&picks);
    println!("mini share over 10,000: {share:.4}");
    assert!((share - 0.9).abs() <= 0.015, "mini got {share}");
    assert!(picks.iter().all(|p| p.sticky));
}

#[test]
fn a_sticky_key_never_changes_target_while_the_weights_are_unchanged() {
    let mut r = ninety_ten();
    let mut first: HashMap<String, String> = HashMap::new();
    // Interleaved with keyless traffic, which moves the RNG.
    for round in 0..50 {
        for i in 0..200 {
            let key = format!("s{i}");
            let p = r
                .pick("chat", |l| (l == "session").then_some(key.as_str()))
                .unwrap();
            let seen = first.entry(key).or_insert_with(|| p.target.clone());
            assert_eq!(*seen, p.target, "round {round}");
            r.pick("chat", |_| None).unwrap();
        }
    }
    // Both targets got sessions (the key matters).
    assert!(first.values().any(|t| t == "gpt-4o") && first.values().any(|t| t == "mini"));
}

#[test]
fn changing_weights_live_moves_only_the_sessions_it_must() {
    let mut r = ninety_ten();
    let keys: Vec<String> = (0..10_000).map(|i| format!("k{i}")).collect();
    let target = |r: &mut Rollouts, k: &str| r.pick("chat", |_| Some(k)).unwrap().target;
    let before: Vec<_> = keys.iter().map(|k| target(&mut r, k)).collect();
    r.set_weights("chat", &[("mini".into(), 50.0), ("gpt-4o".into(), 50.0)])
        .unwrap();
    let after: Vec<_> = keys.iter().map(|k| target(&mut r, k)).collect();
    // Sessions only move from mini to gpt-4o, about 40 % of them.
    assert!(
        before
            .iter()
            .zip(&after)
            .all(|(b, a)| b == a || (b == "mini" && a == "gpt-4o"))
    );
    let moved = before.iter().zip(&after).filter(|(b, a)| b != a).count() as f64 / keys.len() as f64;
    println!("moved from 90/10 to 50/50: {moved:.4}");
    assert!((moved - 0.4).abs() < 0.02, "moved {moved}");
    let share = after.iter().filter(|t| *t == "mini").count() as f64 / keys.len() as f64;
    assert!((share - 0.5).abs() <= 0.015, "{share}");
}

#[test]
fn weights_are_checked_and_a_zero_weight_target_gets_nothing() {
    let mut r = ninety_ten();
    assert!(matches!(
        r.set_weights("nope", &[]),
        Err(RolloutError::UnknownAlias { .. })
    ));
    assert!(matches!(
        r.set_weights("chat", &[("opus".into(), 1.0)]),
        Err(RolloutError::UnknownTarget { .. })
    ));
    assert!(matches!(
        r.set_weights("chat", &[("mini".into(), f64::NAN)]),
        Err(RolloutError::BadWeight { .. })
    ));
    assert!(matches!(
        r.set_weights("chat", &[("mini".into(), 0.0), ("gpt-4o".into(), 0.0)]),
        Err(RolloutError::AllZero { .. })
    ));
    // The config file refuses a target listed twice; so does a live change
    // (before, the later weight silently won), and nothing changes.
    assert_eq!(
        r.set_weights("chat", &[("mini".into(), 1.0), ("mini".into(), 0.0)]),
        Err(RolloutError::DuplicateTarget {
            alias: "chat".into(),
            model: "mini".into()
        })
    );
    assert_eq!(r.specs()[0].targets[0], ("mini".to_string(), 90.0));
    r.set_weights("chat", &[("mini".into(), 0.0)]).unwrap();
    for i in 0..1000 {
        let key = format!("k{i}");
        assert_eq!(r.pick("chat", |_| Some(key.as_str())).unwrap().target, "gpt-4o");
        assert_eq!(r.pick("chat", |_| None).unwrap().target, "gpt-4o");
    }
    assert!(r.pick("gpt-4o", |_| None).is_none(), "a model is not an alias");
}
