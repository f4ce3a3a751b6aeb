//! Concurrency and cancellation, on long streams: with a few running at
//! once, `in_flight` must count them; once the caller cancels them (the
//! dispatcher does when its caller goes away or a deadline passes),
//! `in_flight` must fall before they would have ended by themselves: a
//! cluster that lets cancelled work run spends quota nobody gets and looks
//! busier than it is.

use std::time::{Duration, Instant};

use super::load::{self, Pace, Probe};
use super::probe::{Answer, Cluster, Open, Unary};
use super::report::Judged;

pub const CANCEL: &str = "in_flight falls before the work would have ended";

/// Streams run at once.
pub const STREAMS: u32 = 2;
/// Probes after an event, at most.
pub const PROBES: usize = 4;

/// What the phase found, and the replies its probes got (their load
/// reports and quota hints are checked with the others').
pub struct Outcome {
    pub concurrency: Judged,
    pub cancel: Judged,
    pub replies: Vec<Unary>,
    /// When work that did not stop will have ended by itself.
    pub quiet_at: Option<Instant>,
}

impl Outcome {
    fn not_run(why: String) -> Self {
        Self {
            concurrency: Judged::warn(why.clone()),
            cancel: Judged::warn(why),
            replies: Vec::new(),
            quiet_at: None,
        }
    }
}

/// The time between probes: a tenth of the work's run, within bounds.
pub fn probe_gap(natural: Duration) -> Duration {
    (natural / 10).clamp(Duration::from_millis(50), Duration::from_millis(500))
}

/// The `in_flight` at or below which work that should have stopped did:
/// back to the idle reading, or down by the calls stopped.
pub fn fall_threshold(idle: Option<u32>, during: Option<u32>, stopped: u32) -> u32 {
    let idle = idle.unwrap_or(1);
    match during {
        Some(d) => idle.max(d.saturating_sub(stopped)),
        None => idle,
    }
}

/// Probes `in_flight` after `event` until it is at most `threshold`, at
/// most `PROBES` times, none that would answer after `ends_at` (when the
/// work ends anyway). `probe_took`: how long a probe takes.
pub async fn watch_fall(
    c: &mut Cluster,
    event: Instant,
    threshold: u32,
    ends_at: Instant,
    probe_took: Duration,
    replies: &mut Vec<Unary>,
) -> Vec<Probe> {
    let gap = probe_gap(ends_at.saturating_duration_since(event));
    let mut probes = Vec::new();
    tokio::time::sleep(Duration::from_millis(50)).await;
    for _ in 0..PROBES {
        if crate::clock::now() + probe_took >= ends_at {
            break;
        }
        let Ok((probe, reply)) = c.probe(event).await else {
            break;
        };
        replies.push(reply);
        probes.push(probe);
        if probe.in_flight.is_none_or(|n| n <= threshold) {
            break;
        }
        tokio::time::sleep(gap).await;
    }
    probes
}

/// Runs the phase: `long` tokens per stream, `idle` the in_flight an idle
/// call reported.
pub async fn run(c: &mut Cluster, pace: Pace, long: u64, idle: Option<u32>, probe_took: Duration) -> Outcome {
    let bound = pace.duration(long) * 2 + Duration::from_secs(2);
    let mut prepared = Vec::new();
    for _ in 0..STREAMS {
        match c.prepare(None, long, bound, bound) {
            Ok(p) => prepared.push(p),
            Err(why) => return Outcome::not_run(why),
        }
    }
    // Open them at once; each has its first chunk before the probe.
    let tasks: Vec<_> = prepared
        .into_iter()
        .map(|p| {
            tokio::spawn(async move {
                let mut open: Open = p.stream().await.map_err(|(_, a)| describe(&a))?;
                match open.next().await {
                    Answer::Ok(Some(c)) if !c.done => Ok(open),
                    Answer::Ok(_) => Err("it ended at its first chunk".to_string()),
                    other => Err(describe(&other)),
                }
            })
        })
        .collect();
    let mut streams = Vec::new();
    for t in tasks {
        match t.await {
            Ok(Ok(open)) => streams.push(open),
            Ok(Err(why)) => return Outcome::not_run(format!("not judged: a long stream failed: {why}")),
            Err(e) => return Outcome::not_run(format!("not judged: {e}")),
        }
    }
    let ends_at = streams
        .iter()
        .map(|s| s.started + pace.duration(long))
        .max()
        .expect("STREAMS > 0");
    let mut replies = Vec::new();
    let during = match c.probe(crate::clock::now()).await {
        Ok((probe, reply)) => {
            replies.push(reply);
            probe.in_flight
        }
        Err(why) => return Outcome::not_run(why),
    };
    let mut ended = 0;
    for s in &mut streams {
        ended += s.ended().await as u32;
    }
    if ended > 0 {
        let mut o = Outcome::not_run(format!(
            "not judged: {ended} of {STREAMS} streams of {long} tokens ended by themselves before the cancel (the model stopped early?)"
        ));
        o.replies = replies;
        return o;
    }
    let concurrency = load::judge_rise(idle, during, STREAMS);
    let threshold = fall_threshold(idle, during, STREAMS);
    drop(streams);
    let cancelled_at = crate::clock::now();
    let probes = watch_fall(c, cancelled_at, threshold, ends_at, probe_took, &mut replies).await;
    let natural_end = ends_at.saturating_duration_since(cancelled_at);
    let cancel = load::judge_fall("the cancel", threshold, &probes, natural_end);
    let quiet_at = (cancel.verdict != super::Verdict::Pass).then_some(ends_at);
    Outcome {
        concurrency,
        cancel,
        replies,
        quiet_at,
    }
}

pub fn describe<T>(a: &Answer<T>) -> String {
    match a.result() {
        Ok(_) => "OK".into(),
        Err(s) => super::basics::status(&s),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_threshold_is_the_idle_reading_or_the_drop_by_the_calls_stopped() {
        assert_eq!(fall_threshold(Some(1), Some(3), 2), 1);
        // Others' work raised in_flight meanwhile: down by ours is enough.
        assert_eq!(fall_threshold(Some(1), Some(7), 2), 5);
        assert_eq!(fall_threshold(None, None, 2), 1);
        assert_eq!(fall_threshold(Some(2), None, 2), 2);
    }

    #[test]
    fn probes_are_spaced_by_the_work_within_bounds() {
        assert_eq!(probe_gap(Duration::from_millis(100)), Duration::from_millis(50));
        assert_eq!(probe_gap(Duration::from_secs(2)), Duration::from_millis(200));
        assert_eq!(probe_gap(Duration::from_secs(60)), Duration::from_millis(500));
    }
}
