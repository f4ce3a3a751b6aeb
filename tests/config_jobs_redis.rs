//! `[jobs]`'s own Redis (`redis_url`, or `redis_sentinels` with
//! `master_name`, and `redis_timeout`): refused with a message naming the
//! file and the key, never echoing a Redis URL; accepted with or without
//! `[cluster]`, apart from its Redis.

mod config_errors;

use std::collections::HashMap;
use std::path::Path;
use std::time::Duration;

use config_errors::*;
use dispatcher::config;

fn parse(text: &str) -> config::Config {
    config::parse_dispatcher(text, Path::new("dispatcher.toml"), Some(HashMap::new())).unwrap()
}

#[test]
fn the_jobs_redis_settings_are_checked() {
    let with = |body: &str| format!("{DISPATCHER}\n[jobs]\n{body}\n");
    let e = dispatcher_err(&with("redis_url = \"http://:secret@10.0.0.1:6379\""));
    assert_names(&e, "dispatcher.toml", "jobs.redis_url", "is not a Redis URL");
    assert!(!e.to_string().contains("secret"), "{e}");
    let e = dispatcher_err(&with("redis_url = \" \""));
    assert_names(&e, "dispatcher.toml", "jobs.redis_url", "is empty");
    let e = dispatcher_err(&with(
        "redis_url = \"redis://a:1\"\nredis_sentinels = [\"redis://b:2\"]",
    ));
    assert_names(&e, "dispatcher.toml", "jobs.redis_sentinels", "both set");
    let e = dispatcher_err(&with("redis_sentinels = [\"redis://b:2\"]"));
    assert_names(&e, "dispatcher.toml", "jobs.master_name", "is required");
    let e = dispatcher_err(&with(
        "redis_sentinels = [\"redis://a:1\", \"tcp://:secret@b:2\"]\nmaster_name = \"jobs\"",
    ));
    assert_names(&e, "dispatcher.toml", "jobs.redis_sentinels", "entry 2");
    assert!(!e.to_string().contains("secret"), "{e}");
    let e = dispatcher_err(&with("master_name = \"jobs\""));
    assert_names(
        &e,
        "dispatcher.toml",
        "jobs.master_name",
        "only used with redis_sentinels",
    );
    let e = dispatcher_err(&with("redis_timeout = \"1s\""));
    assert_names(
        &e,
        "dispatcher.toml",
        "jobs.redis_timeout",
        "only used with jobs.redis_url",
    );
    let e = dispatcher_err(&with("redis_url = \"redis://a:1\"\nredis_timeout = \"soon\""));
    assert_names(&e, "dispatcher.toml", "jobs.redis_timeout", "is not a duration");
    let e = dispatcher_err(&with("redis_url = \"redis://a:1\"\nredis_timeout = \"1m\""));
    assert_names(&e, "dispatcher.toml", "jobs.redis_timeout", "10ms to 10s");
    let e = dispatcher_err(&with("redis_url = \"redis://a:1\"\nredis_timeout = \"1ms\""));
    assert_names(&e, "dispatcher.toml", "jobs.redis_timeout", "10ms to 10s");
}

#[test]
fn jobs_go_to_their_own_redis_with_or_without_cluster() {
    // Without [cluster]: one process, jobs in Redis (1 s timeout).
    let c = parse(&format!(
        "{DISPATCHER}\n[jobs]\nredis_url = \"redis://10.0.0.2:6380\"\n"
    ));
    assert!(c.cluster.is_none());
    assert_eq!(
        c.jobs.redis,
        Some(config::RedisTarget::Url("redis://10.0.0.2:6380".into()))
    );
    assert_eq!(c.jobs.redis_timeout, Duration::from_secs(1));
    // With [cluster]: apart from the quota's Redis, with its own timeout.
    let c = parse(&format!(
        "{DISPATCHER}\n[cluster]\nredis_url = \"redis://10.0.0.1:6379\"\nredis_timeout = \"100ms\"\n\
         [jobs]\nredis_sentinels = [\"redis://10.0.0.3:26379\"]\nmaster_name = \"jobs\"\nredis_timeout = \"2s\"\n"
    ));
    assert_eq!(
        c.cluster.as_ref().unwrap().redis_timeout,
        Duration::from_millis(100)
    );
    assert_eq!(
        c.jobs.redis,
        Some(config::RedisTarget::Sentinel {
            sentinels: vec!["redis://10.0.0.3:26379".into()],
            master_name: "jobs".into()
        })
    );
    assert_eq!(c.jobs.redis_timeout, Duration::from_secs(2));
    // With [cluster] alone: jobs stay in its Redis (no jobs Redis named).
    let c = parse(&format!(
        "{DISPATCHER}\n[cluster]\nredis_url = \"redis://10.0.0.1:6379\"\n"
    ));
    assert_eq!(c.jobs.redis, None);
}

/// The shipped dispatcher.toml's commented jobs Redis, uncommented
/// (`redis_url` and `redis_timeout`), validates.
#[test]
fn the_shipped_jobs_redis_example_validates() {
    let shipped = include_str!("../dispatcher.toml");
    let url = "# redis_url = \"redis://127.0.0.1:6380\"";
    let timeout = "# redis_timeout = \"1s\"";
    assert!(shipped.contains(url) && shipped.contains(timeout));
    let text = shipped
        .replace(url, &url[2..])
        .replacen(timeout, &timeout[2..], 1);
    let c = parse(&text);
    assert_eq!(
        c.jobs.redis,
        Some(config::RedisTarget::Url("redis://127.0.0.1:6380".into()))
    );
}
