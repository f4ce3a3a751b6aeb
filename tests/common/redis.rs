//! A real redis-server for the tests: on a free loopback port, without
//! persistence (as docs/SCALING.md says to run it for quota), killed,
//! paused or restarted empty on demand.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub struct RedisServer {
    pub port: u16,
    child: Option<Child>,
    /// `DEBUG` allowed from loopback (`debug_sleep`).
    debug: bool,
    /// More arguments (`--replicaof`, persistence).
    extra: Vec<String>,
}

pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

impl RedisServer {
    pub fn start() -> Self {
        Self::started(false)
    }

    /// Like `start`, with `DEBUG` allowed from loopback (`debug_sleep`).
    pub fn start_with_debug() -> Self {
        Self::started(true)
    }

    fn started(debug: bool) -> Self {
        Self::started_with(debug, Vec::new())
    }

    fn started_with(debug: bool, extra: Vec<String>) -> Self {
        let mut r = Self {
            port: free_port(),
            child: None,
            debug,
            extra,
        };
        r.spawn();
        r
    }

    /// A replica of `primary` (asynchronous replication), once it has
    /// copied what the primary holds.
    pub fn start_replica_of(primary: &RedisServer) -> Self {
        let r = Self::started_with(
            false,
            vec!["--replicaof".into(), "127.0.0.1".into(), primary.port.to_string()],
        );
        let deadline = Instant::now() + Duration::from_secs(10);
        while !r.info("replication").contains("master_link_status:up") {
            assert!(Instant::now() < deadline, "the replica did not sync within 10 s");
            std::thread::sleep(Duration::from_millis(20));
        }
        r
    }

    /// With these arguments too (persistence settings, say), in `dir`.
    pub fn start_with_args(dir: &std::path::Path, args: &[&str]) -> Self {
        let mut extra: Vec<String> = vec!["--dir".into(), dir.display().to_string()];
        extra.extend(args.iter().map(|a| a.to_string()));
        Self::started_with(false, extra)
    }

    /// A synchronous connection, for setting the stage.
    pub fn connection(&self) -> redis::Connection {
        redis::Client::open(self.url()).unwrap().get_connection().unwrap()
    }

    /// `INFO section`, as text.
    pub fn info(&self, section: &str) -> String {
        redis::cmd("INFO")
            .arg(section)
            .query(&mut self.connection())
            .unwrap()
    }

    /// This server process's run id (what `central.lua` keeps as the epoch).
    pub fn run_id(&self) -> String {
        let info = self.info("server");
        let line = info
            .lines()
            .find_map(|l| l.strip_prefix("run_id:"))
            .expect("run_id in INFO server");
        line.trim().to_string()
    }

    /// The process id, for signals the test sends itself.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("running").id()
    }

    /// `DEBUG SLEEP secs`: the server answers nothing for that long, then
    /// runs what it was sent meanwhile (a stall, not a failure). Returns
    /// once the sleep has begun; the thread ends with it.
    pub fn debug_sleep(&self, secs: f64) -> std::thread::JoinHandle<()> {
        assert!(self.debug, "start_with_debug() allows DEBUG");
        let port = self.port;
        let sleeper = std::thread::spawn(move || {
            let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
            s.write_all(format!("DEBUG SLEEP {secs}\r\n").as_bytes()).unwrap();
            let mut buf = [0u8; 64];
            let n = s.read(&mut buf).unwrap();
            assert!(
                buf[..n].starts_with(b"+OK"),
                "DEBUG SLEEP: {:?}",
                String::from_utf8_lossy(&buf[..n])
            );
        });
        let deadline = Instant::now() + Duration::from_secs(5);
        while self.ping() {
            assert!(Instant::now() < deadline, "redis-server did not begin to sleep");
        }
        sleeper
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    fn spawn(&mut self) {
        let child = Command::new(super::tools::redis_server())
            .args(["--port", &self.port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no", "--protected-mode", "no"])
            .args(if self.debug {
                &["--enable-debug-command", "local"][..]
            } else {
                &[]
            })
            .args(&self.extra)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("starting redis-server");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(10);
        while !self.ping() {
            assert!(
                Instant::now() < deadline,
                "redis-server did not answer PING within 10 s"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// PING over a raw connection: +PONG.
    pub fn ping(&self) -> bool {
        let Ok(mut s) = TcpStream::connect(("127.0.0.1", self.port)) else {
            return false;
        };
        let _ = s.set_read_timeout(Some(Duration::from_millis(200)));
        let mut buf = [0u8; 16];
        s.write_all(b"PING\r\n").is_ok() && s.read(&mut buf).is_ok_and(|n| buf[..n].starts_with(b"+PONG"))
    }

    /// Kills it (SIGKILL); its data goes with it.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Starts it again on the same port with the same arguments: empty,
    /// unless they turned persistence on (then it reloads what it wrote).
    pub fn restart_empty(&mut self) {
        self.kill();
        self.spawn();
    }

    /// SIGSTOP: it keeps its connections but answers nothing.
    pub fn pause(&self) {
        self.signal("-STOP");
    }

    /// SIGCONT.
    pub fn resume(&self) {
        self.signal("-CONT");
    }

    fn signal(&self, sig: &str) {
        let pid = self.child.as_ref().expect("running").id();
        let ok = Command::new("kill")
            .args([sig, &pid.to_string()])
            .status()
            .unwrap()
            .success();
        assert!(ok, "kill {sig} {pid}");
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        if let Some(c) = &self.child {
            // A paused server would not die of SIGKILL's cleanup otherwise.
            let _ = Command::new("kill").args(["-CONT", &c.id().to_string()]).status();
        }
        self.kill();
    }
}

/// A Redis Sentinel (`redis-server --sentinel`, the binary Debian's
/// redis-sentinel package runs) on a loopback port, watching `primary`
/// under `name` with a quorum of one: a primary not answering for 1 s is
/// failed over to its replica.
pub struct Sentinel {
    pub port: u16,
    child: Child,
    _dir: tempfile::TempDir,
}

impl Sentinel {
    pub fn start(primary: &RedisServer, name: &str) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let port = free_port();
        let conf = dir.path().join("sentinel.conf");
        std::fs::write(
            &conf,
            format!(
                "port {port}\nbind 127.0.0.1\nprotected-mode no\ndir {}\n\
                 sentinel monitor {name} 127.0.0.1 {} 1\n\
                 sentinel down-after-milliseconds {name} 1000\n\
                 sentinel failover-timeout {name} 10000\n",
                dir.path().display(),
                primary.port
            ),
        )
        .unwrap();
        let child = Command::new(super::tools::redis_server())
            .arg(&conf)
            .arg("--sentinel")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("starting redis-server --sentinel");
        let s = Self {
            port,
            child,
            _dir: dir,
        };
        let deadline = Instant::now() + Duration::from_secs(10);
        while s.primary(name).is_none() {
            assert!(
                Instant::now() < deadline,
                "the Sentinel did not name the primary within 10 s"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        s
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// The primary's port, as the Sentinel names it now.
    pub fn primary(&self, name: &str) -> Option<u16> {
        let mut con = redis::Client::open(self.url()).ok()?.get_connection().ok()?;
        let addr: Option<(String, String)> = redis::cmd("SENTINEL")
            .arg("GET-MASTER-ADDR-BY-NAME")
            .arg(name)
            .query(&mut con)
            .ok()?;
        addr.and_then(|(_, port)| port.parse().ok())
    }
}

impl Drop for Sentinel {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
