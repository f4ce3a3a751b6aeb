//! Hostile callers for the connection tests, on loopback: TCP connections
//! that say nothing, TLS handshakes that stop part-way, and raw HTTP/2
//! (the h2 crate's client, which answers PINGs) that sends a request's
//! HEADERS and nothing more. Any 127.0.0.x can be the source address (all
//! of 127/8 is loopback on Linux), so attackers and a good client can come
//! from different addresses.

use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite};
use tokio::net::{TcpSocket, TcpStream};

pub const DISPATCH: &str = "/dispatch.v1.Dispatcher/Dispatch";

/// The start of a TLS ClientHello: a record header announcing 512 bytes,
/// and the first few of them. A server waits for the rest.
pub const PARTIAL_CLIENT_HELLO: &[u8] = &[0x16, 0x03, 0x01, 0x02, 0x00, 0x01, 0x00, 0x01, 0xfc, 0x03, 0x03];

/// 127.0.0.`n`.
pub fn loopback(n: u8) -> IpAddr {
    IpAddr::from([127, 0, 0, n])
}

/// A TCP connection to `addr` from the loopback address `from`.
pub async fn connect_from(from: IpAddr, addr: SocketAddr) -> std::io::Result<TcpStream> {
    let socket = TcpSocket::new_v4()?;
    socket.bind(SocketAddr::new(from, 0))?;
    socket.connect(addr).await
}

/// A TLS client trusting `ca`, offering h2 (as gRPC clients do).
pub fn tls_connector(ca: &Path) -> tokio_rustls::TlsConnector {
    let roots = dispatcher::tls::read_roots(ca).unwrap();
    let mut config = rustls::ClientConfig::builder_with_provider(dispatcher::tls::provider())
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = vec![b"h2".to_vec()];
    tokio_rustls::TlsConnector::from(Arc::new(config))
}

/// A TLS session to `addr` from `from`, for the name "localhost".
pub async fn tls_from(
    connector: &tokio_rustls::TlsConnector,
    from: IpAddr,
    addr: SocketAddr,
) -> std::io::Result<tokio_rustls::client::TlsStream<TcpStream>> {
    let tcp = connect_from(from, addr).await?;
    let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
    connector.connect(name, tcp).await
}

/// An HTTP/2 client over `io`; its connection runs in the background
/// (answering PINGs) until the server closes it: the handle ends then.
pub async fn h2<IO>(
    io: IO,
) -> Result<(h2::client::SendRequest<Bytes>, tokio::task::JoinHandle<()>), h2::Error>
where
    IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (send, connection) = h2::client::handshake(io).await?;
    let driver = tokio::spawn(async move {
        let _ = connection.await;
    });
    Ok((send, driver))
}

/// The headers of a gRPC call to `path`: `content_type` (`None`: no such
/// header) and any `extra` headers.
pub fn grpc_request(path: &str, content_type: Option<&str>, extra: &[(&str, &str)]) -> http::Request<()> {
    let mut r = http::Request::builder()
        .method("POST")
        .uri(format!("http://localhost{path}"))
        .header("te", "trailers");
    if let Some(ct) = content_type {
        r = r.header("content-type", ct);
    }
    for (k, v) in extra {
        r = r.header(*k, *v);
    }
    r.body(()).unwrap()
}

/// Sends `request`'s HEADERS and nothing more (no DATA, no END_STREAM).
/// Keep the `SendStream`: the stream stays open while it lives.
pub async fn headers_only(
    send: &mut h2::client::SendRequest<Bytes>,
    request: http::Request<()>,
) -> Result<(h2::client::ResponseFuture, h2::SendStream<Bytes>), h2::Error> {
    let mut ready = send.clone().ready().await?;
    ready.send_request(request, false)
}

/// What the server answered a request.
#[derive(Debug)]
pub struct Answer {
    pub http: u16,
    pub grpc_status: Option<String>,
    pub message: String,
}

/// Waits for the answer: HTTP status, and `grpc-status` / `grpc-message`
/// from the headers (trailers-only) or the trailers.
pub async fn answer(response: h2::client::ResponseFuture) -> Result<Answer, h2::Error> {
    let response = response.await?;
    let http = response.status().as_u16();
    let mut found = response.headers().clone();
    if !found.contains_key("grpc-status") {
        let mut body = response.into_body();
        while let Some(data) = body.data().await {
            let data = data?;
            let _ = body.flow_control().release_capacity(data.len());
        }
        if let Some(trailers) = body.trailers().await? {
            found = trailers;
        }
    }
    let get = |k: &str| found.get(k).map(|v| v.to_str().unwrap_or("").to_string());
    Ok(Answer {
        http,
        grpc_status: get("grpc-status"),
        message: get("grpc-message").unwrap_or_default(),
    })
}

/// Reads (and discards what the server sends) until the server closes
/// `s` or `within` passes; true when it was closed.
pub async fn closed_within<IO: AsyncRead + Unpin>(s: &mut IO, within: Duration) -> bool {
    let read_to_end = async {
        let mut buf = [0u8; 4096];
        loop {
            match s.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(_) => continue,
            }
        }
    };
    tokio::time::timeout(within, read_to_end).await.is_ok()
}

/// The dispatcher of `cfg` under `ulimit -n nofile`. A script sets the
/// limit and execs it, so the process (and the name on its "listening"
/// line) is the dispatcher's.
pub fn dispatcher_with_nofile(cfg: &super::ConfigDir, nofile: u32) -> super::Proc {
    let bin = cfg.path().join("dispatcher");
    std::fs::write(
        &bin,
        format!(
            "#!/bin/sh\nulimit -n {nofile} || exit 1\nexec {} \"$@\"\n",
            env!("CARGO_BIN_EXE_dispatcher")
        ),
    )
    .unwrap();
    std::fs::set_permissions(&bin, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    super::dispatcher_as(bin.to_str().unwrap(), &cfg.config())
}
