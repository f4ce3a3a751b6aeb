//! Chaos: three region-sim processes under steady load; one is killed
//! mid-run and restarted later on the same port. Every request gets a reply
//! or a clear status; work that failed over says attempts > 1; once the dead
//! region's breaker opens no request goes there; after the restart traffic
//! returns within the health interval plus the breaker cool-down.

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{ConfigDir, client, dispatcher, region_sim_at, region_status, region_toml};
use dispatcher::pb;
use tokio::sync::Mutex;
use tonic::Code;

const HEALTH_INTERVAL: Duration = Duration::from_millis(200);
const COOL_DOWN: Duration = Duration::from_secs(1);

const DISPATCHER_TOML: &str = r#"
[auth]
allow_anonymous = true
[server]
max_attempts = 3
[routing]
strategy = "round_robin"
[routing.breaker]
consecutive_failures = 3
cool_down = "1s"
[routing.retry_budget]
ratio = 0.5
[[models]]
name = "gpt-4o"
"#;

fn region_file(name: &str, endpoint: &str) -> String {
    region_toml(
        name,
        endpoint,
        256,
        &[("gpt-4o", 100_000_000, 10_000_000, "admission")],
    ) + "[health]\ninterval = \"200ms\"\ntimeout = \"150ms\"\nunhealthy_threshold = 2\nhealthy_threshold = 1\n"
}

struct Outcome {
    sent: Instant,
    region: Option<String>,
    attempts: u32,
    error: Option<(Code, String)>,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_region_dies_and_comes_back() {
    let cfg = ConfigDir::new(DISPATCHER_TOML);
    let args = [
        "--model",
        "gpt-4o:100000000:10000000",
        "--base-latency-ms",
        "20",
        "--ms-per-1k-tokens",
        "0",
    ];
    let mut sims = Vec::new();
    for name in ["a", "b", "c"] {
        let sim = region_sim_at(cfg.path(), name, "127.0.0.1:0", &args);
        cfg.write_region(name, &region_file(name, &sim.endpoint()));
        sims.push(sim);
    }
    let doomed_addr = sims[1].addr.to_string();
    let d = dispatcher(&cfg.config());
    let grpc = client(d.addr).await;

    let outcomes: Arc<Mutex<Vec<Outcome>>> = Arc::default();
    let start = Instant::now();
    let mut calls = tokio::task::JoinSet::new();
    let mut tick = tokio::time::interval(Duration::from_millis(20));
    let (mut killed_at, mut restarted_at, mut opened) = (None, None, None::<(Instant, u64)>);
    let mut violations = Vec::new();
    while start.elapsed() < Duration::from_secs(10) {
        tick.tick().await;
        let t = start.elapsed();
        if killed_at.is_none() && t >= Duration::from_secs(3) {
            sims[1].kill();
            killed_at = Some(Instant::now());
        }
        if let (Some(_), None) = (killed_at, opened) {
            let s = region_status(d.addr, "b").await.unwrap();
            if s.circuit == "open" || !s.healthy {
                opened = Some((Instant::now(), s.failed + s.completed));
            }
        }
        if let (Some((_, attempts)), None) = (opened, restarted_at) {
            let s = region_status(d.addr, "b").await.unwrap();
            if s.failed + s.completed != attempts {
                violations.push(format!(
                    "{} attempts on b while it was down",
                    s.failed + s.completed - attempts
                ));
            }
        }
        if restarted_at.is_none() && t >= Duration::from_secs(6) {
            sims[1] = region_sim_at(cfg.path(), "b", &doomed_addr, &args);
            restarted_at = Some(Instant::now());
        }
        let mut g = grpc.clone();
        let outcomes = outcomes.clone();
        calls.spawn(async move {
            let sent = Instant::now();
            let mut req = tonic::Request::new(pb::DispatchRequest {
                model: "gpt-4o".into(),
                prompt_tokens: 50,
                max_output_tokens: 50,
                ..Default::default()
            });
            req.set_timeout(Duration::from_secs(5));
            let o = match g.dispatch(req).await {
                Ok(r) => {
                    let r = r.into_inner();
                    Outcome {
                        sent,
                        region: Some(r.region),
                        attempts: r.attempts,
                        error: None,
                    }
                }
                Err(s) => Outcome {
                    sent,
                    region: None,
                    attempts: 0,
                    error: Some((s.code(), s.message().to_string())),
                },
            };
            outcomes.lock().await.push(o);
        });
    }
    while calls.join_next().await.is_some() {}
    let (killed_at, restarted_at) = (killed_at.unwrap(), restarted_at.unwrap());
    let (opened_at, _) = opened.expect("the dead region's breaker opened or its health checks failed");
    let outcomes = outcomes.lock().await;
    let ok = outcomes.iter().filter(|o| o.error.is_none()).count();
    let failovers = outcomes.iter().filter(|o| o.attempts > 1).count();
    let unclear: Vec<_> = outcomes
        .iter()
        .filter_map(|o| o.error.as_ref())
        .filter(|(code, msg)| !matches!(code, Code::Unavailable | Code::ResourceExhausted) || msg.is_empty())
        .collect();
    let back = outcomes
        .iter()
        .filter(|o| o.sent > restarted_at && o.region.as_deref() == Some("b"))
        .map(|o| o.sent - restarted_at)
        .min();
    let bound = HEALTH_INTERVAL + COOL_DOWN;
    println!(
        "{} requests: {:.2} % answered with a reply, {failovers} failed over (attempts > 1); \
         b's breaker opened or health failed {:?} after the kill; traffic back on b {:?} after the restart (bound {bound:?})",
        outcomes.len(),
        100.0 * ok as f64 / outcomes.len() as f64,
        opened_at - killed_at,
        back
    );
    assert!(unclear.is_empty(), "unclear statuses: {unclear:?}");
    assert!(failovers > 0, "requests caught by the kill failed over");
    assert!(
        outcomes
            .iter()
            .filter(|o| o.attempts > 1)
            .all(|o| o.region.as_deref() != Some("b")),
        "a failover never lands on the dead region"
    );
    assert!(violations.is_empty(), "{violations:?}");
    assert!(ok as f64 >= 0.99 * outcomes.len() as f64, "success rate");
    let back = back.expect("traffic returned to b");
    assert!(
        back <= bound + Duration::from_millis(300),
        "recovery took {back:?}"
    );
    drop(sims);
}
