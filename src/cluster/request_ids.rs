//! `dispatch::SharedIds` over Redis: `SET NX PX` to claim an id, the reply
//! stored in its place (`SET XX PX`), `DEL` to release it. Its own
//! connection (a clone of one manager), every call bounded by
//! `redis_timeout`.

use std::sync::Arc;
use std::time::Duration;

use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use tokio::sync::Mutex;

use crate::dispatch::{Pending, SharedIds, Stored};

const RUNNING: &[u8] = b"R";
const ANSWER: u8 = b'A';

pub struct RedisIds {
    client: redis::Client,
    connection: Arc<Mutex<Option<ConnectionManager>>>,
    timeout: Duration,
}

impl RedisIds {
    pub fn new(url: &str, timeout: Duration) -> Result<Self, redis::RedisError> {
        Ok(Self {
            client: redis::Client::open(url)?,
            connection: Arc::default(),
            timeout,
        })
    }

    /// Runs `f` on a connection (made on first use), within the timeout.
    fn run<T: Send + 'static>(
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

fn millis(ttl: Duration) -> u64 {
    ttl.as_millis().max(1) as u64
}

impl SharedIds for RedisIds {
    fn claim(&self, key: String, ttl: Duration) -> Pending<bool> {
        let mut cmd = redis::cmd("SET");
        cmd.arg(key).arg(RUNNING).arg("NX").arg("PX").arg(millis(ttl));
        self.run(cmd, |v| Ok(matches!(v, redis::Value::Okay)))
    }

    fn get(&self, key: String) -> Pending<Stored> {
        let mut cmd = redis::cmd("GET");
        cmd.arg(key);
        self.run(cmd, |v| match v {
            redis::Value::Nil => Ok(Stored::Free),
            redis::Value::BulkString(b) if b.first() == Some(&ANSWER) => Ok(Stored::Answer(b[1..].to_vec())),
            redis::Value::BulkString(_) => Ok(Stored::Running),
            other => Err(format!("unexpected reply {other:?}")),
        })
    }

    fn finish(&self, key: String, reply: Option<Vec<u8>>, ttl: Duration) -> Pending<()> {
        let cmd = match reply {
            Some(bytes) => {
                let mut value = Vec::with_capacity(bytes.len() + 1);
                value.push(ANSWER);
                value.extend_from_slice(&bytes);
                let mut cmd = redis::cmd("SET");
                cmd.arg(key).arg(value).arg("XX").arg("PX").arg(millis(ttl));
                cmd
            }
            None => {
                let mut cmd = redis::cmd("DEL");
                cmd.arg(key);
                cmd
            }
        };
        self.run(cmd, |_| Ok(()))
    }
}
