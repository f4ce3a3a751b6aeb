use super::*;
use crate::jobs::record;

fn job(id: &str, key: &str) -> (pb::StoredJob, pb::JobEvent) {
    let mut stored = pb::StoredJob {
        job: Some(pb::Job {
            job_id: id.into(),
            tenant: "t".into(),
            idempotency_key: key.into(),
            created_unix_ms: 1,
            ..Default::default()
        }),
        request: Some(pb::DispatchRequest {
            payload: "work".into(),
            ..Default::default()
        }),
        fence: 1,
        cancel_requested: false,
    };
    let first = record::next_event(
        &mut stored,
        pb::job_event::Event::Running(pb::JobRunning::default()),
    );
    (stored, first)
}

#[tokio::test]
async fn the_size_each_commit_records_is_what_reading_every_record_finds() {
    let dir = tempfile::tempdir().unwrap();
    let store = EmbeddedStore::open(dir.path(), 100, 1 << 30).unwrap();
    for i in 0..20 {
        let (j, first) = job(&format!("job-{i:016x}"), &format!("k{i}"));
        assert_eq!(store.create(j.clone(), first, "local").await, Ok(Created::Stored));
        if i % 2 == 0 {
            let mut j = j;
            let output = record::next_event(
                &mut j,
                pb::job_event::Event::Output(pb::JobOutput {
                    output: "x".repeat(100).into(),
                    usage: None,
                }),
            );
            store.write(j, vec![output]).await.unwrap();
        }
    }
    assert_eq!(store.expire(u64::MAX).await, Ok(0), "none finished");
    let in_memory = *store.shared.usage.lock();
    assert_eq!(in_memory.jobs, 20);
    let db = store.shared.db.read().clone().unwrap();
    let w = db.begin_write().unwrap();
    let recorded = w
        .open_table(META)
        .unwrap()
        .get("usage")
        .unwrap()
        .map(|v| v.value());
    let measured = EmbeddedStore::measure(&w).unwrap();
    drop(w);
    assert_eq!(recorded, Some((in_memory.jobs, in_memory.bytes)));
    assert_eq!((measured.jobs, measured.bytes), (in_memory.jobs, in_memory.bytes));
}
