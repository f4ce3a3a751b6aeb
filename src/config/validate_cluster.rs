//! `[cluster]`: several replicas sharing each provider's quota through Redis
//! (docs/SCALING.md).

use std::time::Duration;

use super::ctx::Ctx;
use super::raw::RawCluster;
use super::{ClusterConfig, ConfigError, RedisTarget};
use crate::core::SharingSettings;

/// At most this many replicas may be expected (the fallback divides by it).
const MAX_REPLICAS: u32 = 1000;

/// At most this many Sentinels.
const MAX_SENTINELS: usize = 16;

/// At most this many seed nodes of a Redis Cluster.
const MAX_CLUSTER_NODES: usize = 64;

/// `[cluster] redis_cluster`: the seed nodes of a Redis Cluster, given
/// instead of `redis_url` and `redis_sentinels` (URLs never echoed).
fn redis_cluster_target(c: &Ctx<'_>, k: &RawCluster, nodes: Vec<String>) -> Result<RedisTarget, ConfigError> {
    for (other, set) in [
        ("redis_url", k.redis_url.is_some()),
        ("redis_sentinels", k.redis_sentinels.is_some()),
    ] {
        if set {
            return Err(c.err(
                "cluster.redis_cluster",
                format!("and cluster.{other} are both set; give one (a single Redis, the Sentinels of a primary, or a Redis Cluster's nodes)"),
            ));
        }
    }
    if k.master_name.is_some() {
        return Err(c.err("cluster.master_name", "is only used with redis_sentinels"));
    }
    if nodes.is_empty() || nodes.len() > MAX_CLUSTER_NODES {
        return Err(c.err(
            "cluster.redis_cluster",
            format!(
                "lists {} nodes; expected 1 to {MAX_CLUSTER_NODES} URLs of the cluster's nodes",
                nodes.len()
            ),
        ));
    }
    if let Some(i) = nodes
        .iter()
        .position(|u| !(u.starts_with("redis://") || u.starts_with("rediss://")))
    {
        return Err(c.err(
            "cluster.redis_cluster",
            format!(
                "entry {} is not a Redis URL; expected redis://host:port of a cluster node",
                i + 1
            ),
        ));
    }
    Ok(RedisTarget::Cluster { nodes })
}

/// `redis_url`, or `redis_sentinels` with `master_name` (one of the two):
/// where the Redis of `section` is. `None` when neither is given.
pub(super) fn redis_target(
    c: &Ctx<'_>,
    section: &str,
    url: Option<String>,
    sentinels: Option<Vec<String>>,
    master_name: Option<String>,
) -> Result<Option<RedisTarget>, ConfigError> {
    let key = |k: &str| format!("{section}.{k}");
    let is_url =
        |u: &str| u.starts_with("redis://") || u.starts_with("rediss://") || u.starts_with("unix://");
    match (url, sentinels) {
        (Some(_), Some(_)) => Err(c.err(
            key("redis_sentinels"),
            format!(
                "and {} are both set; give one (a single Redis, or the Sentinels of a primary)",
                key("redis_url")
            ),
        )),
        (Some(u), None) => {
            if u.trim().is_empty() {
                return Err(c.err(key("redis_url"), "is empty; expected redis://host:port"));
            }
            if !is_url(&u) {
                // Not echoed: a Redis URL may carry a password.
                return Err(c.err(
                    key("redis_url"),
                    "is not a Redis URL; expected redis://host:port (or rediss://, unix://)",
                ));
            }
            if master_name.is_some() {
                return Err(c.err(key("master_name"), "is only used with redis_sentinels"));
            }
            Ok(Some(RedisTarget::Url(u)))
        }
        (None, Some(list)) => {
            if list.is_empty() || list.len() > MAX_SENTINELS {
                return Err(c.err(
                    key("redis_sentinels"),
                    format!(
                        "lists {} Sentinels; expected 1 to {MAX_SENTINELS} URLs",
                        list.len()
                    ),
                ));
            }
            if let Some(i) = list
                .iter()
                .position(|u| !(u.starts_with("redis://") || u.starts_with("rediss://")))
            {
                return Err(c.err(
                    key("redis_sentinels"),
                    format!(
                        "entry {} is not a Redis URL; expected redis://host:port of a Sentinel",
                        i + 1
                    ),
                ));
            }
            let Some(name) = master_name else {
                return Err(c.err(
                    key("master_name"),
                    "is required with redis_sentinels (the name the Sentinels monitor the primary under)",
                ));
            };
            c.name(&key("master_name"), &name)?;
            Ok(Some(RedisTarget::Sentinel {
                sentinels: list,
                master_name: name,
            }))
        }
        (None, None) => {
            if master_name.is_some() {
                return Err(c.err(key("master_name"), "is only used with redis_sentinels"));
            }
            Ok(None)
        }
    }
}

pub(super) fn validate_cluster(c: &Ctx<'_>, k: RawCluster) -> Result<ClusterConfig, ConfigError> {
    let redis_url = k.redis_url.clone().unwrap_or_default();
    let redis = match k.redis_cluster.clone() {
        Some(nodes) => redis_cluster_target(c, &k, nodes)?,
        None => {
            let Some(redis) = redis_target(
                c,
                "cluster",
                k.redis_url.clone(),
                k.redis_sentinels.clone(),
                k.master_name.clone(),
            )?
            else {
                return Err(c.err(
                    "cluster.redis_url",
                    "is required with [cluster] (like \"redis://127.0.0.1:6379\"), or redis_sentinels and master_name, or redis_cluster; remove [cluster] to run one replica without Redis",
                ));
            };
            redis
        }
    };
    let redis_tls = super::redis_tls::validate_redis_tls(
        c,
        "cluster",
        Some(&redis),
        k.redis_ca_file,
        k.redis_client_cert_file,
        k.redis_client_key_file,
    )?;
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
        redis,
        replica_id: k.replica_id,
        sharing: SharingSettings {
            chunk_ttl,
            tick,
            unreachable_after,
            replicas_floor: expected,
            expire_chunks: true,
        },
        redis_timeout,
        redis_tls,
    })
}
