//! Slow and hostile callers against the real binary, with raw clients on
//! loopback: requests that send their HEADERS and never their body end at
//! `server.body_timeout` and their connections close; a caller's
//! `grpc-timeout` that passes before the body is DEADLINE_EXCEEDED; a
//! request that is not `application/grpc` is answered HTTP 415; on a TLS
//! listener, silent connections and stalled handshakes close at
//! `server.handshake_timeout`; and under all of these at twice the
//! connection cap (or out of file descriptors) an authenticated client on
//! a fresh connection is served within a second.

mod common;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::attack::{
    DISPATCH, PARTIAL_CLIENT_HELLO, answer, closed_within, connect_from, dispatcher_with_nofile,
    grpc_request, h2, headers_only, loopback, tls_connector, tls_from,
};
use common::certs::Ca;
use common::{ConfigDir, dispatcher};
use dispatcher::dispatch::hash_key;
use dispatcher::pb;
use prost::Message;
use tokio::io::AsyncWriteExt;
use tokio_util::sync::CancellationToken;

const REGION: &str = r#"
name = "local"
[[models]]
name = "gpt-4o"
tokens_per_minute = 100000000
requests_per_minute = 1000000
[simulate]
ms_per_1k_tokens = 1
"#;

const KEY: &str = "Bearer k-alpha";

/// dispatcher.toml with one keyed tenant, `server` keys, and TLS with
/// `tls` (certificate, key) when given.
fn config(server: &str, tls: Option<(&Path, &Path)>) -> String {
    let tls = tls
        .map(|(cert, key)| format!("[server.tls]\ncert_file = {cert:?}\nkey_file = {key:?}\n"))
        .unwrap_or_default();
    format!(
        "[[models]]\nname = \"gpt-4o\"\n[[tenants]]\nname = \"alpha\"\nkeys = [\"{}\"]\n[server]\n{server}\n{tls}",
        hash_key("k-alpha")
    )
}

fn work() -> pb::DispatchRequest {
    pb::DispatchRequest {
        model: "gpt-4o".into(),
        payload: "hello".into(),
        max_output_tokens: 10,
        ..Default::default()
    }
}

/// A request message as gRPC frames it on the wire.
fn framed(m: &impl Message) -> Bytes {
    let body = m.encode_to_vec();
    let mut out = vec![0u8];
    out.extend_from_slice(&(body.len() as u32).to_be_bytes());
    out.extend_from_slice(&body);
    out.into()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn half_sent_requests_end_at_the_body_timeout_and_their_connections_close() {
    let cfg = ConfigDir::new(&config("max_connections = 6\nbody_timeout = \"1s\"", None));
    cfg.write_region("local", REGION);
    let d = dispatcher(&cfg.config());

    // Six connections (the cap) that each send a Dispatch's HEADERS and
    // nothing more, no grpc-timeout, and answer PINGs.
    let started = Instant::now();
    let mut held = Vec::new();
    for _ in 0..6 {
        let tcp = connect_from(loopback(2), d.addr).await.unwrap();
        let (mut send, connection) = h2(tcp).await.unwrap();
        let (response, body) = headers_only(&mut send, grpc_request(DISPATCH, Some("application/grpc"), &[]))
            .await
            .unwrap();
        held.push((send, connection, response, body));
    }
    for (send, connection, response, body) in held {
        let answered = tokio::time::timeout(Duration::from_secs(5), answer(response))
            .await
            .expect("a request whose body never came is still unanswered after 5 s")
            .expect("an answer");
        assert_eq!(
            answered.grpc_status.as_deref(),
            Some("4"),
            "DEADLINE_EXCEEDED: {answered:?}"
        );
        assert!(answered.message.contains("body_timeout"), "{answered:?}");
        drop((send, body));
        // It authenticated nothing: its connection is closed, freeing the slot.
        tokio::time::timeout(Duration::from_secs(5), connection)
            .await
            .expect("the connection of a timed-out half request stays open")
            .unwrap();
    }
    let took = started.elapsed();
    println!("six half-sent requests ended and their connections closed after {took:?}");
    assert!(
        took >= Duration::from_millis(900),
        "ended by the 1 s body timeout: {took:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn raw_callers_get_the_statuses_the_grpc_spec_names() {
    let cfg = ConfigDir::new(&config("", None));
    cfg.write_region("local", REGION);
    let d = dispatcher(&cfg.config());
    let tcp = connect_from(loopback(1), d.addr).await.unwrap();
    let (mut send, _connection) = h2(tcp).await.unwrap();

    // The caller's deadline passes before its body arrives.
    let started = Instant::now();
    let (response, _body) = headers_only(
        &mut send,
        grpc_request(
            DISPATCH,
            Some("application/grpc"),
            &[("grpc-timeout", "300m"), ("authorization", KEY)],
        ),
    )
    .await
    .unwrap();
    let answered = tokio::time::timeout(Duration::from_secs(5), answer(response))
        .await
        .expect("answered")
        .unwrap();
    assert_eq!(
        answered.grpc_status.as_deref(),
        Some("4"),
        "DEADLINE_EXCEEDED, not CANCELLED (1): {answered:?}"
    );
    assert!(answered.message.contains("body"), "{answered:?}");
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "{:?}",
        started.elapsed()
    );

    // Not gRPC: HTTP 415, whatever the body.
    for content_type in [Some("application/json"), None, Some("text/plain")] {
        let (response, mut body) = headers_only(
            &mut send,
            grpc_request(DISPATCH, content_type, &[("authorization", KEY)]),
        )
        .await
        .unwrap();
        let _ = body.send_data(framed(&work()), true);
        let answered = answer(response).await.unwrap();
        assert_eq!(answered.http, 415, "{content_type:?}: {answered:?}");
        assert_eq!(answered.grpc_status.as_deref(), Some("3"), "{answered:?}");
    }

    // application/grpc+proto is gRPC: served.
    let (response, mut body) = headers_only(
        &mut send,
        grpc_request(
            DISPATCH,
            Some("application/grpc+proto"),
            &[("authorization", KEY)],
        ),
    )
    .await
    .unwrap();
    body.send_data(framed(&work()), true).unwrap();
    let answered = answer(response).await.unwrap();
    assert_eq!(
        (answered.http, answered.grpc_status.as_deref()),
        (200, Some("0")),
        "{answered:?}"
    );
}

/// A server certificate from a fresh CA: (CA file, certificate, key).
fn certificates(cfg: &ConfigDir) -> (PathBuf, PathBuf, PathBuf) {
    let ca = Ca::new(cfg.path(), "ca");
    let server = ca.server(cfg.path(), "server");
    (ca.cert, server.cert, server.key)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_a_tls_listener_the_handshake_timeout_closes_silent_and_stalled_connections() {
    let cfg = ConfigDir::new("");
    let (ca, cert, key) = certificates(&cfg);
    std::fs::write(
        cfg.config(),
        config("handshake_timeout = \"1s\"", Some((&cert, &key))),
    )
    .unwrap();
    cfg.write_region("local", REGION);
    let d = dispatcher(&cfg.config());
    let connector = tls_connector(&ca);

    let started = Instant::now();
    let mut silent = Vec::new();
    let mut stalled = Vec::new();
    let mut no_preface = Vec::new();
    for _ in 0..20 {
        silent.push(connect_from(loopback(2), d.addr).await.unwrap());
        let mut s = connect_from(loopback(3), d.addr).await.unwrap();
        s.write_all(PARTIAL_CLIENT_HELLO).await.unwrap();
        stalled.push(s);
        no_preface.push(tls_from(&connector, loopback(4), d.addr).await.unwrap());
    }
    let deadline = started + Duration::from_secs(5);
    let left = || deadline.saturating_duration_since(Instant::now());
    let mut open = [0, 0, 0];
    for s in &mut silent {
        open[0] += usize::from(!closed_within(s, left()).await);
    }
    for s in &mut stalled {
        open[1] += usize::from(!closed_within(s, left()).await);
    }
    for s in &mut no_preface {
        open[2] += usize::from(!closed_within(s, left()).await);
    }
    let took = started.elapsed();
    println!("open after {took:?} (silent, mid-ClientHello, TLS without preface): {open:?}");
    assert_eq!(
        open,
        [0, 0, 0],
        "with handshake_timeout = 1s, still open after {took:?}"
    );
    assert!(
        took >= Duration::from_millis(900),
        "closed by the timeout: {took:?}"
    );
}

/// How often the attackers got a connection in.
#[derive(Default)]
struct Tally {
    silent: AtomicUsize,
    stalled: AtomicUsize,
    half_requests: AtomicUsize,
}

/// `n` attackers of each of items 1–3's kinds, each from its own loopback
/// address, each reconnecting 50 ms after the server closes it, until
/// `stop`: TCP connections that say nothing (127.0.0.2), TLS handshakes
/// that stop after a few bytes of ClientHello (127.0.0.3), and, over TLS,
/// Dispatch HEADERS without a body or a credential, answering PINGs
/// (127.0.0.4).
fn attack(addr: SocketAddr, ca: &Path, n: usize, stop: &CancellationToken, tally: &Arc<Tally>) {
    let connector = tls_connector(ca);
    for _ in 0..n {
        let (until, counted) = (stop.clone(), tally.clone());
        tokio::spawn(async move {
            until
                .run_until_cancelled(async {
                    loop {
                        if let Ok(mut s) = connect_from(loopback(2), addr).await {
                            counted.silent.fetch_add(1, Ordering::Relaxed);
                            closed_within(&mut s, Duration::from_secs(60)).await;
                        }
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                })
                .await;
        });
        let (until, counted) = (stop.clone(), tally.clone());
        tokio::spawn(async move {
            until
                .run_until_cancelled(async {
                    loop {
                        if let Ok(mut s) = connect_from(loopback(3), addr).await
                            && s.write_all(PARTIAL_CLIENT_HELLO).await.is_ok()
                        {
                            counted.stalled.fetch_add(1, Ordering::Relaxed);
                            closed_within(&mut s, Duration::from_secs(60)).await;
                        }
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                })
                .await;
        });
        let (until, counted, connector) = (stop.clone(), tally.clone(), connector.clone());
        tokio::spawn(async move {
            until
                .run_until_cancelled(async {
                    loop {
                        if let Ok(tls) = tls_from(&connector, loopback(4), addr).await
                            && let Ok((mut send, connection)) = h2(tls).await
                            && let Ok(held) =
                                headers_only(&mut send, grpc_request(DISPATCH, Some("application/grpc"), &[]))
                                    .await
                        {
                            counted.half_requests.fetch_add(1, Ordering::Relaxed);
                            let _ = connection.await;
                            drop(held);
                        }
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                })
                .await;
        });
    }
}

/// Starts a TLS dispatcher with `server` keys under `ulimit -n nofile`,
/// attacks it with `per_kind` callers of each kind, and has an
/// authenticated client dispatch five times, each on a fresh connection
/// from 127.0.0.1: each must be answered within a second.
async fn served_within_a_second_under_attack(server: &str, nofile: u32, per_kind: usize) {
    let cfg = ConfigDir::new("");
    let (ca, cert, key) = certificates(&cfg);
    std::fs::write(cfg.config(), config(server, Some((&cert, &key)))).unwrap();
    cfg.write_region("local", REGION);
    let d = dispatcher_with_nofile(&cfg, nofile);
    dispatcher::tls::install_provider();

    let stop = CancellationToken::new();
    let tally = Arc::new(Tally::default());
    attack(d.addr, &ca, per_kind, &stop, &tally);
    // Let the attack take every slot (or descriptor) there is.
    tokio::time::sleep(Duration::from_millis(1500)).await;

    let tls = tonic::transport::ClientTlsConfig::new()
        .ca_certificate(tonic::transport::Certificate::from_pem(
            std::fs::read(&ca).unwrap(),
        ))
        .domain_name("localhost");
    let mut took = Vec::new();
    for _ in 0..5 {
        let endpoint = tonic::transport::Endpoint::from_shared(format!("https://{}", d.addr))
            .unwrap()
            .tls_config(tls.clone())
            .unwrap()
            .local_address(Some(loopback(1)));
        let started = Instant::now();
        let call = async {
            let channel = endpoint.connect().await.map_err(|e| e.to_string())?;
            let mut r = tonic::Request::new(work());
            r.metadata_mut().insert("authorization", KEY.parse().unwrap());
            pb::dispatcher_client::DispatcherClient::new(channel)
                .dispatch(r)
                .await
                .map_err(|e| e.to_string())
        };
        let result = tokio::time::timeout(Duration::from_secs(1), call).await;
        let elapsed = started.elapsed();
        match result {
            Ok(Ok(_)) => took.push(elapsed),
            Ok(Err(e)) => panic!("the authenticated client failed after {elapsed:?}: {e}"),
            Err(_) => panic!("the authenticated client was not served within 1 s (served so far: {took:?})"),
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    stop.cancel();
    let connected = (
        tally.silent.load(Ordering::Relaxed),
        tally.stalled.load(Ordering::Relaxed),
        tally.half_requests.load(Ordering::Relaxed),
    );
    println!(
        "{} attackers of each kind got in (silent, mid-ClientHello, half requests) {connected:?} times; the client was served after {took:?}",
        per_kind
    );
    assert!(
        connected.0 >= per_kind && connected.1 >= per_kind && connected.2 >= per_kind,
        "every attacker got in at least once: {connected:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_authenticated_client_is_served_within_a_second_under_slow_callers_at_twice_the_cap() {
    // 3 × 16 attackers against 24 slots; descriptors to spare.
    served_within_a_second_under_attack(
        "max_connections = 24\nhandshake_timeout = \"10s\"\nbody_timeout = \"5s\"",
        256,
        16,
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_authenticated_client_is_served_within_a_second_under_slow_callers_out_of_descriptors() {
    // About 45 descriptors for connections under ulimit -n 64 (the cap,
    // 1024, is never reached): 3 × 30 attackers are twice that.
    served_within_a_second_under_attack("handshake_timeout = \"10s\"\nbody_timeout = \"5s\"", 64, 30).await;
}
