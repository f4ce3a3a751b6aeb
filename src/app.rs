//! Wiring shared by the binary and the tests: the simulated regions a config
//! asks for, and the endpoints the engine forwards to.

use std::collections::HashMap;
use std::net::SocketAddr;

use crate::config::Config;
pub use crate::config::Reload;
use crate::sim::{self, SimHandle, SimSpec};

/// The in-process clusters of regions that have `[simulate]` and no endpoint.
#[derive(Debug, Default)]
pub struct SimulatedRegions {
    running: HashMap<String, (SimSpec, SimHandle)>,
}

impl SimulatedRegions {
    pub fn new() -> Self {
        Self::default()
    }

    /// Starts a simulated cluster for each region that needs one and stops
    /// the ones no longer needed. A region whose simulation settings changed
    /// keeps running with the old ones: its provider state is what an
    /// operator would expect to survive a quota edit.
    pub async fn sync(&mut self, config: &Config) -> std::io::Result<()> {
        let wanted: HashMap<&str, SimSpec> = config
            .regions
            .iter()
            .filter(|r| r.endpoint.is_none())
            .map(|r| (r.spec.name.as_str(), SimSpec::from_region(r)))
            .collect();
        let gone: Vec<String> = self
            .running
            .keys()
            .filter(|name| !wanted.contains_key(name.as_str()))
            .cloned()
            .collect();
        for name in gone {
            if let Some((_, handle)) = self.running.remove(&name) {
                handle.stop().await;
            }
        }
        for (name, spec) in wanted {
            if !self.running.contains_key(name) {
                let loopback: SocketAddr = ([127, 0, 0, 1], 0).into();
                let handle = sim::spawn(spec.clone(), loopback).await?;
                tracing::info!(region = name, addr = %handle.addr, "started simulated region");
                self.running.insert(name.to_string(), (spec, handle));
            }
        }
        Ok(())
    }

    /// Every region's endpoint: configured, or its simulation's address.
    pub fn endpoints(&self, config: &Config) -> Vec<(String, String)> {
        config
            .regions
            .iter()
            .filter_map(|r| {
                let endpoint = match &r.endpoint {
                    Some(e) => e.clone(),
                    None => self.running.get(&r.spec.name)?.1.endpoint(),
                };
                Some((r.spec.name.clone(), endpoint))
            })
            .collect()
    }

    pub async fn stop(self) {
        for (_, (_, handle)) in self.running {
            handle.stop().await;
        }
    }
}

/// What a running dispatcher is made of, and how it takes a new config: the
/// last good configuration, the simulated regions and the engine.
pub struct Runtime {
    pub config: Config,
    pub sims: SimulatedRegions,
    pub engine: std::sync::Arc<crate::dispatch::Engine>,
    pub health: crate::health::HealthChecks,
    /// `[jobs]`: the jobs desk and its store; `None` when off.
    pub jobs: Option<std::sync::Arc<crate::jobs::Jobs>>,
    /// `--data-dir` was given: a reload keeps it, whatever the file says.
    pub data_dir_overridden: bool,
    /// `[cluster]`: this replica's name in Redis and its sync task (stopped
    /// when the runtime is dropped).
    pub cluster: Option<(String, AbortOnDrop)>,
    /// The settings read at start-up that a reload cannot change (the
    /// listen address as dispatcher.toml gave it, telemetry).
    started: (std::net::SocketAddr, crate::config::TelemetryConfig, usize),
}

/// A task that stops with its owner.
pub struct AbortOnDrop(pub tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// How often the regions directory is checked for edits.
pub const WATCH_INTERVAL: std::time::Duration = std::time::Duration::from_millis(500);

impl Runtime {
    /// Starts the simulated regions and the engine for `config`.
    pub async fn start(config: Config) -> Result<Self, String> {
        let mut sims = SimulatedRegions::new();
        sims.sync(&config)
            .await
            .map_err(|e| format!("starting simulated regions: {e}"))?;
        let endpoints = sims.endpoints(&config);
        let engine = crate::dispatch::Engine::new(&config, &endpoints)?;
        let mut health = crate::health::HealthChecks::new(engine.clone());
        health.sync(&config, &endpoints).await;
        let cluster = match &config.cluster {
            Some(c) => {
                let replica = crate::cluster::replica_id(c);
                let task = crate::cluster::spawn(engine.clone(), c, replica.clone())?;
                let ids = crate::cluster::RedisIds::new(c.redis.clone(), c.redis_timeout)
                    .and_then(|ids| ids.with_tls(c.redis_tls.clone()))
                    .map_err(|e| format!("{}: {e}", crate::cluster::config_key(&c.redis)))?;
                engine.share_request_ids(std::sync::Arc::new(ids));
                if config.cache.shared {
                    let cache = crate::cluster::RedisCache::new(c.redis.clone(), c.redis_timeout)
                        .and_then(|cache| cache.with_tls(c.redis_tls.clone()))
                        .map_err(|e| format!("{}: {e}", crate::cluster::config_key(&c.redis)))?;
                    engine.cache().share(std::sync::Arc::new(cache));
                }
                tracing::info!(%replica, "sharing each provider's quota with the other replicas through Redis ([cluster])");
                Some((replica, AbortOnDrop(task)))
            }
            None => None,
        };
        let jobs = match config.jobs.enabled {
            false => None,
            true => {
                let j = &config.jobs;
                // The owner name in a shared store must be this process's
                // alone: the replica id, or a fresh one without [cluster].
                let owner = match (&cluster, &j.redis) {
                    (Some((replica, _)), _) => replica.clone(),
                    (None, Some(_)) => crate::cluster::fresh_replica_id(),
                    (None, None) => "local".to_string(),
                };
                let in_redis = |target: &crate::config::RedisTarget, tls: &Option<_>, timeout, key: &str| {
                    crate::cluster::RedisJobStore::new(
                        target.clone(),
                        timeout,
                        j.lease,
                        j.max_jobs,
                        j.max_store_bytes,
                    )
                    .and_then(|store| store.with_tls(Option::clone(tls)))
                    .map_err(|e| format!("{key}: {e}"))
                };
                let store: std::sync::Arc<dyn crate::jobs::JobStore> = match (&j.redis, &config.cluster) {
                    (Some(target), _) => {
                        let store = in_redis(target, &j.redis_tls, j.redis_timeout, "jobs.redis_url")?
                            .timeout_named("jobs.redis_timeout");
                        tracing::info!(%owner, lease = ?j.lease, "jobs kept in their own Redis ([jobs] redis_url or redis_sentinels)");
                        std::sync::Arc::new(store)
                    }
                    (None, Some(c)) => {
                        let store = in_redis(
                            &c.redis,
                            &c.redis_tls,
                            c.redis_timeout,
                            crate::cluster::config_key(&c.redis),
                        )?;
                        tracing::info!(%owner, lease = ?j.lease, "jobs kept in Redis ([cluster]): any replica serves any job");
                        std::sync::Arc::new(store)
                    }
                    (None, None) => {
                        let store =
                            crate::jobs::EmbeddedStore::open(&j.data_dir, j.max_jobs, j.max_store_bytes)?;
                        tracing::info!(dir = %j.data_dir.display(), "jobs kept in the embedded store");
                        std::sync::Arc::new(store)
                    }
                };
                Some(crate::jobs::Jobs::new(engine.clone(), store, owner, &config))
            }
        };
        Ok(Self {
            jobs,
            data_dir_overridden: false,
            cluster,
            started: (
                config.server.listen,
                config.telemetry.clone(),
                config.limits.max_payload_bytes,
            ),
            config,
            sims,
            engine,
            health,
        })
    }

    /// `--listen` given on the command line: a reload keeps it.
    pub fn set_listen(&mut self, listen: std::net::SocketAddr) {
        self.config.server.listen = listen;
    }

    /// Re-reads dispatcher.toml and every region file. With `dry_run`, or
    /// when anything is invalid, nothing changes.
    pub async fn reload_all(&mut self, dry_run: bool) -> Reload {
        let mut next = match crate::config::load(&self.config.path) {
            Ok(c) => c,
            Err(errors) => {
                return Reload {
                    dry_run,
                    applied: false,
                    changes: Vec::new(),
                    errors: errors.0,
                    needs_restart: Vec::new(),
                };
            }
        };
        let mut needs_restart = Vec::new();
        if next.server.listen != self.started.0 {
            needs_restart.push(format!(
                "server.listen: {} → {}",
                self.started.0, next.server.listen
            ));
        }
        if next.telemetry != self.started.1 {
            needs_restart.push("telemetry".into());
        }
        if next.limits.max_payload_bytes > self.started.2 {
            // Checked against the new limit at once, but the transport's
            // decode limit was set from the old one at start.
            needs_restart.push(format!(
                "limits.max_payload_bytes: raised from {} to {}; payloads whose message is over {} bytes are refused by the transport until a restart",
                self.started.2,
                next.limits.max_payload_bytes,
                crate::server::max_message_bytes(self.started.2)
            ));
        }
        if next.server.connections != self.config.server.connections {
            needs_restart.push(
                "server connection limits (max_connections, max_connections_per_peer, timeouts, keepalive)"
                    .into(),
            );
        }
        if next.server.tls != self.config.server.tls
            || next.server.admin_listen != self.config.server.admin_listen
        {
            // The certificate files' contents reload by themselves.
            needs_restart.push("server.tls or server.admin_listen (listener settings)".into());
        }
        if next.openai != self.config.openai {
            needs_restart.push("openai.listen (the OpenAI front door's listener)".into());
        }
        if self.data_dir_overridden {
            next.jobs.data_dir = self.config.jobs.data_dir.clone();
        }
        if next.jobs != self.config.jobs {
            needs_restart.push("jobs (the job store and its limits)".into());
        }
        if next.cluster != self.config.cluster {
            needs_restart.push("cluster (Redis and quota sharing settings)".into());
        }
        // What cannot change live keeps its running value.
        next.cluster = self.config.cluster.clone();
        next.jobs = self.config.jobs.clone();
        next.server.listen = self.config.server.listen;
        next.server.connections = self.config.server.connections;
        next.server.tls = self.config.server.tls.clone();
        next.server.admin_listen = self.config.server.admin_listen;
        // A reload cannot open what start-up would have refused to.
        let exposed = crate::config::exposure_problems(
            &next,
            self.config.server.listen,
            self.config.server.admin_listen,
        );
        if !exposed.is_empty() {
            return Reload {
                dry_run,
                applied: false,
                changes: Vec::new(),
                errors: exposed
                    .into_iter()
                    .map(|p| crate::config::ConfigError::new(&self.config.path, "", p))
                    .collect(),
                needs_restart,
            };
        }
        next.telemetry = self.config.telemetry.clone();
        let changes = crate::config::changes(&self.config, &next);
        if dry_run {
            return Reload {
                dry_run,
                applied: false,
                changes,
                errors: Vec::new(),
                needs_restart,
            };
        }
        match self.apply(next).await {
            Ok(_) => Reload {
                dry_run,
                applied: true,
                changes,
                errors: Vec::new(),
                needs_restart,
            },
            Err(errors) => Reload {
                dry_run,
                applied: false,
                changes,
                errors: errors.0,
                needs_restart,
            },
        }
    }

    /// Re-reads the region files and applies them if they are all valid; the
    /// last good config stays in force otherwise. Returns what changed.
    pub async fn reload_regions(
        &mut self,
    ) -> Result<Vec<crate::config::Change>, crate::config::ConfigErrors> {
        let regions = crate::config::load_regions(&self.config.server.regions_dir, &self.config.models)?;
        let mut next = self.config.clone();
        next.regions = regions;
        self.apply(next).await
    }

    /// Applies a validated configuration: simulations started or stopped,
    /// then the engine (all or nothing), then the health checks (started
    /// for added regions, stopped for removed ones, re-pointed at moved ones).
    pub async fn apply(
        &mut self,
        next: Config,
    ) -> Result<Vec<crate::config::Change>, crate::config::ConfigErrors> {
        let changes = crate::config::changes(&self.config, &next);
        if changes.is_empty() && next == self.config {
            return Ok(changes);
        }
        let fail = |problem: String| {
            crate::config::ConfigErrors::from(crate::config::ConfigError::new(
                &next.server.regions_dir,
                "",
                problem,
            ))
        };
        self.sims
            .sync(&next)
            .await
            .map_err(|e| fail(format!("starting simulated regions: {e}")))?;
        let endpoints = self.sims.endpoints(&next);
        self.engine.apply(&next, &endpoints).map_err(fail)?;
        self.health.sync(&next, &endpoints).await;
        if let Some(jobs) = &self.jobs {
            jobs.apply(&next);
        }
        self.config = next;
        Ok(changes)
    }
}

/// Polls the regions directory and applies valid edits live; logs refused
/// ones with file, key and problem, and each `*.toml` skipped as no file
/// (a directory, a symlink loop) once until it changes. Runs until
/// `cancel` fires.
pub fn spawn_region_watch(
    runtime: std::sync::Arc<tokio::sync::Mutex<Runtime>>,
    cancel: tokio_util::sync::CancellationToken,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let dir = runtime.lock().await.config.server.regions_dir.clone();
        // No fingerprint yet: the first look always re-reads the files. The
        // config was loaded before this task ran, and an edit made in
        // between would otherwise be taken as the starting point and never
        // applied. Re-reading unchanged files changes nothing.
        let mut last = None;
        // The last look refused the files: the next good one says so.
        let mut refused = false;
        let mut skips = crate::config::watch::SkipNotes::default();
        loop {
            tokio::select! {
                _ = cancel.cancelled() => return,
                _ = tokio::time::sleep(WATCH_INTERVAL) => {}
            }
            for (path, why) in skips.news(crate::config::watch::skipped(&dir)) {
                tracing::warn!(file = %path.display(), "skipping {}: it {why}", path.display());
            }
            let now = crate::config::watch::fingerprint(&dir).ok();
            if now == last {
                continue;
            }
            last = now;
            match runtime.lock().await.reload_regions().await {
                Ok(changes) => {
                    if refused && changes.is_empty() {
                        tracing::info!("region files valid again; they match the config in force");
                    } else if refused {
                        tracing::info!("region files valid again");
                    }
                    refused = false;
                    for c in changes {
                        tracing::info!(change = %c, "applied region config change");
                    }
                }
                Err(errors) => {
                    refused = true;
                    for e in errors.0 {
                        tracing::error!(
                            file = %e.file.display(),
                            "refused region config change: {e}; the last good config stays in force"
                        );
                    }
                }
            }
        }
    })
}

/// The runtime as the Admin API's narrow reload handle.
pub struct RuntimeReload(pub std::sync::Arc<tokio::sync::Mutex<Runtime>>);

impl crate::server::ReloadHandle for RuntimeReload {
    fn reload(
        &self,
        dry_run: bool,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = Reload> + Send + '_>> {
        Box::pin(async move { self.0.lock().await.reload_all(dry_run).await })
    }
}
