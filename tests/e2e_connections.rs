//! Hostile and unlucky connections, against a real process: idle and silent
//! connections are closed, the connection cap holds, half-sent requests to
//! the metrics port are dropped without keeping a scraper out, and out of
//! file descriptors silent connections still close and a new client is
//! served at once, without the accept loop spinning. Real sockets and a
//! real file-descriptor limit are the point here, so these are process
//! tests; the timers' logic itself is tested with a paused clock in `src/`.

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use common::attack::dispatcher_with_nofile;
use common::{ConfigDir, Proc, client, dispatcher};
use dispatcher::pb;

const REGION: &str = r#"
name = "local"
[[models]]
name = "gpt-4o"
tokens_per_minute = 100000000
requests_per_minute = 1000000
[simulate]
ms_per_1k_tokens = 1000
completion_min_fraction = 1.0
"#;

/// The HTTP/2 connection preface and an empty SETTINGS frame: what a client
/// sends first. Nothing after it: an idle connection.
const PREFACE_AND_SETTINGS: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x00\x04\x00\x00\x00\x00\x00";

fn toml(server: &str) -> String {
    format!(
        "[auth]\nallow_anonymous = true\n[telemetry]\nmetrics_listen = \"127.0.0.1:0\"\n[[models]]\nname = \"gpt-4o\"\n[server]\n{server}\n"
    )
}

fn request() -> pb::DispatchRequest {
    pb::DispatchRequest {
        model: "gpt-4o".into(),
        payload: "hello".into(),
        max_output_tokens: 10,
        ..Default::default()
    }
}

/// Reads (and discards what the server sends) until the server closes the
/// connection or `deadline` passes; true when it was closed.
fn closed_by(mut s: &TcpStream, deadline: Instant) -> bool {
    let mut buf = [0u8; 4096];
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return false;
        }
        s.set_read_timeout(Some(left)).unwrap();
        match s.read(&mut buf) {
            Ok(0) => return true,
            Ok(_) => continue,
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                return false;
            }
            Err(_) => return true,
        }
    }
}

fn socket_inodes(pid: u32) -> std::collections::HashSet<String> {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| {
            d.filter_map(Result::ok)
                .filter_map(|e| {
                    let link = std::fs::read_link(e.path()).ok()?;
                    let link = link.to_string_lossy();
                    let inode = link.strip_prefix("socket:[")?.strip_suffix(']')?;
                    Some(inode.to_string())
                })
                .collect()
        })
        .unwrap_or_default()
}

/// Connections the process has accepted on `port` (its own health checks
/// and in-process regions' sockets are not counted, nor connections still
/// waiting in the listen backlog).
fn accepted(pid: u32, port: u16) -> usize {
    let ours = socket_inodes(pid);
    let port = format!(":{port:04X}");
    ["tcp", "tcp6"]
        .iter()
        .filter_map(|f| std::fs::read_to_string(format!("/proc/{pid}/net/{f}")).ok())
        .flat_map(|table| {
            table
                .lines()
                .skip(1)
                .filter(|l| {
                    let f: Vec<&str> = l.split_whitespace().collect();
                    // local address, state (0A: listening), inode.
                    f.len() > 9 && f[1].ends_with(&port) && f[3] != "0A" && ours.contains(f[9])
                })
                .map(str::to_string)
                .collect::<Vec<_>>()
        })
        .count()
}

/// User + system CPU time the process has used.
fn cpu_time(pid: u32) -> Duration {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    // Fields after the command name (which may hold spaces) start at field 3.
    let fields: Vec<&str> = stat.rsplit_once(')').unwrap().1.split_whitespace().collect();
    let ticks: u64 = fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap();
    Duration::from_millis(ticks * 10) // CLK_TCK is 100 on Linux
}

fn metrics_addr(d: &Proc) -> SocketAddr {
    d.listening
        .iter()
        .find(|(what, _)| what.starts_with("metrics"))
        .expect("the metrics address")
        .1
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_and_silent_connections_are_closed_and_the_cap_holds() {
    let cfg = ConfigDir::new(&toml(
        "max_connections = 4\nhandshake_timeout = \"500ms\"\nidle_timeout = \"1500ms\"\nkeepalive_interval = \"60s\"",
    ));
    cfg.write_region("local", REGION);
    let d = dispatcher(&cfg.config());
    let port = d.addr.port();

    // Two clients that say hello and then nothing, six that never say
    // anything: twice the cap.
    let mut idle = Vec::new();
    for _ in 0..2 {
        let mut s = TcpStream::connect(d.addr).unwrap();
        s.write_all(PREFACE_AND_SETTINGS).unwrap();
        idle.push(s);
    }
    let silent: Vec<TcpStream> = (0..6).map(|_| TcpStream::connect(d.addr).unwrap()).collect();

    // At most four of them are held at a time (each newcomer pushes out
    // the oldest, none having authenticated).
    let took = common::eventually(Duration::from_secs(5), || async { accepted(d.pid(), port) >= 4 }).await;
    assert!(took.is_some(), "the dispatcher took up to its cap");
    for _ in 0..5 {
        let held = accepted(d.pid(), port);
        assert!(held <= 4, "{held} connections held with max_connections = 4");
        tokio::time::sleep(Duration::from_millis(40)).await;
    }

    // A real client behind them is served.
    let addr = d.addr;
    let served = tokio::spawn(async move {
        let started = Instant::now();
        let mut grpc = client(addr).await;
        let mut r = tonic::Request::new(request());
        r.set_timeout(Duration::from_secs(15));
        (grpc.dispatch(r).await.map(|_| ()), started.elapsed())
    });

    let closing = tokio::task::spawn_blocking(move || {
        let deadline = Instant::now() + Duration::from_secs(15);
        let open_silent = silent.iter().filter(|s| !closed_by(s, deadline)).count();
        let open_idle = idle.iter().filter(|s| !closed_by(s, deadline)).count();
        (open_silent, open_idle)
    });
    let (open_silent, open_idle) = closing.await.unwrap();
    assert_eq!(open_silent, 0, "connections that never sent a preface are closed");
    assert_eq!(open_idle, 0, "connections with no request are closed");
    let (result, took) = served.await.unwrap();
    println!("a client queued behind the idle connections was served after {took:?}");
    result.expect("served once the idle connections were closed");

    // A request that takes longer than the idle timeout is not cut short.
    let mut grpc = client(d.addr).await;
    let mut r = tonic::Request::new(pb::DispatchRequest {
        max_output_tokens: 2500,
        ..request()
    });
    r.set_timeout(Duration::from_secs(15));
    let started = Instant::now();
    grpc.dispatch(r)
        .await
        .expect("a request longer than idle_timeout completes");
    assert!(
        started.elapsed() > Duration::from_millis(1500),
        "the request did outlast the idle timeout: {:?}",
        started.elapsed()
    );
    drop(grpc);

    // The metrics port: a request whose headers never end is dropped; a
    // whole one is answered.
    let m = metrics_addr(&d);
    let mut half = TcpStream::connect(m).unwrap();
    half.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n").unwrap();
    let mut whole = TcpStream::connect(m).unwrap();
    whole
        .write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .unwrap();
    let (half_closed, answer) = tokio::task::spawn_blocking(move || {
        let mut answer = String::new();
        whole.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let _ = whole.read_to_string(&mut answer);
        (closed_by(&half, Instant::now() + Duration::from_secs(10)), answer)
    })
    .await
    .unwrap();
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer:.200}");
    assert!(half_closed, "a half-sent request to the metrics port is closed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_that_does_not_answer_keepalive_pings_is_dropped() {
    let cfg = ConfigDir::new(&toml(
        "idle_timeout = \"60s\"\nkeepalive_interval = \"300ms\"\nkeepalive_timeout = \"300ms\"",
    ));
    cfg.write_region("local", REGION);
    let d = dispatcher(&cfg.config());
    let mut s = TcpStream::connect(d.addr).unwrap();
    s.write_all(PREFACE_AND_SETTINGS).unwrap();
    let (closed, pinged) = tokio::task::spawn_blocking(move || {
        // Frames: 3 bytes length, 1 type (6 = PING), 1 flags, 4 stream id.
        let deadline = Instant::now() + Duration::from_secs(10);
        let mut seen = Vec::new();
        let mut buf = [0u8; 4096];
        loop {
            s.set_read_timeout(Some(
                deadline
                    .saturating_duration_since(Instant::now())
                    .max(Duration::from_millis(1)),
            ))
            .unwrap();
            match s.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => seen.extend_from_slice(&buf[..n]),
            }
        }
        let mut pinged = false;
        let mut at = 0;
        while at + 9 <= seen.len() {
            let len = u32::from_be_bytes([0, seen[at], seen[at + 1], seen[at + 2]]) as usize;
            pinged |= seen[at + 3] == 6;
            at += 9 + len;
        }
        (Instant::now() < deadline, pinged)
    })
    .await
    .unwrap();
    assert!(pinged, "the server sent keepalive PINGs");
    assert!(closed, "and closed the connection when they went unanswered");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn out_of_file_descriptors_silent_connections_close_and_a_new_client_is_served_at_once() {
    let cfg = ConfigDir::new(&toml("handshake_timeout = \"3s\""));
    cfg.write_region("local", REGION);
    let d = dispatcher_with_nofile(&cfg, 256);

    // More connections than it has descriptors for, none sending a preface.
    let hogs: Vec<TcpStream> = (0..300).map(|_| TcpStream::connect(d.addr).unwrap()).collect();
    let connected = Instant::now();
    let out = common::eventually(Duration::from_secs(5), || async {
        d.logs().contains("Too many open files")
    })
    .await;
    assert!(out.is_some(), "the dispatcher ran out of descriptors");

    // A new client is served at once, not after the silent ones time out.
    let started = Instant::now();
    let call = async {
        let mut grpc = client(d.addr).await;
        grpc.dispatch(request()).await
    };
    let served = tokio::time::timeout(Duration::from_secs(1), call).await;
    let took = started.elapsed();
    println!("out of descriptors, a new client was served after {took:?}");
    served
        .expect("a new client was not served within 1 s while out of descriptors")
        .expect("served");

    // Holding all it can, waiting on the silent ones' timeout, it does not spin.
    let (cpu0, t0) = (cpu_time(d.pid()), Instant::now());
    tokio::time::sleep(Duration::from_millis(1000)).await;
    let (cpu, wall) = (cpu_time(d.pid()) - cpu0, t0.elapsed());
    println!("out of descriptors: {cpu:?} of CPU in {wall:?}");
    assert!(
        cpu.as_secs_f64() < 0.25 * wall.as_secs_f64(),
        "the accept loop spins: {cpu:?} of CPU in {wall:?}"
    );

    // Every silent connection is closed by the handshake timeout (3 s) or
    // to make room, whatever the descriptor pressure.
    let open = tokio::task::spawn_blocking(move || {
        let deadline = connected + Duration::from_secs(6);
        hogs.iter().filter(|s| !closed_by(s, deadline)).count()
    })
    .await
    .unwrap();
    println!(
        "{open} of 300 silent connections open {:?} after they connected",
        connected.elapsed()
    );
    assert_eq!(open, 0, "silent connections outlived handshake_timeout = 3s");
    let warnings = d
        .logs()
        .lines()
        .filter(|l| l.contains("dispatcher::accept") && l.contains("Too many open files"))
        .count();
    assert!(
        (1..=3).contains(&warnings),
        "running out is logged once, not per connection: {warnings} lines"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_the_metrics_port_requests_whose_headers_never_end_are_closed_and_a_scrape_is_answered() {
    let cfg = ConfigDir::new(&toml("handshake_timeout = \"2s\""));
    cfg.write_region("local", REGION);
    let d = dispatcher(&cfg.config());
    let m = metrics_addr(&d);

    // A hundred requests whose headers never end (the port takes 16 connections).
    let started = Instant::now();
    let half: Vec<TcpStream> = (0..100)
        .map(|_| {
            let mut s = TcpStream::connect(m).unwrap();
            s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n").unwrap();
            s
        })
        .collect();
    let (scrape, open) = tokio::task::spawn_blocking(move || {
        // A scraper behind them is answered within a second.
        let mut whole = TcpStream::connect(m).unwrap();
        whole
            .write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            .unwrap();
        whole.set_read_timeout(Some(Duration::from_secs(1))).unwrap();
        let mut answer = String::new();
        let _ = whole.read_to_string(&mut answer);
        let scrape = (answer, started.elapsed());
        let deadline = started + Duration::from_secs(4);
        (scrape, half.iter().filter(|s| !closed_by(s, deadline)).count())
    })
    .await
    .unwrap();
    println!(
        "a scrape was answered after {:?}; {open} of 100 half requests open {:?} after they were sent",
        scrape.1,
        started.elapsed()
    );
    assert!(
        scrape.0.starts_with("HTTP/1.1 200"),
        "no answer to a scrape within 1 s: {:.200}",
        scrape.0
    );
    assert_eq!(open, 0, "half-sent requests outlived handshake_timeout = 2s");
}
