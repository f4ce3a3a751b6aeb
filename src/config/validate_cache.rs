//! `[cache]`: the response cache's bounds (docs/CACHE.md).

use std::time::Duration;

use super::ctx::Ctx;
use super::raw::RawCache;
use super::{CacheConfig, ConfigError};
use crate::core::{Bounds, CacheLimits};

pub(super) fn validate_cache(c: &Ctx<'_>, k: RawCache) -> Result<CacheConfig, ConfigError> {
    let max_ttl = c.duration("cache.max_ttl", k.max_ttl.as_deref(), Duration::from_secs(3600))?;
    if !(Duration::from_secs(1)..=Duration::from_secs(7 * 86_400)).contains(&max_ttl) {
        return Err(c.err("cache.max_ttl", "is out of range; expected 1s to 7d"));
    }
    let total = Bounds {
        max_entries: c.at_least("cache.max_entries", k.max_entries, 10_000, 1)?,
        max_bytes: c.at_least("cache.max_bytes", k.max_bytes, 64 << 20, 1024)?,
    };
    let per_tenant = Bounds {
        max_entries: c.at_least("cache.max_entries_per_tenant", k.max_entries_per_tenant, 2_000, 1)?,
        max_bytes: c.at_least(
            "cache.max_bytes_per_tenant",
            k.max_bytes_per_tenant,
            16 << 20,
            1024,
        )?,
    };
    if per_tenant.max_entries > total.max_entries {
        return Err(c.err(
            "cache.max_entries_per_tenant",
            format!(
                "{} is more than cache.max_entries ({})",
                per_tenant.max_entries, total.max_entries
            ),
        ));
    }
    if per_tenant.max_bytes > total.max_bytes {
        return Err(c.err(
            "cache.max_bytes_per_tenant",
            format!(
                "{} is more than cache.max_bytes ({})",
                per_tenant.max_bytes, total.max_bytes
            ),
        ));
    }
    let max_entry_bytes = c.at_least("cache.max_entry_bytes", k.max_entry_bytes, 1 << 20, 64)?;
    if max_entry_bytes > per_tenant.max_bytes {
        return Err(c.err(
            "cache.max_entry_bytes",
            format!(
                "{max_entry_bytes} is more than cache.max_bytes_per_tenant ({})",
                per_tenant.max_bytes
            ),
        ));
    }
    let max_scope_bytes = c.at_least("cache.max_scope_bytes", k.max_scope_bytes, 256, 1)?;
    if max_scope_bytes > 4096 {
        return Err(c.err("cache.max_scope_bytes", "must be at most 4096"));
    }
    Ok(CacheConfig {
        enabled: k.enabled.unwrap_or(true),
        max_ttl,
        limits: CacheLimits {
            total,
            per_tenant,
            max_entry_bytes,
        },
        max_scope_bytes,
        shared: k.shared.unwrap_or(true),
    })
}
