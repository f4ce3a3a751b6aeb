//! Jobs served by an OpenAI-compatible region (`kind = "openai"`, a real
//! `region-sim --openai`): the run streams the provider's events, each
//! WatchJob output event carries one of them verbatim, and the finished
//! job's output is those events one per line (JSON Lines), the usage event
//! last, so a client can read it back; run together they were one
//! unreadable string of JSON objects.

mod common;

use std::time::Duration;

use common::jobs::{kind, with_key};
use common::openai::{east_region, quick_east};
use common::{ConfigDir, dispatcher, eventually};
use dispatcher::pb;
use dispatcher::pb::jobs_client::JobsClient;
use pb::job_event::Event;

const KEY: &str = "sk-e2e-openai-jobs-0123456789";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_jobs_output_from_an_openai_region_is_its_events_one_per_line() {
    let cfg = ConfigDir::new(&common::jobs::dispatcher_toml("", ""));
    let (sim, key_file) = quick_east(&cfg, KEY);
    east_region(&cfg, &sim.endpoint(), &key_file);
    let d = dispatcher(&cfg.config());
    let mut c = JobsClient::connect(d.endpoint()).await.unwrap();

    let submit = pb::SubmitJobRequest {
        request: Some(pb::DispatchRequest {
            model: "gpt-4o".into(),
            payload: r#"{"messages":[{"role":"user","content":"Write a long answer."}]}"#.into(),
            max_output_tokens: 200,
            ..Default::default()
        }),
        ..Default::default()
    };
    let id = c
        .submit_job(with_key(submit, "k-alpha"))
        .await
        .unwrap()
        .into_inner()
        .job_id;
    let get = |mut c: JobsClient<_>, id: String| async move {
        let r = pb::JobRef { job_id: id };
        c.get_job(with_key(r, "k-alpha")).await.unwrap().into_inner()
    };
    let done = eventually(Duration::from_secs(10), || {
        let (c, id) = (c.clone(), id.clone());
        async move { get(c, id).await.state() == pb::JobState::Done }
    })
    .await;
    let job = get(c.clone(), id.clone()).await;
    assert!(done.is_some(), "the job ends DONE: {job:?}");

    let text = String::from_utf8(job.output.to_vec()).unwrap();
    let events: Vec<serde_json::Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|_| panic!("not one event a line: {text}")))
        .collect();
    assert!(events.len() > 2, "{text}");
    assert!(
        events.iter().all(|e| e["object"] == "chat.completion.chunk"),
        "{text}"
    );
    let usage = &events.last().unwrap()["usage"];
    assert_eq!(
        usage["completion_tokens"].as_u64(),
        job.usage.map(|u| u.completion_tokens),
        "the usage event is last: {text}"
    );

    // Each output event of WatchJob: one event of the provider's, verbatim.
    let r = pb::WatchJobRequest {
        job_id: id,
        from_seq: 0,
    };
    let mut watch = c.watch_job(with_key(r, "k-alpha")).await.unwrap().into_inner();
    let mut outputs = 0;
    while let Some(e) = watch.message().await.unwrap() {
        if let Some(Event::Output(o)) = &e.event {
            let v: serde_json::Value = serde_json::from_slice(&o.output).unwrap();
            assert_eq!(v["object"], "chat.completion.chunk", "{}", kind(&e));
            outputs += 1;
        }
    }
    assert_eq!(outputs, events.len());
}
