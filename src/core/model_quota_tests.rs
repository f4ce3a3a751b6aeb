//! Tests of `ModelQuota`: accounting modes, settlement, provider hints.

use super::*;

fn limits(accounting: Accounting) -> ModelLimits {
    ModelLimits {
        tokens_per_minute: 6_000,
        requests_per_minute: 60,
        burst_tokens: None,
        burst_requests: None,
        accounting,
    }
}

#[test]
fn usage_accounting_refunds_and_charges_the_difference() {
    let t0 = crate::testing::epoch();
    let mut q = ModelQuota::try_new(limits(Accounting::Usage), t0).unwrap();
    let h = q.reserve(1000, t0).unwrap();
    assert_eq!(q.tokens().available(t0), 5000);
    let charged = q.settle(
        h,
        Settlement::Used {
            prompt: 100,
            completion: 300,
        },
        t0,
    );
    assert_eq!(charged, 400);
    assert_eq!(q.tokens().available(t0), 5600);
    let h = q.reserve(100, t0).unwrap();
    q.settle(
        h,
        Settlement::Used {
            prompt: 100,
            completion: 400,
        },
        t0,
    );
    assert_eq!(q.tokens().available(t0), 5100, "overrun charged");
}

#[test]
fn admission_accounting_keeps_the_reservation() {
    let t0 = crate::testing::epoch();
    let mut q = ModelQuota::try_new(limits(Accounting::Admission), t0).unwrap();
    let h = q.reserve(1000, t0).unwrap();
    let charged = q.settle(
        h,
        Settlement::Used {
            prompt: 10,
            completion: 10,
        },
        t0,
    );
    assert_eq!(charged, 1000);
    assert_eq!(q.tokens().available(t0), 5000);
}

#[test]
fn not_run_refunds_everything_and_settles_once() {
    let t0 = crate::testing::epoch();
    let mut q = ModelQuota::try_new(limits(Accounting::Admission), t0).unwrap();
    let h = q.reserve(1000, t0).unwrap();
    assert_eq!(q.requests().available(t0), 59);
    q.settle(h, Settlement::NotRun, t0);
    assert_eq!(q.tokens().available(t0), 6000);
    assert_eq!(q.requests().available(t0), 60);
    q.settle(h, Settlement::NotRun, t0);
    assert_eq!(q.tokens().available(t0), 6000, "a second settle is a no-op");
    assert_eq!(q.in_flight_tokens(), 0);
}

#[test]
fn reserve_is_all_or_nothing() {
    let t0 = crate::testing::epoch();
    let mut q = ModelQuota::try_new(
        ModelLimits {
            requests_per_minute: 1,
            ..limits(Accounting::Usage)
        },
        t0,
    )
    .unwrap();
    q.reserve(10, t0).unwrap();
    let err = q.reserve(10, t0).unwrap_err();
    assert!(matches!(err, QuotaShortfall::Requests { .. }), "{err:?}");
    assert_eq!(
        q.tokens().available(t0),
        5990,
        "no tokens taken on a refused reserve"
    );
    assert!(matches!(
        q.check(7000, t0),
        Err(QuotaShortfall::TooLarge {
            need: 7000,
            capacity: 6000
        })
    ));
}

#[test]
fn hint_counts_later_reservations_still_in_flight() {
    let t0 = crate::testing::epoch();
    let mut q = ModelQuota::try_new(limits(Accounting::Usage), t0).unwrap();
    let first = q.reserve(1000, t0).unwrap();
    let _second = q.reserve(500, t0).unwrap();
    q.settle(
        first,
        Settlement::Used {
            prompt: 500,
            completion: 500,
        },
        t0,
    );
    // We think 4500 are left. The provider (shared with someone else) says
    // 3000, and has not seen `second` yet.
    let out = q.apply_hint(
        ProviderHint {
            remaining_tokens: 3000,
            remaining_requests: 50,
            ..Default::default()
        },
        Some(first),
        t0,
    );
    assert_eq!(out, HintOutcome::Applied { lowered: true });
    assert_eq!(q.tokens().available(t0), 2500);
    // A provider that knows of more than we do changes nothing.
    let out = q.apply_hint(
        ProviderHint {
            remaining_tokens: 6000,
            remaining_requests: 60,
            ..Default::default()
        },
        None,
        t0,
    );
    assert_eq!(out, HintOutcome::Applied { lowered: false });
    assert_eq!(q.tokens().available(t0), 2500);
}

#[test]
fn absurd_hints_are_ignored_and_reported_once() {
    let t0 = crate::testing::epoch();
    let mut q = ModelQuota::try_new(limits(Accounting::Usage), t0).unwrap();
    let neg = ProviderHint {
        remaining_tokens: -5,
        ..Default::default()
    };
    let big = ProviderHint {
        remaining_tokens: 1_000_000,
        ..Default::default()
    };
    assert!(matches!(
        q.apply_hint(neg, None, t0),
        HintOutcome::Ignored { first: true, .. }
    ));
    assert!(matches!(
        q.apply_hint(big, None, t0),
        HintOutcome::Ignored { first: false, .. }
    ));
    assert_eq!(q.tokens().available(t0), 6000);
    assert!(q.last_hint().is_none());
}

/// A provider's remaining figure is as of when it admitted the request; the
/// reply brings it seconds later. A provider in step with our accounting
/// (its figure plus its refill since, less our reservations since) lowers
/// nothing; one that knows of less is believed without the refill.
#[test]
fn a_late_hint_is_judged_as_of_when_the_request_was_sent() {
    let secs = Duration::from_secs;
    let t0 = crate::testing::epoch();
    let mut q = ModelQuota::try_new(limits(Accounting::Admission), t0).unwrap();
    let first = q.reserve(1000, t0).unwrap();
    // Sent after `first`: the provider had not seen them when it answered.
    let second = q.reserve(400, t0 + secs(1)).unwrap();
    let _third = q.reserve(200, t0 + secs(2)).unwrap();
    q.settle(
        second,
        Settlement::Used {
            prompt: 400,
            completion: 0,
        },
        t0 + secs(3),
    );
    // 5000 - 600 + 500 refilled (100 tokens/s); requests 60 - 3 + 5.
    let now = t0 + secs(5);
    assert_eq!(q.tokens().available(now), 4900);
    assert_eq!(q.requests().available(now), 60);
    // The provider had exactly our 5000 and 59 when it admitted `first`.
    let in_step = ProviderHint {
        remaining_tokens: 5000,
        remaining_requests: 59,
        ..Default::default()
    };
    assert_eq!(
        q.apply_hint(in_step, Some(first), now),
        HintOutcome::Applied { lowered: false }
    );
    assert_eq!(q.tokens().available(now), 4900);
    // Another consumer had taken 2000 before: 3000 left then, less our 600.
    let less = ProviderHint {
        remaining_tokens: 3000,
        ..in_step
    };
    assert_eq!(
        q.apply_hint(less, Some(first), now),
        HintOutcome::Applied { lowered: true }
    );
    assert_eq!(q.tokens().available(now), 2400);
    // Someone unseen showed: the request count too is taken without the
    // refill for now (59 then, 2 of ours since).
    assert_eq!(q.requests().available(now), 57);
}

/// A refusal says when a request of *that* size fits: smaller ones fit
/// sooner, and the rest of the region-model is not blocked.
#[test]
fn a_provider_refusal_says_when_that_request_fits() {
    let secs = Duration::from_secs;
    let t0 = crate::testing::epoch();
    let mut q = ModelQuota::try_new(limits(Accounting::Admission), t0).unwrap();
    let h = q.reserve(4000, t0).unwrap();
    q.settle(h, Settlement::NotRun, t0);
    // 4000 tokens fit in 10 s at 100 a second: the provider has 3000 now.
    q.mark_refused(4000, secs(10), t0);
    assert!(q.check(3000, t0).is_ok(), "{:?}", q.check(3000, t0));
    assert!(q.check(3001, t0).is_err());
    assert!(q.check(4000, t0 + secs(9)).is_err());
    assert!(q.check(4000, t0 + secs(10)).is_ok());
}

/// A refusal that resets within one request's refill may be the request
/// limit: the next request waits that long, whatever its size.
#[test]
fn a_short_refusal_may_be_the_request_limit() {
    let t0 = crate::testing::epoch();
    let mut q = ModelQuota::try_new(limits(Accounting::Admission), t0).unwrap();
    q.mark_refused(10, Duration::from_millis(400), t0);
    // One token would fit after 310 ms; one request only after 400.
    assert!(matches!(
        q.check(1, t0 + Duration::from_millis(350)),
        Err(QuotaShortfall::Requests { .. })
    ));
    assert!(q.check(10, t0 + Duration::from_millis(400)).is_ok());
}

#[test]
fn limit_change_keeps_fill_fraction_of_both_buckets() {
    let t0 = crate::testing::epoch();
    let mut q = ModelQuota::try_new(limits(Accounting::Usage), t0).unwrap();
    q.reserve(3000, t0).unwrap();
    q.set_limits(
        ModelLimits {
            tokens_per_minute: 2000,
            ..limits(Accounting::Usage)
        },
        t0,
    )
    .unwrap();
    assert_eq!(q.tokens().available(t0), 1000);
}

/// After a hint showed someone unseen, hints are taken cautiously for
/// `UNSEEN_MEMORY`; hints in step with our accounting meanwhile do not
/// prolong that, so trust comes back once the other consumer is gone.
#[test]
fn caution_after_an_unseen_consumer_ends_when_hints_are_in_step_again() {
    let secs = Duration::from_secs;
    let t0 = crate::testing::epoch();
    let mut q = ModelQuota::try_new(limits(Accounting::Admission), t0).unwrap();
    // The provider, as a bucket of its own: another consumer took 2000
    // before our first request, then stopped.
    let mut tokens = QuotaBucket::try_new(6000, None, t0).unwrap();
    tokens.charge(2000, t0);
    let mut requests = QuotaBucket::try_new(60, None, t0).unwrap();
    let mut send = |q: &mut ModelQuota, n: u64, at: Instant| {
        let h = q.reserve(n, at).unwrap();
        tokens.charge(n, at);
        requests.charge(1, at);
        let hint = ProviderHint {
            remaining_tokens: tokens.available(at),
            remaining_requests: requests.available(at),
            ..Default::default()
        };
        (h, hint)
    };
    let (h, hint) = send(&mut q, 1000, t0);
    assert_eq!(
        q.apply_hint(hint, Some(h), t0),
        HintOutcome::Applied { lowered: true }
    );
    // Every 10 s a request whose hint (true to the provider) comes a
    // second late.
    let mut at = t0;
    let mut lowered = Vec::new();
    for _ in 0..8 {
        at += secs(10);
        let (h, hint) = send(&mut q, 100, at);
        let out = q.apply_hint(hint, Some(h), at + secs(1));
        lowered.push(out == HintOutcome::Applied { lowered: true });
    }
    // Cautious (no refill credited, so a late hint lowers) for a minute,
    // then trusted again.
    assert_eq!(lowered, [true, true, true, true, true, false, false, false]);
}
