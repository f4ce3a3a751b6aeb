//! Deliberate breaches of the AgentCluster contract, for `region-sim
//! --faulty MODE`: each is a mistake real clusters make, so the tests can
//! show that `dispatcher check-cluster` fails on exactly the check meant to
//! catch it (tests/check_cluster.rs). None is on unless asked for.

use std::time::Duration;

use tonic::{Code, Status};
use tonic_types::{ErrorDetails, StatusExt};

use crate::pb;

/// One contract breach.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Fault {
    /// Replies and final chunks carry no `load` report.
    NoLoadReport,
    /// Usage in the wrong fields: prompt 0, and prompt + completion (the
    /// provider's `total_tokens`) reported as the completion.
    WrongUsage,
    /// A stream's work goes on to its end after the caller cancelled it.
    IgnoreCancel,
    /// A provider refusal answered UNAVAILABLE, without RetryInfo.
    RefusalUnavailable,
    /// `grpc-timeout` not honoured: the work goes on past the deadline
    /// (and a stream answers after it).
    IgnoreDeadline,
}

/// The breaches a simulated cluster commits (none by default).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Faults(Vec<Fault>);

impl Faults {
    pub fn new(faults: &[Fault]) -> Self {
        Self(faults.to_vec())
    }

    pub fn has(&self, fault: Fault) -> bool {
        self.0.contains(&fault)
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// The usage the reply states for what was really used.
    pub fn usage(&self, prompt: u64, completion: u64) -> pb::Usage {
        if self.has(Fault::WrongUsage) {
            pb::Usage {
                prompt_tokens: 0,
                completion_tokens: prompt + completion,
                cached_prompt_tokens: 0,
            }
        } else {
            pb::Usage {
                prompt_tokens: prompt,
                completion_tokens: completion,
                cached_prompt_tokens: 0,
            }
        }
    }

    /// The load report a reply carries.
    pub fn load(&self, report: pb::LoadReport) -> Option<pb::LoadReport> {
        (!self.has(Fault::NoLoadReport)).then_some(report)
    }

    /// The status a provider refusal is answered with.
    pub fn refusal(&self, message: String, retry_after: Duration) -> Status {
        if self.has(Fault::RefusalUnavailable) {
            Status::unavailable(message)
        } else {
            Status::with_error_details(
                Code::ResourceExhausted,
                message,
                ErrorDetails::with_retry_info(Some(retry_after)),
            )
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn no_fault_changes_nothing() {
        let f = Faults::default();
        assert_eq!(f.usage(10, 5).prompt_tokens, 10);
        assert!(f.load(pb::LoadReport::default()).is_some());
        let s = f.refusal("429".into(), Duration::from_secs(2));
        assert_eq!(s.code(), Code::ResourceExhausted);
        assert_eq!(crate::grpc::retry_after(&s), Some(Duration::from_secs(2)));
    }

    #[test]
    fn each_fault_breaks_its_own_part() {
        let f = Faults::new(&[Fault::WrongUsage]);
        assert_eq!(
            f.usage(10, 5),
            pb::Usage {
                prompt_tokens: 0,
                completion_tokens: 15,
                cached_prompt_tokens: 0,
            }
        );
        assert!(f.load(pb::LoadReport::default()).is_some());
        let f = Faults::new(&[Fault::NoLoadReport]);
        assert!(f.load(pb::LoadReport::default()).is_none());
        let f = Faults::new(&[Fault::RefusalUnavailable]);
        let s = f.refusal("429".into(), Duration::from_secs(2));
        assert_eq!(s.code(), Code::Unavailable);
        assert_eq!(crate::grpc::retry_after(&s), None);
    }
}
