//! What every validator shares: the file being checked (each refusal names
//! it and its key) and the checks of a duration, a number in range, a lower
//! bound and a name. The validators (`validate*.rs`, `tls.rs`) all use it;
//! it uses none of them.

use std::path::Path;
use std::time::Duration;

use super::ConfigError;

/// Names of regions, models and tenants are at most this long.
pub const MAX_NAME_LEN: usize = 64;

pub(super) struct Ctx<'a> {
    pub(super) file: &'a Path,
}

impl Ctx<'_> {
    pub(super) fn err(&self, key: impl Into<String>, problem: impl Into<String>) -> ConfigError {
        ConfigError::new(self.file, key, problem)
    }

    pub(super) fn duration(
        &self,
        key: &str,
        value: Option<&str>,
        default: Duration,
    ) -> Result<Duration, ConfigError> {
        match value {
            None => Ok(default),
            Some(s) => humantime::parse_duration(s).map_err(|e| {
                self.err(
                    key,
                    format!("{s:?} is not a duration like \"250ms\" or \"5s\": {e}"),
                )
            }),
        }
    }

    pub(super) fn number(
        &self,
        key: &str,
        value: Option<f64>,
        default: f64,
        lo: f64,
        hi: f64,
    ) -> Result<f64, ConfigError> {
        let v = value.unwrap_or(default);
        if v.is_finite() && (lo..=hi).contains(&v) {
            Ok(v)
        } else {
            Err(self.err(key, format!("{v} is out of range; expected {lo} to {hi}")))
        }
    }

    pub(super) fn at_least<T: PartialOrd + std::fmt::Display + Copy>(
        &self,
        key: &str,
        value: Option<T>,
        default: T,
        min: T,
    ) -> Result<T, ConfigError> {
        let v = value.unwrap_or(default);
        if v >= min {
            Ok(v)
        } else {
            Err(self.err(key, format!("must be at least {min}, got {v}")))
        }
    }

    pub(super) fn name(&self, key: &str, name: &str) -> Result<(), ConfigError> {
        let ok = !name.is_empty()
            && name.len() <= MAX_NAME_LEN
            && name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
        if ok {
            Ok(())
        } else {
            Err(self.err(
                key,
                format!("{name:?} is not a valid name (1 to {MAX_NAME_LEN} of a-z, A-Z, 0-9, '-', '_', '.')"),
            ))
        }
    }
}
