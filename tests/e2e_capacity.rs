//! End to end: capacity rules against real region-sim processes. A region
//! held at its max_concurrent by slow work enters its rule: with
//! `reject_new`, new work is shed with RESOURCE_EXHAUSTED and RetryInfo
//! while the work already there finishes; with `redistribute`, its weight
//! drops. Both recover once the pressure is gone, and Admin lists the
//! transitions.

mod common;

use std::time::Duration;

use common::{ConfigDir, SimRegion, admin, client, dispatcher, eventually, region_status};
use dispatcher::pb;
use tonic::Code;
use tonic_types::StatusExt;

const DISPATCHER_TOML: &str = r#"
[auth]
allow_anonymous = true
[server]
default_timeout = "10s"
[routing]
max_queue_wait = "200ms"
[[models]]
name = "gpt-4o"
"#;

/// In flight at once in the hot region: its max_concurrent.
const SLOTS: usize = 4;

fn request(origin: &str) -> pb::DispatchRequest {
    pb::DispatchRequest {
        model: "gpt-4o".into(),
        payload: b"hello".to_vec().into(),
        prompt_tokens: 10,
        max_output_tokens: 10,
        origin_region: origin.into(),
        ..Default::default()
    }
}

async fn rule_active(addr: std::net::SocketAddr) -> bool {
    let reply = admin(addr)
        .await
        .list_capacity_rules(pb::ListCapacityRulesRequest {})
        .await
        .unwrap()
        .into_inner();
    reply.rules.iter().any(|r| r.active)
}

async fn events(addr: std::net::SocketAddr) -> Vec<String> {
    let reply = admin(addr)
        .await
        .list_capacity_rules(pb::ListCapacityRulesRequest {})
        .await
        .unwrap()
        .into_inner();
    reply
        .events
        .iter()
        .map(|e| format!("{} {} {}", e.region, e.action, e.kind))
        .collect()
}

/// Fills the region's slots with slow work; returns the calls.
async fn fill(addr: std::net::SocketAddr) -> tokio::task::JoinSet<Result<pb::DispatchReply, tonic::Status>> {
    let mut slow = tokio::task::JoinSet::new();
    for _ in 0..SLOTS {
        let mut c = client(addr).await;
        slow.spawn(async move { c.dispatch(request("hot")).await.map(|r| r.into_inner()) });
    }
    slow
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_region_over_its_reject_new_rule_sheds_new_work_and_recovers() {
    let cfg = ConfigDir::new(DISPATCHER_TOML);
    let _hot = cfg.start_region(SimRegion {
        name: "hot",
        max_concurrent: SLOTS as u32,
        sim_args: &["--base-latency-ms", "1500", "--ms-per-1k-tokens", "1"],
        extra_toml: "[[capacity]]\naction = \"reject_new\"\nenter = 0.9\nexit = 0.5\nfor = \"300ms\"\ncool_down = \"500ms\"\n",
        ..Default::default()
    });
    let d = dispatcher(&cfg.config());
    let mut slow = fill(d.addr).await;
    // Held at 100 % for the rule's duration: it enters.
    assert!(
        eventually(Duration::from_secs(3), || rule_active(d.addr))
            .await
            .is_some(),
        "the rule never entered; events: {:?}",
        events(d.addr).await
    );
    // New work is shed at once, with when to retry.
    let shed = client(d.addr).await.dispatch(request("hot")).await.unwrap_err();
    assert_eq!(shed.code(), Code::ResourceExhausted, "{shed:?}");
    assert!(shed.message().contains("shed"), "{}", shed.message());
    assert!(shed.get_details_retry_info().is_some(), "no RetryInfo: {shed:?}");
    // Route says why.
    let route = client(d.addr).await.route(request("hot")).await;
    let route = route
        .map(|r| format!("{:?}", r.into_inner()))
        .unwrap_or_else(|s| s.message().to_string());
    assert!(route.contains("reject_new"), "{route}");
    // The work already there finishes.
    while let Some(r) = slow.join_next().await {
        r.unwrap()
            .expect("work admitted before the rule entered completes");
    }
    // Below the exit threshold: the rule exits and new work is served.
    assert!(
        eventually(Duration::from_secs(3), || async { !rule_active(d.addr).await })
            .await
            .is_some()
    );
    let reply = client(d.addr)
        .await
        .dispatch(request("hot"))
        .await
        .expect("served after the rule exited");
    assert_eq!(reply.into_inner().region, "hot");
    assert_eq!(
        events(d.addr).await,
        ["hot reject_new entered", "hot reject_new exited"]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_region_over_its_redistribute_rule_is_down_weighted_and_recovers() {
    let cfg = ConfigDir::new(DISPATCHER_TOML);
    let _hot = cfg.start_region(SimRegion {
        name: "hot",
        max_concurrent: SLOTS as u32,
        sim_args: &["--base-latency-ms", "1500", "--ms-per-1k-tokens", "1"],
        extra_toml: "[[capacity]]\naction = \"redistribute\"\nweight_factor = 0.25\nenter = 0.9\nexit = 0.5\nfor = \"300ms\"\n",
        ..Default::default()
    });
    let d = dispatcher(&cfg.config());
    assert_eq!(region_status(d.addr, "hot").await.unwrap().weight, 1.0);
    let mut slow = fill(d.addr).await;
    let down = eventually(Duration::from_secs(3), || async {
        region_status(d.addr, "hot").await.unwrap().weight == 0.25
    })
    .await;
    assert!(
        down.is_some(),
        "never down-weighted; events: {:?}",
        events(d.addr).await
    );
    while let Some(r) = slow.join_next().await {
        r.unwrap().expect("slow work completes");
    }
    let up = eventually(Duration::from_secs(3), || async {
        region_status(d.addr, "hot").await.unwrap().weight == 1.0
    })
    .await;
    assert!(
        up.is_some(),
        "weight never restored; events: {:?}",
        events(d.addr).await
    );
    assert_eq!(
        events(d.addr).await,
        ["hot redistribute entered", "hot redistribute exited"]
    );
}
