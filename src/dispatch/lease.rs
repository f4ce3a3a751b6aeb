//! What a request holds, settled exactly once whatever happens to the task
//! holding it: its tenant's charge for the whole request (`Lease`) and, per
//! attempt, the tokens reserved in one region (`RegionHold`).
//!
//! Settling on purpose takes the quota desk's lock. Dropping an unsettled
//! hold never does: it sends its settlement to the desk (a channel that
//! takes no lock another path may hold), which applies it at its next turn.
//! Work never sent is refunded; work that may have run stays charged.

use std::sync::Arc;

use super::desk::{QuotaDesk, Returned};
use crate::core::{Completion, Reservation, Settlement, TenantHold};

/// The tokens one attempt reserved in one region.
pub struct RegionHold {
    desk: Arc<QuotaDesk>,
    reservation: Option<Reservation>,
    sent: bool,
}

impl RegionHold {
    pub(super) fn new(desk: Arc<QuotaDesk>, reservation: Reservation) -> Self {
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
            Some(r) => self.desk.settle(&r, c),
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

/// The tokens a request holds against its tenant's limits, settled once
/// with what the regions charged: refunded for work never sent, kept for
/// work that may have run when the request is dropped mid-attempt.
pub struct Lease {
    desk: Arc<QuotaDesk>,
    hold: Option<TenantHold>,
    charged: u64,
    at_risk: u64,
}

impl Lease {
    pub(super) fn new(desk: Arc<QuotaDesk>, hold: TenantHold) -> Self {
        Self {
            desk,
            hold: Some(hold),
            charged: 0,
            at_risk: 0,
        }
    }

    fn tokens(&self) -> u64 {
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

    /// Settles the tenant's charge now, with what the regions charged.
    pub fn finish(mut self) {
        if let Some(hold) = self.hold.take() {
            self.desk.settle_tenant(hold, self.charged + self.at_risk);
        }
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        if let Some(hold) = self.hold.take() {
            self.desk
                .give_back(Returned::Tenant(hold, self.charged + self.at_risk));
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;
    use std::path::Path;

    use super::*;

    fn desk() -> Arc<QuotaDesk> {
        let toml = "[auth]\nallow_anonymous = true\nanonymous_tenant = \"t\"\n[[models]]\nname = \"m\"\n[[tenants]]\nname = \"t\"\nmax_concurrent = 1\n";
        let c = crate::config::parse_dispatcher(toml, Path::new("dispatcher.toml"), Some(HashMap::new()))
            .unwrap();
        QuotaDesk::new(&c, crate::testing::epoch()).unwrap()
    }

    fn in_flight(desk: &QuotaDesk) -> u32 {
        desk.view(crate::clock::now(), |_| String::new()).tenants[0]
            .report
            .in_flight
    }

    /// A lease dropped while its desk's lock is held (by the pump, say)
    /// does not wait for that lock: its settlement is applied at the desk's
    /// next turn. A Drop that locked would deadlock here.
    #[test]
    fn a_lease_dropped_under_the_desks_lock_settles_at_its_next_turn() {
        let desk = desk();
        let day = crate::core::Day {
            number: 0,
            next_in: std::time::Duration::from_secs(1),
        };
        let (hold, _) = desk.admit_tenant("t", "m", 10, day).unwrap();
        let lease = Lease::new(desk.clone(), hold);
        assert_eq!(in_flight(&desk), 1);
        let guard = desk.lock();
        drop(lease);
        drop(guard);
        assert_eq!(in_flight(&desk), 0, "settled at the next turn");
        assert!(
            desk.admit_tenant("t", "m", 10, day).is_ok(),
            "its max_concurrent slot is free again"
        );
    }
}
