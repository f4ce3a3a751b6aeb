//! A region file's contents → a checked `RegionConfig`: its quotas per
//! model, endpoint, health checks and simulation; every refusal names its key.

use std::path::Path;
use std::time::Duration;

use super::ctx::Ctx;
use super::raw::{RawHealth, RawRegion, RawRegionModel, RawSimulate};
use super::{ConfigError, HealthConfig, RegionConfig, SimulateConfig};
use crate::core::{Accounting, ModelLimits, ModelSpec, RegionSpec};

pub fn validate_region(
    mut raw: RawRegion,
    file: &Path,
    models: &[ModelSpec],
) -> Result<RegionConfig, ConfigError> {
    let c = Ctx { file };
    let stem = file.file_stem().and_then(|s| s.to_str()).unwrap_or_default();
    let name = raw.name.take().unwrap_or_else(|| stem.to_string());
    c.name("name", &name)?;
    let weight = c.number("weight", raw.weight, 1.0, 0.0, 1e6)?;
    if weight <= 0.0 {
        return Err(c.err(
            "weight",
            "must be above zero (drain a region to stop sending it work)",
        ));
    }
    let max_concurrent = c.at_least("max_concurrent", raw.max_concurrent, 256, 1)?;
    if raw.models.is_empty() {
        return Err(c.err("models", "a region must serve at least one model ([[models]])"));
    }
    let mut limits: Vec<(String, ModelLimits)> = Vec::new();
    let mut prices = Vec::new();
    let mut provider_models = Vec::new();
    for (i, mut m) in std::mem::take(&mut raw.models).into_iter().enumerate() {
        let price = m.price.take();
        let provider_model = m.provider_model.take();
        let (model, l) = validate_region_model(&c, i, m, models)?;
        if let Some(price) = price {
            prices.push((model.clone(), c.price(&format!("models[{i}].price"), price)?));
        }
        if limits.iter().any(|(n, _)| *n == model) {
            return Err(c.err(
                format!("models[{i}].name"),
                format!("model {model:?} is listed twice"),
            ));
        }
        provider_models.push((i, model.clone(), provider_model));
        limits.push((model, l));
    }
    let openai = super::validate_openai_region::validate_openai(&c, &mut raw, provider_models)?;
    let endpoint = match raw.endpoint {
        None => None,
        Some(e) => Some(validate_endpoint(&c, e)?),
    };
    let uri = endpoint
        .as_deref()
        .and_then(|e| e.parse::<tonic::transport::Uri>().ok());
    let tls = super::tls::validate_region_tls(&c, raw.tls, uri.as_ref())?;
    let simulate = raw.simulate.map(|s| validate_simulate(&c, s)).transpose()?;
    let capacity = super::validate_capacity::validate_capacity(&c, &name, raw.capacity, &limits)?;
    if endpoint.is_none() && simulate.is_none() {
        return Err(c.err(
            "endpoint",
            "missing: give the cluster's address (\"http://host:port\") or a [simulate] table",
        ));
    }
    Ok(RegionConfig {
        file: file.to_path_buf(),
        spec: RegionSpec {
            name,
            weight,
            max_concurrent,
            models: limits,
        },
        endpoint,
        health: validate_health(&c, raw.health)?,
        simulate,
        tls,
        capacity,
        prices,
        openai,
    })
}

fn validate_region_model(
    c: &Ctx<'_>,
    i: usize,
    m: RawRegionModel,
    models: &[ModelSpec],
) -> Result<(String, ModelLimits), ConfigError> {
    let key = |k: &str| format!("models[{i}].{k}");
    if !models.iter().any(|x| x.name == m.name) {
        let known: Vec<_> = models.iter().map(|x| x.name.as_str()).collect();
        return Err(c.err(
            key("name"),
            format!(
                "unknown model {:?}; dispatcher.toml declares {}",
                m.name,
                known.join(", ")
            ),
        ));
    }
    let accounting = match m.accounting.as_deref() {
        None | Some("admission") => Accounting::Admission,
        Some("usage") => Accounting::Usage,
        Some(other) => {
            return Err(c.err(
                key("accounting"),
                format!("{other:?} is not an accounting mode; expected \"admission\" or \"usage\""),
            ));
        }
    };
    let positive = |k: &str, v: Option<u64>| -> Result<Option<u64>, ConfigError> {
        match v {
            Some(0) => Err(c.err(key(k), "must be at least 1")),
            other => Ok(other),
        }
    };
    let limits = ModelLimits {
        tokens_per_minute: positive("tokens_per_minute", Some(m.tokens_per_minute))?.unwrap_or(1),
        requests_per_minute: positive("requests_per_minute", Some(m.requests_per_minute))?.unwrap_or(1),
        burst_tokens: positive("burst_tokens", m.burst_tokens)?,
        burst_requests: positive("burst_requests", m.burst_requests)?,
        accounting,
    };
    const MAX_RATE: u64 = 1 << 40;
    if limits.tokens_per_minute > MAX_RATE || limits.burst_tokens.unwrap_or(0) > MAX_RATE {
        return Err(c.err(
            key("tokens_per_minute"),
            format!("above the supported maximum of {MAX_RATE}"),
        ));
    }
    if limits.requests_per_minute > MAX_RATE || limits.burst_requests.unwrap_or(0) > MAX_RATE {
        return Err(c.err(
            key("requests_per_minute"),
            format!("above the supported maximum of {MAX_RATE}"),
        ));
    }
    Ok((m.name, limits))
}

fn validate_endpoint(c: &Ctx<'_>, e: String) -> Result<String, ConfigError> {
    let bad = |why: &str| {
        c.err(
            "endpoint",
            format!("{e:?} {why}; expected \"http://host:port\" or \"https://host:port\""),
        )
    };
    let uri: tonic::transport::Uri = e.parse().map_err(|_| bad("is not a URI"))?;
    if !matches!(uri.scheme_str(), Some("http" | "https")) {
        return Err(bad("has no http or https scheme"));
    }
    if uri.host().is_none() {
        return Err(bad("has no host"));
    }
    Ok(e)
}

fn validate_health(c: &Ctx<'_>, h: RawHealth) -> Result<HealthConfig, ConfigError> {
    let d = HealthConfig::default();
    let health = HealthConfig {
        interval: c.duration("health.interval", h.interval.as_deref(), d.interval)?,
        timeout: c.duration("health.timeout", h.timeout.as_deref(), d.timeout)?,
        unhealthy_threshold: c.at_least(
            "health.unhealthy_threshold",
            h.unhealthy_threshold,
            d.unhealthy_threshold,
            1,
        )?,
        healthy_threshold: c.at_least(
            "health.healthy_threshold",
            h.healthy_threshold,
            d.healthy_threshold,
            1,
        )?,
    };
    if health.interval < Duration::from_millis(50) {
        return Err(c.err("health.interval", "must be at least 50ms"));
    }
    if health.timeout.is_zero() {
        return Err(c.err("health.timeout", "must be above zero"));
    }
    Ok(health)
}

fn validate_simulate(c: &Ctx<'_>, s: RawSimulate) -> Result<SimulateConfig, ConfigError> {
    let d = SimulateConfig::default();
    Ok(SimulateConfig {
        ms_per_1k_tokens: c.number(
            "simulate.ms_per_1k_tokens",
            s.ms_per_1k_tokens,
            d.ms_per_1k_tokens,
            0.0,
            600_000.0,
        )?,
        base_latency_ms: c.number(
            "simulate.base_latency_ms",
            s.base_latency_ms,
            d.base_latency_ms,
            0.0,
            600_000.0,
        )?,
        failure_rate: c.number("simulate.failure_rate", s.failure_rate, d.failure_rate, 0.0, 1.0)?,
        completion_min_fraction: c.number(
            "simulate.completion_min_fraction",
            s.completion_min_fraction,
            d.completion_min_fraction,
            0.0,
            1.0,
        )?,
        seed: s.seed.unwrap_or(d.seed),
        foreign_tokens_per_minute: s.foreign_tokens_per_minute.unwrap_or(0),
        capacity: c.at_least("simulate.capacity", s.capacity, d.capacity, 1)?,
        start_empty: s.start_empty.unwrap_or(d.start_empty),
    })
}
