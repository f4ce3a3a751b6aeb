//! Money in the Admin API: each tenant's status with its spend and cost
//! budgets, a region-model's price (or that it has none), and `GetTenant`.
//! Formatting only: the figures come from the engine's view and the
//! configuration snapshot's prices.

use tonic::Status;
use tonic_types::{ErrorDetails, StatusExt};

use crate::config::MAX_NAME_LEN;
use crate::core::Prices;
use crate::core::cost::MICROS_PER_UNIT;
use crate::dispatch::wire_cost as cost;
use crate::excerpt::excerpt;
use crate::pb;
use crate::state::TenantView;

/// `model`'s price in `region`, or that it has none.
pub(super) fn price(prices: &Prices, region: &str, model: &str) -> pb::Price {
    let per_million = |micros: u64| micros as f64 / MICROS_PER_UNIT as f64;
    let currency = prices.currency().to_string();
    match prices.of(region, model) {
        None => pb::Price {
            priced: false,
            currency,
            source: "no price configured: costs nothing".into(),
            ..Default::default()
        },
        Some(p) => pb::Price {
            priced: true,
            currency,
            input_per_million: per_million(p.input),
            output_per_million: per_million(p.output),
            cached_input_per_million: per_million(p.cached_input),
            source: if prices.region_price(region, model).is_some() {
                "configured for this region".into()
            } else {
                "the model's".into()
            },
        },
    }
}

pub(super) fn tenant_status(v: TenantView, currency: &str) -> pb::TenantStatus {
    let queued = v.queued as u32;
    let t = v.report;
    let budget = |b: Option<u64>| b.map(|m| cost(m, currency, true));
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
        active: t.active,
        queued,
        in_flight: t.in_flight,
        tokens_available: t.tokens_available,
        used_today: t.used_today,
        spent_today: Some(cost(t.spent_today, currency, true)),
        spent_month: Some(cost(t.spent_month, currency, true)),
        daily_cost_budget: budget(t.spec.daily_cost_budget),
        monthly_cost_budget: budget(t.spec.monthly_cost_budget),
        cost_budget_warn_at: t.spec.cost_budget_warn_at,
    }
}

/// `GetTenant`'s answer: the named tenant, or why not.
pub(super) fn get_tenant(
    tenants: Vec<TenantView>,
    name: &str,
    currency: &str,
) -> Result<pb::TenantStatus, Status> {
    if name.is_empty() || name.len() > MAX_NAME_LEN {
        let why = if name.is_empty() {
            "required".to_string()
        } else {
            format!("longer than {MAX_NAME_LEN} bytes, which no tenant's name is")
        };
        return Err(Status::with_error_details(
            tonic::Code::InvalidArgument,
            format!("name: {why}"),
            ErrorDetails::with_bad_request_violation("name", why),
        ));
    }
    let known: Vec<String> = tenants.iter().map(|t| t.report.spec.name.clone()).collect();
    match tenants.into_iter().find(|t| t.report.spec.name == name) {
        Some(t) => Ok(tenant_status(t, currency)),
        None => Err(Status::with_error_details(
            tonic::Code::NotFound,
            format!("no tenant {}; configured: {}", excerpt(name), known.join(", ")),
            ErrorDetails::with_resource_info("tenant", name, "", "not configured"),
        )),
    }
}
