//! Admin's policy views (capacity rules, rollouts) and the rollout
//! weight command, as wire types: plain data in,
//! messages out, no engine lock held.

use tonic::Status;
use tonic_types::{ErrorDetails, StatusExt};

use crate::core::{CapacityEventKind, RolloutError};
use crate::dispatch::CapacityReport;
use crate::excerpt::excerpt;
use crate::pb;

fn duration(d: std::time::Duration) -> Option<prost_types::Duration> {
    prost_types::Duration::try_from(d).ok()
}

pub fn capacity_reply(report: &CapacityReport) -> pb::ListCapacityRulesReply {
    let rules = report
        .rules
        .iter()
        .map(|v| pb::CapacityRule {
            region: v.spec.region.clone(),
            model: v.spec.model.clone().unwrap_or_default(),
            signal: v.spec.signal.as_str().into(),
            enter: v.spec.enter,
            exit: v.spec.exit,
            duration: duration(v.spec.duration),
            cool_down: duration(v.spec.cool_down),
            action: v.spec.action.as_str().into(),
            weight_factor: v.spec.weight_factor,
            active: v.active,
            value: v.value,
            scale_out: v.scale_out,
        })
        .collect();
    let events = report
        .events
        .iter()
        .map(|(e, ago)| pb::CapacityEvent {
            region: e.region.clone(),
            model: e.model.clone().unwrap_or_default(),
            action: e.action.as_str().into(),
            kind: match e.kind {
                CapacityEventKind::Entered => "entered",
                CapacityEventKind::Exited => "exited",
            }
            .into(),
            value: e.value,
            ago: duration(*ago),
        })
        .collect();
    pb::ListCapacityRulesReply { rules, events }
}

pub fn rollout(s: &crate::core::RolloutSpec) -> pb::Rollout {
    pb::Rollout {
        alias: s.alias.clone(),
        session_label: s.session_label.clone().unwrap_or_default(),
        targets: s
            .targets
            .iter()
            .map(|(model, weight)| pb::RolloutTarget {
                model: model.clone(),
                weight: *weight,
            })
            .collect(),
    }
}

/// At most this many targets in one `SetRolloutWeights`.
const MAX_TARGETS: usize = 32;

pub fn set_rollout_weights(
    engine: &crate::dispatch::Engine,
    r: pb::SetRolloutWeightsRequest,
) -> Result<pb::Rollout, Status> {
    if r.targets.len() > MAX_TARGETS {
        return Err(Status::with_error_details(
            tonic::Code::InvalidArgument,
            format!("{} targets; at most {MAX_TARGETS}", r.targets.len()),
            ErrorDetails::with_bad_request_violation("targets", format!("at most {MAX_TARGETS}")),
        ));
    }
    let weights: Vec<(String, f64)> = r.targets.into_iter().map(|t| (t.model, t.weight)).collect();
    match engine.rollouts().set_weights(&r.alias, &weights) {
        Ok(spec) => {
            tracing::info!(alias = %spec.alias, targets = ?spec.targets, "rollout weights set by an operator");
            Ok(rollout(&spec))
        }
        Err(e) => {
            let (code, field) = match e {
                RolloutError::UnknownAlias { .. } => (tonic::Code::NotFound, "alias"),
                _ => (tonic::Code::InvalidArgument, "targets"),
            };
            // The error quotes names bounded by the config, and the caller's
            // names through `excerpt`.
            let message = match &e {
                RolloutError::UnknownAlias { known, .. } => {
                    format!("no rollout alias {}; configured: {known}", excerpt(&r.alias))
                }
                RolloutError::UnknownTarget { model, known, .. } => format!(
                    "alias {:?} has no target {}; its targets: {known}",
                    r.alias,
                    excerpt(model)
                ),
                other => other.to_string(),
            };
            Err(Status::with_error_details(
                code,
                message.clone(),
                ErrorDetails::with_bad_request_violation(field, message),
            ))
        }
    }
}
