//! `Dispatch` is served by its own unary path (`server/unary_dispatch.rs`),
//! not tonic's: on the wire, with a raw HTTP/2 client, it answers as tonic
//! did. A message split across DATA frames anywhere (its header alone
//! included) is one message; a compressed message, a body with two
//! messages or none, or one that does not decode is INTERNAL; a
//! `grpc-encoding` is UNIMPLEMENTED; a message over the limit is
//! OUT_OF_RANGE as soon as its header says so, before the rest is sent.
//!
//! One deliberate difference: tonic's unary path takes the first of two
//! messages and drains the rest without a word (this test fails there on
//! the two-message case alone); a unary call carries exactly one message,
//! so a second is refused INTERNAL, naming the protocol error.

mod common;

use std::time::Duration;

use bytes::{Bytes, BytesMut};
use common::attack::{DISPATCH, answer, connect_from, grpc_request, h2, headers_only, loopback};
use common::{ConfigDir, dispatcher};
use dispatcher::pb;
use prost::Message;

const REGION: &str = r#"
name = "local"
[[models]]
name = "gpt-4o"
tokens_per_minute = 100000000
requests_per_minute = 1000000
[simulate]
ms_per_1k_tokens = 1
"#;

const CONFIG: &str = "[[models]]\nname = \"gpt-4o\"\n[auth]\nallow_anonymous = true\n";

fn framed(flag: u8, message: &[u8]) -> Vec<u8> {
    let mut out = vec![flag];
    out.extend_from_slice(&(message.len() as u32).to_be_bytes());
    out.extend_from_slice(message);
    out
}

fn work() -> Vec<u8> {
    pb::DispatchRequest {
        model: "gpt-4o".into(),
        payload: "hello there".into(),
        max_output_tokens: 10,
        request_id: "wire-1".into(),
        ..Default::default()
    }
    .encode_to_vec()
}

/// Sends `chunks` as DATA frames (the last ends the stream) with `extra`
/// headers; returns the grpc-status, its message and the body's bytes.
async fn send(
    send: &mut h2::client::SendRequest<Bytes>,
    extra: &[(&str, &str)],
    chunks: Vec<Vec<u8>>,
) -> (Option<String>, String, Bytes) {
    let (response, mut body) = headers_only(send, grpc_request(DISPATCH, Some("application/grpc"), extra))
        .await
        .unwrap();
    let n = chunks.len();
    for (i, c) in chunks.into_iter().enumerate() {
        body.send_data(c.into(), i + 1 == n).unwrap();
    }
    if n == 0 {
        body.send_data(Bytes::new(), true).unwrap();
    }
    let response = tokio::time::timeout(Duration::from_secs(10), response)
        .await
        .expect("answered")
        .unwrap();
    let mut trailers = response.headers().clone();
    let mut data = BytesMut::new();
    if !trailers.contains_key("grpc-status") {
        let mut b = response.into_body();
        while let Some(d) = b.data().await {
            let d = d.unwrap();
            let _ = b.flow_control().release_capacity(d.len());
            data.extend_from_slice(&d);
        }
        trailers = b.trailers().await.unwrap().unwrap_or_default();
    }
    let get = |k: &str| trailers.get(k).map(|v| v.to_str().unwrap().to_string());
    (
        get("grpc-status"),
        get("grpc-message").unwrap_or_default(),
        data.freeze(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dispatch_answers_on_the_wire_as_grpc_says() {
    let cfg = ConfigDir::new(CONFIG);
    cfg.write_region("local", REGION);
    let d = dispatcher(&cfg.config());
    let tcp = connect_from(loopback(1), d.addr).await.unwrap();
    let (mut h2send, _connection) = h2(tcp).await.unwrap();

    // The header alone, then the message in three pieces: one message.
    let whole = framed(0, &work());
    let pieces = vec![
        whole[..5].to_vec(),
        whole[5..9].to_vec(),
        whole[9..12].to_vec(),
        whole[12..].to_vec(),
    ];
    let (status, message, data) = send(&mut h2send, &[], pieces).await;
    assert_eq!(status.as_deref(), Some("0"), "{message}");
    assert_eq!(data[0], 0, "an uncompressed reply");
    let len = u32::from_be_bytes([data[1], data[2], data[3], data[4]]) as usize;
    assert_eq!(len, data.len() - 5);
    let reply = pb::DispatchReply::decode(&data[5..]).unwrap();
    assert_eq!(reply.request_id, "wire-1");
    assert_eq!(reply.region, "local");
    assert!(!reply.output.is_empty());

    // The same in one frame.
    let (status, message, _) = send(&mut h2send, &[], vec![framed(0, &work())]).await;
    assert_eq!(status.as_deref(), Some("0"), "{message}");

    // Compressed, with no grpc-encoding to say how: INTERNAL.
    let (status, message, _) = send(&mut h2send, &[], vec![framed(1, &work())]).await;
    assert_eq!(status.as_deref(), Some("13"), "{message}");
    assert!(message.contains("compressed"), "{message}");

    // A grpc-encoding the dispatcher does not speak: UNIMPLEMENTED.
    let (status, message, _) = send(
        &mut h2send,
        &[("grpc-encoding", "gzip")],
        vec![framed(0, &work())],
    )
    .await;
    assert_eq!(status.as_deref(), Some("12"), "{message}");

    // Two messages, or none: INTERNAL.
    let mut two = framed(0, &work());
    two.extend(framed(0, &work()));
    let (status, message, _) = send(&mut h2send, &[], vec![two]).await;
    assert_eq!(status.as_deref(), Some("13"), "{message}");
    let (status, message, _) = send(&mut h2send, &[], vec![]).await;
    assert_eq!(status.as_deref(), Some("13"), "{message}");
    assert!(message.contains("Missing"), "{message}");

    // Not protobuf: INTERNAL.
    let (status, message, _) = send(&mut h2send, &[], vec![framed(0, &[0xff; 7])]).await;
    assert_eq!(status.as_deref(), Some("13"), "{message}");

    // Over the limit (2 x 1 MiB + 64 KiB by default): refused on its
    // header, the rest never sent.
    let (response, mut body) =
        headers_only(&mut h2send, grpc_request(DISPATCH, Some("application/grpc"), &[]))
            .await
            .unwrap();
    let mut header = vec![0u8];
    header.extend_from_slice(&(10u32 << 20).to_be_bytes());
    body.send_data(header.into(), false).unwrap();
    let answered = tokio::time::timeout(Duration::from_secs(5), answer(response))
        .await
        .expect("refused before the message arrived")
        .unwrap();
    assert_eq!(answered.grpc_status.as_deref(), Some("11"), "{answered:?}");
    assert!(answered.message.contains("too%20large"), "{answered:?}");
}
