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

/// `redis_ca_file` and the client certificate (`[cluster]` and `[jobs]`):
/// only with a rediss:// URL, files read while validating, a certificate
/// with its key.
#[test]
fn the_redis_tls_settings_are_checked() {
    let dir = tempfile::tempdir().unwrap();
    let ca = dir.path().join("ca.pem");
    let not_pem = dir.path().join("junk.pem");
    std::fs::write(&not_pem, "not a certificate").unwrap();
    let key = rcgen::KeyPair::generate().unwrap();
    let cert = rcgen::CertificateParams::new(vec!["localhost".to_string()])
        .unwrap()
        .self_signed(&key)
        .unwrap();
    std::fs::write(&ca, cert.pem()).unwrap();
    let key_file = dir.path().join("client.key");
    std::fs::write(&key_file, key.serialize_pem()).unwrap();
    let file = dir.path().join("dispatcher.toml");
    let parse_in = |text: &str| config::parse_dispatcher(text, &file, Some(HashMap::new()));
    let err = |text: &str| parse_in(text).unwrap_err();
    let f = file.to_str().unwrap();
    let cluster =
        |url: &str, extra: &str| format!("{DISPATCHER}\n[cluster]\nredis_url = \"{url}\"\n{extra}\n");

    let e = err(&cluster("redis://a:1", "redis_ca_file = \"ca.pem\""));
    assert_names(&e, f, "cluster.redis_ca_file", "only used with a rediss://");
    let e = err(&cluster("rediss://a:1", "redis_ca_file = \"missing.pem\""));
    assert_names(&e, f, "cluster.redis_ca_file", "missing.pem");
    let e = err(&cluster("rediss://a:1", "redis_ca_file = \"junk.pem\""));
    assert_names(&e, f, "cluster.redis_ca_file", "junk.pem");
    let e = err(&cluster("rediss://a:1", "redis_client_cert_file = \"ca.pem\""));
    assert_names(&e, f, "cluster.redis_client_key_file", "missing");
    let e = err(&cluster("rediss://a:1", "redis_client_key_file = \"client.key\""));
    assert_names(&e, f, "cluster.redis_client_cert_file", "missing");
    // Sentinels: every one over TLS, or the keys are refused.
    let sentinels = |urls: &str| {
        format!(
            "{DISPATCHER}\n[cluster]\nredis_sentinels = [{urls}]\nmaster_name = \"q\"\nredis_ca_file = \"ca.pem\"\n"
        )
    };
    let e = err(&sentinels("\"rediss://a:1\", \"redis://b:1\""));
    assert_names(
        &e,
        f,
        "cluster.redis_ca_file",
        "every cluster.redis_sentinels URL is rediss:// (TLS to Redis); number 2 is not",
    );
    let c = parse_in(&sentinels("\"rediss://a:1\"")).unwrap();
    assert!(c.cluster.unwrap().redis_tls.is_some());
    // A Redis Cluster: every node over TLS, or the keys are refused.
    let redis_cluster = |nodes: &str| {
        format!("{DISPATCHER}\n[cluster]\nredis_cluster = [{nodes}]\nredis_ca_file = \"ca.pem\"\n")
    };
    let e = err(&redis_cluster("\"rediss://a:1\", \"redis://b:1\""));
    assert_names(
        &e,
        f,
        "cluster.redis_ca_file",
        "every cluster.redis_cluster node is rediss://",
    );
    let e = err(&redis_cluster("\"rediss://a:1\", \"redis://b:1\""));
    assert_names(&e, f, "cluster.redis_ca_file", "number 2 is not");
    let c = parse_in(&redis_cluster("\"rediss://a:1\", \"rediss://b:1\"")).unwrap();
    let tls = c.cluster.unwrap().redis_tls.unwrap();
    assert_eq!(tls.ca.as_deref(), Some(cert.pem().as_bytes()));
    let e = err(&format!("{DISPATCHER}\n[jobs]\nredis_ca_file = \"ca.pem\"\n"));
    assert_names(
        &e,
        f,
        "jobs.redis_ca_file",
        "only used with a rediss:// jobs.redis_url",
    );

    // Accepted: relative to dispatcher.toml, contents kept, key not shown.
    let c = parse_in(&cluster(
        "rediss://a:1",
        "redis_ca_file = \"ca.pem\"\nredis_client_cert_file = \"ca.pem\"\nredis_client_key_file = \"client.key\"",
    ))
    .unwrap();
    let tls = c.cluster.unwrap().redis_tls.unwrap();
    assert_eq!(tls.ca_file.as_deref(), Some(ca.as_path()));
    assert_eq!(tls.ca.as_deref(), Some(cert.pem().as_bytes()));
    assert!(tls.identity.is_some());
    assert!(!format!("{tls:?}").contains("PRIVATE KEY"), "{tls:?}");
    let c = parse_in(&format!(
        "{DISPATCHER}\n[jobs]\nredis_url = \"rediss://b:2\"\nredis_ca_file = \"ca.pem\"\n"
    ))
    .unwrap();
    assert!(c.jobs.redis_tls.unwrap().identity.is_none());
}
