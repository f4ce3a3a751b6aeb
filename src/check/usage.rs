//! Usage checks: the tokens a cluster reports are what the dispatcher
//! settles the region's quota with, so they must be present, in the right
//! fields and plausible; a stream's usage is cumulative, and its last
//! chunk (`done`) carries the final figure.

use super::report::Judged;
use crate::pb;

pub const USAGE: &str = "present; prompt near the reservation, completion <= max";
pub const STREAM_USAGE: &str = "cumulative; the final usage on the done chunk";

/// What a request reserved: the prompt it declared and its output bound.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Asked {
    pub prompt: u64,
    pub max_output: u64,
}

/// How far a reported prompt may be from the declared one and still look
/// like the same prompt: a provider counts its own way (chat framing, a
/// system prompt the cluster adds), but not by a factor of four.
const PROMPT_FACTOR: u64 = 4;
/// Below this difference a prompt count is near enough whatever the factor.
const PROMPT_SLACK: u64 = 64;

/// One reply's usage against what its request asked for.
pub fn judge_usage(asked: Asked, seen: Option<&pb::Usage>) -> Judged {
    let Some(u) = seen else {
        return Judged::fail(
            "no usage: the dispatcher settles with nothing used (a provider counting at admission is overshot)",
        );
    };
    let (p, c) = (u.prompt_tokens, u.completion_tokens);
    let said = format!(
        "prompt {p} (reserved {}), completion {c} of max {}",
        asked.prompt, asked.max_output
    );
    if p == 0 {
        return Judged::fail(format!(
            "{said}: a prompt was sent, so prompt_tokens cannot be 0 (total_tokens in the completion field?)"
        ));
    }
    if c > asked.max_output {
        return Judged::fail(format!(
            "{said}: more completion tokens than max_output_tokens allows"
        ));
    }
    let far = p.abs_diff(asked.prompt) > PROMPT_SLACK
        && (p > asked.prompt * PROMPT_FACTOR || p * PROMPT_FACTOR < asked.prompt);
    if far {
        return Judged::warn(format!(
            "{said}: far from the reservation; if the cluster adds to every prompt, callers should reserve for it"
        ));
    }
    if c == 0 && asked.max_output > 0 {
        return Judged::warn(format!("{said}: no completion at all"));
    }
    Judged::pass(said)
}

/// What one streamed chunk said about usage.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChunkUsage {
    pub usage: Option<(u64, u64)>,
    pub done: bool,
}

/// A stream's usage across its chunks, in order.
pub fn judge_stream_usage(chunks: &[ChunkUsage]) -> Judged {
    let Some(last) = chunks.iter().rposition(|c| c.done) else {
        return Judged::fail("no done chunk: the dispatcher cannot settle the stream's final usage");
    };
    let Some((_, final_completion)) = chunks[last].usage else {
        return Judged::fail(
            "the done chunk has no usage: the dispatcher settles with what the earlier chunks said",
        );
    };
    // Non-decreasing all the way, so the final figure is the highest. The
    // prompt stays put until the done chunk, which may bring the
    // provider's own count.
    let mut previous: Option<(u64, u64)> = None;
    for (i, chunk) in chunks.iter().enumerate() {
        let Some((p, c)) = chunk.usage else { continue };
        if let Some((pp, pc)) = previous {
            if c < pc {
                return Judged::fail(format!(
                    "completion went from {pc} to {c} at chunk {}: usage per chunk, not cumulative?",
                    i + 1
                ));
            }
            if p != pp && !chunk.done {
                return Judged::fail(format!(
                    "prompt went from {pp} to {p} at chunk {}: the prompt is counted once",
                    i + 1
                ));
            }
        }
        previous = Some((p, c));
    }
    let without = chunks[..last].iter().filter(|c| c.usage.is_none()).count();
    if without > 0 {
        return Judged::warn(format!(
            "{without} of {last} chunks before done carry no usage: a stream cut short is settled with less than it used"
        ));
    }
    Judged::pass(format!(
        "cumulative over {} chunks, final completion {final_completion} on the done chunk",
        chunks.len()
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::check::report::Verdict;

    fn usage(p: u64, c: u64) -> pb::Usage {
        pb::Usage {
            prompt_tokens: p,
            completion_tokens: c,
            cached_prompt_tokens: 0,
        }
    }

    const ASKED: Asked = Asked {
        prompt: 22,
        max_output: 16,
    };

    #[test]
    fn plausible_usage_passes() {
        assert_eq!(judge_usage(ASKED, Some(&usage(22, 16))).verdict, Verdict::Pass);
        // A provider's chat framing adds a few tokens.
        assert_eq!(judge_usage(ASKED, Some(&usage(31, 3))).verdict, Verdict::Pass);
    }

    #[test]
    fn missing_or_misfiled_usage_fails() {
        assert_eq!(judge_usage(ASKED, None).verdict, Verdict::Fail);
        let total_as_completion = judge_usage(ASKED, Some(&usage(0, 38)));
        assert_eq!(total_as_completion.verdict, Verdict::Fail);
        assert!(
            total_as_completion.seen.contains("cannot be 0"),
            "{}",
            total_as_completion.seen
        );
        let over = judge_usage(ASKED, Some(&usage(22, 17)));
        assert_eq!(over.verdict, Verdict::Fail);
        assert!(over.seen.contains("max_output_tokens"), "{}", over.seen);
    }

    #[test]
    fn a_prompt_far_from_the_reservation_or_no_completion_warns() {
        let big = judge_usage(ASKED, Some(&usage(2022, 16)));
        assert_eq!(big.verdict, Verdict::Warn, "{}", big.seen);
        let small = judge_usage(
            Asked {
                prompt: 400,
                max_output: 16,
            },
            Some(&usage(20, 16)),
        );
        assert_eq!(small.verdict, Verdict::Warn);
        assert_eq!(judge_usage(ASKED, Some(&usage(22, 0))).verdict, Verdict::Warn);
        // Within the slack, however many times larger.
        assert_eq!(
            judge_usage(
                Asked {
                    prompt: 2,
                    max_output: 16
                },
                Some(&usage(40, 16))
            )
            .verdict,
            Verdict::Pass
        );
    }

    fn chunk(p: u64, c: u64, done: bool) -> ChunkUsage {
        ChunkUsage {
            usage: Some((p, c)),
            done,
        }
    }

    #[test]
    fn cumulative_usage_with_a_final_done_chunk_passes() {
        let chunks = [chunk(22, 32, false), chunk(22, 48, false), chunk(22, 48, true)];
        let j = judge_stream_usage(&chunks);
        assert_eq!(j.verdict, Verdict::Pass, "{}", j.seen);
        assert!(j.seen.contains("final completion 48"), "{}", j.seen);
    }

    #[test]
    fn deltas_a_moving_prompt_or_a_bare_done_chunk_fail() {
        let deltas = [chunk(22, 32, false), chunk(22, 16, false), chunk(22, 16, true)];
        assert!(judge_stream_usage(&deltas).seen.contains("not cumulative"));
        assert_eq!(judge_stream_usage(&deltas).verdict, Verdict::Fail);
        let prompt = [chunk(22, 32, false), chunk(0, 48, false), chunk(0, 48, true)];
        assert_eq!(judge_stream_usage(&prompt).verdict, Verdict::Fail);
        // The provider's own prompt count comes with the final usage.
        let counted = [chunk(22, 32, false), chunk(29, 48, true)];
        assert_eq!(judge_stream_usage(&counted).verdict, Verdict::Pass);
        let bare = [
            chunk(22, 32, false),
            ChunkUsage {
                usage: None,
                done: true,
            },
        ];
        assert!(judge_stream_usage(&bare).seen.contains("done chunk has no usage"));
        let no_done = [chunk(22, 32, false)];
        assert_eq!(judge_stream_usage(&no_done).verdict, Verdict::Fail);
    }

    #[test]
    fn chunks_without_usage_before_done_warn() {
        let chunks = [
            ChunkUsage {
                usage: None,
                done: false,
            },
            chunk(22, 48, true),
        ];
        assert_eq!(judge_stream_usage(&chunks).verdict, Verdict::Warn);
    }
}
