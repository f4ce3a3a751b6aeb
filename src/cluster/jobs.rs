//! Jobs in Redis (`[cluster]` with `[jobs]`): `JobStore` over `jobs.lua`,
//! so any replica answers Get, Watch, List and Cancel for any job, and a
//! dead replica's jobs are taken over once its lease lapses (lease,
//! heartbeat and fencing token: `core::job::JobLease`'s rules in Lua).
//!
//! Owner: Redis holds the records; each call is one atomic script step (a
//! fence check and its write together), so replicas need no lock of their
//! own. One connection manager (multiplexed, made on first use) is shared
//! by every call, and every call is bounded by `cluster.redis_timeout`
//! (`jobs.redis_timeout` in jobs' own Redis): a Redis that does not answer
//! is `StoreError::Unavailable`, never a hang.

use std::sync::Arc;
use std::time::Duration;

use super::target::RedisConnection;
use prost::Message;
use redis::{FromRedisValue, ScriptInvocation};
use tokio::sync::Mutex;

use crate::jobs::{Beat, Created, Held, JobStore, StoreError, StoreFuture};
use crate::pb;

const SCRIPT: &str = include_str!("jobs.lua");

/// Every job key starts with this; the `{jobs}` hash tag keeps them on one
/// Redis Cluster slot, so one script step may touch several.
pub const PREFIX: &str = "dispatcher:{jobs}:";

/// Jobs taken over (or expired) per script call at most; the keeper's next
/// tick takes the rest.
const BATCH: usize = 256;
/// Expiry calls per `expire` at most (the keeper calls it once a second).
const EXPIRE_CALLS: usize = 8;
/// Held jobs renewed per heartbeat call.
const BEAT_BATCH: usize = 1000;
/// Jobs read per round trip while listing.
const LIST_PAGE: isize = 200;

/// The hash counting jobs and bytes stored (the size bound).
pub fn usage_key() -> String {
    format!("{PREFIX}usage")
}

/// A job's record and lease (a hash).
pub fn job_key(job_id: &str) -> String {
    format!("{PREFIX}job:{job_id}")
}

/// The sorted set of unfinished jobs by lease expiry (ms).
pub fn leases_key() -> String {
    format!("{PREFIX}leases")
}

fn events_key(job_id: &str) -> String {
    format!("{PREFIX}events:{job_id}")
}

fn tenant_key(tenant: &str) -> String {
    format!("{PREFIX}tenant:{tenant}")
}

pub struct RedisJobStore {
    target: crate::config::RedisTarget,
    tls: Option<crate::config::RedisTls>,
    connection: Arc<Mutex<Option<RedisConnection>>>,
    script: redis::Script,
    timeout: Duration,
    /// The setting `timeout` came from, named in errors.
    timeout_key: &'static str,
    lease_ms: u64,
    max_jobs: u64,
    max_bytes: u64,
    /// Why the last call got no answer from Redis, until one gets one:
    /// the keeper's heartbeat calls at least once a second, so the Jobs
    /// health follows Redis within a beat. Owner: this store (a plain lock,
    /// held for a copy).
    away: std::sync::Mutex<Option<StoreError>>,
}

fn unavailable(e: impl std::fmt::Display) -> StoreError {
    StoreError::Unavailable(format!("Redis: {e}"))
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

fn number(b: &[u8]) -> u64 {
    std::str::from_utf8(b)
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0)
}

/// A stored record with what Redis holds beside it (authoritative: a claim
/// changes them without rewriting the record).
fn decode(rec: &[u8], owner: &[u8], fence: u64, cancel: &[u8]) -> Result<pb::StoredJob, StoreError> {
    let mut s = pb::StoredJob::decode(rec).map_err(|e| unavailable(format!("a stored job: {e}")))?;
    s.fence = fence;
    s.cancel_requested = cancel == b"1";
    if !owner.is_empty() {
        crate::jobs::record::job_mut(&mut s).owner = text(owner);
    }
    Ok(s)
}

/// The job of an `{"existing", rec, owner, fence, cancel}` answer.
fn existing(r: &[Vec<u8>]) -> Result<pb::StoredJob, StoreError> {
    match r {
        [tag, rec, owner, fence, cancel] if tag.as_slice() == b"existing" => {
            decode(rec, owner, number(fence), cancel)
        }
        _ => Err(unavailable("an unexpected reply naming an existing job")),
    }
}

impl RedisJobStore {
    /// Checks the URL; connects on first use (a replica starts without Redis).
    pub fn new(
        target: impl Into<crate::config::RedisTarget>,
        timeout: Duration,
        lease: Duration,
        max_jobs: u64,
        max_bytes: u64,
    ) -> Result<Self, redis::RedisError> {
        let target = target.into();
        super::target::check(&target, None)?;
        Ok(Self {
            target,
            tls: None,
            connection: Arc::default(),
            script: redis::Script::new(SCRIPT),
            timeout,
            timeout_key: "cluster.redis_timeout",
            lease_ms: lease.as_millis() as u64,
            away: std::sync::Mutex::new(None),
            max_jobs,
            max_bytes,
        })
    }

    /// Names `key` as the timeout's setting in errors (`jobs.redis_timeout`
    /// for jobs in their own Redis).
    pub fn timeout_named(mut self, key: &'static str) -> Self {
        self.timeout_key = key;
        self
    }

    /// TLS settings for a `rediss://` URL (checked here, used at connect).
    pub fn with_tls(mut self, tls: Option<crate::config::RedisTls>) -> Result<Self, redis::RedisError> {
        super::target::check(&self.target, tls.as_ref())?;
        self.tls = tls;
        Ok(self)
    }

    async fn connection(&self) -> Result<RedisConnection, StoreError> {
        let mut slot = self.connection.lock().await;
        if let Some(c) = &*slot {
            return Ok(c.clone());
        }
        let c = super::target::connect(&self.target, self.tls.as_ref(), self.timeout)
            .await
            .map_err(unavailable)?;
        *slot = Some(c.clone());
        Ok(c)
    }

    /// Runs `work` on a connection within the timeout.
    async fn bounded<T, F>(&self, work: impl FnOnce(RedisConnection) -> F) -> Result<T, StoreError>
    where
        F: Future<Output = Result<T, StoreError>>,
    {
        let all = async {
            let con = self.connection().await?;
            work(con).await
        };
        let answer = tokio::time::timeout(self.timeout, all)
            .await
            .map_err(|_| {
                unavailable(format!(
                    "no answer within {:?} ({})",
                    self.timeout, self.timeout_key
                ))
            })
            .flatten();
        if answer.is_err() {
            // The next call connects again (asking the Sentinels anew).
            *self.connection.lock().await = None;
        }
        self.note(&answer);
        answer
    }

    /// Keeps whether Redis answered `result` (a refusal of its own, such
    /// as a fence or a full store, is an answer).
    fn note<T>(&self, result: &Result<T, StoreError>) {
        let away = match result {
            Err(e) if e.is_transient() => Some(e.clone()),
            _ => None,
        };
        *self.away.lock().unwrap_or_else(|p| p.into_inner()) = away;
    }

    async fn query<T: FromRedisValue>(&self, cmd: redis::Cmd) -> Result<T, StoreError> {
        self.bounded(|mut con| async move { cmd.query_async(&mut con).await.map_err(unavailable) })
            .await
    }

    /// The script's `op`, its common arguments set; `now_ms` replaces Redis
    /// `TIME` (tests, and `expire`, which is dated by the caller).
    fn op(&self, op: &str, now_ms: Option<u64>) -> ScriptInvocation<'_> {
        let mut inv = self.script.prepare_invoke();
        inv.key(usage_key())
            .arg(PREFIX)
            .arg(op)
            .arg(now_ms.map_or(String::new(), |n| n.to_string()));
        inv
    }

    async fn invoke<T: FromRedisValue>(&self, inv: ScriptInvocation<'_>) -> Result<T, StoreError> {
        self.bounded(|mut con| async move { inv.invoke_async(&mut con).await.map_err(unavailable) })
            .await
    }

    /// `invoke` for a write whose effect must be known: an error before it
    /// was sent (no connection) or Redis's own refusal is `Unavailable`
    /// (nothing written); no answer in time, or a connection lost after it
    /// was sent, is `Unknown` (Redis may run it still, once it answers
    /// again: a stalled server runs what it was sent when it wakes).
    async fn invoke_write<T: FromRedisValue>(&self, inv: ScriptInvocation<'_>) -> Result<T, StoreError> {
        let started = crate::clock::tokio_now();
        let (timeout, key) = (self.timeout, self.timeout_key);
        let late = || format!("Redis did not answer within {timeout:?} ({key})");
        let connected = tokio::time::timeout(timeout, self.connection())
            .await
            .map_err(|_| unavailable(late()))
            .flatten();
        let mut con = match connected {
            Ok(c) => c,
            Err(e) => {
                self.note::<()>(&Err(e.clone()));
                return Err(e);
            }
        };
        let sent = inv.invoke_async(&mut con);
        let answer = match tokio::time::timeout_at(started + timeout, sent).await {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(e))
                if matches!(
                    e.kind(),
                    redis::ErrorKind::Server(_) | redis::ErrorKind::Extension
                ) =>
            {
                Err(unavailable(e))
            }
            Ok(Err(e)) => Err(StoreError::Unknown(format!("Redis: {e}"))),
            Err(_) => Err(StoreError::Unknown(late())),
        };
        self.note(&answer);
        answer
    }

    /// `orphans`, at `now_ms` instead of Redis `TIME` when given.
    pub async fn orphans_at(
        &self,
        owner: &str,
        now_ms: Option<u64>,
    ) -> Result<Vec<pb::StoredJob>, StoreError> {
        let mut inv = self.op("claim", now_ms);
        inv.arg(owner).arg(self.lease_ms).arg(BATCH);
        let flat: Vec<Vec<u8>> = self.invoke(inv).await?;
        let mut out = Vec::with_capacity(flat.len() / 5);
        for c in flat.chunks_exact(5) {
            let (fence, cancel, rec, previous) = (number(&c[1]), &c[2], &c[3], &c[4]);
            // The record keeps its previous owner (the keeper tells a
            // takeover from a restart by it); the fence is the claim's.
            // One unreadable record must not hold back the others.
            let mut s = match decode(rec, b"", fence, cancel) {
                Ok(s) => s,
                Err(e) => {
                    tracing::error!(job_id = %text(&c[0]), error = %e, "a job in Redis cannot be read; left as it is");
                    continue;
                }
            };
            let job = crate::jobs::record::job_mut(&mut s);
            if job.owner.is_empty() {
                job.owner = text(previous);
            }
            out.push(s);
        }
        Ok(out)
    }

    /// `heartbeat`, at `now_ms` instead of Redis `TIME` when given.
    pub async fn heartbeat_at(&self, held: Vec<Held>, now_ms: Option<u64>) -> Result<Beat, StoreError> {
        let mut beat = Beat::default();
        for chunk in held.chunks(BEAT_BATCH) {
            let mut inv = self.op("heartbeat", now_ms);
            inv.arg(self.lease_ms);
            for h in chunk {
                inv.arg(&h.job_id).arg(h.fence);
            }
            let (cancel, lost): (Vec<String>, Vec<String>) = self.invoke(inv).await?;
            beat.cancel.extend(cancel);
            beat.lost.extend(lost);
        }
        Ok(beat)
    }
}

impl JobStore for RedisJobStore {
    fn create(&self, job: pb::StoredJob, first: pb::JobEvent, owner: &str) -> StoreFuture<'_, Created> {
        let owner = owner.to_string();
        Box::pin(async move {
            let j = crate::jobs::record::job(&job);
            let mut inv = self.op("create", None);
            inv.arg(&j.job_id)
                .arg(&j.tenant)
                .arg(&j.idempotency_key)
                .arg(j.created_unix_ms)
                .arg(&owner)
                .arg(self.lease_ms)
                .arg(job.encode_to_vec())
                .arg(first.encode_to_vec())
                .arg(self.max_jobs)
                .arg(self.max_bytes);
            let r: Vec<Vec<u8>> = self.invoke_write(inv).await?;
            match r.first().map(Vec::as_slice) {
                Some(b"stored") => Ok(Created::Stored),
                Some(b"existing") => Ok(Created::Existing(Box::new(existing(&r)?))),
                Some(b"full_jobs") => Err(StoreError::Full(format!(
                    "{} jobs: jobs.max_jobs",
                    number(r.get(1).map_or(&[][..], |v| v))
                ))),
                Some(b"full_bytes") => Err(StoreError::Full(format!(
                    "{} bytes: jobs.max_store_bytes",
                    number(r.get(1).map_or(&[][..], |v| v))
                ))),
                _ => Err(unavailable("an unexpected reply to create")),
            }
        })
    }

    fn write(&self, job: pb::StoredJob, events: Vec<pb::JobEvent>) -> StoreFuture<'_, ()> {
        Box::pin(async move {
            let j = crate::jobs::record::job(&job);
            let mut inv = self.op("write", None);
            inv.arg(&j.job_id)
                .arg(job.fence)
                .arg(job.encode_to_vec())
                .arg(j.expires_unix_ms)
                .arg(events.first().map_or(0, |e| e.seq));
            for e in &events {
                inv.arg(e.encode_to_vec());
            }
            let r: Vec<Vec<u8>> = self.invoke(inv).await?;
            match r.first().map(Vec::as_slice) {
                Some(b"ok") => Ok(()),
                Some(b"fenced") if r.len() == 3 => Err(StoreError::Fenced {
                    owner: text(&r[1]),
                    current: number(&r[2]),
                }),
                Some(b"gone") => Err(StoreError::Unavailable(format!(
                    "job {} is no longer stored",
                    j.job_id
                ))),
                Some(b"gap") => Err(StoreError::Unavailable(format!(
                    "job {}: events out of order (stored up to {})",
                    j.job_id,
                    number(r.get(1).map_or(&[][..], |v| v))
                ))),
                _ => Err(unavailable("an unexpected reply to write")),
            }
        })
    }

    fn get(&self, job_id: &str) -> StoreFuture<'_, Option<pb::StoredJob>> {
        let mut cmd = redis::cmd("HMGET");
        cmd.arg(job_key(job_id)).arg(&["rec", "owner", "fence", "cancel"]);
        Box::pin(async move {
            let h: Vec<Option<Vec<u8>>> = self.query(cmd).await?;
            let field = |i: usize| h.get(i).cloned().flatten().unwrap_or_default();
            match h.first().cloned().flatten() {
                None => Ok(None),
                Some(rec) => Ok(Some(decode(&rec, &field(1), number(&field(2)), &field(3))?)),
            }
        })
    }

    fn by_key(&self, tenant: &str, key: &str) -> StoreFuture<'_, Option<pb::StoredJob>> {
        let (tenant, key) = (tenant.to_string(), key.to_string());
        Box::pin(async move {
            let mut inv = self.op("by_key", None);
            inv.arg(&tenant).arg(&key);
            let r: Vec<Vec<u8>> = self.invoke(inv).await?;
            match r.first().map(Vec::as_slice) {
                Some(b"none") => Ok(None),
                _ => existing(&r).map(Some),
            }
        })
    }

    fn events(&self, job_id: &str, from_seq: u64, max: usize) -> StoreFuture<'_, Vec<pb::JobEvent>> {
        let start = from_seq.max(1) - 1;
        let mut cmd = redis::cmd("LRANGE");
        cmd.arg(events_key(job_id))
            .arg(start)
            .arg(start + max.max(1) as u64 - 1);
        Box::pin(async move {
            let raw: Vec<Vec<u8>> = self.query(cmd).await?;
            raw.iter()
                .map(|b| {
                    pb::JobEvent::decode(b.as_slice())
                        .map_err(|e| unavailable(format!("a stored event: {e}")))
                })
                .collect()
        })
    }

    fn list(
        &self,
        tenant: &str,
        filter: Option<pb::JobState>,
        limit: usize,
    ) -> StoreFuture<'_, Vec<pb::Job>> {
        let index = tenant_key(tenant);
        Box::pin(async move {
            let mut out = Vec::new();
            let mut start: isize = 0;
            while out.len() < limit {
                let mut cmd = redis::cmd("ZREVRANGE");
                cmd.arg(&index).arg(start).arg(start + LIST_PAGE - 1);
                let ids: Vec<String> = self.query(cmd).await?;
                if ids.is_empty() {
                    break;
                }
                let mut pipe = redis::pipe();
                for id in &ids {
                    pipe.cmd("HMGET")
                        .arg(job_key(id))
                        .arg(&["rec", "owner", "fence", "cancel"]);
                }
                let rows: Vec<Vec<Option<Vec<u8>>>> = self
                    .bounded(|mut con| async move { pipe.query_async(&mut con).await.map_err(unavailable) })
                    .await?;
                for h in rows {
                    let field = |i: usize| h.get(i).cloned().flatten().unwrap_or_default();
                    let Some(rec) = h.first().cloned().flatten() else {
                        continue;
                    };
                    let s = decode(&rec, &field(1), number(&field(2)), &field(3))?;
                    let Some(mut job) = s.job else { continue };
                    if filter.is_some_and(|f| f != job.state()) {
                        continue;
                    }
                    job.output = Default::default();
                    out.push(job);
                    if out.len() >= limit {
                        break;
                    }
                }
                start += LIST_PAGE;
            }
            Ok(out)
        })
    }

    fn orphans(&self, owner: &str) -> StoreFuture<'_, Vec<pb::StoredJob>> {
        let owner = owner.to_string();
        Box::pin(async move { self.orphans_at(&owner, None).await })
    }

    fn heartbeat(&self, _owner: &str, held: Vec<Held>) -> StoreFuture<'_, Beat> {
        Box::pin(async move {
            if held.is_empty() {
                return Ok(Beat::default());
            }
            self.heartbeat_at(held, None).await
        })
    }

    fn release(&self, _owner: &str, held: Vec<Held>) -> StoreFuture<'_, ()> {
        Box::pin(async move {
            for chunk in held.chunks(BEAT_BATCH) {
                let mut inv = self.op("release", None);
                for h in chunk {
                    inv.arg(&h.job_id).arg(h.fence);
                }
                let _: u64 = self.invoke(inv).await?;
            }
            Ok(())
        })
    }

    fn request_cancel(&self, job_id: &str) -> StoreFuture<'_, ()> {
        let job_id = job_id.to_string();
        Box::pin(async move {
            let mut inv = self.op("cancel", None);
            inv.arg(&job_id);
            let _: Vec<Vec<u8>> = self.invoke(inv).await?;
            Ok(())
        })
    }

    fn expire(&self, now_ms: u64) -> StoreFuture<'_, usize> {
        Box::pin(async move {
            // A batch per call, a few calls per keeper tick at most.
            let mut removed = 0;
            for _ in 0..EXPIRE_CALLS {
                let mut inv = self.op("expire", Some(now_ms));
                inv.arg(BATCH);
                let n: usize = self.invoke(inv).await?;
                removed += n;
                if n < BATCH {
                    break;
                }
            }
            Ok(removed)
        })
    }

    fn refusing(&self) -> Option<StoreError> {
        self.away.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    fn usage(&self) -> StoreFuture<'_, (u64, u64)> {
        let mut cmd = redis::cmd("HMGET");
        cmd.arg(usage_key()).arg(&["jobs", "bytes"]);
        Box::pin(async move {
            let u: Vec<Option<i64>> = self.query(cmd).await?;
            let at = |i: usize| u.get(i).copied().flatten().unwrap_or(0).max(0) as u64;
            Ok((at(0), at(1)))
        })
    }
}
