//! The OpenAI-compatible part of a region file (`kind = "openai"`): the
//! dialect, the API key (read from the environment or a file here, never
//! written in the region file), each model's name at the provider and the
//! health check's path. Every refusal names the file and key; none shows a
//! key.

use std::path::Path;

use super::ConfigError;
use super::ctx::Ctx;
use super::raw::RawRegion;
use crate::openai::Dialect;
use crate::openai::key::ApiKey;

/// Azure OpenAI's `api-version` when the region file names none: the
/// current generally available one.
pub const DEFAULT_AZURE_API_VERSION: &str = "2024-10-21";

/// An OpenAI-compatible region: how the forwarder talks to it.
#[derive(Debug, Clone, PartialEq)]
pub struct OpenAiRegion {
    pub dialect: Dialect,
    /// Azure's `api-version` query parameter.
    pub api_version: String,
    pub key: ApiKey,
    /// Each configured model and its name at the provider (Azure: the
    /// deployment).
    pub models: Vec<(String, String)>,
    /// What the health checks GET (path and query, from the endpoint's
    /// base).
    pub health_path: String,
    /// Whether the health check also checks that every provider model is
    /// listed (OpenAI's `/v1/models`; Azure lists models, not deployments).
    pub health_lists_models: bool,
}

impl OpenAiRegion {
    /// The provider's name for `model`, if this region serves it.
    pub fn provider_model(&self, model: &str) -> Option<&str> {
        self.models
            .iter()
            .find(|(m, _)| m == model)
            .map(|(_, p)| p.as_str())
    }
}

/// The keys only an OpenAI-compatible region may set, for the error when
/// another kind sets one.
fn set_openai_keys(raw: &RawRegion) -> Option<&'static str> {
    [
        ("dialect", raw.dialect.is_some()),
        ("api_version", raw.api_version.is_some()),
        ("api_key_env", raw.api_key_env.is_some()),
        ("api_key_file", raw.api_key_file.is_some()),
        ("health_path", raw.health_path.is_some()),
    ]
    .into_iter()
    .find_map(|(k, set)| set.then_some(k))
}

/// Reads the region's kind and, for `openai`, its settings.
/// `provider_models` are the `[[models]]` with their `provider_model`
/// (index, model, provider name).
pub(super) fn validate_openai(
    c: &Ctx<'_>,
    raw: &mut RawRegion,
    provider_models: Vec<(usize, String, Option<String>)>,
) -> Result<Option<OpenAiRegion>, ConfigError> {
    match raw.kind.as_deref() {
        None | Some("agent_cluster") => {
            if let Some(key) = set_openai_keys(raw) {
                return Err(c.err(key, "is only for kind = \"openai\""));
            }
            if let Some((i, _, _)) = provider_models.iter().find(|(_, _, p)| p.is_some()) {
                return Err(c.err(
                    format!("models[{i}].provider_model"),
                    "is only for kind = \"openai\"",
                ));
            }
            return Ok(None);
        }
        Some("openai") => {}
        Some(other) => {
            return Err(c.err(
                "kind",
                format!(
                    "{:?} is not a region kind; expected \"agent_cluster\" or \"openai\"",
                    crate::excerpt::excerpt(other)
                ),
            ));
        }
    }
    if raw.simulate.is_some() {
        return Err(c.err(
            "simulate",
            "an OpenAI-compatible region is not simulated in-process; run `region-sim --openai` and give its endpoint",
        ));
    }
    let Some(endpoint) = raw.endpoint.as_deref() else {
        return Err(c.err(
            "endpoint",
            "missing: give the provider's base URL (\"https://NAME.openai.azure.com\", \"http://host:port\")",
        ));
    };
    if endpoint.trim_end_matches('/').ends_with("/v1") {
        return Err(c.err(
            "endpoint",
            "give the base URL without /v1: the dispatcher adds /v1/chat/completions (OpenAI) or /openai/deployments/… (Azure)",
        ));
    }
    if endpoint.contains('?') {
        return Err(c.err("endpoint", "must not carry a query"));
    }
    let dialect = match raw.dialect.as_deref() {
        None => Dialect::OpenAi,
        Some(d) => Dialect::parse(d).ok_or_else(|| {
            c.err(
                "dialect",
                format!(
                    "{:?} is not a dialect; expected \"openai\" or \"azure\"",
                    crate::excerpt::excerpt(d)
                ),
            )
        })?,
    };
    let api_version = match (dialect, raw.api_version.take()) {
        (Dialect::Azure, None) => DEFAULT_AZURE_API_VERSION.to_string(),
        (Dialect::Azure, Some(v)) => {
            let ok =
                !v.is_empty() && v.len() <= 64 && v.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-');
            if !ok {
                return Err(c.err("api_version", "must be a version like \"2024-10-21\""));
            }
            v
        }
        (Dialect::OpenAi, None) => String::new(),
        (Dialect::OpenAi, Some(_)) => return Err(c.err("api_version", "is only for dialect = \"azure\"")),
    };
    let key = read_key(c, raw.api_key_env.take(), raw.api_key_file.take())?;
    let mut models = Vec::with_capacity(provider_models.len());
    for (i, model, provider) in provider_models {
        let provider = provider.unwrap_or_else(|| model.clone());
        let ok = !provider.is_empty()
            && provider.len() <= 256
            && provider
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"-_.:".contains(&b));
        if !ok {
            return Err(c.err(
                format!("models[{i}].provider_model"),
                "must be a model or deployment name (letters, digits, - _ . :), at most 256 bytes",
            ));
        }
        models.push((model, provider));
    }
    let (health_path, health_lists_models) = match raw.health_path.take() {
        Some(p) if !p.starts_with('/') || p.parse::<http::uri::PathAndQuery>().is_err() => {
            return Err(c.err(
                "health_path",
                "must be a path starting with /, like \"/v1/models\"",
            ));
        }
        Some(p) => (p, false),
        None => match dialect {
            Dialect::OpenAi => ("/v1/models".to_string(), true),
            Dialect::Azure => (format!("/openai/models?api-version={api_version}"), false),
        },
    };
    Ok(Some(OpenAiRegion {
        dialect,
        api_version,
        key,
        models,
        health_path,
        health_lists_models,
    }))
}

/// The key from the environment variable or the file the region names
/// (relative to the region file's folder): exactly one of them.
fn read_key(c: &Ctx<'_>, env: Option<String>, file: Option<String>) -> Result<ApiKey, ConfigError> {
    match (env, file) {
        (Some(_), Some(_)) => Err(c.err("api_key_file", "give api_key_env or api_key_file, not both")),
        (None, None) => Err(c.err(
            "api_key_env",
            "missing: name the environment variable (api_key_env) or the file (api_key_file) holding the API key; the key itself never goes in a region file",
        )),
        (Some(var), None) => {
            let text = std::env::var(&var).map_err(|_| {
                c.err(
                    "api_key_env",
                    format!(
                        "the environment variable {} is not set (or not UTF-8)",
                        crate::excerpt::excerpt(&var)
                    ),
                )
            })?;
            ApiKey::new(&text).map_err(|e| {
                c.err(
                    "api_key_env",
                    format!("the environment variable {}: {e}", crate::excerpt::excerpt(&var)),
                )
            })
        }
        (None, Some(path)) => {
            let base = c.file.parent().unwrap_or(Path::new("."));
            let path = base.join(path);
            let text = std::fs::read_to_string(&path).map_err(|e| {
                c.err(
                    "api_key_file",
                    format!("cannot read {}: {}", path.display(), e.kind()),
                )
            })?;
            ApiKey::new(&text)
                .map_err(|e| c.err("api_key_file", format!("{}: {e}", path.display())))
        }
    }
}
