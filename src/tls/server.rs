//! The listener's side of TLS: its certificate, swapped in place when the
//! certificate or key file changes (new connections get the new one, open
//! ones keep the session they have), and the optional check of client
//! certificates against a CA (mTLS). A certificate served expired, not yet
//! valid or close to expiry is warned about (`expiry.rs`), and its expiry
//! is a gauge.
//!
//! Owner: `CertStore::current` (one `RwLock`, written only by the reload
//! task, read once per handshake).

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use parking_lot::RwLock;
use rustls::server::{ClientHello, ResolvesServerCert, WebPkiClientVerifier};
use rustls::sign::CertifiedKey;
use sha2::{Digest, Sha256};
use tokio_util::sync::CancellationToken;

use super::expiry::{self, Validity};
use crate::config::{ClientAuth, ServerTlsConfig};

/// How often the certificate and key files are looked at. A replaced
/// certificate is served to new connections within this (and well within
/// the 2 s operators are promised).
pub const RELOAD_INTERVAL: Duration = Duration::from_millis(500);

/// The certificate served now.
pub struct CertStore {
    cert_file: PathBuf,
    key_file: PathBuf,
    current: RwLock<Arc<CertifiedKey>>,
}

impl std::fmt::Debug for CertStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CertStore")
            .field("cert_file", &self.cert_file)
            .field("key_file", &self.key_file)
            .finish_non_exhaustive()
    }
}

impl ResolvesServerCert for CertStore {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.current.read().clone())
    }
}

impl CertStore {
    /// The leaf certificate served now (DER).
    pub fn leaf(&self) -> Vec<u8> {
        self.current
            .read()
            .cert
            .first()
            .map(|c| c.to_vec())
            .unwrap_or_default()
    }
}

/// The listener's TLS: what accepts connections and what reloads its files.
#[derive(Clone)]
pub struct ServerTls {
    pub acceptor: tokio_rustls::TlsAcceptor,
    store: Arc<CertStore>,
    /// What the files held when read (taken before reading them, so a
    /// change made meanwhile is seen by the first look).
    loaded: Option<[u8; 32]>,
    /// The served certificate's validity period, for the reload task.
    validity: Option<Validity>,
}

impl ServerTls {
    /// Reads the files named by `[server.tls]`. Errors name the file.
    pub fn new(config: &ServerTlsConfig) -> Result<Self, String> {
        let loaded = stamp_files(&config.cert_file, &config.key_file);
        let key = super::read_identity(&config.cert_file, &config.key_file)?;
        let validity = leaf_validity(&config.cert_file, &key, "loaded");
        let store = Arc::new(CertStore {
            cert_file: config.cert_file.clone(),
            key_file: config.key_file.clone(),
            current: RwLock::new(Arc::new(key)),
        });
        let builder = rustls::ServerConfig::builder_with_provider(super::provider())
            .with_safe_default_protocol_versions()
            .map_err(|e| e.to_string())?;
        let builder = match (&config.client_ca_file, config.client_auth) {
            (Some(ca), auth) if auth != ClientAuth::Off => {
                let roots = super::read_roots(ca)?;
                let verifier =
                    WebPkiClientVerifier::builder_with_provider(Arc::new(roots), super::provider());
                let verifier = if auth == ClientAuth::Optional {
                    verifier.allow_unauthenticated()
                } else {
                    verifier
                };
                builder.with_client_cert_verifier(
                    verifier.build().map_err(|e| format!("{}: {e}", ca.display()))?,
                )
            }
            _ => builder.with_no_client_auth(),
        };
        let mut server = builder.with_cert_resolver(store.clone());
        // gRPC is HTTP/2 only; clients (grpcurl, grpc-go) insist on ALPN h2.
        server.alpn_protocols = vec![b"h2".to_vec()];
        Ok(Self {
            acceptor: tokio_rustls::TlsAcceptor::from(Arc::new(server)),
            store,
            loaded,
            validity,
        })
    }

    pub fn store(&self) -> &Arc<CertStore> {
        &self.store
    }

    /// Watches the certificate and key files until `cancel` fires: when
    /// their contents change and make a valid pair, new handshakes use them;
    /// an invalid pair (a half-written file, a key that does not match) is
    /// logged once and the certificate in use stays.
    pub fn spawn_reload(&self, cancel: CancellationToken) -> tokio::task::JoinHandle<()> {
        let store = self.store.clone();
        let mut last = self.loaded;
        let mut validity = self.validity;
        let mut standing = validity.map(|v| v.standing(crate::clock::unix_secs() as i64));
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    _ = cancel.cancelled() => return,
                    _ = tokio::time::sleep(RELOAD_INTERVAL) => {}
                }
                // The certificate in use may expire while it is served.
                if let Some(v) = validity {
                    let now = crate::clock::unix_secs() as i64;
                    v.record(&store.cert_file, now);
                    if standing != Some(v.standing(now)) {
                        standing = Some(v.standing(now));
                        if let Some(problem) = v.problem(now) {
                            tracing::warn!(cert = %store.cert_file.display(), "server certificate in use: it {problem}");
                        }
                    }
                }
                let now = stamp_files(&store.cert_file, &store.key_file);
                if now == last {
                    continue;
                }
                last = now;
                match super::read_identity(&store.cert_file, &store.key_file) {
                    Ok(key) => {
                        validity = leaf_validity(&store.cert_file, &key, "swapped in");
                        standing = validity.map(|v| v.standing(crate::clock::unix_secs() as i64));
                        *store.current.write() = Arc::new(key);
                        tracing::info!(cert = %store.cert_file.display(), "server certificate reloaded: new connections get it, open ones keep theirs");
                    }
                    Err(problem) => tracing::warn!(
                        %problem,
                        "changed certificate files refused; the certificate in use stays (replace both files, each with a rename)"
                    ),
                }
            }
        })
    }
}

/// The leaf's validity, warned about if it should not be served now.
fn leaf_validity(file: &std::path::Path, key: &CertifiedKey, what: &str) -> Option<Validity> {
    let leaf = key.cert.first()?;
    expiry::check(file, leaf, crate::clock::unix_secs() as i64, what)
}

/// What the two files hold now (a hash), or `None` if one cannot be read.
fn stamp_files(cert: &std::path::Path, key: &std::path::Path) -> Option<[u8; 32]> {
    let mut hash = Sha256::new();
    hash.update(std::fs::read(cert).ok()?);
    hash.update(std::fs::read(key).ok()?);
    Some(hash.finalize().into())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write_pair(dir: &std::path::Path, name: &str) -> Vec<u8> {
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = rcgen::CertificateParams::new(vec![name.to_string()])
            .unwrap()
            .self_signed(&key)
            .unwrap();
        std::fs::write(dir.join("cert.pem"), cert.pem()).unwrap();
        std::fs::write(dir.join("key.pem"), key.serialize_pem()).unwrap();
        cert.der().to_vec()
    }

    #[tokio::test(start_paused = true)]
    async fn replaced_files_are_served_within_one_interval_and_a_bad_pair_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let first = write_pair(dir.path(), "first.example");
        let tls = ServerTls::new(&ServerTlsConfig {
            cert_file: dir.path().join("cert.pem"),
            key_file: dir.path().join("key.pem"),
            client_ca_file: None,
            client_auth: ClientAuth::Off,
        })
        .unwrap();
        let cancel = CancellationToken::new();
        let task = tls.spawn_reload(cancel.clone());
        assert_eq!(tls.store().leaf(), first);

        let second = write_pair(dir.path(), "second.example");
        tokio::time::sleep(RELOAD_INTERVAL + Duration::from_millis(10)).await;
        assert_eq!(tls.store().leaf(), second, "served after one interval");

        // A key that does not belong to the certificate: the old pair stays.
        let other = rcgen::KeyPair::generate().unwrap();
        std::fs::write(dir.path().join("key.pem"), other.serialize_pem()).unwrap();
        tokio::time::sleep(RELOAD_INTERVAL * 2).await;
        assert_eq!(tls.store().leaf(), second);
        cancel.cancel();
        task.await.unwrap();
    }
}
