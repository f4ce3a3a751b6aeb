//! `dispatch::SharedIds` over Redis: `SET NX PX` to claim an id, the reply
//! stored in its place (`SET XX PX`), `DEL` to release it. Its own
//! connection (a clone of one manager), every call bounded by
//! `redis_timeout`.

use std::time::Duration;

use super::bounded::BoundedRedis;
use crate::dispatch::{Pending, SharedIds, Stored};

const RUNNING: &[u8] = b"R";
const ANSWER: u8 = b'A';

pub struct RedisIds {
    redis: BoundedRedis,
}

impl RedisIds {
    pub fn new(
        target: impl Into<crate::config::RedisTarget>,
        timeout: Duration,
    ) -> Result<Self, redis::RedisError> {
        Ok(Self {
            redis: BoundedRedis::new(target.into(), timeout)?,
        })
    }

    /// TLS settings for a `rediss://` URL.
    pub fn with_tls(mut self, tls: Option<crate::config::RedisTls>) -> Result<Self, redis::RedisError> {
        self.redis = self.redis.with_tls(tls)?;
        Ok(self)
    }

    fn run<T: Send + 'static>(
        &self,
        cmd: redis::Cmd,
        f: impl FnOnce(redis::Value) -> Result<T, String> + Send + 'static,
    ) -> Pending<T> {
        self.redis.run(cmd, f)
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
