//! Deadlines: the dispatcher sends each call's remaining time as
//! `grpc-timeout`. A cluster honours it when it answers DEADLINE_EXCEEDED
//! (or CANCELLED, as tonic's server does) at the deadline and stops the
//! work there: a unary call and a stream, each long enough to outlast a
//! deadline set at a quarter of its run. The checker does not cut the
//! calls itself: it waits to see what the cluster does (up to twice the
//! run), then reads `in_flight`.

use std::time::{Duration, Instant};

use tonic::Code;

use super::cancel;
use super::load::{self, Pace};
use super::probe::{Answer, Cluster, Streamed, Unary};
use super::report::{Judged, Verdict};

pub const DEADLINE: &str = "DEADLINE_EXCEEDED at grpc-timeout; the work stops";

/// The deadline for a call that runs `natural`: a quarter of the way
/// through its output, at least 100 ms.
pub fn deadline_for(pace: Pace, natural: Duration) -> Duration {
    (pace.first_chunk + natural.saturating_sub(pace.first_chunk) / 4).max(Duration::from_millis(100))
}

/// How late after its deadline an answer may come and still honour it
/// (timers, a loaded machine; ignoring it shows as seconds, or OK).
pub fn slack(deadline: Duration) -> Duration {
    (deadline / 2).max(Duration::from_millis(500))
}

/// How a call given `deadline` ended: OK (`None`) or a status (and
/// `silent` when the checker's own bound ran out), `took` after it started.
pub fn judge_answer(
    deadline: Duration,
    status: Option<&tonic::Status>,
    silent: bool,
    took: Duration,
) -> Judged {
    let (d, t) = (deadline.as_millis(), took.as_millis());
    if silent {
        return Judged::fail(format!("no answer within {t} ms for a {d} ms deadline"));
    }
    match status.map(|s| s.code()) {
        None if took <= deadline => Judged::warn(format!(
            "finished OK in {t} ms, within its {d} ms deadline: too fast to tell"
        )),
        None => Judged::fail(format!(
            "answered OK {t} ms into a {d} ms deadline: the work ran past it"
        )),
        Some(c @ (Code::DeadlineExceeded | Code::Cancelled)) if took <= deadline + slack(deadline) => {
            Judged::pass(format!("{c:?} at {t} ms ({d} ms deadline)"))
        }
        Some(c @ (Code::DeadlineExceeded | Code::Cancelled)) => {
            Judged::fail(format!("{c:?} only at {t} ms, for a {d} ms deadline"))
        }
        Some(_) => Judged::fail(format!(
            "{} at {t} ms, for a {d} ms deadline",
            super::basics::status(status.expect("a code is a status's"))
        )),
    }
}

fn unary_answer(deadline: Duration, u: &Unary) -> Judged {
    match &u.answer {
        Answer::Ok(_) => judge_answer(deadline, None, false, u.took),
        Answer::Status(s) => judge_answer(deadline, Some(s), false, u.took),
        Answer::Silent(_) => judge_answer(deadline, None, true, u.took),
    }
}

fn stream_answer(deadline: Duration, s: &Streamed) -> Judged {
    match &s.end {
        Answer::Ok(()) => judge_answer(deadline, None, false, s.took),
        Answer::Status(st) => judge_answer(deadline, Some(st), false, s.took),
        Answer::Silent(_) => judge_answer(deadline, None, true, s.took),
    }
}

pub struct Outcome {
    pub deadline: Judged,
    pub replies: Vec<Unary>,
    pub quiet_at: Option<Instant>,
}

/// Runs the phase: a unary call and a stream of `long` tokens at once,
/// both with the same deadline; then, if the unary call was cut at its
/// deadline, whether `in_flight` fell back to `idle`.
pub async fn run(c: &mut Cluster, pace: Pace, long: u64, idle: Option<u32>, probe_took: Duration) -> Outcome {
    let natural = pace.duration(long);
    let deadline = deadline_for(pace, natural);
    let bound = natural * 2 + Duration::from_secs(2);
    let not_run = |why: String| Outcome {
        deadline: Judged::warn(why),
        replies: Vec::new(),
        quiet_at: None,
    };
    let unary = match c.prepare(None, long, deadline, bound) {
        Ok(p) => p,
        Err(why) => return not_run(why),
    };
    let stream = match c.prepare(None, long, deadline, bound) {
        Ok(p) => p,
        Err(why) => return not_run(why),
    };
    let started = crate::clock::now();
    let streamed = tokio::spawn(async move {
        match stream.stream().await {
            Ok(open) => open.finish(Vec::new()).await,
            Err((sent, end)) => {
                let mut s = Streamed::refused(sent, end);
                s.took = started.elapsed();
                s
            }
        }
    });
    let u = unary.execute().await;
    let unary_judged = unary_answer(deadline, &u);
    let mut replies = Vec::new();
    let ends_at = started + natural;
    // The call was cut at its deadline; did the work stop with it?
    let work = if unary_judged.verdict == Verdict::Pass {
        let threshold = idle.unwrap_or(1);
        let at_deadline = started + deadline;
        let probes = cancel::watch_fall(c, at_deadline, threshold, ends_at, probe_took, &mut replies).await;
        Some(load::judge_fall(
            "the deadline",
            threshold,
            &probes,
            ends_at.saturating_duration_since(at_deadline),
        ))
    } else {
        None
    };
    let stream_judged = match streamed.await {
        Ok(s) => stream_answer(deadline, &s),
        Err(e) => Judged::warn(format!("not judged: {e}")),
    };
    let mut parts = vec![("Execute", unary_judged), ("ExecuteStream", stream_judged)];
    if let Some(w) = work {
        parts.push(("work", w));
    }
    let judged = Judged::worst(parts);
    let quiet_at = (judged.verdict != Verdict::Pass).then_some(ends_at);
    // An answer the cluster gave is kept with the others (load, quota).
    if u.reply().is_some() {
        replies.push(u);
    }
    Outcome {
        deadline: judged,
        replies,
        quiet_at,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[test]
    fn the_deadline_falls_a_quarter_of_the_way_through_the_output() {
        let pace = Pace {
            first_chunk: ms(150),
            first_tokens: 32,
            per_token: ms(3),
        };
        let natural = pace.duration(256);
        assert_eq!(natural, ms(822));
        assert_eq!(deadline_for(pace, natural), ms(150 + 168));
        let fast = Pace {
            first_chunk: ms(5),
            first_tokens: 32,
            per_token: Duration::ZERO,
        };
        assert_eq!(deadline_for(fast, fast.duration(256)), ms(100));
    }

    #[test]
    fn answered_at_the_deadline_passes() {
        let d = ms(300);
        assert_eq!(
            judge_answer(
                d,
                Some(&tonic::Status::new(Code::DeadlineExceeded, "")),
                false,
                ms(301)
            )
            .verdict,
            Verdict::Pass
        );
        assert_eq!(
            judge_answer(d, Some(&tonic::Status::new(Code::Cancelled, "")), false, ms(800)).verdict,
            Verdict::Pass
        );
        // Deadline-aware scheduling may refuse at once.
        assert_eq!(
            judge_answer(
                d,
                Some(&tonic::Status::new(Code::DeadlineExceeded, "")),
                false,
                ms(2)
            )
            .verdict,
            Verdict::Pass
        );
    }

    #[test]
    fn answered_late_or_ok_past_the_deadline_fails() {
        let d = ms(300);
        let late = judge_answer(d, None, false, ms(900));
        assert_eq!(late.verdict, Verdict::Fail);
        assert!(
            late.seen.contains("OK 900 ms into a 300 ms deadline"),
            "{}",
            late.seen
        );
        assert_eq!(
            judge_answer(
                d,
                Some(&tonic::Status::new(Code::DeadlineExceeded, "")),
                false,
                ms(801)
            )
            .verdict,
            Verdict::Fail
        );
        assert_eq!(
            judge_answer(d, Some(&tonic::Status::new(Code::Internal, "")), false, ms(300)).verdict,
            Verdict::Fail
        );
        assert_eq!(judge_answer(d, None, true, ms(5000)).verdict, Verdict::Fail);
    }

    #[test]
    fn finishing_before_the_deadline_cannot_be_judged() {
        assert_eq!(judge_answer(ms(300), None, false, ms(200)).verdict, Verdict::Warn);
    }
}
