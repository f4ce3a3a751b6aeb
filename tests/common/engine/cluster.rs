//! A scriptable fake AgentCluster: per call a delay on the (paused) clock,
//! then success with usage and an optional provider hint, UNAVAILABLE, a
//! provider's 429 with RetryInfo, or INTERNAL; streams chunk by chunk.

use std::collections::VecDeque;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use dispatcher::pb;
use dispatcher::pb::agent_cluster_server::AgentCluster;
use parking_lot::Mutex;
use tokio::sync::{Notify, mpsc};
use tokio::time::Instant;
use tokio_stream::Stream;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Code, Status};
use tonic_types::{ErrorDetails, StatusExt};

/// How a fake cluster answers one call.
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    Ok,
    Unavailable,
    /// The provider's 429: RESOURCE_EXHAUSTED with RetryInfo.
    Exhausted(Duration),
    Internal,
}

/// One scripted answer.
#[derive(Debug, Clone, PartialEq)]
pub struct Reply {
    /// Before the reply (streams: before the response starts).
    pub delay: Duration,
    pub outcome: Outcome,
    /// (prompt, completion); `None`: what the request allowed for.
    pub usage: Option<(u64, u64)>,
    pub quota: Option<pb::ProviderQuota>,
    /// Streams: one chunk after each of these delays, the last one final.
    /// None: a single final chunk at once.
    pub chunks: Vec<Duration>,
    /// Streams: after this many chunks, stop: with this outcome's status
    /// (`Outcome::Ok`: end without the final chunk).
    pub break_after: Option<(usize, Outcome)>,
}

impl Reply {
    pub fn ok() -> Self {
        Self {
            delay: Duration::ZERO,
            outcome: Outcome::Ok,
            usage: None,
            quota: None,
            chunks: Vec::new(),
            break_after: None,
        }
    }

    /// Streams: after `n` chunks, fail with `outcome` (or, with
    /// `Outcome::Ok`, end without the final chunk).
    pub fn break_after(self, n: usize, outcome: Outcome) -> Self {
        Self {
            break_after: Some((n, outcome)),
            ..self
        }
    }

    pub fn unavailable() -> Self {
        Self {
            outcome: Outcome::Unavailable,
            ..Self::ok()
        }
    }

    pub fn exhausted(retry_after: Duration) -> Self {
        Self {
            outcome: Outcome::Exhausted(retry_after),
            ..Self::ok()
        }
    }

    pub fn internal() -> Self {
        Self {
            outcome: Outcome::Internal,
            ..Self::ok()
        }
    }

    pub fn after(self, delay: Duration) -> Self {
        Self { delay, ..self }
    }

    pub fn usage(self, prompt: u64, completion: u64) -> Self {
        Self {
            usage: Some((prompt, completion)),
            ..self
        }
    }

    /// The provider's rate-limit headers: `remaining` tokens, full again after `reset`.
    pub fn hint(self, remaining_tokens: i64, reset: Duration) -> Self {
        Self {
            quota: Some(pb::ProviderQuota {
                remaining_tokens,
                remaining_requests: 1_000_000,
                reset_tokens: prost_types::Duration::try_from(reset).ok(),
                reset_requests: prost_types::Duration::try_from(Duration::from_secs(1)).ok(),
            }),
            ..self
        }
    }

    /// `n` chunks, one every `every`.
    pub fn chunks(self, n: usize, every: Duration) -> Self {
        Self {
            chunks: vec![every; n],
            ..self
        }
    }

    fn status(&self) -> Option<Status> {
        match self.outcome {
            Outcome::Ok => None,
            Outcome::Unavailable => Some(Status::unavailable("fake cluster: down")),
            Outcome::Internal => Some(Status::internal("fake cluster: broke")),
            Outcome::Exhausted(retry) => Some(Status::with_error_details(
                Code::ResourceExhausted,
                "fake cluster: the provider says 429",
                ErrorDetails::with_retry_info(Some(retry)),
            )),
        }
    }

    fn usage_for(&self, r: &pb::ExecuteRequest) -> pb::Usage {
        let (prompt_tokens, completion_tokens) = self.usage.unwrap_or((r.prompt_tokens, r.max_output_tokens));
        pb::Usage {
            prompt_tokens,
            completion_tokens,
            cached_prompt_tokens: 0,
        }
    }
}

/// A call as the cluster saw it.
#[derive(Debug, Clone)]
pub struct Seen {
    pub request_id: String,
    pub tenant: String,
    /// The propagated deadline (`grpc-timeout`).
    pub timeout: Option<Duration>,
    pub at: Instant,
    pub stream: bool,
    pub model: String,
}

/// A scriptable AgentCluster: answers calls with the scripted replies in
/// turn, then with its default one; counts calls, calls in flight, and
/// calls whose caller left before the answer.
#[derive(Clone)]
pub struct FakeCluster {
    inner: Arc<ClusterInner>,
}

struct ClusterInner {
    script: Mutex<VecDeque<Reply>>,
    default: Mutex<Reply>,
    seen: Mutex<Vec<Seen>>,
    in_flight: AtomicU64,
    max_in_flight: AtomicU64,
    answered: AtomicU64,
    cancelled: AtomicU64,
    changed: Notify,
}

impl Default for FakeCluster {
    fn default() -> Self {
        Self::new()
    }
}

impl FakeCluster {
    /// Answers everything at once with success.
    pub fn new() -> Self {
        Self {
            inner: Arc::new(ClusterInner {
                script: Mutex::default(),
                default: Mutex::new(Reply::ok()),
                seen: Mutex::default(),
                in_flight: AtomicU64::new(0),
                max_in_flight: AtomicU64::new(0),
                answered: AtomicU64::new(0),
                cancelled: AtomicU64::new(0),
                changed: Notify::new(),
            }),
        }
    }

    /// The next calls are answered with these, in order.
    pub fn then(&self, replies: impl IntoIterator<Item = Reply>) -> &Self {
        self.inner.script.lock().extend(replies);
        self
    }

    /// Calls beyond the script are answered with this.
    pub fn always(&self, reply: Reply) -> &Self {
        *self.inner.default.lock() = reply;
        self
    }

    pub fn calls(&self) -> u64 {
        self.inner.seen.lock().len() as u64
    }

    pub fn seen(&self) -> Vec<Seen> {
        self.inner.seen.lock().clone()
    }

    pub fn in_flight(&self) -> u64 {
        self.inner.in_flight.load(Ordering::SeqCst)
    }

    pub fn max_in_flight(&self) -> u64 {
        self.inner.max_in_flight.load(Ordering::SeqCst)
    }

    /// Calls answered (with a reply or an error; streams: to the final chunk).
    pub fn answered(&self) -> u64 {
        self.inner.answered.load(Ordering::SeqCst)
    }

    /// Calls whose caller went away before the answer.
    pub fn cancelled(&self) -> u64 {
        self.inner.cancelled.load(Ordering::SeqCst)
    }

    /// Waits until `n` calls have arrived.
    pub async fn wait_for_calls(&self, n: u64) {
        loop {
            let changed = self.inner.changed.notified();
            if self.calls() >= n {
                return;
            }
            changed.await;
        }
    }

    /// Waits until no call is in flight.
    pub async fn wait_for_idle(&self) {
        loop {
            let changed = self.inner.changed.notified();
            if self.in_flight() == 0 {
                return;
            }
            changed.await;
        }
    }

    fn begin(&self, r: &tonic::Request<pb::ExecuteRequest>, stream: bool) -> (Reply, Call) {
        let reply = self
            .inner
            .script
            .lock()
            .pop_front()
            .unwrap_or_else(|| self.inner.default.lock().clone());
        let m = r.get_ref();
        self.inner.seen.lock().push(Seen {
            request_id: m.request_id.clone(),
            tenant: m.tenant.clone(),
            timeout: dispatcher::grpc::grpc_timeout(r.metadata()),
            at: Instant::now(),
            stream,
            model: m.model.clone(),
        });
        let now = self.inner.in_flight.fetch_add(1, Ordering::SeqCst) + 1;
        self.inner.max_in_flight.fetch_max(now, Ordering::SeqCst);
        self.inner.changed.notify_waiters();
        (
            reply,
            Call {
                cluster: self.inner.clone(),
                answered: false,
            },
        )
    }
}

/// One call in flight; counted cancelled if dropped before `answer`.
struct Call {
    cluster: Arc<ClusterInner>,
    answered: bool,
}

impl Call {
    fn answer(mut self) {
        self.answered = true;
    }
}

impl Drop for Call {
    fn drop(&mut self) {
        let counter = match self.answered {
            true => &self.cluster.answered,
            false => &self.cluster.cancelled,
        };
        counter.fetch_add(1, Ordering::SeqCst);
        self.cluster.in_flight.fetch_sub(1, Ordering::SeqCst);
        self.cluster.changed.notify_waiters();
    }
}

type ChunkStream = Pin<Box<dyn Stream<Item = Result<pb::ExecuteChunk, Status>> + Send>>;

#[tonic::async_trait]
impl AgentCluster for FakeCluster {
    async fn execute(
        &self,
        request: tonic::Request<pb::ExecuteRequest>,
    ) -> Result<tonic::Response<pb::ExecuteReply>, Status> {
        let (reply, call) = self.begin(&request, false);
        tokio::time::sleep(reply.delay).await;
        call.answer();
        if let Some(status) = reply.status() {
            return Err(status);
        }
        Ok(tonic::Response::new(pb::ExecuteReply {
            output: "done".into(),
            usage: Some(reply.usage_for(request.get_ref())),
            provider_quota: reply.quota,
            load: None,
        }))
    }

    type ExecuteStreamStream = ChunkStream;

    async fn execute_stream(
        &self,
        request: tonic::Request<pb::ExecuteRequest>,
    ) -> Result<tonic::Response<ChunkStream>, Status> {
        let (reply, call) = self.begin(&request, true);
        tokio::time::sleep(reply.delay).await;
        if let Some(status) = reply.status() {
            call.answer();
            return Err(status);
        }
        let usage = reply.usage_for(request.get_ref());
        let (tx, rx) = mpsc::channel(4);
        tokio::spawn(async move {
            let n = reply.chunks.len().max(1) as u64;
            let delays = reply
                .chunks
                .iter()
                .copied()
                .chain(std::iter::repeat(Duration::ZERO));
            for (i, delay) in (1..=n).zip(delays) {
                // A caller that leaves is noticed while waiting, too.
                tokio::select! {
                    _ = tokio::time::sleep(delay) => {}
                    _ = tx.closed() => return,
                }
                if let Some((after, outcome)) = &reply.break_after
                    && i as usize > *after
                {
                    let broken = Reply {
                        outcome: outcome.clone(),
                        ..Reply::ok()
                    };
                    if let Some(status) = broken.status() {
                        let _ = tx.send(Err(status)).await;
                    }
                    call.answer();
                    return;
                }
                let last = i == n;
                let chunk = pb::ExecuteChunk {
                    output: format!("chunk {i};").into(),
                    usage: Some(pb::Usage {
                        prompt_tokens: usage.prompt_tokens,
                        completion_tokens: usage.completion_tokens * i / n,
                        cached_prompt_tokens: 0,
                    }),
                    done: last,
                    provider_quota: if last { reply.quota } else { None },
                    load: None,
                };
                if tx.send(Ok(chunk)).await.is_err() {
                    return;
                }
            }
            call.answer();
        });
        Ok(tonic::Response::new(Box::pin(ReceiverStream::new(rx))))
    }
}
