//! The OpenIAP FlowService driven through a real tonic client over
//! loopback (ephemeral port): every implemented command with its replies
//! and its errors (unknown command, undecodable data, not signed in, bad
//! password, bad or expired jwt, JSON that is not JSON), per-message jwt,
//! the per-connection limits, and that one connection's trouble leaves
//! another alone.

use std::net::SocketAddr;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use prost::Message;
use prost_types::{Any, Timestamp};
use serde_json::{Value, json};
use tokio::sync::{mpsc, oneshot};
use tonic::Streaming;

use ocmesh_api::openiap::{FlowServer, GrpcLimits, GrpcStats};
use ocmesh_node::{Node, NodeConfig};
use ocmesh_proto::openiap as pb;
use ocmesh_proto::openiap::flow_service_client::FlowServiceClient;

const PASSWORD: &str = "pw";
const WAIT: Duration = Duration::from_secs(20);

struct Server {
    addr: SocketAddr,
    node: Node,
    stats: std::sync::Arc<GrpcStats>,
    _stop: oneshot::Sender<()>,
    _dir: tempfile::TempDir,
}

async fn server(limits: GrpcLimits) -> Server {
    let dir = tempfile::tempdir().expect("tempdir");
    let node = Node::open(NodeConfig {
        data_dir: dir.path().to_path_buf(),
        site: "a".into(),
        admin_password: Some(PASSWORD.into()),
    })
    .expect("open node")
    .node;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let flow = FlowServer::new(node.clone(), limits);
    flow.use_broker(ocmesh_node::messaging::Broker::embedded());
    let stats = flow.stats();
    let (stop, stopped) = oneshot::channel::<()>();
    tokio::spawn(ocmesh_api::openiap::serve_grpc(listener, flow, async {
        let _ = stopped.await;
    }));
    Server {
        addr,
        node,
        stats,
        _stop: stop,
        _dir: dir,
    }
}

/// One SetupStream: requests go in through a bounded channel, replies are
/// matched to requests by `rid`.
struct Conn {
    tx: mpsc::Sender<pb::Envelope>,
    rx: Streaming<pb::Envelope>,
    /// Pushed envelopes (no `rid`) that arrived while waiting for a reply.
    events: std::collections::VecDeque<pb::Envelope>,
    next: u64,
    /// Set on every request when not empty.
    jwt: String,
}

async fn connect(addr: SocketAddr) -> Conn {
    let mut client = FlowServiceClient::connect(format!("http://{addr}"))
        .await
        .expect("connect")
        .max_decoding_message_size(64 << 20)
        .max_encoding_message_size(64 << 20);
    let (tx, rx) = mpsc::channel::<pb::Envelope>(256);
    let outbound = futures_util::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|e| (e, rx)) });
    let rx = client.setup_stream(outbound).await.expect("setup stream").into_inner();
    Conn {
        tx,
        rx,
        events: Default::default(),
        next: 0,
        jwt: String::new(),
    }
}

fn any<M: Message>(name: &str, msg: &M) -> Any {
    Any {
        type_url: format!("type.googleapis.com/openiap.{name}"),
        value: msg.encode_to_vec(),
    }
}

impl Conn {
    async fn send(&mut self, command: &str, data: Option<Any>) -> String {
        self.next += 1;
        let id = format!("c{}", self.next);
        let env = pb::Envelope {
            command: command.into(),
            id: id.clone(),
            data,
            jwt: self.jwt.clone(),
            ..Default::default()
        };
        self.tx.send(env).await.expect("stream open");
        id
    }

    async fn recv(&mut self) -> pb::Envelope {
        tokio::time::timeout(WAIT, self.rx.message())
            .await
            .expect("a reply in time")
            .expect("stream healthy")
            .expect("stream open")
    }

    async fn call_raw(&mut self, command: &str, data: Option<Any>) -> pb::Envelope {
        let id = self.send(command, data).await;
        loop {
            let reply = self.recv().await;
            if reply.rid.is_empty() {
                self.events.push_back(reply);
                continue;
            }
            assert_eq!(reply.rid, id, "replies come back for their request");
            return reply;
        }
    }

    async fn call<M: Message>(&mut self, command: &str, name: &str, msg: &M) -> pb::Envelope {
        self.call_raw(command, Some(any(name, msg))).await
    }

    /// A reply that must be `<command>reply`, decoded.
    async fn ok<M: Message, R: Message + Default>(&mut self, command: &str, name: &str, msg: &M) -> R {
        let reply = self.call(command, name, msg).await;
        assert_eq!(reply.command, format!("{command}reply"), "{:?}", error_text(&reply));
        let data = reply.data.expect("reply data");
        assert!(
            data.type_url.starts_with("type.googleapis.com/openiap."),
            "{}",
            data.type_url
        );
        R::decode(data.value.as_slice()).expect("reply decodes")
    }

    /// A reply that must be `error`.
    async fn err<M: Message>(&mut self, command: &str, name: &str, msg: &M) -> pb::ErrorResponse {
        let reply = self.call(command, name, msg).await;
        error_of(&reply)
    }

    async fn signin(&mut self, username: &str, password: &str) -> pb::SigninResponse {
        self.ok(
            "signin",
            "SigninRequest",
            &pb::SigninRequest {
                username: username.into(),
                password: password.into(),
                ..Default::default()
            },
        )
        .await
    }

    async fn query(&mut self, collection: &str, query: Value) -> Vec<Value> {
        let r: pb::QueryResponse = self
            .ok(
                "query",
                "QueryRequest",
                &pb::QueryRequest {
                    collectionname: collection.into(),
                    query: query.to_string(),
                    top: 100,
                    ..Default::default()
                },
            )
            .await;
        match serde_json::from_str(&r.results).expect("results are JSON") {
            Value::Array(a) => a,
            other => panic!("results are not an array: {other}"),
        }
    }

    async fn insert(&mut self, collection: &str, item: Value) -> Value {
        let r: pb::InsertOneResponse = self
            .ok(
                "insertone",
                "InsertOneRequest",
                &pb::InsertOneRequest {
                    collectionname: collection.into(),
                    item: item.to_string(),
                    ..Default::default()
                },
            )
            .await;
        serde_json::from_str(&r.result).expect("result is JSON")
    }
}

fn error_text(reply: &pb::Envelope) -> Option<String> {
    (reply.command == "error").then(|| error_of(reply).message)
}

fn error_of(reply: &pb::Envelope) -> pb::ErrorResponse {
    assert_eq!(reply.command, "error", "expected an error, got {reply:?}");
    let data = reply.data.as_ref().expect("error data");
    assert_eq!(data.type_url, "type.googleapis.com/openiap.ErrorResponse");
    pb::ErrorResponse::decode(data.value.as_slice()).expect("ErrorResponse")
}

#[tokio::test]
async fn sign_in_ping_and_who_may_call() {
    let s = server(GrpcLimits::default()).await;
    let mut c = connect(s.addr).await;

    let pong = c.call("ping", "PingRequest", &pb::PingRequest {}).await;
    assert_eq!(pong.command, "pong", "ping needs no sign-in");

    let e = c
        .err(
            "query",
            "QueryRequest",
            &pb::QueryRequest {
                collectionname: "entities".into(),
                query: "{}".into(),
                ..Default::default()
            },
        )
        .await;
    assert_eq!(e.code, 401);
    assert!(e.message.contains("not signed in"), "{}", e.message);

    let e = c
        .err(
            "signin",
            "SigninRequest",
            &pb::SigninRequest {
                username: "admin".into(),
                password: "wrong".into(),
                ..Default::default()
            },
        )
        .await;
    assert_eq!((e.code, e.message.as_str()), (401, "unknown user or wrong password"));

    let signed = c.signin("admin", PASSWORD).await;
    assert!(!signed.jwt.is_empty());
    let user = signed.user.expect("user");
    assert_eq!(user.username, "admin");
    assert!(
        user.roles.iter().any(|r| r.name == "admins") && user.roles.iter().any(|r| r.name == "users"),
        "{:?}",
        user.roles
    );
    assert_eq!(c.query("entities", json!({})).await.len(), 0);

    // Signing in with the token works too; validateonly leaves a connection as it was.
    let mut d = connect(s.addr).await;
    let again: pb::SigninResponse = d
        .ok(
            "signin",
            "SigninRequest",
            &pb::SigninRequest {
                jwt: signed.jwt.clone(),
                validateonly: true,
                ..Default::default()
            },
        )
        .await;
    assert_eq!(again.user.expect("user").id, user.id);
    let e = d
        .err(
            "count",
            "CountRequest",
            &pb::CountRequest {
                collectionname: "entities".into(),
                ..Default::default()
            },
        )
        .await;
    assert_eq!(e.code, 401, "validateonly did not sign the connection in");

    // A garbage token, and a well-formed but expired one.
    for token in ["not-a-jwt".to_owned(), expired_token(&s.node, &user.id)] {
        let e = d
            .err(
                "signin",
                "SigninRequest",
                &pb::SigninRequest {
                    jwt: token.clone(),
                    ..Default::default()
                },
            )
            .await;
        assert_eq!(e.code, 401, "{}", e.message);
        d.jwt = token;
        let e = d
            .err(
                "count",
                "CountRequest",
                &pb::CountRequest {
                    collectionname: "entities".into(),
                    ..Default::default()
                },
            )
            .await;
        assert_eq!(e.code, 401, "{}", e.message);
    }
    // The envelope's jwt runs that one message as its user.
    d.jwt = signed.jwt.clone();
    let n: pb::CountResponse = d
        .ok(
            "count",
            "CountRequest",
            &pb::CountRequest {
                collectionname: "entities".into(),
                ..Default::default()
            },
        )
        .await;
    assert_eq!(n.result, 0);
}

fn expired_token(node: &Node, id: &str) -> String {
    let now = SystemTime::now().duration_since(UNIX_EPOCH).expect("clock").as_secs();
    let claims = json!({"sub": id, "name": "admin", "iss": node.site(), "iat": now - 7200, "exp": now - 3600});
    jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
        &claims,
        &jsonwebtoken::EncodingKey::from_secret(node.token_secret()),
    )
    .expect("encode")
}

#[tokio::test]
async fn documents_through_every_command() {
    let s = server(GrpcLimits::default()).await;
    let mut c = connect(s.addr).await;
    c.signin("admin", PASSWORD).await;

    let a = c
        .insert("entities", json!({"name": "a", "_type": "thing", "n": 1}))
        .await;
    let a_id = a["_id"].as_str().expect("_id").to_owned();
    assert_eq!(a["_version"], 0);

    let many: pb::InsertManyResponse = c
        .ok(
            "insertmany",
            "InsertManyRequest",
            &pb::InsertManyRequest {
                collectionname: "entities".into(),
                items: json!([{"name": "b", "_type": "thing", "n": 2}, {"name": "c", "_type": "other", "n": 3}])
                    .to_string(),
                ..Default::default()
            },
        )
        .await;
    let many: Value = serde_json::from_str(&many.results).expect("json");
    assert_eq!(many.as_array().map(Vec::len), Some(2));
    let skipped: pb::InsertManyResponse = c
        .ok(
            "insertmany",
            "InsertManyRequest",
            &pb::InsertManyRequest {
                collectionname: "entities".into(),
                items: json!([{"name": "d", "_type": "thing", "n": 4}]).to_string(),
                skipresults: true,
                ..Default::default()
            },
        )
        .await;
    assert_eq!(skipped.results, "[]");

    // Query with projection, orderby (JSON and bare field name), top and skip.
    let r: pb::QueryResponse = c
        .ok(
            "query",
            "QueryRequest",
            &pb::QueryRequest {
                collectionname: "entities".into(),
                query: json!({"_type": "thing"}).to_string(),
                projection: json!({"name": 1}).to_string(),
                orderby: json!({"n": -1}).to_string(),
                top: 2,
                skip: 0,
                ..Default::default()
            },
        )
        .await;
    let docs: Value = serde_json::from_str(&r.results).expect("json");
    let names: Vec<&str> = docs
        .as_array()
        .expect("array")
        .iter()
        .filter_map(|d| d["name"].as_str())
        .collect();
    assert_eq!(names, ["d", "b"]);
    assert!(docs[0].get("n").is_none(), "projected away: {}", docs[0]);
    let r: pb::QueryResponse = c
        .ok(
            "query",
            "QueryRequest",
            &pb::QueryRequest {
                collectionname: "entities".into(),
                query: "{}".into(),
                orderby: "name".into(),
                skip: 1,
                top: 1,
                ..Default::default()
            },
        )
        .await;
    let docs: Value = serde_json::from_str(&r.results).expect("json");
    assert_eq!(docs[0]["name"], "b");

    let n: pb::CountResponse = c
        .ok(
            "count",
            "CountRequest",
            &pb::CountRequest {
                collectionname: "entities".into(),
                query: json!({"_type": "thing"}).to_string(),
                ..Default::default()
            },
        )
        .await;
    assert_eq!(n.result, 3);
    let d: pb::DistinctResponse = c
        .ok(
            "distinct",
            "DistinctRequest",
            &pb::DistinctRequest {
                collectionname: "entities".into(),
                field: "_type".into(),
                ..Default::default()
            },
        )
        .await;
    let mut kinds = d.results.clone();
    kinds.sort();
    assert_eq!(kinds, ["other", "thing"]);

    // updateone replaces the whole document; the old version stays readable.
    let u: pb::UpdateOneResponse = c
        .ok(
            "updateone",
            "UpdateOneRequest",
            &pb::UpdateOneRequest {
                collectionname: "entities".into(),
                item: json!({"_id": a_id, "name": "a2", "_type": "thing", "n": 10}).to_string(),
                ..Default::default()
            },
        )
        .await;
    let u: Value = serde_json::from_str(&u.result).expect("json");
    assert_eq!((u["name"].clone(), u["_version"].clone()), (json!("a2"), json!(1)));
    let v: pb::GetDocumentVersionResponse = c
        .ok(
            "getdocumentversion",
            "GetDocumentVersionRequest",
            &pb::GetDocumentVersionRequest {
                collectionname: "entities".into(),
                id: a_id.clone(),
                version: 0,
                ..Default::default()
            },
        )
        .await;
    let v: Value = serde_json::from_str(&v.result).expect("json");
    assert_eq!(v["name"], "a");
    let e = c
        .err(
            "getdocumentversion",
            "GetDocumentVersionRequest",
            &pb::GetDocumentVersionRequest {
                collectionname: "entities".into(),
                id: a_id.clone(),
                version: 9,
                ..Default::default()
            },
        )
        .await;
    assert_eq!(e.code, 404, "{}", e.message);

    // updatedocument applies operators to every match.
    let ud: pb::UpdateDocumentResponse = c
        .ok(
            "updatedocument",
            "UpdateDocumentRequest",
            &pb::UpdateDocumentRequest {
                collectionname: "entities".into(),
                query: json!({"_type": "thing"}).to_string(),
                document: json!({"$set": {"seen": true}}).to_string(),
                ..Default::default()
            },
        )
        .await;
    let op = ud.opresult.expect("opresult");
    assert!(op.acknowledged);
    assert_eq!((op.matched_count, op.modified_count), (3, 3));
    assert_eq!(c.query("entities", json!({"seen": true})).await.len(), 3);

    // insertorupdateone by a uniqueness field: first inserts, then replaces.
    for (n, version) in [(1, 0), (2, 1)] {
        let r: pb::InsertOrUpdateOneResponse = c
            .ok(
                "insertorupdateone",
                "InsertOrUpdateOneRequest",
                &pb::InsertOrUpdateOneRequest {
                    collectionname: "entities".into(),
                    uniqeness: "key".into(),
                    item: json!({"key": "k1", "n": n}).to_string(),
                    ..Default::default()
                },
            )
            .await;
        let r: Value = serde_json::from_str(&r.result).expect("json");
        assert_eq!((r["n"].clone(), r["_version"].clone()), (json!(n), json!(version)));
    }

    let del: pb::DeleteOneResponse = c
        .ok(
            "deleteone",
            "DeleteOneRequest",
            &pb::DeleteOneRequest {
                collectionname: "entities".into(),
                id: a_id.clone(),
                ..Default::default()
            },
        )
        .await;
    assert_eq!(del.affectedrows, 1);
    let e = c
        .err(
            "deleteone",
            "DeleteOneRequest",
            &pb::DeleteOneRequest {
                collectionname: "entities".into(),
                id: a_id.clone(),
                ..Default::default()
            },
        )
        .await;
    assert_eq!(e.code, 404, "{}", e.message);

    let b_id = many[0]["_id"].as_str().expect("id").to_owned();
    let dm: pb::DeleteManyResponse = c
        .ok(
            "deletemany",
            "DeleteManyRequest",
            &pb::DeleteManyRequest {
                collectionname: "entities".into(),
                ids: vec![b_id],
                ..Default::default()
            },
        )
        .await;
    assert_eq!(dm.affectedrows, 1);
    let dm: pb::DeleteManyResponse = c
        .ok(
            "deletemany",
            "DeleteManyRequest",
            &pb::DeleteManyRequest {
                collectionname: "entities".into(),
                query: json!({"_type": "other"}).to_string(),
                ..Default::default()
            },
        )
        .await;
    assert_eq!(dm.affectedrows, 1);
    let e = c
        .err(
            "deletemany",
            "DeleteManyRequest",
            &pb::DeleteManyRequest {
                collectionname: "entities".into(),
                ..Default::default()
            },
        )
        .await;
    assert_eq!(e.code, 400, "an empty deletemany is refused: {}", e.message);
    let left = c.query("entities", json!({})).await;
    assert_eq!(left.len(), 2, "d and the k1 document remain: {left:?}");
}

#[tokio::test]
async fn work_items_and_queues() {
    let s = server(GrpcLimits::default()).await;
    let mut c = connect(s.addr).await;
    c.signin("admin", PASSWORD).await;

    let q: pb::AddWorkItemQueueResponse = c
        .ok(
            "addworkitemqueue",
            "AddWorkItemQueueRequest",
            &pb::AddWorkItemQueueRequest {
                name: "jobs".into(),
                maxretries: 2,
                ..Default::default()
            },
        )
        .await;
    let q = q.workitemqueue.expect("queue");
    assert_eq!((q.name.as_str(), q.maxretries), ("jobs", 2));
    assert!(!q.id.is_empty());
    let e = c
        .err(
            "addworkitemqueue",
            "AddWorkItemQueueRequest",
            &pb::AddWorkItemQueueRequest {
                name: "jobs".into(),
                ..Default::default()
            },
        )
        .await;
    assert_eq!(e.code, 409, "{}", e.message);

    let pushed: pb::PushWorkitemResponse = c
        .ok(
            "pushworkitem",
            "PushWorkitemRequest",
            &pb::PushWorkitemRequest {
                wiq: "jobs".into(),
                name: "first".into(),
                payload: json!({"x": 1}).to_string(),
                priority: 2,
                ..Default::default()
            },
        )
        .await;
    let first = pushed.workitem.expect("workitem");
    assert_eq!((first.state.as_str(), first.wiq.as_str()), ("new", "jobs"));
    assert_eq!(first.wiqid, q.id);
    assert!(first.nextrun.is_some());

    // By queue id; a later nextrun keeps an item out of pops for now.
    let later = SystemTime::now().duration_since(UNIX_EPOCH).expect("clock").as_secs() + 3600;
    let pushed: pb::PushWorkitemsResponse = c
        .ok(
            "pushworkitems",
            "PushWorkitemsRequest",
            &pb::PushWorkitemsRequest {
                wiqid: q.id.clone(),
                priority: 2,
                items: vec![
                    pb::Workitem {
                        name: "second".into(),
                        payload: json!({"x": 2}).to_string(),
                        ..Default::default()
                    },
                    pb::Workitem {
                        name: "later".into(),
                        nextrun: Some(Timestamp {
                            seconds: later as i64,
                            nanos: 0,
                        }),
                        ..Default::default()
                    },
                ],
                ..Default::default()
            },
        )
        .await;
    assert_eq!(pushed.workitems.len(), 2);

    let got = pop(&mut c, "jobs").await.expect("an item");
    assert_eq!((got.name.as_str(), got.state.as_str()), ("first", "processing"));
    assert_eq!(
        serde_json::from_str::<Value>(&got.payload).expect("json"),
        json!({"x": 1})
    );

    let mut done = got.clone();
    done.state = "successful".into();
    done.payload = json!({"x": 1, "result": "ok"}).to_string();
    let updated: pb::UpdateWorkitemResponse = c
        .ok(
            "updateworkitem",
            "UpdateWorkitemRequest",
            &pb::UpdateWorkitemRequest {
                workitem: Some(done),
                ..Default::default()
            },
        )
        .await;
    let updated = updated.workitem.expect("workitem");
    assert_eq!(updated.state, "successful");
    assert_eq!(
        serde_json::from_str::<Value>(&updated.payload).expect("json")["result"],
        "ok"
    );

    let second = pop(&mut c, "jobs").await.expect("second");
    assert_eq!(second.name, "second");
    let mut failed = second.clone();
    failed.state = "failed".into();
    failed.errortype = "business".into();
    failed.errormessage = "no such customer".into();
    let r: pb::UpdateWorkitemResponse = c
        .ok(
            "updateworkitem",
            "UpdateWorkitemRequest",
            &pb::UpdateWorkitemRequest {
                workitem: Some(failed),
                ..Default::default()
            },
        )
        .await;
    let r = r.workitem.expect("workitem");
    assert_eq!((r.state.as_str(), r.errortype.as_str()), ("failed", "business"));

    assert!(pop(&mut c, "jobs").await.is_none(), "the delayed item is not due");
    let bad_state = pb::Workitem {
        state: "sideways".into(),
        ..second.clone()
    };
    let e = c
        .err(
            "updateworkitem",
            "UpdateWorkitemRequest",
            &pb::UpdateWorkitemRequest {
                workitem: Some(bad_state),
                ..Default::default()
            },
        )
        .await;
    assert_eq!(e.code, 400, "{}", e.message);

    let _: pb::DeleteWorkitemResponse = c
        .ok(
            "deleteworkitem",
            "DeleteWorkitemRequest",
            &pb::DeleteWorkitemRequest { id: second.id.clone() },
        )
        .await;
    let e = c
        .err(
            "deleteworkitem",
            "DeleteWorkitemRequest",
            &pb::DeleteWorkitemRequest { id: second.id.clone() },
        )
        .await;
    assert_eq!(e.code, 404, "{}", e.message);

    let e = c
        .err(
            "pushworkitem",
            "PushWorkitemRequest",
            &pb::PushWorkitemRequest {
                wiq: "nope".into(),
                ..Default::default()
            },
        )
        .await;
    assert_eq!(e.code, 404, "{}", e.message);
    let e = c
        .err(
            "pushworkitem",
            "PushWorkitemRequest",
            &pb::PushWorkitemRequest {
                wiq: "jobs".into(),
                payload: "[1, 2]".into(),
                ..Default::default()
            },
        )
        .await;
    assert_eq!(e.code, 400, "{}", e.message);

    // Rename by id, then delete by the new name.
    let renamed = pb::WorkItemQueue {
        name: "jobs2".into(),
        maxretries: 5,
        ..q.clone()
    };
    let u: pb::UpdateWorkItemQueueResponse = c
        .ok(
            "updateworkitemqueue",
            "UpdateWorkItemQueueRequest",
            &pb::UpdateWorkItemQueueRequest {
                workitemqueue: Some(renamed),
                ..Default::default()
            },
        )
        .await;
    let u = u.workitemqueue.expect("queue");
    assert_eq!(
        (u.name.as_str(), u.maxretries, u.id.as_str()),
        ("jobs2", 5, q.id.as_str())
    );
    let _: pb::DeleteWorkItemQueueResponse = c
        .ok(
            "deleteworkitemqueue",
            "DeleteWorkItemQueueRequest",
            &pb::DeleteWorkItemQueueRequest {
                wiq: "jobs2".into(),
                ..Default::default()
            },
        )
        .await;
    let e = c
        .err(
            "deleteworkitemqueue",
            "DeleteWorkItemQueueRequest",
            &pb::DeleteWorkItemQueueRequest {
                wiq: "jobs2".into(),
                ..Default::default()
            },
        )
        .await;
    assert_eq!(e.code, 404, "{}", e.message);
}

#[tokio::test]
async fn bad_input_gets_errors_and_the_stream_lives_on() {
    let s = server(GrpcLimits::default()).await;
    let mut c = connect(s.addr).await;
    c.signin("admin", PASSWORD).await;

    let reply = c.call_raw("frobnicate", None).await;
    let e = error_of(&reply);
    assert!(e.message.contains("unknown command \"frobnicate\""), "{}", e.message);

    // Data that does not decode as the command's type, and data of another type.
    let garbage = Any {
        type_url: "type.googleapis.com/openiap.InsertOneRequest".into(),
        value: vec![0x0a, 0xff, 0xff, 0xff, 0xff, 0x0f],
    };
    let e = error_of(&c.call_raw("insertone", Some(garbage)).await);
    assert!(
        e.message.contains("does not decode as openiap.InsertOneRequest"),
        "{}",
        e.message
    );
    let e = c.err("insertone", "QueryRequest", &pb::QueryRequest::default()).await;
    assert!(e.message.contains("expected openiap.InsertOneRequest"), "{}", e.message);

    // A query that is not JSON, an item that is not an object, a bad filter.
    let e = c
        .err(
            "query",
            "QueryRequest",
            &pb::QueryRequest {
                collectionname: "entities".into(),
                query: "{name: oops".into(),
                ..Default::default()
            },
        )
        .await;
    assert!(e.message.starts_with("query is not valid JSON"), "{}", e.message);
    let e = c
        .err(
            "insertone",
            "InsertOneRequest",
            &pb::InsertOneRequest {
                collectionname: "entities".into(),
                item: "[1]".into(),
                ..Default::default()
            },
        )
        .await;
    assert!(e.message.contains("must be a JSON object"), "{}", e.message);
    let e = c
        .err(
            "count",
            "CountRequest",
            &pb::CountRequest {
                collectionname: "entities".into(),
                query: json!({"n": {"$where": "1"}}).to_string(),
                ..Default::default()
            },
        )
        .await;
    assert_eq!(e.code, 400, "{}", e.message);
    let e = c
        .err(
            "insertone",
            "InsertOneRequest",
            &pb::InsertOneRequest {
                collectionname: "bad name!".into(),
                item: "{}".into(),
                ..Default::default()
            },
        )
        .await;
    assert_eq!(e.code, 400, "{}", e.message);

    // Nothing of that was written, and the connection still works.
    assert_eq!(c.query("entities", json!({})).await.len(), 0);
    assert_eq!(c.call("ping", "PingRequest", &pb::PingRequest {}).await.command, "pong");
}

#[tokio::test]
async fn per_message_jwt_runs_as_that_user() {
    let s = server(GrpcLimits::default()).await;
    let admin = ocmesh_node::Principal {
        id: String::new(),
        name: String::new(),
        roles: vec![ocmesh_node::acl::ADMINS_ROLE_ID.into()],
    };
    s.node
        .create_user("bob", "bobpw", "Bob", &admin)
        .await
        .expect("create bob");

    let mut c = connect(s.addr).await;
    c.signin("admin", PASSWORD).await;
    let secret = c.insert("entities", json!({"name": "admins only"})).await;
    let mut b = connect(s.addr).await;
    let bob = b.signin("bob", "bobpw").await;
    let bob_user = bob.user.expect("user");
    assert_eq!((bob_user.username.as_str(), bob_user.name.as_str()), ("bob", "Bob"));

    // On the admin's connection, one message as bob.
    c.jwt = bob.jwt.clone();
    let mine = c.insert("entities", json!({"name": "bob's"})).await;
    assert_eq!(mine["_createdbyid"].as_str(), Some(bob_user.id.as_str()), "{mine}");
    let seen = c.query("entities", json!({})).await;
    assert_eq!(seen.len(), 1, "bob sees only his own: {seen:?}");
    let e = c
        .err(
            "deleteone",
            "DeleteOneRequest",
            &pb::DeleteOneRequest {
                collectionname: "entities".into(),
                id: secret["_id"].as_str().expect("id").into(),
                ..Default::default()
            },
        )
        .await;
    assert_eq!(
        e.code, 404,
        "what bob cannot read does not exist for him: {}",
        e.message
    );
    c.jwt.clear();
    assert_eq!(c.query("entities", json!({})).await.len(), 2, "back to the admin");
}

#[tokio::test]
async fn limits_answer_with_errors_not_dropped_streams() {
    let limits = GrpcLimits {
        max_message_bytes: 64 * 1024,
        hard_max_message_bytes: 256 * 1024,
        max_in_flight: 1,
        outbound_queue: 4,
        max_connections: 8,
        ..GrpcLimits::default()
    };
    let s = server(limits).await;
    let mut c = connect(s.addr).await;
    c.signin("admin", PASSWORD).await;

    // Over the message limit: an error reply, and the stream goes on.
    let e = c
        .err(
            "insertone",
            "InsertOneRequest",
            &pb::InsertOneRequest {
                collectionname: "entities".into(),
                item: json!({"blob": "x".repeat(100 * 1024)}).to_string(),
                ..Default::default()
            },
        )
        .await;
    assert_eq!(e.code, 413, "{}", e.message);
    assert!(e.message.contains("65536"), "{}", e.message);

    // Many writes at once with one allowed in flight: each gets exactly one
    // reply, either its own or "too many in flight".
    let mut ids = Vec::new();
    for i in 0..20 {
        let item = json!([{"i": i}, {"i": i}]).to_string();
        let data = any(
            "InsertManyRequest",
            &pb::InsertManyRequest {
                collectionname: "entities".into(),
                items: item,
                ..Default::default()
            },
        );
        ids.push(c.send("insertmany", Some(data)).await);
    }
    let (mut done, mut refused) = (0, 0);
    let mut seen = std::collections::HashSet::new();
    for _ in 0..ids.len() {
        let r = c.recv().await;
        assert!(ids.contains(&r.rid) && seen.insert(r.rid.clone()), "one reply each");
        match r.command.as_str() {
            "insertmanyreply" => done += 1,
            "error" => {
                let e = error_of(&r);
                assert_eq!(e.code, 429, "{}", e.message);
                refused += 1;
            }
            other => panic!("unexpected {other}"),
        }
    }
    assert!(done >= 1 && refused >= 1, "done {done}, refused {refused}");
    assert_eq!(
        c.query("entities", json!({})).await.len(),
        2 * done,
        "refused ones wrote nothing"
    );

    // Over the transport cap: that stream ends with a status; others go on.
    let mut other = connect(s.addr).await;
    other.signin("admin", PASSWORD).await;
    c.send(
        "insertone",
        Some(any(
            "InsertOneRequest",
            &pb::InsertOneRequest {
                collectionname: "entities".into(),
                item: json!({"blob": "x".repeat(512 * 1024)}).to_string(),
                ..Default::default()
            },
        )),
    )
    .await;
    let ended = tokio::time::timeout(WAIT, c.rx.message()).await.expect("ends in time");
    match ended {
        Err(status) => {
            assert_eq!(status.code(), tonic::Code::OutOfRange, "{status}");
            assert!(status.message().contains("too large"), "{status}");
        }
        Ok(m) => panic!("expected the stream to end with a status, got {m:?}"),
    }
    assert_eq!(
        other.query("entities", json!({"blob": {"$exists": true}})).await.len(),
        0
    );
    assert_eq!(
        other.call("ping", "PingRequest", &pb::PingRequest {}).await.command,
        "pong"
    );

    let stats = s.stats.snapshot();
    assert!(stats["rejected_in_flight"].as_u64() >= Some(1), "{stats}");
    assert!(stats["connections_total"].as_u64() >= Some(2), "{stats}");
    assert!(stats["error_replies"].as_u64() >= Some(2), "{stats}");
}

async fn pop(c: &mut Conn, queue: &str) -> Option<pb::Workitem> {
    let req = pb::PopWorkitemRequest {
        wiq: queue.into(),
        ..Default::default()
    };
    let r: pb::PopWorkitemResponse = c.ok("popworkitem", "PopWorkitemRequest", &req).await;
    r.workitem
}

#[tokio::test]
async fn shutdown_ends_open_streams_with_unavailable() {
    let mut s = server(GrpcLimits::default()).await;
    let mut c = connect(s.addr).await;
    c.signin("admin", PASSWORD).await;
    let (stop, _) = oneshot::channel();
    drop(std::mem::replace(&mut s._stop, stop));
    let ended = tokio::time::timeout(WAIT, c.rx.message()).await.expect("ends in time");
    match ended {
        Err(status) => assert_eq!(status.code(), tonic::Code::Unavailable, "{status}"),
        Ok(m) => panic!("expected UNAVAILABLE, got {m:?}"),
    }
    // New connections are refused once the server is down.
    let deadline = tokio::time::Instant::now() + WAIT;
    while FlowServiceClient::connect(format!("http://{}", s.addr)).await.is_ok() {
        assert!(tokio::time::Instant::now() < deadline, "still accepting after shutdown");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn one_stream_over_the_node_limit_is_refused() {
    let s = server(GrpcLimits {
        max_connections: 2,
        ..GrpcLimits::default()
    })
    .await;
    let mut a = connect(s.addr).await;
    let _b = connect(s.addr).await;
    let mut client = FlowServiceClient::connect(format!("http://{}", s.addr))
        .await
        .expect("connect");
    let (_tx, rx) = mpsc::channel::<pb::Envelope>(1);
    let outbound = futures_util::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|e| (e, rx)) });
    let refused = client.setup_stream(outbound).await.expect_err("a third stream");
    assert_eq!(refused.code(), tonic::Code::ResourceExhausted, "{refused}");
    assert_eq!(a.call("ping", "PingRequest", &pb::PingRequest {}).await.command, "pong");
    // A closed stream frees its slot.
    drop(a);
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let (_tx, rx) = mpsc::channel::<pb::Envelope>(1);
        let outbound = futures_util::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|e| (e, rx)) });
        if client.setup_stream(outbound).await.is_ok() {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "the slot never came back");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let rejected = s.stats.snapshot()["rejected_connections"].as_u64();
    assert!(rejected >= Some(1), "{rejected:?}");
}

// ---- pushed events: watch, message queues, token refresh ----

impl Conn {
    /// The next pushed envelope (no `rid`) named `command`; replies to
    /// nothing are not expected here, so anything else fails the test.
    async fn event(&mut self, command: &str) -> pb::Envelope {
        let ev = match self.events.pop_front() {
            Some(ev) => ev,
            None => self.recv().await,
        };
        assert!(ev.rid.is_empty(), "expected a pushed {command}, got a reply {ev:?}");
        assert_eq!(ev.command, command, "{ev:?}");
        ev
    }

    async fn watch_event(&mut self) -> pb::WatchEvent {
        let ev = self.event("watchevent").await;
        pb::WatchEvent::decode(ev.data.expect("data").value.as_slice()).expect("WatchEvent")
    }

    async fn queue_event(&mut self) -> pb::QueueEvent {
        let ev = self.event("queueevent").await;
        pb::QueueEvent::decode(ev.data.expect("data").value.as_slice()).expect("QueueEvent")
    }

    async fn watch(&mut self, collection: &str, paths: &[&str]) -> String {
        let r: pb::WatchResponse = self
            .ok(
                "watch",
                "WatchRequest",
                &pb::WatchRequest {
                    collectionname: collection.into(),
                    paths: paths.iter().map(|p| p.to_string()).collect(),
                },
            )
            .await;
        assert!(!r.id.is_empty());
        r.id
    }

    /// Nothing pushed arrives before the reply to a ping.
    async fn quiet(&mut self) {
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert!(self.events.is_empty(), "unexpected events: {:?}", self.events);
        let id = self.send("ping", Some(any("PingRequest", &pb::PingRequest {}))).await;
        let next = self.recv().await;
        assert_eq!(
            (next.command.as_str(), next.rid.as_str()),
            ("pong", id.as_str()),
            "{next:?}"
        );
    }

    async fn register_queue(&mut self, name: &str) -> String {
        let r: pb::RegisterQueueResponse = self
            .ok(
                "registerqueue",
                "RegisterQueueRequest",
                &pb::RegisterQueueRequest { queuename: name.into() },
            )
            .await;
        r.queuename
    }

    async fn queue_message(&mut self, m: pb::QueueMessageRequest) -> pb::Envelope {
        self.call("queuemessage", "QueueMessageRequest", &m).await
    }
}

async fn with_bob(s: &Server) {
    let admin = ocmesh_node::Principal {
        id: String::new(),
        name: String::new(),
        roles: vec![ocmesh_node::acl::ADMINS_ROLE_ID.into()],
    };
    s.node
        .create_user("bob", "bobpw", "Bob", &admin)
        .await
        .expect("create bob");
}

fn doc_of(ev: &pb::WatchEvent) -> Value {
    serde_json::from_str(&ev.document).expect("document is JSON")
}

#[tokio::test]
async fn watch_pushes_changes_the_watcher_may_read() {
    let s = server(GrpcLimits::default()).await;
    with_bob(&s).await;
    let mut a = connect(s.addr).await;
    let mut b = connect(s.addr).await;

    // Not signed in, bad paths, unknown ids: errors, and the stream lives on.
    let e = a
        .err(
            "watch",
            "WatchRequest",
            &pb::WatchRequest {
                collectionname: "entities".into(),
                paths: vec![],
            },
        )
        .await;
    assert_eq!(e.code, 401, "{}", e.message);
    a.signin("admin", PASSWORD).await;
    b.signin("bob", "bobpw").await;
    let e = a
        .err(
            "watch",
            "WatchRequest",
            &pb::WatchRequest {
                collectionname: "entities".into(),
                paths: vec!["$.[?(@._type = 'x')]".into()],
            },
        )
        .await;
    assert_eq!(e.code, 400, "{}", e.message);
    assert!(
        e.message.contains("$.[?(@._type = 'x')]"),
        "names the path: {}",
        e.message
    );
    assert!(e.message.contains("'==' or '!='"), "{}", e.message);
    let e = a
        .err("unwatch", "UnWatchRequest", &pb::UnWatchRequest { id: "nope".into() })
        .await;
    assert_eq!(e.code, 404, "{}", e.message);

    let wa = a.watch("entities", &[]).await;
    let wb = b.watch("entities", &[]).await;
    let typed = a.watch("entities", &[r#"{"_type": "order"}"#]).await;

    // The admin's document: bob may not read it, so he hears nothing of it.
    let secret = a.insert("entities", json!({"name": "secret"})).await;
    let id = secret["_id"].as_str().expect("id").to_owned();
    let ev = a.watch_event().await;
    assert_eq!((ev.id.as_str(), ev.operation.as_str()), (wa.as_str(), "insert"));
    assert_eq!(doc_of(&ev)["name"], "secret");
    let mut updated = secret.clone();
    updated["name"] = json!("secret2");
    let _: pb::UpdateOneResponse = a
        .ok(
            "updateone",
            "UpdateOneRequest",
            &pb::UpdateOneRequest {
                collectionname: "entities".into(),
                item: updated.to_string(),
                ..Default::default()
            },
        )
        .await;
    let ev = a.watch_event().await;
    assert_eq!(ev.operation, "update");
    assert_eq!(doc_of(&ev)["name"], "secret2");
    let _: pb::DeleteOneResponse = a
        .ok(
            "deleteone",
            "DeleteOneRequest",
            &pb::DeleteOneRequest {
                collectionname: "entities".into(),
                id: id.clone(),
                ..Default::default()
            },
        )
        .await;
    let ev = a.watch_event().await;
    assert_eq!(ev.operation, "delete");
    assert_eq!(doc_of(&ev)["_id"], id.as_str());

    // Bob's own document reaches both; the typed watch only sees orders.
    b.insert("entities", json!({"name": "bobs", "_type": "order"})).await;
    let ev = b.watch_event().await;
    assert_eq!((ev.id.as_str(), ev.operation.as_str()), (wb.as_str(), "insert"));
    assert_eq!(doc_of(&ev)["name"], "bobs");
    let mut seen = vec![a.watch_event().await.id, a.watch_event().await.id];
    seen.sort();
    let mut want = vec![wa.clone(), typed.clone()];
    want.sort();
    assert_eq!(seen, want, "both of the admin's watches saw the order");
    // Other collections are not watched.
    b.insert("other", json!({"name": "elsewhere"})).await;
    b.quiet().await;

    // After unwatch, nothing more; the other watch carries on.
    let _: pb::UnWatchResponse = b
        .ok("unwatch", "UnWatchRequest", &pb::UnWatchRequest { id: wb.clone() })
        .await;
    let e = b.err("unwatch", "UnWatchRequest", &pb::UnWatchRequest { id: wb }).await;
    let events = s.stats.snapshot()["watch_events"].as_u64().unwrap_or(0);
    assert!(events >= 6, "watch events are counted: {events}");
    assert_eq!(e.code, 404, "a watch ends once: {}", e.message);
    b.insert("entities", json!({"name": "unseen"})).await;
    b.quiet().await;
    let ev = a.watch_event().await;
    assert_eq!(
        (ev.id.as_str(), doc_of(&ev)["name"].as_str()),
        (wa.as_str(), Some("unseen"))
    );
    a.quiet().await;
}

#[tokio::test]
async fn a_watcher_that_does_not_keep_up_is_dropped_not_waited_for() {
    let dir = tempfile::tempdir().expect("tempdir");
    let node = Node::open(NodeConfig {
        data_dir: dir.path().to_path_buf(),
        site: "a".into(),
        admin_password: Some(PASSWORD.into()),
    })
    .expect("open")
    .node;
    let limits = GrpcLimits {
        event_queue: 1,
        watch_stall: Duration::from_millis(100),
        max_watches: 1,
        ..GrpcLimits::default()
    };
    let d = ocmesh_api::openiap::Dispatcher::new(node, limits);
    let (session, mut events) = d.open_session("test", "here");
    let request = |command: &str, name: &str, msg: &dyn Fn() -> Any| pb::Envelope {
        command: command.into(),
        id: format!("{command}-{name}"),
        data: Some(msg()),
        ..Default::default()
    };
    let signin = d
        .handle(
            &session,
            request("signin", "1", &|| {
                any(
                    "SigninRequest",
                    &pb::SigninRequest {
                        username: "admin".into(),
                        password: PASSWORD.into(),
                        ..Default::default()
                    },
                )
            }),
        )
        .await;
    let session = signin.session.expect("signed in");
    let watch = || {
        request("watch", "w", &|| {
            any(
                "WatchRequest",
                &pb::WatchRequest {
                    collectionname: "entities".into(),
                    paths: vec![],
                },
            )
        })
    };
    let h = d.handle(&session, watch()).await;
    assert_eq!(h.replies[0].command, "watchreply");
    // One watch per connection here: a second is refused.
    let h = d.handle(&session, watch()).await;
    assert_eq!(h.replies[0].command, "error");
    assert_eq!(error_of(&h.replies[0]).code, 429);

    for i in 0..5 {
        let h = d
            .handle(
                &session,
                request("insertone", &i.to_string(), &|| {
                    any(
                        "InsertOneRequest",
                        &pb::InsertOneRequest {
                            collectionname: "entities".into(),
                            item: json!({"n": i}).to_string(),
                            ..Default::default()
                        },
                    )
                }),
            )
            .await;
        assert_eq!(h.replies[0].command, "insertonereply", "writes never wait for watchers");
    }
    tokio::time::sleep(Duration::from_millis(400)).await;
    let first = tokio::time::timeout(WAIT, events.recv())
        .await
        .expect("event")
        .expect("open");
    assert_eq!(first.command, "watchevent");
    let dropped = tokio::time::timeout(WAIT, events.recv())
        .await
        .expect("event")
        .expect("open");
    assert_eq!(dropped.command, "error", "{dropped:?}");
    let e = error_of(&dropped);
    assert!(e.message.contains("did not take its events"), "{}", e.message);
    assert_eq!(
        d.live_stats()
            .watches_dropped
            .load(std::sync::atomic::Ordering::Relaxed),
        1
    );
    // The dropped watch is gone: a new one may start.
    let h = d.handle(&session, watch()).await;
    assert_eq!(h.replies[0].command, "watchreply");
    d.close_session(&session).await;
}

#[tokio::test]
async fn message_queues_carry_an_rpc_round_trip_between_two_clients() {
    let s = server(GrpcLimits::default()).await;
    let mut service = connect(s.addr).await;
    let mut caller = connect(s.addr).await;
    let e = service
        .err(
            "registerqueue",
            "RegisterQueueRequest",
            &pb::RegisterQueueRequest { queuename: "x".into() },
        )
        .await;
    assert_eq!(e.code, 401, "{}", e.message);
    service.signin("admin", PASSWORD).await;
    caller.signin("admin", PASSWORD).await;

    assert_eq!(service.register_queue("rpc-svc").await, "rpc-svc");
    let reply_queue = caller.register_queue("").await;
    assert!(!reply_queue.is_empty() && reply_queue != "rpc-svc");

    // The request: to the service's queue, with replyto and correlationId.
    let sent = caller
        .queue_message(pb::QueueMessageRequest {
            queuename: "rpc-svc".into(),
            correlation_id: "corr-1".into(),
            replyto: reply_queue.clone(),
            data: json!({"payload": {"question": 6}}).to_string(),
            ..Default::default()
        })
        .await;
    assert_eq!(sent.command, "queuemessagereply", "{:?}", error_text(&sent));
    let req = service.queue_event().await;
    assert_eq!(req.queuename, "rpc-svc");
    assert_eq!(
        (req.correlation_id.as_str(), req.replyto.as_str()),
        ("corr-1", reply_queue.as_str())
    );
    let asked: Value = serde_json::from_str(&req.data).expect("JSON data");
    assert_eq!(asked["payload"]["question"], 6);

    // The answer goes to replyto with the same correlationId.
    let answered = service
        .queue_message(pb::QueueMessageRequest {
            queuename: req.replyto.clone(),
            correlation_id: req.correlation_id.clone(),
            data: json!({"payload": {"answer": 42}}).to_string(),
            ..Default::default()
        })
        .await;
    assert_eq!(answered.command, "queuemessagereply", "{:?}", error_text(&answered));
    let reply = caller.queue_event().await;
    assert_eq!(reply.queuename, reply_queue);
    assert_eq!((reply.correlation_id.as_str(), reply.replyto.as_str()), ("corr-1", ""));
    let answer: Value = serde_json::from_str(&reply.data).expect("JSON data");
    assert_eq!(answer["payload"]["answer"], 42);

    // Exchanges: a fanout with a queue of its own.
    let e = caller
        .err(
            "registerexchange",
            "RegisterExchangeRequest",
            &pb::RegisterExchangeRequest {
                exchangename: "news".into(),
                algorithm: "shout".into(),
                ..Default::default()
            },
        )
        .await;
    assert_eq!(e.code, 400, "{}", e.message);
    let ex: pb::RegisterExchangeResponse = service
        .ok(
            "registerexchange",
            "RegisterExchangeRequest",
            &pb::RegisterExchangeRequest {
                exchangename: "news".into(),
                algorithm: "fanout".into(),
                addqueue: true,
                ..Default::default()
            },
        )
        .await;
    assert!(!ex.queuename.is_empty());
    let sent = caller
        .queue_message(pb::QueueMessageRequest {
            exchangename: "news".into(),
            data: "\"hello\"".into(),
            ..Default::default()
        })
        .await;
    assert_eq!(sent.command, "queuemessagereply", "{:?}", error_text(&sent));
    let ev = service.queue_event().await;
    assert_eq!(
        (ev.queuename.as_str(), ev.data.as_str()),
        (ex.queuename.as_str(), "\"hello\"")
    );

    // Errors: no such queue, no target, unknown registration.
    let e = error_of(
        &caller
            .queue_message(pb::QueueMessageRequest {
                queuename: "nobody-listens".into(),
                data: "{}".into(),
                ..Default::default()
            })
            .await,
    );
    assert_eq!(e.code, 404, "{}", e.message);
    let e = error_of(&caller.queue_message(pb::QueueMessageRequest::default()).await);
    assert_eq!(e.code, 400, "{}", e.message);
    let e = caller
        .err(
            "unregisterqueue",
            "UnRegisterQueueRequest",
            &pb::UnRegisterQueueRequest {
                queuename: "rpc-svc".into(),
            },
        )
        .await;
    assert_eq!(
        e.code, 404,
        "only the registering connection unregisters: {}",
        e.message
    );

    // Unregistered: messages wait in the named queue, and no events come.
    let _: pb::UnRegisterQueueResponse = service
        .ok(
            "unregisterqueue",
            "UnRegisterQueueRequest",
            &pb::UnRegisterQueueRequest {
                queuename: "rpc-svc".into(),
            },
        )
        .await;
    let sent = caller
        .queue_message(pb::QueueMessageRequest {
            queuename: "rpc-svc".into(),
            data: "{}".into(),
            ..Default::default()
        })
        .await;
    assert_eq!(sent.command, "queuemessagereply");
    service.quiet().await;

    // Closing the caller deletes its temporary reply queue.
    drop(caller);
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let r = service
            .queue_message(pb::QueueMessageRequest {
                queuename: reply_queue.clone(),
                data: "{}".into(),
                ..Default::default()
            })
            .await;
        if r.command == "error" {
            assert_eq!(error_of(&r).code, 404);
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the temporary queue outlived its connection"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn collections_indexes_upserts_and_clients() {
    let s = server(GrpcLimits::default()).await;
    with_bob(&s).await;
    let mut a = connect(s.addr).await;
    let e = a
        .err(
            "listcollections",
            "ListCollectionsRequest",
            &pb::ListCollectionsRequest::default(),
        )
        .await;
    assert_eq!(e.code, 401, "{}", e.message);
    a.signin("admin", PASSWORD).await;
    a.insert("entities", json!({"name": "x"})).await;
    let thing = a.insert("things", json!({"name": "y"})).await;
    let r: pb::ListCollectionsResponse = a
        .ok(
            "listcollections",
            "ListCollectionsRequest",
            &pb::ListCollectionsRequest::default(),
        )
        .await;
    let names: Vec<Value> = serde_json::from_str(&r.results).expect("JSON");
    let names: Vec<&str> = names.iter().filter_map(|c| c["name"].as_str()).collect();
    assert!(names.contains(&"entities") && names.contains(&"things"), "{names:?}");
    assert!(names.windows(2).all(|w| w[0] < w[1]), "sorted, once each: {names:?}");

    // createcollection accepts a valid name (collections are implicit).
    let _: pb::CreateCollectionResponse = a
        .ok(
            "createcollection",
            "CreateCollectionRequest",
            &pb::CreateCollectionRequest {
                collectionname: "fresh".into(),
                ..Default::default()
            },
        )
        .await;
    let e = a
        .err(
            "createcollection",
            "CreateCollectionRequest",
            &pb::CreateCollectionRequest {
                collectionname: "capped".into(),
                capped: true,
                ..Default::default()
            },
        )
        .await;
    assert_eq!(e.code, 501, "{}", e.message);
    let e = a
        .err(
            "createcollection",
            "CreateCollectionRequest",
            &pb::CreateCollectionRequest::default(),
        )
        .await;
    assert_eq!(e.code, 400, "{}", e.message);
    // dropcollection: admins only, never the node's own collections; every
    // document gets a delete version, and the collection is no longer listed.
    a.insert("things", json!({"name": "z"})).await;
    let drop_req = |name: &str| pb::DropCollectionRequest {
        collectionname: name.into(),
    };
    let mut bob = connect(s.addr).await;
    bob.signin("bob", "bobpw").await;
    let e = bob
        .err("dropcollection", "DropCollectionRequest", &drop_req("things"))
        .await;
    assert_eq!(e.code, 403, "{}", e.message);
    assert!(
        e.message.contains("things") && e.message.contains("admins"),
        "{}",
        e.message
    );
    for system in ["users", "mq", "workitems", "fs.files", "files"] {
        let e = a
            .err("dropcollection", "DropCollectionRequest", &drop_req(system))
            .await;
        assert_eq!(e.code, 403, "{system}: {}", e.message);
        assert!(
            e.message.contains(&format!("{system} is one of the node's own")),
            "{}",
            e.message
        );
    }
    for bad in ["", "system.x"] {
        let e = a.err("dropcollection", "DropCollectionRequest", &drop_req(bad)).await;
        assert_eq!(e.code, 400, "{bad:?}: {}", e.message);
    }
    let _: pb::CreateIndexResponse = a
        .ok(
            "createindex",
            "CreateIndexRequest",
            &pb::CreateIndexRequest {
                collectionname: "things".into(),
                index: r#"{"name": 1}"#.into(),
                ..Default::default()
            },
        )
        .await;
    let _: pb::DropCollectionResponse = a
        .ok("dropcollection", "DropCollectionRequest", &drop_req("things"))
        .await;
    assert!(a.query("things", json!({})).await.is_empty(), "every document is gone");
    let thing_id = thing["_id"].as_str().expect("id");
    let history = s.node.versions("things", thing_id).expect("history");
    assert_eq!(history.len(), 2, "the insert and its delete version: {history:?}");
    let left = s.node.indexes("things").expect("indexes");
    assert!(
        !left.contains(&"name".to_owned()),
        "the created index went too: {left:?}"
    );
    let r: pb::ListCollectionsResponse = a
        .ok(
            "listcollections",
            "ListCollectionsRequest",
            &pb::ListCollectionsRequest::default(),
        )
        .await;
    assert!(!r.results.contains("\"things\""), "{}", r.results);
    assert!(r.results.contains("\"entities\""), "{}", r.results);
    // Dropping it again (nothing left) is not an error.
    let _: pb::DropCollectionResponse = a
        .ok("dropcollection", "DropCollectionRequest", &drop_req("things"))
        .await;

    // Indexes: one field each, listed MongoDB-style, dropped by name.
    let created: pb::CreateIndexResponse = a
        .ok(
            "createindex",
            "CreateIndexRequest",
            &pb::CreateIndexRequest {
                collectionname: "entities".into(),
                index: r#"{"name": 1}"#.into(),
                options: "{}".into(),
                ..Default::default()
            },
        )
        .await;
    assert_eq!(created.result, "name_1");
    for bad in [r#"{"a": 1, "b": 1}"#, r#"{"a": "text"}"#, "not json"] {
        let e = a
            .err(
                "createindex",
                "CreateIndexRequest",
                &pb::CreateIndexRequest {
                    collectionname: "entities".into(),
                    index: bad.into(),
                    ..Default::default()
                },
            )
            .await;
        assert_eq!(e.code, 400, "{bad}: {}", e.message);
    }
    let e = a
        .err(
            "createindex",
            "CreateIndexRequest",
            &pb::CreateIndexRequest {
                collectionname: "entities".into(),
                index: r#"{"a": 1}"#.into(),
                options: r#"{"unique": true}"#.into(),
                ..Default::default()
            },
        )
        .await;
    assert_eq!(e.code, 400, "{}", e.message);
    let indexes = |r: pb::GetIndexesResponse| -> Vec<String> {
        let v: Vec<Value> = serde_json::from_str(&r.results).expect("JSON");
        v.iter().filter_map(|i| i["name"].as_str().map(str::to_owned)).collect()
    };
    let get = pb::GetIndexesRequest {
        collectionname: "entities".into(),
    };
    let r: pb::GetIndexesResponse = a.ok("getindexes", "GetIndexesRequest", &get).await;
    assert_eq!(indexes(r), ["_id_", "_type_1", "name_1"]);
    let drop_req = |name: &str| pb::DropIndexRequest {
        collectionname: "entities".into(),
        name: name.into(),
    };
    let _: pb::DropIndexResponse = a.ok("dropindex", "DropIndexRequest", &drop_req("name_1")).await;
    let r: pb::GetIndexesResponse = a.ok("getindexes", "GetIndexesRequest", &get).await;
    assert_eq!(indexes(r), ["_id_", "_type_1"]);
    let e = a.err("dropindex", "DropIndexRequest", &drop_req("name_1")).await;
    assert_eq!(e.code, 404, "{}", e.message);
    let e = a.err("dropindex", "DropIndexRequest", &drop_req("_id_")).await;
    assert_eq!(e.code, 400, "{}", e.message);

    // insertorupdatemany: by a uniqueness field, inserting then updating.
    let upsert = |items: Value| pb::InsertOrUpdateManyRequest {
        collectionname: "things".into(),
        uniqeness: "sku".into(),
        items: items.to_string(),
        ..Default::default()
    };
    let r: pb::InsertOrUpdateManyResponse = a
        .ok(
            "insertorupdatemany",
            "InsertOrUpdateManyRequest",
            &upsert(json!([{"sku": "a", "n": 1}, {"sku": "b", "n": 1}])),
        )
        .await;
    let first: Vec<Value> = serde_json::from_str(&r.results).expect("JSON");
    assert_eq!(first.len(), 2);
    let r: pb::InsertOrUpdateManyResponse = a
        .ok(
            "insertorupdatemany",
            "InsertOrUpdateManyRequest",
            &upsert(json!([{"sku": "a", "n": 2}])),
        )
        .await;
    let second: Vec<Value> = serde_json::from_str(&r.results).expect("JSON");
    assert_eq!(second[0]["_id"], first[0]["_id"], "updated in place");
    assert_eq!(second[0]["n"], 2);
    assert_eq!(a.query("things", json!({"sku": {"$exists": true}})).await.len(), 2);
    let e = a
        .err(
            "insertorupdatemany",
            "InsertOrUpdateManyRequest",
            &upsert(json!({"not": "a list"})),
        )
        .await;
    assert_eq!(e.code, 400, "{}", e.message);

    // getclients: the admin sees every connection, bob only his own.
    let mut b = bob;
    let clients = |c: pb::CustomCommandResponse| -> Vec<Value> { serde_json::from_str(&c.result).expect("JSON") };
    let get = pb::CustomCommandRequest {
        command: "getclients".into(),
        ..Default::default()
    };
    let all = clients(a.ok("customcommand", "CustomCommandRequest", &get).await);
    let users: Vec<&str> = all.iter().filter_map(|c| c["username"].as_str()).collect();
    assert_eq!(users, ["admin", "bob"], "{all:?}");
    assert!(
        all.iter()
            .all(|c| c["transport"] == "grpc" && c["connected"].is_string()),
        "{all:?}"
    );
    let mine = clients(b.ok("customcommand", "CustomCommandRequest", &get).await);
    assert_eq!(mine.len(), 1, "{mine:?}");
    assert_eq!(mine[0]["username"], "bob");
    let e = a
        .err(
            "customcommand",
            "CustomCommandRequest",
            &pb::CustomCommandRequest {
                command: "shutdown".into(),
                ..Default::default()
            },
        )
        .await;
    assert_eq!(e.code, 400, "{}", e.message);
    // A closed connection leaves the list.
    drop(b);
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let now = clients(a.ok("customcommand", "CustomCommandRequest", &get).await);
        if now.len() == 1 {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "bob's closed connection is still listed: {now:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn long_lived_connections_get_a_refreshed_token_before_expiry() {
    // Refresh two seconds after sign-in (the token lives 24 h).
    let lead = Duration::from_secs(24 * 3600 - 2);
    let s = server(GrpcLimits {
        token_refresh_lead: lead,
        ..GrpcLimits::default()
    })
    .await;
    let mut c = connect(s.addr).await;
    let signed = c.signin("admin", PASSWORD).await;
    let ev = c.event("refreshtoken").await;
    let r = pb::RefreshToken::decode(ev.data.expect("data").value.as_slice()).expect("RefreshToken");
    assert_eq!(r.username, "admin");
    assert_eq!(r.user.expect("user").username, "admin");
    assert_ne!(r.jwt, signed.jwt, "a new token");
    // The new token works, and the connection carries on with it.
    c.jwt = r.jwt.clone();
    assert_eq!(c.query("entities", json!({})).await.len(), 0);
    c.jwt.clear();
    assert_eq!(c.call("ping", "PingRequest", &pb::PingRequest {}).await.command, "pong");
    // It repeats for as long as the connection lives.
    let ev = c.event("refreshtoken").await;
    let again = pb::RefreshToken::decode(ev.data.expect("data").value.as_slice()).expect("RefreshToken");
    assert_ne!(again.jwt, r.jwt);

    // With the default lead, nothing arrives soon.
    let s = server(GrpcLimits::default()).await;
    let mut c = connect(s.addr).await;
    c.signin("admin", PASSWORD).await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    c.quiet().await;
}

#[tokio::test]
async fn aggregate_runs_a_pipeline_over_what_the_caller_may_read() {
    let s = server(GrpcLimits::default()).await;
    with_bob(&s).await;
    let mut a = connect(s.addr).await;
    a.signin("admin", PASSWORD).await;
    let mut b = connect(s.addr).await;
    b.signin("bob", "bobpw").await;
    for (region, n) in [("north", 1), ("north", 2), ("south", 5)] {
        b.insert("sales", json!({"_type": "sale", "region": region, "n": n}))
            .await;
    }
    a.insert("sales", json!({"_type": "sale", "region": "north", "n": 100}))
        .await;
    a.insert("sales", json!({"_type": "other", "region": "west", "n": 7}))
        .await;

    async fn agg(c: &mut Conn, pipeline: Value) -> Vec<Value> {
        let r: pb::AggregateResponse = c
            .ok(
                "aggregate",
                "AggregateRequest",
                &pb::AggregateRequest {
                    collectionname: "sales".into(),
                    aggregates: pipeline.to_string(),
                    ..Default::default()
                },
            )
            .await;
        serde_json::from_str(&r.results).expect("JSON")
    }
    // Documents come in id order; sort first so $push has a defined order.
    let by_region = json!([
        {"$match": {"_type": "sale"}},
        {"$sort": {"n": 1}},
        {"$group": {"_id": "$region", "total": {"$sum": "$n"}, "avg": {"$avg": "$n"}, "count": {"$sum": 1},
                    "max": {"$max": "$n"}, "ns": {"$push": "$n"}}},
        {"$sort": {"_id": 1}}
    ]);
    // Bob sees only his own sales.
    let r = agg(&mut b, by_region.clone()).await;
    assert_eq!(
        r,
        vec![
            json!({"_id": "north", "total": 3, "avg": 1.5, "count": 2, "max": 2, "ns": [1, 2]}),
            json!({"_id": "south", "total": 5, "avg": 5.0, "count": 1, "max": 5, "ns": [5]}),
        ]
    );
    // The admin sees everything.
    let r = agg(&mut a, by_region).await;
    assert_eq!(r[0]["total"], 103, "{r:?}");
    let r = agg(&mut a, json!([{"$count": "n"}])).await;
    assert_eq!(r, vec![json!({"n": 5})]);
    let r = agg(
        &mut a,
        json!([{"$sort": {"n": -1}}, {"$skip": 1}, {"$limit": 2}, {"$project": {"n": 1, "_id": 0}}]),
    )
    .await;
    assert_eq!(r, vec![json!({"n": 7}), json!({"n": 5})]);
    let r = agg(
        &mut a,
        json!([{"$group": {"_id": null, "regions": {"$addToSet": "$region"}}}]),
    )
    .await;
    assert_eq!(r[0]["regions"].as_array().map(Vec::len), Some(3), "{r:?}");

    for (bad, what) in [
        (json!([{"$lookup": {}}]), "$lookup"),
        (json!("nope"), "array"),
        (json!([{"$project": {"x": "$n"}}]), "$project"),
        (
            json!([{"$group": {"_id": "$region", "x": {"$median": "$n"}}}]),
            "$median",
        ),
        (json!([{"$limit": -1}]), "$limit"),
        (json!([{"$match": {"n": {"$where": 1}}}]), "$match"),
    ] {
        let e = a
            .err(
                "aggregate",
                "AggregateRequest",
                &pb::AggregateRequest {
                    collectionname: "sales".into(),
                    aggregates: bad.to_string(),
                    ..Default::default()
                },
            )
            .await;
        assert_eq!(e.code, 400, "{bad}: {}", e.message);
        assert!(e.message.contains(what), "{bad}: {}", e.message);
    }
}

#[tokio::test]
async fn download_streams_a_file_in_chunks_then_replies() {
    let s = server(GrpcLimits::default()).await;
    with_bob(&s).await;
    let admin = ocmesh_node::Principal {
        id: "000000000000000000000001".into(),
        name: "admin".into(),
        roles: vec![ocmesh_node::acl::ADMINS_ROLE_ID.into()],
    };
    let content: Vec<u8> = (0..600 * 1024u32).map(|i| (i % 251) as u8).collect();
    let mut up = s.node.upload(1 << 30);
    up.write(&content).await.expect("write");
    let file = up
        .finish("report.bin", "application/x-test", serde_json::Map::new(), &admin)
        .await
        .expect("finish");
    let file_id = file["_id"].as_str().expect("id").to_owned();

    let mut c = connect(s.addr).await;
    c.signin("admin", PASSWORD).await;
    for req in [
        pb::DownloadRequest {
            id: file_id.clone(),
            ..Default::default()
        },
        pb::DownloadRequest {
            filename: "report.bin".into(),
            ..Default::default()
        },
    ] {
        let id = c.send("download", Some(any("DownloadRequest", &req))).await;
        let mut commands = Vec::new();
        let mut got = Vec::new();
        let reply = loop {
            let m = c.recv().await;
            assert_eq!(m.rid, id, "every part answers the download: {m:?}");
            commands.push(m.command.clone());
            let data = m.data.clone().expect("data");
            match m.command.as_str() {
                "beginstream" => {
                    let b = pb::BeginStream::decode(data.value.as_slice()).expect("BeginStream");
                    assert_eq!(b.stat.expect("stat").size, content.len() as i32);
                    assert_eq!(b.checksum, file["blake3"].as_str().expect("blake3"));
                }
                "stream" => got.extend(pb::Stream::decode(data.value.as_slice()).expect("Stream").data),
                "endstream" => {}
                "downloadreply" => break pb::DownloadResponse::decode(data.value.as_slice()).expect("reply"),
                other => panic!("unexpected {other}: {:?}", error_text(&m)),
            }
        };
        assert_eq!(commands.first().map(String::as_str), Some("beginstream"));
        assert_eq!(commands[commands.len() - 2], "endstream", "{commands:?}");
        assert!(commands.iter().filter(|c| *c == "stream").count() >= 3, "{commands:?}");
        assert!(got == content, "the bytes arrive whole and in order");
        assert_eq!(
            (reply.id.as_str(), reply.filename.as_str(), reply.mimetype.as_str()),
            (file_id.as_str(), "report.bin", "application/x-test")
        );
    }
    // Errors: nothing named, nothing there, and what bob may not read.
    let e = c
        .err("download", "DownloadRequest", &pb::DownloadRequest::default())
        .await;
    assert_eq!(e.code, 400, "{}", e.message);
    let e = c
        .err(
            "download",
            "DownloadRequest",
            &pb::DownloadRequest {
                filename: "absent.bin".into(),
                ..Default::default()
            },
        )
        .await;
    assert_eq!(e.code, 404, "{}", e.message);
    let mut b = connect(s.addr).await;
    b.signin("bob", "bobpw").await;
    let e = b
        .err(
            "download",
            "DownloadRequest",
            &pb::DownloadRequest {
                id: file_id,
                ..Default::default()
            },
        )
        .await;
    assert_eq!(e.code, 404, "{}", e.message);
}

impl Conn {
    /// Sends an upload's request and parts; returns the upload's id.
    async fn upload(&mut self, filename: &str, parts: &[&[u8]]) -> String {
        let id = self
            .send(
                "upload",
                Some(any(
                    "UploadRequest",
                    &pb::UploadRequest {
                        filename: filename.into(),
                        mimetype: "text/plain".into(),
                    },
                )),
            )
            .await;
        let part = |command: &str, data: Any| pb::Envelope {
            command: command.into(),
            rid: id.clone(),
            data: Some(data),
            ..Default::default()
        };
        let mut envs = vec![part("beginstream", any("BeginStream", &pb::BeginStream::default()))];
        for p in parts {
            envs.push(part("stream", any("Stream", &pb::Stream { data: p.to_vec() })));
        }
        envs.push(part("endstream", any("EndStream", &pb::EndStream {})));
        for e in envs {
            self.tx.send(e).await.expect("stream open");
        }
        id
    }
}

#[tokio::test]
async fn upload_takes_parts_in_order_and_answers_after_endstream() {
    let s = server(GrpcLimits {
        max_upload_bytes: 100_000,
        ..GrpcLimits::default()
    })
    .await;
    let mut c = connect(s.addr).await;
    c.signin("admin", PASSWORD).await;
    let parts: Vec<Vec<u8>> = (0..5u8).map(|i| vec![b'a' + i; 10_000]).collect();
    let refs: Vec<&[u8]> = parts.iter().map(Vec::as_slice).collect();
    let id = c.upload("notes.txt", &refs).await;
    let reply = c.recv().await;
    assert_eq!(
        (reply.command.as_str(), reply.rid.as_str()),
        ("uploadreply", id.as_str()),
        "{:?}",
        error_text(&reply)
    );
    let r = pb::UploadResponse::decode(reply.data.expect("data").value.as_slice()).expect("UploadResponse");
    assert_eq!((r.filename.as_str(), r.bytes, r.chunks), ("notes.txt", 50_000, 5));
    let doc = s.node.file(&r.id).expect("stored");
    assert_eq!(doc["contentType"], "text/plain");
    // What went up comes down, byte for byte.
    let did = c
        .send(
            "download",
            Some(any(
                "DownloadRequest",
                &pb::DownloadRequest {
                    id: r.id.clone(),
                    ..Default::default()
                },
            )),
        )
        .await;
    let mut got = Vec::new();
    loop {
        let m = c.recv().await;
        assert_eq!(m.rid, did);
        match m.command.as_str() {
            "stream" => got.extend(
                pb::Stream::decode(m.data.expect("data").value.as_slice())
                    .expect("Stream")
                    .data,
            ),
            "downloadreply" => break,
            _ => {}
        }
    }
    assert!(got == parts.concat(), "round trip");

    // Over the size limit: an error answers the upload, and nothing is named.
    let big = vec![0u8; 60_000];
    let id = c.upload("big.bin", &[&big, &big]).await;
    let e = c.recv().await;
    assert_eq!((e.command.as_str(), e.rid.as_str()), ("error", id.as_str()));
    assert_eq!(error_of(&e).code, 413, "{}", error_of(&e).message);
    // Its later parts are ignored quietly, and the stream lives on.
    c.quiet().await;
    // A part naming no open upload is an error.
    let e = c.err("stream", "Stream", &pb::Stream { data: b"x".to_vec() }).await;
    assert_eq!(e.code, 404, "{}", e.message);
    let files = c.query("fs.files", json!({"filename": "big.bin"})).await;
    assert!(files.is_empty(), "{files:?}");
    // Errors on the upload request itself.
    let e = c
        .err(
            "upload",
            "UploadRequest",
            &pb::UploadRequest {
                filename: String::new(),
                mimetype: String::new(),
            },
        )
        .await;
    assert_eq!(e.code, 400, "{}", e.message);
    assert_eq!(c.call("ping", "PingRequest", &pb::PingRequest {}).await.command, "pong");
}

fn file(filename: &str, content: &[u8], compressed: bool) -> pb::WorkitemFile {
    pb::WorkitemFile {
        filename: filename.into(),
        compressed,
        file: content.to_vec(),
        ..Default::default()
    }
}

async fn pop_files(c: &mut Conn, queue: &str, includefiles: bool) -> Option<pb::Workitem> {
    let req = pb::PopWorkitemRequest {
        wiq: queue.into(),
        includefiles,
        ..Default::default()
    };
    let r: pb::PopWorkitemResponse = c.ok("popworkitem", "PopWorkitemRequest", &req).await;
    r.workitem
}

async fn add_queue(c: &mut Conn, name: &str, success_wiq: &str) -> pb::WorkItemQueue {
    let q: pb::AddWorkItemQueueResponse = c
        .ok(
            "addworkitemqueue",
            "AddWorkItemQueueRequest",
            &pb::AddWorkItemQueueRequest {
                name: name.into(),
                success_wiq: success_wiq.into(),
                ..Default::default()
            },
        )
        .await;
    q.workitemqueue.expect("queue")
}

/// The `_id`s an `_acl` names.
fn acl_ids(doc: &Value) -> Vec<String> {
    let mut ids: Vec<String> = doc["_acl"]
        .as_array()
        .map(|a| a.iter().filter_map(|e| e["_id"].as_str().map(str::to_owned)).collect())
        .unwrap_or_default();
    ids.sort();
    ids.dedup();
    ids
}

#[tokio::test]
async fn work_item_files_are_stored_referenced_and_popped_with_content() {
    let s = server(GrpcLimits::default()).await;
    with_bob(&s).await;
    let mut a = connect(s.addr).await;
    a.signin("admin", PASSWORD).await;
    add_queue(&mut a, "filedone", "").await;
    add_queue(&mut a, "filejobs", "filedone").await;
    let gz: Vec<u8> = vec![
        0x1f, 0x8b, 8, 0, 0, 0, 0, 0, 0, 3, 0xcb, 0x48, 0xcd, 0xc9, 0xc9, 0x07, 0,
    ];

    // Pushed with content: the reply (and the node) hold references only.
    let pushed: pb::PushWorkitemResponse = a
        .ok(
            "pushworkitem",
            "PushWorkitemRequest",
            &pb::PushWorkitemRequest {
                wiq: "filejobs".into(),
                name: "refs only".into(),
                payload: "{}".into(),
                files: vec![file("a.txt", b"hello a", false)],
                ..Default::default()
            },
        )
        .await;
    let first = pushed.workitem.expect("workitem");
    assert_eq!(first.files.len(), 1);
    assert!(first.files[0].file.is_empty(), "the reply carries no content");
    let a_id = first.files[0].id.clone();
    assert!(!a_id.is_empty() && first.files[0].filename == "a.txt");
    let stored = s.node.file(&a_id).expect("the file is stored through the file API");
    assert_eq!(
        (stored["filename"].as_str(), stored["length"].as_u64()),
        (Some("a.txt"), Some(7))
    );
    let item = s.node.get("workitems", &first.id).expect("item");
    assert_eq!(
        item["files"],
        json!([{"_id": a_id, "filename": "a.txt", "compressed": false}])
    );
    // The file has the item's ACL (the queue's, plus the pusher).
    assert_eq!(acl_ids(&stored), acl_ids(&item), "file {stored} item {item}");

    let pushed: pb::PushWorkitemsResponse = a
        .ok(
            "pushworkitems",
            "PushWorkitemsRequest",
            &pb::PushWorkitemsRequest {
                wiq: "filejobs".into(),
                items: vec![pb::Workitem {
                    name: "with content".into(),
                    payload: "{}".into(),
                    files: vec![
                        file("b.txt", b"hello b", false),
                        file("c.gz", &gz, true),
                        file("empty.txt", b"", false),
                        pb::WorkitemFile {
                            id: a_id.clone(),
                            filename: "a.txt".into(),
                            ..Default::default()
                        },
                    ],
                    ..Default::default()
                }],
                ..Default::default()
            },
        )
        .await;
    let second = pushed.workitems[0].clone();
    assert_eq!(second.files.len(), 4);
    assert_eq!(second.files[3].id, a_id, "a reference to a stored file passes through");

    // A second client pops: without includefiles, references only.
    let mut b = connect(s.addr).await;
    b.signin("admin", PASSWORD).await;
    let got = pop_files(&mut b, "filejobs", false).await.expect("item");
    assert_eq!(got.id, first.id);
    assert!(
        got.files.iter().all(|f| f.file.is_empty() && !f.id.is_empty()),
        "{got:?}"
    );
    // With includefiles, the content, and the compressed flag as pushed.
    let got = pop_files(&mut b, "filejobs", true).await.expect("item");
    assert_eq!(got.id, second.id);
    let content: Vec<(&str, &[u8], bool)> = got
        .files
        .iter()
        .map(|f| (f.filename.as_str(), f.file.as_slice(), f.compressed))
        .collect();
    assert_eq!(
        content,
        vec![
            ("b.txt", &b"hello b"[..], false),
            ("c.gz", &gz[..], true),
            ("empty.txt", &b""[..], false),
            ("a.txt", &b"hello a"[..], false),
        ]
    );

    // Completed with one more file: the item, and its copy in the success
    // queue, list all of them.
    let mut done = got.clone();
    done.state = "successful".into();
    let updated: pb::UpdateWorkitemResponse = b
        .ok(
            "updateworkitem",
            "UpdateWorkitemRequest",
            &pb::UpdateWorkitemRequest {
                workitem: Some(done),
                files: vec![file("result.txt", b"done", false)],
                ..Default::default()
            },
        )
        .await;
    let updated = updated.workitem.expect("workitem");
    assert_eq!(updated.state, "successful");
    assert_eq!(updated.files.len(), 5, "{updated:?}");
    let routed = pop_files(&mut b, "filedone", true)
        .await
        .expect("routed to the success queue");
    let names: Vec<(&str, &[u8])> = routed
        .files
        .iter()
        .map(|f| (f.filename.as_str(), f.file.as_slice()))
        .collect();
    assert_eq!(names.len(), 5, "{names:?}");
    assert_eq!(names[4], ("result.txt", &b"done"[..]));
    assert_eq!(names[0], ("b.txt", &b"hello b"[..]));

    // A file a work item lists cannot be deleted; one no item lists can.
    let e = a
        .err(
            "deleteone",
            "DeleteOneRequest",
            &pb::DeleteOneRequest {
                collectionname: "fs.files".into(),
                id: a_id.clone(),
                ..Default::default()
            },
        )
        .await;
    assert_eq!(e.code, 409, "{}", e.message);
    assert!(e.message.contains("attached to work item"), "{}", e.message);
    let e = a
        .err(
            "deletemany",
            "DeleteManyRequest",
            &pb::DeleteManyRequest {
                collectionname: "fs.files".into(),
                ids: vec![a_id.clone()],
                ..Default::default()
            },
        )
        .await;
    assert_eq!(e.code, 400, "{}", e.message);
    assert!(s.node.file(&a_id).is_ok(), "still there");

    // Bad files: content without a name, a file with neither content nor id.
    for bad in [file("", b"x", false), pb::WorkitemFile::default()] {
        let e = a
            .err(
                "pushworkitem",
                "PushWorkitemRequest",
                &pb::PushWorkitemRequest {
                    wiq: "filejobs".into(),
                    files: vec![file("ok.txt", b"fine", false), bad],
                    ..Default::default()
                },
            )
            .await;
        assert_eq!(e.code, 400, "{}", e.message);
    }
    // A failed push leaves no file behind.
    let e = a
        .err(
            "pushworkitem",
            "PushWorkitemRequest",
            &pb::PushWorkitemRequest {
                wiq: "filejobs".into(),
                payload: "[1]".into(),
                files: vec![file("orphan.txt", b"x", false)],
                ..Default::default()
            },
        )
        .await;
    assert_eq!(e.code, 400, "{}", e.message);
    assert!(a.query("fs.files", json!({"filename": "orphan.txt"})).await.is_empty());
    assert!(a.query("fs.files", json!({"filename": "ok.txt"})).await.is_empty());
}

#[tokio::test]
async fn work_item_files_respect_acls_and_the_message_limit() {
    let limit = 64 * 1024;
    let s = server(GrpcLimits {
        max_message_bytes: limit,
        ..GrpcLimits::default()
    })
    .await;
    with_bob(&s).await;
    let mut a = connect(s.addr).await;
    a.signin("admin", PASSWORD).await;
    add_queue(&mut a, "big", "").await;
    let push = |name: &str, files: Vec<pb::WorkitemFile>| pb::PushWorkitemRequest {
        wiq: "big".into(),
        name: name.into(),
        files,
        ..Default::default()
    };
    let part = limit * 6 / 10;

    // A request over the limit is refused whole.
    let e = a
        .err(
            "pushworkitem",
            "PushWorkitemRequest",
            &push("huge", vec![file("huge.bin", &vec![7u8; limit + 1], false)]),
        )
        .await;
    assert_eq!(e.code, 413, "{}", e.message);

    // Two files that fit one by one, but not together in one pop's reply.
    let one: pb::PushWorkitemResponse = a
        .ok(
            "pushworkitem",
            "PushWorkitemRequest",
            &push("one", vec![file("p1.bin", &vec![1u8; part], false)]),
        )
        .await;
    let p1 = one.workitem.expect("item").files[0].clone();
    let reference = pb::WorkitemFile {
        file: Vec::new(),
        ..p1.clone()
    };
    let two: pb::PushWorkitemResponse = a
        .ok(
            "pushworkitem",
            "PushWorkitemRequest",
            &push("two", vec![file("p2.bin", &vec![2u8; part], false), reference]),
        )
        .await;
    let two = two.workitem.expect("item");
    let got = pop_files(&mut a, "big", true).await.expect("item one");
    assert_eq!(got.files[0].file, vec![1u8; part]);
    let e = a
        .err(
            "popworkitem",
            "PopWorkitemRequest",
            &pb::PopWorkitemRequest {
                wiq: "big".into(),
                includefiles: true,
                ..Default::default()
            },
        )
        .await;
    assert_eq!(e.code, 413, "{}", e.message);
    assert!(
        e.message.contains(&two.id) && e.message.contains("download"),
        "{}",
        e.message
    );
    let stalled = s.node.get("workitems", &two.id).expect("item");
    assert_eq!(stalled["state"], "processing", "popped; its lease brings it back");

    // Bob holds no right on the queue: he can neither push to it nor read its files.
    let mut bob = connect(s.addr).await;
    bob.signin("bob", "bobpw").await;
    let e = bob
        .err(
            "pushworkitem",
            "PushWorkitemRequest",
            &push("bobs", vec![file("b.bin", b"b", false)]),
        )
        .await;
    assert_eq!(e.code, 404, "{}", e.message);
    assert!(a.query("fs.files", json!({"filename": "b.bin"})).await.is_empty());
    let e = bob
        .err(
            "download",
            "DownloadRequest",
            &pb::DownloadRequest {
                id: p1.id.clone(),
                ..Default::default()
            },
        )
        .await;
    assert_eq!(e.code, 404, "bob cannot read the file: {}", e.message);
}

#[tokio::test]
async fn watch_paths_in_opencores_jsonpath_form_filter_events() {
    let s = server(GrpcLimits::default()).await;
    let mut a = connect(s.addr).await;
    let mut w = connect(s.addr).await;
    a.signin("admin", PASSWORD).await;
    w.signin("admin", PASSWORD).await;
    let typed = w
        .watch(
            "entities",
            &["$.[?(@._type == 'order' && (@.n != 2 || @.rush == true))]"],
        )
        .await;
    let named = w.watch("entities", &[r#"$.[?(@.name == "x")]"#]).await;
    let all = w.watch("entities", &["[]"]).await;

    // Each insert reaches the watches whose path selects it, and `all`.
    let cases = [
        (json!({"_type": "order", "n": 1}), vec![typed.clone(), all.clone()]),
        (json!({"_type": "order", "n": 2}), vec![all.clone()]),
        (
            json!({"_type": "order", "n": 2, "rush": true}),
            vec![typed.clone(), all.clone()],
        ),
        (json!({"_type": "other", "name": "x"}), vec![named.clone(), all.clone()]),
    ];
    for (doc, mut want) in cases {
        a.insert("entities", doc.clone()).await;
        let mut seen = Vec::new();
        for _ in 0..want.len() {
            let ev = w.watch_event().await;
            assert_eq!(doc_of(&ev)["n"], doc["n"], "{doc}");
            seen.push(ev.id);
        }
        seen.sort();
        want.sort();
        assert_eq!(seen, want, "{doc}");
    }
    w.quiet().await;

    // Malformed paths: an error naming the path; the stream lives on.
    for bad in ["$.[?(@.n > 1)]", "$..name", "$.[?(@.a == 'x)]", "{not json"] {
        let e = w
            .err(
                "watch",
                "WatchRequest",
                &pb::WatchRequest {
                    collectionname: "entities".into(),
                    paths: vec![bad.into()],
                },
            )
            .await;
        assert_eq!(e.code, 400, "{bad}: {}", e.message);
        assert!(e.message.contains(&format!("{bad:?}")), "names {bad:?}: {}", e.message);
    }
    w.quiet().await;
}

async fn push_one(c: &mut Conn, queue: &str, name: &str) -> pb::Workitem {
    let r: pb::PushWorkitemResponse = c
        .ok(
            "pushworkitem",
            "PushWorkitemRequest",
            &pb::PushWorkitemRequest {
                wiq: queue.into(),
                name: name.into(),
                payload: json!({"step": 0}).to_string(),
                ..Default::default()
            },
        )
        .await;
    r.workitem.expect("workitem")
}

async fn update_item(c: &mut Conn, item: pb::Workitem) -> pb::Envelope {
    let req = pb::UpdateWorkitemRequest {
        workitem: Some(item),
        ..Default::default()
    };
    c.call("updateworkitem", "UpdateWorkitemRequest", &req).await
}

#[tokio::test]
async fn progress_reports_keep_an_item_processing_and_renew_its_lease() {
    let s = server(GrpcLimits::default()).await;
    let mut c = connect(s.addr).await;
    c.signin("admin", PASSWORD).await;
    add_queue(&mut c, "long", "").await;
    let pushed = push_one(&mut c, "long", "job").await;

    // Not popped yet: a progress report is refused with the item's state.
    let mut early = pushed.clone();
    early.state = "processing".into();
    let e = error_of(&update_item(&mut c, early).await);
    assert_eq!(e.code, 409, "{}", e.message);
    assert!(e.message.contains("is new"), "{}", e.message);

    let popped = pop(&mut c, "long").await.expect("popped");
    let lease_before = s.node.get("workitems", &popped.id).expect("item")["_leaseuntil"].clone();
    tokio::time::sleep(Duration::from_millis(20)).await;
    let mut report = popped.clone();
    report.state = "processing".into();
    report.payload = json!({"step": 1}).to_string();
    report.files = vec![file("progress.txt", b"half way", false)];
    let reply = update_item(&mut c, report).await;
    assert_eq!(reply.command, "updateworkitemreply", "{:?}", error_text(&reply));
    let stored = s.node.get("workitems", &popped.id).expect("item");
    assert_eq!(stored["state"], "processing");
    assert_eq!(stored["payload"], json!({"step": 1}));
    assert_eq!(stored["files"].as_array().map(Vec::len), Some(1), "{stored}");
    assert!(
        stored["_leaseuntil"].as_str() > lease_before.as_str(),
        "lease renewed: {lease_before} -> {}",
        stored["_leaseuntil"]
    );
    // Still held by this worker: nobody else can pop it.
    assert!(pop(&mut c, "long").await.is_none());

    let mut done = popped.clone();
    done.state = "successful".into();
    done.payload = String::new();
    let reply = update_item(&mut c, done).await;
    assert_eq!(reply.command, "updateworkitemreply", "{:?}", error_text(&reply));
    let stored = s.node.get("workitems", &popped.id).expect("item");
    assert_eq!(
        (stored["state"].as_str(), &stored["payload"]),
        (Some("successful"), &json!({"step": 1}))
    );

    // A finished item takes no more progress reports.
    let mut late = popped;
    late.state = "processing".into();
    let e = error_of(&update_item(&mut c, late).await);
    assert_eq!(e.code, 409, "{}", e.message);
}

#[tokio::test]
async fn purge_deletes_a_queues_items_and_only_with_the_right() {
    let s = server(GrpcLimits::default()).await;
    with_bob(&s).await;
    let mut a = connect(s.addr).await;
    a.signin("admin", PASSWORD).await;
    add_queue(&mut a, "full", "").await;
    add_queue(&mut a, "other", "").await;
    let mut ids = Vec::new();
    for n in 0..3 {
        ids.push(push_one(&mut a, "full", &format!("job{n}")).await.id);
    }
    let kept = push_one(&mut a, "other", "stays").await.id;

    // bob cannot see the queue, so he cannot purge it; nothing is deleted.
    let mut b = connect(s.addr).await;
    b.signin("bob", "bobpw").await;
    let purge = |name: &str| pb::UpdateWorkItemQueueRequest {
        workitemqueue: Some(pb::WorkItemQueue {
            name: name.into(),
            maxretries: 5,
            ..Default::default()
        }),
        purge: true,
        ..Default::default()
    };
    let e = b
        .err("updateworkitemqueue", "UpdateWorkItemQueueRequest", &purge("full"))
        .await;
    assert!(matches!(e.code, 403 | 404), "{e:?}");
    for id in &ids {
        assert!(s.node.get("workitems", id).is_ok(), "{id} survives a refused purge");
    }

    // updateworkitemqueue with purge empties the queue and keeps it.
    let r: pb::UpdateWorkItemQueueResponse = a
        .ok("updateworkitemqueue", "UpdateWorkItemQueueRequest", &purge("full"))
        .await;
    assert_eq!(r.workitemqueue.expect("queue").maxretries, 5);
    for id in &ids {
        assert!(s.node.get("workitems", id).is_err(), "{id} purged");
    }
    assert!(s.node.get("workitems", &kept).is_ok(), "another queue's item stays");
    assert!(pop(&mut a, "full").await.is_none());

    // deleteworkitemqueue with purge takes the queue and its items in one write.
    let again = push_one(&mut a, "full", "again").await.id;
    let _: pb::DeleteWorkItemQueueResponse = a
        .ok(
            "deleteworkitemqueue",
            "DeleteWorkItemQueueRequest",
            &pb::DeleteWorkItemQueueRequest {
                wiq: "full".into(),
                purge: true,
                ..Default::default()
            },
        )
        .await;
    assert!(s.node.get("workitems", &again).is_err());
    let e = a
        .err(
            "pushworkitem",
            "PushWorkitemRequest",
            &pb::PushWorkitemRequest {
                wiq: "full".into(),
                ..Default::default()
            },
        )
        .await;
    assert_eq!(e.code, 404, "{}", e.message);
    // The purged items' history is kept: each has a delete version.
    let versions = s.node.versions("workitems", &again).expect("history");
    assert_eq!(versions.len(), 2, "{versions:?}");
}

#[tokio::test]
async fn queryas_reads_as_another_user_for_admins_only() {
    let s = server(GrpcLimits::default()).await;
    with_bob(&s).await;
    let mut a = connect(s.addr).await;
    a.signin("admin", PASSWORD).await;
    let mut b = connect(s.addr).await;
    let bob = b.signin("bob", "bobpw").await.user.expect("user");
    let bobs = b.insert("notes", json!({"name": "bob's"})).await;
    a.insert("notes", json!({"name": "admin's"})).await;

    let query_as = |who: &str| pb::QueryRequest {
        collectionname: "notes".into(),
        query: "{}".into(),
        top: 100,
        queryas: who.into(),
        ..Default::default()
    };
    // The admin reading as bob sees what bob sees: only his note.
    let r: pb::QueryResponse = a.ok("query", "QueryRequest", &query_as(&bob.id)).await;
    let seen: Vec<Value> = serde_json::from_str(&r.results).expect("JSON");
    assert_eq!(seen.len(), 1, "{seen:?}");
    assert_eq!(seen[0]["_id"], bobs["_id"]);
    let r: pb::CountResponse = a
        .ok(
            "count",
            "CountRequest",
            &pb::CountRequest {
                collectionname: "notes".into(),
                query: "{}".into(),
                queryas: bob.id.clone(),
            },
        )
        .await;
    assert_eq!(r.result, 1);
    // As himself the admin sees both.
    assert_eq!(a.query("notes", json!({})).await.len(), 2);

    // bob may not read as anyone else; an unknown id is named.
    let e = b
        .err("query", "QueryRequest", &query_as(ocmesh_node::acl::ADMINS_ROLE_ID))
        .await;
    assert_eq!(e.code, 403, "{}", e.message);
    let e = a.err("query", "QueryRequest", &query_as("no-such-user")).await;
    assert_eq!(e.code, 400, "{}", e.message);
    assert!(e.message.contains("no-such-user"), "{}", e.message);
}

/// A change this site first got as a withheld stub (a relay was not allowed
/// to share it) and later in full lands below the version vector; the watch
/// still sees it arrive, once.
#[tokio::test]
async fn a_watch_sees_a_change_that_refills_a_withheld_stub() {
    let s = server(GrpcLimits::default()).await;
    let other_dir = tempfile::tempdir().expect("tempdir");
    let other = Node::open(NodeConfig {
        data_dir: other_dir.path().to_path_buf(),
        site: "x".into(),
        admin_password: Some(PASSWORD.into()),
    })
    .expect("open x")
    .node;
    let admin = ocmesh_node::Principal {
        id: "0".repeat(24),
        name: "admin".into(),
        roles: vec![ocmesh_node::acl::ADMINS_ROLE_ID.into()],
    };
    let inserted = other
        .insert(
            "notes",
            json!({"name": "held back"}).as_object().cloned().expect("object"),
            &admin,
        )
        .await
        .expect("insert at x");
    let log = other
        .read_changes(&ocmesh_replication::FetchRequest {
            after: Default::default(),
            max_changes: usize::MAX,
            max_bytes: usize::MAX,
        })
        .expect("x's log");
    let insert = log.last().expect("the insert").clone();
    assert_eq!(insert.doc_id, inserted["_id"].as_str().expect("id"));

    let mut c = connect(s.addr).await;
    c.signin("admin", PASSWORD).await;
    let wid = c.watch("notes", &[]).await;
    let mut first = log[..log.len() - 1].to_vec();
    first.push(ocmesh_replication::change::stub_of(&insert));
    let report = s.node.apply(first).await.expect("apply with the stub");
    assert_eq!(report.withheld, 1);
    c.quiet().await;

    let report = s.node.apply(vec![insert]).await.expect("refill");
    assert_eq!(report.filled, 1);
    let ev = c.watch_event().await;
    assert_eq!((ev.id.as_str(), ev.operation.as_str()), (wid.as_str(), "insert"));
    assert_eq!(doc_of(&ev)["name"], "held back");
    c.quiet().await;
    assert_eq!(s.stats.snapshot()["watch_refills"].as_u64(), Some(1));
}
