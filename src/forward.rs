//! Talking to the regional clusters: one HTTP/2 connection per region,
//! opened on first use and again whenever it has closed, over which every
//! request to the region is multiplexed; and how a cluster's error is read
//! back into quota and retry decisions.
//!
//! The connection is hyper's HTTP/2 client used directly rather than a tonic
//! `Channel`: a `Channel` hands each request to a buffer task before the
//! connection task, and on this path that extra hop was a fifth of the
//! latency the dispatcher adds (docs/PERFORMANCE.md).
//!
//! How the connection's bytes travel is the connector's business
//! (`connector.rs`): TCP in production, in memory in the engine's tests;
//! for an `https://` endpoint the connection wraps them in TLS with the
//! region's `[tls]`. The health checks use the same connection
//! (`ClusterPool::health_client`), so they judge exactly the path work
//! takes and cannot disagree with it about certificates.

mod connector;
mod http_connect;
mod kind;
mod openai;
mod sse;
mod wire;

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use hyper::client::conn::http2::SendRequest;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use parking_lot::RwLock;
use tonic::Code;
use tonic::body::Body;
use tonic::transport::Uri;

use crate::config::{OpenAiRegion, RegionConfig, RegionTls};
use crate::pb::agent_cluster_client::AgentClusterClient;
use tonic_health::pb::health_client::HealthClient;

pub use connector::{Connecting, Connector, Io, Tcp, Transport, tcp};
pub use kind::{Chunks, Probe, RegionClient, RegionKind};
pub use openai::{OpenAiClient, ProbeOutcome, ProviderLimits};
pub use wire::{Call, ClusterClient, encode};

/// How long a cluster may take to accept a connection.
pub(crate) const CONNECT_TIMEOUT: Duration = Duration::from_secs(1);

/// A region's HTTP/2 connection, shared by every request to it.
#[derive(Clone)]
pub struct Connection {
    shared: Arc<ConnectionState>,
}

struct ConnectionState {
    /// host:port
    authority: String,
    connector: Arc<dyn Connector>,
    /// For `https://`: the region's TLS client settings.
    tls: Option<crate::tls::client::ClientTls>,
    /// Read on every request, under a lock never held across an await.
    link: parking_lot::Mutex<Link>,
    /// Held while a connection is being opened: one attempt at a time.
    connecting: tokio::sync::Mutex<()>,
    /// Connection attempts made, for the tests.
    #[cfg(test)]
    connects: std::sync::atomic::AtomicU64,
}

/// The connection, or how the last attempt to open one failed.
#[derive(Default)]
struct Link {
    sender: Option<SendRequest<Body>>,
    /// When the last attempt failed, and why: callers that were already
    /// waiting for that attempt share its answer instead of each trying
    /// again in turn (against a black-holed region, one connect timeout
    /// each, one after another).
    failed: Option<(Instant, String)>,
}

impl Link {
    /// The connection, if it is still open.
    fn open(&self) -> Option<SendRequest<Body>> {
        self.sender.as_ref().filter(|s| !s.is_closed()).cloned()
    }
}

impl Connection {
    fn new(
        uri: &Uri,
        connector: Arc<dyn Connector>,
        tls: Option<crate::tls::client::ClientTls>,
    ) -> Result<Self, String> {
        let authority = uri.authority().ok_or("no host:port")?.to_string();
        match (uri.scheme_str(), &tls) {
            (Some("http"), None) | (Some("https"), Some(_)) => {}
            (Some("https"), None) => return Err("an https:// endpoint needs TLS settings".into()),
            (Some("http"), Some(_)) => return Err("TLS settings for a plaintext http:// endpoint".into()),
            _ => return Err("only http:// and https:// endpoints are supported".into()),
        }
        Ok(Self {
            shared: Arc::new(ConnectionState {
                authority,
                connector,
                tls,
                link: parking_lot::Mutex::new(Link::default()),
                connecting: tokio::sync::Mutex::new(()),
                #[cfg(test)]
                connects: Default::default(),
            }),
        })
    }

    /// The open connection, or a new one if it closed (or never opened).
    /// One attempt at a time; those who waited for a failed attempt get its
    /// error at once.
    async fn sender(&self) -> Result<SendRequest<Body>, tonic::Status> {
        if let Some(s) = self.shared.link.lock().open() {
            return Ok(s);
        }
        let asked = crate::clock::now();
        let unavailable =
            |e: &str| tonic::Status::unavailable(format!("connecting to {}: {e}", self.shared.authority));
        let _turn = self.shared.connecting.lock().await;
        {
            let link = self.shared.link.lock();
            if let Some(s) = link.open() {
                return Ok(s);
            }
            if let Some((at, why)) = &link.failed
                && *at >= asked
            {
                return Err(unavailable(why));
            }
        }
        #[cfg(test)]
        self.shared
            .connects
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        match self.open().await {
            Ok(sender) => {
                *self.shared.link.lock() = Link {
                    sender: Some(sender.clone()),
                    failed: None,
                };
                Ok(sender)
            }
            Err(why) => {
                let status = unavailable(&why);
                *self.shared.link.lock() = Link {
                    sender: None,
                    failed: Some((crate::clock::now(), why)),
                };
                Err(status)
            }
        }
    }

    /// Opens a new HTTP/2 connection and starts its task.
    async fn open(&self) -> Result<SendRequest<Body>, String> {
        let stream = tokio::time::timeout(CONNECT_TIMEOUT, async {
            let stream = self
                .shared
                .connector
                .connect(&self.shared.authority)
                .await
                .map_err(|e| e.to_string())?;
            match &self.shared.tls {
                None => Ok(stream),
                Some(tls) => tls
                    .connect(stream)
                    .await
                    .map(Transport::other)
                    .map_err(|e| format!("TLS handshake: {e}")),
            }
        })
        .await
        .map_err(|_| format!("no answer within {CONNECT_TIMEOUT:?}"))??;
        let (sender, connection) = hyper::client::conn::http2::Builder::new(TokioExecutor::new())
            .timer(TokioTimer::new())
            .keep_alive_interval(Duration::from_secs(30))
            .keep_alive_while_idle(true)
            .handshake(TokioIo::new(stream))
            .await
            .map_err(|e| e.to_string())?;
        let authority = self.shared.authority.clone();
        tokio::spawn(async move {
            if let Err(e) = connection.await {
                tracing::debug!(%authority, error = %e, "cluster connection closed");
            }
        });
        Ok(sender)
    }
}

impl tonic::codegen::Service<http::Request<Body>> for Connection {
    type Response = http::Response<hyper::body::Incoming>;
    type Error = tonic::Status;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Self::Error>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        // Readiness (and reconnection) is settled per call.
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: http::Request<Body>) -> Self::Future {
        let this = self.clone();
        Box::pin(async move {
            let mut sender = this.sender().await?;
            sender
                .ready()
                .await
                .map_err(|e| tonic::Status::unavailable(format!("{}: {e}", this.shared.authority)))?;
            // As tonic's own transport does, a broken connection is
            // UNAVAILABLE: the request is failed over.
            sender
                .send_request(request)
                .await
                .map_err(|e| tonic::Status::unavailable(format!("{}: {e}", this.shared.authority)))
        })
    }
}

pub struct ClusterPool {
    /// Looked up on every attempt; keyed by configured region names.
    clients: RwLock<HashMap<Arc<str>, Entry, foldhash::fast::RandomState>>,
    connector: Arc<dyn Connector>,
}

/// One region's client and what it was made from.
#[derive(Clone)]
struct Entry {
    endpoint: String,
    tls: Option<RegionTls>,
    link: EntryLink,
}

#[derive(Clone)]
#[allow(clippy::large_enum_variant)]
enum EntryLink {
    /// An AgentCluster: its HTTP/2 connection.
    Cluster {
        uri: Uri,
        connection: Connection,
        client: ClusterClient,
    },
    /// An OpenAI-compatible provider: its pooled HTTP client.
    OpenAi(OpenAiClient),
}

impl Default for ClusterPool {
    fn default() -> Self {
        Self::new()
    }
}

impl ClusterPool {
    /// Connects over TCP.
    pub fn new() -> Self {
        Self::with_connector(tcp())
    }

    /// Connects with `connector` (tests: in memory).
    pub fn with_connector(connector: Arc<dyn Connector>) -> Self {
        Self {
            clients: RwLock::default(),
            connector,
        }
    }

    /// Makes the pool serve exactly these `(region, endpoint)` pairs, each
    /// as its region's configuration says (`config`: its kind, TLS
    /// settings; none: an AgentCluster over plaintext). Clients whose
    /// endpoint and settings did not change are kept.
    pub fn set<'a>(
        &self,
        endpoints: &[(String, String)],
        config: impl Fn(&str) -> Option<&'a RegionConfig>,
    ) -> Result<(), String> {
        let mut next = HashMap::with_capacity_and_hasher(endpoints.len(), Default::default());
        {
            let current = self.clients.read();
            for (region, endpoint) in endpoints {
                let config = config(region);
                let tls = config.and_then(|c| c.tls.clone());
                let openai = config.and_then(openai_settings);
                let kept = current.get(region.as_str()).filter(|e| {
                    e.endpoint == *endpoint
                        && e.tls == tls
                        && match (&e.link, &openai) {
                            (EntryLink::Cluster { .. }, None) => true,
                            (EntryLink::OpenAi(c), Some((s, limits))) => c.same_settings(s, limits),
                            _ => false,
                        }
                });
                let entry = match kept {
                    Some(e) => e.clone(),
                    None => connect(region, endpoint, tls, openai, &self.connector)
                        .map_err(|e| format!("region {region}: endpoint {endpoint:?}: {e}"))?,
                };
                next.insert(Arc::from(region.as_str()), entry);
            }
        }
        *self.clients.write() = next;
        Ok(())
    }

    pub fn get(&self, region: &str) -> Option<RegionClient> {
        self.clients.read().get(region).map(|e| match &e.link {
            EntryLink::Cluster { client, .. } => RegionClient::Cluster(client.clone()),
            EntryLink::OpenAi(c) => RegionClient::OpenAi(c.clone()),
        })
    }

    /// The region's kind, if it is configured.
    pub fn kind(&self, region: &str) -> Option<RegionKind> {
        self.clients.read().get(region).map(|e| match &e.link {
            EntryLink::Cluster { .. } => RegionKind::AgentCluster,
            EntryLink::OpenAi(_) => RegionKind::OpenAi,
        })
    }

    /// The OpenAI-compatible client of `region`, if it is one.
    pub fn openai(&self, region: &str) -> Option<OpenAiClient> {
        match &self.clients.read().get(region)?.link {
            EntryLink::OpenAi(c) => Some(c.clone()),
            EntryLink::Cluster { .. } => None,
        }
    }

    pub fn endpoint(&self, region: &str) -> Option<String> {
        self.clients.read().get(region).map(|e| e.endpoint.clone())
    }

    /// How to check the region's health over its own client: a
    /// `grpc.health.v1` client over an AgentCluster's connection, or the
    /// HTTP client of an OpenAI-compatible provider.
    pub fn probe(&self, region: &str) -> Option<Probe> {
        self.clients.read().get(region).map(|e| match &e.link {
            EntryLink::Cluster { uri, connection, .. } => {
                Probe::Grpc(HealthClient::with_origin(connection.clone(), uri.clone()))
            }
            EntryLink::OpenAi(c) => Probe::OpenAi(c.clone()),
        })
    }
}

/// One cluster's clients outside any pool, over the same kind of
/// connection forwarding uses (TCP, TLS for `https://` with `tls`), for
/// `dispatcher check-cluster`: it judges the path work takes.
pub fn connect_one(
    endpoint: &str,
    tls: Option<crate::tls::client::ClientTls>,
) -> Result<(AgentClusterClient<Connection>, HealthClient<Connection>), String> {
    let uri: Uri = endpoint.parse().map_err(|e| format!("{e}"))?;
    let connection = Connection::new(&uri, tcp(), tls)?;
    Ok((
        AgentClusterClient::with_origin(connection.clone(), uri.clone()),
        HealthClient::with_origin(connection, uri),
    ))
}

/// An OpenAI-compatible region's settings and its models' configured
/// limits (tokens, requests a minute).
type OpenAiSettings = (OpenAiRegion, Vec<(String, u64, u64)>);

fn openai_settings(config: &RegionConfig) -> Option<OpenAiSettings> {
    let settings = config.openai.clone()?;
    let limits = config
        .spec
        .models
        .iter()
        .map(|(m, l)| (m.clone(), l.tokens_per_minute, l.requests_per_minute))
        .collect();
    Some((settings, limits))
}

fn connect(
    region: &str,
    endpoint: &str,
    tls: Option<RegionTls>,
    openai: Option<OpenAiSettings>,
    connector: &Arc<dyn Connector>,
) -> Result<Entry, String> {
    let client_tls = tls.as_ref().map(|t| t.client.clone());
    let link = match openai {
        Some((settings, limits)) => EntryLink::OpenAi(OpenAiClient::new(
            region,
            endpoint,
            settings,
            limits,
            connector.clone(),
            client_tls,
        )?),
        None => {
            let uri: Uri = endpoint.parse().map_err(|e| format!("{e}"))?;
            let connection = Connection::new(&uri, connector.clone(), client_tls)?;
            EntryLink::Cluster {
                client: ClusterClient::new(connection.clone(), uri.clone())?,
                uri,
                connection,
            }
        }
    };
    Ok(Entry {
        endpoint: endpoint.to_string(),
        tls,
        link,
    })
}

/// What a cluster's error means for quota, load and retries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FailureKind {
    /// The cluster did not run the work (unreachable, refused at the door):
    /// refund everything; another region may take it.
    NotRun,
    /// The provider behind the cluster is out of quota until `reset`:
    /// refund, mark the bucket empty, try another region.
    ProviderRefused { reset: Duration },
    /// The request itself was refused (bad argument): refund, do not retry.
    Rejected,
    /// It may have run (timeout, internal error): keep the reservation and
    /// do not run it again elsewhere.
    MayHaveRun,
}

/// The default reset when a provider refusal says none.
pub const DEFAULT_PROVIDER_RESET: Duration = Duration::from_secs(1);

pub fn classify(status: &tonic::Status) -> FailureKind {
    match status.code() {
        Code::Unavailable => FailureKind::NotRun,
        Code::ResourceExhausted => FailureKind::ProviderRefused {
            reset: crate::grpc::retry_after(status)
                .unwrap_or(DEFAULT_PROVIDER_RESET)
                .min(crate::core::model_quota::MAX_REFUSAL_RESET),
        },
        Code::InvalidArgument
        | Code::FailedPrecondition
        | Code::OutOfRange
        | Code::Unimplemented
        | Code::NotFound
        | Code::PermissionDenied
        | Code::Unauthenticated => FailureKind::Rejected,
        _ => FailureKind::MayHaveRun,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tonic_types::{ErrorDetails, StatusExt};

    #[test]
    fn classifies_cluster_errors() {
        assert_eq!(classify(&tonic::Status::unavailable("down")), FailureKind::NotRun);
        let refused = tonic::Status::with_error_details(
            Code::ResourceExhausted,
            "429",
            ErrorDetails::with_retry_info(Some(Duration::from_millis(750))),
        );
        assert_eq!(
            classify(&refused),
            FailureKind::ProviderRefused {
                reset: Duration::from_millis(750)
            }
        );
        assert_eq!(
            classify(&tonic::Status::resource_exhausted("no details")),
            FailureKind::ProviderRefused {
                reset: DEFAULT_PROVIDER_RESET
            }
        );
        assert_eq!(
            classify(&tonic::Status::invalid_argument("x")),
            FailureKind::Rejected
        );
        assert_eq!(
            classify(&tonic::Status::deadline_exceeded("x")),
            FailureKind::MayHaveRun
        );
        assert_eq!(classify(&tonic::Status::internal("x")), FailureKind::MayHaveRun);
    }

    /// A listener whose accept queue is full: the kernel drops further SYNs,
    /// so a connect to it hangs as one to a black-holed host does.
    async fn black_hole() -> (tokio::net::TcpListener, Vec<tokio::net::TcpStream>) {
        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        socket.bind("127.0.0.1:0".parse().unwrap()).unwrap();
        let listener = socket.listen(1).unwrap();
        let addr = listener.local_addr().unwrap();
        let mut fillers = Vec::new();
        for _ in 0..16 {
            match tokio::time::timeout(Duration::from_millis(300), tokio::net::TcpStream::connect(addr)).await
            {
                Ok(Ok(s)) => fillers.push(s),
                _ => return (listener, fillers),
            }
        }
        panic!("the accept queue of {addr} never filled");
    }

    #[tokio::test]
    async fn callers_waiting_on_a_failed_connect_share_its_error() {
        let (listener, _fillers) = black_hole().await;
        let uri: Uri = format!("http://{}", listener.local_addr().unwrap())
            .parse()
            .unwrap();
        let connection = Connection::new(&uri, tcp(), None).unwrap();
        let callers: Vec<_> = (0..4)
            .map(|_| {
                let c = connection.clone();
                tokio::spawn(async move { c.sender().await.map(|_| ()) })
            })
            .collect();
        for caller in callers {
            let err = caller.await.unwrap().unwrap_err();
            assert_eq!(err.code(), Code::Unavailable);
            assert!(err.message().contains("no answer within"), "{}", err.message());
        }
        assert_eq!(
            connection
                .shared
                .connects
                .load(std::sync::atomic::Ordering::Relaxed),
            1,
            "one attempt, its failure shared by everyone who waited for it"
        );
        // A caller arriving after the failure tries again.
        assert!(connection.sender().await.is_err());
        assert_eq!(
            connection
                .shared
                .connects
                .load(std::sync::atomic::Ordering::Relaxed),
            2
        );
    }

    #[tokio::test]
    async fn keeps_channels_whose_endpoint_did_not_change() {
        let pool = ClusterPool::new();
        pool.set(&[("a".into(), "http://127.0.0.1:1".into())], |_| None)
            .unwrap();
        assert!(pool.get("a").is_some());
        assert!(pool.get("b").is_none());
        let err = pool
            .set(&[("b".into(), "not a uri at all".into())], |_| None)
            .unwrap_err();
        assert!(err.contains("region b"), "{err}");
        assert!(pool.get("a").is_some(), "a failed update changes nothing");
        pool.set(&[("b".into(), "http://127.0.0.1:2".into())], |_| None)
            .unwrap();
        assert!(pool.get("a").is_none());
        assert_eq!(pool.endpoint("b").as_deref(), Some("http://127.0.0.1:2"));
    }
}
