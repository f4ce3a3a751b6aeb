//! An in-memory network: authorities served by tonic servers over
//! `tokio::io::duplex` pipes, reached through the engine's `Connector`.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use dispatcher::forward::{Connecting, Connector, Transport};
use parking_lot::Mutex;
use tokio::io::DuplexStream;
use tokio::sync::mpsc;
use tokio_stream::StreamExt;
use tokio_stream::wrappers::UnboundedReceiverStream;
use tonic::service::Routes;

use super::FakeCluster;
use dispatcher::pb::agent_cluster_server::AgentClusterServer;

/// Bytes a pipe buffers each way (the HTTP/2 window is 64 KiB anyway).
const PIPE_BYTES: usize = 64 * 1024;

/// Authorities served in memory: connecting to one hands the server one end
/// of a new pipe.
#[derive(Clone, Default)]
pub struct Net {
    inner: Arc<NetInner>,
}

#[derive(Default)]
struct NetInner {
    listeners: Mutex<HashMap<String, mpsc::UnboundedSender<DuplexStream>>>,
    connects: AtomicU64,
}

impl Net {
    pub fn new() -> Self {
        Self::default()
    }

    /// Serves `routes` at `authority` (`host:port`) from now on.
    pub fn serve(&self, authority: &str, routes: Routes) {
        let (tx, rx) = mpsc::unbounded_channel();
        self.inner.listeners.lock().insert(authority.to_string(), tx);
        let incoming = UnboundedReceiverStream::new(rx).map(Ok::<_, std::io::Error>);
        tokio::spawn(
            tonic::transport::Server::builder()
                .add_routes(routes)
                .serve_with_incoming(incoming),
        );
    }

    /// Serves a fake cluster at `authority`.
    pub fn serve_cluster(&self, authority: &str, cluster: &FakeCluster) {
        self.serve(authority, Routes::new(AgentClusterServer::new(cluster.clone())));
    }

    /// New connections to `authority` are refused from now on (open ones
    /// stay open).
    pub fn unplug(&self, authority: &str) {
        self.inner.listeners.lock().remove(authority);
    }

    /// Connections opened so far.
    pub fn connects(&self) -> u64 {
        self.inner.connects.load(Ordering::SeqCst)
    }

    pub fn connector(&self) -> Arc<dyn Connector> {
        Arc::new(self.clone())
    }
}

impl Connector for Net {
    fn connect(&self, authority: &str) -> Connecting {
        let listener = self.inner.listeners.lock().get(authority).cloned();
        let authority = authority.to_string();
        let connects = self.inner.clone();
        Box::pin(async move {
            let refused = || std::io::Error::new(std::io::ErrorKind::ConnectionRefused, authority.clone());
            let listener = listener.ok_or_else(refused)?;
            let (ours, theirs) = tokio::io::duplex(PIPE_BYTES);
            listener.send(theirs).map_err(|_| refused())?;
            connects.connects.fetch_add(1, Ordering::SeqCst);
            Ok(Transport::other(ours))
        })
    }
}
