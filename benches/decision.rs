//! The decision path (choose + reserve + settle) in the pure core, for 4, 16
//! and 64 regions and every strategy. Time is passed in: each decision is
//! 1 ms after the last, so the buckets refill (16,667 tokens and 1.7 requests
//! a millisecond per region) faster than a decision uses them (1,200 tokens,
//! one request) however many iterations criterion runs.

use std::time::{Duration, Instant};

use criterion::{BenchmarkId, Criterion, criterion_group, criterion_main};
use dispatcher::core::{
    Accounting, Completion, ModelLimits, ModelSpec, Outcome, RegionSpec, RouteRequest, Router, RouterSpec,
    Settlement, StrategyKind, StrategyParams,
};

fn spec(regions: usize, strategy: StrategyKind) -> RouterSpec {
    RouterSpec {
        models: vec![ModelSpec {
            name: "gpt-4o".into(),
            default_max_output_tokens: 512,
            chars_per_token: 4.0,
            max_request_tokens: 100_000,
        }],
        regions: (0..regions)
            .map(|i| RegionSpec {
                name: format!("region-{i:02}"),
                weight: 1.0 + (i % 3) as f64,
                max_concurrent: 100_000,
                models: vec![(
                    "gpt-4o".into(),
                    ModelLimits {
                        tokens_per_minute: 1_000_000_000,
                        requests_per_minute: 100_000_000,
                        burst_tokens: None,
                        burst_requests: None,
                        accounting: Accounting::Usage,
                    },
                )],
            })
            .collect(),
        strategy,
        params: StrategyParams::default(),
        seed: 1,
        breaker: dispatcher::core::BreakerConfig::default(),
        sharing: None,
    }
}

fn decision_path(c: &mut Criterion) {
    let mut group = c.benchmark_group("decision");
    for regions in [4, 16, 64] {
        for kind in StrategyKind::ALL {
            let t0 = Instant::now();
            let mut router = Router::try_new(spec(regions, kind), t0).unwrap();
            let req = RouteRequest {
                model: "gpt-4o",
                tokens: 1_500,
                origin: Some("region-01"),
            };
            let mut tick = 0u64;
            group.bench_function(BenchmarkId::new(kind.as_str(), regions), |b| {
                b.iter(|| {
                    tick += 1;
                    let now = t0 + Duration::from_millis(tick);
                    let r = router.reserve(&req, &[], now).unwrap();
                    router.settle(
                        &r,
                        Completion {
                            settlement: Settlement::Used {
                                prompt: 1_000,
                                completion: 200,
                            },
                            outcome: Some(Outcome::Success),
                            latency: Duration::from_millis(300),
                            hint: None,
                            load: None,
                            provider_refused: None,
                        },
                        now,
                    );
                })
            });
        }
    }
    group.finish();
}

criterion_group!(benches, decision_path);
criterion_main!(benches);
