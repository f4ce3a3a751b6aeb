//! Quota shared through a Redis primary that Sentinel fails over
//! (`[cluster] redis_sentinels`, `master_name`): a primary, its replica and
//! one Sentinel (`redis-server --sentinel`) on loopback, three dispatcher
//! processes and a strict region-sim. The primary is SIGKILLed under twice
//! the quota: the replicas fall back, follow the Sentinel to the promoted
//! replica, and share again; the provider refuses nothing, no request hangs
//! past its deadline, and the promoted Redis restarted the bucket (the
//! fence: its epoch is the promoted process's run id).

mod common;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use common::redis::{RedisServer, Sentinel};
use common::replicas::{Tally, all_in, load, replicas_on};
use common::{SimRegion, sim_stats};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_follow_a_sentinel_failover_without_provider_refusals() {
    let mut primary = RedisServer::start();
    let replica = RedisServer::start_replica_of(&primary);
    let sentinel = Sentinel::start(&primary, "quota");
    let (_dirs, sim, procs) = replicas_on(
        &format!(
            "redis_sentinels = [\"{}\"]\nmaster_name = \"quota\"",
            sentinel.url()
        ),
        3,
        "",
        SimRegion {
            tokens_per_minute: 120_000,
            requests_per_minute: 100_000,
            accounting: "admission",
            sim_args: &["--base-latency-ms", "50", "--ms-per-1k-tokens", "0"],
            ..Default::default()
        },
    );
    let replicas: Vec<SocketAddr> = procs.iter().map(|p| p.addr).collect();
    all_in(&replicas, "shared", Duration::from_secs(3)).await;

    // Twice the quota, skewed 2:1:1 (as tests/e2e_replicas.rs).
    let stop = Arc::new(AtomicBool::new(false));
    let tally = Arc::new(Tally::default());
    let loads: Vec<_> = replicas
        .iter()
        .zip([37, 75, 75].map(Duration::from_millis))
        .map(|(a, e)| load(*a, e, stop.clone(), tally.clone()))
        .collect();
    tokio::time::sleep(Duration::from_secs(3)).await;
    let before = tally.ok.load(Ordering::Relaxed);

    primary.kill();
    let killed = Instant::now();
    all_in(&replicas, "fallback", Duration::from_millis(1_500)).await;
    let promoted = common::eventually(Duration::from_secs(15), || async {
        sentinel.primary("quota") == Some(replica.port)
    })
    .await
    .expect("the Sentinel promotes the replica within 15 s");
    all_in(&replicas, "shared", Duration::from_secs(5)).await;
    let shared_again = killed.elapsed();
    eprintln!("promoted {promoted:?} after the kill; every replica shared again {shared_again:?} after it");
    tokio::time::sleep(Duration::from_secs(3)).await;
    stop.store(true, Ordering::Relaxed);
    for l in loads {
        l.await.unwrap();
    }

    let (ok, exhausted, other) = (
        tally.ok.load(Ordering::Relaxed),
        tally.exhausted.load(Ordering::Relaxed),
        tally.other.load(Ordering::Relaxed),
    );
    eprintln!("ok {ok} ({before} before the kill), resource exhausted {exhausted}, other {other}");
    assert_eq!(
        sim_stats(sim.addr).await.models[0].rejected,
        0,
        "provider refusals"
    );
    assert_eq!(other, 0, "no request hung past its deadline or failed otherwise");
    assert!(
        ok > before,
        "work was served after the failover ({before} -> {ok})"
    );
    // The promoted Redis holds the bucket under its own run id: the fence
    // restarted it there.
    let (bucket, _) = dispatcher::cluster::bucket_keys("eu", "gpt-4o");
    let epoch: String = redis::cmd("HGET")
        .arg(&bucket)
        .arg("ep")
        .query(&mut replica.connection())
        .unwrap();
    assert_eq!(epoch, replica.run_id());
}
