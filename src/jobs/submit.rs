//! SubmitJob: the request checked, its idempotency key looked up before any
//! limit (a client that lost the first answer needs its key to work most
//! when its tenant is at `max_held_per_tenant`), the job stored and queued.
//!
//! A key names one submission: the same key with the same request answers
//! the first job; with a different request, `JobError::KeyReused`. A store
//! that did not answer whether it stored the job gets
//! `JobError::MaybeStored`, naming the job and the key that resolves it
//! (the client's, or the job's id: see `store`'s doc).

use std::sync::atomic::Ordering;

use super::store::{Created, StoreError};
use super::{JobError, Jobs, record};
use crate::core::JobRefusal;
use crate::dispatch::{Caller, DispatchError, Violation};
use crate::pb;
use pb::job_event::Event;

/// Whether `request` (as submitted, its tenant set) asks for what the
/// stored job `existing` was submitted with: its request (an empty
/// request id was given the job's id) and `repeatable`.
fn same_submission(existing: &pb::StoredJob, request: &pb::DispatchRequest, repeatable: bool) -> bool {
    let job = record::job(existing);
    let Some(stored) = &existing.request else {
        return false;
    };
    let mut asked = request.clone();
    if asked.request_id.is_empty() && stored.request_id == job.job_id {
        asked.request_id = job.job_id.clone();
    }
    asked == *stored && job.repeatable == repeatable
}

/// The job a key names, if this submission is the same one; else why not.
fn answer_existing(
    existing: &pb::StoredJob,
    request: &pb::DispatchRequest,
    r: &pb::SubmitJobRequest,
) -> Result<pb::Job, JobError> {
    let job = record::job(existing);
    if same_submission(existing, request, r.repeatable) {
        return Ok(job.clone());
    }
    Err(JobError::KeyReused {
        key: r.idempotency_key.clone(),
        job_id: job.job_id.clone(),
    })
}

impl Jobs {
    /// Stores a job and queues it; answers before any work.
    pub async fn submit(&self, r: pb::SubmitJobRequest, caller: &Caller) -> Result<pb::Job, JobError> {
        if self.stopping.load(Ordering::SeqCst) || self.engine.shutting_down() {
            return Err(JobError::ShuttingDown);
        }
        let Some(mut request) = r.request.clone() else {
            return Err(
                DispatchError::InvalidArgument(vec![Violation::new("request", "is required")]).into(),
            );
        };
        let (tenant, tokens) = self.engine.check_job(&request, caller)?;
        let limits = self.engine.settings().limits;
        if r.idempotency_key.len() > limits.max_request_id_bytes {
            return Err(DispatchError::InvalidArgument(vec![Violation::new(
                "idempotency_key",
                format!("is longer than {} bytes", limits.max_request_id_bytes),
            )])
            .into());
        }
        request.tenant = tenant.to_string();
        if !r.idempotency_key.is_empty()
            && let Some(existing) = self.store.by_key(&tenant, &r.idempotency_key).await?
        {
            return answer_existing(&existing, &request, &r);
        }
        let id = record::new_id();
        let asked = request.clone();
        if request.request_id.is_empty() {
            request.request_id = id.clone();
        }
        let (position, wait) = {
            let mut t = self.table.lock();
            if let Err(JobRefusal::TenantFull { held }) = t.backlog.admit(&tenant) {
                return Err(JobError::TenantFull {
                    tenant: tenant.to_string(),
                    held,
                });
            }
            let ahead = t.backlog.queued_for(&tenant);
            let slots = self.config.limits.running_per_tenant;
            (ahead, t.estimate(ahead, slots))
        };
        let mut stored = pb::StoredJob {
            job: Some(pb::Job {
                job_id: id.clone(),
                tenant: tenant.to_string(),
                model: request.model.clone(),
                state: pb::JobState::Queued as i32,
                repeatable: r.repeatable,
                idempotency_key: r.idempotency_key.clone(),
                created_unix_ms: crate::clock::unix_ms(),
                owner: self.owner.clone(),
                ..Default::default()
            }),
            request: Some(request),
            fence: 1,
            cancel_requested: false,
        };
        let first = record::next_event(
            &mut stored,
            Event::Queued(pb::JobQueued {
                position: position as u32,
                estimate: wait,
                reason: "submitted".into(),
            }),
        );
        let created = self.store.create(stored.clone(), first, &self.owner).await;
        if !matches!(created, Ok(Created::Stored)) {
            self.table.lock().backlog.release(&tenant);
        }
        match created {
            Ok(Created::Stored) => {
                let job = record::job(&stored).clone();
                self.enqueue(stored, tokens.total(), false);
                Ok(job)
            }
            Ok(Created::Existing(existing)) => answer_existing(&existing, &asked, &r),
            Err(StoreError::Unknown(why)) => Err(JobError::MaybeStored {
                key: match r.idempotency_key.is_empty() {
                    true => id.clone(),
                    false => r.idempotency_key.clone(),
                },
                job_id: id,
                why,
            }),
            Err(e) => Err(e.into()),
        }
    }
}
