//! The files as written: serde types that accept what TOML can say and refuse
//! unknown keys (a typo is an error, not a silently ignored setting).
//! `validate` turns them into checked values.

use serde::Deserialize;

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawDispatcher {
    #[serde(default)]
    pub server: RawServer,
    #[serde(default)]
    pub routing: RawRouting,
    #[serde(default)]
    pub limits: RawLimits,
    #[serde(default)]
    pub models: Vec<RawModel>,
    #[serde(default)]
    pub auth: RawAuth,
    #[serde(default)]
    pub tenants: Vec<RawTenant>,
    #[serde(default)]
    pub admin: RawAdmin,
    #[serde(default)]
    pub telemetry: RawTelemetry,
    pub cluster: Option<RawCluster>,
    #[serde(default)]
    pub jobs: RawJobs,
    #[serde(default)]
    pub cache: RawCache,
    #[serde(default)]
    pub rollouts: Vec<RawRollout>,
    #[serde(default)]
    pub fallbacks: Vec<RawFallback>,
    #[serde(default)]
    pub routes: Vec<RawRoute>,
    #[serde(default)]
    pub pricing: RawPricing,
    #[serde(default)]
    pub openai: RawOpenAiDoor,
}

/// `[openai]`: the OpenAI-compatible front door (docs/OPENAI.md).
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawOpenAiDoor {
    pub listen: Option<String>,
    pub allow_plaintext_on_network: Option<bool>,
}

/// `[pricing]`: the one currency every price and cost budget is in.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawPricing {
    pub currency: Option<String>,
}

/// `price = { input = 2.5, output = 10, cached_input = 1.25 }`: per million
/// tokens, in the configured currency.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawPrice {
    pub input: Option<f64>,
    pub output: Option<f64>,
    pub cached_input: Option<f64>,
}

/// `[[rollouts]]`: a model alias split across target models by weight.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawRollout {
    pub alias: String,
    pub session_label: Option<String>,
    #[serde(default)]
    pub targets: Vec<RawRolloutTarget>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawRolloutTarget {
    pub model: String,
    pub weight: f64,
}

/// `[[routes]]`: an alias choosing its model per request among candidates.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawRoute {
    pub name: String,
    pub candidates: Vec<String>,
    #[serde(default)]
    pub rules: Vec<RawRouteRule>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawRouteRule {
    pub labels: std::collections::BTreeMap<String, String>,
    #[serde(rename = "use")]
    pub use_: Vec<String>,
}

/// `[[fallbacks]]`: a model's fallback chain.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawFallback {
    pub model: String,
    #[serde(default)]
    pub then: Vec<String>,
    pub on: Option<Vec<String>>,
    pub first_byte_timeout: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawCluster {
    pub redis_url: Option<String>,
    pub redis_sentinels: Option<Vec<String>>,
    pub master_name: Option<String>,
    pub redis_cluster: Option<Vec<String>>,
    pub replica_id: Option<String>,
    pub expected_replicas: Option<u32>,
    pub chunk_ttl: Option<String>,
    pub sync_interval: Option<String>,
    pub redis_timeout: Option<String>,
    pub unreachable_after: Option<String>,
    pub redis_ca_file: Option<String>,
    pub redis_client_cert_file: Option<String>,
    pub redis_client_key_file: Option<String>,
}

/// `[cache]`: the response cache (docs/CACHE.md).
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawCache {
    pub enabled: Option<bool>,
    pub max_ttl: Option<String>,
    pub max_entries: Option<usize>,
    pub max_bytes: Option<u64>,
    pub max_entries_per_tenant: Option<usize>,
    pub max_bytes_per_tenant: Option<u64>,
    pub max_entry_bytes: Option<u64>,
    pub max_scope_bytes: Option<usize>,
    pub shared: Option<bool>,
}

/// `[jobs]`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawJobs {
    pub enabled: Option<bool>,
    pub data_dir: Option<String>,
    pub ttl: Option<String>,
    pub timeout: Option<String>,
    pub lease: Option<String>,
    pub max_held_per_tenant: Option<usize>,
    pub max_running_per_tenant: Option<usize>,
    pub max_running: Option<usize>,
    pub max_jobs: Option<u64>,
    pub max_store_bytes: Option<u64>,
    pub max_output_bytes: Option<u64>,
    pub redis_url: Option<String>,
    pub redis_sentinels: Option<Vec<String>>,
    pub master_name: Option<String>,
    pub redis_timeout: Option<String>,
    pub redis_ca_file: Option<String>,
    pub redis_client_cert_file: Option<String>,
    pub redis_client_key_file: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawAdmin {
    pub token: Option<String>,
    pub allow_open_on_network: Option<bool>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawTelemetry {
    pub otlp_endpoint: Option<String>,
    pub service_name: Option<String>,
    pub metrics_listen: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawAuth {
    pub allow_anonymous: Option<bool>,
    pub anonymous_tenant: Option<String>,
    pub allow_anonymous_on_network: Option<bool>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawTenant {
    pub name: String,
    pub weight: Option<f64>,
    pub requests_per_second: Option<u32>,
    pub tokens_per_minute: Option<u64>,
    pub max_concurrent: Option<u32>,
    pub daily_token_budget: Option<u64>,
    pub daily_cost_budget: Option<f64>,
    pub monthly_cost_budget: Option<f64>,
    pub cost_budget_warn_at: Option<f64>,
    pub models: Option<Vec<String>>,
    pub max_queued: Option<u32>,
    #[serde(default)]
    pub keys: Vec<String>,
    /// Client certificate names (SANs) that authenticate as this tenant.
    #[serde(default)]
    pub identities: Vec<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawServer {
    pub listen: Option<String>,
    pub regions_dir: Option<String>,
    pub max_attempts: Option<u32>,
    pub default_timeout: Option<String>,
    pub shutdown_grace: Option<String>,
    pub idempotency_window: Option<String>,
    pub idempotency_capacity: Option<u32>,
    pub max_connections: Option<u32>,
    pub max_connections_per_peer: Option<u32>,
    pub handshake_timeout: Option<String>,
    pub body_timeout: Option<String>,
    pub idle_timeout: Option<String>,
    pub keepalive_interval: Option<String>,
    pub keepalive_timeout: Option<String>,
    pub admin_listen: Option<String>,
    pub tls: Option<RawServerTls>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawServerTls {
    pub cert_file: Option<String>,
    pub key_file: Option<String>,
    pub client_ca_file: Option<String>,
    pub client_auth: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawRegionTls {
    pub ca_file: Option<String>,
    pub cert_file: Option<String>,
    pub key_file: Option<String>,
    pub server_name: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawRouting {
    pub strategy: Option<String>,
    pub seed: Option<u64>,
    pub max_queue_wait: Option<String>,
    pub max_queued: Option<u32>,
    pub load_half_life: Option<String>,
    #[serde(default)]
    pub weighted_load: RawWeightedLoad,
    #[serde(default)]
    pub breaker: RawBreaker,
    #[serde(default)]
    pub retry_budget: RawRetryBudget,
    #[serde(default)]
    pub overload: RawOverload,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawOverload {
    pub enabled: Option<bool>,
    pub target: Option<String>,
    pub interval: Option<String>,
    pub hold_share: Option<f64>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawBreaker {
    pub error_threshold: Option<f64>,
    pub min_requests: Option<u32>,
    pub window: Option<String>,
    pub consecutive_failures: Option<u32>,
    pub cool_down: Option<String>,
    pub half_open_trials: Option<u32>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawRetryBudget {
    pub ratio: Option<f64>,
    pub min_per_second: Option<f64>,
    pub window: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawWeightedLoad {
    pub headroom_exponent: Option<f64>,
    pub load_weight: Option<f64>,
    pub latency_ref: Option<String>,
    pub error_exponent: Option<f64>,
    pub locality_bonus: Option<f64>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawLimits {
    pub max_payload_bytes: Option<u64>,
    pub max_labels: Option<u32>,
    pub max_label_bytes: Option<u32>,
    pub max_request_id_bytes: Option<u32>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawModel {
    pub name: String,
    pub default_max_output_tokens: Option<u64>,
    pub chars_per_token: Option<f64>,
    pub max_request_tokens: Option<u64>,
    pub price: Option<RawPrice>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawRegion {
    pub name: Option<String>,
    pub endpoint: Option<String>,
    pub weight: Option<f64>,
    pub max_concurrent: Option<u32>,
    #[serde(default)]
    pub models: Vec<RawRegionModel>,
    #[serde(default)]
    pub health: RawHealth,
    pub simulate: Option<RawSimulate>,
    pub tls: Option<RawRegionTls>,
    #[serde(default)]
    pub capacity: Vec<RawCapacityRule>,
    /// `agent_cluster` (default) or `openai`, and an OpenAI-compatible
    /// region's settings (`validate_openai_region.rs`).
    pub kind: Option<String>,
    pub dialect: Option<String>,
    pub api_version: Option<String>,
    pub api_key_env: Option<String>,
    pub api_key_file: Option<String>,
    pub health_path: Option<String>,
}

/// `[[capacity]]` in a region file: a capacity rule (`core::capacity`).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawCapacityRule {
    pub model: Option<String>,
    pub signal: Option<String>,
    pub enter: Option<f64>,
    pub exit: Option<f64>,
    #[serde(rename = "for")]
    pub duration: Option<String>,
    pub cool_down: Option<String>,
    pub action: Option<String>,
    pub weight_factor: Option<f64>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawRegionModel {
    pub name: String,
    pub tokens_per_minute: u64,
    pub requests_per_minute: u64,
    pub burst_tokens: Option<u64>,
    pub burst_requests: Option<u64>,
    pub accounting: Option<String>,
    /// This region's price of the model, instead of dispatcher.toml's.
    pub price: Option<RawPrice>,
    /// An OpenAI-compatible region's name for the model (Azure: the
    /// deployment); the model's own name when absent.
    pub provider_model: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawHealth {
    pub interval: Option<String>,
    pub timeout: Option<String>,
    pub unhealthy_threshold: Option<u32>,
    pub healthy_threshold: Option<u32>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawSimulate {
    pub ms_per_1k_tokens: Option<f64>,
    pub base_latency_ms: Option<f64>,
    pub failure_rate: Option<f64>,
    pub completion_min_fraction: Option<f64>,
    pub seed: Option<u64>,
    pub foreign_tokens_per_minute: Option<u64>,
    pub capacity: Option<u32>,
    pub start_empty: Option<bool>,
}
