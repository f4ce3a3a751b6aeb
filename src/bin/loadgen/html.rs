//! `--html FILE`: the report as one self-contained page (inline SVG, no
//! script, nothing fetched), for people who would rather look than read:
//! latency of successes over time (p50 and p99 per second), successes and
//! failures per second (apart, each on its own scale), and the split by
//! region and by tenant. Axis labels scale their unit (ms / s, /s / k/s)
//! and the plot moves right to make room for the widest.

use std::fmt::Write;

use super::report::{Percentiles, Report, Sample, percentile};

const WIDTH: f64 = 900.0;
const HEIGHT: f64 = 220.0;
/// Room above, right of and below the plot (the left side is sized to the
/// widest axis label).
const PAD: f64 = 40.0;
/// The axis labels' font size, and a width per character no label of
/// digits, '.', ' ' and a unit exceeds in a sans-serif font (0.6 em).
const LABEL_FONT: f64 = 10.0;
const LABEL_CHAR: f64 = 0.6 * LABEL_FONT;

/// What a chart's values are, and how its axis labels read them.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Unit {
    /// Milliseconds: labelled in ms, or in s from a second up.
    Ms,
    /// A count a second: labelled /s, or k/s from a thousand up.
    PerSecond,
}

/// Axis ticks from 0 to at least `max`, at most four steps of 1, 2, 2.5 or
/// 5 times a power of ten.
fn ticks(max: f64) -> Vec<f64> {
    let max = if max > 0.0 && max.is_finite() { max } else { 1.0 };
    let raw = max / 4.0;
    let power = 10f64.powf(raw.log10().floor());
    let step = [1.0, 2.0, 2.5, 5.0, 10.0]
        .iter()
        .map(|m| m * power)
        .find(|s| *s >= raw * (1.0 - 1e-9))
        .unwrap_or(10.0 * power);
    let n = (max / step - 1e-9).ceil().max(1.0) as usize;
    (0..=n).map(|k| step * k as f64).collect()
}

/// The labels of `ticks` (from `ticks`): scaled to s or k/s when the top
/// tick reaches a thousand, with as many decimals as the step needs.
fn tick_labels(ticks: &[f64], unit: Unit) -> Vec<String> {
    let top = ticks.last().copied().unwrap_or(0.0);
    let (scale, suffix) = match unit {
        Unit::Ms if top >= 1000.0 => (1e-3, "s"),
        Unit::Ms => (1.0, "ms"),
        Unit::PerSecond if top >= 1000.0 => (1e-3, "k/s"),
        Unit::PerSecond => (1.0, "/s"),
    };
    let step = ticks.get(1).copied().unwrap_or(1.0) * scale;
    let decimals = (0..=3)
        .find(|d| {
            let shifted = step * 10f64.powi(*d);
            (shifted - shifted.round()).abs() < 1e-6
        })
        .unwrap_or(3) as usize;
    ticks
        .iter()
        .map(|t| t * scale)
        .map(|v| {
            if v == 0.0 {
                "0".to_string()
            } else {
                format!("{v:.decimals$} {suffix}")
            }
        })
        .collect()
}

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
/// leaves a gap) on an axis from 0 in `unit`.
fn chart(title: &str, unit: Unit, series: &[(&str, &str, Vec<Option<f64>>)]) -> String {
    let n = series.iter().map(|s| s.2.len()).max().unwrap_or(0).max(2);
    let max = series
        .iter()
        .flat_map(|s| s.2.iter().flatten())
        .fold(0.0f64, |a, b| a.max(*b));
    let ticks = ticks(max);
    let labels = tick_labels(&ticks, unit);
    let top = *ticks.last().expect("at least two ticks");
    let widest = labels.iter().map(|l| l.chars().count()).max().unwrap_or(0) as f64;
    let left = (widest * LABEL_CHAR + 12.0).max(PAD);
    let x = |i: usize| left + (WIDTH - left - PAD) * i as f64 / (n - 1) as f64;
    let y = |v: f64| HEIGHT - PAD + (2.0 * PAD - HEIGHT) * v / top;
    let mut svg = String::new();
    let _ = write!(
        svg,
        r##"<h2>{}</h2><svg width="{WIDTH}" height="{HEIGHT}" viewBox="0 0 {WIDTH} {HEIGHT}" role="img">"##,
        escape(title)
    );
    let _ = write!(
        svg,
        r##"<line x1="{left}" y1="{b}" x2="{r}" y2="{b}" stroke="#888"/><line x1="{left}" y1="{PAD}" x2="{left}" y2="{b}" stroke="#888"/>"##,
        b = HEIGHT - PAD,
        r = WIDTH - PAD
    );
    for (t, label) in ticks.iter().zip(&labels) {
        let _ = write!(
            svg,
            r##"<line x1="{left}" y1="{yy:.1}" x2="{r}" y2="{yy:.1}" stroke="#eee"/><text x="{}" y="{:.1}" font-size="{LABEL_FONT}" text-anchor="end">{}</text>"##,
            left - 4.0,
            y(*t) + 3.0,
            escape(label),
            yy = y(*t),
            r = WIDTH - PAD,
        );
    }
    let _ = write!(
        svg,
        r##"<text x="{left}" y="{by}" font-size="{LABEL_FONT}" text-anchor="start">0 s</text><text x="{}" y="{by}" font-size="{LABEL_FONT}" text-anchor="end">{} s</text>"##,
        WIDTH - PAD,
        n - 1,
        by = HEIGHT - PAD + 14.0,
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
            left + 10.0 + 120.0 * k as f64,
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
<h1>loadgen against {target}</h1><p>{mode}; {sent} sent, {ok} ok ({ok_share:.1} % of those answered), {dropped} dropped by the client; {tput:.1} ok/s over {secs:.1} s.</p>
<table><tr><th>latency (ms)</th><th>p50</th><th>p90</th><th>p99</th><th>max</th><th>requests</th></tr>
<tr><td>successes</td>{lok}<td>{nok}</td></tr><tr><td>failures</td>{lfail}<td>{nfail}</td></tr><tr><td>all</td>{lall}<td>{nall}</td></tr></table>
<p>Status codes: {codes}</p>"##,
        target = escape(&r.target),
        mode = escape(&r.mode),
        sent = r.sent,
        ok = r.ok,
        ok_share = 100.0 * r.ok as f64 / (r.latency.count.max(1)) as f64,
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
        Unit::Ms,
        &[("p50", "#1f77b4", p50), ("p99", "#d62728", p99)],
    ));
    // Apart, each on its own scale: a hundred successes a second would be a
    // flat line at zero beside thousands of refusals.
    h.push_str(&chart(
        "Successes per second",
        Unit::PerSecond,
        &[("ok", "#2ca02c", ok)],
    ));
    h.push_str(&chart(
        "Failures per second (refusals and errors; status codes above)",
        Unit::PerSecond,
        &[("failed", "#d62728", failed)],
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

    /// A `<text>` of an SVG: where, its font size, anchor and content.
    #[derive(Debug)]
    struct Text {
        x: f64,
        y: f64,
        size: f64,
        anchor: String,
        content: String,
    }

    fn attr(tag: &str, name: &str) -> Option<String> {
        let at = tag.find(&format!(" {name}=\""))? + name.len() + 3;
        Some(tag[at..at + tag[at..].find('"')?].to_string())
    }

    /// Each `<svg>` of `page`: its viewBox's width and height, and its texts.
    fn svgs(page: &str) -> Vec<((f64, f64), Vec<Text>)> {
        page.split("<svg ")
            .skip(1)
            .map(|svg| {
                let svg = &svg[..svg.find("</svg>").unwrap()];
                let head = &svg[..svg.find('>').unwrap()];
                let view: Vec<f64> = attr(&format!(" {head}"), "viewBox")
                    .map(|v| v.split(' ').map(|n| n.parse().unwrap()).collect())
                    .unwrap_or_else(|| {
                        vec![
                            0.0,
                            0.0,
                            attr(&format!(" {head}"), "width").unwrap().parse().unwrap(),
                            12.0,
                        ]
                    });
                let texts = svg
                    .split("<text")
                    .skip(1)
                    .map(|t| {
                        let (tag, rest) = t.split_once('>').unwrap();
                        Text {
                            x: attr(tag, "x").unwrap().parse().unwrap(),
                            y: attr(tag, "y").unwrap().parse().unwrap(),
                            size: attr(tag, "font-size").unwrap().parse().unwrap(),
                            anchor: attr(tag, "text-anchor").unwrap_or_else(|| "start".into()),
                            content: rest[..rest.find("</text>").unwrap()].to_string(),
                        }
                    })
                    .collect();
                ((view[2], view[3]), texts)
            })
            .collect()
    }

    /// The width a sans-serif font gives `s` at most: wide letters (m, w)
    /// 0.9 em, narrow marks ('.', ' ', '/') 0.35 em, the rest 0.6 em.
    fn width(s: &str, size: f64) -> f64 {
        s.chars()
            .map(|c| match c {
                'm' | 'w' | 'M' | 'W' => 0.9,
                '.' | ' ' | '/' | ',' => 0.35,
                _ => 0.6,
            })
            .sum::<f64>()
            * size
    }

    /// Every text of every chart lies inside its viewBox (nothing clipped,
    /// as ".391 ms" was for 2,391 ms).
    fn assert_fits(page: &str) {
        for ((w, h), texts) in svgs(page) {
            for t in texts {
                let wide = width(&t.content, t.size);
                let (left, right) = match t.anchor.as_str() {
                    "end" => (t.x - wide, t.x),
                    "middle" => (t.x - wide / 2.0, t.x + wide / 2.0),
                    _ => (t.x, t.x + wide),
                };
                assert!(
                    left >= 0.0 && right <= w && t.y - t.size >= 0.0 && t.y <= h,
                    "{t:?} ({left:.1}..{right:.1} wide) falls outside the viewBox 0 0 {w} {h}"
                );
            }
        }
    }

    /// The y-axis labels of the chart titled `title`, bottom to top.
    fn axis_labels(page: &str, title: &str) -> Vec<String> {
        let at = page
            .find(&format!("<h2>{title}"))
            .unwrap_or_else(|| panic!("a chart {title:?}"));
        svgs(&page[at..])
            .remove(0)
            .1
            .into_iter()
            .filter(|t| t.anchor == "end" && t.y < HEIGHT - PAD + 10.0)
            .map(|t| t.content)
            .collect()
    }

    /// The run the issue saw: the README's closed loop, 99.4 % refused:
    /// 100 successes a second taking up to 2,391 ms beside 17,000 refusals
    /// a second taking 0.2 ms.
    fn mostly_refused() -> (Report, Vec<Sample>) {
        let mut samples = Vec::new();
        for second in 0..10u32 {
            for i in 0..100u32 {
                let latency_us = 1_000_000 + 1_391_000 * i / 99;
                samples.push(Sample {
                    at_ms: second * 1000 + i,
                    latency_us,
                    ok: true,
                });
            }
            for i in 0..17_000u32 {
                samples.push(Sample {
                    at_ms: second * 1000 + i % 1000,
                    latency_us: 200,
                    ok: false,
                });
            }
        }
        let mut ok_us: Vec<u32> = samples.iter().filter(|s| s.ok).map(|s| s.latency_us).collect();
        let mut failed_us: Vec<u32> = samples.iter().filter(|s| !s.ok).map(|s| s.latency_us).collect();
        let mut all: Vec<u32> = samples.iter().map(|s| s.latency_us).collect();
        let report = Report {
            target: "http://127.0.0.1:50051".into(),
            mode: "dispatcher, closed loop".into(),
            offered_rate: None,
            concurrency: Some(64),
            measured_seconds: 10.0,
            sent: samples.len() as u64,
            ok: ok_us.len() as u64,
            dropped_by_client: 0,
            throughput_ok_per_sec: 100.0,
            latency: Percentiles::of(&mut all),
            latency_ok: Percentiles::of(&mut ok_us),
            latency_failed: Percentiles::of(&mut failed_us),
            status_codes: [
                ("Ok".to_string(), 1_000),
                ("ResourceExhausted".to_string(), 170_000),
            ]
            .into(),
            regions: Default::default(),
            tenants: Default::default(),
            rss_kib: Vec::new(),
            latencies_ok_ms: None,
        };
        (report, samples)
    }

    #[test]
    fn axis_labels_fit_and_scale_their_unit() {
        let (report, samples) = mostly_refused();
        let page = page(&report, &samples);
        assert_fits(&page);
        assert_eq!(
            axis_labels(&page, "Latency of successes"),
            ["0", "1 s", "2 s", "3 s"]
        );
        // Successes on their own scale, readable beside the refusals.
        assert_eq!(
            axis_labels(&page, "Successes per second"),
            ["0", "25 /s", "50 /s", "75 /s", "100 /s"]
        );
        assert_eq!(
            axis_labels(&page, "Failures per second"),
            ["0", "5 k/s", "10 k/s", "15 k/s", "20 k/s"]
        );
        assert!(
            page.contains("1000 ok (0.6 % of those answered)"),
            "the share of successes is said"
        );
    }

    #[test]
    fn ticks_are_round_and_cover_the_values() {
        assert_eq!(ticks(2391.0), [0.0, 1000.0, 2000.0, 3000.0]);
        assert_eq!(ticks(1900.0), [0.0, 500.0, 1000.0, 1500.0, 2000.0]);
        assert_eq!(
            tick_labels(&ticks(1900.0), Unit::Ms),
            ["0", "0.5 s", "1.0 s", "1.5 s", "2.0 s"]
        );
        assert_eq!(ticks(100.0), [0.0, 25.0, 50.0, 75.0, 100.0]);
        assert_eq!(ticks(0.0), [0.0, 0.25, 0.5, 0.75, 1.0]);
        assert_eq!(
            tick_labels(&ticks(0.8), Unit::Ms),
            ["0", "0.2 ms", "0.4 ms", "0.6 ms", "0.8 ms"]
        );
        assert_eq!(
            tick_labels(&ticks(16_200.0), Unit::PerSecond),
            ["0", "5 k/s", "10 k/s", "15 k/s", "20 k/s"]
        );
        assert_eq!(tick_labels(&ticks(3.0), Unit::Ms), ["0", "1 ms", "2 ms", "3 ms"]);
    }

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
