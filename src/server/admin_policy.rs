//! Admin's policy views (capacity rules) as wire types: plain data in,
//! messages out, no engine lock held.

use crate::core::CapacityEventKind;
use crate::dispatch::CapacityReport;
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
