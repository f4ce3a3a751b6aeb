//! The embedded store's one writer thread: every write queued since its
//! last commit goes into one transaction (group commit), answered once it
//! is committed; or every one of them gets the commit's error (nothing of
//! that transaction was written).
//!
//! After an I/O error (a full disk, most often) redb refuses every later
//! transaction until the file is reopened: the writer closes it (once the
//! last read in progress is done) and opens it again at once, so reads
//! work again and writes do once the disk has room. While the disk is
//! full, each write is refused with `StoreError::DiskFull` (at most one
//! attempt per `RETRY_FULL`, the others refused without one), and nothing
//! stored before is lost: reopening goes back to the last durable commit,
//! and the output written since without an fsync (kept here until then)
//! is written again, first thing, in the next commit.
//!
//! Owner: `Writer` (this thread) of the transaction, of `Shared::db`'s
//! swaps and of `Shared::usage`.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use prost::Message;
use redb::{Database, ReadableDatabase};
use tokio::sync::{mpsc, oneshot};

use super::embedded_open::{explain, is_disk_full};
use super::embedded_schema::{
    BY_TENANT, EVENTS, EXPIRY, JOBS, KEYS, META, Shared, Usage, named, unavailable,
};
use super::embedded_tables::{Tables, Written};
use super::record;
use super::store::{Created, StoreError};
use crate::pb;

/// Writes taken into one transaction at most.
const BATCH: usize = 512;
/// After a write failed on a full disk, the next attempt waits this long
/// (writes meanwhile are refused at once, without redb's repair on each).
const RETRY_FULL: Duration = Duration::from_millis(250);
/// Output written without an fsync and kept for a reopen, at most: beyond
/// it the next commit is durable.
const MAX_UNDURABLE_BYTES: usize = 4 << 20;
/// How long a reopen waits for the reads in progress on the old file.
const READS_DRAIN: Duration = Duration::from_secs(2);

pub(super) enum Work {
    Create {
        job: Box<pb::StoredJob>,
        first: Box<pb::JobEvent>,
    },
    Write {
        job: Box<pb::StoredJob>,
        events: Vec<pb::JobEvent>,
    },
    Cancel {
        job_id: String,
    },
    Expire {
        now_ms: u64,
    },
}

/// What a work item came to, once committed.
pub(super) enum Done {
    Created(Created),
    Written,
    Expired(usize),
}

pub(super) struct Op {
    pub work: Work,
    pub reply: oneshot::Sender<Result<Done, StoreError>>,
}

/// A write stored without an fsync: the job's last record and the events
/// appended since the last durable commit.
type Undurable = HashMap<String, (pb::StoredJob, Vec<pb::JobEvent>)>;

pub(super) struct Writer {
    shared: Arc<Shared>,
    max_jobs: u64,
    max_bytes: u64,
    /// Committed without an fsync since the last durable commit.
    undurable: Undurable,
    undurable_bytes: usize,
    /// Lost by a reopen (which goes back to the last durable commit): written
    /// again first thing in the next commit.
    replay: Vec<(pb::StoredJob, Vec<pb::JobEvent>)>,
    /// The last failure while it lasts, and when a write may be tried again.
    failing: Option<(StoreError, Instant)>,
    /// Writes refused since the store last wrote.
    refused: u64,
}

impl Writer {
    pub fn new(shared: Arc<Shared>, max_jobs: u64, max_bytes: u64) -> Self {
        Self {
            shared,
            max_jobs,
            max_bytes,
            undurable: HashMap::new(),
            undurable_bytes: 0,
            replay: Vec::new(),
            failing: None,
            refused: 0,
        }
    }

    pub fn run(mut self, mut rx: mpsc::UnboundedReceiver<Op>) {
        while let Some(op) = rx.blocking_recv() {
            let mut batch = vec![op];
            while batch.len() < BATCH {
                match rx.try_recv() {
                    Ok(op) => batch.push(op),
                    Err(_) => break,
                }
            }
            let (works, replies): (Vec<Work>, Vec<_>) =
                batch.into_iter().map(|op| (op.work, op.reply)).unzip();
            let answers = match self.ready() {
                Err(e) => Err(e),
                Ok(db) => {
                    let mut usage = *self.shared.usage.lock();
                    let committed = self.commit(&db, works, &mut usage);
                    drop(db);
                    match committed {
                        Ok((done, durable)) => {
                            *self.shared.usage.lock() = usage;
                            if durable {
                                self.recovered();
                            }
                            Ok(done)
                        }
                        Err(e) => Err(self.failed(e)),
                    }
                }
            };
            match answers {
                Ok(done) => {
                    for (tx, done) in replies.into_iter().zip(done) {
                        let _ = tx.send(done);
                    }
                }
                Err(e) => {
                    self.refused += replies.len() as u64;
                    for tx in replies {
                        let _ = tx.send(Err(e.clone()));
                    }
                }
            }
        }
    }

    /// The database to write to, or why not now: closed (reopened here, at
    /// once) or a full disk within `RETRY_FULL` of the last attempt.
    fn ready(&mut self) -> Result<Arc<Database>, StoreError> {
        if let Some((e, retry_at)) = &self.failing
            && crate::clock::now() < *retry_at
        {
            return Err(e.clone());
        }
        if let Some(db) = &*self.shared.db.read() {
            return Ok(db.clone());
        }
        self.reopen()
    }

    /// A commit failed: nothing of it was written. After an I/O error the
    /// file is closed and opened again; a full disk is not tried again
    /// before `RETRY_FULL`.
    fn failed(&mut self, e: redb::Error) -> StoreError {
        let path = self.shared.path.display().to_string();
        let (error, reopen) = match &e {
            redb::Error::Io(io) if is_disk_full(io) => (StoreError::DiskFull(format!("{path}: {io}")), true),
            redb::Error::Io(_)
            | redb::Error::PreviousIo
            | redb::Error::Backend(_)
            | redb::Error::DatabaseClosed => (unavailable(format!("{path}: {e}")), true),
            _ => (unavailable(format!("{path}: {e}")), false),
        };
        if self.failing.is_none() {
            tracing::error!(error = %error, "the job store could not write; its writes are refused until it can");
        } else {
            tracing::debug!(error = %error, "the job store still cannot write");
        }
        let retry_at = match error {
            StoreError::DiskFull(_) => crate::clock::now() + RETRY_FULL,
            _ => crate::clock::now(),
        };
        self.failing = Some((error.clone(), retry_at));
        *self.shared.refusing.lock() = Some(error.clone());
        if reopen {
            self.close(error.clone());
            // Reads work again at once (a full disk lets the file be
            // reopened); a failed reopen is tried again at the next write.
            let _ = self.reopen();
        }
        error
    }

    /// A durable commit went through: the store writes again.
    fn recovered(&mut self) {
        if self.failing.take().is_some() {
            *self.shared.refusing.lock() = None;
            tracing::info!(
                refused = self.refused,
                "the job store writes again; every job stored before was kept"
            );
        }
        self.refused = 0;
    }

    /// Takes the database out of reach of new reads, waits (a bounded time)
    /// for the reads in progress, and drops it: redb closes the file.
    fn close(&mut self, why: StoreError) {
        *self.shared.down.lock() = Some(why);
        let Some(mut db) = self.shared.db.write().take() else {
            return;
        };
        let deadline = crate::clock::now() + READS_DRAIN;
        loop {
            match Arc::try_unwrap(db) {
                Ok(db) => {
                    drop(db);
                    return;
                }
                Err(shared) if crate::clock::now() < deadline => {
                    db = shared;
                    std::thread::sleep(Duration::from_millis(1));
                }
                // The last read drops it; the reopen is tried again until then.
                Err(_) => return,
            }
        }
    }

    /// Opens the file again: redb repairs it back to its last durable
    /// commit, and what was written since without an fsync is written again
    /// with the next commit.
    fn reopen(&mut self) -> Result<Arc<Database>, StoreError> {
        let path = &self.shared.path;
        let opened = (self.shared.opener)(path).map_err(|e| {
            let why = explain(path, &e);
            match e {
                redb::DatabaseError::Storage(redb::StorageError::Io(io)) if is_disk_full(&io) => {
                    StoreError::DiskFull(why)
                }
                _ => unavailable(why),
            }
        });
        let db = opened.and_then(|db| {
            let usage = recorded_usage(&db).map_err(|e| unavailable(format!("{}: {e}", path.display())))?;
            Ok((db, usage))
        });
        let (db, usage) = match db {
            Ok(opened) => opened,
            Err(e) => {
                let mut down = self.shared.down.lock();
                // Said once per cause, not at every write it refuses.
                match down.as_ref() == Some(&e) {
                    true => tracing::debug!(error = %e, "the job store still cannot be reopened"),
                    false => {
                        tracing::warn!(error = %e, "the job store could not be reopened; tried again at the next write")
                    }
                }
                *down = Some(e.clone());
                return Err(e);
            }
        };
        *self.shared.usage.lock() = usage;
        self.replay
            .extend(self.undurable.drain().map(|(_, written)| written));
        self.undurable_bytes = 0;
        let db = Arc::new(db);
        *self.shared.db.write() = Some(db.clone());
        *self.shared.down.lock() = None;
        tracing::info!(path = %path.display(), lost_output_rewritten = self.replay.len(), "the job store was reopened after an I/O error");
        Ok(db)
    }

    /// One transaction for `batch` (after any writes a reopen lost).
    /// Durable (fsync) when it stores a new job, a change of state or a
    /// cancellation; a write that only appends events to a running job (its
    /// output) is committed without waiting for the disk, and made durable
    /// by the next durable commit: a crash may lose the last of a running
    /// job's output, which is then INTERRUPTED or run again anyway.
    fn commit(
        &mut self,
        db: &Database,
        works: Vec<Work>,
        usage: &mut Usage,
    ) -> Result<(Vec<Result<Done, StoreError>>, bool), redb::Error> {
        let mut w = db.begin_write()?;
        // While writes fail, each commit is durable: one that goes through
        // shows the disk takes writes (and their fsync) again.
        let mut durable =
            !self.replay.is_empty() || self.undurable_bytes > MAX_UNDURABLE_BYTES || self.failing.is_some();
        let mut undurable = Vec::new();
        let mut answers = Vec::with_capacity(works.len());
        {
            let mut t = Tables {
                jobs: w.open_table(JOBS)?,
                events: w.open_table(EVENTS)?,
                keys: w.open_table(KEYS)?,
                by_tenant: w.open_table(BY_TENANT)?,
                expiry: w.open_table(EXPIRY)?,
            };
            for (job, events) in &self.replay {
                if let Err(e) = t.write(job, events, usage)? {
                    tracing::debug!(error = %e, "output lost by a reopen not written again");
                }
            }
            for work in works {
                let done = match work {
                    Work::Create { job, first } => {
                        durable = true;
                        self.create(&mut t, *job, *first, usage)?.map(Done::Created)
                    }
                    Work::Write { job, events } => {
                        let r = t.write(&job, &events, usage)?;
                        match &r {
                            Ok(Written::EventsOnly) => undurable.push((*job, events)),
                            _ => durable = true,
                        }
                        r.map(|_| Done::Written)
                    }
                    Work::Cancel { job_id } => {
                        durable = true;
                        t.request_cancel(&job_id, usage)?.map(|()| Done::Written)
                    }
                    Work::Expire { now_ms } => Ok(Done::Expired(t.expire(now_ms, usage)?)),
                };
                answers.push(done);
            }
        }
        w.open_table(META)?.insert("usage", (usage.jobs, usage.bytes))?;
        let durability = match durable {
            true => redb::Durability::Immediate,
            false => redb::Durability::None,
        };
        w.set_durability(durability)?;
        w.commit()?;
        self.replay.clear();
        if durable {
            self.undurable.clear();
            self.undurable_bytes = 0;
        }
        for (job, events) in undurable {
            self.keep_undurable(job, events, durable);
        }
        Ok((answers, durable))
    }

    /// Keeps an output write committed without an fsync until a durable
    /// commit covers it (a reopen would lose it).
    fn keep_undurable(&mut self, job: pb::StoredJob, events: Vec<pb::JobEvent>, covered: bool) {
        if covered {
            return;
        }
        let id = record::job(&job).job_id.clone();
        self.undurable_bytes += job.encoded_len() + events.iter().map(|e| e.encoded_len()).sum::<usize>();
        let entry = self
            .undurable
            .entry(id)
            .or_insert_with(|| (job.clone(), Vec::new()));
        entry.0 = job;
        entry.1.extend(events);
    }

    fn create(
        &self,
        t: &mut Tables<'_>,
        stored: pb::StoredJob,
        first: pb::JobEvent,
        usage: &mut Usage,
    ) -> Result<Result<Created, StoreError>, redb::Error> {
        let job = record::job(&stored).clone();
        // The key names a job (or, without one, a resubmission took this
        // job's id as its key): that job, nothing stored.
        let existing = match job.idempotency_key.is_empty() {
            false => named(&t.keys, &t.jobs, &job.tenant, &job.idempotency_key, true)?,
            true => named(&t.keys, &t.jobs, &job.tenant, &job.job_id, false)?,
        };
        if let Some(existing) = existing {
            return Ok(Ok(Created::Existing(Box::new(existing))));
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

/// The size the last durable commit recorded.
fn recorded_usage(db: &Database) -> Result<Usage, redb::Error> {
    let r = db.begin_read()?;
    let meta = r.open_table(META)?;
    let (jobs, bytes) = meta.get("usage")?.map_or((0, 0), |v| v.value());
    Ok(Usage { jobs, bytes })
}
