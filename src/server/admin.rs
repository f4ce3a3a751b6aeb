//! `dispatch.v1.Admin`: the router's state for operators, and the knobs
//! they turn at run time.

use std::sync::Arc;
use std::time::Instant;

use tonic::{Request, Response, Status};
use tonic_types::{ErrorDetails, StatusExt};

use crate::app::Runtime;
use crate::config::MAX_NAME_LEN;
use crate::core::{RegionState, Router, Scheduler};
use crate::dispatch::{Engine, Ticket};
use crate::excerpt::excerpt;
use crate::pb;
use crate::pb::admin_server::Admin;

pub struct AdminService {
    engine: Arc<Engine>,
    runtime: Option<Arc<tokio::sync::Mutex<Runtime>>>,
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
    /// `runtime` lets `ReloadConfig` re-read the files; without it the call
    /// is refused.
    pub fn new(engine: Arc<Engine>, runtime: Option<Arc<tokio::sync::Mutex<Runtime>>>) -> Self {
        Self { engine, runtime }
    }

    fn status(&self, sched: &Scheduler<Ticket>, r: &RegionState, now: Instant) -> pb::RegionStatus {
        let router = sched.router();
        let load = r.load();
        let models = router
            .models()
            .iter()
            .enumerate()
            .filter_map(|(id, m)| r.quota(id).map(|q| (m, q)))
            .map(|(m, q)| {
                let tokens = q.tokens();
                let requests = q.requests();
                let hint = q.last_hint();
                pb::ModelQuotaStatus {
                    model: m.name.clone(),
                    accounting: q.limits().accounting.as_str().into(),
                    tokens_per_minute: tokens.per_minute(),
                    requests_per_minute: requests.per_minute(),
                    burst_tokens: tokens.capacity(),
                    burst_requests: requests.capacity(),
                    tokens_available: tokens.available(now),
                    requests_available: requests.available(now),
                    tokens_reserved: q.in_flight_tokens(),
                    requests_in_flight: q.in_flight_requests() as u32,
                    tokens_full_in: duration(tokens.time_to_full(now)),
                    last_hint: hint.map(|h| pb::ProviderQuota {
                        remaining_tokens: h.hint.remaining_tokens,
                        remaining_requests: h.hint.remaining_requests,
                        reset_tokens: duration(h.hint.reset_tokens),
                        reset_requests: duration(h.hint.reset_requests),
                    }),
                    last_hint_age: hint.and_then(|h| duration(now.saturating_duration_since(h.at))),
                    provider_blocked_for: q.blocked_for(now).and_then(duration),
                    queued: sched.queued_for(&m.name) as u32,
                }
            })
            .collect();
        pb::RegionStatus {
            name: r.name().to_string(),
            endpoint: self.engine.endpoint(r.name()).unwrap_or_default(),
            weight: r.weight(),
            configured_weight: r.configured_weight(),
            weight_override: r.weight_override(),
            drained: r.drained(),
            healthy: r.healthy(),
            in_flight: load.in_flight(),
            max_concurrent: load.capacity(),
            utilization: load.utilization(now),
            latency_ms_per_1k: load.latency_per_1k_ms(now).unwrap_or(0.0),
            error_rate: load.error_rate(now),
            completed: load.completed(),
            failed: load.failed(),
            models,
            circuit: r.circuit(now).name().to_string(),
        }
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
        let now = crate::clock::now();
        self.engine
            .with_scheduler(|sched| match sched.router().region(name) {
                Some(r) => Ok(self.status(sched, r, now)),
                None => Err(unknown_region(sched.router(), name)),
            })
    }
}

fn duration(d: std::time::Duration) -> Option<prost_types::Duration> {
    prost_types::Duration::try_from(d).ok()
}

fn unknown_region(router: &Router, name: &str) -> Status {
    let known: Vec<_> = router.regions().iter().map(|r| r.name()).collect();
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
        let now = crate::clock::now();
        let regions = self.engine.with_scheduler(|sched| {
            sched
                .router()
                .regions()
                .iter()
                .map(|r| self.status(sched, r, now))
                .collect()
        });
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
        if self.engine.with_router_mut(|r| r.set_drained(&name, true)) {
            tracing::info!(region = %name, "region drained by an operator");
        }
        self.region(&name).map(Response::new)
    }

    async fn resume_region(
        &self,
        request: Request<pb::RegionRequest>,
    ) -> Result<Response<pb::RegionStatus>, Status> {
        let name = request.into_inner().region;
        if self.engine.with_router_mut(|r| r.set_drained(&name, false)) {
            tracing::info!(region = %name, "region resumed by an operator");
        }
        self.region(&name).map(Response::new)
    }

    async fn list_tenants(
        &self,
        _: Request<pb::ListTenantsRequest>,
    ) -> Result<Response<pb::ListTenantsReply>, Status> {
        let report = self.engine.tenant_report();
        let tenants = report
            .into_iter()
            .map(|t| {
                let queued = self.engine.with_scheduler(|s| s.queued_for_tenant(&t.spec.name)) as u32;
                pb::TenantStatus {
                    name: t.spec.name.clone(),
                    weight: t.spec.weight,
                    requests_per_second: t.spec.requests_per_second.unwrap_or(0),
                    tokens_per_minute: t.spec.tokens_per_minute.unwrap_or(0),
                    max_concurrent: t.spec.max_concurrent.unwrap_or(0),
                    daily_token_budget: t.spec.daily_token_budget.unwrap_or(0),
                    models: t.spec.models.clone().unwrap_or_default(),
                    max_queued: t.spec.max_queued,
                    tokens_last_minute: t.tokens_last_minute,
                    requests_last_minute: t.requests_last_minute,
                    share: t.share,
                    entitlement: t.entitlement,
                    queued,
                    in_flight: t.in_flight,
                    tokens_available: t.tokens_available,
                    used_today: t.used_today,
                }
            })
            .collect();
        Ok(Response::new(pb::ListTenantsReply { tenants }))
    }

    async fn reload_config(
        &self,
        request: Request<pb::ReloadConfigRequest>,
    ) -> Result<Response<pb::ReloadConfigReply>, Status> {
        let dry_run = request.into_inner().dry_run;
        let Some(runtime) = &self.runtime else {
            return Err(Status::failed_precondition(
                "this server cannot reload its configuration",
            ));
        };
        let r = runtime.lock().await.reload_all(dry_run).await;
        if r.applied {
            for c in &r.changes {
                tracing::info!(change = %c, "applied config change (ReloadConfig)");
            }
        }
        for e in &r.errors {
            tracing::error!(file = %e.file.display(), key = %e.key, problem = %e.problem, "ReloadConfig refused: {e}");
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
        if self
            .engine
            .with_router_mut(|router| router.set_weight_override(&r.region, weight))
        {
            tracing::info!(region = %r.region, ?weight, "region weight override set by an operator");
        }
        self.region(&r.region).map(Response::new)
    }
}
