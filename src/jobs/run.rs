//! One run of a job: through the engine's streamed path, with every step
//! stored as an event before the next. The run is the only writer of its
//! job's record while it runs; `RUNNING` is stored before the work is sent
//! (so a restart knows it may have run), and a write refused because the
//! job was taken over stops the run without another word.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use tokio::sync::{Mutex, watch};
use tokio_stream::StreamExt;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use super::record;
use super::store::{JobStore, StoreError};
use super::{JobError, Jobs};
use crate::dispatch::{Caller, DispatchError, JobRun, SendNotice};
use crate::pb;
use pb::job_event::Event;

/// How the rest of the process reaches a running job.
pub(super) struct Signals {
    pub cancel: CancellationToken,
    pub lost: Arc<AtomicBool>,
    /// Set once RUNNING is stored (before the work is sent).
    pub sent: Arc<AtomicBool>,
    pub seq: watch::Sender<u64>,
}

/// The record and its writes, shared by the run and its send hook.
struct Writer {
    stored: pb::StoredJob,
    store: Arc<dyn JobStore>,
    seq: watch::Sender<u64>,
    /// Sent to a region in this run.
    sent: bool,
    /// Why the write before a send failed (nothing was sent then).
    refused: Option<StoreError>,
}

/// The longest wait between two tries of a write refused for a full disk.
const FULL_DISK_PAUSE: Duration = Duration::from_secs(1);

impl Writer {
    /// Stores the record with `events`, then tells local watchers.
    async fn write(&mut self, events: Vec<Event>) -> Result<(), StoreError> {
        let events: Vec<pb::JobEvent> = events
            .into_iter()
            .map(|e| record::next_event(&mut self.stored, e))
            .collect();
        self.persist(events).await
    }

    /// Stores the record with `events`. A full disk (nothing written) is
    /// waited out: the run pauses, its region's stream waiting, until the
    /// store has room again, rather than losing the work it did.
    async fn persist(&mut self, events: Vec<pb::JobEvent>) -> Result<(), StoreError> {
        let mut pause = Duration::from_millis(50);
        loop {
            match self.store.write(self.stored.clone(), events.clone()).await {
                Err(StoreError::DiskFull(why)) => {
                    if pause == Duration::from_millis(50) {
                        tracing::warn!(job_id = %record::job(&self.stored).job_id, %why, "a job's run waits for room on the job store's disk");
                    }
                    tokio::time::sleep(pause).await;
                    pause = (pause * 2).min(FULL_DISK_PAUSE);
                }
                Err(e) => return Err(e),
                Ok(()) => break,
            }
        }
        self.seq.send_replace(record::job(&self.stored).last_seq);
        Ok(())
    }

    async fn finish(
        &mut self,
        state: pb::JobState,
        code: tonic::Code,
        message: &str,
        ttl_ms: u64,
    ) -> Result<(), StoreError> {
        let end = record::finish(&mut self.stored, state, code as i32, message, ttl_ms);
        self.persist(vec![end]).await
    }
}

/// How a run ended, for the backlog.
enum Ended {
    /// Finished (any terminal state): its hold is released.
    Finished,
    /// Refused before anything was sent: queued again after `after`.
    Again(Duration),
    /// Stopped without finishing (taken over, shutting down, store down):
    /// the record stays as stored, for whoever runs it next.
    Left,
}

/// Refusals that say "not now" before anything was sent.
fn not_now(e: &DispatchError) -> Option<Duration> {
    match e {
        DispatchError::QueueTimeout { .. }
        | DispatchError::WouldWaitInVain { .. }
        | DispatchError::QueueFull { .. }
        | DispatchError::ProvidersRefused { .. }
        | DispatchError::Route(
            crate::core::RouteError::NoCapacity { .. } | crate::core::RouteError::Shed { .. },
        )
        | DispatchError::TenantLimit { .. } => Some(
            e.retry_after()
                .unwrap_or(Duration::from_secs(1))
                .clamp(Duration::from_millis(100), Duration::from_secs(10)),
        ),
        _ => None,
    }
}

impl Jobs {
    pub(super) async fn run(self: Arc<Self>, stored: pb::StoredJob, signals: Signals, tokens: u64) {
        let id = record::job(&stored).job_id.clone();
        let tenant: Arc<str> = Arc::from(record::job(&stored).tenant.as_str());
        let began = crate::clock::now();
        // Counted as running work until its end is stored: a graceful
        // shutdown waits for that, not only for the region's answer.
        let running = self.engine.enter();
        // One trace per run, like a request's, with the job's id: the
        // engine's spans (queue, forward, settle) are its children.
        let span = crate::dispatch::work_span!("job", "internal", job_id = %id);
        span.record("tenant", &*tenant);
        let ended = self.run_once(stored, &signals).instrument(span).await;
        drop(running);
        // The record stays as last stored: the keeper takes the job up again
        // once the store answers (or, with Redis, another replica may).
        let stranded = matches!(&ended, Err(JobError::Store(e)) if e.is_transient())
            && !signals.lost.load(Ordering::SeqCst);
        if let Err(e) = &ended {
            tracing::warn!(job_id = %id, error = %e, "a job's run stopped: its state could not be stored; it is taken up again once the store answers");
        }
        let again = {
            let mut t = self.table.lock();
            if let Ok(Ended::Finished) = ended {
                t.ran(crate::clock::since(began));
            }
            match ended {
                Ok(Ended::Again(after)) => {
                    t.backlog.stopped(&tenant, false);
                    Some(after)
                }
                Ok(Ended::Finished) | Err(_) | Ok(Ended::Left) => {
                    t.backlog.stopped(&tenant, true);
                    t.live.remove(&id);
                    None
                }
            }
        };
        if stranded {
            let unsent = !signals.sent.load(Ordering::SeqCst);
            self.stranded.lock().push(super::Stranded {
                id: id.clone(),
                unsent,
            });
        }
        self.wake.notify_one();
        if let Some(after) = again {
            tokio::select! {
                _ = tokio::time::sleep(after) => {}
                _ = signals.cancel.cancelled() => {}
            }
            // Back at the head of its tenant's line, unless it was cancelled.
            let stored = match self.store.get(&id).await {
                Ok(s) => s,
                Err(e) => {
                    tracing::warn!(job_id = %id, error = %e, "a job to queue again could not be read; it is taken up again once the store answers");
                    let mut t = self.table.lock();
                    t.backlog.release(&tenant);
                    t.live.remove(&id);
                    drop(t);
                    self.stranded.lock().push(super::Stranded { id, unsent: true });
                    return;
                }
            };
            match stored {
                Some(s) if !signals.cancel.is_cancelled() => self.enqueue(s, tokens, true),
                Some(mut s) if !signals.lost.load(Ordering::SeqCst) => {
                    let end = record::finish(
                        &mut s,
                        pb::JobState::Cancelled,
                        tonic::Code::Cancelled as i32,
                        "cancelled before it started",
                        self.ttl_ms(),
                    );
                    if let Err(e) = self.store.write(s, vec![end]).await {
                        tracing::warn!(job_id = %id, error = %e, "could not store a cancellation");
                    }
                    let mut t = self.table.lock();
                    t.backlog.release(&tenant);
                    t.live.remove(&id);
                }
                // Taken over meanwhile, or gone: no longer this process's.
                _ => {
                    let mut t = self.table.lock();
                    t.backlog.release(&tenant);
                    t.live.remove(&id);
                }
            }
        }
    }

    async fn run_once(&self, stored: pb::StoredJob, signals: &Signals) -> Result<Ended, JobError> {
        let ttl = self.ttl_ms();
        let request = stored.request.clone().unwrap_or_default();
        let repeatable = record::job(&stored).repeatable;
        let tenant: Arc<str> = Arc::from(record::job(&stored).tenant.as_str());
        let writer = Arc::new(Mutex::new(Writer {
            stored,
            store: self.store.clone(),
            seq: signals.seq.clone(),
            sent: false,
            refused: None,
        }));
        let hook = writer.clone();
        let lost = signals.lost.clone();
        let sent = signals.sent.clone();
        let on_send = Arc::new(move |n: SendNotice| {
            let hook = hook.clone();
            let lost = lost.clone();
            let sent = sent.clone();
            Box::pin(async move {
                let mut w = hook.lock().await;
                {
                    let job = record::job_mut(&mut w.stored);
                    job.set_state(pb::JobState::Running);
                    job.region = n.region.to_string();
                    job.attempts = n.attempt;
                    job.served_by = n.model.clone();
                    if n.attempt == 1 {
                        job.runs += 1;
                    }
                }
                let routed = Event::Routed(pb::JobRouted {
                    region: n.region.to_string(),
                    attempt: n.attempt,
                    model: n.model,
                });
                // Stored before it is sent: a restart then knows it may have run.
                if let Err(e) = w.write(vec![routed]).await {
                    if matches!(e, StoreError::Fenced { .. }) {
                        lost.store(true, Ordering::SeqCst);
                    }
                    let why = e.to_string();
                    w.refused = Some(e);
                    return Err(why);
                }
                w.sent = true;
                sent.store(true, Ordering::SeqCst);
                Ok(())
            }) as std::pin::Pin<Box<dyn std::future::Future<Output = Result<(), String>> + Send>>
        });
        let caller = Caller {
            submitted_as: Some(tenant),
            ..Caller::default()
        };
        let job = JobRun {
            on_send,
            may_run_twice: repeatable,
        };
        let started = tokio::select! {
            s = self.engine.dispatch_stream_with(request, Some(self.config.timeout), caller, Some(job)) => Some(s),
            _ = signals.cancel.cancelled() => None,
        };
        let mut w = writer.lock().await;
        if signals.lost.load(Ordering::SeqCst) {
            return Ok(Ended::Left);
        }
        let mut stream = match started {
            // Shutting down before it was sent: it stays QUEUED for the next start.
            None if !w.sent && self.stopping.load(Ordering::SeqCst) => return Ok(Ended::Left),
            None => {
                let why = match w.sent {
                    true => "cancelled while it ran",
                    false => "cancelled before it started",
                };
                w.finish(pb::JobState::Cancelled, tonic::Code::Cancelled, why, ttl)
                    .await?;
                return Ok(Ended::Finished);
            }
            Some(Err(DispatchError::ShuttingDown)) if !w.sent => return Ok(Ended::Left),
            // The write before the send failed: nothing was sent, and the
            // job is not failed for the store's moment. A store that did not
            // answer strands the run (taken up again once it answers).
            Some(Err(_)) if !w.sent && w.refused.as_ref().is_some_and(StoreError::is_transient) => {
                return Err(w.refused.take().expect("checked").into());
            }
            Some(Err(e)) => {
                if !w.sent
                    && let Some(after) = not_now(&e)
                {
                    return Ok(Ended::Again(after));
                }
                w.finish(pb::JobState::Failed, e.code(), &e.to_string(), ttl)
                    .await?;
                return Ok(Ended::Finished);
            }
            Some(Ok(stream)) => stream,
        };
        let max_output = self.config.max_output_bytes as usize;
        let mut first = true;
        loop {
            let next = tokio::select! {
                c = stream.next() => c,
                _ = signals.cancel.cancelled() => {
                    // Dropping the stream cancels the region's call; only
                    // what it produced is charged.
                    drop(stream);
                    if signals.lost.load(Ordering::SeqCst) {
                        return Ok(Ended::Left);
                    }
                    w.finish(pb::JobState::Cancelled, tonic::Code::Cancelled, "cancelled while it ran", ttl).await?;
                    return Ok(Ended::Finished);
                }
            };
            match next {
                Some(Ok(chunk)) => {
                    let mut events = Vec::new();
                    if first {
                        first = false;
                        events.push(Event::Running(pb::JobRunning {
                            region: chunk.region.clone(),
                        }));
                    }
                    // An OpenAI-compatible region's chunks are its events
                    // (JSON each): the output keeps them one per line.
                    let separator: &[u8] = match is_provider_event(&chunk, &self.engine) {
                        true => b"\n",
                        false => b"",
                    };
                    let job = record::job_mut(&mut w.stored);
                    let added = chunk.output.len() + separator.len();
                    if job.output.len() + added > max_output {
                        drop(stream);
                        let why = format!("the output is over jobs.max_output_bytes ({max_output} bytes)");
                        w.finish(pb::JobState::Failed, tonic::Code::ResourceExhausted, &why, ttl)
                            .await?;
                        return Ok(Ended::Finished);
                    }
                    let mut output = Vec::with_capacity(job.output.len() + added);
                    output.extend_from_slice(&job.output);
                    output.extend_from_slice(&chunk.output);
                    output.extend_from_slice(separator);
                    job.output = output.into();
                    job.usage = Some(chunk.usage);
                    job.region = chunk.region.clone();
                    job.attempts = chunk.attempts;
                    job.served_by = chunk.path.model.clone();
                    if let Some(cost) = &chunk.cost {
                        job.cost = Some(cost.to_pb());
                    }
                    job.queue_wait = prost_types::Duration::try_from(chunk.queue_wait).ok();
                    if !chunk.output.is_empty() || chunk.done {
                        events.push(Event::Output(pb::JobOutput {
                            output: chunk.output.clone(),
                            usage: Some(chunk.usage),
                        }));
                    }
                    if chunk.done {
                        w.write(events).await?;
                        w.finish(pb::JobState::Done, tonic::Code::Ok, "", ttl).await?;
                        return Ok(Ended::Finished);
                    }
                    w.write(events).await?;
                }
                Some(Err(e)) => {
                    w.finish(pb::JobState::Failed, e.code(), &e.to_string(), ttl)
                        .await?;
                    return Ok(Ended::Finished);
                }
                None => {
                    w.finish(
                        pb::JobState::Failed,
                        tonic::Code::Unavailable,
                        "the output is incomplete: the stream ended without its last chunk",
                        ttl,
                    )
                    .await?;
                    return Ok(Ended::Finished);
                }
            }
        }
    }
}

/// Whether `chunk` is one event of an OpenAI-compatible region's stream
/// (a JSON object, kept on a line of its own in the job's output).
fn is_provider_event(chunk: &crate::dispatch::StreamChunk, engine: &crate::dispatch::Engine) -> bool {
    !chunk.output.is_empty() && engine.region_kind(&chunk.region) == Some(crate::forward::RegionKind::OpenAi)
}
