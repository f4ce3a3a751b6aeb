//! One client connection, from accept to close, in its own task.
//!
//! hyper's HTTP/2 server has no handshake or idle timeout, so a client
//! could hold a connection (and a file descriptor and a slot) for ever by
//! saying nothing. Here a connection must complete its TLS handshake (when
//! the listener has TLS) and send the 24-byte HTTP/2 preface within
//! `handshake_timeout` of being accepted; the timer runs in this task (and,
//! once hyper has the connection, in its watcher task), whatever hyper is
//! waiting for and however short of descriptors the process is. Afterwards it is closed (GOAWAY) once no request has been in
//! progress for `idle_timeout`, or when a request of an untrusted
//! connection timed out on its body (`guard`). When its slot is given to a
//! newer connection (`slots`) it is closed at once: it had authenticated
//! nothing, so no work of anyone's is cut short.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio_util::sync::CancellationToken;

use super::activity::Activity;
use super::conn_info::{Authenticates, ConnInfo};
use super::guard::Guard;
use crate::accept::Accepted;
use crate::tls::accept::ServerIo;

/// The HTTP/2 client preface is this long; reading it ends the handshake.
const PREFACE_BYTES: usize = 24;

/// How long a connection, and a request on it, may keep the server waiting.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timeouts {
    /// Accept → TLS handshake done → HTTP/2 preface read.
    pub handshake: Duration,
    /// No request in progress for this long: closed.
    pub idle: Duration,
    /// A request's body must have arrived in full within this.
    pub body: Duration,
}

/// What every connection of one listener is served with.
pub struct Settings {
    pub timeouts: Timeouts,
    /// TLS for every connection, or `None` for plaintext.
    pub tls: Option<tokio_rustls::TlsAcceptor>,
    pub http2: hyper::server::conn::http2::Builder<hyper_util::rt::TokioExecutor>,
    pub routes: tonic::service::Routes,
    /// `Dispatch` served without tonic's routes (the main listener only).
    pub dispatch: Option<Arc<super::unary_dispatch::UnaryDispatch>>,
    pub authenticates: Authenticates,
    /// Names the listener in logs and metrics.
    pub what: &'static str,
}

/// Serves one accepted connection until it closes (see the module).
/// `stop`: the server is stopping; finish what is in progress and close.
pub async fn serve(accepted: Accepted, settings: Arc<Settings>, stop: CancellationToken) {
    let Accepted { stream, slot, .. } = accepted;
    let slot = Arc::new(slot);
    let what = settings.what;
    let deadline = crate::clock::tokio_now() + settings.timeouts.handshake;
    let mut io = ServerIo::new(stream, settings.tls.as_ref());
    let tcp = io.tcp_info();
    let handshake = tokio::select! {
        _ = stop.cancelled() => return,
        _ = slot.evicted() => return,
        done = tokio::time::timeout_at(deadline, io.handshake()) => done,
    };
    match handshake {
        Ok(Ok(())) => {}
        Ok(Err(_)) => return slot.closed("tls_failed"), // logged by `ServerIo`
        Err(_) => {
            tracing::debug!(listener = what, peer = ?tcp.remote_addr, "closing a connection that did not finish its TLS handshake within server.handshake_timeout");
            return slot.closed("handshake_timeout");
        }
    }
    let identity = io.peer().get().cloned();
    let io = Preface::new(io);
    let preface = io.seen.clone();
    let info = Arc::new(ConnInfo {
        tcp,
        identity,
        activity: Activity::new(),
        slot: slot.clone(),
        close: CancellationToken::new(),
    });
    let service = Guard::new(
        settings.routes.clone(),
        settings.dispatch.clone(),
        info.clone(),
        settings.timeouts.body,
        settings.authenticates.clone(),
    );
    let conn = settings.http2.serve_connection(
        hyper_util::rt::TokioIo::new(io),
        hyper_util::service::TowerToHyperService::new(service),
    );
    tokio::pin!(conn);
    // The timers and signals are watched by a task of their own: in this
    // one, every wake-up (several per request) would poll them all again.
    let (tell, mut told) = tokio::sync::mpsc::channel(2);
    tokio::spawn(watch(
        Watched {
            info: info.clone(),
            preface,
            deadline,
            idle: settings.timeouts.idle,
            what,
            stop,
        },
        tell,
    ));
    loop {
        tokio::select! {
            biased;
            done = conn.as_mut() => {
                if let Err(e) = done {
                    tracing::debug!(listener = what, peer = ?info.tcp.remote_addr, error = %e, "connection ended with an error");
                }
                return;
            }
            told = told.recv() => match told {
                Some(Close::Now) | None => return,
                Some(Close::Gracefully) => conn.as_mut().graceful_shutdown(),
            },
        }
    }
}

/// What the watcher tells the connection.
enum Close {
    /// Drop it: it never became a connection, or its slot went to another.
    Now,
    /// Finish the requests in progress, then close (GOAWAY).
    Gracefully,
}

/// What the watcher of one connection watches.
struct Watched {
    info: Arc<ConnInfo>,
    /// Set once the HTTP/2 preface has been read.
    preface: Arc<AtomicBool>,
    /// For the TLS handshake and the preface.
    deadline: tokio::time::Instant,
    idle: Duration,
    what: &'static str,
    /// The server is stopping.
    stop: CancellationToken,
}

/// Watches one connection's handshake deadline, eviction, idleness and
/// the server's stop, and tells the connection; ends with it.
async fn watch(w: Watched, tell: tokio::sync::mpsc::Sender<Close>) {
    let slot = &w.info.slot;
    let peer = w.info.tcp.remote_addr;
    let mut handshaken = false;
    let mut closing = false;
    loop {
        let close = tokio::select! {
            _ = tell.closed() => return,
            _ = tokio::time::sleep_until(w.deadline), if !handshaken => {
                if w.preface.load(Ordering::Relaxed) {
                    handshaken = true;
                    continue;
                }
                tracing::debug!(listener = w.what, ?peer, "closing a connection that sent no HTTP/2 preface within server.handshake_timeout");
                slot.closed("handshake_timeout");
                Close::Now
            }
            // Nothing it sent was authenticated: close it now.
            _ = slot.evicted() => Close::Now,
            _ = w.info.close.cancelled(), if !closing => Close::Gracefully,
            _ = w.stop.cancelled(), if !closing => Close::Gracefully,
            _ = w.info.activity.idle_for(w.idle), if handshaken && !closing => {
                tracing::debug!(listener = w.what, ?peer, "closing an idle connection");
                slot.closed("idle");
                Close::Gracefully
            }
        };
        let now = matches!(close, Close::Now);
        closing = true;
        if tell.send(close).await.is_err() || now {
            return;
        }
    }
}

/// The connection's bytes, noting when the HTTP/2 preface has been read.
struct Preface {
    io: ServerIo,
    read: usize,
    seen: Arc<AtomicBool>,
}

impl Preface {
    fn new(io: ServerIo) -> Self {
        Self {
            io,
            read: 0,
            seen: Arc::default(),
        }
    }
}

impl AsyncRead for Preface {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        let polled = Pin::new(&mut this.io).poll_read(cx, buf);
        if this.read < PREFACE_BYTES && matches!(polled, Poll::Ready(Ok(()))) {
            this.read += buf.filled().len() - before;
            if this.read >= PREFACE_BYTES {
                this.seen.store(true, Ordering::Relaxed);
            }
        }
        polled
    }
}

impl AsyncWrite for Preface {
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
