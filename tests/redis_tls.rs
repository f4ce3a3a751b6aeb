//! Redis over TLS (`rediss://`): a real redis-server listening with TLS
//! only (`--port 0 --tls-port`, certificates made here by a private CA,
//! client certificates required), two dispatcher processes sharing one
//! region-sim's quota through it with `redis_ca_file` and a client
//! certificate, one of them keeping its jobs there too (`[jobs]`'s own
//! TLS settings). And a replica given the wrong CA: it starts, serves in
//! fallback, and says why in its log; it neither hangs nor dies. And a
//! Redis Cluster over TLS (`redis_cluster`, every node `rediss://`, the
//! nodes TLS only between themselves too): two replicas share through it
//! with the same keys.

mod common;

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::certs::{Ca, Pair};
use common::jobs::with_key;
use common::redis_cluster::{ClusterTls, RedisCluster};
use common::{ConfigDir, Proc, dispatcher, eventually, region_status};
use dispatcher::pb;
use dispatcher::pb::jobs_client::JobsClient;

/// redis-server accepting TLS only, from clients holding a certificate
/// of `ca`.
struct TlsRedis {
    port: u16,
    child: Child,
}

impl TlsRedis {
    fn start(dir: &Path, ca: &Ca, server: &Pair) -> Self {
        Self::spawn(dir, ca, server, Command::new(common::tools::redis_server()))
    }

    /// A Sentinel (`redis-server --sentinel`) with TLS only, watching
    /// `primary` (TLS only) as `name`, to which it presents `client`.
    fn sentinel(dir: &Path, ca: &Ca, server: &Pair, client: &Pair, primary: &TlsRedis, name: &str) -> Self {
        let conf = dir.join(format!("sentinel-{}.conf", primary.port));
        std::fs::write(
            &conf,
            format!("sentinel monitor {name} 127.0.0.1 {} 1\n", primary.port),
        )
        .unwrap();
        let mut cmd = Command::new(common::tools::redis_server());
        cmd.arg(&conf)
            .arg("--sentinel")
            .args(["--tls-replication", "yes", "--tls-client-cert-file"])
            .arg(&client.cert)
            .arg("--tls-client-key-file")
            .arg(&client.key);
        Self::spawn(dir, ca, server, cmd)
    }

    fn spawn(dir: &Path, ca: &Ca, server: &Pair, mut cmd: Command) -> Self {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let child = cmd
            .args([
                "--port",
                "0",
                "--tls-port",
                &port.to_string(),
                "--bind",
                "127.0.0.1",
            ])
            .args(["--save", "", "--appendonly", "no", "--protected-mode", "no"])
            .arg("--tls-cert-file")
            .arg(&server.cert)
            .arg("--tls-key-file")
            .arg(&server.key)
            .arg("--tls-ca-cert-file")
            .arg(&ca.cert)
            .args(["--tls-auth-clients", "yes", "--dir"])
            .arg(dir)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("starting redis-server with TLS");
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(
                Instant::now() < deadline,
                "redis-server's TLS port did not open within 10 s"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        Self { port, child }
    }

    fn url(&self) -> String {
        format!("rediss://127.0.0.1:{}", self.port)
    }
}

impl Drop for TlsRedis {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The TLS keys of a section: `ca`, and the client certificate.
fn tls_keys(ca: &Path, client: &Pair) -> String {
    format!(
        "redis_ca_file = {:?}\nredis_client_cert_file = {:?}\nredis_client_key_file = {:?}",
        ca.display().to_string(),
        client.cert.display().to_string(),
        client.key.display().to_string()
    )
}

/// `target`: the `[cluster]` line naming Redis.
fn replica_toml(target: &str, replica: &str, tls: &str, jobs: &str) -> String {
    common::jobs::dispatcher_toml(
        jobs,
        &format!("[cluster]\n{target}\nreplica_id = \"{replica}\"\nexpected_replicas = 2\n{tls}"),
    )
}

/// Both sharing (each hears of both, its central level known), and each
/// serves a request.
async fn all_share(replicas: &[Proc]) {
    for p in replicas {
        let heard = eventually(Duration::from_secs(10), || async {
            let s = region_status(p.addr, "r1").await.unwrap();
            s.models[0]
                .shared
                .as_ref()
                .is_some_and(|s| s.mode == "shared" && s.replicas >= 2 && s.central_tokens.is_some())
        })
        .await;
        assert!(
            heard.is_some(),
            "{} is not sharing over TLS: {}",
            p.name,
            p.logs()
        );
        dispatch_ok(p).await;
    }
}

async fn mode(p: &Proc) -> String {
    let s = region_status(p.addr, "r1").await.unwrap();
    s.models[0]
        .shared
        .as_ref()
        .map(|s| s.mode.clone())
        .unwrap_or_default()
}

async fn dispatch_ok(p: &Proc) {
    let request = pb::DispatchRequest {
        model: "gpt-4o".into(),
        payload: "hello".into(),
        prompt_tokens: 10,
        max_output_tokens: 20,
        ..Default::default()
    };
    let mut c = common::client(p.addr).await;
    let reply = c.dispatch(with_key(request, "k-alpha")).await;
    assert!(reply.is_ok(), "{reply:?}\n{}", p.logs());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_share_the_quota_through_a_tls_redis_and_a_wrong_ca_falls_back() {
    let certs = tempfile::tempdir().unwrap();
    let ca = Ca::new(certs.path(), "redis-ca");
    let server = ca.server(certs.path(), "redis");
    let client = ca.client(certs.path(), "replica", &["replica"]);
    let redis = TlsRedis::start(certs.path(), &ca, &server);
    let tls = tls_keys(&ca.cert, &client);
    let target = format!("redis_url = \"{}\"", redis.url());
    let jobs = format!("{target}\n{tls}");
    let dirs = [
        ConfigDir::new(&replica_toml(&target, "a", &tls, &jobs)),
        ConfigDir::new(&replica_toml(&target, "b", &tls, "")),
    ];
    let _sim = common::jobs::shared_region(&dirs, "1");
    let replicas: Vec<Proc> = dirs.iter().map(|d| dispatcher(&d.config())).collect();
    all_share(&replicas).await;

    // A's jobs go over TLS too.
    let mut jobs = JobsClient::connect(replicas[0].endpoint()).await.unwrap();
    let request = common::jobs::repeatable_job(20, "tls-job");
    let job = jobs
        .submit_job(with_key(request, "k-alpha"))
        .await
        .unwrap()
        .into_inner();
    let done = eventually(Duration::from_secs(10), || {
        let mut jobs = jobs.clone();
        let id = job.job_id.clone();
        async move {
            let j = jobs
                .get_job(with_key(pb::JobRef { job_id: id }, "k-alpha"))
                .await
                .unwrap()
                .into_inner();
            j.state() == pb::JobState::Done
        }
    })
    .await;
    assert!(done.is_some(), "the job kept over TLS did not end DONE");

    // The wrong CA: the replica starts, serves in fallback, and logs why.
    let other = Ca::new(certs.path(), "other-ca");
    let wrong = ConfigDir::new(&replica_toml(&target, "c", &tls_keys(&other.cert, &client), ""));
    wrong.write_region("r1", &std::fs::read_to_string(dirs[0].region_file("r1")).unwrap());
    let c = dispatcher(&wrong.config());
    let fallback = eventually(Duration::from_secs(10), || async {
        c.logs().contains("quota sync") && mode(&c).await == "fallback"
    })
    .await;
    assert!(fallback.is_some(), "not in fallback: {}", c.logs());
    let logs = c.logs();
    let sync_line = logs.lines().find(|l| l.contains("quota sync")).unwrap();
    assert!(
        sync_line.contains("invalid peer certificate: UnknownIssuer"),
        "the reason, not a timeout: {sync_line}"
    );
    let started = Instant::now();
    dispatch_ok(&c).await;
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "a request waited on Redis"
    );
    assert!(!c.logs().contains(&redis.url()), "the log echoes the Redis URL");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_share_the_quota_through_a_redis_cluster_over_tls() {
    let certs = tempfile::tempdir().unwrap();
    let ca = Ca::new(certs.path(), "redis-ca");
    let client = ca.client(certs.path(), "replica", &["replica"]);
    let cluster = RedisCluster::start_tls(
        3,
        ClusterTls {
            ca: ca.cert.clone(),
            server: ca.server(certs.path(), "redis"),
            client: client.clone(),
        },
    );
    assert!(cluster.urls().iter().all(|u| u.starts_with("rediss://")));
    let tls = tls_keys(&ca.cert, &client);
    let dirs = [
        ConfigDir::new(&replica_toml(&cluster.toml(), "a", &tls, "")),
        ConfigDir::new(&replica_toml(&cluster.toml(), "b", &tls, "")),
    ];
    let _sim = common::jobs::shared_region(&dirs, "1");
    let replicas: Vec<Proc> = dirs.iter().map(|d| dispatcher(&d.config())).collect();
    all_share(&replicas).await;
    // The quota's keys are in the cluster, reached over TLS.
    assert!(cluster.dbsizes().iter().sum::<u64>() > 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_share_the_quota_through_sentinels_over_tls() {
    let certs = tempfile::tempdir().unwrap();
    let ca = Ca::new(certs.path(), "redis-ca");
    let server = ca.server(certs.path(), "redis");
    let client = ca.client(certs.path(), "replica", &["replica"]);
    let primary = TlsRedis::start(certs.path(), &ca, &server);
    let sentinel = TlsRedis::sentinel(certs.path(), &ca, &server, &client, &primary, "quota");
    let target = format!(
        "redis_sentinels = [\"{}\"]\nmaster_name = \"quota\"",
        sentinel.url()
    );
    let tls = tls_keys(&ca.cert, &client);
    let dirs = [
        ConfigDir::new(&replica_toml(&target, "a", &tls, "")),
        ConfigDir::new(&replica_toml(&target, "b", &tls, "")),
    ];
    let _sim = common::jobs::shared_region(&dirs, "1");
    let replicas: Vec<Proc> = dirs.iter().map(|d| dispatcher(&d.config())).collect();
    all_share(&replicas).await;
}
