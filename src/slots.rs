//! The connection slots of one listener: who holds them and which can be
//! taken back.
//!
//! A listener holds at most `max` connections, and, when a per-peer cap is
//! set, at most `per_peer` from one source address. A connection is
//! *untrusted* until it has carried a request that authenticated (the
//! listener says when: `Slot::trust`). When every slot is taken, a new
//! connection takes the slot of an untrusted one, which is closed: the
//! oldest of the source address holding the most untrusted connections.
//! Only when every slot is held by a trusted connection do new ones wait
//! (in the listen backlog). So callers that never finish a handshake, never
//! send a preface, or never finish a request body cannot keep an
//! authenticated caller out, however many they are: each new connection
//! pushes one of them out (Envoy's overload manager makes room the same
//! way, closing what costs most and proves least), and a newcomer from a
//! quiet address outlives the churn of a busy one. The optional per-peer
//! cap bounds what one source address holds at all.
//!
//! Owner: `Slots::table`, one `parking_lot::Mutex`, held for one lookup or
//! update, never across an await. Age is the order of admission.

use std::collections::{BTreeMap, HashMap};
use std::net::IpAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use parking_lot::Mutex;
use tokio::sync::Notify;
use tokio_util::sync::{CancellationToken, WaitForCancellationFuture};

/// Connections a listener closed before their client did, by reason:
/// `evicted` (its slot went to a newer connection), `peer_cap`,
/// `handshake_timeout`, `tls_failed`, `body_timeout`, `idle`.
pub const CLOSED_TOTAL: &str = "dispatcher_connections_closed_total";

/// How many connections a listener holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    pub max: usize,
    /// At most this many from one source address; `None`: no such cap.
    pub per_peer: Option<usize>,
}

/// Why a new connection got no slot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refused {
    /// Its source address holds `per_peer` connections already.
    PeerFull,
    /// Every slot is held by a trusted connection.
    Full,
}

/// One admitted connection's signals, shared by its slot and the table.
#[derive(Debug, Default)]
struct Signals {
    /// Its slot was given to a newer connection: close it.
    evicted: CancellationToken,
    /// Its slot was dropped (the connection and its socket are gone).
    gone: CancellationToken,
}

#[derive(Debug)]
struct Table {
    limits: Limits,
    next_id: u64,
    /// Connections holding a slot (trusted or not; not evicted ones).
    held: usize,
    /// Untrusted connections holding a slot, by source address, oldest first.
    untrusted: HashMap<IpAddr, BTreeMap<u64, Arc<Signals>>>,
    by_peer: HashMap<IpAddr, usize>,
}

impl Table {
    fn new(limits: Limits) -> Self {
        Self {
            limits,
            next_id: 0,
            held: 0,
            untrusted: HashMap::new(),
            by_peer: HashMap::new(),
        }
    }

    /// Whether a new connection would get a slot (unless its peer is full).
    fn has_room(&self) -> bool {
        self.held < self.limits.max || !self.untrusted.is_empty()
    }

    /// A slot for a connection from `peer`: a free one, or an untrusted
    /// connection's (whose signals are returned, to close it).
    fn admit(&mut self, peer: IpAddr, signals: Arc<Signals>) -> Result<(u64, Option<Arc<Signals>>), Refused> {
        let from_peer = self.by_peer.get(&peer).copied().unwrap_or(0);
        if self.limits.per_peer.is_some_and(|cap| from_peer >= cap) {
            return Err(Refused::PeerFull);
        }
        let evicted = if self.held >= self.limits.max {
            Some(self.evict().ok_or(Refused::Full)?)
        } else {
            None
        };
        let id = self.next_id;
        self.next_id += 1;
        self.held += 1;
        *self.by_peer.entry(peer).or_default() += 1;
        self.untrusted.entry(peer).or_default().insert(id, signals);
        Ok((id, evicted))
    }

    /// Takes an untrusted connection's slot back: the oldest of the source
    /// address that holds the most untrusted connections, so a newcomer
    /// from elsewhere is not pushed out by one busy source's arrivals.
    fn evict(&mut self) -> Option<Arc<Signals>> {
        let (&peer, _) = self.untrusted.iter().max_by_key(|(_, conns)| {
            let oldest = conns.keys().next().copied().unwrap_or(u64::MAX);
            (conns.len(), std::cmp::Reverse(oldest))
        })?;
        let conns = self.untrusted.get_mut(&peer).expect("just found");
        let (_, signals) = conns.pop_first().expect("never empty");
        if conns.is_empty() {
            self.untrusted.remove(&peer);
        }
        self.unhold(peer);
        signals.evicted.cancel();
        Some(signals)
    }

    fn trust(&mut self, id: u64, peer: IpAddr) {
        if let Some(conns) = self.untrusted.get_mut(&peer) {
            conns.remove(&id);
            if conns.is_empty() {
                self.untrusted.remove(&peer);
            }
        }
    }

    /// A connection closed; frees its slot unless it was taken back already.
    fn release(&mut self, id: u64, peer: IpAddr, signals: &Signals) {
        if signals.evicted.is_cancelled() {
            return;
        }
        self.trust(id, peer);
        self.unhold(peer);
    }

    fn unhold(&mut self, peer: IpAddr) {
        self.held -= 1;
        if let Some(n) = self.by_peer.get_mut(&peer) {
            *n -= 1;
            if *n == 0 {
                self.by_peer.remove(&peer);
            }
        }
    }
}

/// The slots of one listener (see the module).
#[derive(Debug)]
pub struct Slots {
    /// Names the listener in logs and metrics ("gRPC", "admin", "metrics").
    what: &'static str,
    table: Mutex<Table>,
    /// A slot was freed; the acceptor may wait for one.
    freed: Notify,
}

impl Slots {
    pub fn new(limits: Limits, what: &'static str) -> Arc<Self> {
        Arc::new(Self {
            what,
            table: Mutex::new(Table::new(limits)),
            freed: Notify::new(),
        })
    }

    pub fn limits(&self) -> Limits {
        self.table.lock().limits
    }

    pub fn what(&self) -> &'static str {
        self.what
    }

    /// Counts a connection this listener closed (or refused) and why.
    pub fn closed(&self, reason: &'static str) {
        metrics::counter!(CLOSED_TOTAL, "listener" => self.what, "reason" => reason).increment(1);
    }

    pub fn has_room(&self) -> bool {
        self.table.lock().has_room()
    }

    /// Waits until a new connection would get a slot.
    pub async fn room(&self) {
        loop {
            // Only the acceptor waits here, and `notify_one` keeps a permit
            // for it when it is not waiting yet, so no wake-up is lost.
            let freed = self.freed.notified();
            if self.has_room() {
                return;
            }
            freed.await;
        }
    }

    /// A slot for a new connection from `peer`; when every slot is taken,
    /// an untrusted connection is told to close (`Slot::evicted`) and its
    /// slot is this one's.
    pub fn admit(self: &Arc<Self>, peer: IpAddr) -> Result<Slot, Refused> {
        let signals = Arc::new(Signals::default());
        let (id, evicted) = self.table.lock().admit(peer, signals.clone())?;
        if evicted.is_some() {
            self.closed("evicted");
        }
        Ok(Slot {
            slots: self.clone(),
            id,
            peer,
            signals,
            trusted: AtomicBool::new(false),
        })
    }

    /// Takes an untrusted connection's slot back (to free its file
    /// descriptor); resolves when that connection is gone, or at once with
    /// `false` when every connection is trusted.
    pub async fn take_back(&self) -> bool {
        let Some(signals) = self.table.lock().evict() else {
            return false;
        };
        self.closed("evicted");
        signals.gone.cancelled().await;
        true
    }
}

/// One connection's slot, freed when dropped.
#[derive(Debug)]
pub struct Slot {
    slots: Arc<Slots>,
    id: u64,
    peer: IpAddr,
    signals: Arc<Signals>,
    trusted: AtomicBool,
}

impl Slot {
    /// The connection carried an authenticated request: its slot is no
    /// longer given to newer connections.
    pub fn trust(&self) {
        if !self.trusted.swap(true, Ordering::Relaxed) {
            self.slots.table.lock().trust(self.id, self.peer);
        }
    }

    pub fn is_trusted(&self) -> bool {
        self.trusted.load(Ordering::Relaxed)
    }

    /// Resolves when the slot was given to a newer connection: close this
    /// one now.
    pub fn evicted(&self) -> WaitForCancellationFuture<'_> {
        self.signals.evicted.cancelled()
    }

    pub fn peer(&self) -> IpAddr {
        self.peer
    }

    /// Counts this connection as closed by the listener, for `reason`.
    pub fn closed(&self, reason: &'static str) {
        self.slots.closed(reason);
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.slots.table.lock().release(self.id, self.peer, &self.signals);
        self.signals.gone.cancel();
        self.slots.freed.notify_one();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn ip(last: u8) -> IpAddr {
        IpAddr::from([10, 0, 0, last])
    }

    fn slots(max: usize, per_peer: Option<usize>) -> Arc<Slots> {
        Slots::new(Limits { max, per_peer }, "test")
    }

    fn is_evicted(s: &Slot) -> bool {
        s.signals.evicted.is_cancelled()
    }

    #[test]
    fn the_busiest_address_gives_up_its_oldest_untrusted_slot_first() {
        let s = slots(4, None);
        let quiet = s.admit(ip(9)).unwrap();
        let busy: Vec<Slot> = (0..3).map(|_| s.admit(ip(1)).unwrap()).collect();
        // Three newcomers from the busy address: each pushes out the busy
        // address's oldest, never the quiet one (older as it is).
        let newer: Vec<Slot> = (0..3).map(|_| s.admit(ip(1)).unwrap()).collect();
        assert!(busy.iter().all(is_evicted));
        assert!(!is_evicted(&quiet) && !newer.iter().any(is_evicted));
        // With every address at one untrusted connection, the oldest goes.
        let s = slots(2, None);
        let a = s.admit(ip(1)).unwrap();
        let b = s.admit(ip(2)).unwrap();
        let _c = s.admit(ip(3)).unwrap();
        assert!(is_evicted(&a) && !is_evicted(&b));
    }

    #[test]
    fn a_full_listener_gives_the_oldest_untrusted_slot_to_a_newcomer() {
        let s = slots(3, None);
        let a = s.admit(ip(1)).unwrap();
        let b = s.admit(ip(2)).unwrap();
        let c = s.admit(ip(3)).unwrap();
        a.trust();
        // Full: the oldest untrusted one (b; a is trusted) makes room.
        let d = s.admit(ip(4)).unwrap();
        assert!(!is_evicted(&a) && is_evicted(&b) && !is_evicted(&c));
        let e = s.admit(ip(5)).unwrap();
        assert!(is_evicted(&c));
        // b and c leaving frees nothing twice: d and e hold the two slots.
        drop((b, c));
        assert_eq!(s.table.lock().held, 3);
        d.trust();
        e.trust();
        assert_eq!(
            s.admit(ip(6)).unwrap_err(),
            Refused::Full,
            "every slot is trusted"
        );
        assert!(!s.has_room());
        drop(a);
        assert!(s.has_room());
        assert!(s.admit(ip(6)).is_ok());
    }

    #[test]
    fn the_per_peer_cap_counts_held_slots_of_one_address() {
        let s = slots(10, Some(2));
        let a = s.admit(ip(1)).unwrap();
        let _b = s.admit(ip(1)).unwrap();
        assert_eq!(s.admit(ip(1)).unwrap_err(), Refused::PeerFull);
        assert!(s.admit(ip(2)).is_ok(), "another address is not affected");
        a.trust();
        assert_eq!(
            s.admit(ip(1)).unwrap_err(),
            Refused::PeerFull,
            "trusted connections count too"
        );
        drop(a);
        assert!(s.admit(ip(1)).is_ok());
    }

    #[test]
    fn an_evicted_slot_no_longer_counts_for_its_peer() {
        let s = slots(1, Some(1));
        let a = s.admit(ip(1)).unwrap();
        let b = s.admit(ip(2)).unwrap();
        assert!(is_evicted(&a));
        // a's connection is still closing; its address may connect again.
        let c = s.admit(ip(1)).unwrap();
        assert!(is_evicted(&b));
        drop((a, b));
        let t = s.table.lock();
        assert_eq!((t.held, t.by_peer.len()), (1, 1));
        drop(t);
        drop(c);
        let t = s.table.lock();
        assert_eq!((t.held, t.by_peer.len(), t.untrusted.len()), (0, 0, 0));
        drop(t);
    }

    #[tokio::test(start_paused = true)]
    async fn taking_back_a_descriptor_waits_for_its_connection_to_go() {
        let s = slots(4, None);
        let a = s.admit(ip(1)).unwrap();
        a.trust();
        let b = s.admit(ip(2)).unwrap();
        let evicting = tokio::spawn({
            let s = s.clone();
            async move { s.take_back().await }
        });
        tokio::time::sleep(Duration::from_secs(1)).await;
        assert!(
            is_evicted(&b) && !evicting.is_finished(),
            "b is told to close, and waited for"
        );
        drop(b);
        assert!(evicting.await.unwrap());
        assert!(!s.take_back().await, "a is trusted: nothing to take back");
    }

    #[tokio::test(start_paused = true)]
    async fn room_waits_for_a_freed_slot() {
        let s = slots(1, None);
        let a = s.admit(ip(1)).unwrap();
        a.trust();
        let waiting = tokio::spawn({
            let s = s.clone();
            async move { s.room().await }
        });
        tokio::time::sleep(Duration::from_secs(1)).await;
        assert!(!waiting.is_finished());
        drop(a);
        tokio::time::timeout(Duration::from_secs(1), waiting)
            .await
            .expect("room once the slot is freed")
            .unwrap();
    }
}
