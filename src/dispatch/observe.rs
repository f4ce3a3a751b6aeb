//! What the request path tells metrics, in one place: request outcomes,
//! attempts, tokens reserved / charged / refunded, hints, queue waits.
//! Nothing is built (not even a label) unless metrics are served; labels
//! share the names the router already holds instead of copying them, and
//! each label set's handles are registered once (`handles.rs`).

use std::sync::{Arc, LazyLock, OnceLock};
use std::time::Duration;

use metrics::{Counter, Histogram, Label, SharedString, counter, histogram};

use super::handles::HandleCache;

use super::DispatchError;
use crate::core::HintOutcome;
use crate::forward::FailureKind;

/// The span of one unit of work (a request, a job's run) with every field
/// the request path records as it learns it (`prepare`, `unary`, `Labels`):
/// one list, so no span declares one the path records into another (a
/// field not declared is dropped without a word). Never the key or the
/// payload. `work_span!("dispatch", "server", rpc = "Dispatch")`.
macro_rules! work_span {
    ($name:literal, $kind:literal, $($own:tt)*) => {
        tracing::debug_span!(
            $name,
            otel.kind = $kind,
            $($own)*,
            request_id = tracing::field::Empty,
            tenant = tracing::field::Empty,
            model = tracing::field::Empty,
            region = tracing::field::Empty,
            prompt_tokens = tracing::field::Empty,
            completion_tokens = tracing::field::Empty,
            cost_micros = tracing::field::Empty,
            attempts = tracing::field::Empty,
            outcome = tracing::field::Empty,
            error = tracing::field::Empty,
        )
    };
}
pub(crate) use work_span;

fn on() -> bool {
    crate::metrics::enabled()
}

fn shared(s: &Arc<str>) -> SharedString {
    SharedString::from_shared(s.clone())
}

/// The `outcome` label of a finished request.
pub fn outcome(result: &Result<(), &DispatchError>) -> &'static str {
    match result {
        Ok(()) => "ok",
        Err(e) => match e {
            DispatchError::InvalidArgument(_) => "invalid_argument",
            DispatchError::Route(
                crate::core::RouteError::UnknownModel { .. } | crate::core::RouteError::TooLarge { .. },
            ) => "invalid_argument",
            DispatchError::Route(crate::core::RouteError::Unavailable { .. })
            | DispatchError::AttemptsExhausted { .. }
            | DispatchError::ShuttingDown => "unavailable",
            DispatchError::Route(crate::core::RouteError::NoCapacity { .. })
            | DispatchError::QueueTimeout { .. }
            | DispatchError::WouldWaitInVain { .. }
            | DispatchError::QueueFull { .. }
            | DispatchError::ProvidersRefused { .. } => "no_quota",
            DispatchError::IdempotencyFull { .. } => "overloaded",
            DispatchError::Route(crate::core::RouteError::Shed { .. }) => "shed",
            DispatchError::DeadlineExceeded(_) => "deadline_exceeded",
            DispatchError::Upstream { .. } => "upstream_error",
            DispatchError::Internal(_) => "internal",
            DispatchError::Unauthenticated(_) => "unauthenticated",
            DispatchError::PermissionDenied(_) => "permission_denied",
            DispatchError::TenantLimit { .. } => "tenant_limit",
        },
    }
}

/// The label value of what a request never got to (a model, a tenant, a
/// region).
pub const NONE: &str = "none";

type Name = Option<Arc<str>>;

fn label(name: &'static str, value: &Name) -> Label {
    Label::new(name, value.as_ref().map_or(SharedString::const_str(NONE), shared))
}

/// Model, tenant, region, outcome.
type RequestKey = (Name, Name, Name, &'static str);

static REQUESTS: LazyLock<HandleCache<RequestKey, (Counter, Histogram)>> = LazyLock::new(HandleCache::new);

pub fn request(
    model: Option<&Arc<str>>,
    tenant: Option<&Arc<str>>,
    region: Option<&Arc<str>>,
    outcome: &'static str,
    took: Duration,
) {
    if !on() {
        return;
    }
    // "none" where the request ended before that was known (refused at
    // the door, before routing): an empty label reads as a missing one.
    let key = (model.cloned(), tenant.cloned(), region.cloned(), outcome);
    let (requests, duration) = REQUESTS.get(key, |(model, tenant, region, outcome)| {
        let labels = [
            label("model", model),
            label("tenant", tenant),
            label("region", region),
            Label::new("outcome", *outcome),
        ];
        (
            counter!("dispatcher_requests_total", labels.iter()),
            histogram!("dispatcher_request_duration_seconds", labels.iter()),
        )
    });
    requests.increment(1);
    duration.record(took.as_secs_f64());
}

static ATTEMPTS: LazyLock<HandleCache<(Arc<str>, &'static str), Counter>> = LazyLock::new(HandleCache::new);

pub fn attempt(region: &Arc<str>, result: Option<FailureKind>, timed_out: bool) {
    if !on() {
        return;
    }
    let result = match (result, timed_out) {
        (_, true) => "timeout",
        (None, _) => "ok",
        (Some(FailureKind::NotRun), _) => "not_run",
        (Some(FailureKind::ProviderRefused { .. }), _) => "provider_refused",
        (Some(FailureKind::Rejected), _) => "rejected",
        (Some(FailureKind::MayHaveRun), _) => "may_have_run",
    };
    ATTEMPTS
        .get((region.clone(), result), |(region, result)| {
            counter!("dispatcher_attempts_total", "region" => shared(region), "result" => *result)
        })
        .increment(1);
}

/// The counters of one region and model; a hint's, by result, registered
/// the first time one comes.
struct RegionModel {
    region: Arc<str>,
    model: Arc<str>,
    reserved: Counter,
    charged: Counter,
    refunded: Counter,
    hints: [OnceLock<Counter>; 3],
}

impl RegionModel {
    fn hint(&self, result: usize) -> &Counter {
        const RESULTS: [&str; 3] = ["lowered", "applied", "ignored"];
        self.hints[result].get_or_init(|| {
            counter!("dispatcher_provider_hints_total", "region" => shared(&self.region), "model" => shared(&self.model), "result" => RESULTS[result])
        })
    }
}

type RegionModels = HandleCache<(Arc<str>, Arc<str>), Arc<RegionModel>>;

static REGION_MODELS: LazyLock<RegionModels> = LazyLock::new(HandleCache::new);

fn region_model(region: &Arc<str>, model: &Arc<str>) -> Arc<RegionModel> {
    REGION_MODELS.get((region.clone(), model.clone()), |(region, model)| {
        let labels = [
            Label::new("region", shared(region)),
            Label::new("model", shared(model)),
        ];
        Arc::new(RegionModel {
            region: region.clone(),
            model: model.clone(),
            reserved: counter!("dispatcher_tokens_reserved_total", labels.iter()),
            charged: counter!("dispatcher_tokens_charged_total", labels.iter()),
            refunded: counter!("dispatcher_tokens_refunded_total", labels.iter()),
            hints: Default::default(),
        })
    })
}

pub fn reserved(region: &Arc<str>, model: &Arc<str>, tokens: u64) {
    if !on() {
        return;
    }
    region_model(region, model).reserved.increment(tokens);
}

pub fn settled(region: &Arc<str>, model: &Arc<str>, reserved: u64, charged: u64, hint: Option<&HintOutcome>) {
    if !on() {
        return;
    }
    let counters = region_model(region, model);
    counters.charged.increment(charged);
    counters.refunded.increment(reserved.saturating_sub(charged));
    if let Some(h) = hint {
        let result = match h {
            HintOutcome::Applied { lowered: true } => 0,
            HintOutcome::Applied { lowered: false } => 1,
            HintOutcome::Ignored { .. } => 2,
        };
        counters.hint(result).increment(1);
    }
}

/// An attempt's cost, in micro-units of `currency`.
pub fn cost(tenant: &Arc<str>, model: &Arc<str>, region: &Arc<str>, currency: &Arc<str>, micros: u64) {
    if on() {
        crate::metrics::add_cost(tenant, model, region, currency, micros);
    }
}

static QUEUE_WAITS: LazyLock<HandleCache<Arc<str>, Histogram>> = LazyLock::new(HandleCache::new);

pub fn queue_wait(model: &Arc<str>, waited: Duration) {
    if !on() {
        return;
    }
    QUEUE_WAITS
        .get(
            model.clone(),
            |model| histogram!("dispatcher_queue_wait_seconds", "model" => shared(model)),
        )
        .record(waited.as_secs_f64());
}
