//! Tests of `tenant.rs`: limits, budgets and the day, with time passed in.

use super::*;

fn spec(name: &str) -> TenantSpec {
    TenantSpec {
        name: name.into(),
        weight: 1.0,
        requests_per_second: None,
        tokens_per_minute: Some(600),
        max_concurrent: Some(2),
        daily_token_budget: Some(1000),
        daily_cost_budget: None,
        monthly_cost_budget: None,
        cost_budget_warn_at: 0.8,
        models: Some(vec!["m".into()]),
        max_queued: 10,
    }
}

const DAY: Day = Day {
    number: 1,
    next_in: Duration::from_secs(3600),
    month: 0,
    month_next_in: Duration::from_secs(86_400),
};

#[test]
fn each_limit_refuses_with_its_name() {
    let t0 = crate::testing::epoch();
    let mut t = Tenants::try_new(&[spec("a")], t0).unwrap();
    assert_eq!(t.admit("x", "m", 1, t0, DAY), Err(TenantRefusal::Unknown));
    assert_eq!(t.admit("a", "other", 1, t0, DAY).unwrap_err().limit(), "models");
    let h1 = t.admit("a", "m", 300, t0, DAY).unwrap();
    let _h2 = t.admit("a", "m", 100, t0, DAY).unwrap();
    let e = t.admit("a", "m", 100, t0, DAY).unwrap_err();
    assert_eq!(e.limit(), "max_concurrent");
    t.settle(h1, 300, t0);
    let e = t.admit("a", "m", 300, t0, DAY).unwrap_err();
    assert_eq!(e.limit(), "tokens_per_minute");
    assert_eq!(
        e.retry_after(),
        Some(Duration::from_secs(10)),
        "100 short at 10 tokens/s"
    );
    assert!(e.to_string().contains("tokens_per_minute limit 600"), "{e}");
}

#[test]
fn daily_budget_counts_used_and_reserved_and_resets_next_day() {
    let t0 = crate::testing::epoch();
    let mut s = spec("a");
    s.tokens_per_minute = None;
    s.max_concurrent = None;
    let mut t = Tenants::try_new(&[s], t0).unwrap();
    let h = t.admit("a", "m", 600, t0, DAY).unwrap();
    t.settle(h, 500, t0);
    let _held = t.admit("a", "m", 400, t0, DAY).unwrap();
    let e = t.admit("a", "m", 101, t0, DAY).unwrap_err();
    assert_eq!(
        e,
        TenantRefusal::DailyBudget {
            budget: 1000,
            committed: 900,
            retry_after: Duration::from_secs(3600)
        }
    );
    let tomorrow = Day { number: 2, ..DAY };
    assert!(t.admit("a", "m", 500, t0, tomorrow).is_ok());
}

#[test]
fn settlement_refunds_the_token_bucket_and_records_usage() {
    let t0 = crate::testing::epoch();
    let mut t = Tenants::try_new(&[spec("a"), spec("b")], t0).unwrap();
    let h = t.admit("a", "m", 500, t0, DAY).unwrap();
    t.settle(h, 200, t0 + Duration::from_secs(1));
    let r = t.report(t0 + Duration::from_secs(1));
    assert_eq!(r[0].tokens_last_minute, 200);
    assert_eq!(r[0].requests_last_minute, 1);
    assert_eq!(r[0].share, 1.0);
    assert_eq!(r[0].entitlement, 1.0, "b is idle");
    assert_eq!(r[1].entitlement, 0.5, "b would get half if it came back");
    assert_eq!(r[0].tokens_available, Some(410));
    let later = t.report(t0 + Duration::from_secs(120));
    assert_eq!(later[0].tokens_last_minute, 0, "the window forgets");
}

#[test]
fn reload_keeps_counters() {
    let t0 = crate::testing::epoch();
    let mut t = Tenants::try_new(&[spec("a")], t0).unwrap();
    let _h = t.admit("a", "m", 300, t0, DAY).unwrap();
    let mut s = spec("a");
    s.weight = 3.0;
    s.tokens_per_minute = Some(1200);
    t.apply(&[s], t0).unwrap();
    assert_eq!(t.weights().of("a"), 3.0);
    let r = t.report(t0);
    assert_eq!(r[0].in_flight, 1);
    assert_eq!(r[0].tokens_available, Some(600), "half full stays half full");
}
