//! Cost end to end over real gRPC with real region-sim processes: each
//! reply's cost is its usage at the price of the region that served it (one
//! region prices the model itself); the tenant's spend in Admin
//! (ListTenants, GetTenant) and `dispatcher_cost_total` in /metrics are the
//! sum of the replies' costs, to the micro-unit; ListRegions shows each
//! price and its source; past the daily cost budget a request whose worst
//! case does not fit is refused at once (RESOURCE_EXHAUSTED, QuotaFailure
//! naming the budget, RetryInfo to the UTC reset) while a smaller one passes;
//! a stream's final chunk and a job's record carry their cost, and a
//! `[[routes]]` alias answers over real gRPC (Route, the reply, max_cost).

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

/// A stream's last chunk and a job's record carry the cost of what ran,
/// and the tenant's spend counts both; a `[[routes]]` alias over real
/// gRPC: `Route` shows the candidate's worst case, a reply names the
/// route, and a ceiling below it is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streams_jobs_and_routes_carry_their_cost() {
    let cfg = ConfigDir::new(&format!(
        r#"
[pricing]
currency = "EUR"
[[models]]
name = "gpt-4o"
price = {{ input = 2.50, output = 10.00 }}
[[routes]]
name = "assistant"
candidates = ["gpt-4o"]
[[tenants]]
name = "team-a"
keys = ["{}"]
[jobs]
data_dir = "data"
"#,
        hash_key("k-a")
    ));
    let _east = cfg.start_region(SimRegion {
        name: "east",
        sim_args: &["--ms-per-1k-tokens", "5", "--completion-min-fraction", "1"],
        ..Default::default()
    });
    let d = common::dispatcher(&cfg.config());
    let mut grpc = common::client(d.addr).await;
    let req = |model: &str| pb::DispatchRequest {
        model: model.into(),
        payload: "price me".into(),
        prompt_tokens: 1_000,
        max_output_tokens: 500,
        ..Default::default()
    };

    // A stream: the last chunk (done) has the cost; the others none.
    let mut chunks = grpc
        .dispatch_stream(with_key(req("gpt-4o"), "k-a"))
        .await
        .unwrap()
        .into_inner();
    let mut last = None;
    while let Some(c) = chunks.message().await.unwrap() {
        if !c.done {
            assert!(c.cost.is_none(), "{c:?}");
        }
        last = Some(c);
    }
    let last = last.unwrap();
    assert!(last.done);
    let stream_cost = last.cost.clone().expect("the final chunk's cost").micros;
    assert_eq!(stream_cost, expected("east", last.usage.as_ref().unwrap()));
    assert_eq!(stream_cost, 7_500, "1,000 in and 500 out at 2.50 / 10.00");

    // A job: its record carries the cost once DONE.
    let mut jobs = pb::jobs_client::JobsClient::connect(format!("http://{}", d.addr))
        .await
        .unwrap();
    let job = jobs
        .submit_job(with_key(
            pb::SubmitJobRequest {
                request: Some(req("gpt-4o")),
                ..Default::default()
            },
            "k-a",
        ))
        .await
        .unwrap()
        .into_inner();
    let done = common::eventually(std::time::Duration::from_secs(10), || {
        let mut jobs = jobs.clone();
        let id = job.job_id.clone();
        async move {
            let j = jobs
                .get_job(with_key(pb::JobRef { job_id: id }, "k-a"))
                .await
                .unwrap()
                .into_inner();
            j.state() == pb::JobState::Done
        }
    })
    .await;
    assert!(done.is_some(), "the job finished");
    let j = jobs
        .get_job(with_key(pb::JobRef { job_id: job.job_id }, "k-a"))
        .await
        .unwrap()
        .into_inner();
    let job_cost = j.cost.clone().expect("a DONE job's cost");
    assert_eq!(
        job_cost.micros,
        expected("east", j.usage.as_ref().unwrap()),
        "{j:?}"
    );
    assert_eq!(
        (job_cost.currency.as_str(), job_cost.amount.as_str()),
        ("EUR", "0.007500")
    );

    // The route: Route shows the candidate and its worst case (1,000 +
    // 500 at 2.50 / 10.00 = 0.0075), a reply names it.
    let decision = grpc
        .route(with_key(req("assistant"), "k-a"))
        .await
        .unwrap()
        .into_inner();
    let route = decision.route.expect("the route's decision");
    assert_eq!(
        (route.name.as_str(), route.chosen.as_str()),
        ("assistant", "gpt-4o")
    );
    assert_eq!(route.candidates[0].worst_case.as_ref().unwrap().micros, 7_500);
    assert_eq!(route.candidates[0].verdict, "chosen");
    assert_eq!(decision.model, "gpt-4o");
    let r = grpc
        .dispatch(with_key(
            pb::DispatchRequest {
                max_cost: "0.0075".into(),
                ..req("assistant")
            },
            "k-a",
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!((r.route.as_str(), r.model.as_str()), ("assistant", "gpt-4o"));
    let route_cost = r.cost.unwrap().micros;
    let refused = grpc
        .dispatch(with_key(
            pb::DispatchRequest {
                max_cost: "0.007499".into(),
                ..req("assistant")
            },
            "k-a",
        ))
        .await
        .unwrap_err();
    assert_eq!(refused.code(), tonic::Code::InvalidArgument, "{refused:?}");
    let details = refused.get_error_details();
    let field = &details.bad_request().expect("BadRequest").field_violations[0];
    assert_eq!(field.field, "max_cost", "{field:?}");

    // The tenant's spend: the stream, the job and the routed request.
    let t = common::admin(d.addr)
        .await
        .get_tenant(pb::GetTenantRequest {
            name: "team-a".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        t.spent_today.unwrap().micros,
        stream_cost + job_cost.micros + route_cost
    );
}
