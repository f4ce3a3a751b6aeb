//! Quota shared with other replicas, as the router hands it to the sync
//! task: one call per shared (region, model), and the answers back.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Instant;

use super::Router;
use crate::core::central::{CentralLimits, SyncCall, SyncGrant};
use crate::core::shared_quota::Waiting;

/// What the requests waiting for each (region, model) need, by region and
/// model name.
pub type WaitingByQuota = HashMap<(Arc<str>, Arc<str>), Waiting>;

/// One shared (region, model)'s call to its central bucket.
#[derive(Debug, Clone, PartialEq)]
pub struct SyncItem {
    pub region: Arc<str>,
    pub model: Arc<str>,
    pub limits: CentralLimits,
    pub call: SyncCall,
}

impl Router {
    /// The next call to the central bucket of every shared (region, model),
    /// in region then model order, sized with what the requests waiting for
    /// each need (`waiting`; none where it has no entry). Hand each back
    /// with its answer to `sync_done`.
    pub fn sync_calls(&mut self, waiting: &WaitingByQuota, now: Instant) -> Vec<SyncItem> {
        let mut calls = Vec::new();
        for region in &mut self.regions {
            for (model, quota) in region.quotas.iter_mut().enumerate() {
                if let Some(shared) = quota.as_mut().and_then(|q| q.shared_mut()) {
                    let key = (region.name.clone(), self.model_names[model].clone());
                    shared.set_waiting(waiting.get(&key).copied().unwrap_or_default());
                    calls.push(SyncItem {
                        region: region.name.clone(),
                        model: self.model_names[model].clone(),
                        limits: *shared.limits(),
                        call: shared.sync_call(now),
                    });
                }
            }
        }
        calls
    }

    /// Applies the answers to calls from `sync_calls` (sent at `sent_at`):
    /// a grant, or `None` when the call got no answer. A (region, model) a
    /// reload removed meanwhile is skipped.
    pub fn sync_done(&mut self, done: Vec<(SyncItem, Option<SyncGrant>)>, sent_at: Instant, now: Instant) {
        for (item, grant) in done {
            let Some(model) = self.model_id(&item.model) else {
                continue;
            };
            let Some(region) = self.region_id(&item.region) else {
                continue;
            };
            let Some(shared) = self.regions[region].quota_mut(model).and_then(|q| q.shared_mut()) else {
                continue;
            };
            match grant {
                Some(grant) => shared.on_reply(&item.call, grant, sent_at, now),
                None => shared.on_failure(item.call, now),
            }
        }
    }
}
