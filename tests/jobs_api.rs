//! Jobs over real gRPC against a real region-sim: submit answers at once,
//! WatchJob delivers every event once and in order (also when resumed after
//! a disconnect), CancelJob stops the region's work and settles the
//! reservation, finished jobs are readable until their TTL, and bad input
//! gets a clear error.

mod common;

use std::time::Duration;

use common::jobs::{kind, setup, with_key};
use common::{Proc, eventually, region_status, sim_stats};
use dispatcher::pb;
use dispatcher::pb::jobs_client::JobsClient;
use tonic::Code;
use tonic::transport::Channel;
use tonic_types::StatusExt;

async fn jobs(d: &Proc) -> JobsClient<Channel> {
    JobsClient::connect(format!("http://{}", d.addr)).await.unwrap()
}

fn submit(max_output: u64, key: &str) -> pb::SubmitJobRequest {
    pb::SubmitJobRequest {
        request: Some(pb::DispatchRequest {
            model: "gpt-4o".into(),
            payload: "long agent work".into(),
            prompt_tokens: 100,
            max_output_tokens: max_output,
            ..Default::default()
        }),
        idempotency_key: key.into(),
        repeatable: false,
    }
}

fn job_ref(id: &str) -> pb::JobRef {
    pb::JobRef { job_id: id.into() }
}

/// Every event of a watch from `from_seq`, to its end (or `stop_after`).
async fn watch(
    c: &mut JobsClient<Channel>,
    id: &str,
    from_seq: u64,
    stop_after: Option<usize>,
) -> Vec<pb::JobEvent> {
    let request = pb::WatchJobRequest {
        job_id: id.into(),
        from_seq,
    };
    let mut stream = c
        .watch_job(with_key(request, "k-alpha"))
        .await
        .unwrap()
        .into_inner();
    let mut out = Vec::new();
    while let Some(e) = stream.message().await.unwrap() {
        out.push(e);
        if stop_after.is_some_and(|n| out.len() >= n) {
            // Dropping the stream is the disconnect.
            return out;
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_is_answered_at_once_runs_and_is_watched_got_and_listed() {
    let (_cfg, _sim, d) = setup("2", "", "");
    let mut c = jobs(&d).await;
    let job = c
        .submit_job(with_key(submit(300, "key-1"), "k-alpha"))
        .await
        .unwrap()
        .into_inner();
    assert!(job.job_id.starts_with("job-"), "{job:?}");
    assert_eq!(job.state(), pb::JobState::Queued, "answered before any work");
    assert_eq!(job.tenant, "alpha");

    let events = watch(&mut c, &job.job_id, 0, None).await;
    let kinds: Vec<&str> = events.iter().map(kind).collect();
    assert_eq!(&kinds[..3], ["queued", "routed", "running"], "{kinds:?}");
    assert_eq!(kinds.last(), Some(&"ended"));
    assert!(kinds.iter().filter(|k| **k == "output").count() >= 5, "{kinds:?}");
    let seqs: Vec<u64> = events.iter().map(|e| e.seq).collect();
    assert_eq!(seqs, (1..=events.len() as u64).collect::<Vec<_>>());

    let got = c
        .get_job(with_key(job_ref(&job.job_id), "k-alpha"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(got.state(), pb::JobState::Done, "{got:?}");
    assert_eq!(got.region, "r1");
    assert_eq!(got.runs, 1);
    assert_eq!(got.usage.unwrap().completion_tokens, 300);
    assert_eq!(got.last_seq, events.len() as u64);
    let streamed: Vec<u8> = events
        .iter()
        .filter_map(|e| match &e.event {
            Some(pb::job_event::Event::Output(o)) => Some(o.output.to_vec()),
            _ => None,
        })
        .flatten()
        .collect();
    assert_eq!(got.output.to_vec(), streamed, "GetJob has the whole output");
    assert!(got.expires_unix_ms > got.finished_unix_ms);

    // The same idempotency key is the same job, not a second one.
    let again = c
        .submit_job(with_key(submit(300, "key-1"), "k-alpha"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(again.job_id, job.job_id);
    assert_eq!(again.state(), pb::JobState::Done);

    // Listed for its tenant, invisible to another.
    let list = c
        .list_jobs(with_key(pb::ListJobsRequest::default(), "k-alpha"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(list.jobs.len(), 1);
    assert!(list.jobs[0].output.is_empty(), "no output in a list");
    let done = pb::ListJobsRequest {
        state: pb::JobState::Queued as i32,
        limit: 0,
    };
    assert!(
        c.list_jobs(with_key(done, "k-alpha"))
            .await
            .unwrap()
            .into_inner()
            .jobs
            .is_empty()
    );
    let theirs = c
        .list_jobs(with_key(pb::ListJobsRequest::default(), "k-beta"))
        .await
        .unwrap()
        .into_inner();
    assert!(theirs.jobs.is_empty());
    let err = c
        .get_job(with_key(job_ref(&job.job_id), "k-beta"))
        .await
        .unwrap_err();
    assert_eq!(
        err.code(),
        Code::NotFound,
        "another tenant's job is as good as absent"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_resumed_watch_delivers_every_event_once_and_in_order() {
    // 32 tokens a chunk at 200 ms per 1,000 tokens: a chunk every ~6 ms,
    // 3,000 tokens: about 95 output events over ~0.6 s.
    let (_cfg, _sim, d) = setup("200", "", "");
    let mut c = jobs(&d).await;
    let job = c
        .submit_job(with_key(submit(3000, ""), "k-alpha"))
        .await
        .unwrap()
        .into_inner();
    let mut seen = watch(&mut c, &job.job_id, 0, Some(5)).await;
    assert_eq!(seen.len(), 5);
    let running = c
        .get_job(with_key(job_ref(&job.job_id), "k-alpha"))
        .await
        .unwrap()
        .into_inner();
    assert!(
        !dispatcher::jobs::record::is_terminal(running.state()),
        "the disconnect happened while it ran: {running:?}"
    );
    // Disconnected twice more, each time resuming from the last seen + 1.
    for _ in 0..2 {
        let from = seen.last().unwrap().seq + 1;
        seen.extend(watch(&mut c, &job.job_id, from, Some(10)).await);
    }
    let from = seen.last().unwrap().seq + 1;
    seen.extend(watch(&mut c, &job.job_id, from, None).await);
    let seqs: Vec<u64> = seen.iter().map(|e| e.seq).collect();
    assert_eq!(
        seqs,
        (1..=seen.len() as u64).collect::<Vec<_>>(),
        "each once, in order"
    );
    assert_eq!(kind(seen.last().unwrap()), "ended");
    // And the whole history again from the start is the same.
    let all = watch(&mut c, &job.job_id, 0, None).await;
    assert_eq!(all, seen);
    // Resumed past the end of a finished job: nothing more, and the watch
    // ends rather than waiting for events that will never come.
    let after = tokio::time::timeout(
        Duration::from_secs(5),
        watch(&mut c, &job.job_id, seen.len() as u64 + 1, None),
    )
    .await
    .expect("the watch ends");
    assert!(after.is_empty(), "{after:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_stops_the_region_settles_the_reservation_and_ends_cancelled() {
    // 20 s per 1,000 tokens: a 3,000-token job would run a minute.
    let (_cfg, sim, d) = setup("20000", "", "");
    let mut c = jobs(&d).await;
    let job = c
        .submit_job(with_key(submit(3000, ""), "k-alpha"))
        .await
        .unwrap()
        .into_inner();
    // Running, and holding its reservation.
    let events = watch(&mut c, &job.job_id, 0, Some(3)).await;
    assert_eq!(kind(&events[2]), "running", "{events:?}");
    let status = region_status(d.addr, "r1").await.unwrap();
    assert_eq!(status.models[0].requests_in_flight, 1, "{status:?}");
    assert!(status.models[0].tokens_reserved >= 3000);

    let cancelled = c
        .cancel_job(with_key(job_ref(&job.job_id), "k-alpha"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(cancelled.state(), pb::JobState::Cancelled, "{cancelled:?}");
    assert_eq!(cancelled.error_code, Code::Cancelled as i32);
    // The region saw the cancellation, and the reservation is settled.
    eventually(Duration::from_secs(5), || async {
        sim_stats(sim.addr).await.cancelled == 1
    })
    .await
    .expect("region-sim saw the cancellation");
    eventually(Duration::from_secs(5), || async {
        let q = &region_status(d.addr, "r1").await.unwrap().models[0];
        q.tokens_reserved == 0 && q.requests_in_flight == 0
    })
    .await
    .expect("the reservation is settled");
    // Its events end in the cancellation; cancelling again changes nothing.
    let all = watch(&mut c, &job.job_id, 0, None).await;
    assert_eq!(kind(all.last().unwrap()), "ended");
    let again = c
        .cancel_job(with_key(job_ref(&job.job_id), "k-alpha"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(again, cancelled);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn finished_jobs_are_readable_until_their_ttl() {
    let (_cfg, _sim, d) = setup("1", "ttl = \"1500ms\"", "");
    let mut c = jobs(&d).await;
    let job = c
        .submit_job(with_key(submit(50, ""), "k-alpha"))
        .await
        .unwrap()
        .into_inner();
    let _ = watch(&mut c, &job.job_id, 0, None).await;
    let got = c
        .get_job(with_key(job_ref(&job.job_id), "k-alpha"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(got.state(), pb::JobState::Done);
    assert_eq!(got.expires_unix_ms, got.finished_unix_ms + 1500);
    let gone = eventually(Duration::from_secs(10), || {
        let mut c = c.clone();
        let id = job.job_id.clone();
        async move {
            matches!(c.get_job(with_key(job_ref(&id), "k-alpha")).await, Err(s) if s.code() == Code::NotFound)
        }
    })
    .await
    .expect("removed after its TTL");
    let now_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64;
    assert!(
        now_ms >= got.expires_unix_ms,
        "not removed before its TTL ({gone:?})"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_and_full_limits_get_clear_errors() {
    let (_cfg, _sim, d) = setup("20000", "max_held_per_tenant = 2\nmax_jobs = 3", "");
    let mut c = jobs(&d).await;
    for (id, why) in [
        ("", "empty"),
        ("job-xyz", "not hex"),
        (&*"a".repeat(10_000), "huge"),
    ] {
        let e = c.get_job(with_key(job_ref(id), "k-alpha")).await.unwrap_err();
        assert_eq!(e.code(), Code::InvalidArgument, "{why}: {e:?}");
        assert!(e.message().len() < 200, "never echoed: {}", e.message());
    }
    let e = c
        .get_job(with_key(job_ref("job-0123456789abcdef"), "k-alpha"))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::NotFound);
    // A state that is not a JobState is refused, not read as "any".
    for state in [99, -5] {
        let r = pb::ListJobsRequest { state, limit: 0 };
        let e = c.list_jobs(with_key(r, "k-alpha")).await.unwrap_err();
        assert_eq!(e.code(), Code::InvalidArgument, "state {state}: {e:?}");
        let bad = e.get_details_bad_request().expect("a BadRequest detail");
        assert_eq!(bad.field_violations[0].field, "state", "{bad:?}");
        assert!(e.message().contains(&state.to_string()), "{}", e.message());
    }
    let e = c
        .submit_job(with_key(pb::SubmitJobRequest::default(), "k-alpha"))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
    let e = c.submit_job(submit(10, "")).await.unwrap_err();
    assert_eq!(e.code(), Code::Unauthenticated, "{e:?}");
    let e = c
        .submit_job(with_key(submit(10, &"k".repeat(5000)), "k-alpha"))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
    assert!(e.message().len() < 300);

    // Two jobs held by alpha (they run a minute): a third is refused.
    for _ in 0..2 {
        c.submit_job(with_key(submit(3000, ""), "k-alpha")).await.unwrap();
    }
    let e = c
        .submit_job(with_key(submit(3000, ""), "k-alpha"))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::ResourceExhausted, "{e:?}");
    assert!(e.message().contains("max_held_per_tenant"), "{}", e.message());
    // beta's first fits; the store then holds max_jobs = 3.
    c.submit_job(with_key(submit(3000, ""), "k-beta")).await.unwrap();
    let e = c
        .submit_job(with_key(submit(3000, ""), "k-beta"))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::ResourceExhausted, "{e:?}");
    assert!(e.message().contains("jobs.max_jobs"), "{}", e.message());
}
