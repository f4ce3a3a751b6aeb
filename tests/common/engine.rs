//! The engine in process against fake AgentClusters on an in-memory network
//! (`tokio::io::duplex` pipes behind the engine's `Connector`), for tests on
//! a paused clock. No sockets: a reply in transit on a loopback socket is
//! invisible to tokio's paused clock, which may then jump ahead while it
//! waits (an in-memory reply wakes its reader at once). The fakes wait with
//! `tokio::time::sleep`, so the virtual clock drives them too.

use std::collections::{HashMap, VecDeque};
use std::path::Path;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use dispatcher::config::{self, Config};
use dispatcher::core::{CircuitState, RegionState};
use dispatcher::dispatch::{DispatchError, Engine, hash_key};
use dispatcher::forward::{Connecting, Connector, Transport};
use dispatcher::pb;
use dispatcher::pb::agent_cluster_server::{AgentCluster, AgentClusterServer};
use parking_lot::Mutex;
use tokio::io::DuplexStream;
use tokio::sync::{Notify, mpsc};
use tokio::time::Instant;
use tokio_stream::wrappers::{ReceiverStream, UnboundedReceiverStream};
use tokio_stream::{Stream, StreamExt};
use tonic::service::Routes;
use tonic::{Code, Status};
use tonic_types::{ErrorDetails, StatusExt};

/// Tenant "a"'s and tenant "b"'s credentials.
pub const KEY_A: Option<&str> = Some("Bearer key-a");
pub const KEY_B: Option<&str> = Some("Bearer key-b");

/// Bytes a pipe buffers each way (the HTTP/2 window is 64 KiB anyway).
const PIPE_BYTES: usize = 64 * 1024;

/// Authorities served in memory: connecting to one hands the server one end
/// of a new pipe.
#[derive(Clone, Default)]
pub struct Net {
    inner: Arc<NetInner>,
}

#[derive(Default)]
struct NetInner {
    listeners: Mutex<HashMap<String, mpsc::UnboundedSender<DuplexStream>>>,
    connects: AtomicU64,
}

impl Net {
    pub fn new() -> Self {
        Self::default()
    }

    /// Serves `routes` at `authority` (`host:port`) from now on.
    pub fn serve(&self, authority: &str, routes: Routes) {
        let (tx, rx) = mpsc::unbounded_channel();
        self.inner.listeners.lock().insert(authority.to_string(), tx);
        let incoming = UnboundedReceiverStream::new(rx).map(Ok::<_, std::io::Error>);
        tokio::spawn(
            tonic::transport::Server::builder()
                .add_routes(routes)
                .serve_with_incoming(incoming),
        );
    }

    /// Serves a fake cluster at `authority`.
    pub fn serve_cluster(&self, authority: &str, cluster: &FakeCluster) {
        self.serve(authority, Routes::new(AgentClusterServer::new(cluster.clone())));
    }

    /// New connections to `authority` are refused from now on (open ones
    /// stay open).
    pub fn unplug(&self, authority: &str) {
        self.inner.listeners.lock().remove(authority);
    }

    /// Connections opened so far.
    pub fn connects(&self) -> u64 {
        self.inner.connects.load(Ordering::SeqCst)
    }

    pub fn connector(&self) -> Arc<dyn Connector> {
        Arc::new(self.clone())
    }
}

impl Connector for Net {
    fn connect(&self, authority: &str) -> Connecting {
        let listener = self.inner.listeners.lock().get(authority).cloned();
        let authority = authority.to_string();
        let connects = self.inner.clone();
        Box::pin(async move {
            let refused = || std::io::Error::new(std::io::ErrorKind::ConnectionRefused, authority.clone());
            let listener = listener.ok_or_else(refused)?;
            let (ours, theirs) = tokio::io::duplex(PIPE_BYTES);
            listener.send(theirs).map_err(|_| refused())?;
            connects.connects.fetch_add(1, Ordering::SeqCst);
            Ok(Transport::other(ours))
        })
    }
}

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
}

impl Reply {
    pub fn ok() -> Self {
        Self {
            delay: Duration::ZERO,
            outcome: Outcome::Ok,
            usage: None,
            quota: None,
            chunks: Vec::new(),
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
                let last = i == n;
                let chunk = pb::ExecuteChunk {
                    output: format!("chunk {i};").into(),
                    usage: Some(pb::Usage {
                        prompt_tokens: usage.prompt_tokens,
                        completion_tokens: usage.completion_tokens * i / n,
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

/// dispatcher.toml for these tests: `extra` (its own tables, such as
/// `[routing]`), then model gpt-4o and tenants "a" and "b" (keys `KEY_A`,
/// `KEY_B`), no anonymous use.
pub fn dispatcher_toml(extra: &str) -> String {
    format!(
        r#"{extra}
[[models]]
name = "gpt-4o"
max_request_tokens = 100000

[[tenants]]
name = "a"
keys = ["{a}"]

[[tenants]]
name = "b"
keys = ["{b}"]
"#,
        a = hash_key("key-a"),
        b = hash_key("key-b"),
    )
}

/// The endpoint of region `name` on the in-memory network.
pub fn endpoint(name: &str) -> String {
    format!("http://{name}.cluster:50051")
}

/// A region file: its name, its endpoint on the network, then `rest`.
pub fn region_toml(name: &str, rest: &str) -> String {
    format!("name = {name:?}\nendpoint = {:?}\n{rest}", endpoint(name))
}

/// A region serving gpt-4o with `tokens_per_minute` and a bucket of
/// `burst_tokens`, charged at admission (what a request reserves is what it
/// costs, whatever it reports), requests per minute to spare; `extra` are
/// the region's own keys (`max_concurrent = 1`).
pub fn gpt_region(name: &str, tokens_per_minute: u64, burst_tokens: u64, extra: &str) -> String {
    region_toml(
        name,
        &format!(
            r#"{extra}
[[models]]
name = "gpt-4o"
tokens_per_minute = {tokens_per_minute}
burst_tokens = {burst_tokens}
requests_per_minute = 1000000
accounting = "admission"
"#
        ),
    )
}

pub fn config(dispatcher: &str, regions: &[String]) -> Config {
    let mut c = config::parse_dispatcher(dispatcher, Path::new("dispatcher.toml"), Some(HashMap::new()))
        .unwrap_or_else(|e| panic!("{e}"));
    c.regions = regions
        .iter()
        .enumerate()
        .map(|(i, r)| {
            config::parse_region(r, Path::new(&format!("regions/{i}.toml")), &c.models)
                .unwrap_or_else(|e| panic!("{e}"))
        })
        .collect();
    c
}

/// Each region's name and endpoint, as the engine takes them.
pub fn endpoints(c: &Config) -> Vec<(String, String)> {
    c.regions
        .iter()
        .map(|r| (r.spec.name.clone(), r.endpoint.clone().expect("an endpoint")))
        .collect()
}

/// An engine and, for each of its regions, a fake cluster answering at
/// the region's endpoint.
pub struct World {
    pub net: Net,
    pub engine: Arc<Engine>,
    pub clusters: HashMap<String, FakeCluster>,
    /// When the world started, on the paused clock.
    pub t0: Instant,
}

impl World {
    pub fn start(c: &Config) -> World {
        let net = Net::new();
        let mut clusters = HashMap::new();
        for (name, endpoint) in endpoints(c) {
            let cluster = FakeCluster::new();
            let authority = endpoint.trim_start_matches("http://").to_string();
            net.serve_cluster(&authority, &cluster);
            clusters.insert(name, cluster);
        }
        let engine = Engine::with_connector(c, &endpoints(c), net.connector()).unwrap();
        engine.spawn_pump(Default::default());
        World {
            net,
            engine,
            clusters,
            t0: Instant::now(),
        }
    }

    pub fn cluster(&self, region: &str) -> &FakeCluster {
        &self.clusters[region]
    }

    /// Time since the world started, on the paused clock.
    pub fn elapsed(&self) -> Duration {
        self.t0.elapsed()
    }

    /// A look at a region's state, now.
    pub fn region<T>(&self, name: &str, f: impl FnOnce(&RegionState, std::time::Instant) -> T) -> T {
        self.engine.with_router(|router| {
            f(
                router.region(name).expect("a configured region"),
                dispatcher::clock::now(),
            )
        })
    }

    pub fn circuit(&self, name: &str) -> CircuitState {
        self.region(name, |r, now| r.circuit(now))
    }

    /// What region `name` holds and what was counted against it.
    pub fn blame(&self, name: &str) -> Blame {
        self.region(name, |r, now| Blame {
            circuit: r.circuit(now).name(),
            failed: r.load().failed(),
            error_rate: r.load().error_rate(now),
            in_flight: r.load().in_flight(),
        })
    }

    /// Calls to all clusters.
    pub fn calls(&self) -> u64 {
        self.clusters.values().map(FakeCluster::calls).sum()
    }

    /// `dispatch` in a task of its own, so that the test can watch it wait.
    pub fn spawn_dispatch(
        &self,
        r: pb::DispatchRequest,
        timeout: Option<Duration>,
        key: Option<&'static str>,
    ) -> tokio::task::JoinHandle<(Result<dispatcher::dispatch::Dispatched, DispatchError>, Duration)> {
        let engine = self.engine.clone();
        tokio::spawn(async move {
            let start = Instant::now();
            let result = engine.dispatch(r, timeout, key).await;
            (result, start.elapsed())
        })
    }
}

/// What a region holds and what was counted against it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Blame {
    pub circuit: &'static str,
    pub failed: u64,
    pub error_rate: f64,
    pub in_flight: u32,
}

impl Blame {
    /// Nothing held, nothing counted against it.
    pub const NONE: Blame = Blame {
        circuit: "closed",
        failed: 0,
        error_rate: 0.0,
        in_flight: 0,
    };
}

/// A gpt-4o request of `prompt` + `max_output` tokens.
pub fn request(prompt: u64, max_output: u64) -> pb::DispatchRequest {
    pb::DispatchRequest {
        model: "gpt-4o".into(),
        payload: "work".into(),
        prompt_tokens: prompt,
        max_output_tokens: max_output,
        ..Default::default()
    }
}

/// The status a caller would get, and its RetryInfo.
pub fn status(e: &DispatchError) -> (Code, Option<Duration>) {
    let s = dispatcher::server::to_status(e);
    let retry = s.get_details_retry_info().and_then(|r| r.retry_delay);
    (s.code(), retry)
}

/// Lets every task that can run do so, without moving the paused clock.
pub async fn settle() {
    for _ in 0..100 {
        tokio::task::yield_now().await;
    }
}
