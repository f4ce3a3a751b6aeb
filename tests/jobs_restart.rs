//! kill -9 the dispatcher with 200 jobs queued or running (embedded store),
//! start it again on the same data directory: every job reaches a terminal
//! state, none is lost, none runs twice unless it was submitted repeatable
//! (counted at the region-sim, which lists every request id it admitted
//! more than once), and results stay readable.

mod common;

use std::collections::HashMap;
use std::time::Duration;

use common::{ConfigDir, SimRegion, dispatcher, eventually, sim_stats};
use dispatcher::pb;
use dispatcher::pb::jobs_client::JobsClient;
use tonic::transport::Channel;

const DISPATCHER_TOML: &str = r#"
[auth]
allow_anonymous = true
[[models]]
name = "gpt-4o"
max_request_tokens = 200000
[jobs]
data_dir = "data"
max_running = 40
max_running_per_tenant = 40
"#;

const JOBS: usize = 200;

async fn all_jobs(c: &mut JobsClient<Channel>) -> Vec<pb::Job> {
    let r = pb::ListJobsRequest {
        state: 0,
        limit: 1000,
    };
    c.list_jobs(r).await.unwrap().into_inner().jobs
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_with_jobs_queued_and_running_loses_none_and_runs_none_twice() {
    let cfg = ConfigDir::new(DISPATCHER_TOML);
    // 1 s per 1,000 tokens: each job (100 prompt + 400 output tokens) runs
    // about half a second; 40 at a time, so 200 take five waves.
    let sim = cfg.start_region(SimRegion {
        name: "r1",
        tokens_per_minute: 600_000_000,
        requests_per_minute: 6_000_000,
        accounting: "usage",
        sim_args: &[
            "--ms-per-1k-tokens",
            "1000",
            "--completion-min-fraction",
            "1",
            "--capacity",
            "256",
        ],
        ..Default::default()
    });
    let mut d = dispatcher(&cfg.config());
    let mut c = JobsClient::connect(format!("http://{}", d.addr)).await.unwrap();
    let mut repeatable = HashMap::new();
    for i in 0..JOBS {
        let r = pb::SubmitJobRequest {
            request: Some(pb::DispatchRequest {
                model: "gpt-4o".into(),
                payload: format!("job {i}").into(),
                prompt_tokens: 100,
                max_output_tokens: 400,
                ..Default::default()
            }),
            idempotency_key: String::new(),
            // One in four may run again.
            repeatable: i % 4 == 0,
        };
        let job = c.submit_job(r).await.unwrap().into_inner();
        repeatable.insert(job.job_id, i % 4 == 0);
    }
    // Kill it while some run and many wait.
    let mut c2 = c.clone();
    eventually(Duration::from_secs(20), || {
        let mut c = c2.clone();
        async move {
            let jobs = all_jobs(&mut c).await;
            let n = |s| jobs.iter().filter(|j| j.state() == s).count();
            n(pb::JobState::Running) >= 20 && n(pb::JobState::Queued) >= 40
        }
    })
    .await
    .expect("jobs running and queued before the kill");
    let before = all_jobs(&mut c2).await;
    d.kill();
    let running_at_kill = before
        .iter()
        .filter(|j| j.state() == pb::JobState::Running)
        .count();
    let queued_at_kill = before
        .iter()
        .filter(|j| j.state() == pb::JobState::Queued)
        .count();

    let d = dispatcher(&cfg.config());
    let mut c = JobsClient::connect(format!("http://{}", d.addr)).await.unwrap();
    c2 = c.clone();
    eventually(Duration::from_secs(30), || {
        let mut c = c2.clone();
        async move {
            all_jobs(&mut c)
                .await
                .iter()
                .all(|j| dispatcher::jobs::record::is_terminal(j.state()))
        }
    })
    .await
    .expect("every job reaches a terminal state after the restart");
    let after = all_jobs(&mut c).await;
    assert_eq!(after.len(), JOBS, "none lost");
    let mut interrupted = 0;
    let mut ran_again = 0;
    for j in &after {
        assert!(repeatable.contains_key(&j.job_id), "{j:?}");
        if j.repeatable {
            assert_eq!(j.state(), pb::JobState::Done, "{j:?}");
            assert!(j.runs <= 2, "{j:?}");
            ran_again += (j.runs == 2) as usize;
        } else {
            assert!(j.runs <= 1, "never run twice: {j:?}");
            match j.state() {
                pb::JobState::Done => {}
                pb::JobState::Interrupted => {
                    interrupted += 1;
                    assert!(j.error_message.contains("not submitted as repeatable"), "{j:?}");
                }
                s => panic!("{s:?}: {j:?}"),
            }
        }
    }
    // The kill found jobs running: the non-repeatable ones among them ended
    // INTERRUPTED, the repeatable ones ran again.
    assert!(
        interrupted > 0 && ran_again > 0,
        "{interrupted} interrupted, {ran_again} ran again"
    );
    assert!(
        interrupted + ran_again <= running_at_kill,
        "{interrupted} + {ran_again} > {running_at_kill}"
    );
    // At the region: only repeatable jobs were ever admitted twice.
    let stats = sim_stats(sim.addr).await;
    for id in &stats.repeated_request_ids {
        assert_eq!(
            repeatable.get(id),
            Some(&true),
            "{id} ran twice and is not repeatable"
        );
    }
    assert!(stats.repeated_request_ids.len() <= ran_again);
    // The results are readable.
    let done = after.iter().find(|j| j.state() == pb::JobState::Done).unwrap();
    let got = c
        .get_job(pb::JobRef {
            job_id: done.job_id.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(!got.output.is_empty());
    eprintln!(
        "at the kill: {running_at_kill} running, {queued_at_kill} queued; after: {interrupted} interrupted, {ran_again} repeatable ran again, {} repeated at the region",
        stats.repeated_request_ids.len()
    );
}
