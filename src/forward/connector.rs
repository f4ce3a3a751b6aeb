//! How the bytes of a cluster connection travel. In production a TCP
//! connection to the endpoint's host:port; tests plug in an in-memory one
//! (`tokio::io::duplex`) so the whole engine runs on a paused clock without
//! sockets.
//!
//! Connecting is rare (once per region, again only after the connection
//! closed), so the connector is a trait object and its future is boxed. The
//! connection itself is an enum rather than a boxed stream: TCP reads and
//! writes stay direct calls, vectored writes included.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

/// A byte stream a connector may hand back besides TCP.
pub trait Io: AsyncRead + AsyncWrite + Send + Unpin + 'static {}

impl<T: AsyncRead + AsyncWrite + Send + Unpin + 'static> Io for T {}

/// What a connector's `connect` returns.
pub type Connecting = Pin<Box<dyn Future<Output = io::Result<Transport>> + Send>>;

/// Opens byte streams to clusters, by authority (`host:port` of the
/// region's endpoint). The caller bounds how long it may take.
pub trait Connector: Send + Sync + 'static {
    fn connect(&self, authority: &str) -> Connecting;
}

/// The default: TCP, with Nagle off (requests are small and latency-bound).
#[derive(Debug, Clone, Copy, Default)]
pub struct Tcp;

impl Connector for Tcp {
    fn connect(&self, authority: &str) -> Connecting {
        let authority = authority.to_string();
        Box::pin(async move {
            let stream = TcpStream::connect(&authority).await?;
            stream.set_nodelay(true)?;
            Ok(Transport::Tcp(stream))
        })
    }
}

/// The TCP connector, shared.
pub fn tcp() -> Arc<dyn Connector> {
    Arc::new(Tcp)
}

/// An open connection's byte stream.
pub enum Transport {
    Tcp(TcpStream),
    /// Anything else (an in-memory pipe in tests).
    Other(Box<dyn Io>),
}

impl Transport {
    pub fn other(io: impl Io) -> Self {
        Transport::Other(Box::new(io))
    }
}

impl std::fmt::Debug for Transport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Transport::Tcp(s) => f.debug_tuple("Tcp").field(s).finish(),
            Transport::Other(_) => f.write_str("Other"),
        }
    }
}

impl AsyncRead for Transport {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Transport::Tcp(s) => Pin::new(s).poll_read(cx, buf),
            Transport::Other(s) => Pin::new(s).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Transport {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Transport::Tcp(s) => Pin::new(s).poll_write(cx, buf),
            Transport::Other(s) => Pin::new(s).poll_write(cx, buf),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Transport::Tcp(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            Transport::Other(s) => Pin::new(s).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            Transport::Tcp(s) => s.is_write_vectored(),
            Transport::Other(s) => s.is_write_vectored(),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Transport::Tcp(s) => Pin::new(s).poll_flush(cx),
            Transport::Other(s) => Pin::new(s).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Transport::Tcp(s) => Pin::new(s).poll_shutdown(cx),
            Transport::Other(s) => Pin::new(s).poll_shutdown(cx),
        }
    }
}
