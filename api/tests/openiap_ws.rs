//! OpenIAP over WebSocket (`/ws/v2` on the HTTP port) with a real client
//! socket: the Python client's framing (length and envelope as two
//! messages) and the Rust client's (both in one message, several envelopes
//! per message), replies framed the way both read them, and the socket
//! closed with a reason on bad framing; `GET /config` naming the socket.

use std::net::SocketAddr;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use prost::Message as _;
use prost_types::Any;
use serde_json::{Value, json};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream, connect_async};

use ocmesh_node::{Node, NodeConfig};
use ocmesh_proto::openiap as pb;

type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;

const WAIT: Duration = Duration::from_secs(20);

async fn site() -> (SocketAddr, tempfile::TempDir, tokio::sync::oneshot::Sender<()>) {
    let dir = tempfile::tempdir().expect("tempdir");
    let node = Node::open(NodeConfig {
        data_dir: dir.path().to_path_buf(),
        site: "a".into(),
        admin_password: Some("pw".into()),
    })
    .expect("open")
    .node;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(ocmesh_api::serve(listener, ocmesh_api::router(node, None), async {
        let _ = stopped.await;
    }));
    (addr, dir, stop)
}

async fn connect(addr: SocketAddr) -> Ws {
    connect_async(format!("ws://{addr}/ws/v2")).await.expect("ws connect").0
}

fn envelope<M: prost::Message>(command: &str, id: &str, name: &str, msg: &M) -> pb::Envelope {
    pb::Envelope {
        command: command.into(),
        id: id.into(),
        data: Some(Any {
            type_url: format!("type.googleapis.com/openiap.{name}"),
            value: msg.encode_to_vec(),
        }),
        ..Default::default()
    }
}

fn framed(env: &pb::Envelope) -> Vec<u8> {
    let body = env.encode_to_vec();
    let mut out = (body.len() as u32).to_le_bytes().to_vec();
    out.extend(body);
    out
}

/// As the Python client sends: the length, then the envelope.
async fn send_split(ws: &mut Ws, env: &pb::Envelope) {
    let body = env.encode_to_vec();
    ws.send(Message::Binary((body.len() as u32).to_le_bytes().to_vec().into()))
        .await
        .expect("send length");
    ws.send(Message::Binary(body.into())).await.expect("send body");
}

async fn next(ws: &mut Ws) -> Message {
    tokio::time::timeout(WAIT, ws.next())
        .await
        .expect("in time")
        .expect("open")
        .expect("readable")
}

/// As the Python client reads: a 4-byte length message, then the bytes.
async fn recv(ws: &mut Ws) -> pb::Envelope {
    let Message::Binary(len) = next(ws).await else {
        panic!("expected a binary length message")
    };
    assert_eq!(len.len(), 4, "the length is a message of its own");
    let n = u32::from_le_bytes([len[0], len[1], len[2], len[3]]) as usize;
    let Message::Binary(body) = next(ws).await else {
        panic!("expected the envelope")
    };
    assert_eq!(body.len(), n);
    pb::Envelope::decode(body.as_ref()).expect("envelope")
}

fn decode<M: prost::Message + Default>(env: &pb::Envelope) -> M {
    M::decode(env.data.as_ref().expect("data").value.as_slice()).expect("decodes")
}

async fn expect_close(ws: &mut Ws, contains: &str) {
    match next(ws).await {
        Message::Close(Some(frame)) => {
            assert_eq!(u16::from(frame.code), 1008, "{frame:?}");
            assert!(frame.reason.contains(contains), "{frame:?}");
        }
        other => panic!("expected a close frame, got {other:?}"),
    }
}

#[tokio::test]
async fn both_framings_reach_the_dispatcher() {
    let (addr, _dir, _stop) = site().await;
    let mut ws = connect(addr).await;

    let signin = envelope(
        "signin",
        "1",
        "SigninRequest",
        &pb::SigninRequest {
            username: "admin".into(),
            password: "pw".into(),
            ..Default::default()
        },
    );
    send_split(&mut ws, &signin).await;
    let reply = recv(&mut ws).await;
    assert_eq!((reply.command.as_str(), reply.rid.as_str()), ("signinreply", "1"));
    let signed: pb::SigninResponse = decode(&reply);
    assert_eq!(signed.user.expect("user").username, "admin");

    // Two envelopes in one message, the second split over two more.
    let insert = envelope(
        "insertone",
        "2",
        "InsertOneRequest",
        &pb::InsertOneRequest {
            collectionname: "entities".into(),
            item: json!({"name": "over ws"}).to_string(),
            ..Default::default()
        },
    );
    let unknown = pb::Envelope {
        command: "nope".into(),
        id: "3".into(),
        ..Default::default()
    };
    let mut bytes = framed(&insert);
    let tail = framed(&unknown);
    bytes.extend_from_slice(&tail[..3]);
    ws.send(Message::Binary(bytes.into())).await.expect("send");
    ws.send(Message::Binary(tail[3..].to_vec().into())).await.expect("send");
    let mut replies = [recv(&mut ws).await, recv(&mut ws).await];
    replies.sort_by(|a, b| a.rid.cmp(&b.rid));
    assert_eq!(replies[0].command, "insertonereply");
    assert_eq!(replies[1].command, "error");
    let e: pb::ErrorResponse = decode(&replies[1]);
    assert!(e.message.contains("\"nope\""), "{}", e.message);

    let query = envelope(
        "query",
        "4",
        "QueryRequest",
        &pb::QueryRequest {
            collectionname: "entities".into(),
            query: "{}".into(),
            ..Default::default()
        },
    );
    send_split(&mut ws, &query).await;
    let r: pb::QueryResponse = decode(&recv(&mut ws).await);
    let docs: Value = serde_json::from_str(&r.results).expect("json");
    assert_eq!(docs[0]["name"], "over ws");
}

#[tokio::test]
async fn bad_framing_closes_with_a_reason() {
    let (addr, _dir, _stop) = site().await;

    let mut ws = connect(addr).await;
    ws.send(Message::Binary(u32::MAX.to_le_bytes().to_vec().into()))
        .await
        .expect("send");
    expect_close(&mut ws, "over the limit").await;

    let mut ws = connect(addr).await;
    let mut bytes = 3u32.to_le_bytes().to_vec();
    bytes.extend([0xff, 0xff, 0xff]);
    ws.send(Message::Binary(bytes.into())).await.expect("send");
    expect_close(&mut ws, "does not decode").await;

    let mut ws = connect(addr).await;
    ws.send(Message::Text("{\"command\":\"ping\"}".into()))
        .await
        .expect("send");
    expect_close(&mut ws, "text messages").await;

    // The server took no harm.
    let mut ws = connect(addr).await;
    send_split(&mut ws, &envelope("ping", "9", "PingRequest", &pb::PingRequest {})).await;
    assert_eq!(recv(&mut ws).await.command, "pong");
}

#[tokio::test]
async fn config_points_clients_at_the_socket() {
    let (addr, _dir, _stop) = site().await;
    let config: Value = reqwest::get(format!("http://{addr}/config"))
        .await
        .expect("GET /config")
        .json()
        .await
        .expect("JSON");
    assert_eq!(config["domain"], "127.0.0.1");
    assert_eq!(config["supports_watch"], false);
    assert_eq!(config["enable_analytics"], false);
    let wsurl = config["wsurl"].as_str().expect("wsurl");
    assert_eq!(wsurl, format!("ws://{addr}/ws/v2"));
    let mut ws = connect_async(wsurl).await.expect("the advertised socket works").0;
    send_split(&mut ws, &envelope("ping", "1", "PingRequest", &pb::PingRequest {})).await;
    assert_eq!(recv(&mut ws).await.command, "pong");
}
