//! Per-tenant requests per second, with governor's keyed limiters: one
//! limiter per distinct rate, keyed by tenant. Idle tenants' state is
//! reclaimed by `retain_recent`.

use std::collections::HashMap;
use std::num::NonZeroU32;
use std::sync::Arc;
use std::time::Duration;

use governor::clock::{Clock, DefaultClock};
use governor::{DefaultKeyedRateLimiter, Quota, RateLimiter};

use crate::config::Config;

/// Looked up on every request, keyed by configured names and rates.
type Map<K, V> = HashMap<K, V, foldhash::fast::RandomState>;

pub struct TenantRates {
    limiters: Map<u32, DefaultKeyedRateLimiter<Arc<str>>>,
    rate_of: Map<Arc<str>, u32>,
    clock: DefaultClock,
}

impl TenantRates {
    pub fn from_config(c: &Config) -> Self {
        let mut limiters = Map::default();
        let mut rate_of = Map::default();
        for t in &c.tenants {
            let Some(rps) = t.spec.requests_per_second.and_then(NonZeroU32::new) else {
                continue;
            };
            limiters
                .entry(rps.get())
                .or_insert_with(|| RateLimiter::keyed(Quota::per_second(rps)));
            rate_of.insert(Arc::from(t.spec.name.as_str()), rps.get());
        }
        Self {
            limiters,
            rate_of,
            clock: DefaultClock::default(),
        }
    }

    /// `Err(retry_after, limit)` when `tenant` is over its rate.
    pub fn check(&self, tenant: &Arc<str>) -> Result<(), (Duration, u32)> {
        let Some(rps) = self.rate_of.get(tenant) else {
            return Ok(());
        };
        let limiter = &self.limiters[rps];
        limiter
            .check_key(tenant)
            .map_err(|not_until| (not_until.wait_time_from(self.clock.now()), *rps))
    }

    /// Forgets tenants whose state has gone back to full.
    pub fn retain_recent(&self) {
        for l in self.limiters.values() {
            l.retain_recent();
        }
    }
}
