//! `Dispatch`: one request, one reply.

use std::sync::Arc;
use std::time::{Duration, Instant};

use tracing::Span;

use super::attempt::Labels;
use super::{DispatchError, Dispatched, Engine, hint_from_pb, load_from_pb};
use crate::core::{Completion, Outcome, Settlement};
use crate::pb;

impl Engine {
    /// Authenticates, routes, forwards and settles one unit of work.
    /// `timeout` is the caller's deadline (the configured default when it
    /// set none); `authorization` the caller's header. Runs in the caller's
    /// span, whose request fields it records.
    pub async fn dispatch(
        self: &Arc<Self>,
        r: pb::DispatchRequest,
        timeout: Option<Duration>,
        authorization: Option<&str>,
    ) -> Result<Dispatched, DispatchError> {
        let start = Instant::now();
        let mut labels = Labels::default();
        let result = self.dispatch_inner(r, timeout, authorization, &mut labels).await;
        labels.finish(result.as_ref().map(|_| ()), start);
        result
    }

    async fn dispatch_inner(
        self: &Arc<Self>,
        r: pb::DispatchRequest,
        timeout: Option<Duration>,
        authorization: Option<&str>,
        labels: &mut Labels,
    ) -> Result<Dispatched, DispatchError> {
        let (p, mut charge) = self.prepare(r, timeout, authorization, labels)?;
        let f = self
            .forward(&p, &mut charge, |mut client, request| async move {
                client.execute(request).await
            })
            .await?;
        labels.region = Some(f.region.clone());
        Span::current().record("region", &*f.region);
        let reply = f.value;
        let usage = reply.usage.unwrap_or_default();
        let settle = tracing::info_span!(
            "settle",
            region = %f.region,
            prompt_tokens = usage.prompt_tokens,
            completion_tokens = usage.completion_tokens,
            charged_tokens = tracing::field::Empty,
        );
        let charged = settle.in_scope(|| {
            let charged = f.held.settle(Completion {
                settlement: Settlement::Used {
                    prompt: usage.prompt_tokens,
                    completion: usage.completion_tokens,
                },
                outcome: Some(Outcome::Success),
                latency: f.sent.elapsed(),
                hint: reply.provider_quota.map(hint_from_pb),
                load: reply.load.map(load_from_pb),
                provider_refused: None,
            });
            Span::current().record("charged_tokens", charged);
            charged
        });
        charge.settled(charged);
        charge.finish();
        let span = Span::current();
        span.record("prompt_tokens", usage.prompt_tokens);
        span.record("completion_tokens", usage.completion_tokens);
        span.record("attempts", f.attempts);
        Ok(Dispatched {
            request_id: p.request_id,
            region: f.region.to_string(),
            output: reply.output,
            usage,
            attempts: f.attempts,
            queue_wait: f.queue_wait,
        })
    }
}
