//! How a region comes back after failing, on a virtual clock: half-open
//! trials are really sent, and the error and latency averages of an idle
//! region decay, so its score (and its share) return in a stated time
//! (six half-lives of `routing.load_half_life`, 30 s by default).

use std::time::{Duration, Instant};

use super::breaker::{BreakerConfig, Circuit};
use super::load::Outcome;
use super::model::ModelSpec;
use super::model_quota::{Accounting, ModelLimits, Settlement};
use super::region::RegionSpec;
use super::router::{Completion, RouteRequest, Router, RouterSpec};
use super::strategy::{StrategyKind, StrategyParams};

const TOKENS: u64 = 1_000;

fn region(name: &str) -> RegionSpec {
    RegionSpec {
        name: name.into(),
        weight: 1.0,
        max_concurrent: 100,
        models: vec![(
            "m".into(),
            ModelLimits {
                tokens_per_minute: 1_000_000_000,
                requests_per_minute: 100_000_000,
                burst_tokens: None,
                burst_requests: None,
                accounting: Accounting::Usage,
            },
        )],
    }
}

/// Two regions, "a" and "b", under the default strategy (weighted_load).
fn router(breaker: BreakerConfig, t0: Instant) -> Router {
    Router::try_new(
        RouterSpec {
            models: vec![ModelSpec {
                name: "m".into(),
                default_max_output_tokens: 10,
                chars_per_token: 4.0,
                max_request_tokens: 1_000_000,
            }],
            regions: vec![region("a"), region("b")],
            strategy: StrategyKind::WeightedLoad,
            params: StrategyParams::default(),
            seed: 1,
            breaker,
            sharing: None,
        },
        t0,
    )
    .unwrap()
}

fn req() -> RouteRequest<'static> {
    RouteRequest {
        model: "m",
        tokens: TOKENS,
        origin: None,
    }
}

/// A reply after `ms` milliseconds (per 1,000 tokens, as the request is 1,000).
fn ok(ms: u64) -> Completion {
    Completion {
        settlement: Settlement::Used {
            prompt: TOKENS / 2,
            completion: TOKENS / 2,
        },
        outcome: Some(Outcome::Success),
        latency: Duration::from_millis(ms),
        ..Completion::abandoned()
    }
}

fn failed() -> Completion {
    Completion {
        settlement: Settlement::NotRun,
        outcome: Some(Outcome::Failure),
        ..Completion::abandoned()
    }
}

/// Sends one request to `region` (the other one ruled out) and settles it.
fn send_to(r: &mut Router, region: &str, c: Completion, now: Instant) -> Option<Circuit> {
    let other = if region == "a" { "b" } else { "a" };
    let res = r.reserve(&req(), &[other.into()], now).unwrap();
    assert_eq!(&*res.region, region);
    r.settle(&res, c, now).transition.map(|t| t.to)
}

fn score(r: &Router, region: &str, now: Instant) -> f64 {
    let p = r.preview(&req(), now).unwrap();
    let c = p.candidates.iter().find(|c| c.region == region).unwrap();
    assert!(c.eligible, "{c:?}");
    c.score
}

fn secs(s: f64) -> Duration {
    Duration::from_secs_f64(s)
}

#[test]
fn a_half_open_region_gets_its_trials_even_when_a_peer_scores_far_higher() {
    let t0 = crate::testing::epoch();
    let breaker = BreakerConfig::default();
    let mut r = router(breaker, t0);
    for _ in 0..20 {
        send_to(&mut r, "a", ok(50), t0);
    }
    let mut opened = None;
    for _ in 0..breaker.consecutive_failures {
        opened = send_to(&mut r, "b", failed(), t0).or(opened);
    }
    assert_eq!(opened, Some(Circuit::Open));

    let t1 = t0 + breaker.cool_down;
    assert_eq!(r.region("b").unwrap().circuit(t1).name(), "half_open");
    let (a, b) = (score(&r, "a", t1), score(&r, "b", t1));
    assert!(a > 2.0 * b, "a peer scoring far higher: a {a}, b {b}");
    assert_eq!(r.preview(&req(), t1).unwrap().chosen.as_deref(), Some("b"));

    // The next `half_open_trials` decisions are the trials, sent on purpose;
    // then b has none left in flight to spare and the score decides again.
    let trials: Vec<_> = (0..breaker.half_open_trials)
        .map(|_| r.reserve(&req(), &[], t1).unwrap())
        .collect();
    for t in &trials {
        assert_eq!(&*t.region, "b", "a half-open region is sent its trials");
    }
    assert_eq!(&*r.reserve(&req(), &[], t1).unwrap().region, "a");
    let closed: Vec<_> = trials
        .iter()
        .filter_map(|t| r.settle(t, ok(50), t1).transition)
        .collect();
    assert_eq!(closed.last().map(|t| t.to), Some(Circuit::Closed), "{closed:?}");
    assert_eq!(r.region("b").unwrap().circuit(t1).name(), "closed");
}

#[test]
fn an_idle_regions_error_rate_and_latency_decay_so_its_score_comes_back() {
    let t0 = crate::testing::epoch();
    // Only the averages are under test: the breaker never opens.
    let breaker = BreakerConfig {
        consecutive_failures: u32::MAX,
        min_requests: u32::MAX,
        ..BreakerConfig::default()
    };
    let mut r = router(breaker, t0);
    let half_life = StrategyParams::default().load_half_life;
    // b fails every request (error rate 1, latency at the failure penalty);
    // a is fast and healthy and keeps working, ten replies a second.
    for _ in 0..20 {
        send_to(&mut r, "b", failed(), t0);
        send_to(&mut r, "a", ok(20), t0);
    }
    let b = r.region("b").unwrap().load();
    assert_eq!(b.error_rate(t0), 1.0);
    assert!(
        (b.error_rate(t0 + half_life) - 0.5).abs() < 1e-9,
        "halves in a half-life"
    );
    let mut now = t0;
    let mut ratio_at = Vec::new();
    for step in 1..=(6 * half_life.as_millis() / 100) {
        now = t0 + Duration::from_millis(step as u64 * 100);
        send_to(&mut r, "a", ok(20), now);
        if step % (half_life.as_millis() / 100) == 0 {
            ratio_at.push(score(&r, "b", now) / score(&r, "a", now));
        }
    }
    println!("b's score / a's after each half-life: {ratio_at:?}");
    assert!(ratio_at[1] < 0.5, "still paying for its errors two half-lives on");
    assert!(
        ratio_at.windows(2).all(|w| w[1] > w[0]),
        "comes back steadily: {ratio_at:?}"
    );
    // The stated time: within 10 % of a fast healthy peer after six half-lives.
    assert!(ratio_at[5] >= 0.9, "{ratio_at:?}");
    assert!(r.region("b").unwrap().load().error_rate(now) < 0.02);
}

#[test]
fn a_region_that_recovered_closes_on_its_trials_and_earns_its_share_back() {
    let t0 = crate::testing::epoch();
    let breaker = BreakerConfig::default();
    let half_life = StrategyParams::default().load_half_life;
    let mut r = router(breaker, t0);
    // Steady traffic: a decision every 20 ms, each answered 500 ms later
    // (about 25 in flight, so load spreads the work). b fails everything
    // sent to it between 1 s and 2 s, then works again.
    let step = Duration::from_millis(20);
    let reply = Duration::from_millis(500);
    let b_down = |sent: Instant| sent >= t0 + secs(1.0) && sent < t0 + secs(2.0);
    let mut in_flight = std::collections::VecDeque::new();
    let (mut opened_at, mut closed_at) = (None, None);
    // Decisions while b is half-open, and how many of them went to b.
    let (mut half_open, mut trials) = (0u32, 0u32);
    // (when, went to b) of every decision.
    let mut sent = Vec::new();
    for i in 0..3_000u32 {
        let now = t0 + step * i;
        while in_flight.front().is_some_and(|(due, _, _)| *due <= now) {
            let (_, res, c) = in_flight.pop_front().unwrap();
            match r.settle(&res, c, now).transition.map(|t| t.to) {
                Some(Circuit::Open) => opened_at = opened_at.or(Some(now)),
                Some(Circuit::Closed) => closed_at = closed_at.or(Some(now)),
                _ => {}
            }
        }
        let was_half_open = r.region("b").unwrap().circuit(now).name() == "half_open";
        let res = r.reserve(&req(), &[], now).unwrap();
        let on_b = &*res.region == "b";
        if was_half_open {
            half_open += 1;
            trials += on_b as u32;
        }
        sent.push((now, on_b));
        let c = if on_b && b_down(now) { failed() } else { ok(500) };
        in_flight.push_back((now + reply, res, c));
    }
    let share = |from: Duration, to: Duration| {
        let w: Vec<bool> = sent
            .iter()
            .filter(|(t, _)| *t >= t0 + from && *t < t0 + to)
            .map(|(_, b)| *b)
            .collect();
        w.iter().filter(|b| **b).count() as f64 / w.len() as f64
    };
    let per_second: Vec<String> = (0..60)
        .map(|s| format!("{:.2}", share(secs(s as f64), secs(s as f64 + 1.0))))
        .collect();
    println!("b's share each second: {}", per_second.join(" "));
    let opened = opened_at.expect("b's circuit opened");
    let closed = closed_at.expect("b's circuit closed again");
    println!(
        "opened at {:?}, closed at {:?}; {half_open} decisions while half-open, {trials} of them to b",
        opened - t0,
        closed - t0
    );
    assert!(share(secs(0.0), secs(1.0)) > 0.4, "b had its share before");
    // The trials are the first decisions once the cool-down ends, and their
    // replies close it: within the trials plus one reply time of decisions.
    assert_eq!(trials, breaker.half_open_trials);
    assert!(closed <= opened + breaker.cool_down + step * breaker.half_open_trials + reply);
    assert!(half_open <= breaker.half_open_trials + (reply.as_millis() / step.as_millis()) as u32 + 1);
    // Its share back (half, before the errors): within six half-lives of
    // the errors stopping, b takes at least 40 % of the work again. (Here
    // after about three: the open time counts, idle, and a region that
    // looks faster than its peer draws work before it is fully back.)
    let back = secs(2.0) + half_life * 6;
    let after = share(back, back + secs(10.0));
    println!("b's share from {back:?} for 10 s: {after:.2}");
    assert!(after >= 0.4, "b's share {after}");
}
