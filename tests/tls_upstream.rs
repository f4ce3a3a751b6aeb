//! `https://` regions end to end: a region-sim serving TLS that requires a
//! client certificate, reached with the region's CA and client identity
//! (work and health checks over the one connection); and a region whose
//! `[tls] ca_file` is the wrong CA goes unhealthy, with a log line naming
//! the certificate problem, and healthy again once the file names the
//! right one.

mod common;

use std::time::Duration;

use common::certs::{Ca, Pair};
use common::{ConfigDir, Proc, client, dispatcher, eventually, region_sim, region_status};
use dispatcher::pb;

const CONFIG: &str = r#"
[auth]
allow_anonymous = true
[[models]]
name = "gpt-4o"
"#;

/// A region-sim serving TLS with `server`, requiring client certificates
/// from `clients`.
fn tls_sim(dir: &ConfigDir, server: &Pair, clients: &Ca) -> Proc {
    region_sim(
        dir.path(),
        "east",
        &[
            "--model",
            "gpt-4o:10000000:100000",
            "--tls-cert",
            server.cert.to_str().unwrap(),
            "--tls-key",
            server.key.to_str().unwrap(),
            "--tls-client-ca",
            clients.cert.to_str().unwrap(),
        ],
    )
}

fn region_file(sim: &Proc, ca: &Ca, identity: &Pair) -> String {
    format!(
        r#"name = "east"
endpoint = "https://localhost:{}"
[[models]]
name = "gpt-4o"
tokens_per_minute = 10000000
requests_per_minute = 100000
[health]
interval = "100ms"
timeout = "1s"
unhealthy_threshold = 2
[tls]
ca_file = {:?}
cert_file = {:?}
key_file = {:?}
"#,
        sim.addr.port(),
        ca.cert.to_str().unwrap(),
        identity.cert.to_str().unwrap(),
        identity.key.to_str().unwrap(),
    )
}

#[tokio::test]
async fn an_https_region_with_mutual_tls_serves_work() {
    let dir = ConfigDir::new(CONFIG);
    let ca = Ca::new(dir.path(), "ca");
    let sim = tls_sim(&dir, &ca.server(dir.path(), "sim"), &ca);
    let me = ca.client(dir.path(), "dispatcher", &["dispatcher.example"]);
    dir.write_region("east", &region_file(&sim, &ca, &me));
    let d = dispatcher(&dir.config());

    let reply = client(d.addr)
        .await
        .dispatch(pb::DispatchRequest {
            model: "gpt-4o".into(),
            payload: "over tls".into(),
            max_output_tokens: 10,
            ..Default::default()
        })
        .await
        .expect("dispatched over TLS")
        .into_inner();
    assert_eq!(reply.region, "east");
}

#[tokio::test]
async fn a_region_with_the_wrong_ca_goes_unhealthy_naming_the_certificate_problem() {
    let dir = ConfigDir::new(CONFIG);
    let ca = Ca::new(dir.path(), "ca");
    let wrong = Ca::new(dir.path(), "wrong-ca");
    let sim = tls_sim(&dir, &ca.server(dir.path(), "sim"), &ca);
    let me = ca.client(dir.path(), "dispatcher", &["dispatcher.example"]);
    dir.write_region("east", &region_file(&sim, &wrong, &me));
    let d = dispatcher(&dir.config());

    let unhealthy = eventually(Duration::from_secs(30), || async {
        region_status(d.addr, "east").await.is_ok_and(|s| !s.healthy)
    })
    .await;
    assert!(unhealthy.is_some(), "the region stayed healthy");
    let logs = d.logs();
    let line = logs
        .lines()
        .find(|l| l.contains("region unhealthy"))
        .unwrap_or_else(|| panic!("no 'region unhealthy' line: {logs}"));
    assert!(
        line.contains("invalid peer certificate") && line.contains("UnknownIssuer"),
        "{line}"
    );

    // The right CA, edited in live: the health checks, over the same
    // connection as the work, find the region healthy again.
    dir.write_region("east", &region_file(&sim, &ca, &me));
    let healthy = eventually(Duration::from_secs(30), || async {
        region_status(d.addr, "east").await.is_ok_and(|s| s.healthy)
    })
    .await;
    assert!(healthy.is_some(), "the region never recovered: {}", d.logs());
    let reply = client(d.addr)
        .await
        .dispatch(pb::DispatchRequest {
            model: "gpt-4o".into(),
            payload: "over tls".into(),
            max_output_tokens: 10,
            ..Default::default()
        })
        .await
        .expect("dispatched once the CA is right")
        .into_inner();
    assert_eq!(reply.region, "east");
}
