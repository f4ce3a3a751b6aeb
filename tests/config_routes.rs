//! `[[routes]]` are checked like the rest of the policy: a bad one is
//! refused with the file, the key and the problem; the commented example
//! in the shipped dispatcher.toml validates once uncommented.

use std::collections::HashMap;
use std::path::Path;

use dispatcher::config::{self, Config, ConfigError};
use dispatcher::core::{RouteRule, RouteSpec};

const DISPATCHER: &str = r#"
[auth]
allow_anonymous = true
[[models]]
name = "gpt-4o"
[[models]]
name = "mini"
[[rollouts]]
alias = "chat"
targets = [{ model = "mini", weight = 1 }]
"#;

fn parse(extra: &str) -> Result<Config, ConfigError> {
    let text = format!("{DISPATCHER}{extra}");
    config::parse_dispatcher(&text, Path::new("dispatcher.toml"), Some(HashMap::new()))
}

fn assert_refused(extra: &str, key: &str, problem: &str) {
    let text = parse(extra).unwrap_err().to_string();
    assert!(text.contains("dispatcher.toml"), "{text}");
    assert!(text.contains(key), "{key}: {text}");
    assert!(text.contains(problem), "{problem}: {text}");
}

#[test]
fn a_route_is_read_with_its_rules() {
    let c = parse(
        r#"[[routes]]
name = "assistant"
candidates = ["gpt-4o", "chat", "mini"]
[[routes.rules]]
labels = { class = "classify", tier = "free" }
use = ["mini", "chat"]
"#,
    )
    .unwrap();
    assert_eq!(
        c.policy.routes,
        [RouteSpec {
            name: "assistant".into(),
            candidates: vec!["gpt-4o".into(), "chat".into(), "mini".into()],
            rules: vec![RouteRule {
                labels: vec![
                    ("class".into(), "classify".into()),
                    ("tier".into(), "free".into())
                ],
                candidates: vec!["mini".into(), "chat".into()],
            }],
        }]
    );
}

#[test]
fn bad_routes_are_refused_naming_the_key() {
    let route = |body: &str| format!("[[routes]]\nname = \"assistant\"\n{body}");
    assert_refused(
        &route("candidates = [\"gpt-5\"]\n"),
        "routes[0].candidates[0]",
        "unknown model \"gpt-5\"",
    );
    assert_refused(
        &route("candidates = [\"mini\", \"mini\"]\n"),
        "routes[0].candidates[1]",
        "listed twice",
    );
    assert_refused(
        &route("candidates = []\n"),
        "routes[0].candidates",
        "needs 1 to 32",
    );
    assert_refused(
        "[[routes]]\nname = \"mini\"\ncandidates = [\"gpt-4o\"]\n",
        "routes[0].name",
        "a name of its own",
    );
    assert_refused(
        "[[routes]]\nname = \"chat\"\ncandidates = [\"gpt-4o\"]\n",
        "routes[0].name",
        "a name of its own",
    );
    assert_refused(
        &format!(
            "{}{}",
            route("candidates = [\"mini\"]\n"),
            route("candidates = [\"mini\"]\n")
        ),
        "routes[1].name",
        "used twice",
    );
    assert_refused(
        &route("candidates = [\"mini\"]\n[[routes.rules]]\nlabels = { class = \"x\" }\nuse = [\"gpt-4o\"]\n"),
        "routes[0].rules[0].use[0]",
        "not a candidate of this route",
    );
    assert_refused(
        &route("candidates = [\"mini\"]\n[[routes.rules]]\nlabels = {}\nuse = [\"mini\"]\n"),
        "routes[0].rules[0].labels",
        "needs 1 to 8 labels",
    );
    assert_refused(
        &route("candidates = [\"mini\"]\n[[routes.rules]]\nlabels = { x = \"y\" }\nuse = []\n"),
        "routes[0].rules[0].use",
        "names no candidate",
    );
    assert_refused(
        &route("candidates = [\"mini\"]\n[[routes.rules]]\nlabels = { \"a b\" = \"y\" }\nuse = [\"mini\"]\n"),
        "routes[0].rules[0].labels.a b",
        "not a valid name",
    );
    // A typo is an error, not a silently ignored key.
    let e = parse(&route("candidates = [\"mini\"]\nmax_cost = 1\n")).unwrap_err();
    assert!(e.to_string().contains("max_cost"), "{e}");
}

/// The shipped dispatcher.toml's commented policy examples (rollout,
/// fallback chain, route), uncommented, validate together.
#[test]
fn the_shipped_route_example_validates() {
    let shipped = include_str!("../dispatcher.toml");
    fn key_or_table(l: &str) -> Option<&str> {
        let l = l.strip_prefix("# ")?;
        let ident = l.split(" = ").next()?;
        let is_key = l.contains(" = ") && ident.chars().all(|c| c.is_ascii_lowercase() || c == '_');
        (l.starts_with("[[") || is_key).then_some(l)
    }
    let start = shipped.find("# [[rollouts]]").expect("a rollout example");
    let end = shipped[start..].find("\n[").expect("the next table") + start;
    let block: Vec<&str> = shipped[start..end].lines().filter_map(key_or_table).collect();
    let text = block.join("\n");
    assert!(text.contains("[[routes]]"), "the example has a route:\n{text}");
    // Tables of arrays may come anywhere: appended to the file as shipped.
    let whole = format!("{shipped}\n{text}\n");
    let c = config::parse_dispatcher(&whole, Path::new("dispatcher.toml"), Some(HashMap::new()))
        .unwrap_or_else(|e| panic!("{e}\n{text}"));
    assert_eq!(c.policy.routes.len(), 1);
    assert!(!c.policy.routes[0].rules.is_empty());
}
