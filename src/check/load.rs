//! Load checks: the report in each reply is how the dispatcher sees a
//! region's own load (`utilization = max(ours, reported)`), so it must be
//! there, in range, and follow the work: rise under concurrent calls and
//! fall when a call is cancelled or its deadline passes. `in_flight` is
//! read from the load report of small probe calls (each counts itself).

use std::time::Duration;

use super::report::Judged;
use crate::pb;

pub const LOAD: &str = "in every reply, in range, counting its own call";
pub const CONCURRENCY: &str = "in_flight rises with the calls running";

/// Judges every load report seen, by where it was seen.
pub fn judge_reports(reports: &[(&str, Option<&pb::LoadReport>)]) -> Judged {
    if reports.is_empty() {
        return Judged::warn("not judged: no reply came back");
    }
    if let Some((at, _)) = reports.iter().find(|(_, r)| r.is_none()) {
        let missing = reports.iter().filter(|(_, r)| r.is_none()).count();
        return Judged::fail(format!(
            "no load report on {at} ({missing} of {} replies): the dispatcher only sees its own calls there",
            reports.len()
        ));
    }
    let mut warning = None;
    for (at, r) in reports {
        let r = r.expect("checked above");
        let said = describe(r);
        if r.capacity == 0 {
            return Judged::fail(format!("{at}: {said}: capacity 0"));
        }
        if !(r.utilization.is_finite() && (0.0..=1.0).contains(&r.utilization)) {
            return Judged::fail(format!("{at}: {said}: utilization outside 0..=1"));
        }
        if r.in_flight == 0 && warning.is_none() {
            warning = Some(format!(
                "{at}: {said}: in_flight 0 while answering; the report counts the call it answers (the dispatcher takes that one out)"
            ));
        }
    }
    match warning {
        Some(w) => Judged::warn(w),
        None => Judged::pass(format!(
            "{} reports, e.g. {}",
            reports.len(),
            describe(reports[0].1.expect("checked above"))
        )),
    }
}

pub fn describe(r: &pb::LoadReport) -> String {
    format!(
        "in_flight {}, queued {}, capacity {}, utilization {:.2}",
        r.in_flight, r.queued, r.capacity, r.utilization
    )
}

/// `in_flight` while `running` calls of ours run, against an idle reading.
pub fn judge_rise(idle: Option<u32>, during: Option<u32>, running: u32) -> Judged {
    let (Some(idle), Some(during)) = (idle, during) else {
        return Judged::warn("not judged: no load report to read in_flight from");
    };
    let said = format!("in_flight {idle} idle, {during} with {running} streams running");
    if during >= idle + running {
        Judged::pass(said)
    } else if during > idle {
        Judged::warn(format!("{said}: rose, but by less than the calls running"))
    } else {
        Judged::fail(format!("{said}: the report does not follow the work"))
    }
}

/// A probe's reading of `in_flight`, `at` after the event it watches.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Probe {
    pub at: Duration,
    pub in_flight: Option<u32>,
}

/// Whether work that should have stopped (cancelled, past its deadline)
/// did: some probe read `in_flight` at most `threshold` before the work
/// would have ended by itself (`natural_end`, after the same event). A
/// probe after that proves nothing.
pub fn judge_fall(what: &str, threshold: u32, probes: &[Probe], natural_end: Duration) -> Judged {
    let before: Vec<&Probe> = probes.iter().filter(|p| p.at < natural_end).collect();
    if probes.iter().any(|p| p.in_flight.is_none()) {
        return Judged::warn("not judged: no load report to read in_flight from");
    }
    if let Some(p) = before.iter().find(|p| p.in_flight <= Some(threshold)) {
        return Judged::pass(format!(
            "in_flight back to {}, {} ms after {what}",
            p.in_flight.unwrap_or_default(),
            p.at.as_millis()
        ));
    }
    match before.last() {
        None => Judged::warn(format!(
            "not judged: the work would have ended by itself ({} ms) before a probe could tell; raise --max-tokens",
            natural_end.as_millis()
        )),
        Some(p) => Judged::fail(format!(
            "in_flight still {}, {} ms after {what} (at most {threshold} expected; the work would have run until about {} ms)",
            p.in_flight.unwrap_or_default(),
            p.at.as_millis(),
            natural_end.as_millis()
        )),
    }
}

/// How fast a cluster streams, from one stream it finished: the time to
/// its first chunk (and the tokens in it), then the time per token.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Pace {
    pub first_chunk: Duration,
    pub first_tokens: u64,
    pub per_token: Duration,
}

impl Pace {
    /// From `(time since the call, cumulative completion)` of a stream's
    /// chunks that carried output; `None` without any.
    pub fn of(chunks: &[(Duration, u64)]) -> Option<Pace> {
        let &(first_at, first_tokens) = chunks.first()?;
        let &(last_at, last_tokens) = chunks.last()?;
        let per_token = if last_tokens > first_tokens {
            (last_at - first_at) / (last_tokens - first_tokens) as u32
        } else {
            // One chunk: as fast as the whole of it.
            first_at / first_tokens.max(1) as u32
        };
        Some(Pace {
            first_chunk: first_at,
            first_tokens,
            per_token,
        })
    }

    /// How long a call producing `tokens` runs, from its start.
    pub fn duration(&self, tokens: u64) -> Duration {
        self.first_chunk + self.per_token * tokens.saturating_sub(self.first_tokens) as u32
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::check::report::Verdict;

    fn report(in_flight: u32, capacity: u32, utilization: f64) -> pb::LoadReport {
        pb::LoadReport {
            in_flight,
            queued: 0,
            capacity,
            utilization,
        }
    }

    #[test]
    fn reports_in_range_pass() {
        let r = report(1, 8, 0.125);
        let j = judge_reports(&[("Execute", Some(&r)), ("stream", Some(&r))]);
        assert_eq!(j.verdict, Verdict::Pass, "{}", j.seen);
    }

    #[test]
    fn a_missing_or_out_of_range_report_fails() {
        let r = report(1, 8, 0.125);
        let j = judge_reports(&[("Execute", Some(&r)), ("ExecuteStream", None)]);
        assert_eq!(j.verdict, Verdict::Fail);
        assert!(j.seen.contains("no load report on ExecuteStream"), "{}", j.seen);
        for bad in [
            report(1, 0, 0.0),
            report(1, 8, 1.5),
            report(1, 8, f64::NAN),
            report(1, 8, -0.1),
        ] {
            assert_eq!(
                judge_reports(&[("Execute", Some(&bad))]).verdict,
                Verdict::Fail,
                "{bad:?}"
            );
        }
    }

    #[test]
    fn a_report_not_counting_its_own_call_warns() {
        let j = judge_reports(&[("Execute", Some(&report(0, 8, 0.0)))]);
        assert_eq!(j.verdict, Verdict::Warn);
    }

    #[test]
    fn in_flight_must_rise_with_the_work() {
        assert_eq!(judge_rise(Some(1), Some(3), 2).verdict, Verdict::Pass);
        assert_eq!(judge_rise(Some(1), Some(2), 2).verdict, Verdict::Warn);
        assert_eq!(judge_rise(Some(1), Some(1), 2).verdict, Verdict::Fail);
        assert_eq!(judge_rise(None, Some(3), 2).verdict, Verdict::Warn);
    }

    fn probe(ms: u64, in_flight: u32) -> Probe {
        Probe {
            at: Duration::from_millis(ms),
            in_flight: Some(in_flight),
        }
    }

    #[test]
    fn work_that_stops_passes_and_work_that_runs_on_fails() {
        let end = Duration::from_millis(800);
        let stopped = judge_fall("the cancel", 1, &[probe(60, 3), probe(160, 1)], end);
        assert_eq!(stopped.verdict, Verdict::Pass, "{}", stopped.seen);
        assert!(
            stopped.seen.contains("back to 1, 160 ms after the cancel"),
            "{}",
            stopped.seen
        );
        let ran_on = judge_fall(
            "the cancel",
            1,
            &[probe(60, 3), probe(400, 3), probe(700, 3)],
            end,
        );
        assert_eq!(ran_on.verdict, Verdict::Fail);
        assert!(ran_on.seen.contains("still 3, 700 ms"), "{}", ran_on.seen);
    }

    #[test]
    fn a_fall_after_the_natural_end_proves_nothing() {
        let end = Duration::from_millis(300);
        let j = judge_fall("the cancel", 1, &[probe(200, 3), probe(400, 1)], end);
        assert_eq!(
            j.verdict,
            Verdict::Fail,
            "the only probe in time saw the work running"
        );
        let j = judge_fall("the cancel", 1, &[probe(400, 1)], end);
        assert_eq!(j.verdict, Verdict::Warn, "no probe in time: {}", j.seen);
        let blind = [Probe {
            at: Duration::from_millis(50),
            in_flight: None,
        }];
        assert_eq!(judge_fall("the cancel", 1, &blind, end).verdict, Verdict::Warn);
    }

    #[test]
    fn pace_is_read_from_the_chunks() {
        let ms = Duration::from_millis;
        let p = Pace::of(&[(ms(150), 32), (ms(246), 64), (ms(294), 80)]).unwrap();
        assert_eq!(p.first_chunk, ms(150));
        assert_eq!(p.per_token, ms(3));
        assert_eq!(p.duration(256), ms(150 + 3 * 224));
        let one = Pace::of(&[(ms(100), 10)]).unwrap();
        assert_eq!(one.per_token, ms(10));
        assert!(Pace::of(&[]).is_none());
    }
}
