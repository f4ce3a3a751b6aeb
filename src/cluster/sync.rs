//! The sync task: every `sync_interval` (jittered), collect each shared
//! (region, model)'s call from the desk, send them to Redis in one
//! pipelined round trip bounded by `redis_timeout`, and hand the answers
//! (or their absence) back to the desk. Nothing else talks to Redis.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use tokio::task::JoinHandle;

use super::redis_central::RedisCentral;
use crate::config::ClusterConfig;
use crate::core::{SyncGrant, SyncItem};
use crate::dispatch::Engine;

/// This replica's name in Redis: the configured one, or host, pid and a
/// random suffix (two replicas on one host, or a restarted one, never share
/// a record).
pub fn replica_id(config: &ClusterConfig) -> String {
    match &config.replica_id {
        Some(id) => id.clone(),
        None => fresh_replica_id(),
    }
}

/// Host, pid and a random suffix: a name no other process (nor this one
/// restarted) holds; also the jobs' owner in a Redis without `[cluster]`.
pub fn fresh_replica_id() -> String {
    let host = std::fs::read_to_string("/etc/hostname")
        .ok()
        .map(|h| h.trim().to_string())
        .filter(|h| !h.is_empty())
        .or_else(|| std::env::var("HOSTNAME").ok())
        .unwrap_or_else(|| "host".into());
    let host: String = host
        .chars()
        .filter(|c| c.is_ascii_alphanumeric() || *c == '-')
        .take(32)
        .collect();
    format!("{host}-{}-{:04x}", std::process::id(), rand::random::<u16>())
}

/// Starts the sync task. Fails only on a malformed Redis URL; an
/// unreachable Redis is what the fallback is for.
pub fn spawn(engine: Arc<Engine>, config: &ClusterConfig, replica: String) -> Result<JoinHandle<()>, String> {
    let mut central = RedisCentral::new(config.redis.clone(), config.redis_timeout)
        .and_then(|c| c.with_tls(config.redis_tls.clone()))
        .map_err(|e| format!("{}: {e}", super::target::config_key(&config.redis)))?;
    let tick = config.sharing.tick;
    Ok(tokio::spawn(async move {
        let mut rng = SmallRng::from_os_rng();
        // This process's run: Redis starts a new record for a replica id
        // a new process reuses (what the old one held went with it).
        let incarnation: u32 = rng.random();
        let mut reachable = None;
        let mut disagreeing: HashMap<(Arc<str>, Arc<str>), u32> = HashMap::new();
        loop {
            tokio::time::sleep(jittered(tick, &mut rng)).await;
            let sent_at = crate::clock::now();
            let mut items = engine.desk().sync_calls(sent_at);
            for i in &mut items {
                i.call.incarnation = incarnation;
            }
            let result = if items.is_empty() {
                Ok(Vec::new())
            } else {
                central.call_each(&replica, &items, None).await
            };
            let now = crate::clock::now();
            observe(now.saturating_duration_since(sent_at), result.is_ok());
            let ok = result.is_ok();
            let done = match result {
                Ok(grants) => {
                    for (i, g) in items.iter().zip(&grants) {
                        let Some(g) = g else {
                            // A Redis Cluster's shard that did not answer:
                            // this (region, model) goes without, as in an
                            // outage; the others are answered.
                            tracing::debug!(region = %i.region, model = %i.model, "no answer from this region-model's Redis Cluster shard");
                            continue;
                        };
                        // Every call and grant, for tracing how a scarce
                        // quota was split (RUST_LOG=dispatcher::quota_sync=trace).
                        tracing::trace!(target: "dispatcher::quota_sync", region = %i.region, model = %i.model,
                            ask_tokens = i.call.ask_tokens, need_tokens = i.call.need_tokens,
                            held_tokens = i.call.held_tokens, spent_tokens = i.call.spent_tokens,
                            granted_tokens = g.tokens, level_tokens = g.level_tokens, replicas = g.replicas,
                            "quota sync");
                        warn_disagreeing(&mut disagreeing, i, g);
                    }
                    items.into_iter().zip(grants).collect()
                }
                Err(e) => {
                    if reachable != Some(false) {
                        tracing::warn!(error = %e, "Redis did not answer the quota sync; spending what this replica holds, then the fallback share if it lasts");
                    }
                    items.into_iter().map(|i| (i, None)).collect()
                }
            };
            if ok && reachable == Some(false) {
                tracing::info!("Redis answers again: quota shared through it");
            }
            reachable = Some(ok);
            engine.desk().sync_done(done, sent_at, now);
            // Tenant limits: only while Redis answers (one timeout a tick
            // is enough); unsent charges go with the next sync.
            let usage = engine.desk().tenant_usage();
            if !usage.is_empty() {
                let totals = if ok {
                    central.tenants(&usage).await.ok()
                } else {
                    None
                };
                engine
                    .desk()
                    .tenants_synced(&usage, totals.as_deref(), crate::clock::now());
            }
        }
    }))
}

/// Says once, when it starts and when it ends, that other replicas carry
/// different limits for a (region, model): Redis then applies the lowest
/// of each, and this replica's configuration is not what is enforced.
fn warn_disagreeing(seen: &mut HashMap<(Arc<str>, Arc<str>), u32>, item: &SyncItem, grant: &SyncGrant) {
    let key = (item.region.clone(), item.model.clone());
    let before = seen.insert(key, grant.disagreeing).unwrap_or(0);
    if grant.disagreeing > 0 && before == 0 {
        tracing::warn!(region = %item.region, model = %item.model, others = grant.disagreeing,
            tokens_per_minute = item.limits.tokens_per_minute, burst_tokens = item.limits.token_capacity,
            requests_per_minute = item.limits.requests_per_minute, burst_requests = item.limits.request_capacity,
            "other replicas are configured with different limits for this region and model; Redis applies the lowest of each until they agree (Admin GetRegion: disagreeing_replicas)");
    } else if grant.disagreeing == 0 && before > 0 {
        tracing::info!(region = %item.region, model = %item.model, "replicas agree on limits again");
    }
}

/// The wait before the next call: the tick, ±10 % at random. Replicas
/// calling at fixed phases of one tick would keep who sees the refill
/// first; when the quota is scarce that decides who is served (the one
/// calling first after the longest gap got up to twice the others,
/// `core::central`'s tests), so the phases are kept moving.
fn jittered(tick: Duration, rng: &mut SmallRng) -> Duration {
    tick.mul_f64(rng.random_range(0.9..1.1))
}

fn observe(took: Duration, ok: bool) {
    if !crate::metrics::enabled() {
        return;
    }
    let result = if ok { "ok" } else { "error" };
    metrics::histogram!("dispatcher_redis_call_seconds", "result" => result).record(took.as_secs_f64());
}
