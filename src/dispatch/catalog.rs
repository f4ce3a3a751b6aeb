//! What a tenant may name as its model: the configured models its `models`
//! list allows (all of them without one) and the rollout aliases whose
//! every target it may use. Front doors that list models (OpenAI's `GET
//! /v1/models`) read it, and tell an unknown model (404 there) from
//! another bad field. Built with each configuration snapshot, read-only.

use std::collections::HashMap;

use super::auth::Caller;
use super::{DispatchError, Engine};
use crate::config::Config;

/// One name a tenant may send as its model.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CatalogEntry {
    pub id: String,
    /// A rollout alias: the models it sends to; empty for a model.
    pub targets: Vec<String>,
}

#[derive(Debug, Default)]
pub struct Catalog {
    models: Vec<String>,
    aliases: Vec<CatalogEntry>,
    /// Tenants with a `models` list, and the list.
    allowed: HashMap<String, Vec<String>>,
}

impl Catalog {
    pub fn from_config(c: &Config) -> Self {
        Self {
            models: c.models.iter().map(|m| m.name.clone()).collect(),
            aliases: c
                .policy
                .rollouts
                .iter()
                .map(|r| CatalogEntry {
                    id: r.alias.clone(),
                    targets: r.targets.iter().map(|(m, _)| m.clone()).collect(),
                })
                .collect(),
            allowed: c
                .tenants
                .iter()
                .filter_map(|t| Some((t.spec.name.clone(), t.spec.models.clone()?)))
                .collect(),
        }
    }

    /// The models, then the aliases, `tenant` may use, in config order.
    pub fn for_tenant(&self, tenant: &str) -> Vec<CatalogEntry> {
        let allowed = self.allowed.get(tenant);
        let may = |m: &String| allowed.is_none_or(|a| a.contains(m));
        let models = self.models.iter().filter(|m| may(m)).map(|m| CatalogEntry {
            id: m.clone(),
            targets: Vec::new(),
        });
        let aliases = self.aliases.iter().filter(|a| a.targets.iter().all(may)).cloned();
        models.chain(aliases).collect()
    }

    /// Whether `name` is a configured model or rollout alias (anyone's).
    pub fn knows(&self, name: &str) -> bool {
        self.models.iter().any(|m| m == name) || self.aliases.iter().any(|a| a.id == name)
    }
}

impl Engine {
    /// The models and aliases the caller's tenant may use.
    pub fn models_for(&self, caller: &Caller) -> Result<Vec<CatalogEntry>, DispatchError> {
        let config = self.front.snapshot();
        let tenant = config.authenticate(caller)?;
        Ok(config.catalog.for_tenant(&tenant))
    }

    /// Whether `name` is a configured model or rollout alias.
    pub fn knows_model(&self, name: &str) -> bool {
        self.front.snapshot().catalog.knows(name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(id: &str, targets: &[&str]) -> CatalogEntry {
        CatalogEntry {
            id: id.into(),
            targets: targets.iter().map(|t| t.to_string()).collect(),
        }
    }

    #[test]
    fn a_tenant_sees_what_it_may_use() {
        let c = Catalog {
            models: vec!["big".into(), "small".into()],
            aliases: vec![entry("chat", &["big", "small"]), entry("cheap", &["small"])],
            allowed: [("limited".to_string(), vec!["small".to_string()])].into(),
        };
        let ids = |t: &str| c.for_tenant(t).into_iter().map(|e| e.id).collect::<Vec<_>>();
        assert_eq!(ids("anyone"), ["big", "small", "chat", "cheap"]);
        assert_eq!(
            ids("limited"),
            ["small", "cheap"],
            "an alias with a target it may not use is left out"
        );
        assert!(c.knows("chat") && c.knows("big") && !c.knows("gpt-9"));
    }
}
