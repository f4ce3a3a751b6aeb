//! One region as the router sees it: its settings, its quotas per model, its
//! load, and whether it may take work at all.

use std::fmt;
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::breaker::{BreakerConfig, CircuitBreaker, CircuitState};
use super::load::LoadState;
use super::model_quota::{ModelLimits, ModelQuota, QuotaShortfall};
use super::quota::QuotaError;

/// A region's settings, validated (one file in `regions/`).
#[derive(Debug, Clone, PartialEq)]
pub struct RegionSpec {
    pub name: String,
    pub weight: f64,
    pub max_concurrent: u32,
    /// Model name → limits.
    pub models: Vec<(String, ModelLimits)>,
}

/// Why a region cannot take a request now.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Exclusion {
    ModelNotServed,
    Drained,
    Unhealthy,
    /// The circuit breaker is open; the region gets work again after `until`.
    CircuitOpen {
        until: Duration,
    },
    AtCapacity {
        in_flight: u32,
        max: u32,
    },
    Quota(QuotaShortfall),
    /// Tried already for this request (failover goes elsewhere).
    AlreadyTried,
    /// A capacity rule (`reject_new`) sheds new work here for now.
    Shed,
}

impl Exclusion {
    /// When the region could take the request, if waiting would help.
    pub fn wait(&self) -> Option<Duration> {
        match self {
            Exclusion::Quota(q) => q.wait(),
            _ => None,
        }
    }
}

impl fmt::Display for Exclusion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Exclusion::ModelNotServed => f.write_str("does not serve this model"),
            Exclusion::Drained => f.write_str("drained by an operator"),
            Exclusion::Unhealthy => f.write_str("unhealthy (failing its health checks)"),
            Exclusion::CircuitOpen { until } => write!(
                f,
                "circuit open (too many errors); trial requests in {}",
                super::model_quota::fmt_duration(*until)
            ),
            Exclusion::AtCapacity { in_flight, max } => {
                write!(f, "at max_concurrent ({in_flight}/{max} in flight)")
            }
            Exclusion::Quota(q) => q.fmt(f),
            Exclusion::AlreadyTried => f.write_str("already tried for this request"),
            Exclusion::Shed => f.write_str("shedding new work (a reject_new capacity rule is active)"),
        }
    }
}

/// What the active capacity rules ask of a region (`core::capacity`).
#[derive(Debug, Clone, PartialEq)]
pub struct Pressure {
    pub shed_all: bool,
    /// Model ids (the router's order) that shed new work.
    pub shed_models: Vec<usize>,
    /// Multiplies the region's weight (1: no effect).
    pub weight_factor: f64,
    /// When shedding could end at the soonest.
    pub retry_after: Duration,
}

impl Default for Pressure {
    fn default() -> Self {
        Self {
            shed_all: false,
            shed_models: Vec::new(),
            weight_factor: 1.0,
            retry_after: Duration::ZERO,
        }
    }
}

#[derive(Debug, Clone)]
pub struct RegionState {
    pub(super) name: Arc<str>,
    pub(super) weight: f64,
    pub(super) weight_override: Option<f64>,
    pub(super) drained: bool,
    pub(super) healthy: bool,
    /// Set by capacity rules (`Router::set_pressure`).
    pub(super) pressure: Pressure,
    pub(super) breaker: CircuitBreaker,
    pub(super) load: LoadState,
    /// By model id (the router's model order); `None` where not served.
    pub(super) quotas: Vec<Option<ModelQuota>>,
}

impl RegionState {
    pub(super) fn try_new(
        spec: &RegionSpec,
        model_ids: &dyn Fn(&str) -> Option<usize>,
        models: usize,
        breaker: BreakerConfig,
        load_half_life: Duration,
        now: Instant,
    ) -> Result<Self, QuotaError> {
        let mut quotas = vec![None; models];
        for (model, limits) in &spec.models {
            if let Some(id) = model_ids(model) {
                quotas[id] = Some(ModelQuota::try_new(limits.clone(), now)?);
            }
        }
        Ok(Self {
            name: spec.name.as_str().into(),
            weight: spec.weight,
            weight_override: None,
            drained: false,
            healthy: true,
            pressure: Pressure::default(),
            breaker: CircuitBreaker::new(breaker, now),
            load: LoadState::new(spec.max_concurrent, load_half_life, now),
            quotas,
        })
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    #[inline]
    pub fn weight(&self) -> f64 {
        self.weight_override.unwrap_or(self.weight) * self.pressure.weight_factor
    }

    /// What capacity rules ask of this region now.
    pub fn pressure(&self) -> &Pressure {
        &self.pressure
    }

    pub fn configured_weight(&self) -> f64 {
        self.weight
    }

    pub fn weight_override(&self) -> Option<f64> {
        self.weight_override
    }

    pub fn drained(&self) -> bool {
        self.drained
    }

    pub fn healthy(&self) -> bool {
        self.healthy
    }

    pub fn circuit(&self, now: Instant) -> CircuitState {
        self.breaker.state(now)
    }

    #[inline]
    pub fn load(&self) -> &LoadState {
        &self.load
    }

    #[inline]
    pub fn quota(&self, model: usize) -> Option<&ModelQuota> {
        self.quotas.get(model).and_then(Option::as_ref)
    }

    pub(super) fn quota_mut(&mut self, model: usize) -> Option<&mut ModelQuota> {
        self.quotas.get_mut(model).and_then(Option::as_mut)
    }

    /// Whether this region could take `tokens` of `model` now, and if so how
    /// much headroom it would have left (the lesser of tokens and requests, as
    /// a fraction of each bucket).
    #[inline]
    pub fn admit(&self, model: usize, tokens: u64, now: Instant) -> Result<f64, Exclusion> {
        let quota = self.quota(model).ok_or(Exclusion::ModelNotServed)?;
        if self.drained {
            return Err(Exclusion::Drained);
        }
        if !self.healthy {
            return Err(Exclusion::Unhealthy);
        }
        if self.pressure.shed_all || self.pressure.shed_models.contains(&model) {
            return Err(Exclusion::Shed);
        }
        if !self.breaker.allows(now) {
            let until = match self.breaker.state(now) {
                CircuitState::Open { until } => until.saturating_duration_since(now),
                _ => Duration::ZERO,
            };
            return Err(Exclusion::CircuitOpen { until });
        }
        if !self.load.has_room() {
            return Err(Exclusion::AtCapacity {
                in_flight: self.load.in_flight(),
                max: self.load.capacity(),
            });
        }
        quota.headroom(tokens, now).map_err(Exclusion::Quota)
    }
}
