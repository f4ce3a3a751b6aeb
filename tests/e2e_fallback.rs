//! End to end: fallback chains against real region-sim processes. Every
//! gpt-4o region runs out of quota; requests (unary and streamed) are then
//! served by the fallback model, and the replies say which model served
//! and which were tried. A request that forbids fallback gets gpt-4o's
//! answer; Route shows the plan.

mod common;

use common::{ConfigDir, client, dispatcher, region_sim, region_toml};
use dispatcher::pb;
use tokio_stream::StreamExt;
use tonic::Code;

const DISPATCHER_TOML: &str = r#"
[auth]
allow_anonymous = true
[routing]
max_queue_wait = "200ms"
[[models]]
name = "gpt-4o"
[[models]]
name = "mini"
[[fallbacks]]
model = "gpt-4o"
then = ["mini"]
on = ["no_quota", "unavailable"]
"#;

/// gpt-4o: 1000 tokens a minute per region, a few requests' worth.
const GPT_TPM: u64 = 1_000;

fn request() -> pb::DispatchRequest {
    pb::DispatchRequest {
        model: "gpt-4o".into(),
        payload: b"hello".to_vec().into(),
        prompt_tokens: 100,
        max_output_tokens: 100,
        ..Default::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_gpt_4o_region_out_of_quota_is_served_by_the_fallback_model() {
    let cfg = ConfigDir::new(DISPATCHER_TOML);
    let mut sims = Vec::new();
    for name in ["us", "eu"] {
        let gpt = format!("gpt-4o:{GPT_TPM}:1000:admission");
        let sim = region_sim(
            cfg.path(),
            name,
            &[
                "--model",
                &gpt,
                "--model",
                "mini:10000000:100000:admission",
                "--ms-per-1k-tokens",
                "1",
            ],
        );
        let models = [
            ("gpt-4o", GPT_TPM, 1_000, "admission"),
            ("mini", 10_000_000, 100_000, "admission"),
        ];
        cfg.write_region(name, &region_toml(name, &sim.endpoint(), 64, &models));
        sims.push(sim);
    }
    let d = dispatcher(&cfg.config());
    let mut grpc = client(d.addr).await;

    // 200 tokens a request: each region's gpt-4o bucket takes 5, then
    // both are out of quota for many seconds.
    let mut by_model = std::collections::BTreeMap::<String, u32>::new();
    for i in 0..20 {
        let reply = grpc.dispatch(request()).await.unwrap().into_inner();
        match reply.model.as_str() {
            "gpt-4o" => assert!(reply.models_tried.is_empty(), "{reply:?}"),
            "mini" => assert_eq!(reply.models_tried, ["gpt-4o"], "request {i}: {reply:?}"),
            other => panic!("served by {other:?}"),
        }
        *by_model.entry(reply.model).or_default() += 1;
    }
    assert_eq!(by_model["gpt-4o"], 10, "{by_model:?}");
    assert_eq!(by_model["mini"], 10, "{by_model:?}");

    // Streams fall back too, and each chunk says so.
    let mut stream = grpc.dispatch_stream(request()).await.unwrap().into_inner();
    let mut last = None;
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.unwrap();
        assert_eq!(
            (chunk.model.as_str(), chunk.models_tried.as_slice()),
            ("mini", &["gpt-4o".to_string()][..])
        );
        last = Some(chunk);
    }
    assert!(last.expect("chunks").done);

    // Forbidden by the request: gpt-4o's own answer.
    let refused = grpc
        .dispatch(pb::DispatchRequest {
            no_fallback: true,
            ..request()
        })
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::ResourceExhausted, "{refused:?}");

    // Route shows both steps: gpt-4o with no region now, then mini.
    let route = grpc.route(request()).await.unwrap().into_inner();
    let plan: Vec<_> = route
        .plan
        .iter()
        .map(|s| (s.model.as_str(), s.region.is_empty()))
        .collect();
    assert_eq!(plan, [("gpt-4o", true), ("mini", false)], "{route:?}");
    assert_eq!(route.plan[0].fall_back_on, ["no_quota", "unavailable"]);
    assert!(!route.plan[0].error.is_empty());
}
