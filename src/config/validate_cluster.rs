//! `[cluster]`: several replicas sharing each provider's quota through Redis
//! (docs/SCALING.md).

use std::time::Duration;

use super::ctx::Ctx;
use super::raw::RawCluster;
use super::{ClusterConfig, ConfigError};
use crate::core::SharingSettings;

/// At most this many replicas may be expected (the fallback divides by it).
const MAX_REPLICAS: u32 = 1000;

pub(super) fn validate_cluster(c: &Ctx<'_>, k: RawCluster) -> Result<ClusterConfig, ConfigError> {
    let redis_url = match k.redis_url {
        Some(u) if !u.trim().is_empty() => u,
        _ => {
            return Err(c.err(
                "cluster.redis_url",
                "is required with [cluster] (like \"redis://127.0.0.1:6379\"); remove [cluster] to run one replica without Redis",
            ));
        }
    };
    if !(redis_url.starts_with("redis://")
        || redis_url.starts_with("rediss://")
        || redis_url.starts_with("unix://"))
    {
        // Not echoed: a Redis URL may carry a password.
        return Err(c.err(
            "cluster.redis_url",
            "is not a Redis URL; expected redis://host:port (or rediss://, unix://)",
        ));
    }
    if let Some(id) = &k.replica_id {
        c.name("cluster.replica_id", id)?;
    }
    let defaults = SharingSettings::default();
    let expected = k.expected_replicas.unwrap_or(1);
    if expected == 0 || expected > MAX_REPLICAS {
        return Err(c.err(
            "cluster.expected_replicas",
            format!("{expected} is out of range; expected 1 to {MAX_REPLICAS}"),
        ));
    }
    let within = |key: &str, value: Option<&str>, default: Duration, lo: Duration, hi: Duration| {
        let d = c.duration(key, value, default)?;
        if d < lo || d > hi {
            return Err(c.err(
                key,
                format!(
                    "{} is out of range; expected {} to {}",
                    humantime::format_duration(d),
                    humantime::format_duration(lo),
                    humantime::format_duration(hi)
                ),
            ));
        }
        Ok(d)
    };
    let ms = Duration::from_millis;
    let tick = within(
        "cluster.sync_interval",
        k.sync_interval.as_deref(),
        defaults.tick,
        ms(10),
        ms(1000),
    )?;
    let chunk_ttl = within(
        "cluster.chunk_ttl",
        k.chunk_ttl.as_deref(),
        defaults.chunk_ttl,
        ms(100),
        ms(10_000),
    )?;
    if chunk_ttl < 2 * tick {
        return Err(c.err(
            "cluster.chunk_ttl",
            format!(
                "must be at least twice cluster.sync_interval ({}), or chunks expire before the next grant",
                humantime::format_duration(tick)
            ),
        ));
    }
    let redis_timeout = within(
        "cluster.redis_timeout",
        k.redis_timeout.as_deref(),
        ms(150),
        ms(10),
        ms(5000),
    )?;
    let unreachable_after = within(
        "cluster.unreachable_after",
        k.unreachable_after.as_deref(),
        defaults.unreachable_after,
        ms(50),
        ms(60_000),
    )?;
    Ok(ClusterConfig {
        redis_url,
        replica_id: k.replica_id,
        sharing: SharingSettings {
            chunk_ttl,
            tick,
            unreachable_after,
            replicas_floor: expected,
            expire_chunks: true,
        },
        redis_timeout,
    })
}
