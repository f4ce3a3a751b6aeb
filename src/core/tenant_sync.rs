//! Tenant limits shared between replicas (`[cluster]`): each sync, every
//! replica adds what its tenants were charged since the last one
//! (reservations, and what settlement added) and what was refunded
//! (settlement below the reservation) to two running totals per tenant and
//! per tenant-day in Redis, and charges its own buckets and daily counts
//! with what the other replicas added meanwhile, net of their refunds. The
//! two totals only grow, so one that shrank means Redis lost it (a restart):
//! the replica starts over from it instead of taking the drop for a refund.
//! (One net total could not tell the two apart, and a refund elsewhere was
//! never seen: the others kept counting a reservation that settled lower.)
//! A tenant's limits then hold across replicas to within one sync interval
//! of the others' spending; without Redis each replica counts alone.
//! Spend in money rides along: per tenant-day and tenant-month, the same way.

use std::sync::Arc;
use std::time::Instant;

use super::Tenants;

/// One tenant's charges since the last sync, and the day they count for;
/// its cost (micro-units) and the day and month that counts for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TenantUsage {
    pub tenant: Arc<str>,
    pub day: u64,
    /// Tokens charged (at least 0) and refunded (at least 0) since the last sync.
    pub delta: i64,
    pub refund: i64,
    pub cost_day: u64,
    pub cost_month: u64,
    pub cost_delta: i64,
}

/// Redis' running totals after a `TenantUsage` was added: tokens (all
/// time, its day) and cost (its day, its month).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct TenantTotals {
    pub tokens: i64,
    pub day: i64,
    /// The refunds' totals: all time, its day.
    pub refunded: i64,
    pub day_refunded: i64,
    pub cost_day: i64,
    pub cost_month: i64,
}

/// The shared token totals as a replica last saw them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Seen {
    tokens: i64,
    refunded: i64,
    day: i64,
    day_refunded: i64,
}

impl Tenants {
    /// What each tenant with a tokens-per-minute limit, a budget, or any
    /// spend was charged since the last sync (taken out: hand it back to
    /// `synced` or `unsynced`), counted for `day` (a tenant that has been
    /// idle since an earlier day starts today's counts first).
    pub fn usage_to_sync(&mut self, day: super::Day) -> Vec<TenantUsage> {
        self.roll(day);
        self.states
            .values_mut()
            .filter(|s| {
                s.spec.tokens_per_minute.is_some()
                    || s.spec.daily_token_budget.is_some()
                    || s.spec.daily_cost_budget.is_some()
                    || s.spec.monthly_cost_budget.is_some()
                    || s.unsynced_refund != 0
                    || s.spend.unsynced != 0
                    || s.spend.seen.is_some()
            })
            .map(|s| {
                let (cost_day, cost_month) = s.spend.period();
                TenantUsage {
                    tenant: s.name.clone(),
                    day: s.day,
                    delta: std::mem::take(&mut s.unsynced),
                    refund: std::mem::take(&mut s.unsynced_refund),
                    cost_day,
                    cost_month,
                    cost_delta: std::mem::take(&mut s.spend.unsynced),
                }
            })
            .collect()
    }

    /// Redis added `u.delta` and `u.refund` and answered the running totals
    /// after them: for the tenant's tokens, and for its day. What the other
    /// replicas added since this replica last looked (net of what they
    /// refunded) is charged here too.
    pub fn synced(&mut self, u: &TenantUsage, totals: TenantTotals, now: Instant) {
        let Some(s) = self.states.get_mut(&u.tenant) else {
            return;
        };
        s.spend.synced(
            (u.cost_day, u.cost_month),
            u.cost_delta,
            totals.cost_day,
            totals.cost_month,
        );
        // What the others added to a pair of totals (charges, refunds)
        // since `seen`, net; `None`: one shrank, Redis lost them.
        let elsewhere = |(seen, seen_refunded): (i64, i64), (now, now_refunded): (i64, i64)| {
            let charged = now - seen - u.delta;
            let refunded = now_refunded - seen_refunded - u.refund;
            (charged >= 0 && refunded >= 0).then_some(charged - refunded)
        };
        let today = s.day == u.day;
        if let Some(seen) = s.seen {
            if let Some(others) = elsewhere((seen.tokens, seen.refunded), (totals.tokens, totals.refunded))
                && let Some(bucket) = &mut s.tokens
            {
                if others > 0 {
                    bucket.charge(others as u64, now);
                } else if others < 0 {
                    bucket.refund(others.unsigned_abs(), now);
                }
            }
            if today
                && let Some(others) =
                    elsewhere((seen.day, seen.day_refunded), (totals.day, totals.day_refunded))
            {
                s.used_today = s.used_today.saturating_add_signed(others);
            }
        }
        s.seen = Some(Seen {
            tokens: totals.tokens,
            refunded: totals.refunded,
            day: if today { totals.day } else { 0 },
            day_refunded: if today { totals.day_refunded } else { 0 },
        });
    }

    /// The sync failed: the charges are reported next time.
    pub fn unsynced(&mut self, u: &TenantUsage) {
        if let Some(s) = self.states.get_mut(&u.tenant) {
            s.unsynced += u.delta;
            s.unsynced_refund += u.refund;
            s.spend.unsynced += u.cost_delta;
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;
    use std::time::Duration;

    use super::super::{Day, TenantSpec, Tenants};
    use super::*;

    const DAY: Day = Day {
        number: 7,
        next_in: Duration::from_secs(3600),
        month: 0,
        month_next_in: Duration::from_secs(86_400),
    };

    fn tenants(now: Instant) -> Tenants {
        let spec = TenantSpec {
            name: "t".into(),
            weight: 1.0,
            requests_per_second: None,
            tokens_per_minute: Some(600),
            max_concurrent: None,
            daily_token_budget: Some(1_000),
            daily_cost_budget: Some(10_000),
            monthly_cost_budget: None,
            cost_budget_warn_at: 0.8,
            models: None,
            max_queued: 10,
        };
        Tenants::try_new(&[spec], now).unwrap()
    }

    /// Redis' INCRBY totals.
    fn sync(t: &mut Tenants, redis: &mut HashMap<String, i64>, now: Instant) {
        sync_on(t, redis, now, DAY);
    }

    fn sync_on(t: &mut Tenants, redis: &mut HashMap<String, i64>, now: Instant, day: Day) {
        for u in t.usage_to_sync(day) {
            let mut incr = |key: String, by: i64| *redis.entry(key).and_modify(|v| *v += by).or_insert(by);
            let totals = TenantTotals {
                tokens: incr("total".into(), u.delta),
                day: incr(format!("day{}", u.day), u.delta),
                refunded: incr("refunded".into(), u.refund),
                day_refunded: incr(format!("day-refunded{}", u.day), u.refund),
                cost_day: incr(format!("cost-day{}", u.cost_day), u.cost_delta),
                cost_month: incr(format!("cost-month{}", u.cost_month), u.cost_delta),
            };
            t.synced(&u, totals, now);
        }
    }

    #[test]
    fn what_one_replica_spends_counts_against_the_other() {
        let t0 = crate::testing::epoch();
        let (mut a, mut b) = (tenants(t0), tenants(t0));
        let mut redis = HashMap::new();
        // Both have synced once (a baseline).
        sync(&mut a, &mut redis, t0);
        sync(&mut b, &mut redis, t0);
        // `a` spends 500 of the tenant's 600 a minute.
        let h = a.admit("t", "m", 500, t0, DAY).unwrap();
        a.settle(h, 500, t0);
        // Before a sync, `b` would let 500 more through; after one, not.
        sync(&mut a, &mut redis, t0);
        sync(&mut b, &mut redis, t0);
        let refused = b.admit("t", "m", 500, t0, DAY).unwrap_err();
        assert_eq!(refused.limit(), "tokens_per_minute");
        assert!(b.admit("t", "m", 100, t0, DAY).is_ok());
    }

    #[test]
    fn the_daily_budget_counts_every_replica_and_a_lost_total_starts_over() {
        let t0 = crate::testing::epoch();
        let (mut a, mut b) = (tenants(t0), tenants(t0));
        let mut redis = HashMap::new();
        for t in [&mut a, &mut b] {
            let _ = t.admit("t", "m", 1, t0, DAY).map(|h| t.settle(h, 0, t0));
            sync(t, &mut redis, t0);
        }
        // 600 on `a`, over ten minutes (the per-minute limit is not the point).
        for i in 0..6 {
            let now = t0 + Duration::from_secs(60 * i);
            let h = a.admit("t", "m", 100, now, DAY).unwrap();
            a.settle(h, 100, now);
        }
        let later = t0 + Duration::from_secs(600);
        sync(&mut a, &mut redis, later);
        sync(&mut b, &mut redis, later);
        let refused = b.admit("t", "m", 500, later, DAY).unwrap_err();
        assert_eq!(refused.limit(), "daily_token_budget");
        // Redis restarted empty: the totals are below what was seen; `b`
        // starts over from them instead of crediting a negative difference.
        redis.clear();
        sync(&mut b, &mut redis, later);
        assert!(b.admit("t", "m", 500, later, DAY).is_err(), "still counted");
    }

    /// What one replica spends in money counts against the other's daily
    /// cost budget after one sync, a new day's key starts from what others
    /// put in it, and a lost total is not credited back.
    #[test]
    fn spend_counts_on_every_replica() {
        let t0 = crate::testing::epoch();
        let (mut a, mut b) = (tenants(t0), tenants(t0));
        let mut redis = HashMap::new();
        sync(&mut a, &mut redis, t0);
        sync(&mut b, &mut redis, t0);
        let h = a.admit_costed("t", "m", 1, 8_000, t0, DAY).unwrap();
        // Held, not settled: a worst case is not spend; the others see
        // what it really cost once it settles.
        sync(&mut a, &mut redis, t0);
        sync(&mut b, &mut redis, t0);
        assert_eq!(b.report(t0)[0].spent_today, 0);
        a.settle_costed(h, 1, 6_000, t0);
        sync(&mut a, &mut redis, t0);
        sync(&mut b, &mut redis, t0);
        assert_eq!(b.report(t0)[0].spent_today, 6_000, "b sees a's spend");
        assert_eq!(a.report(t0)[0].spent_today, 6_000, "a counts it once");
        assert_eq!(
            b.admit_costed("t", "m", 1, 4_001, t0, DAY).unwrap_err().limit(),
            "daily_cost_budget"
        );
        let h = b.admit_costed("t", "m", 1, 4_000, t0, DAY).unwrap();
        b.settle_costed(h, 1, 0, t0);
        // The next day: a spends first; b's first sync of that day counts it.
        let next = Day { number: 8, ..DAY };
        let h = a.admit_costed("t", "m", 1, 9_000, t0, next).unwrap();
        a.settle_costed(h, 1, 9_000, t0);
        sync_on(&mut a, &mut redis, t0, next);
        sync_on(&mut b, &mut redis, t0, next);
        assert_eq!(b.report(t0)[0].spent_today, 9_000);
        assert!(b.admit_costed("t", "m", 1, 1_001, t0, next).is_err());
        redis.clear();
        sync_on(&mut b, &mut redis, t0, next);
        assert_eq!(b.report(t0)[0].spent_today, 9_000, "kept, not credited back");
    }

    /// A request reserved on one replica and settled below its reservation
    /// after a sync: the other replicas see the refund too (they counted
    /// the whole reservation), for the daily budget and the minute's tokens.
    #[test]
    fn a_refund_on_one_replica_is_seen_by_the_others() {
        let t0 = crate::testing::epoch();
        let (mut a, mut b) = (tenants(t0), tenants(t0));
        let mut redis = HashMap::new();
        sync(&mut a, &mut redis, t0);
        sync(&mut b, &mut redis, t0);
        // `a` reserves 550 of the day's 1,000; both replicas count it.
        let h = a.admit("t", "m", 550, t0, DAY).unwrap();
        sync(&mut a, &mut redis, t0);
        sync(&mut b, &mut redis, t0);
        assert!(
            b.admit("t", "m", 500, t0, DAY).is_err(),
            "b counts a's reservation"
        );
        // It settles at 50: 500 back.
        a.settle(h, 50, t0);
        sync(&mut a, &mut redis, t0);
        sync(&mut b, &mut redis, t0);
        assert_eq!(b.report(t0)[0].used_today, 50, "b sees the refund");
        let h = b
            .admit("t", "m", 500, t0, DAY)
            .expect("within the budget and the minute's tokens");
        b.settle(h, 500, t0);
        // A lost total still starts over rather than counting as a refund.
        sync(&mut b, &mut redis, t0);
        redis.clear();
        sync(&mut b, &mut redis, t0);
        assert_eq!(b.report(t0)[0].used_today, 550, "kept, not credited back");
    }

    #[test]
    fn charges_of_a_failed_sync_go_with_the_next() {
        let t0 = crate::testing::epoch();
        let mut a = tenants(t0);
        let h = a.admit("t", "m", 200, t0, DAY).unwrap();
        a.settle(h, 150, t0);
        let usage = a.usage_to_sync(DAY);
        assert_eq!((usage[0].delta, usage[0].refund), (200, 50));
        a.unsynced(&usage[0]);
        let again = &a.usage_to_sync(DAY)[0];
        assert_eq!((again.delta, again.refund), (200, 50));
    }
}
