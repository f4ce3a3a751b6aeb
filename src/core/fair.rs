//! Weighted fair queuing on token cost across tenants, as a queue
//! `Discipline`: self-clocked fair queuing (SCFQ). Each tenant waits in its
//! own FIFO; the head of each carries a virtual finish tag
//! `max(V, last finish of the tenant) + tokens / weight`, and the smallest tag
//! goes next. `V` is the tag of the last request served. So a tenant that
//! keeps work queued receives `weight / Σ weights of tenants with work
//! queued` of the tokens; heavy requests pay for their size; a tenant that
//! was idle comes back at `V`, with neither a penalty nor hoarded credit.

use std::collections::{BTreeMap, VecDeque};
use std::sync::Arc;

use super::queue::{Discipline, Waiter};

/// Tenant weights; tenants not listed weigh `default`.
#[derive(Debug, Clone, PartialEq)]
pub struct Weights {
    pub by_tenant: BTreeMap<Arc<str>, f64>,
    pub default: f64,
}

impl Weights {
    pub fn of(&self, tenant: &str) -> f64 {
        self.by_tenant
            .get(tenant)
            .copied()
            .unwrap_or(self.default)
            .max(f64::MIN_POSITIVE)
    }
}

impl Default for Weights {
    fn default() -> Self {
        Self {
            by_tenant: BTreeMap::new(),
            default: 1.0,
        }
    }
}

#[derive(Debug)]
struct TenantQueue<T> {
    waiters: VecDeque<Waiter<T>>,
    /// Tag of the head (computed when it became the head).
    head_tag: f64,
    /// Tag of this tenant's last served request.
    last_finish: f64,
    tokens: u64,
}

#[derive(Debug)]
pub struct FairQueue<T> {
    tenants: BTreeMap<Arc<str>, TenantQueue<T>>,
    weights: Arc<Weights>,
    /// Virtual time: the tag of the last request served.
    virtual_time: f64,
    len: usize,
}

impl<T> FairQueue<T> {
    pub fn new(weights: Arc<Weights>) -> Self {
        Self {
            tenants: BTreeMap::new(),
            weights,
            virtual_time: 0.0,
            len: 0,
        }
    }

    fn tag(&self, tenant: &str, last_finish: f64, tokens: u64) -> f64 {
        self.virtual_time.max(last_finish) + tokens as f64 / self.weights.of(tenant)
    }

    /// The tenant whose head goes next (smallest tag; ties by name).
    fn next_tenant(&self) -> Option<&Arc<str>> {
        let mut best: Option<(&Arc<str>, f64)> = None;
        for (name, q) in &self.tenants {
            if q.waiters.is_empty() {
                continue;
            }
            if best.is_none_or(|(_, tag)| q.head_tag < tag) {
                best = Some((name, q.head_tag));
            }
        }
        best.map(|(n, _)| n)
    }

    fn retag_head(&mut self, tenant: &Arc<str>) {
        let v = self.virtual_time;
        let weight = self.weights.of(tenant);
        if let Some(q) = self.tenants.get_mut(tenant)
            && let Some(h) = q.waiters.front()
        {
            q.head_tag = v.max(q.last_finish) + h.tokens as f64 / weight;
        }
    }
}

impl<T: Send> Discipline<T> for FairQueue<T> {
    fn push(&mut self, w: Waiter<T>) {
        self.len += 1;
        let tenant = w.tenant.clone();
        let tokens = w.tokens;
        let was_empty = self.tenants.get(&tenant).is_none_or(|q| q.waiters.is_empty());
        let last_finish = self.tenants.get(&tenant).map_or(0.0, |q| q.last_finish);
        let tag = self.tag(&tenant, last_finish, tokens);
        let q = self.tenants.entry(tenant).or_insert_with(|| TenantQueue {
            waiters: VecDeque::new(),
            head_tag: 0.0,
            last_finish: 0.0,
            tokens: 0,
        });
        if was_empty {
            q.head_tag = tag;
        }
        q.tokens += tokens;
        q.waiters.push_back(w);
    }

    fn head(&self) -> Option<&Waiter<T>> {
        let t = self.next_tenant()?;
        self.tenants[t].waiters.front()
    }

    fn head_mut(&mut self) -> Option<&mut Waiter<T>> {
        let t = self.next_tenant()?.clone();
        self.tenants.get_mut(&t)?.waiters.front_mut()
    }

    fn pop(&mut self) -> Option<Waiter<T>> {
        let t = self.next_tenant()?.clone();
        let q = self.tenants.get_mut(&t)?;
        let w = q.waiters.pop_front()?;
        q.tokens -= w.tokens;
        q.last_finish = q.head_tag;
        self.virtual_time = self.virtual_time.max(q.head_tag);
        self.len -= 1;
        if q.waiters.is_empty() {
            // Its last finish is now the virtual time, which a returning
            // tenant starts from anyway: nothing to remember.
            self.tenants.remove(&t);
        } else {
            self.retag_head(&t);
        }
        Some(w)
    }

    fn remove_where(&mut self, drop: &mut dyn FnMut(&Waiter<T>) -> bool) -> Vec<Waiter<T>> {
        let mut removed = Vec::new();
        let mut retag = Vec::new();
        for (name, q) in &mut self.tenants {
            if !q.waiters.iter().any(&mut *drop) {
                continue;
            }
            let head_id = q.waiters.front().map(|w| w.id);
            let mut kept = VecDeque::with_capacity(q.waiters.len());
            for w in q.waiters.drain(..) {
                if drop(&w) {
                    q.tokens -= w.tokens;
                    removed.push(w);
                } else {
                    kept.push_back(w);
                }
            }
            q.waiters = kept;
            if q.waiters.front().map(|w| w.id) != head_id {
                retag.push(name.clone());
            }
        }
        for t in retag {
            self.retag_head(&t);
        }
        let v = self.virtual_time;
        self.tenants
            .retain(|_, q| !q.waiters.is_empty() || q.last_finish > v);
        self.len -= removed.len();
        removed
    }

    fn len(&self) -> usize {
        self.len
    }

    /// What a new request from `tenant` waits behind: its own queued tokens,
    /// plus from every other tenant at most what that tenant's weight entitles
    /// it to while `tenant` works through its own backlog.
    fn tokens_ahead(&self, tenant: &str) -> u64 {
        let own = self.tenants.get(tenant).map_or(0, |q| q.tokens);
        let own_weight = self.weights.of(tenant);
        let others: f64 = self
            .tenants
            .iter()
            .filter(|(name, _)| name.as_ref() != tenant)
            .map(|(name, q)| (q.tokens as f64).min(own as f64 * self.weights.of(name) / own_weight))
            .sum();
        own + others as u64
    }

    /// `w / (w + Σ weights of the other tenants with work waiting)`.
    fn share(&self, tenant: &str) -> f64 {
        let own = self.weights.of(tenant);
        let others: f64 = self
            .tenants
            .iter()
            .filter(|(name, q)| name.as_ref() != tenant && !q.waiters.is_empty())
            .map(|(name, _)| self.weights.of(name))
            .sum();
        own / (own + others)
    }

    /// Each tenant's head, by tag.
    fn candidates(&self, n: usize) -> Vec<u64> {
        let mut heads: Vec<(f64, &Arc<str>, u64)> = self
            .tenants
            .iter()
            .filter_map(|(name, q)| q.waiters.front().map(|w| (q.head_tag, name, w.id)))
            .collect();
        heads.sort_by(|a, b| a.0.total_cmp(&b.0).then(a.1.cmp(b.1)));
        heads.into_iter().take(n).map(|(_, _, id)| id).collect()
    }

    fn get(&self, id: u64) -> Option<&Waiter<T>> {
        self.tenants
            .values()
            .find_map(|q| q.waiters.iter().find(|w| w.id == id))
    }

    /// The tenant pays for it as if served in turn (its finish tag moves);
    /// virtual time stays with the head, which is still waiting.
    fn take(&mut self, id: u64) -> Option<Waiter<T>> {
        let tenant = self
            .tenants
            .iter()
            .find(|(_, q)| q.waiters.iter().any(|w| w.id == id))
            .map(|(name, _)| name.clone())?;
        let q = self.tenants.get_mut(&tenant)?;
        let i = q.waiters.iter().position(|w| w.id == id)?;
        let w = q.waiters.remove(i)?;
        q.tokens -= w.tokens;
        self.len -= 1;
        if i == 0 {
            q.last_finish = q.head_tag;
            self.retag_head(&tenant);
        }
        Some(w)
    }

    fn queued_for(&self, tenant: &str) -> usize {
        self.tenants.get(tenant).map_or(0, |q| q.waiters.len())
    }

    fn set_weights(&mut self, weights: Arc<Weights>) {
        self.weights = weights;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::{Duration, Instant};

    fn waiter(id: u64, tenant: &str, tokens: u64) -> Waiter<u64> {
        let t0 = Instant::now();
        Waiter {
            id,
            model: "m".into(),
            tokens,
            origin: None,
            tenant: tenant.into(),
            tried: Vec::new(),
            enqueued: t0,
            deadline: t0 + Duration::from_secs(1),
            retry_at: None,
            ticket: id,
        }
    }

    fn weights(w: &[(&str, f64)]) -> Arc<Weights> {
        Arc::new(Weights {
            by_tenant: w.iter().map(|(t, w)| (Arc::from(*t), *w)).collect(),
            default: 1.0,
        })
    }

    /// Serves everything and returns the tokens each tenant got among the
    /// first `n` tokens served.
    fn served_tokens(q: &mut FairQueue<u64>, n: u64) -> BTreeMap<String, u64> {
        let mut got = BTreeMap::new();
        let mut total = 0;
        while total < n {
            let w = q.pop().unwrap();
            total += w.tokens;
            *got.entry(w.tenant.to_string()).or_default() += w.tokens;
        }
        got
    }

    #[test]
    fn backlogged_tenants_share_tokens_by_weight() {
        let mut q = FairQueue::new(weights(&[("a", 1.0), ("b", 3.0)]));
        for i in 0..1000 {
            q.push(waiter(i, "a", 100));
            q.push(waiter(1000 + i, "b", 100));
        }
        let got = served_tokens(&mut q, 40_000);
        assert_eq!(got["a"], 10_000);
        assert_eq!(got["b"], 30_000);
    }

    #[test]
    fn heavy_requests_pay_for_their_size() {
        let mut q = FairQueue::new(weights(&[]));
        for i in 0..100 {
            q.push(waiter(i, "big", 1000));
        }
        for i in 0..1000 {
            q.push(waiter(100 + i, "small", 100));
        }
        let got = served_tokens(&mut q, 20_000);
        assert!(got["big"].abs_diff(got["small"]) <= 1000, "{got:?}");
    }

    #[test]
    fn an_idle_tenant_returns_at_once_without_hoarded_credit() {
        let mut q = FairQueue::new(weights(&[]));
        for i in 0..1000 {
            q.push(waiter(i, "busy", 100));
        }
        served_tokens(&mut q, 50_000);
        for i in 0..100 {
            q.push(waiter(5000 + i, "back", 100));
        }
        // From now on they alternate: no penalty for "back", no burst either.
        let next: Vec<String> = (0..10).map(|_| q.pop().unwrap().tenant.to_string()).collect();
        let back = next.iter().filter(|t| *t == "back").count();
        assert_eq!(back, 5, "{next:?}");
    }

    #[test]
    fn tokens_ahead_counts_only_the_fair_part_of_others() {
        let mut q = FairQueue::new(weights(&[("flood", 1.0), ("polite", 1.0)]));
        for i in 0..100 {
            q.push(waiter(i, "flood", 1000));
        }
        assert_eq!(q.tokens_ahead("polite"), 0, "a newcomer is not behind the flood");
        q.push(waiter(1000, "polite", 500));
        assert_eq!(q.tokens_ahead("polite"), 1000);
        assert_eq!(q.tokens_ahead("flood"), 100_500);
        assert_eq!(q.queued_for("flood"), 100);
    }

    #[test]
    fn removal_keeps_order_and_counts() {
        let mut q = FairQueue::new(weights(&[]));
        for i in 0..6 {
            q.push(waiter(i, if i % 2 == 0 { "a" } else { "b" }, 10));
        }
        let gone = q.remove_where(&mut |w| w.id < 2);
        assert_eq!(gone.len(), 2);
        assert_eq!(q.len(), 4);
        let order: Vec<u64> = std::iter::from_fn(|| q.pop().map(|w| w.id)).collect();
        assert_eq!(order, [2, 3, 4, 5]);
    }
}
