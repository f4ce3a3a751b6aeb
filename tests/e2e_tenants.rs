//! Tenants end to end over gRPC with real region-sim processes: two tenants
//! with different keys and weights 1:3 saturate the regions for 30 s and the
//! tokens in their replies split 1:3; a wrong key is UNAUTHENTICATED; a
//! tenant over its requests per second gets RESOURCE_EXHAUSTED with
//! QuotaFailure and RetryInfo details, as grpcurl shows them.

mod common;

use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use common::jobs::with_key;
use common::{ConfigDir, Lcg, SimRegion, client, dispatcher, tools};
use dispatcher::dispatch::hash_key;
use dispatcher::pb;
use tonic::Code;
use tonic::transport::Channel;
use tonic_types::StatusExt;

fn config() -> String {
    format!(
        r#"
[routing]
max_queue_wait = "2s"
[[models]]
name = "gpt-4o"
max_request_tokens = 20000
[[tenants]]
name = "light"
weight = 1
keys = ["{}"]
[[tenants]]
name = "heavy"
weight = 3
keys = ["{}"]
[[tenants]]
name = "limited"
requests_per_second = 1
keys = ["{}"]
"#,
        hash_key("k-light"),
        hash_key("k-heavy"),
        hash_key("k-limited")
    )
}

fn request(rng: &mut Lcg) -> pb::DispatchRequest {
    pb::DispatchRequest {
        model: "gpt-4o".into(),
        payload: "tenant work".into(),
        prompt_tokens: rng.heavy_tail(100.0, 1.5, 3_000.0),
        max_output_tokens: rng.heavy_tail(50.0, 1.5, 1_000.0),
        ..Default::default()
    }
}

/// Sends requests open-loop as `key` for `duration`; returns the tokens its
/// replies report.
async fn saturate(
    grpc: pb::dispatcher_client::DispatcherClient<Channel>,
    key: &'static str,
    every: Duration,
    duration: Duration,
    seed: u64,
) -> (u64, u64, u64) {
    let tokens = Arc::new(AtomicU64::new(0));
    let replies = Arc::new(AtomicU64::new(0));
    let refused = Arc::new(AtomicU64::new(0));
    let mut rng = Lcg(seed);
    let mut tick = tokio::time::interval(every);
    let mut calls = tokio::task::JoinSet::new();
    let start = std::time::Instant::now();
    while start.elapsed() < duration {
        tick.tick().await;
        let mut g = grpc.clone();
        let req = with_key(request(&mut rng), key);
        let (tokens, replies, refused) = (tokens.clone(), replies.clone(), refused.clone());
        calls.spawn(async move {
            match g.dispatch(req).await {
                Ok(r) => {
                    let u = r.into_inner().usage.unwrap();
                    tokens.fetch_add(u.prompt_tokens + u.completion_tokens, Ordering::Relaxed);
                    replies.fetch_add(1, Ordering::Relaxed);
                }
                Err(s) => {
                    assert_eq!(s.code(), Code::ResourceExhausted, "{s:?}");
                    refused.fetch_add(1, Ordering::Relaxed);
                }
            }
        });
    }
    while calls.join_next().await.is_some() {}
    (
        tokens.load(Ordering::Relaxed),
        replies.load(Ordering::Relaxed),
        refused.load(Ordering::Relaxed),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tenants_share_by_weight_and_limits_are_enforced() {
    let cfg = ConfigDir::new(&config());
    let mut sims = Vec::new();
    for name in ["r1", "r2"] {
        let sim = cfg.start_region(SimRegion {
            name,
            tokens_per_minute: 120_000,
            requests_per_minute: 100_000,
            burst_tokens: Some(10_000),
            accounting: "usage",
            max_concurrent: 512,
            sim_args: &["--ms-per-1k-tokens", "10"],
            ..Default::default()
        });
        sims.push(sim);
    }
    let d = dispatcher(&cfg.config());
    let grpc = client(d.addr).await;

    // A wrong key, and no key at all (anonymous use is off).
    let wrong = grpc
        .clone()
        .dispatch(with_key(request(&mut Lcg(1)), "k-nobody"))
        .await
        .unwrap_err();
    assert_eq!(wrong.code(), Code::Unauthenticated, "{wrong:?}");
    let none = grpc.clone().dispatch(request(&mut Lcg(1))).await.unwrap_err();
    assert_eq!(none.code(), Code::Unauthenticated, "{none:?}");
    // Claiming another tenant in the request is refused.
    let mut claim = request(&mut Lcg(1));
    claim.tenant = "heavy".into();
    let claimed = grpc
        .clone()
        .dispatch(with_key(claim, "k-light"))
        .await
        .unwrap_err();
    assert_eq!(claimed.code(), Code::PermissionDenied, "{claimed:?}");

    // Over its requests per second: RESOURCE_EXHAUSTED with QuotaFailure and RetryInfo.
    let mut limited = None;
    for _ in 0..3 {
        if let Err(s) = grpc
            .clone()
            .dispatch(with_key(request(&mut Lcg(2)), "k-limited"))
            .await
        {
            limited = Some(s);
        }
    }
    let s = limited.expect("the third request within a second is refused");
    assert_eq!(s.code(), Code::ResourceExhausted);
    let quota = s.get_details_quota_failure().expect("QuotaFailure");
    assert_eq!(quota.violations[0].subject, "tenant:limited");
    assert!(quota.violations[0].description.contains("requests_per_second"));
    assert!(
        s.get_details_retry_info().and_then(|r| r.retry_delay).is_some(),
        "RetryInfo"
    );
    // And as grpcurl shows it.
    let out = Command::new(tools::grpcurl())
        .args([
            "-plaintext",
            "-H",
            "authorization: Bearer k-limited",
            "-d",
            r#"{"model": "gpt-4o", "prompt_tokens": 10, "max_output_tokens": 10}"#,
            &d.addr.to_string(),
            "dispatch.v1.Dispatcher/Dispatch",
        ])
        .output()
        .unwrap();
    let mut shown = String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    if !shown.contains("ResourceExhausted") {
        // The grpcurl call may have got the next second's token: ask again at once.
        let again = Command::new(tools::grpcurl())
            .args([
                "-plaintext",
                "-H",
                "authorization: Bearer k-limited",
                "-d",
                r#"{"model": "gpt-4o", "prompt_tokens": 10, "max_output_tokens": 10}"#,
                &d.addr.to_string(),
                "dispatch.v1.Dispatcher/Dispatch",
            ])
            .output()
            .unwrap();
        shown = String::from_utf8_lossy(&again.stdout).to_string() + &String::from_utf8_lossy(&again.stderr);
    }
    println!("grpcurl:\n{shown}");
    assert!(shown.contains("Code: ResourceExhausted"), "{shown}");
    assert!(
        shown.contains("google.rpc.QuotaFailure") && shown.contains("tenant:limited"),
        "{shown}"
    );
    assert!(
        shown.contains("google.rpc.RetryInfo") && shown.contains("retryDelay"),
        "{shown}"
    );
    assert!(
        !d.logs().contains("k-limited") && !d.logs().contains("k-heavy"),
        "keys never reach the log"
    );

    // Both saturate 4,000 tokens/s of quota for 30 s: ~400 tokens a request,
    // 25 requests/s each, over twice the supply each.
    let (light, heavy) = tokio::join!(
        saturate(
            grpc.clone(),
            "k-light",
            Duration::from_millis(40),
            Duration::from_secs(30),
            3
        ),
        saturate(
            grpc.clone(),
            "k-heavy",
            Duration::from_millis(40),
            Duration::from_secs(30),
            4
        ),
    );
    let share = heavy.0 as f64 / (light.0 + heavy.0) as f64;
    println!(
        "30 s saturated: light (weight 1) {} tokens in {} replies ({} refused), heavy (weight 3) {} tokens in {} replies ({} refused); heavy's share {:.1} % (entitled to 75 %)",
        light.0,
        light.1,
        light.2,
        heavy.0,
        heavy.1,
        heavy.2,
        100.0 * share
    );
    assert!(light.2 > 0 && heavy.2 > 0, "both were over the supply");
    // Work-conserving: when admission refusals let the heavy tenant's backlog
    // drain for a moment, the light one takes the slack, so over real time
    // and real sockets the share lands at 70-75 %, not exactly 75 % (exact
    // shares are proven with simulated time in tests/sim_fairness.rs). The
    // band still tells weighting (75 %) from none (50 %).
    assert!((share - 0.75).abs() <= 0.10 * 0.75, "heavy's share {share:.3}");
    drop(d);
    drop(sims);
}
