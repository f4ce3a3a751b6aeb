//! Each kind of bad configuration is refused with a message naming the file,
//! the key and the problem; the repository's own config is valid.

mod config_errors;

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use config_errors::*;
use dispatcher::config;
use dispatcher::core::{Accounting, StrategyKind};

#[test]
fn the_repository_config_is_valid() {
    let c = config::load(Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/dispatcher.toml"))).unwrap();
    assert!(c.regions.len() >= 3);
    assert!(c.models.len() >= 2);
    assert!(c.regions.iter().all(|r| r.spec.models.len() >= 2));
    assert_eq!(c.routing.strategy, StrategyKind::WeightedLoad);
}

#[test]
fn a_good_region_parses_with_defaults() {
    let r = config::parse_region(REGION, Path::new("regions/r1.toml"), &models()).unwrap();
    assert_eq!(r.spec.name, "r1");
    assert_eq!(r.spec.weight, 1.0);
    assert_eq!(r.spec.models[0].1.accounting, Accounting::Admission);
    assert!(r.simulate.is_none());
}

#[test]
fn region_name_defaults_to_the_file_name() {
    let text = REGION.replace("name = \"r1\"\n", "");
    let r = config::parse_region(&text, Path::new("regions/eu-north-1.toml"), &models()).unwrap();
    assert_eq!(r.spec.name, "eu-north-1");
}

#[test]
fn broken_toml() {
    let e = region_err("name = \"r1\"\n[[models]\n");
    assert_names(&e, "regions/r1.toml", "", "not valid TOML");
}

#[test]
fn wrong_type() {
    let e = region_err(&REGION.replace("tokens_per_minute = 1000", "tokens_per_minute = \"lots\""));
    assert_names(&e, "regions/r1.toml", "models[0].tokens_per_minute", "");
}

#[test]
fn negative_number() {
    let e = region_err(&REGION.replace("tokens_per_minute = 1000", "tokens_per_minute = -5"));
    assert_names(&e, "regions/r1.toml", "models[0].tokens_per_minute", "");
}

#[test]
fn zero_limit() {
    let e = region_err(&REGION.replace("requests_per_minute = 10", "requests_per_minute = 0"));
    assert_names(
        &e,
        "regions/r1.toml",
        "models[0].requests_per_minute",
        "at least 1",
    );
}

#[test]
fn huge_limit() {
    let e = region_err(&REGION.replace(
        "tokens_per_minute = 1000",
        "tokens_per_minute = 9_000_000_000_000_000_000",
    ));
    assert_names(
        &e,
        "regions/r1.toml",
        "models[0].tokens_per_minute",
        "above the supported maximum",
    );
    // Beyond what TOML integers hold: the parser's message shows the line.
    let e = region_err(&REGION.replace(
        "tokens_per_minute = 1000",
        "tokens_per_minute = 18446744073709551615",
    ));
    assert_names(&e, "regions/r1.toml", "", "line 6");
    assert!(
        e.problem.contains("tokens_per_minute = 18446744073709551615"),
        "{e}"
    );
}

#[test]
fn unknown_key_is_a_typo_not_a_silent_default() {
    let e = region_err(&REGION.replace(
        "requests_per_minute = 10",
        "requests_per_minute = 10\ntokens_per_minit = 5",
    ));
    println!("{e}");
    assert!(e.to_string().contains("tokens_per_minit"), "{e}");
    assert_eq!(e.file, PathBuf::from("regions/r1.toml"));
}

#[test]
fn missing_required_key() {
    let e = region_err(&REGION.replace("requests_per_minute = 10\n", ""));
    assert_names(&e, "regions/r1.toml", "models[0].requests_per_minute", "missing");
}

#[test]
fn unknown_model() {
    let e = region_err(&REGION.replace("name = \"gpt-4o\"", "name = \"gpt-5\""));
    assert_names(
        &e,
        "regions/r1.toml",
        "models[0].name",
        "unknown model \"gpt-5\"; dispatcher.toml declares gpt-4o, mini",
    );
}

#[test]
fn model_listed_twice() {
    let text =
        format!("{REGION}[[models]]\nname = \"gpt-4o\"\ntokens_per_minute = 1\nrequests_per_minute = 1\n");
    assert_names(
        &region_err(&text),
        "regions/r1.toml",
        "models[1].name",
        "listed twice",
    );
}

#[test]
fn bad_accounting_mode() {
    let e = region_err(&REGION.replace(
        "requests_per_minute = 10",
        "requests_per_minute = 10\naccounting = \"vibes\"",
    ));
    assert_names(
        &e,
        "regions/r1.toml",
        "models[0].accounting",
        "\"admission\" or \"usage\"",
    );
}

#[test]
fn no_endpoint_and_no_simulation() {
    let e = region_err(&REGION.replace("endpoint = \"http://127.0.0.1:7000\"\n", ""));
    assert_names(&e, "regions/r1.toml", "endpoint", "[simulate]");
}

#[test]
fn bad_endpoint() {
    let e = region_err(&REGION.replace("http://127.0.0.1:7000", "127.0.0.1:7000"));
    assert_names(&e, "regions/r1.toml", "endpoint", "http");
}

#[test]
fn bad_weight_and_names() {
    let e = region_err(&REGION.replace("name = \"r1\"", "name = \"r1\"\nweight = 0"));
    assert_names(&e, "regions/r1.toml", "weight", "above zero");
    let e = region_err(&REGION.replace("name = \"r1\"", "name = \"r 1/\""));
    assert_names(&e, "regions/r1.toml", "name", "not a valid name");
}

#[test]
fn bad_simulation_settings() {
    let text = format!("{REGION}[simulate]\nfailure_rate = 1.5\n");
    assert_names(
        &region_err(&text),
        "regions/r1.toml",
        "simulate.failure_rate",
        "out of range",
    );
}

#[test]
fn bad_health_duration() {
    let text = format!("{REGION}[health]\ninterval = \"often\"\n");
    assert_names(
        &region_err(&text),
        "regions/r1.toml",
        "health.interval",
        "not a duration",
    );
}

#[test]
fn dispatcher_errors_name_their_keys() {
    let e = dispatcher_err(&DISPATCHER.replace("127.0.0.1:0", "localhost"));
    assert_names(&e, "dispatcher.toml", "server.listen", "not an address");
    let e = dispatcher_err(&format!("{DISPATCHER}[routing]\nstrategy = \"fastest\"\n"));
    assert_names(
        &e,
        "dispatcher.toml",
        "routing.strategy",
        "expected one of round_robin",
    );
    let e = dispatcher_err(&format!(
        "{DISPATCHER}[routing.weighted_load]\nload_weight = 2.0\n"
    ));
    assert_names(
        &e,
        "dispatcher.toml",
        "routing.weighted_load.load_weight",
        "out of range",
    );
    let e = dispatcher_err(&format!("{DISPATCHER}[routing]\nmax_queue_wait = \"soon\"\n"));
    assert_names(&e, "dispatcher.toml", "routing.max_queue_wait", "not a duration");
    let e = dispatcher_err(&format!("{DISPATCHER}[routing]\nload_half_life = \"0s\"\n"));
    assert_names(&e, "dispatcher.toml", "routing.load_half_life", "above zero");
    let e = dispatcher_err("[auth]\nallow_anonymous = true\n");
    assert_names(&e, "dispatcher.toml", "models", "at least one model");
    let e = dispatcher_err(&DISPATCHER.replace("name = \"mini\"", "name = \"gpt-4o\""));
    assert_names(&e, "dispatcher.toml", "models[1].name", "declared twice");
    let e = dispatcher_err(
        &DISPATCHER.replace("default_max_output_tokens = 100", "default_max_output_tokens = 0"),
    );
    assert_names(
        &e,
        "dispatcher.toml",
        "models[1].default_max_output_tokens",
        "at least 1",
    );
}

#[test]
fn environment_overrides_dispatcher_toml() {
    let env = HashMap::from([
        (
            "DISPATCHER__SERVER__LISTEN".to_string(),
            "127.0.0.1:6000".to_string(),
        ),
        (
            "DISPATCHER__ROUTING__STRATEGY".to_string(),
            "least_outstanding".to_string(),
        ),
        ("DISPATCHER__SERVER__MAX_ATTEMPTS".to_string(), "5".to_string()),
    ]);
    let c = config::parse_dispatcher(DISPATCHER, Path::new("dispatcher.toml"), Some(env)).unwrap();
    assert_eq!(c.server.listen.port(), 6000);
    assert_eq!(c.routing.strategy, StrategyKind::LeastOutstanding);
    assert_eq!(c.server.max_attempts, 5);
}

#[test]
fn a_bad_environment_override_is_named() {
    let env = HashMap::from([("DISPATCHER__SERVER__MAX_ATTEMPTS".to_string(), "many".to_string())]);
    let e = config::parse_dispatcher(DISPATCHER, Path::new("dispatcher.toml"), Some(env)).unwrap_err();
    println!("{e}");
    assert_eq!(e.key, "server.max_attempts", "{e}");
}

#[test]
fn regions_directory_problems_are_all_reported_and_duplicates_named() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("a.toml"), REGION).unwrap();
    std::fs::write(dir.path().join("b.toml"), REGION).unwrap();
    std::fs::write(dir.path().join("c.toml"), "name = 5").unwrap();
    std::fs::write(dir.path().join("README.md"), "not a region").unwrap();
    let errors = config::load_regions(dir.path(), &models()).unwrap_err();
    let text = errors.to_string();
    println!("{text}");
    assert_eq!(errors.0.len(), 2, "{text}");
    assert!(
        text.contains("b.toml: name: region \"r1\" is already defined in"),
        "{text}"
    );
    assert!(text.contains("c.toml"), "{text}");
    let empty = tempfile::tempdir().unwrap();
    let errors = config::load_regions(empty.path(), &models()).unwrap_err();
    assert!(errors.to_string().contains("no region files"), "{errors}");
}

const KEY_HASH: &str = "sha256:ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad";

#[test]
fn tenants_parse_with_keys_and_limits() {
    let text = format!(
        "{DISPATCHER}[[tenants]]\nname = \"team-a\"\nweight = 3\nrequests_per_second = 5\ntokens_per_minute = 1000\nmax_concurrent = 4\ndaily_token_budget = 100000\nmodels = [\"gpt-4o\"]\nkeys = [\"{KEY_HASH}\"]\n"
    );
    let c = config::parse_dispatcher(&text, Path::new("dispatcher.toml"), Some(HashMap::new())).unwrap();
    let t = &c.tenants[0];
    assert_eq!(t.spec.name, "team-a");
    assert_eq!(t.spec.weight, 3.0);
    assert_eq!(t.spec.requests_per_second, Some(5));
    assert_eq!(t.key_hashes.len(), 1);
    assert!(
        c.tenants.iter().any(|t| t.spec.name == "anonymous"),
        "anonymous use is on"
    );
}

#[test]
fn tenant_errors_name_their_keys() {
    let tenant = |body: &str| format!("{DISPATCHER}[[tenants]]\nname = \"team-a\"\n{body}\n");
    let e = dispatcher_err(&tenant("keys = [\"my-secret-key\"]"));
    assert_names(&e, "dispatcher.toml", "tenants[0].keys[0]", "SHA-256 of the key");
    assert!(
        !e.to_string().contains("my-secret-key"),
        "a key that looks raw is not echoed: {e}"
    );
    let e = dispatcher_err(&tenant("models = [\"gpt-9\"]"));
    assert_names(&e, "dispatcher.toml", "tenants[0].models[0]", "unknown model");
    let e = dispatcher_err(&tenant("weight = 0"));
    assert_names(&e, "dispatcher.toml", "tenants[0].weight", "above zero");
    let e = dispatcher_err(&tenant("requests_per_second = 0"));
    assert_names(
        &e,
        "dispatcher.toml",
        "tenants[0].requests_per_second",
        "at least 1",
    );
    let e = dispatcher_err(&format!(
        "{}[[tenants]]\nname = \"team-b\"\nkeys = [\"{KEY_HASH}\"]\n",
        tenant(&format!("keys = [\"{KEY_HASH}\"]"))
    ));
    assert_names(
        &e,
        "dispatcher.toml",
        "tenants[1].keys[0]",
        "already given to tenant \"team-a\"",
    );
    let closed = DISPATCHER.replace("allow_anonymous = true", "allow_anonymous = false");
    let e = dispatcher_err(&closed);
    assert_names(&e, "dispatcher.toml", "tenants", "nobody could call");
}

#[test]
fn connection_limits_are_checked_and_named() {
    let with = |lines: &str| DISPATCHER.replace("[server]\n", &format!("[server]\n{lines}\n"));
    let c = config::parse_dispatcher(
        &with("max_connections = 8\nidle_timeout = \"90s\"\nhandshake_timeout = \"2s\""),
        Path::new("dispatcher.toml"),
        Some(HashMap::new()),
    )
    .unwrap();
    assert_eq!(c.server.connections.max_connections, 8);
    assert_eq!(
        c.server.connections.idle_timeout,
        std::time::Duration::from_secs(90)
    );
    assert_eq!(
        c.server.connections.handshake_timeout,
        std::time::Duration::from_secs(2)
    );
    let e = dispatcher_err(&with("max_connections = 0"));
    assert_names(&e, "dispatcher.toml", "server.max_connections", "at least 1");
    let e = dispatcher_err(&with("idle_timeout = \"0s\""));
    assert_names(&e, "dispatcher.toml", "server.idle_timeout", "above zero");
    let e = dispatcher_err(&with("handshake_timeout = \"soon\""));
    assert_names(
        &e,
        "dispatcher.toml",
        "server.handshake_timeout",
        "not a duration",
    );
    let e = dispatcher_err(&with("keepalive_interval = \"0ms\""));
    assert_names(&e, "dispatcher.toml", "server.keepalive_interval", "above zero");
    let e = dispatcher_err(&with("keepalive_timeout = \"5\""));
    assert_names(
        &e,
        "dispatcher.toml",
        "server.keepalive_timeout",
        "not a duration",
    );
}

#[test]
fn the_body_timeout_and_the_per_address_cap_are_checked_and_named() {
    let with = |lines: &str| DISPATCHER.replace("[server]\n", &format!("[server]\n{lines}\n"));
    let parse = |text: &str| {
        config::parse_dispatcher(text, Path::new("dispatcher.toml"), Some(HashMap::new())).unwrap()
    };
    let defaults = parse(DISPATCHER).server.connections;
    assert_eq!(defaults.body_timeout, std::time::Duration::from_secs(5));
    assert_eq!(
        defaults.max_connections_per_peer, None,
        "no per-address cap unless asked"
    );
    let c = parse(&with(
        "max_connections = 8\nmax_connections_per_peer = 2\nbody_timeout = \"750ms\"",
    ))
    .server
    .connections;
    assert_eq!(c.max_connections_per_peer, Some(2));
    assert_eq!(c.body_timeout, std::time::Duration::from_millis(750));

    let e = dispatcher_err(&with("body_timeout = \"0s\""));
    assert_names(&e, "dispatcher.toml", "server.body_timeout", "above zero");
    let e = dispatcher_err(&with("body_timeout = \"later\""));
    assert_names(&e, "dispatcher.toml", "server.body_timeout", "not a duration");
    let e = dispatcher_err(&with("max_connections_per_peer = 0"));
    assert_names(
        &e,
        "dispatcher.toml",
        "server.max_connections_per_peer",
        "from 1 to server.max_connections",
    );
    let e = dispatcher_err(&with("max_connections = 8\nmax_connections_per_peer = 9"));
    assert_names(
        &e,
        "dispatcher.toml",
        "server.max_connections_per_peer",
        "(8), got 9",
    );
}

#[test]
fn overload_settings_are_checked_and_can_be_turned_off() {
    let e = dispatcher_err(&format!("{DISPATCHER}[routing.overload]\ntarget = \"0s\"\n"));
    assert_names(&e, "dispatcher.toml", "routing.overload.target", "above zero");
    let e = dispatcher_err(&format!(
        "{DISPATCHER}[routing.overload]\ninterval = \"a while\"\n"
    ));
    assert_names(
        &e,
        "dispatcher.toml",
        "routing.overload.interval",
        "not a duration",
    );
    let e = dispatcher_err(&format!("{DISPATCHER}[routing.overload]\nhold_share = 1.5\n"));
    assert_names(
        &e,
        "dispatcher.toml",
        "routing.overload.hold_share",
        "out of range",
    );
    let parse = |extra: &str| {
        config::parse_dispatcher(
            &format!("{DISPATCHER}{extra}"),
            Path::new("dispatcher.toml"),
            Some(HashMap::new()),
        )
        .unwrap()
        .routing
        .overload
    };
    assert_eq!(parse(""), Some(dispatcher::core::OverloadSettings::default()));
    assert_eq!(parse("[routing.overload]\nenabled = false\n"), None);
    let set =
        parse("[routing.overload]\ntarget = \"250ms\"\ninterval = \"30s\"\nhold_share = 0.1\n").unwrap();
    assert_eq!(set.hold_share, 0.1);
    assert_eq!(
        (set.target, set.interval),
        (
            std::time::Duration::from_millis(250),
            std::time::Duration::from_secs(30)
        )
    );
}

#[test]
fn jobs_settings_are_checked_and_named() {
    let ok = config::parse_dispatcher(
        DISPATCHER,
        Path::new("conf/dispatcher.toml"),
        Some(HashMap::new()),
    )
    .unwrap();
    assert!(ok.jobs.enabled, "durable jobs by default");
    assert_eq!(
        ok.jobs.data_dir,
        PathBuf::from("conf/data"),
        "relative to dispatcher.toml"
    );
    assert_eq!(ok.jobs.ttl, std::time::Duration::from_secs(600));
    let e = dispatcher_err(&format!("{DISPATCHER}[jobs]\nttl = \"soon\"\n"));
    assert_names(&e, "dispatcher.toml", "jobs.ttl", "not a duration");
    let e = dispatcher_err(&format!("{DISPATCHER}[jobs]\ndata_dir = \"\"\n"));
    assert_names(&e, "dispatcher.toml", "jobs.data_dir", "is empty");
    let e = dispatcher_err(&format!("{DISPATCHER}[jobs]\nlease = \"50ms\"\n"));
    assert_names(&e, "dispatcher.toml", "jobs.lease", "out of range");
    let e = dispatcher_err(&format!("{DISPATCHER}[jobs]\nmax_running = 0\n"));
    assert_names(&e, "dispatcher.toml", "jobs.max_running", "at least 1");
    let e = dispatcher_err(&format!("{DISPATCHER}[jobs]\nmax_store_bytes = 1000\n"));
    assert_names(&e, "dispatcher.toml", "jobs.max_store_bytes", "at least");
    let e = dispatcher_err(&format!("{DISPATCHER}[jobs]\nmax_runing = 3\n"));
    assert!(e.to_string().contains("jobs.max_runing"), "{e}");
}
