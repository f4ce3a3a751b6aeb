//! Cost through the engine, in process on a paused clock: each reply's cost
//! to the micro-unit from its usage, for a table of models and prices (a
//! region's own price where it has one); a tenant stopped at its daily cost
//! budget, a request whose worst case would pass it refused at once while a
//! smaller one passes, and the tenant served again after the UTC reset (the
//! calendar moved on with `clock::shift_calendar`: this file's tests must
//! not depend on the day otherwise).

mod common;

use std::time::Duration;

use common::engine::*;
use dispatcher::core::Day;
use dispatcher::dispatch::hash_key;
use dispatcher::pb;
use tonic::Code;

/// gpt-4o at 2.50 / 10.00 (region "west": 5.00 / 20.00), mini at 0.15 /
/// 0.60, big at 10 / 30 (east only); tenant "b" has a daily cost budget
/// of 0.1.
fn world() -> World {
    let d = format!(
        r#"[pricing]
currency = "USD"
[[models]]
name = "gpt-4o"
price = {{ input = 2.50, output = 10.00 }}
[[models]]
name = "mini"
price = {{ input = 0.15, output = 0.60 }}
[[models]]
name = "big"
price = {{ input = 10.0, output = 30.0 }}
[[tenants]]
name = "a"
keys = ["{a}"]
[[tenants]]
name = "b"
keys = ["{b}"]
daily_cost_budget = 0.1
"#,
        a = hash_key("key-a"),
        b = hash_key("key-b"),
    );
    let model = |name: &str, extra: &str| {
        format!(
            "[[models]]\nname = \"{name}\"\ntokens_per_minute = 60000000\nrequests_per_minute = 1000000\n{extra}"
        )
    };
    let east = region_toml(
        "east",
        &format!("{}{}{}", model("gpt-4o", ""), model("mini", ""), model("big", "")),
    );
    let west = region_toml(
        "west",
        &model("gpt-4o", "price = { input = 5.00, output = 20.00 }\n"),
    );
    World::start(&config(&d, &[east, west]))
}

fn req(model: &str, prompt: u64, max_output: u64) -> pb::DispatchRequest {
    pb::DispatchRequest {
        model: model.into(),
        payload: "work".into(),
        prompt_tokens: prompt,
        max_output_tokens: max_output,
        ..Default::default()
    }
}

#[tokio::test(start_paused = true)]
async fn each_reply_costs_its_usage_at_its_price_to_the_micro_unit() {
    let w = world();
    // (model, prompt, completion reported, micro-units in east, in west)
    let table: &[(&str, u64, u64, u64, u64)] = &[
        ("gpt-4o", 1_000, 500, 7_500, 15_000),
        ("gpt-4o", 1, 0, 3, 5), // 2.5 → 3 (half up); 5
        ("gpt-4o", 3, 1, 18, 35),
        ("mini", 7, 0, 1, 0),  // 1.05 → 1
        ("mini", 10, 0, 2, 0), // 1.5 → 2
        ("mini", 100_000, 20_000, 27_000, 0),
        ("big", 150_000, 8_000, 1_740_000, 0),
        ("big", 0, 0, 0, 0),
    ];
    for (i, (model, prompt, completion, east, west)) in table.iter().enumerate() {
        for c in w.clusters.values() {
            c.always(Reply::ok().usage(*prompt, *completion));
        }
        let d = w
            .engine
            .dispatch(req(model, (*prompt).max(1), *completion + 1), None, KEY_A)
            .await
            .unwrap();
        let want = if d.region == "west" { *west } else { *east };
        assert_eq!(d.cost.micros, want, "row {i}: {model} in {}", d.region);
        assert!(d.cost.priced);
        assert_eq!(&*d.cost.currency, "USD");
        assert_eq!(d.path.model, *model);
    }
}

/// Two requests of tenant "b" on big, 1,000 + 1,000 tokens: 0.04 each
/// (the fake reports all of it).
async fn spend_two_big(w: &World) {
    for _ in 0..2 {
        let d = w
            .engine
            .dispatch(req("big", 1_000, 1_000), None, KEY_B)
            .await
            .unwrap();
        assert_eq!(d.cost.micros, 40_000);
    }
}

#[tokio::test(start_paused = true)]
async fn a_tenant_stopped_at_its_daily_budget_is_served_after_the_utc_reset() {
    let w = world();
    spend_two_big(&w).await;
    // 0.08 spent: another 0.04 would pass 0.1. Refused at once, nothing sent.
    let calls = w.calls();
    let t = w.elapsed();
    let e = w
        .engine
        .dispatch(req("big", 1_000, 1_000), None, KEY_B)
        .await
        .unwrap_err();
    let (code, retry) = status(&e);
    assert_eq!(code, Code::ResourceExhausted, "{e}");
    assert!(
        e.to_string().contains("daily_cost_budget 0.100000 reached"),
        "{e}"
    );
    let to_midnight = Day::at_unix(dispatcher::clock::calendar_secs()).next_in;
    let retry = retry.expect("RetryInfo to the UTC reset");
    assert!(
        retry <= to_midnight && retry + Duration::from_secs(5) >= to_midnight,
        "{retry:?} vs {to_midnight:?}"
    );
    assert_eq!((w.calls(), w.elapsed()), (calls, t), "refused at once");
    // A smaller request that fits passes: 100 + 100 tokens, 0.004.
    let d = w
        .engine
        .dispatch(req("big", 100, 100), None, KEY_B)
        .await
        .unwrap();
    assert_eq!(d.cost.micros, 4_000);
    // Tenant "a" has no budget: unaffected.
    w.engine
        .dispatch(req("big", 1_000, 1_000), None, KEY_A)
        .await
        .unwrap();

    // Past midnight UTC: a new day, a new budget.
    dispatcher::clock::shift_calendar(to_midnight + Duration::from_secs(1));
    spend_two_big(&w).await;
    let e = w
        .engine
        .dispatch(req("big", 1_000, 1_000), None, KEY_B)
        .await
        .unwrap_err();
    assert_eq!(
        status(&e).0,
        Code::ResourceExhausted,
        "the new day's budget holds too"
    );
}
