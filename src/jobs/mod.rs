//! Jobs (DESIGN §11): long agent work submitted, answered with an id at
//! once, and run by the dispatcher whatever the caller's connection does.
//! A job takes `Dispatch`'s path (tenant, limits, fair queue, quota,
//! failover) through `Engine::dispatch_stream_with`, and every step it takes
//! is an event stored before anyone is told of it.
//!
//! Owner: `Jobs::table` (a `Mutex`, never held across an await) holds the
//! jobs this process runs: the backlog (which starts next: weighted fair
//! between tenants, within the running limits) and each live job's
//! cancellation and event counter. The store (`store`) holds the records;
//! a job's run (`run`) is the only writer of its record while it runs.
//! Tasks: the starter (starts jobs as slots free), the keeper (heartbeat,
//! takeovers, expiry).

mod embedded;
mod embedded_open;
mod embedded_schema;
mod embedded_tables;
mod embedded_writer;
mod keeper;
mod memory;
pub mod record;
mod run;
pub mod store;
mod submit;

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use parking_lot::Mutex;
use tokio::sync::{Notify, watch};
use tokio_util::sync::CancellationToken;

pub use embedded::{EmbeddedStore, Opener};
pub use keeper::HEALTH_SERVICE;
pub use memory::MemoryStore;
pub use store::{Beat, Created, Held, JobStore, StoreError, StoreFuture};

use crate::config::JobsConfig;
use crate::core::{JobBacklog, Weights};
use crate::dispatch::{Caller, DispatchError, Engine};
use crate::pb;

/// What a Jobs call can end in besides its answer.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum JobError {
    #[error(transparent)]
    Dispatch(#[from] DispatchError),
    #[error("no job {0} for this tenant")]
    NotFound(String),
    #[error("job_id: expected an id like job-0123456789abcdef")]
    BadId,
    #[error("tenant {tenant} holds {held} unfinished jobs (jobs.max_held_per_tenant)")]
    TenantFull { tenant: String, held: usize },
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("jobs are off ([jobs] enabled = false)")]
    Disabled,
    #[error("the dispatcher is shutting down; submit the job again to another replica or later")]
    ShuttingDown,
    /// The key names a job submitted with another request.
    #[error(
        "idempotency_key {key:?} already names job {job_id}, submitted with a different request; a key names one submission: use a new key for new work"
    )]
    KeyReused { key: String, job_id: String },
    /// The store did not say whether it stored the job.
    #[error(
        "{why}: job {job_id} may have been stored and may run; submit again with idempotency_key {key:?} to get it without running the work twice (GetJob {job_id} may answer NOT_FOUND until the store has caught up)"
    )]
    MaybeStored {
        job_id: String,
        key: String,
        why: String,
    },
}

/// Where a job to cancel is.
enum Here {
    Queued(Box<pb::StoredJob>),
    Running,
    Elsewhere,
}

/// A job this process runs.
struct Live {
    tenant: Arc<str>,
    cancel: CancellationToken,
    /// The last event stored, for local watchers.
    seq: watch::Sender<u64>,
    /// The record while it waits in the backlog (the run takes it).
    queued: Option<pb::StoredJob>,
    tokens: u64,
    fence: u64,
    /// Taken over by another replica: stop without writing.
    lost: Arc<AtomicBool>,
    /// Its run has stored RUNNING (it may be at a region).
    sent: Arc<AtomicBool>,
}

struct Table {
    backlog: JobBacklog<String>,
    live: HashMap<String, Live>,
    /// Smoothed time from a job's start to its end here, for the rough
    /// wait estimate of the queued event.
    mean_run: Option<Duration>,
}

impl Table {
    /// A rough wait for a job with `ahead` jobs queued before it: the jobs
    /// ahead over the slots that run them, times the mean run.
    fn estimate(&self, ahead: usize, slots: usize) -> Option<prost_types::Duration> {
        let mean = self.mean_run?;
        let waves = (ahead + self.backlog.running()) as f64 / slots.max(1) as f64;
        prost_types::Duration::try_from(mean.mul_f64(waves)).ok()
    }

    /// A run of `took` ended.
    fn ran(&mut self, took: Duration) {
        self.mean_run = Some(match self.mean_run {
            None => took,
            Some(m) => m.mul_f64(0.9) + took.mul_f64(0.1),
        });
    }
}

pub struct Jobs {
    engine: Arc<Engine>,
    store: Arc<dyn JobStore>,
    /// This process's name as a job owner (the replica id with `[cluster]`).
    owner: String,
    config: JobsConfig,
    table: Mutex<Table>,
    wake: Notify,
    stopping: AtomicBool,
    /// The jobs `begin_shutdown` left for others, for `hand_over`.
    leaving: Mutex<Vec<Held>>,
    /// Jobs whose run (or adoption) stopped because the store failed (a
    /// full disk, Redis away): the keeper takes them up again once the
    /// store answers, as it does the jobs left unfinished at a restart.
    stranded: Mutex<Vec<Stranded>>,
    /// Where the keeper reports whether the store takes writes.
    health: std::sync::OnceLock<tonic_health::server::HealthReporter>,
}

/// A job whose run (or adoption) stopped because the store failed.
#[derive(Debug, Clone)]
pub(super) struct Stranded {
    pub id: String,
    /// Its run here sent nothing to a region: a RUNNING the store may hold
    /// from it (a write that timed out and was stored late) is not true.
    pub unsent: bool,
}

fn weights(config: &crate::config::Config) -> Arc<Weights> {
    Arc::new(Weights {
        by_tenant: config
            .tenant_specs()
            .into_iter()
            .map(|t| (Arc::from(t.name.as_str()), t.weight))
            .collect(),
        default: 1.0,
    })
}

impl Jobs {
    pub fn new(
        engine: Arc<Engine>,
        store: Arc<dyn JobStore>,
        owner: String,
        config: &crate::config::Config,
    ) -> Arc<Self> {
        Arc::new(Self {
            engine,
            store,
            owner,
            config: config.jobs.clone(),
            table: Mutex::new(Table {
                backlog: JobBacklog::new(config.jobs.limits, weights(config)),
                live: HashMap::new(),
                mean_run: None,
            }),
            wake: Notify::new(),
            stopping: AtomicBool::new(false),
            leaving: Mutex::new(Vec::new()),
            stranded: Mutex::new(Vec::new()),
            health: std::sync::OnceLock::new(),
        })
    }

    /// Starts the starter and the keeper (which first takes the jobs left
    /// unfinished: at start, or a dead replica's), until `cancel` fires.
    pub fn spawn(self: &Arc<Self>, cancel: CancellationToken) {
        tokio::spawn(self.clone().starter(cancel.clone()));
        tokio::spawn(self.clone().keeper(cancel));
    }

    /// Reports the Jobs service's health on `reporter` from now on:
    /// NOT_SERVING while the store refuses writes (new jobs are refused
    /// then; reads may still work), SERVING otherwise.
    pub fn report_health(&self, reporter: tonic_health::server::HealthReporter) {
        let _ = self.health.set(reporter);
    }

    /// New tenant weights after a reload.
    pub fn apply(&self, config: &crate::config::Config) {
        self.table
            .lock()
            .backlog
            .set_limits(self.config.limits, weights(config));
    }

    /// No job starts from now on; queued ones stay stored for the next
    /// start, and so do started ones not yet sent to a region (waiting for
    /// quota): they stop here without a word. Jobs at a region run on
    /// (the engine's drain waits for them, within the shutdown grace).
    pub fn begin_shutdown(&self) {
        self.stopping.store(true, Ordering::SeqCst);
        let t = self.table.lock();
        let mut leaving = Vec::new();
        for (id, live) in &t.live {
            if live.sent.load(Ordering::SeqCst) {
                continue;
            }
            if live.queued.is_none() {
                live.cancel.cancel();
            }
            leaving.push(Held {
                job_id: id.clone(),
                fence: live.fence,
            });
        }
        drop(t);
        *self.leaving.lock() = leaving;
        self.wake.notify_one();
    }

    /// After `begin_shutdown`: ends this process's leases on the jobs it
    /// will not run (queued, or started and not sent), so that with Redis
    /// another replica takes them at once rather than after `jobs.lease`.
    /// Bounded: a store that does not answer leaves them to the lease.
    pub async fn hand_over(&self) {
        let held = std::mem::take(&mut *self.leaving.lock());
        if held.is_empty() {
            return;
        }
        let n = held.len();
        match tokio::time::timeout(Duration::from_secs(2), self.store.release(&self.owner, held)).await {
            Ok(Ok(())) => tracing::info!(jobs = n, "handed queued jobs over to the other replicas"),
            Ok(Err(e)) => {
                tracing::warn!(error = %e, "could not hand queued jobs over; they are taken over after jobs.lease")
            }
            Err(_) => {
                tracing::warn!("handing queued jobs over timed out; they are taken over after jobs.lease")
            }
        }
    }

    /// Jobs queued and running here.
    pub fn counts(&self) -> (usize, usize) {
        let t = self.table.lock();
        (t.backlog.queued(), t.backlog.running())
    }

    /// Puts an admitted (or adopted) job in the backlog and wakes the starter.
    fn enqueue(&self, stored: pb::StoredJob, tokens: u64, front: bool) {
        let job = record::job(&stored);
        let id = job.job_id.clone();
        let tenant: Arc<str> = Arc::from(job.tenant.as_str());
        let seq = job.last_seq;
        let fence = stored.fence;
        {
            let mut t = self.table.lock();
            let live = t.live.entry(id.clone()).or_insert_with(|| Live {
                tenant: tenant.clone(),
                cancel: CancellationToken::new(),
                seq: watch::channel(seq).0,
                queued: None,
                tokens,
                fence,
                lost: Arc::new(AtomicBool::new(false)),
                sent: Arc::new(AtomicBool::new(false)),
            });
            live.queued = Some(stored);
            live.fence = fence;
            live.seq.send_replace(seq);
            match front {
                true => t.backlog.push_front(&tenant, id, tokens),
                false => t.backlog.push(&tenant, id, tokens),
            }
        }
        self.wake.notify_one();
    }

    /// Starts jobs while the backlog lets one start.
    async fn starter(self: Arc<Self>, cancel: CancellationToken) {
        loop {
            let wake = self.wake.notified();
            while !self.stopping.load(Ordering::SeqCst) {
                let start = {
                    let mut t = self.table.lock();
                    let Some((tenant, id)) = t.backlog.start_next() else {
                        break;
                    };
                    match t.live.get_mut(&id).and_then(|l| l.queued.take().map(|s| (s, l))) {
                        Some((stored, live)) => Some((
                            stored,
                            run::Signals {
                                cancel: live.cancel.clone(),
                                lost: live.lost.clone(),
                                sent: live.sent.clone(),
                                seq: live.seq.clone(),
                            },
                            live.tokens,
                        )),
                        None => {
                            // Cancelled meanwhile: its slot goes back.
                            t.backlog.stopped(&tenant, false);
                            None
                        }
                    }
                };
                if let Some((stored, signals, tokens)) = start {
                    tokio::spawn(self.clone().run(stored, signals, tokens));
                }
            }
            tokio::select! {
                _ = cancel.cancelled() => return,
                _ = wake => {}
            }
        }
    }

    /// A job the caller's tenant may see.
    async fn visible(&self, job_id: &str, caller: &Caller) -> Result<(Arc<str>, pb::StoredJob), JobError> {
        if !record::valid_id(job_id) {
            return Err(JobError::BadId);
        }
        let tenant = self.engine.authenticate(caller)?;
        match self.store.get(job_id).await? {
            Some(s) if record::job(&s).tenant == *tenant => Ok((tenant, s)),
            // Another tenant's job is as good as absent.
            _ => Err(JobError::NotFound(job_id.to_string())),
        }
    }

    pub async fn get(&self, job_id: &str, caller: &Caller) -> Result<pb::Job, JobError> {
        let (_, stored) = self.visible(job_id, caller).await?;
        Ok(record::job(&stored).clone())
    }

    pub async fn list(&self, r: pb::ListJobsRequest, caller: &Caller) -> Result<Vec<pb::Job>, JobError> {
        let tenant = self.engine.authenticate(caller)?;
        let state = match pb::JobState::try_from(r.state) {
            Ok(pb::JobState::Unspecified) => None,
            Ok(s) => Some(s),
            Err(_) => {
                return Err(DispatchError::InvalidArgument(vec![crate::dispatch::Violation::new(
                    "state",
                    format!(
                        "{} is not a JobState (0 or unset: every state; 1 to 6: QUEUED, RUNNING, DONE, FAILED, CANCELLED, INTERRUPTED)",
                        r.state
                    ),
                )])
                .into());
            }
        };
        let limit = match r.limit {
            0 => 100,
            n => n.min(1000) as usize,
        };
        Ok(self.store.list(&tenant, state, limit).await?)
    }

    /// Cancels a job: a queued one here at once, a running one here through
    /// its run, another replica's through the store. Answers the job as it
    /// ended (or stands, if its owner has not acted within a few seconds).
    pub async fn cancel(&self, job_id: &str, caller: &Caller) -> Result<pb::Job, JobError> {
        let (_, stored) = self.visible(job_id, caller).await?;
        if record::is_terminal(record::job(&stored).state()) {
            return Ok(record::job(&stored).clone());
        }
        match self.cancel_here(job_id) {
            Here::Queued(stored) => return self.end_cancelled(*stored).await,
            Here::Running => {}
            Here::Elsewhere => self.store.request_cancel(job_id).await?,
        }
        // Its owner ends it: wait for that, a bounded time.
        let wait = Duration::from_secs(5).max(self.config.lease * 2);
        let deadline = crate::clock::tokio_now() + wait;
        loop {
            let s = self.store.get(job_id).await?;
            let Some(s) = s else {
                return Err(JobError::NotFound(job_id.to_string()));
            };
            if record::is_terminal(record::job(&s).state()) || crate::clock::tokio_now() >= deadline {
                return Ok(record::job(&s).clone());
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// The job's events from `from_seq` on, then each new one, until its
    /// last: sent into `tx` (the watcher left when it is closed).
    pub async fn watch(
        &self,
        r: pb::WatchJobRequest,
        caller: &Caller,
        tx: tokio::sync::mpsc::Sender<Result<pb::JobEvent, JobError>>,
    ) -> Result<(), JobError> {
        let (_, _) = self.visible(&r.job_id, caller).await?;
        let mut next = r.from_seq.max(1);
        let mut empty_looks = 0u32;
        loop {
            // Subscribe before reading, so an event stored in between wakes us.
            let mut local = self.table.lock().live.get(&r.job_id).map(|l| l.seq.subscribe());
            let events = self.store.events(&r.job_id, next, 256).await?;
            let got = events.len();
            for e in events {
                next = e.seq + 1;
                let end = record::is_end(&e);
                if tx.send(Ok(e)).await.is_err() || end {
                    return Ok(());
                }
            }
            if got > 0 {
                empty_looks = 0;
                continue;
            }
            // Now and then (at once, then about once a second): a job that
            // ended before `next` (a watch resumed past its end) has nothing
            // more to send, and one removed meanwhile (its TTL) is gone.
            if empty_looks.is_multiple_of(10) {
                match self.store.get(&r.job_id).await? {
                    None => return Err(JobError::NotFound(r.job_id.clone())),
                    Some(s)
                        if record::is_terminal(record::job(&s).state())
                            && next > record::job(&s).last_seq =>
                    {
                        return Ok(());
                    }
                    Some(_) => {}
                }
            }
            empty_looks += 1;
            // Nothing new: wait for the run here to store more, or (another
            // replica's job, or one not started) look again shortly.
            let poll = tokio::time::sleep(Duration::from_millis(100));
            match local.as_mut() {
                Some(rx) => {
                    tokio::select! {
                        _ = rx.wait_for(|seq| *seq >= next) => {}
                        _ = poll => {}
                        _ = tx.closed() => return Ok(()),
                    }
                }
                None => {
                    tokio::select! {
                        _ = poll => {}
                        _ = tx.closed() => return Ok(()),
                    }
                }
            }
        }
    }

    /// Cancels a job this process holds: out of the backlog if queued, or
    /// through its run's cancellation.
    fn cancel_here(&self, job_id: &str) -> Here {
        let mut t = self.table.lock();
        let table = &mut *t;
        match table.live.get_mut(job_id) {
            Some(live) if live.queued.is_some() => {
                let tenant = live.tenant.clone();
                let queued = live.queued.take();
                if !table.backlog.remove(&tenant, &job_id.to_string()) {
                    // Between two tries: out of the backlog, still held.
                    table.backlog.release(&tenant);
                }
                table.live.remove(job_id);
                queued.map_or(Here::Elsewhere, |q| Here::Queued(Box::new(q)))
            }
            Some(live) => {
                live.cancel.cancel();
                Here::Running
            }
            None => Here::Elsewhere,
        }
    }

    /// Stores a queued job's cancellation.
    async fn end_cancelled(&self, mut stored: pb::StoredJob) -> Result<pb::Job, JobError> {
        let end = record::finish(
            &mut stored,
            pb::JobState::Cancelled,
            tonic::Code::Cancelled as i32,
            "cancelled before it started",
            self.ttl_ms(),
        );
        self.store.write(stored.clone(), vec![end]).await?;
        if let Some(live) = self.table.lock().live.get(record::job(&stored).job_id.as_str()) {
            live.seq.send_replace(record::job(&stored).last_seq);
        }
        Ok(record::job(&stored).clone())
    }

    fn ttl_ms(&self) -> u64 {
        self.config.ttl.as_millis() as u64
    }
}
