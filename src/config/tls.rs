//! TLS and exposure settings: `[server.tls]`, a region's `[tls]`, and the
//! refusal to start with the Admin API or anonymous use open to a network.
//! Files named here are read while validating, so a missing or bad file is
//! a config error naming the config file and the key.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

use super::ctx::Ctx;
use super::raw::{RawRegionTls, RawServerTls};
use super::{Config, ConfigError};
use crate::tls::client::ClientTls;

/// `[server.tls]`, checked: the files exist and make a usable identity.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerTlsConfig {
    pub cert_file: PathBuf,
    pub key_file: PathBuf,
    /// CA that client certificates must chain to (mTLS).
    pub client_ca_file: Option<PathBuf>,
    pub client_auth: ClientAuth,
}

/// Whether callers must, may or cannot present a client certificate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClientAuth {
    /// No client certificates asked for (no `client_ca_file`).
    Off,
    /// A certificate, if presented, must verify; callers without one use
    /// bearer keys. Both kinds of caller in one deployment.
    Optional,
    /// Every connection needs a verified client certificate.
    Required,
}

/// A region's `[tls]` for its `https://` endpoint, with the client config
/// built from its files.
#[derive(Clone)]
pub struct RegionTls {
    pub ca_file: Option<PathBuf>,
    pub cert_file: Option<PathBuf>,
    pub key_file: Option<PathBuf>,
    pub client: ClientTls,
    /// SHA-256 of the files' contents: a reload that finds them changed
    /// reconnects with the new ones.
    contents: [u8; 32],
}

impl PartialEq for RegionTls {
    fn eq(&self, other: &Self) -> bool {
        self.ca_file == other.ca_file
            && self.cert_file == other.cert_file
            && self.key_file == other.key_file
            && self.client.server_name == other.client.server_name
            && self.contents == other.contents
    }
}

impl std::fmt::Debug for RegionTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RegionTls")
            .field("ca_file", &self.ca_file)
            .field("cert_file", &self.cert_file)
            .field("key_file", &self.key_file)
            .field("server_name", &self.client.server_name)
            .finish()
    }
}

fn resolve(base: &Path, p: &str) -> PathBuf {
    base.join(p)
}

pub(super) fn validate_server_tls(
    c: &Ctx<'_>,
    raw: Option<RawServerTls>,
) -> Result<Option<ServerTlsConfig>, ConfigError> {
    let Some(t) = raw else { return Ok(None) };
    let base = c.file.parent().unwrap_or(Path::new("."));
    let cert_file = resolve(
        base,
        &t.cert_file.ok_or_else(|| {
            c.err(
                "server.tls.cert_file",
                "missing: the PEM certificate (chain) to serve",
            )
        })?,
    );
    let key_file = resolve(
        base,
        &t.key_file
            .ok_or_else(|| c.err("server.tls.key_file", "missing: the PEM private key of cert_file"))?,
    );
    crate::tls::read_certs(&cert_file).map_err(|e| c.err("server.tls.cert_file", e))?;
    crate::tls::read_key(&key_file).map_err(|e| c.err("server.tls.key_file", e))?;
    crate::tls::read_identity(&cert_file, &key_file).map_err(|e| c.err("server.tls.key_file", e))?;
    let client_ca_file = t.client_ca_file.map(|p| resolve(base, &p));
    if let Some(ca) = &client_ca_file {
        crate::tls::read_roots(ca).map_err(|e| c.err("server.tls.client_ca_file", e))?;
    }
    let client_auth = match (t.client_auth.as_deref(), &client_ca_file) {
        (None, None) => ClientAuth::Off,
        (None | Some("required"), Some(_)) => ClientAuth::Required,
        (Some("optional"), Some(_)) => ClientAuth::Optional,
        (Some("required" | "optional"), None) => {
            return Err(c.err(
                "server.tls.client_auth",
                "needs server.tls.client_ca_file, the CA client certificates must chain to",
            ));
        }
        (Some(other), _) => {
            return Err(c.err(
                "server.tls.client_auth",
                format!(
                    "{} is not a mode; expected \"required\" or \"optional\"",
                    crate::excerpt::excerpt(other)
                ),
            ));
        }
    };
    Ok(Some(ServerTlsConfig {
        cert_file,
        key_file,
        client_ca_file,
        client_auth,
    }))
}

/// A region's `[tls]`: given only with an `https://` endpoint, and every
/// `https://` endpoint gets one (the system's roots when no `ca_file`).
pub(super) fn validate_region_tls(
    c: &Ctx<'_>,
    raw: Option<RawRegionTls>,
    endpoint: Option<&tonic::transport::Uri>,
) -> Result<Option<RegionTls>, ConfigError> {
    let https = endpoint.is_some_and(|u| u.scheme_str() == Some("https"));
    if !https {
        return match raw {
            None => Ok(None),
            Some(_) => Err(c.err(
                "tls",
                "is only for an https:// endpoint; make the endpoint https:// or remove [tls]",
            )),
        };
    }
    let t = raw.unwrap_or_default();
    let base = c.file.parent().unwrap_or(Path::new("."));
    let ca_file = t.ca_file.map(|p| resolve(base, &p));
    let cert_file = t.cert_file.map(|p| resolve(base, &p));
    let key_file = t.key_file.map(|p| resolve(base, &p));
    let identity = match (&cert_file, &key_file) {
        (Some(cert), Some(key)) => Some((cert.as_path(), key.as_path())),
        (None, None) => None,
        (Some(_), None) => return Err(c.err("tls.key_file", "missing: cert_file needs its private key")),
        (None, Some(_)) => return Err(c.err("tls.cert_file", "missing: key_file needs its certificate")),
    };
    let host = endpoint.and_then(|u| u.host()).unwrap_or_default();
    let name = t
        .server_name
        .unwrap_or_else(|| host.trim_matches(['[', ']']).to_string());
    let server_name = rustls::pki_types::ServerName::try_from(name.clone()).map_err(|_| {
        c.err(
            "tls.server_name",
            format!(
                "{} is not a DNS name or IP address",
                crate::excerpt::excerpt(&name)
            ),
        )
    })?;
    // Each file on its own first, so the error names its key.
    if let Some(ca) = &ca_file {
        crate::tls::read_roots(ca).map_err(|e| c.err("tls.ca_file", e))?;
    }
    if let Some((cert, key)) = identity {
        crate::tls::read_certs(cert).map_err(|e| c.err("tls.cert_file", e))?;
        crate::tls::read_identity(cert, key).map_err(|e| c.err("tls.key_file", e))?;
    }
    let config = crate::tls::client::client_config(ca_file.as_deref(), identity).map_err(|e| {
        // Left: the system's roots (no ca_file) or the builder itself.
        c.err(if ca_file.is_none() { "tls.ca_file" } else { "tls" }, e)
    })?;
    let mut hash = Sha256::new();
    for path in [&ca_file, &cert_file, &key_file].into_iter().flatten() {
        hash.update(std::fs::read(path).unwrap_or_default());
    }
    Ok(Some(RegionTls {
        ca_file,
        cert_file,
        key_file,
        client: ClientTls { config, server_name },
        contents: hash.finalize().into(),
    }))
}

/// Why serving `config` on these addresses would leave the dispatcher open
/// to whoever reaches it, naming the setting that allows it; empty if not.
/// Loopback addresses are the host's own business.
pub fn exposure_problems(
    config: &Config,
    listen: SocketAddr,
    admin_listen: Option<SocketAddr>,
) -> Vec<String> {
    let mut problems = Vec::new();
    let admin_at = admin_listen.unwrap_or(listen);
    if config.admin_token.is_none() && !admin_at.ip().is_loopback() && !config.admin_open_on_network {
        problems.push(format!(
            "the Admin API would be open (no admin.token) on {admin_at}, which is not a loopback address: \
             set admin.token, or serve the Admin API on a loopback server.admin_listen, \
             or set admin.allow_open_on_network = true to allow it"
        ));
    }
    if config.auth.allow_anonymous && !listen.ip().is_loopback() && !config.auth.allow_anonymous_on_network {
        problems.push(format!(
            "anonymous callers (auth.allow_anonymous) would be served on {listen}, which is not a loopback address: \
             give tenants keys or client certificate identities, \
             or set auth.allow_anonymous_on_network = true to allow it"
        ));
    }
    problems
}

/// A server.admin_listen address, checked.
pub(super) fn validate_admin_listen(
    c: &Ctx<'_>,
    raw: Option<String>,
) -> Result<Option<SocketAddr>, ConfigError> {
    match raw {
        None => Ok(None),
        Some(a) if a.is_empty() => Ok(None),
        Some(a) => a.parse().map(Some).map_err(|_| {
            c.err(
                "server.admin_listen",
                format!(
                    "{} is not an address like \"127.0.0.1:50052\"",
                    crate::excerpt::excerpt(&a)
                ),
            )
        }),
    }
}

/// A tenant's `identities`: client certificate names (DNS or URI SANs),
/// each given to one tenant only.
pub(super) fn validate_identities(
    c: &Ctx<'_>,
    i: usize,
    identities: Vec<String>,
    earlier: &[super::TenantConfig],
) -> Result<Vec<String>, ConfigError> {
    use crate::tls::identity::MAX_IDENTITY_LEN;
    for (j, id) in identities.iter().enumerate() {
        let key = format!("tenants[{i}].identities[{j}]");
        if id.is_empty() || id.len() > MAX_IDENTITY_LEN || id.chars().any(char::is_control) {
            return Err(c.err(
                key,
                format!("must be a certificate name (a DNS or URI SAN) of 1 to {MAX_IDENTITY_LEN} bytes"),
            ));
        }
        if identities[..j].contains(id) {
            return Err(c.err(key, "is listed twice"));
        }
        if let Some(other) = earlier.iter().find(|t| t.identities.contains(id)) {
            return Err(c.err(
                key,
                format!("is already the identity of tenant {:?}", other.spec.name),
            ));
        }
    }
    Ok(identities)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(dir: &Path, text: &str) -> Result<Config, ConfigError> {
        super::super::parse_dispatcher(text, &dir.join("dispatcher.toml"), Some(Default::default()))
    }

    const BASE: &str = "[auth]\nallow_anonymous = true\n[[models]]\nname = \"m\"\n";

    #[test]
    fn bad_tls_files_name_the_file_and_the_key() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("cert.pem"), "not a certificate").unwrap();
        let err = parse(
            dir.path(),
            &format!("[server.tls]\ncert_file = \"cert.pem\"\nkey_file = \"key.pem\"\n{BASE}"),
        )
        .unwrap_err();
        assert_eq!(err.key, "server.tls.cert_file");
        assert!(err.problem.contains("cert.pem"), "{}", err.problem);
        assert!(err.file.ends_with("dispatcher.toml"));
        let err = parse(
            dir.path(),
            &format!("[server.tls]\ncert_file = \"cert.pem\"\nclient_auth = \"sometimes\"\n{BASE}"),
        )
        .unwrap_err();
        assert_eq!(err.key, "server.tls.key_file");
    }

    #[test]
    fn region_tls_errors_name_the_region_file_and_the_key() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("east.toml");
        let models = parse(dir.path(), BASE).unwrap().models;
        let region = |endpoint: &str, tls: &str| {
            super::super::parse_region(
                &format!(
                    "endpoint = \"{endpoint}\"\n[[models]]\nname = \"m\"\ntokens_per_minute = 1\nrequests_per_minute = 1\n{tls}"
                ),
                &file,
                &models,
            )
        };
        let err = region("https://127.0.0.1:1", "[tls]\nca_file = \"missing.pem\"\n").unwrap_err();
        assert_eq!(
            (err.file.as_path(), err.key.as_str()),
            (file.as_path(), "tls.ca_file")
        );
        assert!(err.problem.contains("missing.pem"), "{}", err.problem);
        let err = region("https://127.0.0.1:1", "[tls]\ncert_file = \"c.pem\"\n").unwrap_err();
        assert_eq!(err.key, "tls.key_file");
        let err = region("http://127.0.0.1:1", "[tls]\n").unwrap_err();
        assert_eq!(err.key, "tls");
        assert!(region("http://127.0.0.1:1", "").unwrap().tls.is_none());
    }

    #[test]
    fn exposure_is_refused_off_loopback_unless_allowed() {
        let dir = tempfile::tempdir().unwrap();
        let loopback: SocketAddr = "127.0.0.1:1".parse().unwrap();
        let any: SocketAddr = "0.0.0.0:1".parse().unwrap();
        let open = parse(dir.path(), BASE).unwrap();
        assert!(exposure_problems(&open, loopback, None).is_empty());
        let problems = exposure_problems(&open, any, None);
        assert_eq!(problems.len(), 2, "{problems:?}");
        assert!(problems[0].contains("admin.allow_open_on_network"));
        assert!(problems[1].contains("auth.allow_anonymous_on_network"));
        assert_eq!(exposure_problems(&open, any, Some(loopback)).len(), 1);
        let allowed = parse(
            dir.path(),
            "[admin]\nallow_open_on_network = true\n[auth]\nallow_anonymous = true\nallow_anonymous_on_network = true\n[[models]]\nname = \"m\"\n",
        )
        .unwrap();
        assert!(exposure_problems(&allowed, any, None).is_empty());
    }
}
