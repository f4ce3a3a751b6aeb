//! The quota of one (region, model): a token bucket and a request bucket that
//! count the way the provider behind the region counts, plus what the provider
//! last told us.

use std::time::{Duration, Instant};

use super::central::CentralLimits;
use super::in_flight::{Entry, InFlight};
use super::quota::{QuotaBucket, QuotaError, Shortfall};
pub use super::quota_shortfall::{QuotaShortfall, fmt_duration};
use super::shared_quota::{SharedQuota, SharingSettings};

/// How long hints are taken without crediting the provider's refill after
/// one showed that someone we do not see spends from the same quota.
pub const UNSEEN_MEMORY: Duration = Duration::from_secs(60);

/// The longest reset a provider refusal is believed for.
pub const MAX_REFUSAL_RESET: Duration = Duration::from_secs(3600);

/// How the provider behind a region charges its token limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Accounting {
    /// Charged at admission from the request (prompt estimate + max output
    /// tokens), never given back (OpenAI, Azure OpenAI).
    #[default]
    Admission,
    /// Adjusted to the real usage when the request completes.
    Usage,
}

impl Accounting {
    pub fn as_str(self) -> &'static str {
        match self {
            Accounting::Admission => "admission",
            Accounting::Usage => "usage",
        }
    }
}

/// Configured limits of one (region, model).
#[derive(Debug, Clone, PartialEq)]
pub struct ModelLimits {
    pub tokens_per_minute: u64,
    pub requests_per_minute: u64,
    pub burst_tokens: Option<u64>,
    pub burst_requests: Option<u64>,
    pub accounting: Accounting,
}

impl ModelLimits {
    /// What the central bucket applies for this (region, model) when the
    /// quota is shared (`[cluster]`): the provider's rates, and its bursts
    /// as the capacities (the level and every replica's holding together
    /// never exceed them, so one request fits as it does in one process).
    pub fn central(&self, settings: &SharingSettings) -> CentralLimits {
        CentralLimits {
            tokens_per_minute: self.tokens_per_minute,
            token_capacity: self.burst_tokens.unwrap_or(self.tokens_per_minute),
            requests_per_minute: self.requests_per_minute,
            request_capacity: self.burst_requests.unwrap_or(self.requests_per_minute),
            replicas_floor: settings.replicas_floor,
            hold_for: settings.chunk_ttl,
        }
    }
}

/// What the provider's rate-limit headers said, as the cluster relayed them.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct ProviderHint {
    pub remaining_tokens: i64,
    pub remaining_requests: i64,
    pub reset_tokens: Duration,
    pub reset_requests: Duration,
}

/// What became of a hint.
#[derive(Debug, Clone, PartialEq)]
pub enum HintOutcome {
    /// The hint was plausible; `lowered` says whether it cut our level.
    Applied { lowered: bool },
    /// The hint cannot be true (negative, above the configured limit) and was
    /// not used. `first` is true the first time this bucket saw an absurd hint,
    /// so the edge can log once.
    Ignored { reason: String, first: bool },
}

/// How a forwarded request ended, for settlement.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Settlement {
    /// The cluster never ran it (connection refused, refused at the door):
    /// everything goes back.
    NotRun,
    /// It ran and the provider counted this usage.
    Used { prompt: u64, completion: u64 },
    /// It may have run and nobody said how much it used: keep the reservation.
    Unknown,
}

/// A ticket for tokens taken from one (region, model); settled exactly once.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Hold {
    pub tokens: u64,
    /// Orders reservations, so a provider hint can tell which of ours it may
    /// not have seen yet.
    pub seq: u64,
    /// When the tokens were taken; the request leaves right after, so a
    /// provider's answer to it describes its quota as of about then.
    pub at: Instant,
}

/// The last hint and when it arrived, for operators.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LastHint {
    pub hint: ProviderHint,
    pub at: Instant,
}

/// The buckets as our own accounting has them, with a hint believed only as
/// far as the provider's refill since allows: what the provider has if
/// nobody we do not see spends from it. Hints are judged against these,
/// not against the buckets admission uses, which a cautious hint lowers
/// further: judged against those, a hint would look in step while an
/// unseen consumer is still there, and trust would come back too soon.
#[derive(Debug, Clone)]
struct Expected {
    tokens: QuotaBucket,
    requests: QuotaBucket,
}

#[derive(Debug, Clone)]
pub struct ModelQuota {
    limits: ModelLimits,
    tokens: QuotaBucket,
    requests: QuotaBucket,
    in_flight: InFlight,
    next_seq: u64,
    /// When the last provider refusal said its request would fit; for
    /// operators (admission goes by the buckets, which the refusal lowered).
    blocked_until: Option<Instant>,
    /// Until then hints are taken without crediting the provider's refill:
    /// one showed a consumer or limit we do not see.
    unseen_until: Option<Instant>,
    /// What the buckets would hold if nobody unseen spent from the quota.
    /// `None` while that is exactly what `tokens` and `requests` hold
    /// (every operation so far did the same to both; only a hint that
    /// lowers one of them tells them apart): then reserving and settling
    /// update two buckets, not four.
    expected: Option<Expected>,
    last_hint: Option<LastHint>,
    warned_absurd: bool,
    /// This replica's part of a quota shared with other replicas, when
    /// `[cluster]` is configured: a request needs room here too.
    shared: Option<SharedQuota>,
}

impl ModelQuota {
    pub fn try_new(limits: ModelLimits, now: Instant) -> Result<Self, QuotaError> {
        Ok(Self {
            tokens: QuotaBucket::try_new(limits.tokens_per_minute, limits.burst_tokens, now)?,
            requests: QuotaBucket::try_new(limits.requests_per_minute, limits.burst_requests, now)?,
            expected: None,
            limits,
            in_flight: InFlight::default(),
            next_seq: 0,
            blocked_until: None,
            unseen_until: None,
            last_hint: None,
            warned_absurd: false,
            shared: None,
        })
    }

    /// Shares this quota with other replicas from now on (or stops: `None`).
    pub fn set_sharing(&mut self, sharing: Option<SharingSettings>, now: Instant) {
        self.shared = match (self.shared.take(), sharing) {
            (Some(s), Some(_)) => Some(s),
            (None, Some(settings)) => Some(SharedQuota::new(self.limits.central(&settings), settings, now)),
            (_, None) => None,
        };
    }

    pub fn shared(&self) -> Option<&SharedQuota> {
        self.shared.as_ref()
    }

    pub fn shared_mut(&mut self) -> Option<&mut SharedQuota> {
        self.shared.as_mut()
    }

    pub fn limits(&self) -> &ModelLimits {
        &self.limits
    }

    pub fn tokens(&self) -> &QuotaBucket {
        &self.tokens
    }

    pub fn requests(&self) -> &QuotaBucket {
        &self.requests
    }

    pub fn in_flight_tokens(&self) -> u64 {
        self.in_flight.tokens
    }

    pub fn in_flight_requests(&self) -> usize {
        self.in_flight.live
    }

    pub fn last_hint(&self) -> Option<LastHint> {
        self.last_hint
    }

    pub fn blocked_for(&self, now: Instant) -> Option<Duration> {
        self.blocked_until
            .filter(|until| *until > now)
            .map(|until| until - now)
    }

    /// Whether `tokens` (and one request) fit now, and if so the headroom
    /// left after them: the lesser fraction of the two buckets. Changes
    /// nothing; the decision path's one look at the buckets.
    #[inline]
    pub fn headroom(&self, tokens: u64, now: Instant) -> Result<f64, QuotaShortfall> {
        let token_room = self.tokens.fit(tokens, now).map_err(|why| match why {
            Shortfall::Wait(wait) => QuotaShortfall::Tokens {
                need: tokens,
                have: self.tokens.available(now),
                wait,
            },
            Shortfall::TooLarge { capacity } => QuotaShortfall::TooLarge {
                need: tokens,
                capacity,
            },
        })?;
        // Usually the request bucket has more room than the token bucket
        // even without its refill since: then the lesser is the tokens',
        // and the request bucket's clock arithmetic can be skipped.
        let token_room = match &self.shared {
            Some(s) => token_room.min(self.shared_room(s, tokens, now)?),
            None => token_room,
        };
        if self.requests.room_at_least(1).is_some_and(|r| r >= token_room) {
            return Ok(token_room);
        }
        let request_room = self.requests.fit(1, now).map_err(|why| match why {
            Shortfall::Wait(wait) => QuotaShortfall::Requests { wait },
            Shortfall::TooLarge { .. } => QuotaShortfall::Requests { wait: Duration::MAX },
        })?;
        Ok(token_room.min(request_room))
    }

    /// Can `tokens` (and one request) be taken now? Changes nothing.
    pub fn check(&self, tokens: u64, now: Instant) -> Result<(), QuotaShortfall> {
        match self.tokens.time_until(tokens, now) {
            Ok(Duration::ZERO) => {}
            Ok(wait) | Err(Shortfall::Wait(wait)) => {
                return Err(QuotaShortfall::Tokens {
                    need: tokens,
                    have: self.tokens.available(now),
                    wait,
                });
            }
            Err(Shortfall::TooLarge { capacity }) => {
                return Err(QuotaShortfall::TooLarge {
                    need: tokens,
                    capacity,
                });
            }
        }
        match self.requests.time_until(1, now) {
            Ok(Duration::ZERO) => self.check_shared(tokens, now),
            Ok(wait) | Err(Shortfall::Wait(wait)) => Err(QuotaShortfall::Requests { wait }),
            // A request bucket holds at least one request (burst ≥ 1).
            Err(Shortfall::TooLarge { .. }) => Err(QuotaShortfall::Requests { wait: Duration::MAX }),
        }
    }

    fn check_shared(&self, tokens: u64, now: Instant) -> Result<(), QuotaShortfall> {
        match &self.shared {
            Some(s) => self.shared_room(s, tokens, now).map(|_| ()),
            None => Ok(()),
        }
    }

    /// The shared quota's headroom for `tokens`. (Its capacity is the
    /// burst, as the token bucket's: a request too large for it was
    /// refused before.)
    fn shared_room(&self, s: &SharedQuota, tokens: u64, now: Instant) -> Result<f64, QuotaShortfall> {
        s.fit(tokens, now)
            .map_err(|(wait, next_grant)| QuotaShortfall::Shared { wait, next_grant })
    }

    /// Takes `tokens` and one request, both or neither.
    pub fn reserve(&mut self, tokens: u64, now: Instant) -> Result<Hold, QuotaShortfall> {
        self.check(tokens, now)?;
        // Both fit (checked above at the same `now`): taking them is a
        // charge, without asking the buckets again.
        self.tokens.charge(tokens, now);
        self.requests.charge(1, now);
        if let Some(e) = &mut self.expected {
            e.tokens.charge(tokens, now);
            e.requests.charge(1, now);
        }
        if let Some(s) = &mut self.shared {
            s.take(tokens, now);
        }
        let seq = self.next_seq;
        self.next_seq += 1;
        self.in_flight.push(seq, tokens);
        Ok(Hold { tokens, seq, at: now })
    }

    /// Settles a reservation the way the provider counts. Returns the tokens
    /// finally charged for it. A hold this quota does not know (settled twice,
    /// or reserved before a reload replaced the quota) changes nothing.
    pub fn settle(&mut self, hold: Hold, outcome: Settlement, now: Instant) -> u64 {
        if !self.in_flight.contains(hold.seq) {
            return 0;
        }
        let charged = self.charge_for(hold, outcome, now);
        let entry = match outcome {
            Settlement::NotRun => Entry::NotRun,
            _ => Entry::Settled(charged),
        };
        self.in_flight.remove(hold.seq, entry);
        charged
    }

    fn charge_for(&mut self, hold: Hold, outcome: Settlement, now: Instant) -> u64 {
        match outcome {
            Settlement::NotRun => {
                self.tokens.refund(hold.tokens, now);
                self.requests.refund(1, now);
                if let Some(e) = &mut self.expected {
                    e.tokens.refund(hold.tokens, now);
                    e.requests.refund(1, now);
                }
                if let Some(s) = &mut self.shared {
                    s.give_back(hold.tokens, 1, now);
                }
                0
            }
            Settlement::Unknown => hold.tokens,
            Settlement::Used { prompt, completion } => match self.limits.accounting {
                Accounting::Admission => hold.tokens,
                Accounting::Usage => {
                    let used = prompt.saturating_add(completion);
                    if used < hold.tokens {
                        self.tokens.refund(hold.tokens - used, now);
                        if let Some(e) = &mut self.expected {
                            e.tokens.refund(hold.tokens - used, now);
                        }
                        if let Some(s) = &mut self.shared {
                            s.give_back(hold.tokens - used, 0, now);
                        }
                    } else {
                        self.tokens.charge(used - hold.tokens, now);
                        if let Some(e) = &mut self.expected {
                            e.tokens.charge(used - hold.tokens, now);
                        }
                        if let Some(s) = &mut self.shared {
                            s.use_extra(used - hold.tokens, now);
                        }
                    }
                    used
                }
            },
        }
    }

    /// Takes the provider's word for how much is left, when it knows of less
    /// than we do. The figure answers the request of `after` and is as of
    /// when that request left (`after.at`); what our later reservations
    /// spent since (in flight: reserved; settled: charged) counts against it.
    ///
    /// A provider in step with our accounting (its figure plus its refill
    /// since, less what we spent since, is not below our level) changes
    /// nothing: a late reply must not cut a correct level. One that knows of
    /// less has someone we do not see (another consumer, a smaller limit)
    /// taking part of its refill, so its figure is taken without the refill,
    /// and so are the next hints for `UNSEEN_MEMORY`: after an unseen
    /// consumer showed itself, crediting the refill would overshoot.
    /// Call it before settling `after`.
    pub fn apply_hint(&mut self, hint: ProviderHint, after: Option<Hold>, now: Instant) -> HintOutcome {
        if let Some(reason) = self.absurd(&hint) {
            let first = !self.warned_absurd;
            self.warned_absurd = true;
            return HintOutcome::Ignored { reason, first };
        }
        self.last_hint = Some(LastHint { hint, at: now });
        let (age, (tokens_after, requests_after)) = match after {
            Some(h) => (now.saturating_duration_since(h.at), self.in_flight.after(h.seq)),
            None => (
                Duration::ZERO,
                (self.in_flight.tokens, self.in_flight.live as u64),
            ),
        };
        if let Some(s) = &mut self.shared {
            // What the provider has at most, less what we spent after the
            // request it answered: the central level comes down to it.
            s.hint(
                hint.remaining_tokens - tokens_after as i64,
                hint.remaining_requests - requests_after as i64,
            );
        }
        // A hint in step with what we expect, while we trust the provider's
        // refill, changes nothing (below): the buckets need not be told apart.
        let (expected_tokens, expected_requests) = match &self.expected {
            Some(e) => (&e.tokens, &e.requests),
            None => (&self.tokens, &self.requests),
        };
        let changes_nothing = expected_tokens.in_step(hint.remaining_tokens, age, tokens_after, now)
            && expected_requests.in_step(hint.remaining_requests, age, requests_after, now)
            && self.unseen_until.is_none_or(|until| until <= now);
        if changes_nothing {
            return HintOutcome::Applied { lowered: false };
        }
        // Out of step with what we expect even with the refill credited:
        // someone unseen spends from the quota. What we expect comes down to
        // what the provider can have at most; the caution is (re)armed.
        let e = self.expected.get_or_insert_with(|| Expected {
            tokens: self.tokens.clone(),
            requests: self.requests.clone(),
        });
        let tokens_in_step = !e
            .tokens
            .lower_to_most(hint.remaining_tokens, age, tokens_after, now);
        let requests_in_step = !e
            .requests
            .lower_to_most(hint.remaining_requests, age, requests_after, now);
        if !(tokens_in_step && requests_in_step) {
            self.unseen_until = Some(now + UNSEEN_MEMORY);
        }
        let trusted = self.unseen_until.is_none_or(|until| until <= now);
        let lowered_tokens = !(trusted && tokens_in_step)
            && self
                .tokens
                .lower_to(hint.remaining_tokens - tokens_after as i64, now);
        let lowered_requests = !(trusted && requests_in_step)
            && self
                .requests
                .lower_to(hint.remaining_requests - requests_after as i64, now);
        HintOutcome::Applied {
            lowered: lowered_tokens || lowered_requests,
        }
    }

    fn absurd(&self, hint: &ProviderHint) -> Option<String> {
        if hint.remaining_tokens < 0 || hint.remaining_requests < 0 {
            return Some(format!(
                "negative remaining (tokens {}, requests {})",
                hint.remaining_tokens, hint.remaining_requests
            ));
        }
        if hint.remaining_tokens as u64 > self.tokens.capacity() {
            return Some(format!(
                "remaining tokens {} above the configured limit {}",
                hint.remaining_tokens,
                self.tokens.capacity()
            ));
        }
        if hint.remaining_requests as u64 > self.requests.capacity() {
            return Some(format!(
                "remaining requests {} above the configured limit {}",
                hint.remaining_requests,
                self.requests.capacity()
            ));
        }
        None
    }

    /// The provider refused a request of `tokens` and said it would fit
    /// after `reset`. That is all it says: the provider has `tokens` less
    /// `reset`'s refill now, so smaller requests fit sooner and the
    /// region-model is not closed for everyone. A reset within one
    /// request's refill may be the request limit instead (the refusal does
    /// not say which): the next request then waits until `reset` too, which
    /// costs at most that one interval if it was the token limit.
    pub fn mark_refused(&mut self, tokens: u64, reset: Duration, now: Instant) {
        let reset = reset.min(MAX_REFUSAL_RESET);
        let short = reset <= self.requests.refill_time(1);
        // The same to both pairs: while they are the same, to one.
        let expected = self.expected.as_mut().map(|e| (&mut e.tokens, &mut e.requests));
        for (t, r) in [Some((&mut self.tokens, &mut self.requests)), expected]
            .into_iter()
            .flatten()
        {
            t.lower_until_fits(tokens, reset, now);
            if short {
                r.lower_until_fits(1, reset, now);
            }
        }
        self.blocked_until = Some(now + reset);
        if let Some(s) = &mut self.shared {
            s.refused(reset, now);
        }
    }

    /// Applies new limits live, keeping each bucket's fill fraction.
    pub fn set_limits(&mut self, limits: ModelLimits, now: Instant) -> Result<(), QuotaError> {
        let set = |e: &Expected| -> Result<Expected, QuotaError> {
            let mut next = e.clone();
            next.tokens
                .set_limit(limits.tokens_per_minute, limits.burst_tokens, now)?;
            next.requests
                .set_limit(limits.requests_per_minute, limits.burst_requests, now)?;
            Ok(next)
        };
        let actual = set(&Expected {
            tokens: self.tokens.clone(),
            requests: self.requests.clone(),
        })?;
        let expected = self.expected.as_ref().map(set).transpose()?;
        self.tokens = actual.tokens;
        self.requests = actual.requests;
        self.expected = expected;
        if let Some(s) = &mut self.shared {
            s.set_limits(limits.central(s.settings()));
        }
        self.limits = limits;
        Ok(())
    }
}

#[cfg(test)]
#[path = "model_quota_tests.rs"]
mod tests;
