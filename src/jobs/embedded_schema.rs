//! The embedded job store's tables and what its readers and its writer
//! share (`embedded.rs`, `embedded_writer.rs`, `embedded_tables.rs` read
//! it; it reads none of them).
//!
//! Tables: jobs by id; events by (id, seq); (tenant, idempotency key) → id;
//! (tenant, created ms, id) for listing; (expires ms, id) for the TTL; the
//! store's size (jobs, bytes), kept by each commit.

use std::path::PathBuf;
use std::sync::Arc;

use parking_lot::{Mutex, RwLock};
use prost::Message;
use redb::{Database, ReadableTable, TableDefinition};

use super::embedded_open::Opener;
use super::record;
use super::store::StoreError;
use crate::pb;

pub(super) const JOBS: TableDefinition<&str, &[u8]> = TableDefinition::new("jobs");
pub(super) const EVENTS: TableDefinition<(&str, u64), &[u8]> = TableDefinition::new("events");
pub(super) const KEYS: TableDefinition<(&str, &str), &str> = TableDefinition::new("idempotency_keys");
pub(super) const BY_TENANT: TableDefinition<(&str, u64, &str), ()> = TableDefinition::new("by_tenant");
pub(super) const EXPIRY: TableDefinition<(u64, &str), ()> = TableDefinition::new("expiry");
/// `"usage"` → (jobs, bytes) stored, written with every commit, so opening
/// the store does not read every record to size it.
pub(super) const META: TableDefinition<&str, (u64, u64)> = TableDefinition::new("meta");

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
    pub fn db(&self) -> Result<Arc<Database>, StoreError> {
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

pub(super) fn unavailable(e: impl std::fmt::Display) -> StoreError {
    StoreError::Unavailable(e.to_string())
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
