//! 10,000 queued jobs from three tenants weighted 1 : 1 : 2 drain in
//! weighted fair order: while every tenant still has jobs waiting, each
//! one's share of the jobs finished is its weight's, within ±3 % of it. The
//! region's quota (1,000 requests/s) is the bottleneck; the dispatcher's peak
//! RSS over the run is printed and bounded.

mod common;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use common::jobs::with_key;
use common::{ConfigDir, SimRegion, dispatcher};
use dispatcher::dispatch::hash_key;
use dispatcher::pb;
use dispatcher::pb::jobs_client::JobsClient;
use tonic::transport::Channel;

const TENANTS: [(&str, f64); 3] = [("alpha", 1.0), ("beta", 1.0), ("gamma", 2.0)];
const JOBS: usize = 10_000;
/// Peak resident memory allowed for the dispatcher holding 10,000 jobs.
const MAX_RSS_MB: u64 = 400;

fn dispatcher_toml() -> String {
    let mut s = String::from(
        "[[models]]\nname = \"gpt-4o\"\n[jobs]\ndata_dir = \"data\"\nmax_running = 16\nmax_running_per_tenant = 16\n",
    );
    for (name, weight) in TENANTS {
        s += &format!(
            "[[tenants]]\nname = \"{name}\"\nweight = {weight}\nkeys = [\"{}\"]\n",
            hash_key(&format!("k-{name}"))
        );
    }
    s
}

fn peak_rss_mb(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = status.lines().find(|l| l.starts_with("VmHWM:")).unwrap();
    line.split_whitespace().nth(1).unwrap().parse::<u64>().unwrap() / 1024
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_thousand_jobs_drain_in_weighted_fair_order() {
    let cfg = ConfigDir::new(&dispatcher_toml());
    let _sim = cfg.start_region(SimRegion {
        name: "r1",
        tokens_per_minute: 6_000_000_000,
        requests_per_minute: 60_000,
        extra_toml: "burst_requests = 100\n",
        accounting: "usage",
        sim_args: &["--ms-per-1k-tokens", "0", "--completion-min-fraction", "1"],
        ..Default::default()
    });
    let d = dispatcher(&cfg.config());
    let c = JobsClient::connect(format!("http://{}", d.addr)).await.unwrap();

    // Submitted by 32 callers at once, the tenants interleaved 1 : 1 : 2
    // job for job, so each has a third of the jobs.
    let start = std::time::Instant::now();
    let ids: Arc<parking_lot::Mutex<Vec<(String, &'static str)>>> = Arc::default();
    let mut tasks = Vec::new();
    for w in 0..32 {
        let mut c: JobsClient<Channel> = c.clone();
        let ids = ids.clone();
        tasks.push(tokio::spawn(async move {
            for i in (w..JOBS).step_by(32) {
                let tenant = TENANTS[i % 3].0;
                let r = pb::SubmitJobRequest {
                    request: Some(pb::DispatchRequest {
                        model: "gpt-4o".into(),
                        payload: "x".into(),
                        prompt_tokens: 10,
                        max_output_tokens: 10,
                        ..Default::default()
                    }),
                    idempotency_key: String::new(),
                    repeatable: false,
                };
                let job = c
                    .submit_job(with_key(r, &format!("k-{tenant}")))
                    .await
                    .unwrap()
                    .into_inner();
                ids.lock().push((job.job_id, tenant));
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let submitted_at = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64;
    let ids = ids.lock().clone();
    assert_eq!(ids.len(), JOBS);
    let submitting = start.elapsed();

    // Drained: nothing queued or running for any tenant (looked at once a
    // second: a filtered list scans the tenant's jobs).
    let mut probe = c.clone();
    let deadline = std::time::Instant::now() + Duration::from_secs(120);
    'drain: loop {
        assert!(std::time::Instant::now() < deadline, "all 10,000 jobs drained");
        tokio::time::sleep(Duration::from_secs(1)).await;
        for (t, _) in TENANTS {
            for state in [pb::JobState::Queued, pb::JobState::Running] {
                let r = pb::ListJobsRequest {
                    state: state as i32,
                    limit: 1,
                };
                if !probe
                    .list_jobs(with_key(r, &format!("k-{t}")))
                    .await
                    .unwrap()
                    .into_inner()
                    .jobs
                    .is_empty()
                {
                    continue 'drain;
                }
            }
        }
        break;
    }
    let rss = peak_rss_mb(d.pid());
    let draining = start.elapsed() - submitting;

    // When each finished (asked by 8 callers at once).
    let chunks: Vec<Vec<(String, &'static str)>> = ids.chunks(JOBS / 8).map(|c| c.to_vec()).collect();
    let mut asks = Vec::new();
    for chunk in chunks {
        let mut c = probe.clone();
        asks.push(tokio::spawn(async move {
            let mut out = Vec::with_capacity(chunk.len());
            for (id, tenant) in chunk {
                let j = c
                    .get_job(with_key(pb::JobRef { job_id: id }, &format!("k-{tenant}")))
                    .await
                    .unwrap()
                    .into_inner();
                assert_eq!(j.state(), pb::JobState::Done, "{j:?}");
                out.push((j.finished_unix_ms, tenant));
            }
            out
        }));
    }
    let mut finished: Vec<(u64, &str)> = Vec::with_capacity(JOBS);
    for a in asks {
        finished.extend(a.await.unwrap());
    }
    finished.sort();
    // The run: from the last submission until the first tenant has no job
    // left (gamma, twice as fast), while all three have jobs waiting.
    let last_of = |t: &str| finished.iter().rev().find(|f| f.1 == t).unwrap().0;
    let end = TENANTS.iter().map(|(t, _)| last_of(t)).min().unwrap();
    let run: Vec<&str> = finished
        .iter()
        .filter(|(at, _)| *at > submitted_at && *at < end)
        .map(|(_, t)| *t)
        .collect();
    assert!(
        run.len() >= 3_000,
        "the run has {} jobs: submission too slow?",
        run.len()
    );
    let mut n: BTreeMap<&str, usize> = BTreeMap::new();
    for t in &run {
        *n.entry(t).or_default() += 1;
    }
    let total: f64 = TENANTS.iter().map(|t| t.1).sum();
    let mut report = Vec::new();
    for (t, w) in TENANTS {
        let share = n[t] as f64 / run.len() as f64;
        let expected = w / total;
        report.push(format!("{t} {share:.4} (expected {expected:.4})"));
        assert!(
            (share - expected).abs() <= 0.03 * expected,
            "{t}: {share:.4} against {expected:.4}; {n:?}"
        );
    }
    eprintln!(
        "submitted {JOBS} jobs in {submitting:.1?}, drained in {draining:.1?} more; {} jobs finished while all three tenants waited: {}; dispatcher peak RSS {rss} MB",
        run.len(),
        report.join(", ")
    );
    assert!(rss <= MAX_RSS_MB, "peak RSS {rss} MB");
}
