//! `[[routes]]` in dispatcher.toml → checked routes (`core::RouteSpec`);
//! every refusal names its key (`routes[0].rules[1].use[0]`, ...).
//!
//! ```toml
//! [[routes]]
//! name = "assistant"                      # what a request names as its model
//! candidates = ["gpt-4o", "gpt-4o-mini"]  # models or rollout aliases, preferred first
//! [[routes.rules]]
//! labels = { class = "classify" }         # all must match
//! use = ["gpt-4o-mini"]                   # some of the candidates
//! ```

use super::ConfigError;
use super::ctx::Ctx;
use super::raw::RawRoute;
use super::validate_policy::MAX_POLICY_ITEMS;
use crate::core::{ModelSpec, RolloutSpec, RouteRule, RouteSpec};

/// At most this many labels in one rule.
pub const MAX_RULE_LABELS: usize = 8;

pub(super) fn validate_routes(
    c: &Ctx<'_>,
    routes: Vec<RawRoute>,
    models: &[ModelSpec],
    rollouts: &[RolloutSpec],
) -> Result<Vec<RouteSpec>, ConfigError> {
    if routes.len() > MAX_POLICY_ITEMS {
        return Err(c.err(
            "routes",
            format!("{} entries; at most {MAX_POLICY_ITEMS}", routes.len()),
        ));
    }
    let mut out: Vec<RouteSpec> = Vec::new();
    for (i, r) in routes.into_iter().enumerate() {
        let key = |k: &str| format!("routes[{i}].{k}");
        c.name(&key("name"), &r.name)?;
        if models.iter().any(|m| m.name == r.name) || rollouts.iter().any(|o| o.alias == r.name) {
            return Err(c.err(
                key("name"),
                "is a model's or a rollout alias's name; a route needs a name of its own",
            ));
        }
        if out.iter().any(|o| o.name == r.name) {
            return Err(c.err(key("name"), format!("{:?} is used twice", r.name)));
        }
        if r.candidates.is_empty() || r.candidates.len() > MAX_POLICY_ITEMS {
            return Err(c.err(
                key("candidates"),
                format!("needs 1 to {MAX_POLICY_ITEMS} models or rollout aliases, preferred first"),
            ));
        }
        for (j, m) in r.candidates.iter().enumerate() {
            let k = key(&format!("candidates[{j}]"));
            if !models.iter().any(|x| x.name == *m) && !rollouts.iter().any(|o| o.alias == *m) {
                let known: Vec<_> = models
                    .iter()
                    .map(|x| x.name.as_str())
                    .chain(rollouts.iter().map(|o| o.alias.as_str()))
                    .collect();
                return Err(c.err(
                    k,
                    format!(
                        "unknown model {}; [[models]] and [[rollouts]] declare {}",
                        crate::excerpt::excerpt(m),
                        known.join(", ")
                    ),
                ));
            }
            if r.candidates[..j].contains(m) {
                return Err(c.err(k, format!("{m:?} is listed twice")));
            }
        }
        if r.rules.len() > MAX_POLICY_ITEMS {
            return Err(c.err(key("rules"), format!("at most {MAX_POLICY_ITEMS} rules")));
        }
        let mut rules = Vec::new();
        for (j, rule) in r.rules.into_iter().enumerate() {
            let key = |k: &str| key(&format!("rules[{j}].{k}"));
            if rule.labels.is_empty() || rule.labels.len() > MAX_RULE_LABELS {
                return Err(c.err(
                    key("labels"),
                    format!("needs 1 to {MAX_RULE_LABELS} labels, e.g. {{ class = \"classify\" }}"),
                ));
            }
            for name in rule.labels.keys() {
                c.name(&key(&format!("labels.{name}")), name)?;
            }
            if rule.use_.is_empty() {
                return Err(c.err(key("use"), "names no candidate"));
            }
            for (k, m) in rule.use_.iter().enumerate() {
                if !r.candidates.contains(m) {
                    return Err(c.err(
                        key(&format!("use[{k}]")),
                        format!(
                            "{} is not a candidate of this route ({})",
                            crate::excerpt::excerpt(m),
                            r.candidates.join(", ")
                        ),
                    ));
                }
            }
            rules.push(RouteRule {
                labels: rule.labels.into_iter().collect(),
                candidates: rule.use_,
            });
        }
        out.push(RouteSpec {
            name: r.name,
            candidates: r.candidates,
            rules,
        });
    }
    Ok(out)
}
