//! TLS to a `rediss://` Redis (`[cluster]` or `[jobs]`; in `[cluster]`, a
//! `redis_url`, or `redis_cluster` nodes or `redis_sentinels` all
//! `rediss://`; the primary the Sentinels name is then reached over TLS
//! too): `redis_ca_file`
//! (the CA its certificate chains to; without it, the system's roots) and,
//! for mutual TLS, `redis_client_cert_file` with `redis_client_key_file`.
//! The files are read while validating, so a missing or bad one is a config
//! error naming the file and the key; their contents are kept (PEM), so a
//! reload that finds them changed reports that a restart is needed.

use std::path::{Path, PathBuf};

use super::ConfigError;
use super::RedisTarget;
use super::ctx::Ctx;

/// TLS settings for one Redis, checked, with the files' contents.
#[derive(Clone, PartialEq, Eq)]
pub struct RedisTls {
    pub ca_file: Option<PathBuf>,
    pub cert_file: Option<PathBuf>,
    pub key_file: Option<PathBuf>,
    /// The CA certificates (PEM); `None`: the system's roots.
    pub ca: Option<Vec<u8>>,
    /// This replica's certificate chain and private key (PEM), for mutual
    /// TLS.
    pub identity: Option<(Vec<u8>, Vec<u8>)>,
}

impl std::fmt::Debug for RedisTls {
    // Not the key.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisTls")
            .field("ca_file", &self.ca_file)
            .field("cert_file", &self.cert_file)
            .field("key_file", &self.key_file)
            .finish()
    }
}

/// The three keys of `section` (`cluster`, `jobs`) for `target`: `None`
/// when none is given (a `rediss://` URL then trusts the system's roots).
pub(super) fn validate_redis_tls(
    c: &Ctx<'_>,
    section: &str,
    target: Option<&RedisTarget>,
    ca_file: Option<String>,
    cert_file: Option<String>,
    key_file: Option<String>,
) -> Result<Option<RedisTls>, ConfigError> {
    let key = |k: &str| format!("{section}.{k}");
    let given = [
        ("redis_ca_file", &ca_file),
        ("redis_client_cert_file", &cert_file),
        ("redis_client_key_file", &key_file),
    ];
    let Some((first, _)) = given.iter().find(|(_, v)| v.is_some()) else {
        return Ok(None);
    };
    match target {
        Some(RedisTarget::Url(u)) if u.starts_with("rediss://") => {}
        Some(RedisTarget::Url(_)) | None => {
            return Err(c.err(
                key(first),
                format!(
                    "is only used with a rediss:// {} (TLS to Redis)",
                    key("redis_url")
                ),
            ));
        }
        Some(RedisTarget::Cluster { nodes: urls }) | Some(RedisTarget::Sentinel { sentinels: urls, .. }) => {
            let list = match target {
                Some(RedisTarget::Cluster { .. }) => "redis_cluster node",
                _ => "redis_sentinels URL",
            };
            if let Some(i) = urls.iter().position(|u| !u.starts_with("rediss://")) {
                return Err(c.err(
                    key(first),
                    format!(
                        "is only used when every {} is rediss:// (TLS to Redis); number {} is not",
                        key(list),
                        i + 1
                    ),
                ));
            }
        }
    }
    let base = c.file.parent().unwrap_or(Path::new("."));
    let path = |k: &str, p: Option<String>| -> Result<Option<PathBuf>, ConfigError> {
        match p {
            Some(p) if p.trim().is_empty() => Err(c.err(key(k), "is empty; name a PEM file")),
            Some(p) => Ok(Some(base.join(p))),
            None => Ok(None),
        }
    };
    let ca_file = path("redis_ca_file", ca_file)?;
    let cert_file = path("redis_client_cert_file", cert_file)?;
    let key_file = path("redis_client_key_file", key_file)?;
    let read =
        |k: &str, p: &Path| std::fs::read(p).map_err(|e| c.err(key(k), format!("{}: {e}", p.display())));
    let ca = match &ca_file {
        Some(p) => {
            crate::tls::read_roots(p).map_err(|e| c.err(key("redis_ca_file"), e))?;
            Some(read("redis_ca_file", p)?)
        }
        None => None,
    };
    let identity = match (&cert_file, &key_file) {
        (Some(cert), Some(k)) => {
            crate::tls::read_certs(cert).map_err(|e| c.err(key("redis_client_cert_file"), e))?;
            crate::tls::read_identity(cert, k).map_err(|e| c.err(key("redis_client_key_file"), e))?;
            Some((
                read("redis_client_cert_file", cert)?,
                read("redis_client_key_file", k)?,
            ))
        }
        (None, None) => None,
        (Some(_), None) => {
            return Err(c.err(
                key("redis_client_key_file"),
                "missing: redis_client_cert_file needs its private key",
            ));
        }
        (None, Some(_)) => {
            return Err(c.err(
                key("redis_client_cert_file"),
                "missing: redis_client_key_file needs its certificate",
            ));
        }
    };
    Ok(Some(RedisTls {
        ca_file,
        cert_file,
        key_file,
        ca,
        identity,
    }))
}
