//! One Redis connection (a connection manager, made on first use) whose
//! every command is bounded by `redis_timeout`: what the request ids and
//! the response cache's shared layer each use, each its own.

use std::sync::Arc;
use std::time::Duration;

use super::target::RedisConnection;
use tokio::sync::Mutex;

use crate::config::{RedisTarget, RedisTls};
use crate::dispatch::Pending;

#[derive(Clone)]
pub struct BoundedRedis {
    target: Arc<RedisTarget>,
    tls: Option<Arc<RedisTls>>,
    connection: Arc<Mutex<Option<RedisConnection>>>,
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
        self.with(move |mut con| async move { cmd.query_async(&mut con).await }, f)
    }

    /// Runs `work` on the connection, within the timeout, and reads its
    /// answer with `f`. A failure drops the connection: the next call
    /// connects again (asking the Sentinels, or the cluster, anew).
    pub fn with<T: Send + 'static, V: Send, W>(
        &self,
        work: impl FnOnce(RedisConnection) -> W + Send + 'static,
        f: impl FnOnce(V) -> Result<T, String> + Send + 'static,
    ) -> Pending<T>
    where
        W: Future<Output = Result<V, redis::RedisError>> + Send,
    {
        let (target, slot, timeout) = (self.target.clone(), self.connection.clone(), self.timeout);
        let tls = self.tls.clone();
        Box::pin(async move {
            let failed = slot.clone();
            let call = async move {
                let con = {
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
                work(con).await.map_err(|e| e.to_string())
            };
            let answer = tokio::time::timeout(timeout, call)
                .await
                .map_err(|_| format!("no answer from Redis within {timeout:?}"))
                .flatten();
            if answer.is_err() {
                *failed.lock().await = None;
            }
            f(answer?)
        })
    }
}
