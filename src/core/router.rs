//! One routing decision: filter the regions that can take the request, score
//! them, pick one and reserve its quota, atomically (the caller holds the
//! router exclusively). Also the dry run behind `Route` and the settlement of
//! what a region reports back.

use std::sync::Arc;
use std::time::{Duration, Instant};

use rand::SeedableRng;
use rand::rngs::SmallRng;
use thiserror::Error;

use super::breaker::{BreakerConfig, Transition};
pub use super::candidates::RouteRequest;
use super::candidates::{Evaluation, evaluate, scan, trial};
use super::load::{Outcome, ReportedLoad};
use super::model::ModelSpec;
use super::model_quota::{HintOutcome, Hold, ProviderHint, QuotaShortfall, Settlement};
use super::quota::QuotaError;
use super::region::{Exclusion, RegionSpec, RegionState};
use super::shared_quota::SharingSettings;
use super::strategy::{self, Factors, Scored, Strategy, StrategyKind, StrategyParams};

/// Everything the router is built from (validated config).
#[derive(Debug, Clone, PartialEq)]
pub struct RouterSpec {
    pub models: Vec<ModelSpec>,
    pub regions: Vec<RegionSpec>,
    pub strategy: StrategyKind,
    pub params: StrategyParams,
    /// Seeds the random strategies, so a run can be replayed.
    pub seed: u64,
    pub breaker: BreakerConfig,
    /// Share every (region, model) quota with other replicas (`[cluster]`).
    pub sharing: Option<SharingSettings>,
}

#[derive(Debug, Clone, PartialEq, Error)]
pub enum RouteError {
    #[error("unknown model {model:?}; configured models: {known}")]
    UnknownModel { model: String, known: String },
    #[error(
        "the request needs {need} tokens, but the largest {model} quota bucket of any region holds {largest}"
    )]
    TooLarge { model: String, need: u64, largest: u64 },
    /// No region has quota or room now; `retry_after` is when the earliest
    /// quota refill would let it through (`None`: waiting on concurrency).
    #[error("no region can take the request now: {summary}")]
    NoCapacity {
        retry_after: Option<Duration>,
        summary: String,
    },
    /// Every region serving the model is drained, unhealthy or already tried.
    #[error("no region is available for {model}: {summary}")]
    Unavailable { model: String, summary: String },
    /// Capacity rules (`reject_new`) shed new work in the regions that
    /// could otherwise take it; `retry_after` is when that may end.
    #[error("new {model} work is shed (capacity rules): {summary}")]
    Shed {
        model: String,
        summary: String,
        retry_after: Duration,
    },
}

/// Quota held in one region for one request; hand it back to `settle`.
#[derive(Debug, Clone)]
pub struct Reservation {
    pub region: Arc<str>,
    pub model: Arc<str>,
    pub hold: Hold,
    /// The chosen region's score, for logs and traces.
    pub score: f64,
    region_index: usize,
    model_index: usize,
    generation: u64,
}

/// What came back from forwarding a reserved request.
#[derive(Debug, Clone, Copy)]
pub struct Completion {
    pub settlement: Settlement,
    /// `None`: the request ended without a verdict on the region (the caller
    /// went away before it was sent); nothing is learnt from it.
    pub outcome: Option<Outcome>,
    pub latency: Duration,
    pub hint: Option<ProviderHint>,
    pub load: Option<ReportedLoad>,
    /// The provider refused with RESOURCE_EXHAUSTED; resets after this long.
    pub provider_refused: Option<Duration>,
}

impl Completion {
    /// The request never left: everything goes back, nothing is learnt.
    pub fn abandoned() -> Self {
        Self {
            settlement: Settlement::NotRun,
            outcome: None,
            latency: Duration::ZERO,
            hint: None,
            load: None,
            provider_refused: None,
        }
    }
}

/// What settlement did, for logs and metrics.
#[derive(Debug, Clone, PartialEq)]
pub struct Settled {
    pub charged: u64,
    pub hint: Option<HintOutcome>,
    /// The region's circuit breaker changed state.
    pub transition: Option<Transition>,
    /// False when a reload removed the region or model meanwhile.
    pub found: bool,
}

/// One region in a dry run.
#[derive(Debug, Clone, PartialEq)]
pub struct CandidateReport {
    pub region: String,
    pub eligible: bool,
    pub excluded: Option<String>,
    pub score: f64,
    pub factors: Factors,
}

/// The dry run behind `Route`.
#[derive(Debug, Clone, PartialEq)]
pub struct RoutePreview {
    pub chosen: Option<String>,
    pub candidates: Vec<CandidateReport>,
    pub strategy: StrategyKind,
    pub tokens: u64,
    /// Why nothing was chosen.
    pub error: Option<RouteError>,
}

pub struct Router {
    models: Vec<ModelSpec>,
    model_names: Vec<Arc<str>>,
    regions: Vec<RegionState>,
    strategy_kind: StrategyKind,
    params: StrategyParams,
    strategy: strategy::Configured,
    rng: SmallRng,
    generation: u64,
    /// Reused by every decision, so deciding does not allocate.
    scratch: Vec<Scored>,
    /// The region the last request named as its origin: most requests
    /// come from a few origins, so one name comparison usually finds it.
    last_origin: usize,
}

impl std::fmt::Debug for Router {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Router")
            .field("models", &self.model_names)
            .field(
                "regions",
                &self.regions.iter().map(|r| r.name()).collect::<Vec<_>>(),
            )
            .field("strategy", &self.strategy_kind)
            .finish()
    }
}

impl Router {
    pub fn try_new(spec: RouterSpec, now: Instant) -> Result<Self, QuotaError> {
        let mut models = spec.models;
        models.sort_by(|a, b| a.name.cmp(&b.name));
        let model_names: Vec<Arc<str>> = models.iter().map(|m| m.name.as_str().into()).collect();
        let id = |name: &str| model_names.binary_search_by(|m| (**m).cmp(name)).ok();
        let mut regions = spec
            .regions
            .iter()
            .map(|r| {
                let half_life = spec.params.load_half_life;
                RegionState::try_new(r, &id, model_names.len(), spec.breaker, half_life, now)
            })
            .collect::<Result<Vec<_>, _>>()?;
        regions.sort_by(|a, b| a.name.cmp(&b.name));
        for quota in regions.iter_mut().flat_map(|r| r.quotas.iter_mut().flatten()) {
            quota.set_sharing(spec.sharing, now);
        }
        Ok(Self {
            strategy: strategy::build(spec.strategy, &spec.params),
            strategy_kind: spec.strategy,
            params: spec.params,
            rng: SmallRng::seed_from_u64(spec.seed),
            models,
            model_names,
            scratch: Vec::with_capacity(regions.len()),
            regions,
            generation: 0,
            last_origin: 0,
        })
    }

    pub fn strategy(&self) -> StrategyKind {
        self.strategy_kind
    }

    pub fn models(&self) -> &[ModelSpec] {
        &self.models
    }

    pub fn model(&self, name: &str) -> Option<&ModelSpec> {
        self.model_id(name).map(|i| &self.models[i])
    }

    pub fn regions(&self) -> &[RegionState] {
        &self.regions
    }

    pub fn region(&self, name: &str) -> Option<&RegionState> {
        self.region_id(name).map(|i| &self.regions[i])
    }

    /// `name`'s index among the models (as `RegionState::quota` takes it).
    pub fn model_index(&self, name: &str) -> Option<usize> {
        self.model_id(name)
    }

    fn model_id(&self, name: &str) -> Option<usize> {
        self.model_names.binary_search_by(|m| (**m).cmp(name)).ok()
    }

    fn region_id(&self, name: &str) -> Option<usize> {
        self.regions.binary_search_by(|r| (*r.name).cmp(name)).ok()
    }

    /// `candidates::origin_index`, remembering the last origin found.
    fn origin_id(&mut self, req: &RouteRequest<'_>) -> Option<usize> {
        let origin = req.origin?;
        if self
            .regions
            .get(self.last_origin)
            .is_some_and(|r| *r.name == *origin)
        {
            return Some(self.last_origin);
        }
        let id = self.region_id(origin)?;
        self.last_origin = id;
        Some(id)
    }

    fn unknown_model(&self, model: &str) -> RouteError {
        RouteError::UnknownModel {
            model: model.to_string(),
            known: self.model_names.join(", "),
        }
    }

    /// Turns an evaluation with no eligible region into the error a caller sees.
    fn no_region(&self, model: usize, req: &RouteRequest<'_>, eval: &Evaluation<'_>) -> RouteError {
        let model_name = self.model_names[model].to_string();
        if eval.serving == 0 {
            return RouteError::Unavailable {
                model: model_name,
                summary: "no region serves it".into(),
            };
        }
        if req.tokens > eval.largest {
            return RouteError::TooLarge {
                model: model_name,
                need: req.tokens,
                largest: eval.largest,
            };
        }
        let summary = eval
            .excluded
            .iter()
            .filter(|(_, why)| *why != Exclusion::ModelNotServed)
            .map(|(i, why)| format!("{}: {why}", self.regions[*i].name))
            .collect::<Vec<_>>()
            .join("; ");
        let retry_after = eval.excluded.iter().filter_map(|(_, why)| why.wait()).min();
        let waiting = eval.excluded.iter().any(|(_, why)| {
            matches!(why, Exclusion::Quota(q) if !matches!(q, QuotaShortfall::TooLarge { .. }))
                || matches!(why, Exclusion::AtCapacity { .. })
        });
        let shed = eval.excluded.iter().any(|(_, why)| *why == Exclusion::Shed);
        if waiting {
            RouteError::NoCapacity { retry_after, summary }
        } else if shed {
            let retry_after = eval
                .excluded
                .iter()
                .filter(|(_, why)| *why == Exclusion::Shed)
                .map(|(i, _)| self.regions[*i].pressure.retry_after)
                .min()
                .unwrap_or_default();
            RouteError::Shed {
                model: model_name,
                summary,
                retry_after,
            }
        } else {
            RouteError::Unavailable {
                model: model_name,
                summary,
            }
        }
    }

    /// Picks a region for `req` and reserves its quota there. Regions in
    /// `tried` are skipped (failover).
    pub fn reserve(
        &mut self,
        req: &RouteRequest<'_>,
        tried: &[Arc<str>],
        now: Instant,
    ) -> Result<Reservation, RouteError> {
        let model = self
            .model_id(req.model)
            .ok_or_else(|| self.unknown_model(req.model))?;
        let origin = self.origin_id(req);
        self.scratch.clear();
        let unclosed = scan(
            &self.regions,
            &self.strategy,
            model,
            req,
            origin,
            tried,
            now,
            &mut self.scratch,
        );
        if self.scratch.is_empty() {
            let eval = evaluate(&self.regions, &self.strategy, model, req, tried, now);
            return Err(self.no_region(model, req, &eval));
        }
        // A half-open region's trial is sent on purpose, outside the
        // strategy (whose memory, round robin's turn, does not move).
        let trial = if unclosed {
            trial(&self.regions, &self.scratch, now)
        } else {
            None
        };
        let pick = match trial {
            Some(pick) => pick,
            None => {
                let pick = self.strategy.pick(&self.scratch, &mut self.rng);
                // The strategy's memory moves only on a real pick.
                self.strategy.commit(pick, &self.scratch);
                pick
            }
        };
        let index = self.scratch[pick].index;
        let score = self.scratch[pick].value;

        let region = &mut self.regions[index];
        region.breaker.on_send(now);
        let hold = region
            .quota_mut(model)
            .expect("an eligible region serves the model")
            .reserve(req.tokens, now)
            .expect("an eligible region has the quota (checked at the same instant)");
        region.load.start(now);
        Ok(Reservation {
            region: region.name.clone(),
            model: self.model_names[model].clone(),
            hold,
            score,
            region_index: index,
            model_index: model,
            generation: self.generation,
        })
    }

    /// Where `req` would go now and why, without consuming anything (not even
    /// a random draw or a round-robin turn).
    pub fn preview(&self, req: &RouteRequest<'_>, now: Instant) -> Result<RoutePreview, RouteError> {
        let model = self
            .model_id(req.model)
            .ok_or_else(|| self.unknown_model(req.model))?;
        let eval = evaluate(&self.regions, &self.strategy, model, req, &[], now);
        let mut candidates: Vec<CandidateReport> = self
            .regions
            .iter()
            .map(|r| CandidateReport {
                region: r.name().to_string(),
                eligible: false,
                excluded: None,
                score: 0.0,
                factors: Factors::new(),
            })
            .collect();
        for (view, score) in &eval.scored {
            let c = &mut candidates[view.index];
            c.eligible = true;
            c.score = score.value;
            c.factors = score.factors;
        }
        for (i, why) in &eval.excluded {
            candidates[*i].excluded = Some(why.to_string());
        }
        let (chosen, error) = if eval.scored.is_empty() {
            (None, Some(self.no_region(model, req, &eval)))
        } else {
            let scored: Vec<Scored> = eval
                .scored
                .iter()
                .map(|(v, s)| Scored {
                    index: v.index,
                    weight: v.weight,
                    value: s.value,
                    regions: v.regions,
                    in_flight: v.in_flight,
                })
                .collect();
            let mut rng = self.rng.clone();
            let pick =
                trial(&self.regions, &scored, now).unwrap_or_else(|| self.strategy.pick(&scored, &mut rng));
            (Some(eval.scored[pick].0.name.to_string()), None)
        };
        Ok(RoutePreview {
            chosen,
            candidates,
            strategy: self.strategy_kind,
            tokens: req.tokens,
            error,
        })
    }

    fn locate(&self, r: &Reservation) -> Option<(usize, usize)> {
        if r.generation == self.generation {
            return Some((r.region_index, r.model_index));
        }
        Some((self.region_id(&r.region)?, self.model_id(&r.model)?))
    }

    /// Settles a reservation with what the region reported, and feeds the
    /// outcome into the region's load state.
    pub fn settle(&mut self, r: &Reservation, c: Completion, now: Instant) -> Settled {
        let Some((region, model)) = self.locate(r) else {
            return Settled {
                charged: 0,
                hint: None,
                transition: None,
                found: false,
            };
        };
        let region = &mut self.regions[region];
        let transition = match c.outcome {
            Some(outcome) => {
                region.load.finish(outcome, c.latency, r.hold.tokens, now);
                region.breaker.on_result(outcome == Outcome::Success, now)
            }
            None => {
                region.load.abandon(now);
                region.breaker.on_abandon(now);
                None
            }
        };
        if let Some(load) = c.load {
            region.load.report(load, now);
        }
        let Some(quota) = region.quota_mut(model) else {
            return Settled {
                charged: 0,
                hint: None,
                transition,
                found: false,
            };
        };
        // The hint answers this very request: applied while it still counts
        // as in flight, so the reservations made after it can be told apart.
        let hint = c.hint.map(|h| quota.apply_hint(h, Some(r.hold), now));
        let charged = quota.settle(r.hold, c.settlement, now);
        if let Some(reset) = c.provider_refused {
            quota.mark_refused(r.hold.tokens, reset, now);
        }
        Settled {
            charged,
            hint,
            transition,
            found: true,
        }
    }

    /// Applies a new configuration live: regions and models that stay keep
    /// their buckets (fill fraction kept across limit changes) and load;
    /// added ones start full; removed ones go (in-flight work on them settles
    /// into nothing). All or nothing.
    pub fn apply(&mut self, spec: RouterSpec, now: Instant) -> Result<(), QuotaError> {
        let mut next = Router::try_new(spec.clone(), now)?;
        for region in &mut next.regions {
            let Some(old) = self.region(&region.name) else {
                continue;
            };
            region.load = old.load.clone();
            region.load.set_half_life(spec.params.load_half_life);
            region.load.set_capacity(
                spec.regions
                    .iter()
                    .find(|s| *s.name == *region.name)
                    .map_or(old.load.capacity(), |s| s.max_concurrent),
            );
            region.drained = old.drained;
            region.healthy = old.healthy;
            // Model ids may have moved: the desk sets pressure again by name.
            region.pressure.weight_factor = old.pressure.weight_factor;
            region.pressure.shed_all = old.pressure.shed_all;
            region.breaker = old.breaker.clone();
            region.breaker.set_config(spec.breaker);
            for (model, quota) in region.quotas.iter_mut().enumerate() {
                let Some(quota) = quota else { continue };
                let Some(old_quota) = self.model_id(&next.model_names[model]).and_then(|m| old.quota(m))
                else {
                    continue;
                };
                let mut kept = old_quota.clone();
                kept.set_limits(quota.limits().clone(), now)?;
                kept.set_sharing(spec.sharing, now);
                *quota = kept;
            }
        }
        let same_strategy = next.strategy_kind == self.strategy_kind
            && next.params == self.params
            && next
                .regions
                .iter()
                .map(|r| &r.name)
                .eq(self.regions.iter().map(|r| &r.name));
        if same_strategy {
            next.strategy = std::mem::replace(
                &mut self.strategy,
                strategy::Configured::LeastOutstanding(strategy::LeastOutstanding),
            );
            next.rng = self.rng.clone();
        }
        next.generation = self.generation + 1;
        *self = next;
        Ok(())
    }

    /// Stops (or resumes) sending new work to a region. Returns false if unknown.
    pub fn set_drained(&mut self, region: &str, drained: bool) -> bool {
        self.region_id(region)
            .map(|i| self.regions[i].drained = drained)
            .is_some()
    }

    /// Overrides a region's weight until the next reload (`None` clears it).
    pub fn set_weight_override(&mut self, region: &str, weight: Option<f64>) -> bool {
        self.region_id(region)
            .map(|i| self.regions[i].weight_override = weight)
            .is_some()
    }

    /// What capacity rules ask of `region` now (`core::capacity`); models
    /// by name (unknown ones are ignored). Returns false if unknown.
    pub fn set_pressure(&mut self, p: &super::capacity::RegionPressure) -> bool {
        let Some(i) = self.region_id(&p.region) else {
            return false;
        };
        let shed_models = p.shed_models.iter().filter_map(|m| self.model_id(m)).collect();
        self.regions[i].pressure = super::region::Pressure {
            shed_all: p.shed_all,
            shed_models,
            weight_factor: p.weight_factor,
            retry_after: p.retry_after,
        };
        true
    }

    pub fn set_healthy(&mut self, region: &str, healthy: bool) -> bool {
        self.region_id(region)
            .map(|i| self.regions[i].healthy = healthy)
            .is_some()
    }
}

#[path = "router_supply.rs"]
mod supply;
pub use supply::Supply;

#[path = "router_sync.rs"]
mod sync;
pub use sync::{SyncItem, WaitingByQuota};
