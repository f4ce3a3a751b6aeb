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
