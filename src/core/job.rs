//! Jobs, the pure part: the states a job moves through, what a restart or a
//! replica's death does to each, when a finished job expires, who may write
//! a job (a lease with a fencing token), and the backlog that decides which
//! queued job starts next: weighted fair between tenants (stride order on
//! token cost), within per-tenant and total limits on jobs running.
//!
//! No I/O and no clock: times are milliseconds since the Unix epoch passed
//! in (jobs outlive the process, so they are dated on the wall clock).

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::Arc;

use super::tenant::Weights;

/// Where a job is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum JobPhase {
    Queued,
    Running,
    Done,
    Failed,
    Cancelled,
    Interrupted,
}

impl JobPhase {
    pub fn is_terminal(self) -> bool {
        matches!(
            self,
            Self::Done | Self::Failed | Self::Cancelled | Self::Interrupted
        )
    }

    /// Whether a job may move from `self` to `next`. A finished job never
    /// moves again; a running one goes back to queued only to run again
    /// (after a refusal before it was sent, or when it is repeatable and its
    /// owner stopped).
    pub fn may_become(self, next: JobPhase) -> bool {
        use JobPhase::*;
        match (self, next) {
            (a, _) if a.is_terminal() => false,
            (Queued, Queued) => false,
            (Queued, _) => true,
            (Running, Running) => true, // failover to another region
            (Running, _) => true,
            _ => false,
        }
    }
}

/// What happens to a job found unfinished when its owner is gone (this
/// process restarted, or with Redis, another replica's lease lapsed).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Recovery {
    /// Never sent anywhere: queue it again.
    Requeue,
    /// It may have run and may run again (submitted `repeatable`).
    RunAgain,
    /// It may have run and must not run twice: it ends INTERRUPTED.
    Interrupt,
    /// Already finished: nothing to do.
    Keep,
}

pub fn recovery(phase: JobPhase, repeatable: bool) -> Recovery {
    match phase {
        JobPhase::Queued => Recovery::Requeue,
        JobPhase::Running if repeatable => Recovery::RunAgain,
        JobPhase::Running => Recovery::Interrupt,
        _ => Recovery::Keep,
    }
}

/// When a job that finished at `finished_ms` is removed.
pub fn expires_at(finished_ms: u64, ttl_ms: u64) -> u64 {
    finished_ms.saturating_add(ttl_ms)
}

/// Who may write a job: its owner, until `expires_ms`, with `fence`. Each
/// new owner takes a higher fence, and the store refuses writes carrying an
/// older one, so an old owner that was paused past its lease (and lost the
/// job) cannot finish it a second time. Redis keeps the same rule in
/// `cluster/jobs.lua`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JobLease {
    pub owner: String,
    pub fence: u64,
    pub expires_ms: u64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LeaseRefusal {
    /// Another owner holds it (with this fence) until `expires_ms`.
    Held { owner: String, expires_ms: u64 },
    /// The writer's fence is older: the job was taken over.
    Fenced { current: u64 },
}

impl JobLease {
    /// The lease of a new job, owned by `owner`.
    pub fn new(owner: &str, now_ms: u64, lease_ms: u64) -> Self {
        Self {
            owner: owner.to_string(),
            fence: 1,
            expires_ms: now_ms.saturating_add(lease_ms),
        }
    }

    /// `owner` takes the job over once the lease has lapsed, with a higher fence.
    pub fn claim(&mut self, owner: &str, now_ms: u64, lease_ms: u64) -> Result<u64, LeaseRefusal> {
        if now_ms < self.expires_ms && self.owner != owner {
            return Err(LeaseRefusal::Held {
                owner: self.owner.clone(),
                expires_ms: self.expires_ms,
            });
        }
        self.owner = owner.to_string();
        self.fence += 1;
        self.expires_ms = now_ms.saturating_add(lease_ms);
        Ok(self.fence)
    }

    /// The owner holding `fence` extends its lease (heartbeat) or writes.
    pub fn renew(&mut self, fence: u64, now_ms: u64, lease_ms: u64) -> Result<(), LeaseRefusal> {
        if fence != self.fence {
            return Err(LeaseRefusal::Fenced { current: self.fence });
        }
        self.expires_ms = now_ms.saturating_add(lease_ms);
        Ok(())
    }

    /// Whether a write with `fence` is the current owner's.
    pub fn admits(&self, fence: u64) -> Result<(), LeaseRefusal> {
        match fence == self.fence {
            true => Ok(()),
            false => Err(LeaseRefusal::Fenced { current: self.fence }),
        }
    }
}

/// Limits on jobs (`[jobs]`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct JobLimits {
    /// Jobs one tenant may hold unfinished (queued or running).
    pub held_per_tenant: usize,
    /// Jobs one tenant may have running (sent to the dispatch path) at once.
    pub running_per_tenant: usize,
    /// Jobs running at once, all tenants together.
    pub running: usize,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum JobRefusal {
    /// The tenant holds `held` unfinished jobs: its limit.
    TenantFull { held: usize },
}

#[derive(Debug)]
struct TenantJobs<Id> {
    queued: VecDeque<(Id, u64)>,
    held: usize,
    running: usize,
    /// Stride order: the virtual time at which the tenant's next job goes.
    pass: f64,
}

impl<Id> Default for TenantJobs<Id> {
    fn default() -> Self {
        Self {
            queued: VecDeque::new(),
            held: 0,
            running: 0,
            pass: 0.0,
        }
    }
}

/// The unfinished jobs one owner runs: which tenant's job starts next
/// (weighted fair: a tenant with jobs waiting gets `weight / Σ weights` of
/// the starts, weighted by each job's tokens; FIFO within a tenant), and
/// the limits on jobs held and running.
#[derive(Debug)]
pub struct JobBacklog<Id> {
    tenants: HashMap<Arc<str>, TenantJobs<Id>>,
    weights: Arc<Weights>,
    limits: JobLimits,
    running: usize,
    queued: usize,
    /// The pass of the last job started: a tenant coming back from idle
    /// starts here, with neither a penalty nor saved-up credit.
    virtual_time: f64,
}

impl<Id: Clone + PartialEq> JobBacklog<Id> {
    pub fn new(limits: JobLimits, weights: Arc<Weights>) -> Self {
        Self {
            tenants: HashMap::new(),
            weights,
            limits,
            running: 0,
            queued: 0,
            virtual_time: 0.0,
        }
    }

    pub fn set_limits(&mut self, limits: JobLimits, weights: Arc<Weights>) {
        self.limits = limits;
        self.weights = weights;
    }

    /// Counts a new unfinished job for `tenant`, or refuses it.
    pub fn admit(&mut self, tenant: &Arc<str>) -> Result<(), JobRefusal> {
        let t = self.tenants.entry(tenant.clone()).or_default();
        if t.held >= self.limits.held_per_tenant {
            return Err(JobRefusal::TenantFull { held: t.held });
        }
        t.held += 1;
        Ok(())
    }

    /// Counts a job that was already held (found at start or taken over),
    /// whatever the limit: it exists and must finish.
    pub fn adopt(&mut self, tenant: &Arc<str>) {
        self.tenants.entry(tenant.clone()).or_default().held += 1;
    }

    /// Queues an admitted job, costing `tokens`, behind its tenant's others.
    pub fn push(&mut self, tenant: &Arc<str>, id: Id, tokens: u64) {
        let v = self.virtual_time;
        let t = self.tenants.entry(tenant.clone()).or_default();
        if t.queued.is_empty() {
            t.pass = t.pass.max(v);
        }
        t.queued.push_back((id, tokens.max(1)));
        self.queued += 1;
    }

    /// Queues a job again at the head of its tenant's line (it was refused
    /// before it was sent and keeps its turn).
    pub fn push_front(&mut self, tenant: &Arc<str>, id: Id, tokens: u64) {
        let v = self.virtual_time;
        let t = self.tenants.entry(tenant.clone()).or_default();
        if t.queued.is_empty() {
            t.pass = t.pass.max(v);
        }
        t.queued.push_front((id, tokens.max(1)));
        self.queued += 1;
    }

    /// The next job to start, if any may: the tenant with the smallest pass
    /// among those with jobs queued and a running slot free (ties by name).
    pub fn start_next(&mut self) -> Option<(Arc<str>, Id)> {
        if self.running >= self.limits.running {
            return None;
        }
        let limit = self.limits.running_per_tenant;
        let (name, _) = self
            .tenants
            .iter()
            .filter(|(_, t)| !t.queued.is_empty() && t.running < limit)
            .min_by(|(a, x), (b, y)| x.pass.total_cmp(&y.pass).then_with(|| a.cmp(b)))?;
        let name = name.clone();
        let weight = self.weights.of(&name);
        let t = self.tenants.get_mut(&name)?;
        let (id, tokens) = t.queued.pop_front()?;
        self.virtual_time = self.virtual_time.max(t.pass);
        t.pass += tokens as f64 / weight;
        t.running += 1;
        self.running += 1;
        self.queued -= 1;
        Some((name, id))
    }

    /// A started job stopped running: finished (`release` its hold too) or
    /// queued again (then `push_front` it).
    pub fn stopped(&mut self, tenant: &str, release: bool) {
        if let Some(t) = self.tenants.get_mut(tenant) {
            if t.running > 0 {
                t.running -= 1;
                self.running -= 1;
            }
            if release {
                t.held = t.held.saturating_sub(1);
            }
        }
        self.forget_idle(tenant);
    }

    /// Releases the hold of a job that is neither queued nor running (its
    /// submission failed, or it ended between two tries).
    pub fn release(&mut self, tenant: &str) {
        if let Some(t) = self.tenants.get_mut(tenant) {
            t.held = t.held.saturating_sub(1);
        }
        self.forget_idle(tenant);
    }

    /// Takes a queued job out (cancelled before it started) and releases it.
    pub fn remove(&mut self, tenant: &str, id: &Id) -> bool {
        let Some(t) = self.tenants.get_mut(tenant) else {
            return false;
        };
        let Some(i) = t.queued.iter().position(|(q, _)| q == id) else {
            return false;
        };
        t.queued.remove(i);
        t.held = t.held.saturating_sub(1);
        self.queued -= 1;
        self.forget_idle(tenant);
        true
    }

    /// Jobs of `tenant` queued ahead of a new one.
    pub fn queued_for(&self, tenant: &str) -> usize {
        self.tenants.get(tenant).map_or(0, |t| t.queued.len())
    }

    /// Where a queued job stands in its tenant's line (0: next).
    pub fn position(&self, tenant: &str, id: &Id) -> Option<usize> {
        self.tenants.get(tenant)?.queued.iter().position(|(q, _)| q == id)
    }

    pub fn running(&self) -> usize {
        self.running
    }

    pub fn queued(&self) -> usize {
        self.queued
    }

    /// Per tenant: (held, queued, running).
    pub fn by_tenant(&self) -> BTreeMap<Arc<str>, (usize, usize, usize)> {
        self.tenants
            .iter()
            .map(|(n, t)| (n.clone(), (t.held, t.queued.len(), t.running)))
            .collect()
    }

    fn forget_idle(&mut self, tenant: &str) {
        if let Some(t) = self.tenants.get(tenant)
            && t.held == 0
            && t.running == 0
            && t.queued.is_empty()
            && t.pass <= self.virtual_time
        {
            self.tenants.remove(tenant);
        }
    }
}

#[cfg(test)]
#[path = "job_tests.rs"]
mod tests;
