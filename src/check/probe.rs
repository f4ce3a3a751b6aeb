//! The calls `check-cluster` makes, over the connection forwarding uses
//! (`forward::connect_one`: TCP, or TLS with the given CA and identity).
//! Every request is counted against the budget before it is sent, as the
//! dispatcher would reserve it (prompt + max_output_tokens). The checker
//! never enforces a `grpc-timeout` itself: what a cluster does with one is
//! under test; each call has a wider bound of its own, so a check ends.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use tonic::Status;

use super::CheckArgs;
use super::load::Probe;
use super::usage::Asked;
use crate::forward::Connection;
use crate::pb::agent_cluster_client::AgentClusterClient;

/// The generated client: the check speaks the contract as any client would.
type ClusterClient = AgentClusterClient<Connection>;
use crate::pb;
use tonic_health::pb::health_client::HealthClient;

/// What every request asks for: a long answer, so that work cut short by a
/// cancel or a deadline is work that would otherwise have gone on.
pub const PAYLOAD: &str =
    "dispatcher check-cluster: count from 1 to 1000, one number per line, nothing else.";
/// A model no cluster serves.
pub const NO_SUCH_MODEL: &str = "check-cluster-no-such-model";
/// The labels every request carries.
pub const LABELS: usize = 2;

/// The prompt each request declares: the payload at four bytes a token,
/// as the dispatcher estimates it.
pub fn prompt_tokens() -> u64 {
    PAYLOAD.len().div_ceil(4) as u64
}

/// What the checker may still reserve.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Budget {
    pub limit: u64,
    pub reserved: u64,
    pub requests: u32,
}

impl Budget {
    pub fn left(&self) -> u64 {
        self.limit.saturating_sub(self.reserved)
    }

    /// Takes `tokens` for one request, or says why not.
    pub fn take(&mut self, tokens: u64) -> Result<(), String> {
        if tokens > self.left() {
            return Err(format!(
                "not run: needs {tokens} tokens, {} left of --max-tokens {}",
                self.left(),
                self.limit
            ));
        }
        self.reserved += tokens;
        self.requests += 1;
        Ok(())
    }
}

/// The cluster under check.
pub struct Cluster {
    client: ClusterClient,
    health: HealthClient<Connection>,
    model: String,
    run: String,
    sent: u32,
    pub budget: Budget,
}

/// A request on its way: its id and what it reserved.
#[derive(Debug, Clone)]
pub struct Sent {
    pub id: String,
    pub asked: Asked,
}

/// What a reply's metadata echoed (`x-request-id`, `x-labels-received`).
#[derive(Debug, Clone, Default)]
pub struct Echo {
    pub request_id: Option<String>,
    pub labels: Option<String>,
}

impl Echo {
    fn of(m: &tonic::metadata::MetadataMap) -> Self {
        let get = |k| m.get(k).and_then(|v| v.to_str().ok()).map(str::to_string);
        Self {
            request_id: get(crate::grpc::ECHO_REQUEST_ID),
            labels: get(crate::grpc::ECHO_LABELS),
        }
    }
}

/// How a call ended.
#[derive(Debug)]
pub enum Answer<T> {
    Ok(T),
    Status(Status),
    /// Nothing within the checker's own bound.
    Silent(Duration),
}

impl<T> Answer<T> {
    /// The error as a status (silence as one the checker made up).
    pub fn result(&self) -> Result<&T, Status> {
        match self {
            Answer::Ok(t) => Ok(t),
            Answer::Status(s) => Err(s.clone()),
            Answer::Silent(d) => Err(Status::deadline_exceeded(format!(
                "no answer within {} ms (check-cluster's own bound)",
                d.as_millis()
            ))),
        }
    }
}

/// A unary call's answer and how long it took.
#[derive(Debug)]
pub struct Unary {
    pub sent: Sent,
    pub answer: Answer<(pb::ExecuteReply, Echo)>,
    pub took: Duration,
}

impl Unary {
    pub fn reply(&self) -> Option<&pb::ExecuteReply> {
        match &self.answer {
            Answer::Ok((r, _)) => Some(r),
            _ => None,
        }
    }
}

/// One chunk of a stream, as the checker keeps it.
#[derive(Debug, Clone)]
pub struct Chunk {
    /// Since the call started.
    pub at: Duration,
    pub output: usize,
    pub usage: Option<pb::Usage>,
    pub done: bool,
    pub provider_quota: Option<pb::ProviderQuota>,
    pub load: Option<pb::LoadReport>,
}

/// A request ready to go, with its own client (calls may run at once).
pub struct Prepared {
    pub sent: Sent,
    client: ClusterClient,
    request: tonic::Request<pb::ExecuteRequest>,
    /// The checker's own bound on the call.
    bound: Duration,
}

/// A stream that answered, read chunk by chunk.
pub struct Open {
    pub sent: Sent,
    pub started: Instant,
    pub echo: Echo,
    stream: tonic::Streaming<pb::ExecuteChunk>,
    bound: Duration,
}

/// A stream read to its end.
#[derive(Debug)]
pub struct Streamed {
    pub sent: Sent,
    pub echo: Option<Echo>,
    pub chunks: Vec<Chunk>,
    /// `Ok` once the stream ended cleanly.
    pub end: Answer<()>,
    pub took: Duration,
}

impl Cluster {
    pub fn connect(args: &CheckArgs) -> Result<Self, String> {
        let uri: tonic::transport::Uri = args
            .endpoint
            .parse()
            .map_err(|e| format!("endpoint {}: {e}", crate::excerpt::excerpt(&args.endpoint)))?;
        let tls = match uri.scheme_str() {
            Some("https") => Some(client_tls(args, &uri)?),
            _ if args.ca_file.is_some() || args.cert_file.is_some() => {
                return Err("--ca-file, --cert-file and --key-file are for an https:// endpoint".into());
            }
            _ => None,
        };
        let (client, health) = crate::forward::connect_one(&args.endpoint, tls)
            .map_err(|e| format!("endpoint {}: {e}", crate::excerpt::excerpt(&args.endpoint)))?;
        Ok(Self {
            client,
            health,
            model: args.model.clone(),
            run: format!("{:08x}", rand::random::<u32>()),
            sent: 0,
            budget: Budget {
                limit: args.max_tokens,
                reserved: 0,
                requests: 0,
            },
        })
    }

    pub async fn health(&mut self) -> Result<i32, Status> {
        let check = self.health.check(tonic_health::pb::HealthCheckRequest {
            service: String::new(),
        });
        match tokio::time::timeout(Duration::from_secs(5), check).await {
            Ok(answer) => answer.map(|r| r.into_inner().status),
            Err(_) => Err(Status::deadline_exceeded("no answer within 5 s")),
        }
    }

    /// A request for `max_output_tokens` (on `model`, by default the one
    /// under check), with `grpc-timeout` set to `deadline`, bounded by the
    /// checker at `bound`. Counted against the budget now.
    pub fn prepare(
        &mut self,
        model: Option<&str>,
        max_output: u64,
        deadline: Duration,
        bound: Duration,
    ) -> Result<Prepared, String> {
        let asked = Asked {
            prompt: prompt_tokens(),
            max_output,
        };
        self.budget.take(asked.prompt + asked.max_output)?;
        self.sent += 1;
        let id = format!("check-cluster-{}-{}", self.run, self.sent);
        let labels = HashMap::from([
            ("check-cluster".to_string(), "1".to_string()),
            ("check-run".to_string(), self.run.clone()),
        ]);
        debug_assert_eq!(labels.len(), LABELS);
        let mut request = tonic::Request::new(pb::ExecuteRequest {
            request_id: id.clone(),
            tenant: "check-cluster".into(),
            model: model.unwrap_or(&self.model).to_string(),
            payload: PAYLOAD.as_bytes().to_vec().into(),
            prompt_tokens: asked.prompt,
            max_output_tokens: max_output,
            labels,
        });
        request.set_timeout(deadline);
        Ok(Prepared {
            sent: Sent { id, asked },
            client: self.client.clone(),
            request,
            bound,
        })
    }

    /// An ordinary call (30 s deadline).
    pub async fn execute(&mut self, model: Option<&str>, max_output: u64) -> Result<Unary, String> {
        let limit = Duration::from_secs(30);
        Ok(self
            .prepare(model, max_output, limit, limit + Duration::from_secs(5))?
            .execute()
            .await)
    }

    /// `in_flight` as a one-token call's load report reads it, `at` after
    /// `since`; with the reply's provider quota and load, kept for their
    /// own checks.
    pub async fn probe(&mut self, since: Instant) -> Result<(Probe, Unary), String> {
        let u = self.execute(None, 1).await?;
        let probe = Probe {
            at: since.elapsed(),
            in_flight: u.reply().and_then(|r| r.load.map(|l| l.in_flight)),
        };
        Ok((probe, u))
    }
}

impl Prepared {
    pub async fn execute(mut self) -> Unary {
        let started = crate::clock::now();
        let call = self.client.execute(self.request);
        let answer = match tokio::time::timeout(self.bound, call).await {
            Ok(Ok(r)) => {
                let echo = Echo::of(r.metadata());
                Answer::Ok((r.into_inner(), echo))
            }
            Ok(Err(s)) => Answer::Status(s),
            Err(_) => Answer::Silent(self.bound),
        };
        Unary {
            sent: self.sent,
            answer,
            took: started.elapsed(),
        }
    }

    /// Opens the stream; an error answer comes back with what was sent.
    pub async fn stream(mut self) -> Result<Open, (Sent, Answer<()>)> {
        let started = crate::clock::now();
        let call = self.client.execute_stream(self.request);
        match tokio::time::timeout(self.bound, call).await {
            Ok(Ok(r)) => Ok(Open {
                sent: self.sent,
                started,
                echo: Echo::of(r.metadata()),
                stream: r.into_inner(),
                bound: self.bound,
            }),
            Ok(Err(s)) => Err((self.sent, Answer::Status(s))),
            Err(_) => Err((self.sent, Answer::Silent(self.bound))),
        }
    }
}

impl Open {
    /// The next chunk, `None` at the clean end of the stream.
    pub async fn next(&mut self) -> Answer<Option<Chunk>> {
        let left = self.bound.saturating_sub(self.started.elapsed());
        match tokio::time::timeout(left, self.stream.message()).await {
            Ok(Ok(Some(c))) => Answer::Ok(Some(Chunk {
                at: self.started.elapsed(),
                output: c.output.len(),
                usage: c.usage,
                done: c.done,
                provider_quota: c.provider_quota,
                load: c.load,
            })),
            Ok(Ok(None)) => Answer::Ok(None),
            Ok(Err(s)) => Answer::Status(s),
            Err(_) => Answer::Silent(self.bound),
        }
    }

    /// Whether the stream has already ended by itself: its done chunk (or
    /// its end) has arrived. Reads what has arrived, waits for nothing.
    pub async fn ended(&mut self) -> bool {
        loop {
            match tokio::time::timeout(Duration::ZERO, self.stream.message()).await {
                Err(_) => return false,
                Ok(Ok(Some(c))) if !c.done => continue,
                Ok(_) => return true,
            }
        }
    }

    /// Reads the rest of the stream (after `read`, chunks already read).
    pub async fn finish(mut self, mut read: Vec<Chunk>) -> Streamed {
        let end = loop {
            match self.next().await {
                Answer::Ok(Some(c)) => read.push(c),
                Answer::Ok(None) => break Answer::Ok(()),
                Answer::Status(s) => break Answer::Status(s),
                Answer::Silent(d) => break Answer::Silent(d),
            }
        };
        Streamed {
            sent: self.sent,
            echo: Some(self.echo),
            chunks: read,
            end,
            took: self.started.elapsed(),
        }
    }
}

impl Streamed {
    /// A stream refused before its first chunk.
    pub fn refused(sent: Sent, end: Answer<()>) -> Self {
        Self {
            sent,
            echo: None,
            chunks: Vec::new(),
            end,
            took: Duration::ZERO,
        }
    }

    pub fn done(&self) -> Option<&Chunk> {
        self.chunks.iter().rev().find(|c| c.done)
    }
}

/// TLS towards the cluster: its CA (or the system's roots), an optional
/// client identity, the name its certificate must carry.
fn client_tls(
    args: &CheckArgs,
    uri: &tonic::transport::Uri,
) -> Result<crate::tls::client::ClientTls, String> {
    let identity = match (&args.cert_file, &args.key_file) {
        (Some(c), Some(k)) => Some((c.as_path(), k.as_path())),
        (None, None) => None,
        _ => return Err("--cert-file and --key-file go together".into()),
    };
    let config = crate::tls::client::client_config(args.ca_file.as_deref(), identity)?;
    let name = args.server_name.clone().unwrap_or_else(|| {
        uri.host()
            .unwrap_or_default()
            .trim_matches(['[', ']'])
            .to_string()
    });
    let server_name = rustls::pki_types::ServerName::try_from(name.clone()).map_err(|_| {
        format!(
            "{} is not a DNS name or IP address",
            crate::excerpt::excerpt(&name)
        )
    })?;
    Ok(crate::tls::client::ClientTls { config, server_name })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_budget_refuses_what_does_not_fit() {
        let mut b = Budget {
            limit: 100,
            reserved: 0,
            requests: 0,
        };
        b.take(60).unwrap();
        let e = b.take(41).unwrap_err();
        assert!(e.contains("needs 41 tokens, 40 left of --max-tokens 100"), "{e}");
        b.take(40).unwrap();
        assert_eq!((b.left(), b.requests), (0, 2));
    }

    #[test]
    fn the_prompt_is_estimated_as_the_dispatcher_does() {
        assert_eq!(prompt_tokens(), (PAYLOAD.len() as u64).div_ceil(4));
    }
}
