//! A Redis stall at the moment a job is about to be sent: the write that
//! says RUNNING (stored before anything goes to a region) times out, so
//! nothing is sent. The job must not end FAILED for the store's moment: it
//! waits, and once Redis answers it is queued again and runs. Redis runs
//! the timed-out write when it wakes, so the store then says RUNNING; the
//! replica knows its run sent nothing and does not take that for "may have
//! run".
//!
//! Real processes: a redis-server (`DEBUG SLEEP`), one dispatcher with
//! `[cluster]` keeping its jobs there, a region-sim that takes one call at
//! a time (`max_concurrent = 1`), so the second job waits for the first's
//! slot and is sent during the stall.

mod common;

use std::time::Duration;

use common::jobs::{kind, watch, with_key};
use common::redis::RedisServer;
use common::{ConfigDir, SimRegion, dispatcher, eventually};
use dispatcher::pb;
use dispatcher::pb::jobs_client::JobsClient;
use pb::job_event::Event;
use tonic::transport::Channel;

async fn submit(c: &mut JobsClient<Channel>, tokens: u64, repeatable: bool) -> String {
    let request = pb::SubmitJobRequest {
        request: Some(pb::DispatchRequest {
            model: "gpt-4o".into(),
            payload: "agent work".into(),
            prompt_tokens: 100,
            max_output_tokens: tokens,
            ..Default::default()
        }),
        repeatable,
        ..Default::default()
    };
    let job = c.submit_job(with_key(request, "k-alpha")).await.unwrap();
    job.into_inner().job_id
}

async fn state(c: &mut JobsClient<Channel>, id: &str) -> pb::Job {
    let r = pb::JobRef { job_id: id.into() };
    c.get_job(with_key(r, "k-alpha")).await.unwrap().into_inner()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_whose_running_write_stalls_is_queued_again_not_failed() {
    let redis = RedisServer::start_with_debug();
    let cfg = ConfigDir::new(&common::jobs::dispatcher_toml(
        "lease = \"30s\"",
        &format!(
            "[cluster]\nredis_url = \"{}\"\nreplica_id = \"r1\"\n\
             [routing]\nmax_queue_wait = \"30s\"\n\
             [telemetry]\nmetrics_listen = \"127.0.0.1:0\"",
            redis.url()
        ),
    ));
    let _sim = cfg.start_region(SimRegion {
        name: "r1",
        tokens_per_minute: 600_000_000,
        requests_per_minute: 6_000_000,
        accounting: "usage",
        max_concurrent: 1,
        sim_args: &["--ms-per-1k-tokens", "2000", "--completion-min-fraction", "1"],
        ..Default::default()
    });
    let d = dispatcher(&cfg.config());
    let mut c = JobsClient::connect(d.endpoint()).await.unwrap();

    // A call (not a job: it never touches the job store) holds the
    // region's one slot; the job waits in the queue behind it.
    let mut grpc = common::client(d.addr).await;
    let holder = pb::DispatchRequest {
        model: "gpt-4o".into(),
        payload: "holds the slot".into(),
        prompt_tokens: 100,
        max_output_tokens: 20_000,
        ..Default::default()
    };
    let mut holder = grpc
        .dispatch_stream(with_key(holder, "k-beta"))
        .await
        .unwrap()
        .into_inner();
    holder
        .message()
        .await
        .unwrap()
        .expect("the slot's holder streams");
    let job = submit(&mut c, 50, false).await;
    let queued = eventually(Duration::from_secs(10), || async {
        common::scrape_metrics(d.listener("metrics"))
            .lines()
            .any(|l| l.starts_with("dispatcher_queue_depth{") && l.ends_with(" 1"))
    })
    .await;
    assert!(queued.is_some(), "the job waits for the region's slot");

    // Redis stalls; then the slot frees: the job's write before its send
    // goes to a Redis that answers nothing, and times out.
    let sleeper = redis.debug_sleep(3.0);
    drop(holder);
    sleeper.join().unwrap();

    let terminal = eventually(Duration::from_secs(30), || {
        let mut c = c.clone();
        let job = job.clone();
        async move {
            let s = state(&mut c, &job).await.state();
            !matches!(s, pb::JobState::Queued | pb::JobState::Running)
        }
    })
    .await;
    assert!(terminal.is_some(), "the job ends");
    let ended = state(&mut c, &job).await;
    let history = watch(&mut c, &job, None).await;
    let described: Vec<String> = history
        .iter()
        .map(|e| match &e.event {
            Some(Event::Queued(q)) => format!("queued({})", q.reason),
            Some(Event::Ended(x)) => format!("ended({:?}: {})", x.state(), x.error_message),
            _ => kind(e).to_string(),
        })
        .collect();
    assert_eq!(
        ended.state(),
        pb::JobState::Done,
        "a job the stall kept from being sent runs once Redis answers; its history: {described:?}"
    );
    assert!(
        described
            .iter()
            .any(|e| e == "queued(queued again after the job store failed)"),
        "{described:?}"
    );
    assert_eq!(
        history.iter().filter(|e| kind(e) == "ended").count(),
        1,
        "{described:?}"
    );
}
