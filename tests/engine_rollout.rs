//! Rollouts through the engine, in process on a paused clock: a request
//! naming an alias is served by one of its targets and says so; a session
//! key keeps a conversation on one target; weights change live and a
//! reload puts the configured ones back.

mod common;

use std::collections::HashMap;

use common::engine::*;
use dispatcher::dispatch::hash_key;
use dispatcher::pb;

fn toml() -> String {
    format!(
        r#"[[models]]
name = "gpt-4o"
[[models]]
name = "mini"
[[rollouts]]
alias = "chat"
session_label = "session"
targets = [{{ model = "mini", weight = 90 }}, {{ model = "gpt-4o", weight = 10 }}]
[[tenants]]
name = "a"
keys = ["{a}"]
"#,
        a = hash_key("key-a"),
    )
}

fn world() -> (World, dispatcher::config::Config) {
    let region = region_toml(
        "r",
        "[[models]]\nname = \"gpt-4o\"\ntokens_per_minute = 60000000\nrequests_per_minute = 1000000\n\
         [[models]]\nname = \"mini\"\ntokens_per_minute = 60000000\nrequests_per_minute = 1000000\n",
    );
    let c = config(&toml(), &[region]);
    (World::start(&c), c)
}

fn chat(session: Option<&str>) -> pb::DispatchRequest {
    pb::DispatchRequest {
        model: "chat".into(),
        payload: "hi".into(),
        max_output_tokens: 10,
        labels: session
            .map(|s| HashMap::from([("session".to_string(), s.to_string())]))
            .unwrap_or_default(),
        ..Default::default()
    }
}

#[tokio::test(start_paused = true)]
async fn an_alias_splits_by_weight_sticks_per_session_and_changes_live() {
    let (w, c) = world();
    let mut by_target: HashMap<String, u32> = HashMap::new();
    for _ in 0..1000 {
        let d = w.engine.dispatch(chat(None), None, KEY_A).await.unwrap();
        assert_eq!(d.path.alias, "chat");
        assert!(d.path.tried.is_empty());
        *by_target.entry(d.path.model).or_default() += 1;
    }
    let mini = by_target["mini"];
    assert!((850..=950).contains(&mini), "{by_target:?}");
    // The cluster ran the target model.
    assert!(
        w.cluster("r")
            .seen()
            .iter()
            .all(|s| s.model == "mini" || s.model == "gpt-4o")
    );

    // Sessions stay on their target.
    let mut first: HashMap<String, String> = HashMap::new();
    for round in 0..5 {
        for i in 0..40 {
            let key = format!("conversation-{i}");
            let d = w.engine.dispatch(chat(Some(&key)), None, KEY_A).await.unwrap();
            let seen = first.entry(key).or_insert(d.path.model.clone());
            assert_eq!(*seen, d.path.model, "round {round}");
        }
    }

    // Live: all to gpt-4o, sessions included; a reload restores 90/10.
    w.engine
        .rollouts()
        .set_weights("chat", &[("mini".into(), 0.0)])
        .unwrap();
    for i in 0..40 {
        let d = w
            .engine
            .dispatch(chat(Some(&format!("conversation-{i}"))), None, KEY_A)
            .await
            .unwrap();
        assert_eq!(d.path.model, "gpt-4o");
    }
    w.engine.apply(&c, &endpoints(&c)).unwrap();
    for (key, target) in &first {
        let d = w.engine.dispatch(chat(Some(key)), None, KEY_A).await.unwrap();
        assert_eq!(d.path.model, *target, "back on its target after the reload");
    }
    let spec = &w.engine.rollouts().list()[0];
    assert_eq!(
        spec.targets,
        [("mini".to_string(), 90.0), ("gpt-4o".to_string(), 10.0)]
    );
}
