//! Raw file contents → checked, typed values. Defaults are filled in here, in
//! one place, and every refusal names its key.

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use super::ctx::Ctx;
use super::raw::{RawAuth, RawDispatcher, RawModel, RawTenant};
use super::{
    AuthConfig, Config, ConfigError, ConnectionLimits, RequestLimits, RetryBudgetConfig, RoutingConfig,
    ServerConfig, TelemetryConfig, TenantConfig,
};
use crate::core::{BreakerConfig, ModelSpec, StrategyKind, StrategyParams, TenantSpec, WeightedLoadParams};

pub const DEFAULT_LISTEN: &str = "127.0.0.1:50051";
pub fn validate_dispatcher(raw: RawDispatcher, file: &Path) -> Result<Config, ConfigError> {
    let c = Ctx { file };
    let mut s = raw.server;
    let tls = super::tls::validate_server_tls(&c, s.tls.take())?;
    let admin_listen = super::tls::validate_admin_listen(&c, s.admin_listen.take())?;
    let listen_text = s.listen.as_deref().unwrap_or(DEFAULT_LISTEN);
    let listen: SocketAddr = listen_text.parse().map_err(|_| {
        c.err(
            "server.listen",
            format!("{listen_text:?} is not an address like \"127.0.0.1:50051\""),
        )
    })?;
    let base = file.parent().unwrap_or(Path::new("."));
    let regions_dir = base.join(s.regions_dir.as_deref().unwrap_or("regions"));
    let server = ServerConfig {
        listen,
        regions_dir,
        max_attempts: c.at_least("server.max_attempts", s.max_attempts, 3, 1)?,
        default_timeout: c.duration(
            "server.default_timeout",
            s.default_timeout.as_deref(),
            Duration::from_secs(60),
        )?,
        shutdown_grace: c.duration(
            "server.shutdown_grace",
            s.shutdown_grace.as_deref(),
            Duration::from_secs(30),
        )?,
        idempotency_window: c.duration(
            "server.idempotency_window",
            s.idempotency_window.as_deref(),
            Duration::from_secs(600),
        )?,
        idempotency_capacity: c.at_least("server.idempotency_capacity", s.idempotency_capacity, 100_000, 1)?
            as usize,
        connections: validate_connections(&c, &s)?,
        admin_listen,
        tls,
    };
    if server.default_timeout.is_zero() {
        return Err(c.err("server.default_timeout", "must be above zero"));
    }

    let r = raw.routing;
    let strategy = match r.strategy.as_deref() {
        None => StrategyKind::default(),
        Some(s) => s.parse().map_err(|e: String| c.err("routing.strategy", e))?,
    };
    let w = r.weighted_load;
    let defaults = WeightedLoadParams::default();
    let latency_ref = c.duration(
        "routing.weighted_load.latency_ref",
        w.latency_ref.as_deref(),
        Duration::from_secs_f64(defaults.latency_ref_ms / 1000.0),
    )?;
    if latency_ref.is_zero() {
        return Err(c.err("routing.weighted_load.latency_ref", "must be above zero"));
    }
    let load_half_life = c.duration(
        "routing.load_half_life",
        r.load_half_life.as_deref(),
        StrategyParams::default().load_half_life,
    )?;
    if load_half_life.is_zero() || load_half_life > Duration::from_secs(3600) {
        return Err(c.err(
            "routing.load_half_life",
            "must be above zero and at most 1h (without decay a region that failed for a while is judged by it for good)",
        ));
    }
    let params = StrategyParams {
        load_half_life,
        weighted_load: WeightedLoadParams {
            headroom_exponent: c.number(
                "routing.weighted_load.headroom_exponent",
                w.headroom_exponent,
                defaults.headroom_exponent,
                0.0,
                10.0,
            )?,
            load_weight: c.number(
                "routing.weighted_load.load_weight",
                w.load_weight,
                defaults.load_weight,
                0.0,
                1.0,
            )?,
            latency_ref_ms: latency_ref.as_secs_f64() * 1000.0,
            error_exponent: c.number(
                "routing.weighted_load.error_exponent",
                w.error_exponent,
                defaults.error_exponent,
                0.0,
                10.0,
            )?,
            locality_bonus: c.number(
                "routing.weighted_load.locality_bonus",
                w.locality_bonus,
                defaults.locality_bonus,
                0.0,
                10.0,
            )?,
        },
    };
    let routing = RoutingConfig {
        strategy,
        params,
        seed: r.seed.unwrap_or(0),
        max_queue_wait: c.duration(
            "routing.max_queue_wait",
            r.max_queue_wait.as_deref(),
            Duration::from_secs(5),
        )?,
        max_queued: c.at_least("routing.max_queued", r.max_queued, 10_000, 1)?,
        breaker: validate_breaker(&c, r.breaker)?,
        retry_budget: validate_retry_budget(&c, r.retry_budget)?,
        overload: validate_overload(&c, r.overload)?,
    };

    let l = raw.limits;
    let d = RequestLimits::default();
    let limits = RequestLimits {
        max_payload_bytes: c.at_least(
            "limits.max_payload_bytes",
            l.max_payload_bytes,
            d.max_payload_bytes as u64,
            1,
        )? as usize,
        max_labels: c.at_least("limits.max_labels", l.max_labels, d.max_labels as u32, 0)? as usize,
        max_label_bytes: c.at_least(
            "limits.max_label_bytes",
            l.max_label_bytes,
            d.max_label_bytes as u32,
            1,
        )? as usize,
        max_request_id_bytes: c.at_least(
            "limits.max_request_id_bytes",
            l.max_request_id_bytes,
            d.max_request_id_bytes as u32,
            1,
        )? as usize,
    };
    if limits.max_payload_bytes > MAX_PAYLOAD_LIMIT {
        return Err(c.err(
            "limits.max_payload_bytes",
            format!(
                "{} is above the hard ceiling of {MAX_PAYLOAD_LIMIT} bytes",
                limits.max_payload_bytes
            ),
        ));
    }

    if raw.models.is_empty() {
        return Err(c.err("models", "declare at least one model ([[models]] with a name)"));
    }
    let mut models: Vec<ModelSpec> = Vec::new();
    let currency = raw.pricing.currency.unwrap_or_else(|| "USD".into());
    c.name("pricing.currency", &currency)?;
    let mut pricing = super::Pricing {
        currency,
        models: Vec::new(),
    };
    for (i, mut m) in raw.models.into_iter().enumerate() {
        if let Some(price) = m.price.take() {
            pricing
                .models
                .push((m.name.clone(), c.price(&format!("models[{i}].price"), price)?));
        }
        let model = validate_model(&c, i, m)?;
        if models.iter().any(|x| x.name == model.name) {
            return Err(c.err(
                format!("models[{i}].name"),
                format!("model {:?} is declared twice", model.name),
            ));
        }
        models.push(model);
    }
    let (auth, tenants) = validate_tenants(&c, raw.auth, raw.tenants, &models)?;
    let admin_token = match raw.admin.token {
        None => None,
        Some(t) => Some(parse_key_hash(&t).ok_or_else(|| {
            c.err(
                "admin.token",
                "must be \"sha256:\" and 64 hex digits, the SHA-256 of the token (never the token itself); \
                 `dispatcher hash-key` prints it",
            )
        })?),
    };
    if admin_token.is_some_and(|h| tenants.iter().any(|t| t.key_hashes.contains(&h))) {
        return Err(c.err("admin.token", "is also a tenant's key; use a separate token"));
    }
    let t = raw.telemetry;
    let otlp_endpoint = match t.otlp_endpoint {
        None => None,
        Some(e) if e.is_empty() => None,
        Some(e) => {
            let uri: tonic::transport::Uri = e.parse().map_err(|_| {
                c.err(
                    "telemetry.otlp_endpoint",
                    format!("{e:?} is not a URI like \"http://127.0.0.1:4317\""),
                )
            })?;
            if !matches!(uri.scheme_str(), Some("http") | Some("https")) {
                return Err(c.err(
                    "telemetry.otlp_endpoint",
                    format!("{e:?} has no http or https scheme"),
                ));
            }
            Some(e)
        }
    };
    let metrics_listen = match t.metrics_listen {
        None => None,
        Some(m) if m.is_empty() => None,
        Some(m) => Some(m.parse().map_err(|_| {
            c.err(
                "telemetry.metrics_listen",
                format!("{m:?} is not an address like \"127.0.0.1:9090\""),
            )
        })?),
    };
    let service_name = t.service_name.unwrap_or_else(|| "dispatcher".into());
    c.name("telemetry.service_name", &service_name)?;
    let cluster = raw
        .cluster
        .map(|k| super::validate_cluster::validate_cluster(&c, k))
        .transpose()?;
    let jobs = super::validate_jobs::validate_jobs(&c, file.parent().unwrap_or(Path::new(".")), raw.jobs)?;
    let cache = super::validate_cache::validate_cache(&c, raw.cache)?;
    let mut policy = super::validate_policy::validate_policy(&c, raw.rollouts, raw.fallbacks, &models)?;
    policy.routes = super::validate_routes::validate_routes(&c, raw.routes, &models, &policy.rollouts)?;
    let openai = super::validate_openai_door::validate_openai_door(&c, raw.openai)?;
    Ok(Config {
        path: file.to_path_buf(),
        server,
        routing,
        limits,
        models,
        auth,
        tenants,
        admin_token,
        admin_open_on_network: raw.admin.allow_open_on_network.unwrap_or(false),
        telemetry: TelemetryConfig {
            otlp_endpoint,
            service_name,
            metrics_listen,
        },
        cluster,
        jobs,
        cache,
        regions: Vec::new(),
        policy,
        pricing,
        openai,
    })
}

pub const DEFAULT_TENANT_MAX_QUEUED: u32 = 1000;

fn validate_tenants(
    c: &Ctx<'_>,
    auth: RawAuth,
    raw: Vec<RawTenant>,
    models: &[ModelSpec],
) -> Result<(AuthConfig, Vec<TenantConfig>), ConfigError> {
    let auth = AuthConfig {
        allow_anonymous: auth.allow_anonymous.unwrap_or(false),
        anonymous_tenant: auth.anonymous_tenant.unwrap_or_else(|| "anonymous".into()),
        allow_anonymous_on_network: auth.allow_anonymous_on_network.unwrap_or(false),
    };
    c.name("auth.anonymous_tenant", &auth.anonymous_tenant)?;
    let mut tenants: Vec<TenantConfig> = Vec::new();
    for (i, t) in raw.into_iter().enumerate() {
        let key = |k: &str| format!("tenants[{i}].{k}");
        c.name(&key("name"), &t.name)?;
        if tenants.iter().any(|x| x.spec.name == t.name) {
            return Err(c.err(key("name"), format!("tenant {:?} is declared twice", t.name)));
        }
        let weight = c.number(&key("weight"), t.weight, 1.0, 0.0, 1e6)?;
        if weight <= 0.0 {
            return Err(c.err(key("weight"), "must be above zero"));
        }
        let positive = |k: &str, v: Option<u64>| -> Result<Option<u64>, ConfigError> {
            match v {
                Some(0) => Err(c.err(key(k), "must be at least 1 (leave it out for no limit)")),
                other => Ok(other),
            }
        };
        if let Some(allowed) = &t.models {
            for (j, m) in allowed.iter().enumerate() {
                if !models.iter().any(|x| x.name == *m) {
                    return Err(c.err(
                        format!("tenants[{i}].models[{j}]"),
                        format!("unknown model {m:?}"),
                    ));
                }
            }
        }
        let mut key_hashes = Vec::new();
        for (j, k) in t.keys.iter().enumerate() {
            let hash = parse_key_hash(k).ok_or_else(|| {
                c.err(
                    format!("tenants[{i}].keys[{j}]"),
                    "must be \"sha256:\" and 64 hex digits, the SHA-256 of the key (never the key itself); \
                     `dispatcher hash-key` prints it",
                )
            })?;
            if let Some(other) = tenants.iter().find(|x| x.key_hashes.contains(&hash)) {
                return Err(c.err(
                    format!("tenants[{i}].keys[{j}]"),
                    format!("the same key is already given to tenant {:?}", other.spec.name),
                ));
            }
            key_hashes.push(hash);
        }
        let identities = super::tls::validate_identities(c, i, t.identities, &tenants)?;
        const MAX_BUDGET: f64 = 1e12;
        let budget = |k: &str, v: Option<f64>| -> Result<Option<u64>, ConfigError> {
            v.map(|v| crate::core::cost::micros_from_amount(v, MAX_BUDGET))
                .transpose()
                .map_err(|e| c.err(key(k), e))
        };
        tenants.push(TenantConfig {
            spec: TenantSpec {
                weight,
                requests_per_second: positive("requests_per_second", t.requests_per_second.map(u64::from))?
                    .map(|v| v as u32),
                tokens_per_minute: positive("tokens_per_minute", t.tokens_per_minute)?,
                max_concurrent: positive("max_concurrent", t.max_concurrent.map(u64::from))?
                    .map(|v| v as u32),
                daily_token_budget: positive("daily_token_budget", t.daily_token_budget)?,
                daily_cost_budget: budget("daily_cost_budget", t.daily_cost_budget)?,
                monthly_cost_budget: budget("monthly_cost_budget", t.monthly_cost_budget)?,
                cost_budget_warn_at: c.number(
                    &key("cost_budget_warn_at"),
                    t.cost_budget_warn_at,
                    0.8,
                    0.0,
                    1.0,
                )?,
                models: t.models,
                max_queued: t.max_queued.unwrap_or(DEFAULT_TENANT_MAX_QUEUED),
                name: t.name,
            },
            key_hashes,
            identities,
        });
    }
    if auth.allow_anonymous && !tenants.iter().any(|t| t.spec.name == auth.anonymous_tenant) {
        tenants.push(TenantConfig {
            spec: TenantSpec {
                name: auth.anonymous_tenant.clone(),
                weight: 1.0,
                requests_per_second: None,
                tokens_per_minute: None,
                max_concurrent: None,
                daily_token_budget: None,
                daily_cost_budget: None,
                monthly_cost_budget: None,
                cost_budget_warn_at: 0.8,
                models: None,
                max_queued: DEFAULT_TENANT_MAX_QUEUED,
            },
            key_hashes: Vec::new(),
            identities: Vec::new(),
        });
    }
    if !auth.allow_anonymous
        && tenants
            .iter()
            .all(|t| t.key_hashes.is_empty() && t.identities.is_empty())
    {
        return Err(c.err(
            "tenants",
            "no tenant has a key or identity and anonymous use is off: nobody could call; add keys or set auth.allow_anonymous = true",
        ));
    }
    Ok((auth, tenants))
}

/// `sha256:<64 hex digits>` → the 32 bytes.
pub fn parse_key_hash(text: &str) -> Option<[u8; 32]> {
    let hex = text.strip_prefix("sha256:")?;
    if hex.len() != 64 {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, byte) in out.iter_mut().enumerate() {
        *byte = u8::from_str_radix(hex.get(2 * i..2 * i + 2)?, 16).ok()?;
    }
    Some(out)
}

/// gRPC messages above this are refused by the transport before they reach us.
pub const MAX_PAYLOAD_LIMIT: usize = 64 << 20;

fn validate_connections(c: &Ctx<'_>, s: &super::raw::RawServer) -> Result<ConnectionLimits, ConfigError> {
    let d = ConnectionLimits::default();
    let positive = |key: &str, value: Option<&str>, default: Duration| {
        let v = c.duration(key, value, default)?;
        if v.is_zero() {
            return Err(c.err(key, "must be above zero"));
        }
        Ok(v)
    };
    let max_connections = c.at_least(
        "server.max_connections",
        s.max_connections,
        d.max_connections as u32,
        1,
    )?;
    let max_connections_per_peer = match s.max_connections_per_peer {
        None => None,
        Some(n) if (1..=max_connections).contains(&n) => Some(n as usize),
        Some(n) => {
            return Err(c.err(
                "server.max_connections_per_peer",
                format!("must be from 1 to server.max_connections ({max_connections}), got {n}; leave it out for no per-address cap"),
            ));
        }
    };
    Ok(ConnectionLimits {
        max_connections: max_connections as usize,
        max_connections_per_peer,
        handshake_timeout: positive(
            "server.handshake_timeout",
            s.handshake_timeout.as_deref(),
            d.handshake_timeout,
        )?,
        body_timeout: positive("server.body_timeout", s.body_timeout.as_deref(), d.body_timeout)?,
        idle_timeout: positive("server.idle_timeout", s.idle_timeout.as_deref(), d.idle_timeout)?,
        keepalive_interval: positive(
            "server.keepalive_interval",
            s.keepalive_interval.as_deref(),
            d.keepalive_interval,
        )?,
        keepalive_timeout: positive(
            "server.keepalive_timeout",
            s.keepalive_timeout.as_deref(),
            d.keepalive_timeout,
        )?,
    })
}

/// `[routing.overload]`: both durations above zero.
fn validate_overload(
    c: &Ctx<'_>,
    o: super::raw::RawOverload,
) -> Result<Option<crate::core::OverloadSettings>, ConfigError> {
    let d = crate::core::OverloadSettings::default();
    let positive = |key: &str, value: Option<String>, default: Duration| {
        let v = c.duration(key, value.as_deref(), default)?;
        if v.is_zero() {
            return Err(c.err(
                key,
                "must be above zero (set enabled = false to turn overload control off)",
            ));
        }
        Ok(v)
    };
    let settings = crate::core::OverloadSettings {
        target: positive("routing.overload.target", o.target, d.target)?,
        interval: positive("routing.overload.interval", o.interval, d.interval)?,
        hold_share: c.number(
            "routing.overload.hold_share",
            o.hold_share,
            d.hold_share,
            0.0,
            1.0,
        )?,
    };
    Ok(o.enabled.unwrap_or(true).then_some(settings))
}

fn validate_breaker(c: &Ctx<'_>, b: super::raw::RawBreaker) -> Result<BreakerConfig, ConfigError> {
    let d = BreakerConfig::default();
    let config = BreakerConfig {
        error_threshold: c.number(
            "routing.breaker.error_threshold",
            b.error_threshold,
            d.error_threshold,
            0.0,
            1.0,
        )?,
        min_requests: c.at_least("routing.breaker.min_requests", b.min_requests, d.min_requests, 1)?,
        window: c.duration("routing.breaker.window", b.window.as_deref(), d.window)?,
        consecutive_failures: c.at_least(
            "routing.breaker.consecutive_failures",
            b.consecutive_failures,
            d.consecutive_failures,
            1,
        )?,
        cool_down: c.duration("routing.breaker.cool_down", b.cool_down.as_deref(), d.cool_down)?,
        half_open_trials: c.at_least(
            "routing.breaker.half_open_trials",
            b.half_open_trials,
            d.half_open_trials,
            1,
        )?,
    };
    if config.window < Duration::from_millis(10) {
        return Err(c.err("routing.breaker.window", "must be at least 10ms"));
    }
    Ok(config)
}

fn validate_retry_budget(
    c: &Ctx<'_>,
    b: super::raw::RawRetryBudget,
) -> Result<RetryBudgetConfig, ConfigError> {
    let d = RetryBudgetConfig::default();
    let config = RetryBudgetConfig {
        ratio: c.number("routing.retry_budget.ratio", b.ratio, d.ratio, 0.0, 10.0)?,
        min_per_second: c.number(
            "routing.retry_budget.min_per_second",
            b.min_per_second,
            d.min_per_second,
            0.0,
            1e6,
        )?,
        window: c.duration("routing.retry_budget.window", b.window.as_deref(), d.window)?,
    };
    if config.window.is_zero() {
        return Err(c.err("routing.retry_budget.window", "must be above zero"));
    }
    Ok(config)
}

fn validate_model(c: &Ctx<'_>, i: usize, m: RawModel) -> Result<ModelSpec, ConfigError> {
    let key = |k: &str| format!("models[{i}].{k}");
    c.name(&key("name"), &m.name)?;
    let default_max_output_tokens = c.at_least(
        &key("default_max_output_tokens"),
        m.default_max_output_tokens,
        1024,
        1,
    )?;
    let max_request_tokens = c.at_least(&key("max_request_tokens"), m.max_request_tokens, 200_000, 2)?;
    if default_max_output_tokens >= max_request_tokens {
        return Err(c.err(
            key("default_max_output_tokens"),
            format!("{default_max_output_tokens} leaves no room for a prompt within max_request_tokens ({max_request_tokens})"),
        ));
    }
    Ok(ModelSpec {
        chars_per_token: c.number(&key("chars_per_token"), m.chars_per_token, 4.0, 0.01, 1000.0)?,
        name: m.name,
        default_max_output_tokens,
        max_request_tokens,
    })
}
