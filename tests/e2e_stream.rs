//! DispatchStream over real gRPC: output arrives as the region produces it;
//! a caller that reads half a stream and goes away cancels the upstream call
//! and is charged only for what was produced.

mod common;

use std::time::Duration;

use common::{ConfigDir, client, dispatcher, eventually, region_sim, region_status, sim_stats};
use dispatcher::pb;

const DISPATCHER_TOML: &str = r#"
[auth]
allow_anonymous = true
[[models]]
name = "gpt-4o"
max_request_tokens = 20000
"#;

/// One token a second of refill on a bucket of a million: what the bucket
/// loses during the test is what was charged.
const REGION: &str = r#"
name = "slow"
endpoint = "ENDPOINT"
[[models]]
name = "gpt-4o"
tokens_per_minute = 60
requests_per_minute = 60000
burst_tokens = 1000000
accounting = "usage"
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streams_output_and_charges_only_what_was_produced_when_dropped() {
    let cfg = ConfigDir::new(DISPATCHER_TOML);
    // 32 tokens a chunk, 500 ms per 1,000 tokens: a chunk every 16 ms.
    let sim = region_sim(
        cfg.path(),
        "slow",
        &[
            "--model",
            "gpt-4o:60:60000:usage",
            "--burst-tokens",
            "1000000",
            "--ms-per-1k-tokens",
            "500",
            "--completion-min-fraction",
            "1",
        ],
    );
    cfg.write_region("slow", &REGION.replace("ENDPOINT", &sim.endpoint()));
    let d = dispatcher(&cfg.config());
    let mut grpc = client(d.addr).await;
    let request = |max_output| pb::DispatchRequest {
        model: "gpt-4o".into(),
        payload: "stream this".into(),
        prompt_tokens: 100,
        max_output_tokens: max_output,
        ..Default::default()
    };

    // A whole stream: several chunks, then a final one with the usage.
    let mut stream = grpc.dispatch_stream(request(200)).await.unwrap().into_inner();
    let mut chunks = Vec::new();
    while let Some(c) = stream.message().await.unwrap() {
        chunks.push(c);
    }
    let last = chunks.last().unwrap();
    assert!(
        chunks.len() >= 7,
        "200 tokens in 32-token chunks, then the final one: {}",
        chunks.len()
    );
    assert!(last.done);
    assert_eq!(last.usage.unwrap().completion_tokens, 200);
    assert!(chunks.iter().all(|c| c.region == "slow" && c.attempts == 1));
    assert!(
        chunks[..chunks.len() - 1]
            .iter()
            .all(|c| !c.done && !c.output.is_empty())
    );
    let settled = eventually(Duration::from_secs(2), || async {
        region_status(d.addr, "slow").await.unwrap().models[0].tokens_reserved == 0
    })
    .await;
    assert!(settled.is_some(), "the finished stream was settled");

    // Half a stream: 2,000 tokens asked for, ten chunks read, then gone.
    let before = region_status(d.addr, "slow").await.unwrap().models[0].tokens_available;
    let sim_before = sim_stats(sim.addr).await.models[0].clone();
    let mut stream = grpc.dispatch_stream(request(2000)).await.unwrap().into_inner();
    let mut received = 0;
    for _ in 0..10 {
        let c = stream.message().await.unwrap().unwrap();
        received = c.usage.unwrap().completion_tokens;
    }
    drop(stream);
    let cancelled = eventually(Duration::from_secs(3), || async {
        sim_stats(sim.addr).await.cancelled >= 1
    })
    .await;
    assert!(cancelled.is_some(), "the upstream call was cancelled");
    let settled = eventually(Duration::from_secs(3), || async {
        region_status(d.addr, "slow").await.unwrap().models[0].tokens_reserved == 0
    })
    .await;
    assert!(settled.is_some(), "the dropped stream was settled");
    let after = region_status(d.addr, "slow").await.unwrap().models[0].tokens_available;
    let sim_after = sim_stats(sim.addr).await.models[0].clone();
    let produced = sim_after.completion_tokens - sim_before.completion_tokens;
    let provider_charged = sim_after.charged_tokens - sim_before.charged_tokens;
    let dispatcher_charged = before - after;
    println!(
        "read {received} tokens; the region produced {produced}; the provider charged {provider_charged}; \
         the dispatcher's bucket was charged {dispatcher_charged} (reservation was {})",
        100 + 2000
    );
    assert!(received >= 300, "ten chunks of 32 tokens");
    assert!(produced < 1000, "generation stopped when the caller went away");
    assert_eq!(
        provider_charged,
        100 + produced,
        "usage accounting: prompt + produced"
    );
    // The bucket refills one token a second, and the region may have
    // produced a chunk or two that never reached the dispatcher.
    assert!(
        dispatcher_charged.abs_diff(provider_charged as i64) <= 80,
        "the dispatcher charged {dispatcher_charged}, the provider {provider_charged}"
    );
    assert!(dispatcher_charged < 1000, "not the whole reservation");
}
