//! The request ids a simulated cluster has run, so a test can tell whether
//! the dispatcher ever sent the same work twice (a job after a restart).
//! Bounded: the first `MAX_SEEN` ids are remembered, the first
//! `MAX_REPEATED` repeats listed.

use std::collections::HashSet;

const MAX_SEEN: usize = 200_000;
const MAX_REPEATED: usize = 1_000;

#[derive(Debug, Default)]
pub struct RequestIds {
    seen: HashSet<String>,
    repeated: Vec<String>,
}

impl RequestIds {
    /// Records a request id the cluster admitted (empty ids are not tracked).
    pub fn record(&mut self, id: &str) {
        if id.is_empty() {
            return;
        }
        if self.seen.contains(id) {
            if self.repeated.len() < MAX_REPEATED {
                self.repeated.push(id.to_string());
            }
        } else if self.seen.len() < MAX_SEEN {
            self.seen.insert(id.to_string());
        }
    }

    pub fn repeated(&self) -> Vec<String> {
        self.repeated.clone()
    }
}
