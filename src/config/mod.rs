//! Configuration: `dispatcher.toml` (server, routing, models, request limits)
//! plus one file per region in `regions/`. Read → parse(&str) → validate into
//! the typed values below; every error names the file, the key and the problem.

mod ctx;
mod diff;
mod load;
mod raw;
mod redis_tls;
mod tls;
mod validate;
mod validate_cache;
mod validate_capacity;
mod validate_cluster;
mod validate_jobs;
mod validate_openai_door;
mod validate_openai_region;
mod validate_policy;
mod validate_region;
mod validate_routes;
pub mod watch;

use std::fmt;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use crate::core::{
    BreakerConfig, ModelSpec, RegionSpec, RouterSpec, StrategyKind, StrategyParams, TenantSpec,
};

pub use ctx::MAX_NAME_LEN;
pub use diff::{Change, ChangeKind, changes, region_changes};
pub use load::{load, load_regions, parse_dispatcher, parse_region};
pub use redis_tls::RedisTls;
pub use tls::{ClientAuth, RegionTls, ServerTlsConfig, exposure_problems};
pub use validate::parse_key_hash as validate_key_hash;
pub use validate_openai_region::{DEFAULT_AZURE_API_VERSION, OpenAiRegion};

/// A configuration problem, with where it is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    pub file: PathBuf,
    /// Dotted path of the offending key (`models[1].tokens_per_minute`);
    /// empty when the problem is the file as a whole.
    pub key: String,
    pub problem: String,
}

impl ConfigError {
    pub fn new(file: impl Into<PathBuf>, key: impl Into<String>, problem: impl Into<String>) -> Self {
        Self {
            file: file.into(),
            key: key.into(),
            problem: problem.into(),
        }
    }
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.key.is_empty() {
            write!(f, "{}: {}", self.file.display(), self.problem)
        } else {
            write!(f, "{}: {}: {}", self.file.display(), self.key, self.problem)
        }
    }
}

impl std::error::Error for ConfigError {}

/// Several problems at once (every bad region file, not just the first).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigErrors(pub Vec<ConfigError>);

impl fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, e) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str("\n")?;
            }
            write!(f, "{e}")?;
        }
        Ok(())
    }
}

impl std::error::Error for ConfigErrors {}

impl From<ConfigError> for ConfigErrors {
    fn from(e: ConfigError) -> Self {
        Self(vec![e])
    }
}

/// The whole validated configuration.
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    /// The dispatcher.toml it came from.
    pub path: PathBuf,
    pub server: ServerConfig,
    pub routing: RoutingConfig,
    pub limits: RequestLimits,
    pub models: Vec<ModelSpec>,
    pub auth: AuthConfig,
    pub tenants: Vec<TenantConfig>,
    /// SHA-256 of the admin token; `None`: the Admin API is open.
    pub admin_token: Option<[u8; 32]>,
    /// `admin.allow_open_on_network`: an Admin API without a token may be
    /// served on a non-loopback address.
    pub admin_open_on_network: bool,
    pub telemetry: TelemetryConfig,
    /// `[cluster]`: quota shared with other replicas through Redis; `None`:
    /// one process on its own (the default).
    pub cluster: Option<ClusterConfig>,
    /// `[jobs]`: SubmitJob and its store.
    pub jobs: JobsConfig,
    /// `[cache]`: the response cache.
    pub cache: CacheConfig,
    pub regions: Vec<RegionConfig>,
    /// `[[rollouts]]` and `[[fallbacks]]`.
    pub policy: PolicyConfig,
    /// `[pricing]` and each model's `price`.
    pub pricing: Pricing,
    /// `[openai]`: the OpenAI-compatible front door.
    pub openai: OpenAiDoorConfig,
}

/// `[openai]`, checked: where the OpenAI-compatible front door listens
/// (plain HTTP/1.1; `None`: not served).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct OpenAiDoorConfig {
    pub listen: Option<SocketAddr>,
}

/// The currency and each priced model's price (a region file may override
/// a model's price: `RegionConfig::prices`).
#[derive(Debug, Clone, PartialEq)]
pub struct Pricing {
    pub currency: String,
    pub models: Vec<(String, crate::core::Price)>,
}

/// Routing policy across models, checked.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct PolicyConfig {
    pub rollouts: Vec<crate::core::RolloutSpec>,
    pub fallbacks: Vec<crate::core::FallbackSpec>,
    /// `[[routes]]` (`config/validate_routes.rs`).
    pub routes: Vec<crate::core::RouteSpec>,
}

/// `[cache]`, checked (docs/CACHE.md).
#[derive(Debug, Clone, PartialEq)]
pub struct CacheConfig {
    /// false: requests asking for the cache are served as if they did not.
    pub enabled: bool,
    /// The longest TTL a request may ask for.
    pub max_ttl: std::time::Duration,
    pub limits: crate::core::CacheLimits,
    /// The longest `cache.scope` accepted.
    pub max_scope_bytes: usize,
    /// With `[cluster]`: entries are shared with the other replicas
    /// through Redis.
    pub shared: bool,
}

/// `[jobs]`, checked.
#[derive(Debug, Clone, PartialEq)]
pub struct JobsConfig {
    /// false: the Jobs service answers UNAVAILABLE and nothing is stored.
    pub enabled: bool,
    /// The embedded store's directory (jobs in no Redis); resolved against
    /// dispatcher.toml's directory.
    pub data_dir: PathBuf,
    /// `[jobs] redis_url` or `redis_sentinels`: jobs in their own Redis
    /// (one with an AOF), whether or not `[cluster]` is set. `None`: in
    /// `[cluster]`'s Redis with `[cluster]`, else in the embedded store.
    pub redis: Option<RedisTarget>,
    /// Every call to `redis` gives up after this long.
    pub redis_timeout: std::time::Duration,
    /// `redis_ca_file` and the client certificate, for a `rediss://` URL.
    pub redis_tls: Option<RedisTls>,
    /// How long a finished job (and its output) is kept.
    pub ttl: std::time::Duration,
    /// How long one run of a job may take, its wait for quota included.
    pub timeout: std::time::Duration,
    /// Jobs in Redis: a replica's hold on its jobs, renewed by heartbeat;
    /// another replica (or this one, restarted) takes them over once it
    /// lapses.
    pub lease: std::time::Duration,
    pub limits: crate::core::JobLimits,
    /// Jobs stored at most (all states), and their bytes.
    pub max_jobs: u64,
    pub max_store_bytes: u64,
    /// Output kept per job; a job producing more fails.
    pub max_output_bytes: u64,
}

/// Where a Redis is: one server, or the primary the Sentinels name.
#[derive(Debug, Clone, PartialEq)]
pub enum RedisTarget {
    Url(String),
    /// `redis_sentinels` and `master_name`: the primary is asked of the
    /// Sentinels at every new connection (after a failover, the promoted
    /// one); it is reached with the first Sentinel URL's user and password.
    Sentinel {
        sentinels: Vec<String>,
        master_name: String,
    },
    /// `redis_cluster`: seed nodes of a Redis Cluster; the crate learns the
    /// slots from them and routes each key to its shard.
    Cluster {
        nodes: Vec<String>,
    },
}

impl From<&str> for RedisTarget {
    fn from(url: &str) -> Self {
        Self::Url(url.to_string())
    }
}

impl From<&String> for RedisTarget {
    fn from(url: &String) -> Self {
        Self::Url(url.clone())
    }
}

/// `[cluster]`, checked.
#[derive(Debug, Clone, PartialEq)]
pub struct ClusterConfig {
    /// The Redis URL, empty when Sentinels are given (`redis`).
    pub redis_url: String,
    pub redis: RedisTarget,
    /// This replica's name in Redis; `None`: host, pid and a random suffix,
    /// chosen at start.
    pub replica_id: Option<String>,
    pub sharing: crate::core::SharingSettings,
    /// Every Redis call gives up after this long.
    pub redis_timeout: std::time::Duration,
    /// `redis_ca_file` and the client certificate, for a `rediss://` URL.
    pub redis_tls: Option<RedisTls>,
}

/// Traces and metrics.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TelemetryConfig {
    /// OTLP/gRPC collector (Jaeger all-in-one listens on :4317); `None`: no
    /// export, unless `OTEL_EXPORTER_OTLP_ENDPOINT` is set.
    pub otlp_endpoint: Option<String>,
    pub service_name: String,
    /// Prometheus `/metrics` on its own port; `None`: off.
    pub metrics_listen: Option<SocketAddr>,
}

/// Who may call: tenants by API key, and anonymous callers if allowed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuthConfig {
    pub allow_anonymous: bool,
    /// The tenant anonymous callers count as.
    pub anonymous_tenant: String,
    /// Anonymous callers may be served on a non-loopback address.
    pub allow_anonymous_on_network: bool,
}

/// A tenant, the SHA-256 hashes of its API keys, and the client
/// certificate names (SANs) that also authenticate as it.
#[derive(Debug, Clone, PartialEq)]
pub struct TenantConfig {
    pub spec: TenantSpec,
    pub key_hashes: Vec<[u8; 32]>,
    pub identities: Vec<String>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct ServerConfig {
    pub listen: SocketAddr,
    /// Resolved against the directory of dispatcher.toml.
    pub regions_dir: PathBuf,
    /// Regions tried per request, the first included.
    pub max_attempts: u32,
    /// Applies when the caller sets no deadline.
    pub default_timeout: Duration,
    /// How long in-flight work may take to finish on shutdown.
    pub shutdown_grace: Duration,
    /// How long the reply to a request_id is remembered.
    pub idempotency_window: Duration,
    /// How many request_ids are remembered at most.
    pub idempotency_capacity: usize,
    /// What one client connection may hold, and for how long.
    pub connections: ConnectionLimits,
    /// The Admin API on its own listener (and not on `listen`).
    pub admin_listen: Option<SocketAddr>,
    /// `[server.tls]`; `None`: plaintext.
    pub tls: Option<ServerTlsConfig>,
}

/// Bounds on client connections, so idle or silent ones cannot use up the
/// process's file descriptors. Fixed at start (a reload reports a change as
/// needing a restart).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConnectionLimits {
    /// Open gRPC connections at most. When all are taken, the oldest
    /// connection that has not authenticated gives its slot to a new one;
    /// only when all have, new ones wait in the listen backlog.
    pub max_connections: usize,
    /// Open connections from one source address at most; `None`: no cap.
    pub max_connections_per_peer: Option<usize>,
    /// A new connection must finish its TLS handshake and send the HTTP/2
    /// preface (gRPC), or a request's headers (metrics), within this.
    pub handshake_timeout: Duration,
    /// A request's body must have arrived in full within this of its
    /// headers, else it ends DEADLINE_EXCEEDED (and a connection that has
    /// not authenticated is closed).
    pub body_timeout: Duration,
    /// A gRPC connection with no request in progress for this long is closed.
    pub idle_timeout: Duration,
    /// HTTP/2 PINGs at this interval; a peer that does not answer within
    /// `keepalive_timeout` is dropped (a dead peer holding requests open).
    pub keepalive_interval: Duration,
    pub keepalive_timeout: Duration,
}

impl Default for ConnectionLimits {
    fn default() -> Self {
        Self {
            max_connections: 1024,
            max_connections_per_peer: None,
            handshake_timeout: Duration::from_secs(10),
            body_timeout: Duration::from_secs(5),
            idle_timeout: Duration::from_secs(300),
            keepalive_interval: Duration::from_secs(30),
            keepalive_timeout: Duration::from_secs(10),
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct RoutingConfig {
    pub strategy: StrategyKind,
    pub params: StrategyParams,
    pub seed: u64,
    /// How long a request may wait for quota before RESOURCE_EXHAUSTED.
    pub max_queue_wait: Duration,
    /// How many requests may wait for quota at once.
    pub max_queued: u32,
    pub breaker: BreakerConfig,
    pub retry_budget: RetryBudgetConfig,
    /// `[routing.overload]`: when a model's queue stands, newcomers are
    /// refused at once (`None`: `enabled = false`, the plain queue).
    pub overload: Option<crate::core::OverloadSettings>,
}

/// `[routing.retry_budget]`: failover retries are at most `ratio` of recent
/// requests plus `min_per_second`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RetryBudgetConfig {
    pub ratio: f64,
    pub min_per_second: f64,
    pub window: Duration,
}

impl Default for RetryBudgetConfig {
    fn default() -> Self {
        Self {
            ratio: 0.2,
            min_per_second: 5.0,
            window: Duration::from_secs(10),
        }
    }
}

/// Bounds on what a client may send.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RequestLimits {
    pub max_payload_bytes: usize,
    pub max_labels: usize,
    pub max_label_bytes: usize,
    pub max_request_id_bytes: usize,
}

impl Default for RequestLimits {
    fn default() -> Self {
        Self {
            max_payload_bytes: 1 << 20,
            max_labels: 32,
            max_label_bytes: 256,
            max_request_id_bytes: 128,
        }
    }
}

/// One region file, validated.
#[derive(Debug, Clone, PartialEq)]
pub struct RegionConfig {
    pub file: PathBuf,
    pub spec: RegionSpec,
    /// The cluster's gRPC address; `None` with `simulate`: started in-process.
    pub endpoint: Option<String>,
    pub health: HealthConfig,
    pub simulate: Option<SimulateConfig>,
    /// `[tls]` of an `https://` endpoint (`Some` for every one).
    pub tls: Option<RegionTls>,
    /// `[[capacity]]`: rules on this region's pressure.
    pub capacity: Vec<crate::core::CapacityRuleSpec>,
    /// This region's own prices of its models (`[[models]] price`).
    pub prices: Vec<(String, crate::core::Price)>,
    /// `kind = "openai"`: an OpenAI-compatible provider, not an
    /// AgentCluster (`None`).
    pub openai: Option<OpenAiRegion>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HealthConfig {
    pub interval: Duration,
    pub timeout: Duration,
    pub unhealthy_threshold: u32,
    pub healthy_threshold: u32,
}

impl Default for HealthConfig {
    fn default() -> Self {
        Self {
            interval: Duration::from_secs(5),
            timeout: Duration::from_secs(1),
            unhealthy_threshold: 3,
            healthy_threshold: 2,
        }
    }
}

/// `[simulate]`: how a simulated cluster behaves.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SimulateConfig {
    pub ms_per_1k_tokens: f64,
    pub base_latency_ms: f64,
    pub failure_rate: f64,
    /// Completion tokens are drawn uniformly from
    /// [fraction × max_output_tokens, max_output_tokens].
    pub completion_min_fraction: f64,
    pub seed: u64,
    /// Another consumer of the same provider account, in tokens a minute.
    pub foreign_tokens_per_minute: u64,
    /// Requests the cluster runs at once; more wait in its queue.
    pub capacity: u32,
    /// The provider's buckets start empty (a key somebody just used), not
    /// full.
    pub start_empty: bool,
}

impl Default for SimulateConfig {
    fn default() -> Self {
        Self {
            ms_per_1k_tokens: 50.0,
            base_latency_ms: 2.0,
            failure_rate: 0.0,
            completion_min_fraction: 0.2,
            seed: 1,
            foreign_tokens_per_minute: 0,
            capacity: 1024,
            start_empty: false,
        }
    }
}

impl Config {
    pub fn router_spec(&self) -> RouterSpec {
        RouterSpec {
            models: self.models.clone(),
            regions: self.regions.iter().map(|r| r.spec.clone()).collect(),
            strategy: self.routing.strategy,
            params: self.routing.params,
            seed: self.routing.seed,
            breaker: self.routing.breaker,
            sharing: self.cluster.as_ref().map(|c| c.sharing),
        }
    }

    /// Every region's capacity rules, in region order.
    pub fn capacity_rules(&self) -> Vec<crate::core::CapacityRuleSpec> {
        self.regions
            .iter()
            .flat_map(|r| r.capacity.iter().cloned())
            .collect()
    }

    pub fn tenant_specs(&self) -> Vec<TenantSpec> {
        self.tenants.iter().map(|t| t.spec.clone()).collect()
    }

    /// Every price: the models', and the regions' own.
    pub fn prices(&self) -> crate::core::Prices {
        crate::core::Prices::new(
            &self.pricing.currency,
            self.pricing.models.iter().cloned(),
            self.regions
                .iter()
                .flat_map(|r| r.prices.iter().map(|(m, p)| (r.spec.name.clone(), m.clone(), *p))),
        )
    }

    pub fn region(&self, name: &str) -> Option<&RegionConfig> {
        self.regions.iter().find(|r| r.spec.name == name)
    }
}

/// What `ReloadConfig` found and did.
#[derive(Debug, Clone, PartialEq)]
pub struct Reload {
    pub dry_run: bool,
    pub applied: bool,
    pub changes: Vec<Change>,
    pub errors: Vec<ConfigError>,
    pub needs_restart: Vec<String>,
}
