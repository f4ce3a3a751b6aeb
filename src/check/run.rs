//! The order the checks run in: health; one Execute and one ExecuteStream
//! (the usage, load, echo and pace they show); a model nobody serves; then
//! the long calls (concurrency and cancel, deadlines), whose length the
//! budget decides; last a refusal, with what the budget has left. Every
//! reply's load report and quota hint is judged with the others'.

use std::time::{Duration, Instant};

use super::basics::{self, Echoed};
use super::load::{self, Pace};
use super::probe::{self, Answer, Chunk, Cluster, Streamed, Unary};
use super::report::{Judged, Report, Row};
use super::usage::{self, ChunkUsage};
use super::{CheckArgs, cancel, deadline, quota};
use crate::pb;

/// The output bounds of the first Execute and ExecuteStream.
pub const EXECUTE_OUTPUT: u64 = 16;
pub const STREAM_OUTPUT: u64 = 48;
/// The long calls' output bound: at most, and at least for them to run.
pub const MAX_LONG: u64 = 256;
pub const MIN_LONG: u64 = 32;
/// Calls of the long length: the cancelled streams and the two deadline calls.
const LONG_CALLS: u64 = cancel::STREAMS as u64 + 2;
/// Longest wait for work that did not stop to end by itself.
const MAX_QUIET_WAIT: Duration = Duration::from_secs(60);

/// The long calls' output bound within `budget`: what is left after the
/// short calls and the probes, three fifths of it (the rest for the
/// refusal), shared by the long calls; `None` when that is too short.
pub fn long_output(budget: u64, prompt: u64) -> Option<u64> {
    let probes = 1 + 2 * cancel::PROBES as u64;
    let fixed = (prompt + 1) + (prompt + EXECUTE_OUTPUT) + (prompt + STREAM_OUTPUT) + probes * (prompt + 1);
    let per_call = budget.checked_sub(fixed)? * 3 / 5 / LONG_CALLS;
    let long = per_call.checked_sub(prompt)?.min(MAX_LONG);
    (long >= MIN_LONG).then_some(long)
}

/// Every successful reply's load report and quota hint, in order.
#[derive(Default)]
struct Seen {
    load: Vec<(&'static str, Option<pb::LoadReport>)>,
    quota: Vec<Option<pb::ProviderQuota>>,
}

impl Seen {
    fn reply(&mut self, at: &'static str, r: &pb::ExecuteReply) {
        self.load.push((at, r.load));
        self.quota.push(r.provider_quota);
    }

    fn replies(&mut self, at: &'static str, replies: &[Unary]) {
        for r in replies.iter().filter_map(Unary::reply) {
            self.reply(at, r);
        }
    }

    fn done_chunk(&mut self, c: &Chunk) {
        self.load.push(("the done chunk", c.load));
        self.quota.push(c.provider_quota);
    }
}

/// Runs every check against the cluster `args` names.
pub async fn run(args: &CheckArgs) -> Result<Report, String> {
    let mut c = Cluster::connect(args)?;
    let prompt = probe::prompt_tokens();
    let mut seen = Seen::default();
    let mut usages = Vec::new();
    let mut echoes = Vec::new();

    let health = match c.health().await {
        Ok(s) => basics::judge_health(Ok(s)),
        Err(e) => basics::judge_health(Err(&e)),
    };

    let (execute, idle, probe_took) = match c.execute(None, EXECUTE_OUTPUT).await {
        Err(why) => (Judged::warn(why), None, Duration::from_secs(1)),
        Ok(u) => {
            let judged = match u.answer.result() {
                Ok((r, _)) => basics::judge_execute(Ok(r.output.len())),
                Err(s) => basics::judge_execute(Err(&s)),
            };
            let mut idle = None;
            if let Answer::Ok((r, echo)) = &u.answer {
                usages.push(("Execute", usage::judge_usage(u.sent.asked, r.usage.as_ref())));
                echoes.push(("Execute", u.sent.id.clone(), echo.clone()));
                seen.reply("Execute", r);
                idle = r.load.map(|l| l.in_flight);
            }
            (judged, idle, u.took)
        }
    };

    let streamed = match c.prepare(
        None,
        STREAM_OUTPUT,
        Duration::from_secs(30),
        Duration::from_secs(35),
    ) {
        Err(why) => Err(why),
        Ok(p) => Ok(match p.stream().await {
            Ok(open) => open.finish(Vec::new()).await,
            Err((sent, end)) => Streamed::refused(sent, end),
        }),
    };
    let (stream, stream_usage, pace) = match &streamed {
        Err(why) => (Judged::warn(why.clone()), Judged::warn(why.clone()), None),
        Ok(s) => judge_streamed(s, &mut seen, &mut usages, &mut echoes),
    };

    let unknown_model = match c.execute(Some(probe::NO_SUCH_MODEL), 1).await {
        Err(why) => Judged::warn(why),
        Ok(u) => match u.answer.result() {
            Ok(_) => basics::judge_unknown_model(Ok(())),
            Err(s) => basics::judge_unknown_model(Err(&s)),
        },
    };

    let long = long_output(args.max_tokens, prompt);
    let (concurrency, cancelled, deadlined) = match (pace, long) {
        (None, _) => {
            let why = Judged::warn(
                "not judged: ExecuteStream did not stream, so there is no pace to size the calls by",
            );
            (why.clone(), why.clone(), why)
        }
        (_, None) => {
            let why = Judged::warn(format!(
                "not run: --max-tokens {} leaves less than {MIN_LONG} output tokens for the long calls",
                args.max_tokens
            ));
            (why.clone(), why.clone(), why)
        }
        (Some(pace), Some(long)) => {
            let phase = cancel::run(&mut c, pace, long, idle, probe_took).await;
            seen.replies("a probe", &phase.replies);
            quiet(phase.quiet_at).await;
            let d = deadline::run(&mut c, pace, long, idle, probe_took).await;
            seen.replies("a probe", &d.replies);
            quiet(d.quiet_at).await;
            (phase.concurrency, phase.cancel, d.deadline)
        }
    };

    let last_hint = seen.quota.iter().rev().flatten().next().copied();
    let refusal = match quota::refusal_size(last_hint.as_ref(), prompt, c.budget.left()) {
        Err(why) => Judged::warn(why),
        Ok(max_output) => match c.execute(None, max_output).await {
            Err(why) => Judged::warn(why),
            Ok(u) => {
                let remaining = last_hint.map_or(0, |q| q.remaining_tokens);
                let asked = prompt + max_output;
                if let Some(r) = u.reply() {
                    seen.reply("the refusal probe", r);
                }
                match u.answer.result() {
                    Ok(_) => quota::judge_refusal(Ok(()), asked, remaining),
                    Err(s) => quota::judge_refusal(Err(&s), asked, remaining),
                }
            }
        },
    };

    let loads: Vec<(&str, Option<&pb::LoadReport>)> =
        seen.load.iter().map(|(at, l)| (*at, l.as_ref())).collect();
    let hints: Vec<Option<&pb::ProviderQuota>> = seen.quota.iter().map(Option::as_ref).collect();
    let echoed: Vec<(&str, Echoed)> = echoes
        .iter()
        .map(|(at, id, e)| {
            (
                *at,
                Echoed {
                    sent_id: id,
                    sent_labels: probe::LABELS,
                    request_id: e.request_id.as_deref(),
                    labels: e.labels.as_deref(),
                },
            )
        })
        .collect();
    let usage = match usages.is_empty() {
        true => Judged::warn("not judged: no reply came back"),
        false => Judged::worst(usages),
    };
    let rows = vec![
        row("health", basics::HEALTH, health),
        row("execute", basics::EXECUTE, execute),
        row("stream", basics::STREAM, stream),
        row("usage", usage::USAGE, usage),
        row("stream.usage", usage::STREAM_USAGE, stream_usage),
        row("load", load::LOAD, load::judge_reports(&loads)),
        row("load.concurrency", load::CONCURRENCY, concurrency),
        row(
            "provider_quota",
            quota::PROVIDER_QUOTA,
            quota::judge_quota(&hints),
        ),
        row("cancel", cancel::CANCEL, cancelled),
        row("deadline", deadline::DEADLINE, deadlined),
        row("refusal", quota::REFUSAL, refusal),
        row("unknown_model", basics::UNKNOWN_MODEL, unknown_model),
        row("request_id", basics::REQUEST_ID, basics::judge_echo(&echoed)),
    ];
    Ok(Report {
        rows,
        requests: c.budget.requests,
        tokens: c.budget.reserved,
        max_tokens: c.budget.limit,
    })
}

fn row(check: &'static str, expected: &'static str, judged: Judged) -> Row {
    Row {
        check,
        expected,
        judged,
    }
}

/// Waits for work that did not stop to end by itself, so it does not
/// count against the next check.
async fn quiet(at: Option<Instant>) {
    if let Some(at) = at {
        let until = at.min(crate::clock::now() + MAX_QUIET_WAIT) + Duration::from_millis(100);
        tokio::time::sleep_until(until.into()).await;
    }
}

/// The stream check, its usage, and the pace it showed; its final usage,
/// load, hint and echo go with the others'.
fn judge_streamed(
    s: &Streamed,
    seen: &mut Seen,
    usages: &mut Vec<(&'static str, Judged)>,
    echoes: &mut Vec<(&'static str, String, probe::Echo)>,
) -> (Judged, Judged, Option<Pace>) {
    let shape: Vec<(usize, bool)> = s.chunks.iter().map(|c| (c.output, c.done)).collect();
    let stream = match s.end.result() {
        Ok(_) => basics::judge_stream(&shape, Ok(())),
        Err(e) => basics::judge_stream(&shape, Err(&e)),
    };
    if s.chunks.is_empty() {
        return (stream, Judged::warn("not judged: no chunks"), None);
    }
    let chunks: Vec<ChunkUsage> = s
        .chunks
        .iter()
        .map(|c| ChunkUsage {
            usage: c.usage.map(|u| (u.prompt_tokens, u.completion_tokens)),
            done: c.done,
        })
        .collect();
    let stream_usage = usage::judge_stream_usage(&chunks);
    if let Some(echo) = &s.echo {
        echoes.push(("ExecuteStream", s.sent.id.clone(), echo.clone()));
    }
    if let Some(done) = s.done() {
        usages.push((
            "ExecuteStream",
            usage::judge_usage(s.sent.asked, done.usage.as_ref()),
        ));
        seen.done_chunk(done);
    }
    (stream, stream_usage, pace_of(&s.chunks))
}

/// The pace from the chunks that say how far the output got (the done
/// chunk too when fewer than two others do).
fn pace_of(chunks: &[Chunk]) -> Option<Pace> {
    let point = |c: &Chunk| {
        c.usage
            .map(|u| (c.at, u.completion_tokens))
            .filter(|(_, n)| *n > 0)
    };
    let mut points: Vec<(Duration, u64)> = chunks.iter().filter(|c| !c.done).filter_map(point).collect();
    if points.len() < 2
        && let Some(done) = chunks.iter().find(|c| c.done).and_then(point)
        && points.last().is_none_or(|(_, n)| *n < done.1)
    {
        points.push(done);
    }
    Pace::of(&points)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_long_calls_get_three_fifths_of_what_the_short_ones_leave() {
        // 21-token prompt: the short calls and probes take 325.
        assert_eq!(long_output(2000, 21), Some(230));
        assert_eq!(long_output(100_000, 21), Some(MAX_LONG));
        assert_eq!(long_output(400, 21), None, "32 tokens would not fit");
        assert_eq!(long_output(100, 21), None);
    }

    fn chunk(ms: u64, completion: Option<u64>, done: bool) -> Chunk {
        Chunk {
            at: Duration::from_millis(ms),
            output: 1,
            usage: completion.map(|c| pb::Usage {
                prompt_tokens: 21,
                completion_tokens: c,
                cached_prompt_tokens: 0,
            }),
            done,
            provider_quota: None,
            load: None,
        }
    }

    #[test]
    fn the_pace_comes_from_cumulative_usage_or_the_done_chunk() {
        let p = pace_of(&[
            chunk(150, Some(32), false),
            chunk(246, Some(48), false),
            chunk(247, Some(48), true),
        ])
        .unwrap();
        assert_eq!(p.per_token, Duration::from_millis(6));
        // Intermediate chunks without usage: from the first to the done chunk.
        let p = pace_of(&[
            chunk(100, Some(1), false),
            chunk(150, None, false),
            chunk(300, Some(41), true),
        ])
        .unwrap();
        assert_eq!(p.per_token, Duration::from_millis(5));
        assert!(pace_of(&[chunk(100, None, true)]).is_none());
    }
}
