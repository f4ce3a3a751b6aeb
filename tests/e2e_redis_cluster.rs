//! Quota, request ids and the shared round of calls on a real 3-shard Redis
//! Cluster (`[cluster] redis_cluster`): three redis-servers with
//! `--cluster-enabled yes` joined by `redis-cli --cluster create` on
//! loopback, three dispatcher processes, and one strict region-sim per
//! region (it refuses what its bucket cannot take), the regions chosen so
//! that their quota keys land on every shard. Under about twice the quota
//! the providers refuse nothing and every replica shares; the cluster
//! killed, every replica falls back within `unreachable_after` and a tick,
//! no request hangs, and they share again once it is back; one shard
//! killed, only the region-models whose keys it holds fall back. A request
//! id is answered once across replicas, and a tenant's limit holds across
//! them, as on one Redis.

mod common;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use common::redis_cluster::RedisCluster;
use common::replicas::{
    Tally, a_request_id_runs_once, a_tenants_limit_holds, all_in_regions, load, modes_in, replicas_in_regions,
};
use common::{ConfigDir, Proc, SimRegion, sim_stats};
use dispatcher::cluster::bucket_keys;

/// Each region's provider: 1,000 tokens a second, a burst of 3,000 (ten
/// requests of 300), strict.
const TPM: u64 = 60_000;
const BURST: u64 = 3_000;

/// Region names whose quota keys cover every node of `cluster` (taken in
/// order from a fixed list until each node holds one, then one more).
fn regions_on_every_shard(cluster: &RedisCluster) -> Vec<&'static str> {
    let candidates = [
        "eu", "us", "ap", "sa", "af", "me", "oc", "ca", "in", "jp", "kr", "br",
    ];
    let mut covered = vec![false; cluster.ports.len()];
    let mut out = Vec::new();
    for r in candidates {
        let node = cluster.node_of(&bucket_keys(r, "gpt-4o").0);
        if !covered[node] || covered.iter().all(|c| *c) {
            covered[node] = true;
            out.push(r);
        }
        if covered.iter().all(|c| *c) && out.len() > cluster.ports.len() {
            return out;
        }
    }
    panic!("the candidate regions do not cover every shard: {covered:?}");
}

fn strict(name: &'static str) -> SimRegion<'static> {
    SimRegion {
        name,
        tokens_per_minute: TPM,
        requests_per_minute: 100_000,
        burst_tokens: Some(BURST),
        accounting: "admission",
        sim_args: &["--base-latency-ms", "50", "--ms-per-1k-tokens", "0"],
        ..Default::default()
    }
}

async fn provider_refusals(sims: &[Proc]) -> Vec<u64> {
    let mut out = Vec::new();
    for s in sims {
        out.push(sim_stats(s.addr).await.models[0].rejected);
    }
    out
}

async fn provider_accepted(sims: &[Proc]) -> Vec<u64> {
    let mut out = Vec::new();
    for s in sims {
        out.push(sim_stats(s.addr).await.models[0].accepted);
    }
    out
}

/// About twice the regions' quota over three replicas, skewed 2:1:1.
fn load_all(
    replicas: &[SocketAddr],
    stop: &Arc<AtomicBool>,
    tally: &Arc<Tally>,
) -> Vec<tokio::task::JoinHandle<()>> {
    replicas
        .iter()
        .zip([50, 100, 100].map(Duration::from_millis))
        .map(|(a, e)| load(*a, e, stop.clone(), tally.clone()))
        .collect()
}

/// Three replicas on `cluster` in front of one strict region-sim per region
/// of `regions_on_every_shard`: the regions, config dirs, region-sims and
/// replicas.
fn three_replicas(cluster: &RedisCluster) -> (Vec<&'static str>, Vec<ConfigDir>, Vec<Proc>, Vec<Proc>) {
    let regions = regions_on_every_shard(cluster);
    let (dirs, sims, procs) = replicas_in_regions(
        &cluster.toml(),
        3,
        "",
        regions.iter().map(|r| strict(r)).collect(),
    );
    (regions, dirs, sims, procs)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_share_quota_over_a_redis_cluster_and_fall_back_when_it_dies() {
    let mut cluster = RedisCluster::start(3);
    let (regions, _dirs, sims, procs) = three_replicas(&cluster);
    let replicas: Vec<SocketAddr> = procs.iter().map(|p| p.addr).collect();
    let started = Instant::now();
    all_in_regions(&replicas, &regions, "shared", Duration::from_secs(5)).await;

    let stop = Arc::new(AtomicBool::new(false));
    let tally = Arc::new(Tally::default());
    let loads = load_all(&replicas, &stop, &tally);
    tokio::time::sleep(Duration::from_secs(4)).await;
    assert_eq!(
        provider_refusals(&sims).await,
        vec![0; sims.len()],
        "shared: provider refusals by region"
    );
    assert!(
        modes_in(&replicas, &regions).await.iter().all(|m| m == "shared"),
        "every replica shares every region-model"
    );
    // The quota keys went to every shard (and each bucket is fenced with
    // its own shard's run id: the epoch is per shard).
    let sizes = cluster.dbsizes();
    eprintln!("regions {regions:?}; keys per shard {sizes:?}");
    assert!(sizes.iter().all(|n| *n > 0), "keys on every shard: {sizes:?}");
    for r in &regions {
        let (bucket, _) = bucket_keys(r, "gpt-4o");
        let node = cluster.node_of(&bucket);
        let epoch: String = redis::cmd("HGET")
            .arg(&bucket)
            .arg("ep")
            .query(&mut cluster.node(node))
            .unwrap();
        let info: String = redis::cmd("INFO")
            .arg("server")
            .query(&mut cluster.node(node))
            .unwrap();
        assert!(
            info.contains(&format!("run_id:{epoch}")),
            "{r}: epoch {epoch} is its shard's run id"
        );
    }
    let served = tally.ok.load(Ordering::Relaxed);
    eprintln!(
        "shared, 4 s: ok {served}, accepted by region {:?}",
        provider_accepted(&sims).await
    );
    // Each region's 1,000 tokens a second, less the second a new bucket
    // starts below empty: about 3 × 3,000 tokens, 30 requests of 300.
    assert!(served >= 20, "the shared quota was used ({served} served)");

    // The cluster killed: every replica falls back in every region.
    cluster.kill();
    let took = all_in_regions(&replicas, &regions, "fallback", Duration::from_millis(1_500)).await;
    eprintln!("fallback after the cluster was killed: {took:?}");
    tokio::time::sleep(Duration::from_secs(2)).await;
    cluster.restart();
    let took = all_in_regions(&replicas, &regions, "shared", Duration::from_secs(3)).await;
    eprintln!("shared again after the cluster came back (empty): {took:?}");
    tokio::time::sleep(Duration::from_secs(2)).await;
    stop.store(true, Ordering::Relaxed);
    for l in loads {
        l.await.unwrap();
    }
    let (ok, exhausted, other) = (
        tally.ok.load(Ordering::Relaxed),
        tally.exhausted.load(Ordering::Relaxed),
        tally.other.load(Ordering::Relaxed),
    );
    let accepted = provider_accepted(&sims).await;
    eprintln!("ok {ok}, resource exhausted {exhausted}, other {other}; accepted by region {accepted:?}");
    assert_eq!(
        provider_refusals(&sims).await,
        vec![0; sims.len()],
        "provider refusals over the whole run"
    );
    assert_eq!(other, 0, "no request hung past its deadline or failed otherwise");
    // The bound, region by region: what a strict provider took never
    // exceeds its burst and its refill since the start.
    let bound = BURST + TPM / 60 * (started.elapsed().as_secs() + 1);
    for (r, n) in regions.iter().zip(&accepted) {
        assert!(n * 300 <= bound, "{r}: {} tokens taken, bound {bound}", n * 300);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shard_down_takes_only_its_region_models_to_fallback() {
    let mut cluster = RedisCluster::start(3);
    let (regions, _dirs, sims, procs) = three_replicas(&cluster);
    let replicas: Vec<SocketAddr> = procs.iter().map(|p| p.addr).collect();
    all_in_regions(&replicas, &regions, "shared", Duration::from_secs(5)).await;
    let stop = Arc::new(AtomicBool::new(false));
    let tally = Arc::new(Tally::default());
    let loads = load_all(&replicas, &stop, &tally);
    tokio::time::sleep(Duration::from_secs(2)).await;

    // The shard of the first region's keys killed.
    let down = cluster.node_of(&bucket_keys(regions[0], "gpt-4o").0);
    let (on_it, elsewhere): (Vec<&str>, Vec<&str>) = regions
        .iter()
        .partition(|r| cluster.node_of(&bucket_keys(r, "gpt-4o").0) == down);
    cluster.kill_node(down);
    let took = all_in_regions(&replicas, &on_it, "fallback", Duration::from_millis(1_500)).await;
    eprintln!("{on_it:?} (shard {down}) in fallback after {took:?}; {elsewhere:?} stay shared");
    // Past the cluster's node timeout (2 s): the other shards serve on.
    for _ in 0..6 {
        assert!(
            modes_in(&replicas, &elsewhere)
                .await
                .iter()
                .all(|m| m == "shared"),
            "{elsewhere:?} stay shared while shard {down} is down"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    cluster.restart();
    let took = all_in_regions(&replicas, &regions, "shared", Duration::from_secs(3)).await;
    eprintln!("every region shared again {took:?} after the shard came back");
    stop.store(true, Ordering::Relaxed);
    for l in loads {
        l.await.unwrap();
    }
    let other = tally.other.load(Ordering::Relaxed);
    assert_eq!(
        provider_refusals(&sims).await,
        vec![0; sims.len()],
        "provider refusals"
    );
    assert_eq!(other, 0, "no request hung past its deadline or failed otherwise");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_id_is_answered_once_across_replicas_on_a_redis_cluster() {
    let mut cluster = RedisCluster::start(3);
    a_request_id_runs_once(&cluster.toml(), || cluster.kill()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tenants_limit_holds_across_replicas_on_a_redis_cluster() {
    let cluster = RedisCluster::start(3);
    a_tenants_limit_holds(&cluster.toml()).await;
}
