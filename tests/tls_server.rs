//! The dispatcher's listener over TLS, end to end with the real binary and
//! grpcurl, certificates made in the test (rcgen): grpcurl with -cacert,
//! and -cert/-key for mTLS; a client certificate's name (SAN) is its
//! tenant, with that tenant's limits, beside bearer keys in the same
//! deployment; untrusted and expired client certificates are refused; a
//! plaintext client on the TLS port fails at once; replaced certificate
//! files reach new connections while an open one keeps its session; a
//! certificate served expired or not yet valid is warned about, at start
//! and when swapped in, and its expiry is on /metrics.

mod common;

use std::process::{Command, Output};
use std::time::Duration;

use common::certs::{Ca, Pair, tls_channel};
use common::{ConfigDir, Proc, dispatcher, eventually, tools};
use dispatcher::dispatch::hash_key;
use dispatcher::pb;
use dispatcher::pb::dispatcher_client::DispatcherClient;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Identity};

const REGION: &str = r#"
name = "sim"
max_concurrent = 64
[[models]]
name = "gpt-4o"
tokens_per_minute = 10000000
requests_per_minute = 100000
[[models]]
name = "gpt-4o-mini"
tokens_per_minute = 10000000
requests_per_minute = 100000
[simulate]
ms_per_1k_tokens = 1
"#;

/// A dispatcher serving TLS with `server`, checking client certificates
/// against `clients` when given (optional: bearer keys work too).
fn start(dir: &ConfigDir, server: &Pair, clients: Option<&Ca>) -> Proc {
    let client_auth = clients
        .map(|ca| {
            format!(
                "client_ca_file = {:?}\nclient_auth = \"optional\"\n",
                ca.cert.to_str().unwrap()
            )
        })
        .unwrap_or_default();
    let toml = format!(
        r#"
[telemetry]
metrics_listen = "127.0.0.1:0"
[server.tls]
cert_file = {:?}
key_file = {:?}
{client_auth}
[[models]]
name = "gpt-4o"
[[models]]
name = "gpt-4o-mini"
[[tenants]]
name = "alpha"
identities = ["alpha.clients.example", "spiffe://example.org/alpha"]
models = ["gpt-4o-mini"]
[[tenants]]
name = "beta"
keys = ["{}"]
"#,
        server.cert.to_str().unwrap(),
        server.key.to_str().unwrap(),
        hash_key("k-beta"),
    );
    std::fs::write(dir.config(), toml).unwrap();
    dir.write_region("sim", REGION);
    dispatcher(&dir.config())
}

fn grpcurl(addr: std::net::SocketAddr, args: &[&str], method: &str, body: &str) -> Output {
    Command::new(tools::grpcurl())
        .args(["-max-time", "10"])
        .args(args)
        .args(["-d", body, &addr.to_string(), method])
        .output()
        .expect("running grpcurl")
}

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

const DISPATCH: &str = "dispatch.v1.Dispatcher/Dispatch";

fn work(model: &str, tenant: &str) -> String {
    format!(r#"{{"model":"{model}","tenant":"{tenant}","payload":"aGVsbG8=","max_output_tokens":10}}"#)
}

struct Setup {
    _dir: ConfigDir,
    proc: Proc,
    server_ca: Ca,
    clients: Ca,
    path: std::path::PathBuf,
}

fn setup() -> Setup {
    let dir = ConfigDir::new("");
    let path = dir.path().to_path_buf();
    let server_ca = Ca::new(&path, "server-ca");
    let clients = Ca::new(&path, "client-ca");
    let server = server_ca.server(&path, "server");
    let proc = start(&dir, &server, Some(&clients));
    Setup {
        _dir: dir,
        proc,
        server_ca,
        clients,
        path,
    }
}

#[test]
fn grpcurl_over_tls_and_mtls_an_identity_is_its_tenant_with_its_limits() {
    let s = setup();
    let ca = s.server_ca.cert.to_str().unwrap();
    let alpha = s.clients.client(&s.path, "alpha", &["alpha.clients.example"]);
    let mtls = [
        "-cacert",
        ca,
        "-cert",
        alpha.cert.to_str().unwrap(),
        "-key",
        alpha.key.to_str().unwrap(),
    ];

    let listed = Command::new(tools::grpcurl())
        .args(["-max-time", "10", "-cacert", ca, &s.proc.addr.to_string(), "list"])
        .output()
        .unwrap();
    assert!(listed.status.success(), "{}", text(&listed));
    assert!(
        text(&listed).contains("dispatch.v1.Dispatcher"),
        "{}",
        text(&listed)
    );

    // The certificate's SAN is tenant alpha: its model is served...
    let ok = grpcurl(s.proc.addr, &mtls, DISPATCH, &work("gpt-4o-mini", ""));
    assert!(ok.status.success(), "{}", text(&ok));
    assert!(text(&ok).contains("\"region\": \"sim\""), "{}", text(&ok));
    // ...alpha's limits apply (only gpt-4o-mini)...
    let limited = grpcurl(s.proc.addr, &mtls, DISPATCH, &work("gpt-4o", ""));
    assert!(!limited.status.success());
    assert!(
        text(&limited).contains("not allowed for this tenant (allowed: gpt-4o-mini)"),
        "{}",
        text(&limited)
    );
    // ...and it is alpha, not whoever the request claims.
    let claimed = grpcurl(s.proc.addr, &mtls, DISPATCH, &work("gpt-4o-mini", "beta"));
    assert!(
        text(&claimed).contains("PermissionDenied")
            && text(&claimed).contains("credential is tenant \"alpha\""),
        "{}",
        text(&claimed)
    );

    // A URI SAN (SPIFFE) names a tenant as well.
    let spiffe = s
        .clients
        .client(&s.path, "spiffe", &["spiffe://example.org/alpha"]);
    let by_uri = grpcurl(
        s.proc.addr,
        &[
            "-cacert",
            ca,
            "-cert",
            spiffe.cert.to_str().unwrap(),
            "-key",
            spiffe.key.to_str().unwrap(),
        ],
        DISPATCH,
        &work("gpt-4o-mini", "alpha"),
    );
    assert!(by_uri.status.success(), "{}", text(&by_uri));

    // In the same deployment, a bearer key without a certificate.
    let beta = grpcurl(
        s.proc.addr,
        &["-cacert", ca, "-H", "authorization: Bearer k-beta"],
        DISPATCH,
        &work("gpt-4o", "beta"),
    );
    assert!(beta.status.success(), "{}", text(&beta));
    // Neither: UNAUTHENTICATED; a trusted certificate naming no tenant too.
    let nobody = grpcurl(s.proc.addr, &["-cacert", ca], DISPATCH, &work("gpt-4o", ""));
    assert!(text(&nobody).contains("Unauthenticated"), "{}", text(&nobody));
    let stranger = s.clients.client(&s.path, "stranger", &["stranger.example"]);
    let unknown = grpcurl(
        s.proc.addr,
        &[
            "-cacert",
            ca,
            "-cert",
            stranger.cert.to_str().unwrap(),
            "-key",
            stranger.key.to_str().unwrap(),
        ],
        DISPATCH,
        &work("gpt-4o", ""),
    );
    assert!(
        text(&unknown).contains("Unauthenticated") && text(&unknown).contains("names no tenant"),
        "{}",
        text(&unknown)
    );
}

/// grpcurl (grpc-go) withholds a certificate the server's CA list does not
/// cover, so its untrusted caller arrives without one (UNAUTHENTICATED); an
/// expired one it sends, and the handshake refuses it. A rustls client
/// sends the untrusted certificate, and the handshake refuses it even with
/// a valid bearer key beside it.
#[tokio::test]
async fn untrusted_or_expired_client_certificates_are_refused() {
    let s = setup();
    let ca = s.server_ca.cert.to_str().unwrap();
    let other = Ca::new(&s.path, "other-ca");
    let untrusted = other.client(&s.path, "untrusted", &["alpha.clients.example"]);
    let expired = s
        .clients
        .expired_client(&s.path, "expired", &["alpha.clients.example"]);
    for pair in [&untrusted, &expired] {
        let out = grpcurl(
            s.proc.addr,
            &[
                "-cacert",
                ca,
                "-cert",
                pair.cert.to_str().unwrap(),
                "-key",
                pair.key.to_str().unwrap(),
            ],
            DISPATCH,
            &work("gpt-4o-mini", ""),
        );
        assert!(!out.status.success(), "{}: {}", pair.cert.display(), text(&out));
        assert!(
            !text(&out).contains("\"region\""),
            "nothing was dispatched: {}",
            text(&out)
        );
    }
    for pair in [&untrusted, &expired] {
        dispatcher::tls::install_provider();
        let tls = ClientTlsConfig::new()
            .ca_certificate(Certificate::from_pem(std::fs::read(&s.server_ca.cert).unwrap()))
            .identity(Identity::from_pem(
                std::fs::read(&pair.cert).unwrap(),
                std::fs::read(&pair.key).unwrap(),
            ))
            .domain_name("localhost");
        let channel = Channel::from_shared(format!("https://{}", s.proc.addr))
            .unwrap()
            .tls_config(tls)
            .unwrap()
            .connect_lazy();
        let refused = DispatcherClient::new(channel)
            .route(beta(route_request()))
            .await
            .unwrap_err();
        assert_ne!(
            refused.code(),
            tonic::Code::Unauthenticated,
            "{}: refused at the handshake, before any call: {refused:?}",
            pair.cert.display()
        );
    }
    // The same name from the trusted CA, in date, is served.
    let good = s.clients.client(&s.path, "good", &["alpha.clients.example"]);
    let out = grpcurl(
        s.proc.addr,
        &[
            "-cacert",
            ca,
            "-cert",
            good.cert.to_str().unwrap(),
            "-key",
            good.key.to_str().unwrap(),
        ],
        DISPATCH,
        &work("gpt-4o-mini", ""),
    );
    assert!(out.status.success(), "{}", text(&out));
}

#[tokio::test]
async fn a_plaintext_client_on_the_tls_port_fails_at_once() {
    let s = setup();
    let channel = Channel::from_shared(format!("http://{}", s.proc.addr))
        .unwrap()
        .connect_lazy();
    let call = async move {
        DispatcherClient::new(channel)
            .dispatch(pb::DispatchRequest::default())
            .await
    };
    // A bound on the wait only, so a hang fails the test instead of
    // blocking it; passing means an error came back, not the bound.
    let answered = tokio::time::timeout(Duration::from_secs(30), call).await;
    let status = answered
        .expect("a plaintext client on the TLS port hung instead of failing")
        .unwrap_err();
    assert_ne!(status.code(), tonic::Code::Ok);
}

fn beta<T>(message: T) -> tonic::Request<T> {
    let mut r = tonic::Request::new(message);
    r.metadata_mut()
        .insert("authorization", "Bearer k-beta".parse().unwrap());
    r
}

fn route_request() -> pb::DispatchRequest {
    pb::DispatchRequest {
        model: "gpt-4o".into(),
        payload: "x".into(),
        ..Default::default()
    }
}

#[tokio::test]
async fn replaced_certificate_files_reach_new_connections_while_open_ones_keep_theirs() {
    let dir = ConfigDir::new("");
    let path = dir.path().to_path_buf();
    let first_ca = Ca::new(&path, "first-ca");
    let second_ca = Ca::new(&path, "second-ca");
    let served = first_ca.server(&path, "server");
    let proc = start(&dir, &served, None);

    // Open a connection that trusts only the first CA.
    let mut open = DispatcherClient::new(tls_channel(proc.addr, &first_ca.cert));
    open.route(beta(route_request()))
        .await
        .expect("the first certificate is served");

    // Replace the files with a certificate from the second CA.
    second_ca.server(&path, "next").install_as(&served);
    let took = eventually(Duration::from_secs(30), || async {
        let mut fresh = DispatcherClient::new(tls_channel(proc.addr, &second_ca.cert));
        fresh.route(beta(route_request())).await.is_ok()
    })
    .await
    .expect("new connections never got the new certificate");
    eprintln!("new connections got the new certificate after {took:?}");
    // New connections no longer get the old one...
    let mut stale = DispatcherClient::new(tls_channel(proc.addr, &first_ca.cert));
    assert!(stale.route(beta(route_request())).await.is_err());
    // ...while the open connection keeps working: were it re-opened, it
    // would meet the new certificate, which it does not trust.
    open.route(beta(route_request()))
        .await
        .expect("the open connection was dropped");
    assert!(
        proc.logs().contains("server certificate reloaded"),
        "{}",
        proc.logs()
    );
}

/// The value of the first `name{...}` sample on a scrape.
fn gauge(text: &str, name: &str) -> Option<f64> {
    text.lines()
        .find(|l| l.starts_with(&format!("{name}{{")))
        .and_then(|l| l.rsplit_once(' ')?.1.parse().ok())
}

#[tokio::test]
async fn a_certificate_served_expired_or_not_yet_valid_is_warned_about_and_its_expiry_is_a_gauge() {
    let dir = ConfigDir::new("");
    let path = dir.path().to_path_buf();
    let ca = Ca::new(&path, "ca");
    let served = ca.server_dated(&path, "server", (2019, 1, 1), (2020, 1, 1));
    let proc = start(&dir, &served, None);
    let metrics = proc.listener("metrics");
    let logs = proc.logs();
    assert!(
        logs.contains("server certificate loaded: it expired") && logs.contains("at 2020-01-01T00:00:00Z"),
        "no word at start about an expired certificate:\n{logs}"
    );
    let gauges = || {
        let text = common::scrape_metrics(metrics);
        (
            gauge(&text, "dispatcher_tls_certificate_expiry_seconds"),
            gauge(&text, "dispatcher_tls_certificate_valid"),
        )
    };
    let expired = eventually(Duration::from_secs(10), || async {
        let (expiry, valid) = gauges();
        expiry.is_some_and(|e| e < -5.0 * 365.0 * 86_400.0) && valid == Some(0.0)
    })
    .await;
    assert!(
        expired.is_some(),
        "the expired certificate's gauges: {:?}",
        gauges()
    );

    // A good one swapped in live: the gauges follow, no new warning.
    ca.server(&path, "fresh").install_as(&served);
    let fresh = eventually(Duration::from_secs(10), || async {
        let (expiry, valid) = gauges();
        expiry.is_some_and(|e| e > 365.0 * 86_400.0) && valid == Some(1.0)
    })
    .await;
    assert!(fresh.is_some(), "the fresh certificate's gauges: {:?}", gauges());
    assert!(!proc.logs().contains("swapped in: it"), "{}", proc.logs());

    // One not valid before 2090, swapped in live: warned about.
    ca.server_dated(&path, "future", (2090, 1, 1), (2091, 1, 1))
        .install_as(&served);
    let warned = eventually(Duration::from_secs(10), || async {
        proc.logs()
            .contains("server certificate swapped in: it is not valid until 2090-01-01T00:00:00Z")
            && gauges().1 == Some(0.0)
    })
    .await;
    assert!(
        warned.is_some(),
        "no word about a certificate not yet valid: {:?}\n{}",
        gauges(),
        proc.logs()
    );
}
