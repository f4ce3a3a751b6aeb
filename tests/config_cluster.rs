//! `[cluster]`'s settings (a single Redis, Sentinels or a Redis Cluster) are refused with
//! a message naming the file and the key, never echoing a Redis URL; and
//! the quota shared between replicas holds what one process holds.

mod config_errors;

use std::collections::HashMap;
use std::path::Path;

use config_errors::*;
use dispatcher::config;

#[test]
fn sentinel_settings_are_checked() {
    let with = |body: &str| format!("{DISPATCHER}\n[cluster]\n{body}\n");
    let url = "redis_url = \"redis://127.0.0.1:6379\"";
    let e = dispatcher_err(&with(&format!(
        "{url}\nredis_sentinels = [\"redis://127.0.0.1:26379\"]"
    )));
    assert_names(&e, "dispatcher.toml", "cluster.redis_sentinels", "both set");
    let e = dispatcher_err(&with("redis_sentinels = [\"redis://127.0.0.1:26379\"]"));
    assert_names(&e, "dispatcher.toml", "cluster.master_name", "is required");
    let e = dispatcher_err(&with("redis_sentinels = []\nmaster_name = \"q\""));
    assert_names(&e, "dispatcher.toml", "cluster.redis_sentinels", "1 to 16");
    let e = dispatcher_err(&with(
        "redis_sentinels = [\"redis://a:1\", \"http://:secret@b:2\"]\nmaster_name = \"q\"",
    ));
    assert_names(
        &e,
        "dispatcher.toml",
        "cluster.redis_sentinels",
        "entry 2 is not a Redis URL",
    );
    assert!(!e.to_string().contains("secret"), "{e}");
    let e = dispatcher_err(&with(
        "redis_sentinels = [\"redis://a:1\"]\nmaster_name = \"q w\"",
    ));
    assert_names(&e, "dispatcher.toml", "cluster.master_name", "not a valid name");
    let e = dispatcher_err(&with(&format!("{url}\nmaster_name = \"q\"")));
    assert_names(
        &e,
        "dispatcher.toml",
        "cluster.master_name",
        "only used with redis_sentinels",
    );
    let c = config::parse_dispatcher(
        &with("redis_sentinels = [\"redis://127.0.0.1:26379\"]\nmaster_name = \"quota\""),
        Path::new("dispatcher.toml"),
        Some(HashMap::new()),
    )
    .unwrap();
    assert_eq!(
        c.cluster.unwrap().redis,
        config::RedisTarget::Sentinel {
            sentinels: vec!["redis://127.0.0.1:26379".into()],
            master_name: "quota".into()
        }
    );
}

#[test]
fn cluster_settings_are_checked_and_the_redis_url_is_not_echoed() {
    let with = |body: &str| format!("{DISPATCHER}\n[cluster]\n{body}\n");
    let e = dispatcher_err(&with("expected_replicas = 3"));
    assert_names(&e, "dispatcher.toml", "cluster.redis_url", "is required");
    let e = dispatcher_err(&with("redis_url = \"http://user:secret@host:6379\""));
    assert_names(&e, "dispatcher.toml", "cluster.redis_url", "not a Redis URL");
    assert!(!e.to_string().contains("secret"), "{e}");
    let e = dispatcher_err(&with(
        "redis_url = \"redis://127.0.0.1:6379\"\nexpected_replicas = 0",
    ));
    assert_names(&e, "dispatcher.toml", "cluster.expected_replicas", "out of range");
    let e = dispatcher_err(&with(
        "redis_url = \"redis://127.0.0.1:6379\"\nchunk_ttl = \"150ms\"\nsync_interval = \"100ms\"",
    ));
    assert_names(
        &e,
        "dispatcher.toml",
        "cluster.chunk_ttl",
        "twice cluster.sync_interval",
    );
    let e = dispatcher_err(&with(
        "redis_url = \"redis://127.0.0.1:6379\"\nredis_timeout = \"soon\"",
    ));
    assert_names(&e, "dispatcher.toml", "cluster.redis_timeout", "not a duration");
    let e = dispatcher_err(&with(
        "redis_url = \"redis://127.0.0.1:6379\"\nredis_urll = \"x\"",
    ));
    assert!(e.to_string().contains("redis_urll"), "{e}");
    let c = config::parse_dispatcher(
        &with("redis_url = \"redis://127.0.0.1:6379\""),
        Path::new("dispatcher.toml"),
        Some(HashMap::new()),
    )
    .unwrap();
    let cluster = c.cluster.unwrap();
    assert_eq!(cluster.sharing.chunk_ttl, std::time::Duration::from_secs(1));
    assert_eq!(cluster.sharing.replicas_floor, 1);
    assert!(cluster.replica_id.is_none());
}

/// Issue 24 item 4: with `[cluster]`, 240,000 tokens a minute and a burst
/// of 2,000 loads, and the quota shared between replicas holds what one
/// process holds: the burst (it was the burst less a chunk lifetime of
/// refill, 1 token here, so that every request was refused for ever).
#[test]
fn a_small_burst_with_cluster_shares_the_whole_burst() {
    let mut c = config::parse_dispatcher(
        &format!("{DISPATCHER}\n[cluster]\nredis_url = \"redis://127.0.0.1:6379\"\n"),
        Path::new("dispatcher.toml"),
        Some(HashMap::new()),
    )
    .unwrap();
    let region = REGION
        .replace(
            "tokens_per_minute = 1000",
            "tokens_per_minute = 240000\nburst_tokens = 2000",
        )
        .replace("requests_per_minute = 10", "requests_per_minute = 100000");
    c.regions = vec![config::parse_region(&region, Path::new("regions/r1.toml"), &c.models).unwrap()];
    let router = dispatcher::core::Router::try_new(c.router_spec(), std::time::Instant::now()).unwrap();
    let shared = router.regions()[0]
        .quota(0)
        .unwrap()
        .shared()
        .expect("shared with [cluster]");
    assert_eq!(shared.limits().token_capacity, 2_000);
    assert_eq!(shared.limits().tokens_per_minute, 240_000);
}

#[test]
fn redis_cluster_settings_are_checked_and_never_echoed() {
    let with = |body: &str| format!("{DISPATCHER}\n[cluster]\n{body}\n");
    let nodes = "redis_cluster = [\"redis://127.0.0.1:7001\", \"redis://127.0.0.1:7002\"]";
    let e = dispatcher_err(&with(&format!("{nodes}\nredis_url = \"redis://127.0.0.1:6379\"")));
    assert_names(
        &e,
        "dispatcher.toml",
        "cluster.redis_cluster",
        "cluster.redis_url are both set",
    );
    let e = dispatcher_err(&with(&format!(
        "{nodes}\nredis_sentinels = [\"redis://127.0.0.1:26379\"]\nmaster_name = \"q\""
    )));
    assert_names(
        &e,
        "dispatcher.toml",
        "cluster.redis_cluster",
        "cluster.redis_sentinels are both set",
    );
    let e = dispatcher_err(&with(&format!("{nodes}\nmaster_name = \"q\"")));
    assert_names(
        &e,
        "dispatcher.toml",
        "cluster.master_name",
        "only used with redis_sentinels",
    );
    let e = dispatcher_err(&with("redis_cluster = []"));
    assert_names(&e, "dispatcher.toml", "cluster.redis_cluster", "1 to 64");
    let e = dispatcher_err(&with(
        "redis_cluster = [\"redis://127.0.0.1:7001\", \"tcp://:secret@10.0.0.2:7002\"]",
    ));
    assert_names(
        &e,
        "dispatcher.toml",
        "cluster.redis_cluster",
        "entry 2 is not a Redis URL",
    );
    assert!(!e.to_string().contains("secret"), "{e}");
    let c =
        config::parse_dispatcher(&with(nodes), Path::new("dispatcher.toml"), Some(HashMap::new())).unwrap();
    assert_eq!(
        c.cluster.unwrap().redis,
        config::RedisTarget::Cluster {
            nodes: vec!["redis://127.0.0.1:7001".into(), "redis://127.0.0.1:7002".into()]
        }
    );
}
