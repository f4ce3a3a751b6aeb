//! `dispatch.v1.Admin`: the router's state for operators, and the knobs
//! they turn at run time. It reads plain views of the engine (formatted
//! here, with no engine lock held), turns knobs through the quota desk's
//! named commands, and reloads through a narrow handle.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use tonic::{Request, Response, Status};
use tonic_types::{ErrorDetails, StatusExt};

use crate::config::{MAX_NAME_LEN, Reload};
use crate::dispatch::Engine;
use crate::excerpt::excerpt;
use crate::pb;
use crate::pb::admin_server::Admin;
use crate::state::{EngineView, RegionView};

/// What `ReloadConfig` needs of the running service: re-read the files
/// and apply them (or only say what would change). The application's
/// runtime implements it; the server knows nothing more of it.
pub trait ReloadHandle: Send + Sync {
    fn reload(&self, dry_run: bool) -> Pin<Box<dyn Future<Output = Reload> + Send + '_>>;
}

pub struct AdminService {
    engine: Arc<Engine>,
    reload: Option<Arc<dyn ReloadHandle>>,
}

/// Refuses Admin calls without the admin token, when one is configured.
pub fn admin_guard(engine: Arc<Engine>) -> impl FnMut(Request<()>) -> Result<Request<()>, Status> + Clone {
    move |request: Request<()>| {
        let header = request
            .metadata()
            .get("authorization")
            .and_then(|v| v.to_str().ok());
        if engine.admin_allowed(header) {
            Ok(request)
        } else {
            Err(Status::unauthenticated(
                "the Admin API needs `authorization: Bearer <admin token>` (admin.token in dispatcher.toml)",
            ))
        }
    }
}

impl AdminService {
    /// `reload` lets `ReloadConfig` re-read the files; without it the call
    /// is refused.
    pub fn new(engine: Arc<Engine>, reload: Option<Arc<dyn ReloadHandle>>) -> Self {
        Self { engine, reload }
    }

    fn status(r: &RegionView, prices: &crate::core::Prices, engine: &Engine) -> pb::RegionStatus {
        let provider_limits = engine.provider_limits(&r.name);
        let provider = |model: &str| {
            provider_limits
                .iter()
                .find(|(m, _, _)| m == model)
                .map_or((None, None), |(_, t, r)| (*t, *r))
        };
        let models = r
            .models
            .iter()
            .map(|q| pb::ModelQuotaStatus {
                provider_tokens_per_minute: provider(&q.model).0,
                provider_requests_per_minute: provider(&q.model).1,
                price: Some(super::admin_cost::price(prices, &r.name, &q.model)),
                model: q.model.clone(),
                accounting: q.accounting.into(),
                tokens_per_minute: q.tokens_per_minute,
                requests_per_minute: q.requests_per_minute,
                burst_tokens: q.burst_tokens,
                burst_requests: q.burst_requests,
                tokens_available: q.tokens_available,
                requests_available: q.requests_available,
                tokens_reserved: q.tokens_reserved,
                requests_in_flight: q.requests_in_flight as u32,
                tokens_full_in: duration(q.tokens_full_in),
                last_hint: q.last_hint.map(|(h, _)| pb::ProviderQuota {
                    remaining_tokens: h.remaining_tokens,
                    remaining_requests: h.remaining_requests,
                    reset_tokens: duration(h.reset_tokens),
                    reset_requests: duration(h.reset_requests),
                }),
                last_hint_age: q.last_hint.and_then(|(_, age)| duration(age)),
                provider_blocked_for: q.provider_blocked_for.and_then(duration),
                queued: q.queued as u32,
                queue_state: q.queue_state.as_str().into(),
                refused_early: q.refused_early,
                shared: q.sharing.map(|s| pb::SharedQuotaStatus {
                    mode: s.mode.as_str().into(),
                    balance_tokens: s.balance_tokens,
                    balance_requests: s.balance_requests,
                    central_tokens: s.central_tokens,
                    central_requests: s.central_requests,
                    replicas: s.replicas,
                    granted_tokens: s.totals.granted_tokens,
                    expired_tokens: s.totals.expired_tokens,
                    sync_calls: s.totals.calls,
                    failed_sync_calls: s.totals.failed_calls,
                    time_in_fallback: duration(s.totals.fallback_time),
                    spent_tokens: s.totals.spent_tokens,
                    returned_tokens: s.totals.returned_tokens,
                    disagreeing_replicas: s.disagreeing,
                }),
            })
            .collect();
        pb::RegionStatus {
            name: r.name.clone(),
            endpoint: r.endpoint.clone(),
            weight: r.weight,
            configured_weight: r.configured_weight,
            weight_override: r.weight_override,
            drained: r.drained,
            healthy: r.healthy,
            in_flight: r.in_flight,
            max_concurrent: r.max_concurrent,
            utilization: r.utilization,
            latency_ms_per_1k: r.latency_ms_per_1k.unwrap_or(0.0),
            error_rate: r.error_rate,
            completed: r.completed,
            failed: r.failed,
            models,
            circuit: r.circuit.name().to_string(),
            kind: engine.region_kind(&r.name).map_or("", |k| k.as_str()).to_string(),
        }
    }

    fn view(&self) -> EngineView {
        self.engine.view(crate::clock::now())
    }

    fn region(&self, name: &str) -> Result<pb::RegionStatus, Status> {
        // Length first: no region's name is longer, and a long one is never quoted.
        if name.len() > MAX_NAME_LEN {
            return Err(Status::with_error_details(
                tonic::Code::InvalidArgument,
                format!("region: longer than {MAX_NAME_LEN} bytes, which no region's name is"),
                ErrorDetails::with_bad_request_violation(
                    "region",
                    format!("longer than {MAX_NAME_LEN} bytes"),
                ),
            ));
        }
        let view = self.view();
        match view.regions.iter().find(|r| r.name == name) {
            Some(r) => Ok(Self::status(r, &self.engine.prices(), &self.engine)),
            None => Err(unknown_region(&view, name)),
        }
    }
}

fn duration(d: std::time::Duration) -> Option<prost_types::Duration> {
    prost_types::Duration::try_from(d).ok()
}

fn unknown_region(view: &EngineView, name: &str) -> Status {
    let known: Vec<_> = view.regions.iter().map(|r| r.name.as_str()).collect();
    if name.is_empty() {
        return Status::with_error_details(
            tonic::Code::InvalidArgument,
            "region is required",
            ErrorDetails::with_bad_request_violation("region", "required"),
        );
    }
    let quoted = excerpt(name);
    Status::with_error_details(
        tonic::Code::NotFound,
        format!("no region {quoted}; configured: {}", known.join(", ")),
        ErrorDetails::with_resource_info("region", name, "", "not configured"),
    )
}

#[tonic::async_trait]
impl Admin for AdminService {
    async fn list_regions(
        &self,
        _: Request<pb::ListRegionsRequest>,
    ) -> Result<Response<pb::ListRegionsReply>, Status> {
        let prices = self.engine.prices();
        let regions = self
            .view()
            .regions
            .iter()
            .map(|r| Self::status(r, &prices, &self.engine))
            .collect();
        Ok(Response::new(pb::ListRegionsReply { regions }))
    }

    async fn get_region(
        &self,
        request: Request<pb::GetRegionRequest>,
    ) -> Result<Response<pb::RegionStatus>, Status> {
        self.region(&request.into_inner().region).map(Response::new)
    }

    async fn drain_region(
        &self,
        request: Request<pb::RegionRequest>,
    ) -> Result<Response<pb::RegionStatus>, Status> {
        let name = request.into_inner().region;
        if self.engine.desk().drain(&name, true) {
            tracing::info!(region = %name, "region drained by an operator");
        }
        self.region(&name).map(Response::new)
    }

    async fn resume_region(
        &self,
        request: Request<pb::RegionRequest>,
    ) -> Result<Response<pb::RegionStatus>, Status> {
        let name = request.into_inner().region;
        if self.engine.desk().drain(&name, false) {
            tracing::info!(region = %name, "region resumed by an operator");
        }
        self.region(&name).map(Response::new)
    }

    async fn list_tenants(
        &self,
        _: Request<pb::ListTenantsRequest>,
    ) -> Result<Response<pb::ListTenantsReply>, Status> {
        let prices = self.engine.prices();
        let tenants = self
            .view()
            .tenants
            .into_iter()
            .map(|v| super::admin_cost::tenant_status(v, prices.currency()))
            .collect();
        Ok(Response::new(pb::ListTenantsReply { tenants }))
    }

    async fn get_tenant(
        &self,
        request: Request<pb::GetTenantRequest>,
    ) -> Result<Response<pb::TenantStatus>, Status> {
        let prices = self.engine.prices();
        let name = request.into_inner().name;
        super::admin_cost::get_tenant(self.view().tenants, &name, prices.currency()).map(Response::new)
    }

    async fn reload_config(
        &self,
        request: Request<pb::ReloadConfigRequest>,
    ) -> Result<Response<pb::ReloadConfigReply>, Status> {
        let dry_run = request.into_inner().dry_run;
        let Some(reload) = &self.reload else {
            return Err(Status::failed_precondition(
                "this server cannot reload its configuration",
            ));
        };
        let r = reload.reload(dry_run).await;
        if r.applied {
            for c in &r.changes {
                tracing::info!(change = %c, "applied config change (ReloadConfig)");
            }
        }
        for e in &r.errors {
            tracing::error!(file = %e.file.display(), "ReloadConfig refused: {e}; the last good config stays in force");
        }
        if !r.dry_run && !r.errors.is_empty() {
            return Err(refused_reload(&r.errors));
        }
        Ok(Response::new(pb::ReloadConfigReply {
            dry_run: r.dry_run,
            applied: r.applied,
            changes: r
                .changes
                .into_iter()
                .map(|c| pb::ConfigChange {
                    kind: match c.kind {
                        crate::config::ChangeKind::Added => "added",
                        crate::config::ChangeKind::Removed => "removed",
                        crate::config::ChangeKind::Changed => "changed",
                    }
                    .into(),
                    subject: c.subject,
                    details: c.details,
                })
                .collect(),
            errors: r
                .errors
                .into_iter()
                .map(|e| pb::ConfigProblem {
                    file: e.file.display().to_string(),
                    key: e.key,
                    problem: e.problem,
                })
                .collect(),
            needs_restart: r.needs_restart,
        }))
    }

    async fn set_region_weight(
        &self,
        request: Request<pb::SetRegionWeightRequest>,
    ) -> Result<Response<pb::RegionStatus>, Status> {
        let r = request.into_inner();
        let weight = if r.clear {
            None
        } else if r.weight.is_finite() && r.weight > 0.0 && r.weight <= 1e6 {
            Some(r.weight)
        } else {
            return Err(Status::with_error_details(
                tonic::Code::InvalidArgument,
                format!(
                    "weight {} must be above 0 and at most 1e6 (or set clear)",
                    r.weight
                ),
                ErrorDetails::with_bad_request_violation("weight", "must be above 0 and at most 1e6"),
            ));
        };
        if self.engine.desk().set_weight(&r.region, weight) {
            tracing::info!(region = %r.region, ?weight, "region weight override set by an operator");
        }
        self.region(&r.region).map(Response::new)
    }

    async fn list_capacity_rules(
        &self,
        _: Request<pb::ListCapacityRulesRequest>,
    ) -> Result<Response<pb::ListCapacityRulesReply>, Status> {
        let report = self.engine.desk().capacity_report(crate::clock::now());
        Ok(Response::new(super::admin_policy::capacity_reply(&report)))
    }

    async fn list_rollouts(
        &self,
        _: Request<pb::ListRolloutsRequest>,
    ) -> Result<Response<pb::ListRolloutsReply>, Status> {
        let rollouts = self
            .engine
            .rollouts()
            .list()
            .iter()
            .map(super::admin_policy::rollout)
            .collect();
        Ok(Response::new(pb::ListRolloutsReply { rollouts }))
    }

    async fn set_rollout_weights(
        &self,
        request: Request<pb::SetRolloutWeightsRequest>,
    ) -> Result<Response<pb::Rollout>, Status> {
        let r = request.into_inner();
        super::admin_policy::set_rollout_weights(&self.engine, r).map(Response::new)
    }

    async fn purge_cache(
        &self,
        request: Request<pb::PurgeCacheRequest>,
    ) -> Result<Response<pb::PurgeCacheReply>, Status> {
        super::admin_cache::purge_cache(&self.engine, request.into_inner())
            .await
            .map(Response::new)
    }
}

/// At most this many problems go into a refused reload's status (the
/// rest are in the log), each cut to `MAX_PROBLEM_CHARS`.
const MAX_PROBLEMS: usize = 20;
const MAX_PROBLEM_CHARS: usize = 300;

/// A reload that found errors: FAILED_PRECONDITION (the files, not the
/// request, are wrong) with a BadRequest naming each file and key.
fn refused_reload(errors: &[crate::config::ConfigError]) -> Status {
    let mut details = ErrorDetails::new();
    let violations = errors
        .iter()
        .take(MAX_PROBLEMS)
        .map(|e| {
            let field = if e.key.is_empty() {
                e.file.display().to_string()
            } else {
                format!("{}: {}", e.file.display(), e.key)
            };
            tonic_types::FieldViolation::new(field, crate::excerpt::truncate(&e.problem, MAX_PROBLEM_CHARS))
        })
        .collect::<Vec<_>>();
    details.set_bad_request(violations);
    let first = &errors[0];
    let more = match errors.len() {
        1 => String::new(),
        n => format!(" (and {} more)", n - 1),
    };
    Status::with_error_details(
        tonic::Code::FailedPrecondition,
        format!(
            "configuration refused, the last good config stays in force: {}{more}",
            crate::excerpt::truncate(&first.to_string(), MAX_PROBLEM_CHARS)
        ),
        details,
    )
}
