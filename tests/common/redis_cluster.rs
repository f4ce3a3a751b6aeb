//! A real Redis Cluster for the tests: `shards` redis-servers on free
//! loopback ports with `--cluster-enabled yes`, no persistence (as
//! docs/SCALING.md says to run the quota's Redis), joined by `redis-cli
//! --cluster create` (no replicas: one primary per shard). Killed and
//! started again on demand, all or one (`--cluster-require-full-coverage
//! no`: the other shards serve on); each node keeps its `nodes-<port>.conf` (slots
//! and peers) in the test's directory, so restarted nodes form the same
//! cluster again, empty. `start_tls`: the nodes listen with TLS only,
//! between themselves too (`--tls-cluster yes`), and require a client
//! certificate of the same CA.

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::certs::Pair;
use super::redis::free_port;

/// The files of a cluster over TLS: the CA, each node's server
/// certificate, and the client certificate the nodes present to each other
/// (and `redis-cli` and the harness to them).
#[derive(Clone)]
pub struct ClusterTls {
    pub ca: std::path::PathBuf,
    pub server: Pair,
    pub client: Pair,
}

impl ClusterTls {
    fn certificates(&self) -> redis::TlsCertificates {
        let read = |p: &std::path::Path| std::fs::read(p).unwrap();
        redis::TlsCertificates {
            client_tls: Some(redis::ClientTlsConfig {
                client_cert: read(&self.client.cert),
                client_key: read(&self.client.key),
            }),
            root_cert: Some(read(&self.ca)),
        }
    }
}

pub struct RedisCluster {
    pub ports: Vec<u16>,
    children: Vec<Option<Child>>,
    dir: tempfile::TempDir,
    tls: Option<ClusterTls>,
}

impl RedisCluster {
    /// `shards` primaries covering the 16,384 slots, once `CLUSTER INFO`
    /// says `cluster_state:ok` on every node.
    pub fn start(shards: usize) -> Self {
        Self::start_with(shards, None)
    }

    /// As `start`, every node TLS only (see the module's doc).
    pub fn start_tls(shards: usize, tls: ClusterTls) -> Self {
        Self::start_with(shards, Some(tls))
    }

    fn start_with(shards: usize, tls: Option<ClusterTls>) -> Self {
        let mut c = Self {
            ports: (0..shards).map(|_| free_port()).collect(),
            children: (0..shards).map(|_| None).collect(),
            dir: tempfile::tempdir().unwrap(),
            tls,
        };
        for i in 0..shards {
            c.spawn(i);
        }
        let nodes: Vec<String> = c.ports.iter().map(|p| format!("127.0.0.1:{p}")).collect();
        let mut cli = Command::new(redis_cli());
        if let Some(tls) = &c.tls {
            cli.arg("--tls")
                .arg("--cacert")
                .arg(&tls.ca)
                .arg("--cert")
                .arg(&tls.client.cert)
                .arg("--key")
                .arg(&tls.client.key);
        }
        let out = cli
            .args(["--cluster", "create"])
            .args(&nodes)
            .args(["--cluster-replicas", "0", "--cluster-yes"])
            .output()
            .expect("running redis-cli --cluster create");
        assert!(
            out.status.success(),
            "redis-cli --cluster create: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        c.wait_ok();
        c
    }

    /// `redis_cluster = [...]`: the `[cluster]` line naming every node.
    pub fn toml(&self) -> String {
        let urls: Vec<String> = self.urls().iter().map(|u| format!("\"{u}\"")).collect();
        format!("redis_cluster = [{}]", urls.join(", "))
    }

    pub fn urls(&self) -> Vec<String> {
        self.ports
            .iter()
            .map(|p| match self.tls {
                Some(_) => format!("rediss://127.0.0.1:{p}"),
                None => format!("redis://127.0.0.1:{p}"),
            })
            .collect()
    }

    /// A synchronous connection to node `i` alone (not cluster-aware).
    pub fn node(&self, i: usize) -> redis::Connection {
        self.client(i).unwrap().get_connection().unwrap()
    }

    fn client(&self, i: usize) -> redis::RedisResult<redis::Client> {
        let url = &self.urls()[i];
        match &self.tls {
            Some(tls) => redis::Client::build_with_tls(url.as_str(), tls.certificates()),
            None => redis::Client::open(url.as_str()),
        }
    }

    /// Keys held by each node.
    pub fn dbsizes(&self) -> Vec<u64> {
        (0..self.ports.len())
            .map(|i| redis::cmd("DBSIZE").query(&mut self.node(i)).unwrap())
            .collect()
    }

    /// The node (index) serving `key`'s slot: the one that answers
    /// `EXISTS key` rather than MOVED.
    pub fn node_of(&self, key: &str) -> usize {
        (0..self.ports.len())
            .find(|&i| {
                redis::cmd("EXISTS")
                    .arg(key)
                    .query::<i64>(&mut self.node(i))
                    .is_ok()
            })
            .expect("one node serves every slot")
    }

    /// SIGKILL every node: the cluster is gone, with its data.
    pub fn kill(&mut self) {
        for c in self.children.iter_mut() {
            if let Some(mut c) = c.take() {
                let _ = c.kill();
                let _ = c.wait();
            }
        }
    }

    /// SIGKILL node `i` alone (its shard's slots go unserved).
    pub fn kill_node(&mut self, i: usize) {
        if let Some(mut c) = self.children[i].take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Every node not running started again (empty, same slots), once the
    /// cluster says `ok` again.
    pub fn restart(&mut self) {
        for i in 0..self.ports.len() {
            if self.children[i].is_none() {
                self.spawn(i);
            }
        }
        self.wait_ok();
    }

    fn spawn(&mut self, i: usize) {
        let port = self.ports[i].to_string();
        let conf = self.dir.path().join(format!("nodes-{port}.conf"));
        let mut server = Command::new(super::tools::redis_server());
        match &self.tls {
            Some(tls) => {
                server
                    .args(["--port", "0", "--tls-port", &port, "--tls-cluster", "yes"])
                    .args(["--tls-auth-clients", "yes", "--tls-ca-cert-file"])
                    .arg(&tls.ca)
                    .arg("--tls-cert-file")
                    .arg(&tls.server.cert)
                    .arg("--tls-key-file")
                    .arg(&tls.server.key)
                    .arg("--tls-client-cert-file")
                    .arg(&tls.client.cert)
                    .arg("--tls-client-key-file")
                    .arg(&tls.client.key);
            }
            None => {
                server.args(["--port", &port]);
            }
        }
        let child = server
            .args(["--bind", "127.0.0.1", "--protected-mode", "no"])
            .args(["--cluster-enabled", "yes"])
            .arg("--cluster-config-file")
            .arg(&conf)
            .args(["--cluster-node-timeout", "2000"])
            // A shard down leaves the others serving their slots (as
            // docs/SCALING.md advises): only its region-models fall back.
            .args(["--cluster-require-full-coverage", "no"])
            .args(["--save", "", "--appendonly", "no"])
            .arg("--dir")
            .arg(self.dir.path())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("starting redis-server --cluster-enabled yes");
        self.children[i] = Some(child);
        let deadline = Instant::now() + Duration::from_secs(10);
        while self
            .client(i)
            .and_then(|c| c.get_connection_with_timeout(Duration::from_millis(200)))
            .and_then(|mut c| redis::cmd("PING").query::<String>(&mut c))
            .is_err()
        {
            assert!(
                Instant::now() < deadline,
                "redis-server {port} did not answer PING within 10 s"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn wait_ok(&self) {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let ok = (0..self.ports.len()).all(|i| {
                redis::cmd("CLUSTER")
                    .arg("INFO")
                    .query::<String>(&mut self.node(i))
                    .is_ok_and(|info| info.contains("cluster_state:ok"))
            });
            if ok {
                return;
            }
            assert!(Instant::now() < deadline, "the cluster was not ok within 20 s");
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for RedisCluster {
    fn drop(&mut self) {
        self.kill();
    }
}

/// redis-cli, from the redis-tools package redis-server depends on (so
/// installing redis-server brings it).
fn redis_cli() -> std::path::PathBuf {
    super::tools::redis_server();
    "redis-cli".into()
}
