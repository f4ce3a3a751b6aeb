//! The reservations of one (region, model) in the order they were made, so
//! a provider hint can tell which of ours it may not have seen yet.

use std::collections::VecDeque;

/// A reservation as `InFlight` keeps it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Entry {
    /// Not settled: the tokens reserved.
    Live(u64),
    /// Settled: the tokens the provider kept.
    Settled(u64),
    /// Settled without having reached the provider.
    NotRun,
}

/// Reservations in the order they were made. Settled ones are kept, with
/// what they were charged, until every earlier one is settled too (then
/// dropped from the front): a hint answering an older request must count
/// what was spent after it, settled or not. Reserve and settle cost
/// O(log n) without allocating per request; a hint costs O(k) for the k
/// reservations kept after its own (bounded by what is in flight behind
/// the oldest one still running).
#[derive(Debug, Clone, Default)]
pub(super) struct InFlight {
    /// (sequence number, entry), sequence ascending.
    holds: VecDeque<(u64, Entry)>,
    pub(super) live: usize,
    pub(super) tokens: u64,
}

impl InFlight {
    pub(super) fn push(&mut self, seq: u64, tokens: u64) {
        self.holds.push_back((seq, Entry::Live(tokens)));
        self.live += 1;
        self.tokens += tokens;
    }

    /// Settles `seq` as `entry`; false if it is not in flight.
    pub(super) fn remove(&mut self, seq: u64, entry: Entry) -> bool {
        let Ok(i) = self.holds.binary_search_by_key(&seq, |(s, _)| *s) else {
            return false;
        };
        let Entry::Live(tokens) = self.holds[i].1 else {
            return false;
        };
        self.holds[i].1 = entry;
        self.live -= 1;
        self.tokens -= tokens;
        while matches!(self.holds.front(), Some((_, Entry::Settled(_) | Entry::NotRun))) {
            self.holds.pop_front();
        }
        true
    }

    pub(super) fn contains(&self, seq: u64) -> bool {
        self.holds
            .binary_search_by_key(&seq, |(s, _)| *s)
            .is_ok_and(|i| matches!(self.holds[i].1, Entry::Live(_)))
    }

    /// Tokens spent by the reservations made after `seq` (reserved while
    /// in flight, charged once settled), and how many of them ran or may.
    pub(super) fn after(&self, seq: u64) -> (u64, u64) {
        let start = self.holds.partition_point(|(s, _)| *s <= seq);
        self.holds.range(start..).fold((0, 0), |(t, n), (_, e)| match *e {
            Entry::Live(tok) | Entry::Settled(tok) => (t + tok, n + 1),
            Entry::NotRun => (t, n),
        })
    }
}
