//! A server connection's byte stream: plain TCP, or TLS whose handshake
//! runs inside the connection's own task, so a slow or silent client never
//! holds up the accept loop: the dispatcher drives it with `handshake`,
//! within the connection's handshake timeout (`server::conn`); a server
//! that does not (region-sim) gets it on the first read or write. A client
//! that does not speak TLS (plaintext gRPC on the TLS port) fails the
//! handshake on its first bytes and the connection is closed at once.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::{Arc, OnceLock};
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio_rustls::server::TlsStream;

use super::identity::{self, PeerIdentity};

/// Where a connection stands.
enum Inner {
    Plain(TcpStream),
    Handshaking(Box<tokio_rustls::Accept<TcpStream>>),
    Tls(Box<TlsStream<TcpStream>>),
    Failed,
}

pub struct ServerIo {
    tcp_info: tonic::transport::server::TcpConnectInfo,
    inner: Inner,
    /// Set once the handshake is done: the client certificate's names.
    peer: Arc<OnceLock<PeerIdentity>>,
}

impl ServerIo {
    /// `tls`: the listener's acceptor, or `None` for plaintext.
    pub fn new(stream: TcpStream, tls: Option<&tokio_rustls::TlsAcceptor>) -> Self {
        let tcp_info = tonic::transport::server::TcpConnectInfo {
            local_addr: stream.local_addr().ok(),
            remote_addr: stream.peer_addr().ok(),
        };
        let inner = match tls {
            Some(acceptor) => Inner::Handshaking(Box::new(acceptor.accept(stream))),
            None => Inner::Plain(stream),
        };
        Self {
            tcp_info,
            inner,
            peer: Arc::default(),
        }
    }

    pub fn tcp_info(&self) -> tonic::transport::server::TcpConnectInfo {
        self.tcp_info.clone()
    }

    /// Filled in when the TLS handshake completes (stays empty in plaintext).
    pub fn peer(&self) -> Arc<OnceLock<PeerIdentity>> {
        self.peer.clone()
    }

    /// Completes the TLS handshake (at once in plaintext).
    pub async fn handshake(&mut self) -> io::Result<()> {
        std::future::poll_fn(|cx| self.poll_ready(cx)).await
    }

    /// Drives the handshake; ready once the stream can carry data.
    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if let Inner::Handshaking(accept) = &mut self.inner {
            match Pin::new(accept.as_mut()).poll(cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Ok(stream)) => {
                    let _ = self
                        .peer
                        .set(identity::of_chain(stream.get_ref().1.peer_certificates()));
                    self.inner = Inner::Tls(Box::new(stream));
                }
                Poll::Ready(Err(e)) => {
                    tracing::debug!(peer = ?self.tcp_info.remote_addr, error = %e, "TLS handshake failed");
                    self.inner = Inner::Failed;
                    return Poll::Ready(Err(e));
                }
            }
        }
        match self.inner {
            Inner::Failed => Poll::Ready(Err(io::Error::new(
                io::ErrorKind::ConnectionAborted,
                "the TLS handshake failed",
            ))),
            _ => Poll::Ready(Ok(())),
        }
    }
}

impl AsyncRead for ServerIo {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        std::task::ready!(this.poll_ready(cx))?;
        match &mut this.inner {
            Inner::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Inner::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
            Inner::Handshaking(_) | Inner::Failed => unreachable!("settled by poll_ready"),
        }
    }
}

impl AsyncWrite for ServerIo {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        std::task::ready!(this.poll_ready(cx))?;
        match &mut this.inner {
            Inner::Plain(s) => Pin::new(s).poll_write(cx, buf),
            Inner::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
            Inner::Handshaking(_) | Inner::Failed => unreachable!("settled by poll_ready"),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        std::task::ready!(this.poll_ready(cx))?;
        match &mut this.inner {
            Inner::Plain(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            Inner::Tls(s) => Pin::new(s.as_mut()).poll_write_vectored(cx, bufs),
            Inner::Handshaking(_) | Inner::Failed => unreachable!("settled by poll_ready"),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match &self.inner {
            Inner::Plain(s) => s.is_write_vectored(),
            Inner::Tls(s) => s.is_write_vectored(),
            Inner::Handshaking(_) | Inner::Failed => false,
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        std::task::ready!(this.poll_ready(cx))?;
        match &mut this.inner {
            Inner::Plain(s) => Pin::new(s).poll_flush(cx),
            Inner::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
            Inner::Handshaking(_) | Inner::Failed => unreachable!("settled by poll_ready"),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match &mut self.get_mut().inner {
            Inner::Plain(s) => Pin::new(s).poll_shutdown(cx),
            Inner::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
            // Nothing was said over TLS yet: there is nothing to close politely.
            Inner::Handshaking(_) | Inner::Failed => Poll::Ready(Ok(())),
        }
    }
}

impl tonic::transport::server::Connected for ServerIo {
    type ConnectInfo = tonic::transport::server::TcpConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.tcp_info()
    }
}
