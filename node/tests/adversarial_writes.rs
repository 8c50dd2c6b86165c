//! Local writes with arbitrary content, as REST and OpenIAP pass them on:
//! documents of any shape (nested close to and past serde_json's depth
//! limit, built in code as the OpenIAP layer builds them) and update
//! operators of any shape.
//!
//! Properties: a write either succeeds or is refused with a reason (never a
//! storage failure); whatever this site accepted, a peer accepts too (the
//! log applies cleanly to a second node, whose documents then equal
//! this site's), so no local write can stall replication; and no stored
//! body nests deeper than `MAX_BODY_DEPTH`.

use std::sync::Arc;

use ocmesh_node::query::Query;
use ocmesh_node::{ManualClock, MemDisk, Node, NodeConfig, OpenOptions, Principal, WriteError};
use ocmesh_replication::change::{MAX_BODY_DEPTH, depth};
use ocmesh_replication::{FetchRequest, VersionVector};
use proptest::prelude::*;
use serde_json::{Map, Value, json};

const T0: u64 = 1_764_000_000_000;

fn admin() -> Principal {
    Principal {
        roles: vec![ocmesh_node::acl::ADMINS_ROLE_ID.into()],
        id: "0".repeat(24),
        name: "admin".into(),
    }
}

fn open(site: &str, seed: u64) -> Node {
    Node::open_with(
        NodeConfig {
            data_dir: "memory".into(),
            site: site.into(),
            admin_password: None,
        },
        OpenOptions::simulated(MemDisk::new(), Arc::new(ManualClock::new(T0)), seed),
    )
    .expect("open")
    .node
}

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime")
}

/// `levels` nested arrays around 1, built without recursion.
fn nested(levels: usize) -> Value {
    let mut v = json!(1);
    for _ in 0..levels {
        v = Value::Array(vec![v]);
    }
    v
}

/// Takes a deep value apart without recursion (its drop would recurse).
fn dismantle(v: Value) {
    let mut stack = vec![v];
    while let Some(v) = stack.pop() {
        match v {
            Value::Array(a) => stack.extend(a),
            Value::Object(m) => stack.extend(m.into_iter().map(|(_, v)| v)),
            _ => {}
        }
    }
}

fn leaf() -> impl Strategy<Value = Value> {
    prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::from),
        any::<i64>().prop_map(Value::from),
        any::<u64>().prop_map(Value::from),
        (-1e300f64..1e300).prop_map(Value::from),
        ".{0,8}".prop_map(Value::from),
        // Close to and past the depth limits.
        (90usize..135).prop_map(nested),
    ]
}

fn json_value() -> impl Strategy<Value = Value> {
    leaf().prop_recursive(3, 16, 4, |inner| {
        prop_oneof![
            proptest::collection::vec(inner.clone(), 0..4).prop_map(Value::Array),
            proptest::collection::btree_map("[a-z_$.]{0,5}", inner, 0..4)
                .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

fn field_path() -> impl Strategy<Value = String> {
    prop_oneof![
        4 => "[a-c]{1,2}(\\.[a-c0-9]{1,2}){0,3}",
        1 => Just("_id".to_owned()),
        1 => Just("_acl".to_owned()),
        1 => Just("a..b".to_owned()),
        1 => (1usize..150).prop_map(|n| vec!["d"; n].join(".")),
        1 => ".{0,6}",
    ]
}

fn update() -> impl Strategy<Value = Value> {
    let op = prop_oneof![
        Just("$set"),
        Just("$unset"),
        Just("$inc"),
        Just("$push"),
        Just("$pull"),
        Just("$rename"),
        Just("plain"),
    ];
    prop_oneof![
        6 => proptest::collection::vec((op, proptest::collection::vec((field_path(), json_value()), 0..3)), 1..3)
            .prop_map(|ops| {
                let mut m = Map::new();
                for (op, fields) in ops {
                    m.insert(op.into(), Value::Object(fields.into_iter().collect()));
                }
                Value::Object(m)
            }),
        1 => json_value(),
    ]
}

#[derive(Debug, Clone)]
enum Op {
    Insert(Value),
    Replace(usize, Value),
    Update(usize, Value),
    Delete(usize),
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        2 => json_value().prop_map(Op::Insert),
        1 => (any::<usize>(), json_value()).prop_map(|(i, v)| Op::Replace(i, v)),
        3 => (any::<usize>(), update()).prop_map(|(i, u)| Op::Update(i, u)),
        1 => any::<usize>().prop_map(Op::Delete),
    ]
}

fn object(v: Value) -> Map<String, Value> {
    match v {
        Value::Object(m) => m,
        other => {
            let mut m = Map::new();
            m.insert("v".into(), other);
            m
        }
    }
}

fn all(node: &Node) -> Vec<Value> {
    let q = Query::from_json(&json!({"top": 100_000})).expect("query");
    node.query("entities", &q).expect("query")
}

fn check(ops: Vec<Op>, seed: u64) -> Result<(), TestCaseError> {
    let rt = rt();
    let a = open("a", seed);
    let who = admin();
    let mut ids: Vec<String> = Vec::new();
    for op in ops {
        let r = match op {
            Op::Insert(doc) => rt.block_on(a.insert("entities", object(doc), &who)),
            Op::Replace(i, doc) if !ids.is_empty() => {
                rt.block_on(a.replace("entities", &ids[i % ids.len()], object(doc), &who))
            }
            Op::Update(i, u) if !ids.is_empty() => rt.block_on(a.update("entities", &ids[i % ids.len()], u, &who)),
            Op::Delete(i) if !ids.is_empty() => rt.block_on(a.delete("entities", &ids[i % ids.len()], &who)),
            _ => continue,
        };
        match r {
            Ok(doc) => {
                prop_assert!(depth(&doc) <= MAX_BODY_DEPTH, "stored a body {} deep", depth(&doc));
                if let Some(id) = doc["_id"].as_str()
                    && !ids.iter().any(|i| i == id)
                {
                    ids.push(id.to_owned());
                }
                dismantle(doc);
            }
            Err(WriteError::Storage(e)) => return Err(TestCaseError::fail(format!("store failed: {e}"))),
            Err(_) => {}
        }
    }
    // Whatever a accepted, a peer accepts, and ends with the same documents.
    let b = open("b", seed.wrapping_add(1));
    let changes = a
        .read_changes(&FetchRequest {
            after: VersionVector::new(),
            max_changes: usize::MAX,
            max_bytes: usize::MAX,
        })
        .expect("log");
    let report = rt
        .block_on(b.apply(changes))
        .map_err(|e| TestCaseError::fail(format!("a peer refused this site's writes: {e}")))?;
    prop_assert_eq!(report.refused, 0);
    prop_assert_eq!(all(&a), all(&b));
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

    #[test]
    fn local_writes_of_any_shape_replicate(ops in proptest::collection::vec(op(), 1..12), seed in any::<u64>()) {
        check(ops, seed)?;
    }
}

/// The shapes the random search found, each on its own.
#[test]
fn bodies_nobody_could_read_back_are_refused() {
    let rt = rt();
    let a = open("a", 1);
    let who = admin();
    // A field holding 127 levels: the body is 128 deep, past what JSON parsing reads back.
    let mut doc = Map::new();
    doc.insert("deep".into(), nested(127));
    let e = rt.block_on(a.insert("entities", doc, &who)).expect_err("too deep");
    assert!(matches!(e, WriteError::TooDeep { depth: 128, .. }), "{e}");
    // `$set` along a path of 200,000 steps: refused before it builds anything.
    let d = rt
        .block_on(a.insert("entities", object(json!({"n": 1})), &who))
        .expect("insert");
    let id = d["_id"].as_str().expect("id");
    let long = vec!["a"; 200_000].join(".");
    let e = rt
        .block_on(a.update("entities", id, json!({"$set": {long: 1}}), &who))
        .expect_err("path too long");
    assert!(matches!(e, WriteError::Update(_)), "{e}");
    // A `$set` that makes the body too deep.
    let e = rt
        .block_on(a.update("entities", id, json!({"$set": {"x.y": nested(99)}}), &who))
        .expect_err("too deep");
    assert!(matches!(e, WriteError::TooDeep { .. }), "{e}");
    // A body over what peers accept.
    let e = rt
        .block_on(a.update(
            "entities",
            id,
            json!({"$set": {"big": "x".repeat(ocmesh_replication::change::MAX_BODY_BYTES)}}),
            &who,
        ))
        .expect_err("too large");
    assert!(matches!(e, WriteError::TooLarge { .. }), "{e}");
    // Nothing of it was written, and the node goes on.
    assert_eq!(a.get("entities", id).expect("get"), d);
    assert_eq!(a.version_vector().get("a"), 1);
    rt.block_on(a.insert("entities", object(json!({"after": nested(98)})), &who))
        .expect("a body at the limit is fine");
}
