//! A served certificate's validity period: read when the certificate is
//! loaded (at start and when its files are swapped in live), warned about
//! when it is expired, not yet valid or close to expiry, and exported as
//! gauges so an alert fires before clients start refusing it.
//!
//! Wall-clock time (certificates are dated in it) is passed in as Unix
//! seconds, so the judgement is a pure function.

use std::path::Path;
use std::time::{Duration, UNIX_EPOCH};

use x509_parser::prelude::FromDer;

/// A certificate this close to its end is warned about (the shipped alert,
/// `DispatcherCertificateExpiresSoon`, uses the same fourteen days).
pub const WARN_BEFORE: Duration = Duration::from_secs(14 * 24 * 3600);

/// When a certificate is valid, as Unix seconds (inclusive bounds).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Validity {
    pub not_before: i64,
    pub not_after: i64,
}

/// Where `now` falls in a certificate's validity period.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Standing {
    Valid,
    /// Valid, but ends within `WARN_BEFORE`.
    ExpiresSoon,
    Expired,
    NotYetValid,
}

impl Validity {
    /// The validity of a DER certificate; `None` if it does not parse
    /// (rustls has accepted it, so that does not happen in practice).
    pub fn of(der: &[u8]) -> Option<Self> {
        let (_, cert) = x509_parser::certificate::X509Certificate::from_der(der).ok()?;
        Some(Self {
            not_before: cert.validity().not_before.timestamp(),
            not_after: cert.validity().not_after.timestamp(),
        })
    }

    /// Seconds until it expires at `now` (negative once it has).
    pub fn expires_in(&self, now: i64) -> i64 {
        self.not_after.saturating_sub(now)
    }

    pub fn standing(&self, now: i64) -> Standing {
        if now < self.not_before {
            Standing::NotYetValid
        } else if now > self.not_after {
            Standing::Expired
        } else if self.expires_in(now) < WARN_BEFORE.as_secs() as i64 {
            Standing::ExpiresSoon
        } else {
            Standing::Valid
        }
    }

    /// What is wrong with serving it at `now`, in words (`None`: nothing).
    pub fn problem(&self, now: i64) -> Option<String> {
        let days = |secs: i64| secs.unsigned_abs().div_ceil(86_400);
        match self.standing(now) {
            Standing::Valid => None,
            Standing::ExpiresSoon => Some(format!(
                "expires in {} day(s), at {}: replace it before clients refuse it",
                days(self.expires_in(now)),
                date(self.not_after)
            )),
            Standing::Expired => Some(format!(
                "expired {} day(s) ago, at {}: clients that check dates refuse it",
                days(self.expires_in(now)),
                date(self.not_after)
            )),
            Standing::NotYetValid => Some(format!(
                "is not valid until {} (in {} day(s)): clients that check dates refuse it (is the clock right?)",
                date(self.not_before),
                days(self.not_before - now)
            )),
        }
    }

    /// Sets the gauges of the certificate in `file` (each tick of the
    /// reload task; no-ops without a metrics recorder).
    pub fn record(&self, file: &Path, now: i64) {
        let file = file.display().to_string();
        metrics::gauge!("dispatcher_tls_certificate_expiry_seconds", "file" => file.clone())
            .set(self.expires_in(now) as f64);
        let valid = matches!(self.standing(now), Standing::Valid | Standing::ExpiresSoon);
        metrics::gauge!("dispatcher_tls_certificate_valid", "file" => file).set(f64::from(u8::from(valid)));
    }
}

/// A Unix time as RFC 3339 (UTC).
fn date(secs: i64) -> String {
    match u64::try_from(secs) {
        Ok(s) => humantime::format_rfc3339_seconds(UNIX_EPOCH + Duration::from_secs(s)).to_string(),
        Err(_) => format!("{secs} s from the Unix epoch"),
    }
}

/// Logs what is wrong with serving the certificate `der` from `file` now
/// (`what`: "loaded" at start, "swapped in" when reloaded); returns its
/// validity for the gauges.
pub fn check(file: &Path, der: &[u8], now: i64, what: &str) -> Option<Validity> {
    let Some(validity) = Validity::of(der) else {
        tracing::warn!(cert = %file.display(), "the server certificate's validity dates could not be read");
        return None;
    };
    if let Some(problem) = validity.problem(now) {
        tracing::warn!(cert = %file.display(), "server certificate {what}: it {problem}");
    }
    Some(validity)
}

#[cfg(test)]
mod tests {
    use super::*;

    const DAY: i64 = 86_400;

    fn validity() -> Validity {
        Validity {
            not_before: 1_000 * DAY,
            not_after: 1_100 * DAY,
        }
    }

    #[test]
    fn standing_at_each_point_of_the_period() {
        let v = validity();
        assert_eq!(v.standing(999 * DAY), Standing::NotYetValid);
        assert_eq!(v.standing(1_000 * DAY), Standing::Valid);
        assert_eq!(v.standing(1_086 * DAY), Standing::Valid);
        assert_eq!(v.standing(1_087 * DAY), Standing::ExpiresSoon);
        assert_eq!(v.standing(1_100 * DAY), Standing::ExpiresSoon);
        assert_eq!(v.standing(1_100 * DAY + 1), Standing::Expired);
        assert_eq!(v.expires_in(1_101 * DAY), -DAY);
    }

    #[test]
    fn problems_say_when() {
        let v = validity();
        assert_eq!(v.problem(1_050 * DAY), None);
        let soon = v.problem(1_095 * DAY).unwrap();
        assert!(
            soon.starts_with("expires in 5 day(s), at 1973-01-05T00:00:00Z"),
            "{soon}"
        );
        let expired = v.problem(1_103 * DAY).unwrap();
        assert!(expired.starts_with("expired 3 day(s) ago"), "{expired}");
        let early = v.problem(998 * DAY).unwrap();
        assert!(
            early.starts_with("is not valid until 1972-09-27T00:00:00Z (in 2 day(s))"),
            "{early}"
        );
    }

    #[test]
    fn reads_the_dates_of_a_real_certificate() {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params = rcgen::CertificateParams::new(vec!["x.example".to_string()]).unwrap();
        params.not_before = rcgen::date_time_ymd(2019, 1, 1);
        params.not_after = rcgen::date_time_ymd(2020, 1, 1);
        let cert = params.self_signed(&key).unwrap();
        let v = Validity::of(cert.der()).unwrap();
        assert_eq!(v.not_before, 1_546_300_800);
        assert_eq!(v.not_after, 1_577_836_800);
    }
}
