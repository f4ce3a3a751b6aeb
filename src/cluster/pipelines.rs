//! One round of pipelined calls (the sync task's quota calls, its tenant
//! totals) on a single Redis or a Redis Cluster. Each item is a group of
//! commands on keys of one slot (one hash tag). On a single Redis the items
//! go in one pipeline, one round trip, as before; a cluster refuses a
//! pipeline whose commands hash to several slots (the crate answers
//! CROSSSLOT), so there the items are grouped by slot, one pipeline per
//! slot, and the pipelines are sent at once: one round trip per node (the
//! crate's connection to a node multiplexes what is sent to it), all
//! concurrently, within the caller's one bound.

use std::collections::HashMap;

use redis::cluster_routing::Slot;
use redis::{ErrorKind, Pipeline, RedisError, ServerErrorKind, Value};
use tokio::task::JoinSet;

use super::target::RedisConnection;

/// Pipelines by slot, and which items each carries (in order).
pub struct SlotPipelines {
    cluster: bool,
    parts: Vec<(Pipeline, Vec<usize>)>,
    by_slot: HashMap<Slot, usize>,
    items: usize,
}

impl SlotPipelines {
    /// For `con`: one pipeline, or one per slot on a cluster.
    pub fn for_connection(con: &RedisConnection) -> Self {
        Self {
            cluster: con.is_cluster(),
            parts: Vec::new(),
            by_slot: HashMap::new(),
            items: 0,
        }
    }

    /// The pipeline the next item goes in: the one of `key`'s slot. Every
    /// key of the item must share that slot.
    pub fn item(&mut self, key: &str) -> &mut Pipeline {
        let slot = if self.cluster {
            Slot::for_key(key)
        } else {
            Slot::new(0).expect("slot 0")
        };
        let next = self.parts.len();
        let i = *self.by_slot.entry(slot).or_insert(next);
        if i == next {
            self.parts.push((redis::pipe(), Vec::new()));
        }
        self.parts[i].1.push(self.items);
        self.items += 1;
        &mut self.parts[i].0
    }

    /// Sends every pipeline (at once on a cluster) and answers each item's
    /// `per_item` replies (its commands not ignored), in item order. A
    /// pipeline that fails on NOSCRIPT (that node restarted, or flushed its
    /// scripts) has `script` loaded (on every node of a cluster) and is
    /// sent again, once. The first error is the answer.
    pub async fn query(
        self,
        con: &RedisConnection,
        per_item: usize,
        script: Option<&redis::Script>,
    ) -> Result<Vec<Value>, RedisError> {
        let (answers, error) = self.query_each(con, per_item, script).await;
        if let Some(e) = error {
            return Err(e);
        }
        Ok(answers.into_iter().flatten().flatten().collect())
    }

    /// `query`, each item on its own: its replies, or `None` when its
    /// slot's pipeline failed (on a cluster, a shard down fails only the
    /// items of its slots); and the first error.
    pub async fn query_each(
        self,
        con: &RedisConnection,
        per_item: usize,
        script: Option<&redis::Script>,
    ) -> (Vec<Option<Vec<Value>>>, Option<RedisError>) {
        let mut by_part: Vec<Result<Vec<Value>, RedisError>> = Vec::with_capacity(self.parts.len());
        if self.parts.len() <= 1 {
            for (pipe, _) in &self.parts {
                by_part.push(run(con.clone(), pipe, script.cloned()).await);
            }
        } else {
            let mut set = JoinSet::new();
            for (i, (pipe, _)) in self.parts.iter().enumerate() {
                let (con, pipe, script) = (con.clone(), pipe.clone(), script.cloned());
                set.spawn(async move { (i, run(con, &pipe, script).await) });
            }
            by_part.resize_with(self.parts.len(), || {
                Err(RedisError::from((
                    ErrorKind::Client,
                    "a pipeline's task ended without an answer",
                )))
            });
            while let Some(done) = set.join_next().await {
                if let Ok((i, answer)) = done {
                    by_part[i] = answer;
                }
            }
        }
        let mut out = vec![None; self.items];
        let mut error = None;
        for ((_, items), replies) in self.parts.iter().zip(by_part) {
            let replies = replies.and_then(|r| {
                if r.len() == items.len() * per_item {
                    Ok(r)
                } else {
                    Err(RedisError::from((
                        ErrorKind::Client,
                        "short pipeline answer",
                        format!("{} replies to {} calls", r.len(), items.len()),
                    )))
                }
            });
            match replies {
                Ok(r) => {
                    for (k, item) in items.iter().enumerate() {
                        out[*item] = Some(r[k * per_item..(k + 1) * per_item].to_vec());
                    }
                }
                Err(e) => {
                    error.get_or_insert(e);
                }
            }
        }
        (out, error)
    }
}

async fn run(
    mut con: RedisConnection,
    pipe: &Pipeline,
    script: Option<redis::Script>,
) -> Result<Vec<Value>, RedisError> {
    match pipe.query_async(&mut con).await {
        Err(e) if e.kind() == ErrorKind::Server(ServerErrorKind::NoScript) => match script {
            Some(script) => {
                script.prepare_invoke().load_async(&mut con).await?;
                pipe.query_async(&mut con).await
            }
            None => Err(e),
        },
        other => other,
    }
}
