//! A client certificate's identity: the names in its Subject Alternative
//! Name extension (DNS names and URIs such as SPIFFE IDs), which a tenant's
//! `identities` in dispatcher.toml can list. The certificate was verified
//! by rustls against the client CA before anything here reads it.

use std::sync::Arc;

use rustls::pki_types::CertificateDer;
use x509_parser::extensions::GeneralName;
use x509_parser::prelude::FromDer;

/// Names taken from one certificate at most; the rest are ignored.
const MAX_NAMES: usize = 32;
/// A name longer than this is not one a tenant could list (it is skipped).
pub const MAX_IDENTITY_LEN: usize = 255;

/// The verified names of a caller's certificate (empty: none presented).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PeerIdentity(pub Arc<[String]>);

impl PeerIdentity {
    pub fn names(&self) -> &[String] {
        &self.0
    }
}

/// The DNS and URI SANs of a leaf certificate (DER), in order.
pub fn subject_alt_names(cert: &CertificateDer<'_>) -> Vec<String> {
    let Ok((_, parsed)) = x509_parser::certificate::X509Certificate::from_der(cert.as_ref()) else {
        return Vec::new();
    };
    let Ok(Some(san)) = parsed.subject_alternative_name() else {
        return Vec::new();
    };
    san.value
        .general_names
        .iter()
        .filter_map(|n| match n {
            GeneralName::DNSName(s) | GeneralName::URI(s) => Some(*s),
            _ => None,
        })
        .filter(|s| !s.is_empty() && s.len() <= MAX_IDENTITY_LEN)
        .take(MAX_NAMES)
        .map(str::to_string)
        .collect()
}

/// The identity of a verified peer chain (leaf first).
pub fn of_chain(chain: Option<&[CertificateDer<'static>]>) -> PeerIdentity {
    PeerIdentity(
        chain
            .and_then(|c| c.first())
            .map(subject_alt_names)
            .unwrap_or_default()
            .into(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_dns_and_uri_names() {
        let mut params = rcgen::CertificateParams::new(vec!["client-a.example".to_string()]).unwrap();
        params.subject_alt_names.push(rcgen::SanType::URI(
            "spiffe://example.org/tenant/alpha".try_into().unwrap(),
        ));
        params
            .subject_alt_names
            .push(rcgen::SanType::IpAddress([127, 0, 0, 1].into()));
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = params.self_signed(&key).unwrap();
        assert_eq!(
            subject_alt_names(cert.der()),
            vec!["client-a.example", "spiffe://example.org/tenant/alpha"]
        );
        assert!(of_chain(None).names().is_empty());
        assert!(subject_alt_names(&CertificateDer::from(vec![1, 2, 3])).is_empty());
    }
}
