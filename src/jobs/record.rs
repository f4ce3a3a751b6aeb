//! A job's record and its events, as stored and as answered.

use rand::Rng;

use crate::core::JobPhase;
use crate::pb;
use pb::job_event::Event;

/// A new job id: `job-` and 16 random hex digits (ids name jobs across
/// restarts and replicas, so they are random, not counted).
pub fn new_id() -> String {
    format!("job-{:016x}", rand::rng().random::<u64>())
}

/// Job ids are ours: anything else is refused before a lookup.
pub fn valid_id(id: &str) -> bool {
    id.len() == 20 && id.starts_with("job-") && id[4..].bytes().all(|b| b.is_ascii_hexdigit())
}

pub fn phase(s: pb::JobState) -> JobPhase {
    match s {
        pb::JobState::Unspecified | pb::JobState::Queued => JobPhase::Queued,
        pb::JobState::Running => JobPhase::Running,
        pb::JobState::Done => JobPhase::Done,
        pb::JobState::Failed => JobPhase::Failed,
        pb::JobState::Cancelled => JobPhase::Cancelled,
        pb::JobState::Interrupted => JobPhase::Interrupted,
    }
}

pub fn is_terminal(s: pb::JobState) -> bool {
    phase(s).is_terminal()
}

/// The job inside a stored record (always present in what we store).
pub fn job(stored: &pb::StoredJob) -> &pb::Job {
    static EMPTY: std::sync::OnceLock<pb::Job> = std::sync::OnceLock::new();
    stored
        .job
        .as_ref()
        .unwrap_or_else(|| EMPTY.get_or_init(pb::Job::default))
}

pub fn job_mut(stored: &mut pb::StoredJob) -> &mut pb::Job {
    stored.job.get_or_insert_with(pb::Job::default)
}

/// The next event of `stored`, numbered after its last (which it becomes).
pub fn next_event(stored: &mut pb::StoredJob, event: Event) -> pb::JobEvent {
    let job = job_mut(stored);
    job.last_seq += 1;
    pb::JobEvent {
        job_id: job.job_id.clone(),
        seq: job.last_seq,
        at_unix_ms: crate::clock::unix_ms(),
        event: Some(event),
    }
}

/// Ends the job in `state` (with `code` and `message` unless DONE) and
/// returns its terminal event. Its output stays in the record (GetJob) and
/// in the output events; the terminal event carries the job without it.
pub fn finish(
    stored: &mut pb::StoredJob,
    state: pb::JobState,
    code: i32,
    message: &str,
    ttl_ms: u64,
) -> pb::JobEvent {
    let now = crate::clock::unix_ms();
    if crate::metrics::enabled() {
        let label = state.as_str_name().to_ascii_lowercase();
        metrics::counter!("dispatcher_jobs_finished_total", "state" => label).increment(1);
    }
    let job = job_mut(stored);
    job.set_state(state);
    job.error_code = code;
    job.error_message = crate::excerpt::truncate(message, 1024).into_owned();
    job.finished_unix_ms = now;
    job.expires_unix_ms = crate::core::job::expires_at(now, ttl_ms);
    let mut ended = job.clone();
    ended.output = Default::default();
    // The terminal event's own number is in the job it carries.
    ended.last_seq += 1;
    next_event(stored, Event::Ended(ended))
}

/// Whether `event` is a job's last.
pub fn is_end(event: &pb::JobEvent) -> bool {
    matches!(event.event, Some(Event::Ended(_)))
}
