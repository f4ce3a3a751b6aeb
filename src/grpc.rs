//! gRPC plumbing shared by the dispatcher and `region-sim`: reflection in both
//! protocol versions, the listener, and the status details both read.

use std::net::SocketAddr;
use std::time::Duration;

use tonic::service::RoutesBuilder;
use tonic::transport::server::TcpIncoming;
use tonic_types::StatusExt;

use crate::pb;

/// The health service's full name.
pub const HEALTH_SERVICE: &str = "grpc.health.v1.Health";

/// Response metadata a cluster sends back so that a caller can see what
/// reached it (docs/CLUSTERS.md; `dispatcher check-cluster` reads them):
/// the request's `request_id` as received (at most `ECHO_MAX_BYTES`)...
pub const ECHO_REQUEST_ID: &str = "x-request-id";
/// ...and how many `labels` it received.
pub const ECHO_LABELS: &str = "x-labels-received";
/// The longest request id a cluster echoes; a longer one is not echoed.
pub const ECHO_MAX_BYTES: usize = 128;

/// Adds server reflection, v1 and v1alpha (grpcurl 1.8.6 speaks only
/// v1alpha), listing exactly `services` (full names) plus reflection itself;
/// `dispatch.v1` and `grpc.health.v1` can be described.
pub fn add_reflection(
    routes: &mut RoutesBuilder,
    services: &[&str],
) -> Result<(), tonic_reflection::server::Error> {
    let builder = || {
        let mut b = tonic_reflection::server::Builder::configure()
            .include_reflection_service(false)
            .register_encoded_file_descriptor_set(pb::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
            // So grpcurl can decode BadRequest, RetryInfo and QuotaFailure details.
            .register_encoded_file_descriptor_set(tonic_types::pb::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_reflection::pb::v1::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_reflection::pb::v1alpha::FILE_DESCRIPTOR_SET)
            .with_service_name("grpc.reflection.v1.ServerReflection")
            .with_service_name("grpc.reflection.v1alpha.ServerReflection");
        for s in services {
            b = b.with_service_name(*s);
        }
        b
    };
    routes.add_service(builder().build_v1()?);
    routes.add_service(builder().build_v1alpha()?);
    Ok(())
}

/// Binds a listener with TCP_NODELAY (small gRPC frames must not wait on Nagle).
pub fn bind(addr: SocketAddr) -> std::io::Result<(TcpIncoming, SocketAddr)> {
    let incoming = TcpIncoming::bind(addr)?.with_nodelay(Some(true));
    let local = incoming.local_addr()?;
    Ok((incoming, local))
}

/// The retry delay a status carries in `google.rpc.RetryInfo`, if any.
pub fn retry_after(status: &tonic::Status) -> Option<Duration> {
    status.get_details_retry_info().and_then(|r| r.retry_delay)
}

/// `grpc-timeout` from request metadata ("100m", "5S", ...), per the gRPC
/// over HTTP/2 spec: at most 8 digits and a unit.
pub fn grpc_timeout(metadata: &tonic::metadata::MetadataMap) -> Option<Duration> {
    parse_grpc_timeout(metadata.get("grpc-timeout")?.to_str().ok()?)
}

/// `grpc-timeout` from a request's HTTP headers.
pub fn grpc_timeout_header(headers: &http::HeaderMap) -> Option<Duration> {
    const GRPC_TIMEOUT: http::HeaderName = http::HeaderName::from_static("grpc-timeout");
    parse_grpc_timeout(headers.get(GRPC_TIMEOUT)?.to_str().ok()?)
}

fn parse_grpc_timeout(value: &str) -> Option<Duration> {
    if value.len() < 2 || value.len() > 9 {
        return None;
    }
    let (digits, unit) = value.split_at(value.len() - 1);
    let n: u64 = digits.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(n.checked_mul(3600)?),
        "M" => Duration::from_secs(n.checked_mul(60)?),
        "S" => Duration::from_secs(n),
        "m" => Duration::from_millis(n),
        "u" => Duration::from_micros(n),
        "n" => Duration::from_nanos(n),
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use tonic::metadata::MetadataMap;

    fn timeout(v: &str) -> Option<Duration> {
        let mut m = MetadataMap::new();
        m.insert("grpc-timeout", v.parse().unwrap());
        grpc_timeout(&m)
    }

    #[test]
    fn parses_grpc_timeouts() {
        assert_eq!(timeout("100m"), Some(Duration::from_millis(100)));
        assert_eq!(timeout("5S"), Some(Duration::from_secs(5)));
        assert_eq!(timeout("2H"), Some(Duration::from_secs(7200)));
        assert_eq!(timeout("99999999n"), Some(Duration::from_nanos(99_999_999)));
        assert_eq!(timeout("5x"), None);
        assert_eq!(timeout("123456789S"), None, "more than 8 digits");
        assert_eq!(timeout("S"), None);
        assert_eq!(grpc_timeout(&MetadataMap::new()), None);
    }
}
