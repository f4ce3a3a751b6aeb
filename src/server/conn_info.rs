//! What the requests of one connection know of it, shared by the
//! connection's task (`conn.rs`) and its requests (`guard.rs`).
//!
//! Owner: the connection's task makes it; requests read it (`Arc`).

use std::sync::Arc;

use tokio_util::sync::CancellationToken;
use tonic::transport::server::TcpConnectInfo;

use super::activity::Activity;
use crate::dispatch::Caller;
use crate::slots::Slot;
use crate::tls::identity::PeerIdentity;

/// Whether a caller's credential names a tenant (anonymous use counts when
/// it is on); the engine's current configuration decides.
pub type Authenticates = Arc<dyn Fn(&Caller) -> bool + Send + Sync>;

pub struct ConnInfo {
    pub tcp: TcpConnectInfo,
    /// The client certificate's names (TLS with client certificates).
    pub identity: Option<PeerIdentity>,
    pub activity: Arc<Activity>,
    pub slot: Arc<Slot>,
    /// Cancelled to close the connection once its requests are done.
    pub close: CancellationToken,
}
