//! The embedded job store: one redb file under `[jobs].data_dir`, so a
//! restart loses no job. Owner: one writer thread (`embedded_writer`),
//! which takes every write queued since its last commit into one
//! transaction (group commit: one fsync for many jobs) and answers each
//! once it is durable; it also reopens the file after an I/O error (a full
//! disk), which redb requires. Reads open their own read transaction (a
//! snapshot) from any task, on the database as it is open now (`Shared`).
//!
//! Its tables, and what readers and writer share, are in
//! `embedded_schema.rs`.

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use parking_lot::{Mutex, RwLock};
use prost::Message;
use redb::{Database, ReadableDatabase, ReadableTable, ReadableTableMetadata};
use tokio::sync::{mpsc, oneshot};

pub use super::embedded_open::Opener;
use super::embedded_open::{corrupt, explain, file_opener, write_pid};
use super::embedded_schema::{
    BY_TENANT, EVENTS, EXPIRY, JOBS, KEYS, META, Shared, Usage, decode_job, named, state, unavailable,
};
use super::embedded_writer::{Done, Op, Work, Writer};
use super::store::{Beat, Created, Held, JobStore, StoreError, StoreFuture};
use crate::pb;

/// The store's file in `data_dir`.
const FILE: &str = "jobs.redb";

pub struct EmbeddedStore {
    shared: Arc<Shared>,
    ops: mpsc::UnboundedSender<Op>,
    recovered: AtomicBool,
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
