//! Reaching Redis: one URL, or the primary the Sentinels name (`[cluster]
//! redis_sentinels`, `master_name`), asked again at every new connection so
//! that a failover is followed. Each user keeps its own connection and drops
//! it when a call fails, so its next call asks the Sentinels again.

use std::time::Duration;

use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::sentinel::{SentinelClient, SentinelNodeConnectionInfo, SentinelServerType};
use redis::{Client, IntoConnectionInfo};

use crate::config::RedisTarget;

/// Checks the URLs (no connection is made: a replica starts without Redis).
pub fn check(target: &RedisTarget) -> Result<(), redis::RedisError> {
    match target {
        RedisTarget::Url(url) => Client::open(url.as_str()).map(drop),
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
    SentinelClient::build(
        sentinels.to_vec(),
        master_name.to_string(),
        node,
        SentinelServerType::Master,
    )
}

/// A connection to the target's primary; the caller bounds it in time.
pub async fn connect(
    target: &RedisTarget,
    timeout: Duration,
) -> Result<ConnectionManager, redis::RedisError> {
    let client = match target {
        RedisTarget::Url(url) => Client::open(url.as_str())?,
        RedisTarget::Sentinel {
            sentinels,
            master_name,
        } => sentinel(sentinels, master_name)?.async_get_client().await?,
    };
    let config = ConnectionManagerConfig::new()
        .set_connection_timeout(Some(timeout))
        .set_response_timeout(Some(timeout))
        .set_number_of_retries(1)
        .set_max_delay(Duration::from_millis(500));
    ConnectionManager::new_with_config(client, config).await
}
