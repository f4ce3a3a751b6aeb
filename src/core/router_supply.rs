//! What the queue asks the router: how much quota a model can draw on,
//! and where and when a waiting request would fit.

use std::sync::Arc;
use std::time::{Duration, Instant};

use super::{RouteRequest, Router};
use crate::core::breaker::Circuit;
use crate::core::model_quota::QuotaShortfall;
use crate::core::region::Exclusion;

/// The quota a model can draw on, summed over the regions serving it, and
/// how soon one request of a given size could come out of its refill.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct Supply {
    pub tokens_per_sec: f64,
    pub available: i64,
    pub requests_per_sec: f64,
    pub requests_available: i64,
    /// The shortest time any one region takes to refill the request's
    /// tokens and one request from empty: a request fits in one region, so
    /// the regions' refills do not add up for it.
    pub own_refill: Duration,
}

impl Router {
    /// The region `req` would fit in soonest (now, or after a refill), not
    /// counting `tried`: the one a waiting head holds the refill of.
    pub fn earliest_fit(
        &self,
        req: &RouteRequest<'_>,
        tried: &[Arc<str>],
        now: Instant,
    ) -> Option<(Arc<str>, Duration)> {
        let model = self.model_id(req.model)?;
        self.regions
            .iter()
            .filter(|r| r.quota(model).is_some() && !tried.iter().any(|t| **t == *r.name))
            .filter_map(|r| match r.admit(model, req.tokens, now) {
                Ok(_) => Some((r.name.clone(), Duration::ZERO)),
                Err(why) => why.wait().map(|w| (r.name.clone(), w)),
            })
            .min_by(|a, b| a.1.cmp(&b.1).then_with(|| a.0.cmp(&b.0)))
    }

    /// Whether `req` would fit now in one process: some region's quota is
    /// shared with other replicas and only this replica's holding lacks
    /// it; the central level, as last seen, has it for the next grant.
    pub fn fits_next_grant(&self, req: &RouteRequest<'_>, tried: &[Arc<str>], now: Instant) -> bool {
        let Some(model) = self.model_id(req.model) else {
            return false;
        };
        self.regions
            .iter()
            .filter(|r| !tried.iter().any(|t| **t == *r.name))
            .any(|r| {
                matches!(
                    r.admit(model, req.tokens, now),
                    Err(Exclusion::Quota(QuotaShortfall::Shared { next_grant: true, .. }))
                )
            })
    }

    /// How fast quota for `model` comes back, in tokens and requests a
    /// second, how much is there now, over the regions that could take work
    /// for it, and how soon one region could refill a request of `tokens`.
    pub fn supply(&self, model: &str, tokens: u64, tried: &[Arc<str>], now: Instant) -> Option<Supply> {
        let id = self.model_id(model)?;
        let mut supply = Supply {
            own_refill: Duration::MAX,
            ..Supply::default()
        };
        for r in self.regions.iter().filter(|r| !r.drained && r.healthy) {
            if let Some(q) = r.quota(id) {
                // Shared with other replicas: this one's part of the rate,
                // and what it could have by its next grant.
                let (part, have_tokens, have_requests) = match q.shared() {
                    Some(s) => {
                        let (t, r) = s.reachable(now);
                        (s.part(), t as i64, r as i64)
                    }
                    None => (1.0, q.tokens().available(now), q.requests().available(now)),
                };
                supply.tokens_per_sec += q.tokens().per_minute() as f64 / 60.0 * part;
                supply.available += have_tokens.max(0);
                supply.requests_per_sec += q.requests().per_minute() as f64 / 60.0 * part;
                supply.requests_available += have_requests.max(0);
                // Only where it could fit and may still go.
                let could_take = tokens <= q.tokens().capacity()
                    && r.circuit(now).kind() != Circuit::Open
                    && !tried.iter().any(|t| **t == *r.name);
                if could_take {
                    let own = q.tokens().refill_time(tokens).max(q.requests().refill_time(1));
                    supply.own_refill = supply.own_refill.min(own);
                }
            }
        }
        if supply.own_refill == Duration::MAX {
            // No region could take it now: nothing to say about its own wait.
            supply.own_refill = Duration::ZERO;
        }
        (supply.tokens_per_sec > 0.0).then_some(supply)
    }
}
