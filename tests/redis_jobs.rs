//! The Redis job store (`src/cluster/jobs.rs` and `jobs.lua`) on a real
//! redis-server: its lease rules agree with the Rust model they mirror
//! (`core::job::JobLease`) on a table of cases, with time passed in; and
//! the store keeps its bounds: a full store refuses `create`, finished jobs
//! go after their expiry, an idempotency key names one job, and a dead
//! Redis is `Unavailable` within the timeout, never a hang.

mod common;

use std::time::{Duration, Instant};

use common::redis::RedisServer;
use dispatcher::cluster::RedisJobStore;
use dispatcher::cluster::jobs::{job_key, leases_key};
use dispatcher::core::{JobLease, LeaseRefusal};
use dispatcher::jobs::{Created, Held, JobStore, StoreError, record};
use dispatcher::pb;
use pb::job_event::Event;
use redis::AsyncCommands;

const LEASE_MS: u64 = 1_000;

fn store(redis: &RedisServer, max_jobs: u64, max_bytes: u64) -> RedisJobStore {
    store_timing_out(redis, Duration::from_secs(2), max_jobs, max_bytes)
}

fn store_timing_out(redis: &RedisServer, timeout: Duration, max_jobs: u64, max_bytes: u64) -> RedisJobStore {
    RedisJobStore::new(
        &redis.url(),
        timeout,
        Duration::from_millis(LEASE_MS),
        max_jobs,
        max_bytes,
    )
    .unwrap()
}

/// The id of the job an idempotent `create` found.
fn existing_id(created: Result<Created, StoreError>) -> String {
    match created {
        Ok(Created::Existing(s)) => record::job(&s).job_id.clone(),
        other => panic!("expected an existing job: {other:?}"),
    }
}

/// A new job of `tenant`, with its first event.
fn new_job(id: &str, tenant: &str, key: &str, owner: &str) -> (pb::StoredJob, pb::JobEvent) {
    let mut s = pb::StoredJob {
        job: Some(pb::Job {
            job_id: id.into(),
            tenant: tenant.into(),
            state: pb::JobState::Queued as i32,
            idempotency_key: key.into(),
            created_unix_ms: 1,
            owner: owner.into(),
            ..Default::default()
        }),
        request: Some(pb::DispatchRequest::default()),
        fence: 1,
        cancel_requested: false,
    };
    let first = record::next_event(&mut s, Event::Running(pb::JobRunning { region: "r".into() }));
    (s, first)
}

#[derive(Debug, Clone, Copy)]
enum Step {
    /// `owner` looks for lapsed jobs at `now`.
    Claim(&'static str, u64),
    /// A heartbeat with `fence` at `now`.
    Renew(u64, u64),
    /// A write with `fence`.
    Admit(u64),
}

/// The lease in Redis, as `JobLease`.
async fn lease_in_redis(con: &mut redis::aio::MultiplexedConnection, id: &str) -> JobLease {
    let (owner, fence, exp): (String, u64, u64) = redis::cmd("HMGET")
        .arg(job_key(id))
        .arg(&["owner", "fence", "exp"])
        .query_async(con)
        .await
        .unwrap();
    JobLease {
        owner,
        fence,
        expires_ms: exp,
    }
}

#[tokio::test]
async fn the_script_keeps_the_lease_rules_of_the_model() {
    let redis = RedisServer::start();
    let store = store(&redis, 1_000, 1 << 30);
    let client = redis::Client::open(redis.url()).unwrap();
    let mut con = client.get_multiplexed_async_connection().await.unwrap();
    let expires = 10_000u64;
    let mut steps = Vec::new();
    for now in [5_000, 9_999, 10_000, 10_001, 20_000] {
        for who in ["a", "b"] {
            // "a" holding a job claims it only once lapsed in Redis (see
            // jobs.lua); the model lets it claim early, so that is left out.
            if who == "b" || now >= expires {
                steps.push(Step::Claim(who, now));
            }
        }
        for fence in [2, 3, 4] {
            steps.push(Step::Renew(fence, now));
        }
    }
    for fence in [1, 2, 3, 4] {
        steps.push(Step::Admit(fence));
    }
    // And "a" never takes its own job while its lease runs.
    steps.push(Step::Claim("a", 9_999));

    for (i, step) in steps.iter().enumerate() {
        let id = format!("job-{i:016x}");
        let (stored, first) = new_job(&id, "t", "", "a");
        assert_eq!(
            store.create(stored.clone(), first, "a").await.unwrap(),
            Created::Stored
        );
        // The lease as the case starts: "a" holds it with fence 3 until 10 s.
        let mut model = JobLease {
            owner: "a".into(),
            fence: 3,
            expires_ms: expires,
        };
        let _: () = redis::pipe()
            .hset_multiple(job_key(&id), &[("owner", "a"), ("fence", "3"), ("exp", "10000")])
            .zadd(leases_key(), &id, expires)
            .query_async(&mut con)
            .await
            .unwrap();
        match *step {
            Step::Claim(who, now) => {
                let expected = match (who, now) {
                    ("a", n) if n < expires => Err(LeaseRefusal::Held {
                        owner: "a".into(),
                        expires_ms: expires,
                    }),
                    _ => model.claim(who, now, LEASE_MS),
                };
                let got = store.orphans_at(who, Some(now)).await.unwrap();
                match expected {
                    Ok(fence) => {
                        assert_eq!(got.len(), 1, "{step:?}");
                        assert_eq!(got[0].fence, fence, "{step:?}");
                        assert_eq!(record::job(&got[0]).job_id, id);
                    }
                    Err(_) => assert!(got.is_empty(), "{step:?}: {got:?}"),
                }
            }
            Step::Renew(fence, now) => {
                let expected = model.renew(fence, now, LEASE_MS);
                let held = vec![Held {
                    job_id: id.clone(),
                    fence,
                }];
                let beat = store.heartbeat_at(held, Some(now)).await.unwrap();
                assert_eq!(beat.lost.is_empty(), expected.is_ok(), "{step:?}: {beat:?}");
            }
            Step::Admit(fence) => {
                let expected = model.admits(fence);
                let mut s = stored.clone();
                s.fence = fence;
                let e = record::next_event(&mut s, Event::Running(pb::JobRunning { region: "r".into() }));
                let got = store.write(s, vec![e]).await;
                match expected {
                    Ok(()) => assert_eq!(got, Ok(()), "{step:?}"),
                    Err(LeaseRefusal::Fenced { current }) => assert_eq!(
                        got,
                        Err(StoreError::Fenced {
                            owner: "a".into(),
                            current
                        }),
                        "{step:?}"
                    ),
                    Err(other) => panic!("{other:?}"),
                }
            }
        }
        assert_eq!(lease_in_redis(&mut con, &id).await, model, "after {step:?}");
        // Out of the next case's way.
        let _: () = con.zrem(leases_key(), &id).await.unwrap();
    }
}

#[tokio::test]
async fn the_store_is_bounded_expires_keeps_keys_and_fails_fast() {
    let mut redis = RedisServer::start();
    let store = store(&redis, 2, 1 << 30);
    let (a, first_a) = new_job("job-00000000000000a1", "t", "k1", "r1");
    assert_eq!(
        store.create(a.clone(), first_a.clone(), "r1").await,
        Ok(Created::Stored)
    );
    // The same key from the same tenant is the same job.
    let (again, first) = new_job("job-00000000000000a2", "t", "k1", "r2");
    assert_eq!(
        existing_id(store.create(again, first, "r2").await),
        "job-00000000000000a1"
    );
    let (b, first_b) = new_job("job-00000000000000b1", "u", "k1", "r1");
    assert_eq!(store.create(b, first_b, "r1").await, Ok(Created::Stored));
    // max_jobs = 2: full.
    let (c, first_c) = new_job("job-00000000000000c1", "t", "", "r1");
    match store.create(c.clone(), first_c.clone(), "r1").await {
        Err(StoreError::Full(why)) => assert!(why.contains("jobs.max_jobs"), "{why}"),
        other => panic!("{other:?}"),
    }
    assert_eq!(store.usage().await.unwrap().0, 2);
    let listed = store.list("t", None, 10).await.unwrap();
    assert_eq!(listed.len(), 1);

    // a finishes; once past its expiry it goes, with its key and events.
    let mut done = a.clone();
    let end = record::finish(&mut done, pb::JobState::Done, 0, "", 1_000);
    let expires = record::job(&done).expires_unix_ms;
    store.write(done, vec![end]).await.unwrap();
    assert_eq!(
        store.events("job-00000000000000a1", 0, 100).await.unwrap().len(),
        2
    );
    assert_eq!(
        store.expire(expires - 1).await.unwrap(),
        0,
        "not before its expiry"
    );
    assert_eq!(store.expire(expires).await.unwrap(), 1);
    assert_eq!(store.get("job-00000000000000a1").await.unwrap(), None);
    assert!(
        store
            .events("job-00000000000000a1", 0, 100)
            .await
            .unwrap()
            .is_empty()
    );
    assert_eq!(store.usage().await.unwrap().0, 1);
    // Room again, and the key went with its job.
    let client = redis::Client::open(redis.url()).unwrap();
    let mut con = client.get_multiplexed_async_connection().await.unwrap();
    let key_left: bool = con.exists("dispatcher:{jobs}:key:1:t:k1").await.unwrap();
    assert!(!key_left, "the idempotency key is removed with its job");
    assert_eq!(store.create(c, first_c, "r1").await, Ok(Created::Stored));

    // The byte bound.
    let small = self::store(&redis, 100, 10);
    let (d, first_d) = new_job("job-00000000000000e1", "t", "", "r1");
    match small.create(d, first_d, "r1").await {
        Err(StoreError::Full(why)) => assert!(why.contains("jobs.max_store_bytes"), "{why}"),
        other => panic!("{other:?}"),
    }

    // Redis paused, then dead: every call ends within the timeout.
    let fast = store_timing_out(&redis, Duration::from_millis(300), 100, 1 << 30);
    assert_eq!(fast.usage().await.unwrap().0, 2, "connected before the pause");
    for stop in [true, false] {
        if stop {
            redis.pause();
        } else {
            redis.resume();
            redis.kill();
        }
        let started = Instant::now();
        let got = fast.get("job-00000000000000b1").await;
        assert!(matches!(got, Err(StoreError::Unavailable(_))), "{got:?}");
        let held = vec![Held {
            job_id: "job-00000000000000b1".into(),
            fence: 1,
        }];
        let beat = fast.heartbeat("r1", held).await;
        assert!(matches!(beat, Err(StoreError::Unavailable(_))), "{beat:?}");
        assert!(
            started.elapsed() < Duration::from_millis(1_500),
            "two calls bounded by 300 ms each: {:?}",
            started.elapsed()
        );
    }
}

#[tokio::test]
async fn a_create_redis_did_not_answer_is_unknown_and_its_resubmission_finds_it_whichever_lands_first() {
    let mut redis = RedisServer::start_with_debug();
    let store = store_timing_out(&redis, Duration::from_millis(200), 100, 1 << 30);
    let (warm, first) = new_job("job-00000000000000f0", "t", "", "r1");
    assert_eq!(store.create(warm, first, "r1").await, Ok(Created::Stored));

    // Sent, not answered: it may have been stored, and it is, once Redis wakes.
    let sleeping = redis.debug_sleep(1.0);
    let (late, first) = new_job("job-00000000000000f1", "t", "", "r1");
    let got = store.create(late, first, "r1").await;
    assert!(matches!(got, Err(StoreError::Unknown(_))), "{got:?}");
    sleeping.join().unwrap();
    let stored = store.get("job-00000000000000f1").await.unwrap();
    assert!(stored.is_some(), "Redis ran the create when it woke");
    // A keyless job is named by its id as a key, for its tenant only.
    let named = store.by_key("t", "job-00000000000000f1").await.unwrap();
    assert_eq!(
        named.map(|s| record::job(&s).job_id.clone()).as_deref(),
        Some("job-00000000000000f1")
    );
    assert_eq!(store.by_key("u", "job-00000000000000f1").await.unwrap(), None);
    // Its resubmission (the same work, its id as the key) finds it.
    let (again, first) = new_job("job-00000000000000f2", "t", "job-00000000000000f1", "r1");
    assert_eq!(
        existing_id(store.create(again, first, "r1").await),
        "job-00000000000000f1"
    );

    // The other order: the resubmission lands first, the late create then
    // finds it and stores nothing.
    let (resubmitted, first) = new_job("job-00000000000000f4", "t", "job-00000000000000f3", "r1");
    assert_eq!(store.create(resubmitted, first, "r1").await, Ok(Created::Stored));
    let (late, first) = new_job("job-00000000000000f3", "t", "", "r1");
    assert_eq!(
        existing_id(store.create(late, first, "r1").await),
        "job-00000000000000f4"
    );
    assert_eq!(store.get("job-00000000000000f3").await.unwrap(), None);

    // Not sent at all (no server): Unavailable, nothing stored.
    redis.kill();
    let fresh = store_timing_out(&redis, Duration::from_millis(200), 100, 1 << 30);
    let (never, first) = new_job("job-00000000000000f5", "t", "", "r1");
    let got = fresh.create(never, first, "r1").await;
    assert!(matches!(got, Err(StoreError::Unavailable(_))), "{got:?}");
}
