//! The basic checks: the cluster serves health, answers Execute and
//! ExecuteStream as the contract says, refuses a model it does not serve
//! as a bad request (not as an outage), and receives the request id and
//! labels the dispatcher sends.

use tonic::Code;

use super::report::Judged;

pub const HEALTH: &str = "grpc.health.v1 Check(\"\") SERVING";
pub const EXECUTE: &str = "Execute OK, with output";
pub const STREAM: &str = "chunks, the last one done, then OK";
pub const UNKNOWN_MODEL: &str = "NOT_FOUND or INVALID_ARGUMENT";
pub const REQUEST_ID: &str = "x-request-id, x-labels-received echoed";

/// A health check's answer: a serving status number, or the error.
pub fn judge_health(answer: Result<i32, &tonic::Status>) -> Judged {
    use tonic_health::pb::health_check_response::ServingStatus;
    match answer {
        Ok(s) if s == ServingStatus::Serving as i32 => Judged::pass("SERVING"),
        Ok(s) => Judged::fail(format!(
            "{}: the dispatcher takes the region out of service",
            ServingStatus::try_from(s).map_or("an unknown status", |s| s.as_str_name())
        )),
        Err(e) if e.code() == Code::Unimplemented => {
            Judged::warn("UNIMPLEMENTED: no grpc.health.v1; the dispatcher then only sees whether calls fail")
        }
        Err(e) => Judged::fail(status(e)),
    }
}

/// A status, its message quoted.
pub fn status(s: &tonic::Status) -> String {
    format!("{:?}: {}", s.code(), quote(s.message()))
}

/// Bytes of a cluster's own text (an error message) shown at most.
const QUOTED_BYTES: usize = 160;

/// `s` quoted, escaped to printable ASCII (it goes to a terminal) and cut
/// to about `QUOTED_BYTES`.
pub fn quote(s: &str) -> String {
    let mut shown = String::new();
    for c in s.chars() {
        let escaped: String = c.escape_default().collect();
        if shown.len() + escaped.len() > QUOTED_BYTES {
            return format!("\"{shown}...\" ({} bytes)", s.len());
        }
        shown.push_str(&escaped);
    }
    format!("\"{shown}\"")
}

/// Execute's answer: the output's length, or the error.
pub fn judge_execute(answer: Result<usize, &tonic::Status>) -> Judged {
    match answer {
        Ok(0) => Judged::warn("OK, but no output"),
        Ok(n) => Judged::pass(format!("OK, {n} bytes of output")),
        Err(e) => Judged::fail(status(e)),
    }
}

/// What a stream was: each chunk's output length and `done`, and how it ended.
pub fn judge_stream(chunks: &[(usize, bool)], end: Result<(), &tonic::Status>) -> Judged {
    let output: usize = chunks.iter().map(|(n, _)| n).sum();
    let said = format!("{} chunks, {output} bytes", chunks.len());
    if let Err(e) = end {
        return Judged::fail(format!("{said}, then {}", status(e)));
    }
    match chunks.iter().position(|(_, done)| *done) {
        None => Judged::fail(format!(
            "{said}, none done: the dispatcher reads a stream without its done chunk as cut short (an error to the caller)"
        )),
        Some(i) if i + 1 < chunks.len() => Judged::fail(format!(
            "{said}: {} after the done chunk (ignored by the dispatcher)",
            chunks.len() - i - 1
        )),
        Some(_) if output == 0 => Judged::warn(format!("{said}: no output")),
        Some(_) => Judged::pass(format!("{said}, the last done")),
    }
}

/// A call for a model the cluster does not serve.
pub fn judge_unknown_model(answer: Result<(), &tonic::Status>) -> Judged {
    let e = match answer {
        Ok(()) => {
            return Judged::fail(
                "OK: the work ran on some model; the dispatcher's quota for the model asked for is then wrong",
            );
        }
        Err(e) => e,
    };
    match e.code() {
        Code::NotFound | Code::InvalidArgument => Judged::pass(status(e)),
        Code::FailedPrecondition | Code::Unimplemented | Code::OutOfRange | Code::PermissionDenied => {
            Judged::warn(format!("{}: refused, but not as a bad request", status(e)))
        }
        _ => Judged::fail(format!(
            "{}: the dispatcher reads this as {}",
            status(e),
            match e.code() {
                Code::ResourceExhausted => "the region's quota running out",
                Code::Unavailable => "the region failing, and tries the next",
                _ => "a failure of the region",
            }
        )),
    }
}

/// What a reply's metadata echoed against what was sent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Echoed<'a> {
    pub sent_id: &'a str,
    pub sent_labels: usize,
    pub request_id: Option<&'a str>,
    pub labels: Option<&'a str>,
}

pub fn judge_echo(echoes: &[(&str, Echoed<'_>)]) -> Judged {
    if echoes.is_empty() {
        return Judged::warn("not judged: no reply came back");
    }
    let parts = echoes
        .iter()
        .map(|(at, e)| {
            let j = match (e.request_id, e.labels) {
                (None, None) => {
                    Judged::warn("not echoed (optional): whether the id and labels arrive cannot be seen")
                }
                (Some(id), _) if id != e.sent_id => Judged::fail(format!(
                    "x-request-id {} for {}: not the request's id",
                    quote(id),
                    e.sent_id
                )),
                (_, Some(n)) if n.parse() != Ok(e.sent_labels) => Judged::fail(format!(
                    "x-labels-received {} for {} labels sent",
                    quote(n),
                    e.sent_labels
                )),
                (None, Some(_)) | (Some(_), None) => Judged::warn("only one of the two echoed"),
                (Some(_), Some(_)) => Judged::pass(format!("id and {} labels", e.sent_labels)),
            };
            (*at, j)
        })
        .collect();
    Judged::worst(parts)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::check::report::Verdict;

    #[test]
    fn health_serving_passes_not_serving_fails_none_warns() {
        assert_eq!(judge_health(Ok(1)).verdict, Verdict::Pass);
        assert_eq!(judge_health(Ok(2)).verdict, Verdict::Fail);
        let none = tonic::Status::unimplemented("no");
        assert_eq!(judge_health(Err(&none)).verdict, Verdict::Warn);
        let down = tonic::Status::unavailable("refused");
        assert_eq!(judge_health(Err(&down)).verdict, Verdict::Fail);
    }

    #[test]
    fn a_stream_must_end_with_one_done_chunk() {
        let ok = [(10, false), (5, false), (0, true)];
        assert_eq!(judge_stream(&ok, Ok(())).verdict, Verdict::Pass);
        assert_eq!(judge_stream(&[(10, false)], Ok(())).verdict, Verdict::Fail);
        let after = [(10, true), (5, false)];
        assert_eq!(judge_stream(&after, Ok(())).verdict, Verdict::Fail);
        let cut = tonic::Status::internal("boom");
        assert_eq!(judge_stream(&ok, Err(&cut)).verdict, Verdict::Fail);
        assert_eq!(judge_stream(&[(0, true)], Ok(())).verdict, Verdict::Warn);
    }

    #[test]
    fn an_unknown_model_is_a_bad_request_not_an_outage() {
        for code in [Code::NotFound, Code::InvalidArgument] {
            let s = tonic::Status::new(code, "no such model");
            assert_eq!(judge_unknown_model(Err(&s)).verdict, Verdict::Pass);
        }
        let s = tonic::Status::failed_precondition("no");
        assert_eq!(judge_unknown_model(Err(&s)).verdict, Verdict::Warn);
        for code in [Code::Unavailable, Code::ResourceExhausted, Code::Internal] {
            let s = tonic::Status::new(code, "no such model");
            assert_eq!(judge_unknown_model(Err(&s)).verdict, Verdict::Fail, "{code:?}");
        }
        assert_eq!(judge_unknown_model(Ok(())).verdict, Verdict::Fail);
    }

    #[test]
    fn the_echo_must_be_what_was_sent() {
        let e = |id, labels| Echoed {
            sent_id: "check-1",
            sent_labels: 2,
            request_id: id,
            labels,
        };
        let j = judge_echo(&[("Execute", e(Some("check-1"), Some("2")))]);
        assert_eq!(j.verdict, Verdict::Pass, "{}", j.seen);
        assert_eq!(judge_echo(&[("Execute", e(None, None))]).verdict, Verdict::Warn);
        assert_eq!(
            judge_echo(&[("Execute", e(Some("other"), Some("2")))]).verdict,
            Verdict::Fail
        );
        assert_eq!(
            judge_echo(&[("Execute", e(Some("check-1"), Some("0")))]).verdict,
            Verdict::Fail
        );
        let mixed = judge_echo(&[
            ("Execute", e(Some("check-1"), Some("2"))),
            ("ExecuteStream", e(Some("check-1"), Some("x"))),
        ]);
        assert_eq!(mixed.verdict, Verdict::Fail);
        assert!(
            mixed
                .seen
                .starts_with("Execute: id and 2 labels; ExecuteStream: "),
            "{}",
            mixed.seen
        );
    }
}
