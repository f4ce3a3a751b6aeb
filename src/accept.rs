//! The accept loop under every listener. Connections hold slots
//! (`slots`): at most `max_connections`, an untrusted one giving its slot
//! to a newcomer when all are taken, and more waiting in the kernel's
//! backlog only when every slot is held by a trusted connection. When
//! accepting fails for want of file descriptors (EMFILE), an untrusted
//! connection is closed to give its descriptor to the waiting one; with
//! none to close, the loop backs off instead of retrying at once
//! (the pending connection stays in the backlog, so an immediate retry
//! fails again: tonic's loop spun a core at 100 % until descriptors came
//! back).

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};
use tokio::time::Instant;

use crate::slots::{Limits, Refused, Slot, Slots};

/// First wait after a failed accept; doubled per failure up to `MAX_BACKOFF`.
const MIN_BACKOFF: Duration = Duration::from_millis(10);
const MAX_BACKOFF: Duration = Duration::from_secs(1);
/// The same trouble is logged as a warning at most this often.
const WARN_EVERY: Duration = Duration::from_secs(60);
/// How long an accept out of descriptors waits for the connection closed
/// to make room to give its descriptor back.
const EVICT_WAIT: Duration = Duration::from_millis(200);

/// An accepted connection and its slot, freed when dropped.
pub struct Accepted {
    pub stream: TcpStream,
    pub peer: SocketAddr,
    pub slot: Slot,
}

pub struct Acceptor {
    listener: TcpListener,
    slots: Arc<Slots>,
    backoff: Backoff,
    /// Failed accepts since the last success.
    failures: u64,
    warned_failure: Option<Instant>,
    warned_evict: Option<Instant>,
    warned_full: Option<Instant>,
    warned_peer: Option<Instant>,
}

impl Acceptor {
    /// `what` names the listener in logs and metrics ("gRPC", "metrics").
    pub fn new(listener: TcpListener, limits: Limits, what: &'static str) -> Self {
        Self {
            listener,
            slots: Slots::new(limits, what),
            backoff: Backoff::default(),
            failures: 0,
            warned_failure: None,
            warned_evict: None,
            warned_full: None,
            warned_peer: None,
        }
    }

    /// The next connection that gets a slot. Never fails: errors are
    /// logged and retried after a back-off; a connection whose source
    /// address is at its cap (`server.max_connections_per_peer`) is closed.
    pub async fn accept(&mut self) -> Accepted {
        loop {
            self.room().await;
            let (stream, peer) = self.next_socket().await;
            loop {
                match self.slots.admit(peer.ip()) {
                    Ok(slot) => {
                        // Small gRPC frames must not wait on Nagle.
                        let _ = stream.set_nodelay(true);
                        return Accepted { stream, peer, slot };
                    }
                    Err(Refused::PeerFull) => {
                        if due(&mut self.warned_peer) {
                            tracing::warn!(
                                listener = self.slots.what(),
                                peer = %peer.ip(),
                                cap = ?self.slots.limits().per_peer,
                                "a source address holds as many connections as it may (server.max_connections_per_peer); its new ones are closed at once (logged once a minute)"
                            );
                        }
                        self.slots.closed("peer_cap");
                        break;
                    }
                    // Every slot became trusted since `room`: hold on to
                    // this one until a slot is freed.
                    Err(Refused::Full) => self.room().await,
                }
            }
        }
    }

    /// Waits until a new connection would get a slot.
    async fn room(&mut self) {
        if self.slots.has_room() {
            return;
        }
        if due(&mut self.warned_full) {
            tracing::warn!(
                listener = self.slots.what(),
                max = self.slots.limits().max,
                "every connection slot is held by an authenticated connection (server.max_connections); new connections wait until one closes (logged once a minute)"
            );
        }
        self.slots.room().await;
    }

    async fn next_socket(&mut self) -> (TcpStream, SocketAddr) {
        loop {
            match self.listener.accept().await {
                Ok((stream, peer)) => {
                    if self.failures > 0 {
                        tracing::info!(
                            listener = self.slots.what(),
                            failures = self.failures,
                            "accepting connections again"
                        );
                        self.failures = 0;
                        self.backoff = Backoff::default();
                    }
                    return (stream, peer);
                }
                // That one connection went away before we took it; the next may be fine.
                Err(e) if per_connection(&e) => continue,
                Err(e) => {
                    if out_of_descriptors(&e)
                        && tokio::time::timeout(EVICT_WAIT, self.slots.take_back())
                            .await
                            .unwrap_or(true)
                    {
                        if due(&mut self.warned_evict) {
                            tracing::warn!(
                                listener = self.slots.what(),
                                error = %e,
                                "out of file descriptors: closing a connection that has not authenticated to take a new one (logged once a minute; keep server.max_connections below ulimit -n)"
                            );
                        }
                        continue;
                    }
                    self.failures += 1;
                    let wait = self.backoff.next();
                    if due(&mut self.warned_failure) {
                        tracing::warn!(
                            listener = self.slots.what(),
                            error = %e,
                            "accepting a connection failed; retrying with a back-off of up to {MAX_BACKOFF:?} (logged once a minute)"
                        );
                    } else {
                        tracing::debug!(listener = self.slots.what(), error = %e, ?wait, "accepting a connection failed");
                    }
                    tokio::time::sleep(wait).await;
                }
            }
        }
    }
}

/// EMFILE (the process's descriptors) or ENFILE (the system's), as Linux
/// numbers them.
fn out_of_descriptors(e: &io::Error) -> bool {
    matches!(e.raw_os_error(), Some(23 | 24))
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
    async fn at_the_cap_a_newcomer_waits_for_a_trusted_slot_and_takes_an_untrusted_one() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let limits = Limits {
            max: 1,
            per_peer: None,
        };
        let mut acceptor = Acceptor::new(listener, limits, "test");
        let _a = TcpStream::connect(addr).await.unwrap();
        let _b = TcpStream::connect(addr).await.unwrap();
        let first = acceptor.accept().await;
        first.slot.trust();
        let second = tokio::time::timeout(Duration::from_millis(100), acceptor.accept()).await;
        assert!(
            second.is_err(),
            "the second waits while the trusted first is open"
        );
        drop(first);
        let second = tokio::time::timeout(Duration::from_secs(5), acceptor.accept()).await;
        assert!(second.is_ok(), "and is taken once it closes");

        // An untrusted connection gives its slot to the next one at once.
        let second = second.unwrap();
        let _c = TcpStream::connect(addr).await.unwrap();
        let third = tokio::time::timeout(Duration::from_secs(5), acceptor.accept()).await;
        assert!(third.is_ok(), "taken at once");
        tokio::time::timeout(Duration::from_secs(1), second.slot.evicted())
            .await
            .expect("and the untrusted one is told to close");
    }

    #[tokio::test]
    async fn a_source_address_over_its_cap_is_closed_at_once() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let limits = Limits {
            max: 10,
            per_peer: Some(1),
        };
        let mut acceptor = Acceptor::new(listener, limits, "test");
        let _a = TcpStream::connect(addr).await.unwrap();
        let mut b = TcpStream::connect(addr).await.unwrap();
        let _first = acceptor.accept().await;
        let second = tokio::time::timeout(Duration::from_millis(200), acceptor.accept()).await;
        assert!(second.is_err(), "no second slot for 127.0.0.1");
        let mut buf = [0u8; 1];
        let read = tokio::time::timeout(
            Duration::from_secs(5),
            tokio::io::AsyncReadExt::read(&mut b, &mut buf),
        )
        .await
        .expect("the second connection is closed, not left waiting");
        assert!(matches!(read, Ok(0) | Err(_)));
    }
}
