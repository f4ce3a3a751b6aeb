//! `[jobs]`: where jobs are kept and how many (DESIGN §11, README "Jobs").
//!
//! Where: `redis_url` (or `redis_sentinels` with `master_name`) puts them
//! in a Redis of their own, one that keeps an AOF, with or without
//! `[cluster]` (docs/SCALING.md, "Which Redis for what"); without it they
//! go to `[cluster]`'s Redis if there is one, else to the embedded store
//! in `data_dir`.

use std::path::Path;
use std::time::Duration;

use super::ctx::Ctx;
use super::raw::RawJobs;
use super::{ConfigError, JobsConfig};
use crate::core::JobLimits;

/// `[jobs] redis_timeout` unless given: a Submit waits for its write, and a
/// Redis writing an AOF may take longer than the quota's (a slow fsync);
/// one that is down refuses the connection at once anyway.
const REDIS_TIMEOUT: Duration = Duration::from_secs(1);

pub(super) fn validate_jobs(c: &Ctx<'_>, base: &Path, j: RawJobs) -> Result<JobsConfig, ConfigError> {
    let data_dir = match j.data_dir.as_deref() {
        Some("") => {
            return Err(c.err(
                "jobs.data_dir",
                "is empty; name a directory (relative paths are read from dispatcher.toml's)",
            ));
        }
        Some(d) => base.join(d),
        None => base.join("data"),
    };
    let ttl = c.duration("jobs.ttl", j.ttl.as_deref(), Duration::from_secs(600))?;
    if ttl < Duration::from_secs(1) {
        return Err(c.err("jobs.ttl", "must be at least 1s"));
    }
    let timeout = c.duration("jobs.timeout", j.timeout.as_deref(), Duration::from_secs(3600))?;
    if timeout < Duration::from_millis(100) {
        return Err(c.err("jobs.timeout", "must be at least 100ms"));
    }
    let lease = c.duration("jobs.lease", j.lease.as_deref(), Duration::from_secs(10))?;
    if !(Duration::from_millis(300)..=Duration::from_secs(600)).contains(&lease) {
        return Err(c.err("jobs.lease", "is out of range; expected 300ms to 10m"));
    }
    let redis =
        super::validate_cluster::redis_target(c, "jobs", j.redis_url, j.redis_sentinels, j.master_name)?;
    let redis_tls = super::redis_tls::validate_redis_tls(
        c,
        "jobs",
        redis.as_ref(),
        j.redis_ca_file,
        j.redis_client_cert_file,
        j.redis_client_key_file,
    )?;
    let redis_timeout = c.duration("jobs.redis_timeout", j.redis_timeout.as_deref(), REDIS_TIMEOUT)?;
    if redis.is_none() && j.redis_timeout.is_some() {
        return Err(c.err(
            "jobs.redis_timeout",
            "is only used with jobs.redis_url or jobs.redis_sentinels (jobs in [cluster]'s Redis use cluster.redis_timeout)",
        ));
    }
    if !(Duration::from_millis(10)..=Duration::from_secs(10)).contains(&redis_timeout) {
        return Err(c.err("jobs.redis_timeout", "is out of range; expected 10ms to 10s"));
    }
    let running = c.at_least("jobs.max_running", j.max_running, 256, 1)?;
    let limits = JobLimits {
        held_per_tenant: c.at_least("jobs.max_held_per_tenant", j.max_held_per_tenant, 10_000, 1)?,
        running_per_tenant: c
            .at_least("jobs.max_running_per_tenant", j.max_running_per_tenant, 64, 1)?
            .min(running),
        running,
    };
    Ok(JobsConfig {
        enabled: j.enabled.unwrap_or(true),
        data_dir,
        redis,
        redis_timeout,
        redis_tls,
        ttl,
        timeout,
        lease,
        limits,
        max_jobs: c.at_least("jobs.max_jobs", j.max_jobs, 100_000, 1)?,
        max_store_bytes: c.at_least("jobs.max_store_bytes", j.max_store_bytes, 1 << 30, 1 << 20)?,
        max_output_bytes: c.at_least("jobs.max_output_bytes", j.max_output_bytes, 4 << 20, 1024)?,
    })
}
