//! Prometheus metrics: recorded with the `metrics` crate where things
//! happen, rendered by metrics-exporter-prometheus, served as text at
//! `/metrics` on their own port. Gauges of the router's state (bucket levels,
//! in flight, queue depth, circuit state) are sampled once a second from a
//! plain view of it, so this module depends on no engine (a leaf), and a
//! region's gauges are there from the first sample, not its first event.
//!
//! Every gauge is set again at least once a second (by this sampler, the
//! health and capacity loops, the job keeper); one not set for
//! `GAUGE_IDLE` is dropped from `/metrics`. That is how the gauges of a
//! region, model or tenant a reload removed go away instead of reporting
//! its last value for ever. A new gauge must be refreshed likewise.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use http_body_util::Full;
use hyper::body::Bytes;
use hyper::{Request, Response, StatusCode};
use metrics::{describe_counter, describe_gauge, describe_histogram, gauge};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use metrics_util::MetricKindMask;
use tokio_util::sync::CancellationToken;

use crate::state::EngineView;

static ENABLED: AtomicBool = AtomicBool::new(false);

/// Whether metrics are served; when not, the request path records nothing.
pub fn enabled() -> bool {
    ENABLED.load(Ordering::Relaxed)
}

/// Latency buckets, in seconds: 1 ms to 2 minutes.
const SECONDS: [f64; 16] = [
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0,
];

fn describe() {
    describe_counter!(
        "dispatcher_cache_lookups_total",
        "Response cache lookups of requests that opted in, by tenant and result (hit, miss)"
    );
    describe_counter!(
        "dispatcher_cache_shared_hits_total",
        "Response cache hits served from the shared layer (Redis), by tenant"
    );
    describe_counter!(
        "dispatcher_cache_shared_errors_total",
        "Shared cache calls that failed or timed out (each a miss, never an error), by tenant and op"
    );
    describe_counter!(
        "dispatcher_cache_stores_total",
        "Replies offered to the response cache, by tenant and result (stored, too_large, no_room)"
    );
    describe_counter!(
        "dispatcher_cache_evictions_total",
        "Entries that left this process's response cache, by tenant and reason (expired, tenant_bound, total_bound, replaced, purged)"
    );
    describe_gauge!(
        "dispatcher_cache_entries",
        "Entries in this process's response cache, by tenant"
    );
    describe_gauge!(
        "dispatcher_cache_bytes",
        metrics::Unit::Bytes,
        "Bytes of replies in this process's response cache, by tenant"
    );
    describe_counter!(
        "dispatcher_requests_total",
        "Requests answered, by model, tenant, region (empty when none was reached) and outcome"
    );
    describe_counter!(
        "dispatcher_openai_requests_total",
        "Answers of the OpenAI-compatible front door, by endpoint (chat_completions, models) and HTTP status; its requests are in dispatcher_requests_total too"
    );
    describe_histogram!(
        "dispatcher_request_duration_seconds",
        metrics::Unit::Seconds,
        "Time from receiving a request to answering it"
    );
    describe_counter!(
        "dispatcher_attempts_total",
        "Forwarding attempts to a region, by result (ok, not_run, provider_refused, rejected, may_have_run, timeout)"
    );
    describe_counter!(
        "dispatcher_tokens_reserved_total",
        "Tokens reserved in a region's bucket before forwarding"
    );
    describe_counter!(
        "dispatcher_tokens_charged_total",
        "Tokens finally charged to a region's bucket at settlement"
    );
    describe_counter!(
        "dispatcher_tokens_refunded_total",
        "Reserved tokens given back at settlement"
    );
    describe_counter!(
        "dispatcher_provider_hints_total",
        "Provider rate-limit hints received, by result (applied, lowered, ignored)"
    );
    describe_histogram!(
        "dispatcher_queue_wait_seconds",
        metrics::Unit::Seconds,
        "Time requests waited for quota before being reserved"
    );
    describe_gauge!(
        "dispatcher_bucket_tokens_available",
        "Tokens left in a region model's bucket"
    );
    describe_gauge!(
        "dispatcher_bucket_tokens_reserved",
        "Tokens reserved by requests in flight in a region model"
    );
    describe_gauge!(
        "dispatcher_bucket_requests_available",
        "Requests left in a region model's request bucket"
    );
    describe_gauge!(
        "dispatcher_region_in_flight",
        "Our requests in flight in a region"
    );
    describe_gauge!(
        "dispatcher_region_utilization",
        "max(in flight / max_concurrent, reported utilisation)"
    );
    describe_gauge!(
        "dispatcher_region_drained",
        "1 when an operator drained the region"
    );
    describe_gauge!(
        "dispatcher_region_healthy",
        "1 when the region passes its health checks"
    );
    describe_gauge!("dispatcher_queue_depth", "Requests waiting for quota, by model");
    describe_gauge!(
        "dispatcher_jobs",
        "Jobs this replica holds, by state (queued: waiting for their turn; running: in the dispatch path)"
    );
    describe_gauge!("dispatcher_job_store_jobs", "Jobs in the job store, all states");
    describe_gauge!(
        "dispatcher_job_store_writable",
        "1 while the job store takes writes, 0 while it refuses them (a full disk, a store being reopened)"
    );
    describe_gauge!(
        "dispatcher_job_store_bytes",
        "Bytes of the job store's records, events and outputs"
    );
    describe_gauge!(
        "dispatcher_job_store_limit_jobs",
        "jobs.max_jobs: new jobs are refused when the store holds this many"
    );
    describe_gauge!(
        "dispatcher_job_store_limit_bytes",
        "jobs.max_store_bytes: new jobs are refused when the store holds this many bytes"
    );
    describe_counter!(
        "dispatcher_jobs_finished_total",
        "Jobs ended, by state (done, failed, cancelled, interrupted)"
    );
    describe_gauge!(
        "dispatcher_queue_oldest_wait_seconds",
        "How long the longest-waiting request for quota has waited, by model (0: nobody waits)"
    );
    describe_gauge!(
        "dispatcher_queue_shedding",
        "1 while a model's queue sheds load (it stood: newcomers are refused at once), else 0"
    );
    describe_counter!(
        "dispatcher_queue_refused_early_total",
        "Requests a model's shedding queue refused at once, by model"
    );
    describe_gauge!("dispatcher_tenant_in_flight", "A tenant's requests in flight");
    describe_gauge!(
        "dispatcher_tenant_tokens_last_minute",
        "Tokens dispatched for a tenant by this process in the last minute (its share: over the sum)"
    );
    describe_counter!(
        crate::slots::CLOSED_TOTAL,
        "Connections a listener closed before their client did, by listener and reason (evicted: its slot went to a newer connection before it authenticated; peer_cap; handshake_timeout; tls_failed; body_timeout; idle)"
    );
    describe_gauge!(
        "dispatcher_circuit_state",
        "A region's circuit breaker: 0 closed, 1 half-open, 2 open"
    );
    describe_gauge!(
        "dispatcher_panic_mode",
        "1 while most regions are unhealthy or have their circuit open"
    );
    describe_gauge!(
        "dispatcher_shared_fallback",
        "With [cluster]: 1 while this replica spends its fallback share (Redis unreachable), 0 while quota comes from Redis"
    );
    describe_gauge!(
        "dispatcher_shared_balance_tokens",
        "With [cluster]: tokens this replica holds (granted, not spent, given back or lapsed; and its fallback bucket)"
    );
    describe_gauge!(
        "dispatcher_shared_central_tokens",
        "With [cluster]: the central bucket's level at Redis' last answer"
    );
    describe_gauge!(
        "dispatcher_shared_replicas",
        "With [cluster]: replicas Redis heard from recently, this one included"
    );
    describe_counter!(
        "dispatcher_shared_granted_tokens_total",
        "With [cluster]: tokens granted to this replica"
    );
    describe_counter!(
        "dispatcher_shared_spent_tokens_total",
        "With [cluster]: tokens this replica spent from what it was granted"
    );
    describe_counter!(
        "dispatcher_shared_returned_tokens_total",
        "With [cluster]: granted tokens this replica gave back to the central level unspent (others needed them)"
    );
    describe_counter!(
        "dispatcher_shared_expired_tokens_total",
        "With [cluster]: granted tokens that lapsed unspent while Redis did not answer (Redis takes them back when it answers again)"
    );
    describe_gauge!(
        "dispatcher_shared_disagreeing_replicas",
        "With [cluster]: other replicas configured with different limits for this region and model (Redis applies the lowest); 0 when all agree"
    );
    describe_counter!(
        "dispatcher_shared_fallback_seconds_total",
        "With [cluster]: time spent in fallback (Redis unreachable)"
    );
    describe_gauge!(
        "dispatcher_capacity_rule_active",
        "1 while a capacity rule ([[capacity]] in a region file) is in force, by region, model and action"
    );
    describe_gauge!(
        "dispatcher_capacity_signal",
        "The signal a capacity rule watches (utilisation or queue depth), at its last sample"
    );
    describe_gauge!(
        "dispatcher_capacity_scale_out",
        "While a scale_out rule is active: by how much the region's capacity should grow (signal / exit threshold); 0 otherwise"
    );
    describe_counter!(
        "dispatcher_capacity_transitions_total",
        "Capacity rules entering or exiting, by region, model, action and kind"
    );
    describe_counter!(
        "dispatcher_rollout_requests_total",
        "Requests naming a rollout alias, by alias and the target model picked"
    );
    describe_counter!(
        "dispatcher_route_requests_total",
        "Requests naming a [[routes]] alias, by route and the candidate chosen"
    );
    describe_counter!(
        "dispatcher_fallbacks_total",
        "Requests moved to the next model of their fallback chain, by from, to and trigger"
    );
    describe_gauge!(
        "dispatcher_tls_certificate_expiry_seconds",
        "With [server.tls]: seconds until the served certificate (by file) expires; negative once it has"
    );
    describe_gauge!(
        "dispatcher_tls_certificate_valid",
        "With [server.tls]: 1 while the served certificate is within its validity period, 0 when expired or not yet valid"
    );
    describe_gauge!(
        "dispatcher_tenant_cost_budget_used_ratio",
        "A tenant's spend over its cost budget, by budget (daily, monthly; UTC)"
    );
    describe_gauge!(
        "dispatcher_tenant_cost_budget_warn_ratio",
        "The share of a tenant's cost budget past which it is reported as nearly spent (cost_budget_warn_at)"
    );
    describe_histogram!(
        "dispatcher_redis_call_seconds",
        "With [cluster]: one sync round trip to Redis (all region-models pipelined), by result"
    );
}

/// An attempt's cost (micro-units of `currency`), into
/// `dispatcher_cost_total` (`spend_metric.rs`).
pub fn add_cost(
    tenant: &std::sync::Arc<str>,
    model: &std::sync::Arc<str>,
    region: &std::sync::Arc<str>,
    currency: &str,
    micros: u64,
) {
    crate::spend_metric::add(tenant, model, region, currency, micros);
}

/// A gauge not set for this long is dropped (see the module's doc): ten
/// missed samples, so a slow tick does not make series flicker.
pub const GAUGE_IDLE: Duration = Duration::from_secs(10);

/// Scrapers need few connections; the rest of the descriptors are gRPC's.
const MAX_CONNECTIONS: usize = 16;

/// Installs the global recorder (once per process) and serves `/metrics`
/// on `listen`. Returns the bound address. A connection must send a whole
/// request's headers within `limits.handshake_timeout` (also between
/// requests on a kept-alive connection), and at most `MAX_CONNECTIONS` are
/// open at once; one that has not yet sent a whole request gives its slot
/// to a newcomer when all are taken (`slots`), so slow senders cannot keep
/// a scraper out.
pub async fn serve(
    listen: SocketAddr,
    view: impl Fn() -> EngineView + Send + 'static,
    limits: crate::config::ConnectionLimits,
    cancel: CancellationToken,
) -> std::io::Result<SocketAddr> {
    let handle = PrometheusBuilder::new()
        .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), &SECONDS)
        .map_err(std::io::Error::other)?
        .idle_timeout(MetricKindMask::GAUGE, Some(GAUGE_IDLE))
        .install_recorder()
        .map_err(std::io::Error::other)?;
    describe();
    ENABLED.store(true, Ordering::Relaxed);
    let listener = tokio::net::TcpListener::bind(listen).await?;
    let addr = listener.local_addr()?;
    let slots = crate::slots::Limits {
        max: MAX_CONNECTIONS.min(limits.max_connections),
        per_peer: limits.max_connections_per_peer,
    };
    let mut acceptor = crate::accept::Acceptor::new(listener, slots, "metrics");
    tokio::spawn(sample(view, handle.clone(), cancel.clone()));
    tokio::spawn(async move {
        loop {
            let accepted = tokio::select! {
                _ = cancel.cancelled() => return,
                accepted = acceptor.accept() => accepted,
            };
            let handle = handle.clone();
            tokio::spawn(async move {
                let slot = std::sync::Arc::new(accepted.slot);
                let asked = slot.clone();
                let service = hyper::service::service_fn(move |r: Request<hyper::body::Incoming>| {
                    // A whole request: a scraper's connection keeps its slot.
                    asked.trust();
                    let handle = handle.clone();
                    async move { Ok::<_, Infallible>(respond(&r, &handle)) }
                });
                let io = hyper_util::rt::TokioIo::new(accepted.stream);
                let served = hyper::server::conn::http1::Builder::new()
                    .timer(hyper_util::rt::TokioTimer::new())
                    .header_read_timeout(limits.handshake_timeout)
                    .serve_connection(io, service);
                tokio::select! {
                    _ = served => {}
                    _ = slot.evicted() => {}
                }
            });
        }
    });
    Ok(addr)
}

fn respond<B>(r: &Request<B>, handle: &PrometheusHandle) -> Response<Full<Bytes>> {
    let mut response = if r.uri().path() == "/metrics" {
        let mut text = handle.render();
        crate::spend_metric::render(&mut text);
        Response::new(Full::new(Bytes::from(text)))
    } else {
        let mut not_found = Response::new(Full::new(Bytes::from_static(b"not found: try /metrics\n")));
        *not_found.status_mut() = StatusCode::NOT_FOUND;
        not_found
    };
    response.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("text/plain; version=0.0.4"),
    );
    response
}

/// `dispatcher_circuit_state`: 0 closed, 1 half-open, 2 open.
fn circuit_value(c: crate::core::Circuit) -> f64 {
    match c {
        crate::core::Circuit::Closed => 0.0,
        crate::core::Circuit::HalfOpen => 1.0,
        crate::core::Circuit::Open => 2.0,
    }
}

/// Samples the router's state into gauges once a second.
async fn sample(view: impl Fn() -> EngineView, handle: PrometheusHandle, cancel: CancellationToken) {
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    loop {
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tick.tick() => {}
        }
        let v = view();
        for region in &v.regions {
            let r = region.name.clone();
            gauge!("dispatcher_region_in_flight", "region" => r.clone()).set(region.in_flight as f64);
            gauge!("dispatcher_region_utilization", "region" => r.clone()).set(region.utilization);
            gauge!("dispatcher_region_drained", "region" => r.clone()).set(region.drained as u8 as f64);
            gauge!("dispatcher_region_healthy", "region" => r.clone()).set(region.healthy as u8 as f64);
            gauge!("dispatcher_circuit_state", "region" => r.clone())
                .set(circuit_value(region.circuit.kind()));
            for q in &region.models {
                let labels = [("region", r.clone()), ("model", q.model.clone())];
                gauge!("dispatcher_bucket_tokens_available", &labels).set(q.tokens_available as f64);
                gauge!("dispatcher_bucket_tokens_reserved", &labels).set(q.tokens_reserved as f64);
                gauge!("dispatcher_bucket_requests_available", &labels).set(q.requests_available as f64);
                if let Some(sh) = &q.sharing {
                    let fallback = sh.mode == crate::core::SharingMode::Fallback;
                    gauge!("dispatcher_shared_fallback", &labels).set(fallback as u8 as f64);
                    gauge!("dispatcher_shared_balance_tokens", &labels).set(sh.balance_tokens as f64);
                    if let Some(c) = sh.central_tokens {
                        gauge!("dispatcher_shared_central_tokens", &labels).set(c as f64);
                    }
                    gauge!("dispatcher_shared_replicas", &labels).set(sh.replicas as f64);
                    metrics::counter!("dispatcher_shared_granted_tokens_total", &labels)
                        .absolute(sh.totals.granted_tokens);
                    metrics::counter!("dispatcher_shared_spent_tokens_total", &labels)
                        .absolute(sh.totals.spent_tokens);
                    metrics::counter!("dispatcher_shared_returned_tokens_total", &labels)
                        .absolute(sh.totals.returned_tokens);
                    metrics::counter!("dispatcher_shared_expired_tokens_total", &labels)
                        .absolute(sh.totals.expired_tokens);
                    gauge!("dispatcher_shared_disagreeing_replicas", &labels).set(sh.disagreeing as f64);
                    metrics::counter!("dispatcher_shared_fallback_seconds_total", &labels)
                        .absolute(sh.totals.fallback_time.as_secs());
                }
            }
        }
        for (model, queued, oldest) in &v.queued {
            gauge!("dispatcher_queue_depth", "model" => model.clone()).set(*queued as f64);
            gauge!("dispatcher_queue_oldest_wait_seconds", "model" => model.clone())
                .set(oldest.as_secs_f64());
        }
        for (model, state, refused) in &v.overload {
            let shedding = *state == crate::core::QueueState::Shedding;
            gauge!("dispatcher_queue_shedding", "model" => model.clone()).set(f64::from(u8::from(shedding)));
            metrics::counter!("dispatcher_queue_refused_early_total", "model" => model.clone())
                .absolute(*refused);
        }
        for t in &v.tenants {
            gauge!("dispatcher_tenant_in_flight", "tenant" => t.report.spec.name.clone())
                .set(t.report.in_flight as f64);
            gauge!("dispatcher_tenant_tokens_last_minute", "tenant" => t.report.spec.name.clone())
                .set(t.report.tokens_last_minute as f64);
            let spec = &t.report.spec;
            let budgets = [
                ("daily", spec.daily_cost_budget, t.report.spent_today),
                ("monthly", spec.monthly_cost_budget, t.report.spent_month),
            ];
            for (budget, limit, spent) in budgets {
                let Some(limit) = limit else { continue };
                let labels = [("tenant", spec.name.clone()), ("budget", budget.to_string())];
                let used = if limit == 0 {
                    1.0
                } else {
                    spent as f64 / limit as f64
                };
                gauge!("dispatcher_tenant_cost_budget_used_ratio", &labels).set(used);
                gauge!("dispatcher_tenant_cost_budget_warn_ratio", &labels).set(spec.cost_budget_warn_at);
            }
        }
        handle.run_upkeep();
    }
}
