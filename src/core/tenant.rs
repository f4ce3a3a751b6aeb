//! Tenants' hard limits (tokens a minute, requests in flight, a daily token
//! budget, daily and monthly budgets in money, allowed models) and what they
//! used, for fair-share reports and spend (`tenant_spend.rs`).
//! Requests-per-second limits are the edge's (governor); the rest is here,
//! pure, with the time and the day passed in.

use std::collections::BTreeMap;
use std::fmt;
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::quota::{QuotaBucket, QuotaError, Shortfall};

/// Tenant weights; tenants not listed weigh `default`.
#[derive(Debug, Clone, PartialEq)]
pub struct Weights {
    pub by_tenant: BTreeMap<Arc<str>, f64>,
    pub default: f64,
}

impl Weights {
    pub fn of(&self, tenant: &str) -> f64 {
        self.by_tenant
            .get(tenant)
            .copied()
            .unwrap_or(self.default)
            .max(f64::MIN_POSITIVE)
    }
}

impl Default for Weights {
    fn default() -> Self {
        Self {
            by_tenant: BTreeMap::new(),
            default: 1.0,
        }
    }
}

/// A tenant's settings, validated (`[[tenants]]` in dispatcher.toml).
#[derive(Debug, Clone, PartialEq)]
pub struct TenantSpec {
    pub name: String,
    pub weight: f64,
    pub requests_per_second: Option<u32>,
    pub tokens_per_minute: Option<u64>,
    pub max_concurrent: Option<u32>,
    pub daily_token_budget: Option<u64>,
    /// Budgets in micro-units of the configured currency, per UTC day and
    /// UTC month: checked against each request's worst-case cost.
    pub daily_cost_budget: Option<u64>,
    pub monthly_cost_budget: Option<u64>,
    /// The share of a cost budget past which it is reported as nearly spent
    /// (a metric and an alert; requests still pass).
    pub cost_budget_warn_at: f64,
    /// Models it may use; `None`: every model.
    pub models: Option<Vec<String>>,
    /// Its requests waiting for quota at most.
    pub max_queued: u32,
}

/// The day as the edge counts it (UTC days since the epoch), and when the
/// next one starts; likewise the UTC month (months since January 1970).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Day {
    pub number: u64,
    pub next_in: Duration,
    pub month: u64,
    pub month_next_in: Duration,
}

/// Which hard limit refused a request.
#[derive(Debug, Clone, PartialEq)]
pub enum TenantRefusal {
    Unknown,
    ModelNotAllowed {
        allowed: Vec<String>,
    },
    TokensPerMinute {
        limit: u64,
        need: u64,
        retry_after: Option<Duration>,
    },
    Concurrency {
        limit: u32,
    },
    DailyBudget {
        budget: u64,
        committed: u64,
        retry_after: Duration,
    },
    /// A cost budget (micro-units): `daily_cost_budget` or
    /// `monthly_cost_budget`, with the request's worst case.
    CostBudget {
        period: BudgetPeriod,
        budget: u64,
        committed: u64,
        need: u64,
        retry_after: Duration,
    },
}

impl TenantRefusal {
    /// The limit's name, as configured.
    pub fn limit(&self) -> &'static str {
        match self {
            TenantRefusal::Unknown => "tenant",
            TenantRefusal::ModelNotAllowed { .. } => "models",
            TenantRefusal::TokensPerMinute { .. } => "tokens_per_minute",
            TenantRefusal::Concurrency { .. } => "max_concurrent",
            TenantRefusal::DailyBudget { .. } => "daily_token_budget",
            TenantRefusal::CostBudget { period, .. } => period.key(),
        }
    }

    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            TenantRefusal::TokensPerMinute { retry_after, .. } => *retry_after,
            TenantRefusal::Concurrency { .. } => Some(Duration::from_millis(100)),
            TenantRefusal::DailyBudget { retry_after, .. }
            | TenantRefusal::CostBudget { retry_after, .. } => Some(*retry_after),
            _ => None,
        }
    }
}

impl fmt::Display for TenantRefusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            TenantRefusal::Unknown => f.write_str("unknown tenant"),
            TenantRefusal::ModelNotAllowed { allowed } => {
                write!(
                    f,
                    "model not allowed for this tenant (allowed: {})",
                    allowed.join(", ")
                )
            }
            TenantRefusal::TokensPerMinute { limit, need, .. } => {
                write!(
                    f,
                    "tokens_per_minute limit {limit} reached (this request needs {need})"
                )
            }
            TenantRefusal::Concurrency { limit } => write!(f, "max_concurrent limit {limit} reached"),
            TenantRefusal::DailyBudget {
                budget, committed, ..
            } => {
                write!(
                    f,
                    "daily_token_budget {budget} reached ({committed} used or reserved today)"
                )
            }
            TenantRefusal::CostBudget {
                period,
                budget,
                committed,
                need,
                ..
            } => {
                use super::cost::format_micros as m;
                write!(
                    f,
                    "{} {} reached ({} spent or reserved {}; this request may cost up to {})",
                    period.key(),
                    m(*budget),
                    m(*committed),
                    period.this(),
                    m(*need)
                )
            }
        }
    }
}

/// Tokens held against a tenant's limits for one request; settle it once.
#[derive(Debug, Clone, PartialEq)]
pub struct TenantHold {
    pub tenant: Arc<str>,
    pub tokens: u64,
    /// The worst-case cost held against its cost budgets (micro-units).
    pub cost: u64,
    day: u64,
    month: u64,
}

const WINDOW_SECS: usize = 60;

/// Tokens and requests per second over the last minute.
#[derive(Debug, Clone)]
struct UsageWindow {
    /// (second, tokens, requests) by `second % 60`.
    slots: [(u64, u64, u64); WINDOW_SECS],
}

impl UsageWindow {
    fn new() -> Self {
        Self {
            slots: [(u64::MAX, 0, 0); WINDOW_SECS],
        }
    }

    fn add(&mut self, second: u64, tokens: u64) {
        let slot = &mut self.slots[second as usize % WINDOW_SECS];
        if slot.0 != second {
            *slot = (second, 0, 0);
        }
        slot.1 += tokens;
        slot.2 += 1;
    }

    fn last_minute(&self, second: u64) -> (u64, u64) {
        self.slots
            .iter()
            .filter(|(s, _, _)| *s != u64::MAX && *s + WINDOW_SECS as u64 > second && *s <= second)
            .fold((0, 0), |(t, r), (_, tokens, requests)| (t + tokens, r + requests))
    }
}

#[derive(Debug, Clone)]
struct TenantState {
    name: Arc<str>,
    spec: TenantSpec,
    tokens: Option<QuotaBucket>,
    in_flight: u32,
    day: u64,
    used_today: u64,
    reserved: u64,
    usage: UsageWindow,
    /// With `[cluster]`: tokens charged here (reserved, and any extra at
    /// settlement) and refunded here (settled below the reservation) not
    /// yet reported to the other replicas, and the shared totals as last
    /// seen (`tenant_sync.rs`).
    unsynced: i64,
    unsynced_refund: i64,
    seen: Option<sync::Seen>,
    spend: spend::Spend,
}

/// A tenant as operators see it.
#[derive(Debug, Clone, PartialEq)]
pub struct TenantReport {
    pub spec: TenantSpec,
    pub tokens_last_minute: u64,
    pub requests_last_minute: u64,
    /// Its part of all tokens dispatched in the last minute.
    pub share: f64,
    /// `weight / Σ weights` of the tenants active in the last minute (its
    /// own included).
    pub entitlement: f64,
    /// Dispatched tokens in the last minute, or has work in flight.
    pub active: bool,
    pub in_flight: u32,
    pub tokens_available: Option<i64>,
    pub used_today: u64,
    /// Spent (settled) in micro-units this UTC day and month.
    pub spent_today: u64,
    pub spent_month: u64,
}

#[derive(Debug, Clone)]
pub struct Tenants {
    states: BTreeMap<Arc<str>, TenantState>,
    weights: Arc<Weights>,
    epoch: Instant,
}

impl Tenants {
    pub fn try_new(specs: &[TenantSpec], now: Instant) -> Result<Self, QuotaError> {
        let mut t = Self {
            states: BTreeMap::new(),
            weights: Arc::new(Weights::default()),
            epoch: now,
        };
        t.apply(specs, now)?;
        Ok(t)
    }

    /// New settings live: tenants that stay keep their buckets (fill
    /// fraction kept), counters and usage.
    pub fn apply(&mut self, specs: &[TenantSpec], now: Instant) -> Result<(), QuotaError> {
        let mut next = BTreeMap::new();
        for spec in specs {
            let old = self.states.get(spec.name.as_str());
            let tokens = match (spec.tokens_per_minute, old.and_then(|o| o.tokens.clone())) {
                (None, _) => None,
                (Some(tpm), Some(mut bucket)) => {
                    bucket.set_limit(tpm, None, now)?;
                    Some(bucket)
                }
                (Some(tpm), None) => Some(QuotaBucket::try_new(tpm, None, now)?),
            };
            let name: Arc<str> = Arc::from(spec.name.as_str());
            let state = TenantState {
                name: name.clone(),
                spec: spec.clone(),
                tokens,
                in_flight: old.map_or(0, |o| o.in_flight),
                day: old.map_or(0, |o| o.day),
                used_today: old.map_or(0, |o| o.used_today),
                reserved: old.map_or(0, |o| o.reserved),
                usage: old.map_or_else(UsageWindow::new, |o| o.usage.clone()),
                unsynced: old.map_or(0, |o| o.unsynced),
                unsynced_refund: old.map_or(0, |o| o.unsynced_refund),
                seen: old.and_then(|o| o.seen),
                spend: old.map_or_else(Default::default, |o| o.spend.clone()),
            };
            next.insert(name, state);
        }
        self.weights = Arc::new(Weights {
            by_tenant: next.iter().map(|(n, s)| (n.clone(), s.spec.weight)).collect(),
            default: 1.0,
        });
        self.states = next;
        Ok(())
    }

    pub fn weights(&self) -> Arc<Weights> {
        self.weights.clone()
    }

    pub fn spec(&self, tenant: &str) -> Option<&TenantSpec> {
        self.states.get(tenant).map(|s| &s.spec)
    }

    pub fn names(&self) -> impl Iterator<Item = &Arc<str>> {
        self.states.keys()
    }

    /// Holds `tokens` of `model` against the tenant's limits, or says which
    /// limit refuses (a request that costs nothing: see `admit_costed`).
    pub fn admit(
        &mut self,
        tenant: &str,
        model: &str,
        tokens: u64,
        now: Instant,
        day: Day,
    ) -> Result<TenantHold, TenantRefusal> {
        self.admit_costed(tenant, model, tokens, 0, now, day)
    }

    /// Holds `tokens` of `model`, and `cost` (its worst case, micro-units)
    /// against the tenant's cost budgets, or says which limit refuses.
    pub fn admit_costed(
        &mut self,
        tenant: &str,
        model: &str,
        tokens: u64,
        cost: u64,
        now: Instant,
        day: Day,
    ) -> Result<TenantHold, TenantRefusal> {
        let s = self.states.get_mut(tenant).ok_or(TenantRefusal::Unknown)?;
        if let Some(allowed) = &s.spec.models
            && !allowed.iter().any(|m| m == model)
        {
            return Err(TenantRefusal::ModelNotAllowed {
                allowed: allowed.clone(),
            });
        }
        if let Some(limit) = s.spec.max_concurrent
            && s.in_flight >= limit
        {
            return Err(TenantRefusal::Concurrency { limit });
        }
        if s.day != day.number {
            s.day = day.number;
            s.used_today = 0;
        }
        if let Some(budget) = s.spec.daily_token_budget {
            let committed = s.used_today + s.reserved;
            if committed + tokens > budget {
                return Err(TenantRefusal::DailyBudget {
                    budget,
                    committed,
                    retry_after: day.next_in,
                });
            }
        }
        s.spend.roll(day);
        s.spend.check(&s.spec, cost, day)?;
        if let Some(bucket) = &mut s.tokens {
            bucket
                .try_take(tokens, now)
                .map_err(|why| TenantRefusal::TokensPerMinute {
                    limit: bucket.per_minute(),
                    need: tokens,
                    retry_after: match why {
                        Shortfall::Wait(w) => Some(w),
                        Shortfall::TooLarge { .. } => None,
                    },
                })?;
        }
        s.in_flight += 1;
        s.reserved += tokens;
        s.unsynced += tokens as i64;
        s.spend.hold(cost);
        Ok(TenantHold {
            tenant: s.name.clone(),
            tokens,
            cost,
            day: day.number,
            month: day.month,
        })
    }

    /// Settles a hold with the tokens finally charged for the request (a
    /// request that cost nothing: see `settle_costed`).
    pub fn settle(&mut self, hold: TenantHold, charged: u64, now: Instant) {
        self.settle_costed(hold, charged, 0, now);
    }

    /// Settles a hold with the tokens and the cost (micro-units) finally
    /// charged for the request.
    pub fn settle_costed(&mut self, hold: TenantHold, charged: u64, cost: u64, now: Instant) {
        let second = now.saturating_duration_since(self.epoch).as_secs();
        let Some(s) = self.states.get_mut(&hold.tenant) else {
            return;
        };
        s.spend.settle(hold.cost, cost, hold.day, hold.month);
        s.in_flight = s.in_flight.saturating_sub(1);
        s.reserved = s.reserved.saturating_sub(hold.tokens);
        // Charges and refunds travel apart: each shared total only grows,
        // so one that shrank means Redis lost it, not a refund.
        if charged >= hold.tokens {
            s.unsynced += (charged - hold.tokens) as i64;
        } else {
            s.unsynced_refund += (hold.tokens - charged) as i64;
        }
        if s.day == hold.day {
            s.used_today += charged;
        }
        if let Some(bucket) = &mut s.tokens {
            if charged < hold.tokens {
                bucket.refund(hold.tokens - charged, now);
            } else {
                bucket.charge(charged - hold.tokens, now);
            }
        }
        if charged > 0 {
            s.usage.add(second, charged);
        }
    }

    pub fn report(&self, now: Instant) -> Vec<TenantReport> {
        let second = now.saturating_duration_since(self.epoch).as_secs();
        let usage: Vec<(u64, u64)> = self
            .states
            .values()
            .map(|s| s.usage.last_minute(second))
            .collect();
        let total: u64 = usage.iter().map(|(t, _)| t).sum();
        let active_weight: f64 = self
            .states
            .values()
            .zip(&usage)
            .filter(|(s, (t, _))| *t > 0 || s.in_flight > 0)
            .map(|(s, _)| s.spec.weight)
            .sum();
        self.states
            .values()
            .zip(usage)
            .map(|(s, (tokens, requests))| {
                let active = tokens > 0 || s.in_flight > 0;
                let weight_pool = if active {
                    active_weight
                } else {
                    active_weight + s.spec.weight
                };
                TenantReport {
                    spec: s.spec.clone(),
                    tokens_last_minute: tokens,
                    requests_last_minute: requests,
                    share: if total > 0 {
                        tokens as f64 / total as f64
                    } else {
                        0.0
                    },
                    entitlement: if weight_pool > 0.0 {
                        s.spec.weight / weight_pool
                    } else {
                        0.0
                    },
                    active,
                    in_flight: s.in_flight,
                    tokens_available: s.tokens.as_ref().map(|b| b.available(now)),
                    used_today: s.used_today,
                    spent_today: s.spend.today(),
                    spent_month: s.spend.this_month(),
                }
            })
            .collect()
    }

    /// Starts a new UTC day or month for every tenant whose counts are of
    /// an earlier one (before a report: yesterday's spend is not today's).
    pub fn roll(&mut self, day: Day) {
        for s in self.states.values_mut() {
            if s.day != day.number {
                s.day = day.number;
                s.used_today = 0;
            }
            s.spend.roll(day);
        }
    }
}

#[path = "tenant_spend.rs"]
mod spend;
#[path = "tenant_sync.rs"]
mod sync;
pub use spend::BudgetPeriod;
pub use sync::{TenantTotals, TenantUsage};

#[cfg(test)]
#[path = "tenant_tests.rs"]
mod tests;
