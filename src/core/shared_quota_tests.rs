//! A replica's shared quota against the central bucket, time passed in.

use std::time::{Duration, Instant};

use super::central::{CentralBucket, SyncCall, call_or_create};
use super::model_quota::{Accounting, ModelLimits};
use super::shared_quota::{SharedQuota, SharingMode, SharingSettings, central_limits};

fn limits() -> ModelLimits {
    ModelLimits {
        tokens_per_minute: 60_000,
        requests_per_minute: 600,
        burst_tokens: None,
        burst_requests: None,
        accounting: Accounting::Usage,
    }
}

fn settings() -> SharingSettings {
    SharingSettings {
        replicas_floor: 2,
        ..SharingSettings::default()
    }
}

fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

/// One sync of `q` as replica `id` at `t0 + at`; returns what was sent.
fn sync(
    q: &mut SharedQuota,
    id: &str,
    central: &mut Option<CentralBucket>,
    t0: Instant,
    at: Duration,
) -> SyncCall {
    let c = q.sync_call(t0 + at);
    let g = call_or_create(
        central,
        id,
        &central_limits(&limits(), &settings()),
        &c,
        at.as_micros() as u64,
    );
    q.on_reply(&c, g, t0 + at, t0 + at);
    c
}

#[test]
fn nothing_is_spent_before_a_grant_and_a_grant_expires_unspent() {
    let t0 = crate::testing::epoch();
    let mut central = None;
    let mut q = SharedQuota::new(&limits(), settings(), t0);
    assert!(q.fit(100, t0).is_err(), "no chunk yet");
    sync(&mut q, "a", &mut central, t0, Duration::ZERO);
    // The level starts empty; after a second it has refilled 1,000 tokens.
    // (The waiting request is checked again after each sync, and misses.)
    assert!(q.fit(100, t0).is_err());
    sync(&mut q, "a", &mut central, t0, ms(1_000));
    assert!(q.fit(100, t0 + ms(1_000)).is_ok());
    let granted = q.view(t0 + ms(1_000)).balance_tokens;
    assert!(granted >= 100, "{granted}");
    // Unspent, it is gone after chunk_ttl and counted as wasted.
    assert!(q.fit(100, t0 + ms(2_001)).is_err());
    q.sync_call(t0 + ms(2_001));
    assert_eq!(q.view(t0 + ms(2_001)).totals.expired_tokens, granted);
}

#[test]
fn a_provider_refusal_reaches_the_other_replica_within_one_tick() {
    let t0 = crate::testing::epoch();
    let mut central = None;
    let (mut a, mut b) = (
        SharedQuota::new(&limits(), settings(), t0),
        SharedQuota::new(&limits(), settings(), t0),
    );
    // Both have work waiting (checked again after each sync), and sync
    // every tick (a replica silent for 500 ms is presumed cut off).
    for at in (0..=1_000).step_by(100) {
        let _ = (a.fit(10, t0 + ms(at)), b.fit(10, t0 + ms(at)));
        sync(&mut a, "a", &mut central, t0, ms(at));
        sync(&mut b, "b", &mut central, t0, ms(at));
    }
    assert!(b.fit(10, t0 + ms(1_000)).is_ok());
    a.refused(Duration::from_secs(5), t0 + ms(1_010));
    sync(&mut a, "a", &mut central, t0, ms(1_100));
    sync(&mut b, "b", &mut central, t0, ms(1_100));
    let wait = b.fit(10, t0 + ms(1_100)).expect_err("b holds off too");
    assert!(wait > Duration::from_secs(4), "{wait:?}");
}

#[test]
fn without_redis_it_falls_back_to_an_empty_bucket_at_its_share() {
    let t0 = crate::testing::epoch();
    let mut q = SharedQuota::new(&limits(), settings(), t0);
    // No answer at all: after unreachable_after (500 ms) it falls back.
    for at in (0..=500).step_by(100) {
        let c = q.sync_call(t0 + ms(at));
        q.on_failure(c, t0 + ms(at));
    }
    assert_eq!(q.mode(), SharingMode::Fallback);
    // Empty at first, then 60,000 / 2 replicas a minute: 500 tokens a second.
    assert!(q.fit(1, t0 + ms(500)).is_err());
    assert!(q.fit(500, t0 + ms(1_500)).is_ok());
    assert!(q.fit(501, t0 + ms(1_500)).is_err());
}

#[test]
fn back_from_fallback_what_was_spent_is_counted_once() {
    let t0 = crate::testing::epoch();
    let mut central = None;
    let mut q = SharedQuota::new(&limits(), settings(), t0);
    sync(&mut q, "a", &mut central, t0, Duration::ZERO);
    for at in (100..=600).step_by(100) {
        let c = q.sync_call(t0 + ms(at));
        q.on_failure(c, t0 + ms(at));
    }
    assert_eq!(q.mode(), SharingMode::Fallback);
    q.take(400, t0 + ms(1_600));
    let c = sync(&mut q, "a", &mut central, t0, ms(1_700));
    assert_eq!(c.fallback_spent, Some((400, 1)), "reported once");
    assert_eq!(q.mode(), SharingMode::Shared);
    let next = q.sync_call(t0 + ms(1_800));
    assert_eq!(next.fallback_spent, None, "and not again");
}

#[test]
fn extra_usage_survives_a_lost_call_and_refunds_are_not_sent_twice() {
    let t0 = crate::testing::epoch();
    let mut q = SharedQuota::new(&limits(), settings(), t0);
    q.use_extra(300, t0);
    q.give_back(200, 0, t0);
    let c = q.sync_call(t0);
    assert_eq!(c.settle_tokens, -100, "net: 300 more used, 200 given back");
    q.on_failure(c, t0 + ms(150));
    // The charge may not have reached Redis: it goes again. The refund may
    // have: it does not (erring toward less quota, never more).
    let again = q.sync_call(t0 + ms(200));
    assert_eq!(again.settle_tokens, -100);
}
