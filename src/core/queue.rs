//! Requests waiting for quota. One queue per model (every region serving a
//! model draws from the same pool of waiters); the order within it is a
//! `Discipline`, so tenant fairness can replace first-come-first-served
//! without touching the scheduler.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Instant;

/// One request waiting for quota, with the caller's `ticket` (how to hand
/// it its reservation; the core never looks inside).
#[derive(Debug)]
pub struct Waiter<T> {
    pub id: u64,
    pub model: Arc<str>,
    pub tokens: u64,
    pub origin: Option<Arc<str>>,
    pub tenant: Arc<str>,
    /// Regions already tried for this request (failover).
    pub tried: Vec<Arc<str>>,
    pub enqueued: Instant,
    /// Past this it is dropped from the queue.
    pub deadline: Instant,
    /// When it could next fit, as last computed while it was at the head.
    pub retry_at: Option<Instant>,
    pub ticket: T,
}

/// The order in which one model's waiters are served. The head is the one
/// the refill is held for: nobody behind it is served before it.
pub trait Discipline<T>: Send {
    fn push(&mut self, w: Waiter<T>);
    fn head(&self) -> Option<&Waiter<T>>;
    fn head_mut(&mut self) -> Option<&mut Waiter<T>>;
    fn pop(&mut self) -> Option<Waiter<T>>;
    /// Removes and returns every waiter for which `drop` is true.
    fn remove_where(&mut self, drop: &mut dyn FnMut(&Waiter<T>) -> bool) -> Vec<Waiter<T>>;
    fn len(&self) -> usize;
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// When the longest-waiting request began to wait.
    fn oldest(&self) -> Option<Instant>;
    /// Tokens a new request from `tenant` would wait behind.
    fn tokens_ahead(&self, tenant: &str) -> u64;
    /// Requests a new request from `tenant` would wait behind (for request
    /// limits, as `tokens_ahead` is for token limits).
    fn requests_ahead(&self, tenant: &str) -> u64;
    /// The part of the model's refill `tenant` would get while it waits.
    fn share(&self, tenant: &str) -> f64 {
        let _ = tenant;
        1.0
    }
    /// Up to `n` waiters that may be served next, in order, the head first.
    fn candidates(&self, n: usize) -> Vec<u64>;
    fn get(&self, id: u64) -> Option<&Waiter<T>>;
    /// Serves waiter `id` out of turn (backfill from a region the head does
    /// not wait for).
    fn take(&mut self, id: u64) -> Option<Waiter<T>>;
    /// Waiters of `tenant`.
    fn queued_for(&self, tenant: &str) -> usize;
    /// Whether `tenant` has at least its share of the queued tokens (a
    /// standing queue refuses these tenants first). Without tenant weights,
    /// everyone is.
    fn over_share(&self, tenant: &str) -> bool {
        let _ = tenant;
        true
    }
    /// New tenant weights (after a reload); disciplines without weights ignore them.
    fn set_weights(&mut self, weights: Arc<super::tenant::Weights>) {
        let _ = weights;
    }
}

/// First come, first served.
#[derive(Debug)]
pub struct Fifo<T> {
    waiters: VecDeque<Waiter<T>>,
    tokens: u64,
}

impl<T> Default for Fifo<T> {
    fn default() -> Self {
        Self {
            waiters: VecDeque::new(),
            tokens: 0,
        }
    }
}

impl<T: Send> Discipline<T> for Fifo<T> {
    fn oldest(&self) -> Option<Instant> {
        self.waiters.iter().map(|w| w.enqueued).min()
    }

    fn push(&mut self, w: Waiter<T>) {
        self.tokens += w.tokens;
        self.waiters.push_back(w);
    }

    fn head(&self) -> Option<&Waiter<T>> {
        self.waiters.front()
    }

    fn head_mut(&mut self) -> Option<&mut Waiter<T>> {
        self.waiters.front_mut()
    }

    fn pop(&mut self) -> Option<Waiter<T>> {
        let w = self.waiters.pop_front()?;
        self.tokens -= w.tokens;
        Some(w)
    }

    fn remove_where(&mut self, drop: &mut dyn FnMut(&Waiter<T>) -> bool) -> Vec<Waiter<T>> {
        if !self.waiters.iter().any(&mut *drop) {
            return Vec::new();
        }
        let mut removed = Vec::new();
        let mut kept = VecDeque::with_capacity(self.waiters.len());
        for w in self.waiters.drain(..) {
            if drop(&w) {
                self.tokens -= w.tokens;
                removed.push(w);
            } else {
                kept.push_back(w);
            }
        }
        self.waiters = kept;
        removed
    }

    fn len(&self) -> usize {
        self.waiters.len()
    }

    fn tokens_ahead(&self, _tenant: &str) -> u64 {
        self.tokens
    }

    fn requests_ahead(&self, _tenant: &str) -> u64 {
        self.waiters.len() as u64
    }

    fn candidates(&self, n: usize) -> Vec<u64> {
        self.waiters.iter().take(n).map(|w| w.id).collect()
    }

    fn get(&self, id: u64) -> Option<&Waiter<T>> {
        self.waiters.iter().find(|w| w.id == id)
    }

    fn take(&mut self, id: u64) -> Option<Waiter<T>> {
        let i = self.waiters.iter().position(|w| w.id == id)?;
        let w = self.waiters.remove(i)?;
        self.tokens -= w.tokens;
        Some(w)
    }

    fn queued_for(&self, tenant: &str) -> usize {
        self.waiters.iter().filter(|w| *w.tenant == *tenant).count()
    }
}

/// Makes an empty discipline for a model that gets its first waiter.
pub type DisciplineFactory<T> = Box<dyn Fn() -> Box<dyn Discipline<T>> + Send>;

/// One model's waiters.
struct ModelQueue<T> {
    model: Arc<str>,
    waiters: Box<dyn Discipline<T>>,
}

/// Every model's waiters.
pub struct WaitQueue<T> {
    queues: Vec<ModelQueue<T>>,
    factory: DisciplineFactory<T>,
    weights: Option<Arc<super::tenant::Weights>>,
    len: usize,
}

impl<T: Send + 'static> WaitQueue<T> {
    pub fn fifo() -> Self {
        Self::new(Box::new(|| Box::new(Fifo::default())))
    }
}

impl<T> WaitQueue<T> {
    pub fn new(factory: DisciplineFactory<T>) -> Self {
        Self {
            queues: Vec::new(),
            factory,
            weights: None,
            len: 0,
        }
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Whether anyone waits for `model` (then newcomers queue behind them).
    pub fn is_waiting(&self, model: &str) -> bool {
        self.queue(model).is_some_and(|q| !q.is_empty())
    }

    pub fn waiting(&self, model: &str) -> usize {
        self.queue(model).map_or(0, |q| q.len())
    }

    /// When the longest-waiting request for `model` began to wait.
    pub fn oldest(&self, model: &str) -> Option<Instant> {
        self.queue(model).and_then(|q| q.oldest())
    }

    fn find(&self, model: &str) -> Option<&ModelQueue<T>> {
        self.queues.iter().find(|q| *q.model == *model)
    }

    fn find_mut(&mut self, model: &str) -> Option<&mut ModelQueue<T>> {
        self.queues.iter_mut().find(|q| *q.model == *model)
    }

    fn queue(&self, model: &str) -> Option<&dyn Discipline<T>> {
        self.find(model).map(|q| q.waiters.as_ref())
    }

    /// Tokens a new request of `tenant` for `model` would wait behind.
    pub fn tokens_ahead(&self, model: &str, tenant: &str) -> u64 {
        self.find(model).map_or(0, |q| q.waiters.tokens_ahead(tenant))
    }

    /// Requests a new request of `tenant` for `model` would wait behind.
    pub fn requests_ahead(&self, model: &str, tenant: &str) -> u64 {
        self.find(model).map_or(0, |q| q.waiters.requests_ahead(tenant))
    }

    /// The part of `model`'s refill `tenant` would get while it waits.
    pub fn share(&self, model: &str, tenant: &str) -> f64 {
        self.find(model).map_or(1.0, |q| q.waiters.share(tenant))
    }

    pub fn candidates(&self, model: &str, n: usize) -> Vec<u64> {
        self.find(model)
            .map_or_else(Vec::new, |q| q.waiters.candidates(n))
    }

    pub fn get(&self, model: &str, id: u64) -> Option<&Waiter<T>> {
        self.find(model)?.waiters.get(id)
    }

    pub fn take(&mut self, model: &str, id: u64) -> Option<Waiter<T>> {
        let w = self.find_mut(model)?.waiters.take(id)?;
        self.len -= 1;
        Some(w)
    }

    /// Whether every waiter for `model` is `tenant`'s (or nobody waits).
    pub fn tenant_alone(&self, model: &str, tenant: &str) -> bool {
        self.find(model)
            .is_none_or(|q| q.waiters.queued_for(tenant) == q.waiters.len())
    }

    /// Whether `tenant` has at least its share of `model`'s queued tokens.
    pub fn over_share(&self, model: &str, tenant: &str) -> bool {
        self.find(model).is_none_or(|q| q.waiters.over_share(tenant))
    }

    /// Waiters of `tenant`, over every model.
    pub fn queued_for_tenant(&self, tenant: &str) -> usize {
        self.queues.iter().map(|q| q.waiters.queued_for(tenant)).sum()
    }

    /// Tenant weights for every model's discipline, now and for models
    /// that get their first waiter later.
    pub fn set_weights(&mut self, weights: Arc<super::tenant::Weights>) {
        for q in &mut self.queues {
            q.waiters.set_weights(weights.clone());
        }
        self.weights = Some(weights);
    }

    pub fn push(&mut self, w: Waiter<T>) {
        self.len += 1;
        if let Some(q) = self.find_mut(&w.model) {
            q.waiters.push(w);
        } else {
            let mut waiters = (self.factory)();
            if let Some(weights) = &self.weights {
                waiters.set_weights(weights.clone());
            }
            let model = w.model.clone();
            waiters.push(w);
            self.queues.push(ModelQueue { model, waiters });
        }
    }

    /// The models with waiters.
    pub fn models(&self) -> Vec<Arc<str>> {
        self.queues
            .iter()
            .filter(|q| !q.waiters.is_empty())
            .map(|q| q.model.clone())
            .collect()
    }

    pub fn head(&self, model: &str) -> Option<&Waiter<T>> {
        self.queue(model).and_then(|q| q.head())
    }

    pub fn head_mut(&mut self, model: &str) -> Option<&mut Waiter<T>> {
        self.find_mut(model).and_then(|q| q.waiters.head_mut())
    }

    pub fn pop(&mut self, model: &str) -> Option<Waiter<T>> {
        let w = self.find_mut(model)?.waiters.pop()?;
        self.len -= 1;
        Some(w)
    }

    /// Removes every waiter (of any model) for which `drop` is true.
    pub fn remove_where(&mut self, mut drop: impl FnMut(&Waiter<T>) -> bool) -> Vec<Waiter<T>> {
        let mut removed = Vec::new();
        for q in &mut self.queues {
            removed.extend(q.waiters.remove_where(&mut drop));
        }
        self.len -= removed.len();
        removed
    }

    /// Earliest time any head could fit.
    pub fn earliest_retry(&self) -> Option<Instant> {
        self.queues
            .iter()
            .filter_map(|q| q.waiters.head().and_then(|h| h.retry_at))
            .min()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn waiter(id: u64, model: &str, t0: Instant) -> Waiter<u64> {
        Waiter {
            id,
            model: model.into(),
            tokens: 10,
            origin: None,
            tenant: "t".into(),
            tried: Vec::new(),
            enqueued: t0,
            deadline: t0 + Duration::from_secs(1),
            retry_at: None,
            ticket: id,
        }
    }

    #[test]
    fn fifo_per_model() {
        let t0 = crate::testing::epoch();
        let mut q = WaitQueue::fifo();
        q.push(waiter(1, "a", t0));
        q.push(waiter(2, "b", t0));
        q.push(waiter(3, "a", t0));
        assert_eq!(q.len(), 3);
        assert_eq!(q.tokens_ahead("a", "t"), 20);
        assert!(q.is_waiting("a") && q.is_waiting("b") && !q.is_waiting("c"));
        assert_eq!(q.head("a").unwrap().id, 1);
        assert_eq!(q.pop("a").unwrap().id, 1);
        assert_eq!(q.pop("a").unwrap().id, 3);
        assert!(q.pop("a").is_none());
        assert_eq!(q.len(), 1);
        assert_eq!(q.models().len(), 1);
    }

    #[test]
    fn remove_where_keeps_order_and_count() {
        let t0 = crate::testing::epoch();
        let mut q = WaitQueue::fifo();
        for i in 0..6 {
            q.push(waiter(i, "a", t0));
        }
        let gone = q.remove_where(|w| w.id % 2 == 0);
        assert_eq!(gone.iter().map(|w| w.id).collect::<Vec<_>>(), [0, 2, 4]);
        assert_eq!(q.len(), 3);
        assert_eq!(q.tokens_ahead("a", "t"), 30);
        assert_eq!(q.pop("a").unwrap().id, 1);
        assert_eq!(q.pop("a").unwrap().id, 3);
        assert_eq!(q.tokens_ahead("a", "t"), 10);
    }
}
