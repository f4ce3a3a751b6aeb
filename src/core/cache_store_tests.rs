//! The cache's bounds, eviction order and expiry, with time passed in.

use std::sync::Arc;
use std::time::{Duration, Instant};

use super::cache_key::{CacheKey, scope_tag};
use super::cache_store::*;

fn key(n: u8) -> CacheKey {
    CacheKey([n; 32])
}

fn limits(total: (usize, u64), per_tenant: (usize, u64)) -> CacheLimits {
    CacheLimits {
        total: Bounds {
            max_entries: total.0,
            max_bytes: total.1,
        },
        per_tenant: Bounds {
            max_entries: per_tenant.0,
            max_bytes: per_tenant.1,
        },
        max_entry_bytes: 1000,
    }
}

const MIN: Duration = Duration::from_secs(60);

fn t(name: &str) -> Arc<str> {
    Arc::from(name)
}

fn hit(s: &mut CacheStore<u8>, k: u8, now: Instant) -> Option<u8> {
    match s.get(&key(k), now) {
        Lookup::Hit(f) => Some(*f.value),
        _ => None,
    }
}

#[test]
fn an_entry_is_served_until_its_expiry_and_not_at_it() {
    let now = crate::testing::epoch();
    let mut s = CacheStore::new(limits((10, 10_000), (10, 10_000)));
    s.insert(&t("a"), 0, key(1), 7, 100, now, MIN).unwrap();
    assert_eq!(hit(&mut s, 1, now + MIN - Duration::from_millis(1)), Some(7));
    match s.get(&key(1), now + MIN) {
        Lookup::Expired(r) => assert_eq!(r.why, Removal::Expired),
        other => panic!("expected expiry, got {other:?}"),
    }
    assert_eq!(s.totals(), (0, 0));
    assert!(matches!(s.get(&key(1), now + MIN), Lookup::Miss));
}

#[test]
fn a_tenant_at_its_bound_evicts_its_own_least_recently_used() {
    let now = crate::testing::epoch();
    let mut s = CacheStore::new(limits((100, 100_000), (2, 10_000)));
    s.insert(&t("b"), 0, key(9), 9, 100, now, MIN).unwrap();
    s.insert(&t("a"), 0, key(1), 1, 100, now, MIN).unwrap();
    s.insert(&t("a"), 0, key(2), 2, 100, now, MIN).unwrap();
    // Reading 1 makes 2 the least recently used.
    assert_eq!(hit(&mut s, 1, now), Some(1));
    let removed = s.insert(&t("a"), 0, key(3), 3, 100, now, MIN).unwrap();
    assert_eq!(
        removed,
        vec![Removed {
            tenant: t("a"),
            bytes: 100,
            why: Removal::TenantBound
        }]
    );
    assert_eq!(hit(&mut s, 2, now), None);
    assert_eq!(hit(&mut s, 1, now), Some(1));
    assert_eq!(hit(&mut s, 9, now), Some(9), "another tenant's entry stays");
    assert_eq!(s.usage("a"), (2, 200));
}

#[test]
fn the_tenant_bound_counts_bytes_too() {
    let now = crate::testing::epoch();
    let mut s = CacheStore::new(limits((100, 100_000), (100, 250)));
    s.insert(&t("a"), 0, key(1), 1, 100, now, MIN).unwrap();
    s.insert(&t("a"), 0, key(2), 2, 100, now, MIN).unwrap();
    let removed = s.insert(&t("a"), 0, key(3), 3, 100, now, MIN).unwrap();
    assert_eq!(removed.len(), 1);
    assert_eq!(s.usage("a"), (2, 200));
    assert_eq!(hit(&mut s, 1, now), None);
}

#[test]
fn the_total_bound_evicts_from_the_tenant_holding_the_most() {
    let now = crate::testing::epoch();
    let mut s = CacheStore::new(limits((4, 100_000), (10, 100_000)));
    s.insert(&t("small"), 0, key(1), 1, 100, now, MIN).unwrap();
    s.insert(&t("big"), 0, key(2), 2, 100, now, MIN).unwrap();
    s.insert(&t("big"), 0, key(3), 3, 100, now, MIN).unwrap();
    s.insert(&t("big"), 0, key(4), 4, 100, now, MIN).unwrap();
    // Full: the next entry (of "small", the oldest tenant) evicts big's oldest.
    let removed = s.insert(&t("small"), 0, key(5), 5, 100, now, MIN).unwrap();
    assert_eq!(
        removed,
        vec![Removed {
            tenant: t("big"),
            bytes: 100,
            why: Removal::TotalBound
        }]
    );
    assert_eq!(hit(&mut s, 1, now), Some(1));
    assert_eq!(hit(&mut s, 2, now), None);
    assert_eq!(s.totals(), (4, 400));
}

#[test]
fn the_total_byte_bound_evicts_by_bytes() {
    let now = crate::testing::epoch();
    let mut s = CacheStore::new(limits((100, 1000), (100, 1000)));
    s.insert(&t("a"), 0, key(1), 1, 600, now, MIN).unwrap();
    s.insert(&t("b"), 0, key(2), 2, 100, now, MIN).unwrap();
    s.insert(&t("b"), 0, key(3), 3, 100, now, MIN).unwrap();
    // "b" has more entries, "a" more bytes: bytes are short, so "a" pays.
    let removed = s.insert(&t("b"), 0, key(4), 4, 300, now, MIN).unwrap();
    assert_eq!(removed[0].tenant, t("a"));
    assert_eq!(s.totals(), (3, 500));
}

#[test]
fn too_large_or_zero_ttl_is_not_stored_and_evicts_nothing() {
    let now = crate::testing::epoch();
    let mut s = CacheStore::new(limits((10, 10_000), (10, 500)));
    s.insert(&t("a"), 0, key(1), 1, 100, now, MIN).unwrap();
    assert_eq!(
        s.insert(&t("a"), 0, key(2), 2, 1001, now, MIN),
        Err(NotStored::TooLarge)
    );
    assert_eq!(
        s.insert(&t("a"), 0, key(2), 2, 501, now, MIN),
        Err(NotStored::TooLarge)
    );
    assert_eq!(
        s.insert(&t("a"), 0, key(2), 2, 10, now, Duration::ZERO),
        Err(NotStored::NoRoom)
    );
    assert_eq!(s.totals(), (1, 100));
}

#[test]
fn storing_again_replaces_and_accounts_once() {
    let now = crate::testing::epoch();
    let mut s = CacheStore::new(limits((10, 10_000), (10, 10_000)));
    s.insert(&t("a"), 0, key(1), 1, 100, now, MIN).unwrap();
    let removed = s.insert(&t("a"), 0, key(1), 2, 300, now, MIN * 2).unwrap();
    assert_eq!(removed[0].why, Removal::Replaced);
    assert_eq!(s.totals(), (1, 300));
    assert_eq!(hit(&mut s, 1, now + MIN + MIN / 2), Some(2));
}

#[test]
fn sweep_removes_only_what_expired() {
    let now = crate::testing::epoch();
    let mut s = CacheStore::new(limits((10, 10_000), (10, 10_000)));
    s.insert(&t("a"), 0, key(1), 1, 100, now, MIN).unwrap();
    s.insert(&t("a"), 0, key(2), 2, 100, now, MIN * 2).unwrap();
    s.insert(&t("b"), 0, key(3), 3, 100, now, MIN).unwrap();
    let removed = s.sweep(now + MIN, 10);
    assert_eq!(removed.len(), 2);
    assert!(removed.iter().all(|r| r.why == Removal::Expired));
    assert_eq!(s.totals(), (1, 100));
    assert_eq!(hit(&mut s, 2, now + MIN), Some(2));
    assert!(s.tenants().iter().all(|(t, _, _)| &**t == "a"));
}

#[test]
fn purges_by_tenant_by_scope_and_all() {
    let now = crate::testing::epoch();
    let mut s = CacheStore::new(limits((10, 10_000), (10, 10_000)));
    let (reader, admin) = (scope_tag("reader"), scope_tag("admin"));
    s.insert(&t("a"), reader, key(1), 1, 100, now, MIN).unwrap();
    s.insert(&t("a"), admin, key(2), 2, 100, now, MIN).unwrap();
    s.insert(&t("b"), reader, key(3), 3, 100, now, MIN).unwrap();
    s.insert(&t("c"), reader, key(4), 4, 100, now, MIN).unwrap();
    let r = s.purge(Purge::TenantScope("a", reader));
    assert_eq!(r.len(), 1);
    assert_eq!(hit(&mut s, 2, now), Some(2));
    assert_eq!(
        hit(&mut s, 3, now),
        Some(3),
        "another tenant's entry under that scope stays"
    );
    assert_eq!(s.purge(Purge::Tenant("b")).len(), 1);
    assert_eq!(hit(&mut s, 4, now), Some(4));
    assert_eq!(s.purge(Purge::All).len(), 2);
    assert_eq!(s.totals(), (0, 0));
    assert!(s.tenants().is_empty());
}

#[test]
fn lower_limits_evict_at_once() {
    let now = crate::testing::epoch();
    let mut s = CacheStore::new(limits((10, 10_000), (10, 10_000)));
    for k in 1..=5 {
        s.insert(&t("a"), 0, key(k), k, 100, now, MIN).unwrap();
    }
    let removed = s.set_limits(limits((10, 10_000), (3, 10_000)));
    assert_eq!(removed.len(), 2);
    assert_eq!(hit(&mut s, 1, now), None);
    assert_eq!(hit(&mut s, 5, now), Some(5));
}
