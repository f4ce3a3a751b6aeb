//! The fair queue with 10 and 10,000 tenants: one request in and one out
//! (push + pop) at a steady depth of two waiters per tenant, and what a new
//! request's admission asks of it (`tokens_ahead` + `share`).

use std::hint::black_box;
use std::sync::Arc;
use std::time::{Duration, Instant};

use criterion::{BenchmarkId, Criterion, criterion_group, criterion_main};
use dispatcher::core::{Discipline, FairQueue, Waiter, Weights};

fn waiter(id: u64, tenant: &Arc<str>, model: &Arc<str>, now: Instant) -> Waiter<()> {
    Waiter {
        id,
        model: model.clone(),
        // Sizes vary so the tags interleave rather than tie.
        tokens: 200 + (id * 7919) % 1800,
        origin: None,
        tenant: tenant.clone(),
        tried: Vec::new(),
        enqueued: now,
        deadline: now + Duration::from_secs(30),
        retry_at: None,
        ticket: (),
    }
}

/// A queue holding two waiters for each of `tenants` tenants (a quarter of
/// them weighted 4), and the tenant names.
fn filled(tenants: usize, now: Instant) -> (FairQueue<()>, Vec<Arc<str>>, Arc<str>) {
    let model: Arc<str> = Arc::from("gpt-4o");
    let names: Vec<Arc<str>> = (0..tenants)
        .map(|i| Arc::from(format!("tenant-{i:05}")))
        .collect();
    let weights = Weights {
        by_tenant: names.iter().step_by(4).map(|n| (n.clone(), 4.0)).collect(),
        default: 1.0,
    };
    let mut q = FairQueue::new(Arc::new(weights));
    let mut id = 0;
    for _ in 0..2 {
        for n in &names {
            q.push(waiter(id, n, &model, now));
            id += 1;
        }
    }
    (q, names, model)
}

fn fair_queue(c: &mut Criterion) {
    let now = Instant::now();
    for tenants in [10usize, 10_000] {
        let mut group = c.benchmark_group("fair_queue");
        let (mut q, names, model) = filled(tenants, now);
        let mut id = 1u64 << 32;
        let mut next = 0usize;
        group.bench_function(BenchmarkId::new("push_pop", tenants), |b| {
            b.iter(|| {
                // Served in fair order; the queue stays at its depth.
                let w = q.pop().expect("never empty");
                let tenant = w.tenant.clone();
                black_box(w);
                id += 1;
                q.push(waiter(id, &tenant, &model, now));
            })
        });
        group.bench_function(BenchmarkId::new("admission", tenants), |b| {
            b.iter(|| {
                next = (next + 1) % names.len();
                let t = &names[next];
                black_box((q.tokens_ahead(t), q.share(t)))
            })
        });
        group.finish();
    }
}

criterion_group!(benches, fair_queue);
criterion_main!(benches);
