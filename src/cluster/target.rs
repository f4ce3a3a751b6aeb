//! Reaching Redis: one URL, or the primary the Sentinels name (`[cluster]
//! redis_sentinels`, `master_name`), asked again at every new connection so
//! that a failover is followed. Each user keeps its own connection and drops
//! it when a call fails, so its next call asks the Sentinels again.
//! A `rediss://` URL is reached over rustls, trusting `redis_ca_file` (and
//! presenting the client certificate) when the config gives them
//! (`config::RedisTls`), the system's roots otherwise.

use std::time::Duration;

use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::sentinel::{SentinelClient, SentinelNodeConnectionInfo, SentinelServerType};
use redis::{Client, ClientTlsConfig, IntoConnectionInfo, TlsCertificates};

use crate::config::{RedisTarget, RedisTls};

/// A client for one URL, with `tls`'s CA and identity if given.
fn client(url: &str, tls: Option<&RedisTls>) -> Result<Client, redis::RedisError> {
    let Some(tls) = tls else {
        return Client::open(url);
    };
    let certificates = TlsCertificates {
        client_tls: tls.identity.as_ref().map(|(cert, key)| ClientTlsConfig {
            client_cert: cert.clone(),
            client_key: key.clone(),
        }),
        root_cert: tls.ca.clone(),
    };
    Client::build_with_tls(url, certificates)
}

/// Checks the URLs (no connection is made: a replica starts without Redis).
pub fn check(target: &RedisTarget, tls: Option<&RedisTls>) -> Result<(), redis::RedisError> {
    match target {
        RedisTarget::Url(url) => client(url, tls).map(drop),
        RedisTarget::Sentinel {
            sentinels,
            master_name,
        } => sentinel(sentinels, master_name).map(drop),
    }
}

fn sentinel(sentinels: &[String], master_name: &str) -> Result<SentinelClient, redis::RedisError> {
    // The primary is reached with the first Sentinel URL's user and password.
    let first = sentinels
        .first()
        .map(|u| u.as_str().into_connection_info())
        .transpose()?;
    let node = first.map(|info| {
        SentinelNodeConnectionInfo::default().set_redis_connection_info(info.redis_settings().clone())
    });
    SentinelClient::build(sentinels.to_vec(), master_name, node, SentinelServerType::Master)
}

/// A connection to the target's primary; the caller bounds it in time.
pub async fn connect(
    target: &RedisTarget,
    tls: Option<&RedisTls>,
    timeout: Duration,
) -> Result<ConnectionManager, redis::RedisError> {
    let client = match target {
        RedisTarget::Url(url) => client(url, tls)?,
        RedisTarget::Sentinel {
            sentinels,
            master_name,
        } => sentinel(sentinels, master_name)?.async_get_client().await?,
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
    ConnectionManager::new_with_config(client, config).await
}
