//! Issue 30's "50 replicas on paper": the deterministic simulation with the
//! real core (`common::vsim`: each replica's scheduler, router and shared
//! quota; `core::central` for what Redis runs; strict providers) for 50
//! replicas × 500 region-models at 100,000 requests a second in all, and
//! how its cost in Redis grows with replicas, region-models and the sync
//! interval. With `central_lua_cost`, a real redis-server's cost of each of
//! those calls; docs/SCALING.md ("50 replicas on paper") puts them
//! together. Both are ignored by default (minutes, not seconds):
//! `benches/sim-scale` runs them in release.
//!
//! The case: arrivals Poisson at 100,000 a second over the region-models by
//! a Zipf law (exponent 1: the busiest takes 14.7 % of 500, the least
//! 0.03 %), each request asking for one region-model's model, with loadgen's
//! heavy sizes (prompts Pareto from 100 tokens, outputs from 50, up to
//! 10,000 together; 476 tokens on average). Each region-model is a strict
//! provider of its own (charges prompt + max_tokens at admission, refuses
//! what its bucket lacks) whose tokens-per-minute is its share of the
//! offered tokens over `LOAD` (twice the quota offered), its
//! requests-per-minute 1.5 times the requests that quota holds at the mean
//! size, its burst `BURST` of refill; providers start empty. Default
//! `[cluster]` settings otherwise (chunk_ttl 1 s, the queue's 5 s wait,
//! overload control on). One second of arrivals a point by default
//! (`SIM_SCALE_SECONDS`): 50 × 500 takes about 150 s of run time for it, nearly
//! all of it the core's queue (docs/SCALING.md).

mod common;

use std::time::{Duration, Instant};

use common::Lcg;
use common::vsim::{Arrival, Deployment, Run, World, heavy_size, poisson};
use dispatcher::core::{OverloadSettings, SharingSettings};

/// Requests a second offered, all region-models together.
const TOTAL_RATE: f64 = 100_000.0;
/// The offered tokens over the providers' quota.
const LOAD: f64 = 2.0;
/// Each provider's burst, as this much of its refill.
const BURST: Duration = Duration::from_secs(10);
/// The Zipf exponent of the region-models' shares.
const ZIPF: f64 = 1.0;
/// Region-models to a region (each model served by one region only, so a
/// request targets one region-model): 500 are 20 regions of 25 models.
const MODELS_PER_REGION: usize = 25;
/// Each replica's queue is pumped at most this often (`Deployment::pump_every`):
/// a release costs every queued model's head tried in every region, and
/// pumped after each of 100,000 arrivals a second it is the whole run time.
const PUMP_EVERY: Duration = Duration::from_millis(5);

/// The mean of loadgen's heavy sizes (prompt + output), by drawing.
fn mean_size() -> f64 {
    let mut s = Lcg(7);
    (0..200_000)
        .map(|_| heavy_size(&mut s))
        .map(|(p, o)| p + o)
        .sum::<u64>() as f64
        / 200_000.0
}

/// Each region-model's share of the requests.
fn shares(n: usize) -> Vec<f64> {
    let w: Vec<f64> = (1..=n).map(|k| 1.0 / (k as f64).powf(ZIPF)).collect();
    let sum: f64 = w.iter().sum();
    w.iter().map(|x| x / sum).collect()
}

#[derive(Debug, Clone, Copy)]
struct Point {
    replicas: usize,
    region_models: usize,
    tick: Duration,
    seconds: u64,
}

/// The regions (one model each), their tokens and requests a minute.
fn world(region_models: usize) -> (World, Vec<u64>) {
    let mean = mean_size();
    let mut regions = Vec::new();
    let mut rpm = Vec::new();
    for (k, share) in shares(region_models).iter().enumerate() {
        // Named like a deployed model, for the keys' bytes.
        let name: &'static str = Box::leak(format!("gpt-4o-mini-2024-{k:03}").into_boxed_str());
        let requests_a_minute = TOTAL_RATE * share * 60.0 / LOAD;
        regions.push((name, (requests_a_minute * mean) as u64));
        rpm.push((1.5 * requests_a_minute) as u64);
    }
    (World::charged_at_admission(regions), rpm)
}

fn arrivals(region_models: usize, seconds: u64, seed: u64) -> Vec<Arrival> {
    let mut cumulative = shares(region_models);
    for k in 1..cumulative.len() {
        cumulative[k] += cumulative[k - 1];
    }
    let mut pick = Lcg(seed.wrapping_mul(31).wrapping_add(5));
    let mut out = poisson(
        &mut Lcg(seed),
        0,
        |_| TOTAL_RATE,
        Duration::ZERO,
        Duration::from_secs(seconds),
        heavy_size,
    );
    for a in &mut out {
        let u = pick.unit();
        a.region_model = cumulative.partition_point(|c| *c < u).min(region_models - 1);
    }
    out
}

struct Figures {
    calls_per_sec: f64,
    sent_per_sec: f64,
    received_per_sec: f64,
    refusals: u64,
    /// The largest share of `burst + rate × window` any region-model's
    /// provider admitted in any window (1 s, 10 s, 60 s), and the largest
    /// excess in tokens over it (≤ 0: within the bound).
    worst: [(f64, i64); 3],
    served: f64,
    used: f64,
    sim_secs: f64,
}

const WINDOWS: [u64; 3] = [1, 10, 60];

fn figures(world: &World, run: &Run, seconds: u64, sim_secs: f64) -> Figures {
    let span = run.redis_until.as_secs_f64();
    let mut worst = [(0.0f64, i64::MIN); 3];
    for (k, admitted) in run.admitted.iter().enumerate() {
        let tpm = world.regions[k].1;
        let burst = (tpm as f64 * BURST.as_secs_f64() / 60.0).ceil() as i64;
        for (slot, w) in WINDOWS.iter().enumerate() {
            let allowed = burst + (tpm * w / 60) as i64;
            let w = Duration::from_secs(*w);
            let (mut j, mut sum) = (0, 0i64);
            for i in 0..admitted.len() {
                while j < admitted.len() && admitted[j].0 < admitted[i].0 + w {
                    sum += admitted[j].1 as i64;
                    j += 1;
                }
                let (share, excess) = &mut worst[slot];
                *share = share.max(sum as f64 / allowed as f64);
                *excess = (*excess).max(sum - allowed);
                sum -= admitted[i].1 as i64;
            }
        }
    }
    let after_first: u64 = run
        .admitted
        .iter()
        .flatten()
        .filter(|(t, _)| *t >= Duration::from_secs(1) && *t < Duration::from_secs(seconds))
        .map(|(_, n)| n)
        .sum();
    let refill = world.supply_per_sec() * (seconds - 1) as f64;
    Figures {
        calls_per_sec: run.redis_calls as f64 / span,
        sent_per_sec: run.redis_bytes_sent as f64 / span,
        received_per_sec: run.redis_bytes_received as f64 / span,
        refusals: run.overruns,
        worst,
        served: run.fates.iter().filter(|f| f.granted.is_some()).count() as f64 / run.arrivals.len() as f64,
        used: after_first as f64 / refill,
        sim_secs,
    }
}

fn simulate(p: Point) -> Figures {
    let (world, rpm) = world(p.region_models);
    let arrivals = arrivals(p.region_models, p.seconds, 1);
    let started = Instant::now();
    let run = world.run_deployed(
        arrivals,
        &Deployment {
            replicas: p.replicas,
            sharing: Some(SharingSettings {
                replicas_floor: p.replicas as u32,
                tick: p.tick,
                ..SharingSettings::default()
            }),
            overload: Some(OverloadSettings::default()),
            requests_per_minute: Some(rpm),
            providers_start_empty: true,
            seed: 1,
            models_per_region: Some(MODELS_PER_REGION),
            burst: Some(BURST),
            pump_every: Some(PUMP_EVERY),
        },
    );
    figures(&world, &run, p.seconds, started.elapsed().as_secs_f64())
}

fn seconds() -> u64 {
    std::env::var("SIM_SCALE_SECONDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1)
}

/// The points: 50 × 500 at 100 ms, and each of replicas, region-models and
/// the sync interval varied from it alone. `SIM_SCALE_POINTS=headline`:
/// the first only; `SIM_SCALE_POINT=50,500,100`: that one only.
fn points() -> Vec<Point> {
    let base = Point {
        replicas: 50,
        region_models: 500,
        tick: Duration::from_millis(100),
        seconds: seconds(),
    };
    // One point: "replicas,region-models,interval ms".
    if let Ok(one) = std::env::var("SIM_SCALE_POINT") {
        let v: Vec<u64> = one.split(',').map(|x| x.trim().parse().unwrap()).collect();
        return vec![Point {
            replicas: v[0] as usize,
            region_models: v[1] as usize,
            tick: Duration::from_millis(v[2]),
            ..base
        }];
    }
    let mut out = vec![base];
    if std::env::var("SIM_SCALE_POINTS").as_deref() == Ok("headline") {
        return out;
    }
    for replicas in [5, 10, 25] {
        out.push(Point { replicas, ..base });
    }
    for region_models in [50, 100] {
        out.push(Point {
            region_models,
            ..base
        });
    }
    for ms in [50, 200] {
        out.push(Point {
            tick: Duration::from_millis(ms),
            ..base
        });
    }
    out
}

#[test]
#[ignore = "minutes in release: benches/sim-scale runs it"]
fn fifty_replicas_on_paper() {
    eprintln!(
        "{TOTAL_RATE} requests/s, Zipf {ZIPF} over the region-models, heavy sizes (mean {:.0} tokens), {LOAD}x the quota, burst {BURST:?} of refill",
        mean_size()
    );
    println!(
        "| replicas | region-models | sync interval | simulated | Redis calls/s | bytes/s sent | bytes/s received | provider refusals | worst 1 s / 10 s / 60 s window (of burst + rate × window) | served | quota used | run time |"
    );
    println!("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |");
    let mut over = Vec::new();
    for p in points() {
        let f = simulate(p);
        println!(
            "| {} | {} | {} ms | {} s | {:.0} | {:.1} MB | {:.1} MB | {} | {:.1} % / {:.1} % / {:.1} % | {:.1} % | {:.1} % | {:.0} s |",
            p.replicas,
            p.region_models,
            p.tick.as_millis(),
            p.seconds,
            f.calls_per_sec,
            f.sent_per_sec / 1e6,
            f.received_per_sec / 1e6,
            f.refusals,
            100.0 * f.worst[0].0,
            100.0 * f.worst[1].0,
            100.0 * f.worst[2].0,
            100.0 * f.served,
            100.0 * f.used,
            f.sim_secs,
        );
        if f.refusals > 0 || f.worst.iter().any(|(_, excess)| *excess > 0) {
            over.push(format!(
                "{p:?}: {} refusals, excess over the bound {:?}",
                f.refusals,
                f.worst.map(|w| w.1)
            ));
        }
    }
    assert!(over.is_empty(), "{over:#?}");
}

/// What one simulated replica sends one bucket, call after call.
#[derive(Clone, Default)]
struct Caller {
    seq: u64,
    spent: u64,
    settled: i64,
    acked: i64,
    granted: u64,
    generation: u64,
}

/// `INFO section`'s `field:value` as a number (the first number of a
/// `cmdstat_…:calls=…` line's `key=`, with `key`).
fn info_number(info: &str, field: &str, key: Option<&str>) -> f64 {
    let line = info
        .lines()
        .find_map(|l| l.strip_prefix(&format!("{field}:")))
        .unwrap_or_else(|| panic!("{field} in INFO"));
    let value = match key {
        Some(k) => line
            .split(',')
            .find_map(|kv| kv.strip_prefix(&format!("{k}=")))
            .unwrap_or_else(|| panic!("{k} in {field}")),
        None => line,
    };
    value.trim().parse().unwrap()
}

/// `central.lua` on a real redis-server on loopback (no persistence, as
/// docs/SCALING.md runs it), called as the sync task calls it: through
/// `RedisCentral`, one pipelined round trip of one `EVALSHA` per
/// region-model per replica tick (500 region-models), with 1 to 50
/// replicas' records in every bucket (each replica calls each bucket once
/// a round; the script is given a virtual time 100 ms later each round so
/// no record goes stale however long a round takes, where the sync task
/// sends "" for Redis `TIME`: one `TIME` call less a call). Calls from
/// `SIM_SCALE_CONNECTIONS` client connections at once (4), on one client
/// thread. Prints the calls a second sustained, Redis's own CPU per call
/// (`INFO commandstats`, `usec_per_call` of evalsha; and `INFO cpu`) and
/// the bytes it read and wrote per call against `central_wire`'s count.
#[tokio::test]
#[ignore = "a minute against a real redis-server: benches/sim-scale runs it"]
async fn central_lua_cost() {
    use common::central_wire;
    use common::redis::RedisServer;
    use dispatcher::cluster::RedisCentral;
    use dispatcher::core::central::Totals;
    use dispatcher::core::{CentralLimits, SyncCall, SyncItem};
    use std::sync::Arc;

    let connections: usize = std::env::var("SIM_SCALE_CONNECTIONS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(4);
    let buckets = 500;
    let measure = Duration::from_secs(8);
    let redis = RedisServer::start();
    let mut admin = redis.connection();
    let names: Vec<(Arc<str>, Arc<str>)> = (0..buckets)
        .map(|k| {
            (
                Arc::from(format!("region-{:02}", k / MODELS_PER_REGION)),
                Arc::from(format!("gpt-4o-mini-2024-{k:03}")),
            )
        })
        .collect();
    println!(
        "| replicas' records in each bucket | calls | calls/s sustained | evalsha usec_per_call | redis CPU per call (INFO cpu) | bytes read per call (counted) | bytes written per call (counted) |"
    );
    println!("| --- | --- | --- | --- | --- | --- | --- |");
    for records in [1usize, 10, 25, 50] {
        let _: () = redis::cmd("FLUSHALL").query(&mut admin).unwrap();
        let limits = CentralLimits {
            tokens_per_minute: 6_000_000,
            token_capacity: 1_000_000,
            requests_per_minute: 60_000,
            request_capacity: 10_000,
            replicas_floor: records as u32,
            hold_for: Duration::from_secs(1),
        };
        // Per connection: its client and its replicas (id, incarnation,
        // one caller per bucket).
        type Replica = (String, u32, Vec<Caller>);
        let mut clients: Vec<(RedisCentral, Vec<Replica>)> = (0..connections)
            .map(|_| {
                (
                    RedisCentral::new(&redis.url(), Duration::from_secs(30)).unwrap(),
                    Vec::new(),
                )
            })
            .collect();
        for r in 0..records {
            clients[r % connections].1.push((
                central_wire::replica_id(r),
                3_000_000_000 + r as u32,
                vec![Caller::default(); buckets],
            ));
        }
        let mut now_us: u64 = 1_764_000_000_000_000;
        let mut round = 0u64;
        let (mut started, mut before) = (Instant::now(), String::new());
        let (mut calls, mut counted_in, mut counted_out) = (0u64, 0u64, 0u64);
        loop {
            if round == 1 {
                // The first round made the records; measure from here.
                let _: () = redis::cmd("CONFIG").arg("RESETSTAT").query(&mut admin).unwrap();
                before = redis.info("all");
                started = Instant::now();
                (calls, counted_in, counted_out) = (0, 0, 0);
            } else if round > 1 && started.elapsed() >= measure {
                break;
            }
            round += 1;
            now_us += 100_000;
            let mut tasks = tokio::task::JoinSet::new();
            for (c, (mut central, mut replicas)) in std::mem::take(&mut clients).into_iter().enumerate() {
                let names = names.clone();
                tasks.spawn(async move {
                    let (mut n, mut bytes_in, mut bytes_out) = (0u64, 0u64, 0u64);
                    for (id, incarnation, callers) in &mut replicas {
                        let items: Vec<SyncItem> = callers
                            .iter_mut()
                            .enumerate()
                            .map(|(k, s)| {
                                // It spent what it was granted, gave some back.
                                s.seq += 1;
                                s.spent += s.granted;
                                s.acked = s.settled;
                                s.settled += 150;
                                SyncItem {
                                    region: names[k].0.clone(),
                                    model: names[k].1.clone(),
                                    limits,
                                    call: SyncCall {
                                        incarnation: *incarnation,
                                        seq: s.seq,
                                        ask_tokens: 2_000 + (k as u64 * 37) % 1_000,
                                        ask_requests: 5,
                                        need_tokens: if (s.seq + k as u64).is_multiple_of(7) {
                                            800
                                        } else {
                                            0
                                        },
                                        spent_tokens: s.spent,
                                        spent_requests: s.seq * 2,
                                        totals: Totals {
                                            settled_tokens: s.settled,
                                            ..Totals::default()
                                        },
                                        acked: Totals {
                                            settled_tokens: s.acked,
                                            ..Totals::default()
                                        },
                                        generation: s.generation,
                                        ..SyncCall::default()
                                    },
                                }
                            })
                            .collect();
                        let grants = central.call(id, &items, Some(now_us)).await.unwrap();
                        for ((s, item), g) in callers.iter_mut().zip(&items).zip(&grants) {
                            s.granted = g.tokens;
                            s.generation = s.generation.max(g.generation);
                            bytes_in += central_wire::call_bytes(id, item, Some(now_us));
                            bytes_out += central_wire::answer_bytes(g);
                        }
                        n += items.len() as u64;
                    }
                    (c, central, replicas, n, bytes_in, bytes_out)
                });
            }
            let mut back: Vec<_> = tasks.join_all().await;
            back.sort_by_key(|b| b.0);
            for (_, central, replicas, n, bytes_in, bytes_out) in back {
                clients.push((central, replicas));
                calls += n;
                counted_in += bytes_in;
                counted_out += bytes_out;
            }
        }
        let elapsed = started.elapsed().as_secs_f64();
        let after = redis.info("all");
        let evalsha_calls = info_number(&after, "cmdstat_evalsha", Some("calls"));
        assert_eq!(evalsha_calls as u64, calls, "every call ran the script once");
        let usec_per_call = info_number(&after, "cmdstat_evalsha", Some("usec_per_call"));
        let cpu =
            |info: &str| info_number(info, "used_cpu_sys", None) + info_number(info, "used_cpu_user", None);
        let delta = |field: &str| info_number(&after, field, None) - info_number(&before, field, None);
        // Each bucket keeps every replica's record.
        let (_, replicas_key) = dispatcher::cluster::bucket_keys(&names[0].0, &names[0].1);
        let held: usize = redis::cmd("HLEN").arg(&replicas_key).query(&mut admin).unwrap();
        assert_eq!(held, records, "records in a bucket");
        println!(
            "| {records} | {calls} | {:.0} | {usec_per_call:.1} µs | {:.1} µs | {:.0} ({:.0}) | {:.0} ({:.0}) |",
            calls as f64 / elapsed,
            1e6 * (cpu(&after) - cpu(&before)) / calls as f64,
            delta("total_net_input_bytes") / calls as f64,
            counted_in as f64 / calls as f64,
            delta("total_net_output_bytes") / calls as f64,
            counted_out as f64 / calls as f64,
        );
    }
}
