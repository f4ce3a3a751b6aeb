//! `loadgen`: a gRPC load generator for the dispatcher (or, for baselines,
//! a regional cluster directly or through a proxy).
//!
//! Open loop by default: requests leave on a fixed schedule whatever the
//! replies do, and each latency is measured from the moment the request was
//! *due*, so a stalled server cannot hide its stall (no coordinated
//! omission). `--concurrency N` switches to a closed loop of N workers, to
//! find the saturation throughput.

use std::io::Write;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::{Parser, ValueEnum};
use dispatcher::pb;
use dispatcher::pb::agent_cluster_client::AgentClusterClient;
use dispatcher::pb::dispatcher_client::DispatcherClient;
use parking_lot::Mutex;
use rand::distr::Distribution;
use rand::distr::weighted::WeightedIndex;
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use tonic::metadata::{Ascii, MetadataValue};
use tonic::transport::{Channel, Endpoint};

mod html;
mod openai;
mod report;

use report::{Finished, Report, Tally};

#[derive(Debug, Clone, Copy, ValueEnum)]
enum Mode {
    /// dispatch.v1.Dispatcher/Dispatch (the dispatcher).
    Dispatcher,
    /// dispatch.v1.AgentCluster/Execute (a region-sim, or a proxy in front of one).
    Cluster,
    /// POST /v1/chat/completions (the dispatcher's OpenAI front door), over HTTP/1.1.
    Openai,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Arrivals {
    /// Evenly spaced at the rate.
    Uniform,
    /// A Poisson process at the rate (exponential gaps, from `--seed`).
    Poisson,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum Sizes {
    /// Simple, moderate and complex requests, weighted 10 : 5 : 2.
    Mix,
    /// Prompt and output drawn from Pareto distributions.
    Heavy,
    /// 50 prompt tokens, 50 output tokens.
    Tiny,
}

/// Sends gRPC load at a fixed rate and reports throughput, latency
/// percentiles, status codes and the split by region and tenant.
#[derive(Debug, Parser)]
#[command(version)]
struct Args {
    /// The server, e.g. http://127.0.0.1:50051.
    #[arg(long, default_value = "http://127.0.0.1:50051")]
    target: String,
    /// PEM CA that an https:// target's certificate must chain to (its
    /// name must be localhost or the target's host).
    #[arg(long)]
    ca_file: Option<std::path::PathBuf>,
    #[arg(long, value_enum, default_value = "dispatcher")]
    mode: Mode,
    /// Requests a second (open loop).
    #[arg(long, default_value_t = 100.0)]
    rate: f64,
    /// How open-loop requests are spaced.
    #[arg(long, value_enum, default_value = "uniform")]
    arrivals: Arrivals,
    /// Closed loop with this many workers instead of a fixed rate.
    #[arg(long)]
    concurrency: Option<usize>,
    /// How long to send for.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    duration: Duration,
    /// Stop after this many requests.
    #[arg(long)]
    requests: Option<u64>,
    /// Leading time whose requests are not counted.
    #[arg(long, default_value = "0s", value_parser = humantime::parse_duration)]
    warmup: Duration,
    /// HTTP/2 connections, used in turn.
    #[arg(long, default_value_t = 4)]
    connections: usize,
    /// NAME:KEY:WEIGHT (repeatable); requests go out with the key, tenants
    /// chosen by weight. None: no key.
    #[arg(long = "tenant", value_parser = parse_tenant)]
    tenants: Vec<Tenant>,
    #[arg(long, default_value = "gpt-4o")]
    model: String,
    #[arg(long, value_enum, default_value = "mix")]
    sizes: Sizes,
    /// Per-request deadline.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    timeout: Duration,
    /// Requests allowed in flight at once (open loop); beyond it the
    /// request is counted as dropped by the client rather than queued.
    #[arg(long, default_value_t = 20_000)]
    max_in_flight: u64,
    /// Sample this process's resident memory every second.
    #[arg(long)]
    watch_pid: Option<u32>,
    /// Write the report as JSON here ("-" for stdout).
    #[arg(long)]
    json: Option<String>,
    /// Put every success's latency in the JSON report (to merge the reports
    /// of several loadgens).
    #[arg(long, requires = "json")]
    json_latencies: bool,
    /// Also write the report as a self-contained HTML page here (latency
    /// over time, the split by region and by tenant).
    #[arg(long)]
    html: Option<std::path::PathBuf>,
    /// No live progress line.
    #[arg(long)]
    quiet: bool,
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Ask the dispatcher's response cache for every request, with this TTL
    /// (docs/CACHE.md): the same payload each time, so all but the first
    /// of each size are hits.
    #[arg(long, value_parser = humantime::parse_duration)]
    cache_ttl: Option<Duration>,
    /// With --cache-ttl: a payload of its own per request, so every
    /// request is a miss (looked up, forwarded, stored).
    #[arg(long, requires = "cache_ttl")]
    cache_misses: bool,
}

/// A `--tenant`: its requests carry `authorization`, built once here.
#[derive(Debug, Clone)]
struct Tenant {
    name: String,
    authorization: MetadataValue<Ascii>,
    weight: f64,
}

fn parse_tenant(s: &str) -> Result<Tenant, String> {
    let mut parts = s.splitn(3, ':');
    let (Some(name), Some(key), Some(weight)) = (parts.next(), parts.next(), parts.next()) else {
        return Err(format!("{s:?}: expected NAME:KEY:WEIGHT"));
    };
    let weight: f64 = weight
        .parse()
        .map_err(|_| format!("{s:?}: weight is not a number"))?;
    if !(weight > 0.0 && weight.is_finite()) {
        return Err(format!("{s:?}: weight must be above zero"));
    }
    let bad_key = || format!("{s:?}: the key must be printable ASCII without spaces (it goes in a header)");
    if !key.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(bad_key());
    }
    let authorization = format!("Bearer {key}").parse().map_err(|_| bad_key())?;
    Ok(Tenant {
        name: name.to_string(),
        authorization,
        weight,
    })
}

enum Client {
    Dispatcher(DispatcherClient<Channel>),
    Cluster(AgentClusterClient<Channel>),
    OpenAi(Arc<openai::OpenAiClient>),
}

struct Work {
    prompt: u64,
    max_output: u64,
    tenant: Option<usize>,
}

struct Shared {
    args: Args,
    clients: Vec<Client>,
    /// Picks a tenant by weight (none without `--tenant`).
    tenant_pick: Option<WeightedIndex<f64>>,
    tally: Mutex<Tally>,
    sent: AtomicU64,
    ok: AtomicU64,
    failed: AtomicU64,
    in_flight: AtomicU64,
    dropped: AtomicU64,
    start: Instant,
}

impl Shared {
    fn draw(&self, rng: &mut SmallRng) -> Work {
        let (prompt, max_output) = match self.args.sizes {
            Sizes::Tiny => (50, 50),
            Sizes::Heavy => {
                let pareto = |rng: &mut SmallRng, min: f64, alpha: f64, max: f64| {
                    (min / (1.0 - rng.random::<f64>()).powf(1.0 / alpha)).min(max) as u64
                };
                (pareto(rng, 100.0, 1.3, 8_000.0), pareto(rng, 50.0, 1.5, 2_000.0))
            }
            Sizes::Mix => match rng.random_range(0..17) {
                0..10 => (300, 150),
                10..15 => (1_500, 500),
                _ => (6_000, 1_500),
            },
        };
        let tenant = self.tenant_pick.as_ref().map(|w| w.sample(rng));
        Work {
            prompt,
            max_output,
            tenant,
        }
    }

    /// Sends one request due at `due` and records it (if past the warm-up).
    async fn send(&self, n: u64, work: Work, due: Instant) {
        let timeout = self.args.timeout;
        let result: Result<(String, u64), tonic::Status> =
            match &self.clients[n as usize % self.clients.len()] {
                Client::Dispatcher(c) => {
                    let mut req = tonic::Request::new(pb::DispatchRequest {
                        model: self.args.model.clone(),
                        payload: match self.args.cache_misses {
                            true => format!("loadgen {n}").into(),
                            false => bytes::Bytes::from_static(b"loadgen"),
                        },
                        prompt_tokens: work.prompt,
                        max_output_tokens: work.max_output,
                        cache: self.args.cache_ttl.map(|ttl| pb::CacheOptions {
                            ttl: prost_types::Duration::try_from(ttl).ok(),
                            ..Default::default()
                        }),
                        ..Default::default()
                    });
                    req.set_timeout(timeout);
                    if let Some(t) = work.tenant {
                        req.metadata_mut()
                            .insert("authorization", self.args.tenants[t].authorization.clone());
                    }
                    c.clone().dispatch(req).await.map(|r| {
                        let r = r.into_inner();
                        let u = r.usage.unwrap_or_default();
                        (r.region, u.prompt_tokens + u.completion_tokens)
                    })
                }
                Client::OpenAi(c) => {
                    let authorization = work
                        .tenant
                        .and_then(|t| self.args.tenants[t].authorization.to_str().ok());
                    let body = openai::body(&self.args.model, work.prompt, work.max_output);
                    c.chat(body, authorization, timeout).await
                }
                Client::Cluster(c) => {
                    let mut req = tonic::Request::new(pb::ExecuteRequest {
                        model: self.args.model.clone(),
                        payload: bytes::Bytes::from_static(b"loadgen"),
                        prompt_tokens: work.prompt,
                        max_output_tokens: work.max_output,
                        ..Default::default()
                    });
                    req.set_timeout(timeout);
                    c.clone().execute(req).await.map(|r| {
                        let u = r.into_inner().usage.unwrap_or_default();
                        (String::new(), u.prompt_tokens + u.completion_tokens)
                    })
                }
            };
        let latency = due.elapsed();
        let counted = due >= self.start + self.args.warmup;
        match &result {
            Ok(_) => self.ok.fetch_add(1, Ordering::Relaxed),
            Err(_) => self.failed.fetch_add(1, Ordering::Relaxed),
        };
        if !counted {
            return;
        }
        let code = match &result {
            Ok(_) => "Ok".to_string(),
            Err(s) => format!("{:?}", s.code()),
        };
        self.tally.lock().record(Finished {
            at_ms: due
                .saturating_duration_since(self.start)
                .as_millis()
                .min(u32::MAX as u128) as u32,
            latency_us: latency.as_micros().min(u32::MAX as u128) as u32,
            code,
            served: result.ok(),
            tenant: work.tenant.map(|i| self.args.tenants[i].name.as_str()),
        });
    }
}

fn rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

async fn connect(args: &Args) -> anyhow::Result<Vec<Client>> {
    dispatcher::tls::install_provider();
    let mut clients = Vec::new();
    if let Mode::Openai = args.mode {
        // One pool: HTTP/1.1 opens connections as requests overlap.
        clients.push(Client::OpenAi(Arc::new(openai::OpenAiClient::new(&args.target)?)));
        return Ok(clients);
    }
    for _ in 0..args.connections {
        // One endpoint per connection: each is its own HTTP/2 connection.
        let mut endpoint = Endpoint::from_shared(args.target.clone())?.tcp_nodelay(true);
        if let Some(ca) = &args.ca_file {
            let pem = std::fs::read(ca).with_context(|| format!("reading --ca-file {}", ca.display()))?;
            endpoint = endpoint.tls_config(
                tonic::transport::ClientTlsConfig::new()
                    .ca_certificate(tonic::transport::Certificate::from_pem(pem))
                    .domain_name("localhost"),
            )?;
        }
        let channel = endpoint
            .connect()
            .await
            .with_context(|| format!("connecting to {}", args.target))?;
        clients.push(match args.mode {
            Mode::Dispatcher => Client::Dispatcher(DispatcherClient::new(channel)),
            Mode::Cluster => Client::Cluster(AgentClusterClient::new(channel)),
            Mode::Openai => unreachable!("served by the pool above"),
        });
    }
    Ok(clients)
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    if args.concurrency.is_none() && !(args.rate > 0.0 && args.rate.is_finite()) {
        bail!("--rate must be a number above zero (or give --concurrency)");
    }
    if args.concurrency == Some(0) {
        bail!("--concurrency must be at least 1");
    }
    if args.connections == 0 {
        bail!("--connections must be at least 1");
    }
    if args.warmup >= args.duration {
        bail!(
            "--warmup ({}) must be shorter than --duration ({})",
            humantime::format_duration(args.warmup),
            humantime::format_duration(args.duration)
        );
    }
    let clients = connect(&args).await?;
    let tenant_pick = (!args.tenants.is_empty())
        .then(|| WeightedIndex::new(args.tenants.iter().map(|t| t.weight)))
        .transpose()
        .context("tenant weights")?;
    let shared = Arc::new(Shared {
        clients,
        tenant_pick,
        tally: Mutex::new(Tally {
            samples: args.html.is_some().then(Vec::new),
            ..Tally::default()
        }),
        sent: AtomicU64::new(0),
        ok: AtomicU64::new(0),
        failed: AtomicU64::new(0),
        in_flight: AtomicU64::new(0),
        dropped: AtomicU64::new(0),
        start: Instant::now(),
        args,
    });
    let limit = shared.args.requests.unwrap_or(u64::MAX);
    let end = shared.start + shared.args.duration;
    let rss = Arc::new(Mutex::new(Vec::new()));
    let progress = {
        let shared = shared.clone();
        let rss = rss.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(1));
            tick.tick().await;
            let mut last = 0;
            loop {
                tick.tick().await;
                if let Some(pid) = shared.args.watch_pid
                    && let Some(kib) = rss_kib(pid)
                {
                    rss.lock().push(kib);
                }
                if shared.args.quiet {
                    continue;
                }
                let ok = shared.ok.load(Ordering::Relaxed);
                eprint!(
                    "\r{:>5.0}s  sent {:>8}  ok {:>8}  failed {:>6}  in flight {:>5}  {:>7} ok/s   ",
                    shared.start.elapsed().as_secs_f64(),
                    shared.sent.load(Ordering::Relaxed),
                    ok,
                    shared.failed.load(Ordering::Relaxed),
                    shared.in_flight.load(Ordering::Relaxed),
                    ok - last
                );
                let _ = std::io::stderr().flush();
                last = ok;
            }
        })
    };

    let mut rng = SmallRng::seed_from_u64(shared.args.seed);
    let mut tasks = tokio::task::JoinSet::new();
    if let Some(workers) = shared.args.concurrency {
        for w in 0..workers {
            let shared = shared.clone();
            let mut rng = SmallRng::seed_from_u64(shared.args.seed + w as u64 + 1);
            tasks.spawn(async move {
                while Instant::now() < end {
                    let n = shared.sent.fetch_add(1, Ordering::Relaxed);
                    if n >= limit {
                        break;
                    }
                    let work = shared.draw(&mut rng);
                    shared.send(n, work, Instant::now()).await;
                }
            });
        }
    } else {
        // The schedule is kept by a dedicated thread: tokio's timer ticks in
        // milliseconds, which at 1,000 requests a second would add up to a
        // millisecond of generator lag to every latency. Requests are
        // spawned onto the runtime as they fall due.
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<(u64, Instant)>();
        let interval = Duration::from_secs_f64(1.0 / shared.args.rate);
        let start = shared.start;
        // Its own stream, so the sizes drawn are the same either way.
        let mut gaps = (shared.args.arrivals == Arrivals::Poisson)
            .then(|| SmallRng::seed_from_u64(shared.args.seed ^ 0x9e37_79b9_7f4a_7c15));
        std::thread::spawn(move || {
            let mut n = 0u64;
            let mut offset = Duration::ZERO;
            loop {
                let due = match &mut gaps {
                    Some(rng) => {
                        let due = start + offset;
                        offset += interval.mul_f64(-(1.0 - rng.random::<f64>()).ln());
                        due
                    }
                    None => start + interval.mul_f64(n as f64),
                };
                if due >= end || n >= limit {
                    return;
                }
                let now = Instant::now();
                if due > now {
                    std::thread::sleep(due - now);
                }
                if tx.send((n, due)).is_err() {
                    return;
                }
                n += 1;
            }
        });
        while let Some((n, due)) = rx.recv().await {
            shared.sent.fetch_add(1, Ordering::Relaxed);
            if shared.in_flight.load(Ordering::Relaxed) >= shared.args.max_in_flight {
                shared.dropped.fetch_add(1, Ordering::Relaxed);
                continue;
            }
            let work = shared.draw(&mut rng);
            let s = shared.clone();
            s.in_flight.fetch_add(1, Ordering::Relaxed);
            tasks.spawn(async move {
                s.send(n, work, due).await;
                s.in_flight.fetch_sub(1, Ordering::Relaxed);
            });
            // Reap finished tasks as we go, so their results do not pile up.
            while tasks.try_join_next().is_some() {}
        }
    }
    while tasks.join_next().await.is_some() {}
    progress.abort();
    if !shared.args.quiet {
        eprintln!();
    }

    let measured = (shared
        .start
        .elapsed()
        .min(shared.args.duration + shared.args.timeout))
    .saturating_sub(shared.args.warmup)
    .as_secs_f64();
    let mut t = std::mem::take(&mut *shared.tally.lock());
    let f = t.figures();
    let ok = f.status_codes.get("Ok").copied().unwrap_or(0);
    let report = Report {
        target: shared.args.target.clone(),
        mode: format!("{:?}", shared.args.mode).to_lowercase(),
        offered_rate: shared.args.concurrency.is_none().then_some(shared.args.rate),
        concurrency: shared.args.concurrency,
        measured_seconds: measured,
        sent: shared.sent.load(Ordering::Relaxed).min(limit),
        ok,
        dropped_by_client: shared.dropped.load(Ordering::Relaxed),
        throughput_ok_per_sec: ok as f64
            / shared
                .args
                .duration
                .saturating_sub(shared.args.warmup)
                .as_secs_f64(),
        latency: f.latency,
        latency_ok: f.latency_ok,
        latency_failed: f.latency_failed,
        status_codes: f.status_codes,
        regions: f.regions,
        tenants: f.tenants,
        rss_kib: std::mem::take(&mut *rss.lock()),
        latencies_ok_ms: shared
            .args
            .json_latencies
            .then(|| t.ok_us.iter().map(|us| *us as f64 / 1000.0).collect()),
    };
    // With the JSON on stdout, the report for people goes to stderr.
    if shared.args.json.as_deref() == Some("-") {
        report::print(&mut std::io::stderr(), &report)?;
    } else {
        report::print(&mut std::io::stdout(), &report)?;
    }
    if let Some(path) = &shared.args.html {
        let page = html::page(&report, t.samples.as_deref().unwrap_or_default());
        std::fs::write(path, page).with_context(|| format!("writing {}", path.display()))?;
    }
    if let Some(path) = &shared.args.json {
        let text = serde_json::to_string_pretty(&report)?;
        if path == "-" {
            println!("{text}");
        } else {
            std::fs::write(path, text).with_context(|| format!("writing {path}"))?;
        }
    }
    Ok(())
}
