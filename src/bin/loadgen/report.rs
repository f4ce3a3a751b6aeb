//! What loadgen counted, and its report: for people (text), for scripts
//! (`--json`) and, from the same figures, the HTML page (`html.rs`).
//!
//! Latency is given for every request, and apart for the successful ones
//! and the others: a refusal takes a fraction of a millisecond, so a run
//! that was mostly refused would otherwise look fast.

use std::collections::BTreeMap;
use std::io::Write;

use serde::Serialize;

/// One counted request, for the latency over time.
#[derive(Debug, Clone, Copy)]
pub struct Sample {
    /// When it was due, in ms since the start.
    pub at_ms: u32,
    pub latency_us: u32,
    pub ok: bool,
}

/// Keep at most this many samples for the page (a million requests).
const MAX_SAMPLES: usize = 1_000_000;

#[derive(Default)]
pub struct Tally {
    pub ok_us: Vec<u32>,
    pub failed_us: Vec<u32>,
    pub codes: BTreeMap<String, u64>,
    /// Successful requests and their tokens, per region.
    pub regions: BTreeMap<String, (u64, u64)>,
    pub tenants: BTreeMap<String, TenantTally>,
    /// Kept only for `--html`.
    pub samples: Option<Vec<Sample>>,
}

#[derive(Default)]
pub struct TenantTally {
    pub ok: u64,
    pub tokens: u64,
    pub codes: BTreeMap<String, u64>,
    pub ok_us: Vec<u32>,
}

/// One finished request, as `Tally::record` takes it.
pub struct Finished<'a> {
    pub at_ms: u32,
    pub latency_us: u32,
    /// "Ok" or the gRPC code's name.
    pub code: String,
    /// Region and tokens of a success.
    pub served: Option<(String, u64)>,
    pub tenant: Option<&'a str>,
}

impl Tally {
    pub fn record(&mut self, f: Finished<'_>) {
        let ok = f.served.is_some();
        if ok {
            self.ok_us.push(f.latency_us);
        } else {
            self.failed_us.push(f.latency_us);
        }
        if let Some(samples) = &mut self.samples
            && samples.len() < MAX_SAMPLES
        {
            samples.push(Sample {
                at_ms: f.at_ms,
                latency_us: f.latency_us,
                ok,
            });
        }
        if let Some(tenant) = f.tenant {
            let t = self.tenants.entry(tenant.to_string()).or_default();
            *t.codes.entry(f.code.clone()).or_default() += 1;
            if let Some((_, tokens)) = &f.served {
                t.ok += 1;
                t.tokens += tokens;
                t.ok_us.push(f.latency_us);
            }
        }
        *self.codes.entry(f.code).or_default() += 1;
        if let Some((region, tokens)) = f.served
            && !region.is_empty()
        {
            let e = self.regions.entry(region).or_default();
            e.0 += 1;
            e.1 += tokens;
        }
    }
}

#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct Percentiles {
    pub count: u64,
    pub p50_ms: f64,
    pub p90_ms: f64,
    pub p99_ms: f64,
    pub p999_ms: f64,
    pub max_ms: f64,
}

impl Percentiles {
    /// Of `us`, sorted here.
    pub fn of(us: &mut [u32]) -> Self {
        us.sort_unstable();
        Self {
            count: us.len() as u64,
            p50_ms: percentile(us, 0.50),
            p90_ms: percentile(us, 0.90),
            p99_ms: percentile(us, 0.99),
            p999_ms: percentile(us, 0.999),
            max_ms: us.last().map_or(0.0, |v| *v as f64 / 1000.0),
        }
    }
}

/// The `p` quantile of sorted microseconds, in ms.
pub fn percentile(sorted: &[u32], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let i = ((sorted.len() as f64 * p).ceil() as usize).clamp(1, sorted.len()) - 1;
    sorted[i] as f64 / 1000.0
}

#[derive(Serialize)]
pub struct Split {
    pub requests: u64,
    pub tokens: u64,
    pub share_of_tokens: f64,
}

/// A tenant's part: its successes (as a region's), every status code, and
/// the latency of its successes.
#[derive(Serialize)]
pub struct TenantSplit {
    pub requests: u64,
    pub tokens: u64,
    pub share_of_tokens: f64,
    pub status_codes: BTreeMap<String, u64>,
    pub latency_ok: Percentiles,
}

#[derive(Serialize)]
pub struct Report {
    pub target: String,
    pub mode: String,
    pub offered_rate: Option<f64>,
    pub concurrency: Option<usize>,
    pub measured_seconds: f64,
    pub sent: u64,
    pub ok: u64,
    pub dropped_by_client: u64,
    pub throughput_ok_per_sec: f64,
    /// Every counted request.
    pub latency: Percentiles,
    /// The successful ones only, and the others.
    pub latency_ok: Percentiles,
    pub latency_failed: Percentiles,
    pub status_codes: BTreeMap<String, u64>,
    pub regions: BTreeMap<String, Split>,
    pub tenants: BTreeMap<String, TenantSplit>,
    pub rss_kib: Vec<u64>,
    /// Every success's latency in ms, sorted (`--json-latencies`): for
    /// merging the reports of several loadgens.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub latencies_ok_ms: Option<Vec<f64>>,
}

/// The tally's figures (the run's own fields come from the caller).
pub struct Figures {
    pub latency: Percentiles,
    pub latency_ok: Percentiles,
    pub latency_failed: Percentiles,
    pub status_codes: BTreeMap<String, u64>,
    pub regions: BTreeMap<String, Split>,
    pub tenants: BTreeMap<String, TenantSplit>,
}

impl Tally {
    pub fn figures(&mut self) -> Figures {
        let mut all: Vec<u32> = self.ok_us.iter().chain(&self.failed_us).copied().collect();
        let region_tokens: u64 = self.regions.values().map(|v| v.1).sum();
        let tenant_tokens: u64 = self.tenants.values().map(|t| t.tokens).sum();
        let share = |t: u64, total: u64| if total > 0 { t as f64 / total as f64 } else { 0.0 };
        Figures {
            latency: Percentiles::of(&mut all),
            latency_ok: Percentiles::of(&mut self.ok_us),
            latency_failed: Percentiles::of(&mut self.failed_us),
            status_codes: self.codes.clone(),
            regions: self
                .regions
                .iter()
                .map(|(k, (n, t))| {
                    let split = Split {
                        requests: *n,
                        tokens: *t,
                        share_of_tokens: share(*t, region_tokens),
                    };
                    (k.clone(), split)
                })
                .collect(),
            tenants: self
                .tenants
                .iter_mut()
                .map(|(k, t)| {
                    let split = TenantSplit {
                        requests: t.ok,
                        tokens: t.tokens,
                        share_of_tokens: share(t.tokens, tenant_tokens),
                        status_codes: t.codes.clone(),
                        latency_ok: Percentiles::of(&mut t.ok_us),
                    };
                    (k.clone(), split)
                })
                .collect(),
        }
    }
}

fn line(out: &mut dyn Write, what: &str, p: &Percentiles) -> std::io::Result<()> {
    writeln!(
        out,
        "{what:<11} p50 {:.3} ms  p90 {:.3} ms  p99 {:.3} ms  p99.9 {:.3} ms  max {:.3} ms  ({} requests)",
        p.p50_ms, p.p90_ms, p.p99_ms, p.p999_ms, p.max_ms, p.count
    )
}

pub fn print(out: &mut dyn Write, r: &Report) -> std::io::Result<()> {
    let load = match (r.offered_rate, r.concurrency) {
        (_, Some(c)) => format!("closed loop, {c} workers"),
        (Some(rate), None) => format!("open loop, {rate:.0} requests/s offered"),
        _ => String::new(),
    };
    writeln!(out, "target      {} ({}, {load})", r.target, r.mode)?;
    writeln!(
        out,
        "requests    {} sent, {} ok, {} dropped by the client; {:.1} ok/s over {:.1} s",
        r.sent, r.ok, r.dropped_by_client, r.throughput_ok_per_sec, r.measured_seconds
    )?;
    line(out, "latency ok", &r.latency_ok)?;
    if r.latency_failed.count > 0 {
        line(out, "  failed", &r.latency_failed)?;
        line(out, "  all", &r.latency)?;
    }
    writeln!(out, "status      {:?}", r.status_codes)?;
    for (k, s) in &r.regions {
        writeln!(
            out,
            "region      {k:<16} {:>8} requests {:>12} tokens {:>6.1} %",
            s.requests,
            s.tokens,
            100.0 * s.share_of_tokens
        )?;
    }
    for (k, s) in &r.tenants {
        writeln!(
            out,
            "tenant      {k:<16} {:>8} requests {:>12} tokens {:>6.1} %  p50 ok {:.3} ms  p99 ok {:.3} ms  {:?}",
            s.requests,
            s.tokens,
            100.0 * s.share_of_tokens,
            s.latency_ok.p50_ms,
            s.latency_ok.p99_ms,
            s.status_codes
        )?;
    }
    if let (Some(first), Some(max), Some(min)) =
        (r.rss_kib.first(), r.rss_kib.iter().max(), r.rss_kib.iter().min())
    {
        writeln!(
            out,
            "rss         first {first} KiB, min {min} KiB, max {max} KiB over {} samples",
            r.rss_kib.len()
        )?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn successes_and_refusals_are_timed_apart_and_split_by_tenant() {
        let mut t = Tally::default();
        for i in 0..10u32 {
            t.record(Finished {
                at_ms: i,
                latency_us: 50_000,
                code: "Ok".into(),
                served: Some(("east".into(), 100)),
                tenant: Some("a"),
            });
        }
        for i in 0..90u32 {
            t.record(Finished {
                at_ms: i,
                latency_us: 200,
                code: "ResourceExhausted".into(),
                served: None,
                tenant: Some("b"),
            });
        }
        let f = t.figures();
        assert_eq!(f.latency_ok.p50_ms, 50.0);
        assert_eq!(f.latency_failed.p50_ms, 0.2);
        assert_eq!(
            f.latency.p50_ms, 0.2,
            "all together, the refusals hide the latency"
        );
        assert_eq!(f.tenants["a"].requests, 10);
        assert_eq!(f.tenants["a"].latency_ok.p99_ms, 50.0);
        assert_eq!(f.tenants["b"].requests, 0);
        assert_eq!(f.tenants["b"].status_codes["ResourceExhausted"], 90);
        assert_eq!(f.regions["east"].tokens, 1000);
    }
}
