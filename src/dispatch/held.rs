//! A reservation that is settled exactly once, whatever happens to the task
//! holding it: dropped (the caller went away, a timeout fired) it is refunded
//! if the work was never sent, and kept if it was (the cluster may have run it).

use std::sync::Arc;

use super::Engine;
use crate::core::{Completion, Reservation, Settlement};

pub struct Held {
    engine: Arc<Engine>,
    reservation: Option<Reservation>,
    sent: bool,
}

impl Held {
    pub fn new(engine: Arc<Engine>, reservation: Reservation) -> Self {
        Self {
            engine,
            reservation: Some(reservation),
            sent: false,
        }
    }

    pub fn reservation(&self) -> &Reservation {
        self.reservation.as_ref().expect("held until settled")
    }

    /// From now on the cluster may be running the work.
    pub fn mark_sent(&mut self) {
        self.sent = true;
    }

    pub fn settle(mut self, c: Completion) {
        if let Some(r) = self.reservation.take() {
            self.engine.settle(&r, c);
        }
    }
}

impl Drop for Held {
    fn drop(&mut self) {
        if let Some(r) = self.reservation.take() {
            let c = if self.sent {
                Completion {
                    settlement: Settlement::Unknown,
                    ..Completion::abandoned()
                }
            } else {
                Completion::abandoned()
            };
            self.engine.settle(&r, c);
        }
    }
}

impl std::fmt::Debug for Held {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Held")
            .field("reservation", &self.reservation)
            .field("sent", &self.sent)
            .finish()
    }
}
