//! Plain-data views of the dispatcher's state, for the readers that format
//! it for people and scrapers (Admin, metrics, health). The quota desk takes
//! a view under its lock in one pass; the readers format it without any
//! lock. Depends on nothing but the core's plain types, so the readers do
//! not depend on the engine.

use std::time::{Duration, Instant};

use crate::core::{CircuitState, ProviderHint, TenantReport};

/// Everything operators see, as of `at`.
#[derive(Debug, Clone)]
pub struct EngineView {
    pub at: Instant,
    pub regions: Vec<RegionView>,
    /// Requests waiting for quota, per model, in config order, and how long
    /// the longest-waiting of them has waited.
    pub queued: Vec<(String, usize, std::time::Duration)>,
    /// Each model's queue state and the newcomers it refused early, in config order.
    pub overload: Vec<(String, crate::core::QueueState, u64)>,
    pub tenants: Vec<TenantView>,
}

#[derive(Debug, Clone)]
pub struct RegionView {
    pub name: String,
    pub endpoint: String,
    pub weight: f64,
    pub configured_weight: f64,
    pub weight_override: Option<f64>,
    pub drained: bool,
    pub healthy: bool,
    pub in_flight: u32,
    pub max_concurrent: u32,
    pub utilization: f64,
    pub latency_ms_per_1k: Option<f64>,
    pub error_rate: f64,
    pub completed: u64,
    pub failed: u64,
    pub circuit: CircuitState,
    pub models: Vec<QuotaView>,
}

/// One region-model's quota.
#[derive(Debug, Clone)]
pub struct QuotaView {
    pub model: String,
    pub accounting: &'static str,
    pub tokens_per_minute: u64,
    pub requests_per_minute: u64,
    pub burst_tokens: u64,
    pub burst_requests: u64,
    pub tokens_available: i64,
    pub requests_available: i64,
    pub tokens_reserved: u64,
    pub requests_in_flight: usize,
    pub tokens_full_in: Duration,
    /// The provider's last hint and how long ago it came.
    pub last_hint: Option<(ProviderHint, Duration)>,
    /// The reset the last provider refusal named, while it lasts.
    pub provider_blocked_for: Option<Duration>,
    /// Requests waiting for this model (any region).
    pub queued: usize,
    /// Whether that queue absorbs or sheds, and how many it refused early.
    pub queue_state: crate::core::QueueState,
    pub refused_early: u64,
    /// Quota shared with other replicas (`[cluster]`): this replica's part.
    pub sharing: Option<crate::core::SharingView>,
}

#[derive(Debug, Clone)]
pub struct TenantView {
    pub report: TenantReport,
    /// Its requests waiting for quota.
    pub queued: usize,
}
