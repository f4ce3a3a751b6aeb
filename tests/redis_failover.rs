//! The fence on a real redis-server (`central.lua`, DESIGN §17): a Redis
//! that lost grants it made (a replica promoted before it copied them, a
//! snapshot of the keys restored) would hand those tokens out again. The
//! bucket restarts empty instead, and a strict provider never refuses.
//! Time is passed in (the script's `now`), so the levels are exact; the
//! lag is made on purpose (the replica paused while the primary grants).

mod common;

use std::time::Duration;

use common::redis::RedisServer;
use dispatcher::cluster::{RedisCentral, bucket_keys};
use dispatcher::core::central::CentralLimits;
use dispatcher::core::{SyncCall, SyncGrant, SyncItem};

/// Burst 1,000 tokens, 1,000 a second; holdings last 1 s.
fn limits() -> CentralLimits {
    CentralLimits {
        tokens_per_minute: 60_000,
        token_capacity: 1_000,
        requests_per_minute: 60_000,
        request_capacity: 1_000,
        replicas_floor: 2,
        hold_for: Duration::from_secs(1),
    }
}

const T0: u64 = 1_764_000_000_000_000;

/// Two replicas ("a", "b") that spend all they are granted at once, and
/// the strict provider they spend it at.
#[derive(Default)]
struct Replicas {
    seq: [u64; 2],
    spent: [u64; 2],
    seen: [u64; 2],
    provider: f64,
    provider_at: u64,
    lowest: f64,
}

impl Replicas {
    fn new() -> Self {
        Self {
            provider: 1_000.0,
            lowest: f64::MAX,
            ..Self::default()
        }
    }

    /// Replica `r` asks for `ask` at `at` µs after T0.
    async fn call(&mut self, redis: &mut RedisCentral, r: usize, ask: u64, at: u64) -> SyncGrant {
        self.seq[r] += 1;
        let item = SyncItem {
            region: "eu".into(),
            model: "m".into(),
            limits: limits(),
            call: SyncCall {
                seq: self.seq[r],
                ask_tokens: ask,
                ask_requests: ask.min(1),
                spent_tokens: self.spent[r],
                spent_requests: self.spent[r].min(1),
                generation: self.seen[r],
                ..SyncCall::default()
            },
        };
        let g = redis
            .call(["a", "b"][r], std::slice::from_ref(&item), Some(T0 + at))
            .await
            .unwrap_or_else(|e| panic!("{} at {at} µs: {e}", ["a", "b"][r]))[0];
        self.seen[r] = self.seen[r].max(g.generation);
        self.provider =
            (self.provider + (at - self.provider_at) as f64 / 1_000.0).min(1_000.0) - g.tokens as f64;
        self.provider_at = at;
        self.lowest = self.lowest.min(self.provider);
        self.spent[r] += g.tokens;
        g
    }

    /// 3 s of calls asking nothing: the level fills to the burst.
    async fn quiet(&mut self, redis: &mut RedisCentral) {
        for tick in 0..30u64 {
            for r in 0..2 {
                self.call(redis, r, 0, tick * 100_000 + r as u64 * 10_000).await;
            }
        }
    }

    /// Both ask for the burst every tick for 3 s from `from`, `first`
    /// calling first. Returns the first answer.
    async fn busy(&mut self, redis: &mut RedisCentral, from: u64, first: usize) -> SyncGrant {
        let mut answer = None;
        for tick in 0..30u64 {
            for r in [first, 1 - first] {
                let at = from + tick * 100_000 + u64::from(r != first) * 10_000;
                let g = self.call(redis, r, 1_000, at).await;
                answer.get_or_insert(g);
            }
        }
        answer.unwrap()
    }
}

fn command(server: &RedisServer, args: &[&str]) -> redis::Value {
    let mut cmd = redis::cmd(args[0]);
    for a in &args[1..] {
        cmd.arg(*a);
    }
    cmd.query(&mut server.connection()).unwrap()
}

/// A replica promoted after the primary granted the burst it never copied:
/// its first call, from "b" (which saw nothing newer than the copy), finds
/// the bucket from another server process and restarts it empty; nothing
/// is granted until a holding's life has refilled, and the provider never
/// refuses. Without the fence the copy grants the spent burst again.
#[tokio::test]
async fn a_promoted_replica_that_lags_restarts_empty_and_never_overshoots() {
    let mut primary = RedisServer::start();
    let replica = RedisServer::start_replica_of(&primary);
    let mut on_primary = RedisCentral::new(&primary.url(), Duration::from_secs(2)).unwrap();
    let mut run = Replicas::new();
    run.quiet(&mut on_primary).await;
    // The replica has copied the quiet level, then stops copying.
    let copied = command(&primary, &["WAIT", "1", "2000"]);
    assert_eq!(copied, redis::Value::Int(1), "the replica copied the level");
    // Paused, then cut off (what was sent before the cut is already in its
    // socket and would reach it).
    replica.pause();
    command(&primary, &["CLIENT", "KILL", "TYPE", "replica"]);
    let g = run.call(&mut on_primary, 0, 1_000, 3_050_000).await;
    assert_eq!(g.tokens, 1_000, "the primary grants the burst: {g:?}");
    primary.kill();
    replica.resume();
    command(&replica, &["REPLICAOF", "NO", "ONE"]);

    let mut on_promoted = RedisCentral::new(&replica.url(), Duration::from_secs(2)).unwrap();
    let first = run.busy(&mut on_promoted, 3_200_000, 1).await;
    assert!(first.fresh && first.tokens == 0, "restarted empty: {first:?}");
    assert!(
        run.lowest >= 0.0,
        "the provider refused: lowest level {}",
        run.lowest
    );
    // 3 s at 1,000 tokens a second, less the holding's life.
    let served = run.spent[0] + run.spent[1] - 1_000;
    assert!(
        served >= 1_800,
        "the promoted Redis grants again once refilled: {served}"
    );
}

/// The keys restored from a copy taken before a grant (a snapshot reloaded
/// into the running server: the same process, so the same epoch): the
/// replica that was granted since sees a later generation than the copy's,
/// and the bucket restarts empty at its call. (Without the restart no
/// overshoot follows either when that replica calls first: its running
/// totals charge the level what it spent since the copy's record of it.
/// The restart also drops what the totals do not carry: a refusal's block,
/// a hint, the waiting order.)
#[tokio::test]
async fn a_restored_snapshot_behind_a_callers_generation_restarts_empty() {
    let redis = RedisServer::start();
    let mut central = RedisCentral::new(&redis.url(), Duration::from_secs(2)).unwrap();
    let mut run = Replicas::new();
    run.quiet(&mut central).await;
    let (bucket, replicas) = bucket_keys("eu", "m");
    let dump = |key: &str| -> Vec<u8> {
        redis::cmd("DUMP")
            .arg(key)
            .query(&mut redis.connection())
            .unwrap()
    };
    let copies = [
        (bucket.clone(), dump(&bucket)),
        (replicas.clone(), dump(&replicas)),
    ];
    let g = run.call(&mut central, 0, 1_000, 3_050_000).await;
    assert_eq!(g.tokens, 1_000, "granted the burst: {g:?}");
    for (key, copy) in &copies {
        let _: () = redis::cmd("RESTORE")
            .arg(key)
            .arg(0)
            .arg(copy.as_slice())
            .arg("REPLACE")
            .query(&mut redis.connection())
            .unwrap();
    }
    let first = run.busy(&mut central, 3_200_000, 0).await;
    assert!(first.fresh && first.tokens == 0, "restarted empty: {first:?}");
    assert!(
        run.lowest >= 0.0,
        "the provider refused: lowest level {}",
        run.lowest
    );
}
