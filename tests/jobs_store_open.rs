//! A dispatcher whose embedded job store cannot be opened refuses to start
//! (no panic) and says what it found: locked by another process (naming
//! it), corrupt, truncated, a directory, permission denied.

mod common;

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::jobs::dispatcher_toml;
use common::{ConfigDir, dispatcher};
use dispatcher::jobs::{Created, EmbeddedStore, JobStore, record};
use dispatcher::pb;

fn config() -> ConfigDir {
    let cfg = ConfigDir::new(&dispatcher_toml("", ""));
    // A region file whose endpoint nothing needs to answer: the start
    // fails (or not) on the job store before any call.
    cfg.write_region(
        "r1",
        "name = \"r1\"\nendpoint = \"http://127.0.0.1:9\"\n[[models]]\nname = \"gpt-4o\"\ntokens_per_minute = 600000\nrequests_per_minute = 6000\n",
    );
    cfg
}

/// Runs the dispatcher on `cfg` (as `as_user` when given, through
/// setpriv) and expects it to exit with an error within 30 s: its stderr.
fn refused_start(cfg: &ConfigDir, as_user: Option<&str>) -> String {
    let bin = env!("CARGO_BIN_EXE_dispatcher");
    let config = cfg.config();
    let args = ["--config", config.to_str().unwrap(), "--listen", "127.0.0.1:0"];
    let mut cmd = match as_user {
        None => Command::new(bin),
        Some(user) => {
            let mut c = Command::new("setpriv");
            c.args(["--reuid", user, "--regid", user, "--clear-groups", bin]);
            c
        }
    };
    let mut child = cmd
        .args(args)
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("the dispatcher started (or hung) on a job store it cannot use");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let mut err = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut err).unwrap();
    assert!(!status.success(), "it must not start: {err}");
    assert!(!err.contains("panicked"), "refused with a panic: {err}");
    assert!(
        err.contains("jobs.data_dir"),
        "the message names the setting: {err}"
    );
    err
}

/// A real store in `dir` with a few jobs, closed.
async fn store_with_jobs(dir: &Path) {
    let store = EmbeddedStore::open(dir, 1000, 1 << 30).unwrap();
    for i in 0..50u64 {
        let mut s = pb::StoredJob {
            job: Some(pb::Job {
                job_id: format!("job-{i:016x}"),
                tenant: "t".into(),
                created_unix_ms: 1,
                ..Default::default()
            }),
            request: Some(pb::DispatchRequest {
                payload: vec![b'x'; 4000].into(),
                ..Default::default()
            }),
            fence: 1,
            cancel_requested: false,
        };
        let first = record::next_event(&mut s, pb::job_event::Event::Running(pb::JobRunning::default()));
        assert_eq!(store.create(s, first, "local").await, Ok(Created::Stored));
    }
    drop(store);
    // Its writer thread closes the file once it sees the store gone.
    let file = dir.join("jobs.redb");
    let deadline = Instant::now() + Duration::from_secs(10);
    while redb::Database::open(&file).is_err() {
        assert!(Instant::now() < deadline, "the store's file stayed open");
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_dispatcher_on_the_same_data_dir_is_refused_naming_the_first() {
    let cfg = config();
    let first = dispatcher(&cfg.config());
    let err = refused_start(&cfg, None);
    assert!(err.contains("locked by process"), "{err}");
    assert!(
        err.contains(&first.pid().to_string()),
        "names the holder, {}: {err}",
        first.pid()
    );
    assert!(err.contains("another dispatcher"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_corrupt_or_truncated_store_is_refused_as_such() {
    // Not a store at all.
    let cfg = config();
    std::fs::create_dir(cfg.path().join("data")).unwrap();
    let garbage: Vec<u8> = (0..64 * 1024u32)
        .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8)
        .collect();
    std::fs::write(cfg.path().join("data/jobs.redb"), &garbage).unwrap();
    let err = refused_start(&cfg, None);
    eprintln!("garbage: {err}");
    assert!(err.contains("corrupt"), "{err}");
    assert!(!err.contains("another dispatcher"), "{err}");

    // A real store cut short, at half its length and inside its header.
    for keep in [0.5, 0.0005] {
        let cfg = config();
        let data = cfg.path().join("data");
        store_with_jobs(&data).await;
        let file = data.join("jobs.redb");
        let len = std::fs::metadata(&file).unwrap().len();
        let cut = (len as f64 * keep) as u64;
        std::fs::OpenOptions::new()
            .write(true)
            .open(&file)
            .unwrap()
            .set_len(cut)
            .unwrap();
        let err = refused_start(&cfg, None);
        eprintln!("truncated to {cut} of {len} bytes: {err}");
        assert!(err.contains("corrupt"), "{err}");
        assert!(!err.contains("another dispatcher"), "{err}");
    }

    // A directory where the file should be.
    let cfg = config();
    std::fs::create_dir_all(cfg.path().join("data/jobs.redb")).unwrap();
    let err = refused_start(&cfg, None);
    assert!(err.contains("is a directory"), "{err}");
}

/// The effective user id (`id -u`).
fn euid() -> u32 {
    let out = Command::new("id").arg("-u").output().unwrap();
    String::from_utf8_lossy(&out.stdout).trim().parse().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_store_the_dispatcher_may_not_open_is_refused_saying_permission_denied() {
    let cfg = config();
    let data = cfg.path().join("data");
    store_with_jobs(&data).await;
    use std::os::unix::fs::PermissionsExt;
    let file = data.join("jobs.redb");
    std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o600)).unwrap();
    // Root opens any file: as root, the dispatcher runs as `nobody`, who
    // may read its config but not the store (root's, mode 600).
    let as_user = match euid() {
        0 => {
            for dir in [cfg.path(), &cfg.path().join("regions"), &data] {
                std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755)).unwrap();
            }
            Some("65534")
        }
        _ => {
            std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o000)).unwrap();
            None
        }
    };
    let err = refused_start(&cfg, as_user);
    eprintln!("{err}");
    assert!(err.contains("permission denied"), "{err}");
    assert!(!err.contains("another dispatcher"), "{err}");
}
