//! Tests of overload control in the `Scheduler`: a burst is absorbed, a
//! standing queue refuses newcomers at once (tenants over their share
//! first), and it absorbs again once the overload is over. Time is passed in.

use std::sync::Arc;
use std::time::{Duration, Instant};

use super::overload::{OverloadSettings, QueueState};
use super::scheduler::{Scheduler, Submission, SubmitError, Submitted};
use super::tenant::Weights;
use crate::core::{
    Accounting, BreakerConfig, ModelLimits, ModelSpec, RegionSpec, Router, RouterSpec, StrategyKind,
    StrategyParams,
};

/// Without holds: every newcomer that does not fit is refused while shedding.
const SETTINGS: OverloadSettings = OverloadSettings {
    target: Duration::from_millis(500),
    interval: Duration::from_secs(2),
    hold_share: 0.0,
};

/// One region refilling 100 tokens a second, its bucket emptied at `t0`;
/// tenants `a` and `b` of equal weight.
fn scheduler(overload: Option<OverloadSettings>) -> (Scheduler<u32>, Instant) {
    scheduler_with(overload, &[("r", 6000)])
}

/// Regions of (name, tokens a minute), every bucket emptied at `t0`.
fn scheduler_with(overload: Option<OverloadSettings>, regions: &[(&str, u64)]) -> (Scheduler<u32>, Instant) {
    let t0 = crate::testing::epoch();
    let spec = RouterSpec {
        models: vec![ModelSpec {
            name: "m".into(),
            default_max_output_tokens: 1,
            chars_per_token: 1.0,
            max_request_tokens: 10_000,
        }],
        regions: regions
            .iter()
            .map(|(name, tokens_per_minute)| RegionSpec {
                name: name.to_string(),
                weight: 1.0,
                max_concurrent: 10_000,
                models: vec![(
                    "m".into(),
                    ModelLimits {
                        tokens_per_minute: *tokens_per_minute,
                        requests_per_minute: 1_000_000,
                        burst_tokens: None,
                        burst_requests: None,
                        accounting: Accounting::Admission,
                    },
                )],
            })
            .collect(),
        strategy: StrategyKind::WeightedLoad,
        params: StrategyParams::default(),
        seed: 0,
        breaker: BreakerConfig::default(),
        sharing: None,
    };
    let weights = Weights {
        by_tenant: [("a", 1.0), ("b", 1.0)].map(|(t, w)| (Arc::from(t), w)).into(),
        default: 1.0,
    };
    let mut s = Scheduler::fair(Router::try_new(spec, t0).unwrap(), 10_000, Arc::new(weights));
    s.set_overload(overload);
    for (_, tokens_per_minute) in regions {
        let full = s.submit(sub("a", *tokens_per_minute, t0), t0, || 0).unwrap();
        assert!(matches!(full, Submitted::Reserved(_)));
    }
    (s, t0)
}

fn sub(tenant: &str, tokens: u64, now: Instant) -> Submission {
    Submission {
        model: "m".into(),
        tokens,
        origin: None,
        tenant: tenant.into(),
        tried: Vec::new(),
        wait_until: now + Duration::from_secs(5),
        tenant_max_queued: usize::MAX,
    }
}

/// Tenant `a` sends 20 tokens every 0.1 s (twice the refill) from `t0`
/// until a newcomer is refused or `until`; returns when that happened.
fn flood(s: &mut Scheduler<u32>, t0: Instant, until: Duration) -> Option<(Duration, SubmitError)> {
    let mut t = Duration::ZERO;
    while t < until {
        t += Duration::from_millis(100);
        s.release(t0 + t, |_| false);
        match s.submit(sub("a", 20, t0 + t), t0 + t, || 0) {
            Ok(_) => {}
            Err(e) => return Some((t, e)),
        }
    }
    None
}

#[test]
fn a_standing_queue_refuses_newcomers_at_once_with_a_retry_hint() {
    let (mut s, t0) = scheduler(Some(SETTINGS));
    // The head's wait passes 0.5 s about 1 s in and stays above it: after
    // the 2 s interval the queue sheds, long before its 5 s bound.
    let (shed_at, e) = flood(&mut s, t0, Duration::from_secs(10)).expect("refused at some point");
    let SubmitError::Shedding { retry_after, .. } = &e else {
        panic!("refused otherwise: {e}");
    };
    assert!(
        shed_at >= Duration::from_millis(2500) && shed_at <= Duration::from_millis(3500),
        "shed at {shed_at:?}"
    );
    assert!(*retry_after >= Duration::from_millis(100), "{e}");
    assert!(e.to_string().contains("shedding"), "{e}");
    assert_eq!(s.queue_state("m"), (QueueState::Shedding, 1));

    // Without overload control the same flood queues until its backlog
    // would take 4 s to drain (the 5 s bound less the head room).
    let (mut old, t0) = scheduler(None);
    let (at, e) = flood(&mut old, t0, Duration::from_secs(10)).expect("refused at some point");
    assert!(matches!(e, SubmitError::WouldExpire { .. }), "{e}");
    assert!(at > Duration::from_secs(4), "refused at {at:?}");
    assert_eq!(old.queue_state("m"), (QueueState::Absorbing, 0));
}

#[test]
fn a_burst_shorter_than_the_interval_is_absorbed_and_shedding_ends_with_the_overload() {
    let (mut s, t0) = scheduler(Some(SETTINGS));
    // A 1.5 s burst: the head waits past the target, but not for 2 s.
    assert!(flood(&mut s, t0, Duration::from_millis(1500)).is_none());
    let mut t = Duration::from_millis(1500);
    while s.queued() > 0 {
        t += Duration::from_millis(100);
        s.release(t0 + t, |_| false);
    }
    assert_eq!(s.queue_state("m"), (QueueState::Absorbing, 0));

    // Sustained: it sheds; once arrivals stop and an interval passes
    // without a refusal, a newcomer may wait again.
    let (at, _) = flood(&mut s, t0 + t, Duration::from_secs(10)).expect("sheds");
    let t = t + at + SETTINGS.interval;
    s.release(t0 + t, |_| false);
    assert_eq!(s.queue_state("m").0, QueueState::Absorbing);
    let later = s.submit(sub("a", 20, t0 + t), t0 + t, || 0).unwrap();
    assert!(matches!(later, Submitted::Queued { .. }), "{later:?}");
}

#[test]
fn a_standing_queue_refuses_tenants_over_their_share_first() {
    let (mut s, t0) = scheduler(Some(SETTINGS));
    let (at, e) = flood(&mut s, t0, Duration::from_secs(10)).expect("sheds");
    assert!(matches!(e, SubmitError::Shedding { .. }), "{e}");
    let now = t0 + at;
    // `b` has nothing queued: under its share, it still waits (and is
    // served before `a`'s backlog, by the fair queue).
    let b = s.submit(sub("b", 20, now), now, || 1).unwrap();
    assert!(matches!(b, Submitted::Queued { .. }), "{b:?}");
    let a = s.submit(sub("a", 20, now), now, || 0).unwrap_err();
    assert!(matches!(a, SubmitError::Shedding { .. }), "{a}");
    // `b` keeps waiting while under its share, `a` stays refused.
    let mut served_b = 0;
    for i in 1..=20 {
        let now = now + Duration::from_millis(100 * i);
        for r in s.release(now, |_| false) {
            if let super::scheduler::Released::Granted(w, _) = r {
                served_b += (w.ticket == 1) as u32;
            }
        }
        if i % 5 == 0 {
            let b = s.submit(sub("b", 20, now), now, || 1);
            assert!(matches!(b, Ok(Submitted::Queued { .. })), "at {i}: {b:?}");
        }
        let a = s.submit(sub("a", 20, now), now, || 0);
        assert!(matches!(a, Err(SubmitError::Shedding { .. })), "at {i}: {a:?}");
    }
    assert!(served_b >= 4, "b served {served_b} times");
}

#[test]
fn while_shedding_a_newcomer_holds_the_refill_only_within_the_hold_share() {
    for (hold_share, expect_queued) in [(0.0, false), (0.25, true)] {
        let settings = OverloadSettings {
            hold_share,
            ..SETTINGS
        };
        let (mut s, t0) = scheduler(Some(settings));
        let (at, _) = flood(&mut s, t0, Duration::from_secs(10)).expect("sheds");
        // The backlog drains while newcomers are refused; then the queue is
        // empty but still shedding.
        let mut t = at;
        while s.queued() > 0 {
            t += Duration::from_millis(100);
            s.release(t0 + t, |_| false);
            if s.queued() > 0 {
                let refused = s.submit(sub("a", 20, t0 + t), t0 + t, || 0);
                assert!(
                    matches!(refused, Err(SubmitError::Shedding { .. })),
                    "{refused:?}"
                );
            }
        }
        assert_eq!(s.queue_state("m").0, QueueState::Shedding);
        // 100 tokens do not fit: a second of refill. The hold share gives
        // 25 tokens a second of credit, 50 over the interval: not enough
        // for 100, enough for 40.
        let now = t0 + t;
        let large = s.submit(sub("a", 100, now), now, || 0);
        assert!(matches!(large, Err(SubmitError::Shedding { .. })), "{large:?}");
        let held = s.submit(sub("a", 40, now), now, || 0);
        assert_eq!(
            matches!(held, Ok(Submitted::Queued { .. })),
            expect_queued,
            "{held:?}"
        );
        if expect_queued {
            // It holds the refill: the next newcomer is refused, and the
            // credit is spent.
            let next = s.submit(sub("a", 5, now), now, || 0);
            assert!(matches!(next, Err(SubmitError::Shedding { .. })), "{next:?}");
            let granted = s.release(now + Duration::from_millis(400), |_| false);
            assert!(matches!(
                granted.as_slice(),
                [super::scheduler::Released::Granted(..)]
            ));
        }
    }
}

#[test]
fn while_shedding_a_newcomer_of_the_only_tenant_waiting_is_served_beside_the_head() {
    // Region `b` refills 10 tokens a second; its refill goes to the queue's
    // 20-token waiters whenever it reaches 20.
    let (mut s, t0) = scheduler_with(Some(SETTINGS), &[("a", 6000), ("b", 600)]);
    let (at, _) = flood(&mut s, t0, Duration::from_secs(10)).expect("sheds");
    assert!(s.queued() > 0);
    let now = t0 + at;
    s.release(now, |_| false);
    // 0.6 s later `b` has at least 6 tokens nobody waiting could use: a
    // 5-token newcomer goes there at once instead of being refused.
    let later = now + Duration::from_millis(600);
    match s.submit(sub("a", 5, later), later, || 0) {
        Ok(Submitted::Reserved(r)) => assert_eq!(&*r.region, "b"),
        other => panic!("not served beside the head: {other:?}"),
    }
    // One that fits nowhere but the head's region is refused.
    let refused = s.submit(sub("a", 50, later), later, || 0);
    assert!(
        matches!(refused, Err(SubmitError::Shedding { .. })),
        "{refused:?}"
    );
}
