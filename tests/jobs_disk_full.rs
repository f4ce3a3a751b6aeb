//! The embedded job store on a disk that fills up and is freed again,
//! deterministically: the store's file goes through a redb backend that
//! refuses, with ENOSPC as a full filesystem does, to grow the file past
//! a size the test sets (writes within the file still work, as on a real
//! disk). Real gRPC on loopback to the Jobs service, the jobs desk over
//! the engine and a fake cluster in process.
//!
//! While the disk is full a submission is refused with RESOURCE_EXHAUSTED
//! saying so; once space is freed submissions work again without a
//! restart; every job acknowledged before, during and after is kept and
//! ends. And at the store's level: output written without an fsync before
//! the failure (lost by the reopen redb requires) is written again, so a
//! running job's events stay numbered without gaps.

mod common;

use std::fs::OpenOptions;
use std::ops::Bound;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use common::engine::*;
use common::jobs::with_key;
use dispatcher::jobs::{Created, EmbeddedStore, HEALTH_SERVICE, JobStore, Jobs, Opener, StoreError, record};
use dispatcher::pb;
use dispatcher::pb::jobs_client::JobsClient;
use redb::backends::FileBackend;
use redb::{BackendError, Database, StorageBackend};
use tokio_util::sync::CancellationToken;
use tonic::Code;
use tonic::transport::Channel;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;

/// A file on a disk with `room` bytes for it: growing it past that fails
/// with ENOSPC.
/// Or, while `broken`, fails every write with EIO.
#[derive(Debug)]
struct SmallDisk {
    file: FileBackend,
    room: Arc<AtomicU64>,
    broken: Arc<AtomicBool>,
}

impl SmallDisk {
    fn fits(&self, end: u64) -> Result<(), std::io::Error> {
        if self.broken.load(Ordering::SeqCst) {
            return Err(std::io::Error::other("injected I/O error"));
        }
        match end <= self.room.load(Ordering::SeqCst) {
            true => Ok(()),
            false => Err(std::io::Error::from(std::io::ErrorKind::StorageFull)),
        }
    }
}

impl StorageBackend for SmallDisk {
    fn len(&self) -> Result<u64, std::io::Error> {
        self.file.len()
    }
    fn read(&self, offset: u64, out: &mut [u8]) -> Result<(), std::io::Error> {
        self.file.read(offset, out)
    }
    fn set_len(&self, len: u64) -> Result<(), std::io::Error> {
        if len > self.file.len()? {
            self.fits(len)?;
        }
        self.file.set_len(len)
    }
    fn sync_data(&self) -> Result<(), std::io::Error> {
        self.fits(0)?;
        self.file.sync_data()
    }
    fn write(&self, offset: u64, data: &[u8]) -> Result<(), std::io::Error> {
        self.fits(offset + data.len() as u64)?;
        self.file.write(offset, data)
    }
    fn close(&self) -> Result<(), std::io::Error> {
        self.file.close()
    }
    fn try_lock_range(&self, start: Bound<u64>, end: Bound<u64>) -> Result<bool, BackendError> {
        self.file.try_lock_range(start, end)
    }
    fn try_lock_shared_range(&self, start: Bound<u64>, end: Bound<u64>) -> Result<bool, BackendError> {
        self.file.try_lock_shared_range(start, end)
    }
    fn lock_range(&self, start: Bound<u64>, end: Bound<u64>) -> Result<(), BackendError> {
        self.file.lock_range(start, end)
    }
    fn lock_shared_range(&self, start: Bound<u64>, end: Bound<u64>) -> Result<(), BackendError> {
        self.file.lock_shared_range(start, end)
    }
    fn unlock_range(&self, start: Bound<u64>, end: Bound<u64>) -> Result<(), BackendError> {
        self.file.unlock_range(start, end)
    }
    fn query_lock_range(&self, start: Bound<u64>, end: Bound<u64>) -> Result<bool, BackendError> {
        self.file.query_lock_range(start, end)
    }
}

/// A disk the test fills and frees: the store's file may grow to `room`.
#[derive(Clone)]
struct Disk {
    room: Arc<AtomicU64>,
    broken: Arc<AtomicBool>,
    dir: Arc<tempfile::TempDir>,
}

impl Disk {
    fn new() -> Self {
        Self {
            room: Arc::new(AtomicU64::new(u64::MAX)),
            broken: Arc::new(AtomicBool::new(false)),
            dir: Arc::new(tempfile::tempdir().unwrap()),
        }
    }

    fn opener(&self) -> Opener {
        let (room, broken) = (self.room.clone(), self.broken.clone());
        Arc::new(move |path: &Path| {
            let file = OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(false)
                .open(path)
                .map_err(|e| redb::DatabaseError::Storage(redb::StorageError::Io(e)))?;
            let disk = SmallDisk {
                file: FileBackend::new(file)?,
                room: room.clone(),
                broken: broken.clone(),
            };
            Database::builder().create_with_backend(disk)
        })
    }

    fn store(&self) -> EmbeddedStore {
        EmbeddedStore::open_with(self.dir.path(), 1_000_000, 1 << 40, self.opener()).unwrap()
    }

    /// No room left past the file as it is now.
    fn fill(&self) {
        let len = std::fs::metadata(self.dir.path().join("jobs.redb"))
            .unwrap()
            .len();
        self.room.store(len, Ordering::SeqCst);
    }

    /// Not a byte left: every write fails (as on a full copy-on-write
    /// filesystem).
    fn fill_up(&self) {
        self.room.store(0, Ordering::SeqCst);
    }

    fn free(&self) {
        self.room.store(u64::MAX, Ordering::SeqCst);
    }
}

/// Jobs served over loopback gRPC: the desk over `store`, the engine
/// against a fake cluster (answering at once unless told otherwise).
async fn serve(store: EmbeddedStore) -> (World, Channel) {
    let c = config(
        &dispatcher_toml("[limits]\nmax_payload_bytes = 4194304\n[jobs]\nmax_held_per_tenant = 10000\n"),
        &[gpt_region("r", 600_000_000, 6_000_000, "")],
    );
    let w = World::start(&c);
    let jobs = Jobs::new(w.engine.clone(), Arc::new(store), "local".into(), &c);
    jobs.spawn(CancellationToken::new());
    let (reporter, health) = tonic_health::server::health_reporter();
    jobs.report_health(reporter);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(health)
            .add_service(
                pb::jobs_server::JobsServer::new(dispatcher::server::JobsService::new(Some(jobs)))
                    .max_decoding_message_size(16 << 20),
            )
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
    );
    let channel = Channel::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect()
        .await
        .unwrap();
    (w, channel)
}

/// Waits until the health of the Jobs service (on `c`'s server) is `want`.
async fn health_becomes(channel: &Channel, want: ServingStatus) {
    let h = HealthClient::new(channel.clone());
    until(Duration::from_secs(5), &format!("Jobs health {want:?}"), || {
        let mut h = h.clone();
        async move {
            let r = HealthCheckRequest {
                service: HEALTH_SERVICE.into(),
            };
            h.check(r)
                .await
                .is_ok_and(|s| s.into_inner().status == want as i32)
        }
    })
    .await;
}

/// A job whose request carries `payload_bytes` of payload.
fn job(payload_bytes: usize) -> tonic::Request<pb::SubmitJobRequest> {
    let mut request = request(100, 50);
    request.payload = vec![b'x'; payload_bytes].into();
    with_key(
        pb::SubmitJobRequest {
            request: Some(request),
            ..Default::default()
        },
        "key-a",
    )
}

fn job_ref(id: &str) -> tonic::Request<pb::JobRef> {
    with_key(pb::JobRef { job_id: id.into() }, "key-a")
}

/// Polls until `f` is true, at most `within`.
async fn until<F: std::future::Future<Output = bool>>(
    within: Duration,
    what: &str,
    mut f: impl FnMut() -> F,
) {
    let deadline = Instant::now() + within;
    while !f().await {
        assert!(Instant::now() < deadline, "{what}: not within {within:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The job as it ended (bounded wait).
async fn ended(c: &mut JobsClient<Channel>, id: &str) -> pb::Job {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        // Reads fail while the store reopens (or cannot yet).
        let j = c.get_job(job_ref(id)).await.map(|j| j.into_inner());
        if let Ok(j) = &j
            && record::is_terminal(j.state())
        {
            return j.clone();
        }
        assert!(Instant::now() < deadline, "job {id} did not end: {j:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_refuses_new_jobs_and_the_store_works_again_once_freed() {
    let disk = Disk::new();
    let (_w, channel) = serve(disk.store()).await;
    let mut c = JobsClient::new(channel);

    // Before: ten jobs, each run to the end.
    let mut before = Vec::new();
    for _ in 0..10 {
        before.push(c.submit_job(job(1000)).await.unwrap().into_inner().job_id);
    }
    for id in &before {
        assert_eq!(ended(&mut c, id).await.state(), pb::JobState::Done);
    }

    // Full: jobs of 512 KiB until the file would have to grow.
    disk.fill();
    let mut during = Vec::new();
    let refusal = loop {
        match c.submit_job(job(512 << 10)).await {
            Ok(j) => during.push(j.into_inner().job_id),
            Err(e) => break e,
        }
        assert!(during.len() < 64, "64 jobs of 512 KiB fit in a full disk");
    };
    assert_eq!(refusal.code(), Code::ResourceExhausted, "{refusal:?}");
    assert!(
        refusal.message().contains("disk is full"),
        "{}",
        refusal.message()
    );
    // Every submission while it stays full: stored (it fits in the file)
    // or refused as full, never anything else; reads keep working.
    let mut refused = 0;
    for i in 0..20 {
        match c.submit_job(job(if i % 2 == 0 { 1000 } else { 512 << 10 })).await {
            Ok(j) => during.push(j.into_inner().job_id),
            Err(e) => {
                assert_eq!(e.code(), Code::ResourceExhausted, "{e:?}");
                assert!(e.message().contains("disk is full"), "{}", e.message());
                refused += 1;
            }
        }
        tokio::time::sleep(Duration::from_millis(30)).await;
    }
    assert!(
        refused >= 10,
        "every large job is refused while the disk is full: {refused}"
    );
    let first = before[0].clone();
    until(
        Duration::from_secs(5),
        "a job read while the disk is full",
        || {
            let mut c = c.clone();
            let id = first.clone();
            async move { c.get_job(job_ref(&id)).await.is_ok() }
        },
    )
    .await;

    // Freed: submissions work again, without a restart.
    disk.free();
    let freed = Instant::now();
    let mut after = Vec::new();
    let mut last = None;
    while after.is_empty() {
        match c.submit_job(job(512 << 10)).await {
            Ok(j) => after.push(j.into_inner().job_id),
            Err(e) => last = Some(e),
        }
        assert!(
            freed.elapsed() < Duration::from_secs(5),
            "no job stored within 5 s of freeing the disk; the last answer: {last:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    eprintln!("stored again {:?} after the disk was freed", freed.elapsed());
    for _ in 0..5 {
        after.push(c.submit_job(job(1000)).await.unwrap().into_inner().job_id);
    }

    // Nothing acknowledged is lost: every job is there and ends; the ones
    // that ran before the disk filled, and the ones after, are DONE.
    for id in &before {
        let j = ended(&mut c, id).await;
        assert_eq!(j.state(), pb::JobState::Done, "{j:?}");
        assert!(!j.output.is_empty());
    }
    for id in &during {
        let j = ended(&mut c, id).await;
        eprintln!(
            "acknowledged while full: {id} {:?} {}",
            j.state(),
            j.error_message
        );
    }
    for id in &after {
        assert_eq!(ended(&mut c, id).await.state(), pb::JobState::Done);
    }
    eprintln!(
        "{} jobs before, {} stored while full, {refused} refused while full, {} after",
        before.len(),
        during.len(),
        after.len()
    );
}

/// A job whose answer streams 20 chunks, one every 100 ms.
fn streaming(repeatable: bool) -> tonic::Request<pb::SubmitJobRequest> {
    let mut r = job(100);
    r.get_mut().repeatable = repeatable;
    r
}

/// Waits until the job has stored some of its output.
async fn running(c: &mut JobsClient<Channel>, id: &str) {
    let id = id.to_string();
    until(Duration::from_secs(10), "the job streams its output", || {
        let mut c = c.clone();
        let id = id.clone();
        async move {
            let j = c.get_job(job_ref(&id)).await.unwrap().into_inner();
            j.state() == pb::JobState::Running && j.last_seq >= 4
        }
    })
    .await;
}

/// The sequence numbers of the job's events.
async fn seqs(c: &mut JobsClient<Channel>, id: &str) -> Vec<u64> {
    let r = pb::WatchJobRequest {
        job_id: id.into(),
        from_seq: 0,
    };
    let mut events = c.watch_job(with_key(r, "key-a")).await.unwrap().into_inner();
    let mut out = Vec::new();
    while let Some(e) = events.message().await.unwrap() {
        out.push(e.seq);
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_running_when_the_disk_fills_waits_for_room_and_ends_done() {
    let disk = Disk::new();
    let (w, channel) = serve(disk.store()).await;
    let mut c = JobsClient::new(channel.clone());
    w.cluster("r")
        .always(Reply::ok().chunks(20, Duration::from_millis(100)));
    health_becomes(&channel, ServingStatus::Serving).await;
    let id = c.submit_job(streaming(false)).await.unwrap().into_inner().job_id;
    running(&mut c, &id).await;
    // Not a byte left until after the region's answer ended: the job's
    // output and end cannot be stored meanwhile (its run waits), and the
    // Jobs service says it takes no jobs.
    disk.fill_up();
    health_becomes(&channel, ServingStatus::NotServing).await;
    until(Duration::from_secs(10), "the region's call ends", || async {
        w.cluster("r").answered() + w.cluster("r").cancelled() == 1
    })
    .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let meanwhile = c.get_job(job_ref(&id)).await.map(|j| j.into_inner().state());
    assert_ne!(
        meanwhile.ok(),
        Some(pb::JobState::Done),
        "not stored while the disk is full"
    );
    disk.free();
    health_becomes(&channel, ServingStatus::Serving).await;
    let j = ended(&mut c, &id).await;
    assert_eq!(j.state(), pb::JobState::Done, "{j:?}");
    assert_eq!(j.runs, 1);
    let all: String = (1..=20).map(|i| format!("chunk {i};")).collect();
    assert_eq!(String::from_utf8_lossy(&j.output), all, "all its output");
    assert_eq!(seqs(&mut c, &id).await, (1..=j.last_seq).collect::<Vec<u64>>());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jobs_whose_runs_a_failing_store_stopped_are_taken_up_again_once_it_works() {
    let disk = Disk::new();
    let (w, channel) = serve(disk.store()).await;
    let mut c = JobsClient::new(channel.clone());
    w.cluster("r")
        .always(Reply::ok().chunks(20, Duration::from_millis(100)));
    let once = c.submit_job(streaming(false)).await.unwrap().into_inner().job_id;
    let again = c.submit_job(streaming(true)).await.unwrap().into_inner().job_id;
    running(&mut c, &once).await;
    running(&mut c, &again).await;
    // I/O errors until after the region's answers ended: storing their
    // output or ends fails, and the runs stop.
    disk.broken.store(true, Ordering::SeqCst);
    until(Duration::from_secs(10), "the region's calls end", || async {
        w.cluster("r").answered() + w.cluster("r").cancelled() == 2
    })
    .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    disk.broken.store(false, Ordering::SeqCst);
    // Taken up as after a restart: the one that may not run twice ends
    // INTERRUPTED, saying why; the repeatable one runs again to the end.
    let j = ended(&mut c, &once).await;
    assert_eq!(j.state(), pb::JobState::Interrupted, "{j:?}");
    assert!(j.error_message.contains("job store"), "{}", j.error_message);
    let j = ended(&mut c, &again).await;
    assert_eq!(j.state(), pb::JobState::Done, "{j:?}");
    assert_eq!(j.runs, 2);
}

/// A stored job and its first event.
fn stored(id: &str, payload_bytes: usize) -> (pb::StoredJob, pb::JobEvent) {
    let mut s = pb::StoredJob {
        job: Some(pb::Job {
            job_id: id.into(),
            tenant: "a".into(),
            state: pb::JobState::Running as i32,
            created_unix_ms: 1,
            ..Default::default()
        }),
        request: Some(pb::DispatchRequest {
            payload: vec![b'x'; payload_bytes].into(),
            ..Default::default()
        }),
        fence: 1,
        cancel_requested: false,
    };
    let first = record::next_event(&mut s, pb::job_event::Event::Running(pb::JobRunning::default()));
    (s, first)
}

fn output(s: &mut pb::StoredJob, text: &str) -> pb::JobEvent {
    record::next_event(
        s,
        pb::job_event::Event::Output(pb::JobOutput {
            output: text.as_bytes().to_vec().into(),
            usage: None,
        }),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn output_written_before_the_disk_filled_survives_the_reopen() {
    let disk = Disk::new();
    let store = disk.store();
    let (mut running, first) = stored("job-00000000000000aa", 100);
    assert_eq!(
        store.create(running.clone(), first, "local").await,
        Ok(Created::Stored)
    );
    // Output: committed without an fsync (a running job's events only).
    for i in 0..5 {
        let e = output(&mut running, &format!("chunk {i} "));
        store.write(running.clone(), vec![e]).await.unwrap();
    }
    // The disk fills: a job that needs the file to grow fails, and the
    // store reopens its file.
    disk.fill();
    let (big, first) = stored("job-00000000000000bb", 8 << 20);
    match store.create(big, first, "local").await {
        Err(StoreError::DiskFull(why)) => assert!(why.contains("jobs.redb"), "{why}"),
        other => panic!("expected DiskFull, got {other:?}"),
    }
    disk.free();
    // The running job writes on: its events are all there, 1 to 7, in order.
    let e = output(&mut running, "after");
    let deadline = Instant::now() + Duration::from_secs(5);
    while let Err(e2) = store.write(running.clone(), vec![e.clone()]).await {
        assert!(Instant::now() < deadline, "the store did not write again: {e2}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let seqs: Vec<u64> = store
        .events("job-00000000000000aa", 1, 100)
        .await
        .unwrap()
        .iter()
        .map(|e| e.seq)
        .collect();
    assert_eq!(seqs, (1..=7).collect::<Vec<u64>>(), "events without gaps");
    let got = store.get("job-00000000000000aa").await.unwrap().unwrap();
    assert_eq!(got, running);
}
