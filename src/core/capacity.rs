//! Capacity rules: sustained pressure on a region (or one of its models)
//! turns into an action, with hysteresis so nothing flaps.
//!
//! A rule watches one signal (utilisation, or queue depth) of one region or
//! region-model. It *enters* once the signal has stayed at or above `enter`
//! for `duration`, and *exits* once it drops below `exit` (lower than
//! `enter`). After exiting it cannot enter again before its `cool_down`.
//! While active its action is in force: `alert` only reports, `reject_new`
//! sheds new work for the region, `redistribute` multiplies the region's
//! weight by `weight_factor`, `scale_out` raises a signal an autoscaler
//! reads. Pure: the caller samples the signals and passes `now`.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

/// How many transitions are kept for operators (oldest dropped first).
pub const EVENTS_KEPT: usize = 64;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CapacitySignal {
    /// Region: `max(in flight / max_concurrent, reported utilisation)`.
    /// Region-model: the share of its token bucket in use.
    Utilization,
    /// Region: what its cluster reports queued. Region-model: requests
    /// waiting here for that model's quota.
    QueueDepth,
}

impl CapacitySignal {
    pub fn as_str(self) -> &'static str {
        match self {
            CapacitySignal::Utilization => "utilization",
            CapacitySignal::QueueDepth => "queue_depth",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CapacityAction {
    Alert,
    RejectNew,
    Redistribute,
    ScaleOut,
}

impl CapacityAction {
    pub fn as_str(self) -> &'static str {
        match self {
            CapacityAction::Alert => "alert",
            CapacityAction::RejectNew => "reject_new",
            CapacityAction::Redistribute => "redistribute",
            CapacityAction::ScaleOut => "scale_out",
        }
    }
}

/// One rule, validated (`enter > exit`, factor in (0, 1]).
#[derive(Debug, Clone, PartialEq)]
pub struct CapacityRuleSpec {
    pub region: String,
    /// `None`: the whole region.
    pub model: Option<String>,
    pub signal: CapacitySignal,
    pub enter: f64,
    pub exit: f64,
    /// How long the signal must stay at or above `enter`.
    pub duration: Duration,
    /// How long after exiting before it may enter again.
    pub cool_down: Duration,
    pub action: CapacityAction,
    /// `redistribute`: the region's weight is multiplied by this while active.
    pub weight_factor: f64,
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Phase {
    Idle {
        /// Since when the signal has been at or above `enter`.
        above_since: Option<Instant>,
        /// No entering before then (cool-down after an exit).
        quiet_until: Option<Instant>,
    },
    Active {
        since: Instant,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CapacityEventKind {
    Entered,
    Exited,
}

/// A rule entering or leaving its action.
#[derive(Debug, Clone, PartialEq)]
pub struct CapacityEvent {
    pub at: Instant,
    pub rule: usize,
    pub region: String,
    pub model: Option<String>,
    pub action: CapacityAction,
    pub kind: CapacityEventKind,
    /// The signal's value at the transition.
    pub value: f64,
}

/// A rule's state, for operators and metrics.
#[derive(Debug, Clone, PartialEq)]
pub struct CapacityRuleView {
    pub spec: CapacityRuleSpec,
    pub active: bool,
    pub value: f64,
    /// While `scale_out` is active: by how much the capacity should grow to
    /// bring the signal to its exit threshold (`value / exit`); else 0.
    pub scale_out: f64,
}

/// What the active rules ask of one region now.
#[derive(Debug, Clone, PartialEq)]
pub struct RegionPressure {
    pub region: String,
    /// Every model of the region sheds new work.
    pub shed_all: bool,
    /// These models shed new work.
    pub shed_models: Vec<String>,
    /// The product of the active `redistribute` factors (1: none).
    pub weight_factor: f64,
    /// When shedding could end at the soonest (for a caller's retry).
    pub retry_after: Duration,
}

#[derive(Debug, Clone, Default)]
pub struct CapacityRules {
    rules: Vec<(CapacityRuleSpec, Phase, f64)>,
    events: VecDeque<CapacityEvent>,
}

impl CapacityRules {
    pub fn new(specs: Vec<CapacityRuleSpec>) -> Self {
        let mut rules = Self::default();
        rules.apply(specs);
        rules
    }

    /// New rules after a reload: a rule that stays the same keeps its
    /// state (an active rule stays active); changed or new ones start idle.
    pub fn apply(&mut self, specs: Vec<CapacityRuleSpec>) {
        let idle = Phase::Idle {
            above_since: None,
            quiet_until: None,
        };
        let old = std::mem::take(&mut self.rules);
        self.rules = specs
            .into_iter()
            .map(|spec| {
                let kept = old.iter().find(|(s, _, _)| *s == spec);
                let (phase, value) = kept.map_or((idle, 0.0), |(_, p, v)| (*p, *v));
                (spec, phase, value)
            })
            .collect();
    }

    pub fn is_empty(&self) -> bool {
        self.rules.is_empty()
    }

    pub fn specs(&self) -> impl Iterator<Item = &CapacityRuleSpec> {
        self.rules.iter().map(|(s, _, _)| s)
    }

    /// Moves every rule on with its signal now (`sample`; `None`: the
    /// region or model is gone, read as 0). Returns the transitions.
    pub fn step(
        &mut self,
        now: Instant,
        mut sample: impl FnMut(&CapacityRuleSpec) -> Option<f64>,
    ) -> Vec<CapacityEvent> {
        let mut out = Vec::new();
        for (i, (spec, phase, last)) in self.rules.iter_mut().enumerate() {
            let value = sample(spec).filter(|v| v.is_finite()).unwrap_or(0.0);
            *last = value;
            let kind = match *phase {
                Phase::Idle {
                    above_since,
                    quiet_until,
                } => {
                    if value < spec.enter {
                        *phase = Phase::Idle {
                            above_since: None,
                            quiet_until,
                        };
                        None
                    } else {
                        let since = above_since.unwrap_or(now);
                        let quiet = quiet_until.is_some_and(|q| now < q);
                        if !quiet && now.saturating_duration_since(since) >= spec.duration {
                            *phase = Phase::Active { since: now };
                            Some(CapacityEventKind::Entered)
                        } else {
                            *phase = Phase::Idle {
                                above_since: Some(since),
                                quiet_until,
                            };
                            None
                        }
                    }
                }
                Phase::Active { .. } if value < spec.exit => {
                    *phase = Phase::Idle {
                        above_since: None,
                        quiet_until: Some(now + spec.cool_down),
                    };
                    Some(CapacityEventKind::Exited)
                }
                Phase::Active { .. } => None,
            };
            if let Some(kind) = kind {
                out.push(CapacityEvent {
                    at: now,
                    rule: i,
                    region: spec.region.clone(),
                    model: spec.model.clone(),
                    action: spec.action,
                    kind,
                    value,
                });
            }
        }
        for e in &out {
            if self.events.len() == EVENTS_KEPT {
                self.events.pop_front();
            }
            self.events.push_back(e.clone());
        }
        out
    }

    /// The latest transitions, oldest first.
    pub fn events(&self) -> impl Iterator<Item = &CapacityEvent> {
        self.events.iter()
    }

    pub fn views(&self) -> Vec<CapacityRuleView> {
        self.rules
            .iter()
            .map(|(spec, phase, value)| {
                let active = matches!(phase, Phase::Active { .. });
                let scale_out = if active && spec.action == CapacityAction::ScaleOut {
                    (value / spec.exit.max(f64::MIN_POSITIVE)).max(1.0)
                } else {
                    0.0
                };
                CapacityRuleView {
                    spec: spec.clone(),
                    active,
                    value: *value,
                    scale_out,
                }
            })
            .collect()
    }

    /// What the active rules ask of each region they name (every region a
    /// rule names is listed, so lifted pressure is seen as lifted).
    pub fn pressure(&self) -> Vec<RegionPressure> {
        let mut out: Vec<RegionPressure> = Vec::new();
        for (spec, phase, _) in &self.rules {
            let index = match out.iter().position(|p| p.region == spec.region) {
                Some(i) => i,
                None => {
                    out.push(RegionPressure {
                        region: spec.region.clone(),
                        shed_all: false,
                        shed_models: Vec::new(),
                        weight_factor: 1.0,
                        retry_after: Duration::ZERO,
                    });
                    out.len() - 1
                }
            };
            if !matches!(phase, Phase::Active { .. }) {
                continue;
            }
            let p = &mut out[index];
            match spec.action {
                CapacityAction::RejectNew => {
                    match &spec.model {
                        None => p.shed_all = true,
                        Some(m) => p.shed_models.push(m.clone()),
                    }
                    // It exits at the soonest once a sample is below `exit`:
                    // about a rule duration, and never less than a second.
                    p.retry_after = p.retry_after.max(spec.duration.max(Duration::from_secs(1)));
                }
                CapacityAction::Redistribute => p.weight_factor *= spec.weight_factor,
                CapacityAction::Alert | CapacityAction::ScaleOut => {}
            }
        }
        out
    }
}

#[cfg(test)]
#[path = "capacity_tests.rs"]
mod tests;
