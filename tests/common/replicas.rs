//! Dispatcher replicas sharing quota through a real redis-server, in front
//! of one region-sim "eu" (tests/e2e_replicas*.rs).

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use dispatcher::pb;
use tonic::Code;

use super::redis::RedisServer;
use super::{ConfigDir, Proc, SimRegion, client, dispatcher, eventually, region_status};

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
    let dirs: Vec<ConfigDir> = (1..=n)
        .map(|i| ConfigDir::new(&(config_on(redis, &format!("r{i}")) + extra_toml)))
        .collect();
    let sim = dirs[0].start_region(SimRegion { name: "eu", ..sim });
    let region = std::fs::read_to_string(dirs[0].region_file("eu")).unwrap();
    for d in &dirs[1..] {
        d.write_region("eu", &region);
    }
    let procs = dirs.iter().map(|d| dispatcher(&d.config())).collect();
    (dirs, sim, procs)
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
    let mut out = Vec::new();
    for addr in replicas {
        let status = region_status(*addr, "eu").await.unwrap();
        out.push(
            status.models[0]
                .shared
                .as_ref()
                .map_or("none".into(), |s| s.mode.clone()),
        );
    }
    out
}

pub async fn all_in(replicas: &[SocketAddr], mode: &str, within: Duration) -> Duration {
    eventually(within, || async {
        modes(replicas).await.iter().all(|m| m == mode)
    })
    .await
    .unwrap_or_else(|| panic!("not every replica in {mode} mode within {within:?}"))
}
