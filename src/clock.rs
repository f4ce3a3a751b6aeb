//! The one place the edge reads time. The core takes `now` as an argument;
//! everything at the edge asks here: tokio's clock (the system's outside
//! tests), so that a test on a paused clock drives deadlines, queue waits,
//! cool-downs and the timers that wait for them alike; and the wall clock,
//! for calendar days, ids and certificates' dates only.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime};

/// How far a test moved the calendar on (`shift_calendar`); 0 outside tests.
static CALENDAR_SHIFT_SECS: AtomicU64 = AtomicU64::new(0);

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

/// Seconds since the Unix epoch as the calendar (UTC days and months of
/// budgets) counts them: the wall clock, plus what a test moved it on.
pub fn calendar_secs() -> u64 {
    unix_secs() + CALENDAR_SHIFT_SECS.load(Ordering::Relaxed)
}

/// Moves the calendar on by `by` for the whole process, so a test can
/// cross midnight UTC without waiting for it. Only tests call it.
pub fn shift_calendar(by: Duration) {
    CALENDAR_SHIFT_SECS.fetch_add(by.as_secs(), Ordering::Relaxed);
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
