//! The central bucket several replicas share for one (region, model): what
//! `src/cluster/central.lua` does inside Redis, here as plain Rust with time
//! passed in (microseconds of Redis `TIME`), so the sharing can be simulated
//! deterministically and the script checked against it.
//!
//! Replicas never ask it per request. Each one calls about every 100 ms
//! with what it wants for the next moments (its *ask*), what it holds now,
//! and running totals it keeps from its start: what it spent of what it
//! held, what its finished requests gave back or used beyond their
//! reservation, and what it spent from its fallback bucket while Redis was
//! away. One call refills the level at the provider's rate, applies the
//! differences from the totals last seen (so a call lost, applied late or
//! repeated counts once), and grants the replica a part of the level.
//!
//! **The bound.** The bucket keeps, per replica, what it may hold (what it
//! said it held, plus what it was granted since), and the level never
//! refills above the provider's burst less all of that: the level and every
//! replica's holding never add up to more than the burst. Whatever a
//! replica does not spend comes back to the level at its next call (its
//! holding is lower than the bucket kept; the difference less what it
//! spent): tokens held are spent, given back, or still held, never lost
//! while the replica is heard from. docs/SCALING.md has the argument.
//!
//! A replica holds what it was granted for `hold_for` (`chunk_ttl`) after
//! its last answer; a replica not heard from for `STALE_AFTER` is presumed
//! cut off from Redis and spending its fallback share (`rate / N`): that
//! share is held back from the refill, kept on its record, and credited
//! back when the replica returns and reports what it really spent. After
//! `FORGET_AFTER` (and at least `hold_for`, so what it held has lapsed) it
//! is presumed gone: its share and what it held are released.
//!
//! Each call carries the caller's limits; the bucket applies the lowest of
//! the replicas it knows and says how many disagree with the caller.
//!
//! **The fence.** Redis replicates asynchronously: a replica promoted after
//! a failover, or a snapshot reloaded, may hold a level from before grants
//! it never saw, and would hand those tokens out again. Every applied call
//! advances the bucket's `generation`, each replica sends back the highest
//! it has seen, and a bucket behind a caller (it lost calls the caller saw
//! answered) restarts empty, as a new one. The first caller after a
//! failover may have seen nothing newer (the lost calls were others'), so
//! the bucket also keeps the `epoch` it was written in (the run id of the
//! Redis server process): a promoted replica, or a server restarted from a
//! snapshot, has another, and the bucket restarts empty at its first call
//! there. docs/SCALING.md has the cost.

use std::collections::BTreeMap;
use std::time::Duration;

/// A replica not heard from for this long is presumed in fallback.
pub const STALE_AFTER: Duration = Duration::from_millis(500);
/// A replica not heard from for this long (and for its `hold_for`) is
/// presumed gone.
pub const FORGET_AFTER: Duration = Duration::from_millis(1_500);
/// Shares are split within rounds of this length (one sync tick).
pub const ROUND: Duration = Duration::from_millis(100);

/// The provider's limits as the replica calling knows them.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct CentralLimits {
    pub tokens_per_minute: u64,
    /// The provider's token burst: the level and what every replica holds
    /// never add up to more.
    pub token_capacity: u64,
    pub requests_per_minute: u64,
    pub request_capacity: u64,
    /// The fewest replicas to assume when dividing the fallback rate.
    pub replicas_floor: u32,
    /// How long a replica may spend what it holds after its last answer
    /// (`cluster.chunk_ttl`).
    pub hold_for: Duration,
}

impl CentralLimits {
    /// The provider's figures alone, for telling replicas that disagree.
    fn figures(&self) -> [u64; 4] {
        [
            self.tokens_per_minute,
            self.token_capacity,
            self.requests_per_minute,
            self.request_capacity,
        ]
    }
}

/// Running totals a replica keeps from its start and never resets. A call
/// carries them; the bucket applies the difference from the last it saw.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Totals {
    /// Given back (reserved, not used: positive) or used beyond the
    /// reservation (negative), by finished requests.
    pub settled_tokens: i64,
    pub settled_requests: i64,
    /// Spent from the fallback bucket while Redis did not answer (less what
    /// requests it paid for gave back).
    pub fallback_tokens: i64,
    pub fallback_requests: i64,
}

/// One replica's call for one (region, model).
#[derive(Debug, Clone, PartialEq, Default)]
pub struct SyncCall {
    /// This process's run: a replica id a new process reuses starts a new
    /// record.
    pub incarnation: u32,
    /// Numbers the calls of one run: one older than the last applied (a
    /// call that timed out, applied late) changes nothing.
    pub seq: u64,
    pub ask_tokens: u64,
    pub ask_requests: u64,
    /// The least worth granting: what the oldest waiting request lacks.
    /// Less would not let it go, so the level keeps it instead until it can
    /// grant this much.
    pub need_tokens: u64,
    /// What the replica holds as it sends the call (granted, not spent,
    /// not given back, not lapsed).
    pub held_tokens: u64,
    pub held_requests: u64,
    /// Spent from what it held, since it started.
    pub spent_tokens: u64,
    pub spent_requests: u64,
    pub totals: Totals,
    /// `totals` as of the last call it had an answer to: where a bucket
    /// that has no record of it (Redis restarted, or it was forgotten)
    /// counts from.
    pub acked: Totals,
    /// The provider's remaining figures less what this replica spent since,
    /// when it told us: the level comes down to them (less what replicas
    /// hold) if above.
    pub hint: Option<(i64, i64)>,
    /// The provider refused a request and said to wait this long.
    pub block: Duration,
    /// The highest `SyncGrant::generation` this replica has seen for this
    /// bucket: a bucket behind it lost calls and restarts empty.
    pub generation: u64,
}

/// The answer to a `SyncCall`.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct SyncGrant {
    pub tokens: u64,
    pub requests: u64,
    /// The central levels after the grant (for operators and the score).
    pub level_tokens: i64,
    pub level_requests: i64,
    /// The provider refused someone's request: nothing is granted for this long.
    pub blocked_for: Duration,
    /// Replicas heard from within `FORGET_AFTER`, this one included.
    pub replicas: u32,
    /// The bucket did not exist (first call ever, or Redis lost its data):
    /// it starts empty, less one `hold_for` of refill.
    pub fresh: bool,
    /// What the other replicas' waiting requests lack, in tokens.
    pub others_need: u64,
    /// Other replicas whose calls carry other limits than this one's (the
    /// bucket applies the lowest of each).
    pub disagreeing: u32,
    /// The call was older than one already applied: nothing changed.
    pub stale: bool,
    /// The bucket's generation after this call (every applied call
    /// advances it).
    pub generation: u64,
}

/// What the bucket keeps of one replica.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
struct Replica {
    seen_us: u64,
    incarnation: u32,
    seq: u64,
    ask_tokens: u64,
    ask_requests: u64,
    /// Fallback share held back while it was stale.
    withheld_tokens: f64,
    withheld_requests: f64,
    /// What its largest waiting request lacks, and since when it has been
    /// waiting (µs; 0 while nothing waits).
    need_tokens: u64,
    need_since_us: u64,
    /// What it may hold: what it said it held at its last call, plus what
    /// it was granted then.
    out_tokens: u64,
    out_requests: u64,
    /// Its running totals as last applied.
    spent_tokens: u64,
    spent_requests: u64,
    totals: Totals,
    /// Its limits, as its last call carried them.
    limits: [u64; 4],
    hold_for_us: u64,
}

/// The central bucket of one (region, model).
#[derive(Debug, Clone, PartialEq)]
pub struct CentralBucket {
    level_tokens: f64,
    level_requests: f64,
    updated_us: u64,
    blocked_until_us: u64,
    round_start_us: u64,
    round_tokens: f64,
    round_requests: f64,
    replicas: BTreeMap<String, Replica>,
    /// Advanced by every applied call.
    generation: u64,
    /// The run id of the Redis server process that created the bucket.
    epoch: String,
}

/// How far a restarted bucket's generation jumps past the highest a caller
/// has seen: past any call a lagging Redis can have lost, so that the other
/// callers that saw those lost calls do not restart it again.
pub const GENERATION_JUMP: u64 = 1 << 32;

fn us(d: Duration) -> u64 {
    d.as_micros() as u64
}

/// `level` plus `add` (at least zero), not above `room`, and never lowered
/// by it: a refill or a refund fills the level only up to what the
/// replicas' holdings leave of the burst.
fn fill(level: f64, add: f64, room: f64) -> f64 {
    level.max((level + add).min(room))
}

impl CentralBucket {
    /// A bucket created by its first call. Redis cannot know what the
    /// provider has left, nor what replicas still hold from before (Redis
    /// restarted): it starts empty, less one `hold_for` of refill, so that
    /// nothing is granted until whatever was held before has lapsed.
    pub fn new(limits: &CentralLimits, now_us: u64) -> Self {
        let hold = limits.hold_for.as_micros() as f64;
        Self {
            generation: 0,
            epoch: String::new(),
            level_tokens: -(limits.tokens_per_minute as f64 / 60e6 * hold),
            level_requests: -(limits.requests_per_minute as f64 / 60e6 * hold),
            updated_us: now_us,
            blocked_until_us: 0,
            round_start_us: now_us,
            round_tokens: 0.0,
            round_requests: 0.0,
            replicas: BTreeMap::new(),
        }
    }

    /// One call, atomically (the script runs alone in Redis). `fresh`: the
    /// bucket was just created, so a fallback report is not charged (a level
    /// that starts empty already assumes the worst).
    fn apply(
        &mut self,
        replica: &str,
        limits: &CentralLimits,
        c: &SyncCall,
        now_us: u64,
        fresh: bool,
    ) -> SyncGrant {
        let now_us = now_us.max(self.updated_us);
        // Forget replicas gone too long (and whose holdings have lapsed):
        // their withheld share and what they held are released.
        let hold_us = self
            .replicas
            .values()
            .map(|r| r.hold_for_us)
            .max()
            .unwrap_or(0)
            .max(us(limits.hold_for));
        let forget_us = us(FORGET_AFTER).max(hold_us + us(ROUND));
        self.replicas
            .retain(|id, r| id == replica || now_us.saturating_sub(r.seen_us) < forget_us);
        let record = self.replicas.get(replica).copied();
        let same_run = record.is_some_and(|m| m.incarnation == c.incarnation);
        if same_run && record.is_some_and(|m| c.seq <= m.seq) {
            return self.answer(replica, 0, 0, now_us, fresh, true);
        }
        self.generation += 1;

        // The limits applied: the lowest each of every replica known.
        let figures = limits.figures();
        let mut low = figures;
        for (id, r) in &self.replicas {
            if id != replica {
                for (l, v) in low.iter_mut().zip(r.limits) {
                    *l = (*l).min(v);
                }
            }
        }
        let [tpm, cap_t, rpm, cap_r] = low;
        let known = self.replicas.len() as u32 + u32::from(record.is_none());
        let n = known.max(limits.replicas_floor).max(1) as f64;

        // Refill at the provider's rate, less the shares of stale replicas,
        // up to the burst less what the replicas may hold.
        let dt = (now_us - self.updated_us) as f64;
        let per_us_t = tpm as f64 / 60e6;
        let per_us_r = rpm as f64 / 60e6;
        let mut stale = 0u32;
        for (id, r) in self.replicas.iter_mut() {
            if id != replica && now_us.saturating_sub(r.seen_us) >= us(STALE_AFTER) {
                stale += 1;
                r.withheld_tokens += per_us_t * dt / n;
                r.withheld_requests += per_us_r * dt / n;
            }
        }
        let kept = 1.0 - stale as f64 / n;
        let (room_t, room_r) = self.room(cap_t, cap_r);
        self.level_tokens = fill(self.level_tokens, per_us_t * dt * kept, room_t);
        self.level_requests = fill(self.level_requests, per_us_r * dt * kept, room_r);
        self.updated_us = now_us;

        // What it held and did not spend comes back; a grant it never got
        // (the answer was lost) comes back too. A new run of the replica
        // (or a record Redis lost) starts from what the call says.
        // A new run starts a new record: what the old run held lapsed with
        // it, and its withheld share is released, not credited (its spending
        // will never be reported).
        let me = self.replicas.entry(replica.to_string()).or_default();
        let (credit_t, credit_r) = if same_run {
            (
                me.out_tokens as f64
                    - c.held_tokens as f64
                    - (c.spent_tokens as f64 - me.spent_tokens as f64),
                me.out_requests as f64
                    - c.held_requests as f64
                    - (c.spent_requests as f64 - me.spent_requests as f64),
            )
        } else {
            *me = Replica {
                totals: c.acked,
                ..Replica::default()
            };
            (0.0, 0.0)
        };
        me.incarnation = c.incarnation;
        me.seq = c.seq;
        me.out_tokens = c.held_tokens;
        me.out_requests = c.held_requests;
        me.spent_tokens = c.spent_tokens;
        me.spent_requests = c.spent_requests;
        me.limits = figures;
        me.hold_for_us = us(limits.hold_for);
        let settled_t = (c.totals.settled_tokens - me.totals.settled_tokens) as f64;
        let settled_r = (c.totals.settled_requests - me.totals.settled_requests) as f64;
        let (fallback_t, fallback_r) = if fresh {
            (0.0, 0.0)
        } else {
            (
                (c.totals.fallback_tokens - me.totals.fallback_tokens) as f64,
                (c.totals.fallback_requests - me.totals.fallback_requests) as f64,
            )
        };
        let (withheld_t, withheld_r) = (me.withheld_tokens, me.withheld_requests);
        me.withheld_tokens = 0.0;
        me.withheld_requests = 0.0;
        me.totals = c.totals;
        me.seen_us = now_us;
        me.ask_tokens = c.ask_tokens;
        me.ask_requests = c.ask_requests;
        if c.need_tokens == 0 {
            me.need_since_us = 0;
        } else if me.need_since_us == 0 {
            me.need_since_us = now_us;
        }
        me.need_tokens = c.need_tokens;
        let mine = (me.need_since_us, replica.to_string());

        // Back to the level: what it did not spend, its refunds and its
        // withheld share (up to the room); then what it used beyond its
        // reservations and spent in fallback; then the provider's word
        // (which can only lower it).
        let (room_t, room_r) = self.room(cap_t, cap_r);
        self.level_tokens += credit_t;
        self.level_requests += credit_r;
        self.level_tokens = fill(self.level_tokens, settled_t.max(0.0) + withheld_t, room_t);
        self.level_requests = fill(self.level_requests, settled_r.max(0.0) + withheld_r, room_r);
        self.level_tokens += settled_t.min(0.0) - fallback_t;
        self.level_requests += settled_r.min(0.0) - fallback_r;
        if let Some((t, r)) = c.hint {
            self.level_tokens = self.level_tokens.min(t as f64 - (cap_t as f64 - room_t));
            self.level_requests = self.level_requests.min(r as f64 - (cap_r as f64 - room_r));
        }
        if !c.block.is_zero() {
            self.blocked_until_us = self.blocked_until_us.max(now_us + us(c.block));
        }

        // Grant: what was asked while there is enough for every live ask;
        // when scarce, an equal part of this round's pool for each replica
        // asking (capped at its ask; what one leaves stays for the others).
        // Not by ask: a replica that got less would ask less and get less
        // still.
        if now_us.saturating_sub(self.round_start_us) >= us(ROUND) {
            self.round_start_us = now_us;
            self.round_tokens = 0.0;
            self.round_requests = 0.0;
        }
        let live = |r: &Replica| now_us.saturating_sub(r.seen_us) < us(STALE_AFTER);
        let asked_t: u64 = self
            .replicas
            .values()
            .filter(|r| live(r))
            .map(|r| r.ask_tokens)
            .sum();
        let asked_r: u64 = self
            .replicas
            .values()
            .filter(|r| live(r))
            .map(|r| r.ask_requests)
            .sum();
        let askers = |ask: fn(&Replica) -> u64| {
            self.replicas
                .values()
                .filter(|r| live(r) && ask(r) > 0)
                .count()
                .max(1) as f64
        };
        let (askers_t, askers_r) = (askers(|r| r.ask_tokens), askers(|r| r.ask_requests));
        let blocked = now_us < self.blocked_until_us;
        // Requests waiting are served in the order they began to wait
        // (first come, first served across replicas): no replica spends the
        // level below what the requests waiting longer than its own lack.
        let ahead: u64 = self
            .replicas
            .iter()
            .filter(|(id, r)| *id != replica && live(r) && r.need_tokens > 0)
            .filter(|(id, r)| c.need_tokens == 0 || (r.need_since_us, (*id).clone()) < mine)
            .map(|(_, r)| r.need_tokens)
            .sum();
        let level_t = self.level_tokens - ahead as f64;
        let share = |ask: u64, need: u64, asked: u64, askers: f64, level: f64, round: f64| -> u64 {
            let need = need.min(ask);
            if blocked || ask == 0 || level < 1.0 || level < need as f64 {
                0
            } else if (asked as f64) <= level {
                ask
            } else {
                let part = ((level + round) / askers).floor();
                (ask as f64)
                    .min(part.max(need as f64))
                    .min(level.floor())
                    .max(0.0) as u64
            }
        };
        let tokens = share(
            c.ask_tokens,
            c.need_tokens,
            asked_t,
            askers_t,
            level_t,
            self.round_tokens,
        );
        let requests = share(
            c.ask_requests,
            0,
            asked_r,
            askers_r,
            self.level_requests,
            self.round_requests,
        );
        let me = self.replicas.get_mut(replica).expect("inserted above");
        if c.need_tokens > 0 && tokens >= c.need_tokens {
            // Served: its next need queues behind the others'.
            me.need_tokens = 0;
            me.need_since_us = now_us;
        }
        me.out_tokens += tokens;
        me.out_requests += requests;
        self.level_tokens -= tokens as f64;
        self.level_requests -= requests as f64;
        self.round_tokens += tokens as f64;
        self.round_requests += requests as f64;
        self.answer(replica, tokens, requests, now_us, fresh, false)
    }

    /// The burst less what every replica may hold (what the level may
    /// refill to).
    fn room(&self, cap_t: u64, cap_r: u64) -> (f64, f64) {
        let out_t: u64 = self.replicas.values().map(|r| r.out_tokens).sum();
        let out_r: u64 = self.replicas.values().map(|r| r.out_requests).sum();
        (cap_t as f64 - out_t as f64, cap_r as f64 - out_r as f64)
    }

    fn answer(
        &self,
        replica: &str,
        tokens: u64,
        requests: u64,
        now_us: u64,
        fresh: bool,
        stale: bool,
    ) -> SyncGrant {
        let live = |r: &Replica| now_us.saturating_sub(r.seen_us) < us(STALE_AFTER);
        let mine = self.replicas.get(replica).map(|r| r.limits);
        SyncGrant {
            tokens,
            requests,
            level_tokens: self.level_tokens.floor() as i64,
            level_requests: self.level_requests.floor() as i64,
            blocked_for: Duration::from_micros(self.blocked_until_us.saturating_sub(now_us)),
            replicas: self.replicas.len() as u32,
            fresh,
            others_need: self
                .replicas
                .iter()
                .filter(|(id, r)| *id != replica && live(r))
                .map(|(_, r)| r.need_tokens)
                .sum(),
            disagreeing: self
                .replicas
                .iter()
                .filter(|(id, r)| *id != replica && Some(r.limits) != mine)
                .count() as u32,
            stale,
            generation: self.generation,
        }
    }
}

/// A call on the bucket Redis may or may not have, on one Redis server
/// whose epoch is never seen to change (the simulations).
pub fn call_or_create(
    slot: &mut Option<CentralBucket>,
    replica: &str,
    limits: &CentralLimits,
    c: &SyncCall,
    now_us: u64,
) -> SyncGrant {
    call_in_epoch(slot, "", replica, limits, c, now_us)
}

/// Why a bucket restarts empty at a call, if it does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Restart {
    /// There was none (first call ever, Redis restarted empty, or idle
    /// long enough to expire).
    Missing,
    /// Written by another server process: this one was promoted since, or
    /// restarted from a snapshot.
    NewEpoch,
    /// Behind what the caller saw: it lost calls (a lagging replica
    /// promoted, or a snapshot reloaded).
    Behind,
}

/// Whether the bucket in `slot` must restart empty before `c` is applied in
/// `epoch`.
pub fn restart(slot: &Option<CentralBucket>, epoch: &str, c: &SyncCall) -> Option<Restart> {
    match slot {
        None => Some(Restart::Missing),
        Some(b) if b.epoch != epoch => Some(Restart::NewEpoch),
        Some(b) if b.generation < c.generation => Some(Restart::Behind),
        Some(_) => None,
    }
}

/// A call on the bucket Redis may or may not have, in the server's
/// `epoch`: a missing bucket, one from another epoch, or one behind the
/// caller's generation starts anew (see `CentralBucket::new`: empty, less
/// one `hold_for`, every record dropped), past every generation seen, and a
/// fallback report is then not charged (an empty level already assumes the
/// worst).
pub fn call_in_epoch(
    slot: &mut Option<CentralBucket>,
    epoch: &str,
    replica: &str,
    limits: &CentralLimits,
    c: &SyncCall,
    now_us: u64,
) -> SyncGrant {
    let fresh = restart(slot, epoch, c).is_some();
    if fresh {
        let before = slot.as_ref().map_or(0, |b| b.generation);
        let mut bucket = CentralBucket::new(limits, now_us);
        bucket.epoch = epoch.to_string();
        if before > 0 || c.generation > 0 {
            bucket.generation = before.max(c.generation) + GENERATION_JUMP;
        }
        *slot = Some(bucket);
    }
    slot.as_mut()
        .expect("created above")
        .apply(replica, limits, c, now_us, fresh)
}

#[cfg(test)]
#[path = "central_tests.rs"]
mod tests;
