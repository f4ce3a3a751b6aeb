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

use super::forwarder::ran_out_at_deadline;
use super::lease::{Lease, RegionHold};
use super::{DispatchError, Engine, hint_from_pb, load_from_pb};
use crate::core::{Completion, Outcome, Settlement};
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
    upstream: tonic::Streaming<pb::ExecuteChunk>,
    tx: mpsc::Sender<StreamChunk>,
    /// Takes the end without waiting for the caller to read: a caller that
    /// stops reading must not hold the call (its slot, its reservation).
    end: oneshot::Sender<End>,
    template: StreamChunk,
    prompt: u64,
    sent: Instant,
    deadline: Instant,
    callers_deadline: bool,
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
        let caller = caller.into();
        let start = crate::clock::now();
        let running = self.enter();
        let mut labels = super::prepare::Labels::default();
        let prepared = self.prepare(self.front.snapshot(), r, timeout, &caller, &mut labels);
        let (p, mut charge) = match prepared {
            Ok(x) => x,
            Err(e) => {
                labels.finish(Err(&e), start);
                return Err(e);
            }
        };
        let forwarded = self
            .forwarder
            .forward(&self.desk, &p, &mut charge, |mut client, request| async move {
                client.execute_stream(request).await
            })
            .await;
        let f = match forwarded {
            Ok(f) => f,
            Err(e) => {
                labels.finish(Err(&e), start);
                return Err(e);
            }
        };
        labels.region = Some(f.region.clone());
        labels.finish(Ok(()), start);
        let (tx, rx) = mpsc::channel(BUFFER);
        let (end, end_rx) = oneshot::channel();
        let relay = Relay {
            _running: running,
            held: f.held,
            charge,
            upstream: f.value,
            tx,
            end,
            template: StreamChunk {
                request_id: p.request_id,
                region: f.region.to_string(),
                output: bytes::Bytes::new(),
                usage: pb::Usage {
                    prompt_tokens: p.estimate.prompt,
                    completion_tokens: 0,
                },
                done: false,
                attempts: f.attempts,
                queue_wait: f.queue_wait,
            },
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
            ..
        } = self;
        drain(&mut upstream, &mut produced);
        drop(upstream);
        charge.settled(held.settle(Completion {
            settlement: Settlement::Used {
                prompt,
                completion: produced,
            },
            outcome,
            latency: crate::clock::since(sent),
            ..Completion::abandoned()
        }));
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
            let message = tokio::select! {
                _ = self.tx.closed() => {
                    tracing::debug!(produced, "caller went away mid-stream; cancelling upstream");
                    return self.cut(produced, None, None);
                }
                _ = tokio::time::sleep_until(deadline) => return self.expire(produced),
                m = self.upstream.message() => m,
            };
            match message {
                Ok(Some(c)) => {
                    let usage = c.usage.unwrap_or(pb::Usage {
                        prompt_tokens: self.prompt,
                        completion_tokens: produced,
                    });
                    produced = produced.max(usage.completion_tokens);
                    if c.done {
                        let last = self.chunk(c.output, usage, true);
                        let Relay {
                            held,
                            mut charge,
                            end,
                            sent,
                            ..
                        } = self;
                        charge.settled(held.settle(Completion {
                            settlement: Settlement::Used {
                                prompt: usage.prompt_tokens,
                                completion: usage.completion_tokens,
                            },
                            outcome: Some(Outcome::Success),
                            latency: crate::clock::since(sent),
                            hint: c.provider_quota.map(hint_from_pb),
                            load: c.load.map(load_from_pb),
                            provider_refused: None,
                        }));
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
                    // Ended without a final chunk: settle on what arrived.
                    let usage = pb::Usage {
                        prompt_tokens: self.prompt,
                        completion_tokens: produced,
                    };
                    let last = self.chunk(bytes::Bytes::new(), usage, true);
                    return self.cut(produced, Some(Outcome::Success), Some(Ok(last)));
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
                        ..
                    } = self;
                    charge.settled(held.settle(Completion {
                        settlement: Settlement::Unknown,
                        outcome: Some(Outcome::Failure),
                        latency: crate::clock::since(sent),
                        ..Completion::abandoned()
                    }));
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
fn drain(upstream: &mut tonic::Streaming<pb::ExecuteChunk>, produced: &mut u64) {
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
