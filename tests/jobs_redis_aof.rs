//! Jobs on their own Redis (`[jobs] redis_url`), one that keeps an AOF
//! (`appendonly yes`, `appendfsync everysec`), while the quota's Redis
//! (`[cluster]`, a second redis-server) keeps nothing: jobs are submitted
//! to a dispatcher process (real region-sim behind it) one after another,
//! the jobs Redis is SIGKILLed mid-stream and restarted on the same port
//! and directory. Every job whose Submit was answered OK is there after the
//! restart and ends DONE; a Submit during the outage is refused (UNAVAILABLE,
//! and then nothing was stored) or, for the one in flight at the kill, told
//! it may have been stored; the dispatcher takes jobs again by itself.
//!
//! And without `[cluster]`: two dispatcher processes on one jobs Redis each
//! own their jobs under a name of their own (neither takes the other's
//! live jobs), and a killed one's jobs are taken over by the other.

mod common;

use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::jobs::{repeatable_job, setup, with_key};
use common::redis::RedisServer;
use common::{ConfigDir, Proc, dispatcher, eventually, region_status, sim_stats};
use dispatcher::pb;
use dispatcher::pb::jobs_client::JobsClient;
use tonic::Code;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;

/// Whether `dispatch.v1.Jobs` becomes `want` on `p` within 5 s.
async fn jobs_health_becomes(p: &Proc, want: ServingStatus) -> bool {
    let channel = tonic::transport::Endpoint::from_shared(p.endpoint())
        .unwrap()
        .connect()
        .await
        .unwrap();
    let health = HealthClient::new(channel);
    eventually(Duration::from_secs(5), || {
        let mut health = health.clone();
        async move {
            let r = HealthCheckRequest {
                service: "dispatch.v1.Jobs".into(),
            };
            health
                .check(r)
                .await
                .is_ok_and(|s| s.into_inner().status() == want)
        }
    })
    .await
    .is_some()
}

/// Submissions at most (ListJobs answers 1,000 at most: all of them fit).
const MAX_SUBMITS: usize = 600;

/// What one Submit got.
#[derive(Debug, Clone)]
enum Outcome {
    /// OK, with the job id.
    Acked(String),
    /// UNAVAILABLE: nothing stored.
    Refused(String),
    /// DEADLINE_EXCEEDED naming the job: it may have been stored.
    Maybe(String),
}

/// Outcomes by idempotency key, in submission order.
type Log = Arc<Mutex<Vec<(String, Outcome)>>>;

fn count(log: &Log, f: impl Fn(&Outcome) -> bool) -> usize {
    log.lock().unwrap().iter().filter(|(_, o)| f(o)).count()
}

async fn submit(c: &mut JobsClient<tonic::transport::Channel>, key: &str) -> Outcome {
    // Repeatable: a job whose run the outage stopped is run again, so
    // every stored job must end DONE.
    let request = repeatable_job(40, key);
    match c.submit_job(with_key(request, "k-alpha")).await {
        Ok(j) => Outcome::Acked(j.into_inner().job_id),
        Err(s) => {
            assert!(
                !s.message().contains("redis://"),
                "an error echoes the Redis URL: {s:?}"
            );
            match s.code() {
                Code::Unavailable => Outcome::Refused(s.message().to_string()),
                Code::DeadlineExceeded if s.message().contains("may have been stored") => {
                    Outcome::Maybe(s.message().to_string())
                }
                _ => panic!("Submit {key}: an answer neither OK, UNAVAILABLE nor maybe-stored: {s:?}"),
            }
        }
    }
}

/// `GetJob` until the job ends (or `deadline`); `None`: NOT_FOUND.
async fn final_state(
    c: &mut JobsClient<tonic::transport::Channel>,
    id: &str,
    deadline: Instant,
) -> Option<i32> {
    loop {
        match c
            .get_job(with_key(pb::JobRef { job_id: id.into() }, "k-alpha"))
            .await
        {
            Ok(j) => {
                let state = j.into_inner().state;
                let finished = ![pb::JobState::Queued as i32, pb::JobState::Running as i32].contains(&state);
                if finished || Instant::now() > deadline {
                    return Some(state);
                }
            }
            Err(s) if s.code() == Code::NotFound => return None,
            Err(s) => assert!(Instant::now() < deadline, "GetJob {id}: {s:?}"),
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Every key under the jobs' prefix in `redis`, and every other key.
fn keys_of(redis: &RedisServer) -> (usize, usize) {
    let keys: Vec<String> = redis::cmd("KEYS")
        .arg("*")
        .query(&mut redis.connection())
        .unwrap();
    let jobs = keys
        .iter()
        .filter(|k| k.starts_with(dispatcher::cluster::jobs::PREFIX))
        .count();
    (jobs, keys.len() - jobs)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jobs_acknowledged_before_a_sigkill_of_their_aof_redis_are_kept() {
    let aof = tempfile::tempdir().unwrap();
    // JOBS_REDIS_APPENDONLY=no shows that the test can fail (no AOF: the
    // restarted Redis is empty and the acknowledged jobs are gone).
    let appendonly = std::env::var("JOBS_REDIS_APPENDONLY").unwrap_or_else(|_| "yes".into());
    let mut jobs_redis = RedisServer::start_with_args(
        aof.path(),
        &["--appendonly", &appendonly, "--appendfsync", "everysec"],
    );
    let quota_redis = RedisServer::start();
    let (cfg, _sim, d) = setup(
        "2",
        &format!("redis_url = \"{}\"\nredis_timeout = \"500ms\"", jobs_redis.url()),
        &format!("[cluster]\nredis_url = \"{}\"", quota_redis.url()),
    );
    eventually(Duration::from_secs(5), || async {
        let s = region_status(d.addr, "r1").await.unwrap();
        s.models[0].shared.as_ref().is_some_and(|s| s.mode == "shared")
    })
    .await
    .expect("the quota is shared through [cluster]'s Redis");
    assert!(d.logs().contains("jobs kept in their own Redis"), "{}", d.logs());

    // One submitter, one Submit at a time, each with its own key.
    let log: Log = Arc::default();
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let submitter = {
        let (log, stop, endpoint) = (log.clone(), stop.clone(), d.endpoint());
        tokio::spawn(async move {
            let mut c = JobsClient::connect(endpoint).await.unwrap();
            for i in 0..MAX_SUBMITS {
                if stop.load(std::sync::atomic::Ordering::SeqCst) {
                    break;
                }
                let key = format!("aof-{i}");
                let outcome = submit(&mut c, &key).await;
                log.lock().unwrap().push((key, outcome));
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        })
    };
    let acked = |o: &Outcome| matches!(o, Outcome::Acked(_));
    let failed = |o: &Outcome| !matches!(o, Outcome::Acked(_));
    eventually(Duration::from_secs(20), || async { count(&log, acked) >= 60 })
        .await
        .expect("60 jobs acknowledged before the kill");
    assert_eq!(count(&log, failed), 0, "{:?}", log.lock().unwrap());

    // SIGKILL mid-stream; Submits go on against a dead Redis.
    jobs_redis.kill();
    let acked_before_kill = count(&log, acked);
    eventually(Duration::from_secs(20), || async { count(&log, failed) >= 10 })
        .await
        .expect("Submits during the outage are refused");
    let in_outage = log.lock().unwrap().len();
    assert!(
        jobs_health_becomes(&d, ServingStatus::NotServing).await,
        "the Jobs health says the store is away while its Redis is dead"
    );

    // Back on the same port and directory: it replays its AOF.
    jobs_redis.restart_empty();
    let acked_in_outage = count(&log, acked);
    eventually(Duration::from_secs(20), || async {
        count(&log, acked) >= acked_in_outage + 40
    })
    .await
    .expect("the dispatcher takes jobs again once its Redis is back, by itself");
    assert!(
        jobs_health_becomes(&d, ServingStatus::Serving).await,
        "the Jobs health is SERVING again once its Redis answers"
    );
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    submitter.await.unwrap();
    let log = log.lock().unwrap().clone();

    // Every acknowledged job is there and ends DONE.
    let mut c = JobsClient::connect(d.endpoint()).await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut lost = Vec::new();
    let mut not_done = Vec::new();
    for (key, o) in &log {
        if let Outcome::Acked(id) = o {
            match final_state(&mut c, id, deadline).await {
                None => lost.push(format!("{key} ({id})")),
                Some(s) if s != pb::JobState::Done as i32 => {
                    not_done.push(format!("{key} ({id}): state {s}"))
                }
                Some(_) => {}
            }
        }
    }
    let acks = log.iter().filter(|(_, o)| acked(o)).count();
    assert!(
        lost.is_empty(),
        "{} of {acks} acknowledged jobs lost after a SIGKILL of the jobs Redis ({acked_before_kill} acknowledged before the kill): {lost:?}",
        lost.len()
    );
    assert!(
        not_done.is_empty(),
        "acknowledged jobs that did not end DONE: {not_done:?}"
    );

    // A refused Submit stored nothing; a maybe-stored one is whole if stored.
    let listed = c
        .list_jobs(with_key(
            pb::ListJobsRequest {
                state: 0,
                limit: 1000,
            },
            "k-alpha",
        ))
        .await
        .unwrap()
        .into_inner()
        .jobs;
    let stored: HashMap<String, pb::Job> = listed
        .into_iter()
        .map(|j| (j.idempotency_key.clone(), j))
        .collect();
    let refused: Vec<&String> = log
        .iter()
        .filter(|(_, o)| matches!(o, Outcome::Refused(_)))
        .map(|(k, _)| k)
        .collect();
    let maybe: BTreeSet<(&String, &String)> = log
        .iter()
        .filter_map(|(k, o)| match o {
            Outcome::Maybe(why) => Some((k, why)),
            _ => None,
        })
        .collect();
    println!(
        "{} submitted: {acks} acknowledged ({acked_before_kill} before the kill), {} refused, {} maybe stored ({maybe:?}); {} stored",
        log.len(),
        refused.len(),
        maybe.len(),
        stored.len()
    );
    assert!(!refused.is_empty(), "no Submit was refused while Redis was down");
    for k in &refused {
        assert!(
            !stored.contains_key(*k),
            "{k} was refused with UNAVAILABLE, yet stored"
        );
    }
    for (k, _) in &maybe {
        if let Some(j) = stored.get(*k) {
            let state = final_state(&mut c, &j.job_id, deadline).await;
            assert_eq!(
                state,
                Some(pb::JobState::Done as i32),
                "{k}, maybe stored and stored"
            );
        }
    }
    assert!(
        maybe.len() <= 2,
        "only a Submit in flight at the kill may be unknown; after it the store refuses at once: {maybe:?}"
    );
    let (_, Outcome::Refused(why)) = log
        .iter()
        .find(|(_, o)| matches!(o, Outcome::Refused(_)))
        .unwrap()
    else {
        unreachable!()
    };
    assert!(why.contains("job store is unavailable"), "{why}");
    println!("a Submit during the outage: UNAVAILABLE {why:?}");
    assert!(in_outage < log.len());

    // The split: job keys in the jobs Redis only, quota keys in the other.
    let (jobs_there, other_there) = keys_of(&jobs_redis);
    let (jobs_in_quota, quota_keys) = keys_of(&quota_redis);
    assert!(
        jobs_there > 0 && other_there == 0,
        "jobs Redis: {jobs_there} job keys, {other_there} others"
    );
    assert!(
        jobs_in_quota == 0 && quota_keys > 0,
        "quota Redis: {jobs_in_quota} job keys, {quota_keys} others"
    );

    // Moving the jobs elsewhere takes a restart, and a reload says so.
    let text = std::fs::read_to_string(cfg.config()).unwrap();
    let moved = text.replace(&jobs_redis.url(), "redis://127.0.0.1:1");
    assert_ne!(text, moved);
    std::fs::write(cfg.config(), moved).unwrap();
    let reload = common::admin(d.addr)
        .await
        .reload_config(pb::ReloadConfigRequest { dry_run: true })
        .await
        .unwrap()
        .into_inner();
    assert!(reload.errors.is_empty(), "{reload:?}");
    assert!(
        reload.needs_restart.iter().any(|r| r.starts_with("jobs")),
        "{reload:?}"
    );
}

/// A job of `tokens` output tokens, repeatable, submitted to `p`.
async fn submit_long(p: &Proc, tokens: u64, key: &str) -> pb::Job {
    let request = repeatable_job(tokens, key);
    JobsClient::connect(p.endpoint())
        .await
        .unwrap()
        .submit_job(with_key(request, "k-alpha"))
        .await
        .unwrap()
        .into_inner()
}

async fn get(p: &Proc, id: &str) -> pb::Job {
    JobsClient::connect(p.endpoint())
        .await
        .unwrap()
        .get_job(with_key(pb::JobRef { job_id: id.into() }, "k-alpha"))
        .await
        .unwrap()
        .into_inner()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_cluster_each_process_owns_its_jobs_in_the_shared_jobs_redis() {
    let redis = RedisServer::start();
    let toml = common::jobs::dispatcher_toml(&format!("lease = \"1s\"\nredis_url = \"{}\"", redis.url()), "");
    let dirs = [ConfigDir::new(&toml), ConfigDir::new(&toml)];
    // 1,000 output tokens take 1.5 s.
    let sim = common::jobs::shared_region(&dirs, "1500");
    let mut a = dispatcher(&dirs[0].config());
    let b = dispatcher(&dirs[1].config());
    assert!(a.logs().contains("jobs kept in their own Redis"), "{}", a.logs());

    // Jobs run by A while B watches the same Redis: each runs once, A's.
    let mut jobs = Vec::new();
    for i in 0..3 {
        jobs.push(submit_long(&a, 1000, &format!("live-{i}")).await);
    }
    let owner = jobs[0].owner.clone();
    assert!(
        !owner.is_empty() && owner != "local",
        "a name of this process: {owner:?}"
    );
    for j in &jobs {
        assert!(
            eventually(Duration::from_secs(30), || async {
                get(&b, &j.job_id).await.state() == pb::JobState::Done
            })
            .await
            .is_some(),
            "{:?}",
            get(&b, &j.job_id).await
        );
        let done = get(&b, &j.job_id).await;
        assert_eq!((done.owner.as_str(), done.runs), (owner.as_str(), 1), "{done:?}");
    }
    let repeated = sim_stats(sim.addr).await.repeated_request_ids;
    assert!(
        repeated.is_empty(),
        "B took A's live jobs and ran them again: {repeated:?}"
    );

    // A killed mid-run: B takes its job once the lease lapses, and ends it.
    let job = submit_long(&a, 3000, "orphan").await;
    eventually(Duration::from_secs(10), || async {
        get(&b, &job.job_id).await.state() == pb::JobState::Running
    })
    .await
    .expect("the job runs on A");
    a.kill();
    let done = eventually(Duration::from_secs(20), || async {
        get(&b, &job.job_id).await.state() == pb::JobState::Done
    })
    .await;
    let j = get(&b, &job.job_id).await;
    assert!(done.is_some(), "A's job was not finished by B: {j:?}");
    assert!(j.owner != owner && !j.owner.is_empty(), "{j:?}");
}
