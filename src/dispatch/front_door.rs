//! The front door: who the caller is, what its tenant may do, and whether
//! its request is well formed, all read from ONE configuration snapshot per
//! request.
//!
//! Owner: `FrontDoor::current`, a `RwLock<Arc<Snapshot>>` held only to clone
//! or to swap the `Arc`. A reload builds the next snapshot whole and swaps
//! it in one step, so a request that took a snapshot sees every setting
//! (limits, keys, rates, attempts, waits) from the same version.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use parking_lot::RwLock;

use super::auth::{self, Auth};
use super::rates::TenantRates;
use super::validate;
use super::{DispatchError, Violation};
use crate::config::{Config, RequestLimits};
use crate::core::{ModelSpec, TokenEstimate};
use crate::pb;

/// Settings the request path reads on every request.
#[derive(Debug, Clone, PartialEq)]
pub struct Settings {
    pub limits: RequestLimits,
    pub max_attempts: u32,
    pub default_timeout: Duration,
    pub max_queue_wait: Duration,
    pub idempotency_capacity: usize,
}

impl Settings {
    fn from_config(c: &Config) -> Self {
        Self {
            limits: c.limits,
            max_attempts: c.server.max_attempts,
            default_timeout: c.server.default_timeout,
            max_queue_wait: c.routing.max_queue_wait,
            idempotency_capacity: c.server.idempotency_capacity,
        }
    }
}

/// One version of everything the front door decides with.
pub struct Snapshot {
    /// Counts reloads from 1: which version a request was decided with.
    pub version: u64,
    pub settings: Settings,
    auth: Auth,
    admin_token: Option<[u8; 32]>,
    rates: TenantRates,
    models: Vec<ModelSpec>,
    /// The models' names, shared (labels, keys): no copy per request.
    model_names: Vec<Arc<str>>,
    /// Per model (as `models`): served by an OpenAI-compatible region, so
    /// its payload must be a chat-completions body.
    chat_bodies: Vec<bool>,
    /// Configured region names, for `origin_region`.
    regions: Vec<String>,
    /// `[[fallbacks]]`: each model's chain.
    fallbacks: Vec<crate::core::FallbackSpec>,
    /// Each configured model's plan with its chain, and alone.
    plans: Vec<(String, Arc<crate::core::Plan>, Arc<crate::core::Plan>)>,
    /// Prices per model and region-model, and their currency (shared).
    pub prices: crate::core::Prices,
    pub currency: Arc<str>,
    /// `[cache]`.
    pub cache: crate::config::CacheConfig,
    /// `[[routes]]` by name (`route.rs`).
    routes: std::collections::HashMap<String, Arc<crate::core::RouteSpec>>,
    /// Each configured model's routing version (`core::routing_version`),
    /// part of its cache keys.
    model_versions: Vec<(Arc<str>, u64)>,
    /// The models and aliases each tenant may name (`catalog.rs`).
    pub(super) catalog: super::catalog::Catalog,
}

impl Snapshot {
    fn new(config: &Config, version: u64) -> Self {
        let prices = config.prices();
        Self {
            version,
            settings: Settings::from_config(config),
            auth: Auth::from_config(config),
            admin_token: config.admin_token,
            rates: TenantRates::from_config(config),
            models: config.models.clone(),
            chat_bodies: config
                .models
                .iter()
                .map(|m| {
                    config
                        .regions
                        .iter()
                        .any(|r| r.openai.is_some() && r.spec.models.iter().any(|(n, _)| *n == m.name))
                })
                .collect(),
            model_names: config.models.iter().map(|m| Arc::from(m.name.as_str())).collect(),
            regions: config.regions.iter().map(|r| r.spec.name.clone()).collect(),
            fallbacks: config.policy.fallbacks.clone(),
            plans: config
                .models
                .iter()
                .map(|m| {
                    let plan = |fallback| {
                        Arc::new(crate::core::Plan::for_model(
                            &config.policy.fallbacks,
                            &m.name,
                            fallback,
                        ))
                    };
                    (m.name.clone(), plan(true), plan(false))
                })
                .collect(),
            model_versions: config
                .models
                .iter()
                .map(|m| {
                    let v = crate::core::routing_version(
                        m,
                        &config.policy.fallbacks,
                        &config.policy.rollouts,
                        &prices.describe(&m.name),
                    );
                    (Arc::from(m.name.as_str()), v)
                })
                .collect(),
            catalog: super::catalog::Catalog::from_config(config),
            prices,
            currency: Arc::from(config.pricing.currency.as_str()),
            cache: config.cache.clone(),
            routes: config
                .policy
                .routes
                .iter()
                .map(|r| (r.name.clone(), Arc::new(r.clone())))
                .collect(),
        }
    }

    /// `model`'s routing version (0 for a model not configured, which no
    /// request reaches the cache with).
    pub fn model_version(&self, model: &str) -> u64 {
        self.model_versions
            .iter()
            .find(|(m, _)| &**m == model)
            .map_or(0, |(_, v)| *v)
    }

    /// The route `name` names, if any: no hashing at all when no route is
    /// configured, one probe otherwise.
    #[inline]
    pub fn route(&self, name: &str) -> Option<Arc<crate::core::RouteSpec>> {
        if self.routes.is_empty() {
            return None;
        }
        self.routes.get(name).cloned()
    }

    /// A configured model's name, shared.
    pub fn model_name(&self, model: &str) -> Option<Arc<str>> {
        self.model_names.iter().find(|m| &***m == model).cloned()
    }

    /// The models a request for `model` may be served by, in order. A
    /// configured model's plans are made once per snapshot, not per request.
    pub fn plan(&self, model: &str, allow_fallback: bool) -> Arc<crate::core::Plan> {
        match self.plans.iter().find(|(m, _, _)| m == model) {
            Some((_, chain, alone)) => if allow_fallback { chain } else { alone }.clone(),
            None => Arc::new(crate::core::Plan::for_model(
                &self.fallbacks,
                model,
                allow_fallback,
            )),
        }
    }

    /// Whether an OpenAI-compatible region serves `model` (its payload is a
    /// chat-completions body, its streams the provider's own events).
    pub fn served_by_openai(&self, model: &str) -> bool {
        self.models
            .iter()
            .position(|m| m.name == model)
            .is_some_and(|i| self.chat_bodies.get(i).copied().unwrap_or(false))
    }

    /// Whether `r` is too large for its model (its fields otherwise valid).
    pub fn too_large(&self, r: &pb::DispatchRequest) -> bool {
        self.models
            .iter()
            .position(|m| m.name == r.model)
            .is_some_and(|i| self.check_tokens(r, i).is_err())
    }

    /// The token checks and estimate of `r` for the model at `i`. A model
    /// an OpenAI-compatible region serves takes a chat-completions payload:
    /// one that is not is refused naming the field, and its messages and
    /// output bound stand in for counts the request leaves at 0.
    fn check_tokens(&self, r: &pb::DispatchRequest, i: usize) -> Result<TokenEstimate, DispatchError> {
        let model = &self.models[i];
        if !self.chat_bodies.get(i).copied().unwrap_or(false) {
            return validate::check_tokens(r, model).map_err(DispatchError::InvalidArgument);
        }
        let chat = crate::openai::chat::parse(&r.payload).map_err(|e| {
            DispatchError::InvalidArgument(vec![Violation::new(
                "payload",
                format!(
                    "not an OpenAI chat-completions body (model {} is served by an OpenAI-compatible region): {}: {}",
                    model.name,
                    crate::excerpt::truncate(&e.field, 128),
                    e.reason
                ),
            )])
        })?;
        let prompt = if r.prompt_tokens == 0 {
            chat.prompt_tokens
        } else {
            r.prompt_tokens
        };
        let max_output = match r.max_output_tokens {
            0 => chat.max_output_tokens.unwrap_or(0),
            n => n,
        };
        validate::check_counts(r.payload.len(), prompt, max_output, model)
            .map_err(DispatchError::InvalidArgument)
    }

    /// The tenant behind a caller's credentials (or none).
    pub fn authenticate(&self, caller: &auth::Caller) -> Result<Arc<str>, DispatchError> {
        self.auth
            .authenticate(caller)
            .map_err(|e| DispatchError::Unauthenticated(e.to_string()))
    }

    /// Whether an `authorization` header carries the admin token (always
    /// true when none is configured). Compared in constant time.
    pub fn admin_allowed(&self, authorization: Option<&str>) -> bool {
        match &self.admin_token {
            None => true,
            Some(expected) => auth::bearer_matches(authorization, expected),
        }
    }

    /// Checks a request's claimed tenant against the authenticated one.
    pub fn check_tenant_field(&self, claimed: &str, tenant: &str) -> Result<(), DispatchError> {
        // Length first: an oversized claim is a bad field, and is never quoted.
        if claimed.len() > validate::MAX_NAME_BYTES {
            return Err(DispatchError::InvalidArgument(vec![Violation::new(
                "tenant",
                format!("longer than {} bytes", validate::MAX_NAME_BYTES),
            )]));
        }
        if claimed.is_empty() || claimed == tenant {
            Ok(())
        } else {
            Err(DispatchError::PermissionDenied(format!(
                "the request names tenant {} but the credential is tenant {tenant:?}",
                crate::excerpt::excerpt(claimed)
            )))
        }
    }

    /// The tenant's requests-per-second limit (governor).
    pub fn check_rate(&self, tenant: &Arc<str>) -> Result<(), DispatchError> {
        self.rates
            .check(tenant)
            .map_err(|(retry_after, limit)| DispatchError::TenantLimit {
                tenant: tenant.to_string(),
                limit: "requests_per_second",
                message: format!("requests_per_second limit {limit} reached"),
                retry_after: Some(retry_after),
            })
    }

    /// Validates a request and estimates its reservation.
    pub fn check(&self, r: &pb::DispatchRequest) -> Result<TokenEstimate, DispatchError> {
        let violations = validate::check_fields(r, &self.settings.limits);
        if !violations.is_empty() {
            return Err(DispatchError::InvalidArgument(violations));
        }
        let Some(i) = self.models.iter().position(|m| m.name == r.model) else {
            let known: Vec<_> = self.models.iter().map(|m| m.name.as_str()).collect();
            return Err(DispatchError::InvalidArgument(vec![Violation::new(
                "model",
                format!(
                    "unknown model {}; configured: {}",
                    crate::excerpt::excerpt(&r.model),
                    known.join(", ")
                ),
            )]));
        };
        if !r.origin_region.is_empty() && !self.regions.contains(&r.origin_region) {
            // A typo would silently lose the locality preference.
            return Err(DispatchError::InvalidArgument(vec![Violation::new(
                "origin_region",
                format!(
                    "unknown region {}; configured: {}",
                    crate::excerpt::excerpt(&r.origin_region),
                    self.regions.join(", ")
                ),
            )]));
        }
        self.check_tokens(r, i)
    }

    /// Reclaims rate-limiter state of idle tenants.
    pub fn sweep_idle(&self) {
        self.rates.retain_recent();
    }
}

pub struct FrontDoor {
    current: RwLock<Arc<Snapshot>>,
    versions: AtomicU64,
}

impl FrontDoor {
    pub fn new(config: &Config) -> Self {
        Self {
            current: RwLock::new(Arc::new(Snapshot::new(config, 1))),
            versions: AtomicU64::new(1),
        }
    }

    /// The snapshot in force; a request takes it once and keeps it.
    pub fn snapshot(&self) -> Arc<Snapshot> {
        self.current.read().clone()
    }

    /// Puts a new version in force, whole.
    pub fn replace(&self, config: &Config) {
        let version = self.versions.fetch_add(1, Ordering::Relaxed) + 1;
        let next = Arc::new(Snapshot::new(config, version));
        // The old snapshot is dropped outside the lock.
        let _old = std::mem::replace(&mut *self.current.write(), next);
    }
}
