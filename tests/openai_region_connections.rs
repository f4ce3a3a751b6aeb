//! An OpenAI-compatible region over plain HTTP/1.1 keeps its connections:
//! a finished stream hands its connection back to the region's pool, so the
//! next call does not open (and, with TLS, handshake) a new one. A stream
//! ends at its usage event, and `[DONE]` and the body's end follow it; a
//! relay that stopped reading there left the connection half-read, and
//! HTTP/1.1 can only close such a connection.
//!
//! The region's endpoint is a counting TCP proxy in front of a real
//! `region-sim --openai`: it counts the connections the dispatcher opens.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use common::openai::{east_region, quick_east};
use common::{ConfigDir, client, dispatcher};
use dispatcher::pb;
use tokio::net::{TcpListener, TcpStream};

const KEY: &str = "sk-e2e-connections-0123456789";

/// Accepts on a loopback port and relays each connection to `to`; the
/// count of connections accepted so far.
async fn counting_proxy(to: std::net::SocketAddr) -> (std::net::SocketAddr, Arc<AtomicUsize>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let accepted = Arc::new(AtomicUsize::new(0));
    let count = accepted.clone();
    tokio::spawn(async move {
        while let Ok((mut inbound, _)) = listener.accept().await {
            count.fetch_add(1, Ordering::SeqCst);
            tokio::spawn(async move {
                if let Ok(mut outbound) = TcpStream::connect(to).await {
                    let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                }
            });
        }
    });
    (addr, accepted)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn finished_streams_hand_their_connection_back_to_the_pool() {
    let cfg = ConfigDir::new(
        "[auth]\nallow_anonymous = true\n[[models]]\nname = \"gpt-4o\"\nmax_request_tokens = 20000\n",
    );
    let (sim, key_file) = quick_east(&cfg, KEY);
    let (proxy, accepted) = counting_proxy(sim.addr).await;
    east_region(&cfg, &format!("http://{proxy}"), &key_file);
    let d = dispatcher(&cfg.config());
    let mut grpc = client(d.addr).await;

    let request = || pb::DispatchRequest {
        model: "gpt-4o".into(),
        payload: r#"{"messages":[{"role":"user","content":"Count to ten."}]}"#.into(),
        max_output_tokens: 40,
        ..Default::default()
    };
    // One call first, so the pool holds a connection.
    grpc.dispatch(request()).await.unwrap();
    let before = accepted.load(Ordering::SeqCst);
    const STREAMS: usize = 6;
    for i in 0..STREAMS {
        let mut s = grpc.dispatch_stream(request()).await.unwrap().into_inner();
        let mut done = false;
        while let Some(c) = s.message().await.unwrap() {
            done |= c.done;
        }
        assert!(done, "stream {i} ended without its last chunk");
        // The next call, one at a time: each can reuse the one before's.
        grpc.dispatch(request()).await.unwrap();
    }
    let opened = accepted.load(Ordering::SeqCst) - before;
    // Health probes share the pool and may overlap a call: one more at most.
    assert!(
        opened <= 1,
        "{opened} connections opened for {STREAMS} streams and {STREAMS} calls one after another \
         (a stream that ends must leave its connection reusable)"
    );
}
