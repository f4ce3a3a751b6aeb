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

    /// `price = { input, output, cached_input }` (per million tokens; the
    /// cached input costs as the input unless given).
    pub(super) fn price(
        &self,
        key: &str,
        raw: super::raw::RawPrice,
    ) -> Result<crate::core::Price, ConfigError> {
        const MAX_PER_MILLION: f64 = 1e6;
        let amount = |k: &str, v: Option<f64>| -> Result<Option<u64>, ConfigError> {
            v.map(|v| crate::core::cost::micros_from_amount(v, MAX_PER_MILLION))
                .transpose()
                .map_err(|e| self.err(format!("{key}.{k}"), e))
        };
        let input = amount("input", raw.input)?;
        let output = amount("output", raw.output)?;
        let cached_input = amount("cached_input", raw.cached_input)?;
        if input.is_none() && output.is_none() {
            return Err(self.err(
                key,
                "give input and output (per million tokens, in [pricing] currency), or leave the price out",
            ));
        }
        let input = input.unwrap_or(0);
        Ok(crate::core::Price {
            input,
            output: output.unwrap_or(0),
            cached_input: cached_input.unwrap_or(input),
        })
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
