//! The client side of TLS, for `https://` region endpoints: trust the
//! region's CA file (or the system's roots) and, optionally, present a
//! client certificate. One config per region; the forwarding connection
//! and the health checks use the same one (they share the connection).

use std::path::Path;
use std::sync::Arc;

use rustls::ClientConfig;
use rustls::pki_types::ServerName;

/// TLS towards one cluster.
#[derive(Debug, Clone)]
pub struct ClientTls {
    pub config: Arc<ClientConfig>,
    /// The name the cluster's certificate must carry.
    pub server_name: ServerName<'static>,
}

impl ClientTls {
    /// Wraps `stream` in TLS, verifying the cluster's certificate.
    pub async fn connect<IO>(&self, stream: IO) -> std::io::Result<tokio_rustls::client::TlsStream<IO>>
    where
        IO: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
    {
        tokio_rustls::TlsConnector::from(self.config.clone())
            .connect(self.server_name.clone(), stream)
            .await
    }
}

/// A client config trusting `ca` (PEM; `None`: the system's roots) and
/// presenting `identity` (certificate and key files) when given.
pub fn client_config(
    ca: Option<&Path>,
    identity: Option<(&Path, &Path)>,
) -> Result<Arc<ClientConfig>, String> {
    let roots = match ca {
        Some(path) => super::read_roots(path)?,
        None => system_roots()?,
    };
    let builder = ClientConfig::builder_with_provider(super::provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_root_certificates(roots);
    let mut config = match identity {
        None => builder.with_no_client_auth(),
        Some((cert, key)) => {
            // Checks the pair belongs together, with a message naming the files.
            super::read_identity(cert, key)?;
            builder
                .with_client_auth_cert(super::read_certs(cert)?, super::read_key(key)?)
                .map_err(|e| format!("{} and {}: {e}", cert.display(), key.display()))?
        }
    };
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(Arc::new(config))
}

fn system_roots() -> Result<rustls::RootCertStore, String> {
    let found = rustls_native_certs::load_native_certs();
    let mut roots = rustls::RootCertStore::empty();
    let (added, _) = roots.add_parsable_certificates(found.certs);
    if added == 0 {
        let why = found
            .errors
            .first()
            .map_or("none found".to_string(), |e| e.to_string());
        return Err(format!(
            "no system root certificates could be loaded ({why}); give tls.ca_file"
        ));
    }
    Ok(roots)
}
