//! Several replicas sharing each provider's quota through Redis
//! (`[cluster]`, docs/SCALING.md): the Redis side of `core::central`, and the
//! one task per replica that talks to it; and request ids answered once
//! across replicas (`request_ids.rs`, on the request path, bounded); and
//! jobs kept in Redis, so any replica serves any job (`jobs.rs`, its owner
//! named there); and the response cache's shared layer (`cache.rs`,
//! best effort, bounded, never on the request path for longer than
//! `redis_timeout`).
//!
//! Redis is one server, the primary Sentinels name, or a Redis Cluster
//! (`target.rs`); on a cluster the sync round is split by slot
//! (`pipelines.rs`) and the cache's purges scan every primary (`scan.rs`).
//!
//! Owner: the sync task owns its Redis connection and is its only user
//! (request ids and jobs have their own). It
//! takes the desk's lock twice per tick, briefly (to collect the calls and
//! to apply the answers), never across a Redis call; requests never wait
//! on Redis.

mod bounded;
mod cache;
pub mod jobs;
mod pipelines;
mod redis_central;
mod request_ids;
mod scan;
mod sync;
mod target;

pub use cache::RedisCache;
pub use jobs::RedisJobStore;
pub use redis_central::{RedisCentral, bucket_keys};
pub use request_ids::RedisIds;
pub use sync::{fresh_replica_id, replica_id, spawn};
pub use target::config_key;
