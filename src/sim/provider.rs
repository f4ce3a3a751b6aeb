//! The LLM provider behind a simulated region: per-model token and request
//! limits that refuse with "429" when exceeded, counted at admission or on
//! usage like a real provider, optionally shared with another consumer.
//! Synchronous and clock-free, like the core (it reuses the core's bucket).

use std::time::{Duration, Instant};

use crate::core::{Accounting, ModelLimits, ProviderHint, QuotaBucket};

/// A refusal: the provider's limit cannot take the request now.
#[derive(Debug, Clone, PartialEq)]
pub struct Refusal {
    pub message: String,
    /// When the request would fit.
    pub retry_after: Duration,
}

/// What the simulated provider counted for one model.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ModelCounters {
    pub accepted: u64,
    pub rejected: u64,
    pub rejected_after_hint: u64,
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
    pub charged_tokens: u64,
    /// Tokens taken from the bucket at admission, per whole second since
    /// the provider started (the first `MAX_SECONDS`): what a window of
    /// the provider's own clock admitted, for benches.
    pub admitted_per_second: Vec<u64>,
    /// Tokens left in the bucket at the end of each whole second since the
    /// provider started (the first `MAX_SECONDS`): its unused level, for
    /// benches.
    pub remaining_per_second: Vec<i64>,
}

/// Seconds of `admitted_per_second` kept (an hour; later admissions are
/// counted in the totals only).
pub const MAX_SECONDS: usize = 3600;

#[derive(Debug)]
struct ModelLimit {
    name: String,
    accounting: Accounting,
    tokens: QuotaBucket,
    requests: QuotaBucket,
    /// Another consumer's tokens a minute, and when they were last taken.
    foreign_per_minute: u64,
    foreign_since: Instant,
    foreign_owed: f64,
    /// The last hint sent to a caller, to tell warned refusals from surprises.
    last_hint: Option<ProviderHint>,
    counters: ModelCounters,
    started: Instant,
}

/// Admitted work; hand it back to `complete`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Admission {
    model: usize,
    reserved: u64,
}

#[derive(Debug)]
pub struct Provider {
    models: Vec<ModelLimit>,
}

impl Provider {
    /// `limits` per model; `foreign_per_minute` is taken from every model's
    /// token limit by a consumer we do not see.
    pub fn new(limits: &[(String, ModelLimits)], foreign_per_minute: u64, now: Instant) -> Self {
        let models = limits
            .iter()
            .map(|(name, l)| ModelLimit {
                name: name.clone(),
                accounting: l.accounting,
                tokens: QuotaBucket::try_new(l.tokens_per_minute.max(1), l.burst_tokens, now)
                    .expect("limits are at least 1"),
                requests: QuotaBucket::try_new(l.requests_per_minute.max(1), l.burst_requests, now)
                    .expect("limits are at least 1"),
                foreign_per_minute,
                foreign_since: now,
                foreign_owed: 0.0,
                last_hint: None,
                counters: ModelCounters::default(),
                started: now,
            })
            .collect();
        Self { models }
    }

    /// Empties every model's buckets, as for a key somebody just spent (or
    /// a provider that grants no burst before its refill).
    pub fn empty(&mut self, now: Instant) {
        for m in &mut self.models {
            m.record_levels(now);
            for b in [&mut m.tokens, &mut m.requests] {
                let level = b.available(now).max(0) as u64;
                b.charge(level, now);
            }
        }
    }

    fn find(&self, model: &str) -> Option<usize> {
        self.models.iter().position(|m| m.name == model)
    }

    pub fn serves(&self, model: &str) -> bool {
        self.find(model).is_some()
    }

    /// The limits of `model`: tokens and requests a minute.
    pub fn limits(&self, model: &str) -> Option<(u64, u64)> {
        let m = &self.models[self.find(model)?];
        Some((m.tokens.per_minute(), m.requests.per_minute()))
    }

    pub fn model_names(&self) -> Vec<String> {
        self.models.iter().map(|m| m.name.clone()).collect()
    }

    /// Admits `prompt + max_output` tokens and one request, or refuses.
    pub fn admit(
        &mut self,
        model: &str,
        prompt: u64,
        max_output: u64,
        now: Instant,
    ) -> Result<Admission, Refusal> {
        let id = self.find(model).ok_or_else(|| Refusal {
            message: format!("model {model:?} is not served here"),
            retry_after: Duration::MAX,
        })?;
        let m = &mut self.models[id];
        m.record_levels(now);
        m.take_foreign(now);
        let need = prompt.saturating_add(max_output);
        let refusal = match (m.tokens.time_until(need, now), m.requests.time_until(1, now)) {
            (Ok(Duration::ZERO), Ok(Duration::ZERO)) => None,
            (Err(_), _) => Some((
                format!(
                    "request of {need} tokens is larger than the {model} limit ({})",
                    m.tokens.capacity()
                ),
                Duration::MAX,
            )),
            (Ok(Duration::ZERO), wait) => Some((
                format!(
                    "rate limit reached for {model}: requests per minute ({})",
                    m.requests.per_minute()
                ),
                wait.unwrap_or(Duration::MAX),
            )),
            (Ok(wait), _) => Some((
                format!(
                    "rate limit reached for {model}: tokens per minute ({}); requested {need}, {} left",
                    m.tokens.per_minute(),
                    m.tokens.available(now)
                ),
                wait,
            )),
        };
        if let Some((message, retry_after)) = refusal {
            m.counters.rejected += 1;
            let warned = m
                .last_hint
                .is_some_and(|h| h.remaining_tokens < need as i64 || h.remaining_requests < 1);
            if warned {
                m.counters.rejected_after_hint += 1;
            }
            return Err(Refusal { message, retry_after });
        }
        m.tokens.charge(need, now);
        m.requests.charge(1, now);
        m.counters.accepted += 1;
        let second = now.saturating_duration_since(m.started).as_secs() as usize;
        if second < MAX_SECONDS {
            let per_second = &mut m.counters.admitted_per_second;
            if per_second.len() <= second {
                per_second.resize(second + 1, 0);
            }
            per_second[second] += need;
        }
        Ok(Admission {
            model: id,
            reserved: need,
        })
    }

    /// Records what the request used (or produced before it was cancelled)
    /// and, under usage accounting, gives back what it did not use.
    pub fn complete(&mut self, a: Admission, prompt: u64, completion: u64, now: Instant) {
        let m = &mut self.models[a.model];
        m.record_levels(now);
        m.counters.prompt_tokens += prompt;
        m.counters.completion_tokens += completion;
        let used = prompt + completion;
        match m.accounting {
            Accounting::Admission => m.counters.charged_tokens += a.reserved,
            Accounting::Usage => {
                m.counters.charged_tokens += used;
                if used < a.reserved {
                    m.tokens.refund(a.reserved - used, now);
                } else {
                    m.tokens.charge(used - a.reserved, now);
                }
            }
        }
    }

    /// What the provider's rate-limit headers say now, remembered as sent.
    pub fn hint(&mut self, model: &str, now: Instant) -> Option<ProviderHint> {
        let id = self.find(model)?;
        let m = &mut self.models[id];
        m.record_levels(now);
        m.take_foreign(now);
        let hint = ProviderHint {
            remaining_tokens: m.tokens.available(now).max(0),
            remaining_requests: m.requests.available(now).max(0),
            reset_tokens: m.tokens.time_to_full(now),
            reset_requests: m.requests.time_to_full(now),
        };
        m.last_hint = Some(hint);
        Some(hint)
    }

    /// Per model: its counters and the tokens left now.
    pub fn counters(&mut self, now: Instant) -> Vec<(String, ModelCounters, i64)> {
        self.models
            .iter_mut()
            .map(|m| {
                m.record_levels(now);
                m.take_foreign(now);
                (m.name.clone(), m.counters.clone(), m.tokens.available(now))
            })
            .collect()
    }
}

impl ModelLimit {
    /// Records the bucket's level at every whole second since the last
    /// record up to `now`. Call it before the bucket changes: between
    /// changes it only refills, so each level is exact.
    fn record_levels(&mut self, now: Instant) {
        let seconds = (now.saturating_duration_since(self.started).as_secs() as usize).min(MAX_SECONDS);
        let recorded = &mut self.counters.remaining_per_second;
        while recorded.len() < seconds {
            let at = self.started + Duration::from_secs(recorded.len() as u64 + 1);
            recorded.push(self.tokens.available(at));
        }
    }

    /// The other consumer takes its tokens as they accrue, as far as the
    /// limit lets it (it gets refused too when the bucket is empty).
    fn take_foreign(&mut self, now: Instant) {
        if self.foreign_per_minute == 0 {
            return;
        }
        let dt = now.saturating_duration_since(self.foreign_since);
        self.foreign_since = self.foreign_since.max(now);
        self.foreign_owed += self.foreign_per_minute as f64 * dt.as_secs_f64() / 60.0;
        let whole = self.foreign_owed.floor();
        self.foreign_owed -= whole;
        let take = (whole as i64).min(self.tokens.available(now).max(0));
        if take > 0 {
            self.tokens.charge(take as u64, now);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits(accounting: Accounting) -> Vec<(String, ModelLimits)> {
        vec![(
            "m".into(),
            ModelLimits {
                tokens_per_minute: 6000,
                requests_per_minute: 600,
                burst_tokens: None,
                burst_requests: None,
                accounting,
            },
        )]
    }

    #[test]
    fn refuses_past_the_limit_and_counts_warned_refusals() {
        let t0 = crate::testing::epoch();
        let mut p = Provider::new(&limits(Accounting::Admission), 0, t0);
        let a = p.admit("m", 1000, 4000, t0).unwrap();
        p.complete(a, 1000, 10, t0);
        // Admission accounting: nothing comes back.
        let err = p.admit("m", 500, 1000, t0).unwrap_err();
        assert!(err.message.contains("tokens per minute"), "{}", err.message);
        assert_eq!(err.retry_after, Duration::from_secs(5));
        let h = p.hint("m", t0).unwrap();
        assert_eq!(h.remaining_tokens, 1000);
        assert!(p.admit("m", 500, 1000, t0).is_err());
        let (_, c, _) = &p.counters(t0)[0];
        assert_eq!((c.accepted, c.rejected, c.rejected_after_hint), (1, 2, 1));
    }

    #[test]
    fn usage_accounting_gives_back_the_unused_part() {
        let t0 = crate::testing::epoch();
        let mut p = Provider::new(&limits(Accounting::Usage), 0, t0);
        let a = p.admit("m", 1000, 4000, t0).unwrap();
        p.complete(a, 1000, 500, t0);
        assert_eq!(p.hint("m", t0).unwrap().remaining_tokens, 4500);
    }

    #[test]
    fn a_foreign_consumer_takes_its_share() {
        let t0 = crate::testing::epoch();
        let mut p = Provider::new(&limits(Accounting::Usage), 3000, t0);
        let a = p.admit("m", 6000, 0, t0).unwrap();
        p.complete(a, 6000, 0, t0);
        // After 10 s the bucket refilled 1000 and the other consumer took 500.
        let h = p.hint("m", t0 + Duration::from_secs(10)).unwrap();
        assert_eq!(h.remaining_tokens, 500);
    }
}
