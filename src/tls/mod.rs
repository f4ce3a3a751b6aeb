//! TLS on both hops (DESIGN §13): the listener's certificate (reloaded when
//! its files change) and optional client certificates (mTLS) whose identity
//! can name the tenant; and the client side for `https://` region endpoints.
//!
//! One rustls crypto provider in the whole binary: ring. A second one in the
//! dependency graph (aws-lc, which several crates turn on by default) makes
//! rustls refuse to pick at start-up, so every config here is built with
//! `provider()` explicitly and `install_provider` sets the process default
//! for anything else (tonic's own TLS in tests).

pub mod accept;
pub mod client;
pub mod expiry;
pub mod identity;
pub mod server;

use std::path::Path;
use std::sync::Arc;

use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

/// The crypto provider every TLS config in the process is built with.
pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Makes ring the process-wide default provider (once; later calls change
/// nothing).
pub fn install_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

/// Every PEM certificate in `path`, in order (a chain: leaf first).
pub fn read_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, String> {
    let bytes = read(path)?;
    let certs = CertificateDer::pem_slice_iter(&bytes)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("{}: not a PEM certificate file: {e}", path.display()))?;
    if certs.is_empty() {
        return Err(format!(
            "{}: holds no certificate (expected \"-----BEGIN CERTIFICATE-----\")",
            path.display()
        ));
    }
    Ok(certs)
}

/// The PEM private key in `path` (PKCS#8, PKCS#1 or SEC1).
pub fn read_key(path: &Path) -> Result<PrivateKeyDer<'static>, String> {
    let bytes = read(path)?;
    PrivateKeyDer::from_pem_slice(&bytes)
        .map_err(|e| format!("{}: holds no PEM private key: {e}", path.display()))
}

/// Trust anchors from a PEM CA file.
pub fn read_roots(path: &Path) -> Result<rustls::RootCertStore, String> {
    let mut roots = rustls::RootCertStore::empty();
    for cert in read_certs(path)? {
        roots
            .add(cert)
            .map_err(|e| format!("{}: not a usable CA certificate: {e}", path.display()))?;
    }
    Ok(roots)
}

/// A leaf certificate and its key, checked to belong together.
pub fn read_identity(cert: &Path, key: &Path) -> Result<rustls::sign::CertifiedKey, String> {
    let chain = read_certs(cert)?;
    let key_der = read_key(key)?;
    rustls::sign::CertifiedKey::from_der(chain, key_der, &provider()).map_err(|e| {
        format!(
            "{} and {} do not make a usable identity: {e}",
            cert.display(),
            key.display()
        )
    })
}

/// Files bigger than this are not certificates; refuse rather than read them.
const MAX_PEM_BYTES: u64 = 1 << 20;

fn read(path: &Path) -> Result<Vec<u8>, String> {
    let meta = std::fs::metadata(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    if meta.len() > MAX_PEM_BYTES {
        return Err(format!(
            "{}: {} bytes, more than a PEM file of certificates or keys ({MAX_PEM_BYTES} at most)",
            path.display(),
            meta.len()
        ));
    }
    std::fs::read(path).map_err(|e| format!("cannot read {}: {e}", path.display()))
}
