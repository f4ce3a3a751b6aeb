//! OpenAI's rate-limit headers: `x-ratelimit-{limit,remaining,reset}-{tokens,requests}`,
//! `retry-after-ms` and `retry-after`, written by the simulated provider and
//! read by the dispatcher into the same `ProviderHint` an AgentCluster's
//! `provider_quota` carries. Reset times are Go duration strings (`6m0s`,
//! `1s`, `20ms`, `1.5s`).

use std::time::Duration;

use http::{HeaderMap, HeaderValue};

use crate::core::ProviderHint;

pub const LIMIT_TOKENS: &str = "x-ratelimit-limit-tokens";
pub const LIMIT_REQUESTS: &str = "x-ratelimit-limit-requests";
pub const REMAINING_TOKENS: &str = "x-ratelimit-remaining-tokens";
pub const REMAINING_REQUESTS: &str = "x-ratelimit-remaining-requests";
pub const RESET_TOKENS: &str = "x-ratelimit-reset-tokens";
pub const RESET_REQUESTS: &str = "x-ratelimit-reset-requests";
pub const RETRY_AFTER_MS: &str = "retry-after-ms";
pub const RETRY_AFTER: &str = "retry-after";

/// Everything the rate-limit headers of one response say (absent ones `None`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RateLimits {
    pub limit_tokens: Option<u64>,
    pub limit_requests: Option<u64>,
    pub remaining_tokens: Option<u64>,
    pub remaining_requests: Option<u64>,
    pub reset_tokens: Option<Duration>,
    pub reset_requests: Option<Duration>,
    /// `retry-after-ms`, else `retry-after` (whole seconds).
    pub retry_after: Option<Duration>,
}

impl RateLimits {
    /// Reads the headers; one that does not parse counts as absent.
    pub fn from_headers(h: &HeaderMap) -> Self {
        let text = |name: &str| h.get(name).and_then(|v| v.to_str().ok()).map(str::trim);
        let count = |name: &str| text(name).and_then(|v| v.parse::<u64>().ok());
        let reset = |name: &str| text(name).and_then(parse_duration);
        let retry_after = text(RETRY_AFTER_MS)
            .and_then(|v| v.parse::<f64>().ok())
            .filter(|ms| ms.is_finite() && *ms >= 0.0)
            .map(|ms| Duration::from_secs_f64(ms.min(86_400_000.0) / 1000.0))
            .or_else(|| {
                text(RETRY_AFTER)
                    .and_then(|v| v.parse::<u64>().ok())
                    .map(|s| Duration::from_secs(s.min(86_400)))
            });
        Self {
            limit_tokens: count(LIMIT_TOKENS),
            limit_requests: count(LIMIT_REQUESTS),
            remaining_tokens: count(REMAINING_TOKENS),
            remaining_requests: count(REMAINING_REQUESTS),
            reset_tokens: reset(RESET_TOKENS),
            reset_requests: reset(RESET_REQUESTS),
            retry_after,
        }
    }

    /// Writes the headers that are known.
    pub fn to_headers(&self, h: &mut HeaderMap) {
        let mut put = |name: &'static str, v: String| {
            if let Ok(v) = HeaderValue::from_str(&v) {
                h.insert(name, v);
            }
        };
        let counts = [
            (LIMIT_TOKENS, self.limit_tokens),
            (LIMIT_REQUESTS, self.limit_requests),
            (REMAINING_TOKENS, self.remaining_tokens),
            (REMAINING_REQUESTS, self.remaining_requests),
        ];
        for (name, v) in counts {
            if let Some(v) = v {
                put(name, v.to_string());
            }
        }
        for (name, v) in [
            (RESET_TOKENS, self.reset_tokens),
            (RESET_REQUESTS, self.reset_requests),
        ] {
            if let Some(v) = v {
                put(name, format_duration(v));
            }
        }
        if let Some(d) = self.retry_after {
            put(RETRY_AFTER_MS, d.as_millis().max(1).to_string());
            put(RETRY_AFTER, d.as_secs_f64().ceil().max(1.0).to_string());
        }
    }

    /// The hint these headers give, when they give both remainders.
    pub fn hint(&self) -> Option<ProviderHint> {
        Some(ProviderHint {
            remaining_tokens: i64::try_from(self.remaining_tokens?).unwrap_or(i64::MAX),
            remaining_requests: i64::try_from(self.remaining_requests?).unwrap_or(i64::MAX),
            reset_tokens: self.reset_tokens.unwrap_or_default(),
            reset_requests: self.reset_requests.unwrap_or_default(),
        })
    }
}

/// A duration as Go prints it, to the millisecond: `0s`, `20ms`, `1s`,
/// `1.5s`, `6m0s`, `1h2m3s`.
pub fn format_duration(d: Duration) -> String {
    let ms = d.as_millis();
    if ms == 0 {
        return "0s".into();
    }
    if ms < 1000 {
        return format!("{ms}ms");
    }
    let (h, rest) = (ms / 3_600_000, ms % 3_600_000);
    let (m, rest) = (rest / 60_000, rest % 60_000);
    let (s, frac) = (rest / 1000, rest % 1000);
    let mut out = String::new();
    if h > 0 {
        out += &format!("{h}h");
    }
    if h > 0 || m > 0 {
        out += &format!("{m}m");
    }
    out += &s.to_string();
    if frac > 0 {
        out += format!(".{frac:03}").trim_end_matches('0');
    }
    out.push('s');
    out
}

/// Reads a Go duration string: numbers (decimals allowed) each with a unit
/// of `h`, `m`, `s`, `ms`, `us`/`µs` or `ns`. `None` for anything else.
pub fn parse_duration(s: &str) -> Option<Duration> {
    if s.is_empty() || s.len() > 64 {
        return None;
    }
    let mut rest = s;
    let mut total = 0f64;
    while !rest.is_empty() {
        let digits = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .unwrap_or(rest.len());
        let number: f64 = rest[..digits].parse().ok()?;
        rest = &rest[digits..];
        let unit_len = rest
            .find(|c: char| c.is_ascii_digit() || c == '.')
            .unwrap_or(rest.len());
        let seconds = match &rest[..unit_len] {
            "h" => 3600.0,
            "m" => 60.0,
            "s" => 1.0,
            "ms" => 1e-3,
            "us" | "µs" => 1e-6,
            "ns" => 1e-9,
            _ => return None,
        };
        rest = &rest[unit_len..];
        total += number * seconds;
    }
    Duration::try_from_secs_f64(total).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_read_and_print_as_go_does() {
        let ms = Duration::from_millis;
        for (text, d) in [
            ("0s", ms(0)),
            ("20ms", ms(20)),
            ("1s", ms(1000)),
            ("1.5s", ms(1500)),
            ("6m0s", ms(360_000)),
            ("1h2m3.04s", ms(3_723_040)),
        ] {
            assert_eq!(format_duration(d), text);
            assert_eq!(parse_duration(text), Some(d), "{text}");
        }
        assert_eq!(parse_duration("250us"), Some(Duration::from_micros(250)));
        for bad in ["", "5", "1x", "s", "1..2s", "-1s"] {
            assert_eq!(parse_duration(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn headers_round_trip_into_a_hint() {
        let limits = RateLimits {
            limit_tokens: Some(90_000),
            limit_requests: Some(600),
            remaining_tokens: Some(1200),
            remaining_requests: Some(7),
            reset_tokens: Some(Duration::from_millis(59_200)),
            reset_requests: Some(Duration::from_millis(100)),
            retry_after: Some(Duration::from_millis(1500)),
        };
        let mut h = HeaderMap::new();
        limits.to_headers(&mut h);
        assert_eq!(h[RESET_TOKENS], "59.2s");
        assert_eq!(h[RETRY_AFTER_MS], "1500");
        assert_eq!(h[RETRY_AFTER], "2", "whole seconds, rounded up");
        assert_eq!(RateLimits::from_headers(&h), limits);
        let hint = limits.hint().unwrap();
        assert_eq!((hint.remaining_tokens, hint.remaining_requests), (1200, 7));
        assert_eq!(RateLimits::default().hint(), None);
    }

    #[test]
    fn retry_after_in_seconds_when_no_milliseconds() {
        let mut h = HeaderMap::new();
        h.insert(RETRY_AFTER, HeaderValue::from_static("3"));
        assert_eq!(
            RateLimits::from_headers(&h).retry_after,
            Some(Duration::from_secs(3))
        );
        h.insert(RETRY_AFTER_MS, HeaderValue::from_static("nonsense"));
        assert_eq!(
            RateLimits::from_headers(&h).retry_after,
            Some(Duration::from_secs(3))
        );
    }
}
