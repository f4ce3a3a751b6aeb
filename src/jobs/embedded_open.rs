//! Opening the embedded store's file, and saying what was found when it
//! cannot be opened: locked by another process (by which one, from the pid
//! file written beside it), permission denied, corrupt, a full disk.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use redb::{Database, DatabaseError, StorageError};

/// Opens (or creates) the store's file. The writer opens it again with the
/// same opener after an I/O error (redb refuses every transaction after
/// one until the file is reopened). Tests pass one over a backend that
/// fails writes as a full disk does.
pub type Opener = Arc<dyn Fn(&Path) -> Result<Database, DatabaseError> + Send + Sync>;

/// The opener of a plain file.
pub fn file_opener() -> Opener {
    Arc::new(|path: &Path| Database::create(path))
}

/// `<file>.pid`: the process that has the file open, for the message a
/// second process gets.
fn pid_file(path: &Path) -> PathBuf {
    let mut p = path.as_os_str().to_owned();
    p.push(".pid");
    PathBuf::from(p)
}

/// Notes this process as the file's holder (best effort: only a message
/// depends on it).
pub fn write_pid(path: &Path) {
    if let Err(e) = std::fs::write(pid_file(path), format!("{}\n", std::process::id())) {
        tracing::debug!(error = %e, "could not write the job store's pid file");
    }
}

/// The process named in the pid file, if it is still running.
fn holder(path: &Path) -> Option<u32> {
    let pid: u32 = std::fs::read_to_string(pid_file(path))
        .ok()?
        .trim()
        .parse()
        .ok()?;
    let running = Path::new("/proc").join(pid.to_string()).exists();
    (running && pid != std::process::id()).then_some(pid)
}

/// Whether `e` is a full disk (or a full quota).
pub fn is_disk_full(e: &std::io::Error) -> bool {
    use std::io::ErrorKind;
    matches!(e.kind(), ErrorKind::StorageFull | ErrorKind::QuotaExceeded)
}

/// What was found at `path` when it could not be opened, for the message a
/// failed start prints (naming `jobs.data_dir`).
pub fn explain(path: &Path, e: &DatabaseError) -> String {
    let file = path.display();
    let what = match e {
        DatabaseError::DatabaseAlreadyOpen | DatabaseError::LockProtocolMismatch => {
            let by =
                holder(path).map_or_else(|| "another process".to_string(), |pid| format!("process {pid}"));
            format!("{file} is locked by {by}: is another dispatcher using this directory?")
        }
        DatabaseError::Storage(StorageError::Io(io)) => match io.kind() {
            std::io::ErrorKind::PermissionDenied => {
                format!("{file}: permission denied ({io}); the dispatcher needs to read and write it")
            }
            std::io::ErrorKind::IsADirectory => format!("{file} is a directory, not a job store"),
            std::io::ErrorKind::InvalidData | std::io::ErrorKind::UnexpectedEof => {
                corrupt(path, &io.to_string())
            }
            _ if is_disk_full(io) => format!("{file}: the disk is full ({io})"),
            _ => format!("{file}: {io}"),
        },
        DatabaseError::Storage(StorageError::Corrupted(why)) => corrupt(path, why),
        DatabaseError::UpgradeRequired(version) => {
            format!("{file} is in an older store format (version {version}): not readable by this dispatcher")
        }
        DatabaseError::RepairAborted => format!("{file} needs a repair that could not be made"),
        other => format!("{file}: {other}"),
    };
    format!("jobs.data_dir: cannot open the job store: {what}")
}

/// The words for a file that is not a (whole) job store.
pub fn corrupt(path: &Path, why: &str) -> String {
    format!(
        "{} is corrupt or not a job store ({}); move it away to start with an empty store (its jobs are lost), or restore it from a backup",
        path.display(),
        crate::excerpt::truncate(why, 200)
    )
}
