//! `[[rollouts]]` and `[[fallbacks]]` in dispatcher.toml → checked policy;
//! every refusal names its key (`rollouts[0].targets[1].weight`, ...).

use super::ctx::Ctx;
use super::raw::{RawFallback, RawRollout};
use super::{ConfigError, PolicyConfig};
use crate::core::{FallbackSpec, ModelSpec, RolloutSpec, Trigger};

/// At most this many rollouts, chains, and targets or steps in one.
pub const MAX_POLICY_ITEMS: usize = 32;

pub(super) fn validate_policy(
    c: &Ctx<'_>,
    rollouts: Vec<RawRollout>,
    fallbacks: Vec<RawFallback>,
    models: &[ModelSpec],
) -> Result<PolicyConfig, ConfigError> {
    for (key, n) in [("rollouts", rollouts.len()), ("fallbacks", fallbacks.len())] {
        if n > MAX_POLICY_ITEMS {
            return Err(c.err(key, format!("{n} entries; at most {MAX_POLICY_ITEMS}")));
        }
    }
    let model = |key: String, name: &str| -> Result<(), ConfigError> {
        if models.iter().any(|m| m.name == name) {
            return Ok(());
        }
        let known: Vec<_> = models.iter().map(|m| m.name.as_str()).collect();
        Err(c.err(
            key,
            format!(
                "unknown model {}; [[models]] declares {}",
                crate::excerpt::excerpt(name),
                known.join(", ")
            ),
        ))
    };
    let mut out = PolicyConfig::default();
    for (i, r) in rollouts.into_iter().enumerate() {
        let key = |k: &str| format!("rollouts[{i}].{k}");
        c.name(&key("alias"), &r.alias)?;
        if models.iter().any(|m| m.name == r.alias) {
            return Err(c.err(
                key("alias"),
                "is a model's name; an alias needs a name of its own",
            ));
        }
        if out.rollouts.iter().any(|o| o.alias == r.alias) {
            return Err(c.err(key("alias"), format!("{:?} is used twice", r.alias)));
        }
        if let Some(l) = &r.session_label {
            c.name(&key("session_label"), l)?;
        }
        if r.targets.is_empty() || r.targets.len() > MAX_POLICY_ITEMS {
            return Err(c.err(
                key("targets"),
                format!("needs 1 to {MAX_POLICY_ITEMS} targets ({{ model = \"...\", weight = 90 }})"),
            ));
        }
        let mut targets: Vec<(String, f64)> = Vec::new();
        for (j, t) in r.targets.into_iter().enumerate() {
            model(key(&format!("targets[{j}].model")), &t.model)?;
            if targets.iter().any(|(m, _)| *m == t.model) {
                return Err(c.err(
                    key(&format!("targets[{j}].model")),
                    format!("{:?} is listed twice", t.model),
                ));
            }
            let w = c.number(
                &key(&format!("targets[{j}].weight")),
                Some(t.weight),
                0.0,
                0.0,
                1e6,
            )?;
            targets.push((t.model, w));
        }
        if targets.iter().all(|(_, w)| *w <= 0.0) {
            return Err(c.err(key("targets"), "at least one target needs a weight above 0"));
        }
        out.rollouts.push(RolloutSpec {
            alias: r.alias,
            session_label: r.session_label,
            targets,
        });
    }
    for (i, f) in fallbacks.into_iter().enumerate() {
        let key = |k: &str| format!("fallbacks[{i}].{k}");
        model(key("model"), &f.model)?;
        if out.fallbacks.iter().any(|o| o.model == f.model) {
            return Err(c.err(key("model"), format!("{:?} has two chains", f.model)));
        }
        if f.then.is_empty() || f.then.len() > MAX_POLICY_ITEMS {
            return Err(c.err(
                key("then"),
                format!("needs 1 to {MAX_POLICY_ITEMS} models to fall back to, in order"),
            ));
        }
        for (j, m) in f.then.iter().enumerate() {
            model(key(&format!("then[{j}]")), m)?;
            if *m == f.model || f.then[..j].contains(m) {
                return Err(c.err(
                    key(&format!("then[{j}]")),
                    format!("{m:?} is already in the chain"),
                ));
            }
        }
        let on = match f.on {
            None => Trigger::ALL.to_vec(),
            Some(names) => {
                let mut on = Vec::new();
                for (j, n) in names.iter().enumerate() {
                    let t = Trigger::parse(n).ok_or_else(|| {
                        c.err(
                            key(&format!("on[{j}]")),
                            format!(
                                "unknown trigger {}; expected no_quota, unavailable, too_large or first_byte_timeout",
                                crate::excerpt::excerpt(n)
                            ),
                        )
                    })?;
                    if !on.contains(&t) {
                        on.push(t);
                    }
                }
                if on.is_empty() {
                    return Err(c.err(key("on"), "lists no trigger: the chain would never be used"));
                }
                on
            }
        };
        let first_byte_timeout = match f.first_byte_timeout.as_deref() {
            None => None,
            Some(s) => Some(c.duration(&key("first_byte_timeout"), Some(s), Default::default())?),
        };
        if on.contains(&Trigger::FirstByteTimeout) && first_byte_timeout.is_some_and(|d| d.is_zero()) {
            return Err(c.err(key("first_byte_timeout"), "must be above zero"));
        }
        out.fallbacks.push(FallbackSpec {
            model: f.model,
            then: f.then,
            on,
            first_byte_timeout,
        });
    }
    if let Some((i, j, models)) = fallback_loop(&out.fallbacks) {
        return Err(c.err(
            format!("fallbacks[{i}].then[{j}]"),
            format!("closes a loop of fallback chains: {}", models.join(" → ")),
        ));
    }
    Ok(out)
}

/// A loop through the chains (A falls back to B, whose own chain falls
/// back to A): the chain and step that close it, and the models around it
/// (the first repeated at the end). A chain naming its own model is
/// refused before this, as a step already in the chain.
fn fallback_loop(chains: &[FallbackSpec]) -> Option<(usize, usize, Vec<String>)> {
    fn visit<'a>(
        chains: &'a [FallbackSpec],
        model: &'a str,
        path: &mut Vec<&'a str>,
        done: &mut Vec<&'a str>,
    ) -> Option<(usize, usize, Vec<String>)> {
        let i = chains.iter().position(|f| f.model == model)?;
        path.push(model);
        for (j, next) in chains[i].then.iter().enumerate() {
            if let Some(at) = path.iter().position(|m| m == next) {
                let mut around: Vec<String> = path[at..].iter().map(|m| m.to_string()).collect();
                around.push(next.clone());
                return Some((i, j, around));
            }
            if !done.contains(&next.as_str())
                && let Some(found) = visit(chains, next, path, done)
            {
                return Some(found);
            }
        }
        path.pop();
        done.push(model);
        None
    }
    let mut done = Vec::new();
    for f in chains {
        if !done.contains(&f.model.as_str()) {
            let found = visit(chains, &f.model, &mut Vec::new(), &mut done);
            if found.is_some() {
                return found;
            }
        }
    }
    None
}
