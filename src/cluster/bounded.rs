//! One Redis connection (a connection manager, made on first use) whose
//! every command is bounded by `redis_timeout`: what the request ids and
//! the response cache's shared layer each use, each its own.

use std::sync::Arc;
use std::time::Duration;

use redis::aio::ConnectionManager;
use tokio::sync::Mutex;

use crate::config::{RedisTarget, RedisTls};
use crate::dispatch::Pending;

#[derive(Clone)]
pub struct BoundedRedis {
    target: Arc<RedisTarget>,
    tls: Option<Arc<RedisTls>>,
    connection: Arc<Mutex<Option<ConnectionManager>>>,
    pub timeout: Duration,
}

impl BoundedRedis {
    pub fn new(target: RedisTarget, timeout: Duration) -> Result<Self, redis::RedisError> {
        super::target::check(&target, None)?;
        Ok(Self {
            target: Arc::new(target),
            tls: None,
            connection: Arc::default(),
            timeout,
        })
    }

    /// TLS settings for a `rediss://` URL (checked here, used at connect).
    pub fn with_tls(mut self, tls: Option<RedisTls>) -> Result<Self, redis::RedisError> {
        super::target::check(&self.target, tls.as_ref())?;
        self.tls = tls.map(Arc::new);
        Ok(self)
    }

    /// Runs `cmd` on the connection, within the timeout, and reads its
    /// answer with `f`.
    pub fn run<T: Send + 'static>(
        &self,
        cmd: redis::Cmd,
        f: impl FnOnce(redis::Value) -> Result<T, String> + Send + 'static,
    ) -> Pending<T> {
        let (target, slot, timeout) = (self.target.clone(), self.connection.clone(), self.timeout);
        let tls = self.tls.clone();
        Box::pin(async move {
            let failed = slot.clone();
            let work = async move {
                let mut con = {
                    let mut slot = slot.lock().await;
                    match &*slot {
                        Some(c) => c.clone(),
                        None => {
                            let c = super::target::connect(&target, tls.as_deref(), timeout)
                                .await
                                .map_err(|e| e.to_string())?;
                            *slot = Some(c.clone());
                            c
                        }
                    }
                };
                let v: redis::Value = cmd.query_async(&mut con).await.map_err(|e| e.to_string())?;
                Ok(v)
            };
            let answer = tokio::time::timeout(timeout, work)
                .await
                .map_err(|_| format!("no answer from Redis within {timeout:?}"))
                .flatten();
            if answer.is_err() {
                // The next call connects again (asking the Sentinels anew).
                *failed.lock().await = None;
            }
            f(answer?)
        })
    }
}
