//! Jobs across replicas: two dispatcher processes with `[cluster]` keep
//! their jobs in one real redis-server, in front of one real region-sim.
//! A job submitted to one replica is watched, got, listed and cancelled on
//! the other; a replica killed (-9) has its jobs taken over by the other
//! within the lease + 1 s (queued ones run, a repeatable running one runs
//! again, a non-repeatable one ends INTERRUPTED: the region-sim counts
//! which ran twice); and a paused owner cannot finish a job a second time
//! once it was taken over (the fencing token).

mod common;

use std::time::{Duration, Instant};

use common::jobs::{kind, watch, with_key};
use common::redis::RedisServer;
use common::redis_cluster::RedisCluster;
use common::{ConfigDir, Proc, dispatcher, eventually, region_status, sim_stats};
use dispatcher::pb;
use dispatcher::pb::jobs_client::JobsClient;
use pb::job_event::Event;
use tonic::Code;
use tonic::transport::Channel;

/// `redis`: the `[cluster]` lines naming Redis (a URL, or a cluster's nodes).
fn dispatcher_toml(redis: &str, replica: &str, lease: &str) -> String {
    common::jobs::dispatcher_toml(
        &format!("lease = \"{lease}\"\nmax_running_per_tenant = 2"),
        &format!("[cluster]\n{redis}\nreplica_id = \"{replica}\"\nexpected_replicas = 2"),
    )
}

/// Redis, one region-sim whose output takes `ms_per_1k` per 1,000 tokens,
/// and `replicas` of r1 (A) and r2 (B) with `[jobs] lease = lease`, each
/// in shared mode.
struct Cluster {
    /// A `RedisServer` or a `RedisCluster`: dropped, it is gone.
    redis: Box<dyn std::any::Any>,
    _dirs: Vec<ConfigDir>,
    sim: Proc,
    a: Proc,
    b: Option<Proc>,
}

async fn cluster_of(replicas: usize, ms_per_1k: &str, lease: &str) -> Cluster {
    let redis = RedisServer::start();
    let toml = format!("redis_url = \"{}\"", redis.url());
    cluster_on(Box::new(redis), &toml, replicas, ms_per_1k, lease).await
}

/// `cluster_of` on `redis`, which `redis_toml` names.
async fn cluster_on(
    redis: Box<dyn std::any::Any>,
    redis_toml: &str,
    replicas: usize,
    ms_per_1k: &str,
    lease: &str,
) -> Cluster {
    let dirs: Vec<ConfigDir> = ["r1", "r2"][..replicas]
        .iter()
        .map(|r| ConfigDir::new(&dispatcher_toml(redis_toml, r, lease)))
        .collect();
    let sim = common::jobs::shared_region(&dirs, ms_per_1k);
    let mut procs: Vec<Proc> = dirs.iter().map(|d| dispatcher(&d.config())).collect();
    for p in &procs {
        eventually(Duration::from_secs(5), || async {
            let s = region_status(p.addr, "r1").await.unwrap();
            s.models[0].shared.as_ref().is_some_and(|s| s.mode == "shared")
        })
        .await
        .expect("the replicas share the quota through Redis");
    }
    let b = (replicas > 1).then(|| procs.remove(1));
    Cluster {
        redis,
        _dirs: dirs,
        sim,
        a: procs.remove(0),
        b,
    }
}

async fn cluster(ms_per_1k: &str, lease: &str) -> Cluster {
    cluster_of(2, ms_per_1k, lease).await
}

/// Sends `sig` (-STOP, -CONT) to `p`.
fn signal(p: &Proc, sig: &str) {
    let ok = std::process::Command::new("kill")
        .args([sig, &p.pid().to_string()])
        .status()
        .unwrap()
        .success();
    assert!(ok, "kill {sig} {}", p.pid());
}

async fn jobs(p: &Proc) -> JobsClient<Channel> {
    JobsClient::connect(p.endpoint()).await.unwrap()
}

async fn submit(c: &mut JobsClient<Channel>, tokens: u64, repeatable: bool, key: &str) -> pb::Job {
    let request = pb::SubmitJobRequest {
        request: Some(pb::DispatchRequest {
            model: "gpt-4o".into(),
            payload: "long agent work".into(),
            prompt_tokens: 100,
            max_output_tokens: tokens,
            ..Default::default()
        }),
        idempotency_key: key.into(),
        repeatable,
    };
    c.submit_job(with_key(request, "k-alpha"))
        .await
        .unwrap()
        .into_inner()
}

async fn get(c: &mut JobsClient<Channel>, id: &str) -> pb::Job {
    let r = pb::JobRef { job_id: id.into() };
    c.get_job(with_key(r, "k-alpha")).await.unwrap().into_inner()
}

/// Where the last run starts: its (re)queued event.
fn last_queued(events: &[pb::JobEvent]) -> usize {
    events.iter().rposition(|e| kind(e) == "queued").unwrap()
}

/// The output the events carry (region-sim's is text).
fn output(events: &[pb::JobEvent]) -> String {
    events
        .iter()
        .filter_map(|e| match &e.event {
            Some(Event::Output(o)) => Some(String::from_utf8_lossy(&o.output).into_owned()),
            _ => None,
        })
        .collect()
}

/// Numbered 1, 2, ... without a gap or a repeat, exactly one terminal
/// event, and it is the last.
fn assert_one_history(events: &[pb::JobEvent]) {
    if let Some(i) = events.iter().zip(1..).position(|(e, n)| e.seq != n) {
        let near: Vec<u64> = events[i.saturating_sub(3)..(i + 3).min(events.len())]
            .iter()
            .map(|e| e.seq)
            .collect();
        panic!(
            "event {} of {} has seq {} (near: {near:?})",
            i + 1,
            events.len(),
            events[i].seq
        );
    }
    let ends = events.iter().filter(|e| kind(e) == "ended").count();
    assert_eq!(ends, 1, "terminal events among {}", events.len());
    assert_eq!(kind(events.last().unwrap()), "ended");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_on_one_replica_is_watched_got_listed_and_cancelled_on_the_other() {
    watched_got_listed_and_cancelled_on_the_other(cluster("1000", "10s").await, || ()).await;
}

/// The same on a 3-shard Redis Cluster: every job key carries the `{jobs}`
/// hash tag, so they all live on one shard, and each step of `jobs.lua`
/// (which names the keys it builds from its prefix) runs there.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_on_one_replica_is_served_by_the_other_on_a_redis_cluster() {
    let shards = RedisCluster::start(3);
    let (toml, urls) = (shards.toml(), shards.urls());
    let c = cluster_on(Box::new(shards), &toml, 2, "1000", "10s").await;
    let (usage, job_keys) = (dispatcher::cluster::jobs::usage_key(), "dispatcher:{jobs}:*");
    let keys_by_node = || {
        urls.iter()
            .map(|u| {
                let mut con = redis::Client::open(u.as_str()).unwrap().get_connection().unwrap();
                redis::cmd("KEYS")
                    .arg(job_keys)
                    .query::<Vec<String>>(&mut con)
                    .unwrap()
                    .len()
            })
            .collect::<Vec<usize>>()
    };
    watched_got_listed_and_cancelled_on_the_other(c, || {
        let by_node = keys_by_node();
        eprintln!("job keys by shard: {by_node:?}");
        assert_eq!(
            by_node.iter().filter(|n| **n > 0).count(),
            1,
            "{usage} and every job key on one shard: {by_node:?}"
        );
    })
    .await;
}

/// A job submitted to A is watched, got, listed and cancelled on B;
/// `check_store` looks at the store before it is killed, and then the
/// Jobs calls answer UNAVAILABLE at once.
async fn watched_got_listed_and_cancelled_on_the_other(c: Cluster, check_store: impl FnOnce()) {
    let (mut on_a, mut on_b) = (jobs(&c.a).await, jobs(c.b.as_ref().unwrap()).await);

    // 300 tokens at 1 s per 1,000: ~0.3 s of output, submitted to A.
    let job = submit(&mut on_a, 300, false, "once").await;
    assert_eq!(job.owner, "r1");
    let seen_on_b = watch(&mut on_b, &job.job_id, None).await;
    let kinds: Vec<&str> = seen_on_b.iter().map(kind).collect();
    assert_eq!(&kinds[..3], ["queued", "routed", "running"], "{kinds:?}");
    assert!(kinds.iter().filter(|k| **k == "output").count() >= 5, "{kinds:?}");
    assert_one_history(&seen_on_b);
    match &seen_on_b.last().unwrap().event {
        Some(Event::Ended(j)) => assert_eq!(j.state(), pb::JobState::Done, "{j:?}"),
        other => panic!("{other:?}"),
    }
    assert_eq!(
        watch(&mut on_a, &job.job_id, None).await,
        seen_on_b,
        "one history"
    );
    let got = get(&mut on_b, &job.job_id).await;
    assert_eq!(got.state(), pb::JobState::Done);
    assert_eq!((got.owner.as_str(), got.runs), ("r1", 1));
    assert_eq!(got.usage.unwrap().completion_tokens, 300);
    let listed = on_b
        .list_jobs(with_key(pb::ListJobsRequest::default(), "k-alpha"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(listed.jobs.len(), 1);
    assert_eq!(listed.jobs[0].job_id, job.job_id);
    // The idempotency key names the job on every replica.
    assert_eq!(submit(&mut on_b, 300, false, "once").await.job_id, job.job_id);

    // A minute of work on A, cancelled on B once it runs.
    let long = submit(&mut on_a, 60_000, false, "").await;
    let first = watch(&mut on_b, &long.job_id, Some(3)).await;
    assert_eq!(kind(&first[2]), "running", "{first:?}");
    let r = pb::JobRef {
        job_id: long.job_id.clone(),
    };
    let cancelled = on_b
        .cancel_job(with_key(r, "k-alpha"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(cancelled.state(), pb::JobState::Cancelled, "{cancelled:?}");
    assert_eq!(cancelled.owner, "r1", "A, its owner, ended it");
    eventually(Duration::from_secs(5), || async {
        sim_stats(c.sim.addr).await.cancelled == 1
    })
    .await
    .expect("the region-sim saw the cancellation");
    assert_one_history(&watch(&mut on_b, &long.job_id, None).await);

    // Redis gone: the Jobs calls answer UNAVAILABLE, at once.
    check_store();
    drop(c.redis);
    let started = Instant::now();
    let r = pb::JobRef {
        job_id: job.job_id.clone(),
    };
    let e = on_b.get_job(with_key(r, "k-alpha")).await.unwrap_err();
    assert_eq!(e.code(), Code::Unavailable, "{e:?}");
    assert!(
        e.message().contains("job store is unavailable"),
        "{}",
        e.message()
    );
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "{:?}",
        started.elapsed()
    );
}

/// Polls `p` for `id` until `taken` holds, at most until `deadline`;
/// answers how long after `since` it held, and the job then.
async fn taken_over(
    c: &mut JobsClient<Channel>,
    id: &str,
    since: Instant,
    deadline: Duration,
    taken: impl Fn(&pb::Job) -> bool,
) -> (Duration, pb::Job) {
    loop {
        let job = get(c, id).await;
        if taken(&job) {
            return (since.elapsed(), job);
        }
        assert!(
            since.elapsed() < deadline,
            "not taken over within {deadline:?}: {job:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_replicas_jobs_are_taken_over_within_the_lease() {
    let lease = Duration::from_secs(1);
    let mut c = cluster("1000", "1s").await;
    let (mut on_a, mut on_b) = (jobs(&c.a).await, jobs(c.b.as_ref().unwrap()).await);
    // Two running on A (3 s of output each; A runs two per tenant), then
    // two queued behind them.
    let again = submit(&mut on_a, 3000, true, "").await;
    let once = submit(&mut on_a, 3000, false, "").await;
    for j in [&again, &once] {
        let events = watch(&mut on_a, &j.job_id, Some(3)).await;
        assert_eq!(kind(&events[2]), "running", "{events:?}");
    }
    let queued = [
        submit(&mut on_a, 200, false, "").await,
        submit(&mut on_a, 200, true, "").await,
    ];
    for q in &queued {
        let j = get(&mut on_b, &q.job_id).await;
        assert_eq!((j.state(), j.owner.as_str()), (pb::JobState::Queued, "r1"));
    }

    c.a.kill();
    let killed = Instant::now();
    let within = lease + Duration::from_secs(1);
    let (t, j) = taken_over(&mut on_b, &again.job_id, killed, within, |j| {
        j.owner == "r2" && j.runs == 2
    })
    .await;
    eprintln!("repeatable running job sent again by B {t:?} after the kill: {j:?}");
    let (t, j) = taken_over(&mut on_b, &once.job_id, killed, within, |j| {
        j.state() == pb::JobState::Interrupted
    })
    .await;
    eprintln!("non-repeatable running job INTERRUPTED {t:?} after the kill");
    assert_eq!(j.owner, "r2");
    assert!(j.error_message.contains("not run again"), "{j:?}");
    for q in &queued {
        let (t, _) = taken_over(&mut on_b, &q.job_id, killed, within, |j| j.owner == "r2").await;
        eprintln!("queued job taken over {t:?} after the kill");
    }

    // Every one ends; only the repeatable one that ran ran twice.
    for (j, state, runs) in [
        (&again, pb::JobState::Done, 2),
        (&once, pb::JobState::Interrupted, 1),
        (&queued[0], pb::JobState::Done, 1),
        (&queued[1], pb::JobState::Done, 1),
    ] {
        let events = watch(&mut on_b, &j.job_id, None).await;
        assert_one_history(&events);
        let got = get(&mut on_b, &j.job_id).await;
        assert_eq!((got.state(), got.runs), (state, runs), "{got:?}");
        let last_run = &events[last_queued(&events)..];
        assert_eq!(
            output(last_run),
            String::from_utf8_lossy(&got.output),
            "the last run's output, once"
        );
    }
    let repeated = sim_stats(c.sim.addr).await.repeated_request_ids;
    assert_eq!(
        repeated,
        vec![again.job_id.clone()],
        "only the repeatable job ran twice"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stopping_replica_hands_its_queued_jobs_over_at_once() {
    // A lease of 10 s: without the hand-over, B would take A's queued jobs
    // 6.7 s or more after A stopped renewing them.
    let mut c = cluster("1000", "10s").await;
    let (mut on_a, mut on_b) = (jobs(&c.a).await, jobs(c.b.as_ref().unwrap()).await);
    // Two running on A (2 s of output each), two queued behind them.
    let running = [
        submit(&mut on_a, 2000, false, "").await,
        submit(&mut on_a, 2000, false, "").await,
    ];
    for j in &running {
        let events = watch(&mut on_a, &j.job_id, Some(3)).await;
        assert_eq!(kind(&events[2]), "running", "{events:?}");
    }
    let queued = [
        submit(&mut on_a, 200, false, "").await,
        submit(&mut on_a, 200, false, "").await,
    ];
    c.a.terminate();
    let stopped = Instant::now();
    for q in &queued {
        let (t, _) = taken_over(&mut on_b, &q.job_id, stopped, Duration::from_secs(3), |j| {
            j.owner == "r2"
        })
        .await;
        eprintln!("queued job handed over to B {t:?} after SIGTERM to A");
    }
    // A finishes what it was running, then exits; nothing runs twice.
    let status =
        c.a.wait(Duration::from_secs(15))
            .expect("A stops after its running jobs");
    assert!(status.success(), "{status:?}");
    for j in running.iter().chain(&queued) {
        let (_, got) = taken_over(&mut on_b, &j.job_id, stopped, Duration::from_secs(15), |j| {
            j.state() == pb::JobState::Done
        })
        .await;
        assert_eq!(got.runs, 1, "{got:?}");
    }
    assert!(sim_stats(c.sim.addr).await.repeated_request_ids.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_paused_owner_cannot_finish_a_job_a_second_time() {
    let c = cluster("1000", "1s").await;
    let (mut on_a, mut on_b) = (jobs(&c.a).await, jobs(c.b.as_ref().unwrap()).await);
    // 4 s of output: A is still being sent it when it wakes up.
    let job = submit(&mut on_a, 4000, true, "").await;
    let events = watch(&mut on_b, &job.job_id, Some(3)).await;
    assert_eq!(kind(&events[2]), "running", "{events:?}");
    signal(&c.a, "-STOP");
    let paused = Instant::now();
    let (t, _) = taken_over(&mut on_b, &job.job_id, paused, Duration::from_secs(2), |j| {
        j.owner == "r2" && j.runs == 2
    })
    .await;
    eprintln!("taken over from the paused owner {t:?} after SIGSTOP");
    signal(&c.a, "-CONT");
    // A wakes up with its region call still streaming: its next write is
    // refused (or its heartbeat learns it lost the job) and it drops the
    // call, which the region-sim counts as cancelled.
    eventually(Duration::from_secs(5), || async {
        sim_stats(c.sim.addr).await.cancelled == 1
    })
    .await
    .expect("A stopped its run of the job");
    let events = watch(&mut on_b, &job.job_id, None).await;
    assert_one_history(&events);
    let got = get(&mut on_b, &job.job_id).await;
    assert_eq!(got.state(), pb::JobState::Done, "{got:?}");
    assert_eq!((got.owner.as_str(), got.runs), ("r2", 2));
    // The output is B's run's alone: 4,000 tokens once.
    assert_eq!(got.usage.unwrap().completion_tokens, 4000);
    // Whatever A had stored before the pause came before the takeover;
    // after it, B's run alone, whose output is the record's.
    let (before, after) = events.split_at(last_queued(&events));
    assert!(before.iter().any(|e| kind(e) == "running"), "A ran it first");
    let kinds: Vec<&str> = after.iter().map(kind).collect();
    let routed = kinds.iter().filter(|k| **k == "routed").count();
    assert_eq!(
        routed,
        1,
        "runs sent after the takeover, among {} events",
        kinds.len()
    );
    assert_eq!(
        output(after),
        String::from_utf8_lossy(&got.output),
        "the record's output is B's run's, once"
    );
    assert_eq!(
        sim_stats(c.sim.addr).await.repeated_request_ids,
        vec![job.job_id.clone()]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_paused_past_its_lease_keeps_its_own_running_job() {
    // Alone: nobody else takes the job while A is stopped.
    let c = cluster_of(1, "1000", "1s").await;
    let mut on_a = jobs(&c.a).await;
    let job = submit(&mut on_a, 3000, false, "").await;
    let events = watch(&mut on_a, &job.job_id, Some(3)).await;
    assert_eq!(kind(&events[2]), "running", "{events:?}");
    signal(&c.a, "-STOP");
    // Its lease (1 s) lapses while it is stopped.
    tokio::time::sleep(Duration::from_millis(1_500)).await;
    signal(&c.a, "-CONT");
    // Awake, it renews its hold before it looks for jobs without an owner,
    // so it does not take its own running job from itself (which would
    // stop the run and end the job INTERRUPTED).
    let events = watch(&mut on_a, &job.job_id, None).await;
    assert_one_history(&events);
    let got = get(&mut on_a, &job.job_id).await;
    assert_eq!(got.state(), pb::JobState::Done, "{got:?}");
    assert_eq!((got.owner.as_str(), got.runs), ("r1", 1));
    assert!(sim_stats(c.sim.addr).await.repeated_request_ids.is_empty());
}
