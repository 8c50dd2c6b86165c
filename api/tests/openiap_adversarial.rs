//! OpenIAP envelopes a broken or hostile client could send, handed to the
//! dispatcher as a connection would: every command name (and unknown
//! ones), `data` of the wrong type or random bytes, and request messages
//! built field by field without a schema, so that whatever message a
//! command expects, its string fields get random JSON (deep, huge numbers,
//! operators), JSONPath, collection names or noise, and its integer fields
//! values at the edges (negative top and skip included).
//!
//! Properties: every request gets exactly one reply, carrying its id as
//! `rid`, that is either the command's reply or an `error` whose message
//! says what was wrong; no request hangs; and afterwards the node still
//! answers a ping and a query as before, and a document written before
//! the storm is unchanged.

use std::time::Duration;

use ocmesh_api::openiap::{Dispatcher, GrpcLimits, Session};
use ocmesh_node::{Node, NodeConfig, Principal};
use ocmesh_proto::openiap as pb;
use proptest::prelude::*;
use proptest::test_runner::{Config, TestRunner};
use prost::Message;
use prost::encoding::{WireType, encode_key, encode_varint};
use prost_types::Any;
use serde_json::{Value, json};

const COMMANDS: &[&str] = &[
    "ping",
    "signin",
    "query",
    "getdocumentversion",
    "count",
    "distinct",
    "insertone",
    "insertmany",
    "updateone",
    "updatedocument",
    "insertorupdateone",
    "deleteone",
    "deletemany",
    "pushworkitem",
    "pushworkitems",
    "popworkitem",
    "updateworkitem",
    "deleteworkitem",
    "addworkitemqueue",
    "updateworkitemqueue",
    "deleteworkitemqueue",
    "watch",
    "unwatch",
    "registerqueue",
    "registerexchange",
    "queuemessage",
    "unregisterqueue",
    "listcollections",
    "createcollection",
    "dropcollection",
    "createindex",
    "getindexes",
    "dropindex",
    "insertorupdatemany",
    "customcommand",
    "aggregate",
    "download",
    "upload",
    "beginstream",
    "stream",
    "endstream",
    "",
    "nosuchcommand",
    "QUERY",
];

fn leaf() -> impl Strategy<Value = Value> {
    prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::from),
        any::<i64>().prop_map(Value::from),
        any::<u64>().prop_map(Value::from),
        any::<f64>()
            .prop_filter("finite", |f| f.is_finite())
            .prop_map(Value::from),
        "[a-z$._]{0,6}".prop_map(Value::from),
    ]
}

fn json_value() -> impl Strategy<Value = Value> {
    leaf().prop_recursive(4, 20, 4, |inner| {
        prop_oneof![
            proptest::collection::vec(inner.clone(), 0..4).prop_map(Value::Array),
            proptest::collection::btree_map(
                prop_oneof![
                    "[a-z_]{1,4}",
                    Just("_id".to_owned()),
                    Just("_acl".to_owned()),
                    Just("_type".to_owned()),
                    Just("$set".to_owned()),
                    Just("$inc".to_owned()),
                    Just("$match".to_owned()),
                    Just("$group".to_owned()),
                    Just("$sort".to_owned()),
                    Just("$project".to_owned()),
                    Just("$limit".to_owned()),
                    Just("$or".to_owned()),
                    Just("$in".to_owned()),
                    Just("$regex".to_owned()),
                    Just("$gt".to_owned()),
                    "\\$[a-z]{1,5}",
                ],
                inner,
                0..4,
            )
            .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

/// Text for a string field.
fn text() -> impl Strategy<Value = String> {
    prop_oneof![
        4 => json_value().prop_map(|v| v.to_string()),
        4 => prop_oneof![
            Just("entities".to_owned()),
            Just("q".to_owned()),
            Just("mq".to_owned()),
            Just("workitems".to_owned()),
            Just("fs.files".to_owned()),
            Just("users".to_owned()),
            Just("admin".to_owned()),
            Just("0123456789abcdef01234567".to_owned()),
        ],
        1 => (1usize..200).prop_map(|n| format!("{}1{}", "[".repeat(n), "]".repeat(n))),
        1 => (1usize..200).prop_map(|n| format!("{}1{}", "{\"a\":".repeat(n), "}".repeat(n))),
        1 => prop_oneof![
            Just("$.[?(@._type == 'x' && (@.n != 2 || @.ok == true))]".to_owned()),
            Just("$.[?(@['a..b'] == 1)]".to_owned()),
            Just(format!("$.[?({}@.a == 1{})]", "(".repeat(40), ")".repeat(40))),
        ],
        1 => Just("1e400".to_owned()),
        1 => Just("-99999999999999999999999".to_owned()),
        1 => ".{0,12}",
    ]
}

/// One field of a protobuf message: a string, a varint or bytes.
#[derive(Debug, Clone)]
enum Field {
    Text(u32, String),
    Varint(u32, u64),
    Bytes(u32, Vec<u8>),
    Nested(u32, Vec<(u32, String)>),
}

fn field() -> impl Strategy<Value = Field> {
    let number = 1u32..16;
    prop_oneof![
        6 => (number.clone(), text()).prop_map(|(n, t)| Field::Text(n, t)),
        3 => (
            number.clone(),
            prop_oneof![
                Just(u64::MAX),
                Just(u64::MAX - 9),
                Just(i32::MAX as u64),
                Just(i32::MIN as i64 as u64),
                Just(1u64 << 40),
                0u64..5,
                any::<u64>()
            ]
        )
            .prop_map(|(n, v)| Field::Varint(n, v)),
        1 => (number.clone(), proptest::collection::vec(any::<u8>(), 0..24)).prop_map(|(n, b)| Field::Bytes(n, b)),
        1 => (number, proptest::collection::vec((1u32..8, text()), 0..3)).prop_map(|(n, f)| Field::Nested(n, f)),
    ]
}

/// A message with most of its first ten fields set, so that whatever
/// schema the command expects, most of its fields get a value.
fn message() -> impl Strategy<Value = Vec<Field>> {
    // OpenIAP's requests lead with their string fields (collection, query,
    // item, ...) and put numbers and flags after them.
    let text_slot = prop_oneof![
        1 => Just(None),
        12 => text().prop_map(|t| Some(Field::Text(0, t))),
        1 => (0u64..3).prop_map(|v| Some(Field::Varint(0, v))),
    ];
    let any_slot = prop_oneof![
        2 => Just(None),
        2 => text().prop_map(|t| Some(Field::Text(0, t))),
        3 => prop_oneof![Just(u64::MAX), Just(i32::MIN as i64 as u64), Just(i32::MAX as u64), 0u64..4, any::<u64>()]
            .prop_map(|v| Some(Field::Varint(0, v))),
        1 => proptest::collection::vec((1u32..8, text()), 0..3).prop_map(|f| Some(Field::Nested(0, f))),
    ];
    (
        proptest::collection::vec(text_slot, 4),
        proptest::collection::vec(any_slot, 6),
    )
        .prop_map(|(head, tail)| {
            head.into_iter()
                .chain(tail)
                .enumerate()
                .filter_map(|(i, f)| {
                    let n = i as u32 + 1;
                    f.map(|f| match f {
                        Field::Text(_, t) => Field::Text(n, t),
                        Field::Varint(_, v) => Field::Varint(n, v),
                        Field::Bytes(_, b) => Field::Bytes(n, b),
                        Field::Nested(_, inner) => Field::Nested(n, inner),
                    })
                })
                .collect()
        })
}

fn encode(fields: &[Field]) -> Vec<u8> {
    let mut out = Vec::new();
    let text = |out: &mut Vec<u8>, n: u32, t: &[u8]| {
        encode_key(n, WireType::LengthDelimited, out);
        encode_varint(t.len() as u64, out);
        out.extend_from_slice(t);
    };
    for f in fields {
        match f {
            Field::Text(n, t) => text(&mut out, *n, t.as_bytes()),
            Field::Bytes(n, b) => text(&mut out, *n, b),
            Field::Varint(n, v) => {
                encode_key(*n, WireType::Varint, &mut out);
                encode_varint(*v, &mut out);
            }
            Field::Nested(n, inner) => {
                let mut body = Vec::new();
                for (m, t) in inner {
                    text(&mut body, *m, t.as_bytes());
                }
                text(&mut out, *n, &body);
            }
        }
    }
    out
}

fn int() -> impl Strategy<Value = i32> {
    prop_oneof![Just(i32::MIN), Just(i32::MAX), Just(-1), 0i32..5, any::<i32>()]
}

/// Requests of the commands that reach deepest, typed, with their text
/// fields random: (command, message, type name).
fn typed() -> impl Strategy<Value = (&'static str, Any)> {
    fn any_of<M: Message>(name: &str, m: &M) -> Any {
        Any {
            type_url: format!("type.googleapis.com/openiap.{name}"),
            value: m.encode_to_vec(),
        }
    }
    let c = || prop_oneof![3 => Just("entities".to_owned()), 1 => Just("keep".to_owned()), 1 => text()];
    prop_oneof![
        (c(), text(), text(), int(), int(), text()).prop_map(
            |(collectionname, query, projection, top, skip, orderby)| {
                (
                    "query",
                    any_of(
                        "QueryRequest",
                        &pb::QueryRequest {
                            collectionname,
                            query,
                            projection,
                            top,
                            skip,
                            orderby,
                            ..Default::default()
                        },
                    ),
                )
            }
        ),
        (c(), text()).prop_map(|(collectionname, aggregates)| {
            (
                "aggregate",
                any_of(
                    "AggregateRequest",
                    &pb::AggregateRequest {
                        collectionname,
                        aggregates,
                        ..Default::default()
                    },
                ),
            )
        }),
        (c(), text()).prop_map(|(collectionname, query)| (
            "count",
            any_of(
                "CountRequest",
                &pb::CountRequest {
                    collectionname,
                    query,
                    ..Default::default()
                }
            )
        )),
        (c(), text(), text()).prop_map(|(collectionname, field, query)| {
            (
                "distinct",
                any_of(
                    "DistinctRequest",
                    &pb::DistinctRequest {
                        collectionname,
                        field,
                        query,
                        ..Default::default()
                    },
                ),
            )
        }),
        (c(), text()).prop_map(|(collectionname, item)| (
            "insertone",
            any_of(
                "InsertOneRequest",
                &pb::InsertOneRequest {
                    collectionname,
                    item,
                    ..Default::default()
                }
            )
        )),
        (c(), text()).prop_map(|(collectionname, items)| (
            "insertmany",
            any_of(
                "InsertManyRequest",
                &pb::InsertManyRequest {
                    collectionname,
                    items,
                    ..Default::default()
                }
            )
        )),
        (c(), text()).prop_map(|(collectionname, item)| (
            "updateone",
            any_of(
                "UpdateOneRequest",
                &pb::UpdateOneRequest {
                    collectionname,
                    item,
                    ..Default::default()
                }
            )
        )),
        (c(), text(), text()).prop_map(|(collectionname, query, document)| {
            (
                "updatedocument",
                any_of(
                    "UpdateDocumentRequest",
                    &pb::UpdateDocumentRequest {
                        collectionname,
                        query,
                        document,
                        ..Default::default()
                    },
                ),
            )
        }),
        (c(), text(), text()).prop_map(|(collectionname, uniqeness, item)| {
            (
                "insertorupdateone",
                any_of(
                    "InsertOrUpdateOneRequest",
                    &pb::InsertOrUpdateOneRequest {
                        collectionname,
                        uniqeness,
                        item,
                        ..Default::default()
                    },
                ),
            )
        }),
        (c(), text(), proptest::collection::vec(text(), 0..3)).prop_map(|(collectionname, query, ids)| {
            (
                "deletemany",
                any_of(
                    "DeleteManyRequest",
                    &pb::DeleteManyRequest {
                        collectionname,
                        query,
                        ids,
                        ..Default::default()
                    },
                ),
            )
        }),
        (c(), proptest::collection::vec(text(), 0..3)).prop_map(|(collectionname, paths)| {
            (
                "watch",
                any_of("WatchRequest", &pb::WatchRequest { collectionname, paths }),
            )
        }),
        (c(), text(), int()).prop_map(|(collectionname, id, version)| {
            (
                "getdocumentversion",
                any_of(
                    "GetDocumentVersionRequest",
                    &pb::GetDocumentVersionRequest {
                        collectionname,
                        id,
                        version,
                        ..Default::default()
                    },
                ),
            )
        }),
        (prop_oneof![Just("q".to_owned()), text()], text(), text(), int()).prop_map(
            |(wiq, name, payload, priority)| {
                (
                    "pushworkitem",
                    any_of(
                        "PushWorkitemRequest",
                        &pb::PushWorkitemRequest {
                            wiq,
                            name,
                            payload,
                            priority,
                            ..Default::default()
                        },
                    ),
                )
            }
        ),
    ]
}

fn envelope() -> impl Strategy<Value = pb::Envelope> {
    let data = prop_oneof![
        1 => Just(None),
        3 => proptest::collection::vec(field(), 0..6).prop_map(|f| Some(Any { type_url: String::new(), value: encode(&f) })),
        8 => message().prop_map(|f| Some(Any { type_url: String::new(), value: encode(&f) })),
        1 => proptest::collection::vec(any::<u8>(), 0..32).prop_map(|value| Some(Any { type_url: String::new(), value })),
        1 => ("[a-z./]{0,20}", proptest::collection::vec(field(), 0..3))
            .prop_map(|(type_url, f)| Some(Any { type_url, value: encode(&f) })),
    ];
    let command = prop_oneof![
        1 => (proptest::sample::select(COMMANDS), data),
        1 => typed().prop_map(|(c, any)| (c, Some(any))),
    ];
    (
        command,
        "[0-9a-z]{0,6}",
        prop_oneof![8 => Just(String::new()), 1 => Just("not.a.jwt".to_owned()), 1 => ".{0,10}"],
    )
        .prop_map(|((command, data), id, jwt)| pb::Envelope {
            command: command.to_owned(),
            id,
            data,
            jwt,
            ..Default::default()
        })
}

fn request<M: Message>(command: &str, id: &str, type_name: &str, msg: &M) -> pb::Envelope {
    pb::Envelope {
        command: command.into(),
        id: id.into(),
        data: Some(Any {
            type_url: format!("type.googleapis.com/openiap.{type_name}"),
            value: msg.encode_to_vec(),
        }),
        ..Default::default()
    }
}

async fn query_all(d: &Dispatcher, session: &Session) -> pb::Envelope {
    let req = request(
        "query",
        "q",
        "QueryRequest",
        &pb::QueryRequest {
            collectionname: "keep".into(),
            query: "{}".into(),
            ..Default::default()
        },
    );
    let mut h = d.handle(session, req).await;
    h.replies.pop().expect("a reply")
}

#[test]
fn hostile_envelopes_get_one_clear_reply_each() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let dir = tempfile::tempdir().expect("tmp");
    let node = Node::open(NodeConfig {
        data_dir: dir.path().into(),
        site: "a".into(),
        admin_password: Some("pw".into()),
    })
    .expect("open")
    .node;
    let admin = Principal {
        roles: vec![ocmesh_node::acl::ADMINS_ROLE_ID.into()],
        id: "0".repeat(24),
        name: "admin".into(),
    };
    let kept = rt
        .block_on(node.insert("keep", json!({"k": 1}).as_object().cloned().expect("object"), &admin))
        .expect("insert");
    let d = Dispatcher::new(node, GrpcLimits::default());
    d.set_broker(ocmesh_node::messaging::Broker::embedded());
    let (fresh, _events) = d.open_session("test", "peer");
    let session = rt.block_on(async {
        let h = d
            .handle(
                &fresh,
                request(
                    "signin",
                    "0",
                    "SigninRequest",
                    &pb::SigninRequest {
                        username: "admin".into(),
                        password: "pw".into(),
                        ..Default::default()
                    },
                ),
            )
            .await;
        h.session.expect("signed in")
    });
    let before = rt.block_on(query_all(&d, &session));
    assert_eq!(before.command, "queryreply");

    let cases = std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|c| c.parse().ok())
        .unwrap_or(384);
    let mut runner = TestRunner::new(Config {
        cases,
        failure_persistence: None,
        ..Config::default()
    });
    let result = runner.run(&(envelope(), any::<bool>()), |(env, signed)| {
        let s = if signed { &session } else { &fresh };
        let id = env.id.clone();
        let h = rt
            .block_on(async { tokio::time::timeout(Duration::from_secs(20), d.handle(s, env.clone())).await })
            .map_err(|_| TestCaseError::fail(format!("{env:?} did not answer within 20 s")))?;
        // A download's reply goes out through the connection's event
        // queue; an upload is answered after its endstream.
        prop_assert!(h.replies.len() <= 1, "{} replies", h.replies.len());
        if h.replies.is_empty() {
            prop_assert!(
                ["download", "upload", "beginstream", "stream", "endstream"].contains(&env.command.as_str()),
                "no reply to {:?}",
                env
            );
        }
        for r in &h.replies {
            prop_assert_eq!(&r.rid, &id);
            if r.command == "error" {
                prop_assert!(h.failed);
                let any = r.data.as_ref().expect("error data");
                let e = pb::ErrorResponse::decode(any.value.as_slice()).expect("ErrorResponse");
                prop_assert!(!e.message.is_empty());
                prop_assert!((400..600).contains(&e.code), "code {}", e.code);
            } else {
                prop_assert!(!h.failed);
                prop_assert!(r.command.ends_with("reply") || r.command == "pong", "{}", r.command);
            }
        }
        Ok(())
    });
    if let Err(e) = result {
        panic!("{e}");
    }
    // The node goes on: a ping, and the document written before is unchanged.
    rt.block_on(async {
        let pong = d
            .handle(&session, request("ping", "p", "PingRequest", &pb::PingRequest {}))
            .await;
        assert_eq!(pong.replies[0].command, "pong");
        let after = query_all(&d, &session).await;
        assert_eq!(after.command, "queryreply");
        let got = d
            .node()
            .get("keep", kept["_id"].as_str().expect("id"))
            .expect("kept document");
        assert_eq!(got, kept);
    });
}
