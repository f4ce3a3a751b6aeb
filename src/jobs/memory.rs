//! A job store in memory: the same rules as the embedded store (fenced
//! writes, idempotency keys, the size bound, expiry), nothing kept across a
//! restart. Its calls complete without waiting on a thread or a socket, so
//! the jobs desk runs on a paused tokio clock against it (`tests/engine_jobs.rs`):
//! the durable stores' I/O would let a paused clock jump ahead.
//!
//! Owner: `MemoryStore::state`, one `Mutex`, held for one call.

use std::collections::{BTreeMap, HashMap};

use parking_lot::Mutex;
use prost::Message;

use super::record;
use super::store::{Beat, Created, Held, JobStore, StoreError, StoreFuture};
use crate::pb;

#[derive(Default)]
struct State {
    jobs: HashMap<String, pb::StoredJob>,
    events: HashMap<String, Vec<pb::JobEvent>>,
    keys: HashMap<(String, String), String>,
    recovered: bool,
}

pub struct MemoryStore {
    state: Mutex<State>,
    max_jobs: u64,
}

impl MemoryStore {
    pub fn new(max_jobs: u64) -> Self {
        Self {
            state: Mutex::default(),
            max_jobs,
        }
    }
}

fn ready<T: Send + 'static>(r: Result<T, StoreError>) -> StoreFuture<'static, T> {
    Box::pin(async move { r })
}

impl State {
    /// The job `key` names for `tenant` (see `store`'s doc).
    fn named(&self, tenant: &str, key: &str) -> Option<&pb::StoredJob> {
        if let Some(id) = self.keys.get(&(tenant.to_string(), key.to_string())) {
            return self.jobs.get(id);
        }
        self.jobs.get(key).filter(|s| {
            let j = record::job(s);
            j.tenant == tenant && j.idempotency_key.is_empty()
        })
    }
}

impl JobStore for MemoryStore {
    fn create(&self, job: pb::StoredJob, first: pb::JobEvent, _owner: &str) -> StoreFuture<'_, Created> {
        let mut s = self.state.lock();
        let j = record::job(&job).clone();
        let existing = match j.idempotency_key.is_empty() {
            false => s.named(&j.tenant, &j.idempotency_key),
            true => s
                .keys
                .get(&(j.tenant.clone(), j.job_id.clone()))
                .and_then(|id| s.jobs.get(id)),
        };
        if let Some(existing) = existing {
            return ready(Ok(Created::Existing(Box::new(existing.clone()))));
        }
        if s.jobs.len() as u64 >= self.max_jobs {
            return ready(Err(StoreError::Full(format!(
                "{} jobs: jobs.max_jobs",
                s.jobs.len()
            ))));
        }
        if !j.idempotency_key.is_empty() {
            s.keys
                .insert((j.tenant.clone(), j.idempotency_key.clone()), j.job_id.clone());
        }
        s.events.insert(j.job_id.clone(), vec![first]);
        s.jobs.insert(j.job_id, job);
        ready(Ok(Created::Stored))
    }

    fn write(&self, job: pb::StoredJob, events: Vec<pb::JobEvent>) -> StoreFuture<'_, ()> {
        let mut s = self.state.lock();
        let id = record::job(&job).job_id.clone();
        let Some(old) = s.jobs.get(&id) else {
            return ready(Err(StoreError::Unavailable(format!(
                "job {id} is no longer stored"
            ))));
        };
        if old.fence != job.fence {
            return ready(Err(StoreError::Fenced {
                owner: record::job(old).owner.clone(),
                current: old.fence,
            }));
        }
        let cancel = old.cancel_requested;
        let mut job = job;
        job.cancel_requested |= cancel;
        s.jobs.insert(id.clone(), job);
        s.events.entry(id).or_default().extend(events);
        ready(Ok(()))
    }

    fn get(&self, job_id: &str) -> StoreFuture<'_, Option<pb::StoredJob>> {
        ready(Ok(self.state.lock().jobs.get(job_id).cloned()))
    }

    fn by_key(&self, tenant: &str, key: &str) -> StoreFuture<'_, Option<pb::StoredJob>> {
        ready(Ok(self.state.lock().named(tenant, key).cloned()))
    }

    fn events(&self, job_id: &str, from_seq: u64, max: usize) -> StoreFuture<'_, Vec<pb::JobEvent>> {
        let s = self.state.lock();
        let events = s
            .events
            .get(job_id)
            .map(|e| {
                e.iter()
                    .filter(|e| e.seq >= from_seq)
                    .take(max)
                    .cloned()
                    .collect()
            })
            .unwrap_or_default();
        ready(Ok(events))
    }

    fn list(&self, tenant: &str, state: Option<pb::JobState>, limit: usize) -> StoreFuture<'_, Vec<pb::Job>> {
        let s = self.state.lock();
        let mut by_time: BTreeMap<(u64, String), pb::Job> = BTreeMap::new();
        for stored in s.jobs.values() {
            let j = record::job(stored);
            if j.tenant == tenant && state.is_none_or(|st| st == j.state()) {
                let mut j = j.clone();
                j.output = Default::default();
                by_time.insert((j.created_unix_ms, j.job_id.clone()), j);
            }
        }
        ready(Ok(by_time.into_values().rev().take(limit).collect()))
    }

    fn orphans(&self, _owner: &str) -> StoreFuture<'_, Vec<pb::StoredJob>> {
        let mut s = self.state.lock();
        if std::mem::replace(&mut s.recovered, true) {
            return ready(Ok(Vec::new()));
        }
        let unfinished = s
            .jobs
            .values()
            .filter(|j| !record::is_terminal(record::job(j).state()))
            .cloned()
            .collect();
        ready(Ok(unfinished))
    }

    fn heartbeat(&self, _owner: &str, held: Vec<Held>) -> StoreFuture<'_, Beat> {
        let s = self.state.lock();
        let cancel = held
            .into_iter()
            .filter(|h| s.jobs.get(&h.job_id).is_some_and(|j| j.cancel_requested))
            .map(|h| h.job_id)
            .collect();
        ready(Ok(Beat {
            cancel,
            lost: Vec::new(),
        }))
    }

    fn request_cancel(&self, job_id: &str) -> StoreFuture<'_, ()> {
        if let Some(j) = self.state.lock().jobs.get_mut(job_id) {
            j.cancel_requested = true;
        }
        ready(Ok(()))
    }

    fn expire(&self, now_ms: u64) -> StoreFuture<'_, usize> {
        let mut s = self.state.lock();
        let due: Vec<String> = s
            .jobs
            .values()
            .map(record::job)
            .filter(|j| j.expires_unix_ms > 0 && j.expires_unix_ms <= now_ms)
            .map(|j| j.job_id.clone())
            .collect();
        for id in &due {
            if let Some(j) = s.jobs.remove(id) {
                let j = record::job(&j);
                s.keys.remove(&(j.tenant.clone(), j.idempotency_key.clone()));
            }
            s.events.remove(id);
        }
        ready(Ok(due.len()))
    }

    fn usage(&self) -> StoreFuture<'_, (u64, u64)> {
        let s = self.state.lock();
        let bytes = s.jobs.values().map(|j| j.encoded_len() as u64).sum::<u64>()
            + s.events
                .values()
                .flatten()
                .map(|e| e.encoded_len() as u64)
                .sum::<u64>();
        ready(Ok((s.jobs.len() as u64, bytes)))
    }
}
