//! One Dispatch, traced: a real OTLP/gRPC receiver (built from the official
//! OpenTelemetry protos) gets spans from the dispatcher and from region-sim,
//! all in the caller's trace, parent/child linked, with region, model and
//! token attributes, and neither the key nor the payload anywhere. The spans
//! arrive because both processes flush on SIGTERM.

mod common;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::{ConfigDir, Proc, eventually, region_toml};
use dispatcher::dispatch::hash_key;
use dispatcher::pb;
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::any_value::Value;
use opentelemetry_proto::tonic::trace::v1::Span;

const KEY: &str = "k-secret-key-123";
const PAYLOAD: &str = "TOP-SECRET-PAYLOAD";
const TRACE_ID: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
const CALLER_SPAN: &str = "00f067aa0ba902b7";

#[derive(Clone, Default)]
struct Receiver {
    spans: Arc<Mutex<Vec<(String, Span)>>>,
}

#[tonic::async_trait]
impl TraceService for Receiver {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        let mut spans = self.spans.lock().unwrap();
        for rs in request.into_inner().resource_spans {
            let service = rs
                .resource
                .iter()
                .flat_map(|r| &r.attributes)
                .find(|kv| kv.key == "service.name")
                .and_then(|kv| kv.value.as_ref())
                .map(|v| format!("{:?}", v.value))
                .unwrap_or_default();
            for ss in rs.scope_spans {
                for span in ss.spans {
                    spans.push((service.clone(), span));
                }
            }
        }
        Ok(tonic::Response::new(ExportTraceServiceResponse::default()))
    }
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn attr(span: &Span, key: &str) -> Option<String> {
    span.attributes
        .iter()
        .find(|kv| kv.key == key)
        .and_then(|kv| kv.value.as_ref())
        .map(|v| match &v.value {
            Some(Value::StringValue(s)) => s.clone(),
            Some(Value::IntValue(i)) => i.to_string(),
            Some(Value::DoubleValue(d)) => d.to_string(),
            Some(Value::BoolValue(b)) => b.to_string(),
            other => format!("{other:?}"),
        })
}

/// A real OTLP/gRPC receiver on a free loopback port, and its endpoint.
fn collector() -> (Receiver, String) {
    let receiver = Receiver::default();
    let (incoming, addr) = dispatcher::grpc::bind("127.0.0.1:0".parse().unwrap()).unwrap();
    let service = receiver.clone();
    tokio::spawn(async move {
        tonic::transport::Server::builder()
            .add_service(TraceServiceServer::new(service))
            .serve_with_incoming(incoming)
            .await
    });
    (receiver, format!("http://{addr}"))
}

/// No span attribute carries the key or the payload.
fn assert_no_secrets(spans: &[(String, Span)]) {
    for (_, s) in spans {
        for kv in &s.attributes {
            let v = format!("{:?}", kv.value);
            assert!(
                !v.contains(KEY) && !v.contains(PAYLOAD),
                "{} carries a secret in {}",
                s.name,
                kv.key
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_trace_from_client_through_dispatcher_to_region() {
    let (receiver, endpoint) = collector();

    let cfg = ConfigDir::new(&format!(
        "[telemetry]\notlp_endpoint = \"{endpoint}\"\n[[models]]\nname = \"gpt-4o\"\n[[tenants]]\nname = \"team-a\"\nkeys = [\"{}\"]\n",
        hash_key(KEY)
    ));
    // Batches go out every 100 ms; the rest on shutdown.
    let env = [("OTEL_BSP_SCHEDULE_DELAY", "100")];
    let mut sim = Proc::start_with_env(
        env!("CARGO_BIN_EXE_region-sim"),
        &[
            "--listen",
            "127.0.0.1:0",
            "--region",
            "east",
            "--model",
            "gpt-4o:600000:1000",
            "--otlp-endpoint",
            &endpoint,
        ],
        &env,
        cfg.path(),
        "region-sim",
    );
    cfg.write_region(
        "east",
        &region_toml(
            "east",
            &sim.endpoint(),
            16,
            &[("gpt-4o", 600_000, 1000, "admission")],
        ),
    );
    let mut d = Proc::start_with_env(
        env!("CARGO_BIN_EXE_dispatcher"),
        &[
            "--config",
            cfg.config().to_str().unwrap(),
            "--listen",
            "127.0.0.1:0",
        ],
        &env,
        cfg.path(),
        "dispatcher",
    );

    let mut grpc = common::client(d.addr).await;
    let mut request = tonic::Request::new(pb::DispatchRequest {
        model: "gpt-4o".into(),
        payload: PAYLOAD.into(),
        prompt_tokens: 120,
        max_output_tokens: 80,
        ..Default::default()
    });
    request
        .metadata_mut()
        .insert("authorization", format!("Bearer {KEY}").parse().unwrap());
    request.metadata_mut().insert(
        "traceparent",
        format!("00-{TRACE_ID}-{CALLER_SPAN}-01").parse().unwrap(),
    );
    let reply = grpc.dispatch(request).await.unwrap().into_inner();
    let usage = reply.usage.unwrap();

    // A job: its run is a trace of its own, named `job`, with its id.
    let mut jobs = pb::jobs_client::JobsClient::connect(d.endpoint()).await.unwrap();
    let with_key = |r: pb::JobRef| {
        let mut r = tonic::Request::new(r);
        r.metadata_mut()
            .insert("authorization", format!("Bearer {KEY}").parse().unwrap());
        r
    };
    let mut submit = tonic::Request::new(pb::SubmitJobRequest {
        request: Some(pb::DispatchRequest {
            model: "gpt-4o".into(),
            payload: PAYLOAD.into(),
            prompt_tokens: 120,
            max_output_tokens: 80,
            ..Default::default()
        }),
        ..Default::default()
    });
    submit
        .metadata_mut()
        .insert("authorization", format!("Bearer {KEY}").parse().unwrap());
    let job_id = jobs.submit_job(submit).await.unwrap().into_inner().job_id;
    eventually(Duration::from_secs(10), || {
        let mut jobs = jobs.clone();
        let r = with_key(pb::JobRef {
            job_id: job_id.clone(),
        });
        async move { jobs.get_job(r).await.unwrap().into_inner().state() == pb::JobState::Done }
    })
    .await
    .expect("the job ran");

    d.terminate();
    sim.terminate();
    assert!(
        d.wait(Duration::from_secs(10)).is_some_and(|s| s.success()),
        "the dispatcher exits 0 on SIGTERM"
    );
    assert!(
        sim.wait(Duration::from_secs(10)).is_some_and(|s| s.success()),
        "region-sim exits 0 on SIGTERM"
    );
    let both = eventually(Duration::from_secs(10), || async {
        let spans = receiver.spans.lock().unwrap();
        spans
            .iter()
            .any(|(svc, s)| svc.contains("region-sim") && s.name == "execute")
            && spans
                .iter()
                .any(|(svc, s)| svc.contains("dispatcher") && s.name == "dispatch")
    })
    .await;
    let spans = receiver.spans.lock().unwrap().clone();
    for (svc, s) in &spans {
        println!(
            "{svc:<28} {:<13} trace {} span {} parent {} {:?}",
            s.name,
            hex(&s.trace_id),
            hex(&s.span_id),
            hex(&s.parent_span_id),
            s.attributes.iter().map(|kv| kv.key.as_str()).collect::<Vec<_>>()
        );
    }
    assert!(both.is_some(), "spans from both processes arrived");
    let ours: Vec<&(String, Span)> = spans
        .iter()
        .filter(|(_, s)| hex(&s.trace_id) == TRACE_ID)
        .collect();
    let find = |service: &str, name: &str| {
        ours.iter()
            .find(|(svc, s)| svc.contains(service) && s.name == name)
            .map(|(_, s)| s.clone())
            .unwrap_or_else(|| panic!("no {name} span from {service} in the caller's trace"))
    };
    let dispatch = find("dispatcher", "dispatch");
    let forward = find("dispatcher", "forward");
    let settle = find("dispatcher", "settle");
    let queue = find("dispatcher", "queue");
    let execute = find("region-sim", "execute");
    assert_eq!(
        hex(&dispatch.parent_span_id),
        CALLER_SPAN,
        "the dispatcher continues the caller's trace"
    );
    assert_eq!(forward.parent_span_id, dispatch.span_id);
    assert_eq!(queue.parent_span_id, dispatch.span_id);
    assert_eq!(settle.parent_span_id, dispatch.span_id);
    assert_eq!(
        execute.parent_span_id, forward.span_id,
        "region-sim continues the forward span"
    );
    assert_eq!(attr(&dispatch, "tenant").as_deref(), Some("team-a"));
    assert_eq!(attr(&dispatch, "protocol").as_deref(), Some("grpc"));
    assert_eq!(attr(&dispatch, "rpc").as_deref(), Some("Dispatch"));
    assert_eq!(attr(&dispatch, "model").as_deref(), Some("gpt-4o"));
    assert_eq!(attr(&dispatch, "region").as_deref(), Some("east"));
    assert_eq!(
        attr(&dispatch, "prompt_tokens"),
        Some(usage.prompt_tokens.to_string())
    );
    assert_eq!(
        attr(&dispatch, "completion_tokens"),
        Some(usage.completion_tokens.to_string())
    );
    assert_eq!(attr(&dispatch, "outcome").as_deref(), Some("ok"));
    assert_eq!(attr(&forward, "region").as_deref(), Some("east"));
    assert_eq!(attr(&forward, "reserved_tokens").as_deref(), Some("200"));
    assert_eq!(attr(&execute, "model").as_deref(), Some("gpt-4o"));
    // The job's run: a `job` span with its id and tenant, the engine's
    // spans under it, and the region's under those.
    let job = spans
        .iter()
        .map(|(_, s)| s)
        .find(|s| s.name == "job" && attr(s, "job_id").as_deref() == Some(job_id.as_str()))
        .unwrap_or_else(|| panic!("no job span for {job_id}"));
    assert_eq!(attr(job, "tenant").as_deref(), Some("team-a"));
    assert_eq!(attr(job, "model").as_deref(), Some("gpt-4o"));
    let job_forward = spans
        .iter()
        .map(|(_, s)| s)
        .find(|s| s.name == "forward" && s.parent_span_id == job.span_id)
        .expect("the job's forward span is the job span's child");
    assert!(
        spans
            .iter()
            .any(|(svc, s)| svc.contains("region-sim") && s.parent_span_id == job_forward.span_id),
        "region-sim continues the job's trace"
    );
    assert_eq!(
        attr(&execute, "completion_tokens"),
        Some(usage.completion_tokens.to_string())
    );
    assert_no_secrets(&spans);
}

/// A call through the OpenAI front door: its `dispatch` span continues the
/// caller's W3C `traceparent`, says `protocol = "openai"`, and carries
/// neither the key nor the body.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_openai_call_continues_the_callers_trace() {
    let (receiver, endpoint) = collector();
    let cfg = ConfigDir::new(&format!(
        "[telemetry]\notlp_endpoint = \"{endpoint}\"\n[openai]\nlisten = \"127.0.0.1:0\"\n\
         [[models]]\nname = \"gpt-4o\"\n[[tenants]]\nname = \"team-a\"\nkeys = [\"{}\"]\n",
        hash_key(KEY)
    ));
    let sim = common::region_sim(cfg.path(), "east", &["--model", "gpt-4o:600000:1000"]);
    cfg.write_region(
        "east",
        &region_toml(
            "east",
            &sim.endpoint(),
            16,
            &[("gpt-4o", 600_000, 1000, "admission")],
        ),
    );
    let env = [("OTEL_BSP_SCHEDULE_DELAY", "100")];
    let mut d = Proc::start_with_env(
        env!("CARGO_BIN_EXE_dispatcher"),
        &[
            "--config",
            cfg.config().to_str().unwrap(),
            "--listen",
            "127.0.0.1:0",
        ],
        &env,
        cfg.path(),
        "dispatcher",
    );
    let body = format!(
        r#"{{"model":"gpt-4o","messages":[{{"role":"user","content":"{PAYLOAD}"}}],"max_tokens":20}}"#
    );
    let auth = format!("Bearer {KEY}");
    let parent = format!("00-{TRACE_ID}-{CALLER_SPAN}-01");
    let a = common::http_client::call(
        d.listener("openai"),
        http::Method::POST,
        "/v1/chat/completions",
        &[("authorization", &auth), ("traceparent", &parent)],
        &body,
    )
    .await;
    assert_eq!(a.status, 200, "{}", String::from_utf8_lossy(&a.body));
    d.terminate();
    assert!(d.wait(Duration::from_secs(10)).is_some_and(|s| s.success()));
    let arrived = eventually(Duration::from_secs(10), || async {
        receiver
            .spans
            .lock()
            .unwrap()
            .iter()
            .any(|(_, s)| s.name == "dispatch" && hex(&s.trace_id) == TRACE_ID)
    })
    .await;
    assert!(
        arrived.is_some(),
        "the door's dispatch span arrived in the caller's trace"
    );
    let spans = receiver.spans.lock().unwrap().clone();
    let dispatch = spans
        .iter()
        .map(|(_, s)| s)
        .find(|s| s.name == "dispatch" && hex(&s.trace_id) == TRACE_ID)
        .unwrap();
    assert_eq!(hex(&dispatch.parent_span_id), CALLER_SPAN);
    assert_eq!(attr(dispatch, "protocol").as_deref(), Some("openai"));
    assert_eq!(attr(dispatch, "rpc").as_deref(), Some("ChatCompletions"));
    assert_eq!(attr(dispatch, "tenant").as_deref(), Some("team-a"));
    assert_eq!(attr(dispatch, "region").as_deref(), Some("east"));
    assert_eq!(attr(dispatch, "outcome").as_deref(), Some("ok"));
    assert!(
        spans
            .iter()
            .any(|(_, s)| s.name == "forward" && s.parent_span_id == dispatch.span_id),
        "the engine's spans are the door span's children"
    );
    for (_, s) in &spans {
        for kv in &s.attributes {
            let v = format!("{:?}", kv.value);
            assert!(
                !v.contains(KEY) && !v.contains(PAYLOAD),
                "{} carries a secret in {}",
                s.name,
                kv.key
            );
        }
    }
}
