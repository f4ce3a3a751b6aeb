//! Reading and parsing the files with the `config` crate (TOML, plus
//! `DISPATCHER__SECTION__KEY` environment overrides for dispatcher.toml).

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use config::{Environment, File, FileFormat};
use serde::de::DeserializeOwned;

use super::raw::{RawDispatcher, RawRegion};
use super::validate::validate_dispatcher;
use super::validate_region::validate_region;
use super::{Config, ConfigError, ConfigErrors, RegionConfig};
use crate::core::ModelSpec;

/// The prefix of environment overrides: `DISPATCHER__SERVER__LISTEN=...`.
pub const ENV_PREFIX: &str = "DISPATCHER";

/// Reads dispatcher.toml (with environment overrides) and every region file.
pub fn load(path: &Path) -> Result<Config, ConfigErrors> {
    let text = read(path)?;
    let mut config = parse_dispatcher(&text, path, None)?;
    config.regions = load_regions(&config.server.regions_dir, &config.models)?;
    Ok(config)
}

fn read(path: &Path) -> Result<String, ConfigError> {
    std::fs::read_to_string(path).map_err(|e| ConfigError::new(path, "", format!("cannot read: {e}")))
}

/// Parses and validates dispatcher.toml. `env` replaces the process
/// environment for overrides (tests); `None` reads the real one. The result
/// has no regions yet.
pub fn parse_dispatcher(
    text: &str,
    file: &Path,
    env: Option<HashMap<String, String>>,
) -> Result<Config, ConfigError> {
    let environment = Environment::with_prefix(ENV_PREFIX)
        .prefix_separator("__")
        .separator("__")
        .try_parsing(true)
        .source(env);
    let raw: RawDispatcher = deserialize(text, file, Some(environment))?;
    validate_dispatcher(raw, file)
}

/// Parses and validates one region file against the declared models.
pub fn parse_region(text: &str, file: &Path, models: &[ModelSpec]) -> Result<RegionConfig, ConfigError> {
    let raw: RawRegion = deserialize(text, file, None)?;
    validate_region(raw, file, models)
}

/// Every `*.toml` in `dir`, in name order; all problems reported together, and
/// a region name used by two files is an error naming both.
pub fn load_regions(dir: &Path, models: &[ModelSpec]) -> Result<Vec<RegionConfig>, ConfigErrors> {
    let entries = std::fs::read_dir(dir)
        .map_err(|e| ConfigError::new(dir, "", format!("cannot read the regions directory: {e}")))?;
    let mut files: Vec<PathBuf> = entries
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "toml") && p.is_file())
        .collect();
    files.sort();
    if files.is_empty() {
        return Err(ConfigError::new(dir, "", "no region files (*.toml) in the regions directory").into());
    }
    let mut regions: Vec<RegionConfig> = Vec::new();
    let mut errors = Vec::new();
    for file in files {
        match read(&file).and_then(|text| parse_region(&text, &file, models)) {
            Ok(region) => {
                if let Some(other) = regions.iter().find(|r| r.spec.name == region.spec.name) {
                    errors.push(ConfigError::new(
                        &file,
                        "name",
                        format!(
                            "region {:?} is already defined in {}",
                            region.spec.name,
                            other.file.display()
                        ),
                    ));
                } else {
                    regions.push(region);
                }
            }
            Err(e) => errors.push(e),
        }
    }
    if errors.is_empty() {
        Ok(regions)
    } else {
        Err(ConfigErrors(errors))
    }
}

fn deserialize<T: DeserializeOwned>(
    text: &str,
    file: &Path,
    env: Option<Environment>,
) -> Result<T, ConfigError> {
    let mut builder = config::Config::builder().add_source(File::from_str(text, FileFormat::Toml));
    if let Some(env) = env {
        builder = builder.add_source(env);
    }
    builder
        .build()
        .and_then(|c| c.try_deserialize())
        .map_err(|e| name_unknown_key(from_config_error(file, e)))
}

/// serde names a misspelled key only in its message ("unknown field
/// `max_concurent`, expected ..."), under the table's key: the key becomes
/// the full path of the misspelled one, so the error names it once.
fn name_unknown_key(mut e: ConfigError) -> ConfigError {
    let Some(rest) = e.problem.strip_prefix("unknown field `") else {
        return e;
    };
    let Some((name, expected)) = rest.split_once('`') else {
        return e;
    };
    e.key = if e.key.is_empty() {
        name.to_string()
    } else {
        format!("{}.{name}", e.key)
    };
    let expected = expected.trim_start_matches(',').trim();
    e.problem = if expected.is_empty() {
        "unknown key".to_string()
    } else {
        format!("unknown key (misspelled?); {expected}")
    };
    e
}

/// A TOML syntax error on one line: where, and what is wrong (the crate's
/// message spans lines with a snippet of the file).
fn toml_syntax(cause: &str) -> String {
    let lines: Vec<&str> = cause.lines().map(str::trim).filter(|l| !l.is_empty()).collect();
    let at = lines
        .first()
        .and_then(|l| l.split_once(" at "))
        .map(|(_, at)| at.to_string());
    let what = lines.last().copied().unwrap_or("");
    // The snippet's line of the file ("6 | key = value"), quoted short.
    let text = lines.iter().find_map(|l| {
        let (n, rest) = l.split_once(" | ")?;
        n.trim().parse::<u64>().ok()?;
        Some(crate::excerpt::truncate(rest.trim(), 80).into_owned())
    });
    match (at, text) {
        (Some(at), Some(text)) if lines.len() > 1 => format!("not valid TOML at {at} (`{text}`): {what}"),
        (Some(at), None) if lines.len() > 1 => format!("not valid TOML at {at}: {what}"),
        _ => format!("not valid TOML: {}", lines.join(" ")),
    }
}

/// Pulls the key out of the `config` crate's error so the message reads
/// "file: key: problem".
fn from_config_error(file: &Path, e: config::ConfigError) -> ConfigError {
    match e {
        config::ConfigError::Type {
            key,
            unexpected,
            expected,
            ..
        } => ConfigError::new(
            file,
            normalize_key(&key.unwrap_or_default()),
            format!("expected {expected}, found {unexpected}"),
        ),
        config::ConfigError::At { error, key, .. } => {
            let mut inner = from_config_error(file, *error);
            if inner.key.is_empty() {
                inner.key = normalize_key(&key.unwrap_or_default());
            }
            inner
        }
        config::ConfigError::NotFound(key) => {
            ConfigError::new(file, normalize_key(&key), "missing (required)")
        }
        config::ConfigError::FileParse { cause, .. } => {
            ConfigError::new(file, "", toml_syntax(&cause.to_string()))
        }
        other => ConfigError::new(file, "", other.to_string()),
    }
}

/// The `config` crate writes `models[0]tokens_per_minute`; operators read
/// `models[0].tokens_per_minute`.
fn normalize_key(key: &str) -> String {
    let mut out = String::with_capacity(key.len() + 4);
    let mut after_index = false;
    for c in key.chars() {
        if after_index && c != '.' && c != '[' {
            out.push('.');
        }
        after_index = c == ']';
        out.push(c);
    }
    out
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    #[test]
    fn a_syntax_error_is_one_line_with_line_and_column() {
        let e = super::deserialize::<std::collections::BTreeMap<String, String>>(
            "name = \"x\"\nendpoint = \n",
            Path::new("r.toml"),
            None,
        )
        .unwrap_err();
        assert_eq!(e.key, "");
        assert_eq!(
            e.problem,
            "not valid TOML at line 2, column 12 (`endpoint =`): string values must be quoted, expected literal string"
        );
        assert!(!e.to_string().contains('\n'), "{e}");
    }

    #[test]
    fn a_misspelled_key_is_named_by_its_path() {
        #[derive(serde::Deserialize, Debug)]
        #[serde(deny_unknown_fields)]
        #[allow(dead_code)]
        struct Inner {
            max_concurrent: u32,
        }
        #[derive(serde::Deserialize, Debug)]
        #[serde(deny_unknown_fields)]
        #[allow(dead_code)]
        struct Outer {
            auth: Inner,
        }
        let e = super::deserialize::<Outer>("[auth]\nmax_concurent = 5\n", Path::new("d.toml"), None)
            .unwrap_err();
        assert_eq!(e.key, "auth.max_concurent");
        assert_eq!(e.problem, "unknown key (misspelled?); expected `max_concurrent`");
        let e = super::deserialize::<Inner>("max_concurent = 5\n", Path::new("d.toml"), None).unwrap_err();
        assert_eq!(e.key, "max_concurent");
    }

    #[test]
    fn normalizes_indexed_keys() {
        assert_eq!(
            super::normalize_key("models[0]tokens_per_minute"),
            "models[0].tokens_per_minute"
        );
        assert_eq!(super::normalize_key("a.b[1][2]c"), "a.b[1][2].c");
        assert_eq!(super::normalize_key("server.listen"), "server.listen");
    }
}
