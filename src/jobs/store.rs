//! Where jobs are kept: the embedded store (`embedded`, redb under
//! `[jobs].data_dir`) or Redis with `[cluster]` (`cluster::jobs`). Both keep
//! the same records (`pb::StoredJob`, its events numbered from 1) and the
//! same rules: a write carries the writer's fence and is refused once the
//! job was taken over; a job's events are appended in order, never
//! rewritten; a full store refuses new jobs.

use std::future::Future;
use std::pin::Pin;

use crate::pb;

pub type StoreFuture<'a, T> = Pin<Box<dyn Future<Output = Result<T, StoreError>> + Send + 'a>>;

#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum StoreError {
    /// Bounded: `jobs.max_jobs` or `jobs.max_store_bytes` reached.
    #[error("the job store is full ({0}); finished jobs are removed after jobs.ttl")]
    Full(String),
    /// Another owner took the job (a higher fence): this one must stop.
    #[error("the job was taken over by {owner} (fence {current}); this replica no longer runs it")]
    Fenced { owner: String, current: u64 },
    /// The disk under the store is full: nothing was written; what was
    /// stored before is kept.
    #[error(
        "the job store's disk is full ({0}); new jobs are refused until space is freed, stored jobs are kept"
    )]
    DiskFull(String),
    /// The store could not be read or written (disk, Redis): nothing was
    /// written.
    #[error("the job store is unavailable: {0}")]
    Unavailable(String),
    /// No answer in time to a write that was sent: it may have been stored,
    /// and may still be (Redis runs it once it answers again).
    #[error("the job store did not answer ({0}); the write may have been stored")]
    Unknown(String),
}

impl StoreError {
    /// The store failed for now (a run stopped by it is taken up again once
    /// the store answers); not a refusal meant for this writer.
    pub fn is_transient(&self) -> bool {
        matches!(
            self,
            StoreError::DiskFull(_) | StoreError::Unavailable(_) | StoreError::Unknown(_)
        )
    }
}

/// What `create` did.
#[derive(Debug, Clone, PartialEq)]
pub enum Created {
    Stored,
    /// The tenant's idempotency key already names this job: nothing stored.
    Existing(Box<pb::StoredJob>),
}

/// One owner's hold on its running jobs, renewed by `heartbeat`.
#[derive(Debug, Clone, PartialEq)]
pub struct Held {
    pub job_id: String,
    pub fence: u64,
}

pub trait JobStore: Send + Sync {
    /// Stores a new job with its first event, durably, owned by `owner`
    /// (fence 1), unless the tenant's `idempotency_key` already names a
    /// job still kept (or, without a key, a job was stored with the new
    /// job's id as its key).
    fn create(&self, job: pb::StoredJob, first: pb::JobEvent, owner: &str) -> StoreFuture<'_, Created>;

    /// Replaces the job's record and appends `events` (numbered after the
    /// last), durably, if `job.fence` is still the job's.
    fn write(&self, job: pb::StoredJob, events: Vec<pb::JobEvent>) -> StoreFuture<'_, ()>;

    fn get(&self, job_id: &str) -> StoreFuture<'_, Option<pb::StoredJob>>;

    /// The job the tenant's idempotency key names (see the module's doc).
    fn by_key(&self, tenant: &str, key: &str) -> StoreFuture<'_, Option<pb::StoredJob>>;

    /// Up to `max` events from `from_seq` on, in order.
    fn events(&self, job_id: &str, from_seq: u64, max: usize) -> StoreFuture<'_, Vec<pb::JobEvent>>;

    /// `tenant`'s jobs, newest first, in `state` (any when `None`), at most
    /// `limit`, without their output.
    fn list(&self, tenant: &str, state: Option<pb::JobState>, limit: usize) -> StoreFuture<'_, Vec<pb::Job>>;

    /// Unfinished jobs `owner` is to take now, claimed (their fence raised):
    /// the embedded store gives every unfinished job once, at start; Redis,
    /// the jobs whose owner's lease lapsed.
    fn orphans(&self, owner: &str) -> StoreFuture<'_, Vec<pb::StoredJob>>;

    /// Renews `owner`'s hold on `held`; answers the ids among them that
    /// someone asked to cancel, and those that were taken over (fenced).
    fn heartbeat(&self, owner: &str, held: Vec<Held>) -> StoreFuture<'_, Beat>;

    /// Ends `owner`'s leases on `held` now, so that another replica takes
    /// those jobs at its next look instead of after the lease (a replica
    /// stopping hands its queued jobs over). One process owning the store
    /// (embedded, memory) has no one to hand them to: nothing to do.
    fn release(&self, owner: &str, held: Vec<Held>) -> StoreFuture<'_, ()> {
        let _ = (owner, held);
        Box::pin(async { Ok(()) })
    }

    /// Asks the job's owner to cancel it (any replica may ask).
    fn request_cancel(&self, job_id: &str) -> StoreFuture<'_, ()>;

    /// Removes finished jobs whose `expires_unix_ms` is past `now_ms`, and
    /// their events; answers how many.
    fn expire(&self, now_ms: u64) -> StoreFuture<'_, usize>;

    /// Jobs and bytes stored now.
    fn usage(&self) -> StoreFuture<'_, (u64, u64)>;

    /// Why the store refuses writes now, while it does (the embedded store:
    /// a full disk, or an I/O error it has not yet recovered from; Redis:
    /// the last call got no answer).
    fn refusing(&self) -> Option<StoreError> {
        None
    }
}

/// What a heartbeat learned.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Beat {
    pub cancel: Vec<String>,
    pub lost: Vec<String>,
}
