//! The engine in process against fake AgentClusters on an in-memory network
//! (`tokio::io::duplex` pipes behind the engine's `Connector`), for tests on
//! a paused clock. No sockets: a reply in transit on a loopback socket is
//! invisible to tokio's paused clock, which may then jump ahead while it
//! waits (an in-memory reply wakes its reader at once). The fakes wait with
//! `tokio::time::sleep`, so the virtual clock drives them too.

mod cluster;
mod net;

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use dispatcher::config::{self, Config};
use dispatcher::core::CircuitState;
use dispatcher::dispatch::{DispatchError, Engine, hash_key};
use dispatcher::pb;
use dispatcher::state::RegionView;
use tokio::time::Instant;
use tonic::Code;
use tonic_types::StatusExt;

// Not every test names every type.
#[allow(unused_imports)]
pub use cluster::{FakeCluster, Outcome, Reply, Seen};
pub use net::Net;

/// Tenant "a"'s and tenant "b"'s credentials.
pub const KEY_A: Option<&str> = Some("Bearer key-a");
pub const KEY_B: Option<&str> = Some("Bearer key-b");

/// dispatcher.toml for these tests: `extra` (its own tables, such as
/// `[routing]`), then model gpt-4o and tenants "a" and "b" (keys `KEY_A`,
/// `KEY_B`), no anonymous use.
pub fn dispatcher_toml(extra: &str) -> String {
    format!(
        r#"{extra}
[[models]]
name = "gpt-4o"
max_request_tokens = 100000

[[tenants]]
name = "a"
keys = ["{a}"]

[[tenants]]
name = "b"
keys = ["{b}"]
"#,
        a = hash_key("key-a"),
        b = hash_key("key-b"),
    )
}

/// The endpoint of region `name` on the in-memory network.
pub fn endpoint(name: &str) -> String {
    format!("http://{name}.cluster:50051")
}

/// A region file: its name, its endpoint on the network, then `rest`.
pub fn region_toml(name: &str, rest: &str) -> String {
    format!("name = {name:?}\nendpoint = {:?}\n{rest}", endpoint(name))
}

/// A region serving gpt-4o with `tokens_per_minute` and a bucket of
/// `burst_tokens`, charged at admission (what a request reserves is what it
/// costs, whatever it reports), requests per minute to spare; `extra` are
/// the region's own keys (`max_concurrent = 1`).
pub fn gpt_region(name: &str, tokens_per_minute: u64, burst_tokens: u64, extra: &str) -> String {
    region_toml(
        name,
        &format!(
            r#"{extra}
[[models]]
name = "gpt-4o"
tokens_per_minute = {tokens_per_minute}
burst_tokens = {burst_tokens}
requests_per_minute = 1000000
accounting = "admission"
"#
        ),
    )
}

pub fn config(dispatcher: &str, regions: &[String]) -> Config {
    let mut c = config::parse_dispatcher(dispatcher, Path::new("dispatcher.toml"), Some(HashMap::new()))
        .unwrap_or_else(|e| panic!("{e}"));
    c.regions = regions
        .iter()
        .enumerate()
        .map(|(i, r)| {
            config::parse_region(r, Path::new(&format!("regions/{i}.toml")), &c.models)
                .unwrap_or_else(|e| panic!("{e}"))
        })
        .collect();
    c
}

/// Each region's name and endpoint, as the engine takes them.
pub fn endpoints(c: &Config) -> Vec<(String, String)> {
    c.regions
        .iter()
        .map(|r| (r.spec.name.clone(), r.endpoint.clone().expect("an endpoint")))
        .collect()
}

/// An engine and, for each of its regions, a fake cluster answering at
/// the region's endpoint.
pub struct World {
    pub net: Net,
    pub engine: Arc<Engine>,
    pub clusters: HashMap<String, FakeCluster>,
    /// When the world started, on the paused clock.
    pub t0: Instant,
}

impl World {
    pub fn start(c: &Config) -> World {
        let net = Net::new();
        let mut clusters = HashMap::new();
        for (name, endpoint) in endpoints(c) {
            let cluster = FakeCluster::new();
            let authority = endpoint.trim_start_matches("http://").to_string();
            net.serve_cluster(&authority, &cluster);
            clusters.insert(name, cluster);
        }
        let engine = Engine::with_connector(c, &endpoints(c), net.connector()).unwrap();
        engine.spawn_pump(Default::default());
        World {
            net,
            engine,
            clusters,
            t0: Instant::now(),
        }
    }

    pub fn cluster(&self, region: &str) -> &FakeCluster {
        &self.clusters[region]
    }

    /// Time since the world started, on the paused clock.
    pub fn elapsed(&self) -> Duration {
        self.t0.elapsed()
    }

    /// A look at a region's state, now.
    pub fn region(&self, name: &str) -> RegionView {
        self.engine
            .view(dispatcher::clock::now())
            .regions
            .into_iter()
            .find(|r| r.name == name)
            .expect("a configured region")
    }

    pub fn circuit(&self, name: &str) -> CircuitState {
        self.region(name).circuit
    }

    /// What region `name` holds and what was counted against it.
    pub fn blame(&self, name: &str) -> Blame {
        let r = self.region(name);
        Blame {
            circuit: r.circuit.name(),
            failed: r.failed,
            error_rate: r.error_rate,
            in_flight: r.in_flight,
        }
    }

    /// Calls to all clusters.
    pub fn calls(&self) -> u64 {
        self.clusters.values().map(FakeCluster::calls).sum()
    }

    /// `dispatch` in a task of its own, so that the test can watch it wait.
    pub fn spawn_dispatch(
        &self,
        r: pb::DispatchRequest,
        timeout: Option<Duration>,
        key: Option<&'static str>,
    ) -> tokio::task::JoinHandle<(Result<dispatcher::dispatch::Dispatched, DispatchError>, Duration)> {
        let engine = self.engine.clone();
        tokio::spawn(async move {
            let start = Instant::now();
            let result = engine.dispatch(r, timeout, key).await;
            (result, start.elapsed())
        })
    }
}

/// What a region holds and what was counted against it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Blame {
    pub circuit: &'static str,
    pub failed: u64,
    pub error_rate: f64,
    pub in_flight: u32,
}

impl Blame {
    /// Nothing held, nothing counted against it.
    pub const NONE: Blame = Blame {
        circuit: "closed",
        failed: 0,
        error_rate: 0.0,
        in_flight: 0,
    };
}

/// A gpt-4o request of `prompt` + `max_output` tokens.
pub fn request(prompt: u64, max_output: u64) -> pb::DispatchRequest {
    pb::DispatchRequest {
        model: "gpt-4o".into(),
        payload: "work".into(),
        prompt_tokens: prompt,
        max_output_tokens: max_output,
        ..Default::default()
    }
}

/// The status a caller would get, and its RetryInfo.
pub fn status(e: &DispatchError) -> (Code, Option<Duration>) {
    let s = dispatcher::server::to_status(e);
    let retry = s.get_details_retry_info().and_then(|r| r.retry_delay);
    (s.code(), retry)
}
