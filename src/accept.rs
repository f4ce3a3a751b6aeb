//! The accept loop under every listener: at most `max_connections` open at
//! once (more wait in the kernel's backlog), and when accepting fails for
//! want of resources (EMFILE: out of file descriptors) it backs off instead
//! of retrying at once. The pending connection stays in the backlog, so an
//! immediate retry fails again: tonic's loop spun a core at 100 % until
//! descriptors came back.

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;

/// First wait after a failed accept; doubled per failure up to `MAX_BACKOFF`.
const MIN_BACKOFF: Duration = Duration::from_millis(10);
const MAX_BACKOFF: Duration = Duration::from_secs(1);
/// The same trouble is logged as a warning at most this often.
const WARN_EVERY: Duration = Duration::from_secs(60);

/// An accepted connection and its slot under the cap, freed when dropped.
pub struct Accepted {
    pub stream: TcpStream,
    pub peer: SocketAddr,
    pub slot: OwnedSemaphorePermit,
}

pub struct Acceptor {
    listener: TcpListener,
    slots: Arc<Semaphore>,
    max: usize,
    /// Names the listener in logs ("gRPC", "metrics").
    what: &'static str,
    backoff: Backoff,
    /// Failed accepts since the last success.
    failures: u64,
    warned_failure: Option<Instant>,
    warned_full: Option<Instant>,
}

impl Acceptor {
    pub fn new(listener: TcpListener, max_connections: usize, what: &'static str) -> Self {
        Self {
            listener,
            slots: Arc::new(Semaphore::new(max_connections)),
            max: max_connections,
            what,
            backoff: Backoff::default(),
            failures: 0,
            warned_failure: None,
            warned_full: None,
        }
    }

    /// The next connection, once a slot is free. Never fails: errors are
    /// logged and retried after a back-off.
    pub async fn accept(&mut self) -> Accepted {
        let slot = match self.slots.clone().try_acquire_owned() {
            Ok(slot) => slot,
            Err(_) => {
                if due(&mut self.warned_full) {
                    tracing::warn!(
                        listener = self.what,
                        max = self.max,
                        "connection cap reached (server.max_connections); new connections wait until one closes"
                    );
                }
                self.slots
                    .clone()
                    .acquire_owned()
                    .await
                    .expect("the semaphore is never closed")
            }
        };
        loop {
            match self.listener.accept().await {
                Ok((stream, peer)) => {
                    if self.failures > 0 {
                        tracing::info!(
                            listener = self.what,
                            failures = self.failures,
                            "accepting connections again"
                        );
                        self.failures = 0;
                        self.backoff = Backoff::default();
                    }
                    // Small gRPC frames must not wait on Nagle.
                    let _ = stream.set_nodelay(true);
                    return Accepted { stream, peer, slot };
                }
                // That one connection went away before we took it; the next may be fine.
                Err(e) if per_connection(&e) => continue,
                Err(e) => {
                    self.failures += 1;
                    let wait = self.backoff.next();
                    if due(&mut self.warned_failure) {
                        tracing::warn!(
                            listener = self.what,
                            error = %e,
                            "accepting a connection failed; retrying with a back-off of up to {MAX_BACKOFF:?} (logged once a minute)"
                        );
                    } else {
                        tracing::debug!(listener = self.what, error = %e, ?wait, "accepting a connection failed");
                    }
                    tokio::time::sleep(wait).await;
                }
            }
        }
    }
}

fn per_connection(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::ConnectionAborted
            | io::ErrorKind::ConnectionReset
            | io::ErrorKind::ConnectionRefused
            | io::ErrorKind::Interrupted
    )
}

/// Whether a warning last given at `last` may be given again now.
fn due(last: &mut Option<Instant>) -> bool {
    let now = crate::clock::tokio_now();
    if last.is_some_and(|at| now.duration_since(at) < WARN_EVERY) {
        return false;
    }
    *last = Some(now);
    true
}

/// Doubling waits between failed accepts.
#[derive(Debug)]
struct Backoff(Duration);

impl Default for Backoff {
    fn default() -> Self {
        Self(MIN_BACKOFF)
    }
}

impl Backoff {
    fn next(&mut self) -> Duration {
        let wait = self.0;
        self.0 = (self.0 * 2).min(MAX_BACKOFF);
        wait
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn back_off_doubles_up_to_a_second() {
        let mut b = Backoff::default();
        let waits: Vec<_> = (0..10).map(|_| b.next().as_millis()).collect();
        assert_eq!(waits, [10, 20, 40, 80, 160, 320, 640, 1000, 1000, 1000]);
    }

    #[tokio::test(start_paused = true)]
    async fn warnings_are_given_once_a_minute() {
        let mut last = None;
        assert!(due(&mut last));
        assert!(!due(&mut last));
        tokio::time::advance(WARN_EVERY - Duration::from_millis(1)).await;
        assert!(!due(&mut last));
        tokio::time::advance(Duration::from_millis(1)).await;
        assert!(due(&mut last));
    }

    #[tokio::test]
    async fn at_the_cap_the_next_connection_waits_for_a_slot() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let mut acceptor = Acceptor::new(listener, 1, "test");
        let _a = TcpStream::connect(addr).await.unwrap();
        let _b = TcpStream::connect(addr).await.unwrap();
        let first = acceptor.accept().await;
        let second = tokio::time::timeout(Duration::from_millis(100), acceptor.accept()).await;
        assert!(second.is_err(), "the second waits while the first is open");
        drop(first);
        let second = tokio::time::timeout(Duration::from_secs(5), acceptor.accept()).await;
        assert!(second.is_ok(), "and is taken once it closes");
    }
}
