//! Overload control for one model's queue: controlled delay (CoDel; the
//! adaptive queue of "Fail at Scale"). A queue that absorbs a burst drains
//! again; a queue whose shortest wait stays above `target` for a whole
//! `interval` is standing: demand exceeds the refill, and waiting only turns
//! that into latency and then into refusals after a long wait. While a
//! queue stands (sheds), the scheduler refuses at once, with a retry hint,
//! a newcomer that cannot be served now, except for a bounded share of the
//! refill (`hold_share`) that newcomers may still wait for, so that large
//! requests are not starved; it goes back to absorbing bursts once a whole
//! `interval` passed without an early refusal. docs/OVERLOAD.md has the
//! measurements behind the defaults.
//!
//! Owner: the `Scheduler` that holds it (one per model), behind the quota
//! desk's lock.

use std::time::{Duration, Instant};

/// When a queue is standing, and how long a newcomer may then wait.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct OverloadSettings {
    /// The wait a queue may keep: above it for `interval`, it is standing.
    pub target: Duration,
    /// How long the shortest wait must stay above `target` before newcomers
    /// are refused, and how long without a refusal before they are not.
    pub interval: Duration,
    /// While shedding, the part of the refill newcomers that do not fit now
    /// may still wait and hold it for (so large requests are not starved).
    pub hold_share: f64,
}

impl Default for OverloadSettings {
    /// Chosen from the simulation in tests/sim_overload.rs (docs/OVERLOAD.md).
    fn default() -> Self {
        Self {
            target: Duration::from_millis(500),
            interval: Duration::from_secs(15),
            hold_share: 0.25,
        }
    }
}

/// Whether a queue absorbs a burst or sheds a standing load.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QueueState {
    /// Newcomers wait as long as `max_queue_wait` allows.
    Absorbing,
    /// Newcomers over their tenant's share wait at most `target`.
    Shedding,
}

impl QueueState {
    pub fn as_str(self) -> &'static str {
        match self {
            QueueState::Absorbing => "absorbing",
            QueueState::Shedding => "shedding",
        }
    }
}

/// One model's standing-wait tracker.
#[derive(Debug, Clone, Default)]
pub struct StandingWait {
    /// Since when the head has waited longer than the target without a break.
    above_since: Option<Instant>,
    /// Set while shedding: the last early refusal (or the switch to shedding).
    shedding_since_refusal: Option<Instant>,
    /// When `observe` last ran.
    last_seen: Option<Instant>,
    /// Newcomers refused early, since start.
    refused_early: u64,
    /// Tokens newcomers may still hold the refill for while shedding, as of
    /// `credit_at`.
    hold_credit: f64,
    credit_at: Option<Instant>,
}

impl StandingWait {
    /// Takes in the queue's head as it is at `now`: `head_since`, when the
    /// request now at the head was queued (`None`: nobody waits). Call it
    /// whenever the head may have changed and before deciding on a newcomer.
    pub fn observe(&mut self, settings: &OverloadSettings, head_since: Option<Instant>, now: Instant) {
        let last_seen = self.last_seen.unwrap_or(now).min(now);
        self.last_seen = Some(now);
        self.above_since = match head_since {
            Some(since) if since + settings.target <= now => {
                // The head crossed the target then; an earlier look saw it
                // below, so the wait has stood since the later of the two.
                Some(
                    self.above_since
                        .unwrap_or((since + settings.target).max(last_seen)),
                )
            }
            _ => None,
        };
        match self.shedding_since_refusal {
            Some(last) if now.saturating_duration_since(last) >= settings.interval => {
                self.shedding_since_refusal = None;
                // Start anew: a standing queue must stand a whole interval again.
                self.above_since = self.above_since.map(|_| now);
            }
            Some(_) => {}
            None => {
                if self
                    .above_since
                    .is_some_and(|s| now.saturating_duration_since(s) >= settings.interval)
                {
                    self.shedding_since_refusal = Some(now);
                }
            }
        }
    }

    pub fn state(&self) -> QueueState {
        if self.shedding_since_refusal.is_some() {
            QueueState::Shedding
        } else {
            QueueState::Absorbing
        }
    }

    /// Counts a newcomer refused early; shedding goes on for another interval.
    pub fn refused(&mut self, now: Instant) {
        self.refused_early += 1;
        if self.shedding_since_refusal.is_some() {
            self.shedding_since_refusal = Some(now);
        }
    }

    /// Whether a newcomer of `tokens` that does not fit now may still
    /// wait and hold the refill while the queue sheds: holders get at most
    /// `settings.hold_share` of the model's refill (`per_sec`), so a large
    /// request, which would rarely find its size left over, is not starved,
    /// while the rest goes to whatever fits now.
    pub fn take_hold(
        &mut self,
        settings: &OverloadSettings,
        tokens: u64,
        per_sec: f64,
        now: Instant,
    ) -> bool {
        let rate = settings.hold_share * per_sec;
        let cap = rate * settings.interval.as_secs_f64();
        let since = self
            .credit_at
            .map_or(f64::INFINITY, |t| now.saturating_duration_since(t).as_secs_f64());
        self.credit_at = Some(now);
        self.hold_credit = (self.hold_credit + rate * since).min(cap);
        let tokens = tokens as f64;
        if tokens <= self.hold_credit {
            self.hold_credit -= tokens;
            true
        } else {
            false
        }
    }

    pub fn refused_early(&self) -> u64 {
        self.refused_early
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: OverloadSettings = OverloadSettings {
        target: Duration::from_millis(500),
        interval: Duration::from_secs(5),
        hold_share: 0.25,
    };

    fn secs(t0: Instant, s: f64) -> Instant {
        t0 + Duration::from_secs_f64(s)
    }

    #[test]
    fn a_burst_that_drains_within_the_interval_is_absorbed() {
        let t0 = crate::testing::epoch();
        let mut w = StandingWait::default();
        // Heads waiting up to 4 s, for 4.9 s, then the queue empties.
        for i in 0..49 {
            let now = secs(t0, i as f64 * 0.1);
            w.observe(&S, Some(secs(t0, (i as f64 * 0.1 - 4.0).max(0.0))), now);
            assert_eq!(w.state(), QueueState::Absorbing, "at {i}");
        }
        w.observe(&S, None, secs(t0, 5.0));
        w.observe(&S, Some(secs(t0, 5.0)), secs(t0, 5.4));
        w.observe(&S, Some(secs(t0, 5.0)), secs(t0, 9.0));
        assert_eq!(w.state(), QueueState::Absorbing);
    }

    #[test]
    fn a_standing_queue_sheds_until_an_interval_passes_without_refusals() {
        let t0 = crate::testing::epoch();
        let mut w = StandingWait::default();
        // The head always waited at least 1 s: standing from 0.5 s on.
        w.observe(&S, Some(t0), secs(t0, 1.0));
        w.observe(&S, Some(secs(t0, 3.0)), secs(t0, 5.4));
        assert_eq!(w.state(), QueueState::Absorbing);
        w.observe(&S, Some(secs(t0, 4.0)), secs(t0, 6.1));
        assert_eq!(w.state(), QueueState::Shedding);
        // Short waits from now on, but newcomers still had to be refused.
        w.refused(secs(t0, 8.0));
        w.observe(&S, Some(secs(t0, 12.8)), secs(t0, 12.9));
        assert_eq!(w.state(), QueueState::Shedding);
        w.observe(&S, None, secs(t0, 13.0));
        assert_eq!(w.state(), QueueState::Absorbing);
        assert_eq!(w.refused_early(), 1);
    }

    #[test]
    fn a_head_that_changes_restarts_the_clock() {
        let t0 = crate::testing::epoch();
        let mut w = StandingWait::default();
        w.observe(&S, Some(t0), secs(t0, 3.0));
        // A young head: the shortest wait fell below the target.
        w.observe(&S, Some(secs(t0, 2.9)), secs(t0, 3.0));
        w.observe(&S, Some(secs(t0, 2.9)), secs(t0, 7.0));
        assert_eq!(w.state(), QueueState::Absorbing);
        w.observe(&S, Some(secs(t0, 2.9)), secs(t0, 8.5));
        assert_eq!(w.state(), QueueState::Shedding);
    }
}
