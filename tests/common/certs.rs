//! Test certificates, made in the test with rcgen (nothing checked in): a
//! CA, and server or client certificates it signs, written as PEM files.

use std::path::{Path, PathBuf};

use tonic::transport::{Certificate, Channel, ClientTlsConfig};

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, SanType,
};

/// A date: year, month, day.
pub type Ymd = (i32, u8, u8);

/// A test CA whose certificate is written to `<dir>/<name>.pem`.
pub struct Ca {
    pub cert: PathBuf,
    issuer: Issuer<'static, KeyPair>,
}

/// A certificate and its key, as files.
#[derive(Debug, Clone)]
pub struct Pair {
    pub cert: PathBuf,
    pub key: PathBuf,
    /// The certificate (DER), to compare with what a server presents.
    pub der: Vec<u8>,
}

impl Ca {
    pub fn new(dir: &Path, name: &str) -> Self {
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(DnType::CommonName, format!("{name} test CA"));
        let key = KeyPair::generate().unwrap();
        let cert = params.self_signed(&key).unwrap();
        let path = dir.join(format!("{name}.pem"));
        std::fs::write(&path, cert.pem()).unwrap();
        Self {
            cert: path,
            issuer: Issuer::new(params, key),
        }
    }

    /// A server certificate for localhost and 127.0.0.1.
    pub fn server(&self, dir: &Path, stem: &str) -> Pair {
        self.issue(
            dir,
            stem,
            &["localhost"],
            ExtendedKeyUsagePurpose::ServerAuth,
            None,
        )
    }

    /// A server certificate valid from `not_before` to `not_after` (year,
    /// month, day).
    #[allow(dead_code)]
    pub fn server_dated(&self, dir: &Path, stem: &str, not_before: Ymd, not_after: Ymd) -> Pair {
        self.issue(
            dir,
            stem,
            &["localhost"],
            ExtendedKeyUsagePurpose::ServerAuth,
            Some([not_before, not_after]),
        )
    }

    /// A client certificate naming `sans` (DNS names, or URIs when they
    /// contain "://").
    pub fn client(&self, dir: &Path, stem: &str, sans: &[&str]) -> Pair {
        self.issue(dir, stem, sans, ExtendedKeyUsagePurpose::ClientAuth, None)
    }

    /// A client certificate that expired in 2020.
    pub fn expired_client(&self, dir: &Path, stem: &str, sans: &[&str]) -> Pair {
        self.issue(
            dir,
            stem,
            sans,
            ExtendedKeyUsagePurpose::ClientAuth,
            Some([(2019, 1, 1), (2020, 1, 1)]),
        )
    }

    fn issue(
        &self,
        dir: &Path,
        stem: &str,
        sans: &[&str],
        usage: ExtendedKeyUsagePurpose,
        dates: Option<[Ymd; 2]>,
    ) -> Pair {
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        for san in sans {
            params.subject_alt_names.push(if san.contains("://") {
                SanType::URI((*san).try_into().unwrap())
            } else {
                SanType::DnsName((*san).try_into().unwrap())
            });
        }
        if usage == ExtendedKeyUsagePurpose::ServerAuth {
            params
                .subject_alt_names
                .push(SanType::IpAddress([127, 0, 0, 1].into()));
        }
        params.distinguished_name.push(DnType::CommonName, stem);
        params.extended_key_usages = vec![usage];
        if let Some([(y0, m0, d0), (y1, m1, d1)]) = dates {
            params.not_before = rcgen::date_time_ymd(y0, m0, d0);
            params.not_after = rcgen::date_time_ymd(y1, m1, d1);
        }
        let key = KeyPair::generate().unwrap();
        let cert = params.signed_by(&key, &self.issuer).unwrap();
        let pair = Pair {
            cert: dir.join(format!("{stem}.crt")),
            key: dir.join(format!("{stem}.key")),
            der: cert.der().to_vec(),
        };
        std::fs::write(&pair.cert, cert.pem()).unwrap();
        std::fs::write(&pair.key, key.serialize_pem()).unwrap();
        pair
    }
}

impl Pair {
    /// Puts this pair in place of `to`'s files, each with a rename (as a
    /// certificate manager does), so a reader never sees half a file.
    pub fn install_as(&self, to: &Pair) {
        for (from, to) in [(&self.cert, &to.cert), (&self.key, &to.key)] {
            let tmp = to.with_extension("tmp");
            std::fs::copy(from, &tmp).unwrap();
            std::fs::rename(&tmp, to).unwrap();
        }
    }
}

/// A channel to a TLS listener at `addr` whose certificate (for localhost)
/// `ca` signed; it connects on first use.
#[allow(dead_code)]
pub fn tls_channel(addr: std::net::SocketAddr, ca: &Path) -> Channel {
    dispatcher::tls::install_provider();
    let tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(std::fs::read(ca).unwrap()))
        .domain_name("localhost");
    Channel::from_shared(format!("https://{addr}"))
        .unwrap()
        .tls_config(tls)
        .unwrap()
        .connect_lazy()
}
