//! `--html FILE`: the report as one self-contained page (inline SVG, no
//! script, nothing fetched), for people who would rather look than read:
//! latency of successes over time (p50 and p99 per second), successes and
//! failures per second, and the split by region and by tenant.

use std::fmt::Write;

use super::report::{Percentiles, Report, Sample, percentile};

const WIDTH: f64 = 900.0;
const HEIGHT: f64 = 220.0;
const PAD: f64 = 40.0;

/// One whole second of the run: (p50 ms, p99 ms) of its successes (none
/// without any), successes, failures.
type Second = (Option<(f64, f64)>, u64, u64);

fn per_second(samples: &[Sample]) -> Vec<Second> {
    let seconds = samples
        .iter()
        .map(|s| s.at_ms / 1000)
        .max()
        .map_or(0, |m| m as usize + 1);
    let mut ok: Vec<Vec<u32>> = vec![Vec::new(); seconds];
    let mut failed = vec![0u64; seconds];
    for s in samples {
        let i = (s.at_ms / 1000) as usize;
        if s.ok {
            ok[i].push(s.latency_us);
        } else {
            failed[i] += 1;
        }
    }
    ok.into_iter()
        .zip(failed)
        .map(|(mut us, f)| {
            us.sort_unstable();
            let p = (!us.is_empty()).then(|| (percentile(&us, 0.5), percentile(&us, 0.99)));
            (p, us.len() as u64, f)
        })
        .collect()
}

fn escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

/// A line chart of `series` (name, colour, one value per second; `None`
/// leaves a gap) with a y axis in `unit`.
fn chart(title: &str, unit: &str, series: &[(&str, &str, Vec<Option<f64>>)]) -> String {
    let n = series.iter().map(|s| s.2.len()).max().unwrap_or(0).max(2);
    let top = series
        .iter()
        .flat_map(|s| s.2.iter().flatten())
        .fold(0.0f64, |a, b| a.max(*b))
        .max(1e-9)
        * 1.1;
    let x = |i: usize| PAD + (WIDTH - 2.0 * PAD) * i as f64 / (n - 1) as f64;
    let y = |v: f64| HEIGHT - PAD + (2.0 * PAD - HEIGHT) * v / top;
    let mut svg = String::new();
    let _ = write!(
        svg,
        r##"<h2>{}</h2><svg width="{WIDTH}" height="{HEIGHT}" viewBox="0 0 {WIDTH} {HEIGHT}" role="img">"##,
        escape(title)
    );
    let _ = write!(
        svg,
        r##"<line x1="{PAD}" y1="{b}" x2="{r}" y2="{b}" stroke="#888"/><line x1="{PAD}" y1="{PAD}" x2="{PAD}" y2="{b}" stroke="#888"/>"##,
        b = HEIGHT - PAD,
        r = WIDTH - PAD
    );
    for k in 0..=4 {
        let v = top * k as f64 / 4.0;
        let _ = write!(
            svg,
            r##"<text x="{}" y="{:.1}" font-size="10" text-anchor="end">{v:.3} {unit}</text>"##,
            PAD - 4.0,
            y(v) + 3.0
        );
    }
    let _ = write!(
        svg,
        r##"<text x="{}" y="{}" font-size="10" text-anchor="end">{} s</text>"##,
        WIDTH - PAD,
        HEIGHT - PAD + 14.0,
        n - 1
    );
    for (k, (name, colour, values)) in series.iter().enumerate() {
        let mut path = String::new();
        let mut pen_up = true;
        for (i, v) in values.iter().enumerate() {
            match v {
                Some(v) => {
                    let _ = write!(
                        path,
                        "{}{:.1},{:.1} ",
                        if pen_up { "M" } else { "L" },
                        x(i),
                        y(*v)
                    );
                    pen_up = false;
                }
                None => pen_up = true,
            }
        }
        let _ = write!(
            svg,
            r##"<path d="{path}" fill="none" stroke="{colour}" stroke-width="1.5"/><text x="{}" y="{}" font-size="11" fill="{colour}">{}</text>"##,
            PAD + 10.0 + 120.0 * k as f64,
            PAD - 10.0,
            escape(name)
        );
    }
    svg.push_str("</svg>");
    svg
}

fn latency_cells(p: &Percentiles) -> String {
    format!(
        "<td>{:.3}</td><td>{:.3}</td><td>{:.3}</td><td>{:.3}</td>",
        p.p50_ms, p.p90_ms, p.p99_ms, p.max_ms
    )
}

fn bar(share: f64) -> String {
    format!(
        r##"<svg width="200" height="12"><rect width="{:.1}" height="12" fill="#4a7"/></svg> {:.1} %"##,
        200.0 * share,
        100.0 * share
    )
}

pub fn page(r: &Report, samples: &[Sample]) -> String {
    let seconds = per_second(samples);
    let p50: Vec<Option<f64>> = seconds.iter().map(|s| s.0.map(|p| p.0)).collect();
    let p99: Vec<Option<f64>> = seconds.iter().map(|s| s.0.map(|p| p.1)).collect();
    let ok: Vec<Option<f64>> = seconds.iter().map(|s| Some(s.1 as f64)).collect();
    let failed: Vec<Option<f64>> = seconds.iter().map(|s| Some(s.2 as f64)).collect();
    let mut h = String::new();
    let _ = write!(
        h,
        r##"<!doctype html><html><head><meta charset="utf-8"><title>loadgen: {target}</title>
<style>body{{font-family:sans-serif;margin:2em}}table{{border-collapse:collapse}}td,th{{border:1px solid #ccc;padding:3px 8px;text-align:right}}th{{background:#eee}}td:first-child{{text-align:left}}</style></head><body>
<h1>loadgen against {target}</h1><p>{mode}; {sent} sent, {ok} ok, {dropped} dropped by the client; {tput:.1} ok/s over {secs:.1} s.</p>
<table><tr><th>latency (ms)</th><th>p50</th><th>p90</th><th>p99</th><th>max</th><th>requests</th></tr>
<tr><td>successes</td>{lok}<td>{nok}</td></tr><tr><td>failures</td>{lfail}<td>{nfail}</td></tr><tr><td>all</td>{lall}<td>{nall}</td></tr></table>
<p>Status codes: {codes}</p>"##,
        target = escape(&r.target),
        mode = escape(&r.mode),
        sent = r.sent,
        ok = r.ok,
        dropped = r.dropped_by_client,
        tput = r.throughput_ok_per_sec,
        secs = r.measured_seconds,
        lok = latency_cells(&r.latency_ok),
        nok = r.latency_ok.count,
        lfail = latency_cells(&r.latency_failed),
        nfail = r.latency_failed.count,
        lall = latency_cells(&r.latency),
        nall = r.latency.count,
        codes = escape(&format!("{:?}", r.status_codes)),
    );
    h.push_str(&chart(
        "Latency of successes, per second",
        "ms",
        &[("p50", "#1f77b4", p50), ("p99", "#d62728", p99)],
    ));
    h.push_str(&chart(
        "Requests per second",
        "/s",
        &[("ok", "#2ca02c", ok), ("failed", "#d62728", failed)],
    ));
    h.push_str("<h2>By region</h2><table><tr><th>region</th><th>requests</th><th>tokens</th><th>share of tokens</th></tr>");
    for (k, s) in &r.regions {
        let _ = write!(
            h,
            "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
            escape(k),
            s.requests,
            s.tokens,
            bar(s.share_of_tokens)
        );
    }
    h.push_str("</table><h2>By tenant</h2><table><tr><th>tenant</th><th>ok</th><th>tokens</th><th>share of tokens</th><th>p50 ok (ms)</th><th>p99 ok (ms)</th><th>status codes</th></tr>");
    for (k, s) in &r.tenants {
        let _ = write!(
            h,
            "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{:.3}</td><td>{:.3}</td><td>{}</td></tr>",
            escape(k),
            s.requests,
            s.tokens,
            bar(s.share_of_tokens),
            s.latency_ok.p50_ms,
            s.latency_ok.p99_ms,
            escape(&format!("{:?}", s.status_codes))
        );
    }
    h.push_str("</table></body></html>\n");
    h
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seconds_split_successes_and_failures() {
        let s = |at_ms, latency_us, ok| Sample {
            at_ms,
            latency_us,
            ok,
        };
        let seconds = per_second(&[
            s(10, 1000, true),
            s(20, 3000, true),
            s(900, 10, false),
            s(2500, 2000, true),
        ]);
        assert_eq!(seconds.len(), 3);
        assert_eq!(seconds[0], (Some((1.0, 3.0)), 2, 1));
        assert_eq!(seconds[1], (None, 0, 0));
        assert_eq!(seconds[2], (Some((2.0, 2.0)), 1, 0));
    }
}
