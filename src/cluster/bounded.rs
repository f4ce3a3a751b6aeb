//! One Redis connection (a connection manager, made on first use) whose
//! every command is bounded by `redis_timeout`: what the request ids and
//! the response cache's shared layer each use, each its own.

use std::sync::Arc;
use std::time::Duration;

use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use tokio::sync::Mutex;

use crate::dispatch::Pending;

#[derive(Clone)]
pub struct BoundedRedis {
    client: redis::Client,
    connection: Arc<Mutex<Option<ConnectionManager>>>,
    pub timeout: Duration,
}

impl BoundedRedis {
    pub fn new(url: &str, timeout: Duration) -> Result<Self, redis::RedisError> {
        Ok(Self {
            client: redis::Client::open(url)?,
            connection: Arc::default(),
            timeout,
        })
    }

    /// Runs `cmd` on the connection, within the timeout, and reads its
    /// answer with `f`.
    pub fn run<T: Send + 'static>(
        &self,
        cmd: redis::Cmd,
        f: impl FnOnce(redis::Value) -> Result<T, String> + Send + 'static,
    ) -> Pending<T> {
        let (client, slot, timeout) = (self.client.clone(), self.connection.clone(), self.timeout);
        Box::pin(async move {
            let work = async move {
                let mut con = {
                    let mut slot = slot.lock().await;
                    match &*slot {
                        Some(c) => c.clone(),
                        None => {
                            let config = ConnectionManagerConfig::new()
                                .set_connection_timeout(Some(timeout))
                                .set_response_timeout(Some(timeout))
                                .set_number_of_retries(1);
                            let c = ConnectionManager::new_with_config(client, config)
                                .await
                                .map_err(|e| e.to_string())?;
                            *slot = Some(c.clone());
                            c
                        }
                    }
                };
                let v: redis::Value = cmd.query_async(&mut con).await.map_err(|e| e.to_string())?;
                f(v)
            };
            tokio::time::timeout(timeout, work)
                .await
                .map_err(|_| format!("no answer from Redis within {timeout:?}"))?
        })
    }
}
