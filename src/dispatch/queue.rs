//! Waiting for quota at the quota desk: a request that cannot be reserved
//! now is queued in the core's scheduler with a oneshot ticket; the pump
//! task (the desk's, one per engine) hands out reservations whenever quota
//! may have come back (a settlement, a refill time, a config change) and
//! drops waiters whose caller has gone.

use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use tokio::sync::oneshot;
use tokio_util::sync::CancellationToken;

use super::DispatchError;
use super::desk::{Grant, QuotaDesk, Ticket};
use super::lease::RegionHold;
use crate::core::scheduler::SWEEP_INTERVAL;
use crate::core::{Released, RouteRequest, Submission, SubmitError, Submitted};

impl QuotaDesk {
    /// A reservation for `s`, now or after waiting for quota until
    /// `s.wait_until`. Returns it with the time spent waiting.
    pub(super) async fn acquire(
        self: &Arc<Self>,
        s: Submission,
    ) -> Result<(RegionHold, Duration), DispatchError> {
        let start = crate::clock::now();
        let wait_until = s.wait_until;
        let s_model = s.model.clone();
        let (tokens, origin, tried) = (s.tokens, s.origin.clone(), s.tried.clone());
        let mut receiver = None;
        let submitted = self.lock().scheduler.submit(s, start, || {
            let (tx, rx) = oneshot::channel();
            receiver = Some(rx);
            tx
        });
        let model = s_model;
        let mut rx = match submitted {
            Ok(Submitted::Reserved(r)) => {
                super::observe::queue_wait(&model, Duration::ZERO);
                return Ok((RegionHold::new(self.clone(), r), Duration::ZERO));
            }
            Ok(Submitted::Queued { .. }) => {
                self.wake();
                receiver.expect("a queued request has a ticket")
            }
            Err(SubmitError::Route(e)) => return Err(e.into()),
            Err(
                e @ (SubmitError::WouldExpire {
                    projected: retry_after,
                    ..
                }
                | SubmitError::Shedding { retry_after, .. }),
            ) => {
                return Err(DispatchError::WouldWaitInVain {
                    message: e.to_string(),
                    retry_after,
                });
            }
            Err(SubmitError::TenantQueueFull {
                tenant,
                queued,
                retry_after,
            }) => {
                return Err(DispatchError::TenantLimit {
                    message: format!("max_queued limit reached ({queued} of its requests wait for quota)"),
                    tenant,
                    limit: "max_queued",
                    retry_after: Some(retry_after.unwrap_or(Duration::from_millis(100))),
                });
            }
            Err(SubmitError::QueueFull { queued, retry_after }) => {
                return Err(DispatchError::QueueFull {
                    queued,
                    retry_after: retry_after.unwrap_or(Duration::from_millis(100)),
                });
            }
        };
        let grant = tokio::select! {
            g = &mut rx => g.ok(),
            _ = tokio::time::sleep_until(wait_until.into()) => {
                // The pump may have granted it at the last moment.
                rx.close();
                rx.try_recv().ok()
            }
        };
        match grant {
            Some(Grant::Reserved(held)) => {
                super::observe::queue_wait(&model, crate::clock::since(start));
                Ok((held, crate::clock::since(start)))
            }
            Some(Grant::Failed(e)) => Err(e.into()),
            Some(Grant::Expired(Some(retry))) => Err(self.queue_timeout(start, Some(retry))),
            Some(Grant::Expired(None)) | None => {
                // When it would fit, for the caller's retry.
                let req = RouteRequest {
                    model: &model,
                    tokens,
                    origin: origin.as_deref(),
                };
                let now = crate::clock::now();
                let retry = self
                    .lock()
                    .scheduler
                    .router()
                    .earliest_fit(&req, &tried, now)
                    .map(|(_, wait)| wait)
                    .filter(|wait| !wait.is_zero());
                Err(self.queue_timeout(start, retry))
            }
        }
    }

    fn queue_timeout(&self, start: Instant, retry_after: Option<Duration>) -> DispatchError {
        DispatchError::QueueTimeout {
            waited: crate::clock::since(start),
            retry_after,
        }
    }

    /// Runs the pump until `cancel` fires or the desk is dropped; every
    /// `IDLE_SWEEP` it also calls `sweep_idle` (rate limiters' idle state).
    pub fn spawn_pump(
        self: &Arc<Self>,
        cancel: CancellationToken,
        sweep_idle: impl Fn() + Send + 'static,
    ) -> tokio::task::JoinHandle<()> {
        let desk = Arc::downgrade(self);
        tokio::spawn(pump(desk, cancel, sweep_idle))
    }
}

/// How often idle tenants' rate-limiter state is reclaimed.
const IDLE_SWEEP: Duration = Duration::from_secs(10);

async fn pump(desk: Weak<QuotaDesk>, cancel: CancellationToken, sweep_idle: impl Fn()) {
    let mut next_idle_sweep = crate::clock::now() + IDLE_SWEEP;
    loop {
        let Some(d) = desk.upgrade() else { return };
        let now = crate::clock::now();
        let (released, wake, queued) = {
            let mut desk = d.lock();
            let sched = &mut desk.scheduler;
            let released = sched.release(now, |t: &Ticket| t.is_closed());
            (released, sched.next_wake(), sched.queued())
        };
        // Reservations are wrapped (and possibly dropped, which settles them)
        // only after the lock is released.
        for r in released {
            match r {
                Released::Granted(w, reservation) => {
                    let held = RegionHold::new(d.clone(), reservation);
                    // A caller gone at this very moment drops the grant,
                    // which refunds it.
                    let _ = w.ticket.send(Grant::Reserved(held));
                }
                Released::Expired(w, retry) => {
                    let _ = w.ticket.send(Grant::Expired(retry));
                }
                Released::Failed(w, err) => {
                    let _ = w.ticket.send(Grant::Failed(err));
                }
                Released::Gone(_) => {}
            }
        }
        if now >= next_idle_sweep {
            sweep_idle();
            next_idle_sweep = now + IDLE_SWEEP;
        }
        let notified = d.pump_wake.clone();
        drop(d);
        let sleep_until = match (wake, queued) {
            (Some(w), _) => w.min(now + SWEEP_INTERVAL),
            (None, 0) => next_idle_sweep,
            (None, _) => now + SWEEP_INTERVAL,
        };
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = notified.notified() => {}
            _ = tokio::time::sleep_until(sleep_until.into()) => {}
        }
    }
}
