//! `dispatcher check-cluster`: runs the AgentCluster contract
//! (proto/dispatch/v1/cluster.proto, in prose in docs/CLUSTERS.md) against
//! a live cluster and prints, check by check, what was expected, what was
//! seen and a verdict. It spends real quota, so every request is counted
//! against `--max-tokens` as the dispatcher would reserve it (prompt +
//! max_output_tokens), and it sends a few requests only.
//!
//! One file per group of checks, each judging what it saw with pure
//! functions tested beside them: `basics.rs` (health, Execute,
//! ExecuteStream, unknown model, request id), `usage.rs`, `load.rs` (the
//! report, concurrency, falls), `cancel.rs`, `deadline.rs`, `quota.rs`
//! (provider_quota, refusal). `probe.rs` makes the calls, `run.rs` runs
//! the checks in order, `report.rs` prints the table.

mod basics;
mod cancel;
mod deadline;
mod load;
mod probe;
mod quota;
mod report;
mod run;
mod usage;

use std::path::PathBuf;

pub use report::{Judged, Report, Row, Verdict};
pub use run::run;

/// `dispatcher check-cluster`'s arguments.
#[derive(Debug, Clone, clap::Args)]
pub struct CheckArgs {
    /// The cluster: http://host:port, or https://host:port with TLS.
    pub endpoint: String,
    /// A model the cluster serves.
    #[arg(long, default_value = "gpt-4o")]
    pub model: String,
    /// The most tokens the whole check may reserve (prompt +
    /// max_output_tokens of every request, as the dispatcher counts them).
    #[arg(long, default_value_t = 2000)]
    pub max_tokens: u64,
    /// PEM CA the cluster's certificate must chain to (default: the
    /// system's roots).
    #[arg(long)]
    pub ca_file: Option<PathBuf>,
    /// PEM client certificate to present (mTLS); needs --key-file.
    #[arg(long, requires = "key_file")]
    pub cert_file: Option<PathBuf>,
    /// The PEM private key of --cert-file.
    #[arg(long, requires = "cert_file")]
    pub key_file: Option<PathBuf>,
    /// The name the cluster's certificate must carry (default: the
    /// endpoint's host).
    #[arg(long)]
    pub server_name: Option<String>,
}
