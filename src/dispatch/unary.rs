//! `Dispatch`: one request, one reply.

use std::sync::Arc;
use std::time::Duration;

use super::{DispatchError, Dispatched, Engine, hint_from_pb, load_from_pb};
use crate::core::{Completion, Outcome, Settlement};
use crate::pb;

impl Engine {
    /// Authenticates, routes, forwards and settles one unit of work.
    /// `timeout` is the caller's deadline (the configured default when it
    /// set none); `authorization` the caller's header.
    pub async fn dispatch(
        self: &Arc<Self>,
        r: pb::DispatchRequest,
        timeout: Option<Duration>,
        authorization: Option<&str>,
    ) -> Result<Dispatched, DispatchError> {
        let (p, mut charge) = self.prepare(r, timeout, authorization)?;
        let f = self
            .forward(&p, &mut charge, |mut client, request| async move {
                client.execute(request).await
            })
            .await?;
        let reply = f.value;
        let usage = reply.usage.unwrap_or_default();
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
        charge.settled(charged);
        charge.finish();
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
