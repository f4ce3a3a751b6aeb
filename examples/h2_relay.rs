//! The floor of the dispatcher's stack, for `benches/compare`: an HTTP/2
//! relay on tokio + hyper that passes every request to one upstream over one
//! shared HTTP/2 connection and streams the answer back, decoding nothing
//! and deciding nothing. It has the dispatcher's shape (a server connection
//! task, a task per request, a client connection task) without its work, so
//! the gap between it and nginx is the stack's, and the gap between it and
//! the dispatcher is the dispatcher's own.
//!
//! With `--keepalive`, both of its HTTP/2 connections keep alive as the
//! dispatcher's do by default (PINGs every 30 s, answered within 10 s on
//! the server side; every 30 s, idle or not, to the upstream): then the two
//! run the same HTTP/2 stack configured alike, and the gap is only the
//! dispatcher's own work (`benches/instr`).
//!
//!     cargo run --release --example h2_relay -- 127.0.0.1:0 127.0.0.1:50061 [--keepalive]
#![forbid(unsafe_code)]

use std::convert::Infallible;
use std::time::Duration;

use http::Uri;
use hyper::body::Incoming;
use hyper::client::conn::http2::SendRequest;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::net::{TcpListener, TcpStream};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let (Some(listen), Some(upstream)) = (args.next(), args.next()) else {
        anyhow::bail!("usage: h2_relay LISTEN_ADDR UPSTREAM_ADDR [--keepalive]");
    };
    let keepalive = match args.next().as_deref() {
        None => None,
        Some("--keepalive") => Some(Duration::from_secs(30)),
        Some(other) => anyhow::bail!("unknown argument {other:?}: expected --keepalive"),
    };
    let stream = TcpStream::connect(&upstream).await?;
    stream.set_nodelay(true)?;
    let mut client = hyper::client::conn::http2::Builder::new(TokioExecutor::new());
    client.timer(TokioTimer::new());
    if let Some(interval) = keepalive {
        client.keep_alive_interval(interval).keep_alive_while_idle(true);
    }
    let (sender, connection) = client.handshake::<_, Incoming>(TokioIo::new(stream)).await?;
    tokio::spawn(connection);
    let listener = TcpListener::bind(&listen).await?;
    println!("h2-relay listening on {}", listener.local_addr()?);
    loop {
        let (socket, _) = listener.accept().await?;
        socket.set_nodelay(true)?;
        let sender = sender.clone();
        let upstream = upstream.clone();
        tokio::spawn(async move {
            let service =
                hyper::service::service_fn(move |request| relay(sender.clone(), upstream.clone(), request));
            let mut server = hyper::server::conn::http2::Builder::new(TokioExecutor::new());
            if let Some(interval) = keepalive {
                server
                    .timer(TokioTimer::new())
                    .keep_alive_interval(Some(interval))
                    .keep_alive_timeout(Duration::from_secs(10));
            }
            let _ = server.serve_connection(TokioIo::new(socket), service).await;
        });
    }
}

async fn relay(
    mut sender: SendRequest<Incoming>,
    upstream: String,
    request: http::Request<Incoming>,
) -> Result<http::Response<Incoming>, Infallible> {
    let (mut parts, body) = request.into_parts();
    let path = parts.uri.path_and_query().map_or("/", |p| p.as_str());
    parts.uri = Uri::try_from(format!("http://{upstream}{path}")).expect("a valid upstream address");
    let answer = async {
        sender.ready().await?;
        sender.send_request(http::Request::from_parts(parts, body)).await
    };
    Ok(answer.await.unwrap_or_else(|e| {
        eprintln!("h2-relay: upstream: {e}");
        std::process::exit(1)
    }))
}
