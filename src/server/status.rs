//! The one place where errors become gRPC statuses, with rich details
//! (`google.rpc.BadRequest`, `RetryInfo`, `QuotaFailure`) a client can act on.

use std::time::Duration;

use tonic::Status;
use tonic_types::{ErrorDetails, FieldViolation, StatusExt};

use crate::core::RouteError;
use crate::dispatch::DispatchError;

/// When no refill time is known (waiting on concurrency), suggest this.
const DEFAULT_RETRY: Duration = Duration::from_millis(100);

/// An error's message, at most (it goes out as `grpc-message`, a trailer).
const MAX_MESSAGE_BYTES: usize = 1024;
/// BadRequest field violations returned at most, and their text in total:
/// with the message, an error stays far below the 8 to 16 KiB of trailers
/// common clients accept.
const MAX_FIELD_VIOLATIONS: usize = 10;
const MAX_VIOLATION_BYTES: usize = 2048;

/// The status a caller gets for `e`: its code is `DispatchError::code`
/// (what a job keeps as `error_code` too); here only the details it carries.
pub fn to_status(e: &DispatchError) -> Status {
    let message = crate::excerpt::truncate(&e.to_string(), MAX_MESSAGE_BYTES).into_owned();
    let retry = |after: Option<Duration>| ErrorDetails::with_retry_info(Some(after.unwrap_or(DEFAULT_RETRY)));
    let details = match e {
        DispatchError::InvalidArgument(violations) => {
            Some(ErrorDetails::with_bad_request(bounded(violations)))
        }
        DispatchError::Route(route @ RouteError::UnknownModel { .. }) => Some(
            ErrorDetails::with_bad_request_violation("model", route.to_string()),
        ),
        DispatchError::Route(route @ RouteError::TooLarge { .. }) => Some(
            ErrorDetails::with_bad_request_violation("max_output_tokens", route.to_string()),
        ),
        DispatchError::Route(RouteError::NoCapacity { retry_after, .. })
        | DispatchError::QueueTimeout { retry_after, .. } => Some(retry(*retry_after)),
        DispatchError::Route(RouteError::Shed { retry_after, .. })
        | DispatchError::WouldWaitInVain { retry_after, .. }
        | DispatchError::ProvidersRefused { retry_after, .. }
        | DispatchError::QueueFull { retry_after, .. } => Some(retry(Some(*retry_after))),
        DispatchError::IdempotencyFull { .. } => Some(retry(Some(Duration::from_secs(1)))),
        DispatchError::TenantLimit {
            tenant,
            message: what,
            retry_after,
            ..
        } => {
            let mut details =
                ErrorDetails::with_quota_failure_violation(format!("tenant:{tenant}"), what.clone());
            details.set_retry_info(Some(retry_after.unwrap_or(DEFAULT_RETRY)));
            Some(details)
        }
        _ => None,
    };
    match details {
        Some(details) => Status::with_error_details(e.code(), message, details),
        None => Status::new(e.code(), message),
    }
}

/// The violations that fit `MAX_FIELD_VIOLATIONS` and `MAX_VIOLATION_BYTES`,
/// and a last one counting the rest.
fn bounded(violations: &[crate::dispatch::Violation]) -> Vec<FieldViolation> {
    let mut out = Vec::new();
    let mut bytes = 0;
    for (i, v) in violations.iter().enumerate() {
        let description = crate::excerpt::truncate(&v.description, MAX_VIOLATION_BYTES / 4);
        bytes += v.field.len() + description.len();
        let last_slot = out.len() + 1 == MAX_FIELD_VIOLATIONS;
        if bytes > MAX_VIOLATION_BYTES || (last_slot && i + 1 < violations.len()) {
            break;
        }
        out.push(FieldViolation::new(v.field, description));
    }
    let left = violations.len() - out.len();
    if left > 0 {
        out.push(FieldViolation::new(
            violations[out.len()].field,
            format!("and {left} more problems not shown"),
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dispatch::Violation;
    use tonic::Code;

    #[test]
    fn an_error_stays_small_however_many_problems_it_has() {
        let many: Vec<Violation> = (0..1000)
            .map(|i| Violation::new("labels", format!("problem {i}: {}", "x".repeat(900))))
            .collect();
        let status = to_status(&DispatchError::InvalidArgument(many));
        assert!(
            status.message().len() <= MAX_MESSAGE_BYTES,
            "{}",
            status.message().len()
        );
        assert!(status.details().len() <= 3 * 1024, "{}", status.details().len());
        let bad = status.get_details_bad_request().unwrap();
        assert!(bad.field_violations.len() <= MAX_FIELD_VIOLATIONS);
        assert!(
            bad.field_violations
                .last()
                .unwrap()
                .description
                .contains("more problems not shown"),
            "{bad:?}"
        );
    }

    #[test]
    fn a_few_problems_are_all_shown() {
        let few: Vec<Violation> = (0..MAX_FIELD_VIOLATIONS)
            .map(|i| Violation::new("labels", format!("problem {i}")))
            .collect();
        let status = to_status(&DispatchError::InvalidArgument(few));
        let bad = status.get_details_bad_request().unwrap();
        assert_eq!(bad.field_violations.len(), MAX_FIELD_VIOLATIONS);
        assert_eq!(bad.field_violations[9].description, "problem 9");
    }

    #[test]
    fn a_jobs_error_code_is_the_code_the_caller_would_get() {
        use crate::core::RouteError;
        use std::time::Duration;
        let d = Duration::from_secs(1);
        let route = |r: RouteError| DispatchError::Route(r);
        let every = [
            DispatchError::InvalidArgument(vec![Violation::new("model", "x")]),
            route(RouteError::UnknownModel {
                model: "m".into(),
                known: "k".into(),
            }),
            route(RouteError::TooLarge {
                model: "m".into(),
                need: 2,
                largest: 1,
            }),
            route(RouteError::NoCapacity {
                retry_after: Some(d),
                summary: "s".into(),
            }),
            route(RouteError::Unavailable {
                model: "m".into(),
                summary: "s".into(),
            }),
            route(RouteError::Shed {
                model: "m".into(),
                summary: "s".into(),
                retry_after: d,
            }),
            DispatchError::QueueTimeout {
                waited: d,
                retry_after: None,
            },
            DispatchError::WouldWaitInVain {
                message: "m".into(),
                retry_after: d,
            },
            DispatchError::QueueFull {
                queued: 1,
                retry_after: d,
            },
            DispatchError::DeadlineExceeded("x".into()),
            DispatchError::Upstream {
                region: "r".into(),
                code: Code::InvalidArgument,
                message: "m".into(),
            },
            DispatchError::Upstream {
                region: "r".into(),
                code: Code::Internal,
                message: "m".into(),
            },
            DispatchError::AttemptsExhausted {
                attempts: 3,
                last: "l".into(),
            },
            DispatchError::ProvidersRefused {
                attempts: 3,
                retry_after: d,
                last: "l".into(),
            },
            DispatchError::ShuttingDown,
            DispatchError::Internal("x".into()),
            DispatchError::IdempotencyFull { capacity: 1 },
            DispatchError::Unauthenticated("x".into()),
            DispatchError::PermissionDenied("x".into()),
            DispatchError::TenantLimit {
                tenant: "t".into(),
                limit: "rate",
                message: "m".into(),
                retry_after: None,
            },
        ];
        for e in every {
            assert_eq!(e.code(), to_status(&e).code(), "{e:?}");
        }
    }
}
