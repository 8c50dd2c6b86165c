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

/// Splits a byte stream into length-prefixed envelopes.
#[derive(Debug)]
pub(crate) struct Deframer {
    buf: Vec<u8>,
    cap: usize,
}

impl Deframer {
    pub(crate) fn new(cap: usize) -> Self {
        Deframer { buf: Vec::new(), cap }
    }

    /// Adds bytes; returns the envelopes they complete. An `Err` ends the stream.
    pub(crate) fn push(&mut self, bytes: &[u8]) -> Result<Vec<Envelope>, Status> {
        self.buf.extend_from_slice(bytes);
        let mut out = Vec::new();
        while self.buf.len() >= 4 {
            let n = u32::from_le_bytes([self.buf[0], self.buf[1], self.buf[2], self.buf[3]]) as usize;
            if n > self.cap {
                return Err(Status::out_of_range(format!(
                    "envelope of {n} bytes is over the limit of {} bytes",
                    self.cap
                )));
            }
            if self.buf.len() < 4 + n {
                break;
            }
            let env = Envelope::decode(&self.buf[4..4 + n])
                .map_err(|e| Status::invalid_argument(format!("envelope does not decode: {e}")))?;
            self.buf.drain(..4 + n);
            out.push(env);
        }
        Ok(out)
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
            match deframer.push(&bytes) {
                Ok(envs) => {
                    for env in envs {
                        if in_tx.send(Ok(env)).await.is_err() {
                            return;
                        }
                    }
                }
                Err(e) => {
                    let _ = in_tx.send(Err(e)).await;
                    break;
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
            let mut got = d.push(&bytes[..cut]).expect("first part");
            got.extend(d.push(&bytes[cut..]).expect("second part"));
            assert_eq!(got, vec![a.clone(), b.clone()], "cut at {cut}");
        }
    }

    #[test]
    fn oversized_lengths_and_garbage_end_the_stream() {
        let mut d = Deframer::new(16);
        let e = d.push(&100u32.to_le_bytes()).expect_err("over the cap");
        assert_eq!(e.code(), tonic::Code::OutOfRange);
        let mut d = Deframer::new(16);
        let mut bytes = 3u32.to_le_bytes().to_vec();
        bytes.extend([0xff, 0xff, 0xff]);
        let e = d.push(&bytes).expect_err("garbage");
        assert_eq!(e.code(), tonic::Code::InvalidArgument);
    }

    #[test]
    fn close_reasons_fit_their_frame() {
        let long = "é".repeat(100);
        let r = close_reason(&long);
        assert!(r.len() <= 123 && long.starts_with(&r));
    }
}
