//! `DispatchStream`: output relayed as the region produces it. The tokens
//! produced are counted as they arrive; when the caller goes away mid-stream
//! the upstream call is cancelled and only what was produced is charged.

use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::mpsc;
use tokio_stream::Stream;
use tokio_stream::wrappers::ReceiverStream;

use super::held::{Held, TenantCharge};
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

struct Relay {
    _running: super::Running,
    held: Held,
    charge: TenantCharge,
    upstream: tonic::Streaming<pb::ExecuteChunk>,
    tx: mpsc::Sender<Result<StreamChunk, DispatchError>>,
    template: StreamChunk,
    prompt: u64,
    sent: Instant,
    deadline: Instant,
}

impl Engine {
    /// Routes and forwards like `dispatch`, relaying the output as it comes.
    /// Errors before the first chunk are returned directly.
    pub async fn dispatch_stream(
        self: &Arc<Self>,
        r: pb::DispatchRequest,
        timeout: Option<Duration>,
        authorization: Option<&str>,
    ) -> Result<ChunkStream, DispatchError> {
        let start = std::time::Instant::now();
        let running = self.enter();
        let mut labels = super::attempt::Labels::default();
        let prepared = self.prepare(r, timeout, authorization, &mut labels);
        let (p, mut charge) = match prepared {
            Ok(x) => x,
            Err(e) => {
                labels.finish(Err(&e), start);
                return Err(e);
            }
        };
        let forwarded = self
            .forward(&p, &mut charge, |mut client, request| async move {
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
        let relay = Relay {
            _running: running,
            held: f.held,
            charge,
            upstream: f.value,
            tx,
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
        };
        tokio::spawn(relay.run());
        Ok(Box::pin(ReceiverStream::new(rx)))
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
    /// counts what it produced.
    fn cut(self, produced: u64, outcome: Option<Outcome>) {
        let Relay {
            held,
            mut charge,
            upstream,
            prompt,
            sent,
            ..
        } = self;
        drop(upstream);
        charge.settled(held.settle(Completion {
            settlement: Settlement::Used {
                prompt,
                completion: produced,
            },
            outcome,
            latency: sent.elapsed(),
            ..Completion::abandoned()
        }));
        charge.finish();
    }

    async fn run(mut self) {
        let mut produced = 0u64;
        loop {
            let message = tokio::select! {
                _ = self.tx.closed() => {
                    tracing::debug!(produced, "caller went away mid-stream; cancelling upstream");
                    return self.cut(produced, None);
                }
                _ = tokio::time::sleep_until(self.deadline.into()) => {
                    let tx = self.tx.clone();
                    self.cut(produced, Some(Outcome::Failure));
                    let _ = tx.send(Err(DispatchError::DeadlineExceeded("while streaming".into()))).await;
                    return;
                }
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
                            tx,
                            sent,
                            ..
                        } = self;
                        charge.settled(held.settle(Completion {
                            settlement: Settlement::Used {
                                prompt: usage.prompt_tokens,
                                completion: usage.completion_tokens,
                            },
                            outcome: Some(Outcome::Success),
                            latency: sent.elapsed(),
                            hint: c.provider_quota.map(hint_from_pb),
                            load: c.load.map(load_from_pb),
                            provider_refused: None,
                        }));
                        charge.finish();
                        let _ = tx.send(Ok(last)).await;
                        return;
                    }
                    let chunk = self.chunk(c.output, usage, false);
                    if self.tx.send(Ok(chunk)).await.is_err() {
                        return self.cut(produced, None);
                    }
                }
                Ok(None) => {
                    // Ended without a final chunk: settle on what arrived.
                    let usage = pb::Usage {
                        prompt_tokens: self.prompt,
                        completion_tokens: produced,
                    };
                    let last = self.chunk(bytes::Bytes::new(), usage, true);
                    let tx = self.tx.clone();
                    self.cut(produced, Some(Outcome::Success));
                    let _ = tx.send(Ok(last)).await;
                    return;
                }
                Err(status) => {
                    // Failed midway: it ran, and how much the provider counted
                    // is unknown, so the reservation stays charged.
                    let region = self.template.region.clone();
                    let Relay {
                        held,
                        mut charge,
                        tx,
                        sent,
                        ..
                    } = self;
                    charge.settled(held.settle(Completion {
                        settlement: Settlement::Unknown,
                        outcome: Some(Outcome::Failure),
                        latency: sent.elapsed(),
                        ..Completion::abandoned()
                    }));
                    charge.finish();
                    let _ = tx
                        .send(Err(DispatchError::Upstream {
                            region,
                            code: status.code(),
                            message: status.message().to_string(),
                        }))
                        .await;
                    return;
                }
            }
        }
    }
}
