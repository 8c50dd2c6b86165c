//! A peer's changes with arbitrary content applied to a real node (on an
//! in-memory disk): bodies that are not JSON, not objects or nested past
//! any sensible depth, bad ids and collection names, `_acl`s of every
//! wrong shape, partial updates naming odd fields and bases, deletes of
//! unknown documents, work items and queues whose fields have the wrong
//! types, file documents naming bad chunk hashes, reused HLCs, gaps and
//! sequences at `u64::MAX`.
//!
//! Properties, after every batch: the node answered (the batch applied or
//! was refused with a reason, never a storage failure that would take the
//! writes grouped with it down); it still takes and reads back a local
//! write; every collection still reads; what this site wrote before (a
//! document, a queue and a work item whose `_acl`s grant nothing to the
//! peer's authors) is unchanged; and a pop still works. After a crash and
//! restart the node holds exactly what it held before: every acknowledged
//! change survives the replay of the write-ahead log.

use std::sync::Arc;

use ocmesh_node::query::Query;
use ocmesh_node::{ManualClock, MemDisk, Node, NodeConfig, OpenOptions, Principal, WriteError};
use ocmesh_replication::change::{Change, ChangeKind};
use ocmesh_replication::{FetchRequest, VersionVector};
use proptest::prelude::*;
use serde_json::{Map, Value, json};

const T0: u64 = 1_764_000_000_000;
const COLLECTIONS: &[&str] = &["entities", "users", "mq", "workitems", "fs.files", "audit"];

fn admin() -> Principal {
    Principal {
        roles: vec![ocmesh_node::acl::ADMINS_ROLE_ID.into()],
        id: "0".repeat(24),
        name: "admin".into(),
    }
}

fn obj(v: Value) -> Map<String, Value> {
    v.as_object().cloned().expect("object")
}

fn open(disk: &MemDisk, clock: &ManualClock, seed: u64) -> Node {
    Node::open_with(
        NodeConfig {
            data_dir: "memory".into(),
            site: "a".into(),
            admin_password: None,
        },
        OpenOptions::simulated(disk.clone(), Arc::new(clock.clone()), seed),
    )
    .expect("open")
    .node
}

/// Everything a site shows: every document of the collections tested, by collection.
fn snapshot(node: &Node) -> Vec<(String, Vec<Value>)> {
    let all = Query::from_json(&json!({"top": 100_000})).expect("query");
    COLLECTIONS
        .iter()
        .map(|c| {
            let docs = node
                .query(c, &all)
                .unwrap_or_else(|e| panic!("reading {c} failed after hostile changes: {e}"));
            ((*c).to_owned(), docs)
        })
        .collect()
}

fn log(node: &Node) -> Vec<Change> {
    node.read_changes(&FetchRequest {
        after: VersionVector::new(),
        max_changes: usize::MAX,
        max_bytes: usize::MAX,
    })
    .expect("read log")
}

// ---- what a hostile peer sends ----

fn leaf() -> impl Strategy<Value = Value> {
    prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::from),
        any::<i64>().prop_map(Value::from),
        any::<u64>().prop_map(Value::from),
        (-1e300f64..1e300).prop_map(Value::from),
        ".{0,8}".prop_map(Value::from),
        Just(Value::from("0123456789abcdef01234567")),
    ]
}

fn json_value() -> impl Strategy<Value = Value> {
    leaf().prop_recursive(4, 24, 5, |inner| {
        prop_oneof![
            proptest::collection::vec(inner.clone(), 0..5).prop_map(Value::Array),
            proptest::collection::btree_map("[a-z_$.]{0,6}", inner, 0..5)
                .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

/// `_acl` in every shape a careless or hostile writer could give it.
fn acl() -> impl Strategy<Value = Value> {
    let entry = (
        prop_oneof![
            Just(json!("mallory")),
            Just(json!("site:b")),
            Just(json!("")),
            json_value()
        ],
        prop_oneof![Just(json!(65535)), Just(json!(-1)), Just(json!(u64::MAX)), json_value()],
        prop_oneof![Just(Value::Null), any::<bool>().prop_map(Value::from), json_value()],
    )
        .prop_map(|(id, rights, deny)| {
            let mut m = Map::new();
            m.insert("_id".into(), id);
            m.insert("rights".into(), rights);
            if !deny.is_null() {
                m.insert("deny".into(), deny);
            }
            Value::Object(m)
        });
    prop_oneof![
        proptest::collection::vec(entry, 0..4).prop_map(Value::Array),
        json_value(),
    ]
}

/// Nested arrays and objects `depth` deep, as text (built, not recursed).
fn nested(depth: usize, object: bool) -> String {
    let (open, close) = if object { ("{\"k\":", "}") } else { ("[", "]") };
    format!("{{\"d\":{}1{}}}", open.repeat(depth), close.repeat(depth))
}

fn body() -> impl Strategy<Value = Vec<u8>> {
    let special = (
        proptest::option::of(acl()),
        proptest::option::of(prop_oneof![
            Just(json!("role")),
            Just(json!("workitemqueue")),
            json_value()
        ]),
        proptest::option::of(prop_oneof![Just(json!("q")), Just(json!("other")), json_value()]),
        proptest::option::of(prop_oneof![Just(json!("new")), Just(json!("processing")), json_value()]),
        proptest::collection::btree_map(
            prop_oneof![
                Just("_owner"),
                Just("_epoch"),
                Just("priority"),
                Just("nextrun"),
                Just("_leaseuntil"),
                Just("retries"),
                Just("sites"),
                Just("maxretries"),
                Just("chunks"),
                Just("files"),
                Just("members"),
                Just("name"),
                Just("_deleted"),
                Just("length"),
            ],
            json_value(),
            0..5,
        ),
        proptest::option::of(proptest::collection::vec(
            prop_oneof![
                Just(json!(hex_of(b"x"))),
                Just(json!("zz")),
                Just(json!("ff".repeat(32))),
                json_value()
            ],
            0..4,
        )),
    )
        .prop_map(|(acl, ty, wiq, state, fields, chunks)| {
            let mut m = Map::new();
            let mut put = |k: &str, v: Option<Value>| {
                if let Some(v) = v {
                    m.insert(k.into(), v);
                }
            };
            put("_acl", acl);
            put("_type", ty);
            put("wiq", wiq.clone());
            put("name", wiq);
            put("state", state);
            put("chunks", chunks.map(Value::Array));
            for (k, v) in fields {
                m.insert(k.into(), v);
            }
            serde_json::to_vec(&Value::Object(m)).expect("json")
        });
    prop_oneof![
        8 => special,
        2 => json_value().prop_map(|v| serde_json::to_vec(&v).expect("json")),
        1 => proptest::collection::vec(any::<u8>(), 0..24),
        1 => (100usize..140, any::<bool>()).prop_map(|(d, o)| nested(d, o).into_bytes()),
        1 => Just(nested(5000, false).into_bytes()),
    ]
}

fn hex_of(content: &[u8]) -> String {
    blake3::hash(content).to_hex().to_string()
}

/// Which document a change names: one this site wrote, a fresh one, or a bad name.
#[derive(Debug, Clone)]
enum Target {
    Local(usize),
    Fresh(u8),
    Raw(String, String),
}

#[derive(Debug, Clone)]
struct Spec {
    origin: String,
    /// Added to the origin's next sequence number (wrapping), or an absolute one.
    seq: Result<i8, u64>,
    hlc: u64,
    kind: i32,
    target: Target,
    body: Vec<u8>,
    author: String,
    partial: bool,
    fields: Vec<String>,
    base: Option<(u64, String)>,
    withheld: bool,
    /// Claims its author acted as an admin at its origin: such a change
    /// passes the right check (the check trusts the origin's word), so the
    /// guarded documents may legitimately change.
    admin: bool,
}

fn spec() -> impl Strategy<Value = Spec> {
    let target = prop_oneof![
        4 => (0usize..3).prop_map(Target::Local),
        4 => (0u8..4).prop_map(Target::Fresh),
        2 => (
            prop_oneof![
                Just(String::new()),
                Just("$bad".to_owned()),
                Just("a\0b".to_owned()),
                Just("x".repeat(300)),
                "[a-z.$]{1,6}"
            ],
            prop_oneof![
                Just(String::new()),
                Just("../../etc".to_owned()),
                Just("x".repeat(1000)),
                ".{1,10}"
            ]
        )
            .prop_map(|(c, i)| Target::Raw(c, i)),
    ];
    let hlc = prop_oneof![
        4 => (0u64..120_000).prop_map(|ms| (T0 + ms) << 16),
        1 => Just(0u64),
        1 => Just(u64::MAX),
        1 => any::<u64>(),
        1 => Just((T0 + 10) << 16),
    ];
    (
        (
            prop_oneof![8 => Just("b".to_owned()), 2 => Just("c".to_owned()), 1 => Just("a".to_owned()), 1 => Just(String::new())],
            prop_oneof![12 => Just(Ok(0i8)), 1 => (-2i8..3).prop_map(Ok), 1 => prop_oneof![Just(u64::MAX), any::<u64>()].prop_map(Err)],
            hlc,
            prop_oneof![8 => 1i32..4, 1 => Just(0), 1 => any::<i32>()],
            target,
        ),
        (
            body(),
            prop_oneof![Just("mallory".to_owned()), Just(String::new()), Just("site:b".to_owned()), "[0-9a-f]{24}"],
            any::<bool>(),
            proptest::collection::vec(
                prop_oneof![Just("_acl".to_owned()), Just("_id".to_owned()), Just("_owner".to_owned()), Just("_epoch".to_owned()), Just("name".to_owned()), ".{0,5}"],
                0..4
            ),
            proptest::option::weighted(0.4, (any::<u64>(), prop_oneof![Just("a".to_owned()), Just("b".to_owned()), Just(String::new())])),
            proptest::bool::weighted(0.08),
            proptest::bool::weighted(0.15),
        ),
    )
        .prop_map(
            |((origin, seq, hlc, kind, target), (body, author, partial, fields, base, withheld, admin))| Spec {
                origin,
                seq,
                hlc,
                kind,
                target,
                body,
                author,
                partial,
                fields,
                base,
                withheld,
                admin,
            },
        )
}

/// Builds the change a spec describes against what the node holds.
fn build(spec: &Spec, node: &Node, locals: &[(String, String)], next: &mut VersionVector) -> Change {
    let held = next.get(&spec.origin);
    let seq = match spec.seq {
        Ok(d) => held.wrapping_add(1).wrapping_add_signed(d.into()),
        Err(abs) => abs,
    };
    next.advance(&spec.origin, seq);
    if spec.withheld {
        return ocmesh_replication::change::stub(&spec.origin, seq);
    }
    let (collection, doc_id) = match &spec.target {
        Target::Local(i) => locals[*i % locals.len()].clone(),
        Target::Fresh(n) => (
            COLLECTIONS[*n as usize % COLLECTIONS.len()].to_owned(),
            format!("{:024x}", 0xfeed_0000u64 + u64::from(*n)),
        ),
        Target::Raw(c, i) => (c.clone(), i.clone()),
    };
    // The base, when not given, is the greatest version held (an honest writer's).
    let (base_hlc, base_origin) = spec.base.clone().unwrap_or_else(|| {
        log(node)
            .into_iter()
            .filter(|c| c.collection == collection && c.doc_id == doc_id && !c.withheld)
            .map(|c| (c.hlc, c.origin))
            .max()
            .unwrap_or_default()
    });
    Change {
        origin: spec.origin.clone(),
        seq,
        hlc: spec.hlc,
        kind: spec.kind,
        collection,
        doc_id,
        body: spec.body.clone(),
        author: spec.author.clone(),
        author_admin: spec.admin,
        partial: spec.partial,
        fields: spec.fields.clone(),
        base_hlc,
        base_origin,
        withheld: false,
    }
}

fn check(batches: Vec<Vec<Spec>>, seed: u64) -> Result<(), TestCaseError> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let disk = MemDisk::new();
    let clock = ManualClock::new(T0);
    let mut node = open(&disk, &clock, seed);
    let who = admin();
    // What this site wrote before the peer spoke; nobody but admin may touch it.
    let guarded = json!([{"_id": who.id, "name": "admin", "rights": 65535}]);
    let doc = rt
        .block_on(node.insert("entities", obj(json!({"name": "mine", "n": 1, "_acl": guarded})), &who))
        .expect("insert");
    rt.block_on(node.add_queue(obj(json!({"name": "q", "_acl": guarded})), &who))
        .expect("queue");
    // A queue to pop from after each batch (peer items may land in it).
    rt.block_on(node.add_queue(obj(json!({"name": "other"})), &who))
        .expect("queue");
    let queue = node.queue("q").expect("queue doc");
    let item = rt
        .block_on(node.push_workitems("q", vec![obj(json!({"name": "w", "payload": {"k": 1}}))], &who))
        .expect("push");
    let locals: Vec<(String, String)> = vec![
        ("entities".into(), doc["_id"].as_str().expect("id").into()),
        ("mq".into(), queue["_id"].as_str().expect("id").into()),
        ("workitems".into(), item[0]["_id"].as_str().expect("id").into()),
    ];
    let mut guarded_state: Vec<(Value, usize)> = locals
        .iter()
        .map(|(c, i)| {
            (
                node.get(c, i).expect("get"),
                node.versions(c, i).expect("versions").len(),
            )
        })
        .collect();
    let own_log: Vec<Change> = log(&node).into_iter().filter(|c| c.origin == "a").collect();

    for (round, batch) in batches.into_iter().enumerate() {
        clock.set(T0 + 1_000 * (round as u64 + 1));
        let mut next = node.version_vector();
        let changes: Vec<Change> = batch.iter().map(|s| build(s, &node, &locals, &mut next)).collect();
        let before = node.version_vector();
        match rt.block_on(node.apply(changes.clone())) {
            Ok(r) => {
                if std::env::var("ADV_DEBUG").is_ok() {
                    eprintln!("ok {r:?}");
                }
            }
            Err(WriteError::Apply(e)) => {
                if std::env::var("ADV_DEBUG").is_ok() {
                    eprintln!("refused {e}");
                }
                prop_assert_eq!(node.version_vector(), before, "a refused batch wrote something");
            }
            Err(e) => {
                return Err(TestCaseError::fail(format!(
                    "applying {changes:?} failed with {e} instead of being refused"
                )));
            }
        }
        // Still writable and readable.
        let fresh = rt
            .block_on(node.insert("entities", obj(json!({"probe": round})), &who))
            .map_err(|e| TestCaseError::fail(format!("local write after {changes:?}: {e}")))?;
        let id = fresh["_id"].as_str().expect("id");
        prop_assert_eq!(node.get("entities", id).expect("read back"), fresh);
        snapshot(&node);
        for c in &changes {
            // Reading a touched document's history: an answer, never a failure of the store.
            if let Err(e) = node.versions(&c.collection, &c.doc_id)
                && matches!(e, ocmesh_node::ReadError::Storage(_))
            {
                return Err(TestCaseError::fail(format!(
                    "history of {}/{}: {e}",
                    c.collection, c.doc_id
                )));
            }
        }
        if changes.iter().any(|c| c.author_admin) {
            // An admin's change may touch anything: guard what stands now.
            guarded_state = locals
                .iter()
                .map(|(c, i)| {
                    (
                        node.get(c, i).unwrap_or(Value::Null),
                        node.versions(c, i).map_or(0, |v| v.len()),
                    )
                })
                .collect();
        }
        for ((c, i), (state, versions)) in locals.iter().zip(&guarded_state) {
            prop_assert_eq!(&node.get(c, i).unwrap_or(Value::Null), state, "{}/{} changed", c, i);
            prop_assert_eq!(node.versions(c, i).map_or(0, |v| v.len()), *versions);
        }
        // A peer's queue definition may carry bad settings (an error naming
        // them is the answer); the store itself must not fail.
        if let Err(WriteError::Storage(e)) = rt.block_on(node.pop_workitem("other", &who, None)) {
            return Err(TestCaseError::fail(format!("pop after {changes:?}: {e}")));
        }
    }
    prop_assert_eq!(
        log(&node)
            .into_iter()
            .filter(|c| c.origin == "a")
            .take(own_log.len())
            .collect::<Vec<_>>(),
        own_log
    );
    // A crash, then the write-ahead log's replay: everything acknowledged is back.
    let (vv, shown, all) = (node.version_vector(), snapshot(&node), log(&node));
    drop(node);
    disk.crash();
    node = open(&disk, &clock, seed.wrapping_add(1));
    prop_assert_eq!(node.version_vector(), vv);
    prop_assert_eq!(log(&node), all);
    prop_assert_eq!(snapshot(&node), shown);
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

    #[test]
    fn hostile_changes_leave_the_node_whole(
        batches in proptest::collection::vec(proptest::collection::vec(spec(), 1..5), 1..5),
        seed in any::<u64>(),
    ) {
        check(batches, seed)?;
    }
}

/// Two versions of one document under one (HLC, origin): a site never
/// issues a timestamp twice, so only a broken or hostile peer sends this.
/// The first keeps the version; the second is refused (counted, kept in
/// the log so catch-up stays exact) instead of failing the store and with
/// it every write grouped with it.
#[test]
fn a_reused_version_stamp_is_refused_not_a_store_failure() {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let disk = MemDisk::new();
    let clock = ManualClock::new(T0);
    let mut node = open(&disk, &clock, 7);
    let change = |seq: u64, kind: ChangeKind, body: Value| Change {
        origin: "b".into(),
        seq,
        hlc: (T0 + 5) << 16,
        kind: kind as i32,
        collection: "entities".into(),
        doc_id: "feed00000000000000000001".into(),
        body: serde_json::to_vec(&body).expect("json"),
        author: "mallory".into(),
        author_admin: true,
        ..Default::default()
    };
    let report = rt
        .block_on(node.apply(vec![
            change(1, ChangeKind::Insert, json!({"n": 1})),
            change(2, ChangeKind::Update, json!({"n": 2})),
        ]))
        .expect("applied");
    assert_eq!((report.applied, report.refused), (2, 1));
    let again = rt
        .block_on(node.apply(vec![change(3, ChangeKind::Update, json!({"n": 3}))]))
        .expect("applied");
    assert_eq!(again.refused, 1);
    assert_eq!(node.version_vector().get("b"), 3);
    assert_eq!(node.get("entities", "feed00000000000000000001").expect("get")["n"], 1);
    assert_eq!(
        node.versions("entities", "feed00000000000000000001")
            .expect("history")
            .len(),
        1
    );
    rt.block_on(node.insert("entities", obj(json!({"after": 1})), &admin()))
        .expect("still writable");
    // The replay of the write-ahead log decides the same.
    drop(node);
    disk.crash();
    node = open(&disk, &clock, 8);
    assert_eq!(node.version_vector().get("b"), 3);
    assert_eq!(node.get("entities", "feed00000000000000000001").expect("get")["n"], 1);
}
