//! What the configuration tests share: a small valid dispatcher.toml and
//! region file, and the check that an error names its file, key and
//! problem.
#![allow(dead_code)]

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use dispatcher::config::{self, ConfigError};
use dispatcher::core::ModelSpec;

pub const DISPATCHER: &str = r#"
[auth]
allow_anonymous = true
[server]
listen = "127.0.0.1:0"
[[models]]
name = "gpt-4o"
[[models]]
name = "mini"
default_max_output_tokens = 100
"#;

pub const REGION: &str = r#"
name = "r1"
endpoint = "http://127.0.0.1:7000"
[[models]]
name = "gpt-4o"
tokens_per_minute = 1000
requests_per_minute = 10
"#;

pub fn models() -> Vec<ModelSpec> {
    config::parse_dispatcher(DISPATCHER, Path::new("dispatcher.toml"), Some(HashMap::new()))
        .unwrap()
        .models
}

pub fn dispatcher_err(text: &str) -> ConfigError {
    config::parse_dispatcher(text, Path::new("dispatcher.toml"), Some(HashMap::new())).unwrap_err()
}

pub fn region_err(text: &str) -> ConfigError {
    config::parse_region(text, Path::new("regions/r1.toml"), &models()).unwrap_err()
}

pub fn assert_names(e: &ConfigError, file: &str, key: &str, problem: &str) {
    let shown = e.to_string();
    println!("{shown}");
    assert_eq!(e.file, PathBuf::from(file), "{shown}");
    assert_eq!(e.key, key, "{shown}");
    assert!(e.problem.contains(problem), "{shown} should mention {problem:?}");
    assert!(shown.starts_with(&format!("{file}: {key}")), "{shown}");
}
