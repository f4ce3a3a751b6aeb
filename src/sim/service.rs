//! The simulated cluster's gRPC services: `AgentCluster` (the work),
//! `RegionSimControl` (`control.rs`), health and reflection.

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::time::Duration;

use bytes::Bytes;
use parking_lot::Mutex;
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use tokio::sync::{Semaphore, mpsc};
use tokio_stream::Stream;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Code, Request, Response, Status};
use tonic_health::server::HealthReporter;
use tonic_types::{ErrorDetails, StatusExt};
use tracing::Instrument;

use super::SimSpec;
use super::calls::{Stop, echo_received, wait_for};
use super::faults::{Fault, Faults};
use super::provider::{Admission, Provider};
use crate::config::SimulateConfig;
use crate::pb;
use crate::pb::agent_cluster_server::{AgentCluster, AgentClusterServer};
use crate::pb::region_sim_control_server::RegionSimControlServer;

/// Tokens per streamed chunk.
const CHUNK_TOKENS: u64 = 32;

#[derive(Debug, Clone, Copy)]
pub(super) struct Knobs {
    pub(super) ms_per_1k_tokens: f64,
    pub(super) failure_rate: f64,
    pub(super) healthy: bool,
    pub(super) extra_latency_ms: u64,
}

pub(super) struct Inner {
    pub(super) region: String,
    settings: SimulateConfig,
    pub(super) knobs: Mutex<Knobs>,
    pub(super) provider: Mutex<Provider>,
    rng: Mutex<SmallRng>,
    slots: Semaphore,
    pub(super) in_flight: AtomicU32,
    queued: AtomicU32,
    pub(super) failed: AtomicU64,
    pub(super) cancelled: AtomicU64,
    pub(super) health: HealthReporter,
    pub(super) request_ids: Mutex<super::request_ids::RequestIds>,
    /// Contract breaches asked for (`--faulty`); none by default.
    faults: Faults,
}

/// The simulated cluster; cheap to clone (shared state).
#[derive(Clone)]
pub struct SimService {
    pub(super) inner: Arc<Inner>,
}

/// Builds every service a simulated cluster serves, committing `faults`;
/// the cluster itself comes back too, for routes beside them.
pub async fn routes(
    spec: SimSpec,
    faults: Faults,
) -> Result<(tonic::service::Routes, SimService), tonic_reflection::server::Error> {
    let (reporter, health) = tonic_health::server::health_reporter();
    reporter.set_serving::<AgentClusterServer<SimService>>().await;
    let sim = SimService::with_faults(spec, reporter, faults);
    let mut routes = tonic::service::RoutesBuilder::default();
    routes
        .add_service(health)
        .add_service(AgentClusterServer::new(sim.clone()))
        .add_service(RegionSimControlServer::new(sim.clone()));
    crate::grpc::add_reflection(
        &mut routes,
        &[
            crate::grpc::HEALTH_SERVICE,
            "dispatch.v1.AgentCluster",
            "dispatch.v1.RegionSimControl",
        ],
    )?;
    Ok((routes.routes(), sim))
}

/// Counts one in a gauge until dropped, on every way out, cancellation included.
pub(super) struct Gauge<'a>(&'a AtomicU32);

impl<'a> Gauge<'a> {
    pub(super) fn enter(gauge: &'a AtomicU32) -> Self {
        gauge.fetch_add(1, Ordering::Relaxed);
        Self(gauge)
    }
}

impl Drop for Gauge<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// What `admit` hands the work.
pub(super) struct Admitted {
    pub(super) admission: Admission,
    pub(super) completion: u64,
    pub(super) knobs: Knobs,
    pub(super) hint: Option<pb::ProviderQuota>,
}

/// Why `admit` turned a request away.
pub(super) enum NotAdmitted {
    /// Anything but the provider's limit, as the gRPC status it is.
    Status(Status),
    /// The provider's limit: a "429" that would fit after `retry_after`.
    Refused { message: String, retry_after: Duration },
}

impl From<Status> for NotAdmitted {
    fn from(s: Status) -> Self {
        NotAdmitted::Status(s)
    }
}

impl SimService {
    pub fn new(spec: SimSpec, health: HealthReporter) -> Self {
        Self::with_faults(spec, health, Faults::default())
    }

    /// A simulated cluster that commits `faults` (`region-sim --faulty`).
    pub fn with_faults(spec: SimSpec, health: HealthReporter, faults: Faults) -> Self {
        let now = crate::clock::now();
        let s = spec.settings;
        Self {
            inner: Arc::new(Inner {
                region: spec.region,
                knobs: Mutex::new(Knobs {
                    ms_per_1k_tokens: s.ms_per_1k_tokens,
                    failure_rate: s.failure_rate,
                    healthy: true,
                    extra_latency_ms: 0,
                }),
                provider: Mutex::new({
                    let mut p = Provider::new(&spec.models, s.foreign_tokens_per_minute, now);
                    if s.start_empty {
                        p.empty(now);
                    }
                    p
                }),
                rng: Mutex::new(SmallRng::seed_from_u64(s.seed)),
                slots: Semaphore::new(s.capacity as usize),
                in_flight: AtomicU32::new(0),
                queued: AtomicU32::new(0),
                failed: AtomicU64::new(0),
                cancelled: AtomicU64::new(0),
                request_ids: Mutex::default(),
                settings: s,
                health,
                faults,
            }),
        }
    }

    fn load(&self) -> pb::LoadReport {
        let in_flight = self.inner.in_flight.load(Ordering::Relaxed);
        let capacity = self.inner.settings.capacity;
        pb::LoadReport {
            in_flight,
            queued: self.inner.queued.load(Ordering::Relaxed),
            capacity,
            utilization: (in_flight as f64 / capacity as f64).min(1.0),
        }
    }

    pub(super) fn hint(&self, model: &str) -> Option<pb::ProviderQuota> {
        let h = self.inner.provider.lock().hint(model, crate::clock::now())?;
        Some(pb::ProviderQuota {
            remaining_tokens: h.remaining_tokens,
            remaining_requests: h.remaining_requests,
            reset_tokens: prost_types::Duration::try_from(h.reset_tokens).ok(),
            reset_requests: prost_types::Duration::try_from(h.reset_requests).ok(),
        })
    }

    /// Everything before the work runs: checks, the failure draw, a slot, the
    /// provider's admission. Returns the admission, the completion tokens
    /// this run will produce, and the provider's rate-limit figures as of
    /// the admission (a real provider's headers describe its limits when it
    /// admitted the request, however long the work then takes).
    async fn admit(&self, r: &pb::ExecuteRequest) -> Result<Admitted, Status> {
        self.admit_or_refuse(r).await.map_err(|e| match e {
            NotAdmitted::Status(s) => s,
            NotAdmitted::Refused { message, retry_after } => self.inner.faults.refusal(message, retry_after),
        })
    }

    /// `admit`, with the provider's refusal kept apart (an HTTP provider
    /// answers it with 429 and headers, not a gRPC status).
    pub(super) async fn admit_or_refuse(&self, r: &pb::ExecuteRequest) -> Result<Admitted, NotAdmitted> {
        let span = tracing::Span::current();
        span.record("model", r.model.as_str());
        span.record("prompt_tokens", r.prompt_tokens);
        let admitted = self.admit_untraced(r).await?;
        self.inner.request_ids.lock().record(&r.request_id);
        span.record("completion_tokens", admitted.completion);
        Ok(admitted)
    }

    async fn admit_untraced(&self, r: &pb::ExecuteRequest) -> Result<Admitted, NotAdmitted> {
        if r.model.is_empty() {
            return Err(Status::with_error_details(
                Code::InvalidArgument,
                "model is required",
                ErrorDetails::with_bad_request_violation("model", "empty"),
            )
            .into());
        }
        if !self.inner.provider.lock().serves(&r.model) {
            return Err(Status::with_error_details(
                Code::InvalidArgument,
                format!("region {} does not serve model {:?}", self.inner.region, r.model),
                ErrorDetails::with_bad_request_violation("model", "not served here"),
            )
            .into());
        }
        let knobs = *self.inner.knobs.lock();
        if !knobs.healthy {
            return Err(Status::unavailable(format!("region {} is unhealthy", self.inner.region)).into());
        }
        let (fail, fraction) = {
            let mut rng = self.inner.rng.lock();
            let fail = knobs.failure_rate > 0.0 && rng.random::<f64>() < knobs.failure_rate;
            let lo = self.inner.settings.completion_min_fraction;
            (fail, lo + (1.0 - lo) * rng.random::<f64>())
        };
        if fail {
            self.inner.failed.fetch_add(1, Ordering::Relaxed);
            return Err(
                Status::unavailable(format!("region {}: simulated failure", self.inner.region)).into(),
            );
        }
        let queued = Gauge::enter(&self.inner.queued);
        let permit = self.inner.slots.acquire().await;
        drop(queued);
        let permit = permit.map_err(|_| Status::unavailable("shutting down"))?;
        permit.forget();
        let admission = self.inner.provider.lock().admit(
            &r.model,
            r.prompt_tokens,
            r.max_output_tokens,
            crate::clock::now(),
        );
        let admission = match admission {
            Ok(a) => a,
            Err(refusal) => {
                self.inner.slots.add_permits(1);
                return Err(NotAdmitted::Refused {
                    message: format!("region {}: {}", self.inner.region, refusal.message),
                    retry_after: refusal.retry_after.min(Duration::from_secs(3600)),
                });
            }
        };
        let completion = if r.max_output_tokens == 0 {
            0
        } else {
            ((r.max_output_tokens as f64 * fraction).round() as u64).clamp(1, r.max_output_tokens)
        };
        Ok(Admitted {
            admission,
            completion,
            knobs,
            hint: self.hint(&r.model),
        })
    }

    pub(super) fn latency(&self, knobs: &Knobs, tokens: u64) -> Duration {
        let ms = self.inner.settings.base_latency_ms
            + knobs.ms_per_1k_tokens * tokens as f64 / 1000.0
            + knobs.extra_latency_ms as f64;
        Duration::from_secs_f64(ms.max(0.0) / 1000.0)
    }

    pub(super) fn finish(&self, admission: Admission, prompt: u64, completion: u64) {
        self.inner.slots.add_permits(1);
        self.inner
            .provider
            .lock()
            .complete(admission, prompt, completion, crate::clock::now());
    }
}

#[tonic::async_trait]
impl AgentCluster for SimService {
    async fn execute(
        &self,
        request: Request<pb::ExecuteRequest>,
    ) -> Result<Response<pb::ExecuteReply>, Status> {
        let span = self.span(&request, "Execute");
        let r = request.into_inner();
        if self.inner.faults.has(Fault::IgnoreDeadline) {
            // Out of reach of tonic's `grpc-timeout`: the caller is answered
            // at its deadline, and the work runs on to its end.
            let sim = self.clone();
            let work = tokio::spawn(async move { sim.execute_traced(r).await }.instrument(span));
            return work.await.map_err(|e| Status::internal(e.to_string()))?;
        }
        self.execute_traced(r).instrument(span).await
    }

    type ExecuteStreamStream = Pin<Box<dyn Stream<Item = Result<pb::ExecuteChunk, Status>> + Send>>;

    async fn execute_stream(
        &self,
        request: Request<pb::ExecuteRequest>,
    ) -> Result<Response<Self::ExecuteStreamStream>, Status> {
        let span = self.span(&request, "ExecuteStream");
        // tonic bounds a handler by `grpc-timeout`, not the stream it returns:
        // the stream keeps to the deadline itself.
        let deadline = match self.inner.faults.has(Fault::IgnoreDeadline) {
            true => None,
            false => crate::grpc::grpc_timeout(request.metadata()).map(|t| crate::clock::tokio_now() + t),
        };
        let r = request.into_inner();
        self.execute_stream_traced(r, deadline).instrument(span).await
    }
}

impl SimService {
    /// A span continuing the dispatcher's trace. Never the payload.
    fn span<T>(&self, request: &Request<T>, rpc: &'static str) -> tracing::Span {
        let span = tracing::debug_span!(
            "execute",
            otel.kind = "server",
            rpc,
            region = %self.inner.region,
            model = tracing::field::Empty,
            prompt_tokens = tracing::field::Empty,
            completion_tokens = tracing::field::Empty,
        );
        crate::telemetry::continue_trace(&span, request.metadata());
        span
    }

    async fn execute_traced(&self, r: pb::ExecuteRequest) -> Result<Response<pb::ExecuteReply>, Status> {
        let Admitted {
            admission,
            completion,
            knobs,
            hint,
        } = self.admit(&r).await?;
        let _in_flight = Gauge::enter(&self.inner.in_flight);
        // If the caller goes away during the work, this future is dropped; the
        // provider had started generating and counts the whole completion.
        let mut guard = Cancelled {
            sim: self,
            admission: Some(admission),
            prompt: r.prompt_tokens,
            produced: completion,
        };
        let latency = self.latency(&knobs, r.prompt_tokens + completion);
        // A zero latency must not wait for the next timer tick (a millisecond).
        if !latency.is_zero() {
            tokio::time::sleep(latency).await;
        }
        guard.admission = None;
        self.finish(admission, r.prompt_tokens, completion);
        let output = self.output_text(&r.model, completion, r.payload.len());
        let mut response = Response::new(pb::ExecuteReply {
            output: Bytes::from(output),
            usage: Some(self.inner.faults.usage(r.prompt_tokens, completion)),
            provider_quota: hint,
            load: self.inner.faults.load(self.load()),
        });
        echo_received(&r, response.metadata_mut());
        Ok(response)
    }

    async fn execute_stream_traced(
        &self,
        r: pb::ExecuteRequest,
        deadline: Option<tokio::time::Instant>,
    ) -> Result<Response<<Self as AgentCluster>::ExecuteStreamStream>, Status> {
        let Admitted {
            admission,
            completion,
            knobs,
            hint,
        } = self.admit(&r).await?;
        let (tx, rx) = mpsc::channel(4);
        let sim = self.clone();
        let mut metadata = tonic::metadata::MetadataMap::new();
        echo_received(&r, &mut metadata);
        tokio::spawn(async move {
            let _in_flight = Gauge::enter(&sim.inner.in_flight);
            let run = sim.produce(&knobs, r.prompt_tokens, completion, &tx, deadline, |from, to| {
                Ok(pb::ExecuteChunk {
                    output: Bytes::from(sim.chunk_text(from, to)),
                    usage: Some(sim.inner.faults.usage(r.prompt_tokens, to)),
                    ..Default::default()
                })
            });
            match run.await {
                Ok(produced) => {
                    sim.finish(admission, r.prompt_tokens, produced);
                    let last = pb::ExecuteChunk {
                        output: Bytes::new(),
                        usage: Some(sim.inner.faults.usage(r.prompt_tokens, produced)),
                        done: true,
                        provider_quota: hint,
                        load: sim.inner.faults.load(sim.load()),
                    };
                    let _ = tx.send(Ok(last)).await;
                }
                Err((produced, why)) => {
                    // The provider stops generating and counts only what it produced.
                    sim.inner.cancelled.fetch_add(1, Ordering::Relaxed);
                    sim.finish(admission, r.prompt_tokens, produced);
                    if why == Stop::Deadline {
                        let _ = tx
                            .send(Err(Status::deadline_exceeded(format!(
                                "region {}: the deadline passed after {produced} tokens",
                                sim.inner.region
                            ))))
                            .await;
                    }
                }
            }
        });
        let mut response: Response<<Self as AgentCluster>::ExecuteStreamStream> =
            Response::new(Box::pin(ReceiverStream::new(rx)));
        *response.metadata_mut() = metadata;
        Ok(response)
    }
}

impl SimService {
    /// Produces `completion` tokens in chunks sent on `tx` (`chunk(from, to)`
    /// makes each), after the prompt's time to first token. The caller
    /// going away ends the work at once, even mid-wait: a cancelled stream
    /// must not hold its slot until its next chunk. So does the deadline
    /// passing. Returns the tokens produced, or those and why it stopped.
    pub(super) async fn produce<T>(
        &self,
        knobs: &Knobs,
        prompt: u64,
        completion: u64,
        tx: &mpsc::Sender<T>,
        deadline: Option<tokio::time::Instant>,
        mut chunk: impl FnMut(u64, u64) -> T,
    ) -> Result<u64, (u64, Stop)> {
        let ignore_cancel = self.inner.faults.has(Fault::IgnoreCancel);
        let wait = |d| wait_for(d, tx, deadline, ignore_cancel);
        let mut produced = 0;
        // Time to first token: the prompt.
        wait(self.latency(knobs, prompt))
            .await
            .map_err(|why| (produced, why))?;
        while produced < completion {
            let n = CHUNK_TOKENS.min(completion - produced);
            let next = self.latency(
                &Knobs {
                    extra_latency_ms: 0,
                    ..*knobs
                },
                n,
            );
            wait(next).await.map_err(|why| (produced, why))?;
            if tx.send(chunk(produced, produced + n)).await.is_err() && !ignore_cancel {
                return Err((produced, Stop::Cancelled));
            }
            produced += n;
        }
        Ok(produced)
    }

    /// The text of the chunk holding tokens `from..to`.
    pub(super) fn chunk_text(&self, from: u64, to: u64) -> String {
        format!("[{}] tokens {from}..{to}\n", self.inner.region)
    }

    /// The text of a whole completion.
    pub(super) fn output_text(&self, model: &str, completion: u64, payload_bytes: usize) -> String {
        format!(
            "[{}] {model} completed {completion} tokens for a {payload_bytes}-byte payload",
            self.inner.region
        )
    }

    pub(super) fn region(&self) -> &str {
        &self.inner.region
    }

    /// The provider's limits of `model` (tokens, requests a minute).
    pub(super) fn limits(&self, model: &str) -> Option<(u64, u64)> {
        self.inner.provider.lock().limits(model)
    }

    pub(super) fn serves(&self, model: &str) -> bool {
        self.inner.provider.lock().serves(model)
    }

    pub(super) fn model_names(&self) -> Vec<String> {
        self.inner.provider.lock().model_names()
    }

    pub(super) fn in_flight(&self) -> Gauge<'_> {
        Gauge::enter(&self.inner.in_flight)
    }

    /// Counts a call the caller (or its deadline) ended early.
    pub(super) fn count_cancelled(&self) {
        self.inner.cancelled.fetch_add(1, Ordering::Relaxed);
    }
}

/// Settles a unary call that was dropped mid-work.
pub(super) struct Cancelled<'a> {
    pub(super) sim: &'a SimService,
    pub(super) admission: Option<Admission>,
    pub(super) prompt: u64,
    pub(super) produced: u64,
}

impl Drop for Cancelled<'_> {
    fn drop(&mut self) {
        if let Some(a) = self.admission.take() {
            self.sim.inner.cancelled.fetch_add(1, Ordering::Relaxed);
            self.sim.finish(a, self.prompt, self.produced);
        }
    }
}
