//! Cost end to end over real gRPC with real region-sim processes: each
//! reply's cost is its usage at the price of the region that served it (one
//! region prices the model itself); the tenant's spend in Admin
//! (ListTenants, GetTenant) and `dispatcher_cost_total` in /metrics are the
//! sum of the replies' costs, to the micro-unit; ListRegions shows each
//! price and its source; past the daily cost budget a request whose worst
//! case does not fit is refused at once (RESOURCE_EXHAUSTED, QuotaFailure
//! naming the budget, RetryInfo to the UTC reset) while a smaller one passes.

mod common;

use common::jobs::with_key;
use common::{ConfigDir, Proc, SimRegion};
use dispatcher::dispatch::hash_key;
use dispatcher::pb;
use tonic_types::StatusExt;

/// gpt-4o: 2.50 / 10.00 per million; "west" prices it 5.00 / 20.00.
/// In tenths of a micro-unit per token (2.50 per million is 2.5 micro-units
/// a token), rounded half up to the micro-unit.
fn expected(region: &str, u: &pb::Usage) -> u64 {
    let (input, output) = if region == "west" { (50, 200) } else { (25, 100) };
    (u.prompt_tokens * input + u.completion_tokens * output + 5) / 10
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spend_in_replies_admin_and_metrics_and_the_daily_budget_refuses_at_once() {
    let cfg = ConfigDir::new(&format!(
        r#"
[telemetry]
metrics_listen = "127.0.0.1:0"
[pricing]
currency = "EUR"
[[models]]
name = "gpt-4o"
price = {{ input = 2.50, output = 10.00 }}
[[tenants]]
name = "team-a"
daily_cost_budget = 0.2
keys = ["{}"]
"#,
        hash_key("k-a")
    ));
    let _east = cfg.start_region(SimRegion {
        name: "east",
        sim_args: &["--ms-per-1k-tokens", "5"],
        ..Default::default()
    });
    let _west = cfg.start_region(SimRegion {
        name: "west",
        sim_args: &["--ms-per-1k-tokens", "5"],
        extra_toml: "price = { input = 5.00, output = 20.00 }\n",
        ..Default::default()
    });
    let d = Proc::start(
        env!("CARGO_BIN_EXE_dispatcher"),
        &[
            "--config",
            cfg.config().to_str().unwrap(),
            "--listen",
            "127.0.0.1:0",
        ],
        cfg.path(),
        "dispatcher",
    );
    let metrics = d.listener("metrics");
    let mut grpc = common::client(d.addr).await;
    let small = || pb::DispatchRequest {
        model: "gpt-4o".into(),
        payload: "price me".into(),
        prompt_tokens: 1_000,
        max_output_tokens: 500,
        ..Default::default()
    };

    // Six small requests: worst case 0.015 each at west's price.
    let mut total = 0u64;
    let mut regions = std::collections::BTreeSet::new();
    for _ in 0..6 {
        let r = grpc
            .dispatch(with_key(small(), "k-a"))
            .await
            .unwrap()
            .into_inner();
        let usage = r.usage.unwrap();
        let cost = r.cost.clone().expect("a reply says what it cost");
        assert_eq!(cost.micros, expected(&r.region, &usage), "{r:?}");
        assert_eq!(cost.currency, "EUR");
        assert!(cost.priced);
        assert_eq!(cost.amount, format!("0.{:06}", cost.micros));
        assert_eq!(r.model, "gpt-4o", "the reply says which model served");
        total += cost.micros;
        regions.insert(r.region.clone());
    }
    assert!(total > 0);

    // Admin: spend today and this month, and the budget.
    let mut admin = common::admin(d.addr).await;
    let t = admin
        .get_tenant(pb::GetTenantRequest {
            name: "team-a".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(t.spent_today.as_ref().unwrap().micros, total);
    assert_eq!(t.spent_month.as_ref().unwrap().micros, total);
    assert_eq!(t.daily_cost_budget.as_ref().unwrap().micros, 200_000);
    assert_eq!(t.spent_today.unwrap().currency, "EUR");
    let listed = admin
        .list_tenants(pb::ListTenantsRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(listed.tenants[0].spent_today.as_ref().unwrap().micros, total);
    let unknown = admin
        .get_tenant(pb::GetTenantRequest {
            name: "nobody".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(unknown.code(), tonic::Code::NotFound);

    // Prices as Admin shows them.
    let regions_status = admin
        .list_regions(pb::ListRegionsRequest {})
        .await
        .unwrap()
        .into_inner();
    for r in &regions_status.regions {
        let price = r.models[0].price.as_ref().unwrap();
        assert!(price.priced);
        let (input, source) = if r.name == "west" {
            (5.0, "configured for this region")
        } else {
            (2.5, "the model's")
        };
        assert_eq!(
            (price.input_per_million, price.source.as_str()),
            (input, source),
            "{r:?}"
        );
    }

    // /metrics: dispatcher_cost_total sums to the replies' costs.
    let scraped = common::eventually(std::time::Duration::from_secs(5), || async {
        let body = common::scrape_metrics(metrics);
        let sum: f64 = body
            .lines()
            .filter(|l| l.starts_with("dispatcher_cost_total{") && l.contains("tenant=\"team-a\""))
            .map(|l| l.rsplit(' ').next().unwrap().parse::<f64>().unwrap())
            .sum();
        (sum * 1e6).round() as u64 == total
    })
    .await;
    assert!(scraped.is_some(), "{}", common::scrape_metrics(metrics));

    // Past the budget: 0.2 − spent (≤ 0.09) leaves ≥ 0.11; a worst case of
    // 0.25 (10,000 + 10,000 tokens at west's 5 / 20) is refused at once,
    // a worst case of 0.015 passes.
    let big = pb::DispatchRequest {
        prompt_tokens: 10_000,
        max_output_tokens: 10_000,
        ..small()
    };
    let refused = grpc.dispatch(with_key(big, "k-a")).await.unwrap_err();
    assert_eq!(refused.code(), tonic::Code::ResourceExhausted, "{refused:?}");
    assert!(
        refused.message().contains("daily_cost_budget 0.200000 reached"),
        "{}",
        refused.message()
    );
    let details = refused.get_error_details();
    let violation = &details.quota_failure().expect("QuotaFailure").violations[0];
    assert!(
        violation.description.contains("daily_cost_budget"),
        "{violation:?}"
    );
    let retry = details.retry_info().expect("RetryInfo").retry_delay.unwrap();
    assert!(retry > std::time::Duration::ZERO && retry <= std::time::Duration::from_secs(86_400));
    let passed = grpc
        .dispatch(with_key(small(), "k-a"))
        .await
        .unwrap()
        .into_inner();
    total += passed.cost.unwrap().micros;
    let t = admin
        .get_tenant(pb::GetTenantRequest {
            name: "team-a".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        t.spent_today.unwrap().micros,
        total,
        "the refused request cost nothing"
    );
}
