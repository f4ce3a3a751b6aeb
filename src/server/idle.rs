//! Closing gRPC connections nobody uses. hyper's HTTP/2 server has no idle
//! timeout and waits for a client's preface forever, so a client could hold
//! a connection (and a file descriptor) open for ever by saying nothing.
//!
//! `Conn` wraps each accepted socket: it must read the 24-byte HTTP/2
//! preface within `handshake_timeout`, and afterwards is closed (reads end,
//! hyper drops the connection) once no request has been in progress for
//! `idle_timeout`. Requests are counted by `TrackLayer`, which sees each one
//! from its headers to the end of its response body; it finds the
//! connection's counter in the request's extensions, put there by tonic
//! from `Conn`'s `Connected` info. HTTP/2 PINGs do not count as use.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use parking_lot::Mutex;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::OwnedSemaphorePermit;
use tokio::time::{Instant, Sleep};
use tonic::transport::server::{Connected, TcpConnectInfo};

use crate::accept::{Accepted, Acceptor};
use crate::tls::accept::ServerIo;
use crate::tls::identity::PeerIdentity;

/// The HTTP/2 client preface is this long; reading it ends the handshake.
const PREFACE_BYTES: usize = 24;

/// How long a connection may stay silent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timeouts {
    pub handshake: Duration,
    pub idle: Duration,
}

/// Requests in progress on one connection, and since when there are none.
#[derive(Debug)]
pub struct Activity {
    active: AtomicUsize,
    idle_since: Mutex<Instant>,
}

impl Activity {
    pub fn new() -> Arc<Self> {
        Arc::new(Self {
            active: AtomicUsize::new(0),
            idle_since: Mutex::new(crate::clock::tokio_now()),
        })
    }

    /// A request started; it ends when the guard is dropped.
    pub fn begin(self: &Arc<Self>) -> Busy {
        self.active.fetch_add(1, Ordering::SeqCst);
        Busy(self.clone())
    }

    /// Since when nothing is in progress; `None` while something is.
    fn idle_since(&self) -> Option<Instant> {
        let since = *self.idle_since.lock();
        (self.active.load(Ordering::SeqCst) == 0).then_some(since)
    }
}

/// One request in progress.
#[derive(Debug)]
pub struct Busy(Arc<Activity>);

impl Drop for Busy {
    fn drop(&mut self) {
        let mut since = self.0.idle_since.lock();
        if self.0.active.fetch_sub(1, Ordering::SeqCst) == 1 {
            *since = crate::clock::tokio_now();
        }
    }
}

/// What tonic puts in each request's extensions for a `Conn`.
#[derive(Debug, Clone)]
pub struct ConnInfo {
    tcp: TcpConnectInfo,
    activity: Arc<Activity>,
    /// The client certificate's names, once its TLS handshake is done.
    peer: Arc<std::sync::OnceLock<PeerIdentity>>,
}

/// A socket that ends itself when silent or idle too long (see the module).
pub struct Conn<IO> {
    io: IO,
    activity: Arc<Activity>,
    timeouts: Timeouts,
    timer: Pin<Box<Sleep>>,
    read: usize,
    handshaken: bool,
    info: Option<TcpConnectInfo>,
    _slot: Option<OwnedSemaphorePermit>,
}

impl<IO> Conn<IO> {
    pub fn new(io: IO, timeouts: Timeouts, slot: Option<OwnedSemaphorePermit>) -> Self {
        Self {
            io,
            activity: Activity::new(),
            timeouts,
            timer: Box::pin(tokio::time::sleep(timeouts.handshake)),
            read: 0,
            handshaken: false,
            info: None,
            _slot: slot,
        }
    }

    #[cfg(test)]
    fn activity(&self) -> &Arc<Activity> {
        &self.activity
    }

    /// Whether the connection has been silent or idle too long; otherwise
    /// the timer is armed (with `cx`'s waker) for when it might be.
    fn expired(&mut self, cx: &mut Context<'_>) -> bool {
        loop {
            if self.timer.as_mut().poll(cx).is_pending() {
                return false;
            }
            if !self.handshaken {
                tracing::debug!(peer = ?self.info.as_ref().and_then(|i| i.remote_addr), "closing a connection that sent no HTTP/2 preface in time");
                return true;
            }
            let now = crate::clock::tokio_now();
            let next = match self.activity.idle_since() {
                None => now + self.timeouts.idle,
                Some(since) if since + self.timeouts.idle <= now => {
                    tracing::debug!(peer = ?self.info.as_ref().and_then(|i| i.remote_addr), "closing an idle connection");
                    return true;
                }
                Some(since) => since + self.timeouts.idle,
            };
            self.timer.as_mut().reset(next);
        }
    }
}

impl<IO: AsyncRead + Unpin> AsyncRead for Conn<IO> {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.expired(cx) {
            // End of stream: hyper closes the connection (with no request
            // open there is nothing to cut short).
            return Poll::Ready(Ok(()));
        }
        let before = buf.filled().len();
        let polled = Pin::new(&mut this.io).poll_read(cx, buf);
        if !this.handshaken && matches!(polled, Poll::Ready(Ok(()))) {
            this.read += buf.filled().len() - before;
            if this.read >= PREFACE_BYTES {
                this.handshaken = true;
                let at = crate::clock::tokio_now() + this.timeouts.idle;
                this.timer.as_mut().reset(at);
            }
        }
        polled
    }
}

impl<IO: AsyncWrite + Unpin> AsyncWrite for Conn<IO> {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }
}

impl Connected for Conn<ServerIo> {
    type ConnectInfo = ConnInfo;

    fn connect_info(&self) -> ConnInfo {
        ConnInfo {
            tcp: self.io.tcp_info(),
            activity: self.activity.clone(),
            peer: self.io.peer(),
        }
    }
}

/// One accept in progress; it hands the acceptor back with the connection.
type Accepting = Pin<Box<dyn Future<Output = (Acceptor, Accepted)> + Send>>;

/// Accepted connections, wrapped, as the stream tonic serves.
pub struct Incoming {
    acceptor: Option<Acceptor>,
    accepting: Option<Accepting>,
    timeouts: Timeouts,
    /// TLS for every connection, or `None` for plaintext.
    tls: Option<tokio_rustls::TlsAcceptor>,
}

impl Incoming {
    pub fn new(acceptor: Acceptor, timeouts: Timeouts, tls: Option<tokio_rustls::TlsAcceptor>) -> Self {
        Self {
            acceptor: Some(acceptor),
            accepting: None,
            timeouts,
            tls,
        }
    }
}

impl tokio_stream::Stream for Incoming {
    type Item = io::Result<Conn<ServerIo>>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        if self.accepting.is_none() {
            let mut acceptor = self.acceptor.take().expect("an acceptor between accepts");
            self.accepting = Some(Box::pin(async move {
                let accepted = acceptor.accept().await;
                (acceptor, accepted)
            }));
        }
        let accepting = self.accepting.as_mut().expect("set above");
        let (acceptor, accepted) = std::task::ready!(accepting.as_mut().poll(cx));
        self.accepting = None;
        self.acceptor = Some(acceptor);
        // The TLS handshake, if any, runs in the connection's own task and
        // within its handshake timeout (see `tls::accept`).
        let io = ServerIo::new(accepted.stream, self.tls.as_ref());
        let mut conn = Conn::new(io, self.timeouts, Some(accepted.slot));
        conn.info = Some(conn.io.tcp_info());
        Poll::Ready(Some(Ok(conn)))
    }
}

/// Counts each request on its connection's `Activity`, from its headers to
/// the end of its response body (streams included).
#[derive(Debug, Clone, Copy, Default)]
pub struct TrackLayer;

impl<S> tower_layer::Layer<S> for TrackLayer {
    type Service = Track<S>;

    fn layer(&self, inner: S) -> Track<S> {
        Track(inner)
    }
}

#[derive(Debug, Clone)]
pub struct Track<S>(S);

type Request = http::Request<tonic::body::Body>;
type Response = http::Response<tonic::body::Body>;

impl<S> tower_service::Service<Request> for Track<S>
where
    S: tower_service::Service<Request, Response = Response>,
    S::Future: Send + 'static,
{
    type Response = Response;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Response, S::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.0.poll_ready(cx)
    }

    fn call(&mut self, mut request: Request) -> Self::Future {
        let info = request.extensions().get::<ConnInfo>().cloned();
        let busy = info.map(|info| {
            // So `Request::remote_addr()` works as with tonic's own listener.
            request.extensions_mut().insert(info.tcp);
            // Who the client certificate says the caller is (for auth).
            if let Some(peer) = info.peer.get() {
                request.extensions_mut().insert(peer.clone());
            }
            info.activity.begin()
        });
        let response = self.0.call(request);
        Box::pin(async move {
            let response = response.await?;
            Ok(match busy {
                None => response,
                Some(busy) => response.map(|body| tonic::body::Body::new(Tracked { body, _busy: busy })),
            })
        })
    }
}

/// A response body that keeps its request counted until it is done.
struct Tracked {
    body: tonic::body::Body,
    _busy: Busy,
}

impl http_body::Body for Tracked {
    type Data = Bytes;
    type Error = tonic::Status;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Bytes>, Self::Error>>> {
        Pin::new(&mut self.body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.body.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    const T: Timeouts = Timeouts {
        handshake: Duration::from_secs(2),
        idle: Duration::from_secs(10),
    };

    /// Reads from `conn` until it ends; returns how long that took.
    async fn ends_after(conn: &mut Conn<tokio::io::DuplexStream>) -> Duration {
        let start = crate::clock::tokio_now();
        let mut buf = [0u8; 64];
        while conn.read(&mut buf).await.unwrap() > 0 {}
        start.elapsed()
    }

    #[tokio::test(start_paused = true)]
    async fn a_connection_that_says_nothing_ends_after_the_handshake_timeout() {
        let (_client, server) = tokio::io::duplex(1024);
        let mut conn = Conn::new(server, T, None);
        assert_eq!(ends_after(&mut conn).await, T.handshake);
    }

    #[tokio::test(start_paused = true)]
    async fn half_a_preface_is_not_a_handshake() {
        let (mut client, server) = tokio::io::duplex(1024);
        let mut conn = Conn::new(server, T, None);
        client.write_all(&[b'P'; PREFACE_BYTES - 1]).await.unwrap();
        assert_eq!(ends_after(&mut conn).await, T.handshake);
    }

    #[tokio::test(start_paused = true)]
    async fn after_the_preface_it_ends_once_idle_for_the_idle_timeout() {
        let (mut client, server) = tokio::io::duplex(1024);
        let mut conn = Conn::new(server, T, None);
        client.write_all(&[b'P'; PREFACE_BYTES]).await.unwrap();
        let took = ends_after(&mut conn).await;
        assert!(
            took >= T.idle && took <= T.idle + Duration::from_millis(1),
            "{took:?}"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_request_in_progress_keeps_it_open_and_idleness_counts_from_its_end() {
        let (mut client, server) = tokio::io::duplex(1024);
        let mut conn = Conn::new(server, T, None);
        client.write_all(&[b'P'; PREFACE_BYTES]).await.unwrap();
        let busy = conn.activity().begin();
        let activity = conn.activity().clone();
        let ended = tokio::spawn(async move { ends_after(&mut conn).await });
        // Busy for five idle timeouts.
        tokio::time::sleep(T.idle * 5).await;
        assert!(!ended.is_finished(), "closed while a request was in progress");
        let second = activity.begin();
        drop(busy);
        tokio::time::sleep(T.idle * 2).await;
        assert!(
            !ended.is_finished(),
            "closed while the second request was in progress"
        );
        drop(second);
        let took = ended.await.unwrap();
        assert_eq!(took, T.idle * 8, "ends one idle timeout after the last request");
    }
}
