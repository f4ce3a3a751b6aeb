//! A tenant's spend in money (micro-units of the configured currency): what
//! it spent this UTC day and month, the worst cases its requests in flight
//! hold, and its cost budgets checked at admission. A request holds its
//! worst-case cost (prompt + max output at the dearest price of its model)
//! until it settles to its real cost, so concurrent requests cannot together
//! overshoot a budget. Shared across replicas like the token counts
//! (`tenant_sync.rs`), but only what was settled: a hold is a worst case,
//! often many times the real cost, and counting the others' holds as spent
//! would stop a tenant far below its budget. So the replicas together stay
//! within a budget to one sync interval of each other's settled spend plus
//! the requests they have in flight. Also the UTC calendar the edge's `Day`
//! comes from.

use std::time::Duration;

use super::{Day, TenantRefusal, TenantSpec};

/// Which cost budget.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BudgetPeriod {
    Day,
    Month,
}

impl BudgetPeriod {
    /// The budget's key in dispatcher.toml.
    pub fn key(self) -> &'static str {
        match self {
            BudgetPeriod::Day => "daily_cost_budget",
            BudgetPeriod::Month => "monthly_cost_budget",
        }
    }

    pub(super) fn this(self) -> &'static str {
        match self {
            BudgetPeriod::Day => "today (UTC)",
            BudgetPeriod::Month => "this month (UTC)",
        }
    }
}

/// One tenant's spend; owned by its `TenantState`.
#[derive(Debug, Clone, Default)]
pub(super) struct Spend {
    day: u64,
    month: u64,
    today: u64,
    this_month: u64,
    /// Worst cases held by requests in flight.
    reserved: u64,
    /// With `[cluster]`: cost settled here not yet reported to the other
    /// replicas (only ever grows between syncs, so a shared total that
    /// shrinks can only mean Redis lost it).
    pub(super) unsynced: i64,
    /// The shared totals as last seen: (day, its total, month, its total).
    pub(super) seen: Option<(u64, i64, u64, i64)>,
}

impl Spend {
    /// Starts the new day or month's counts.
    pub(super) fn roll(&mut self, day: Day) {
        if self.day != day.number {
            self.day = day.number;
            self.today = 0;
        }
        if self.month != day.month {
            self.month = day.month;
            self.this_month = 0;
        }
    }

    /// Whether `need` (a worst case) fits the tenant's cost budgets with
    /// what was spent and is held.
    pub(super) fn check(&self, spec: &TenantSpec, need: u64, day: Day) -> Result<(), TenantRefusal> {
        let budgets = [
            (BudgetPeriod::Day, spec.daily_cost_budget, self.today, day.next_in),
            (
                BudgetPeriod::Month,
                spec.monthly_cost_budget,
                self.this_month,
                day.month_next_in,
            ),
        ];
        for (period, budget, spent, retry_after) in budgets {
            let Some(budget) = budget else { continue };
            let committed = spent.saturating_add(self.reserved);
            if committed.saturating_add(need) > budget {
                return Err(TenantRefusal::CostBudget {
                    period,
                    budget,
                    committed,
                    need,
                    retry_after,
                });
            }
        }
        Ok(())
    }

    pub(super) fn hold(&mut self, need: u64) {
        self.reserved += need;
    }

    /// A hold of `held` settled at `cost`, for the day and month it was
    /// admitted in (a request that ends after midnight counts for the day
    /// it began, and not at all once that day's counts are gone).
    pub(super) fn settle(&mut self, held: u64, cost: u64, day: u64, month: u64) {
        self.reserved = self.reserved.saturating_sub(held);
        self.unsynced += cost as i64;
        if self.day == day {
            self.today += cost;
        }
        if self.month == month {
            self.this_month += cost;
        }
    }

    pub(super) fn today(&self) -> u64 {
        self.today
    }

    pub(super) fn this_month(&self) -> u64 {
        self.this_month
    }

    pub(super) fn period(&self) -> (u64, u64) {
        (self.day, self.month)
    }

    /// What the other replicas added: `delta` was this replica's part of
    /// the new totals (after `delta` was added, in Redis).
    pub(super) fn synced(&mut self, (day, month): (u64, u64), delta: i64, day_total: i64, month_total: i64) {
        let (seen_day, seen_month) = match self.seen {
            Some((d, dt, m, mt)) => (if d == day { dt } else { 0 }, if m == month { mt } else { 0 }),
            None => (day_total - delta, month_total - delta),
        };
        // A total below what was seen: Redis lost it (restart); start over.
        if self.day == day && day_total >= seen_day + delta {
            self.today = self.today.saturating_add_signed(day_total - seen_day - delta);
        }
        if self.month == month && month_total >= seen_month + delta {
            self.this_month = self
                .this_month
                .saturating_add_signed(month_total - seen_month - delta);
        }
        self.seen = Some((day, day_total, month, month_total));
    }
}

impl Day {
    /// The UTC day and month at `unix_secs` seconds after the epoch.
    pub fn at_unix(unix_secs: u64) -> Day {
        const DAY: u64 = 86_400;
        let number = unix_secs / DAY;
        let (year, month) = year_month(number);
        let (next_year, next_month) = if month == 12 {
            (year + 1, 1)
        } else {
            (year, month + 1)
        };
        let next_month_starts = days_from_civil(next_year, next_month, 1) * DAY;
        Day {
            number,
            next_in: Duration::from_secs(DAY - unix_secs % DAY),
            month: (year - 1970) * 12 + (month - 1),
            month_next_in: Duration::from_secs(next_month_starts - unix_secs),
        }
    }
}

/// The (year, month 1-12) of a day counted from 1970-01-01 (Howard
/// Hinnant's civil-from-days, for days on or after the epoch).
fn year_month(days: u64) -> (u64, u64) {
    let z = days + 719_468;
    let era = z / 146_097;
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + u64::from(month <= 2);
    (year, month)
}

/// Days from 1970-01-01 to year-month-day (on or after the epoch).
fn days_from_civil(year: u64, month: u64, day: u64) -> u64 {
    let y = if month <= 2 { year - 1 } else { year };
    let era = y / 400;
    let yoe = y - era * 400;
    let mp = if month > 2 { month - 3 } else { month + 9 };
    let doy = (153 * mp + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

#[cfg(test)]
mod tests {
    use super::super::Tenants;
    use super::*;

    #[test]
    fn the_utc_calendar_counts_days_and_months() {
        // 2026-12-06 14:00:00 UTC.
        let at = 1_796_565_600;
        let d = Day::at_unix(at);
        assert_eq!(d.number, 20_793);
        assert_eq!(d.next_in, Duration::from_secs(10 * 3600));
        assert_eq!(d.month, 56 * 12 + 11, "December 2026");
        assert_eq!(
            d.month_next_in,
            Duration::from_secs((25 * 24 + 10) * 3600),
            "to 2027-01-01"
        );
        // 2024-02-29 (a leap day) 23:59:59 → March in one second.
        let leap = Day::at_unix(1_709_251_199);
        assert_eq!(leap.month, 54 * 12 + 1);
        assert_eq!(leap.month_next_in, Duration::from_secs(1));
        assert_eq!(Day::at_unix(1_709_251_200).month, 54 * 12 + 2);
        assert_eq!(Day::at_unix(0).month, 0);
        assert_eq!(days_from_civil(2000, 3, 1), 11_017);
    }

    fn spec(daily: Option<u64>, monthly: Option<u64>) -> TenantSpec {
        TenantSpec {
            name: "t".into(),
            weight: 1.0,
            requests_per_second: None,
            tokens_per_minute: None,
            max_concurrent: None,
            daily_token_budget: None,
            daily_cost_budget: daily,
            monthly_cost_budget: monthly,
            cost_budget_warn_at: 0.8,
            models: None,
            max_queued: 10,
        }
    }

    fn day(number: u64, month: u64) -> Day {
        Day {
            number,
            next_in: Duration::from_secs(600),
            month,
            month_next_in: Duration::from_secs(86_400),
        }
    }

    /// Stopped at the daily budget, served again after the UTC reset;
    /// the monthly budget still counts what the day spent.
    #[test]
    fn a_tenant_stopped_at_its_daily_budget_is_served_after_midnight() {
        let t0 = crate::testing::epoch();
        let mut t = Tenants::try_new(&[spec(Some(10_000), Some(25_000))], t0).unwrap();
        for _ in 0..3 {
            let h = t.admit_costed("t", "m", 10, 4_000, t0, day(1, 0)).unwrap();
            t.settle_costed(h, 10, 3_000, t0);
        }
        // 9,000 spent: a worst case of 1,001 passes the budget, refused at once.
        let e = t.admit_costed("t", "m", 10, 1_001, t0, day(1, 0)).unwrap_err();
        assert_eq!(e.limit(), "daily_cost_budget");
        assert_eq!(
            e.retry_after(),
            Some(Duration::from_secs(600)),
            "until the UTC reset"
        );
        assert!(
            e.to_string().contains("daily_cost_budget 0.010000 reached"),
            "{e}"
        );
        // A smaller one fits.
        let h = t.admit_costed("t", "m", 10, 1_000, t0, day(1, 0)).unwrap();
        t.settle_costed(h, 10, 1_000, t0);
        assert!(t.admit_costed("t", "m", 10, 1, t0, day(1, 0)).is_err(), "spent");
        // The next day: served, and the report says what each period spent.
        let h = t.admit_costed("t", "m", 10, 9_000, t0, day(2, 0)).unwrap();
        t.settle_costed(h, 10, 9_000, t0);
        let r = &t.report(t0)[0];
        assert_eq!((r.spent_today, r.spent_month), (9_000, 19_000));
        // The month's budget (25,000) stops it before the day's would.
        let e = t.admit_costed("t", "m", 10, 6_001, t0, day(3, 0)).unwrap_err();
        assert_eq!(e.limit(), "monthly_cost_budget");
        assert_eq!(e.retry_after(), Some(Duration::from_secs(86_400)));
        assert!(
            t.admit_costed("t", "m", 10, 6_001, t0, day(33, 1)).is_ok(),
            "a new month"
        );
    }

    /// Worst cases held by requests in flight count against the budget;
    /// settling to the real cost gives the difference back.
    #[test]
    fn holds_count_until_settled_to_the_real_cost() {
        let t0 = crate::testing::epoch();
        let mut t = Tenants::try_new(&[spec(Some(10_000), None)], t0).unwrap();
        let a = t.admit_costed("t", "m", 10, 6_000, t0, day(1, 0)).unwrap();
        let e = t.admit_costed("t", "m", 10, 6_000, t0, day(1, 0)).unwrap_err();
        assert!(
            matches!(
                e,
                TenantRefusal::CostBudget {
                    committed: 6_000,
                    need: 6_000,
                    ..
                }
            ),
            "{e:?}"
        );
        t.settle_costed(a, 10, 1_500, t0);
        assert!(t.admit_costed("t", "m", 10, 6_000, t0, day(1, 0)).is_ok());
        // A request admitted yesterday and settled today counts for yesterday.
        let mut t = Tenants::try_new(&[spec(Some(10_000), None)], t0).unwrap();
        let late = t.admit_costed("t", "m", 10, 5_000, t0, day(1, 0)).unwrap();
        t.roll(day(2, 0));
        t.settle_costed(late, 10, 5_000, t0);
        assert_eq!(t.report(t0)[0].spent_today, 0);
        assert_eq!(t.report(t0)[0].spent_month, 5_000);
    }
}
