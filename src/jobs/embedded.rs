//! The embedded job store: one redb file under `[jobs].data_dir`, so a
//! restart loses no job. Owner: one writer thread, which takes every write
//! queued since its last commit into one transaction (group commit: one
//! fsync for many jobs) and answers each once it is durable. Reads open
//! their own read transaction (a snapshot) from any task.
//!
//! Tables: jobs by id; events by (id, seq); (tenant, idempotency key) → id;
//! (tenant, created ms, id) for listing; (expires ms, id) for the TTL; the
//! store's size (jobs, bytes), kept by each commit.

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use parking_lot::Mutex;
use prost::Message;
use redb::{Database, ReadableDatabase, ReadableTable, ReadableTableMetadata, TableDefinition};
use tokio::sync::{mpsc, oneshot};

use super::store::{Beat, Created, Held, JobStore, StoreError, StoreFuture};
use crate::pb;

const JOBS: TableDefinition<&str, &[u8]> = TableDefinition::new("jobs");
const EVENTS: TableDefinition<(&str, u64), &[u8]> = TableDefinition::new("events");
const KEYS: TableDefinition<(&str, &str), &str> = TableDefinition::new("idempotency_keys");
const BY_TENANT: TableDefinition<(&str, u64, &str), ()> = TableDefinition::new("by_tenant");
const EXPIRY: TableDefinition<(u64, &str), ()> = TableDefinition::new("expiry");
/// `"usage"` → (jobs, bytes) stored, written with every commit, so opening
/// the store does not read every record to size it.
const META: TableDefinition<&str, (u64, u64)> = TableDefinition::new("meta");

/// Writes taken into one transaction at most.
const BATCH: usize = 512;

enum Op {
    Create {
        job: Box<pb::StoredJob>,
        first: Box<pb::JobEvent>,
        reply: oneshot::Sender<Result<Created, StoreError>>,
    },
    Write {
        job: Box<pb::StoredJob>,
        events: Vec<pb::JobEvent>,
        reply: oneshot::Sender<Result<(), StoreError>>,
    },
    Cancel {
        job_id: String,
        reply: oneshot::Sender<Result<(), StoreError>>,
    },
    Expire {
        now_ms: u64,
        reply: oneshot::Sender<Result<usize, StoreError>>,
    },
}

/// Jobs and bytes stored, kept by the writer.
#[derive(Debug, Default, Clone, Copy)]
struct Usage {
    jobs: u64,
    bytes: u64,
}

pub struct EmbeddedStore {
    db: Arc<Database>,
    ops: mpsc::UnboundedSender<Op>,
    usage: Arc<Mutex<Usage>>,
    recovered: AtomicBool,
}

fn unavailable(e: impl std::fmt::Display) -> StoreError {
    StoreError::Unavailable(e.to_string())
}

impl EmbeddedStore {
    /// Opens (or creates) `dir/jobs.redb`. Fails when the directory cannot
    /// be made, or the file is another process's (a second dispatcher on
    /// the same data_dir) or not a job store.
    pub fn open(dir: &Path, max_jobs: u64, max_bytes: u64) -> Result<Self, String> {
        std::fs::create_dir_all(dir).map_err(|e| format!("jobs.data_dir {}: {e}", dir.display()))?;
        let path = dir.join("jobs.redb");
        let db = Database::create(&path).map_err(|e| {
            format!(
                "jobs.data_dir: cannot open {} ({e}); is another dispatcher using this directory?",
                path.display()
            )
        })?;
        let usage = Self::usage_at_open(&db).map_err(|e| format!("reading {}: {e}", path.display()))?;
        let db = Arc::new(db);
        let usage = Arc::new(Mutex::new(usage));
        let (ops, rx) = mpsc::unbounded_channel();
        let writer = Writer {
            db: db.clone(),
            usage: usage.clone(),
            max_jobs,
            max_bytes,
        };
        std::thread::Builder::new()
            .name("jobs-store".into())
            .spawn(move || writer.run(rx))
            .map_err(|e| format!("starting the job store's writer: {e}"))?;
        Ok(Self {
            db,
            ops,
            usage,
            recovered: AtomicBool::new(false),
        })
    }

    /// The size each commit recorded, or (a store without the record)
    /// measured once by reading every record, and recorded.
    fn usage_at_open(db: &Database) -> Result<Usage, redb::Error> {
        let w = db.begin_write()?;
        // Tables exist from here on, so reads never miss one.
        let usage;
        {
            let mut meta = w.open_table(META)?;
            let recorded = meta.get("usage")?.map(|v| v.value());
            if let Some((jobs, bytes)) = recorded {
                usage = Usage { jobs, bytes };
            } else {
                usage = Self::measure(&w)?;
                meta.insert("usage", (usage.jobs, usage.bytes))?;
            }
            w.open_table(JOBS)?;
            w.open_table(EVENTS)?;
            w.open_table(KEYS)?;
            w.open_table(BY_TENANT)?;
            w.open_table(EXPIRY)?;
        }
        w.commit()?;
        Ok(usage)
    }

    /// Jobs and bytes stored, by reading every record.
    fn measure(w: &redb::WriteTransaction) -> Result<Usage, redb::Error> {
        let mut usage = Usage::default();
        {
            let jobs = w.open_table(JOBS)?;
            usage.jobs = jobs.len()?;
            for row in jobs.iter()? {
                usage.bytes += row?.1.value().len() as u64;
            }
            let events = w.open_table(EVENTS)?;
            for row in events.iter()? {
                usage.bytes += row?.1.value().len() as u64;
            }
        }
        Ok(usage)
    }

    fn send<T: Send + 'static>(
        &self,
        op: impl FnOnce(oneshot::Sender<Result<T, StoreError>>) -> Op,
    ) -> StoreFuture<'_, T> {
        let (tx, rx) = oneshot::channel();
        let sent = self.ops.send(op(tx));
        Box::pin(async move {
            sent.map_err(|_| unavailable("the store's writer stopped"))?;
            rx.await.map_err(|_| unavailable("the store's writer stopped"))?
        })
    }

    fn read<T>(
        &self,
        f: impl FnOnce(&redb::ReadTransaction) -> Result<T, redb::Error>,
    ) -> Result<T, StoreError> {
        let r = self.db.begin_read().map_err(unavailable)?;
        f(&r).map_err(unavailable)
    }
}

fn decode_job(bytes: &[u8]) -> Result<pb::StoredJob, redb::Error> {
    pb::StoredJob::decode(bytes).map_err(|e| redb::Error::Corrupted(format!("a stored job: {e}")))
}

fn state(j: &pb::StoredJob) -> pb::JobState {
    j.job.as_ref().map_or(pb::JobState::Unspecified, |j| j.state())
}

impl JobStore for EmbeddedStore {
    fn create(&self, job: pb::StoredJob, first: pb::JobEvent, _owner: &str) -> StoreFuture<'_, Created> {
        self.send(|reply| Op::Create {
            job: Box::new(job),
            first: Box::new(first),
            reply,
        })
    }

    fn write(&self, job: pb::StoredJob, events: Vec<pb::JobEvent>) -> StoreFuture<'_, ()> {
        self.send(|reply| Op::Write {
            job: Box::new(job),
            events,
            reply,
        })
    }

    fn get(&self, job_id: &str) -> StoreFuture<'_, Option<pb::StoredJob>> {
        let got = self.read(|r| {
            let jobs = r.open_table(JOBS)?;
            jobs.get(job_id)?.map(|v| decode_job(v.value())).transpose()
        });
        Box::pin(async move { got })
    }

    fn events(&self, job_id: &str, from_seq: u64, max: usize) -> StoreFuture<'_, Vec<pb::JobEvent>> {
        let got = self.read(|r| {
            let events = r.open_table(EVENTS)?;
            let mut out = Vec::new();
            for row in events
                .range((job_id, from_seq.max(1))..=(job_id, u64::MAX))?
                .take(max)
            {
                let (_, v) = row?;
                out.push(
                    pb::JobEvent::decode(v.value())
                        .map_err(|e| redb::Error::Corrupted(format!("a stored event: {e}")))?,
                );
            }
            Ok(out)
        });
        Box::pin(async move { got })
    }

    fn list(
        &self,
        tenant: &str,
        filter: Option<pb::JobState>,
        limit: usize,
    ) -> StoreFuture<'_, Vec<pb::Job>> {
        let got = self.read(|r| {
            let index = r.open_table(BY_TENANT)?;
            let jobs = r.open_table(JOBS)?;
            let mut out = Vec::new();
            for row in index
                .range((tenant, 0, "")..=(tenant, u64::MAX, "\u{10ffff}"))?
                .rev()
            {
                if out.len() >= limit {
                    break;
                }
                let (key, _) = row?;
                let (_, _, id) = key.value();
                let Some(v) = jobs.get(id)? else { continue };
                let stored = decode_job(v.value())?;
                if filter.is_some_and(|f| f != state(&stored)) {
                    continue;
                }
                if let Some(mut job) = stored.job {
                    job.output = Default::default();
                    out.push(job);
                }
            }
            Ok(out)
        });
        Box::pin(async move { got })
    }

    fn orphans(&self, _owner: &str) -> StoreFuture<'_, Vec<pb::StoredJob>> {
        // One process owns the file: every unfinished job is its own, once.
        if self.recovered.swap(true, Ordering::SeqCst) {
            return Box::pin(async { Ok(Vec::new()) });
        }
        let got = self.read(|r| {
            let jobs = r.open_table(JOBS)?;
            let mut out = Vec::new();
            for row in jobs.iter()? {
                let j = decode_job(row?.1.value())?;
                if matches!(state(&j), pb::JobState::Queued | pb::JobState::Running) {
                    out.push(j);
                }
            }
            Ok(out)
        });
        Box::pin(async move { got })
    }

    fn heartbeat(&self, _owner: &str, held: Vec<Held>) -> StoreFuture<'_, Beat> {
        let got = self.read(|r| {
            let jobs = r.open_table(JOBS)?;
            let mut beat = Beat::default();
            for h in held {
                if let Some(v) = jobs.get(h.job_id.as_str())?
                    && decode_job(v.value())?.cancel_requested
                {
                    beat.cancel.push(h.job_id);
                }
            }
            Ok(beat)
        });
        Box::pin(async move { got })
    }

    fn request_cancel(&self, job_id: &str) -> StoreFuture<'_, ()> {
        let job_id = job_id.to_string();
        self.send(|reply| Op::Cancel { job_id, reply })
    }

    fn expire(&self, now_ms: u64) -> StoreFuture<'_, usize> {
        self.send(|reply| Op::Expire { now_ms, reply })
    }

    fn usage(&self) -> StoreFuture<'_, (u64, u64)> {
        let u = *self.usage.lock();
        Box::pin(async move { Ok((u.jobs, u.bytes)) })
    }
}

/// The one writer.
struct Writer {
    db: Arc<Database>,
    usage: Arc<Mutex<Usage>>,
    max_jobs: u64,
    max_bytes: u64,
}

/// An op's answer, sent once the transaction committed.
enum Reply {
    Created(
        oneshot::Sender<Result<Created, StoreError>>,
        Result<Created, StoreError>,
    ),
    Done(oneshot::Sender<Result<(), StoreError>>, Result<(), StoreError>),
    Expired(
        oneshot::Sender<Result<usize, StoreError>>,
        Result<usize, StoreError>,
    ),
}

impl Reply {
    fn send(self, failed: Option<&StoreError>) {
        match self {
            Reply::Created(tx, r) => drop(tx.send(failed.map_or(r, |e| Err(e.clone())))),
            Reply::Done(tx, r) => drop(tx.send(failed.map_or(r, |e| Err(e.clone())))),
            Reply::Expired(tx, r) => drop(tx.send(failed.map_or(r, |e| Err(e.clone())))),
        }
    }
}

impl Writer {
    fn run(self, mut rx: mpsc::UnboundedReceiver<Op>) {
        while let Some(op) = rx.blocking_recv() {
            let mut batch = vec![op];
            while batch.len() < BATCH {
                match rx.try_recv() {
                    Ok(op) => batch.push(op),
                    Err(_) => break,
                }
            }
            let mut usage = *self.usage.lock();
            let mut replies = Vec::with_capacity(batch.len());
            let committed = self.commit(batch, &mut usage, &mut replies);
            let failed = committed.err().map(unavailable);
            match &failed {
                None => *self.usage.lock() = usage,
                Some(e) => tracing::error!(error = %e, "the job store could not commit"),
            }
            for r in replies {
                r.send(failed.as_ref());
            }
        }
    }

    /// One transaction for `batch`. Durable (fsync) when it stores a new
    /// job, a change of state or a cancellation; a write that only appends
    /// events to a running job (its output) is committed without waiting
    /// for the disk, and made durable by the next durable commit: a crash
    /// may lose the last of a running job's output, which is then
    /// INTERRUPTED or run again anyway.
    fn commit(&self, batch: Vec<Op>, usage: &mut Usage, replies: &mut Vec<Reply>) -> Result<(), redb::Error> {
        let mut w = self.db.begin_write()?;
        let mut durable = false;
        {
            let mut t = Tables {
                jobs: w.open_table(JOBS)?,
                events: w.open_table(EVENTS)?,
                keys: w.open_table(KEYS)?,
                by_tenant: w.open_table(BY_TENANT)?,
                expiry: w.open_table(EXPIRY)?,
            };
            for op in batch {
                match op {
                    Op::Create { job, first, reply } => {
                        durable = true;
                        let r = self.create(&mut t, *job, *first, usage)?;
                        replies.push(Reply::Created(reply, r));
                    }
                    Op::Write { job, events, reply } => {
                        let r = t.write(*job, events, usage)?;
                        durable |= !matches!(r, Ok(Written::EventsOnly));
                        replies.push(Reply::Done(reply, r.map(|_| ())));
                    }
                    Op::Cancel { job_id, reply } => {
                        durable = true;
                        let r = t.request_cancel(&job_id, usage)?;
                        replies.push(Reply::Done(reply, r));
                    }
                    Op::Expire { now_ms, reply } => {
                        let r = t.expire(now_ms, usage)?;
                        replies.push(Reply::Expired(reply, Ok(r)));
                    }
                }
            }
        }
        w.open_table(META)?.insert("usage", (usage.jobs, usage.bytes))?;
        let durability = match durable {
            true => redb::Durability::Immediate,
            false => redb::Durability::None,
        };
        w.set_durability(durability)?;
        w.commit()?;
        Ok(())
    }

    fn create(
        &self,
        t: &mut Tables<'_>,
        stored: pb::StoredJob,
        first: pb::JobEvent,
        usage: &mut Usage,
    ) -> Result<Result<Created, StoreError>, redb::Error> {
        let job = stored.job.clone().unwrap_or_default();
        if !job.idempotency_key.is_empty()
            && let Some(id) = t.keys.get((job.tenant.as_str(), job.idempotency_key.as_str()))?
            && let Some(v) = t.jobs.get(id.value())?
        {
            return Ok(Ok(Created::Existing(Box::new(decode_job(v.value())?))));
        }
        let bytes = stored.encoded_len() as u64 + first.encoded_len() as u64;
        if usage.jobs >= self.max_jobs {
            return Ok(Err(StoreError::Full(format!(
                "{} jobs: jobs.max_jobs",
                usage.jobs
            ))));
        }
        if usage.bytes + bytes > self.max_bytes {
            return Ok(Err(StoreError::Full(format!(
                "{} bytes: jobs.max_store_bytes",
                usage.bytes
            ))));
        }
        t.jobs
            .insert(job.job_id.as_str(), stored.encode_to_vec().as_slice())?;
        t.events
            .insert((job.job_id.as_str(), first.seq), first.encode_to_vec().as_slice())?;
        if !job.idempotency_key.is_empty() {
            t.keys.insert(
                (job.tenant.as_str(), job.idempotency_key.as_str()),
                job.job_id.as_str(),
            )?;
        }
        t.by_tenant.insert(
            (job.tenant.as_str(), job.created_unix_ms, job.job_id.as_str()),
            (),
        )?;
        usage.jobs += 1;
        usage.bytes += bytes;
        Ok(Ok(Created::Stored))
    }
}

/// What a write changed.
enum Written {
    /// The job's state: durable before it is answered.
    State,
    /// Only events appended (output): durable with the next durable commit.
    EventsOnly,
}

struct Tables<'w> {
    jobs: redb::Table<'w, &'static str, &'static [u8]>,
    events: redb::Table<'w, (&'static str, u64), &'static [u8]>,
    keys: redb::Table<'w, (&'static str, &'static str), &'static str>,
    by_tenant: redb::Table<'w, (&'static str, u64, &'static str), ()>,
    expiry: redb::Table<'w, (u64, &'static str), ()>,
}

impl Tables<'_> {
    fn write(
        &mut self,
        stored: pb::StoredJob,
        events: Vec<pb::JobEvent>,
        usage: &mut Usage,
    ) -> Result<Result<Written, StoreError>, redb::Error> {
        let job = stored.job.clone().unwrap_or_default();
        let id = job.job_id.as_str();
        let old = match self.jobs.get(id)? {
            Some(v) => decode_job(v.value())?,
            // Expired or never stored: nothing to update.
            None => return Ok(Err(unavailable(format!("job {id} is no longer stored")))),
        };
        if old.fence != stored.fence {
            return Ok(Err(StoreError::Fenced {
                owner: old.job.map(|j| j.owner).unwrap_or_default(),
                current: old.fence,
            }));
        }
        let written = match state(&old) == state(&stored) {
            true => Written::EventsOnly,
            false => Written::State,
        };
        let mut stored = stored;
        // A cancellation asked for meanwhile is not lost by this write.
        stored.cancel_requested |= old.cancel_requested;
        let bytes = stored.encode_to_vec();
        usage.bytes = usage.bytes.saturating_sub(old.encoded_len() as u64) + bytes.len() as u64;
        self.jobs.insert(id, bytes.as_slice())?;
        for e in events {
            let b = e.encode_to_vec();
            usage.bytes += b.len() as u64;
            self.events.insert((id, e.seq), b.as_slice())?;
        }
        if job.expires_unix_ms > 0 {
            self.expiry.insert((job.expires_unix_ms, id), ())?;
        }
        Ok(Ok(written))
    }

    fn request_cancel(&mut self, id: &str, usage: &mut Usage) -> Result<Result<(), StoreError>, redb::Error> {
        let Some(v) = self.jobs.get(id)? else {
            return Ok(Ok(()));
        };
        let mut stored = decode_job(v.value())?;
        drop(v);
        if stored.cancel_requested {
            return Ok(Ok(()));
        }
        let old = stored.encoded_len() as u64;
        stored.cancel_requested = true;
        let bytes = stored.encode_to_vec();
        usage.bytes = usage.bytes.saturating_sub(old) + bytes.len() as u64;
        self.jobs.insert(id, bytes.as_slice())?;
        Ok(Ok(()))
    }

    fn expire(&mut self, now_ms: u64, usage: &mut Usage) -> Result<usize, redb::Error> {
        let due: Vec<(u64, String)> = self
            .expiry
            .range((0, "")..=(now_ms, "\u{10ffff}"))?
            .map(|row| row.map(|(k, _)| (k.value().0, k.value().1.to_string())))
            .collect::<Result<_, _>>()?;
        let mut removed = 0;
        for (at, id) in due {
            self.expiry.remove((at, id.as_str()))?;
            let Some(v) = self.jobs.remove(id.as_str())? else {
                continue;
            };
            let stored = decode_job(v.value())?;
            drop(v);
            let job = stored.job.clone().unwrap_or_default();
            if job.expires_unix_ms != at {
                // Finished again later (cannot happen today): keep it.
                self.jobs.insert(id.as_str(), stored.encode_to_vec().as_slice())?;
                continue;
            }
            let mut freed = stored.encoded_len() as u64;
            let seqs: Vec<u64> = self
                .events
                .range((id.as_str(), 0)..=(id.as_str(), u64::MAX))?
                .map(|row| row.map(|(k, v)| (k.value().1, v.value().len() as u64)))
                .collect::<Result<Vec<_>, _>>()?
                .into_iter()
                .map(|(seq, len)| {
                    freed += len;
                    seq
                })
                .collect();
            for seq in seqs {
                self.events.remove((id.as_str(), seq))?;
            }
            if !job.idempotency_key.is_empty() {
                self.keys
                    .remove((job.tenant.as_str(), job.idempotency_key.as_str()))?;
            }
            self.by_tenant
                .remove((job.tenant.as_str(), job.created_unix_ms, id.as_str()))?;
            usage.jobs = usage.jobs.saturating_sub(1);
            usage.bytes = usage.bytes.saturating_sub(freed);
            removed += 1;
        }
        Ok(removed)
    }
}

#[cfg(test)]
#[path = "embedded_tests.rs"]
mod tests;
