//! The embedded job store: one redb file under `[jobs].data_dir`, so a
//! restart loses no job. Owner: one writer thread (`embedded_writer`),
//! which takes every write queued since its last commit into one
//! transaction (group commit: one fsync for many jobs) and answers each
//! once it is durable; it also reopens the file after an I/O error (a full
//! disk), which redb requires. Reads open their own read transaction (a
//! snapshot) from any task, on the database as it is open now (`Shared`).
//!
//! Tables: jobs by id; events by (id, seq); (tenant, idempotency key) → id;
//! (tenant, created ms, id) for listing; (expires ms, id) for the TTL; the
//! store's size (jobs, bytes), kept by each commit.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use parking_lot::{Mutex, RwLock};
use prost::Message;
use redb::{Database, ReadableDatabase, ReadableTable, ReadableTableMetadata, TableDefinition};
use tokio::sync::{mpsc, oneshot};

pub use super::embedded_open::Opener;
use super::embedded_open::{corrupt, explain, file_opener, write_pid};
use super::embedded_writer::{Done, Op, Work, Writer};
use super::record;
use super::store::{Beat, Created, Held, JobStore, StoreError, StoreFuture};
use crate::pb;

pub(super) const JOBS: TableDefinition<&str, &[u8]> = TableDefinition::new("jobs");
pub(super) const EVENTS: TableDefinition<(&str, u64), &[u8]> = TableDefinition::new("events");
pub(super) const KEYS: TableDefinition<(&str, &str), &str> = TableDefinition::new("idempotency_keys");
pub(super) const BY_TENANT: TableDefinition<(&str, u64, &str), ()> = TableDefinition::new("by_tenant");
pub(super) const EXPIRY: TableDefinition<(u64, &str), ()> = TableDefinition::new("expiry");
/// `"usage"` → (jobs, bytes) stored, written with every commit, so opening
/// the store does not read every record to size it.
pub(super) const META: TableDefinition<&str, (u64, u64)> = TableDefinition::new("meta");

/// The store's file in `data_dir`.
const FILE: &str = "jobs.redb";

/// Jobs and bytes stored, kept by the writer.
#[derive(Debug, Default, Clone, Copy)]
pub(super) struct Usage {
    pub jobs: u64,
    pub bytes: u64,
}

/// What the readers and the writer share: the database as it is open now.
pub(super) struct Shared {
    pub path: PathBuf,
    pub opener: Opener,
    /// `None` while the writer reopens the file after an I/O error (or
    /// could not yet): the writer swaps it, readers clone it for one read.
    pub db: RwLock<Option<Arc<Database>>>,
    /// Why the file is not open, while `db` is `None`.
    pub down: Mutex<Option<StoreError>>,
    /// The last failure, until a write goes through again.
    pub refusing: Mutex<Option<StoreError>>,
    pub usage: Mutex<Usage>,
}

impl Shared {
    /// The open database, for one read (held no longer: the writer waits
    /// for the last holder to drop it before it reopens the file).
    fn db(&self) -> Result<Arc<Database>, StoreError> {
        if let Some(db) = &*self.db.read() {
            return Ok(db.clone());
        }
        let why = self
            .down
            .lock()
            .as_ref()
            .map_or_else(|| "an I/O error".to_string(), |e| e.to_string());
        Err(StoreError::Unavailable(format!(
            "{} is being reopened after {why}",
            self.path.display()
        )))
    }
}

pub struct EmbeddedStore {
    shared: Arc<Shared>,
    ops: mpsc::UnboundedSender<Op>,
    recovered: AtomicBool,
}

pub(super) fn unavailable(e: impl std::fmt::Display) -> StoreError {
    StoreError::Unavailable(e.to_string())
}

impl EmbeddedStore {
    /// Opens (or creates) `dir/jobs.redb`. Fails, saying what it found,
    /// when the directory cannot be made, or the file is locked by another
    /// process (a second dispatcher on the same data_dir), unreadable, or
    /// not a job store.
    pub fn open(dir: &Path, max_jobs: u64, max_bytes: u64) -> Result<Self, String> {
        Self::open_with(dir, max_jobs, max_bytes, file_opener())
    }

    /// `open`, the file opened (and reopened after an I/O error) by `opener`.
    pub fn open_with(dir: &Path, max_jobs: u64, max_bytes: u64, opener: Opener) -> Result<Self, String> {
        std::fs::create_dir_all(dir).map_err(|e| format!("jobs.data_dir {}: {e}", dir.display()))?;
        let path = dir.join(FILE);
        let db = opener(&path).map_err(|e| explain(&path, &e))?;
        write_pid(&path);
        let usage = Self::usage_at_open(&db).map_err(|e| match e {
            redb::Error::Corrupted(why) => format!("jobs.data_dir: {}", corrupt(&path, &why)),
            e => format!("jobs.data_dir: reading {}: {e}", path.display()),
        })?;
        let shared = Arc::new(Shared {
            path,
            opener,
            db: RwLock::new(Some(Arc::new(db))),
            down: Mutex::new(None),
            refusing: Mutex::new(None),
            usage: Mutex::new(usage),
        });
        let (ops, rx) = mpsc::unbounded_channel();
        let writer = Writer::new(shared.clone(), max_jobs, max_bytes);
        std::thread::Builder::new()
            .name("jobs-store".into())
            .spawn(move || writer.run(rx))
            .map_err(|e| format!("starting the job store's writer: {e}"))?;
        Ok(Self {
            shared,
            ops,
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
    pub(super) fn measure(w: &redb::WriteTransaction) -> Result<Usage, redb::Error> {
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

    fn send<T: Send + 'static>(&self, work: Work, take: fn(Done) -> Option<T>) -> StoreFuture<'_, T> {
        let (reply, rx) = oneshot::channel();
        let sent = self.ops.send(Op { work, reply });
        Box::pin(async move {
            sent.map_err(|_| unavailable("the store's writer stopped"))?;
            let done = rx
                .await
                .map_err(|_| unavailable("the store's writer stopped"))??;
            take(done).ok_or_else(|| unavailable("the store's writer answered another question"))
        })
    }

    fn read<T>(
        &self,
        f: impl FnOnce(&redb::ReadTransaction) -> Result<T, redb::Error>,
    ) -> Result<T, StoreError> {
        let db = self.shared.db()?;
        let r = db.begin_read().map_err(unavailable)?;
        f(&r).map_err(unavailable)
    }
}

fn written(done: Done) -> Option<()> {
    matches!(done, Done::Written).then_some(())
}

pub(super) fn decode_job(bytes: &[u8]) -> Result<pb::StoredJob, redb::Error> {
    pb::StoredJob::decode(bytes).map_err(|e| redb::Error::Corrupted(format!("a stored job: {e}")))
}

pub(super) fn state(j: &pb::StoredJob) -> pb::JobState {
    j.job.as_ref().map_or(pb::JobState::Unspecified, |j| j.state())
}

/// The job `key` names for `tenant` (see `store`'s doc): the one stored
/// with it, or (`by_id`) the tenant's keyless job whose id it is.
pub(super) fn named(
    keys: &impl ReadableTable<(&'static str, &'static str), &'static str>,
    jobs: &impl ReadableTable<&'static str, &'static [u8]>,
    tenant: &str,
    key: &str,
    by_id: bool,
) -> Result<Option<pb::StoredJob>, redb::Error> {
    let id = keys.get((tenant, key))?.map(|v| v.value().to_string());
    if let Some(id) = id {
        return jobs.get(id.as_str())?.map(|v| decode_job(v.value())).transpose();
    }
    if !by_id || !record::valid_id(key) {
        return Ok(None);
    }
    let Some(v) = jobs.get(key)? else {
        return Ok(None);
    };
    let stored = decode_job(v.value())?;
    let j = record::job(&stored);
    Ok((j.tenant == tenant && j.idempotency_key.is_empty()).then_some(stored))
}

impl JobStore for EmbeddedStore {
    fn create(&self, job: pb::StoredJob, first: pb::JobEvent, _owner: &str) -> StoreFuture<'_, Created> {
        let work = Work::Create {
            job: Box::new(job),
            first: Box::new(first),
        };
        self.send(work, |done| match done {
            Done::Created(c) => Some(c),
            _ => None,
        })
    }

    fn write(&self, job: pb::StoredJob, events: Vec<pb::JobEvent>) -> StoreFuture<'_, ()> {
        let work = Work::Write {
            job: Box::new(job),
            events,
        };
        self.send(work, written)
    }

    fn get(&self, job_id: &str) -> StoreFuture<'_, Option<pb::StoredJob>> {
        let got = self.read(|r| {
            let jobs = r.open_table(JOBS)?;
            jobs.get(job_id)?.map(|v| decode_job(v.value())).transpose()
        });
        Box::pin(async move { got })
    }

    fn by_key(&self, tenant: &str, key: &str) -> StoreFuture<'_, Option<pb::StoredJob>> {
        let got = self.read(|r| named(&r.open_table(KEYS)?, &r.open_table(JOBS)?, tenant, key, true));
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
        if got.is_err() {
            // Not read: the next look tries again.
            self.recovered.store(false, Ordering::SeqCst);
        }
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
        self.send(Work::Cancel { job_id }, written)
    }

    fn expire(&self, now_ms: u64) -> StoreFuture<'_, usize> {
        self.send(Work::Expire { now_ms }, |done| match done {
            Done::Expired(n) => Some(n),
            _ => None,
        })
    }

    fn usage(&self) -> StoreFuture<'_, (u64, u64)> {
        let u = *self.shared.usage.lock();
        Box::pin(async move { Ok((u.jobs, u.bytes)) })
    }

    fn refusing(&self) -> Option<StoreError> {
        self.shared.refusing.lock().clone()
    }
}

#[cfg(test)]
#[path = "embedded_tests.rs"]
mod tests;
