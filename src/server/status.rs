//! The one place where errors become gRPC statuses, with rich details
//! (`google.rpc.BadRequest`, `RetryInfo`, `QuotaFailure`) a client can act on.

use std::time::Duration;

use tonic::{Code, Status};
use tonic_types::{ErrorDetails, FieldViolation, StatusExt};

use crate::core::RouteError;
use crate::dispatch::DispatchError;

/// When no refill time is known (waiting on concurrency), suggest this.
const DEFAULT_RETRY: Duration = Duration::from_millis(100);

pub fn to_status(e: &DispatchError) -> Status {
    let message = e.to_string();
    match e {
        DispatchError::InvalidArgument(violations) => {
            let fields: Vec<FieldViolation> = violations
                .iter()
                .map(|v| FieldViolation::new(v.field, v.description.clone()))
                .collect();
            Status::with_error_details(
                Code::InvalidArgument,
                message,
                ErrorDetails::with_bad_request(fields),
            )
        }
        DispatchError::Route(route) => match route {
            RouteError::UnknownModel { .. } => Status::with_error_details(
                Code::InvalidArgument,
                message,
                ErrorDetails::with_bad_request_violation("model", route.to_string()),
            ),
            RouteError::TooLarge { .. } => Status::with_error_details(
                Code::InvalidArgument,
                message,
                ErrorDetails::with_bad_request_violation("max_output_tokens", route.to_string()),
            ),
            RouteError::NoCapacity { retry_after, .. } => exhausted(message, *retry_after),
            RouteError::Unavailable { .. } => Status::unavailable(message),
        },
        DispatchError::QueueTimeout { retry_after, .. } => exhausted(message, *retry_after),
        DispatchError::WouldWaitInVain { retry_after, .. } => exhausted(message, Some(*retry_after)),
        DispatchError::ProvidersRefused { retry_after, .. } => exhausted(message, Some(*retry_after)),
        DispatchError::QueueFull { retry_after, .. } => exhausted(message, Some(*retry_after)),
        DispatchError::IdempotencyFull { .. } => exhausted(message, Some(Duration::from_secs(1))),
        DispatchError::DeadlineExceeded(_) => Status::deadline_exceeded(message),
        DispatchError::Upstream { code, .. } => {
            // A region's "bad argument" is our internal error towards the caller
            // unless it is about the request itself.
            let code = match code {
                Code::InvalidArgument | Code::OutOfRange | Code::FailedPrecondition => *code,
                Code::DeadlineExceeded => Code::DeadlineExceeded,
                Code::Cancelled => Code::Cancelled,
                _ => Code::Unavailable,
            };
            Status::new(code, message)
        }
        DispatchError::AttemptsExhausted { .. } | DispatchError::ShuttingDown => Status::unavailable(message),
        DispatchError::Unauthenticated(_) => Status::unauthenticated(message),
        DispatchError::PermissionDenied(_) => Status::permission_denied(message),
        DispatchError::TenantLimit {
            tenant,
            message: what,
            retry_after,
            ..
        } => {
            let mut details =
                ErrorDetails::with_quota_failure_violation(format!("tenant:{tenant}"), what.clone());
            details.set_retry_info(Some(retry_after.unwrap_or(DEFAULT_RETRY)));
            Status::with_error_details(Code::ResourceExhausted, message, details)
        }
    }
}

fn exhausted(message: String, retry_after: Option<Duration>) -> Status {
    Status::with_error_details(
        Code::ResourceExhausted,
        message,
        ErrorDetails::with_retry_info(Some(retry_after.unwrap_or(DEFAULT_RETRY))),
    )
}
