//! Wiring shared by the binary and the tests: the simulated regions a config
//! asks for, and the endpoints the engine forwards to.

use std::collections::HashMap;
use std::net::SocketAddr;

use crate::config::Config;
use crate::sim::{self, SimHandle, SimSpec};

/// The in-process clusters of regions that have `[simulate]` and no endpoint.
#[derive(Debug, Default)]
pub struct SimulatedRegions {
    running: HashMap<String, (SimSpec, SimHandle)>,
}

impl SimulatedRegions {
    pub fn new() -> Self {
        Self::default()
    }

    /// Starts a simulated cluster for each region that needs one and stops
    /// the ones no longer needed. A region whose simulation settings changed
    /// keeps running with the old ones: its provider state is what an
    /// operator would expect to survive a quota edit.
    pub async fn sync(&mut self, config: &Config) -> std::io::Result<()> {
        let wanted: HashMap<&str, SimSpec> = config
            .regions
            .iter()
            .filter(|r| r.endpoint.is_none())
            .map(|r| (r.spec.name.as_str(), SimSpec::from_region(r)))
            .collect();
        let gone: Vec<String> = self
            .running
            .keys()
            .filter(|name| !wanted.contains_key(name.as_str()))
            .cloned()
            .collect();
        for name in gone {
            if let Some((_, handle)) = self.running.remove(&name) {
                handle.stop().await;
            }
        }
        for (name, spec) in wanted {
            if !self.running.contains_key(name) {
                let loopback: SocketAddr = ([127, 0, 0, 1], 0).into();
                let handle = sim::spawn(spec.clone(), loopback).await?;
                tracing::info!(region = name, addr = %handle.addr, "started simulated region");
                self.running.insert(name.to_string(), (spec, handle));
            }
        }
        Ok(())
    }

    /// Every region's endpoint: configured, or its simulation's address.
    pub fn endpoints(&self, config: &Config) -> Vec<(String, String)> {
        config
            .regions
            .iter()
            .filter_map(|r| {
                let endpoint = match &r.endpoint {
                    Some(e) => e.clone(),
                    None => self.running.get(&r.spec.name)?.1.endpoint(),
                };
                Some((r.spec.name.clone(), endpoint))
            })
            .collect()
    }

    pub async fn stop(self) {
        for (_, (_, handle)) in self.running {
            handle.stop().await;
        }
    }
}
