//! `dispatch.v1.Dispatcher`: wire types in, engine call, wire types out.

use std::pin::Pin;
use std::sync::Arc;

use tokio_stream::{Stream, StreamExt};
use tonic::{Request, Response, Status};
use tracing::Instrument;

use super::status::to_status;
use crate::core::RoutePreview;
use crate::dispatch::{Caller, Dispatched, Engine, RoutePlanView, StreamChunk};
use crate::pb;
use crate::pb::dispatcher_server::Dispatcher;

pub struct DispatcherService {
    engine: Arc<Engine>,
}

impl DispatcherService {
    pub fn new(engine: Arc<Engine>) -> Self {
        Self { engine }
    }
}

/// The span of one request. Never the key or the payload: only what an
/// operator needs to follow it.
pub(super) fn request_span(rpc: &'static str) -> tracing::Span {
    crate::dispatch::work_span!("dispatch", "server", rpc, protocol = "grpc")
}

/// The caller's credentials: the `authorization` header, if any (its value
/// is never logged), and the names of its verified client certificate.
pub(super) fn caller<T>(request: &Request<T>) -> Caller {
    caller_from(
        request.metadata().as_ref(),
        request.extensions().get::<crate::tls::identity::PeerIdentity>(),
    )
}

/// `caller`, from a request's HTTP headers and its connection's client
/// certificate.
pub(super) fn caller_from(
    headers: &http::HeaderMap,
    identity: Option<&crate::tls::identity::PeerIdentity>,
) -> Caller {
    Caller {
        authorization: headers.get(http::header::AUTHORIZATION).map(|v| {
            v.to_str()
                .map(str::to_string)
                .unwrap_or_else(|_| "invalid".into())
        }),
        identity: identity.cloned().unwrap_or_default(),
        submitted_as: None,
    }
}

fn duration(d: std::time::Duration) -> Option<prost_types::Duration> {
    prost_types::Duration::try_from(d).ok()
}

pub(super) fn reply(d: Dispatched) -> pb::DispatchReply {
    pb::DispatchReply {
        request_id: d.request_id,
        region: d.region,
        output: d.output,
        usage: Some(d.usage),
        attempts: d.attempts,
        queue_wait: duration(d.queue_wait),
        model: d.path.model,
        models_tried: d.path.tried,
        alias: d.path.alias,
        route: d.path.route,
        cost: Some(d.cost.to_pb()),
        cached: d.cached.as_deref().map(crate::dispatch::cached_reply),
    }
}

fn chunk(c: StreamChunk) -> pb::DispatchChunk {
    pb::DispatchChunk {
        request_id: c.request_id,
        region: c.region,
        output: c.output,
        usage: Some(c.usage),
        done: c.done,
        attempts: c.attempts,
        queue_wait: duration(c.queue_wait),
        model: c.path.model,
        models_tried: c.path.tried,
        alias: c.path.alias,
        route: c.path.route,
        cost: c.cost.as_ref().map(crate::dispatch::Cost::to_pb),
        cached: c.cached.as_deref().map(crate::dispatch::cached_reply),
    }
}

/// A score or factor as operators read it: four significant digits
/// (0.9950000000000001 reads 0.995). Routing uses the exact values.
fn for_display(x: f64) -> f64 {
    if x == 0.0 || !x.is_finite() {
        return x;
    }
    let scale = 10f64.powi(3 - x.abs().log10().floor() as i32);
    (x * scale).round() / scale
}

fn candidates(p: &RoutePreview) -> Vec<pb::Candidate> {
    p.candidates
        .iter()
        .map(|c| pb::Candidate {
            region: c.region.clone(),
            eligible: c.eligible,
            excluded_reason: c.excluded.clone().unwrap_or_default(),
            score: for_display(c.score),
            factors: c
                .factors
                .iter()
                .map(|(k, v)| (k.to_string(), for_display(v)))
                .collect(),
        })
        .collect()
}

fn retry_after(p: &RoutePreview) -> Option<prost_types::Duration> {
    match &p.error {
        Some(crate::core::RouteError::NoCapacity { retry_after, .. }) => retry_after.and_then(duration),
        Some(crate::core::RouteError::Shed { retry_after, .. }) => duration(*retry_after),
        _ => None,
    }
}

/// The first step's decision at the top (as before plans), then the plan.
fn decision(RoutePlanView { route, steps }: RoutePlanView) -> pb::RouteDecision {
    let first = steps.first().and_then(|s| s.preview.as_ref());
    let mut d = pb::RouteDecision {
        model: steps.first().map(|s| s.model.clone()).unwrap_or_default(),
        route,
        ..Default::default()
    };
    if let Some(p) = first {
        d.region = p.chosen.clone().unwrap_or_default();
        d.candidates = candidates(p);
        d.retry_after = retry_after(p);
        d.strategy = p.strategy.to_string();
        d.estimated_tokens = p.tokens;
    }
    d.plan = steps
        .into_iter()
        .map(|s| pb::RouteStep {
            region: s
                .preview
                .as_ref()
                .and_then(|p| p.chosen.clone())
                .unwrap_or_default(),
            candidates: s.preview.as_ref().map(candidates).unwrap_or_default(),
            estimated_tokens: s.preview.as_ref().map_or(0, |p| p.tokens),
            error: s.error.unwrap_or_default(),
            fall_back_on: s.fall_back_on.iter().map(|t| t.as_str().to_string()).collect(),
            model: s.model,
        })
        .collect();
    d
}

#[tonic::async_trait]
impl Dispatcher for DispatcherService {
    async fn dispatch(
        &self,
        request: Request<pb::DispatchRequest>,
    ) -> Result<Response<pb::DispatchReply>, Status> {
        let timeout = crate::grpc::grpc_timeout(request.metadata());
        let caller = caller(&request);
        let span = request_span("Dispatch");
        crate::telemetry::continue_trace(&span, request.metadata());
        let r = request.into_inner();
        self.engine
            .dispatch(r, timeout, caller)
            .instrument(span)
            .await
            .map(|d| Response::new(reply(d)))
            .map_err(|e| to_status(&e))
    }

    type DispatchStreamStream = Pin<Box<dyn Stream<Item = Result<pb::DispatchChunk, Status>> + Send>>;

    async fn dispatch_stream(
        &self,
        request: Request<pb::DispatchRequest>,
    ) -> Result<Response<Self::DispatchStreamStream>, Status> {
        let timeout = crate::grpc::grpc_timeout(request.metadata());
        let caller = caller(&request);
        let span = request_span("DispatchStream");
        crate::telemetry::continue_trace(&span, request.metadata());
        let r = request.into_inner();
        let chunks = self
            .engine
            .dispatch_stream(r, timeout, caller)
            .instrument(span)
            .await
            .map_err(|e| to_status(&e))?;
        let out = chunks.map(|c| c.map(chunk).map_err(|e| to_status(&e)));
        Ok(Response::new(Box::pin(out)))
    }

    async fn route(
        &self,
        request: Request<pb::DispatchRequest>,
    ) -> Result<Response<pb::RouteDecision>, Status> {
        let caller = caller(&request);
        let timeout = crate::grpc::grpc_timeout(request.metadata());
        let r = request.into_inner();
        self.engine
            .route_plan(&r, timeout, caller)
            .map(|steps| Response::new(decision(steps)))
            .map_err(|e| to_status(&e))
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn scores_are_shown_to_four_significant_digits() {
        assert_eq!(super::for_display(0.9950000000000001), 0.995);
        assert_eq!(super::for_display(1.09835), 1.098);
        assert_eq!(super::for_display(280.2834), 280.3);
        assert_eq!(super::for_display(0.000123456), 0.0001235);
        assert_eq!(super::for_display(0.0), 0.0);
        assert_eq!(super::for_display(12345.0), 12350.0);
    }
}
