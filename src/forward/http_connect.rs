//! How the pooled HTTP client of an OpenAI-compatible region opens a
//! connection: the region's connector (TCP; in memory in tests), wrapped
//! in TLS for `https://` with the region's `[tls]`, offering HTTP/2 and
//! HTTP/1.1 by ALPN. The pool uses HTTP/2 when the provider picks it and
//! keeps HTTP/1.1 connections alive otherwise.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use hyper::rt::{Read, ReadBufCursor, Write};
use hyper_util::client::legacy::connect::{Connected, Connection};
use hyper_util::rt::TokioIo;

use super::{CONNECT_TIMEOUT, Connector, Transport};
use crate::tls::client::ClientTls;

/// Opens connections for one region's HTTP client.
#[derive(Clone)]
pub struct HttpConnect {
    connector: Arc<dyn Connector>,
    /// For `https://`: the region's TLS settings, offering h2 and http/1.1.
    tls: Option<ClientTls>,
}

impl HttpConnect {
    pub fn new(connector: Arc<dyn Connector>, tls: Option<ClientTls>) -> Self {
        let tls = tls.map(|t| {
            let mut config = (*t.config).clone();
            config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
            ClientTls {
                config: Arc::new(config),
                server_name: t.server_name,
            }
        });
        Self { connector, tls }
    }
}

impl tower_service::Service<http::Uri> for HttpConnect {
    type Response = HttpIo;
    type Error = io::Error;
    type Future = Pin<Box<dyn Future<Output = io::Result<HttpIo>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, uri: http::Uri) -> Self::Future {
        let this = self.clone();
        Box::pin(async move {
            let host = uri
                .host()
                .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "no host"))?;
            let https = uri.scheme_str() == Some("https");
            let port = uri.port_u16().unwrap_or(if https { 443 } else { 80 });
            let authority = format!("{host}:{port}");
            tokio::time::timeout(CONNECT_TIMEOUT, async {
                let stream = this.connector.connect(&authority).await?;
                match (&this.tls, https) {
                    (Some(tls), true) => {
                        let stream = tls.connect(stream).await?;
                        let h2 = stream.get_ref().1.alpn_protocol() == Some(b"h2");
                        Ok(HttpIo {
                            io: TokioIo::new(Transport::other(stream)),
                            h2,
                        })
                    }
                    (None, false) => Ok(HttpIo {
                        io: TokioIo::new(stream),
                        h2: false,
                    }),
                    _ => Err(io::Error::new(
                        io::ErrorKind::InvalidInput,
                        "the scheme and the TLS settings disagree",
                    )),
                }
            })
            .await
            .map_err(|_| {
                io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!("no answer within {CONNECT_TIMEOUT:?}"),
                )
            })?
        })
    }
}

/// An open connection, as hyper's pool sees it.
pub struct HttpIo {
    io: TokioIo<Transport>,
    /// TLS settled on HTTP/2.
    h2: bool,
}

impl Connection for HttpIo {
    fn connected(&self) -> Connected {
        let c = Connected::new();
        if self.h2 { c.negotiated_h2() } else { c }
    }
}

impl Read for HttpIo {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: ReadBufCursor<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl Write for HttpIo {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}
