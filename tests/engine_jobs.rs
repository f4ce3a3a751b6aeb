//! Jobs on a paused clock, in process: the jobs desk over the in-memory
//! store and the engine against fake clusters. A job refused for quota
//! before it was sent stays QUEUED and is sent exactly when the quota
//! allows, once; `max_running` holds; a job cancelled while it waits for
//! quota is never sent and holds nothing. Times are exact.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::engine::*;
use dispatcher::dispatch::Caller;
use dispatcher::jobs::{Jobs, MemoryStore};
use dispatcher::pb;
use tokio_util::sync::CancellationToken;

fn secs(s: f64) -> Duration {
    Duration::from_secs_f64(s)
}

/// One region refilling 100 tokens a second into a bucket of 600; requests
/// may wait 5 s for quota; `jobs` is the `[jobs]` table's body.
fn world(jobs: &str) -> (World, Arc<Jobs>) {
    let c = config(
        &dispatcher_toml(&format!("[routing]\nmax_queue_wait = \"5s\"\n[jobs]\n{jobs}\n")),
        &[gpt_region("r", 6000, 600, "")],
    );
    let w = World::start(&c);
    let jobs = Jobs::new(
        w.engine.clone(),
        Arc::new(MemoryStore::new(1000)),
        "local".into(),
        &c,
    );
    jobs.spawn(CancellationToken::new());
    (w, jobs)
}

fn job(prompt: u64, max_output: u64) -> pb::SubmitJobRequest {
    pb::SubmitJobRequest {
        request: Some(request(prompt, max_output)),
        ..Default::default()
    }
}

fn caller() -> Caller {
    KEY_A.into()
}

/// Waits (on the paused clock) until the job has ended; its record.
async fn ended(jobs: &Jobs, id: &str) -> pb::Job {
    loop {
        let j = jobs.get(id, &caller()).await.unwrap();
        if dispatcher::jobs::record::is_terminal(j.state()) {
            return j;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

async fn events(jobs: &Jobs, id: &str) -> Vec<pb::JobEvent> {
    let (tx, mut rx) = tokio::sync::mpsc::channel(1024);
    let r = pb::WatchJobRequest {
        job_id: id.into(),
        from_seq: 0,
    };
    jobs.watch(r, &caller(), tx).await.unwrap();
    let mut out = Vec::new();
    while let Ok(e) = rx.try_recv() {
        out.push(e.unwrap());
    }
    out
}

#[tokio::test(start_paused = true)]
async fn a_job_refused_for_quota_stays_queued_and_is_sent_when_it_fits() {
    let (w, jobs) = world("");
    // The bucket is spent at 0 s.
    w.engine.dispatch(request(100, 500), None, KEY_A).await.unwrap();
    // 550 tokens: 5.5 s of refill, past the 5 s a request may wait, so the
    // engine refuses it at once (retry in 5.5 s); the job stays QUEUED and
    // tries again then.
    let id = jobs.submit(job(100, 450), &caller()).await.unwrap().job_id;
    tokio::time::sleep(secs(5.49)).await;
    assert_eq!(w.cluster("r").calls(), 1, "not sent before it fits");
    assert_eq!(
        jobs.get(&id, &caller()).await.unwrap().state(),
        pb::JobState::Queued
    );

    let j = ended(&jobs, &id).await;
    assert_eq!(j.state(), pb::JobState::Done, "{j:?}");
    assert_eq!(j.runs, 1);
    let seen = w.cluster("r").seen();
    assert_eq!(seen.len(), 2, "sent once");
    assert_eq!(seen[1].at - w.t0, secs(5.5), "sent the moment the refill allows");
    let kinds: Vec<bool> = events(&jobs, &id)
        .await
        .iter()
        .map(|e| matches!(e.event, Some(pb::job_event::Event::Queued(_))))
        .collect();
    assert_eq!(
        kinds.iter().filter(|q| **q).count(),
        1,
        "one queued event: a retry is not news"
    );
}

#[tokio::test(start_paused = true)]
async fn max_running_holds_and_jobs_start_in_submission_order() {
    let (w, jobs) = world("max_running = 1");
    w.cluster("r").always(Reply::ok().after(secs(1.0)));
    let mut ids = Vec::new();
    for _ in 0..3 {
        ids.push(jobs.submit(job(10, 10), &caller()).await.unwrap().job_id);
    }
    for id in &ids {
        assert_eq!(ended(&jobs, id).await.state(), pb::JobState::Done);
    }
    let seen = w.cluster("r").seen();
    let at: Vec<Duration> = seen.iter().map(|s| s.at - w.t0).collect();
    assert_eq!(
        at,
        [secs(0.0), secs(1.0), secs(2.0)],
        "one at a time, each as the last ends"
    );
    assert_eq!(w.cluster("r").max_in_flight(), 1);
    let order: Vec<&str> = seen.iter().map(|s| s.request_id.as_str()).collect();
    assert_eq!(
        order,
        ids.iter().map(String::as_str).collect::<Vec<_>>(),
        "FIFO within a tenant"
    );
}

#[tokio::test(start_paused = true)]
async fn a_job_cancelled_while_waiting_for_quota_is_never_sent_and_holds_nothing() {
    let (w, jobs) = world("");
    w.engine.dispatch(request(100, 500), None, KEY_A).await.unwrap();
    // 300 tokens: 3 s of refill, within the wait; cancelled at 1 s.
    let id = jobs.submit(job(100, 200), &caller()).await.unwrap().job_id;
    tokio::time::sleep(secs(1.0)).await;
    let j = jobs.cancel(&id, &caller()).await.unwrap();
    assert_eq!(j.state(), pb::JobState::Cancelled, "{j:?}");
    assert_eq!(j.error_message, "cancelled before it started");
    assert_eq!(j.runs, 0);
    // At 3 s the refill is whole again for someone else: nothing was held.
    tokio::time::sleep_until(w.t0 + secs(3.0)).await;
    let served = w.engine.dispatch(request(100, 200), None, KEY_A).await.unwrap();
    assert_eq!(served.queue_wait, Duration::ZERO);
    assert_eq!(w.cluster("r").calls(), 2, "the cancelled job was never sent");
}

/// A job whose request asks for the cache is answered from a reply stored
/// by an earlier job (or request) with the same key: DONE with the stored
/// output, nothing sent to the region; without the opt-in, it runs again.
#[tokio::test(start_paused = true)]
async fn a_job_that_opts_in_is_answered_from_the_cache_without_a_call() {
    let (w, jobs) = world("");
    let cached = |ttl: i64| pb::SubmitJobRequest {
        request: Some(pb::DispatchRequest {
            cache: Some(pb::CacheOptions {
                ttl: Some(prost_types::Duration {
                    seconds: ttl,
                    nanos: 0,
                }),
                ..Default::default()
            }),
            ..request(10, 10)
        }),
        ..Default::default()
    };
    let first = jobs.submit(cached(60), &caller()).await.unwrap().job_id;
    let first = ended(&jobs, &first).await;
    assert_eq!(first.state(), pb::JobState::Done);
    assert_eq!(w.cluster("r").calls(), 1);
    let second = jobs.submit(cached(60), &caller()).await.unwrap().job_id;
    let second = ended(&jobs, &second).await;
    assert_eq!(second.state(), pb::JobState::Done);
    assert_eq!(second.output, first.output, "the stored output");
    assert_eq!(w.cluster("r").calls(), 1, "a hit is not sent");
    assert_eq!(second.attempts, 0);
    // The same work without the opt-in runs.
    let plain = jobs.submit(job(10, 10), &caller()).await.unwrap().job_id;
    assert_eq!(ended(&jobs, &plain).await.state(), pb::JobState::Done);
    assert_eq!(w.cluster("r").calls(), 2);
}
