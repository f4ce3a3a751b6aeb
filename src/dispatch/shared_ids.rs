//! A `request_id` answered once across replicas (`[cluster]`): the first
//! replica to claim an id in Redis runs it and stores its reply there for
//! the idempotency window; a replica that finds the id claimed waits for
//! that reply instead of running the work again.
//!
//! Best effort where Redis cannot answer: every call is bounded, and a
//! replica that cannot claim runs the request (as one process would) rather
//! than hold the caller. Failed requests release their claim, so a retry
//! runs again; only successful replies are shared.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use prost::Message;

use super::Dispatched;
use crate::pb;

pub type Pending<T> = Pin<Box<dyn Future<Output = Result<T, String>> + Send>>;

/// What Redis holds for an id.
#[derive(Debug, Clone, PartialEq)]
pub enum Stored {
    /// Nothing: never claimed, expired, or released after a failure.
    Free,
    /// Claimed by a replica that has not answered yet.
    Running,
    /// The reply, encoded.
    Answer(Vec<u8>),
}

/// Request ids shared between replicas; implemented over Redis in
/// `cluster::request_ids`. Every call is bounded by the implementation.
pub trait SharedIds: Send + Sync {
    /// Claims `key` for `ttl`; true if this replica got it.
    fn claim(&self, key: String, ttl: Duration) -> Pending<bool>;
    /// What `key` holds now.
    fn get(&self, key: String) -> Pending<Stored>;
    /// Stores the reply under a claimed `key` (`None`: releases the claim).
    fn finish(&self, key: String, reply: Option<Vec<u8>>, ttl: Duration) -> Pending<()>;
}

pub fn key(tenant: &str, id: &str) -> String {
    format!("dispatcher:rid:{{{tenant}}}:{id}")
}

pub fn encode(d: &Dispatched) -> Vec<u8> {
    pb::DispatchReply {
        request_id: d.request_id.clone(),
        region: d.region.clone(),
        output: d.output.clone(),
        usage: Some(d.usage),
        attempts: d.attempts,
        queue_wait: prost_types::Duration::try_from(d.queue_wait).ok(),
        model: d.path.model.clone(),
        models_tried: d.path.tried.clone(),
        alias: d.path.alias.clone(),
        route: d.path.route.clone(),
        cost: Some(d.cost.to_pb()),
        cached: d.cached.as_deref().map(super::cached_reply),
    }
    .encode_to_vec()
}

pub fn decode(bytes: &[u8], config_version: u64) -> Option<Dispatched> {
    let mut r = pb::DispatchReply::decode(bytes).ok()?;
    let cached = r
        .cached
        .take()
        .and_then(|c| super::cache::hit_from_pb(c, r.output.clone()))
        .map(Arc::new);
    Some(Dispatched {
        request_id: r.request_id,
        region: r.region,
        output: r.output,
        usage: r.usage.unwrap_or_default(),
        attempts: r.attempts,
        queue_wait: r
            .queue_wait
            .and_then(|d| Duration::try_from(d).ok())
            .unwrap_or_default(),
        config_version,
        path: super::ModelPath {
            model: r.model,
            alias: r.alias,
            route: r.route,
            tried: r.models_tried,
        },
        cost: r
            .cost
            .map(|c| super::Cost {
                micros: c.micros,
                currency: c.currency.into(),
                priced: c.priced,
            })
            .unwrap_or_default(),
        cached,
    })
}

/// How a replica should take a request id another replica may have.
// Returned once per request, moved straight out: not worth a box.
#[allow(clippy::large_enum_variant)]
pub enum Shared {
    /// This replica claimed it (or Redis could not say): run it.
    Run { claimed: bool },
    /// Another replica answered it: its reply (boxed: the enum is moved
    /// through the claim's future, and `Run` is one byte).
    Replay(Box<Dispatched>),
}

/// Claims `key`, or waits until `deadline` for the replica that holds it to
/// answer (polling every 50 ms). A claim that disappears (its run failed or
/// expired) is claimed again.
pub async fn claim_or_wait(
    ids: &Arc<dyn SharedIds>,
    key: &str,
    ttl: Duration,
    deadline: tokio::time::Instant,
    config_version: u64,
) -> Result<Shared, String> {
    loop {
        match ids.claim(key.to_string(), ttl).await {
            Ok(true) => return Ok(Shared::Run { claimed: true }),
            Ok(false) => {}
            // Redis cannot say: run it, as one process would.
            Err(_) => return Ok(Shared::Run { claimed: false }),
        }
        loop {
            if crate::clock::tokio_now() >= deadline {
                return Err("waiting for another replica running the same request_id".into());
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
            match ids.get(key.to_string()).await {
                Ok(Stored::Answer(bytes)) => {
                    return match decode(&bytes, config_version) {
                        Some(d) => Ok(Shared::Replay(Box::new(d))),
                        None => Ok(Shared::Run { claimed: false }),
                    };
                }
                Ok(Stored::Running) => continue,
                Ok(Stored::Free) => break,
                Err(_) => return Ok(Shared::Run { claimed: false }),
            }
        }
    }
}
