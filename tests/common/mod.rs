//! Shared by the end-to-end tests: real processes on loopback (the
//! `dispatcher` and `region-sim` binaries Cargo built for this test run),
//! their config files, and gRPC clients.
#![allow(dead_code)]

pub mod attack;
pub mod central_wire;
pub mod certs;
pub mod engine;
pub mod http_client;
pub mod jobs;
pub mod openai;
pub mod redis;
pub mod redis_cluster;
pub mod replicas;
pub mod tools;
pub mod vsim;
pub mod vsim_traffic;

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use dispatcher::pb;
use dispatcher::pb::dispatcher_client::DispatcherClient;
use dispatcher::pb::region_sim_control_client::RegionSimControlClient;
use tonic::transport::Channel;

/// A child process that is killed when dropped; its stderr goes to a file
/// that is printed if the test fails.
pub struct Proc {
    pub name: String,
    pub addr: SocketAddr,
    /// Every "<what> listening on ADDR" line printed before `addr`'s.
    pub listening: Vec<(String, SocketAddr)>,
    child: Child,
    log: PathBuf,
}

impl Proc {
    /// The address of its "`what` listening on ADDR" line (metrics, admin).
    #[allow(dead_code)]
    pub fn listener(&self, what: &str) -> SocketAddr {
        self.listening
            .iter()
            .find(|(w, _)| w == what)
            .unwrap_or_else(|| panic!("{} printed no \"{what} listening on\" line", self.name))
            .1
    }

    /// Starts `bin` with `args` and waits for its "listening on ADDR" line.
    pub fn start(bin: &str, args: &[&str], log_dir: &Path, name: &str) -> Proc {
        Self::start_with_env(bin, args, &[], log_dir, name)
    }

    /// Like `start`, with extra environment variables.
    pub fn start_with_env(
        bin: &str,
        args: &[&str],
        env: &[(&str, &str)],
        log_dir: &Path,
        name: &str,
    ) -> Proc {
        let log = log_dir.join(format!("{name}.log"));
        let stderr = std::fs::File::create(&log).expect("creating a log file");
        let mut child = Command::new(bin)
            .args(args)
            .envs(env.iter().copied())
            .env(
                "RUST_LOG",
                std::env::var("TEST_LOG").unwrap_or_else(|_| "info".into()),
            )
            .stdout(Stdio::piped())
            .stderr(stderr)
            .spawn()
            .unwrap_or_else(|e| panic!("starting {bin}: {e}"));
        let stdout = child.stdout.take().unwrap();
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if let Some((what, addr)) = line.split_once(" listening on ")
                    && let Ok(addr) = addr.trim().parse::<SocketAddr>()
                {
                    let _ = tx.send((what.to_string(), addr));
                }
            }
        });
        // The process's own address is on the line that names the binary.
        let own = Path::new(bin).file_stem().unwrap().to_string_lossy().to_string();
        let mut listening = Vec::new();
        let addr = loop {
            match rx.recv_timeout(Duration::from_secs(60)) {
                Ok((what, addr)) if what.starts_with(&own) => break addr,
                Ok(other) => listening.push(other),
                Err(_) => {
                    let _ = child.kill();
                    panic!(
                        "{name} did not report its address; its log:\n{}",
                        std::fs::read_to_string(&log).unwrap_or_default()
                    );
                }
            }
        };
        Proc {
            name: name.to_string(),
            addr,
            listening,
            child,
            log,
        }
    }

    pub fn endpoint(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn logs(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Waits for the process to exit on its own.
    pub fn wait(&mut self, timeout: Duration) -> Option<std::process::ExitStatus> {
        let deadline = std::time::Instant::now() + timeout;
        while std::time::Instant::now() < deadline {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Some(status);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        None
    }

    /// Asks the process to stop (SIGTERM), as an orchestrator would.
    pub fn terminate(&self) {
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
    }

    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill();
        if std::thread::panicking() {
            let logs = self.logs();
            let tail: Vec<&str> = logs.lines().rev().take(60).collect();
            eprintln!("---- last lines of {} ----", self.name);
            for line in tail.into_iter().rev() {
                eprintln!("{line}");
            }
        }
    }
}

pub fn region_sim(dir: &Path, region: &str, args: &[&str]) -> Proc {
    region_sim_at(dir, region, "127.0.0.1:0", args)
}

/// A region-sim on a given address (to restart one where it was).
pub fn region_sim_at(dir: &Path, region: &str, listen: &str, args: &[&str]) -> Proc {
    let mut all = vec!["--listen", listen, "--region", region];
    all.extend_from_slice(args);
    Proc::start(
        env!("CARGO_BIN_EXE_region-sim"),
        &all,
        dir,
        &format!("region-sim-{region}"),
    )
}

pub fn dispatcher(config: &Path) -> Proc {
    dispatcher_as(env!("CARGO_BIN_EXE_dispatcher"), config)
}

/// `bin` (the dispatcher, or a script that execs it) with `config`, on a
/// free loopback port; its log beside the config.
pub fn dispatcher_as(bin: &str, config: &Path) -> Proc {
    let dir = config.parent().unwrap();
    Proc::start(
        bin,
        &["--config", config.to_str().unwrap(), "--listen", "127.0.0.1:0"],
        dir,
        "dispatcher",
    )
}

/// A temporary directory holding dispatcher.toml and regions/.
pub struct ConfigDir {
    pub dir: tempfile::TempDir,
}

impl ConfigDir {
    pub fn new(dispatcher_toml: &str) -> Self {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("regions")).unwrap();
        std::fs::write(dir.path().join("dispatcher.toml"), dispatcher_toml).unwrap();
        Self { dir }
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    pub fn config(&self) -> PathBuf {
        self.dir.path().join("dispatcher.toml")
    }

    pub fn region_file(&self, name: &str) -> PathBuf {
        self.dir.path().join("regions").join(format!("{name}.toml"))
    }

    pub fn write_region(&self, name: &str, text: &str) {
        // Write then rename, as an editor would, so a watcher never reads half a file.
        let tmp = self.dir.path().join(format!(".{name}.toml.tmp"));
        std::fs::write(&tmp, text).unwrap();
        std::fs::rename(&tmp, self.region_file(name)).unwrap();
    }
}

/// A region served by a region-sim process of its own: one model, gpt-4o,
/// whose provider limits (and accounting) are the ones the region file
/// configures. Tests that want the two to differ write the file themselves.
pub struct SimRegion<'a> {
    pub name: &'a str,
    pub tokens_per_minute: u64,
    pub requests_per_minute: u64,
    /// Token burst on both sides (default: a minute's worth).
    pub burst_tokens: Option<u64>,
    pub accounting: &'a str,
    pub max_concurrent: u32,
    /// region-sim's behaviour: latency, failures, ...
    pub sim_args: &'a [&'a str],
    /// Appended to the region file (`[health]`, ...).
    pub extra_toml: &'a str,
}

impl Default for SimRegion<'_> {
    fn default() -> Self {
        Self {
            name: "",
            tokens_per_minute: 100_000_000,
            requests_per_minute: 10_000_000,
            burst_tokens: None,
            accounting: "admission",
            max_concurrent: 256,
            sim_args: &[],
            extra_toml: "",
        }
    }
}

impl ConfigDir {
    /// Starts `r`'s region-sim and writes its region file pointing at it.
    pub fn start_region(&self, r: SimRegion) -> Proc {
        let model = format!(
            "gpt-4o:{}:{}:{}",
            r.tokens_per_minute, r.requests_per_minute, r.accounting
        );
        let burst = r.burst_tokens.map(|b| b.to_string());
        let mut args = vec!["--model", &model];
        if let Some(b) = &burst {
            args.extend(["--burst-tokens", b]);
        }
        args.extend_from_slice(r.sim_args);
        let sim = region_sim(self.path(), r.name, &args);
        let mut text = region_toml(
            r.name,
            &sim.endpoint(),
            r.max_concurrent,
            &[("gpt-4o", r.tokens_per_minute, r.requests_per_minute, r.accounting)],
        );
        if let Some(b) = r.burst_tokens {
            text += &format!("burst_tokens = {b}\n");
        }
        text += r.extra_toml;
        self.write_region(r.name, &text);
        sim
    }
}

/// A region file pointing at `endpoint`, one line per model:
/// `(model, tokens_per_minute, requests_per_minute, accounting)`.
pub fn region_toml(
    name: &str,
    endpoint: &str,
    max_concurrent: u32,
    models: &[(&str, u64, u64, &str)],
) -> String {
    let mut s = format!("name = \"{name}\"\nendpoint = \"{endpoint}\"\nmax_concurrent = {max_concurrent}\n");
    for (model, tpm, rpm, accounting) in models {
        s += &format!(
            "[[models]]\nname = \"{model}\"\ntokens_per_minute = {tpm}\nrequests_per_minute = {rpm}\naccounting = \"{accounting}\"\n"
        );
    }
    s
}

pub async fn client(addr: SocketAddr) -> DispatcherClient<Channel> {
    let channel = Channel::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect()
        .await
        .expect("connecting to the dispatcher");
    DispatcherClient::new(channel)
}

pub async fn sim_stats(addr: SocketAddr) -> pb::SimStats {
    let mut c = RegionSimControlClient::connect(format!("http://{addr}"))
        .await
        .unwrap();
    c.get_stats(pb::GetStatsRequest {}).await.unwrap().into_inner()
}

pub async fn sim_configure(addr: SocketAddr, settings: pb::SimSettings) -> pb::SimStats {
    let mut c = RegionSimControlClient::connect(format!("http://{addr}"))
        .await
        .unwrap();
    c.configure(settings).await.unwrap().into_inner()
}

/// A small deterministic generator for test workloads (no shared state
/// with the code under test).
pub struct Lcg(pub u64);

impl Lcg {
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        self.0 >> 11
    }

    /// Uniform in [0, 1).
    pub fn unit(&mut self) -> f64 {
        (self.next_u64() as f64) / ((1u64 << 53) as f64)
    }

    /// Pareto-distributed with shape `alpha`, at least `min`, capped at `max`:
    /// most requests small, a few very large.
    pub fn heavy_tail(&mut self, min: f64, alpha: f64, max: f64) -> u64 {
        let u = 1.0 - self.unit();
        (min / u.powf(1.0 / alpha)).min(max) as u64
    }
}

pub async fn admin(addr: SocketAddr) -> pb::admin_client::AdminClient<Channel> {
    pb::admin_client::AdminClient::connect(format!("http://{addr}"))
        .await
        .unwrap()
}

pub async fn region_status(addr: SocketAddr, region: &str) -> Result<pb::RegionStatus, tonic::Status> {
    admin(addr)
        .await
        .get_region(pb::GetRegionRequest {
            region: region.into(),
        })
        .await
        .map(|r| r.into_inner())
}

/// Polls `check` every 50 ms until it is true or `timeout` passes; returns
/// how long it took.
pub async fn eventually<F, Fut>(timeout: Duration, mut check: F) -> Option<Duration>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let start = std::time::Instant::now();
    while start.elapsed() < timeout {
        if check().await {
            return Some(start.elapsed());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    None
}

/// One `GET /metrics` at `addr` (HTTP/1.1, text format): the body.
#[allow(dead_code)]
pub fn scrape_metrics(addr: SocketAddr) -> String {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n")
        .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    let (head, body) = out.split_once("\r\n\r\n").unwrap();
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    assert!(head.to_lowercase().contains("content-type: text/plain"), "{head}");
    body.to_string()
}
