//! The operator's kit in `deploy/` (docs/OPERATIONS.md) against the real
//! thing: promtool accepts the alert rules and the Prometheus config; every
//! metric the dashboard and the rules query is served by a live dispatcher
//! (with `[cluster]` on a real Redis and `[server.tls]`, so the
//! shared-quota and certificate series exist);
//! the compose and Kubernetes files parse as YAML, name the ports the
//! dispatcher's config uses, and the Kubernetes ConfigMap's dispatcher.toml
//! passes the dispatcher's own config validation.

mod common;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use common::certs::{Ca, tls_channel};
use common::redis::RedisServer;
use common::{ConfigDir, Proc, SimRegion, eventually, tools};
use dispatcher::dispatch::hash_key;
use dispatcher::pb;
use dispatcher::pb::dispatcher_client::DispatcherClient;
use serde::Deserialize;
use serde_norway::Value;

fn deploy() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy")
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()))
}

/// Every YAML document of `path`, parsed.
fn yaml_documents(path: &Path) -> Vec<Value> {
    serde_norway::Deserializer::from_str(&read(path))
        .map(|doc| Value::deserialize(doc).unwrap_or_else(|e| panic!("{} is not YAML: {e}", path.display())))
        .collect()
}

fn promtool(dir: &Path, args: &[&str]) {
    let out = Command::new(tools::promtool())
        .args(args)
        .current_dir(dir)
        .output()
        .expect("running promtool");
    let said = String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    println!("promtool {}: {}\n{said}", args.join(" "), out.status);
    assert!(
        out.status.success(),
        "promtool {} failed:\n{said}",
        args.join(" ")
    );
}

#[test]
fn promtool_accepts_the_alert_rules_and_the_prometheus_config() {
    let dir = deploy().join("prometheus");
    promtool(&dir, &["check", "rules", "alerts.yml"]);
    // Run from its directory: `rule_files` is resolved against the config
    // file, and the check fails when alerts.yml does not load.
    promtool(&dir, &["check", "config", "prometheus.yml"]);
}

/// The dashboard's queries are PromQL that Prometheus parses: each one,
/// with Grafana's variables given values, as a recording rule that
/// `promtool check rules` checks.
#[test]
fn promtool_parses_every_dashboard_query() {
    let dashboard: serde_json::Value = serde_json::from_str(&read(&deploy().join("grafana/dispatcher.json")))
        .expect("the dashboard is JSON");
    let mut exprs = Vec::new();
    dashboard_exprs(&dashboard, &mut exprs);
    let mut rules = String::from("groups:\n  - name: dashboard\n    rules:\n");
    let mut queries = 0;
    for expr in exprs.iter().filter(|e| !e.starts_with("label_values(")) {
        let promql = expr
            .replace("$__rate_interval", "1m")
            .replace("$region", ".*")
            .replace("$model", ".*");
        assert!(
            !promql.contains('$'),
            "a Grafana variable this test does not know: {expr}"
        );
        rules += &format!(
            "      - record: dashboard:query_{queries}\n        expr: {}\n",
            serde_json::json!(promql)
        );
        queries += 1;
    }
    assert!(queries >= 30, "{queries} queries");
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("dashboard.yml"), rules).unwrap();
    promtool(dir.path(), &["check", "rules", "dashboard.yml"]);
}

/// Expressions of the dashboard: every `expr`, and the template variables'
/// `definition` (`label_values(metric, label)`).
fn dashboard_exprs(v: &serde_json::Value, out: &mut Vec<String>) {
    match v {
        serde_json::Value::Object(m) => {
            for (k, v) in m {
                match (k.as_str(), v) {
                    ("expr" | "definition", serde_json::Value::String(s)) => out.push(s.clone()),
                    _ => dashboard_exprs(v, out),
                }
            }
        }
        serde_json::Value::Array(a) => a.iter().for_each(|v| dashboard_exprs(v, out)),
        _ => {}
    }
}

/// Every panel queries through the dashboard's Prometheus datasource
/// variable (so it imports into any Grafana), with unique panel ids.
#[test]
fn the_dashboard_queries_through_its_prometheus_datasource_variable() {
    let dashboard: serde_json::Value = serde_json::from_str(&read(&deploy().join("grafana/dispatcher.json")))
        .expect("the dashboard is JSON");
    let variables = dashboard["templating"]["list"]
        .as_array()
        .expect("template variables");
    assert!(
        variables
            .iter()
            .any(|v| v["name"] == "datasource" && v["type"] == "datasource" && v["query"] == "prometheus"),
        "no Prometheus datasource variable: {variables:?}"
    );
    let mut ids = BTreeSet::new();
    let mut queries = 0;
    for panel in dashboard["panels"].as_array().expect("panels") {
        assert!(
            ids.insert(panel["id"].as_u64().expect("a panel id")),
            "panel id repeated: {panel}"
        );
        if panel["type"] == "row" {
            continue;
        }
        assert_eq!(panel["datasource"]["uid"], "${datasource}", "{}", panel["title"]);
        for target in panel["targets"].as_array().expect("targets") {
            assert_eq!(target["datasource"]["uid"], "${datasource}", "{}", panel["title"]);
            assert!(
                target["expr"].as_str().is_some_and(|e| !e.is_empty()),
                "{}",
                panel["title"]
            );
            queries += 1;
        }
    }
    assert!(queries >= 30, "{queries} queries");
}

fn rule_exprs() -> Vec<String> {
    let rules = &yaml_documents(&deploy().join("prometheus/alerts.yml"))[0];
    let mut out = Vec::new();
    for group in rules["groups"].as_sequence().expect("groups") {
        for rule in group["rules"].as_sequence().expect("rules") {
            out.push(rule["expr"].as_str().expect("every rule has an expr").to_string());
        }
    }
    out
}

/// PromQL functions and modifiers (and Grafana's `label_values`) whose
/// names contain `_`: everything else with a `_` outside strings and
/// `$variables` is a metric name (our label names have none).
const NOT_METRICS: [&str; 4] = ["histogram_quantile", "group_left", "group_right", "label_values"];

/// The metric names an expression queries, as written (with `_bucket`,
/// `_count` or `_total`).
fn metric_names(expr: &str) -> BTreeSet<String> {
    let mut outside_strings = String::new();
    let mut in_string = false;
    let mut escaped = false;
    for c in expr.chars() {
        match (in_string, escaped, c) {
            (true, false, '\\') => escaped = true,
            (true, false, '"') => in_string = false,
            (true, _, _) => escaped = false,
            (false, _, '"') => in_string = true,
            (false, _, c) => outside_strings.push(c),
        }
        if in_string {
            outside_strings.push(' ');
        }
    }
    outside_strings
        .split(|c: char| !(c.is_ascii_alphanumeric() || c == '_' || c == ':' || c == '$'))
        .filter(|t| t.contains('_') && !t.starts_with('$') && !NOT_METRICS.contains(t))
        .filter(|t| !t.starts_with(|c: char| c.is_ascii_digit()))
        .map(str::to_string)
        .collect()
}

/// The series names of a scrape as PromQL sees them: a histogram `h` is
/// `h_bucket`, `h_sum` and `h_count` (never `h`), a counter keeps `_total`.
fn series_names(text: &str) -> BTreeSet<String> {
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .map(|l| l.split(['{', ' ']).next().unwrap().to_string())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_metric_the_dashboard_and_the_rules_query_is_served() {
    let dashboard: serde_json::Value = serde_json::from_str(&read(&deploy().join("grafana/dispatcher.json")))
        .expect("the dashboard is JSON");
    let mut exprs = Vec::new();
    dashboard_exprs(&dashboard, &mut exprs);
    let from_dashboard: BTreeSet<String> = exprs.iter().flat_map(|e| metric_names(e)).collect();
    let from_rules: BTreeSet<String> = rule_exprs().iter().flat_map(|e| metric_names(e)).collect();
    println!("dashboard queries {from_dashboard:?}\nrules query {from_rules:?}");
    // The extraction finds what the files are about (it is not vacuous).
    for (used, what) in [(&from_dashboard, "dashboard"), (&from_rules, "rules")] {
        for name in [
            "dispatcher_requests_total",
            "dispatcher_circuit_state",
            "dispatcher_shared_fallback",
        ] {
            assert!(used.contains(name), "the {what} do not query {name}: {used:?}");
        }
    }
    assert!(from_dashboard.contains("dispatcher_request_duration_seconds_bucket"));
    assert!(from_dashboard.contains("dispatcher_tenant_tokens_last_minute"));
    let used: BTreeSet<String> = from_dashboard.union(&from_rules).cloned().collect();

    // A replica with [cluster] on a real Redis; a good region and one whose
    // every request fails (so its breaker opens), round robin between them.
    // Served over TLS, so the certificate's series exist.
    let redis = RedisServer::start();
    let cfg = ConfigDir::new("");
    let ca = Ca::new(cfg.path(), "ca");
    let cert = ca.server(cfg.path(), "server");
    std::fs::write(
        cfg.config(),
        format!(
            "[telemetry]\nmetrics_listen = \"127.0.0.1:0\"\n[routing]\nstrategy = \"round_robin\"\n\
             [server.tls]\ncert_file = {:?}\nkey_file = {:?}\n\
             [[models]]\nname = \"gpt-4o\"\nprice = {{ input = 2.50, output = 10.00 }}\n\
             [[tenants]]\nname = \"team-a\"\nkeys = [\"{}\"]\ndaily_cost_budget = 100\n\
             [cluster]\nredis_url = \"{}\"\nreplica_id = \"kit\"\n",
            cert.cert,
            cert.key,
            hash_key("k-a"),
            redis.url()
        ),
    )
    .unwrap();
    let _good = cfg.start_region(SimRegion {
        name: "east",
        ..Default::default()
    });
    let _failing = cfg.start_region(SimRegion {
        name: "west",
        sim_args: &["--failure-rate", "1.0"],
        ..Default::default()
    });
    let d = Proc::start(
        env!("CARGO_BIN_EXE_dispatcher"),
        &[
            "--config",
            cfg.config().to_str().unwrap(),
            "--listen",
            "127.0.0.1:0",
        ],
        cfg.path(),
        "dispatcher",
    );
    let metrics = d.listener("metrics");
    let mut grpc = DispatcherClient::new(tls_channel(d.addr, &ca.cert));
    let (mut ok, mut refused) = (0, 0);
    for i in 0..30u64 {
        let mut req = tonic::Request::new(pb::DispatchRequest {
            // One request for a model nobody serves: refused.
            model: if i == 7 { "nope".into() } else { "gpt-4o".into() },
            payload: "kit".into(),
            prompt_tokens: 100,
            max_output_tokens: 100,
            ..Default::default()
        });
        req.metadata_mut()
            .insert("authorization", "Bearer k-a".parse().unwrap());
        match grpc.dispatch(req).await {
            Ok(_) => ok += 1,
            Err(_) => refused += 1,
        }
    }
    println!("{ok} answered, {refused} refused");
    assert!(ok > 0 && refused > 0, "{ok} answered, {refused} refused");

    // Gauges are sampled once a second and the shared ones after a Redis
    // round trip: poll until every queried series is there, or name the
    // missing ones.
    let mut missing = used.clone();
    let mut text = String::new();
    eventually(Duration::from_secs(10), || {
        text = common::scrape_metrics(metrics);
        let served = series_names(&text);
        missing = used.difference(&served).cloned().collect();
        std::future::ready(missing.is_empty())
    })
    .await;
    assert!(
        missing.is_empty(),
        "queried by deploy/ but not served by the dispatcher: {missing:?}\n{text}"
    );
    drop(redis);
}

fn ports(v: &Value, key: &str, out: &mut Vec<u64>) {
    match v {
        Value::Mapping(m) => {
            for (k, v) in m {
                if k.as_str() == Some(key) {
                    match v {
                        Value::Number(n) => out.extend(n.as_u64()),
                        Value::String(s) => out.extend(s.parse::<u64>().ok()),
                        _ => {}
                    }
                }
                ports(v, key, out);
            }
        }
        Value::Sequence(s) => s.iter().for_each(|v| ports(v, key, out)),
        _ => {}
    }
}

/// The ports in the quick-start config (dispatcher.toml, README):
/// gRPC, metrics_listen, Jaeger's OTLP and [cluster]'s Redis.
const GRPC: u16 = 50051;
const METRICS: u16 = 9464;
const OTLP: u16 = 4317;
const REDIS: u16 = 6379;

#[test]
fn compose_and_kubernetes_files_parse_and_name_the_configs_ports() {
    let toml = read(&Path::new(env!("CARGO_MANIFEST_DIR")).join("dispatcher.toml"));
    for addr in [
        format!("127.0.0.1:{GRPC}"),
        format!("127.0.0.1:{METRICS}"),
        format!("127.0.0.1:{OTLP}"),
        format!("127.0.0.1:{REDIS}"),
    ] {
        assert!(
            toml.contains(&addr),
            "dispatcher.toml no longer says {addr}: update deploy/ and this test"
        );
    }

    // Compose: Jaeger's OTLP and UI on loopback, Prometheus reaching the host.
    let compose = &yaml_documents(&deploy().join("compose.yml"))[0];
    let services = &compose["services"];
    let published = |service: &str| -> Vec<String> {
        services[service]["ports"]
            .as_sequence()
            .unwrap_or_else(|| panic!("compose service {service} publishes no ports"))
            .iter()
            .map(|p| p.as_str().expect("ports as strings").to_string())
            .collect()
    };
    assert!(
        published("jaeger").contains(&format!("127.0.0.1:{OTLP}:{OTLP}")),
        "{:?}",
        published("jaeger")
    );
    assert!(published("jaeger").contains(&"127.0.0.1:16686:16686".to_string()));
    assert!(
        services["prometheus"]["extra_hosts"]
            .as_sequence()
            .unwrap()
            .contains(&Value::from("host.docker.internal:host-gateway"))
    );
    for mount in [
        "grafana/dispatcher.json",
        "grafana/provisioning",
        "prometheus/alerts.yml",
    ] {
        assert!(
            deploy().join(mount).exists(),
            "compose mounts {mount}, which is missing"
        );
        assert!(read(&deploy().join("compose.yml")).contains(&format!("./{mount}:")));
    }
    for file in ["datasources/prometheus.yml", "dashboards/dispatcher.yml"] {
        yaml_documents(&deploy().join("grafana/provisioning").join(file));
    }
    let prometheus = &yaml_documents(&deploy().join("prometheus/prometheus.yml"))[0];
    let targets = &prometheus["scrape_configs"][0]["static_configs"][0]["targets"];
    assert_eq!(
        targets[0].as_str(),
        Some(format!("host.docker.internal:{METRICS}").as_str())
    );

    // Kubernetes: every document parses; the dispatcher's and Redis' ports.
    let mut docs = Vec::new();
    for file in [
        "dispatcher.yaml",
        "redis.yaml",
        "configmap.yaml",
        "kustomization.yaml",
    ] {
        docs.extend(yaml_documents(&deploy().join("kubernetes").join(file)));
    }
    let find = |kind: &str, name: &str| -> &Value {
        docs.iter()
            .find(|d| d["kind"].as_str() == Some(kind) && d["metadata"]["name"].as_str() == Some(name))
            .unwrap_or_else(|| panic!("no {kind} {name} in deploy/kubernetes"))
    };
    let deployment = find("Deployment", "dispatcher");
    assert_eq!(deployment["spec"]["replicas"].as_u64(), Some(3));
    let pod = &deployment["spec"]["template"];
    let container = &pod["spec"]["containers"][0];
    let mut container_ports = Vec::new();
    ports(container, "containerPort", &mut container_ports);
    assert_eq!(container_ports, [GRPC as u64, METRICS as u64]);
    for probe in ["readinessProbe", "livenessProbe"] {
        assert_eq!(
            container[probe]["grpc"]["port"].as_u64(),
            Some(GRPC as u64),
            "{probe} over gRPC health"
        );
    }
    let annotations = &pod["metadata"]["annotations"];
    assert_eq!(annotations["prometheus.io/scrape"].as_str(), Some("true"));
    assert_eq!(
        annotations["prometheus.io/port"].as_str(),
        Some(METRICS.to_string().as_str())
    );
    let mut service_ports = Vec::new();
    ports(find("Service", "dispatcher"), "port", &mut service_ports);
    assert_eq!(service_ports, [GRPC as u64, METRICS as u64]);
    let mut redis_ports = Vec::new();
    ports(find("Service", "dispatcher-redis"), "port", &mut redis_ports);
    assert_eq!(redis_ports, [REDIS as u64]);
    let redis_args =
        &find("Deployment", "dispatcher-redis")["spec"]["template"]["spec"]["containers"][0]["args"];
    let redis_args: Vec<&str> = redis_args
        .as_sequence()
        .unwrap()
        .iter()
        .filter_map(Value::as_str)
        .collect();
    assert!(
        redis_args.windows(2).any(|w| w == ["--save", ""]),
        "Redis without snapshots: {redis_args:?}"
    );
    assert!(
        redis_args.windows(2).any(|w| w == ["--appendonly", "no"]),
        "{redis_args:?}"
    );

    // The ConfigMap's config, with its regions mounted as dispatcher.yaml
    // mounts them, passes the dispatcher's validation and uses those ports.
    let config_map = &find("ConfigMap", "dispatcher-config")["data"];
    let dir = tempfile::tempdir().unwrap();
    let items = pod["spec"]["volumes"][0]["configMap"]["items"]
        .as_sequence()
        .unwrap();
    for item in items {
        let (key, path) = (item["key"].as_str().unwrap(), item["path"].as_str().unwrap());
        let text = config_map[key]
            .as_str()
            .unwrap_or_else(|| panic!("the ConfigMap has no {key}"));
        let path = dir.path().join(path);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, text).unwrap();
    }
    let config = dispatcher::config::load(&dir.path().join("dispatcher.toml"))
        .unwrap_or_else(|e| panic!("the ConfigMap's dispatcher.toml is refused:\n{e}"));
    assert_eq!(config.server.listen.port(), GRPC);
    assert!(
        !config.server.listen.ip().is_loopback(),
        "the Service must reach the pods"
    );
    let exposed =
        dispatcher::config::exposure_problems(&config, config.server.listen, config.server.admin_listen);
    assert!(
        exposed.is_empty(),
        "the dispatcher would refuse to start: {exposed:?}"
    );
    assert!(config.admin_token.is_some(), "an exposed Admin API needs a token");
    assert!(!config.auth.allow_anonymous);
    let admin = config
        .server
        .admin_listen
        .expect("the Admin API on a listener of its own");
    assert!(
        admin.ip().is_loopback(),
        "the Admin API stays in the pod: {admin}"
    );
    assert_eq!(config.regions.len(), 2);
    let metrics_listen = config.telemetry.metrics_listen.expect("metrics on");
    assert_eq!(metrics_listen.port(), METRICS);
    assert!(
        !metrics_listen.ip().is_loopback(),
        "Prometheus must reach the pods"
    );
    let cluster = config
        .cluster
        .expect("[cluster] on: the replicas share the quota");
    assert_eq!(
        cluster.redis_url,
        format!("redis://dispatcher-redis:{REDIS}"),
        "redis.yaml's Service"
    );
}
