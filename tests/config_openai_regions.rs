//! Region files of OpenAI-compatible regions (`kind = "openai"`): each bad
//! setting refused naming the file and key, the key read from a file or
//! the environment and shown nowhere, defaults filled in.

use std::collections::HashMap;
use std::path::Path;

use dispatcher::config::{self, ConfigError, DEFAULT_AZURE_API_VERSION};
use dispatcher::openai::Dialect;

const KEY: &str = "sk-config-test-key-never-shown";

fn models() -> Vec<dispatcher::core::ModelSpec> {
    let text = "[auth]\nallow_anonymous = true\n[[models]]\nname = \"gpt-4o\"\n";
    config::parse_dispatcher(text, Path::new("dispatcher.toml"), Some(HashMap::new()))
        .unwrap()
        .models
}

/// A region file in `dir` with `extra` before its model, the key in
/// `dir/east.key`.
fn parse(dir: &Path, extra: &str, model_extra: &str) -> Result<config::RegionConfig, ConfigError> {
    std::fs::write(dir.join("east.key"), format!("{KEY}\n")).unwrap();
    let text = format!(
        "name = \"east\"\nendpoint = \"https://east.openai.azure.com\"\n{extra}\n[[models]]\nname = \"gpt-4o\"\ntokens_per_minute = 1000\nrequests_per_minute = 10\n{model_extra}\n"
    );
    config::parse_region(&text, &dir.join("east.toml"), &models())
}

fn err(extra: &str, model_extra: &str) -> ConfigError {
    let dir = tempfile::tempdir().unwrap();
    let e = parse(dir.path(), extra, model_extra).unwrap_err();
    let shown = e.to_string();
    println!("{shown}");
    assert!(shown.contains("east.toml"), "{shown}");
    assert!(!shown.contains(KEY), "the key in an error: {shown}");
    e
}

#[test]
fn an_azure_region_reads_its_key_from_a_file_and_fills_in_defaults() {
    let dir = tempfile::tempdir().unwrap();
    let r = parse(
        dir.path(),
        "kind = \"openai\"\ndialect = \"azure\"\napi_key_file = \"east.key\"",
        "provider_model = \"gpt4o-prod\"",
    )
    .unwrap();
    let o = r.openai.as_ref().unwrap();
    assert_eq!(o.dialect, Dialect::Azure);
    assert_eq!(o.api_version, DEFAULT_AZURE_API_VERSION);
    assert_eq!(o.provider_model("gpt-4o"), Some("gpt4o-prod"));
    assert_eq!(
        o.health_path,
        format!("/openai/models?api-version={DEFAULT_AZURE_API_VERSION}")
    );
    assert!(r.tls.is_some(), "https: the system's roots");
    assert!(!format!("{r:?}").contains(KEY), "the key in Debug");
    // OpenAI's dialect: the model's own name, /v1/models.
    let r = parse(dir.path(), "kind = \"openai\"\napi_key_file = \"east.key\"", "").unwrap();
    let o = r.openai.unwrap();
    assert_eq!(o.dialect, Dialect::OpenAi);
    assert_eq!(o.provider_model("gpt-4o"), Some("gpt-4o"));
    assert_eq!(o.health_path, "/v1/models");
    // An AgentCluster by default.
    assert!(parse(dir.path(), "", "").unwrap().openai.is_none());
}

#[test]
fn the_key_comes_from_the_environment_when_named() {
    // The environment is not changed here (`set_var` is unsafe): PATH
    // stands in for a variable holding the key.
    let dir = tempfile::tempdir().unwrap();
    let r = parse(dir.path(), "kind = \"openai\"\napi_key_env = \"PATH\"", "").unwrap();
    assert!(r.openai.is_some());
    let e = err(
        "kind = \"openai\"\napi_key_env = \"DISPATCHER_TEST_NO_SUCH_VARIABLE_27\"",
        "",
    );
    assert_eq!(e.key, "api_key_env");
    assert!(e.problem.contains("is not set"), "{e}");
}

#[test]
fn each_bad_setting_is_named() {
    let key = "api_key_file = \"east.key\"";
    let cases: &[(&str, &str, &str, &str)] = &[
        ("kind = \"grpc\"", "", "kind", "not a region kind"),
        ("kind = \"openai\"", "", "api_key_env", "missing"),
        (
            "kind = \"openai\"\napi_key_env = \"PATH\"\napi_key_file = \"east.key\"",
            "",
            "api_key_file",
            "not both",
        ),
        (
            "kind = \"openai\"\napi_key_file = \"missing.key\"",
            "",
            "api_key_file",
            "cannot read",
        ),
        (
            "kind = \"openai\"\ndialect = \"bedrock\"\nAPI",
            "",
            "dialect",
            "not a dialect",
        ),
        (
            "kind = \"openai\"\napi_version = \"2024-10-21\"\nAPI",
            "",
            "api_version",
            "only for dialect",
        ),
        (
            "kind = \"openai\"\ndialect = \"azure\"\napi_version = \"x y\"\nAPI",
            "",
            "api_version",
            "version",
        ),
        (
            "kind = \"openai\"\nhealth_path = \"models\"\nAPI",
            "",
            "health_path",
            "starting with /",
        ),
        (
            "kind = \"openai\"\nAPI",
            "provider_model = \"a b\"",
            "models[0].provider_model",
            "deployment name",
        ),
        ("dialect = \"azure\"", "", "dialect", "only for kind = \"openai\""),
        (
            "",
            "provider_model = \"x\"",
            "models[0].provider_model",
            "only for kind",
        ),
    ];
    for (extra, model_extra, k, problem) in cases {
        let e = err(&extra.replace("API", key), model_extra);
        assert_eq!(e.key, *k, "{e}");
        assert!(e.problem.contains(problem), "{e} should mention {problem:?}");
    }
    // The endpoint is the base URL.
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("east.key"), KEY).unwrap();
    let text = "name = \"east\"\nkind = \"openai\"\nendpoint = \"https://api.openai.com/v1\"\napi_key_file = \"east.key\"\n[[models]]\nname = \"gpt-4o\"\ntokens_per_minute = 1\nrequests_per_minute = 1\n";
    let e = config::parse_region(text, &dir.path().join("east.toml"), &models()).unwrap_err();
    assert_eq!(e.key, "endpoint", "{e}");
    assert!(e.problem.contains("without /v1"), "{e}");
    // An empty key file.
    std::fs::write(dir.path().join("empty.key"), "\n").unwrap();
    let text = text.replace("/v1", "").replace("east.key", "empty.key");
    let e = config::parse_region(&text, &dir.path().join("east.toml"), &models()).unwrap_err();
    assert_eq!(e.key, "api_key_file", "{e}");
    assert!(e.problem.contains("empty"), "{e}");
}

#[test]
fn the_shipped_azure_example_parses() {
    let text = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/regions/azure-eastus.toml.example"
    ))
    .unwrap();
    // Its key from a file here instead of the environment.
    let text = text.replace(
        "api_key_env = \"AZURE_OPENAI_KEY_EASTUS\"",
        "api_key_file = \"east.key\"",
    );
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("east.key"), KEY).unwrap();
    let r = config::parse_region(&text, &dir.path().join("azure-eastus.toml"), &models()).unwrap();
    let o = r.openai.unwrap();
    assert_eq!(o.dialect, Dialect::Azure);
    assert_eq!(o.provider_model("gpt-4o"), Some("gpt-4o-eastus"));
}
