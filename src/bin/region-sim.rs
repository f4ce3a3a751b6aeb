//! `region-sim`: a regional agent cluster in front of a simulated LLM
//! provider, served over gRPC (`dispatch.v1.AgentCluster`), or with
//! `--openai` over OpenAI's HTTP API (`--dialect azure`: Azure OpenAI's),
//! for tests, demos and benchmarks.

use std::io::Write;
use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::{Context, bail};
use clap::Parser;
use dispatcher::config::{self, SimulateConfig};
use dispatcher::core::{Accounting, ModelLimits};
use dispatcher::openai::Dialect;
use dispatcher::sim::{self, Fault, Faults, SimSpec};
use dispatcher::telemetry;

/// Simulates one region. Either take a region from a dispatcher config
/// (`--config` and `--region`), or describe it with `--region` and `--model`.
#[derive(Debug, Parser)]
#[command(version)]
struct Args {
    /// Address to serve on (port 0 picks a free port).
    #[arg(long, default_value = "127.0.0.1:0")]
    listen: SocketAddr,
    /// The region's name.
    #[arg(long)]
    region: String,
    /// A dispatcher.toml whose region of this name to simulate.
    #[arg(long)]
    config: Option<PathBuf>,
    /// NAME:TOKENS_PER_MINUTE:REQUESTS_PER_MINUTE[:admission|usage], repeatable.
    #[arg(long = "model", value_parser = parse_model)]
    models: Vec<(String, ModelLimits)>,
    /// Burst of every model's token bucket (default: one minute's worth).
    #[arg(long)]
    burst_tokens: Option<u64>,
    #[arg(long)]
    ms_per_1k_tokens: Option<f64>,
    #[arg(long)]
    base_latency_ms: Option<f64>,
    /// Fraction of requests that fail with UNAVAILABLE before running.
    #[arg(long)]
    failure_rate: Option<f64>,
    #[arg(long)]
    completion_min_fraction: Option<f64>,
    /// Another consumer of the same provider account, tokens per minute.
    #[arg(long)]
    foreign_tokens_per_minute: Option<u64>,
    /// Requests run at once; more wait in the cluster's queue.
    #[arg(long)]
    capacity: Option<u32>,
    /// The provider's buckets start empty (a key somebody just used).
    #[arg(long)]
    start_empty: bool,
    #[arg(long)]
    seed: Option<u64>,
    /// Serve TLS with this PEM certificate (chain); needs --tls-key.
    #[arg(long, requires = "tls_key")]
    tls_cert: Option<PathBuf>,
    /// The PEM private key of --tls-cert.
    #[arg(long, requires = "tls_cert")]
    tls_key: Option<PathBuf>,
    /// Require client certificates that chain to this PEM CA (mTLS).
    #[arg(long, requires = "tls_cert")]
    tls_client_ca: Option<PathBuf>,
    /// Breach the AgentCluster contract on purpose, to see that
    /// `dispatcher check-cluster` catches it; repeatable.
    #[arg(long, value_enum)]
    faulty: Vec<Fault>,
    /// Serve OpenAI's HTTP API (chat completions, models) instead of
    /// AgentCluster; the control services stay on the same port.
    #[arg(long)]
    openai: bool,
    /// The API's flavour: `openai` (/v1/chat/completions, Bearer key) or
    /// `azure` (/openai/deployments/{model}/chat/completions, api-key).
    #[arg(long, requires = "openai", value_parser = parse_dialect, default_value = "openai")]
    dialect: Dialect,
    /// The file holding the API key callers must present (default: any
    /// caller; $REGION_SIM_API_KEY also sets it). Never printed.
    #[arg(long, requires = "openai")]
    api_key_file: Option<PathBuf>,
    /// OTLP/gRPC collector for traces (default: $OTEL_EXPORTER_OTLP_ENDPOINT; none: no export).
    #[arg(long)]
    otlp_endpoint: Option<String>,
}

fn parse_dialect(s: &str) -> Result<Dialect, String> {
    Dialect::parse(s).ok_or_else(|| format!("{s:?}: expected openai or azure"))
}

/// The key `--api-key-file` or `$REGION_SIM_API_KEY` names, if any.
fn api_key(args: &Args) -> anyhow::Result<Option<String>> {
    let key = match &args.api_key_file {
        Some(path) => Some(
            std::fs::read_to_string(path)
                .with_context(|| format!("reading --api-key-file {}", path.display()))?
                .trim()
                .to_string(),
        ),
        None => std::env::var("REGION_SIM_API_KEY").ok(),
    };
    match key {
        Some(k) if k.is_empty() => bail!("the API key is empty"),
        k => Ok(k),
    }
}

fn parse_model(s: &str) -> Result<(String, ModelLimits), String> {
    let parts: Vec<&str> = s.split(':').collect();
    if !(3..=4).contains(&parts.len()) {
        return Err(format!("{s:?}: expected NAME:TPM:RPM[:admission|usage]"));
    }
    let num = |p: &str, what: &str| -> Result<u64, String> {
        p.parse::<u64>()
            .ok()
            .filter(|n| *n > 0)
            .ok_or_else(|| format!("{s:?}: {what} must be a positive integer"))
    };
    let accounting = match parts.get(3) {
        None | Some(&"admission") => Accounting::Admission,
        Some(&"usage") => Accounting::Usage,
        Some(other) => return Err(format!("{s:?}: unknown accounting {other:?}")),
    };
    Ok((
        parts[0].to_string(),
        ModelLimits {
            tokens_per_minute: num(parts[1], "tokens per minute")?,
            requests_per_minute: num(parts[2], "requests per minute")?,
            burst_tokens: None,
            burst_requests: None,
            accounting,
        },
    ))
}

fn spec(args: &Args) -> anyhow::Result<SimSpec> {
    let mut spec = match &args.config {
        Some(path) => {
            let config = config::load(path).map_err(|e| anyhow::anyhow!("{e}"))?;
            let region = config
                .region(&args.region)
                .with_context(|| format!("{} has no region {:?}", path.display(), args.region))?;
            SimSpec::from_region(region)
        }
        None => SimSpec {
            region: args.region.clone(),
            models: Vec::new(),
            settings: SimulateConfig::default(),
        },
    };
    if !args.models.is_empty() {
        spec.models = args.models.clone();
    }
    if spec.models.is_empty() {
        bail!("no models: give --model NAME:TPM:RPM or --config with the region");
    }
    for (_, limits) in &mut spec.models {
        if args.burst_tokens.is_some() {
            limits.burst_tokens = args.burst_tokens;
        }
    }
    let s = &mut spec.settings;
    s.ms_per_1k_tokens = args.ms_per_1k_tokens.unwrap_or(s.ms_per_1k_tokens);
    s.base_latency_ms = args.base_latency_ms.unwrap_or(s.base_latency_ms);
    s.failure_rate = args.failure_rate.unwrap_or(s.failure_rate);
    s.completion_min_fraction = args.completion_min_fraction.unwrap_or(s.completion_min_fraction);
    s.foreign_tokens_per_minute = args
        .foreign_tokens_per_minute
        .unwrap_or(s.foreign_tokens_per_minute);
    s.capacity = args.capacity.unwrap_or(s.capacity);
    s.start_empty |= args.start_empty;
    s.seed = args.seed.unwrap_or(s.seed);
    if !(0.0..=1.0).contains(&s.failure_rate) || !(0.0..=1.0).contains(&s.completion_min_fraction) {
        bail!("--failure-rate and --completion-min-fraction must be within 0 and 1");
    }
    if s.capacity == 0 {
        bail!("--capacity must be at least 1");
    }
    Ok(spec)
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let telemetry =
        telemetry::init_with_otlp("region-sim", args.otlp_endpoint.as_deref()).map_err(anyhow::Error::msg)?;
    let spec = spec(&args)?;
    let region = spec.region.clone();
    let tls = match (&args.tls_cert, &args.tls_key) {
        (Some(cert), Some(key)) => {
            dispatcher::tls::install_provider();
            let config = config::ServerTlsConfig {
                cert_file: cert.clone(),
                key_file: key.clone(),
                client_ca_file: args.tls_client_ca.clone(),
                client_auth: if args.tls_client_ca.is_some() {
                    config::ClientAuth::Required
                } else {
                    config::ClientAuth::Off
                },
            };
            let tls = dispatcher::tls::server::ServerTls::new(&config).map_err(anyhow::Error::msg)?;
            Some(tls.acceptor)
        }
        _ => None,
    };
    if !args.faulty.is_empty() {
        tracing::warn!(faults = ?args.faulty, "breaching the AgentCluster contract on purpose (--faulty)");
    }
    let faults = Faults::new(&args.faulty);
    let handle = if args.openai {
        let settings = sim::OpenAiSettings {
            dialect: args.dialect,
            api_key: api_key(&args)?,
        };
        if settings.api_key.is_none() {
            tracing::warn!("no API key set (--api-key-file, $REGION_SIM_API_KEY): any caller is served");
        }
        sim::spawn_openai(spec, args.listen, tls, faults, settings).await
    } else {
        sim::spawn_faulty(spec, args.listen, tls, faults).await
    }
    .with_context(|| format!("binding {}", args.listen))?;
    let api = match args.openai {
        true => format!(" (OpenAI API, {} dialect)", args.dialect.as_str()),
        false => String::new(),
    };
    println!("region-sim {region}{api} listening on {}", handle.addr);
    std::io::stdout().flush()?;
    wait_for_signal().await;
    handle.stop().await;
    telemetry.shutdown().await;
    Ok(())
}

async fn wait_for_signal() {
    #[cfg(unix)]
    {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .expect("installing the SIGTERM handler");
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    let _ = tokio::signal::ctrl_c().await;
}
