//! OpenIAP over WebSocket (`GET /ws/v2` on the HTTP port): the same
//! envelopes and connection actor as gRPC, framed as OpenIAP's clients
//! frame them: a 4-byte little-endian length, then that many bytes of
//! protobuf `Envelope`.
//!
//! Incoming binary messages are one byte stream (the Python client sends
//! the length and the envelope as two messages, the Rust client as one);
//! outgoing envelopes are two messages, length then bytes, which both
//! read. Invariants: a length over the transport cap, bytes that do not
//! decode, or a text message close the socket with a policy close frame
//! (1008; shutdown sends 1001, going away) and a logged reason (an envelope's id is unknown, so no reply can
//! carry it); buffered bytes never exceed one envelope plus one message;
//! the channels between reader, actor and writer are bounded.

use axum::body::Bytes;
use axum::extract::State;
use axum::extract::ws::{CloseFrame, Message, WebSocket, WebSocketUpgrade, close_code};
use axum::response::Response;
use futures_util::{SinkExt, StreamExt};
use prost::Message as _;
use tokio::sync::mpsc;
use tonic::Status;

use ocmesh_proto::openiap::Envelope;

use super::{FlowServer, connection};
use crate::ApiState;

/// `GET /ws/v2`: upgrades to an OpenIAP WebSocket connection.
pub async fn websocket(State(s): State<ApiState>, upgrade: WebSocketUpgrade) -> Response {
    let flow = s.openiap.clone();
    let cap = frame_cap(&flow);
    upgrade
        .max_message_size(cap + 4)
        .max_frame_size(cap + 4)
        .on_upgrade(move |socket| serve(flow, socket))
}

fn frame_cap(flow: &FlowServer) -> usize {
    flow.limits.hard_max_message_bytes.max(flow.limits.max_message_bytes)
}

/// Splits a byte stream into length-prefixed envelopes, one at a time.
///
/// A single message may pack millions of tiny envelopes (an empty one is
/// four zero bytes): they are decoded one by one as the connection takes
/// them, never all at once (tens of bytes of `Envelope` per byte of input),
/// and the consumed prefix is dropped once, not after every envelope.
#[derive(Debug)]
pub(crate) struct Deframer {
    buf: Vec<u8>,
    /// Bytes of `buf` already decoded.
    start: usize,
    cap: usize,
}

impl Deframer {
    pub(crate) fn new(cap: usize) -> Self {
        Deframer {
            buf: Vec::new(),
            start: 0,
            cap,
        }
    }

    /// Adds bytes from the socket; take the envelopes with `next`.
    pub(crate) fn push(&mut self, bytes: &[u8]) {
        if self.start > 0 {
            self.buf.drain(..self.start);
            self.start = 0;
        }
        self.buf.extend_from_slice(bytes);
    }

    /// The next complete envelope, `None` when more bytes are needed. An
    /// `Err` (a length over the cap, bytes that do not decode) ends the stream.
    pub(crate) fn next(&mut self) -> Result<Option<Envelope>, Status> {
        let rest = &self.buf[self.start..];
        let Some(len) = rest.first_chunk::<4>() else {
            return Ok(None);
        };
        let n = u32::from_le_bytes(*len) as usize;
        if n > self.cap {
            return Err(Status::out_of_range(format!(
                "envelope of {n} bytes is over the limit of {} bytes",
                self.cap
            )));
        }
        let Some(body) = rest.get(4..4 + n) else {
            return Ok(None);
        };
        let env =
            Envelope::decode(body).map_err(|e| Status::invalid_argument(format!("envelope does not decode: {e}")))?;
        self.start += 4 + n;
        Ok(Some(env))
    }
}

/// At most 123 bytes (the close frame's room), cut at a character boundary.
fn close_reason(message: &str) -> String {
    let mut end = message.len().min(123);
    while !message.is_char_boundary(end) {
        end -= 1;
    }
    message[..end].to_owned()
}

async fn serve(flow: FlowServer, mut socket: WebSocket) {
    let limits = flow.limits;
    let cap = frame_cap(&flow);
    let slot = match flow.admit() {
        Ok(slot) => slot,
        Err(status) => {
            tracing::warn!(reason = %status.message(), "openiap websocket refused");
            let frame = CloseFrame {
                code: close_code::AGAIN,
                reason: close_reason(status.message()).into(),
            };
            let _ = socket.send(Message::Close(Some(frame))).await;
            return;
        }
    };
    let (mut sink, mut stream) = socket.split();
    let (in_tx, in_rx) = mpsc::channel::<Result<Envelope, Status>>(limits.max_in_flight.max(1));
    let (out_tx, mut out_rx) = mpsc::channel::<Result<Envelope, Status>>(limits.outbound_queue.max(1));

    tokio::spawn(async move {
        let mut deframer = Deframer::new(cap);
        while let Some(msg) = stream.next().await {
            let bytes = match msg {
                Ok(Message::Binary(b)) => b,
                Ok(Message::Close(_)) => break,
                Ok(Message::Ping(_) | Message::Pong(_)) => continue,
                Ok(Message::Text(_)) => {
                    let e = Status::invalid_argument("text messages are not OpenIAP frames; send binary");
                    let _ = in_tx.send(Err(e)).await;
                    break;
                }
                Err(e) => {
                    let _ = in_tx.send(Err(Status::unavailable(format!("websocket: {e}")))).await;
                    break;
                }
            };
            deframer.push(&bytes);
            loop {
                match deframer.next() {
                    Ok(Some(env)) => {
                        if in_tx.send(Ok(env)).await.is_err() {
                            return;
                        }
                    }
                    Ok(None) => break,
                    Err(e) => {
                        let _ = in_tx.send(Err(e)).await;
                        return;
                    }
                }
            }
        }
    });

    tokio::spawn(async move {
        while let Some(item) = out_rx.recv().await {
            match item {
                Ok(env) => {
                    let bytes = env.encode_to_vec();
                    let len = (bytes.len() as u32).to_le_bytes();
                    if sink.send(Message::Binary(Bytes::copy_from_slice(&len))).await.is_err()
                        || sink.send(Message::Binary(Bytes::from(bytes))).await.is_err()
                    {
                        break;
                    }
                }
                Err(status) => {
                    let code = match status.code() {
                        // Shutdown: the client should reconnect.
                        tonic::Code::Unavailable => close_code::AWAY,
                        _ => close_code::POLICY,
                    };
                    let frame = CloseFrame {
                        code,
                        reason: close_reason(status.message()).into(),
                    };
                    let _ = sink.send(Message::Close(Some(frame))).await;
                    break;
                }
            }
        }
        let _ = sink.close().await;
    });

    let inbound = Box::pin(futures_util::stream::unfold(in_rx, |mut rx| async move {
        rx.recv().await.map(|e| (e, rx))
    }));
    connection(flow, inbound, out_tx, "websocket", "websocket".into(), slot).await;
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// Pushes `bytes` and takes every envelope they complete.
    fn feed(d: &mut Deframer, bytes: &[u8]) -> Result<Vec<Envelope>, Status> {
        d.push(bytes);
        let mut out = Vec::new();
        while let Some(env) = d.next()? {
            out.push(env);
        }
        Ok(out)
    }

    fn framed(env: &Envelope) -> Vec<u8> {
        let body = env.encode_to_vec();
        let mut out = (body.len() as u32).to_le_bytes().to_vec();
        out.extend(body);
        out
    }

    #[test]
    fn frames_split_or_joined_anyhow_come_out_whole() {
        let a = Envelope {
            command: "ping".into(),
            id: "1".into(),
            ..Default::default()
        };
        let b = Envelope {
            command: "signin".into(),
            id: "2".into(),
            ..Default::default()
        };
        let mut bytes = framed(&a);
        bytes.extend(framed(&b));
        // Every split point, in two pushes.
        for cut in 0..=bytes.len() {
            let mut d = Deframer::new(1024);
            let mut got = feed(&mut d, &bytes[..cut]).expect("first part");
            got.extend(feed(&mut d, &bytes[cut..]).expect("second part"));
            assert_eq!(got, vec![a.clone(), b.clone()], "cut at {cut}");
        }
    }

    #[test]
    fn oversized_lengths_and_garbage_end_the_stream() {
        let mut d = Deframer::new(16);
        let e = feed(&mut d, &100u32.to_le_bytes()).expect_err("over the cap");
        assert_eq!(e.code(), tonic::Code::OutOfRange);
        let mut d = Deframer::new(16);
        let mut bytes = 3u32.to_le_bytes().to_vec();
        bytes.extend([0xff, 0xff, 0xff]);
        let e = feed(&mut d, &bytes).expect_err("garbage");
        assert_eq!(e.code(), tonic::Code::InvalidArgument);
    }

    #[test]
    fn a_message_packed_with_empty_envelopes_is_taken_one_at_a_time() {
        // 4 MiB of empty envelopes: a million of them in one message.
        let mut d = Deframer::new(16 * 1024 * 1024);
        d.push(&vec![0u8; 4 * 1024 * 1024]);
        let started = std::time::Instant::now();
        let mut n = 0;
        while let Some(env) = d.next().expect("empty envelopes decode") {
            assert_eq!(env, Envelope::default());
            n += 1;
        }
        assert_eq!(n, 1024 * 1024);
        // Linear: the old drain after every envelope took hours here.
        assert!(started.elapsed() < std::time::Duration::from_secs(60));
        // What is left is the unread tail only.
        d.push(&[5, 0]);
        assert_eq!(d.buf.len() - d.start, 2);
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

        /// Any bytes, cut anywhere: envelopes come out in order, or the
        /// stream ends with an error; the buffer never holds more than one
        /// envelope and one push.
        #[test]
        fn any_bytes_deframe_or_fail_cleanly(
            envs in proptest::collection::vec(("[a-z]{0,8}", "[0-9]{0,4}", proptest::collection::vec(any::<u8>(), 0..40)), 0..6),
            noise in proptest::collection::vec(any::<u8>(), 0..64),
            cuts in proptest::collection::vec(0usize..400, 0..6),
            cap in prop_oneof![Just(16usize), Just(1024usize)],
        ) {
            let sent: Vec<Envelope> = envs
                .into_iter()
                .map(|(command, id, jwt)| Envelope {
                    command,
                    id,
                    jwt: String::from_utf8_lossy(&jwt).into_owned(),
                    ..Default::default()
                })
                .collect();
            let mut bytes = Vec::new();
            for e in &sent {
                bytes.extend(framed(e));
            }
            let clean = bytes.len();
            bytes.extend(&noise);
            let mut cuts: Vec<usize> = cuts.into_iter().map(|c| c.min(bytes.len())).collect();
            cuts.sort();
            cuts.push(bytes.len());
            let mut d = Deframer::new(cap);
            let mut got = Vec::new();
            let mut from = 0;
            let mut failed = false;
            for cut in cuts {
                match feed(&mut d, &bytes[from..cut]) {
                    Ok(envs) => got.extend(envs),
                    Err(_) => {
                        failed = true;
                        break;
                    }
                }
                prop_assert!(d.buf.len() <= cap + 4 + (cut - from) + 4);
                from = cut;
            }
            // What decoded is a prefix of what was sent (then the noise's).
            let fits = sent.iter().all(|e| e.encoded_len() <= cap);
            if fits {
                prop_assert_eq!(&got[..sent.len().min(got.len())], &sent[..sent.len().min(got.len())]);
                if !failed && noise.is_empty() {
                    prop_assert_eq!(got.len(), sent.len());
                    prop_assert_eq!(d.buf.len() - d.start, bytes.len() - clean);
                }
            }
        }
    }

    #[test]
    fn close_reasons_fit_their_frame() {
        let long = "é".repeat(100);
        let r = close_reason(&long);
        assert!(r.len() <= 123 && long.starts_with(&r));
    }
}
