//! The forwarder: one request's way to a region. It gets a reservation from
//! the quota desk (now or after waiting), calls the cluster over the
//! region's connection, and on a failure that left the work undone tries
//! the next region, within the attempts, the retry budget and the caller's
//! deadline.
//!
//! Owner: `Forwarder::retry_budget` (a `Mutex`, held for one deposit or
//! withdrawal) and the connections (`ClusterPool`, its own lock, read per
//! attempt).

use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use tonic::{Code, Status};
use tracing::Instrument;

use super::DispatchError;
use super::desk::QuotaDesk;
use super::lease::Lease;
use super::prepare::{Forwarded, Prepared};
use crate::config::Config;
use crate::core::{Completion, Outcome, RetryBudget, Settlement, Submission};
use crate::forward::{Call, ClusterPool, Connector, FailureKind, RegionClient, classify};

/// Each region's configuration in `config`, by name.
fn region_config<'a>(config: &'a Config) -> impl Fn(&str) -> Option<&'a crate::config::RegionConfig> {
    move |region| config.region(region)
}

pub struct Forwarder {
    pub(super) pool: ClusterPool,
    retry_budget: Mutex<RetryBudget>,
}

impl Forwarder {
    pub fn new(
        config: &Config,
        endpoints: &[(String, String)],
        connector: Arc<dyn Connector>,
        now: Instant,
    ) -> Result<Self, String> {
        let pool = ClusterPool::with_connector(connector);
        pool.set(endpoints, region_config(config))?;
        let b = config.routing.retry_budget;
        Ok(Self {
            pool,
            retry_budget: Mutex::new(RetryBudget::new(b.ratio, b.min_per_second, b.window, now)),
        })
    }

    /// New endpoints and retry limits (after a reload). Fails without
    /// changing anything when an endpoint cannot be used.
    pub fn apply(&self, config: &Config, endpoints: &[(String, String)]) -> Result<(), String> {
        self.pool.set(endpoints, region_config(config))?;
        let b = config.routing.retry_budget;
        self.retry_budget.lock().set_limits(b.ratio, b.min_per_second);
        Ok(())
    }

    pub fn endpoint(&self, region: &str) -> Option<String> {
        self.pool.endpoint(region)
    }

    /// How to check the region's health, over its forwarding client.
    pub fn probe(&self, region: &str) -> Option<crate::forward::Probe> {
        self.pool.probe(region)
    }

    /// The region's kind, if it is configured.
    pub fn kind(&self, region: &str) -> Option<crate::forward::RegionKind> {
        self.pool.kind(region)
    }

    /// An OpenAI-compatible region's client, if `region` is one.
    pub fn openai(&self, region: &str) -> Option<crate::forward::OpenAiClient> {
        self.pool.openai(region)
    }

    /// Reserves, calls the cluster with `call`, fails over on retryable
    /// errors. On success the reservation comes back held, for the caller to
    /// settle with what the cluster reports.
    pub(super) async fn forward<T, F, Fut>(
        &self,
        desk: &Arc<QuotaDesk>,
        p: &Prepared,
        lease: &mut Lease,
        mut call: F,
    ) -> Result<Forwarded<T>, DispatchError>
    where
        F: FnMut(RegionClient, Call) -> Fut,
        Fut: Future<Output = Result<tonic::Response<T>, Status>>,
    {
        let settings = &p.config.settings;
        // The configuration's own name: shared, and the same key every time
        // for the metric handles.
        let model: Arc<str> = p
            .config
            .model_name(&p.exec.model)
            .unwrap_or_else(|| Arc::from(p.exec.model.as_str()));
        // Encoded once: every attempt sends the same request.
        let wire = crate::forward::encode(&p.exec);
        let mut tried: Vec<Arc<str>> = Vec::new();
        let mut failures = Failures::default();
        let mut queue_wait = Duration::ZERO;
        for attempt in 1..=settings.max_attempts {
            let now = crate::clock::now();
            if now >= p.deadline {
                return Err(DispatchError::DeadlineExceeded(format!(
                    "after {} attempts and {:?}",
                    attempt - 1,
                    now - p.start
                )));
            }
            // Retries are paid for by first attempts, so an outage cannot
            // multiply the load on the regions that are left.
            let budget_ok = {
                let mut budget = self.retry_budget.lock();
                if attempt == 1 {
                    budget.deposit(now);
                    true
                } else {
                    budget.try_withdraw(now)
                }
            };
            if !budget_ok {
                return Err(failures.exhausted(
                    attempt - 1,
                    "no retry: the retry budget is spent (routing.retry_budget)",
                    None,
                ));
            }
            let submission = Submission {
                model: model.clone(),
                tokens: p.estimate.total(),
                origin: p.origin.clone(),
                tenant: p.tenant.clone(),
                tried: tried.clone(),
                // One budget per request: a retry after a refusal waits
                // only what is left of it, not `max_queue_wait` anew.
                wait_until: p
                    .deadline
                    .min(now + settings.max_queue_wait.saturating_sub(queue_wait)),
                tenant_max_queued: p.tenant_max_queued,
            };
            let queue_span =
                tracing::debug_span!("queue", model = %model, tokens = p.estimate.total(), attempt);
            let (mut held, waited) = match desk.acquire(submission).instrument(queue_span).await {
                Ok(x) => x,
                Err(e) => {
                    // No region for it: the caller's deadline if that is what
                    // ended the wait, else (after a failed attempt) the end of
                    // its attempts. A tenant limit or shutdown is said as is.
                    let no_region = matches!(
                        e,
                        DispatchError::Route(_)
                            | DispatchError::QueueTimeout { .. }
                            | DispatchError::WouldWaitInVain { .. }
                            | DispatchError::QueueFull { .. }
                    );
                    return Err(if no_region && crate::clock::now() >= p.deadline {
                        DispatchError::DeadlineExceeded(format!(
                            "after {} attempts and {:.1?}, waiting for quota",
                            attempt - 1,
                            crate::clock::since(p.start)
                        ))
                    } else if no_region && attempt > 1 {
                        let why = format!("no other region could take it: {e}");
                        failures.exhausted(attempt - 1, &why, e.retry_after())
                    } else {
                        e
                    });
                }
            };
            queue_wait += waited;
            let mut now = crate::clock::now();
            if now >= p.deadline {
                // Granted too late: nothing was sent, everything goes back.
                held.settle(Completion::abandoned());
                return Err(DispatchError::DeadlineExceeded(format!(
                    "while waiting {waited:?} for quota"
                )));
            }
            let region = held.reservation().region.clone();
            super::observe::reserved(&region, &model, held.reservation().hold.tokens);
            let span = tracing::debug_span!(
                "forward",
                otel.kind = "client",
                region = %region,
                attempt,
                score = held.reservation().score,
                reserved_tokens = held.reservation().hold.tokens,
                queue_wait_ms = waited.as_secs_f64() * 1000.0,
            );
            let Some(client) = self.pool.get(&region) else {
                held.settle(Completion::abandoned());
                failures.record(FailureKind::NotRun, format!("region {region} has no endpoint"));
                tried.push(region);
                continue;
            };
            if let Some(on_send) = &p.on_send {
                let notice = super::SendNotice {
                    region: region.clone(),
                    attempt,
                    model: p.exec.model.clone(),
                };
                if let Err(why) = on_send(notice).await {
                    held.settle(Completion::abandoned());
                    return Err(DispatchError::Internal(why));
                }
                now = crate::clock::now();
            }
            // Nothing that waits has happened since `now` was read (but a
            // job's own hook, which reads it again).
            let remaining = p.deadline.saturating_duration_since(now);
            let mut headers = http::HeaderMap::new();
            crate::telemetry::inject_trace(&span, &mut headers);
            let request = Call {
                message: wire.clone(),
                timeout: remaining,
                headers,
            };
            held.mark_sent();
            lease.sending();
            let sent = now;
            let result = tokio::time::timeout_at(p.deadline.into(), call(client, request))
                .instrument(span)
                .await;
            match result {
                Ok(Ok(response)) => {
                    super::observe::attempt(&region, None, false);
                    return Ok(Forwarded {
                        value: response.into_inner(),
                        held,
                        region,
                        attempts: attempt,
                        queue_wait,
                        sent,
                    });
                }
                Ok(Err(status)) if ran_out_at_deadline(&status, p.deadline) => {
                    // The propagated deadline ran out at the region just
                    // before ours did here: the same deadline, so the same
                    // answer as below.
                    super::observe::attempt(&region, None, true);
                    lease.settled(
                        held.settle(deadline_completion(p.callers_deadline, crate::clock::since(sent))),
                    );
                    return Err(DispatchError::DeadlineExceeded(format!(
                        "at region {region} after {:?} (it answered {:?})",
                        crate::clock::since(p.start),
                        status.code()
                    )));
                }
                Ok(Err(status)) => {
                    let kind = classify(&status);
                    if status.code() == Code::FailedPrecondition {
                        self.report_misconfigured(desk, &region);
                    }
                    super::observe::attempt(&region, Some(kind), false);
                    lease.settled(held.settle(failure_completion(kind, crate::clock::since(sent))));
                    let message = format!("region {region}: {} ({:?})", status.message(), status.code());
                    let may_retry = match kind {
                        FailureKind::NotRun | FailureKind::ProviderRefused { .. } => true,
                        FailureKind::MayHaveRun => p.retry_may_have_run,
                        FailureKind::Rejected => false,
                    };
                    match may_retry {
                        true => {
                            tracing::debug!(%region, attempt, error = %message, "retryable failure; failing over");
                            failures.record(kind, message);
                            tried.push(region);
                        }
                        false => {
                            return Err(DispatchError::Upstream {
                                region: region.to_string(),
                                code: status.code(),
                                message: status.message().to_string(),
                            });
                        }
                    }
                }
                Err(_elapsed) => {
                    super::observe::attempt(&region, None, true);
                    lease.settled(
                        held.settle(deadline_completion(p.callers_deadline, crate::clock::since(sent))),
                    );
                    return Err(DispatchError::DeadlineExceeded(format!(
                        "waiting for region {region} after {:?}",
                        crate::clock::since(p.start)
                    )));
                }
            }
        }
        Err(failures.exhausted(settings.max_attempts, "", None))
    }
}

impl Forwarder {
    /// An OpenAI-compatible region found misconfigured (a refused key, an
    /// unknown model) and not yet reported: out of service, and one error
    /// log naming it (never the key).
    pub(super) fn report_misconfigured(&self, desk: &QuotaDesk, region: &str) {
        let Some(why) = self.pool.openai(region).and_then(|c| c.take_unreported()) else {
            return;
        };
        desk.set_health(region, false);
        metrics::gauge!("dispatcher_region_healthy", "region" => region.to_string()).set(0.0);
        tracing::error!(%region, %why, "region misconfigured: out of service until its region file is fixed");
    }
}

/// The failed attempts of one request so far, for the error it ends in.
#[derive(Debug, Default)]
struct Failures {
    last: Option<String>,
    /// The earliest reset the providers named, while every failure so far
    /// was a provider refusal.
    refused_reset: Option<Duration>,
    other: bool,
}

impl Failures {
    fn record(&mut self, kind: FailureKind, message: String) {
        match kind {
            FailureKind::ProviderRefused { reset } => {
                self.refused_reset = Some(self.refused_reset.map_or(reset, |r| r.min(reset)));
            }
            _ => self.other = true,
        }
        self.last = Some(message);
    }

    /// No attempt is left (`why`). When every attempt was refused by a
    /// provider for quota, the caller is told so, with when to retry (the
    /// earliest reset, or `retry_after` if sooner): that is not an outage.
    fn exhausted(self, attempts: u32, why: &str, retry_after: Option<Duration>) -> DispatchError {
        let last = match (self.last, why) {
            (Some(last), "") => last,
            (Some(last), why) => format!("{last}; {why}"),
            (None, why) => why.to_string(),
        };
        match self.refused_reset {
            Some(reset) if !self.other => DispatchError::ProvidersRefused {
                attempts,
                retry_after: retry_after.map_or(reset, |r| r.min(reset)),
                last,
            },
            _ => DispatchError::AttemptsExhausted { attempts, last },
        }
    }
}

/// How early a region may report a timeout and it still be the propagated
/// deadline running out there: `grpc-timeout` goes in microseconds, and a
/// cluster's timers tick by the millisecond, not in step with ours.
const DEADLINE_SLACK: Duration = Duration::from_millis(5);

/// Whether a region's error is the request's own deadline running out there
/// (tonic answers CANCELLED "Timeout expired", others DEADLINE_EXCEEDED),
/// rather than the region giving up on its own.
pub(super) fn ran_out_at_deadline(status: &Status, deadline: Instant) -> bool {
    matches!(status.code(), Code::DeadlineExceeded | Code::Cancelled)
        && crate::clock::now() + DEADLINE_SLACK >= deadline
}

/// Work cut off at the deadline may have run, so its reservation stays
/// charged. Only the dispatcher's own deadline judges the region: one the
/// caller chose says nothing about it (thirty impatient callers must not
/// open a healthy region's circuit for everyone).
pub(super) fn deadline_completion(callers_deadline: bool, latency: Duration) -> Completion {
    Completion {
        settlement: Settlement::Unknown,
        outcome: (!callers_deadline).then_some(Outcome::Failure),
        latency,
        ..Completion::abandoned()
    }
}

pub(super) fn failure_completion(kind: FailureKind, latency: Duration) -> Completion {
    let (settlement, outcome, provider_refused) = match kind {
        FailureKind::NotRun => (Settlement::NotRun, Some(Outcome::Failure), None),
        // A provider saying "not now" is about quota, not the region's health.
        FailureKind::ProviderRefused { reset } => (Settlement::NotRun, None, Some(reset)),
        FailureKind::Rejected => (Settlement::NotRun, None, None),
        FailureKind::MayHaveRun => (Settlement::Unknown, Some(Outcome::Failure), None),
    };
    Completion {
        settlement,
        outcome,
        latency,
        hint: None,
        load: None,
        provider_refused,
    }
}
