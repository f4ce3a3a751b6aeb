//! Logs and traces: `tracing` to stderr (filtered by `RUST_LOG`, default
//! info) and, when an OTLP endpoint is configured (or
//! `OTEL_EXPORTER_OTLP_ENDPOINT` is set), spans exported over OTLP/gRPC with
//! W3C trace context carried in gRPC metadata.

use std::io::IsTerminal;

use opentelemetry::propagation::{Extractor, Injector, TextMapPropagator};
use opentelemetry::trace::TracerProvider as _;
use opentelemetry_otlp::WithExportConfig;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::SdkTracerProvider;
use tonic::metadata::MetadataMap;
use tracing::Span;
use tracing_opentelemetry::OpenTelemetrySpanExt;
use tracing_subscriber::filter::FilterExt;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer};

/// The standard variable naming the OTLP collector.
pub const OTLP_ENV: &str = "OTEL_EXPORTER_OTLP_ENDPOINT";

/// Keeps the exporter alive; flush it with `shutdown` before exiting.
pub struct Telemetry {
    provider: Option<SdkTracerProvider>,
}

/// Logging only. One global filter, so every disabled callsite (the HTTP/2
/// stack's trace events, the request spans at debug) is decided once and
/// then costs nothing.
pub fn init() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(log_filter())
        .with_writer(std::io::stderr)
        .with_ansi(colour())
        .try_init();
}

/// `RUST_LOG`, or info.
fn log_filter() -> EnvFilter {
    EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"))
}

/// Colour codes only for a person at a terminal, not in log files.
fn colour() -> bool {
    std::io::stderr().is_terminal()
}

fn fmt_layer<S>() -> impl Layer<S>
where
    S: tracing::Subscriber + for<'a> tracing_subscriber::registry::LookupSpan<'a>,
{
    // Log lines are events. Spans (one set per request) are for the trace
    // exporter; formatting their fields for a log nobody reads cost a tenth
    // of the CPU at saturation. One filter, not two nested: nested, the
    // outer one's "always" (an event) and the inner one's "never" (below
    // the log level) summed to "sometimes", so every trace event of the
    // HTTP/2 stack (some 250 a request) was checked and dispatched at run
    // time, and an unset level hint let all of them past the static check:
    // 95,000 instructions a request with an exporter on (benches/instr).
    let logs = log_filter();
    let events = tracing_subscriber::filter::filter_fn(|meta| meta.is_event());
    let events = match logs.max_level_hint() {
        Some(level) => events.with_max_level_hint(level),
        None => events,
    };
    tracing_subscriber::fmt::layer()
        .with_writer(std::io::stderr)
        .with_ansi(colour())
        .with_filter(logs.and(events))
}

/// Logging, plus OTLP export of spans when `endpoint` (or the standard
/// environment variable) names a collector. Must run inside a tokio runtime.
pub fn init_with_otlp(service_name: &str, endpoint: Option<&str>) -> Result<Telemetry, String> {
    let endpoint = endpoint
        .map(str::to_string)
        .or_else(|| std::env::var(OTLP_ENV).ok().filter(|e| !e.is_empty()));
    let Some(endpoint) = endpoint else {
        init();
        return Ok(Telemetry { provider: None });
    };
    let exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_tonic()
        .with_endpoint(endpoint.clone())
        .build()
        .map_err(|e| format!("OTLP exporter for {endpoint}: {e}"))?;
    let provider = SdkTracerProvider::builder()
        .with_batch_exporter(exporter)
        .with_resource(
            opentelemetry_sdk::Resource::builder()
                .with_service_name(service_name.to_string())
                .build(),
        )
        .build();
    let tracer = provider.tracer("dispatcher");
    // The request spans are at debug (free when nobody exports them); the
    // exporter's own gRPC client must not trace itself.
    let otel_filter = EnvFilter::new(
        "info,dispatcher=debug,tonic=off,h2=off,hyper=off,hyper_util=off,tower=off,opentelemetry=off",
    );
    let otel = tracing_opentelemetry::layer()
        .with_tracer(tracer)
        .with_filter(otel_filter);
    let _ = tracing_subscriber::registry()
        .with(fmt_layer())
        .with(otel)
        .try_init();
    opentelemetry::global::set_text_map_propagator(TraceContextPropagator::new());
    tracing::info!(%endpoint, service = service_name, "exporting traces over OTLP");
    Ok(Telemetry {
        provider: Some(provider),
    })
}

impl Telemetry {
    /// Flushes and stops the exporter. The SDK's shutdown blocks, so it runs
    /// on a blocking thread (on a current-thread runtime it would time out
    /// and lose the last spans).
    pub async fn shutdown(self) {
        if let Some(provider) = self.provider {
            let done = tokio::task::spawn_blocking(move || provider.shutdown()).await;
            if let Ok(Err(e)) = done {
                eprintln!("flushing traces: {e}");
            }
        }
    }
}

struct HeaderReader<'a>(&'a http::HeaderMap);

impl Extractor for HeaderReader<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|v| v.to_str().ok())
    }

    fn keys(&self) -> Vec<&str> {
        self.0.keys().map(http::HeaderName::as_str).collect()
    }
}

struct HeaderWriter<'a>(&'a mut http::HeaderMap);

impl Injector for HeaderWriter<'_> {
    fn set(&mut self, key: &str, value: String) {
        if let (Ok(k), Ok(v)) = (
            http::HeaderName::from_bytes(key.as_bytes()),
            http::HeaderValue::try_from(value),
        ) {
            self.0.insert(k, v);
        }
    }
}

/// Continues the caller's trace (W3C `traceparent` in the metadata) in `span`.
pub fn continue_trace(span: &Span, metadata: &MetadataMap) {
    continue_trace_headers(span, metadata.as_ref());
}

/// `continue_trace` from a request's HTTP headers.
pub fn continue_trace_headers(span: &Span, headers: &http::HeaderMap) {
    // A span nobody records (no exporter) has no parent to set: the
    // headers are not even read.
    if span.is_disabled() {
        return;
    }
    let parent = TraceContextPropagator::new().extract(&HeaderReader(headers));
    // Fails only when tracing is off for the span: nothing to continue then.
    let _ = span.set_parent(parent);
}

/// Puts `span`'s trace context into an outgoing request's headers.
pub fn inject_trace(span: &Span, headers: &mut http::HeaderMap) {
    if span.is_disabled() {
        return;
    }
    TraceContextPropagator::new().inject_context(&span.context(), &mut HeaderWriter(headers));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn trace_context_round_trips_through_metadata() {
        let mut m = MetadataMap::new();
        m.insert(
            "traceparent",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
                .parse()
                .unwrap(),
        );
        let cx = TraceContextPropagator::new().extract(&HeaderReader(m.as_ref()));
        let mut out = http::HeaderMap::new();
        TraceContextPropagator::new().inject_context(&cx, &mut HeaderWriter(&mut out));
        assert_eq!(
            out.get("traceparent").unwrap(),
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
        );
    }
}
