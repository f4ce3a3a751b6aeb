//! The response cache end to end: real dispatcher processes over gRPC, a
//! real region-sim, a real redis-server. One dispatcher: a second identical
//! request is a hit and region-sim sees one call; another tenant or scope
//! misses; a reload that changes the model's routing misses; Admin's purge
//! empties a tenant; the metrics count hits and misses by tenant. Two
//! replicas on Redis: one serves an entry the other stored; Redis paused or
//! killed: requests are misses answered without error, each within
//! `redis_timeout` of what they take without Redis.

mod common;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use common::redis::RedisServer;
use common::redis_cluster::RedisCluster;
use common::{ConfigDir, Proc, SimRegion, admin, client, dispatcher, eventually, scrape_metrics, sim_stats};
use dispatcher::dispatch::hash_key;
use dispatcher::pb;
use tokio_stream::StreamExt;

fn toml(extra: &str, default_max_output: u64) -> String {
    format!(
        r#"
[routing]
max_queue_wait = "2s"
[telemetry]
metrics_listen = "127.0.0.1:0"
[[models]]
name = "gpt-4o"
max_request_tokens = 100000
default_max_output_tokens = {default_max_output}
[[tenants]]
name = "a"
keys = ["{a}"]
[[tenants]]
name = "b"
keys = ["{b}"]
{extra}
"#,
        a = hash_key("key-a"),
        b = hash_key("key-b"),
    )
}

fn request(payload: &str, scope: &str, key: &str) -> tonic::Request<pb::DispatchRequest> {
    let mut r = tonic::Request::new(pb::DispatchRequest {
        model: "gpt-4o".into(),
        payload: payload.to_string().into(),
        max_output_tokens: 20,
        cache: Some(pb::CacheOptions {
            ttl: Some(prost_types::Duration {
                seconds: 60,
                nanos: 0,
            }),
            scope: scope.into(),
            ..Default::default()
        }),
        ..Default::default()
    });
    r.metadata_mut()
        .insert("authorization", format!("Bearer {key}").parse().unwrap());
    // A hang is a failure, not a stuck test.
    r.set_timeout(Duration::from_secs(10));
    r
}

async fn accepted(sim: &Proc) -> u64 {
    sim_stats(sim.addr).await.models.iter().map(|m| m.accepted).sum()
}

/// Sends `payload` as tenant `key`: the reply's layer ("" on a miss).
async fn layer(addr: SocketAddr, payload: &str, scope: &str, key: &str) -> String {
    let reply = client(addr)
        .await
        .dispatch(request(payload, scope, key))
        .await
        .unwrap_or_else(|s| panic!("{payload}: {s:?}"))
        .into_inner();
    reply.cached.map(|c| c.layer).unwrap_or_default()
}

async fn purge_tenant(addr: SocketAddr, tenant: &str) -> pb::PurgeCacheReply {
    admin(addr)
        .await
        .purge_cache(pb::PurgeCacheRequest {
            tenant: tenant.into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
}

fn counter(metrics: &str, name: &str, labels: &[&str]) -> f64 {
    metrics
        .lines()
        .filter(|l| l.starts_with(name) && labels.iter().all(|x| l.contains(x)))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_dispatcher_serves_hits_per_tenant_and_scope_and_misses_after_a_routing_change() {
    let cfg = ConfigDir::new(&toml("", 100));
    let sim = cfg.start_region(SimRegion {
        name: "eu",
        ..Default::default()
    });
    let d = dispatcher(&cfg.config());
    let first = client(d.addr)
        .await
        .dispatch(request("hello", "reader", "key-a"))
        .await
        .unwrap()
        .into_inner();
    assert!(first.cached.is_none());
    let second = client(d.addr)
        .await
        .dispatch(request("hello", "reader", "key-a"))
        .await
        .unwrap()
        .into_inner();
    let cached = second.cached.expect("the second is a hit");
    assert_eq!(
        (
            cached.layer.as_str(),
            cached.region.as_str(),
            cached.model.as_str()
        ),
        ("local", "eu", "gpt-4o")
    );
    assert_eq!(second.output, first.output);
    assert_eq!(second.usage.unwrap_or_default(), pb::Usage::default());
    assert_eq!(cached.usage, first.usage);
    assert!(cached.expires_at.unwrap().seconds - cached.stored_at.unwrap().seconds == 60);
    assert_eq!(accepted(&sim).await, 1, "region-sim saw one call");

    assert_eq!(
        layer(d.addr, "hello", "reader", "key-b").await,
        "",
        "another tenant misses"
    );
    assert_eq!(
        layer(d.addr, "hello", "admin", "key-a").await,
        "",
        "another scope misses"
    );
    assert_eq!(accepted(&sim).await, 3);
    assert_eq!(layer(d.addr, "hello", "reader", "key-b").await, "local");

    // A stream is served from the stored reply: one chunk, done, marked.
    let mut s = client(d.addr)
        .await
        .dispatch_stream(request("hello", "reader", "key-a"))
        .await
        .unwrap()
        .into_inner();
    let chunk = s.next().await.unwrap().unwrap();
    assert!(chunk.done && chunk.cached.is_some());
    assert_eq!(chunk.output, first.output);
    assert!(s.next().await.is_none());
    assert_eq!(accepted(&sim).await, 3);

    // Metrics by tenant: a's two hits (unary and stream), b's one.
    let metrics = scrape_metrics(d.listener("metrics"));
    let lookups = "dispatcher_cache_lookups_total";
    assert_eq!(
        counter(&metrics, lookups, &["tenant=\"a\"", "result=\"hit\""]),
        2.0,
        "{metrics}"
    );
    assert_eq!(
        counter(&metrics, lookups, &["tenant=\"a\"", "result=\"miss\""]),
        2.0
    );
    assert_eq!(
        counter(&metrics, lookups, &["tenant=\"b\"", "result=\"hit\""]),
        1.0
    );
    assert!(counter(&metrics, "dispatcher_cache_bytes", &["tenant=\"a\""]) > 0.0);

    // A reload that changes gpt-4o's settings changes its keys.
    std::fs::write(cfg.config(), toml("", 200)).unwrap();
    let reload = admin(d.addr)
        .await
        .reload_config(pb::ReloadConfigRequest { dry_run: false })
        .await
        .unwrap()
        .into_inner();
    assert!(reload.applied, "{reload:?}");
    assert_eq!(
        layer(d.addr, "hello", "reader", "key-a").await,
        "",
        "routing changed: a miss"
    );
    assert_eq!(accepted(&sim).await, 4);
    assert_eq!(layer(d.addr, "hello", "reader", "key-a").await, "local");

    // Admin purges tenant a's entries; b's stay (b's key was made under
    // the old routing, so b stores anew and then hits).
    let purged = purge_tenant(d.addr, "a").await;
    assert!(purged.entries >= 1, "{purged:?}");
    assert_eq!(purged.shared_entries, 0, "no shared layer without [cluster]");
    assert_eq!(layer(d.addr, "hello", "reader", "key-a").await, "");
    // A purge that names nothing is refused rather than emptying everything.
    let e = admin(d.addr)
        .await
        .purge_cache(pb::PurgeCacheRequest::default())
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::InvalidArgument, "{e:?}");
}

fn cluster_toml(redis: &str, replica: &str) -> String {
    cluster_toml_on(&format!("redis_url = \"{redis}\""), replica)
}

/// `cluster_toml` with `redis` for the `[cluster]` lines naming Redis.
fn cluster_toml_on(redis: &str, replica: &str) -> String {
    toml(
        &format!(
            "[cluster]\n{redis}\nreplica_id = \"{replica}\"\nexpected_replicas = 2\nredis_timeout = \"{REDIS_TIMEOUT_MS}ms\"\n"
        ),
        100,
    )
}

const REDIS_TIMEOUT_MS: u64 = 200;

/// Entries the shared layer holds now.
fn shared_entries(redis: &RedisServer) -> usize {
    entries_at(&redis.url())
}

/// Entries the Redis server at `url` holds (one node of a cluster).
fn entries_at(url: &str) -> usize {
    let client = redis::Client::open(url).unwrap();
    let mut con = client.get_connection().unwrap();
    let keys: Vec<String> = redis::cmd("KEYS")
        .arg("dispatcher:cache:*:e:*")
        .query(&mut con)
        .unwrap();
    keys.len()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_share_entries_through_redis_and_redis_down_is_a_miss_not_an_error() {
    let mut redis = RedisServer::start();
    let dirs: Vec<ConfigDir> = ["r1", "r2"]
        .iter()
        .map(|r| ConfigDir::new(&cluster_toml(&redis.url(), r)))
        .collect();
    let sim = dirs[0].start_region(SimRegion {
        name: "eu",
        ..Default::default()
    });
    let region = std::fs::read_to_string(dirs[0].region_file("eu")).unwrap();
    dirs[1].write_region("eu", &region);
    let r1 = dispatcher(&dirs[0].config());
    let r2 = dispatcher(&dirs[1].config());

    assert_eq!(layer(r1.addr, "shared", "", "key-a").await, "");
    // Stored in Redis off the request's path: wait for it there.
    eventually(Duration::from_secs(5), || async { shared_entries(&redis) == 1 })
        .await
        .expect("the entry reached Redis");
    assert_eq!(
        layer(r2.addr, "shared", "", "key-a").await,
        "shared",
        "r2 serves r1's entry"
    );
    assert_eq!(
        layer(r2.addr, "shared", "", "key-a").await,
        "local",
        "and keeps it"
    );
    assert_eq!(accepted(&sim).await, 1, "region-sim saw one call");
    assert_eq!(
        layer(r2.addr, "shared", "", "key-b").await,
        "",
        "never another tenant's"
    );

    // A purge on one replica reaches Redis.
    let purged = purge_tenant(r1.addr, "a").await;
    assert_eq!(purged.shared_entries, 1, "{purged:?}");

    // Each request's time with Redis up, as the yardstick.
    let timed = |addr: SocketAddr, payload: String| async move {
        let start = Instant::now();
        let layer = layer(addr, &payload, "", "key-a").await;
        (layer, start.elapsed())
    };
    let mut base = Duration::ZERO;
    for i in 0..5 {
        base = base.max(timed(r2.addr, format!("up {i}")).await.1);
    }
    // Paused (SIGSTOP: connections stay, nothing answers), then killed:
    // every request is answered (a miss), none waits past redis_timeout
    // beyond what a request took with Redis up (plus scheduling slack on
    // this shared machine; without the timeout they would hang).
    let bound = base + Duration::from_millis(REDIS_TIMEOUT_MS) + Duration::from_millis(1500);
    redis.pause();
    for i in 0..5 {
        let (layer, took) = timed(r2.addr, format!("paused {i}")).await;
        assert_eq!(layer, "", "a miss");
        assert!(
            took < bound,
            "request {i} took {took:?} with Redis paused (bound {bound:?})"
        );
    }
    redis.resume();
    redis.kill();
    for i in 0..5 {
        let (layer, took) = timed(r1.addr, format!("killed {i}")).await;
        assert_eq!(layer, "");
        assert!(
            took < bound,
            "request {i} took {took:?} with Redis killed (bound {bound:?})"
        );
    }
    // This process's layer still serves what it stored.
    assert_eq!(layer(r1.addr, "killed 0", "", "key-a").await, "local");
    let metrics = scrape_metrics(r1.listener("metrics"));
    assert!(
        counter(
            &metrics,
            "dispatcher_cache_shared_errors_total",
            &["tenant=\"a\""]
        ) >= 1.0,
        "{metrics}"
    );
}

/// On a 3-shard Redis Cluster: one replica serves what the other stored,
/// and a tenant's purge finds its entries whichever shard holds them
/// (SCAN sees one server: the purge scans every primary).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_share_and_purge_entries_on_a_redis_cluster() {
    let cluster = RedisCluster::start(3);
    let dirs: Vec<ConfigDir> = ["r1", "r2"]
        .iter()
        .map(|r| ConfigDir::new(&cluster_toml_on(&cluster.toml(), r)))
        .collect();
    let _sim = dirs[0].start_region(SimRegion {
        name: "eu",
        ..Default::default()
    });
    let region = std::fs::read_to_string(dirs[0].region_file("eu")).unwrap();
    dirs[1].write_region("eu", &region);
    let (r1, r2) = (dispatcher(&dirs[0].config()), dispatcher(&dirs[1].config()));
    let entries = || {
        cluster
            .urls()
            .iter()
            .map(|u| entries_at(u))
            .collect::<Vec<usize>>()
    };

    for key in ["key-a", "key-b"] {
        assert_eq!(layer(r1.addr, "shared", "", key).await, "");
    }
    eventually(Duration::from_secs(5), || async {
        entries().iter().sum::<usize>() == 2
    })
    .await
    .expect("both entries reached the cluster");
    eprintln!("entries by shard: {:?}", entries());
    for key in ["key-a", "key-b"] {
        assert_eq!(
            layer(r2.addr, "shared", "", key).await,
            "shared",
            "r2 serves r1's entry for {key}"
        );
    }
    for tenant in ["a", "b"] {
        let purged = purge_tenant(r2.addr, tenant).await;
        assert_eq!(purged.shared_entries, 1, "{tenant}: {purged:?}");
    }
    assert_eq!(entries(), vec![0; 3], "nothing left on any shard");
}
