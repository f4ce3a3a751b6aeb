//! A graceful shutdown (SIGTERM) with jobs: the jobs at a region finish
//! (DONE) within the grace, the queued ones stay queued in the store and run
//! after the next start; none runs twice, none is lost. New submissions
//! during the shutdown are refused UNAVAILABLE.

mod common;

use std::time::Duration;

use common::{ConfigDir, SimRegion, dispatcher, eventually, sim_stats};
use dispatcher::pb;
use dispatcher::pb::jobs_client::JobsClient;
use tonic::transport::Channel;

const DISPATCHER_TOML: &str = r#"
[server]
shutdown_grace = "20s"
[auth]
allow_anonymous = true
[[models]]
name = "gpt-4o"
max_request_tokens = 200000
[jobs]
data_dir = "data"
max_running = 2
"#;

fn job() -> pb::SubmitJobRequest {
    pb::SubmitJobRequest {
        request: Some(pb::DispatchRequest {
            model: "gpt-4o".into(),
            payload: "x".into(),
            prompt_tokens: 100,
            // 1.5 s at 1 s per 1,000 tokens.
            max_output_tokens: 1400,
            ..Default::default()
        }),
        ..Default::default()
    }
}

async fn states(c: &mut JobsClient<Channel>) -> Vec<pb::Job> {
    let r = pb::ListJobsRequest { state: 0, limit: 100 };
    c.list_jobs(r).await.unwrap().into_inner().jobs
}

fn count(jobs: &[pb::Job], s: pb::JobState) -> usize {
    jobs.iter().filter(|j| j.state() == s).count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_finishes_running_jobs_and_keeps_queued_ones_for_the_next_start() {
    let cfg = ConfigDir::new(DISPATCHER_TOML);
    let sim = cfg.start_region(SimRegion {
        name: "r1",
        tokens_per_minute: 600_000_000,
        requests_per_minute: 6_000_000,
        accounting: "usage",
        sim_args: &["--ms-per-1k-tokens", "1000", "--completion-min-fraction", "1"],
        ..Default::default()
    });
    let mut d = dispatcher(&cfg.config());
    let mut c = JobsClient::connect(format!("http://{}", d.addr)).await.unwrap();
    for _ in 0..6 {
        c.submit_job(job()).await.unwrap();
    }
    let probe = c.clone();
    eventually(Duration::from_secs(10), || {
        let mut c = probe.clone();
        async move { count(&states(&mut c).await, pb::JobState::Running) == 2 }
    })
    .await
    .expect("two jobs running, four queued");

    d.terminate();
    // Refused while it drains. A submission that reached the dispatcher
    // before it saw the signal is stored like the others (and counted).
    let accepted = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let refused = eventually(Duration::from_secs(2), || {
        let mut c = probe.clone();
        let accepted = accepted.clone();
        async move {
            match c.submit_job(job()).await {
                Ok(_) => {
                    accepted.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                    false
                }
                Err(s) => s.code() == tonic::Code::Unavailable,
            }
        }
    })
    .await;
    assert!(refused.is_some(), "a submission during the shutdown is refused");
    let jobs = 6 + accepted.load(std::sync::atomic::Ordering::SeqCst);
    let status = d.wait(Duration::from_secs(15)).expect("stopped within the grace");
    assert!(status.success(), "{status:?}");
    // What the region ran before the stop: the two running jobs, to the end.
    let ran_before = sim_stats(sim.addr).await.models[0].accepted;
    assert_eq!(ran_before, 2, "only the running jobs were sent");

    let d = dispatcher(&cfg.config());
    let mut c = JobsClient::connect(format!("http://{}", d.addr)).await.unwrap();
    let first_look = states(&mut c).await;
    assert_eq!(first_look.len(), jobs, "none lost: {first_look:?}");
    assert_eq!(
        count(&first_look, pb::JobState::Done),
        2,
        "the running ones finished: {first_look:?}"
    );
    let probe = c.clone();
    eventually(Duration::from_secs(20), || {
        let mut c = probe.clone();
        async move { count(&states(&mut c).await, pb::JobState::Done) == jobs }
    })
    .await
    .expect("the queued ones ran after the restart");
    for j in states(&mut c).await {
        assert_eq!(j.runs, 1, "{j:?}");
    }
    let stats = sim_stats(sim.addr).await;
    assert_eq!(stats.models[0].accepted, jobs as u64);
    assert!(stats.repeated_request_ids.is_empty());
}
