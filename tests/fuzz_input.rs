//! Hostile input: random and extreme DispatchRequests and config files never
//! panic anything; every refusal names what is wrong.

mod common;

use std::collections::HashMap;
use std::path::Path;

use common::{ConfigDir, client, dispatcher};
use dispatcher::config;
use dispatcher::dispatch::{DispatchError, Engine};
use dispatcher::pb;
use proptest::prelude::*;
use proptest::strategy::ValueTree;

const DISPATCHER_TOML: &str = r#"
[auth]
allow_anonymous = true
[limits]
max_payload_bytes = 65536
[[models]]
name = "gpt-4o"
max_request_tokens = 32000
"#;

const REGION: &str = r#"
name = "r1"
endpoint = "http://127.0.0.1:9"
weight = 1.5
max_concurrent = 8
[[models]]
name = "gpt-4o"
tokens_per_minute = 100000
requests_per_minute = 100
burst_tokens = 5000
accounting = "usage"
[health]
interval = "1s"
unhealthy_threshold = 2
[simulate]
ms_per_1k_tokens = 10
failure_rate = 0.1
"#;

fn engine(rt: &tokio::runtime::Runtime) -> std::sync::Arc<Engine> {
    let _guard = rt.enter();
    let mut c = config::parse_dispatcher(
        DISPATCHER_TOML,
        Path::new("dispatcher.toml"),
        Some(HashMap::new()),
    )
    .unwrap();
    c.regions = vec![config::parse_region(REGION, Path::new("regions/r1.toml"), &c.models).unwrap()];
    Engine::new(&c, &[("r1".into(), "http://127.0.0.1:9".into())]).unwrap()
}

fn text() -> impl Strategy<Value = String> {
    prop_oneof![
        Just(String::new()),
        Just("gpt-4o".to_string()),
        "\\PC{0,40}",
        "[a-z0-9-]{100,300}",
        ".{0,8}\u{0}\u{7}.{0,8}",
    ]
}

fn count() -> impl Strategy<Value = u64> {
    prop_oneof![Just(0u64), 1u64..40_000, Just(u64::MAX), any::<u64>()]
}

prop_compose! {
    fn request()(
        tenant in text(),
        model in text(),
        payload in prop_oneof![Just(Vec::new()), proptest::collection::vec(any::<u8>(), 0..512), Just(vec![b'x'; 70_000])],
        prompt_tokens in count(),
        max_output_tokens in count(),
        origin_region in text(),
        request_id in text(),
        labels in proptest::collection::hash_map(text(), text(), 0..40),
        max_cost in text(),
    ) -> pb::DispatchRequest {
        pb::DispatchRequest { tenant, model, payload: payload.into(), prompt_tokens, max_output_tokens, origin_region, request_id, labels, no_fallback: false, max_cost, latency_budget: None, cache: None }
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 1000, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn any_request_is_checked_without_panicking(r in request()) {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        let e = engine(&rt);
        match e.check(&r) {
            Ok(estimate) => {
                prop_assert!(estimate.total() <= 32_000);
                prop_assert!(r.payload.len() <= 65_536);
                // A dry run of a valid request never panics either.
                let _ = e.route(&r, None);
            }
            Err(DispatchError::InvalidArgument(violations)) => {
                prop_assert!(!violations.is_empty());
                for v in violations {
                    prop_assert!(!v.field.is_empty() && !v.description.is_empty());
                }
            }
            Err(other) => prop_assert!(false, "unexpected {other:?}"),
        }
    }

    #[test]
    fn random_bytes_as_config_files_are_refused_with_the_file_named(bytes in proptest::collection::vec(any::<u8>(), 0..400)) {
        let text = String::from_utf8_lossy(&bytes);
        if let Err(e) = config::parse_dispatcher(&text, Path::new("dispatcher.toml"), Some(HashMap::new())) {
            prop_assert!(e.to_string().starts_with("dispatcher.toml"), "{e}");
        }
        let models = config::parse_dispatcher(DISPATCHER_TOML, Path::new("d.toml"), Some(HashMap::new())).unwrap().models;
        let e = config::parse_region(&text, Path::new("regions/x.toml"), &models).unwrap_err();
        prop_assert!(e.to_string().starts_with("regions/x.toml"), "{e}");
    }

    #[test]
    fn wrong_types_and_huge_numbers_in_a_region_file_are_refused_clearly(
        line in 0usize..18,
        value in prop_oneof![
            Just("\"x\""), Just("-1"), Just("1e309"), Just("18446744073709551616"), Just("true"),
            Just("[1, 2]"), Just("{ a = 1 }"), Just("\"\""), Just("0"), Just("9999999999999999999"),
            Just("nan"), Just("-inf"), Just("1.5"), Just("\"1h\""), Just("\"-5s\""),
        ],
    ) {
        let mut lines: Vec<String> = REGION.lines().map(str::to_string).collect();
        let candidates: Vec<usize> = lines.iter().enumerate().filter(|(_, l)| l.contains(" = ")).map(|(i, _)| i).collect();
        let i = candidates[line % candidates.len()];
        let key = lines[i].split(" = ").next().unwrap().to_string();
        lines[i] = format!("{key} = {value}");
        let text = lines.join("\n");
        let models = config::parse_dispatcher(DISPATCHER_TOML, Path::new("d.toml"), Some(HashMap::new())).unwrap().models;
        if let Err(e) = config::parse_region(&text, Path::new("regions/r1.toml"), &models) {
            let shown = e.to_string();
            prop_assert!(shown.starts_with("regions/r1.toml"), "{shown}");
            prop_assert!(shown.contains(key.trim()) || e.key.is_empty(), "{key}: {shown}");
        }
    }
}

/// The same kind of input over real gRPC: the server answers every one and
/// keeps serving.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_requests_over_grpc_never_take_the_server_down() {
    let cfg = ConfigDir::new(DISPATCHER_TOML);
    cfg.write_region("r1", "[[models]]\nname = \"gpt-4o\"\ntokens_per_minute = 1000000\nrequests_per_minute = 100000\n[simulate]\nms_per_1k_tokens = 1\n");
    let d = dispatcher(&cfg.config());
    let mut grpc = client(d.addr).await;
    let mut runner = proptest::test_runner::TestRunner::deterministic();
    let mut codes = std::collections::BTreeMap::new();
    for _ in 0..300 {
        let mut r = request().new_tree(&mut runner).unwrap().current();
        // Past authentication, so the checks behind it are reached too.
        r.tenant.clear();
        let code = match grpc.dispatch(r).await {
            Ok(_) => tonic::Code::Ok,
            Err(s) => s.code(),
        };
        *codes.entry(format!("{code:?}")).or_insert(0) += 1;
    }
    println!("300 hostile requests answered: {codes:?}");
    assert!(
        codes
            .keys()
            .all(|c| ["Ok", "InvalidArgument"].contains(&c.as_str())),
        "{codes:?}"
    );
    let ok = grpc
        .dispatch(pb::DispatchRequest {
            model: "gpt-4o".into(),
            payload: "still here?".into(),
            ..Default::default()
        })
        .await;
    assert!(ok.is_ok(), "still serving: {ok:?}");
}
