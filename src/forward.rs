//! Talking to the regional clusters: one pooled, lazily connected HTTP/2
//! channel per region (tonic multiplexes every request over it), and how a
//! cluster's error is read back into quota and retry decisions.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use parking_lot::RwLock;
use tonic::Code;
use tonic::transport::{Channel, Endpoint};

use crate::pb::agent_cluster_client::AgentClusterClient;

pub type ClusterClient = AgentClusterClient<Channel>;

/// How long a cluster may take to accept a TCP connection.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(1);

#[derive(Default)]
pub struct ClusterPool {
    clients: RwLock<HashMap<Arc<str>, (String, ClusterClient)>>,
}

impl ClusterPool {
    pub fn new() -> Self {
        Self::default()
    }

    /// Makes the pool serve exactly these `(region, endpoint)` pairs. Channels
    /// whose endpoint did not change are kept (with their connections).
    pub fn set(&self, endpoints: &[(String, String)]) -> Result<(), String> {
        let mut next = HashMap::with_capacity(endpoints.len());
        {
            let current = self.clients.read();
            for (region, endpoint) in endpoints {
                let client = match current.get(region.as_str()) {
                    Some((e, client)) if e == endpoint => client.clone(),
                    _ => connect(endpoint)
                        .map_err(|e| format!("region {region}: endpoint {endpoint:?}: {e}"))?,
                };
                next.insert(Arc::from(region.as_str()), (endpoint.clone(), client));
            }
        }
        *self.clients.write() = next;
        Ok(())
    }

    pub fn get(&self, region: &str) -> Option<ClusterClient> {
        self.clients.read().get(region).map(|(_, c)| c.clone())
    }

    pub fn endpoint(&self, region: &str) -> Option<String> {
        self.clients.read().get(region).map(|(e, _)| e.clone())
    }
}

fn connect(endpoint: &str) -> Result<ClusterClient, tonic::transport::Error> {
    let channel = Endpoint::from_shared(endpoint.to_string())?
        .connect_timeout(CONNECT_TIMEOUT)
        .tcp_nodelay(true)
        .http2_keep_alive_interval(Duration::from_secs(30))
        .keep_alive_while_idle(true)
        .connect_lazy();
    Ok(AgentClusterClient::new(channel).max_decoding_message_size(usize::MAX))
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
                .min(Duration::from_secs(3600)),
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

    #[tokio::test]
    async fn keeps_channels_whose_endpoint_did_not_change() {
        let pool = ClusterPool::new();
        pool.set(&[("a".into(), "http://127.0.0.1:1".into())]).unwrap();
        assert!(pool.get("a").is_some());
        assert!(pool.get("b").is_none());
        let err = pool.set(&[("b".into(), "not a uri at all".into())]).unwrap_err();
        assert!(err.contains("region b"), "{err}");
        assert!(pool.get("a").is_some(), "a failed update changes nothing");
        pool.set(&[("b".into(), "http://127.0.0.1:2".into())]).unwrap();
        assert!(pool.get("a").is_none());
        assert_eq!(pool.endpoint("b").as_deref(), Some("http://127.0.0.1:2"));
    }
}
