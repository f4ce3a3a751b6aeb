//! Active health checks against clusters that answer them differently: one
//! that says NOT_SERVING is taken out of service; one that serves no
//! grpc.health.v1 at all (a plain AgentCluster, as a team may run) stays in
//! service, checked only for answering, and takes the work. Reloads keep
//! the checks in step: a region added live is checked, a region moved to a
//! new endpoint is judged by that endpoint alone.

mod common;

use std::time::Duration;

use common::{
    ConfigDir, SimRegion, client, dispatcher, eventually, region_status, region_toml, sim_configure,
};
use dispatcher::config::SimulateConfig;
use dispatcher::core::{Accounting, ModelLimits};
use dispatcher::pb;
use dispatcher::pb::agent_cluster_server::AgentClusterServer;
use dispatcher::sim::{SimService, SimSpec};

const DISPATCHER_TOML: &str = r#"
[auth]
allow_anonymous = true
[[models]]
name = "gpt-4o"
"#;

/// Checked often, and one answer decides either way.
const HEALTH: &str =
    "[health]\ninterval = \"100ms\"\ntimeout = \"1s\"\nunhealthy_threshold = 1\nhealthy_threshold = 1\n";

/// A simulated cluster served with AgentCluster only: no health service,
/// no reflection.
async fn cluster_without_health() -> std::net::SocketAddr {
    let spec = SimSpec {
        region: "plain".into(),
        models: vec![(
            "gpt-4o".into(),
            ModelLimits {
                tokens_per_minute: 100_000_000,
                requests_per_minute: 10_000_000,
                burst_tokens: None,
                burst_requests: None,
                accounting: Accounting::Admission,
            },
        )],
        settings: SimulateConfig {
            ms_per_1k_tokens: 1.0,
            base_latency_ms: 1.0,
            ..Default::default()
        },
    };
    let (reporter, _unserved) = tonic_health::server::health_reporter();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(AgentClusterServer::new(SimService::new(spec, reporter)))
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
    );
    addr
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cluster_without_a_health_service_stays_in_service() {
    let cfg = ConfigDir::new(DISPATCHER_TOML);
    let plain = cluster_without_health().await;
    let checked = cfg.start_region(SimRegion {
        name: "checked",
        max_concurrent: 64,
        extra_toml: HEALTH,
        ..Default::default()
    });
    let models = [("gpt-4o", 100_000_000, 10_000_000, "admission")];
    cfg.write_region(
        "plain",
        &(region_toml("plain", &format!("http://{plain}"), 64, &models) + HEALTH),
    );
    let d = dispatcher(&cfg.config());

    // The checks run: a cluster saying NOT_SERVING is taken out.
    sim_configure(
        checked.addr,
        pb::SimSettings {
            healthy: Some(false),
            ..Default::default()
        },
    )
    .await;
    let out = eventually(Duration::from_secs(10), || async {
        region_status(d.addr, "checked").await.is_ok_and(|s| !s.healthy)
    })
    .await;
    assert!(out.is_some(), "a NOT_SERVING cluster stays in service");

    // The cluster without a health service has been checked too, and said so.
    let told = eventually(Duration::from_secs(10), || async {
        d.logs().contains("serves no grpc.health.v1")
    })
    .await;
    assert!(
        told.is_some(),
        "no word about the missing health service:\n{}",
        d.logs()
    );
    let plain_status = region_status(d.addr, "plain").await.unwrap();
    assert!(plain_status.healthy, "{plain_status:?}");

    // It is the one region left, and it takes the work.
    let mut grpc = client(d.addr).await;
    for _ in 0..5 {
        let reply = grpc
            .dispatch(pb::DispatchRequest {
                model: "gpt-4o".into(),
                payload: "hello".into(),
                ..Default::default()
            })
            .await
            .expect("served by the region without a health service")
            .into_inner();
        assert_eq!(reply.region, "plain");
    }
    assert_eq!(
        d.logs().matches("serves no grpc.health.v1").count(),
        1,
        "said once, not at every check"
    );
}

/// A loopback port nobody listens on (bound, then let go).
fn closed_port() -> std::net::SocketAddr {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap()
}

async fn healthy(addr: std::net::SocketAddr, region: &str) -> Option<bool> {
    region_status(addr, region).await.ok().map(|s| s.healthy)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_region_added_by_a_reload_is_health_checked() {
    let cfg = ConfigDir::new(DISPATCHER_TOML);
    let _steady = cfg.start_region(SimRegion {
        name: "steady",
        extra_toml: HEALTH,
        ..Default::default()
    });
    let d = dispatcher(&cfg.config());

    // Added live, pointing at a closed port: its checks fail.
    let models = [("gpt-4o", 100_000_000, 10_000_000, "admission")];
    cfg.write_region(
        "added",
        &(region_toml("added", &format!("http://{}", closed_port()), 64, &models) + HEALTH),
    );
    let out = eventually(Duration::from_secs(15), || async {
        healthy(d.addr, "added").await == Some(false)
    })
    .await;
    assert!(
        out.is_some(),
        "a region added by a reload at a closed port still looks healthy: {:?}",
        region_status(d.addr, "added").await
    );
    assert_eq!(healthy(d.addr, "steady").await, Some(true));
}

/// One failed check takes a region out; a hundred passed ones (ten
/// seconds) bring it back. A generous check timeout: a slow answer on a
/// loaded machine must not count as a failure here (a dead address is
/// refused at once anyway).
const SLOW_BACK: &str =
    "[health]\ninterval = \"100ms\"\ntimeout = \"5s\"\nunhealthy_threshold = 1\nhealthy_threshold = 100\n";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_moved_region_is_judged_by_its_new_endpoint() {
    let cfg = ConfigDir::new(DISPATCHER_TOML);
    let mut old = cfg.start_region(SimRegion {
        name: "moved",
        extra_toml: SLOW_BACK,
        ..Default::default()
    });
    let d = dispatcher(&cfg.config());

    // The old cluster says NOT_SERVING: the region goes out of service.
    sim_configure(
        old.addr,
        pb::SimSettings {
            healthy: Some(false),
            ..Default::default()
        },
    )
    .await;
    let out = eventually(Duration::from_secs(15), || async {
        healthy(d.addr, "moved").await == Some(false)
    })
    .await;
    assert!(out.is_some(), "the old cluster's NOT_SERVING was not seen");

    // The operator moves it to a working cluster and stops the old one.
    let new = common::region_sim(
        cfg.path(),
        "moved-new",
        &["--model", "gpt-4o:100000000:10000000:admission"],
    );
    let models = [("gpt-4o", 100_000_000, 10_000_000, "admission")];
    cfg.write_region(
        "moved",
        &(region_toml("moved", &new.endpoint(), 256, &models) + SLOW_BACK),
    );
    let moved = eventually(Duration::from_secs(15), || async {
        region_status(d.addr, "moved")
            .await
            .is_ok_and(|s| s.endpoint == new.endpoint())
    })
    .await;
    assert!(moved.is_some(), "the endpoint change was not applied");
    old.kill();

    // Judged by its new endpoint: presumed healthy at once (the old
    // address's verdict is dropped, not worked off over 100 checks), and
    // it stays so.
    let back = eventually(Duration::from_secs(15), || async {
        healthy(d.addr, "moved").await == Some(true)
    })
    .await;
    assert!(
        back.is_some(),
        "a region moved to a working endpoint stays unhealthy (judged by its old address):\n{}",
        d.logs()
    );
    // Ten check intervals against the dead old address would have turned it.
    let turned = eventually(Duration::from_secs(1), || async {
        healthy(d.addr, "moved").await != Some(true)
    })
    .await;
    assert!(turned.is_none(), "the region went unhealthy again");
    let mut grpc = client(d.addr).await;
    let reply = grpc
        .dispatch(pb::DispatchRequest {
            model: "gpt-4o".into(),
            payload: "hello".into(),
            ..Default::default()
        })
        .await
        .expect("served at the new endpoint")
        .into_inner();
    assert_eq!(reply.region, "moved");
}
