//! What the request path tells metrics, in one place: request outcomes,
//! attempts, tokens reserved / charged / refunded, hints, queue waits.

use std::time::Duration;

use metrics::{counter, histogram};

use super::DispatchError;
use crate::core::HintOutcome;
use crate::forward::FailureKind;

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
            | DispatchError::QueueFull { .. } => "no_quota",
            DispatchError::IdempotencyFull { .. } => "overloaded",
            DispatchError::DeadlineExceeded(_) => "deadline_exceeded",
            DispatchError::Upstream { .. } => "upstream_error",
            DispatchError::Unauthenticated(_) => "unauthenticated",
            DispatchError::PermissionDenied(_) => "permission_denied",
            DispatchError::TenantLimit { .. } => "tenant_limit",
        },
    }
}

pub fn request(model: &str, tenant: &str, region: &str, outcome: &'static str, took: Duration) {
    let labels = [
        ("model", model.to_string()),
        ("tenant", tenant.to_string()),
        ("region", region.to_string()),
        ("outcome", outcome.to_string()),
    ];
    counter!("dispatcher_requests_total", &labels).increment(1);
    histogram!("dispatcher_request_duration_seconds", &labels).record(took.as_secs_f64());
}

pub fn attempt(region: &str, result: Option<FailureKind>, timed_out: bool) {
    let result = match (result, timed_out) {
        (_, true) => "timeout",
        (None, _) => "ok",
        (Some(FailureKind::NotRun), _) => "not_run",
        (Some(FailureKind::ProviderRefused { .. }), _) => "provider_refused",
        (Some(FailureKind::Rejected), _) => "rejected",
        (Some(FailureKind::MayHaveRun), _) => "may_have_run",
    };
    counter!("dispatcher_attempts_total", "region" => region.to_string(), "result" => result).increment(1);
}

pub fn reserved(region: &str, model: &str, tokens: u64) {
    counter!("dispatcher_tokens_reserved_total", "region" => region.to_string(), "model" => model.to_string())
        .increment(tokens);
}

pub fn settled(region: &str, model: &str, reserved: u64, charged: u64, hint: Option<&HintOutcome>) {
    let labels = [("region", region.to_string()), ("model", model.to_string())];
    counter!("dispatcher_tokens_charged_total", &labels).increment(charged);
    counter!("dispatcher_tokens_refunded_total", &labels).increment(reserved.saturating_sub(charged));
    if let Some(h) = hint {
        let result = match h {
            HintOutcome::Applied { lowered: true } => "lowered",
            HintOutcome::Applied { lowered: false } => "applied",
            HintOutcome::Ignored { .. } => "ignored",
        };
        counter!("dispatcher_provider_hints_total", "region" => region.to_string(), "model" => model.to_string(), "result" => result)
            .increment(1);
    }
}

pub fn queue_wait(model: &str, waited: Duration) {
    histogram!("dispatcher_queue_wait_seconds", "model" => model.to_string()).record(waited.as_secs_f64());
}

/// 0 closed, 1 half-open, 2 open.
pub fn circuit(region: &str, state: &str) {
    let value = match state {
        "closed" => 0.0,
        "half_open" => 1.0,
        _ => 2.0,
    };
    metrics::gauge!("dispatcher_circuit_state", "region" => region.to_string()).set(value);
}
