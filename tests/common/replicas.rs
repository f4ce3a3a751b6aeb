//! Dispatcher replicas sharing quota through a real redis-server, in front
//! of one region-sim "eu" (tests/e2e_replicas*.rs).

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use dispatcher::pb;
use tonic::Code;

use super::redis::RedisServer;
use super::{ConfigDir, Proc, SimRegion, client, dispatcher, eventually, region_status, sim_stats};

pub fn config(redis: &str, replica: &str) -> String {
    config_on(&format!("redis_url = \"{redis}\""), replica)
}

/// `config` with `redis` for the `[cluster]` lines naming Redis (a URL, or
/// Sentinels).
pub fn config_on(redis: &str, replica: &str) -> String {
    format!(
        r#"
[auth]
allow_anonymous = true
[routing]
max_queue_wait = "2s"
[[models]]
name = "gpt-4o"
max_request_tokens = 20000
[cluster]
{redis}
replica_id = "{replica}"
expected_replicas = 3
"#
    )
}

/// `n` replicas (`[cluster]` on `redis`, ids r1, r2, ...; `extra_toml`
/// appended to each dispatcher.toml) in front of one region-sim "eu",
/// every replica's region file pointing at it. Returns the config dirs (kept
/// alive), the region-sim and the replicas.
pub fn replicas(
    redis: &RedisServer,
    n: usize,
    extra_toml: &str,
    sim: SimRegion,
) -> (Vec<ConfigDir>, Proc, Vec<Proc>) {
    replicas_on(&format!("redis_url = \"{}\"", redis.url()), n, extra_toml, sim)
}

/// `replicas`, with `redis` for the `[cluster]` lines naming Redis.
pub fn replicas_on(
    redis: &str,
    n: usize,
    extra_toml: &str,
    sim: SimRegion,
) -> (Vec<ConfigDir>, Proc, Vec<Proc>) {
    let (dirs, mut sims, procs) =
        replicas_in_regions(redis, n, extra_toml, vec![SimRegion { name: "eu", ..sim }]);
    (dirs, sims.remove(0), procs)
}

/// `replicas_on` with one region-sim per entry of `sims` (each its own
/// region, named by its `name`), every replica's region files pointing at
/// them. Returns the region-sims in the order of `sims`.
pub fn replicas_in_regions(
    redis: &str,
    n: usize,
    extra_toml: &str,
    sims: Vec<SimRegion>,
) -> (Vec<ConfigDir>, Vec<Proc>, Vec<Proc>) {
    let dirs: Vec<ConfigDir> = (1..=n)
        .map(|i| ConfigDir::new(&(config_on(redis, &format!("r{i}")) + extra_toml)))
        .collect();
    let mut started = Vec::new();
    for sim in sims {
        let name = sim.name;
        started.push(dirs[0].start_region(sim));
        let region = std::fs::read_to_string(dirs[0].region_file(name)).unwrap();
        for d in &dirs[1..] {
            d.write_region(name, &region);
        }
    }
    let procs = dirs.iter().map(|d| dispatcher(&d.config())).collect();
    (dirs, started, procs)
}

#[derive(Default)]
pub struct Tally {
    pub ok: AtomicU64,
    pub exhausted: AtomicU64,
    /// Anything else: a hang (deadline), an internal error.
    pub other: AtomicU64,
}

/// The work these tests send: 300 tokens (a 200-token prompt and 100 of
/// output, all used with `--completion-min-fraction 1`).
pub fn work_request() -> tonic::Request<pb::DispatchRequest> {
    tonic::Request::new(pb::DispatchRequest {
        model: "gpt-4o".into(),
        payload: "work".into(),
        prompt_tokens: 200,
        max_output_tokens: 100,
        ..Default::default()
    })
}

/// Open-loop load on one replica until `stop`: 300-token requests, each
/// with a 3 s deadline.
pub fn load(
    addr: SocketAddr,
    every: Duration,
    stop: Arc<AtomicBool>,
    tally: Arc<Tally>,
) -> tokio::task::JoinHandle<()> {
    load_with(addr, every, stop, tally, work_request)
}

/// `load` sending what `request` makes (given a 3 s deadline).
pub fn load_with(
    addr: SocketAddr,
    every: Duration,
    stop: Arc<AtomicBool>,
    tally: Arc<Tally>,
    request: fn() -> tonic::Request<pb::DispatchRequest>,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let grpc = client(addr).await;
        let mut tick = tokio::time::interval(every);
        let mut calls = tokio::task::JoinSet::new();
        while !stop.load(Ordering::Relaxed) {
            tick.tick().await;
            let mut req = request();
            req.set_timeout(Duration::from_secs(3));
            let mut grpc = grpc.clone();
            let tally = tally.clone();
            calls.spawn(async move {
                match grpc.dispatch(req).await {
                    Ok(_) => tally.ok.fetch_add(1, Ordering::Relaxed),
                    Err(s) if s.code() == Code::ResourceExhausted => {
                        tally.exhausted.fetch_add(1, Ordering::Relaxed)
                    }
                    Err(s) => {
                        eprintln!("unexpected: {:?} {}", s.code(), s.message());
                        tally.other.fetch_add(1, Ordering::Relaxed)
                    }
                };
            });
        }
        while calls.join_next().await.is_some() {}
    })
}

pub async fn modes(replicas: &[SocketAddr]) -> Vec<String> {
    modes_in(replicas, &["eu"]).await
}

/// Each replica's sharing mode in each of `regions` (its first model).
pub async fn modes_in(replicas: &[SocketAddr], regions: &[&str]) -> Vec<String> {
    let mut out = Vec::new();
    for addr in replicas {
        for region in regions {
            let status = region_status(*addr, region).await.unwrap();
            out.push(
                status.models[0]
                    .shared
                    .as_ref()
                    .map_or("none".into(), |s| s.mode.clone()),
            );
        }
    }
    out
}

pub async fn all_in(replicas: &[SocketAddr], mode: &str, within: Duration) -> Duration {
    all_in_regions(replicas, &["eu"], mode, within).await
}

/// Every replica in `mode` in every one of `regions` within `within`: how
/// long it took.
pub async fn all_in_regions(
    replicas: &[SocketAddr],
    regions: &[&str],
    mode: &str,
    within: Duration,
) -> Duration {
    eventually(within, || async {
        modes_in(replicas, regions).await.iter().all(|m| m == mode)
    })
    .await
    .unwrap_or_else(|| panic!("not every replica in {mode} mode in {regions:?} within {within:?}"))
}

/// Two replicas on the Redis `redis` names (`[cluster]` lines): a
/// `request_id` sent to both at once, and again later, runs once: the
/// second replica waits for the first one's reply and gives it back. Then
/// `kill_redis`: a request id still runs (on one replica's word) and
/// nothing hangs.
pub async fn a_request_id_runs_once(redis: &str, kill_redis: impl FnOnce()) {
    let (_dirs, sim, procs) = replicas_on(
        redis,
        2,
        "",
        SimRegion {
            sim_args: &["--base-latency-ms", "300", "--ms-per-1k-tokens", "0"],
            ..Default::default()
        },
    );
    let (a, b) = (procs[0].addr, procs[1].addr);
    all_in(&[a, b], "shared", Duration::from_secs(3)).await;
    let accepted = || async { sim_stats(sim.addr).await.models[0].accepted };

    let request = |id: &str| pb::DispatchRequest {
        model: "gpt-4o".into(),
        payload: "work".into(),
        prompt_tokens: 100,
        max_output_tokens: 50,
        request_id: id.into(),
        ..Default::default()
    };
    let (mut ca, mut cb) = (client(a).await, client(b).await);
    let (ra, rb) = tokio::join!(ca.dispatch(request("job-1")), async {
        // A moment later, while the first replica's run is under way.
        tokio::time::sleep(Duration::from_millis(100)).await;
        cb.clone().dispatch(request("job-1")).await
    });
    let (ra, rb) = (ra.unwrap().into_inner(), rb.unwrap().into_inner());
    assert_eq!(ra, rb, "the second replica gave back the first one's reply");
    assert_eq!(accepted().await, 1, "job-1 ran once");
    let again = cb.dispatch(request("job-1")).await.unwrap().into_inner();
    assert_eq!(again, ra);
    assert_eq!(accepted().await, 1, "and not again later");
    ca.dispatch(request("job-2")).await.unwrap();
    assert_eq!(accepted().await, 2, "another id runs");

    // Redis gone: the id runs (nothing to ask), and does not hang.
    kill_redis();
    let started = std::time::Instant::now();
    cb.dispatch(request("job-3")).await.unwrap();
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "{:?}",
        started.elapsed()
    );
    assert_eq!(accepted().await, 3);
}

/// Two replicas on the Redis `redis` names (`[cluster]` lines): a tenant's
/// tokens-per-minute limit holds across them: spent on one, it is counted
/// on the other after a sync. (Without the sharing each of the two
/// replicas lets the whole limit through: twice as much.)
pub async fn a_tenants_limit_holds(redis: &str) {
    let key_hash = dispatcher::dispatch::hash_key("team-key");
    let other_hash = dispatcher::dispatch::hash_key("other-key");
    let tenant = format!(
        "[[tenants]]\nname = \"team\"\nkeys = [\"{key_hash}\"]\ntokens_per_minute = 3000\n\
         [[tenants]]\nname = \"other\"\nkeys = [\"{other_hash}\"]\ntokens_per_minute = 1000000\n"
    );
    let (_dirs, _sim, procs) = replicas_on(
        redis,
        2,
        &tenant,
        SimRegion {
            sim_args: &[
                "--base-latency-ms",
                "10",
                "--ms-per-1k-tokens",
                "0",
                "--completion-min-fraction",
                "1",
            ],
            ..Default::default()
        },
    );
    all_in(&[procs[0].addr, procs[1].addr], "shared", Duration::from_secs(3)).await;
    let clients = [client(procs[0].addr).await, client(procs[1].addr).await];
    // 20 requests of 300 tokens (200 + 100, all used), alternating between
    // the replicas, a sync interval and a half apart: 6,000 tokens offered
    // against a limit of 3,000 a minute (its burst).
    let (mut ok, mut limited) = (0, 0);
    for i in 0..20 {
        let mut req = work_request();
        req.metadata_mut()
            .insert("authorization", "Bearer team-key".parse().unwrap());
        match clients[i % 2].clone().dispatch(req).await {
            Ok(_) => ok += 1,
            Err(s) if s.code() == Code::ResourceExhausted => limited += 1,
            Err(s) => panic!("{:?}: {}", s.code(), s.message()),
        }
        // Another tenant in the same syncs: each round carries two
        // tenants' totals (two slots on a Redis Cluster).
        let mut other = work_request();
        other
            .metadata_mut()
            .insert("authorization", "Bearer other-key".parse().unwrap());
        clients[(i + 1) % 2].clone().dispatch(other).await.unwrap();
        tokio::time::sleep(Duration::from_millis(150)).await;
    }
    eprintln!("tenant across two replicas: {ok} served, {limited} refused by its limit");
    // 3,000 tokens and a minute's refill over the 4.5 s (225) are 10 or 11
    // requests; one sync's lag may let one more through.
    assert!((10..=12).contains(&ok), "{ok} served");
    assert_eq!(ok + limited, 20);
}
