//! The one place the edge reads time. The core takes `now` as an argument;
//! everything at the edge asks here: tokio's clock (the system's outside
//! tests), so that a test on a paused clock drives deadlines, queue waits,
//! cool-downs and the timers that wait for them alike; and the wall clock,
//! for calendar days, ids and certificates' dates only.

use std::time::{Instant, SystemTime};

/// Now, as the `Instant` the core takes.
pub fn now() -> Instant {
    tokio::time::Instant::now().into_std()
}

/// Now, as the `Instant` tokio's timers take.
pub fn tokio_now() -> tokio::time::Instant {
    tokio::time::Instant::now()
}

/// Seconds since the Unix epoch, for calendar days, ids and certificates'
/// validity (never for durations: the wall clock can jump).
pub fn unix_secs() -> u64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// Milliseconds since the Unix epoch: when a job was made or finished
/// (jobs outlive the process, so they are dated on the wall clock).
pub fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// Time since `t` on the same clock (`Instant::elapsed` reads the system's,
/// which a paused test clock does not drive).
pub fn since(t: Instant) -> std::time::Duration {
    now().saturating_duration_since(t)
}
