//! Each request is decided with exactly one configuration version, however
//! reloads interleave with it. Two configurations alternate in a loop while
//! requests run: only the even versions accept the request's key and its
//! payload size. A request that was accepted must report an even version;
//! one decided with settings from two versions (the key checked against one,
//! the payload limit against another, the version read from a third) would
//! show up as an accepted request with an odd version, or as a refusal that
//! names the wrong cause.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use dispatcher::config::{self, Config, SimulateConfig};
use dispatcher::core::{Accounting, ModelLimits};
use dispatcher::dispatch::{DispatchError, Engine, hash_key};
use dispatcher::pb;
use dispatcher::sim::SimSpec;

/// Version 1 and every odd one: key "old", payloads up to 100 bytes.
/// Even versions: key "new", payloads up to 10,000 bytes.
fn config(even: bool, endpoint: &str) -> Config {
    let (key, payload) = if even { ("new", 10_000) } else { ("old", 100) };
    let toml = format!(
        "[limits]\nmax_payload_bytes = {payload}\n[[models]]\nname = \"gpt-4o\"\n[[tenants]]\nname = \"t\"\nkeys = [\"{}\"]\n",
        hash_key(key)
    );
    let mut c = config::parse_dispatcher(&toml, Path::new("dispatcher.toml"), Some(HashMap::new())).unwrap();
    let region = format!(
        "name = \"r\"\nendpoint = \"{endpoint}\"\n[[models]]\nname = \"gpt-4o\"\ntokens_per_minute = 100000000\nrequests_per_minute = 10000000\n"
    );
    c.regions = vec![config::parse_region(&region, Path::new("regions/r.toml"), &c.models).unwrap()];
    c
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_request_sees_exactly_one_config_version() {
    let limits = ModelLimits {
        tokens_per_minute: 100_000_000,
        requests_per_minute: 10_000_000,
        burst_tokens: None,
        burst_requests: None,
        accounting: Accounting::Admission,
    };
    let sim = dispatcher::sim::spawn(
        SimSpec {
            region: "r".into(),
            models: vec![("gpt-4o".into(), limits)],
            settings: SimulateConfig {
                ms_per_1k_tokens: 0.0,
                base_latency_ms: 0.0,
                ..Default::default()
            },
        },
        ([127, 0, 0, 1], 0).into(),
    )
    .await
    .unwrap();
    let endpoint = sim.endpoint();
    let endpoints = [("r".to_string(), endpoint.clone())];
    let engine = Engine::new(&config(false, &endpoint), &endpoints).unwrap();
    engine.spawn_pump(Default::default());

    // Reloads alternate the two configurations as fast as they go.
    let stop = Arc::new(AtomicBool::new(false));
    let applied = Arc::new(AtomicUsize::new(0));
    let reloader = {
        let (engine, stop, endpoints, applied) =
            (engine.clone(), stop.clone(), endpoints.clone(), applied.clone());
        tokio::spawn(async move {
            let configs = [config(true, &endpoint), config(false, &endpoint)];
            let mut n = 0;
            while !stop.load(Ordering::Relaxed) {
                engine.apply(&configs[n % 2], &endpoints).unwrap();
                n += 1;
                applied.store(n, Ordering::Relaxed);
                tokio::task::yield_now().await;
            }
            n
        })
    };

    // In 40 waves of 10, each after at least one more reload, so that
    // requests are decided under both versions however fast they run.
    let mut calls = tokio::task::JoinSet::new();
    for i in 0..400 {
        if i % 10 == 0 {
            let seen = applied.load(Ordering::Relaxed);
            while applied.load(Ordering::Relaxed) == seen {
                tokio::task::yield_now().await;
            }
        }
        let engine = engine.clone();
        calls.spawn(async move {
            let r = pb::DispatchRequest {
                model: "gpt-4o".into(),
                payload: vec![b'x'; 500].into(),
                max_output_tokens: 10,
                ..Default::default()
            };
            engine.dispatch(r, None, Some("Bearer new")).await
        });
    }
    let (mut accepted, mut refused) = (0, 0);
    while let Some(result) = calls.join_next().await {
        match result.unwrap() {
            Ok(reply) => {
                accepted += 1;
                assert_eq!(
                    reply.config_version % 2,
                    0,
                    "accepted with the key and limit of an even version, but decided with version {}",
                    reply.config_version
                );
            }
            // An odd version refuses the key before looking at the payload.
            Err(DispatchError::Unauthenticated(_)) => refused += 1,
            Err(e) => panic!("decided with settings of two versions: {e}"),
        }
    }
    stop.store(true, Ordering::Relaxed);
    let reloads = reloader.await.unwrap();
    println!("{accepted} accepted, {refused} refused, over {reloads} reloads");
    assert!(reloads >= 10, "the configuration changed while requests ran");
    assert!(accepted > 0 && refused > 0, "both versions decided requests");
}
