//! The response cache's bookkeeping: entries with their expiry, bounded
//! per tenant and in total (entries, bytes, largest entry), and which entry
//! goes when a bound is reached. Time is passed in.
//!
//! Why not a general cache crate: the bounds here are two-level (a tenant's
//! share and the whole), on entries and bytes at once, and the eviction is
//! tenant-fair: a tenant over its own bound evicts its own least recently
//! used entry; the whole over its bound evicts from the tenant holding the
//! most, so one tenant filling the cache pushes out its own entries before
//! anyone else's. Expiry is decided on the caller's clock (tokio's, which
//! tests pause), not on a clock of the cache's own.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::cache_key::CacheKey;

/// A bound on entries and bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Bounds {
    pub max_entries: usize,
    pub max_bytes: u64,
}

/// Every bound of the cache.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CacheLimits {
    pub total: Bounds,
    pub per_tenant: Bounds,
    /// Larger replies are not stored.
    pub max_entry_bytes: u64,
}

/// Why an entry left the cache.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Removal {
    Expired,
    /// Its tenant was at its own bound.
    TenantBound,
    /// The cache was at its total bound.
    TotalBound,
    /// Replaced by a newer reply under the same key.
    Replaced,
    Purged,
}

impl Removal {
    pub fn as_str(self) -> &'static str {
        match self {
            Removal::Expired => "expired",
            Removal::TenantBound => "tenant_bound",
            Removal::TotalBound => "total_bound",
            Removal::Replaced => "replaced",
            Removal::Purged => "purged",
        }
    }
}

/// One entry that left.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Removed {
    pub tenant: Arc<str>,
    pub bytes: u64,
    pub why: Removal,
}

/// Why a reply was not stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NotStored {
    /// Larger than `max_entry_bytes` (or than a tenant's whole bound).
    TooLarge,
    /// A zero TTL, or a bound of zero entries.
    NoRoom,
}

/// What a lookup found.
#[derive(Debug)]
pub enum Lookup<'a, V> {
    Hit(Found<'a, V>),
    Miss,
    /// There was an entry, past its expiry: removed now.
    Expired(Removed),
}

#[derive(Debug)]
pub struct Found<'a, V> {
    pub value: &'a V,
    pub stored_at: Instant,
    pub expires_at: Instant,
}

/// Which entries a purge removes.
#[derive(Debug, Clone, Copy)]
pub enum Purge<'a> {
    All,
    Tenant(&'a str),
    /// A tenant's entries stored under one scope (`scope_tag`).
    TenantScope(&'a str, u64),
}

struct Slot<V> {
    tenant: Arc<str>,
    scope: u64,
    bytes: u64,
    stored_at: Instant,
    expires_at: Instant,
    /// Recency: larger is more recently stored or read.
    used: u64,
    /// Order of storing, to tell apart entries expiring at the same instant.
    born: u64,
    value: V,
}

/// One tenant's share: what it holds, least recently used first.
#[derive(Default)]
struct Shelf {
    entries: usize,
    bytes: u64,
    by_use: BTreeMap<u64, CacheKey>,
}

/// The cache's entries and their accounting. Generic over what is stored,
/// whose size in bytes the caller states.
pub struct CacheStore<V> {
    limits: CacheLimits,
    slots: HashMap<CacheKey, Slot<V>>,
    shelves: HashMap<Arc<str>, Shelf>,
    by_expiry: BTreeMap<(Instant, u64), CacheKey>,
    entries: usize,
    bytes: u64,
    clock: u64,
}

impl<V> CacheStore<V> {
    pub fn new(limits: CacheLimits) -> Self {
        Self {
            limits,
            slots: HashMap::new(),
            shelves: HashMap::new(),
            by_expiry: BTreeMap::new(),
            entries: 0,
            bytes: 0,
            clock: 0,
        }
    }

    pub fn limits(&self) -> CacheLimits {
        self.limits
    }

    /// New bounds (a reload); entries beyond them are evicted now.
    pub fn set_limits(&mut self, limits: CacheLimits) -> Vec<Removed> {
        self.limits = limits;
        let mut removed = Vec::new();
        let tenants: Vec<Arc<str>> = self.shelves.keys().cloned().collect();
        for t in tenants {
            self.fit_tenant(&t, 0, 0, &mut removed);
        }
        self.fit_total(0, 0, &mut removed);
        let too_large: Vec<CacheKey> = self
            .slots
            .iter()
            .filter(|(_, s)| s.bytes > limits.max_entry_bytes)
            .map(|(k, _)| *k)
            .collect();
        for k in too_large {
            removed.extend(self.remove(&k, Removal::TenantBound));
        }
        removed
    }

    /// The entry under `key` if it has not expired at `now` (an expired one
    /// is removed). A hit makes the entry the most recently used.
    pub fn get(&mut self, key: &CacheKey, now: Instant) -> Lookup<'_, V> {
        let Some(slot) = self.slots.get(key) else {
            return Lookup::Miss;
        };
        if slot.expires_at <= now {
            let removed = self.remove(key, Removal::Expired).expect("present");
            return Lookup::Expired(removed);
        }
        self.clock += 1;
        let used = self.clock;
        let slot = self.slots.get_mut(key).expect("present");
        let shelf = self
            .shelves
            .get_mut(&slot.tenant)
            .expect("a tenant's entry has its shelf");
        shelf.by_use.remove(&slot.used);
        shelf.by_use.insert(used, *key);
        slot.used = used;
        Lookup::Hit(Found {
            value: &slot.value,
            stored_at: slot.stored_at,
            expires_at: slot.expires_at,
        })
    }

    /// Stores `value` (`bytes` long) for `ttl` from `now`, replacing what
    /// `key` held; evicts what the bounds require, and says what went.
    #[allow(clippy::too_many_arguments)]
    pub fn insert(
        &mut self,
        tenant: &Arc<str>,
        scope: u64,
        key: CacheKey,
        value: V,
        bytes: u64,
        now: Instant,
        ttl: Duration,
    ) -> Result<Vec<Removed>, NotStored> {
        let l = self.limits;
        if bytes > l.max_entry_bytes || bytes > l.per_tenant.max_bytes || bytes > l.total.max_bytes {
            return Err(NotStored::TooLarge);
        }
        if ttl.is_zero() || l.per_tenant.max_entries == 0 || l.total.max_entries == 0 {
            return Err(NotStored::NoRoom);
        }
        let mut removed: Vec<Removed> = self.remove(&key, Removal::Replaced).into_iter().collect();
        self.fit_tenant(tenant, 1, bytes, &mut removed);
        self.fit_total(1, bytes, &mut removed);
        self.clock += 1;
        let expires_at = now
            .checked_add(ttl)
            .unwrap_or(now + Duration::from_secs(365 * 86_400));
        let shelf = self.shelves.entry(tenant.clone()).or_default();
        shelf.entries += 1;
        shelf.bytes += bytes;
        shelf.by_use.insert(self.clock, key);
        self.by_expiry.insert((expires_at, self.clock), key);
        self.entries += 1;
        self.bytes += bytes;
        self.slots.insert(
            key,
            Slot {
                tenant: tenant.clone(),
                scope,
                bytes,
                stored_at: now,
                expires_at,
                used: self.clock,
                born: self.clock,
                value,
            },
        );
        Ok(removed)
    }

    /// Removes entries expired at `now`, at most `limit` of them.
    pub fn sweep(&mut self, now: Instant, limit: usize) -> Vec<Removed> {
        let due: Vec<CacheKey> = self
            .by_expiry
            .range(..=(now, u64::MAX))
            .take(limit)
            .map(|(_, k)| *k)
            .collect();
        due.iter()
            .filter_map(|k| self.remove(k, Removal::Expired))
            .collect()
    }

    /// Removes the entries `which` names; returns them.
    pub fn purge(&mut self, which: Purge<'_>) -> Vec<Removed> {
        let keys: Vec<CacheKey> = match which {
            Purge::All => self.slots.keys().copied().collect(),
            Purge::Tenant(t) => self
                .shelves
                .get(t)
                .map(|s| s.by_use.values().copied().collect())
                .unwrap_or_default(),
            Purge::TenantScope(t, scope) => self
                .shelves
                .get(t)
                .map(|s| {
                    s.by_use
                        .values()
                        .filter(|k| self.slots.get(*k).is_some_and(|s| s.scope == scope))
                        .copied()
                        .collect()
                })
                .unwrap_or_default(),
        };
        keys.iter()
            .filter_map(|k| self.remove(k, Removal::Purged))
            .collect()
    }

    /// (entries, bytes) held in total.
    pub fn totals(&self) -> (usize, u64) {
        (self.entries, self.bytes)
    }

    /// (entries, bytes) `tenant` holds.
    pub fn usage(&self, tenant: &str) -> (usize, u64) {
        self.shelves.get(tenant).map_or((0, 0), |s| (s.entries, s.bytes))
    }

    /// Every tenant holding entries, with (entries, bytes).
    pub fn tenants(&self) -> Vec<(Arc<str>, usize, u64)> {
        let mut v: Vec<_> = self
            .shelves
            .iter()
            .map(|(t, s)| (t.clone(), s.entries, s.bytes))
            .collect();
        v.sort();
        v
    }

    /// Evicts `tenant`'s least recently used entries until `entries` more
    /// entries and `bytes` more bytes fit its bound.
    fn fit_tenant(&mut self, tenant: &str, entries: usize, bytes: u64, removed: &mut Vec<Removed>) {
        let b = self.limits.per_tenant;
        loop {
            let Some(shelf) = self.shelves.get(tenant) else {
                return;
            };
            if shelf.entries + entries <= b.max_entries && shelf.bytes + bytes <= b.max_bytes {
                return;
            }
            let Some((_, key)) = shelf.by_use.first_key_value() else {
                return;
            };
            let key = *key;
            removed.extend(self.remove(&key, Removal::TenantBound));
        }
    }

    /// Evicts until `entries` and `bytes` more fit the total bound: each
    /// time the least recently used entry of the tenant holding the most
    /// (bytes when bytes are short, entries when entries are).
    fn fit_total(&mut self, entries: usize, bytes: u64, removed: &mut Vec<Removed>) {
        let b = self.limits.total;
        loop {
            let short_of_entries = self.entries + entries > b.max_entries;
            let short_of_bytes = self.bytes + bytes > b.max_bytes;
            if !short_of_entries && !short_of_bytes {
                return;
            }
            let largest = self
                .shelves
                .iter()
                .filter(|(_, s)| s.entries > 0)
                .max_by(|(ta, a), (tb, b)| {
                    let by = |s: &Shelf| {
                        if short_of_bytes {
                            (s.bytes, s.entries as u64)
                        } else {
                            (s.entries as u64, s.bytes)
                        }
                    };
                    by(a).cmp(&by(b)).then_with(|| tb.cmp(ta))
                })
                .and_then(|(_, s)| s.by_use.first_key_value().map(|(_, k)| *k));
            let Some(key) = largest else {
                return;
            };
            removed.extend(self.remove(&key, Removal::TotalBound));
        }
    }

    fn remove(&mut self, key: &CacheKey, why: Removal) -> Option<Removed> {
        let slot = self.slots.remove(key)?;
        self.by_expiry.remove(&(slot.expires_at, slot.born));
        if let Some(shelf) = self.shelves.get_mut(&slot.tenant) {
            shelf.entries -= 1;
            shelf.bytes -= slot.bytes;
            shelf.by_use.remove(&slot.used);
            if shelf.entries == 0 {
                self.shelves.remove(&slot.tenant);
            }
        }
        self.entries -= 1;
        self.bytes -= slot.bytes;
        Some(Removed {
            tenant: slot.tenant,
            bytes: slot.bytes,
            why,
        })
    }
}
