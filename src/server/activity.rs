//! Requests in progress on one connection, so it can be closed once nobody
//! uses it. A request is in progress from its headers to the end of its
//! response body (streams included); HTTP/2 PINGs do not count as use.
//!
//! Owner: each connection's `Activity`, shared by its task (which reads it)
//! and its requests (each holds a `Busy` while in progress).

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use parking_lot::Mutex;
use tokio::time::Instant;

#[derive(Debug)]
pub struct Activity {
    active: AtomicUsize,
    idle_since: Mutex<Instant>,
}

impl Activity {
    pub fn new() -> Arc<Self> {
        Arc::new(Self {
            active: AtomicUsize::new(0),
            idle_since: Mutex::new(crate::clock::tokio_now()),
        })
    }

    /// A request started; it ends when the guard is dropped.
    pub fn begin(self: &Arc<Self>) -> Busy {
        self.active.fetch_add(1, Ordering::SeqCst);
        Busy(self.clone())
    }

    /// Since when nothing is in progress; `None` while something is.
    fn idle_since(&self) -> Option<Instant> {
        let since = *self.idle_since.lock();
        (self.active.load(Ordering::SeqCst) == 0).then_some(since)
    }

    /// Resolves once nothing has been in progress for `idle`.
    pub async fn idle_for(&self, idle: Duration) {
        loop {
            let now = crate::clock::tokio_now();
            let next = match self.idle_since() {
                // Busy: look again one idle period from now.
                None => now + idle,
                Some(since) if since + idle <= now => return,
                Some(since) => since + idle,
            };
            tokio::time::sleep_until(next).await;
        }
    }
}

/// One request in progress.
#[derive(Debug)]
pub struct Busy(Arc<Activity>);

impl Drop for Busy {
    fn drop(&mut self) {
        let mut since = self.0.idle_since.lock();
        if self.0.active.fetch_sub(1, Ordering::SeqCst) == 1 {
            *since = crate::clock::tokio_now();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const IDLE: Duration = Duration::from_secs(10);

    #[tokio::test(start_paused = true)]
    async fn idle_from_the_start_it_resolves_after_the_idle_time() {
        let a = Activity::new();
        let start = crate::clock::tokio_now();
        a.idle_for(IDLE).await;
        assert_eq!(start.elapsed(), IDLE);
    }

    #[tokio::test(start_paused = true)]
    async fn a_request_in_progress_keeps_it_busy_and_idleness_counts_from_its_end() {
        let a = Activity::new();
        let start = crate::clock::tokio_now();
        let busy = a.begin();
        let idle = tokio::spawn({
            let a = a.clone();
            async move { a.idle_for(IDLE).await }
        });
        // Busy for five idle periods.
        tokio::time::sleep(IDLE * 5).await;
        assert!(!idle.is_finished(), "idle while a request was in progress");
        let second = a.begin();
        drop(busy);
        tokio::time::sleep(IDLE * 2).await;
        assert!(
            !idle.is_finished(),
            "idle while the second request was in progress"
        );
        drop(second);
        idle.await.unwrap();
        assert_eq!(
            start.elapsed(),
            IDLE * 8,
            "one idle period after the last request"
        );
    }
}
