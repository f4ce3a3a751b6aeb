//! Capacity rules at the edge: a task samples every rule's signal from the
//! quota desk on a fixed tick, moves the pure state machine on
//! (`core::capacity`), and applies what the active rules ask (shedding,
//! lower weights) to the router, all under the desk's one lock. Each
//! transition is logged and counted; scale-out signals are gauges.
//!
//! Owner: the rules live in `Desk::capacity`, under the desk's `Mutex`.

use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;

use super::desk::{Desk, QuotaDesk};
use crate::core::{CapacityEvent, CapacityEventKind, CapacityRuleSpec, CapacityRuleView, CapacitySignal};

/// How often the rules are sampled: fine enough for rule durations of a
/// second or more.
pub const CAPACITY_TICK: Duration = Duration::from_millis(250);

/// The rules' state and latest transitions, for Admin.
#[derive(Debug, Clone, Default)]
pub struct CapacityReport {
    pub rules: Vec<CapacityRuleView>,
    /// Oldest first, with how long ago each happened.
    pub events: Vec<(CapacityEvent, Duration)>,
}

impl Desk {
    /// The signal `spec` watches, now.
    fn sample(&self, spec: &CapacityRuleSpec, now: Instant) -> Option<f64> {
        let router = self.scheduler.router();
        let region = router.region(&spec.region)?;
        match (&spec.model, spec.signal) {
            (None, CapacitySignal::Utilization) => Some(region.load().utilization(now)),
            (None, CapacitySignal::QueueDepth) => {
                Some(region.load().reported(now).map_or(0.0, |r| r.queued as f64))
            }
            (Some(model), CapacitySignal::Utilization) => {
                let id = router.models().iter().position(|m| m.name == *model)?;
                let tokens = region.quota(id)?.tokens();
                let capacity = tokens.capacity().max(1) as f64;
                Some((1.0 - tokens.available(now) as f64 / capacity).clamp(0.0, 1.0))
            }
            (Some(model), CapacitySignal::QueueDepth) => Some(self.scheduler.queued_for(model) as f64),
        }
    }

    /// Moves the rules on and applies their pressure to the router.
    pub(super) fn step_capacity(&mut self, now: Instant) -> Vec<CapacityEvent> {
        if self.capacity.is_empty() {
            return Vec::new();
        }
        let mut rules = std::mem::take(&mut self.capacity);
        let events = rules.step(now, |spec| self.sample(spec, now));
        self.capacity = rules;
        self.apply_pressure();
        events
    }
}

impl QuotaDesk {
    /// One tick of the rules; wakes the pump when pressure changed.
    pub fn step_capacity(&self, now: Instant) -> Vec<CapacityEvent> {
        let (events, views) = {
            let mut desk = self.lock();
            let events = desk.step_capacity(now);
            let views = crate::metrics::enabled().then(|| desk.capacity.views());
            (events, views)
        };
        for e in &events {
            record(e);
        }
        if let Some(views) = views {
            for v in views {
                let labels = [
                    ("region", v.spec.region.clone()),
                    ("model", v.spec.model.clone().unwrap_or_default()),
                    ("action", v.spec.action.as_str().to_string()),
                ];
                metrics::gauge!("dispatcher_capacity_rule_active", &labels).set(v.active as u8 as f64);
                metrics::gauge!("dispatcher_capacity_signal", &labels).set(v.value);
                if v.spec.action == crate::core::CapacityAction::ScaleOut {
                    metrics::gauge!("dispatcher_capacity_scale_out", &labels[..2]).set(v.scale_out);
                }
            }
        }
        if !events.is_empty() {
            self.wake();
        }
        events
    }

    /// The rules and their latest transitions.
    pub fn capacity_report(&self, now: Instant) -> CapacityReport {
        let desk = self.lock();
        CapacityReport {
            rules: desk.capacity.views(),
            events: desk
                .capacity
                .events()
                .map(|e| (e.clone(), now.saturating_duration_since(e.at)))
                .collect(),
        }
    }

    /// Samples the rules every `CAPACITY_TICK` until `cancel` fires or the
    /// desk is dropped.
    pub fn spawn_capacity(self: &Arc<Self>, cancel: CancellationToken) -> tokio::task::JoinHandle<()> {
        let desk = Arc::downgrade(self);
        tokio::spawn(tick(desk, cancel))
    }
}

async fn tick(desk: Weak<QuotaDesk>, cancel: CancellationToken) {
    let mut interval = tokio::time::interval(CAPACITY_TICK);
    interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = interval.tick() => {}
        }
        let Some(d) = desk.upgrade() else { return };
        d.step_capacity(crate::clock::now());
    }
}

/// A log line and a counter per transition.
fn record(e: &CapacityEvent) {
    let model = e.model.as_deref().unwrap_or("");
    let action = e.action.as_str();
    match e.kind {
        CapacityEventKind::Entered => tracing::warn!(
            region = %e.region, model, action, value = e.value,
            "capacity rule entered: sustained pressure above its enter threshold"
        ),
        CapacityEventKind::Exited => tracing::info!(
            region = %e.region, model, action, value = e.value,
            "capacity rule exited: pressure below its exit threshold"
        ),
    }
    if crate::metrics::enabled() {
        let kind = match e.kind {
            CapacityEventKind::Entered => "entered",
            CapacityEventKind::Exited => "exited",
        };
        metrics::counter!(
            "dispatcher_capacity_transitions_total",
            "region" => e.region.clone(),
            "model" => model.to_string(),
            "action" => action,
            "kind" => kind,
        )
        .increment(1);
    }
}
