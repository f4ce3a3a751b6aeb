//! What a request holds, settled exactly once whatever happens to the task
//! holding it: its tenant's charge for the whole request (`Lease`) and, per
//! attempt, the tokens reserved in one region (`RegionHold`).
//!
//! A hold sees its desk only through `Settle`, the narrow return path
//! defined here (the quota desk implements it; this file knows nothing
//! else of the desk). Settling on purpose takes the desk's lock. Dropping
//! an unsettled hold never does: it gives its settlement back (a channel
//! that takes no lock another path may hold), and the desk applies it at
//! its next turn. Work never sent is refunded; work that may have run
//! stays charged.

use std::sync::Arc;

use crate::core::{Completion, Reservation, Settlement, TenantHold};

/// A settlement given back by a dropped hold.
pub(super) enum Returned {
    Region(Reservation, Completion),
    /// The hold, the tokens and the cost (micro-units) charged.
    Tenant(TenantHold, u64, u64),
}

/// Where holds are settled: the quota desk, as far as a hold needs it.
pub(super) trait Settle: Send + Sync {
    /// Settles a region reservation now; returns the tokens charged.
    fn settle_region(&self, r: &Reservation, c: Completion) -> u64;
    /// Settles a tenant's charge now: tokens, and cost in micro-units.
    fn settle_tenant(&self, hold: TenantHold, charged: u64, cost: u64);
    /// Takes a dropped hold's settlement without taking any lock (it is
    /// called from `Drop`, possibly while the desk's lock is held).
    fn give_back(&self, returned: Returned);
}

/// The tokens one attempt reserved in one region.
pub struct RegionHold {
    desk: Arc<dyn Settle>,
    reservation: Option<Reservation>,
    sent: bool,
}

impl RegionHold {
    pub(super) fn new(desk: Arc<dyn Settle>, reservation: Reservation) -> Self {
        Self {
            desk,
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
            Some(r) => self.desk.settle_region(&r, c),
            None => 0,
        }
    }
}

impl Drop for RegionHold {
    fn drop(&mut self) {
        if let Some(r) = self.reservation.take() {
            let settlement = if self.sent {
                Settlement::Unknown
            } else {
                Settlement::NotRun
            };
            let c = Completion {
                settlement,
                ..Completion::abandoned()
            };
            self.desk.give_back(Returned::Region(r, c));
        }
    }
}

impl std::fmt::Debug for RegionHold {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RegionHold")
            .field("reservation", &self.reservation)
            .field("sent", &self.sent)
            .finish()
    }
}

/// The tokens (and the worst-case cost) a request holds against its
/// tenant's limits, settled once with what the regions charged: refunded for
/// work never sent, kept for work that may have run when the request is
/// dropped mid-attempt. Cost comes only from usage a region reported (a
/// failed attempt costs nothing), or is the worst case for work that may
/// have run without a report.
pub struct Lease {
    desk: Arc<dyn Settle>,
    hold: Option<TenantHold>,
    charged: u64,
    at_risk: u64,
    cost: u64,
    cost_at_risk: u64,
}

impl Lease {
    pub(super) fn new(desk: Arc<dyn Settle>, hold: TenantHold) -> Self {
        Self {
            desk,
            hold: Some(hold),
            charged: 0,
            at_risk: 0,
            cost: 0,
            cost_at_risk: 0,
        }
    }

    fn tokens(&self) -> u64 {
        self.hold.as_ref().map_or(0, |h| h.tokens)
    }

    /// The worst-case cost this step holds (micro-units).
    pub fn worst_case_cost(&self) -> u64 {
        self.hold.as_ref().map_or(0, |h| h.cost)
    }

    /// An attempt is about to be sent: if it is lost, count all of it.
    pub fn sending(&mut self) {
        self.at_risk = self.tokens();
        self.cost_at_risk = self.worst_case_cost();
    }

    /// An attempt was settled with `charged` tokens and cost nothing (it
    /// failed, or was not run).
    pub fn settled(&mut self, charged: u64) {
        self.spent(charged, 0);
    }

    /// An attempt was settled with `charged` tokens and `cost` micro-units.
    pub fn spent(&mut self, charged: u64, cost: u64) {
        self.charged += charged;
        self.cost += cost;
        self.at_risk = 0;
        self.cost_at_risk = 0;
    }

    /// Settles the tenant's charge now, with what the regions charged.
    pub fn finish(mut self) {
        if let Some(hold) = self.hold.take() {
            self.desk
                .settle_tenant(hold, self.charged + self.at_risk, self.cost + self.cost_at_risk);
        }
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        if let Some(hold) = self.hold.take() {
            self.desk.give_back(Returned::Tenant(
                hold,
                self.charged + self.at_risk,
                self.cost + self.cost_at_risk,
            ));
        }
    }
}
