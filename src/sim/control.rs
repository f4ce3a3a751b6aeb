//! `RegionSimControl`: what the tests and benches read from a simulated
//! cluster (its counters, the provider's levels) and the knobs they turn
//! (latency, failures, health).

use std::sync::atomic::Ordering;

use tonic::{Request, Response, Status};

use super::service::SimService;
use crate::pb;
use crate::pb::agent_cluster_server::AgentClusterServer;
use crate::pb::region_sim_control_server::RegionSimControl;

#[tonic::async_trait]
impl RegionSimControl for SimService {
    async fn get_stats(&self, _: Request<pb::GetStatsRequest>) -> Result<Response<pb::SimStats>, Status> {
        Ok(Response::new(self.stats()))
    }

    async fn configure(&self, request: Request<pb::SimSettings>) -> Result<Response<pb::SimStats>, Status> {
        let s = request.into_inner();
        if let Some(f) = s.failure_rate
            && !(0.0..=1.0).contains(&f)
        {
            return Err(Status::invalid_argument("failure_rate must be within 0 and 1"));
        }
        if let Some(ms) = s.ms_per_1k_tokens
            && !(ms.is_finite() && ms >= 0.0)
        {
            return Err(Status::invalid_argument(
                "ms_per_1k_tokens must be a non-negative number",
            ));
        }
        let healthy = {
            let mut k = self.inner.knobs.lock();
            if let Some(v) = s.ms_per_1k_tokens {
                k.ms_per_1k_tokens = v;
            }
            if let Some(v) = s.failure_rate {
                k.failure_rate = v;
            }
            if let Some(v) = s.extra_latency_ms {
                k.extra_latency_ms = v;
            }
            if let Some(v) = s.healthy {
                k.healthy = v;
            }
            k.healthy
        };
        if healthy {
            self.inner
                .health
                .set_serving::<AgentClusterServer<SimService>>()
                .await;
            self.inner
                .health
                .set_service_status("", tonic_health::ServingStatus::Serving)
                .await;
        } else {
            self.inner
                .health
                .set_not_serving::<AgentClusterServer<SimService>>()
                .await;
            self.inner
                .health
                .set_service_status("", tonic_health::ServingStatus::NotServing)
                .await;
        }
        Ok(Response::new(self.stats()))
    }
}

impl SimService {
    pub fn stats(&self) -> pb::SimStats {
        let models = self
            .inner
            .provider
            .lock()
            .counters(crate::clock::now())
            .into_iter()
            .map(|(model, c, remaining)| pb::ModelStats {
                model,
                accepted: c.accepted,
                rejected: c.rejected,
                rejected_after_hint: c.rejected_after_hint,
                prompt_tokens: c.prompt_tokens,
                completion_tokens: c.completion_tokens,
                charged_tokens: c.charged_tokens,
                remaining_tokens: remaining,
                admitted_tokens_per_second: c.admitted_per_second,
                remaining_tokens_per_second: c.remaining_per_second,
            })
            .collect();
        pb::SimStats {
            region: self.inner.region.clone(),
            models,
            failed: self.inner.failed.load(Ordering::Relaxed),
            in_flight: self.inner.in_flight.load(Ordering::Relaxed),
            healthy: self.inner.knobs.lock().healthy,
            cancelled: self.inner.cancelled.load(Ordering::Relaxed),
            repeated_request_ids: self.inner.request_ids.lock().repeated(),
        }
    }
}
