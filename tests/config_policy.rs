//! Policy settings (capacity rules, rollouts, fallback chains) are checked
//! like the rest: a bad one is refused with the file, the key and the
//! problem.

use std::collections::HashMap;
use std::path::Path;

use dispatcher::config::{self, ConfigError};
use dispatcher::core::{CapacityAction, CapacitySignal, ModelSpec};

const DISPATCHER: &str = r#"
[auth]
allow_anonymous = true
[[models]]
name = "gpt-4o"
[[models]]
name = "mini"
"#;

const REGION: &str = r#"
name = "r1"
endpoint = "http://127.0.0.1:7000"
[[models]]
name = "gpt-4o"
tokens_per_minute = 1000
requests_per_minute = 10
"#;

fn models() -> Vec<ModelSpec> {
    config::parse_dispatcher(DISPATCHER, Path::new("dispatcher.toml"), Some(HashMap::new()))
        .unwrap()
        .models
}

fn region_err(extra: &str) -> ConfigError {
    let text = format!("{REGION}{extra}");
    config::parse_region(&text, Path::new("regions/r1.toml"), &models()).unwrap_err()
}

fn assert_names(e: &ConfigError, key: &str, problem: &str) {
    let text = e.to_string();
    assert!(text.contains("regions/r1.toml"), "{text}");
    assert!(text.contains(key), "{text}");
    assert!(text.contains(problem), "{text}");
}

#[test]
fn a_capacity_rule_is_read_with_its_defaults() {
    let text = format!("{REGION}[[capacity]]\nmodel = \"gpt-4o\"\naction = \"redistribute\"\nfor = \"2s\"\n");
    let r = config::parse_region(&text, Path::new("regions/r1.toml"), &models()).unwrap();
    let rule = &r.capacity[0];
    assert_eq!(rule.region, "r1");
    assert_eq!(rule.model.as_deref(), Some("gpt-4o"));
    assert_eq!(rule.signal, CapacitySignal::Utilization);
    assert_eq!(rule.action, CapacityAction::Redistribute);
    assert_eq!((rule.enter, rule.exit, rule.weight_factor), (0.9, 0.7, 0.5));
    assert_eq!(rule.duration, std::time::Duration::from_secs(2));
}

#[test]
fn bad_capacity_rules_name_file_and_key() {
    assert_names(&region_err("[[capacity]]\n"), "capacity[0].action", "missing");
    assert_names(
        &region_err("[[capacity]]\naction = \"panic\"\n"),
        "capacity[0].action",
        "unknown action",
    );
    assert_names(
        &region_err("[[capacity]]\naction = \"alert\"\nenter = 0.5\nexit = 0.6\n"),
        "capacity[0].exit",
        "must be below enter",
    );
    assert_names(
        &region_err("[[capacity]]\naction = \"alert\"\nenter = 1.5\n"),
        "capacity[0].enter",
        "out of range",
    );
    assert_names(
        &region_err("[[capacity]]\naction = \"alert\"\nmodel = \"mini\"\n"),
        "capacity[0].model",
        "does not serve",
    );
    assert_names(
        &region_err("[[capacity]]\naction = \"alert\"\nfor = \"soon\"\n"),
        "capacity[0].for",
        "not a duration",
    );
    assert_names(
        &region_err("[[capacity]]\naction = \"alert\"\nweight_factor = 0.5\n"),
        "capacity[0].weight_factor",
        "redistribute",
    );
    assert_names(
        &region_err("[[capacity]]\naction = \"alert\"\nsignal = \"vibes\"\n"),
        "capacity[0].signal",
        "unknown signal",
    );
}

fn dispatcher_err(extra: &str) -> ConfigError {
    let text = format!("{DISPATCHER}{extra}");
    config::parse_dispatcher(&text, Path::new("dispatcher.toml"), Some(HashMap::new())).unwrap_err()
}

fn assert_dispatcher(e: &ConfigError, key: &str, problem: &str) {
    let text = e.to_string();
    assert!(text.starts_with(&format!("dispatcher.toml: {key}")), "{text}");
    assert!(text.contains(problem), "{text}");
}

#[test]
fn rollouts_and_fallbacks_are_read() {
    let text = format!(
        "{DISPATCHER}[[rollouts]]\nalias = \"chat\"\nsession_label = \"session\"\ntargets = [{{ model = \"mini\", weight = 90 }}, {{ model = \"gpt-4o\", weight = 10 }}]\n\
         [[fallbacks]]\nmodel = \"gpt-4o\"\nthen = [\"mini\"]\non = [\"no_quota\"]\n"
    );
    let c = config::parse_dispatcher(&text, Path::new("dispatcher.toml"), Some(HashMap::new())).unwrap();
    assert_eq!(c.policy.rollouts[0].targets[0], ("mini".to_string(), 90.0));
    assert_eq!(c.policy.fallbacks[0].then, ["mini"]);
    assert_eq!(c.policy.fallbacks[0].on, [dispatcher::core::Trigger::NoQuota]);
}

#[test]
fn bad_rollouts_and_fallbacks_name_file_and_key() {
    let target = |m: &str, w: &str| {
        format!("[[rollouts]]\nalias = \"chat\"\ntargets = [{{ model = \"{m}\", weight = {w} }}]\n")
    };
    assert_dispatcher(
        &dispatcher_err(&target("opus", "1")),
        "rollouts[0].targets[0].model",
        "unknown model",
    );
    assert_dispatcher(
        &dispatcher_err(&target("mini", "-1")),
        "rollouts[0].targets[0].weight",
        "out of range",
    );
    assert_dispatcher(
        &dispatcher_err(&target("mini", "0")),
        "rollouts[0].targets",
        "above 0",
    );
    assert_dispatcher(
        &dispatcher_err("[[rollouts]]\nalias = \"mini\"\ntargets = [{ model = \"gpt-4o\", weight = 1 }]\n"),
        "rollouts[0].alias",
        "a model's name",
    );
    assert_dispatcher(
        &dispatcher_err("[[fallbacks]]\nmodel = \"gpt-4o\"\nthen = [\"gpt-4o\"]\n"),
        "fallbacks[0].then[0]",
        "already in the chain",
    );
    assert_dispatcher(
        &dispatcher_err("[[fallbacks]]\nmodel = \"gpt-4o\"\nthen = [\"mini\"]\non = [\"always\"]\n"),
        "fallbacks[0].on[0]",
        "unknown trigger",
    );
    assert_dispatcher(
        &dispatcher_err("[[fallbacks]]\nmodel = \"gpt-4o\"\nthen = []\n"),
        "fallbacks[0].then",
        "needs 1",
    );
    assert_dispatcher(
        &dispatcher_err(
            "[[fallbacks]]\nmodel = \"gpt-4o\"\nthen = [\"mini\"]\nfirst_byte_timeout = \"soon\"\n",
        ),
        "fallbacks[0].first_byte_timeout",
        "not a duration",
    );
}

/// A self-loop was refused but A → B → A was accepted: every loop through
/// the chains is refused, naming the step that closes it and the models
/// around it (a reload reads the file through the same check).
#[test]
fn a_loop_through_fallback_chains_is_refused_naming_it() {
    let chain = |model: &str, then: &str| format!("[[fallbacks]]\nmodel = \"{model}\"\nthen = [{then}]\n");
    assert_dispatcher(
        &dispatcher_err(&(chain("gpt-4o", "\"mini\"") + &chain("mini", "\"gpt-4o\""))),
        "fallbacks[1].then[0]",
        "closes a loop of fallback chains: gpt-4o → mini → gpt-4o",
    );
    let three = "[[models]]\nname = \"opus\"\n[[models]]\nname = \"haiku\"\n".to_string()
        + &chain("gpt-4o", "\"haiku\", \"mini\"")
        + &chain("mini", "\"opus\"")
        + &chain("opus", "\"haiku\", \"gpt-4o\"");
    assert_dispatcher(
        &dispatcher_err(&three),
        "fallbacks[2].then[1]",
        "gpt-4o → mini → opus → gpt-4o",
    );
    // Chains that share a model without a loop are fine.
    let shared = "[[models]]\nname = \"opus\"\n".to_string()
        + &chain("gpt-4o", "\"mini\", \"opus\"")
        + &chain("mini", "\"opus\"");
    config::parse_dispatcher(
        &format!("{DISPATCHER}{shared}"),
        Path::new("dispatcher.toml"),
        Some(HashMap::new()),
    )
    .unwrap();
}

#[test]
fn a_reload_reports_policy_and_capacity_changes() {
    let parse = |extra: &str| {
        config::parse_dispatcher(
            &format!("{DISPATCHER}{extra}"),
            Path::new("dispatcher.toml"),
            Some(HashMap::new()),
        )
        .unwrap()
    };
    let chain = "[[fallbacks]]\nmodel = \"gpt-4o\"\nthen = [\"mini\"]\n";
    let old = parse("");
    let new = parse(chain);
    let shown: Vec<String> = config::changes(&old, &new)
        .iter()
        .map(|c| c.to_string())
        .collect();
    assert!(
        shown.iter().any(|c| c.starts_with("changed policy: fallbacks")),
        "{shown:?}"
    );

    let mut old = parse("");
    let mut new = parse("");
    let region = |extra: &str| {
        let text = format!("{REGION}{extra}");
        config::parse_region(&text, Path::new("regions/r1.toml"), &models()).unwrap()
    };
    old.regions = vec![region("")];
    new.regions = vec![region("[[capacity]]\naction = \"alert\"\n")];
    let shown: Vec<String> = config::changes(&old, &new)
        .iter()
        .map(|c| c.to_string())
        .collect();
    assert!(
        shown.iter().any(|c| c.contains("capacity rules (0 → 1)")),
        "{shown:?}"
    );
}
