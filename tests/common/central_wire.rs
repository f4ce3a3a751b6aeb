//! The bytes one central call costs on the wire, as `RedisCentral` sends it
//! (`src/cluster/redis_central.rs`, `pipeline`: one `EVALSHA` of
//! `central.lua` per (region, model), in RESP) and as the script answers
//! (an array of 11 integers). The simulations count with it what they do
//! not send; `sim_scale.rs`'s Redis bench checks it against what a real
//! redis-server reads and writes for the same calls (`INFO stats`).

use dispatcher::cluster::bucket_keys;
use dispatcher::core::central::{FORGET_AFTER, ROUND, STALE_AFTER};
use dispatcher::core::{SyncGrant, SyncItem};

/// A replica id as a deployed replica draws it (`cluster::sync::replica_id`:
/// host, pid and four hex digits): a Kubernetes pod name, pid 1.
pub fn replica_id(r: usize) -> String {
    format!("dispatcher-7f9c6d5b8-{r:05}-1-{:04x}", (r * 7919) % 65_536)
}

fn digits(v: u128) -> u64 {
    let mut n = 1;
    let mut v = v / 10;
    while v > 0 {
        n += 1;
        v /= 10;
    }
    n
}

/// RESP bytes of one bulk string of `len` bytes: `$len\r\n…\r\n`.
fn bulk(len: u64) -> u64 {
    1 + digits(len as u128) + 2 + len + 2
}

fn number(v: i128) -> u64 {
    bulk(digits(v.unsigned_abs()) + u64::from(v < 0))
}

/// The request bytes of `item`'s call from `replica`, as `RedisCentral`
/// sends it with `now_us` (the sync task: `None`, "" for Redis `TIME`) and
/// "" for the epoch (the server's own run id).
pub fn call_bytes(replica: &str, item: &SyncItem, now_us: Option<u64>) -> u64 {
    let (bucket, replicas) = bucket_keys(&item.region, &item.model);
    let (l, c) = (&item.limits, &item.call);
    let strings = [
        7,
        40,
        1,
        bucket.len() as u64,
        replicas.len() as u64,
        replica.len() as u64,
    ]; // EVALSHA, sha1, "2", keys, id
    let hint = |v: Option<i64>| v.map_or(bulk(0), |v| number(v as i128));
    let numbers = [
        l.tokens_per_minute as i128,
        l.token_capacity as i128,
        l.requests_per_minute as i128,
        l.request_capacity as i128,
        l.replicas_floor as i128,
        l.hold_for.as_micros() as i128,
        c.incarnation as i128,
        c.seq as i128,
        c.ask_tokens as i128,
        c.ask_requests as i128,
        c.need_tokens as i128,
        c.held_tokens as i128,
        c.held_requests as i128,
        c.spent_tokens as i128,
        c.spent_requests as i128,
        c.totals.settled_tokens as i128,
        c.totals.settled_requests as i128,
        c.totals.fallback_tokens as i128,
        c.totals.fallback_requests as i128,
        c.acked.settled_tokens as i128,
        c.acked.settled_requests as i128,
        c.acked.fallback_tokens as i128,
        c.acked.fallback_requests as i128,
        c.block.as_micros() as i128,
        STALE_AFTER.as_micros() as i128,
        FORGET_AFTER.as_micros() as i128,
        ROUND.as_micros() as i128,
        3_600, // the idle expiry, s (private to redis_central.rs)
        c.generation as i128,
    ];
    // The two hint figures, the time, and "" for the epoch.
    let args = strings.len() + numbers.len() + 4;
    1 + digits(args as u128)
        + 2
        + strings.iter().map(|&s| bulk(s)).sum::<u64>()
        + numbers.iter().map(|&n| number(n)).sum::<u64>()
        + hint(c.hint.map(|h| h.0))
        + hint(c.hint.map(|h| h.1))
        + now_us.map_or(bulk(0), |t| number(t as i128))
        + bulk(0)
}

/// The answer's bytes: `*11\r\n` and eleven `:n\r\n`.
pub fn answer_bytes(g: &SyncGrant) -> u64 {
    let int = |v: i128| 1 + digits(v.unsigned_abs()) + u64::from(v < 0) + 2;
    5 + [
        g.tokens as i128,
        g.requests as i128,
        g.level_tokens as i128,
        g.level_requests as i128,
        g.blocked_for.as_micros() as i128,
        g.replicas as i128,
        g.fresh as i128,
        g.others_need as i128,
        g.disagreeing as i128,
        g.stale as i128,
        g.generation as i128,
    ]
    .iter()
    .map(|&v| int(v))
    .sum::<u64>()
}
