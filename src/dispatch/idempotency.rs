//! Requests that carry a `request_id` are answered once: a submission of an
//! id already running waits for that run's answer, and a repeat within the
//! window gets the recorded reply. Keyed by tenant, so tenants cannot see
//! each other's answers. Bounded in time and in entries.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use tokio::sync::watch;

use super::{DispatchError, Dispatched};

pub type Answer = Result<Dispatched, DispatchError>;
type Key = (Arc<str>, String);

// Held once per request id; boxing the reply would cost an allocation
// per answered request to save bytes in a map of at most the capacity.
#[allow(clippy::large_enum_variant)]
enum Slot {
    Running(watch::Sender<Option<Answer>>),
    Done(Dispatched),
}

struct Store {
    slots: HashMap<Key, Slot>,
    /// Completed entries by completion time, oldest first.
    done: VecDeque<(Key, Instant)>,
}

pub struct Idempotency {
    store: Mutex<Store>,
    window: Duration,
    capacity: usize,
}

/// What to do with a submission.
// Returned once per request, moved straight out: not worth a box.
#[allow(clippy::large_enum_variant)]
pub enum Begin {
    /// First of its id: run it and `finish` with the answer.
    Lead,
    /// The same id is running: wait for its answer.
    Wait(watch::Receiver<Option<Answer>>),
    /// Answered within the window: here is the reply again.
    Replay(Dispatched),
    /// The table is full of running requests: refuse rather than risk
    /// running an id twice.
    Full,
}

impl Idempotency {
    pub fn new(window: Duration, capacity: usize) -> Self {
        Self {
            store: Mutex::new(Store {
                slots: HashMap::new(),
                done: VecDeque::new(),
            }),
            window,
            capacity: capacity.max(1),
        }
    }

    /// How long an answer is kept.
    pub fn window(&self) -> Duration {
        self.window
    }

    pub fn begin(&self, tenant: &Arc<str>, id: &str, now: Instant) -> Begin {
        let mut s = self.store.lock();
        // Forget answers older than the window.
        while let Some((key, at)) = s.done.front() {
            if now.saturating_duration_since(*at) < self.window {
                break;
            }
            let key = key.clone();
            s.done.pop_front();
            if matches!(s.slots.get(&key), Some(Slot::Done(_))) {
                s.slots.remove(&key);
            }
        }
        let key = (tenant.clone(), id.to_string());
        match s.slots.get(&key) {
            Some(Slot::Running(tx)) => return Begin::Wait(tx.subscribe()),
            Some(Slot::Done(reply)) => return Begin::Replay(reply.clone()),
            None => {}
        }
        if s.slots.len() >= self.capacity {
            // Make room from the oldest answers; never drop a running one.
            while s.slots.len() >= self.capacity {
                let Some((old, _)) = s.done.pop_front() else {
                    return Begin::Full;
                };
                s.slots.remove(&old);
            }
        }
        let (tx, _) = watch::channel(None);
        s.slots.insert(key, Slot::Running(tx));
        Begin::Lead
    }

    /// Records the leader's answer and hands it to whoever waits. Only a
    /// reply is kept: after a failure the same id may be tried again.
    pub fn finish(&self, tenant: &Arc<str>, id: &str, answer: &Answer, now: Instant) {
        let mut s = self.store.lock();
        let key = (tenant.clone(), id.to_string());
        let Some(Slot::Running(tx)) = s.slots.remove(&key) else {
            return;
        };
        tx.send_replace(Some(answer.clone()));
        if let Ok(reply) = answer {
            s.slots.insert(key.clone(), Slot::Done(reply.clone()));
            s.done.push_back((key, now));
        }
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.store.lock().slots.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reply(region: &str) -> Dispatched {
        Dispatched {
            request_id: "id".into(),
            region: region.into(),
            output: bytes::Bytes::new(),
            usage: Default::default(),
            attempts: 1,
            queue_wait: Duration::ZERO,
            config_version: 1,
            path: Default::default(),
            cost: Default::default(),
            cached: None,
        }
    }

    #[test]
    fn one_run_per_id_within_the_window() {
        let t0 = crate::testing::epoch();
        let i = Idempotency::new(Duration::from_secs(60), 10);
        let a: Arc<str> = "a".into();
        assert!(matches!(i.begin(&a, "x", t0), Begin::Lead));
        let Begin::Wait(rx) = i.begin(&a, "x", t0) else {
            panic!()
        };
        i.finish(&a, "x", &Ok(reply("east")), t0);
        assert_eq!(rx.borrow().as_ref().unwrap().as_ref().unwrap().region, "east");
        assert!(
            matches!(i.begin(&a, "x", t0 + Duration::from_secs(59)), Begin::Replay(r) if r.region == "east")
        );
        assert!(
            matches!(i.begin(&a, "x", t0 + Duration::from_secs(61)), Begin::Lead),
            "the window passed"
        );
        let b: Arc<str> = "b".into();
        assert!(
            matches!(i.begin(&b, "x", t0), Begin::Lead),
            "another tenant's id is its own"
        );
    }

    #[test]
    fn a_failure_is_shared_but_not_kept() {
        let t0 = crate::testing::epoch();
        let i = Idempotency::new(Duration::from_secs(60), 10);
        let a: Arc<str> = "a".into();
        assert!(matches!(i.begin(&a, "x", t0), Begin::Lead));
        let Begin::Wait(rx) = i.begin(&a, "x", t0) else {
            panic!()
        };
        i.finish(&a, "x", &Err(DispatchError::ShuttingDown), t0);
        assert!(rx.borrow().as_ref().unwrap().is_err());
        assert!(
            matches!(i.begin(&a, "x", t0), Begin::Lead),
            "it may be tried again"
        );
    }

    #[test]
    fn bounded_by_capacity() {
        let t0 = crate::testing::epoch();
        let i = Idempotency::new(Duration::from_secs(60), 2);
        let a: Arc<str> = "a".into();
        for id in ["1", "2"] {
            assert!(matches!(i.begin(&a, id, t0), Begin::Lead));
        }
        assert!(
            matches!(i.begin(&a, "3", t0), Begin::Full),
            "two running: no room"
        );
        i.finish(&a, "1", &Ok(reply("east")), t0);
        assert!(
            matches!(i.begin(&a, "3", t0), Begin::Lead),
            "the oldest answer makes room"
        );
        assert_eq!(i.len(), 2);
    }
}
