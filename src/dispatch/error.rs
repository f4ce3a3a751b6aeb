//! Everything a dispatch can end in other than a reply. One conversion to a
//! gRPC status lives in `server::status`.

use std::time::Duration;

use thiserror::Error;

use crate::core::RouteError;

/// One bad field of a request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Violation {
    pub field: &'static str,
    pub description: String,
}

impl Violation {
    pub fn new(field: &'static str, description: impl Into<String>) -> Self {
        Self {
            field,
            description: description.into(),
        }
    }
}

fn list(violations: &[Violation]) -> String {
    violations
        .iter()
        .map(|v| format!("{}: {}", v.field, v.description))
        .collect::<Vec<_>>()
        .join("; ")
}

#[derive(Debug, Clone, PartialEq, Error)]
pub enum DispatchError {
    #[error("invalid request: {}", list(.0))]
    InvalidArgument(Vec<Violation>),
    #[error(transparent)]
    Route(#[from] RouteError),
    /// Waited for quota as long as allowed.
    #[error("no region had quota for the request within the {waited:.1?} it could wait")]
    QueueTimeout {
        waited: Duration,
        retry_after: Option<Duration>,
    },
    /// Refused without waiting: the quota queued ahead would not come back
    /// in time.
    #[error("no region can take the request within the time it may wait: {message}")]
    WouldWaitInVain { message: String, retry_after: Duration },
    /// Too many requests are already waiting for quota.
    #[error("{queued} requests are already waiting for quota (routing.max_queued)")]
    QueueFull { queued: usize, retry_after: Duration },
    #[error("deadline exceeded {0}")]
    DeadlineExceeded(String),
    /// A region refused or failed in a way that must not be retried elsewhere.
    #[error("region {region} failed: {message}")]
    Upstream {
        region: String,
        code: tonic::Code,
        message: String,
    },
    /// Every attempt failed with a retryable error.
    #[error("all {attempts} attempts failed; last: {last}")]
    AttemptsExhausted { attempts: u32, last: String },
    /// Every attempt was refused by the provider behind its region for
    /// quota (rate limited): the request may fit after `retry_after`.
    #[error("the providers refused all {attempts} attempts for quota (rate limited); last: {last}")]
    ProvidersRefused {
        attempts: u32,
        retry_after: Duration,
        last: String,
    },
    #[error("the dispatcher is shutting down")]
    ShuttingDown,
    /// A failure of the dispatcher itself (a task that died), not of a
    /// region or the request.
    #[error("internal error: {0}")]
    Internal(String),
    /// Too many requests with a request_id are running to track another.
    #[error("{capacity} requests with a request_id are already running (server.idempotency_capacity)")]
    IdempotencyFull { capacity: usize },
    #[error("unauthenticated: {0}")]
    Unauthenticated(String),
    #[error("permission denied: {0}")]
    PermissionDenied(String),
    /// A tenant's hard limit.
    #[error("tenant {tenant} is over its {limit}: {message}")]
    TenantLimit {
        tenant: String,
        limit: &'static str,
        message: String,
        retry_after: Option<Duration>,
    },
}

impl DispatchError {
    /// The gRPC code the caller is answered with (`server::status::to_status`
    /// adds the details); a job keeps it in `error_code`.
    pub fn code(&self) -> tonic::Code {
        use tonic::Code;
        match self {
            DispatchError::InvalidArgument(_) => Code::InvalidArgument,
            DispatchError::Route(RouteError::UnknownModel { .. } | RouteError::TooLarge { .. }) => {
                Code::InvalidArgument
            }
            DispatchError::Route(RouteError::Unavailable { .. })
            | DispatchError::AttemptsExhausted { .. }
            | DispatchError::ShuttingDown => Code::Unavailable,
            DispatchError::Route(_)
            | DispatchError::QueueTimeout { .. }
            | DispatchError::WouldWaitInVain { .. }
            | DispatchError::ProvidersRefused { .. }
            | DispatchError::QueueFull { .. }
            | DispatchError::IdempotencyFull { .. }
            | DispatchError::TenantLimit { .. } => Code::ResourceExhausted,
            DispatchError::DeadlineExceeded(_) => Code::DeadlineExceeded,
            // A region's "bad argument" is our internal error towards the
            // caller unless it is about the request itself. A region that
            // cancelled or timed out on its own failed: the caller neither
            // cancelled nor reached its deadline (that is `DeadlineExceeded`).
            DispatchError::Upstream { code, .. } => match code {
                Code::InvalidArgument | Code::OutOfRange | Code::FailedPrecondition => *code,
                _ => Code::Unavailable,
            },
            DispatchError::Internal(_) => Code::Internal,
            DispatchError::Unauthenticated(_) => Code::Unauthenticated,
            DispatchError::PermissionDenied(_) => Code::PermissionDenied,
        }
    }

    /// When the request might succeed if sent again, where the error says.
    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            DispatchError::Route(RouteError::NoCapacity { retry_after, .. })
            | DispatchError::QueueTimeout { retry_after, .. }
            | DispatchError::TenantLimit { retry_after, .. } => *retry_after,
            DispatchError::WouldWaitInVain { retry_after, .. }
            | DispatchError::QueueFull { retry_after, .. }
            | DispatchError::Route(RouteError::Shed { retry_after, .. })
            | DispatchError::ProvidersRefused { retry_after, .. } => Some(*retry_after),
            _ => None,
        }
    }
}
