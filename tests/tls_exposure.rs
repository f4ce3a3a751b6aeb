//! Safe defaults when exposed: the dispatcher refuses to start with the
//! Admin API open (no admin.token) or anonymous callers on a non-loopback
//! address, naming the setting that would allow it; the Admin API can have
//! a listener of its own, and is then served there only.

mod common;

use std::process::Command;

use common::{ConfigDir, admin, client, dispatcher};
use dispatcher::pb;

const REGION: &str = r#"
name = "sim"
[[models]]
name = "gpt-4o"
tokens_per_minute = 1000000
requests_per_minute = 10000
[simulate]
ms_per_1k_tokens = 1
"#;

/// Runs the dispatcher on a non-loopback address and returns its exit code
/// and standard error. The refusal comes before anything binds; the
/// address (TEST-NET-1, documentation only) is on no interface here, so a
/// dispatcher that did not refuse fails to bind instead of serving a
/// network (and the test fails on the exit code, it does not hang).
fn start_exposed(extra: &str) -> (Option<i32>, String) {
    let dir = ConfigDir::new(&format!("[[models]]\nname = \"gpt-4o\"\n{extra}"));
    dir.write_region("sim", REGION);
    let out = Command::new(env!("CARGO_BIN_EXE_dispatcher"))
        .args([
            "--config",
            dir.config().to_str().unwrap(),
            "--listen",
            "192.0.2.1:50051",
        ])
        .output()
        .unwrap();
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stderr).to_string(),
    )
}

#[test]
fn refuses_to_start_with_admin_or_anonymous_use_open_on_a_network() {
    let (code, err) = start_exposed("[auth]\nallow_anonymous = true\n");
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("admin.allow_open_on_network = true"), "{err}");
    assert!(err.contains("auth.allow_anonymous_on_network = true"), "{err}");

    // The Admin API on a loopback listener of its own is private: only the
    // anonymous callers on the network are refused.
    let (code, err) =
        start_exposed("[server]\nadmin_listen = \"127.0.0.1:0\"\n[auth]\nallow_anonymous = true\n");
    assert_eq!(code, Some(2), "{err}");
    assert!(!err.contains("admin.allow_open_on_network"), "{err}");
    assert!(err.contains("auth.allow_anonymous_on_network = true"), "{err}");
}

#[tokio::test]
async fn the_admin_api_can_have_a_listener_of_its_own() {
    let dir = ConfigDir::new(
        "[server]\nadmin_listen = \"127.0.0.1:0\"\n[auth]\nallow_anonymous = true\n[[models]]\nname = \"gpt-4o\"\n",
    );
    dir.write_region("sim", REGION);
    let d = dispatcher(&dir.config());
    let admin_addr = d.listener("admin");

    let regions = admin(admin_addr)
        .await
        .list_regions(pb::ListRegionsRequest {})
        .await
        .expect("Admin on its own listener")
        .into_inner();
    assert_eq!(regions.regions.len(), 1);
    let on_main = admin(d.addr)
        .await
        .list_regions(pb::ListRegionsRequest {})
        .await
        .unwrap_err();
    assert_eq!(on_main.code(), tonic::Code::Unimplemented, "{on_main:?}");
    let dispatch_on_admin = client(admin_addr)
        .await
        .route(pb::DispatchRequest {
            model: "gpt-4o".into(),
            payload: "x".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(dispatch_on_admin.code(), tonic::Code::Unimplemented);
}
