//! What an attempt that reported its usage cost: priced at its own model's
//! price in the region that served it (a fallback step at its model's),
//! charged to the request's lease (and so to its tenant's spend), counted in
//! `dispatcher_cost_total` and recorded on the request's span.
//!
//! Owns no state: the price comes from the request's configuration
//! snapshot, fixed when the attempt was committed.

use std::sync::Arc;

use super::front_door::Snapshot;
use super::lease::Lease;
use crate::core::{CostUsage, Price};
use crate::pb;

/// What a request cost, in micro-units of `currency`.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Cost {
    pub micros: u64,
    pub currency: Arc<str>,
    /// false: the model has no price (in that region); it cost nothing.
    pub priced: bool,
}

impl Cost {
    /// As the wire carries it (with the decimal amount).
    pub fn to_pb(&self) -> pb::Cost {
        wire(self.micros, &self.currency, self.priced)
    }
}

/// An amount in micro-units as the wire carries it. Work at no price (a
/// model without one, a cache hit) carries neither currency nor amount:
/// `priced: false` says it cost nothing, without two strings built for
/// every reply of a service that prices nothing.
pub fn wire(micros: u64, currency: &str, priced: bool) -> pb::Cost {
    if !priced && micros == 0 {
        return pb::Cost::default();
    }
    pb::Cost {
        micros,
        currency: currency.to_string(),
        amount: crate::core::cost::format_micros(micros),
        priced,
    }
}

/// One committed attempt's price and labels.
#[derive(Debug, Clone)]
pub(super) struct AttemptPrice {
    price: Option<Price>,
    currency: Arc<str>,
    tenant: Arc<str>,
    model: Arc<str>,
    region: Arc<str>,
}

impl AttemptPrice {
    pub fn new(config: &Snapshot, tenant: &Arc<str>, model: &str, region: &Arc<str>) -> Self {
        Self {
            price: config.prices.of(region, model),
            currency: config.currency.clone(),
            tenant: tenant.clone(),
            model: config.model_name(model).unwrap_or_else(|| Arc::from(model)),
            region: region.clone(),
        }
    }

    /// Charges the attempt: `charged` tokens and the cost of `usage`.
    pub fn charge(&self, lease: &mut Lease, charged: u64, usage: &pb::Usage, span: &tracing::Span) -> Cost {
        let micros = self.price.map_or(0, |p| {
            p.cost(CostUsage {
                prompt: usage.prompt_tokens,
                completion: usage.completion_tokens,
                cached_prompt: usage.cached_prompt_tokens,
            })
        });
        self.charge_micros(lease, charged, micros, span)
    }

    /// Charges work that may have run without a usage report: at its
    /// worst case, as its tokens are.
    pub fn charge_worst_case(&self, lease: &mut Lease, charged: u64, span: &tracing::Span) -> Cost {
        let micros = if self.price.is_some() {
            lease.worst_case_cost()
        } else {
            0
        };
        self.charge_micros(lease, charged, micros, span)
    }

    fn charge_micros(&self, lease: &mut Lease, charged: u64, micros: u64, span: &tracing::Span) -> Cost {
        lease.spent(charged, micros);
        span.record("cost_micros", micros);
        super::observe::cost(&self.tenant, &self.model, &self.region, &self.currency, micros);
        Cost {
            micros,
            currency: self.currency.clone(),
            priced: self.price.is_some(),
        }
    }
}
