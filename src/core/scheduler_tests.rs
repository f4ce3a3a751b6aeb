//! Tests of `Scheduler`: reserving, queueing, expiry and the wait estimate.

use super::*;
use crate::core::{
    Accounting, Completion, ModelLimits, ModelSpec, RegionSpec, RouterSpec, StrategyKind, StrategyParams,
};

/// One region, 600 tokens a minute (10 a second), burst 600.
fn scheduler() -> (Scheduler<u32>, Instant) {
    let t0 = crate::testing::epoch();
    let spec = RouterSpec {
        models: vec![ModelSpec {
            name: "m".into(),
            default_max_output_tokens: 1,
            chars_per_token: 1.0,
            max_request_tokens: 10_000,
        }],
        regions: vec![RegionSpec {
            name: "r".into(),
            weight: 1.0,
            max_concurrent: 100,
            models: vec![(
                "m".into(),
                ModelLimits {
                    tokens_per_minute: 600,
                    requests_per_minute: 6000,
                    burst_tokens: None,
                    burst_requests: None,
                    accounting: Accounting::Usage,
                },
            )],
        }],
        strategy: StrategyKind::WeightedLoad,
        params: StrategyParams::default(),
        seed: 0,
        breaker: crate::core::BreakerConfig::default(),
        sharing: None,
    };
    (Scheduler::fifo(Router::try_new(spec, t0).unwrap(), 3), t0)
}

/// Regions of (name, tokens a minute, requests a minute) for model "m".
fn spec_with(regions: &[(&str, u64, u64)]) -> (RouterSpec, Instant) {
    let (s, t0) = scheduler();
    let mut spec = RouterSpec {
        models: s.router().models().to_vec(),
        regions: Vec::new(),
        strategy: StrategyKind::WeightedLoad,
        params: StrategyParams::default(),
        seed: 0,
        breaker: crate::core::BreakerConfig::default(),
        sharing: None,
    };
    for (name, tpm, rpm) in regions {
        spec.regions.push(RegionSpec {
            name: name.to_string(),
            weight: 1.0,
            max_concurrent: 1000,
            models: vec![(
                "m".into(),
                ModelLimits {
                    tokens_per_minute: *tpm,
                    requests_per_minute: *rpm,
                    burst_tokens: None,
                    burst_requests: None,
                    accounting: Accounting::Admission,
                },
            )],
        });
    }
    (spec, t0)
}

fn scheduler_with(regions: &[(&str, u64, u64)]) -> (Scheduler<u32>, Instant) {
    let (spec, t0) = spec_with(regions);
    (Scheduler::fifo(Router::try_new(spec, t0).unwrap(), 1000), t0)
}

fn sub(tokens: u64, wait_until: Instant) -> Submission {
    Submission {
        model: "m".into(),
        tokens,
        origin: None,
        tenant: "t".into(),
        tried: Vec::new(),
        wait_until,
        tenant_max_queued: usize::MAX,
    }
}

fn secs(s: u64) -> Duration {
    Duration::from_secs(s)
}

#[test]
fn reserves_at_once_when_it_fits_and_nobody_waits() {
    let (mut s, t0) = scheduler();
    assert!(matches!(
        s.submit(sub(500, t0), t0, || 0),
        Ok(Submitted::Reserved(_))
    ));
    // Does not fit and may not wait: NoCapacity with the refill time.
    match s.submit(sub(500, t0), t0, || 0) {
        Err(SubmitError::Route(RouteError::NoCapacity { retry_after, .. })) => {
            assert_eq!(retry_after, Some(secs(40)))
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn a_large_head_is_not_starved_by_small_requests() {
    let (mut s, t0) = scheduler();
    let Ok(Submitted::Reserved(_)) = s.submit(sub(600, t0), t0, || 0) else {
        panic!()
    };
    // Empty bucket. A large request waits for 500 tokens (50 s) ...
    assert!(matches!(
        s.submit(sub(500, t0 + secs(100)), t0, || 1),
        Ok(Submitted::Queued { .. })
    ));
    // ... and a small one that would fit in 1 s queues behind it.
    assert!(matches!(
        s.submit(sub(10, t0 + secs(100)), t0 + secs(1), || 2),
        Ok(Submitted::Queued { .. })
    ));
    assert!(
        s.release(t0 + secs(2), |_| false).is_empty(),
        "nobody jumps the head"
    );
    assert_eq!(s.next_wake(), Some(t0 + secs(50)));
    let out = s.release(t0 + secs(50), |_| false);
    let tickets: Vec<u32> = out
        .iter()
        .map(|r| match r {
            Released::Granted(w, _) => w.ticket,
            other => panic!("{other:?}"),
        })
        .collect();
    assert_eq!(
        tickets,
        [1],
        "the head goes first; the small one needs 10 more tokens"
    );
    let out = s.release(t0 + secs(51), |_| false);
    assert!(matches!(&out[..], [Released::Granted(w, _)] if w.ticket == 2));
}

#[test]
fn the_oldest_wait_is_that_of_the_longest_waiting_request() {
    let (mut s, t0) = scheduler();
    assert_eq!(s.oldest_wait("m", t0), Duration::ZERO, "nobody waits");
    let Ok(Submitted::Reserved(_)) = s.submit(sub(600, t0), t0, || 0) else {
        panic!()
    };
    s.submit(sub(500, t0 + secs(100)), t0 + secs(1), || 1).unwrap();
    s.submit(sub(10, t0 + secs(100)), t0 + secs(3), || 2).unwrap();
    assert_eq!(s.oldest_wait("m", t0 + secs(4)), secs(3));
    assert_eq!(s.oldest_wait("other", t0 + secs(4)), Duration::ZERO);
    // The head served (at 50 s: 500 tokens refilled), the small one is
    // the oldest left.
    assert_eq!(s.release(t0 + secs(50), |_| false).len(), 1);
    assert_eq!(s.oldest_wait("m", t0 + secs(50)), secs(47));
}

#[test]
fn waiters_expire_and_gone_callers_consume_nothing() {
    let (mut s, t0) = scheduler();
    let Ok(Submitted::Reserved(first)) = s.submit(sub(600, t0), t0, || 0) else {
        panic!()
    };
    s.submit(sub(100, t0 + secs(15)), t0, || 1).unwrap();
    s.submit(sub(100, t0 + secs(30)), t0, || 2).unwrap();
    // The provider refuses and says those 600 tokens fit only in 100 s
    // (it has 400 fewer than nothing): the waiters' refill does not come
    // when they were told.
    s.router_mut().settle(
        &first,
        Completion {
            provider_refused: Some(secs(100)),
            ..Completion::abandoned()
        },
        t0 + secs(1),
    );
    let out = s.release(t0 + secs(15), |_| false);
    assert!(
        matches!(&out[..], [Released::Expired(w, _)] if w.ticket == 1),
        "{out:?}"
    );
    // Ticket 2's caller goes away: dropped, nothing reserved for it.
    let out = s.release(t0 + secs(16), |t| *t == 2);
    assert!(
        matches!(&out[..], [Released::Gone(w)] if w.ticket == 2),
        "{out:?}"
    );
    assert_eq!(s.queued(), 0);
    let r = s.router().region("r").unwrap();
    assert_eq!(r.quota(0).unwrap().tokens().available(t0 + secs(16)), -250);
}

#[test]
fn a_request_that_would_wait_in_vain_is_refused_at_once() {
    let (mut s, t0) = scheduler();
    s.submit(sub(600, t0), t0, || 0).unwrap();
    // 300 tokens queued ahead at 10 tokens/s: 30 s before they are
    // covered; a request must be able to wait that plus a fifth.
    s.submit(sub(300, t0 + secs(60)), t0, || 1).unwrap();
    match s.submit(sub(100, t0 + secs(37)), t0, || 2) {
        Err(e @ SubmitError::WouldExpire { .. }) => {
            let SubmitError::WouldExpire { projected, .. } = &e else {
                unreachable!()
            };
            // 30 s for the queue ahead, then 10 s for its own 100.
            assert_eq!(*projected, secs(40));
            assert!(
                e.to_string().contains("300 tokens and 1 requests queued ahead"),
                "{e}"
            );
        }
        other => panic!("{other:?}"),
    }
    assert!(matches!(
        s.submit(sub(1, t0 + secs(38)), t0, || 3),
        Ok(Submitted::Queued { .. })
    ));
}

/// A request must fit in one region: two empty regions refilling 100
/// tokens a second each cannot give 150 tokens within a second, though
/// together they refill 200.
#[test]
fn the_wait_is_estimated_per_region() {
    let (mut s, t0) = scheduler_with(&[("a", 6_000, 6_000), ("b", 6_000, 6_000)]);
    for _ in 0..2 {
        let Ok(Submitted::Reserved(_)) = s.submit(sub(6_000, t0), t0, || 0) else {
            panic!("empties a region")
        };
    }
    match s.submit(sub(150, t0 + secs(1)), t0, || 1) {
        Err(SubmitError::WouldExpire { projected, .. }) => {
            assert_eq!(projected, Duration::from_millis(1500))
        }
        other => panic!("waited in vain: {other:?}"),
    }
    // One region refilling 200 a second: served after 0.75 s.
    let (mut s, t0) = scheduler_with(&[("a", 12_000, 6_000)]);
    let Ok(Submitted::Reserved(_)) = s.submit(sub(12_000, t0), t0, || 0) else {
        panic!()
    };
    assert!(matches!(
        s.submit(sub(150, t0 + secs(1)), t0, || 1),
        Ok(Submitted::Queued { .. })
    ));
}

/// When requests a minute bind, the queue ahead is counted in requests:
/// one a second here, so with two ahead a request that may wait 2 s is
/// refused at once, told when it would have fit.
#[test]
fn the_request_limit_counts_in_the_estimate() {
    let (mut s, t0) = scheduler_with(&[("a", 6_000_000, 60)]);
    for _ in 0..60 {
        let Ok(Submitted::Reserved(_)) = s.submit(sub(1, t0), t0, || 0) else {
            panic!("takes every request")
        };
    }
    for i in 1..=2 {
        assert!(matches!(
            s.submit(sub(1, t0 + secs(3)), t0, || i),
            Ok(Submitted::Queued { .. })
        ));
    }
    match s.submit(sub(1, t0 + secs(2)), t0, || 3) {
        // Two ahead, then its own: the third second.
        Err(SubmitError::WouldExpire { projected, .. }) => assert_eq!(projected, secs(3)),
        other => panic!("waited in vain: {other:?}"),
    }
}

#[test]
fn the_queue_is_bounded() {
    let (mut s, t0) = scheduler();
    s.submit(sub(600, t0), t0, || 0).unwrap();
    for i in 1..=3 {
        assert!(matches!(
            s.submit(sub(10, t0 + secs(60)), t0, || i),
            Ok(Submitted::Queued { .. })
        ));
    }
    match s.submit(sub(10, t0 + secs(60)), t0, || 4) {
        Err(SubmitError::QueueFull {
            queued: 3,
            retry_after,
        }) => assert_eq!(retry_after, Some(secs(1))),
        other => panic!("{other:?}"),
    }
}

#[test]
fn requests_that_can_never_fit_do_not_wait() {
    let (mut s, t0) = scheduler();
    s.submit(sub(600, t0), t0, || 0).unwrap();
    s.submit(sub(10, t0 + secs(60)), t0, || 1).unwrap();
    assert!(matches!(
        s.submit(sub(700, t0 + secs(60)), t0, || 2),
        Err(SubmitError::Route(RouteError::TooLarge { .. }))
    ));
}

/// A tenant with nothing queued is still behind the other tenants' heads:
/// its own refill comes at its share of the region, not when it would fit
/// alone.
#[test]
fn a_newcomer_behind_other_tenants_waits_at_its_share() {
    let (spec, t0) = spec_with(&[("r", 600, 6000)]);
    let router = Router::try_new(spec, t0).unwrap();
    let mut s: Scheduler<u32> = Scheduler::fair(router, 100, Arc::new(crate::core::Weights::default()));
    let Ok(Submitted::Reserved(_)) = s.submit(sub(600, t0), t0, || 0) else {
        panic!()
    };
    let mut other = sub(100, t0 + secs(60));
    other.tenant = "other".into();
    assert!(matches!(s.submit(other, t0, || 1), Ok(Submitted::Queued { .. })));
    // 100 tokens alone would come in 10 s; at half the refill, in 20.
    match s.submit(sub(100, t0 + secs(12)), t0, || 2) {
        Err(SubmitError::WouldExpire { projected, .. }) => assert_eq!(projected, secs(20)),
        other => panic!("waited in vain: {other:?}"),
    }
}
