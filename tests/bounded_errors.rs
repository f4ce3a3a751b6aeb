//! Errors never echo unbounded caller input: a huge field comes back as a
//! short excerpt, lengths are checked before anything is compared, and an
//! error's message and details stay small enough for any client's metadata
//! limit (a default gRPC C-core client refuses trailers above 16 KiB, as
//! RESOURCE_EXHAUSTED, which reads as "retry").

mod common;

use common::{ConfigDir, admin, client, dispatcher};
use dispatcher::pb;
use tonic::Code;
use tonic_types::StatusExt;

const DISPATCHER_TOML: &str = r#"
[auth]
allow_anonymous = true
[[models]]
name = "gpt-4o"
max_request_tokens = 32000
"#;

const REGION: &str = r#"
name = "local"
[[models]]
name = "gpt-4o"
tokens_per_minute = 100000
requests_per_minute = 1000
[simulate]
ms_per_1k_tokens = 1
"#;

/// What an error puts on the wire, in bytes: message and encoded details.
fn size(status: &tonic::Status) -> usize {
    status.message().len() + status.details().len()
}

/// The longest run of `c` anywhere in the status: how much of a field made
/// of `c` was echoed.
fn longest_run(status: &tonic::Status, c: u8) -> usize {
    let mut all = status.message().as_bytes().to_vec();
    all.extend_from_slice(status.details());
    let (mut best, mut run) = (0, 0);
    for b in all {
        run = if b == c { run + 1 } else { 0 };
        best = best.max(run);
    }
    best
}

fn check_small(what: &str, status: &tonic::Status, filler: u8) {
    println!(
        "{what}: {:?}, {} bytes of message + details: {}",
        status.code(),
        size(status),
        status.message()
    );
    assert!(size(status) <= 4096, "{what}: {} bytes", size(status));
    assert!(
        longest_run(status, filler) <= 64,
        "{what}: {} bytes of the caller's input echoed",
        longest_run(status, filler)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn errors_quote_at_most_a_short_excerpt_of_what_was_sent() {
    let cfg = ConfigDir::new(DISPATCHER_TOML);
    cfg.write_region("local", REGION);
    let d = dispatcher(&cfg.config());
    let mut grpc = client(d.addr).await;
    let valid = || pb::DispatchRequest {
        model: "gpt-4o".into(),
        payload: "hello".into(),
        max_output_tokens: 10,
        ..Default::default()
    };

    // A 1 MB tenant: its length is the problem, not whose it is.
    let mut r = valid();
    r.tenant = "t".repeat(1_000_000);
    for route in [false, true] {
        let status = if route {
            grpc.route(r.clone()).await.unwrap_err()
        } else {
            grpc.dispatch(r.clone()).await.unwrap_err()
        };
        check_small("1 MB tenant", &status, b't');
        assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
        let bad = status.get_details_bad_request().expect("BadRequest details");
        assert!(
            bad.field_violations.iter().any(|v| v.field == "tenant"),
            "{bad:?}"
        );
    }

    // A tenant of valid length that is not the caller's: refused, quoted short.
    let mut r = valid();
    r.tenant = "u".repeat(120);
    let status = grpc.dispatch(r).await.unwrap_err();
    check_small("someone else's tenant", &status, b'u');
    assert_eq!(status.code(), Code::PermissionDenied, "{status:?}");

    // Thousands of long labels: one clear INVALID_ARGUMENT, not 640 KB of
    // trailers a client would refuse.
    let mut r = valid();
    for i in 0..3000 {
        r.labels.insert(format!("{i:04}{}", "k".repeat(300)), "v".into());
    }
    let status = grpc.dispatch(r).await.unwrap_err();
    check_small("3000 long labels", &status, b'k');
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    let bad = status.get_details_bad_request().expect("BadRequest details");
    assert!(
        bad.field_violations.iter().any(|v| v.field == "labels"),
        "{bad:?}"
    );
    assert!(
        bad.field_violations.len() <= 16,
        "{} violations",
        bad.field_violations.len()
    );
    assert!(
        status.message().contains("3000"),
        "still says how many: {}",
        status.message()
    );

    // The Admin API: a 1 MB region name.
    let mut a = admin(d.addr).await;
    let long = "r".repeat(1_000_000);
    let status = a
        .get_region(pb::GetRegionRequest { region: long.clone() })
        .await
        .unwrap_err();
    check_small("GetRegion with a 1 MB name", &status, b'r');
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    let status = a
        .drain_region(pb::RegionRequest { region: long.clone() })
        .await
        .unwrap_err();
    check_small("DrainRegion with a 1 MB name", &status, b'r');
    // An unknown name of a plausible length is NOT_FOUND, quoted short.
    let status = a
        .get_region(pb::GetRegionRequest {
            region: "r".repeat(60),
        })
        .await
        .unwrap_err();
    check_small("GetRegion, unknown", &status, b'r');
    assert_eq!(status.code(), Code::NotFound, "{status:?}");

    assert!(grpc.dispatch(valid()).await.is_ok(), "still serving");
}
