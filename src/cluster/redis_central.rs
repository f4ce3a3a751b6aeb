//! The central buckets in Redis: one pipelined round trip of the
//! `central.lua` script per sync tick (on a Redis Cluster, one pipeline per
//! slot, sent at once: `pipelines.rs`), every call bounded by a timeout.

use std::time::Duration;

use crate::config::RedisTarget;

use super::pipelines::SlotPipelines;
use super::target::RedisConnection;

use crate::core::central::{FORGET_AFTER, ROUND, STALE_AFTER};
use crate::core::{SyncGrant, SyncItem, TenantTotals, TenantUsage};

const SCRIPT: &str = include_str!("central.lua");

/// A bucket nobody called for this long is removed by Redis (a later call
/// finds it missing and starts it empty, which is always safe).
const IDLE_EXPIRY_SECS: u64 = 3600;

/// The Redis keys of one (region, model): its bucket and its replicas, with
/// one hash tag so they live on one Redis Cluster slot.
pub fn bucket_keys(region: &str, model: &str) -> (String, String) {
    let tag = format!("{{{region}/{model}}}");
    (
        format!("dispatcher:{tag}:bucket"),
        format!("dispatcher:{tag}:replicas"),
    )
}

/// A tenant's running totals (all time, and one day), for sharing its
/// limits between replicas.
pub fn tenant_keys(tenant: &str, day: u64) -> (String, String) {
    (
        format!("dispatcher:tenant:{{{tenant}}}:tokens"),
        format!("dispatcher:tenant:{{{tenant}}}:day:{day}"),
    )
}

/// A tenant's spend (micro-units) in one UTC day and one UTC month.
pub fn tenant_cost_keys(tenant: &str, day: u64, month: u64) -> (String, String) {
    (
        format!("dispatcher:tenant:{{{tenant}}}:cost:day:{day}"),
        format!("dispatcher:tenant:{{{tenant}}}:cost:month:{month}"),
    )
}

/// Where a tenant's refunds are counted, beside each of `tenant_keys`.
fn refunded(key: &str) -> String {
    format!("{key}:refunded")
}

/// Redis answers per tenant in `tenants`.
const TENANT_REPLIES: usize = 6;

/// A tenant's running total nobody added to for this long is removed (the
/// next sync starts over from it).
const TENANT_EXPIRY_SECS: u64 = 86_400;

/// What failed talking to Redis, for logs (never shown to callers).
#[derive(Debug, thiserror::Error)]
pub enum CentralError {
    #[error("no answer from Redis within {0:?}")]
    Timeout(Duration),
    #[error("Redis: {0}")]
    Redis(#[from] redis::RedisError),
    #[error("Redis answered something else: {0}")]
    Parse(#[from] redis::ParsingError),
    #[error("Redis answered {got} replies to {sent} calls")]
    Short { sent: usize, got: usize },
}

pub struct RedisCentral {
    target: RedisTarget,
    tls: Option<crate::config::RedisTls>,
    connection: Option<RedisConnection>,
    script: redis::Script,
    timeout: Duration,
}

impl RedisCentral {
    /// Checks the URL; connects lazily (a replica starts without Redis).
    pub fn new(target: impl Into<RedisTarget>, timeout: Duration) -> Result<Self, redis::RedisError> {
        let target = target.into();
        super::target::check(&target, None)?;
        Ok(Self {
            target,
            tls: None,
            connection: None,
            script: redis::Script::new(SCRIPT),
            timeout,
        })
    }

    /// TLS settings for a `rediss://` URL (checked here, used at connect).
    pub fn with_tls(mut self, tls: Option<crate::config::RedisTls>) -> Result<Self, redis::RedisError> {
        super::target::check(&self.target, tls.as_ref())?;
        self.tls = tls;
        Ok(self)
    }

    async fn connection(&mut self) -> Result<RedisConnection, CentralError> {
        if let Some(c) = &self.connection {
            return Ok(c.clone());
        }
        let connect = super::target::connect(&self.target, self.tls.as_ref(), self.timeout);
        let c = tokio::time::timeout(self.timeout, connect)
            .await
            .map_err(|_| CentralError::Timeout(self.timeout))??;
        self.connection = Some(c.clone());
        Ok(c)
    }

    /// One call per item, pipelined, within the timeout. `now_us` replaces
    /// Redis `TIME` (tests only).
    pub async fn call(
        &mut self,
        replica: &str,
        items: &[SyncItem],
        now_us: Option<u64>,
    ) -> Result<Vec<SyncGrant>, CentralError> {
        let grants = self.call_each(replica, items, now_us).await?;
        let got = grants.iter().flatten().count();
        if got != items.len() {
            return Err(CentralError::Short {
                sent: items.len(),
                got,
            });
        }
        Ok(grants.into_iter().flatten().collect())
    }

    /// `call`, each item answered on its own: `None` for an item whose
    /// shard did not answer (a Redis Cluster with a shard down: only its
    /// region-models go without). An error when no item was answered.
    pub async fn call_each(
        &mut self,
        replica: &str,
        items: &[SyncItem],
        now_us: Option<u64>,
    ) -> Result<Vec<Option<SyncGrant>>, CentralError> {
        let timeout = self.timeout;
        let work = async {
            let con = self.connection().await?;
            let (replies, error) = self
                .pipelines(&con, replica, items, now_us)
                .query_each(&con, 1, Some(&self.script))
                .await;
            if let Some(e) = error
                && replies.iter().all(Option::is_none)
            {
                return Err(CentralError::Redis(e));
            }
            let grants = replies
                .into_iter()
                .map(|r| {
                    let r: Vec<i64> = redis::from_redis_value(r?.pop()?).ok()?;
                    (r.len() == REPLY_LEN).then(|| grant(&r))
                })
                .collect();
            Ok::<_, CentralError>(grants)
        };
        match tokio::time::timeout(timeout, work).await {
            Ok(Ok(grants)) => Ok(grants),
            failed => {
                // The next call connects again (asking the Sentinels, or the
                // cluster's nodes, anew).
                self.connection = None;
                Err(failed.map_or(CentralError::Timeout(timeout), |e| e.unwrap_err()))
            }
        }
    }

    /// Adds each tenant's charges to its running totals (all time, and its
    /// day; its cost in its day and month) and returns the totals after: one
    /// pipelined round trip.
    pub async fn tenants(&mut self, usage: &[TenantUsage]) -> Result<Vec<TenantTotals>, CentralError> {
        let timeout = self.timeout;
        let work = async {
            let con = self.connection().await?;
            let mut pipes = SlotPipelines::for_connection(&con);
            for u in usage {
                let (total, day) = tenant_keys(&u.tenant, u.day);
                // Every key of a tenant carries its hash tag: one slot.
                let pipe = pipes.item(&total);
                pipe.cmd("INCRBY").arg(&total).arg(u.delta);
                pipe.cmd("EXPIRE").arg(&total).arg(TENANT_EXPIRY_SECS).ignore();
                pipe.cmd("INCRBY").arg(&day).arg(u.delta);
                pipe.cmd("EXPIRE").arg(&day).arg(2 * 86_400).ignore();
                let (total_refunded, day_refunded) = (refunded(&total), refunded(&day));
                pipe.cmd("INCRBY").arg(&total_refunded).arg(u.refund);
                pipe.cmd("EXPIRE")
                    .arg(&total_refunded)
                    .arg(TENANT_EXPIRY_SECS)
                    .ignore();
                pipe.cmd("INCRBY").arg(&day_refunded).arg(u.refund);
                pipe.cmd("EXPIRE").arg(&day_refunded).arg(2 * 86_400).ignore();
                let (cost_day, cost_month) = tenant_cost_keys(&u.tenant, u.cost_day, u.cost_month);
                pipe.cmd("INCRBY").arg(&cost_day).arg(u.cost_delta);
                pipe.cmd("EXPIRE").arg(&cost_day).arg(2 * 86_400).ignore();
                pipe.cmd("INCRBY").arg(&cost_month).arg(u.cost_delta);
                pipe.cmd("EXPIRE").arg(&cost_month).arg(32 * 86_400).ignore();
            }
            let totals: Vec<i64> = pipes
                .query(&con, TENANT_REPLIES, None)
                .await?
                .into_iter()
                .map(redis::from_redis_value)
                .collect::<Result<_, _>>()?;
            Ok::<_, CentralError>(totals)
        };
        let totals = tokio::time::timeout(timeout, work)
            .await
            .map_err(|_| CentralError::Timeout(timeout))??;
        if totals.len() != TENANT_REPLIES * usage.len() {
            return Err(CentralError::Short {
                sent: usage.len(),
                got: totals.len() / TENANT_REPLIES,
            });
        }
        Ok(totals
            .chunks(TENANT_REPLIES)
            .map(|c| TenantTotals {
                tokens: c[0],
                day: c[1],
                refunded: c[2],
                day_refunded: c[3],
                cost_day: c[4],
                cost_month: c[5],
            })
            .collect())
    }

    fn pipelines(
        &self,
        con: &RedisConnection,
        replica: &str,
        items: &[SyncItem],
        now_us: Option<u64>,
    ) -> SlotPipelines {
        let mut pipes = SlotPipelines::for_connection(con);
        for item in items {
            let (bucket, replicas) = bucket_keys(&item.region, &item.model);
            let pipe = pipes.item(&bucket);
            let (l, c) = (&item.limits, &item.call);
            let opt = |v: Option<i64>| v.map_or(String::new(), |v| v.to_string());
            pipe.cmd("EVALSHA")
                .arg(self.script.get_hash())
                .arg(2)
                .arg(bucket)
                .arg(replicas)
                .arg(replica)
                .arg(l.tokens_per_minute)
                .arg(l.token_capacity)
                .arg(l.requests_per_minute)
                .arg(l.request_capacity)
                .arg(l.replicas_floor)
                .arg(l.hold_for.as_micros() as u64)
                .arg(c.incarnation)
                .arg(c.seq)
                .arg(c.ask_tokens)
                .arg(c.ask_requests)
                .arg(c.need_tokens)
                .arg(c.held_tokens)
                .arg(c.held_requests)
                .arg(c.spent_tokens)
                .arg(c.spent_requests);
            for t in [&c.totals, &c.acked] {
                pipe.arg(t.settled_tokens)
                    .arg(t.settled_requests)
                    .arg(t.fallback_tokens)
                    .arg(t.fallback_requests);
            }
            pipe.arg(opt(c.hint.map(|h| h.0)))
                .arg(opt(c.hint.map(|h| h.1)))
                .arg(c.block.as_micros() as u64)
                .arg(STALE_AFTER.as_micros() as u64)
                .arg(FORGET_AFTER.as_micros() as u64)
                .arg(ROUND.as_micros() as u64)
                .arg(IDLE_EXPIRY_SECS)
                .arg(now_us.map_or(String::new(), |t| t.to_string()))
                .arg(c.generation)
                .arg("");
        }
        pipes
    }
}

/// Numbers in one answer of the script.
const REPLY_LEN: usize = 11;

fn grant(r: &[i64]) -> SyncGrant {
    SyncGrant {
        tokens: r[0].max(0) as u64,
        requests: r[1].max(0) as u64,
        level_tokens: r[2],
        level_requests: r[3],
        blocked_for: Duration::from_micros(r[4].max(0) as u64),
        replicas: r[5].max(0) as u32,
        fresh: r[6] != 0,
        others_need: r[7].max(0) as u64,
        disagreeing: r[8].max(0) as u32,
        stale: r[9] != 0,
        generation: r[10].max(0) as u64,
    }
}
