//! `dispatcher`: loads the config, starts simulated regions where asked,
//! serves gRPC until SIGTERM or Ctrl-C, and applies edits to `regions/` live.

use std::io::Write;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context;
use clap::Parser;
use dispatcher::app::{self, Runtime};
use dispatcher::pb::dispatcher_server::DispatcherServer;
use dispatcher::server::DispatcherService;
use dispatcher::{config, server, telemetry};
use tokio_util::sync::CancellationToken;

/// Routes LLM agent work across regions by quota and load.
#[derive(Debug, Parser)]
#[command(version)]
struct Args {
    /// dispatcher.toml; region files are read from its `server.regions_dir`.
    #[arg(long, default_value = "dispatcher.toml")]
    config: PathBuf,
    /// Overrides `server.listen` (port 0 picks a free port).
    #[arg(long)]
    listen: Option<SocketAddr>,
    /// Overrides `telemetry.metrics_listen` (port 0 picks a free port).
    #[arg(long)]
    metrics_listen: Option<SocketAddr>,
    /// Overrides `openai.listen`, the OpenAI-compatible front door (port 0
    /// picks a free port).
    #[arg(long)]
    openai_listen: Option<SocketAddr>,
    /// Overrides `jobs.data_dir` (where the embedded job store is kept).
    #[arg(long)]
    data_dir: Option<PathBuf>,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Debug, clap::Subcommand)]
enum Command {
    /// Prints the `sha256:...` form of an API key read from standard input,
    /// for a tenant's `keys` in dispatcher.toml (the key itself is never stored).
    HashKey,
    /// Runs the AgentCluster contract against a live cluster and prints a
    /// table of checks (docs/CLUSTERS.md); exits 1 if one fails. Spends
    /// real quota, at most --max-tokens.
    CheckCluster(dispatcher::check::CheckArgs),
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    // ring, the one rustls crypto provider in this binary (DESIGN §13).
    dispatcher::tls::install_provider();
    if let Some(Command::HashKey) = args.command {
        let mut key = String::new();
        std::io::stdin().read_line(&mut key)?;
        println!(
            "{}",
            dispatcher::dispatch::hash_key(key.trim_end_matches(['\r', '\n']))
        );
        return Ok(());
    }
    if let Some(Command::CheckCluster(check)) = &args.command {
        match dispatcher::check::run(check).await {
            Ok(report) => {
                println!("{report}");
                std::process::exit(if report.failed() { 1 } else { 0 });
            }
            Err(e) => {
                eprintln!("dispatcher check-cluster: {e}");
                std::process::exit(2);
            }
        }
    }
    let config = match config::load(&args.config) {
        Ok(mut c) => {
            if let Some(d) = &args.data_dir {
                c.jobs.data_dir = d.clone();
            }
            c
        }
        Err(errors) => {
            eprintln!("dispatcher: invalid configuration:\n{errors}");
            std::process::exit(2);
        }
    };
    let telemetry = telemetry::init_with_otlp(
        &config.telemetry.service_name,
        config.telemetry.otlp_endpoint.as_deref(),
    )
    .map_err(anyhow::Error::msg)?;
    if config.auth.allow_anonymous {
        tracing::warn!(
            tenant = %config.auth.anonymous_tenant,
            "anonymous use is on (auth.allow_anonymous): callers without a key count as this tenant; turn it off outside demos"
        );
    }
    if config.admin_token.is_none() {
        tracing::warn!(
            "the Admin API is open (no admin.token): anyone who can reach the port can drain regions and reload the config"
        );
    }
    let listen = args.listen.unwrap_or(config.server.listen);
    let admin_listen = config.server.admin_listen;
    let mut exposed = config::exposure_problems(&config, listen, admin_listen);
    if let Some(door) = args.openai_listen.or(config.openai.listen) {
        // Anonymous callers on the OpenAI front door: the same rule.
        let both = config::exposure_problems(&config, door, Some(admin_listen.unwrap_or(listen)));
        let more: Vec<String> = both
            .into_iter()
            .filter(|p| p.contains("anonymous") && !exposed.contains(p))
            .collect();
        exposed.extend(more);
    }
    if !exposed.is_empty() {
        eprintln!("dispatcher: refusing to start:\n{}", exposed.join("\n"));
        std::process::exit(2);
    }
    let tls = match &config.server.tls {
        None => None,
        Some(t) => Some(
            dispatcher::tls::server::ServerTls::new(t)
                .map_err(|e| anyhow::anyhow!("server.tls in {}: {e}", args.config.display()))?,
        ),
    };
    let regions: Vec<String> = config.regions.iter().map(|r| r.spec.name.clone()).collect();
    let strategy = config.routing.strategy;
    let mut runtime = Runtime::start(config).await.map_err(anyhow::Error::msg)?;
    runtime.set_listen(listen);
    runtime.data_dir_overridden = args.data_dir.is_some();
    let engine = runtime.engine.clone();
    let stop = CancellationToken::new();
    let pump = engine.spawn_pump(stop.clone());
    let jobs = runtime.jobs.clone();
    if let Some(j) = &jobs {
        j.spawn(stop.clone());
    }
    let runtime = Arc::new(tokio::sync::Mutex::new(runtime));
    let watch = app::spawn_region_watch(runtime.clone(), stop.clone());

    let metrics_listen = args
        .metrics_listen
        .or(runtime.lock().await.config.telemetry.metrics_listen);
    let limits = runtime.lock().await.config.server.connections;
    if let Some(m) = metrics_listen {
        let view = {
            let engine = engine.clone();
            move || engine.view(dispatcher::clock::now())
        };
        let bound = dispatcher::metrics::serve(m, view, limits, stop.clone())
            .await
            .with_context(|| format!("binding the metrics listener {m}"))?;
        tracing::info!(addr = %bound, "serving Prometheus metrics at /metrics");
        println!("metrics listening on {bound}");
    }
    let openai_listen = args.openai_listen.or(runtime.lock().await.config.openai.listen);
    let openai = match openai_listen {
        None => None,
        Some(a) => {
            let l = tokio::net::TcpListener::bind(a)
                .await
                .with_context(|| format!("binding the OpenAI front door {a} (openai.listen)"))?;
            let bound = l.local_addr()?;
            tracing::info!(addr = %bound, "serving the OpenAI-compatible API (POST /v1/chat/completions, GET /v1/models)");
            println!("openai listening on {bound}");
            Some(tokio::spawn(dispatcher::openai_door::serve(
                l,
                engine.clone(),
                limits,
                stop.clone(),
            )))
        }
    };
    let admin_listener = match admin_listen {
        None => None,
        Some(a) => {
            let l = tokio::net::TcpListener::bind(a)
                .await
                .with_context(|| format!("binding the admin listener {a} (server.admin_listen)"))?;
            let bound = l.local_addr()?;
            tracing::info!(addr = %bound, "serving the Admin API on its own listener");
            println!("admin listening on {bound}");
            Some(l)
        }
    };
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .with_context(|| format!("binding {listen}"))?;
    let addr = listener.local_addr()?;
    let reload_certs = tls.as_ref().map(|t| t.spawn_reload(stop.clone()));
    tracing::info!(%addr, ?regions, %strategy, tls = tls.is_some(), "dispatcher serving");
    // Tests and scripts read the address from this line.
    println!("dispatcher listening on {addr}");
    std::io::stdout().flush()?;

    let (reporter, health) = tonic_health::server::health_reporter();
    runtime.lock().await.health.watch_panic(reporter.clone());
    if let Some(j) = &jobs {
        j.report_health(reporter.clone());
    }
    let grace = runtime.lock().await.config.server.shutdown_grace;
    let (begin_stop, stopping) = tokio::sync::oneshot::channel::<()>();
    let serve = server::serve(
        engine.clone(),
        jobs.clone(),
        Some(Arc::new(app::RuntimeReload(runtime.clone()))),
        server::Listeners {
            main: listener,
            admin: admin_listener,
            tls: tls.map(|t| t.acceptor),
        },
        limits,
        (reporter.clone(), health),
        async move {
            let _ = stopping.await;
        },
    );
    tokio::pin!(serve);
    let served = tokio::select! {
        served = &mut serve => served,
        _ = wait_for_signal() => {
            // Health first, so balancers stop sending; then refuse new work
            // (UNAVAILABLE) and let what is in flight finish, for at most the grace.
            tracing::info!(grace = ?grace, "shutting down: health NOT_SERVING, refusing new work, finishing what is in flight");
            reporter.set_not_serving::<DispatcherServer<DispatcherService>>().await;
            reporter.set_service_status("", tonic_health::ServingStatus::NotServing).await;
            engine.begin_shutdown();
            if let Some(j) = &jobs {
                // Queued jobs stay stored: they run after the next start,
                // or (Redis) on another replica, handed over now.
                j.begin_shutdown();
                j.hand_over().await;
            }
            // Keep answering (new work: UNAVAILABLE) until what is in flight
            // is done, then close the listener.
            let deadline = dispatcher::clock::tokio_now() + grace;
            let drained = tokio::time::timeout_at(deadline, engine.drained()).await.is_ok();
            if !drained {
                tracing::warn!(running = engine.running(), "shutdown grace ({grace:?}) over with work still in flight; stopping anyway");
            }
            let _ = begin_stop.send(());
            match tokio::time::timeout_at(deadline.max(dispatcher::clock::tokio_now() + std::time::Duration::from_millis(500)), &mut serve).await {
                Ok(served) => served,
                Err(_) => Ok(()),
            }
        }
    };
    served.map_err(|e| anyhow::anyhow!(e))?;
    stop.cancel();
    if let Some(door) = openai {
        let _ = door.await;
    }
    let _ = pump.await;
    let _ = watch.await;
    if let Some(task) = reload_certs {
        let _ = task.await;
    }
    {
        let mut runtime = runtime.lock().await;
        runtime.health.stop();
        std::mem::take(&mut runtime.sims).stop().await;
    }
    tracing::info!("stopped");
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
