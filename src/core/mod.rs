//! The pure core: quota buckets, load state, strategies and the routing
//! decision. No I/O, no async runtime, no clock: time and randomness come in
//! as arguments, so every behaviour here is deterministic and testable on a
//! virtual clock.

pub mod breaker;
pub mod cache_key;
pub mod cache_store;
#[cfg(test)]
mod cache_store_tests;
mod candidates;
pub mod capacity;
pub mod central;
pub mod cost;
pub mod digits;
pub mod fair;
pub mod fallback;
mod in_flight;
pub mod job;
pub mod load;
pub mod model;
pub mod model_quota;
pub mod overload;
#[cfg(test)]
mod overload_tests;
pub mod queue;
pub mod quota;
pub mod quota_shortfall;
#[cfg(test)]
mod recovery_tests;
pub mod region;
pub mod rollout;
pub mod route;
pub mod router;
#[cfg(test)]
mod router_tests;
pub mod scheduler;
pub mod shared_quota;
#[cfg(test)]
mod shared_quota_tests;
#[cfg(test)]
mod spread_tests;
pub mod strategy;
pub mod tenant;

pub use breaker::{
    BreakerConfig, Circuit, CircuitBreaker, CircuitState, HealthTracker, RetryBudget, Transition,
};
pub use cache_key::{CacheKey, KeyFacts, routing_version, scope_tag};
pub use cache_store::{Bounds, CacheLimits, CacheStore, Lookup, NotStored, Purge, Removal, Removed};
pub use capacity::{
    CapacityAction, CapacityEvent, CapacityEventKind, CapacityRuleSpec, CapacityRuleView, CapacityRules,
    CapacitySignal, RegionPressure,
};
pub use central::{CentralBucket, CentralLimits, SyncCall, SyncGrant};
pub use cost::{Price, Prices, Usage as CostUsage};
pub use fair::FairQueue;
pub use fallback::{FallbackSpec, Plan, Trigger};
pub use job::{JobBacklog, JobLease, JobLimits, JobPhase, JobRefusal, LeaseRefusal, Recovery};
pub use load::{LoadState, Outcome, ReportedLoad};
pub use model::{ModelSpec, TokenEstimate};
pub use model_quota::{Accounting, HintOutcome, Hold, ModelLimits, ModelQuota, ProviderHint, Settlement};
pub use overload::{OverloadSettings, QueueState};
pub use queue::{Discipline, Fifo, WaitQueue, Waiter};
pub use quota::{QuotaBucket, QuotaError, Shortfall};
pub use region::{Exclusion, RegionSpec, RegionState};
pub use rollout::{RolloutError, RolloutPick, RolloutSpec, Rollouts};
pub use route::{CandidateFacts, RouteAsk, RouteChoice, RouteRule, RouteSpec, Verdict};
pub use router::{
    CandidateReport, Completion, Reservation, RouteError, RoutePreview, RouteRequest, Router, RouterSpec,
    Settled, Supply, SyncItem, WaitingByQuota,
};
pub use scheduler::{Released, Scheduler, Submission, SubmitError, Submitted};
pub use shared_quota::{SharedQuota, SharingMode, SharingSettings, SharingTotals, SharingView, Waiting};
pub use strategy::{StrategyKind, StrategyParams, WeightedLoadParams};
pub use tenant::{
    BudgetPeriod, Day, TenantHold, TenantRefusal, TenantReport, TenantSpec, TenantTotals, TenantUsage,
    Tenants, Weights,
};
