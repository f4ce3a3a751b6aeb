//! Shared by the jobs tests: a dispatcher with tenants alpha and beta in
//! front of one region-sim, a call with a tenant's key, and an event's kind.

use dispatcher::dispatch::hash_key;
use dispatcher::pb;

use super::{ConfigDir, Proc, SimRegion, dispatcher};

/// dispatcher.toml of the jobs tests: gpt-4o, tenants alpha (key `k-alpha`)
/// and beta (`k-beta`), `[jobs]` with `data_dir = "data"` and `jobs`, then
/// `tables` (`[cluster]`, ...).
pub fn dispatcher_toml(jobs: &str, tables: &str) -> String {
    format!(
        r#"
[[models]]
name = "gpt-4o"
max_request_tokens = 200000
[[tenants]]
name = "alpha"
keys = ["{}"]
[[tenants]]
name = "beta"
keys = ["{}"]
[jobs]
data_dir = "data"
{jobs}
{tables}
"#,
        hash_key("k-alpha"),
        hash_key("k-beta"),
    )
}

/// A dispatcher on `dispatcher_toml(jobs, tables)` with one region (r1) whose
/// region-sim's output takes `ms_per_1k` per 1,000 tokens.
pub fn setup(ms_per_1k: &str, jobs: &str, tables: &str) -> (ConfigDir, Proc, Proc) {
    let cfg = ConfigDir::new(&dispatcher_toml(jobs, tables));
    let sim = cfg.start_region(SimRegion {
        name: "r1",
        tokens_per_minute: 600_000_000,
        requests_per_minute: 6_000_000,
        accounting: "usage",
        sim_args: &["--ms-per-1k-tokens", ms_per_1k, "--completion-min-fraction", "1"],
        ..Default::default()
    });
    let d = dispatcher(&cfg.config());
    (cfg, sim, d)
}

/// A repeatable job of gpt-4o with `tokens` output tokens, under the
/// idempotency key `key`.
#[allow(dead_code)]
pub fn repeatable_job(tokens: u64, key: &str) -> pb::SubmitJobRequest {
    pb::SubmitJobRequest {
        request: Some(pb::DispatchRequest {
            model: "gpt-4o".into(),
            payload: "agent work".into(),
            prompt_tokens: 10,
            max_output_tokens: tokens,
            ..Default::default()
        }),
        idempotency_key: key.into(),
        repeatable: true,
    }
}

/// One region-sim for r1 (gpt-4o, limits far above what a test sends,
/// output at `ms_per_1k` per 1,000 tokens, all of max_output_tokens), and
/// r1's region file pointing at it in each of `dirs` (replicas sharing it).
#[allow(dead_code)]
pub fn shared_region(dirs: &[ConfigDir], ms_per_1k: &str) -> Proc {
    let sim = super::region_sim(
        dirs[0].path(),
        "r1",
        &[
            "--model",
            "gpt-4o:600000000:6000000:usage",
            "--ms-per-1k-tokens",
            ms_per_1k,
            "--completion-min-fraction",
            "1",
        ],
    );
    let region = super::region_toml(
        "r1",
        &sim.endpoint(),
        256,
        &[("gpt-4o", 600_000_000, 6_000_000, "usage")],
    );
    for d in dirs {
        d.write_region("r1", &region);
    }
    sim
}

/// `message` with `authorization: Bearer <key>`.
pub fn with_key<T>(message: T, key: &str) -> tonic::Request<T> {
    let mut r = tonic::Request::new(message);
    r.metadata_mut()
        .insert("authorization", format!("Bearer {key}").parse().unwrap());
    r
}

/// What a job event is, by name.
pub fn kind(e: &pb::JobEvent) -> &'static str {
    use pb::job_event::Event;
    match e.event {
        Some(Event::Queued(_)) => "queued",
        Some(Event::Routed(_)) => "routed",
        Some(Event::Running(_)) => "running",
        Some(Event::Output(_)) => "output",
        Some(Event::Ended(_)) => "ended",
        None => "none",
    }
}

/// The job's events (tenant alpha's) from the first, until its end or `stop_after` of them.
pub async fn watch(
    c: &mut dispatcher::pb::jobs_client::JobsClient<tonic::transport::Channel>,
    id: &str,
    stop_after: Option<usize>,
) -> Vec<pb::JobEvent> {
    let r = pb::WatchJobRequest {
        job_id: id.into(),
        from_seq: 0,
    };
    let mut stream = c.watch_job(with_key(r, "k-alpha")).await.unwrap().into_inner();
    let mut out = Vec::new();
    while let Some(e) = stream.message().await.unwrap() {
        out.push(e);
        if stop_after.is_some_and(|n| out.len() >= n) {
            break;
        }
    }
    out
}
