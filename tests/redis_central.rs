//! The Redis script (`src/cluster/central.lua`) against the Rust model it
//! mirrors (`core::central`), on a real redis-server: the same random calls
//! from several replicas (asks, needs, refunds and extra charges, hints,
//! refusals, fallback reports, replicas going quiet and coming back, Redis
//! restarted empty), with time passed in, must get the same grants and
//! levels. The simulation (`tests/sim_replicas.rs`) proves the bound on
//! the model; this shows Redis runs the model.

mod common;

use std::time::Duration;

use common::redis::RedisServer;
use dispatcher::cluster::RedisCentral;
use dispatcher::core::central::{CentralLimits, SyncCall, Totals, call_in_epoch};
use dispatcher::core::{CentralBucket, SyncItem};
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};

fn limits() -> CentralLimits {
    CentralLimits {
        tokens_per_minute: 90_000,
        token_capacity: 88_500,
        requests_per_minute: 600,
        request_capacity: 590,
        replicas_floor: 2,
        hold_for: Duration::from_secs(1),
    }
}

/// What one replica sent so far, so that random calls keep its running
/// totals running (and now and then repeat a call, or start a new run).
#[derive(Default)]
struct Sent {
    incarnation: u32,
    seq: u64,
    spent: (u64, u64),
    totals: Totals,
    acked: Totals,
    /// The highest generation it was answered.
    generation: u64,
}

fn random_call(rng: &mut SmallRng, sent: &mut Sent) -> SyncCall {
    match rng.random_range(0..100) {
        // A new run of the replica (a restart reusing its id).
        0 => {
            *sent = Sent {
                incarnation: sent.incarnation + 1,
                ..Sent::default()
            }
        }
        // A call arriving after a newer one: changes nothing.
        1..=3 => sent.seq = sent.seq.saturating_sub(2),
        _ => {}
    }
    sent.seq += 1;
    sent.spent.0 += rng.random_range(0..3_000);
    sent.spent.1 += rng.random_range(0..3);
    if rng.random_bool(0.7) {
        sent.acked = sent.totals;
    }
    let t = &mut sent.totals;
    t.settled_tokens += rng.random_range(-2_000..5_000);
    t.settled_requests += rng.random_range(-1..3);
    if rng.random_bool(0.1) {
        t.fallback_tokens += rng.random_range(0..10_000);
        t.fallback_requests += rng.random_range(0..10);
    }
    SyncCall {
        incarnation: sent.incarnation,
        seq: sent.seq,
        ask_tokens: rng.random_range(0..20_000),
        ask_requests: rng.random_range(0..20),
        need_tokens: if rng.random_bool(0.3) {
            rng.random_range(0..8_000)
        } else {
            0
        },
        held_tokens: rng.random_range(0..10_000),
        held_requests: rng.random_range(0..10),
        spent_tokens: sent.spent.0,
        spent_requests: sent.spent.1,
        totals: sent.totals,
        acked: sent.acked,
        hint: rng
            .random_bool(0.1)
            .then(|| (rng.random_range(0..90_000), rng.random_range(0..600))),
        block: if rng.random_bool(0.03) {
            Duration::from_millis(rng.random_range(1..3_000))
        } else {
            Duration::ZERO
        },
        generation: sent.generation,
    }
}

#[tokio::test]
async fn the_script_grants_what_the_model_grants() {
    let mut redis = RedisServer::start();
    let mut central = RedisCentral::new(&redis.url(), Duration::from_secs(2)).unwrap();
    let mut model: Option<CentralBucket> = None;
    let mut rng = SmallRng::seed_from_u64(7);
    let replicas = ["a", "b", "c"];
    let mut sent: Vec<Sent> = (0..3).map(|_| Sent::default()).collect();
    // Redis TIME-like microseconds; the script is given them instead.
    let mut now_us: u64 = 1_764_000_000_000_000;
    let (mut granted, mut stale, mut disagreed) = (0u64, 0u64, 0u64);
    // The script keeps the server's run id as the bucket's epoch.
    let mut epoch = redis.run_id();
    for step in 0..1_500 {
        // Mostly a tick apart; now and then a replica goes quiet for long
        // enough to be presumed in fallback, or gone.
        now_us += match rng.random_range(0..100) {
            0..=89 => rng.random_range(0..100_000),
            90..=97 => rng.random_range(400_000..1_200_000),
            _ => rng.random_range(1_500_000..4_000_000),
        };
        if step == 700 {
            redis.restart_empty();
            model = None;
            epoch = redis.run_id();
        }
        let r = rng.random_range(0..replicas.len());
        let replica = replicas[r];
        // Now and then limits another replica does not share.
        let limits = if r == 2 && step % 300 < 50 {
            CentralLimits {
                tokens_per_minute: 60_000,
                ..limits()
            }
        } else {
            limits()
        };
        let call = random_call(&mut rng, &mut sent[r]);
        let expected = call_in_epoch(&mut model, &epoch, replica, &limits, &call, now_us);
        let item = SyncItem {
            region: "eu-west".into(),
            model: "gpt-4o".into(),
            limits,
            call,
        };
        // The first call after the restart may find the connection broken.
        let mut got = central
            .call(replica, std::slice::from_ref(&item), Some(now_us))
            .await;
        if got.is_err() && step == 700 {
            got = central
                .call(replica, std::slice::from_ref(&item), Some(now_us))
                .await;
        }
        let got = got.unwrap_or_else(|e| panic!("step {step}: {e}"));
        assert_eq!(got[0], expected, "step {step}: {item:?}");
        sent[r].generation = sent[r].generation.max(expected.generation);
        granted += expected.tokens;
        stale += u64::from(expected.stale);
        disagreed += u64::from(expected.disagreeing > 0);
    }
    assert!(granted > 50_000, "the calls granted something ({granted})");
    assert!(stale > 10, "some calls came late ({stale})");
    assert!(disagreed > 10, "some calls carried other limits ({disagreed})");
}

/// Several (region, model) pairs in one pipelined round trip, each on its
/// own keys.
#[tokio::test]
async fn one_round_trip_carries_every_pair() {
    let redis = RedisServer::start();
    let mut central = RedisCentral::new(&redis.url(), Duration::from_secs(2)).unwrap();
    let t0: u64 = 1_764_000_000_000_000;
    let item = |region: &str, ask: u64, seq: u64| SyncItem {
        region: region.into(),
        model: "m".into(),
        limits: limits(),
        call: SyncCall {
            seq,
            ask_tokens: ask,
            ask_requests: 1,
            ..SyncCall::default()
        },
    };
    let items = [item("a", 100, 1), item("b", 200, 1), item("c", 300, 1)];
    let first = central.call("r1", &items, Some(t0)).await.unwrap();
    assert!(
        first.iter().all(|g| g.fresh && g.tokens == 0),
        "new buckets start empty: {first:?}"
    );
    // Two seconds later each has refilled 1,500 tokens a second from a
    // chunk lifetime (1 s) below empty, and grants its ask.
    let items = [item("a", 100, 2), item("b", 200, 2), item("c", 300, 2)];
    let later = central.call("r1", &items, Some(t0 + 2_000_000)).await.unwrap();
    let tokens: Vec<u64> = later.iter().map(|g| g.tokens).collect();
    assert_eq!(tokens, [100, 200, 300]);
    assert!(later.iter().all(|g| !g.fresh && g.replicas == 1));
}
