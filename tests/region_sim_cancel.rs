//! region-sim frees a cancelled stream's slot the moment the caller goes
//! away, not when the stream's next chunk would have been due: under churn
//! its slots would otherwise fill with streams nobody reads. A stream whose
//! `grpc-timeout` passes ends there too (tonic bounds the handler, not the
//! stream it returns). On a paused clock, so "at once" means "before any
//! time passes".

use std::time::Duration;

use dispatcher::config::SimulateConfig;
use dispatcher::core::{Accounting, ModelLimits};
use dispatcher::pb;
use dispatcher::pb::agent_cluster_server::AgentCluster;
use dispatcher::sim::{SimService, SimSpec};
use tokio_stream::StreamExt;

const CAPACITY: u32 = 4;

fn sim() -> SimService {
    let (reporter, _health) = tonic_health::server::health_reporter();
    let limits = ModelLimits {
        tokens_per_minute: 1_000_000,
        requests_per_minute: 10_000,
        burst_tokens: None,
        burst_requests: None,
        accounting: Accounting::Usage,
    };
    SimService::new(
        SimSpec {
            region: "r".into(),
            models: vec![("gpt-4o".into(), limits)],
            settings: SimulateConfig {
                // A 32-token chunk every 320 ms; 100 prompt tokens take 1 s.
                ms_per_1k_tokens: 10_000.0,
                base_latency_ms: 0.0,
                completion_min_fraction: 1.0,
                capacity: CAPACITY,
                ..Default::default()
            },
        },
        reporter,
    )
}

fn request() -> tonic::Request<pb::ExecuteRequest> {
    tonic::Request::new(pb::ExecuteRequest {
        request_id: "x".into(),
        tenant: "t".into(),
        model: "gpt-4o".into(),
        prompt_tokens: 100,
        max_output_tokens: 3000,
        ..Default::default()
    })
}

/// Lets every task that is ready run, without letting the clock move.
async fn settle_tasks() {
    for _ in 0..20 {
        tokio::task::yield_now().await;
    }
}

#[tokio::test(start_paused = true)]
async fn a_cancelled_stream_frees_its_slot_at_once() {
    let sim = sim();
    let mut streams = Vec::new();
    for _ in 0..CAPACITY {
        streams.push(sim.execute_stream(request()).await.unwrap().into_inner());
    }
    // Each has produced its first chunk (all at the same moment) when this
    // reads it, and waits for its second.
    for s in &mut streams {
        let first = s.next().await.unwrap().unwrap();
        assert_eq!(first.usage.unwrap().completion_tokens, 32);
    }
    assert_eq!(sim.stats().in_flight, CAPACITY, "every slot is taken");

    let cancelled_at = tokio::time::Instant::now();
    drop(streams);
    settle_tasks().await;
    assert_eq!(
        tokio::time::Instant::now(),
        cancelled_at,
        "no time passed (the test only yielded)"
    );
    let stats = sim.stats();
    assert_eq!(
        stats.in_flight, 0,
        "the cancelled streams' slots are free at once, not when their next chunk is due"
    );
    assert_eq!(stats.cancelled, CAPACITY as u64);
    let model = &stats.models[0];
    assert_eq!(
        model.completion_tokens,
        32 * CAPACITY as u64,
        "the provider counts what each stream produced before it was cancelled"
    );

    // The freed slots take new work without waiting.
    let again = tokio::time::timeout(Duration::ZERO, sim.execute_stream(request())).await;
    assert!(matches!(again, Ok(Ok(_))), "a new stream is admitted at once");
}

#[tokio::test(start_paused = true)]
async fn a_stream_ends_at_its_grpc_timeout_and_frees_its_slot() {
    let sim = sim();
    let mut r = request();
    r.set_timeout(Duration::from_millis(1500));
    let started = tokio::time::Instant::now();
    let mut stream = sim.execute_stream(r).await.unwrap().into_inner();
    // 1 s to the first token, then a 32-token chunk every 320 ms.
    let mut produced = 0;
    let end = loop {
        match stream
            .next()
            .await
            .expect("the stream ended OK: it ran past its deadline")
        {
            Ok(chunk) => produced = chunk.usage.unwrap().completion_tokens,
            Err(status) => break status,
        }
    };
    assert_eq!(end.code(), tonic::Code::DeadlineExceeded, "{end:?}");
    assert_eq!(
        started.elapsed(),
        Duration::from_millis(1500),
        "at the deadline, not at the next chunk"
    );
    assert_eq!(produced, 32, "one chunk (at 1.32 s) before the deadline");
    settle_tasks().await;
    let stats = sim.stats();
    assert_eq!(stats.in_flight, 0, "its slot is free");
    assert_eq!(
        stats.models[0].completion_tokens, 32,
        "the provider counts what it produced"
    );
    assert!(stream.next().await.is_none(), "nothing after the status");
}
