//! Three dispatcher processes sharing one provider's quota through a real
//! redis-server, with a strict region-sim behind them (it charges prompt +
//! max_tokens at admission and refuses what does not fit): under twice the
//! quota the provider refuses nothing; Redis killed, restarted empty, and
//! paused (SIGSTOP) never makes a request hang, every replica falls back
//! within a second and comes back to shared mode within two, and still the
//! provider refuses nothing. A replica killed is forgotten within 2 s.

mod common;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use common::redis::RedisServer;
use common::replicas::{Tally, a_request_id_runs_once, a_tenants_limit_holds, all_in, load, replicas};
use common::{SimRegion, eventually, region_status, sim_stats};

const TPM: u64 = 120_000;

async fn provider_refusals(sim: SocketAddr) -> u64 {
    sim_stats(sim).await.models[0].rejected
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_share_the_quota_and_ride_out_redis_failures() {
    let mut redis = RedisServer::start();
    let (_dirs, sim, procs) = replicas(
        &redis,
        3,
        "",
        SimRegion {
            tokens_per_minute: TPM,
            requests_per_minute: 100_000,
            accounting: "admission",
            sim_args: &["--base-latency-ms", "50", "--ms-per-1k-tokens", "0"],
            ..Default::default()
        },
    );
    let replicas: Vec<SocketAddr> = procs.iter().map(|p| p.addr).collect();
    let sim_addr = sim.addr;
    all_in(&replicas, "shared", Duration::from_secs(3)).await;

    // Twice the quota over the three replicas (2,000 tokens/s of quota;
    // 4,000 offered: 300 tokens every 225 ms on each), skewed 2:1:1.
    let stop = Arc::new(AtomicBool::new(false));
    let tally = Arc::new(Tally::default());
    let every = [37, 75, 75].map(Duration::from_millis);
    let loads: Vec<_> = replicas
        .iter()
        .zip(every)
        .map(|(a, e)| load(*a, e, stop.clone(), tally.clone()))
        .collect();
    tokio::time::sleep(Duration::from_secs(4)).await;
    assert_eq!(provider_refusals(sim_addr).await, 0, "shared: provider refusals");
    let status = region_status(replicas[0], "eu").await.unwrap();
    let shared = status.models[0].shared.clone().unwrap();
    assert_eq!(shared.replicas, 3, "{shared:?}");
    let after_shared = tally.ok.load(Ordering::Relaxed);
    eprintln!("shared, 4 s: ok {after_shared}");
    // 2,000 tokens/s of quota for 4 s, less the chunk lifetime (1 s) a new
    // bucket starts below empty, is 20 requests of 300 tokens: all of it
    // used.
    assert!(
        after_shared >= 17,
        "the shared quota was used ({after_shared} served)"
    );

    // Redis killed: every replica falls back within a second or so.
    redis.kill();
    let took = all_in(&replicas, "fallback", Duration::from_millis(1_500)).await;
    eprintln!("fallback after kill: {took:?}");
    tokio::time::sleep(Duration::from_secs(2)).await;
    // Back, empty: shared again within two seconds.
    redis.restart_empty();
    let took = all_in(&replicas, "shared", Duration::from_millis(2_500)).await;
    eprintln!("shared again after an empty restart: {took:?}");
    tokio::time::sleep(Duration::from_secs(1)).await;
    // Paused: it holds the connections and answers nothing.
    redis.pause();
    let took = all_in(&replicas, "fallback", Duration::from_millis(1_500)).await;
    eprintln!("fallback after SIGSTOP: {took:?}");
    // Paused for 5 s in all.
    tokio::time::sleep(Duration::from_secs(5) - took).await;
    redis.resume();
    let took = all_in(&replicas, "shared", Duration::from_millis(2_500)).await;
    eprintln!("shared again after SIGCONT: {took:?}");
    tokio::time::sleep(Duration::from_secs(1)).await;

    stop.store(true, Ordering::Relaxed);
    for l in loads {
        l.await.unwrap();
    }

    // A replica killed: Redis forgets it after FORGET_AFTER (1.5 s) and the
    // others divide the quota between the two of them.
    let mut procs = procs;
    procs[2].kill();
    let took = eventually(Duration::from_secs(2), || async {
        let mut all = true;
        for r in &replicas[..2] {
            let s = region_status(*r, "eu").await.unwrap().models[0]
                .shared
                .clone()
                .unwrap();
            all &= s.replicas == 2;
        }
        all
    })
    .await
    .expect("the other replicas see two replicas within 2 s");
    eprintln!("a killed replica forgotten after {took:?}");
    let (ok, exhausted, other) = (
        tally.ok.load(Ordering::Relaxed),
        tally.exhausted.load(Ordering::Relaxed),
        tally.other.load(Ordering::Relaxed),
    );
    eprintln!("ok {ok}, resource exhausted {exhausted}, other {other}");
    assert_eq!(
        provider_refusals(sim_addr).await,
        0,
        "provider refusals over the whole run"
    );
    assert_eq!(other, 0, "no request hung past its deadline or failed otherwise");
    // Fallback shares are rate / 3 each against 2:1:1 demand, and starts
    // are empty: about half the quota is used across the outages.
    assert!(ok >= 40, "work was served ({ok})");
}

/// A `request_id` sent to two replicas at once, and again later, runs once:
/// the second replica waits for the first one's reply and gives it back.
/// With Redis gone, a request id still runs (on one replica's word) and
/// nothing hangs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_id_is_answered_once_across_replicas() {
    let mut redis = RedisServer::start();
    a_request_id_runs_once(&format!("redis_url = \"{}\"", redis.url()), || redis.kill()).await;
}

/// A tenant's tokens-per-minute limit holds across replicas: spent on one,
/// it is counted on the other after a sync. (Without the sharing each of
/// the two replicas lets the whole limit through: twice as much.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tenants_limit_holds_across_replicas() {
    let redis = RedisServer::start();
    a_tenants_limit_holds(&format!("redis_url = \"{}\"", redis.url())).await;
}
