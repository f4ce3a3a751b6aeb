//! `DispatchStream`: output relayed as the region produces it. The tokens
//! produced are counted as they arrive; when the caller goes away mid-stream,
//! or its deadline passes (whether it reads or not), the upstream call is
//! cancelled and only what was produced is charged.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, Waker, ready};
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, oneshot};
use tokio_stream::Stream;

use super::forwarder::{deadline_completion, failure_completion, ran_out_at_deadline};
use super::lease::{Lease, RegionHold};
use super::prepare::{Forwarded, Prepared};
use super::{DispatchError, Engine, hint_from_pb, load_from_pb};
use crate::core::{Completion, Outcome, Settlement};
use crate::forward::{Chunks, FailureKind, classify};
use crate::pb;

/// One piece of a streamed dispatch.
#[derive(Debug, Clone, PartialEq)]
pub struct StreamChunk {
    pub request_id: String,
    pub region: String,
    pub output: bytes::Bytes,
    /// Cumulative so far; final on the last chunk.
    pub usage: pb::Usage,
    pub done: bool,
    pub attempts: u32,
    pub queue_wait: Duration,
    /// Which model serves it, after rollouts and fallbacks.
    pub path: super::ModelPath,
    /// On the last chunk: what the request cost.
    pub cost: Option<super::Cost>,
    /// Set when the stream is a stored reply (one chunk, done).
    pub cached: Option<Arc<super::CacheHit>>,
}

pub type ChunkStream = Pin<Box<dyn Stream<Item = Result<StreamChunk, DispatchError>> + Send>>;

/// Chunks buffered towards a slow caller before the relay waits for it.
const BUFFER: usize = 16;

/// How a stream ends: its final chunk or an error.
type End = Result<StreamChunk, DispatchError>;

struct Relay {
    _running: super::Running,
    held: RegionHold,
    charge: Lease,
    upstream: Chunks,
    tx: mpsc::Sender<StreamChunk>,
    /// Takes the end without waiting for the caller to read: a caller that
    /// stops reading must not hold the call (its slot, its reservation).
    end: oneshot::Sender<End>,
    template: StreamChunk,
    prompt: u64,
    sent: Instant,
    deadline: Instant,
    callers_deadline: bool,
    /// The first chunk, read before the stream committed.
    first: Option<pb::ExecuteChunk>,
    /// The committed attempt's price, and the request's span (its cost is
    /// recorded there when the stream settles).
    price: super::spend::AttemptPrice,
    span: tracing::Span,
    /// The output so far, when the request asked for the cache: stored
    /// once the stream ends complete (never when cut or failed).
    collect: Option<Collect>,
}

struct Collect {
    cache: Arc<super::ResponseCache>,
    plan: super::cache::CachePlan,
    output: bytes::BytesMut,
    /// Past this the reply is too large to store: collection stops.
    limit: usize,
}

/// The caller's side: the output as it was relayed, then the end.
struct Output {
    chunks: mpsc::Receiver<StreamChunk>,
    end: Option<oneshot::Receiver<End>>,
}

impl Stream for Output {
    type Item = End;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<End>> {
        if let Some(chunk) = ready!(self.chunks.poll_recv(cx)) {
            return Poll::Ready(Some(Ok(chunk)));
        }
        let Some(end) = self.end.as_mut() else {
            return Poll::Ready(None);
        };
        let end = ready!(Pin::new(end).poll(cx));
        self.end = None;
        Poll::Ready(Some(end.unwrap_or_else(|_| {
            Err(DispatchError::Upstream {
                region: String::new(),
                code: tonic::Code::Internal,
                message: "the stream's relay ended without an answer".into(),
            })
        })))
    }
}

impl Engine {
    /// Routes and forwards like `dispatch`, relaying the output as it comes.
    /// Errors before the first chunk are returned directly.
    pub async fn dispatch_stream(
        self: &Arc<Self>,
        r: pb::DispatchRequest,
        timeout: Option<Duration>,
        caller: impl Into<super::auth::Caller>,
    ) -> Result<ChunkStream, DispatchError> {
        self.dispatch_stream_with(r, timeout, caller.into(), None).await
    }

    /// `dispatch_stream` for a job's run: its `on_send` told before each
    /// send, and failover after a failure that may have run the work only
    /// when the job may run twice.
    pub async fn dispatch_stream_with(
        self: &Arc<Self>,
        r: pb::DispatchRequest,
        timeout: Option<Duration>,
        caller: super::auth::Caller,
        job: Option<super::JobRun>,
    ) -> Result<ChunkStream, DispatchError> {
        let start = crate::clock::now();
        let running = self.enter();
        let mut labels = super::prepare::Labels::default();
        let config = self.front.snapshot();
        let mut r = r;
        // A job's run reads and feeds the cache as a stream does, when its
        // request asks for it: a hit ends the job DONE with nothing sent.
        let cached = self
            .front(&config, &mut r, timeout, &caller, &mut labels)
            .and_then(|front| {
                super::cache::CachePlan::new(&config, &front.tenant, &r).map(|plan| (front, plan))
            });
        let (front, cache) = match cached {
            Ok(x) => x,
            Err(e) => {
                labels.finish(Err(&e), start);
                return Err(e);
            }
        };
        // An OpenAI-compatible region streams the provider's own events: a
        // stored reply, replayed as one chunk, would be their concatenation
        // (or a unary reply's one body), which no client reads as a stream.
        // Such streams neither read nor feed the cache; their unary replies do.
        let cache = cache.filter(|_| !config.served_by_openai(&r.model));
        if let Some(plan) = cache.as_ref().filter(|p| !p.refresh)
            && let Some(hit) = self.cache.lookup(plan).await
        {
            labels.model = config.model_name(&r.model);
            labels.finish(Ok(()), start);
            let d = self.answer_from_cache(r.request_id, hit, config.version, front.path());
            let chunk = StreamChunk {
                request_id: d.request_id,
                region: d.region,
                output: d.output,
                usage: d.usage,
                done: true,
                attempts: 0,
                queue_wait: Duration::ZERO,
                path: d.path,
                cost: Some(d.cost),
                cached: d.cached,
            };
            return Ok(Box::pin(tokio_stream::once(Ok(chunk))));
        }
        let prepared = self.admit(config, r, timeout, front, &mut labels);
        let (mut p, mut charge) = match prepared {
            Ok(mut x) => {
                if let Some(job) = job {
                    x.0.on_send = Some(job.on_send);
                    x.0.retry_may_have_run = job.may_run_twice;
                }
                x
            }
            Err(e) => {
                labels.finish(Err(&e), start);
                return Err(e);
            }
        };
        // Each step of the plan may fall back until the stream commits at
        // its first output chunk; after that, a failure is the caller's
        // error, never a truncated success.
        let (f, first) = loop {
            let step_deadline = Self::step_deadline(&p);
            let saved = p.step_in(step_deadline);
            // Boxed, as in `dispatch_inner`.
            let forwarded = Box::pin(self.forwarder.forward(
                &self.desk,
                &p,
                &mut charge,
                |mut client, request| async move { client.execute_stream(request).await },
            ))
            .await;
            let committed = match forwarded {
                Ok(f) => first_chunk(f, &p).await,
                Err(e) => Err((e, None)),
            };
            p.restore(saved);
            match committed {
                Ok(x) => break x,
                Err((e, charged)) => {
                    if let Some(charged) = charged {
                        charge.settled(charged);
                    }
                    match self.fall_back(&mut p, charge, e, step_deadline) {
                        Ok(next) => charge = next,
                        Err(e) => {
                            labels.finish(Err(&e), start);
                            return Err(e);
                        }
                    }
                }
            }
        };
        labels.model = p.config.model_name(&p.exec.model);
        labels.region = Some(f.region.clone());
        labels.finish(Ok(()), start);
        let (tx, rx) = mpsc::channel(BUFFER);
        let (end, end_rx) = oneshot::channel();
        let price = super::spend::AttemptPrice::new(&p.config, &p.tenant, &p.exec.model, &f.region);
        let relay = Relay {
            price,
            span: tracing::Span::current(),
            _running: running,
            held: f.held,
            charge,
            upstream: f.value,
            tx,
            end,
            template: StreamChunk {
                request_id: std::mem::take(&mut p.exec.request_id),
                region: f.region.to_string(),
                output: bytes::Bytes::new(),
                usage: pb::Usage {
                    prompt_tokens: p.estimate.prompt,
                    completion_tokens: 0,
                    cached_prompt_tokens: 0,
                },
                done: false,
                cost: None,
                attempts: f.attempts,
                queue_wait: f.queue_wait,
                path: super::ModelPath {
                    model: std::mem::take(&mut p.exec.model),
                    ..p.path
                },
                cached: None,
            },
            // A fallback step may have reached an OpenAI-compatible region.
            collect: cache
                .filter(|_| self.region_kind(&f.region) != Some(crate::forward::RegionKind::OpenAi))
                .map(|plan| Collect {
                    cache: self.cache.clone(),
                    plan,
                    output: bytes::BytesMut::new(),
                    limit: p.config.cache.limits.max_entry_bytes as usize,
                }),
            first: Some(first),
            prompt: p.estimate.prompt,
            sent: f.sent,
            deadline: p.deadline,
            callers_deadline: p.callers_deadline,
        };
        tokio::spawn(relay.run());
        Ok(Box::pin(Output {
            chunks: rx,
            end: Some(end_rx),
        }))
    }
}

impl Relay {
    /// Adds relayed output to what will be stored, while it may be.
    fn collect(&mut self, output: &[u8]) {
        if let Some(k) = &mut self.collect {
            if k.output.len() + output.len() > k.limit {
                self.collect = None;
            } else {
                k.output.extend_from_slice(output);
            }
        }
    }

    fn chunk(&self, output: bytes::Bytes, usage: pb::Usage, done: bool) -> StreamChunk {
        StreamChunk {
            output,
            usage,
            done,
            ..self.template.clone()
        }
    }

    /// Ends the upstream call early: the provider stops generating and
    /// counts what it produced, which is charged; then the stream ends with
    /// `end`, if anyone is left to read it.
    fn cut(self, mut produced: u64, outcome: Option<Outcome>, end: Option<End>) {
        let Relay {
            held,
            mut charge,
            mut upstream,
            end: end_tx,
            prompt,
            sent,
            price,
            span,
            ..
        } = self;
        drain(&mut upstream, &mut produced);
        drop(upstream);
        let charged = held.settle(Completion {
            settlement: Settlement::Used {
                prompt,
                completion: produced,
            },
            outcome,
            latency: crate::clock::since(sent),
            ..Completion::abandoned()
        });
        let usage = pb::Usage {
            prompt_tokens: prompt,
            completion_tokens: produced,
            cached_prompt_tokens: 0,
        };
        price.charge(&mut charge, charged, &usage, &span);
        charge.finish();
        if let Some(end) = end {
            let _ = end_tx.send(end);
        }
    }

    /// The deadline passed: the call ends, whether the caller reads or not.
    /// Only the dispatcher's own deadline counts against the region.
    fn expire(self, produced: u64) {
        let outcome = (!self.callers_deadline).then_some(Outcome::Failure);
        let end = Err(DispatchError::DeadlineExceeded("while streaming".into()));
        self.cut(produced, outcome, Some(end));
    }

    async fn run(mut self) {
        let mut produced = 0u64;
        let deadline = tokio::time::Instant::from_std(self.deadline);
        loop {
            let first = self.first.take().map(|c| Ok(Some(c)));
            let message = if let Some(first) = first {
                first
            } else {
                tokio::select! {
                    _ = self.tx.closed() => {
                        tracing::debug!(produced, "caller went away mid-stream; cancelling upstream");
                        return self.cut(produced, None, None);
                    }
                    _ = tokio::time::sleep_until(deadline) => return self.expire(produced),
                    m = self.upstream.message() => m,
                }
            };
            match message {
                Ok(Some(c)) => {
                    let usage = c.usage.unwrap_or(pb::Usage {
                        prompt_tokens: self.prompt,
                        completion_tokens: produced,
                        cached_prompt_tokens: 0,
                    });
                    produced = produced.max(usage.completion_tokens);
                    self.collect(&c.output);
                    if c.done {
                        if let Some(k) = self.collect.take() {
                            let t = &self.template;
                            k.cache
                                .store(&k.plan, &t.path.model, &t.region, k.output.freeze(), usage);
                        }
                        let mut last = self.chunk(c.output, usage, true);
                        let Relay {
                            held,
                            mut charge,
                            end,
                            sent,
                            price,
                            span,
                            ..
                        } = self;
                        let charged = held.settle(Completion {
                            settlement: Settlement::Used {
                                prompt: usage.prompt_tokens,
                                completion: usage.completion_tokens,
                            },
                            outcome: Some(Outcome::Success),
                            latency: crate::clock::since(sent),
                            hint: c.provider_quota.map(hint_from_pb),
                            load: c.load.map(load_from_pb),
                            provider_refused: None,
                        });
                        last.cost = Some(price.charge(&mut charge, charged, &usage, &span));
                        charge.finish();
                        let _ = end.send(Ok(last));
                        return;
                    }
                    let chunk = self.chunk(c.output, usage, false);
                    tokio::select! {
                        sent = self.tx.send(chunk) => if sent.is_err() {
                            return self.cut(produced, None, None);
                        },
                        // A caller that stopped reading is not waited for
                        // past its deadline.
                        _ = tokio::time::sleep_until(deadline) => return self.expire(produced),
                    }
                }
                Ok(None) => {
                    // Ended without its final chunk: the output is cut
                    // short, which the caller must learn (never a clean end).
                    let region = self.template.region.clone();
                    let end = Err(DispatchError::Upstream {
                        region,
                        code: tonic::Code::Unavailable,
                        message: "the region's stream ended before its final chunk; the output is incomplete"
                            .into(),
                    });
                    return self.cut(produced, Some(Outcome::Failure), Some(end));
                }
                // The propagated deadline ran out at the region.
                Err(status) if ran_out_at_deadline(&status, self.deadline) => return self.expire(produced),
                Err(status) => {
                    // Failed midway: it ran, and how much the provider counted
                    // is unknown, so the reservation stays charged.
                    let region = self.template.region.clone();
                    let Relay {
                        held,
                        mut charge,
                        end,
                        sent,
                        price,
                        span,
                        ..
                    } = self;
                    let charged = held.settle(Completion {
                        settlement: Settlement::Unknown,
                        outcome: Some(Outcome::Failure),
                        latency: crate::clock::since(sent),
                        ..Completion::abandoned()
                    });
                    price.charge_worst_case(&mut charge, charged, &span);
                    charge.finish();
                    let _ = end.send(Err(DispatchError::Upstream {
                        region,
                        code: status.code(),
                        message: status.message().to_string(),
                    }));
                    return;
                }
            }
        }
    }
}

/// Counts the output that has already arrived from the region but was not
/// relayed (the caller was not reading), so a cut call is charged for what
/// the region produced up to the cut, not only for what was passed on.
fn drain(upstream: &mut Chunks, produced: &mut u64) {
    let mut cx = Context::from_waker(Waker::noop());
    loop {
        let next = std::pin::pin!(upstream.message());
        match next.poll(&mut cx) {
            Poll::Ready(Ok(Some(c))) => {
                if let Some(u) = c.usage {
                    *produced = (*produced).max(u.completion_tokens);
                }
            }
            _ => return,
        }
    }
}

/// Reads the stream's first chunk, within the step's deadline: the commit
/// point. A failure before it settles the region's hold and comes back as
/// an error a fallback trigger can read (with the tokens charged); the
/// caller has seen nothing yet.
async fn first_chunk(
    mut f: Forwarded<Chunks>,
    p: &Prepared,
) -> Result<(Forwarded<Chunks>, pb::ExecuteChunk), (DispatchError, Option<u64>)> {
    let message = tokio::time::timeout_at(p.deadline.into(), f.value.message()).await;
    let region = f.region.to_string();
    let (completion, error) = match message {
        Ok(Ok(Some(chunk))) => return Ok((f, chunk)),
        Ok(Ok(None)) => (
            failure_completion(FailureKind::NotRun, crate::clock::since(f.sent)),
            DispatchError::AttemptsExhausted {
                attempts: f.attempts,
                last: format!("region {region}: the stream ended before any output"),
            },
        ),
        Ok(Err(status)) if !ran_out_at_deadline(&status, p.deadline) => {
            let kind = classify(&status);
            let last = format!("region {region}: {} ({:?})", status.message(), status.code());
            let error = match kind {
                FailureKind::ProviderRefused { reset } => DispatchError::ProvidersRefused {
                    attempts: f.attempts,
                    retry_after: reset,
                    last,
                },
                FailureKind::NotRun => DispatchError::AttemptsExhausted {
                    attempts: f.attempts,
                    last,
                },
                FailureKind::MayHaveRun | FailureKind::Rejected => DispatchError::Upstream {
                    region,
                    code: status.code(),
                    message: status.message().to_string(),
                },
            };
            (failure_completion(kind, crate::clock::since(f.sent)), error)
        }
        // The deadline (the step's, or the request's) ran out here or there.
        Ok(Err(_)) | Err(_) => (
            deadline_completion(p.callers_deadline, crate::clock::since(f.sent)),
            DispatchError::DeadlineExceeded(format!(
                "waiting for the first output of region {region} after {:?}",
                crate::clock::since(p.start)
            )),
        ),
    };
    let charged = f.held.settle(completion);
    Err((error, Some(charged)))
}
