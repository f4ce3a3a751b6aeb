//! A deadline the caller chose is the caller's outcome, not the region's: it
//! never feeds the region's breaker or error rate (unary calls and streams
//! alike), it is answered DEADLINE_EXCEEDED however the region reports it,
//! and a stream whose caller stops reading still ends at its deadline, its
//! slot and reservation freed. The engine in-process against a simulated or
//! a fake cluster over gRPC on an in-memory network, on a paused clock (no
//! sockets: a reply in transit on one is invisible to the paused clock,
//! which could jump ahead meanwhile).

mod common;

use std::collections::HashMap;
use std::path::Path;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use dispatcher::config::{self, SimulateConfig};
use dispatcher::core::{Accounting, ModelLimits};
use dispatcher::dispatch::{ChunkStream, DispatchError, Engine, hash_key};
use dispatcher::pb;
use dispatcher::pb::agent_cluster_server::{AgentCluster, AgentClusterServer};
use dispatcher::server::to_status;
use dispatcher::sim::{SimService, SimSpec};
use tokio_stream::{Stream, StreamExt};
use tonic::service::Routes;
use tonic::{Code, Status};

use common::engine::Net;

const DISPATCHER_TOML: &str = r#"
[[models]]
name = "gpt-4o"
max_request_tokens = 20000
[[tenants]]
name = "impatient"
keys = ["HASH_A"]
[[tenants]]
name = "patient"
keys = ["HASH_B"]
"#;

/// One token a second of refill on a bucket of a million: what the bucket
/// loses during a test is what was charged.
const REGION: &str = r#"
name = "r"
endpoint = "ENDPOINT"
[[models]]
name = "gpt-4o"
tokens_per_minute = 60
requests_per_minute = 60000
burst_tokens = 1000000
accounting = "usage"
"#;

const IMPATIENT: Option<&str> = Some("Bearer key-a");
const PATIENT: Option<&str> = Some("Bearer key-b");

/// Where the cluster answers on the in-memory network.
const AUTHORITY: &str = "r.cluster:50051";
const ENDPOINT: &str = "http://r.cluster:50051";

/// The engine, reaching region "r" on `net`.
fn engine(net: &Net) -> Arc<Engine> {
    let endpoint = ENDPOINT;
    let toml = DISPATCHER_TOML
        .replace("HASH_A", &hash_key("key-a"))
        .replace("HASH_B", &hash_key("key-b"));
    let mut c = config::parse_dispatcher(&toml, Path::new("dispatcher.toml"), Some(HashMap::new())).unwrap();
    let region = REGION.replace("ENDPOINT", endpoint);
    c.regions = vec![config::parse_region(&region, Path::new("regions/r.toml"), &c.models).unwrap()];
    let engine = Engine::with_connector(&c, &[("r".into(), endpoint.into())], net.connector()).unwrap();
    engine.spawn_pump(Default::default());
    engine
}

/// A simulated cluster: 10 prompt tokens take 10 ms, then a 32-token chunk
/// every 32 ms; 3,000 output tokens take 3 s. Served on `net`; the handle
/// reads its counters.
fn slow_sim(net: &Net) -> SimService {
    let limits = ModelLimits {
        tokens_per_minute: 10_000_000,
        requests_per_minute: 1_000_000,
        burst_tokens: None,
        burst_requests: None,
        accounting: Accounting::Usage,
    };
    let spec = SimSpec {
        region: "r".into(),
        models: vec![("gpt-4o".into(), limits)],
        settings: SimulateConfig {
            ms_per_1k_tokens: 1000.0,
            base_latency_ms: 0.0,
            completion_min_fraction: 1.0,
            ..Default::default()
        },
    };
    let (health, _) = tonic_health::server::health_reporter();
    let sim = SimService::new(spec, health);
    net.serve(AUTHORITY, Routes::new(AgentClusterServer::new(sim.clone())));
    sim
}

fn request(max_output_tokens: u64) -> pb::DispatchRequest {
    pb::DispatchRequest {
        model: "gpt-4o".into(),
        payload: "work".into(),
        prompt_tokens: 10,
        max_output_tokens,
        ..Default::default()
    }
}

/// What the region's breaker and load state say.
#[derive(Debug, PartialEq)]
struct RegionView {
    circuit: &'static str,
    error_rate: f64,
    failed: u64,
    in_flight: u32,
    tokens_reserved: u64,
    tokens_available: i64,
}

fn region(engine: &Engine) -> RegionView {
    let view = engine.view(dispatcher::clock::now());
    let r = view.regions.iter().find(|r| r.name == "r").unwrap();
    let quota = &r.models[0];
    RegionView {
        circuit: r.circuit.name(),
        error_rate: r.error_rate,
        failed: r.failed,
        in_flight: r.in_flight,
        tokens_reserved: quota.tokens_reserved,
        tokens_available: quota.tokens_available,
    }
}

/// Nothing was held against the region, and nothing was counted against it.
fn assert_region_unharmed(engine: &Engine) {
    let r = region(engine);
    assert_eq!(
        (r.circuit, r.error_rate, r.failed),
        ("closed", 0.0, 0),
        "callers' deadlines are not the region's failures: {r:?}"
    );
    assert_eq!((r.in_flight, r.tokens_reserved), (0, 0), "{r:?}");
}

fn is_deadline(e: &DispatchError) -> bool {
    matches!(e, DispatchError::DeadlineExceeded(_)) && to_status(e).code() == Code::DeadlineExceeded
}

#[tokio::test(start_paused = true)]
async fn callers_deadlines_leave_the_regions_circuit_closed() {
    let net = Net::new();
    slow_sim(&net);
    let engine = engine(&net);
    // Thirty calls that need 3 s, each with a 20 ms deadline.
    let calls: Vec<_> = (0..30)
        .map(|_| {
            let e = engine.clone();
            tokio::spawn(async move {
                e.dispatch(request(3000), Some(Duration::from_millis(20)), IMPATIENT)
                    .await
            })
        })
        .collect();
    let mut results = Vec::new();
    for c in calls {
        results.push(c.await.unwrap());
    }
    assert_region_unharmed(&engine);
    for r in &results {
        assert!(matches!(r, Err(e) if is_deadline(e)), "{r:?}");
    }
    // Another tenant, with the default deadline, is served.
    let served = engine.dispatch(request(100), None, PATIENT).await.unwrap();
    assert_eq!(served.region, "r");
}

#[tokio::test(start_paused = true)]
async fn streams_cut_at_the_callers_deadline_leave_the_circuit_closed() {
    let net = Net::new();
    slow_sim(&net);
    let engine = engine(&net);
    // Thirty streams that need 3 s, read as they come, each with a 200 ms
    // deadline: they end mid-stream.
    let calls: Vec<_> = (0..30)
        .map(|_| {
            let e = engine.clone();
            tokio::spawn(async move {
                let mut stream = match e
                    .dispatch_stream(request(3000), Some(Duration::from_millis(200)), IMPATIENT)
                    .await
                {
                    Ok(s) => s,
                    Err(e) => return (0, Some(e)),
                };
                let mut chunks = 0;
                while let Some(item) = stream.next().await {
                    match item {
                        Ok(_) => chunks += 1,
                        Err(e) => return (chunks, Some(e)),
                    }
                }
                (chunks, None)
            })
        })
        .collect();
    let mut results = Vec::new();
    for c in calls {
        results.push(c.await.unwrap());
    }
    assert_region_unharmed(&engine);
    for (chunks, end) in &results {
        assert!(*chunks > 0, "output arrived before the deadline");
        assert!(matches!(end, Some(e) if is_deadline(e)), "{end:?}");
    }
    let served = engine.dispatch(request(100), None, PATIENT).await.unwrap();
    assert_eq!(served.region, "r");
}

/// A cluster that answers every call with a timeout of its own: when the
/// propagated deadline runs out there, `early` before the dispatcher's own
/// timer (clusters' timers tick by the millisecond, not in step with ours),
/// in the words of tonic's server ("Timeout expired") or grpc-go's.
#[derive(Clone)]
struct Expiring {
    code: Code,
    early: Duration,
}

impl Expiring {
    async fn expire(&self, timeout: Option<Duration>) -> Status {
        let timeout = timeout.expect("the caller's deadline is propagated");
        tokio::time::sleep(timeout.saturating_sub(self.early)).await;
        Status::new(self.code, "Timeout expired")
    }
}

#[tonic::async_trait]
impl AgentCluster for Expiring {
    async fn execute(
        &self,
        request: tonic::Request<pb::ExecuteRequest>,
    ) -> Result<tonic::Response<pb::ExecuteReply>, Status> {
        Err(self
            .expire(dispatcher::grpc::grpc_timeout(request.metadata()))
            .await)
    }

    type ExecuteStreamStream = Pin<Box<dyn Stream<Item = Result<pb::ExecuteChunk, Status>> + Send>>;

    async fn execute_stream(
        &self,
        request: tonic::Request<pb::ExecuteRequest>,
    ) -> Result<tonic::Response<Self::ExecuteStreamStream>, Status> {
        Err(self
            .expire(dispatcher::grpc::grpc_timeout(request.metadata()))
            .await)
    }
}

/// An engine whose region "r" is `cluster`.
fn serve(cluster: Expiring) -> Arc<Engine> {
    let net = Net::new();
    net.serve(AUTHORITY, Routes::new(AgentClusterServer::new(cluster)));
    engine(&net)
}

async fn stream_error(engine: &Arc<Engine>, timeout: Duration) -> DispatchError {
    let r: Result<ChunkStream, DispatchError> = engine
        .dispatch_stream(request(100), Some(timeout), IMPATIENT)
        .await;
    match r {
        Ok(_) => panic!("the fake cluster never answers with output"),
        Err(e) => e,
    }
}

#[tokio::test(start_paused = true)]
async fn a_region_reporting_the_propagated_deadline_is_answered_deadline_exceeded() {
    for code in [Code::Cancelled, Code::DeadlineExceeded] {
        let engine = serve(Expiring {
            code,
            early: Duration::from_millis(1),
        });
        for _ in 0..10 {
            let e = engine
                .dispatch(request(100), Some(Duration::from_millis(100)), IMPATIENT)
                .await
                .unwrap_err();
            assert!(is_deadline(&e), "{code:?}: {e} ({:?})", to_status(&e).code());
            let e = stream_error(&engine, Duration::from_millis(100)).await;
            assert!(
                is_deadline(&e),
                "{code:?}, streamed: {e} ({:?})",
                to_status(&e).code()
            );
        }
        assert_region_unharmed(&engine);
    }
}

#[tokio::test(start_paused = true)]
async fn a_region_timing_out_on_its_own_is_the_regions_failure() {
    // Long before the caller's deadline: the region's own doing.
    for code in [Code::Cancelled, Code::DeadlineExceeded] {
        let engine = serve(Expiring {
            code,
            early: Duration::from_millis(150),
        });
        let e = engine
            .dispatch(request(100), Some(Duration::from_millis(200)), IMPATIENT)
            .await
            .unwrap_err();
        assert!(
            matches!(e, DispatchError::Upstream { .. }) && to_status(&e).code() == Code::Unavailable,
            "the caller did not cancel and its deadline has not passed: {e} ({:?})",
            to_status(&e).code()
        );
        assert_eq!(region(&engine).failed, 1, "{code:?}");
    }
}

#[tokio::test(start_paused = true)]
async fn a_stream_nobody_reads_ends_at_its_deadline() {
    let net = Net::new();
    let sim = slow_sim(&net);
    let engine = engine(&net);
    let before = region(&engine).tokens_available;
    let stream = match engine
        .dispatch_stream(request(3000), Some(Duration::from_secs(2)), IMPATIENT)
        .await
    {
        Ok(s) => s,
        Err(e) => panic!("{e}"),
    };
    // The caller never reads: the relay's buffer fills within half a second.
    tokio::time::sleep(Duration::from_millis(2100)).await;

    let r = region(&engine);
    assert_eq!(
        (r.in_flight, r.tokens_reserved),
        (0, 0),
        "the slot and the reservation are freed at the deadline: {r:?}"
    );
    assert_eq!((r.circuit, r.failed), ("closed", 0), "{r:?}");
    assert_eq!(engine.running(), 0, "the relay has ended");
    let view = engine.view(dispatcher::clock::now());
    let tenant = view
        .tenants
        .iter()
        .find(|t| t.report.spec.name == "impatient")
        .unwrap();
    assert_eq!(tenant.report.in_flight, 0);
    let upstream = sim.stats();
    assert_eq!(
        (upstream.in_flight, upstream.cancelled),
        (0, 1),
        "the upstream call was cancelled"
    );
    // Settled for what the cluster produced (usage accounting), give or
    // take the chunk in flight when it was cut.
    let produced = upstream.models[0].completion_tokens;
    assert!(produced > 0 && produced < 3000, "{produced}");
    let charged = before - r.tokens_available;
    assert!(
        (charged - (10 + produced as i64)).abs() <= 64,
        "charged {charged} for 10 prompt and {produced} completion tokens"
    );

    // The response itself ends there: whatever was buffered, then
    // DEADLINE_EXCEEDED, without waiting.
    let items = tokio::time::timeout(Duration::ZERO, stream.collect::<Vec<_>>())
        .await
        .expect("the stream has ended");
    assert!(items.len() <= 20, "{} items", items.len());
    match items.last() {
        Some(Err(e)) => assert!(is_deadline(e), "{e}"),
        other => panic!("ends with DEADLINE_EXCEEDED, not {:?}", other.map(|i| i.is_ok())),
    }
}
