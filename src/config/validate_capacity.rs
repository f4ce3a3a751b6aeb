//! `[[capacity]]` in a region file → checked capacity rules; every refusal
//! names its key (`capacity[i].enter`, ...).

use std::time::Duration;

use super::ConfigError;
use super::ctx::Ctx;
use super::raw::RawCapacityRule;
use crate::core::{CapacityAction, CapacityRuleSpec, CapacitySignal, ModelLimits};

/// At most this many rules per region (each is checked on every tick).
pub const MAX_RULES: usize = 16;

pub(super) fn validate_capacity(
    c: &Ctx<'_>,
    region: &str,
    raw: Vec<RawCapacityRule>,
    models: &[(String, ModelLimits)],
) -> Result<Vec<CapacityRuleSpec>, ConfigError> {
    if raw.len() > MAX_RULES {
        return Err(c.err(
            "capacity",
            format!("{} rules; at most {MAX_RULES} per region", raw.len()),
        ));
    }
    raw.into_iter()
        .enumerate()
        .map(|(i, r)| validate_rule(c, region, i, r, models))
        .collect()
}

fn validate_rule(
    c: &Ctx<'_>,
    region: &str,
    i: usize,
    r: RawCapacityRule,
    models: &[(String, ModelLimits)],
) -> Result<CapacityRuleSpec, ConfigError> {
    let key = |k: &str| format!("capacity[{i}].{k}");
    if let Some(m) = &r.model
        && !models.iter().any(|(name, _)| name == m)
    {
        let served: Vec<_> = models.iter().map(|(n, _)| n.as_str()).collect();
        return Err(c.err(
            key("model"),
            format!(
                "this region does not serve {:?}; it serves {}",
                crate::excerpt::excerpt(m),
                served.join(", ")
            ),
        ));
    }
    let signal = match r.signal.as_deref() {
        None | Some("utilization") => CapacitySignal::Utilization,
        Some("queue_depth") => CapacitySignal::QueueDepth,
        Some(other) => {
            return Err(c.err(
                key("signal"),
                format!(
                    "unknown signal {:?}; expected \"utilization\" or \"queue_depth\"",
                    crate::excerpt::excerpt(other)
                ),
            ));
        }
    };
    let action = match r.action.as_deref() {
        Some("alert") => CapacityAction::Alert,
        Some("reject_new") => CapacityAction::RejectNew,
        Some("redistribute") => CapacityAction::Redistribute,
        Some("scale_out") => CapacityAction::ScaleOut,
        Some(other) => {
            return Err(c.err(
                key("action"),
                format!(
                    "unknown action {:?}; expected alert, reject_new, redistribute or scale_out",
                    crate::excerpt::excerpt(other)
                ),
            ));
        }
        None => {
            return Err(c.err(
                key("action"),
                "missing: alert, reject_new, redistribute or scale_out",
            ));
        }
    };
    let (max, default_enter, default_exit): (f64, f64, f64) = match signal {
        CapacitySignal::Utilization => (1.0, 0.9, 0.7),
        CapacitySignal::QueueDepth => (1e9, 100.0, 50.0),
    };
    let enter = c.number(&key("enter"), r.enter, default_enter, 0.0, max)?;
    let exit = c.number(&key("exit"), r.exit, default_exit.min(enter), 0.0, max)?;
    if exit >= enter {
        return Err(c.err(
            key("exit"),
            format!("{exit} must be below enter ({enter}), or the rule would flap"),
        ));
    }
    let duration = c.duration(&key("for"), r.duration.as_deref(), Duration::from_secs(30))?;
    let cool_down = c.duration(&key("cool_down"), r.cool_down.as_deref(), Duration::from_secs(60))?;
    let weight_factor = c.number(&key("weight_factor"), r.weight_factor, 0.5, 0.0, 1.0)?;
    if weight_factor <= 0.0 {
        return Err(c.err(
            key("weight_factor"),
            "must be above zero (use reject_new to stop sending new work)",
        ));
    }
    if r.weight_factor.is_some() && action != CapacityAction::Redistribute {
        return Err(c.err(key("weight_factor"), "applies to action = \"redistribute\" only"));
    }
    Ok(CapacityRuleSpec {
        region: region.to_string(),
        model: r.model,
        signal,
        enter,
        exit,
        duration,
        cool_down,
        action,
        weight_factor,
    })
}
