//! Idempotency keys over real gRPC, on both stores (the embedded one and
//! Redis with `[cluster]`), in front of a real region-sim:
//!
//! * a key already naming a job answers that job even when the tenant is
//!   at `max_held_per_tenant` (the lookup comes before the limit);
//! * the same key with a different request is ALREADY_EXISTS naming the
//!   key and the job, never the first job in silence;
//! * a SubmitJob Redis did not answer (a real `DEBUG SLEEP`) is
//!   DEADLINE_EXCEEDED saying the job may have been stored, with its id and
//!   the key to resubmit with; resubmitting with it gets that one job, run
//!   once.

mod common;

use std::time::Duration;

use common::jobs::{setup, with_key};
use common::redis::RedisServer;
use common::{Proc, eventually, sim_stats};
use dispatcher::pb;
use dispatcher::pb::jobs_client::JobsClient;
use tonic::Code;
use tonic_types::StatusExt;

/// `[cluster]` on Redis at `url`, with `redis_timeout`.
fn cluster(url: &str, redis_timeout: &str) -> String {
    format!("[cluster]\nredis_url = \"{url}\"\nreplica_id = \"r1\"\nredis_timeout = \"{redis_timeout}\"\n")
}

fn submit(work: &str, key: &str, repeatable: bool, tenant_key: &str) -> tonic::Request<pb::SubmitJobRequest> {
    with_key(
        pb::SubmitJobRequest {
            request: Some(pb::DispatchRequest {
                model: "gpt-4o".into(),
                payload: work.as_bytes().to_vec().into(),
                prompt_tokens: 100,
                max_output_tokens: 3000,
                ..Default::default()
            }),
            idempotency_key: key.into(),
            repeatable,
        },
        tenant_key,
    )
}

/// The ErrorInfo of `status`: its reason and metadata.
fn error_info(status: &tonic::Status) -> (String, std::collections::HashMap<String, String>) {
    let info = status
        .get_details_error_info()
        .unwrap_or_else(|| panic!("no ErrorInfo in {status:?}"));
    (info.reason, info.metadata)
}

/// The job once it has ended (at most 20 s).
async fn done(c: &mut JobsClient<tonic::transport::Channel>, id: &str) -> pb::Job {
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        let j = c
            .get_job(with_key(pb::JobRef { job_id: id.into() }, "k-alpha"))
            .await
            .unwrap()
            .into_inner();
        if dispatcher::jobs::record::is_terminal(j.state()) {
            return j;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "job {id} did not end: {j:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The checks of both stores; jobs take a minute, so they stay held.
async fn a_key_names_one_submission(d: &Proc) {
    let mut c = JobsClient::connect(d.endpoint()).await.unwrap();
    // max_held_per_tenant = 3: a, b and c hold alpha's three.
    let a = c
        .submit_job(submit("work a", "a", false, "k-alpha"))
        .await
        .unwrap()
        .into_inner();
    for key in ["b", "c"] {
        c.submit_job(submit(&format!("work {key}"), key, false, "k-alpha"))
            .await
            .unwrap();
    }
    let e = c
        .submit_job(submit("work d", "d", false, "k-alpha"))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::ResourceExhausted, "{e:?}");
    assert!(e.message().contains("max_held_per_tenant"), "{}", e.message());

    // a again, at the limit: job a.
    let again = c.submit_job(submit("work a", "a", false, "k-alpha")).await;
    let again = again.unwrap_or_else(|e| panic!("resubmitting key a at the limit: {e:?}"));
    assert_eq!(again.into_inner().job_id, a.job_id);

    // The key with another request, or another `repeatable`: refused,
    // naming the key and the job it names.
    for (work, repeatable) in [("other work", false), ("work a", true)] {
        let e = c
            .submit_job(submit(work, "a", repeatable, "k-alpha"))
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::AlreadyExists, "{e:?}");
        assert!(e.message().contains("\"a\""), "names the key: {}", e.message());
        assert!(e.message().contains(&a.job_id), "names the job: {}", e.message());
        let (reason, meta) = error_info(&e);
        assert_eq!(reason, "IDEMPOTENCY_KEY_REUSED");
        assert_eq!(meta["job_id"], a.job_id);
        assert_eq!(meta["idempotency_key"], "a");
    }
    // The longest key allowed is named in full, and nothing longer is taken.
    let long = "k".repeat(128);
    c.submit_job(submit("work long", &long, false, "k-beta"))
        .await
        .unwrap();
    let e = c
        .submit_job(submit("other", &long, false, "k-beta"))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::AlreadyExists, "{e:?}");
    assert!(
        e.message().contains(&long) && e.message().len() < 600,
        "{}",
        e.message()
    );

    // A job submitted without a key is named by its id as a key (how a
    // submission whose answer was lost is resubmitted), for its tenant only.
    let keyless = c
        .submit_job(submit("keyless work", "", false, "k-beta"))
        .await
        .unwrap()
        .into_inner();
    let by_id = c
        .submit_job(submit("keyless work", &keyless.job_id, false, "k-beta"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(by_id.job_id, keyless.job_id);
    let e = c
        .submit_job(submit("keyless work", &keyless.job_id, false, "k-alpha"))
        .await
        .unwrap_err();
    assert_eq!(
        e.code(),
        Code::ResourceExhausted,
        "alpha's own key, at its limit: {e:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_names_one_submission_in_the_embedded_store() {
    let (_cfg, _sim, d) = setup("20000", "max_held_per_tenant = 3", "");
    a_key_names_one_submission(&d).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_names_one_submission_in_redis() {
    let redis = RedisServer::start();
    let (_cfg, _sim, d) = setup(
        "20000",
        "max_held_per_tenant = 3",
        &cluster(&redis.url(), "150ms"),
    );
    a_key_names_one_submission(&d).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_submission_redis_did_not_answer_says_so_and_its_key_gets_the_one_job() {
    let redis = RedisServer::start_with_debug();
    let (_cfg, sim, d) = setup("1", "lease = \"1s\"", &cluster(&redis.url(), "150ms"));
    let mut c = JobsClient::connect(d.endpoint()).await.unwrap();
    // Connected and the script loaded before the stall.
    let warm = c
        .submit_job(submit("warm up", "", false, "k-alpha"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(done(&mut c, &warm.job_id).await.state(), pb::JobState::Done);

    let sleeping = redis.debug_sleep(1.5);
    let started = std::time::Instant::now();
    let e = c
        .submit_job(submit("stalled work", "", false, "k-alpha"))
        .await
        .unwrap_err();
    eprintln!("answered in {:?}: {e:?}", started.elapsed());
    assert_eq!(e.code(), Code::DeadlineExceeded, "{e:?}");
    assert!(e.message().contains("may have been stored"), "{}", e.message());
    let (reason, meta) = error_info(&e);
    assert_eq!(reason, "JOB_MAY_BE_STORED");
    let id = meta["job_id"].clone();
    assert!(e.message().contains(&id), "{}", e.message());
    assert_eq!(
        meta["idempotency_key"], id,
        "without a key of its own, the job id is the key"
    );
    sleeping.join().unwrap();

    // Redis ran the stalled create when it woke: the key the answer named
    // gets that job, which runs (once its lease lapsed) exactly once.
    let again = eventually(Duration::from_secs(5), || {
        let mut c = c.clone();
        let id = id.clone();
        async move {
            c.submit_job(submit("stalled work", &id, false, "k-alpha"))
                .await
                .is_ok()
        }
    })
    .await;
    assert!(again.is_some(), "resubmitting with the key the answer named");
    let job = c
        .submit_job(submit("stalled work", &id, false, "k-alpha"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(job.job_id, id, "the stalled submission's job, not a second one");
    let j = done(&mut c, &id).await;
    assert_eq!(j.state(), pb::JobState::Done, "{j:?}");
    assert_eq!(j.runs, 1);
    let listed = c
        .list_jobs(with_key(pb::ListJobsRequest::default(), "k-alpha"))
        .await
        .unwrap()
        .into_inner()
        .jobs;
    let mut ids: Vec<String> = listed.iter().map(|j| j.job_id.clone()).collect();
    ids.sort();
    let mut expected = vec![warm.job_id.clone(), id.clone()];
    expected.sort();
    assert_eq!(ids, expected, "two submissions of work, two jobs");
    let stats = sim_stats(sim.addr).await;
    assert_eq!(stats.models[0].accepted, 2, "the region ran each job once");
    assert!(stats.repeated_request_ids.is_empty(), "{stats:?}");
}
