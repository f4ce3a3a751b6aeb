//! One gRPC message each way over hyper's HTTP/2, for the two unary calls
//! on the request path (`Dispatch` served, `Execute` sent) that skip
//! tonic's generic streaming machinery: a message framed with its 5-byte
//! header, a body read back into its one message and trailers, and the
//! `grpc-timeout` a call carries. Statuses and their wording follow tonic's
//! own, so a caller or a cluster cannot tell the paths apart.

use std::time::Duration;

use bytes::{Buf, BufMut, Bytes, BytesMut};
use http::HeaderMap;
use http_body_util::BodyExt;
use tonic::Status;

/// The compressed-flag byte and the length before each message.
pub const HEADER: usize = 5;

/// `message` as it goes in a body: flag 0 (uncompressed), length, bytes.
pub fn frame(message: &impl prost::Message) -> Bytes {
    let len = message.encoded_len();
    let mut data = BytesMut::with_capacity(HEADER + len);
    data.put_u8(0);
    data.put_u32(len as u32);
    message
        .encode(&mut data)
        .expect("the buffer holds the encoded length");
    data.freeze()
}

/// What a unary body carried: its one message (without the header), if
/// any, and its trailers, if any.
#[derive(Debug, Default)]
pub struct Unary {
    pub message: Option<Bytes>,
    pub trailers: Option<HeaderMap>,
}

/// Reads a whole body holding at most one message of at most `max` bytes;
/// the size is judged on the header, before the message is buffered.
pub async fn read<B>(body: &mut B, max: usize) -> Result<Unary, Status>
where
    B: http_body::Body<Data = Bytes> + Unpin,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let mut message = Message::default();
    let mut trailers = None;
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|e| Status::from_error(e.into()))?;
        match frame.into_data() {
            Ok(data) => message.push(data, max)?,
            Err(frame) => trailers = frame.into_trailers().ok(),
        }
    }
    Ok(Unary {
        message: message.finish()?,
        trailers,
    })
}

/// A message as its body's chunks arrive: the header first (often a chunk
/// of its own), then the message, kept as the chunk it came in when it
/// came whole (no copy), joined only when it came in pieces.
#[derive(Default)]
struct Message {
    header: [u8; HEADER],
    header_len: usize,
    /// The message's length, once the header is in.
    len: Option<usize>,
    whole: Option<Bytes>,
    pieces: Option<BytesMut>,
}

impl Message {
    fn push(&mut self, mut data: Bytes, max: usize) -> Result<(), Status> {
        if self.len.is_none() {
            let take = (HEADER - self.header_len).min(data.len());
            self.header[self.header_len..self.header_len + take].copy_from_slice(&data[..take]);
            self.header_len += take;
            data.advance(take);
            if self.header_len < HEADER {
                return Ok(());
            }
            self.len = Some(check_header(&self.header, max)?);
        }
        if data.is_empty() {
            return Ok(());
        }
        match (self.whole.take(), &mut self.pieces) {
            (None, None) => self.whole = Some(data),
            (Some(first), None) => {
                let mut all = BytesMut::with_capacity(first.len() + data.len());
                all.put(first);
                all.put(data);
                self.pieces = Some(all);
            }
            (_, Some(all)) => all.put(data),
        }
        let held = self.whole.as_ref().map_or(0, Bytes::len) + self.pieces.as_ref().map_or(0, BytesMut::len);
        let len = self.len.unwrap_or_default();
        if held > len {
            return Err(Status::internal(format!(
                "protocol error: the body holds more than the message header's {len} bytes: a unary call carries exactly one message"
            )));
        }
        Ok(())
    }

    fn finish(self) -> Result<Option<Bytes>, Status> {
        let Some(len) = self.len else {
            return match self.header_len {
                0 => Ok(None),
                n => Err(Status::internal(format!(
                    "protocol error: the body ended {n} bytes into a message header"
                ))),
            };
        };
        let message = match (self.whole, self.pieces) {
            (_, Some(all)) => all.freeze(),
            (Some(whole), None) => whole,
            (None, None) => Bytes::new(),
        };
        if message.len() != len {
            return Err(Status::internal(format!(
                "protocol error: the body ended {} bytes into a message of {len}",
                message.len()
            )));
        }
        Ok(Some(message))
    }
}

/// The message header's flag and length (tonic's checks and wording).
fn check_header(header: &[u8; HEADER], max: usize) -> Result<usize, Status> {
    match header[0] {
        0 => {}
        1 => {
            return Err(Status::internal(
                "protocol error: received message with compressed-flag but no grpc-encoding was specified",
            ));
        }
        f => {
            return Err(Status::internal(format!(
                "protocol error: received message with invalid compression flag: {f} (valid flags are 0 and 1)"
            )));
        }
    }
    let len = u32::from_be_bytes([header[1], header[2], header[3], header[4]]) as usize;
    if len > max {
        return Err(Status::out_of_range(format!(
            "Error, decoded message length too large: found {len} bytes, the limit is: {max} bytes"
        )));
    }
    Ok(len)
}

/// The status a header map (a response's headers, or its trailers) holds:
/// `Ok(())` for `grpc-status: 0` without building a `Status` (tonic's
/// `from_header_map` copies the whole map), anything else as tonic reads it;
/// `None` when it has no `grpc-status`.
pub fn status_in(headers: &HeaderMap) -> Option<Result<(), Status>> {
    let value = headers.get(Status::GRPC_STATUS)?;
    if value == "0" {
        return Some(Ok(()));
    }
    Some(match Status::from_header_map(headers) {
        Some(status) if status.code() == tonic::Code::Ok => Ok(()),
        Some(status) => Err(status),
        None => Err(Status::unknown("a grpc-status tonic could not read")),
    })
}

/// The status a response ended with when its `grpc-status` is missing, from
/// its HTTP status (gRPC's http-grpc-status-mapping, as tonic infers it);
/// `None` for 200, which then ended without an error.
pub fn status_from_http(http_status: http::StatusCode) -> Option<Status> {
    use tonic::Code;
    let code = match http_status {
        http::StatusCode::OK => return None,
        http::StatusCode::BAD_REQUEST => Code::Internal,
        http::StatusCode::UNAUTHORIZED => Code::Unauthenticated,
        http::StatusCode::FORBIDDEN => Code::PermissionDenied,
        http::StatusCode::NOT_FOUND => Code::Unimplemented,
        http::StatusCode::TOO_MANY_REQUESTS
        | http::StatusCode::BAD_GATEWAY
        | http::StatusCode::SERVICE_UNAVAILABLE
        | http::StatusCode::GATEWAY_TIMEOUT => Code::Unavailable,
        _ => Code::Unknown,
    };
    Some(Status::new(
        code,
        format!(
            "grpc-status header missing, mapped from HTTP status code {}",
            http_status.as_u16()
        ),
    ))
}

/// A `grpc-timeout` value: the most precise unit whose count fits the
/// eight digits the spec allows, as tonic writes it.
pub fn timeout_value(d: Duration) -> http::HeaderValue {
    let nanos = d.as_nanos();
    let (n, unit) = [
        (nanos, 'n'),
        (nanos / 1_000, 'u'),
        (nanos / 1_000_000, 'm'),
        (nanos / 1_000_000_000, 'S'),
        (nanos / 60_000_000_000, 'M'),
        (nanos / 3_600_000_000_000, 'H'),
    ]
    .into_iter()
    .find(|(n, _)| *n < 100_000_000)
    .unwrap_or((99_999_999, 'H'));
    // At most eight digits and the unit, without `format!` (`core::digits`).
    let mut digits = [0; 20];
    let digits = crate::core::digits::decimal(&mut digits, n as u64);
    let mut text = [0; 9];
    text[..digits.len()].copy_from_slice(digits.as_bytes());
    text[digits.len()] = unit as u8;
    let mut value = http::HeaderValue::from_bytes(&text[..=digits.len()]).expect("digits and a letter");
    // Nearly every value is new (the time left, to the microsecond): kept out
    // of the connection's HPACK table, where each would be inserted, then
    // compared with every later one, and evict the values worth keeping.
    value.set_sensitive(true);
    value
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body::Frame;
    use tonic::body::Body;

    fn framed(message: &[u8]) -> Vec<u8> {
        let mut v = vec![0u8];
        v.extend_from_slice(&(message.len() as u32).to_be_bytes());
        v.extend_from_slice(message);
        v
    }

    fn body_of(frames: Vec<Vec<u8>>) -> Body {
        let chunks = frames
            .into_iter()
            .map(|f| Ok::<_, Status>(Frame::data(Bytes::from(f))));
        Body::new(http_body_util::StreamBody::new(tokio_stream::iter(chunks)))
    }

    #[tokio::test]
    async fn a_message_in_one_frame_or_split_across_several_reads_the_same() {
        let whole = framed(b"a message of some length");
        let got = read(&mut body_of(vec![whole.clone()]), 1 << 20).await.unwrap();
        assert_eq!(&got.message.unwrap()[..], b"a message of some length");
        let split = whole.chunks(3).map(<[u8]>::to_vec).collect();
        let got = read(&mut body_of(split), 1 << 20).await.unwrap();
        assert_eq!(&got.message.unwrap()[..], b"a message of some length");
    }

    #[tokio::test]
    async fn bad_bodies_get_the_codes_tonic_gives() {
        let code = |frames: Vec<Vec<u8>>, max| async move {
            read(&mut body_of(frames), max).await.unwrap_err().code()
        };
        assert_eq!(code(vec![framed(&[0; 200])], 100).await, tonic::Code::OutOfRange);
        let mut compressed = framed(b"x");
        compressed[0] = 1;
        assert_eq!(code(vec![compressed], 100).await, tonic::Code::Internal);
        let mut two = framed(b"x");
        two.extend(framed(b"y"));
        assert_eq!(code(vec![two], 100).await, tonic::Code::Internal, "two messages");
        assert_eq!(
            code(vec![framed(b"x")[..4].to_vec()], 100).await,
            tonic::Code::Internal
        );
        let empty = read(&mut body_of(vec![]), 100).await.unwrap();
        assert!(empty.message.is_none() && empty.trailers.is_none());
    }

    #[tokio::test]
    async fn an_oversized_message_is_refused_before_the_rest_of_it_arrives() {
        // Only the header has come: the limit is judged on it alone.
        let header = framed(&[0; 1000])[..HEADER].to_vec();
        let stream = tokio_stream::StreamExt::chain(
            tokio_stream::iter(vec![Ok::<_, Status>(Frame::data(Bytes::from(header)))]),
            tokio_stream::pending(),
        );
        let mut body = Body::new(http_body_util::StreamBody::new(stream));
        let e = read(&mut body, 100).await.unwrap_err();
        assert_eq!(e.code(), tonic::Code::OutOfRange);
    }

    #[tokio::test]
    async fn trailers_come_back_with_the_message() {
        let mut trailers = HeaderMap::new();
        trailers.insert("grpc-status", http::HeaderValue::from_static("0"));
        let frames = vec![
            Ok::<_, Status>(Frame::data(Bytes::from(framed(b"x")))),
            Ok(Frame::trailers(trailers)),
        ];
        let mut body = Body::new(http_body_util::StreamBody::new(tokio_stream::iter(frames)));
        let got = read(&mut body, 100).await.unwrap();
        assert_eq!(&got.message.unwrap()[..], b"x");
        assert_eq!(got.trailers.unwrap()["grpc-status"], "0");
    }

    #[test]
    fn a_framed_message_is_its_header_and_its_encoding() {
        let m = crate::pb::Usage {
            prompt_tokens: 7,
            completion_tokens: 300,
            cached_prompt_tokens: 0,
        };
        let f = frame(&m);
        assert_eq!(f[0], 0);
        assert_eq!(
            u32::from_be_bytes([f[1], f[2], f[3], f[4]]) as usize,
            f.len() - HEADER
        );
        assert_eq!(
            <crate::pb::Usage as prost::Message>::decode(&f[HEADER..]).unwrap(),
            m
        );
    }

    #[test]
    fn timeouts_use_the_most_precise_unit_that_fits_eight_digits() {
        let t = |d| timeout_value(d).to_str().unwrap().to_string();
        assert_eq!(t(Duration::from_millis(1500)), "1500000u");
        assert_eq!(t(Duration::from_micros(250)), "250000n");
        assert_eq!(t(Duration::from_secs(60)), "60000000u");
        assert_eq!(t(Duration::from_secs(600)), "600000m");
        assert_eq!(t(Duration::from_secs(3 * 86_400)), "259200S");
        assert_eq!(t(Duration::from_secs(10 * 365 * 86_400)), "5256000M");
        for d in [
            Duration::from_millis(1),
            Duration::from_secs(7),
            Duration::from_secs(100_000),
        ] {
            let parsed = crate::grpc::grpc_timeout_header(&{
                let mut h = HeaderMap::new();
                h.insert("grpc-timeout", timeout_value(d));
                h
            })
            .unwrap();
            assert!(
                parsed <= d && d - parsed < Duration::from_secs(60),
                "{d:?} -> {parsed:?}"
            );
        }
    }

    #[test]
    fn a_status_is_read_from_its_headers() {
        let map = |pairs: &[(&'static str, &'static str)]| {
            let mut h = HeaderMap::new();
            for (k, v) in pairs {
                h.insert(*k, http::HeaderValue::from_static(v));
            }
            h
        };
        assert!(status_in(&map(&[])).is_none());
        assert!(status_in(&map(&[("grpc-status", "0")])).unwrap().is_ok());
        let e = status_in(&map(&[
            ("grpc-status", "8"),
            ("grpc-message", "out%20of%20quota"),
        ]))
        .unwrap()
        .unwrap_err();
        assert_eq!(e.code(), tonic::Code::ResourceExhausted);
        assert_eq!(e.message(), "out of quota");
    }

    #[test]
    fn a_missing_status_is_inferred_from_http_as_tonic_does() {
        assert!(status_from_http(http::StatusCode::OK).is_none());
        let s = status_from_http(http::StatusCode::SERVICE_UNAVAILABLE).unwrap();
        assert_eq!(s.code(), tonic::Code::Unavailable);
        assert!(s.message().contains("503"));
        assert_eq!(
            status_from_http(http::StatusCode::NOT_FOUND).unwrap().code(),
            tonic::Code::Unimplemented
        );
        assert_eq!(
            status_from_http(http::StatusCode::IM_A_TEAPOT).unwrap().code(),
            tonic::Code::Unknown
        );
    }
}
