//! Weighted fair queuing on token cost across tenants, as a queue
//! `Discipline`: self-clocked fair queuing (SCFQ). Each tenant waits in its
//! own FIFO; the head of each carries a virtual finish tag
//! `max(V, last finish of the tenant) + tokens / weight`, and the smallest tag
//! goes next. `V` is the tag of the last request served. So a tenant that
//! keeps work queued receives `weight / Σ weights of tenants with work
//! queued` of the tokens; heavy requests pay for their size; a tenant that
//! was idle comes back at `V`, with neither a penalty nor hoarded credit.

use std::collections::{BTreeSet, HashMap, VecDeque};
use std::sync::Arc;

use super::queue::{Discipline, Waiter};
use super::tenant::Weights;

#[derive(Debug)]
struct TenantQueue<T> {
    waiters: VecDeque<Waiter<T>>,
    /// Tag of the head (computed when it became the head).
    head_tag: f64,
    /// Tag of this tenant's last served request.
    last_finish: f64,
    tokens: u64,
    /// The tenant's weight, looked up once (and again on new weights).
    weight: f64,
}

/// A head tag in the order the heads are served: by tag, ties by tenant.
#[derive(Debug, Clone)]
struct HeadKey(f64, Arc<str>);

impl PartialEq for HeadKey {
    fn eq(&self, other: &Self) -> bool {
        self.cmp(other).is_eq()
    }
}
impl Eq for HeadKey {}
impl PartialOrd for HeadKey {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for HeadKey {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        self.0.total_cmp(&other.0).then_with(|| self.1.cmp(&other.1))
    }
}

/// Every operation but `tokens_ahead` and `remove_where` costs O(log
/// tenants): the heads are kept ordered by tag, the weights of the tenants
/// with work waiting are summed as they come and go, and each waiter's
/// tenant is indexed by id (benches/fair_queue.rs, docs/PERFORMANCE.md).
#[derive(Debug)]
pub struct FairQueue<T> {
    tenants: HashMap<Arc<str>, TenantQueue<T>>,
    /// `(head tag, tenant)` of every tenant with work waiting.
    heads: BTreeSet<HeadKey>,
    /// Σ weights of the tenants in `heads`.
    active_weight: f64,
    /// Each waiter's tenant, by waiter id.
    owner: HashMap<u64, Arc<str>>,
    weights: Arc<Weights>,
    /// Virtual time: the tag of the last request served.
    virtual_time: f64,
    len: usize,
}

impl<T> FairQueue<T> {
    pub fn new(weights: Arc<Weights>) -> Self {
        Self {
            tenants: HashMap::new(),
            heads: BTreeSet::new(),
            active_weight: 0.0,
            owner: HashMap::new(),
            weights,
            virtual_time: 0.0,
            len: 0,
        }
    }

    /// The tenant whose head goes next (smallest tag; ties by name).
    fn next_tenant(&self) -> Option<&Arc<str>> {
        self.heads.first().map(|k| &k.1)
    }

    /// Takes `tenant` out of the head index (before its head changes).
    fn unindex(&mut self, tenant: &Arc<str>) {
        if let Some(q) = self.tenants.get(tenant)
            && !q.waiters.is_empty()
            && self.heads.remove(&HeadKey(q.head_tag, tenant.clone()))
        {
            self.active_weight -= q.weight;
        }
    }

    /// Puts `tenant` back in the head index if it has work waiting.
    fn index(&mut self, tenant: &Arc<str>) {
        if let Some(q) = self.tenants.get(tenant)
            && !q.waiters.is_empty()
            && self.heads.insert(HeadKey(q.head_tag, tenant.clone()))
        {
            self.active_weight += q.weight;
        }
        if self.heads.is_empty() {
            // No drift survives an empty queue.
            self.active_weight = 0.0;
        }
    }

    /// Gives `tenant`'s (new) head its tag; call between unindex and index.
    fn retag_head(&mut self, tenant: &Arc<str>) {
        let v = self.virtual_time;
        if let Some(q) = self.tenants.get_mut(tenant)
            && let Some(h) = q.waiters.front()
        {
            q.head_tag = v.max(q.last_finish) + h.tokens as f64 / q.weight;
        }
    }

    /// Removes waiter `i` of `tenant`, which must be out of the index.
    fn remove_at(&mut self, tenant: &Arc<str>, i: usize) -> Option<Waiter<T>> {
        let q = self.tenants.get_mut(tenant)?;
        let w = q.waiters.remove(i)?;
        q.tokens -= w.tokens;
        self.len -= 1;
        self.owner.remove(&w.id);
        Some(w)
    }
}

impl<T: Send> Discipline<T> for FairQueue<T> {
    fn oldest(&self) -> Option<std::time::Instant> {
        // Each tenant's queue is first come, first served.
        self.tenants
            .values()
            .filter_map(|q| q.waiters.front())
            .map(|w| w.enqueued)
            .min()
    }

    fn push(&mut self, w: Waiter<T>) {
        let tenant = w.tenant.clone();
        let weight = self.weights.of(&tenant);
        let v = self.virtual_time;
        let q = self.tenants.entry(tenant.clone()).or_insert_with(|| TenantQueue {
            waiters: VecDeque::new(),
            head_tag: 0.0,
            last_finish: 0.0,
            tokens: 0,
            weight,
        });
        let was_empty = q.waiters.is_empty();
        if was_empty {
            q.head_tag = v.max(q.last_finish) + w.tokens as f64 / q.weight;
        }
        q.tokens += w.tokens;
        self.len += 1;
        self.owner.insert(w.id, tenant.clone());
        q.waiters.push_back(w);
        if was_empty {
            self.index(&tenant);
        }
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
        self.unindex(&t);
        let w = self.remove_at(&t, 0)?;
        let q = self.tenants.get_mut(&t)?;
        q.last_finish = q.head_tag;
        self.virtual_time = self.virtual_time.max(q.head_tag);
        if q.waiters.is_empty() {
            // Its last finish is now the virtual time, which a returning
            // tenant starts from anyway: nothing to remember.
            self.tenants.remove(&t);
        } else {
            self.retag_head(&t);
            self.index(&t);
        }
        Some(w)
    }

    fn remove_where(&mut self, drop: &mut dyn FnMut(&Waiter<T>) -> bool) -> Vec<Waiter<T>> {
        let mut removed = Vec::new();
        let hit: Vec<Arc<str>> = self
            .tenants
            .iter()
            .filter(|(_, q)| q.waiters.iter().any(&mut *drop))
            .map(|(name, _)| name.clone())
            .collect();
        for name in hit {
            self.unindex(&name);
            let q = self.tenants.get_mut(&name).expect("listed above");
            let head_id = q.waiters.front().map(|w| w.id);
            let mut kept = VecDeque::with_capacity(q.waiters.len());
            let before = removed.len();
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
                self.retag_head(&name);
            }
            for w in &removed[before..] {
                self.owner.remove(&w.id);
            }
            self.index(&name);
        }
        let v = self.virtual_time;
        self.tenants
            .retain(|_, q| !q.waiters.is_empty() || q.last_finish > v);
        self.len -= removed.len();
        removed.sort_by_key(|w| w.id);
        removed
    }

    fn len(&self) -> usize {
        self.len
    }

    /// What a new request from `tenant` waits behind: its own queued tokens,
    /// plus from every other tenant at most what that tenant's weight entitles
    /// it to while `tenant` works through its own backlog. A tenant with
    /// nothing queued waits behind nothing (and costs no scan).
    fn tokens_ahead(&self, tenant: &str) -> u64 {
        self.ahead(tenant, |q| q.tokens as f64)
    }

    fn requests_ahead(&self, tenant: &str) -> u64 {
        self.ahead(tenant, |q| q.waiters.len() as f64)
    }

    /// `w / (w + Σ weights of the other tenants with work waiting)`.
    fn share(&self, tenant: &str) -> f64 {
        let (own, active) = match self.tenants.get(tenant) {
            Some(q) => (q.weight, !q.waiters.is_empty()),
            None => (self.weights.of(tenant), false),
        };
        let others = (self.active_weight - if active { own } else { 0.0 }).max(0.0);
        own / (own + others)
    }

    /// Each tenant's head, by tag.
    fn candidates(&self, n: usize) -> Vec<u64> {
        self.heads
            .iter()
            .take(n)
            .filter_map(|k| self.tenants[&k.1].waiters.front().map(|w| w.id))
            .collect()
    }

    fn get(&self, id: u64) -> Option<&Waiter<T>> {
        let tenant = self.owner.get(&id)?;
        self.tenants.get(tenant)?.waiters.iter().find(|w| w.id == id)
    }

    /// The tenant pays for it as if served in turn (its finish tag moves);
    /// virtual time stays with the head, which is still waiting.
    fn take(&mut self, id: u64) -> Option<Waiter<T>> {
        let tenant = self.owner.get(&id)?.clone();
        let i = self
            .tenants
            .get(&tenant)?
            .waiters
            .iter()
            .position(|w| w.id == id)?;
        self.unindex(&tenant);
        let w = self.remove_at(&tenant, i);
        if i == 0
            && let Some(q) = self.tenants.get_mut(&tenant)
        {
            q.last_finish = q.head_tag;
            self.retag_head(&tenant);
        }
        self.index(&tenant);
        w
    }

    fn queued_for(&self, tenant: &str) -> usize {
        self.tenants.get(tenant).map_or(0, |q| q.waiters.len())
    }

    /// Its queued tokens are at least `share` of everyone's. A tenant with
    /// nothing queued is under its share while others wait, and nobody is
    /// when nobody waits.
    fn over_share(&self, tenant: &str) -> bool {
        let own = self.tenants.get(tenant).map_or(0, |q| q.tokens);
        let all: u64 = self.heads.iter().map(|k| self.tenants[&k.1].tokens).sum();
        all == 0 || (own > 0 && own as f64 >= self.share(tenant) * all as f64)
    }

    fn set_weights(&mut self, weights: Arc<Weights>) {
        for (name, q) in &mut self.tenants {
            q.weight = weights.of(name);
        }
        self.active_weight = self.heads.iter().map(|k| self.tenants[&k.1].weight).sum();
        self.weights = weights;
    }
}

impl<T> FairQueue<T> {
    /// What a new request of `tenant` would wait behind, in `measure` (tokens
    /// or requests): each tenant's waiting work up to what it is served
    /// while `tenant`'s own is, by weight. Nothing for a tenant with nothing
    /// queued: it is served at its share from the start. The sum counts
    /// `tenant` itself exactly once, at its own measure (min(own, own / w ·
    /// w)): no name compare per tenant.
    fn ahead(&self, tenant: &str, measure: impl Fn(&TenantQueue<T>) -> f64) -> u64 {
        let Some(mine) = self.tenants.get(tenant).filter(|q| !q.waiters.is_empty()) else {
            return 0;
        };
        let own = measure(mine);
        let per_weight = own / mine.weight;
        let everyone: f64 = self
            .tenants
            .values()
            .map(|q| measure(q).min(per_weight * q.weight))
            .sum();
        everyone.round().max(own) as u64
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;
    use std::time::Duration;

    fn waiter(id: u64, tenant: &str, tokens: u64) -> Waiter<u64> {
        let t0 = crate::testing::epoch();
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
        assert_eq!(q.requests_ahead("polite"), 2);
        assert_eq!(q.requests_ahead("flood"), 101);
        assert_eq!(q.queued_for("flood"), 100);
    }

    /// The indexes agree with a plain scan of the tenants.
    fn check(q: &FairQueue<u64>) {
        let scanned = q
            .tenants
            .iter()
            .filter(|(_, t)| !t.waiters.is_empty())
            .map(|(name, t)| HeadKey(t.head_tag, name.clone()))
            .min();
        assert_eq!(q.heads.first(), scanned.as_ref(), "head index");
        let active: usize = q.tenants.values().filter(|t| !t.waiters.is_empty()).count();
        assert_eq!(q.heads.len(), active);
        let weight: f64 = q
            .tenants
            .iter()
            .filter(|(_, t)| !t.waiters.is_empty())
            .map(|(name, _)| q.weights.of(name))
            .sum();
        assert!(
            (q.active_weight - weight).abs() < 1e-9,
            "{} vs {weight}",
            q.active_weight
        );
        let waiting: usize = q.tenants.values().map(|t| t.waiters.len()).sum();
        assert_eq!((q.len, q.owner.len()), (waiting, waiting));
        for (name, t) in &q.tenants {
            for w in &t.waiters {
                assert_eq!(q.owner.get(&w.id), Some(name));
            }
        }
    }

    #[test]
    fn indexes_follow_every_operation() {
        use rand::{Rng, SeedableRng};
        let mut rng = rand::rngs::SmallRng::seed_from_u64(7);
        let names = ["a", "b", "c", "d", "e"];
        let mut q = FairQueue::new(weights(&[("a", 2.0), ("b", 0.5)]));
        let mut id = 0;
        for step in 0..5000 {
            match rng.random_range(0..10) {
                0..=4 => {
                    id += 1;
                    let t = names[rng.random_range(0..names.len())];
                    q.push(waiter(id, t, rng.random_range(1..1000)));
                }
                5..=6 => {
                    q.pop();
                }
                7 => {
                    if let Some(&c) = q.candidates(3).last() {
                        assert!(q.get(c).is_some());
                        assert_eq!(q.take(c).map(|w| w.id), Some(c));
                    }
                }
                8 => {
                    let cut = rng.random_range(0..=id.max(1));
                    let gone = q.remove_where(&mut |w| w.id % 7 == cut % 7);
                    assert!(gone.iter().all(|w| w.id % 7 == cut % 7));
                }
                _ => q.set_weights(weights(&[("a", 1.0 + (step % 3) as f64), ("c", 3.0)])),
            }
            check(&q);
        }
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
