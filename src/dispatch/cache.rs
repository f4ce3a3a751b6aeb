//! The response cache at the edge (docs/CACHE.md): consulted by the front
//! door after the caller is authenticated and counted against its request
//! rate, before the desk (a hit reserves no quota, no tenant tokens), and
//! fed only with complete successful replies.
//!
//! Two layers: this process's entries (`core::CacheStore`, bounded per
//! tenant and in total), and with `[cluster]` a shared layer in Redis
//! (`SharedCache`, `cluster::RedisCache`) so a replica serves an entry
//! another stored. The shared layer is best effort: every call is bounded
//! by `redis_timeout`, a failure is a miss, never an error.
//!
//! Owner: `ResponseCache::store`, one `Mutex` held for one lookup, insert,
//! sweep or purge, never across an await; the shared layer is set once at
//! start.

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use bytes::Bytes;
use parking_lot::Mutex;
use prost::Message;
use tokio_util::sync::CancellationToken;

use super::Pending;
use super::front_door::Snapshot;
use super::{DispatchError, Violation};
use crate::core::{CacheKey, CacheLimits, CacheStore, KeyFacts, Lookup, Purge, Removed, scope_tag};
use crate::pb;

/// A stored reply.
#[derive(Debug, Clone, PartialEq)]
pub struct CachedEntry {
    pub output: Bytes,
    /// What producing it took.
    pub usage: pb::Usage,
    /// The region and model that produced it.
    pub region: String,
    pub model: String,
    /// Wall clock, milliseconds since the Unix epoch (shown to callers and
    /// shared between replicas).
    pub stored_at_ms: u64,
    pub expires_at_ms: u64,
}

/// Which layer answered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CacheLayer {
    Local,
    Shared,
}

impl CacheLayer {
    pub fn as_str(self) -> &'static str {
        match self {
            CacheLayer::Local => "local",
            CacheLayer::Shared => "shared",
        }
    }
}

/// A reply served from the cache.
#[derive(Debug, Clone, PartialEq)]
pub struct CacheHit {
    pub entry: Arc<CachedEntry>,
    pub layer: CacheLayer,
}

/// The cache's layer shared between replicas; implemented over Redis in
/// `cluster::cache`. Every call is bounded by the implementation; values
/// are opaque bytes (encoded and compressed here).
pub trait SharedCache: Send + Sync {
    fn get(&self, tenant: &str, key: &CacheKey) -> Pending<Option<Vec<u8>>>;
    fn put(&self, tenant: &str, scope: u64, key: &CacheKey, value: Vec<u8>, ttl: Duration) -> Pending<()>;
    /// Removes a tenant's entries (under one scope), or all; how many.
    fn purge(&self, tenant: Option<&str>, scope: Option<u64>) -> Pending<u64>;
}

/// One request's use of the cache, fixed at the front door.
pub(super) struct CachePlan {
    config: Arc<Snapshot>,
    tenant: Arc<str>,
    scope: String,
    scope_tag: u64,
    payload: Bytes,
    max_output_tokens: u64,
    asked: String,
    key: CacheKey,
    ttl: Duration,
    pub refresh: bool,
    accept_fallback: bool,
}

impl CachePlan {
    /// `r`'s cache options checked (the request itself validated, so an
    /// invalid request is never answered from the cache); `None` when it
    /// did not ask for the cache or the cache is off.
    pub fn new(
        config: &Arc<Snapshot>,
        tenant: &Arc<str>,
        r: &pb::DispatchRequest,
    ) -> Result<Option<Self>, DispatchError> {
        let Some(options) = &r.cache else {
            return Ok(None);
        };
        let settings = &config.cache;
        let ttl = match options.ttl {
            None => return Ok(None),
            Some(d) => Duration::try_from(d).map_err(|_| bad("cache.ttl", "must not be negative".into()))?,
        };
        if ttl.is_zero() || !settings.enabled {
            return Ok(None);
        }
        if ttl > settings.max_ttl {
            return Err(bad(
                "cache.ttl",
                format!(
                    "{ttl:?} is longer than the longest allowed, {:?}",
                    settings.max_ttl
                ),
            ));
        }
        if options.scope.len() > settings.max_scope_bytes {
            return Err(bad(
                "cache.scope",
                format!("longer than {} bytes", settings.max_scope_bytes),
            ));
        }
        config.check(r)?;
        let mut plan = Self {
            config: config.clone(),
            tenant: tenant.clone(),
            scope: options.scope.clone(),
            scope_tag: scope_tag(&options.scope),
            payload: r.payload.clone(),
            max_output_tokens: r.max_output_tokens,
            asked: r.model.clone(),
            key: CacheKey([0; 32]),
            ttl,
            refresh: options.refresh,
            accept_fallback: options.accept_fallback,
        };
        plan.key = plan.key_for(&r.model);
        Ok(Some(plan))
    }

    /// The key of this request as if `model` had been asked for.
    fn key_for(&self, model: &str) -> CacheKey {
        KeyFacts {
            tenant: &self.tenant,
            model,
            model_version: self.config.model_version(model),
            scope: &self.scope,
            payload: &self.payload,
            max_output_tokens: self.max_output_tokens,
        }
        .key()
    }
}

fn bad(field: &'static str, problem: String) -> DispatchError {
    DispatchError::InvalidArgument(vec![Violation::new(field, problem)])
}

/// How often expired entries are removed and the gauges refreshed.
const SWEEP_EVERY: Duration = Duration::from_secs(2);
/// Expired entries removed per sweep at most (the lock is held for them).
const SWEEP_AT_MOST: usize = 10_000;
/// What an entry costs beyond its output, as the bounds count it: its
/// indexes, `Arc`, names and allocator rounding (benches/cache_memory
/// measured about 660 B an entry).
pub const ENTRY_OVERHEAD: u64 = 640;

pub struct ResponseCache {
    store: Mutex<CacheStore<Arc<CachedEntry>>>,
    shared: OnceLock<Arc<dyn SharedCache>>,
}

impl ResponseCache {
    pub fn new(limits: CacheLimits) -> Self {
        Self {
            store: Mutex::new(CacheStore::new(limits)),
            shared: OnceLock::new(),
        }
    }

    /// Shares entries with the other replicas (once, at start).
    pub fn share(&self, shared: Arc<dyn SharedCache>) {
        let _ = self.shared.set(shared);
    }

    /// New bounds after a reload; what no longer fits is evicted.
    pub fn set_limits(&self, limits: CacheLimits) {
        let removed = {
            let mut store = self.store.lock();
            if store.limits() == limits {
                return;
            }
            store.set_limits(limits)
        };
        self.removed(&removed);
    }

    fn max_entry_bytes(&self) -> u64 {
        self.store.lock().limits().max_entry_bytes
    }

    /// The stored reply for `plan`, from this process or the shared layer.
    pub(super) async fn lookup(&self, plan: &CachePlan) -> Option<CacheHit> {
        let local = {
            let mut store = self.store.lock();
            match store.get(&plan.key, crate::clock::now()) {
                Lookup::Hit(found) => Ok(found.value.clone()),
                Lookup::Expired(removed) => Err(Some(removed)),
                Lookup::Miss => Err(None),
            }
        };
        let expired = match local {
            Ok(entry) => return Some(self.hit(plan, entry, CacheLayer::Local)),
            Err(expired) => expired,
        };
        self.removed(expired.as_slice());
        if let Some(shared) = self.shared.get() {
            match shared.get(&plan.tenant, &plan.key).await {
                // The limit read first: a guard in the match's scrutinee
                // would be held through the arms (and `insert_local` locks).
                Ok(Some(bytes)) => match decode(&bytes, self.max_entry_bytes()) {
                    Some(entry) => {
                        let now_ms = crate::clock::unix_ms();
                        if entry.expires_at_ms > now_ms {
                            let entry = Arc::new(entry);
                            // Kept here too, for what is left of its TTL.
                            let left = Duration::from_millis(entry.expires_at_ms - now_ms);
                            self.insert_local(plan, plan.key, entry.clone(), left);
                            return Some(self.hit(plan, entry, CacheLayer::Shared));
                        }
                    }
                    None => tracing::warn!("a shared cache entry did not decode; treated as a miss"),
                },
                Ok(None) => {}
                Err(e) => {
                    tracing::debug!(error = %e, "shared cache lookup failed; a miss");
                    count("dispatcher_cache_shared_errors_total", &plan.tenant, "op", "get");
                }
            }
        }
        count("dispatcher_cache_lookups_total", &plan.tenant, "result", "miss");
        None
    }

    fn hit(&self, plan: &CachePlan, entry: Arc<CachedEntry>, layer: CacheLayer) -> CacheHit {
        count("dispatcher_cache_lookups_total", &plan.tenant, "result", "hit");
        if layer == CacheLayer::Shared {
            count(
                "dispatcher_cache_shared_hits_total",
                &plan.tenant,
                "layer",
                "shared",
            );
        }
        tracing::debug!(layer = layer.as_str(), model = %entry.model, "served from the cache");
        CacheHit { entry, layer }
    }

    /// Stores a complete successful reply produced by `model` in `region`:
    /// under `model`'s key (a fallback's own), and under the key of the
    /// model asked for when that was `model` or the request accepts a
    /// fallback's reply.
    pub(super) fn store(&self, plan: &CachePlan, model: &str, region: &str, output: Bytes, usage: pb::Usage) {
        let stored_at_ms = crate::clock::unix_ms();
        let entry = Arc::new(CachedEntry {
            output,
            usage,
            region: region.to_string(),
            model: model.to_string(),
            stored_at_ms,
            expires_at_ms: stored_at_ms.saturating_add(plan.ttl.as_millis() as u64),
        });
        let mut keys = vec![plan.key_for(model)];
        if model != plan.asked && plan.accept_fallback {
            keys.push(plan.key);
        }
        let mut encoded = None;
        for key in keys {
            if !self.insert_local(plan, key, entry.clone(), plan.ttl) {
                return;
            }
            if let Some(shared) = self.shared.get() {
                let value = encoded.get_or_insert_with(|| encode(&entry)).clone();
                // Off the caller's path, bounded by the implementation.
                let put = shared.put(&plan.tenant, plan.scope_tag, &key, value, plan.ttl);
                let tenant = plan.tenant.clone();
                tokio::spawn(async move {
                    if let Err(e) = put.await {
                        tracing::debug!(error = %e, "shared cache store failed");
                        count("dispatcher_cache_shared_errors_total", &tenant, "op", "put");
                    }
                });
            }
        }
    }

    /// Stores in this process; false when the entry is too large.
    fn insert_local(&self, plan: &CachePlan, key: CacheKey, entry: Arc<CachedEntry>, ttl: Duration) -> bool {
        let bytes = entry.output.len() as u64 + ENTRY_OVERHEAD;
        let inserted = self.store.lock().insert(
            &plan.tenant,
            plan.scope_tag,
            key,
            entry,
            bytes,
            crate::clock::now(),
            ttl,
        );
        match inserted {
            Ok(removed) => {
                count("dispatcher_cache_stores_total", &plan.tenant, "result", "stored");
                self.removed(&removed);
                self.gauges(&plan.tenant);
                true
            }
            Err(why) => {
                let result = match why {
                    crate::core::NotStored::TooLarge => "too_large",
                    crate::core::NotStored::NoRoom => "no_room",
                };
                count("dispatcher_cache_stores_total", &plan.tenant, "result", result);
                false
            }
        }
    }

    /// Purges entries here and in the shared layer: (entries, bytes) here,
    /// and keys removed there (`None`: there is none; `Some(Err)`: it did
    /// not answer).
    pub async fn purge(
        &self,
        tenant: Option<&str>,
        scope: Option<&str>,
    ) -> (u64, u64, Option<Result<u64, String>>) {
        let tag = scope.map(scope_tag);
        let which = match (tenant, tag) {
            (None, _) => Purge::All,
            (Some(t), None) => Purge::Tenant(t),
            (Some(t), Some(s)) => Purge::TenantScope(t, s),
        };
        let removed = self.store.lock().purge(which);
        self.removed(&removed);
        for t in removed
            .iter()
            .map(|r| r.tenant.clone())
            .collect::<std::collections::BTreeSet<_>>()
        {
            self.gauges(&t);
        }
        let shared = match self.shared.get() {
            Some(s) => Some(s.purge(tenant, tag).await),
            None => None,
        };
        let bytes = removed.iter().map(|r| r.bytes).sum();
        (removed.len() as u64, bytes, shared)
    }

    /// (entries, bytes) held in this process, in total and for `tenant`.
    pub fn usage(&self, tenant: &str) -> ((usize, u64), (usize, u64)) {
        let store = self.store.lock();
        (store.totals(), store.usage(tenant))
    }

    /// Removes expired entries and refreshes the gauges every `SWEEP_EVERY`
    /// until `cancel` fires.
    pub fn spawn_sweeper(self: &Arc<Self>, cancel: CancellationToken) {
        let cache = Arc::downgrade(self);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(SWEEP_EVERY);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    _ = cancel.cancelled() => return,
                    _ = tick.tick() => {}
                }
                let Some(cache) = cache.upgrade() else { return };
                let (removed, tenants) = {
                    let mut store = cache.store.lock();
                    let removed = store.sweep(crate::clock::now(), SWEEP_AT_MOST);
                    (removed, store.tenants())
                };
                cache.removed(&removed);
                if crate::metrics::enabled() {
                    for (t, entries, bytes) in tenants {
                        metrics::gauge!("dispatcher_cache_entries", "tenant" => t.to_string())
                            .set(entries as f64);
                        metrics::gauge!("dispatcher_cache_bytes", "tenant" => t.to_string())
                            .set(bytes as f64);
                    }
                }
            }
        });
    }

    /// Counts entries that left, by tenant and why.
    fn removed(&self, removed: &[Removed]) {
        if !crate::metrics::enabled() {
            return;
        }
        for r in removed {
            metrics::counter!(
                "dispatcher_cache_evictions_total",
                "tenant" => r.tenant.to_string(),
                "reason" => r.why.as_str(),
            )
            .increment(1);
        }
        for t in removed
            .iter()
            .map(|r| &r.tenant)
            .collect::<std::collections::BTreeSet<_>>()
        {
            self.gauges(t);
        }
    }

    fn gauges(&self, tenant: &str) {
        if !crate::metrics::enabled() {
            return;
        }
        let (entries, bytes) = self.store.lock().usage(tenant);
        metrics::gauge!("dispatcher_cache_entries", "tenant" => tenant.to_string()).set(entries as f64);
        metrics::gauge!("dispatcher_cache_bytes", "tenant" => tenant.to_string()).set(bytes as f64);
    }
}

fn count(name: &'static str, tenant: &str, label: &'static str, value: &'static str) {
    if crate::metrics::enabled() {
        metrics::counter!(name, "tenant" => tenant.to_string(), label => value).increment(1);
    }
}

fn timestamp(ms: u64) -> prost_types::Timestamp {
    prost_types::Timestamp {
        seconds: (ms / 1000) as i64,
        nanos: ((ms % 1000) * 1_000_000) as i32,
    }
}

fn millis(t: Option<prost_types::Timestamp>) -> Option<u64> {
    let t = t?;
    let ms = u64::try_from(t.seconds).ok()?.checked_mul(1000)?;
    ms.checked_add(u64::try_from(t.nanos).ok()? / 1_000_000)
}

/// What a reply served from the cache says about it.
pub fn cached_reply(hit: &CacheHit) -> pb::CachedReply {
    let e = &hit.entry;
    pb::CachedReply {
        stored_at: Some(timestamp(e.stored_at_ms)),
        expires_at: Some(timestamp(e.expires_at_ms)),
        region: e.region.clone(),
        model: e.model.clone(),
        usage: Some(e.usage),
        layer: hit.layer.as_str().to_string(),
    }
}

/// An entry as the shared layer keeps it: the reply's wire form,
/// compressed (LZ4, its size first).
pub fn encode(e: &CachedEntry) -> Vec<u8> {
    let reply = pb::DispatchReply {
        output: e.output.clone(),
        cached: Some(cached_reply(&CacheHit {
            entry: Arc::new(e.clone()),
            layer: CacheLayer::Shared,
        })),
        ..Default::default()
    };
    lz4_flex::block::compress_prepend_size(&reply.encode_to_vec())
}

/// `encode`'s inverse; `None` for anything else, or anything claiming to be
/// larger than an entry may be (read before it is allocated).
pub fn decode(bytes: &[u8], max_entry_bytes: u64) -> Option<CachedEntry> {
    let size = u32::from_le_bytes(bytes.get(..4)?.try_into().ok()?) as u64;
    if size > max_entry_bytes + 1024 {
        return None;
    }
    let raw = lz4_flex::block::decompress_size_prepended(bytes).ok()?;
    let reply = pb::DispatchReply::decode(raw.as_slice()).ok()?;
    hit_from_pb(reply.cached?, reply.output).map(|h| Arc::unwrap_or_clone(h.entry))
}

/// `cached_reply`'s inverse, with the reply's output (a reply replayed for
/// a repeated request id keeps saying it came from the cache).
pub fn hit_from_pb(c: pb::CachedReply, output: Bytes) -> Option<CacheHit> {
    let layer = match c.layer.as_str() {
        "local" => CacheLayer::Local,
        _ => CacheLayer::Shared,
    };
    let entry = CachedEntry {
        output,
        usage: c.usage.unwrap_or_default(),
        region: c.region,
        model: c.model,
        stored_at_ms: millis(c.stored_at)?,
        expires_at_ms: millis(c.expires_at)?,
    };
    Some(CacheHit {
        entry: Arc::new(entry),
        layer,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(output: &[u8]) -> CachedEntry {
        CachedEntry {
            output: Bytes::copy_from_slice(output),
            usage: pb::Usage {
                prompt_tokens: 12,
                completion_tokens: 34,
                ..Default::default()
            },
            region: "eu".into(),
            model: "gpt-4o".into(),
            stored_at_ms: 1_700_000_000_123,
            expires_at_ms: 1_700_000_060_123,
        }
    }

    #[test]
    fn entries_round_trip_compressed() {
        let e = entry(&b"the same words again and again ".repeat(64));
        let bytes = encode(&e);
        assert!(bytes.len() < e.output.len() / 4, "{} bytes", bytes.len());
        assert_eq!(decode(&bytes, 1 << 20), Some(e));
    }

    #[test]
    fn garbage_and_oversized_claims_do_not_decode() {
        assert_eq!(decode(b"", 1 << 20), None);
        assert_eq!(decode(b"\x05\x00\x00\x00abc", 1 << 20), None);
        // Claims 4 GiB: refused before anything is allocated.
        assert_eq!(decode(b"\xff\xff\xff\xff\x00", 1 << 20), None);
        let big = encode(&entry(&[7u8; 4096]));
        assert_eq!(decode(&big, 1024), None);
        assert!(decode(&big, 8192).is_some());
    }
}
