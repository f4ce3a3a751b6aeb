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

    /// Settles with what the region reported; returns the tokens charged.
    pub fn settle(mut self, c: Completion) -> u64 {
        match self.reservation.take() {
            Some(r) => self.engine.settle(&r, c),
            None => 0,
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

/// The tokens a request holds against its tenant's limits, settled exactly
/// once with what the regions charged: refunded for work never sent, and
/// kept for work that may have run when the task is dropped mid-request.
pub struct TenantCharge {
    engine: Arc<Engine>,
    hold: Option<crate::core::TenantHold>,
    charged: u64,
    at_risk: u64,
}

impl TenantCharge {
    pub fn new(engine: Arc<Engine>, hold: crate::core::TenantHold) -> Self {
        Self {
            engine,
            hold: Some(hold),
            charged: 0,
            at_risk: 0,
        }
    }

    pub fn tokens(&self) -> u64 {
        self.hold.as_ref().map_or(0, |h| h.tokens)
    }

    /// An attempt is about to be sent: if it is lost, count all of it.
    pub fn sending(&mut self) {
        self.at_risk = self.tokens();
    }

    /// An attempt was settled with `charged` tokens.
    pub fn settled(&mut self, charged: u64) {
        self.charged += charged;
        self.at_risk = 0;
    }

    pub fn finish(mut self) {
        self.settle_now();
    }

    fn settle_now(&mut self) {
        if let Some(hold) = self.hold.take() {
            self.engine.settle_tenant(hold, self.charged + self.at_risk);
        }
    }
}

impl Drop for TenantCharge {
    fn drop(&mut self) {
        self.settle_now();
    }
}
