//! `Dispatch`: one request, one reply.

use std::sync::Arc;
use std::time::Duration;

use tracing::{Instrument, Span};

use super::idempotency::Begin;
use super::shared_ids::{self, Shared, claim_or_wait};

use super::auth::Caller;
use super::front_door::Snapshot;
use super::prepare::Labels;
use super::{DispatchError, Dispatched, Engine, hint_from_pb, load_from_pb};
use crate::core::{Completion, Outcome, Settlement};
use crate::pb;

impl Engine {
    /// Authenticates, routes, forwards and settles one unit of work.
    /// `timeout` is the caller's deadline (the configured default when it
    /// set none); `caller` its credentials (an `authorization` header, a
    /// client certificate). Runs in the caller's span, whose request fields
    /// it records.
    pub async fn dispatch(
        self: &Arc<Self>,
        r: pb::DispatchRequest,
        timeout: Option<Duration>,
        caller: impl Into<Caller>,
    ) -> Result<Dispatched, DispatchError> {
        let caller = caller.into();
        let running = self.enter();
        // One configuration snapshot for the whole request.
        let config = self.front.snapshot();
        // A request_id is answered once per tenant: the first runs it (to
        // the end, even if its caller leaves), the others wait or replay.
        // Without one (or one the checks will refuse, or no tenant), it
        // just runs. One call site: each `.await` of the request's future
        // would take room of its own in this one.
        let keyed =
            !r.request_id.is_empty() && r.request_id.len() <= config.settings.limits.max_request_id_bytes;
        let Some(tenant) = keyed.then(|| config.authenticate(&caller).ok()).flatten() else {
            return self.dispatch_once(config, r, timeout, &caller).await;
        };
        let id = r.request_id.clone();
        match self.idempotency.begin(&tenant, &id, crate::clock::now()) {
            Begin::Replay(reply) => {
                tracing::debug!(request_id = %id, "replaying the answer to a repeated request_id");
                Ok(reply)
            }
            Begin::Full => Err(DispatchError::IdempotencyFull {
                capacity: config.settings.idempotency_capacity,
            }),
            Begin::Wait(mut rx) => {
                let wait = timeout.unwrap_or(config.settings.default_timeout);
                let answered = tokio::time::timeout(wait, rx.wait_for(|a| a.is_some())).await;
                match answered {
                    Ok(Ok(answer)) => answer.clone().expect("waited for an answer"),
                    Ok(Err(_)) => Err(DispatchError::Internal(format!(
                        "the first request with id {id:?} ended without an answer"
                    ))),
                    Err(_) => Err(DispatchError::DeadlineExceeded(format!(
                        "waiting for the first request with id {id:?}"
                    ))),
                }
            }
            Begin::Lead => {
                let engine = self.clone();
                let span = Span::current();
                // The leader runs on after its caller leaves, and counts as
                // running until it has answered: a shutdown waits for it.
                let run = tokio::spawn(async move {
                    let _running = running;
                    // Across replicas: claim the id, or take the reply of
                    // the replica that ran it.
                    let window = engine.idempotency.window();
                    let mut claimed = None;
                    if let Some(ids) = engine.shared_ids.get().cloned() {
                        let key = shared_ids::key(&tenant, &id);
                        let wait = timeout.unwrap_or(config.settings.default_timeout);
                        let deadline = crate::clock::tokio_now() + wait;
                        let answer = match claim_or_wait(&ids, &key, window, deadline, config.version).await {
                            Ok(Shared::Run { claimed: true }) => {
                                claimed = Some((ids, key));
                                None
                            }
                            Ok(Shared::Run { claimed: false }) => None,
                            Ok(Shared::Replay(reply)) => Some(Ok(*reply)),
                            Err(why) => Some(Err(DispatchError::DeadlineExceeded(why))),
                        };
                        if let Some(answer) = answer {
                            engine
                                .idempotency
                                .finish(&tenant, &id, &answer, crate::clock::now());
                            return answer;
                        }
                    }
                    let answer = engine
                        .dispatch_once(config, r, timeout, &caller)
                        .instrument(span)
                        .await;
                    engine
                        .idempotency
                        .finish(&tenant, &id, &answer, crate::clock::now());
                    if let Some((ids, key)) = claimed {
                        // Stored for the other replicas (a failure releases
                        // the id, so a retry runs again); bounded, and off
                        // the caller's path.
                        let reply = answer.as_ref().ok().map(shared_ids::encode);
                        tokio::spawn(ids.finish(key, reply, window));
                    }
                    answer
                });
                run.await
                    .unwrap_or_else(|e| Err(DispatchError::Internal(format!("dispatch task failed: {e}"))))
            }
        }
    }

    async fn dispatch_once(
        self: &Arc<Self>,
        config: Arc<Snapshot>,
        r: pb::DispatchRequest,
        timeout: Option<Duration>,
        caller: &Caller,
    ) -> Result<Dispatched, DispatchError> {
        let start = crate::clock::now();
        let mut labels = Labels::default();
        let result = self.dispatch_inner(config, r, timeout, caller, &mut labels).await;
        labels.finish(result.as_ref().map(|_| ()), start);
        result
    }

    async fn dispatch_inner(
        self: &Arc<Self>,
        config: Arc<Snapshot>,
        mut r: pb::DispatchRequest,
        timeout: Option<Duration>,
        caller: &Caller,
        labels: &mut Labels,
    ) -> Result<Dispatched, DispatchError> {
        let front = self.front(&config, &mut r, timeout, caller, labels)?;
        let cache = super::cache::CachePlan::new(&config, &front.tenant, &r)?;
        if let Some(plan) = cache.as_ref().filter(|p| !p.refresh)
            && let Some(hit) = self.cache.lookup(plan).await
        {
            labels.model = config.model_name(&r.model);
            return Ok(self.answer_from_cache(r.request_id, hit, config.version, front.path()));
        }
        let (mut p, mut lease) = self.admit(config, r, timeout, front, labels)?;
        // Each step of the plan (the model, then its fallbacks) fails over
        // across regions; a typed trigger moves it to the next model.
        let f = loop {
            let step_deadline = Self::step_deadline(&p);
            let saved = p.step_in(step_deadline);
            // Boxed: awaited in place, the forward's state (several KiB)
            // would be copied into every future that awaits this one.
            let forwarded = Box::pin(self.forwarder.forward(
                &self.desk,
                &p,
                &mut lease,
                |mut client, request| async move { client.execute(request).await },
            ))
            .await;
            p.restore(saved);
            match forwarded {
                Ok(f) => break f,
                Err(e) => lease = self.fall_back(&mut p, lease, e, step_deadline)?,
            }
        };
        labels.model = p.config.model_name(&p.exec.model);
        labels.region = Some(f.region.clone());
        Span::current().record("region", &*f.region);
        let reply = f.value;
        let usage = reply.usage.unwrap_or_default();
        let settle = tracing::debug_span!(
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
                latency: crate::clock::since(f.sent),
                hint: reply.provider_quota.map(hint_from_pb),
                load: reply.load.map(load_from_pb),
                provider_refused: None,
            });
            Span::current().record("charged_tokens", charged);
            charged
        });
        if let Some(plan) = &cache {
            // Complete and successful: the only replies ever stored.
            self.cache
                .store(plan, &p.exec.model, &f.region, reply.output.clone(), usage);
        }
        let span = Span::current();
        let price = super::spend::AttemptPrice::new(&p.config, &p.tenant, &p.exec.model, &f.region);
        let cost = price.charge(&mut lease, charged, &usage, &span);
        lease.finish();
        span.record("prompt_tokens", usage.prompt_tokens);
        span.record("completion_tokens", usage.completion_tokens);
        span.record("attempts", f.attempts);
        Ok(Dispatched {
            request_id: std::mem::take(&mut p.exec.request_id),
            region: f.region.to_string(),
            output: reply.output,
            usage,
            attempts: f.attempts,
            queue_wait: f.queue_wait,
            config_version: p.config.version,
            path: super::ModelPath {
                model: std::mem::take(&mut p.exec.model),
                ..p.path
            },
            cost,
            cached: None,
        })
    }

    /// The answer to a request served from the cache: nothing was
    /// forwarded, so no attempts, no wait and no usage of its own.
    pub(super) fn answer_from_cache(
        &self,
        request_id: String,
        hit: super::CacheHit,
        config_version: u64,
        (alias, route): (String, String),
    ) -> Dispatched {
        let request_id = if request_id.is_empty() {
            self.new_id()
        } else {
            request_id
        };
        Span::current().record("request_id", request_id.as_str());
        Dispatched {
            request_id,
            region: hit.entry.region.clone(),
            output: hit.entry.output.clone(),
            usage: pb::Usage::default(),
            attempts: 0,
            queue_wait: Duration::ZERO,
            config_version,
            path: super::ModelPath {
                model: hit.entry.model.clone(),
                alias,
                route,
                tried: Vec::new(),
            },
            cost: Default::default(),
            cached: Some(Arc::new(hit)),
        }
    }
}
