//! `--mode openai`: `POST /v1/chat/completions` to the dispatcher's
//! OpenAI-compatible front door, as an OpenAI SDK sends it: HTTP/1.1 with
//! keep-alive, one request at a time per connection (as HTTP/1.1 allows),
//! connections pooled and opened as the load needs them.

use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http1::SendRequest;
use parking_lot::Mutex;
use tonic::{Code, Status};

pub struct OpenAiClient {
    /// host:port.
    authority: String,
    idle: Mutex<Vec<SendRequest<Full<Bytes>>>>,
}

/// The body of a chat call whose prompt the front door estimates at about
/// `prompt` tokens (3 + 4 per message + a token per 4 characters).
pub fn body(model: &str, prompt: u64, max_output: u64) -> Bytes {
    let chars = (prompt.saturating_sub(8) * 4) as usize;
    Bytes::from(format!(
        r#"{{"model":"{model}","messages":[{{"role":"user","content":"{}"}}],"max_tokens":{max_output}}}"#,
        "x".repeat(chars)
    ))
}

fn code(status: http::StatusCode) -> Code {
    match status.as_u16() {
        400 | 413 => Code::InvalidArgument,
        401 => Code::Unauthenticated,
        403 => Code::PermissionDenied,
        404 => Code::NotFound,
        429 => Code::ResourceExhausted,
        503 => Code::Unavailable,
        504 => Code::DeadlineExceeded,
        _ => Code::Unknown,
    }
}

impl OpenAiClient {
    pub fn new(target: &str) -> anyhow::Result<Self> {
        let uri: http::Uri = target.parse()?;
        let authority = uri
            .authority()
            .ok_or_else(|| anyhow::anyhow!("--target {target} has no host:port"))?
            .to_string();
        anyhow::ensure!(
            uri.scheme_str() == Some("http"),
            "--mode openai speaks plain http:// only"
        );
        Ok(Self {
            authority,
            idle: Mutex::new(Vec::new()),
        })
    }

    async fn connection(&self) -> Result<SendRequest<Full<Bytes>>, Status> {
        loop {
            let Some(mut c) = self.idle.lock().pop() else {
                break;
            };
            if c.ready().await.is_ok() {
                return Ok(c);
            }
        }
        let tcp = tokio::net::TcpStream::connect(&self.authority)
            .await
            .map_err(|e| Status::unavailable(e.to_string()))?;
        let _ = tcp.set_nodelay(true);
        let (sender, conn) = hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tcp))
            .await
            .map_err(|e| Status::unavailable(e.to_string()))?;
        tokio::spawn(conn);
        Ok(sender)
    }

    /// One call: the region that served it and its tokens, or the status
    /// its HTTP answer stands for.
    pub async fn chat(
        &self,
        body: Bytes,
        authorization: Option<&str>,
        timeout: Duration,
    ) -> Result<(String, u64), Status> {
        let call = async {
            let mut c = self.connection().await?;
            let mut r = http::Request::post("/v1/chat/completions")
                .header("host", &self.authority)
                .header("content-type", "application/json")
                .header("x-stainless-timeout", timeout.as_secs_f64().to_string());
            if let Some(a) = authorization {
                r = r.header("authorization", a);
            }
            let r = r
                .body(Full::new(body))
                .map_err(|e| Status::internal(e.to_string()))?;
            let response = c
                .send_request(r)
                .await
                .map_err(|e| Status::unavailable(e.to_string()))?;
            let (parts, body) = response.into_parts();
            let body = body
                .collect()
                .await
                .map_err(|e| Status::unavailable(e.to_string()))?
                .to_bytes();
            self.idle.lock().push(c);
            if !parts.status.is_success() {
                return Err(Status::new(code(parts.status), format!("HTTP {}", parts.status)));
            }
            let region = parts
                .headers
                .get("x-dispatcher-region")
                .and_then(|v| v.to_str().ok())
                .unwrap_or_default()
                .to_string();
            let v: serde_json::Value =
                serde_json::from_slice(&body).map_err(|e| Status::internal(e.to_string()))?;
            Ok((region, v["usage"]["total_tokens"].as_u64().unwrap_or(0)))
        };
        tokio::time::timeout(timeout, call)
            .await
            .unwrap_or_else(|_| Err(Status::deadline_exceeded("timed out")))
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_body_asks_for_about_the_prompt_drawn() {
        let b = super::body("gpt-4o", 50, 50);
        let parsed = dispatcher::openai::chat::parse(&b).unwrap();
        assert!(
            (48..=52).contains(&parsed.prompt_tokens),
            "{}",
            parsed.prompt_tokens
        );
        assert_eq!(parsed.max_output_tokens, Some(50));
    }
}
