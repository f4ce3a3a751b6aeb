//! `dispatch::SharedCache` over Redis (`[cache]` with `[cluster]`): one key
//! per entry, `SET PX` with the entry's TTL (Redis expires it), values
//! compressed by the caller. Keys carry the tenant's and the scope's
//! digests, so a purge finds them by pattern (SCAN + UNLINK, on every
//! primary of a Redis Cluster: `scan.rs`), and the tenant's digest is the
//! hash tag (one slot per tenant in cluster mode).
//!
//! Best effort by construction: every call is bounded by `redis_timeout`;
//! after a failure the layer is skipped for `BACK_OFF`, so a Redis that is
//! down costs at most one `redis_timeout` per `BACK_OFF`, not one per
//! request.
//!
//! Owner: its `BoundedRedis` connection, its own (not the quota sync's);
//! `down_until`, one `Mutex` held to read or set one instant.

use std::time::{Duration, Instant};

use parking_lot::Mutex;

use super::bounded::BoundedRedis;
use super::scan;
use crate::core::{CacheKey, cache_key::hex};
use crate::dispatch::{Pending, SharedCache};

/// How long the layer is skipped after Redis failed to answer.
const BACK_OFF: Duration = Duration::from_secs(1);
/// Keys asked for per SCAN, and the longest a purge goes on.
const SCAN_COUNT: u64 = 1000;
const PURGE_FOR: Duration = Duration::from_secs(10);

pub struct RedisCache {
    redis: BoundedRedis,
    down_until: std::sync::Arc<Mutex<Option<Instant>>>,
}

fn digest(s: &str) -> String {
    use sha2::Digest;
    hex(&sha2::Sha256::digest(s.as_bytes())[..8])
}

fn tenant_prefix(tenant: &str) -> String {
    format!("dispatcher:cache:{{{}}}:", digest(tenant))
}

impl RedisCache {
    pub fn new(
        target: impl Into<crate::config::RedisTarget>,
        timeout: Duration,
    ) -> Result<Self, redis::RedisError> {
        Ok(Self {
            redis: BoundedRedis::new(target.into(), timeout)?,
            down_until: Default::default(),
        })
    }

    /// TLS settings for a `rediss://` URL.
    pub fn with_tls(mut self, tls: Option<crate::config::RedisTls>) -> Result<Self, redis::RedisError> {
        self.redis = self.redis.with_tls(tls)?;
        Ok(self)
    }

    /// Runs `cmd` unless Redis failed within `BACK_OFF`; a failure starts
    /// the back-off.
    fn run<T: Send + 'static>(
        &self,
        cmd: redis::Cmd,
        f: impl FnOnce(redis::Value) -> Result<T, String> + Send + 'static,
    ) -> Pending<T> {
        let now = crate::clock::now();
        if let Some(until) = *self.down_until.lock()
            && now < until
        {
            return Box::pin(async { Err("Redis failed moments ago; skipped".to_string()) });
        }
        let call = self.redis.run(cmd, f);
        let down_until = self.down_until.clone();
        Box::pin(async move {
            let result = call.await;
            match &result {
                Ok(_) => *down_until.lock() = None,
                Err(_) => *down_until.lock() = Some(crate::clock::now() + BACK_OFF),
            }
            result
        })
    }
}

impl SharedCache for RedisCache {
    fn get(&self, tenant: &str, key: &CacheKey) -> Pending<Option<Vec<u8>>> {
        let mut cmd = redis::cmd("GET");
        cmd.arg(lookup_key(tenant, key));
        self.run(cmd, |v| match v {
            redis::Value::Nil => Ok(None),
            redis::Value::BulkString(b) => Ok(Some(b)),
            other => Err(format!("unexpected reply {other:?}")),
        })
    }

    fn put(&self, tenant: &str, scope: u64, key: &CacheKey, value: Vec<u8>, ttl: Duration) -> Pending<()> {
        let mut cmd = redis::cmd("EVAL");
        cmd.arg(PUT_SCRIPT)
            .arg(2)
            .arg(lookup_key(tenant, key))
            .arg(scope_set(tenant, scope))
            .arg(value)
            .arg(ttl.as_millis().max(1) as u64);
        self.run(cmd, |_| Ok(()))
    }

    fn purge(&self, tenant: Option<&str>, scope: Option<u64>) -> Pending<u64> {
        let redis = self.redis.clone();
        let pattern = match (tenant, scope) {
            (None, _) => "dispatcher:cache:*".to_string(),
            (Some(t), None) => format!("{}*", tenant_prefix(t)),
            (Some(t), Some(s)) => {
                // The scope's set names its entries.
                let set = scope_set(t, s);
                return Box::pin(async move {
                    let mut cmd = redis::cmd("EVAL");
                    cmd.arg(PURGE_SET_SCRIPT).arg(1).arg(set);
                    redis.run(cmd, |v| count(&v)).await
                });
            }
        };
        Box::pin(async move {
            let deadline = crate::clock::now() + PURGE_FOR;
            // A single Redis, or each primary of a cluster in turn.
            let nodes = redis
                .with(|mut con| async move { scan::primaries(&mut con).await }, Ok)
                .await?;
            let mut removed = 0u64;
            for node in nodes {
                let mut cursor = 0u64;
                loop {
                    if crate::clock::now() > deadline {
                        return Err(format!("purge still scanning after {PURGE_FOR:?}"));
                    }
                    let mut scan = redis::cmd("SCAN");
                    scan.arg(cursor)
                        .arg("MATCH")
                        .arg(&pattern)
                        .arg("COUNT")
                        .arg(SCAN_COUNT);
                    let on = node.clone();
                    let (next, keys) = redis
                        .with(
                            move |mut con| async move { scan::query_on(&mut con, &on, &scan).await },
                            |v| redis::from_redis_value::<(u64, Vec<String>)>(v).map_err(|e| e.to_string()),
                        )
                        .await?;
                    // Entries are counted; the scope sets beside them go too.
                    removed += keys.iter().filter(|k| k.contains("}:e:")).count() as u64;
                    for group in scan::by_slot(keys) {
                        let mut unlink = redis::cmd("UNLINK");
                        unlink.arg(&group);
                        redis.run(unlink, |v| count(&v)).await?;
                    }
                    if next == 0 {
                        break;
                    }
                    cursor = next;
                }
            }
            Ok(removed)
        })
    }
}

fn count(v: &redis::Value) -> Result<u64, String> {
    match v {
        redis::Value::Int(n) => Ok((*n).max(0) as u64),
        other => Err(format!("unexpected reply {other:?}")),
    }
}

fn lookup_key(tenant: &str, key: &CacheKey) -> String {
    format!("{}e:{}", tenant_prefix(tenant), key.hex())
}

fn scope_set(tenant: &str, scope: u64) -> String {
    format!("{}s:{scope:016x}", tenant_prefix(tenant))
}

/// Stores ARGV[1] under KEYS[1] for ARGV[2] ms and names it in its scope's
/// set KEYS[2] (for purges by scope), which lives as long as its longest
/// entry. Both keys share the tenant's hash tag.
const PUT_SCRIPT: &str = r"
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
redis.call('SADD', KEYS[2], KEYS[1])
if redis.call('PTTL', KEYS[2]) < tonumber(ARGV[2]) then
  redis.call('PEXPIRE', KEYS[2], ARGV[2])
end
return 1
";

/// Unlinks every entry the scope's set KEYS[1] names, then the set; how
/// many entries were there.
const PURGE_SET_SCRIPT: &str = r"
local names = redis.call('SMEMBERS', KEYS[1])
local n = 0
for i = 1, #names, 500 do
  n = n + redis.call('UNLINK', unpack(names, i, math.min(i + 499, #names)))
end
redis.call('UNLINK', KEYS[1])
return n
";
