//! What changed between two configurations, in words an operator reads in a
//! log line or a `ReloadConfig` answer.

use std::fmt;

use super::{Config, RegionConfig};

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ChangeKind {
    Added,
    Removed,
    Changed,
}

/// One change: what (`region eu-west-1`) and, for changes, how
/// (`gpt-4o.tokens_per_minute: 1000000 → 500000`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Change {
    pub kind: ChangeKind,
    pub subject: String,
    pub details: Vec<String>,
}

impl fmt::Display for Change {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.kind {
            ChangeKind::Added => write!(f, "added {}", self.subject),
            ChangeKind::Removed => write!(f, "removed {}", self.subject),
            ChangeKind::Changed => write!(f, "changed {}: {}", self.subject, self.details.join(", ")),
        }
    }
}

fn field<T: PartialEq + fmt::Debug>(out: &mut Vec<String>, name: &str, old: &T, new: &T) {
    if old != new {
        out.push(format!("{name}: {old:?} → {new:?}"));
    }
}

fn region_details(old: &RegionConfig, new: &RegionConfig) -> Vec<String> {
    let mut d = Vec::new();
    field(&mut d, "endpoint", &old.endpoint, &new.endpoint);
    // Its Debug shows no key: a changed key reads as the same text.
    if old.openai != new.openai {
        d.push("OpenAI settings (kind, dialect, key, provider models)".into());
    }
    field(&mut d, "weight", &old.spec.weight, &new.spec.weight);
    field(
        &mut d,
        "max_concurrent",
        &old.spec.max_concurrent,
        &new.spec.max_concurrent,
    );
    for (model, l) in &new.spec.models {
        match old.spec.models.iter().find(|(m, _)| m == model) {
            None => d.push(format!("model {model} added")),
            Some((_, o)) => {
                field(
                    &mut d,
                    &format!("{model}.tokens_per_minute"),
                    &o.tokens_per_minute,
                    &l.tokens_per_minute,
                );
                field(
                    &mut d,
                    &format!("{model}.requests_per_minute"),
                    &o.requests_per_minute,
                    &l.requests_per_minute,
                );
                field(
                    &mut d,
                    &format!("{model}.burst_tokens"),
                    &o.burst_tokens,
                    &l.burst_tokens,
                );
                field(
                    &mut d,
                    &format!("{model}.burst_requests"),
                    &o.burst_requests,
                    &l.burst_requests,
                );
                field(
                    &mut d,
                    &format!("{model}.accounting"),
                    &o.accounting,
                    &l.accounting,
                );
            }
        }
    }
    for (model, _) in &old.spec.models {
        if !new.spec.models.iter().any(|(m, _)| m == model) {
            d.push(format!("model {model} removed"));
        }
    }
    if old.health != new.health {
        d.push(format!("health: {:?} → {:?}", old.health, new.health));
    }
    if old.simulate != new.simulate {
        d.push("simulate settings (apply to a newly started simulation only)".into());
    }
    if old.capacity != new.capacity {
        d.push(format!(
            "capacity rules ({} → {})",
            old.capacity.len(),
            new.capacity.len()
        ));
    }
    d
}

/// Region changes between `old` and `new`, in name order.
pub fn region_changes(old: &Config, new: &Config) -> Vec<Change> {
    let mut changes = Vec::new();
    for r in &new.regions {
        match old.region(&r.spec.name) {
            None => changes.push(Change {
                kind: ChangeKind::Added,
                subject: format!("region {}", r.spec.name),
                details: Vec::new(),
            }),
            Some(o) => {
                let details = region_details(o, r);
                if !details.is_empty() {
                    changes.push(Change {
                        kind: ChangeKind::Changed,
                        subject: format!("region {}", r.spec.name),
                        details,
                    });
                }
            }
        }
    }
    for r in &old.regions {
        if new.region(&r.spec.name).is_none() {
            changes.push(Change {
                kind: ChangeKind::Removed,
                subject: format!("region {}", r.spec.name),
                details: Vec::new(),
            });
        }
    }
    changes.sort_by(|a, b| a.subject.cmp(&b.subject));
    changes
}

fn changed(subject: &str, details: Vec<String>) -> Option<Change> {
    (!details.is_empty()).then(|| Change {
        kind: ChangeKind::Changed,
        subject: subject.to_string(),
        details,
    })
}

/// Every change between `old` and `new`: server, routing, limits, models,
/// auth, tenants and regions. Secrets are reported as changed, never shown.
pub fn changes(old: &Config, new: &Config) -> Vec<Change> {
    let mut out = Vec::new();
    let mut d = Vec::new();
    field(&mut d, "listen", &old.server.listen, &new.server.listen);
    field(
        &mut d,
        "max_attempts",
        &old.server.max_attempts,
        &new.server.max_attempts,
    );
    field(
        &mut d,
        "default_timeout",
        &old.server.default_timeout,
        &new.server.default_timeout,
    );
    field(
        &mut d,
        "shutdown_grace",
        &old.server.shutdown_grace,
        &new.server.shutdown_grace,
    );
    field(
        &mut d,
        "regions_dir",
        &old.server.regions_dir,
        &new.server.regions_dir,
    );
    out.extend(changed("server", d));
    let mut d = Vec::new();
    field(&mut d, "strategy", &old.routing.strategy, &new.routing.strategy);
    field(&mut d, "params", &old.routing.params, &new.routing.params);
    field(&mut d, "seed", &old.routing.seed, &new.routing.seed);
    field(
        &mut d,
        "max_queue_wait",
        &old.routing.max_queue_wait,
        &new.routing.max_queue_wait,
    );
    field(
        &mut d,
        "max_queued",
        &old.routing.max_queued,
        &new.routing.max_queued,
    );
    field(&mut d, "overload", &old.routing.overload, &new.routing.overload);
    out.extend(changed("routing", d));
    let mut d = Vec::new();
    field(&mut d, "rollouts", &old.policy.rollouts, &new.policy.rollouts);
    field(&mut d, "fallbacks", &old.policy.fallbacks, &new.policy.fallbacks);
    field(&mut d, "routes", &old.policy.routes, &new.policy.routes);
    out.extend(changed("policy", d));
    let mut d = Vec::new();
    field(&mut d, "limits", &old.limits, &new.limits);
    out.extend(changed("limits", d));
    let mut d = Vec::new();
    field(
        &mut d,
        "allow_anonymous",
        &old.auth.allow_anonymous,
        &new.auth.allow_anonymous,
    );
    field(
        &mut d,
        "anonymous_tenant",
        &old.auth.anonymous_tenant,
        &new.auth.anonymous_tenant,
    );
    if old.admin_token != new.admin_token {
        d.push("admin token changed".into());
    }
    out.extend(changed("auth", d));
    let mut d = Vec::new();
    field(&mut d, "telemetry", &old.telemetry, &new.telemetry);
    out.extend(changed("telemetry", d));
    let mut d = Vec::new();
    field(&mut d, "cache", &old.cache, &new.cache);
    out.extend(changed("cache", d));
    for m in &new.models {
        match old.models.iter().find(|o| o.name == m.name) {
            None => out.push(Change {
                kind: ChangeKind::Added,
                subject: format!("model {}", m.name),
                details: Vec::new(),
            }),
            Some(o) if o != m => out.extend(changed(
                &format!("model {}", m.name),
                vec![format!("{o:?} → {m:?}")],
            )),
            Some(_) => {}
        }
    }
    for o in &old.models {
        if !new.models.iter().any(|m| m.name == o.name) {
            out.push(Change {
                kind: ChangeKind::Removed,
                subject: format!("model {}", o.name),
                details: Vec::new(),
            });
        }
    }
    for t in &new.tenants {
        match old.tenants.iter().find(|o| o.spec.name == t.spec.name) {
            None => out.push(Change {
                kind: ChangeKind::Added,
                subject: format!("tenant {}", t.spec.name),
                details: Vec::new(),
            }),
            Some(o) => {
                let (a, b) = (&o.spec, &t.spec);
                let mut d = Vec::new();
                field(&mut d, "weight", &a.weight, &b.weight);
                field(
                    &mut d,
                    "requests_per_second",
                    &a.requests_per_second,
                    &b.requests_per_second,
                );
                field(
                    &mut d,
                    "tokens_per_minute",
                    &a.tokens_per_minute,
                    &b.tokens_per_minute,
                );
                field(&mut d, "max_concurrent", &a.max_concurrent, &b.max_concurrent);
                field(
                    &mut d,
                    "daily_token_budget",
                    &a.daily_token_budget,
                    &b.daily_token_budget,
                );
                field(&mut d, "models", &a.models, &b.models);
                field(&mut d, "max_queued", &a.max_queued, &b.max_queued);
                if o.key_hashes != t.key_hashes {
                    d.push(format!("keys: {} → {}", o.key_hashes.len(), t.key_hashes.len()));
                }
                out.extend(changed(&format!("tenant {}", t.spec.name), d));
            }
        }
    }
    for o in &old.tenants {
        if !new.tenants.iter().any(|t| t.spec.name == o.spec.name) {
            out.push(Change {
                kind: ChangeKind::Removed,
                subject: format!("tenant {}", o.spec.name),
                details: Vec::new(),
            });
        }
    }
    out.extend(region_changes(old, new));
    out
}
