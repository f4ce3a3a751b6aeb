//! Active health checks: `grpc.health.v1.Health/Check` against each
//! region's cluster (an OpenAI-compatible region: a GET of its models, with
//! its key) at its configured interval; the core's `HealthTracker`
//! decides when a region turns unhealthy or healthy again. Also "panic
//! mode": when most regions are unhealthy or have their circuit open, it is
//! said loudly (log, health status, metric) instead of quietly piling all
//! traffic onto the last ones.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tonic_health::ServingStatus;
use tonic_health::pb::health_check_response::ServingStatus as Status;
use tonic_health::server::HealthReporter;

use crate::config::{Config, HealthConfig};
use crate::core::HealthTracker;
use crate::dispatch::Engine;
use crate::forward::{Probe, ProbeOutcome};

/// The health service name that reports whether enough regions are up.
pub const REGIONS_SERVICE: &str = "dispatcher.regions";

struct Check {
    endpoint: String,
    config: HealthConfig,
    cancel: CancellationToken,
    task: JoinHandle<()>,
}

pub struct HealthChecks {
    engine: Arc<Engine>,
    checks: HashMap<String, Check>,
    panic_task: Option<(CancellationToken, JoinHandle<()>)>,
}

impl HealthChecks {
    pub fn new(engine: Arc<Engine>) -> Self {
        Self {
            engine,
            checks: HashMap::new(),
            panic_task: None,
        }
    }

    /// Checks exactly the regions of `config` at these endpoints: called at
    /// start-up and after every applied reload, so an added region is
    /// checked, a removed one no longer is, and a region whose endpoint or
    /// `[health]` settings changed gets a fresh checker.
    ///
    /// What a replaced checker starts from: with the same endpoint (only the
    /// settings changed) the verdict so far carries over, since it is about
    /// the same cluster. With a new endpoint the old verdict said nothing
    /// about the new address, so the region is presumed healthy again, as
    /// at start-up and as a newly added region is, and the new checker
    /// (whose first check runs at once) decides from there; the circuit
    /// breaker still guards against a new address that fails requests.
    /// The old checker is stopped and awaited first, so a check of the old
    /// address that was under way cannot overwrite the fresh verdict.
    pub async fn sync(&mut self, config: &Config, endpoints: &[(String, String)]) {
        let wanted: HashMap<&str, (&str, HealthConfig)> = endpoints
            .iter()
            .filter_map(|(region, endpoint)| {
                let r = config.region(region)?;
                Some((region.as_str(), (endpoint.as_str(), r.health)))
            })
            .collect();
        let stale: Vec<String> = self
            .checks
            .iter()
            .filter(|(name, c)| {
                wanted
                    .get(name.as_str())
                    .is_none_or(|(e, h)| *e != c.endpoint || *h != c.config)
            })
            .map(|(name, _)| name.clone())
            .collect();
        // Region → the endpoint its stopped checker was judging.
        let mut replaced: HashMap<String, String> = HashMap::new();
        for name in stale {
            if let Some(c) = self.checks.remove(&name) {
                c.cancel.cancel();
                c.task.abort();
                let _ = c.task.await;
                replaced.insert(name, c.endpoint);
            }
        }
        for (region, (endpoint, health)) in wanted {
            if self.checks.contains_key(region) {
                continue;
            }
            let moved = replaced.get(region).is_some_and(|old| old != endpoint);
            let healthy = if moved {
                self.engine.desk().set_health(region, true);
                metrics::gauge!("dispatcher_region_healthy", "region" => region.to_string()).set(1.0);
                tracing::info!(
                    %region,
                    old = replaced.get(region).map_or("", String::as_str),
                    new = %endpoint,
                    "region endpoint changed: presumed healthy, its health checks now judge the new endpoint"
                );
                true
            } else {
                self.engine.desk().healthy(region).unwrap_or(true)
            };
            let cancel = CancellationToken::new();
            let task = tokio::spawn(check_loop(
                self.engine.clone(),
                region.to_string(),
                endpoint.to_string(),
                health,
                healthy,
                cancel.clone(),
            ));
            self.checks.insert(
                region.to_string(),
                Check {
                    endpoint: endpoint.to_string(),
                    config: health,
                    cancel,
                    task,
                },
            );
        }
    }

    /// Watches for panic mode once a second, reporting it on `reporter`.
    pub fn watch_panic(&mut self, reporter: HealthReporter) {
        if self.panic_task.is_some() {
            return;
        }
        let cancel = CancellationToken::new();
        let task = tokio::spawn(panic_loop(self.engine.clone(), reporter, cancel.clone()));
        self.panic_task = Some((cancel, task));
    }

    pub fn stop(&mut self) {
        for (_, c) in self.checks.drain() {
            c.cancel.cancel();
            c.task.abort();
        }
        if let Some((cancel, task)) = self.panic_task.take() {
            cancel.cancel();
            task.abort();
        }
    }
}

impl Drop for HealthChecks {
    fn drop(&mut self) {
        self.stop();
    }
}

async fn check_loop(
    engine: Arc<Engine>,
    region: String,
    endpoint: String,
    config: HealthConfig,
    healthy: bool,
    cancel: CancellationToken,
) {
    let mut tracker =
        HealthTracker::new(config.healthy_threshold, config.unhealthy_threshold).starting_at(healthy);
    let mut tick = tokio::time::interval(config.interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut told_no_health_service = false;
    let mut last_failure = String::new();
    loop {
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tick.tick() => {}
        }
        // The region's forwarding client (and so its TLS settings):
        // what the check judges is the path work takes.
        let Some(probe) = engine.probe(&region) else {
            continue;
        };
        let verdict = match probe {
            Probe::Grpc(mut client) => {
                let check = client.check(tonic_health::pb::HealthCheckRequest {
                    service: String::new(),
                });
                let answer = tokio::time::timeout(config.timeout, check)
                    .await
                    .map(|r| r.map(|r| r.into_inner().status));
                verdict(answer)
            }
            Probe::OpenAi(client) => match client.probe(config.timeout).await {
                ProbeOutcome::Passed => Verdict::Passed,
                ProbeOutcome::Failed(why) => Verdict::Failed(why),
                ProbeOutcome::Misconfigured => Verdict::Misconfigured,
            },
        };
        let passed = match verdict {
            Verdict::Misconfigured => {
                // Out of service at once, said once (by whoever saw it
                // first: this check or a request); the checks go on, and
                // bring it back once the region is fixed.
                engine.report_misconfigured(&region);
                engine.desk().set_health(&region, false);
                tracker = HealthTracker::new(config.healthy_threshold, config.unhealthy_threshold)
                    .starting_at(false);
                continue;
            }
            Verdict::Passed => true,
            Verdict::NoHealthService => {
                if !told_no_health_service {
                    told_no_health_service = true;
                    tracing::warn!(
                        %region,
                        %endpoint,
                        "the cluster serves no grpc.health.v1 (UNIMPLEMENTED): health checks only see whether it answers; its errors still open the breaker"
                    );
                }
                true
            }
            Verdict::Failed(why) => {
                tracing::debug!(%region, %why, "health check failed");
                last_failure = why;
                false
            }
        };
        if let Some(healthy) = tracker.record(passed) {
            engine.desk().set_health(&region, healthy);
            metrics::gauge!("dispatcher_region_healthy", "region" => region.clone())
                .set(healthy as u8 as f64);
            if healthy {
                tracing::info!(%region, "region healthy again ({} checks passed)", config.healthy_threshold);
            } else {
                // The last failure says why (a certificate the region's CA
                // does not vouch for reads "invalid peer certificate: ...").
                tracing::warn!(%region, %endpoint, last_failure = %crate::excerpt::truncate(&last_failure, 512), "region unhealthy ({} health checks failed in a row)", config.unhealthy_threshold);
            }
        }
    }
}

/// What one health check says about a region.
#[derive(Debug, PartialEq, Eq)]
enum Verdict {
    Passed,
    /// The cluster answers gRPC but implements no health service: it is
    /// up as far as a check can tell. Counting this as a failure would
    /// take a working region out of service for good.
    NoHealthService,
    Failed(String),
    /// An OpenAI-compatible region refused its key or lacks a model.
    Misconfigured,
}

/// Reads a check's answer: a serving status, an error status, or no
/// answer within the timeout.
fn verdict(answer: Result<Result<i32, tonic::Status>, tokio::time::error::Elapsed>) -> Verdict {
    match answer {
        Ok(Ok(status)) if status == Status::Serving as i32 => Verdict::Passed,
        Ok(Ok(status)) => Verdict::Failed(format!(
            "the cluster says {}",
            Status::try_from(status).map_or("an unknown status", |s| s.as_str_name())
        )),
        Ok(Err(e)) if e.code() == tonic::Code::Unimplemented => Verdict::NoHealthService,
        Ok(Err(e)) => Verdict::Failed(format!("{:?}: {}", e.code(), e.message())),
        Err(_) => Verdict::Failed("no answer within the timeout".into()),
    }
}

async fn panic_loop(engine: Arc<Engine>, reporter: HealthReporter, cancel: CancellationToken) {
    let mut in_panic = false;
    reporter
        .set_service_status(REGIONS_SERVICE, ServingStatus::Serving)
        .await;
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    loop {
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tick.tick() => {}
        }
        let now = crate::clock::now();
        let (down, total) = engine.desk().availability(now);
        let panic = total > 0 && down * 2 > total;
        metrics::gauge!("dispatcher_panic_mode").set(panic as u8 as f64);
        if panic != in_panic {
            in_panic = panic;
            if panic {
                tracing::error!(
                    down,
                    total,
                    "PANIC MODE: most regions are unhealthy or have their circuit open; the rest take work only up to their own capacity and the excess is refused"
                );
                reporter
                    .set_service_status(REGIONS_SERVICE, ServingStatus::NotServing)
                    .await;
            } else {
                tracing::warn!(down, total, "panic mode over: most regions are up again");
                reporter
                    .set_service_status(REGIONS_SERVICE, ServingStatus::Serving)
                    .await;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn elapsed() -> tokio::time::error::Elapsed {
        tokio::time::timeout(Duration::ZERO, std::future::pending::<()>())
            .await
            .unwrap_err()
    }

    #[tokio::test]
    async fn reads_check_answers() {
        assert_eq!(verdict(Ok(Ok(Status::Serving as i32))), Verdict::Passed);
        assert_eq!(
            verdict(Ok(Ok(Status::NotServing as i32))),
            Verdict::Failed("the cluster says NOT_SERVING".into())
        );
        assert_eq!(
            verdict(Ok(Err(tonic::Status::unimplemented("no health")))),
            Verdict::NoHealthService
        );
        assert!(matches!(
            verdict(Ok(Err(tonic::Status::unavailable("refused")))),
            Verdict::Failed(why) if why.contains("Unavailable")
        ));
        assert!(matches!(verdict(Err(elapsed().await)), Verdict::Failed(_)));
    }
}
