//! Shared by the jobs tests: a call with a tenant's key, and an event's kind.

use dispatcher::pb;

/// `message` with `authorization: Bearer <key>`.
pub fn with_key<T>(message: T, key: &str) -> tonic::Request<T> {
    let mut r = tonic::Request::new(message);
    r.metadata_mut()
        .insert("authorization", format!("Bearer {key}").parse().unwrap());
    r
}

/// What a job event is, by name.
pub fn kind(e: &pb::JobEvent) -> &'static str {
    use pb::job_event::Event;
    match e.event {
        Some(Event::Queued(_)) => "queued",
        Some(Event::Routed(_)) => "routed",
        Some(Event::Running(_)) => "running",
        Some(Event::Output(_)) => "output",
        Some(Event::Ended(_)) => "ended",
        None => "none",
    }
}
