//! Why a (region, model) cannot take a request now, as the router and the
//! queue read it (how long until it fits) and as operators read it.

use std::time::Duration;

/// Why a (region, model) cannot take a request now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QuotaShortfall {
    Tokens {
        need: u64,
        have: i64,
        wait: Duration,
    },
    Requests {
        wait: Duration,
    },
    /// Quota shared with other replicas: what this replica holds does not
    /// cover the request now, or the provider refused someone's request and
    /// asked everyone to wait. `next_grant`: the central level, as last
    /// seen, has what it lacks (one process would serve it now).
    Shared {
        wait: Duration,
        next_grant: bool,
    },
    /// The request is larger than the token bucket can ever hold.
    TooLarge {
        need: u64,
        capacity: u64,
    },
}

impl QuotaShortfall {
    /// When the request could fit, if ever.
    pub fn wait(&self) -> Option<Duration> {
        match *self {
            QuotaShortfall::Tokens { wait, .. }
            | QuotaShortfall::Requests { wait }
            | QuotaShortfall::Shared { wait, .. } => Some(wait),
            QuotaShortfall::TooLarge { .. } => None,
        }
    }
}

impl std::fmt::Display for QuotaShortfall {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            QuotaShortfall::Tokens { need, have, wait } => write!(
                f,
                "token quota: needs {need}, {have} left; fits in {}",
                fmt_duration(*wait)
            ),
            QuotaShortfall::Requests { wait } => write!(
                f,
                "request quota exhausted; next request fits in {}",
                fmt_duration(*wait)
            ),
            QuotaShortfall::Shared {
                wait,
                next_grant: true,
            } => write!(
                f,
                "shared quota: the central level has it, this replica's holding does not; next grant in {}",
                fmt_duration(*wait)
            ),
            QuotaShortfall::Shared {
                wait,
                next_grant: false,
            } => write!(
                f,
                "shared quota: neither this replica's holding nor its part of the central level holds it now; fits in about {}",
                fmt_duration(*wait)
            ),
            QuotaShortfall::TooLarge { need, capacity } => {
                write!(f, "needs {need} tokens, more than the bucket holds ({capacity})")
            }
        }
    }
}

/// Milliseconds with one decimal: "12.5ms".
pub fn fmt_duration(d: Duration) -> String {
    format!("{:.1}ms", d.as_secs_f64() * 1000.0)
}
