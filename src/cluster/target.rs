//! Reaching Redis: one URL, or the primary the Sentinels name (`[cluster]
//! redis_sentinels`, `master_name`), asked again at every new connection so
//! that a failover is followed, or a Redis Cluster (`redis_cluster`, its
//! seed nodes; the crate learns the slots and follows MOVED/ASK). Each user
//! keeps its own connection and drops it when a call fails, so its next
//! call asks the Sentinels (or the cluster's nodes) again.
//! A `rediss://` URL is reached over rustls, trusting `redis_ca_file` (and
//! presenting the client certificate) when the config gives them
//! (`config::RedisTls`), the system's roots otherwise.

use std::time::Duration;

use redis::aio::{ConnectionLike, ConnectionManager, ConnectionManagerConfig};
use redis::cluster::{ClusterClient, ClusterClientBuilder};
use redis::cluster_async::ClusterConnection;
use redis::sentinel::{
    SentinelClient, SentinelClientBuilder, SentinelNodeConnectionInfo, SentinelServerType,
};
use redis::{Client, ClientTlsConfig, IntoConnectionInfo, RedisFuture, TlsCertificates, TlsMode, Value};

use crate::config::{RedisTarget, RedisTls};

/// `tls`'s CA and identity, as the crate takes them.
fn certificates(tls: &RedisTls) -> TlsCertificates {
    TlsCertificates {
        client_tls: tls.identity.as_ref().map(|(cert, key)| ClientTlsConfig {
            client_cert: cert.clone(),
            client_key: key.clone(),
        }),
        root_cert: tls.ca.clone(),
    }
}

/// A client for one URL, with `tls`'s CA and identity if given.
fn client(url: &str, tls: Option<&RedisTls>) -> Result<Client, redis::RedisError> {
    match tls {
        Some(tls) => Client::build_with_tls(url, certificates(tls)),
        None => Client::open(url),
    }
}

/// A connection to a single Redis (a connection manager) or to a Redis
/// Cluster (the crate's cluster connection: one multiplexed connection per
/// node, each command sent to the shard of its keys). A command, or a
/// pipeline whose commands all hash to one slot, runs on either; a pipeline
/// spanning slots must be split (`pipelines.rs`).
#[derive(Clone)]
pub enum RedisConnection {
    Single(ConnectionManager),
    Cluster(ClusterConnection),
}

impl RedisConnection {
    pub fn is_cluster(&self) -> bool {
        matches!(self, Self::Cluster(_))
    }
}

impl ConnectionLike for RedisConnection {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a redis::Cmd) -> RedisFuture<'a, Value> {
        match self {
            Self::Single(c) => c.req_packed_command(cmd),
            Self::Cluster(c) => c.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a redis::Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        match self {
            Self::Single(c) => c.req_packed_commands(pipeline, offset, count),
            Self::Cluster(c) => c.req_packed_commands(pipeline, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Self::Single(c) => c.get_db(),
            Self::Cluster(c) => c.get_db(),
        }
    }
}

/// The `[cluster]` key that names `target`, for errors.
pub fn config_key(target: &RedisTarget) -> &'static str {
    match target {
        RedisTarget::Url(_) => "cluster.redis_url",
        RedisTarget::Sentinel { .. } => "cluster.redis_sentinels",
        RedisTarget::Cluster { .. } => "cluster.redis_cluster",
    }
}

/// Checks the URLs (no connection is made: a replica starts without Redis).
pub fn check(target: &RedisTarget, tls: Option<&RedisTls>) -> Result<(), redis::RedisError> {
    match target {
        RedisTarget::Url(url) => client(url, tls).map(drop),
        RedisTarget::Sentinel {
            sentinels,
            master_name,
        } => sentinel(sentinels, master_name, tls).map(drop),
        RedisTarget::Cluster { nodes } => cluster(nodes, tls, Duration::from_secs(1)).map(drop),
    }
}

/// The Sentinels' client. The primary is reached with the first Sentinel
/// URL's user and password. With `tls` (every Sentinel `rediss://`), the
/// Sentinels and the primary they name are reached over TLS with its CA and
/// identity, and every Sentinel with the first URL's user and password too
/// (the crate's builder takes one set for all).
fn sentinel(
    sentinels: &[String],
    master_name: &str,
    tls: Option<&RedisTls>,
) -> Result<SentinelClient, redis::RedisError> {
    let first = sentinels
        .first()
        .map(|u| u.as_str().into_connection_info())
        .transpose()?;
    let Some(tls) = tls else {
        let node = first.map(|info| {
            SentinelNodeConnectionInfo::default().set_redis_connection_info(info.redis_settings().clone())
        });
        return SentinelClient::build(sentinels.to_vec(), master_name, node, SentinelServerType::Master);
    };
    let addrs = sentinels
        .iter()
        .map(|u| Ok(u.as_str().into_connection_info()?.addr().clone()))
        .collect::<Result<Vec<_>, redis::RedisError>>()?;
    let mut builder = SentinelClientBuilder::new(addrs, master_name, SentinelServerType::Master)?
        .set_client_to_sentinel_certificates(certificates(tls))
        .set_client_to_redis_tls_mode(TlsMode::Secure)
        .set_client_to_redis_certificates(certificates(tls));
    let settings = first.as_ref().map(|i| i.redis_settings());
    if let Some(user) = settings.and_then(|s| s.username()) {
        builder = builder
            .set_client_to_sentinel_username(user)
            .set_client_to_redis_username(user);
    }
    if let Some(password) = settings.and_then(|s| s.password()) {
        builder = builder
            .set_client_to_sentinel_password(password)
            .set_client_to_redis_password(password);
    }
    builder.build()
}

/// A cluster client on the seed nodes: every attempt on a node bounded by
/// `timeout`, one retry (a MOVED or ASK is followed within it); the caller
/// bounds the whole call as for a single Redis. With `tls` (every node
/// `rediss://`), each node, found by the seeds or by MOVED, is reached with
/// its CA and identity.
fn cluster(
    nodes: &[String],
    tls: Option<&RedisTls>,
    timeout: Duration,
) -> Result<ClusterClient, redis::RedisError> {
    let builder = ClusterClientBuilder::new(nodes.iter().map(String::as_str))
        .connection_timeout(timeout)
        .response_timeout(timeout)
        .retries(1);
    match tls {
        Some(tls) => builder.certs(certificates(tls)),
        None => builder,
    }
    .build()
}

/// A connection to the target (its primary, or its cluster); the caller
/// bounds it in time.
pub async fn connect(
    target: &RedisTarget,
    tls: Option<&RedisTls>,
    timeout: Duration,
) -> Result<RedisConnection, redis::RedisError> {
    let client = match target {
        RedisTarget::Url(url) => client(url, tls)?,
        RedisTarget::Sentinel {
            sentinels,
            master_name,
        } => sentinel(sentinels, master_name, tls)?.async_get_client().await?,
        RedisTarget::Cluster { nodes } => {
            let c = cluster(nodes, tls, timeout)?.get_async_connection().await?;
            return Ok(RedisConnection::Cluster(c));
        }
    };
    let config = ConnectionManagerConfig::new()
        .set_connection_timeout(Some(timeout))
        .set_response_timeout(Some(timeout))
        .set_number_of_retries(1)
        // The retry within the caller's bound, so a failure that repeats
        // (a refused TLS handshake) is answered with its reason rather
        // than as a timeout.
        .set_min_delay(timeout / 4)
        .set_max_delay(Duration::from_millis(500));
    Ok(RedisConnection::Single(
        ConnectionManager::new_with_config(client, config).await?,
    ))
}
