//! The embedded store's tables as one write transaction sees them, and
//! the changes a write makes to them (the writer, `embedded_writer`, is
//! their only user).

use prost::Message;
use redb::ReadableTable;

use super::embedded_schema::{Usage, decode_job, state, unavailable};
use super::record;
use super::store::StoreError;
use crate::pb;

/// What a write changed.
pub(super) enum Written {
    /// The job's state: durable before it is answered.
    State,
    /// Only events appended (output): durable with the next durable commit.
    EventsOnly,
}

pub(super) struct Tables<'w> {
    pub jobs: redb::Table<'w, &'static str, &'static [u8]>,
    pub events: redb::Table<'w, (&'static str, u64), &'static [u8]>,
    pub keys: redb::Table<'w, (&'static str, &'static str), &'static str>,
    pub by_tenant: redb::Table<'w, (&'static str, u64, &'static str), ()>,
    pub expiry: redb::Table<'w, (u64, &'static str), ()>,
}

impl Tables<'_> {
    pub fn write(
        &mut self,
        stored: &pb::StoredJob,
        events: &[pb::JobEvent],
        usage: &mut Usage,
    ) -> Result<Result<Written, StoreError>, redb::Error> {
        let job = record::job(stored);
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
        let written = match state(&old) == state(stored) {
            true => Written::EventsOnly,
            false => Written::State,
        };
        let mut stored = stored.clone();
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

    pub fn request_cancel(
        &mut self,
        id: &str,
        usage: &mut Usage,
    ) -> Result<Result<(), StoreError>, redb::Error> {
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

    pub fn expire(&mut self, now_ms: u64, usage: &mut Usage) -> Result<usize, redb::Error> {
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
