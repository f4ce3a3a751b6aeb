//! Provider quota checks. `provider_quota` (the provider's rate-limit
//! headers, relayed) can lower the dispatcher's idea of a region's quota,
//! so a made-up one (zeros for headers the provider did not send, a cached
//! copy) starves the region; and a provider refusal must come back as
//! RESOURCE_EXHAUSTED with RetryInfo, which the dispatcher reads as "this
//! region's quota is out until then; try another" (anything else reads as
//! an outage or a failure of the work).

use std::time::Duration;

use tonic::Code;

use super::report::Judged;
use crate::pb;

pub const PROVIDER_QUOTA: &str = "if present: sane, moving with the calls";
pub const REFUSAL: &str = "RESOURCE_EXHAUSTED with RetryInfo";

/// The longest reset a hint may plausibly name.
const MAX_RESET: Duration = Duration::from_secs(24 * 3600);

fn reset(d: Option<&prost_types::Duration>) -> Result<Option<Duration>, String> {
    match d {
        None => Ok(None),
        Some(d) => Duration::try_from(*d)
            .map(Some)
            .map_err(|_| format!("negative reset {}s", d.seconds)),
    }
}

/// Every `provider_quota` the successful replies carried, in order.
pub fn judge_quota(samples: &[Option<&pb::ProviderQuota>]) -> Judged {
    let seen: Vec<&pb::ProviderQuota> = samples.iter().flatten().copied().collect();
    if seen.is_empty() {
        return Judged::warn(format!(
            "absent from all {} replies (optional): the dispatcher counts on its own; relay the provider's x-ratelimit-* headers if it sends them",
            samples.len()
        ));
    }
    for q in &seen {
        let said = describe(q);
        if q.remaining_tokens < 0 || q.remaining_requests < 0 {
            return Judged::fail(format!("{said}: negative (the dispatcher ignores it)"));
        }
        for d in [q.reset_tokens.as_ref(), q.reset_requests.as_ref()] {
            match reset(d) {
                Err(why) => return Judged::fail(format!("{said}: {why}")),
                Ok(Some(d)) if d > MAX_RESET => {
                    return Judged::fail(format!("{said}: a reset of more than a day"));
                }
                Ok(_) => {}
            }
        }
        if q.remaining_tokens == 0 && q.remaining_requests == 0 {
            return Judged::fail(format!(
                "{said} on a call that succeeded: an unset hint? (omit provider_quota when the provider sent no headers; zeros empty the region's quota)"
            ));
        }
    }
    let moved = seen.windows(2).any(|w| {
        w[1].remaining_tokens != w[0].remaining_tokens || w[1].remaining_requests != w[0].remaining_requests
    });
    let first = describe(seen[0]);
    let last = describe(seen[seen.len() - 1]);
    if seen.len() > 1 && !moved {
        return Judged::warn(format!(
            "{last} on all {} replies: never moved with the calls (a cached copy? or a limit too large to notice)",
            seen.len()
        ));
    }
    Judged::pass(format!(
        "{} of {} replies; first {first}, last {last}",
        seen.len(),
        samples.len()
    ))
}

pub fn describe(q: &pb::ProviderQuota) -> String {
    let d = |d: Option<&prost_types::Duration>| match reset(d) {
        Ok(Some(d)) => format!("{:.1}s", d.as_secs_f64()),
        Ok(None) => "unset".to_string(),
        Err(_) => "negative".to_string(),
    };
    format!(
        "remaining {} tokens / {} requests, reset {} / {}",
        q.remaining_tokens,
        q.remaining_requests,
        d(q.reset_tokens.as_ref()),
        d(q.reset_requests.as_ref())
    )
}

/// The output bound of a request the provider should refuse: more than
/// the tokens its last hint said were left (with room for its refill
/// meanwhile), if that fits in what is left of the budget.
pub fn refusal_size(last: Option<&pb::ProviderQuota>, prompt: u64, budget_left: u64) -> Result<u64, String> {
    let Some(q) = last else {
        return Err(
            "not provoked: no provider_quota to size a request over the limit (docs/CLUSTERS.md: how to check refusals)"
                .into(),
        );
    };
    let remaining = q.remaining_tokens.max(0) as u64;
    let max_output = remaining + remaining / 4 + 16;
    if prompt + max_output > budget_left {
        return Err(format!(
            "not provoked: a request past the {remaining} tokens the provider has left takes {}, more than the {budget_left} \
             left of --max-tokens; raise --max-tokens or check on a smaller limit",
            prompt + max_output
        ));
    }
    Ok(max_output)
}

/// How the cluster answered a request over the provider's remaining quota.
pub fn judge_refusal(answer: Result<(), &tonic::Status>, asked: u64, remaining: i64) -> Judged {
    let status = match answer {
        Ok(()) => {
            return Judged::warn(format!(
                "not provoked: a request for {asked} tokens with {remaining} left was served (usage accounting or a burst allowance?)"
            ));
        }
        Err(s) => s,
    };
    let message = super::basics::quote(status.message());
    match status.code() {
        Code::ResourceExhausted => match crate::grpc::retry_after(status) {
            Some(d) => Judged::pass(format!(
                "RESOURCE_EXHAUSTED, RetryInfo {:.1}s: {message}",
                d.as_secs_f64()
            )),
            None => Judged::warn(format!(
                "RESOURCE_EXHAUSTED without RetryInfo (the dispatcher assumes {}s): {message}",
                crate::forward::DEFAULT_PROVIDER_RESET.as_secs()
            )),
        },
        code => Judged::fail(format!(
            "{code:?}: {message}; the dispatcher reads this as {}",
            match crate::forward::classify(status) {
                crate::forward::FailureKind::NotRun => "the region failing (its breaker counts it)",
                crate::forward::FailureKind::MayHaveRun => "work that may have run (its tokens stay charged)",
                _ => "a refused request, not a quota",
            }
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::check::report::Verdict;
    use tonic_types::{ErrorDetails, StatusExt};

    fn q(tokens: i64, requests: i64, reset_s: i64) -> pb::ProviderQuota {
        pb::ProviderQuota {
            remaining_tokens: tokens,
            remaining_requests: requests,
            reset_tokens: Some(prost_types::Duration {
                seconds: reset_s,
                nanos: 0,
            }),
            reset_requests: None,
        }
    }

    #[test]
    fn absent_hints_warn_and_moving_sane_ones_pass() {
        assert_eq!(judge_quota(&[None, None]).verdict, Verdict::Warn);
        let (a, b) = (q(2900, 99, 2), q(2800, 98, 4));
        let j = judge_quota(&[Some(&a), None, Some(&b)]);
        assert_eq!(j.verdict, Verdict::Pass, "{}", j.seen);
    }

    #[test]
    fn insane_hints_fail() {
        for bad in [
            q(-1, 10, 1),
            q(10, -5, 1),
            q(10, 10, -3),
            q(10, 10, 90_000),
            q(0, 0, 0),
        ] {
            let j = judge_quota(&[Some(&bad)]);
            assert_eq!(j.verdict, Verdict::Fail, "{bad:?}: {}", j.seen);
        }
    }

    #[test]
    fn a_hint_that_never_moves_warns() {
        let a = q(5000, 100, 0);
        assert_eq!(
            judge_quota(&[Some(&a), Some(&a), Some(&a)]).verdict,
            Verdict::Warn
        );
        assert_eq!(
            judge_quota(&[Some(&a)]).verdict,
            Verdict::Pass,
            "one sample cannot move"
        );
    }

    #[test]
    fn a_refusal_is_sized_past_the_hint_within_the_budget() {
        let hint = q(1000, 50, 20);
        assert_eq!(refusal_size(Some(&hint), 22, 2000), Ok(1266));
        let e = refusal_size(Some(&hint), 22, 1000).unwrap_err();
        assert!(e.contains("takes 1288, more than the 1000 left"), "{e}");
        assert!(refusal_size(None, 22, 1_000_000).is_err());
    }

    #[test]
    fn only_resource_exhausted_with_retry_info_passes() {
        let good = tonic::Status::with_error_details(
            Code::ResourceExhausted,
            "429",
            ErrorDetails::with_retry_info(Some(Duration::from_secs(3))),
        );
        assert_eq!(judge_refusal(Err(&good), 1266, 1000).verdict, Verdict::Pass);
        let bare = tonic::Status::resource_exhausted("429");
        assert_eq!(judge_refusal(Err(&bare), 1266, 1000).verdict, Verdict::Warn);
        let unavailable = tonic::Status::unavailable("429 from the provider");
        let j = judge_refusal(Err(&unavailable), 1266, 1000);
        assert_eq!(j.verdict, Verdict::Fail);
        assert!(j.seen.contains("the region failing"), "{}", j.seen);
        assert_eq!(judge_refusal(Ok(()), 1266, 1000).verdict, Verdict::Warn);
    }
}
