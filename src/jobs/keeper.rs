//! The keeper: takes the jobs left without an owner (every unfinished job
//! at start; with Redis, a dead replica's once its lease lapsed), renews
//! this process's hold on its own, acts on cancellations asked for
//! elsewhere, and removes finished jobs past their TTL.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use super::record;
use super::store::Held;
use super::{Here, Jobs};
use crate::core::job::{Recovery, recovery};
use crate::pb;
use pb::job_event::Event;

/// The health service name whose status says whether jobs are taken.
pub const HEALTH_SERVICE: &str = "dispatch.v1.Jobs";

/// What a job that may have run and is not repeatable ends with.
pub const INTERRUPTED: &str = "the dispatcher stopped while this job ran, so it may have run; it was not submitted as repeatable, so it is not run again";
/// The same, when its run stopped because the store could not record it.
pub const INTERRUPTED_BY_STORE: &str = "the job store could not record this job while it ran (a full disk, Redis away), so it may have run; it was not submitted as repeatable, so it is not run again";

/// Why a job is taken up without a run of this process holding it.
#[derive(Clone, Copy, PartialEq)]
enum Cause {
    /// Found unfinished: at start, or (Redis) its owner's lease lapsed.
    Orphan,
    /// Its run here stopped because the store failed; `unsent`: before
    /// anything was sent.
    StoreFailed { unsent: bool },
}

impl Jobs {
    pub(super) async fn keeper(self: Arc<Self>, cancel: CancellationToken) {
        // A third of the lease between heartbeats; expiry once a second.
        let beat = (self.config.lease / 3).clamp(Duration::from_millis(100), Duration::from_secs(1));
        let mut last_expiry = crate::clock::tokio_now();
        let mut refusing = None;
        loop {
            // Renew first, and look for orphans only once renewed: after a
            // stall past the lease (a paused process, a Redis that did not
            // answer) our own jobs look lapsed, and taking them from
            // ourselves would fence their runs.
            let renewed = self.heartbeat().await;
            if renewed && !self.stopping.load(Ordering::SeqCst) {
                self.take_orphans().await;
                self.take_stranded().await;
            }
            self.record_gauges().await;
            self.report_store(&mut refusing).await;
            if crate::clock::tokio_now() >= last_expiry + Duration::from_secs(1) {
                last_expiry = crate::clock::tokio_now();
                match self.store.expire(crate::clock::unix_ms()).await {
                    Ok(0) => {}
                    Ok(n) => tracing::debug!(removed = n, "removed finished jobs past jobs.ttl"),
                    Err(e) => tracing::warn!(error = %e, "could not remove expired jobs"),
                }
            }
            tokio::select! {
                _ = cancel.cancelled() => return,
                _ = tokio::time::sleep(beat) => {}
            }
        }
    }

    async fn take_orphans(&self) {
        let orphans = match self.store.orphans(&self.owner).await {
            Ok(o) => o,
            Err(e) => {
                tracing::warn!(error = %e, "could not look for jobs without an owner");
                return;
            }
        };
        for s in orphans {
            self.adopt_or_strand(s, Cause::Orphan).await;
        }
    }

    /// The jobs whose runs the store stopped, taken up again once it answers.
    async fn take_stranded(&self) {
        let jobs = std::mem::take(&mut *self.stranded.lock());
        for (i, job) in jobs.iter().enumerate() {
            match self.store.get(&job.id).await {
                Ok(Some(s)) if !record::is_terminal(record::job(&s).state()) => {
                    let cause = Cause::StoreFailed { unsent: job.unsent };
                    self.adopt_or_strand(s, cause).await;
                }
                // Ended, or gone (its TTL).
                Ok(_) => {}
                Err(_) => {
                    // Still failing: these wait for the next look.
                    self.stranded.lock().extend(jobs[i..].iter().cloned());
                    return;
                }
            }
        }
    }

    async fn adopt_or_strand(&self, s: pb::StoredJob, cause: Cause) {
        let id = record::job(&s).job_id.clone();
        match self.adopt(s, cause).await {
            Ok(()) => {}
            Err(e) if e.is_transient() => {
                tracing::warn!(job_id = %id, error = %e, "could not take a job up; tried again once the store answers");
                let unsent = cause == Cause::StoreFailed { unsent: true };
                self.stranded.lock().push(super::Stranded { id, unsent });
            }
            Err(e) => tracing::warn!(job_id = %id, error = %e, "could not take over a job"),
        }
    }

    /// Runs an orphan again, queues it, or ends it INTERRUPTED.
    async fn adopt(&self, mut s: pb::StoredJob, cause: Cause) -> Result<(), super::StoreError> {
        let job = record::job(&s).clone();
        if self.table.lock().live.contains_key(&job.job_id) {
            return Ok(());
        }
        let taken_over = job.owner != self.owner;
        let store_failed = matches!(cause, Cause::StoreFailed { .. });
        if s.cancel_requested {
            let end = record::finish(
                &mut s,
                pb::JobState::Cancelled,
                tonic::Code::Cancelled as i32,
                "cancelled while its owner was away",
                self.ttl_ms(),
            );
            return self.store.write(s, vec![end]).await;
        }
        // Our own run that sent nothing: a RUNNING stored is its write
        // before the send, which failed (and was stored late): still queued.
        let phase = match cause {
            Cause::StoreFailed { unsent: true } if !taken_over => record::phase(pb::JobState::Queued),
            _ => record::phase(job.state()),
        };
        let reason = match (recovery(phase, job.repeatable), taken_over) {
            (Recovery::Keep, _) => return Ok(()),
            (Recovery::Interrupt, _) => {
                tracing::info!(job_id = %job.job_id, "interrupted: it was running when its owner (or the store) stopped");
                let end = record::finish(
                    &mut s,
                    pb::JobState::Interrupted,
                    tonic::Code::Unavailable as i32,
                    if store_failed {
                        INTERRUPTED_BY_STORE
                    } else {
                        INTERRUPTED
                    },
                    self.ttl_ms(),
                );
                return self.store.write(s, vec![end]).await;
            }
            (Recovery::Requeue, _) if store_failed => "queued again after the job store failed",
            (Recovery::RunAgain, _) if store_failed => {
                "running again after the job store failed (repeatable)"
            }
            (Recovery::Requeue, false) => "queued again after a restart",
            (Recovery::Requeue, true) => "taken over from a replica that stopped",
            (Recovery::RunAgain, false) => "running again after a restart (repeatable)",
            (Recovery::RunAgain, true) => "running again on another replica (repeatable)",
        };
        tracing::info!(job_id = %job.job_id, reason, "job recovered");
        {
            let j = record::job_mut(&mut s);
            j.set_state(pb::JobState::Queued);
            j.owner = self.owner.clone();
            // Run again from the start: the record's output is the new run's
            // alone (the first run's stays in the events before this one).
            j.output = Default::default();
        }
        let position = self.table.lock().backlog.queued_for(&job.tenant);
        let event = record::next_event(
            &mut s,
            Event::Queued(pb::JobQueued {
                position: position as u32,
                estimate: None,
                reason: reason.into(),
            }),
        );
        self.store.write(s.clone(), vec![event]).await?;
        let tokens = s
            .request
            .as_ref()
            .and_then(|r| self.engine.check(r).ok())
            .map_or(1, |e| e.total());
        self.table.lock().backlog.adopt(&Arc::from(job.tenant.as_str()));
        self.enqueue(s, tokens, false);
        Ok(())
    }

    /// Says whether the store takes writes: health (`dispatch.v1.Jobs`),
    /// a gauge, and the log (by the store) when it changes.
    async fn report_store(&self, was_refusing: &mut Option<bool>) {
        let refusing = self.store.refusing();
        if crate::metrics::enabled() {
            metrics::gauge!("dispatcher_job_store_writable").set(refusing.is_none() as u8 as f64);
        }
        let Some(reporter) = self.health.get() else {
            return;
        };
        if *was_refusing == Some(refusing.is_some()) {
            return;
        }
        *was_refusing = Some(refusing.is_some());
        let status = match refusing {
            None => tonic_health::ServingStatus::Serving,
            Some(_) => tonic_health::ServingStatus::NotServing,
        };
        reporter.set_service_status(HEALTH_SERVICE, status).await;
    }

    async fn record_gauges(&self) {
        if !crate::metrics::enabled() {
            return;
        }
        let (queued, running) = self.counts();
        metrics::gauge!("dispatcher_jobs", "state" => "queued").set(queued as f64);
        metrics::gauge!("dispatcher_jobs", "state" => "running").set(running as f64);
        if let Ok((jobs, bytes)) = self.store.usage().await {
            metrics::gauge!("dispatcher_job_store_jobs").set(jobs as f64);
            metrics::gauge!("dispatcher_job_store_bytes").set(bytes as f64);
        }
        metrics::gauge!("dispatcher_job_store_limit_jobs").set(self.config.max_jobs as f64);
        metrics::gauge!("dispatcher_job_store_limit_bytes").set(self.config.max_store_bytes as f64);
    }

    /// Renews this process's hold on its jobs; false when the store did not answer.
    async fn heartbeat(&self) -> bool {
        // Once stopping, only the jobs at a region are kept: the others were
        // handed over (`Jobs::hand_over`).
        let stopping = self.stopping.load(Ordering::SeqCst);
        let held: Vec<Held> = self
            .table
            .lock()
            .live
            .iter()
            .filter(|(_, l)| !stopping || l.sent.load(Ordering::SeqCst))
            .map(|(id, l)| Held {
                job_id: id.clone(),
                fence: l.fence,
            })
            .collect();
        let beat = match self.store.heartbeat(&self.owner, held).await {
            Ok(b) => b,
            Err(e) => {
                tracing::warn!(error = %e, "job heartbeat failed");
                return false;
            }
        };
        for id in beat.lost {
            tracing::warn!(job_id = %id, "job taken over by another replica; this one stops it");
            let mut t = self.table.lock();
            if let Some(live) = t.live.get(&id) {
                live.lost.store(true, Ordering::SeqCst);
                live.cancel.cancel();
                if live.queued.is_some() {
                    let tenant = live.tenant.clone();
                    t.backlog.remove(&tenant, &id);
                    t.live.remove(&id);
                }
            }
        }
        for id in beat.cancel {
            if let Here::Queued(stored) = self.cancel_here(&id)
                && let Err(e) = self.end_cancelled(*stored).await
            {
                tracing::warn!(job_id = %id, error = %e, "could not store a cancellation");
            }
        }
        true
    }
}
