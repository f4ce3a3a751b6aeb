//! How one simulated call ends and what it tells its caller: a stream's
//! waits end early when the caller goes away or its deadline passes, and
//! every answer echoes what reached the cluster.

use std::time::Duration;

use tokio::sync::mpsc;

use crate::pb;

/// Why a stream stopped before its end.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stop {
    Cancelled,
    Deadline,
}

/// Waits `d`, unless the stream's receiver goes away first (not watched
/// with `ignore_cancel`) or the deadline passes.
pub async fn wait_for<T>(
    d: Duration,
    tx: &mpsc::Sender<T>,
    deadline: Option<tokio::time::Instant>,
    ignore_cancel: bool,
) -> Result<(), Stop> {
    let deadline = async {
        match deadline {
            Some(at) => tokio::time::sleep_until(at).await,
            None => std::future::pending().await,
        }
    };
    let closed = async {
        match ignore_cancel {
            false => tx.closed().await,
            true => std::future::pending().await,
        }
    };
    tokio::select! {
        _ = tokio::time::sleep(d) => Ok(()),
        _ = closed => Err(Stop::Cancelled),
        _ = deadline => Err(Stop::Deadline),
    }
}

/// Tells the caller what reached the cluster: the request id (when short
/// enough to be a header) and how many labels came with it.
pub fn echo_received(r: &pb::ExecuteRequest, metadata: &mut tonic::metadata::MetadataMap) {
    if r.request_id.len() <= crate::grpc::ECHO_MAX_BYTES
        && let Ok(id) = r.request_id.parse()
    {
        metadata.insert(crate::grpc::ECHO_REQUEST_ID, id);
    }
    metadata.insert(crate::grpc::ECHO_LABELS, r.labels.len().into());
}
