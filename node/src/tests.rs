use serde_json::json;

use super::*;
use std::sync::atomic::Ordering;

fn admin() -> Principal {
    Principal {
        id: "0".repeat(24),
        name: "admin".into(),
    }
}

fn open(dir: &Path, site: &str) -> Node {
    Node::open(NodeConfig {
        data_dir: dir.into(),
        site: site.into(),
        admin_password: Some("pw".into()),
    })
    .expect("open")
    .node
}

fn obj(v: Value) -> Map<String, Value> {
    match v {
        Value::Object(m) => m,
        _ => panic!("not an object"),
    }
}

fn all_changes(node: &Node) -> Vec<Change> {
    node.read_changes(&FetchRequest {
        after: VersionVector::new(),
        max_changes: usize::MAX,
        max_bytes: usize::MAX,
    })
    .expect("read")
}

#[tokio::test]
async fn document_lifecycle_with_history() {
    let dir = tempfile::tempdir().expect("tmp");
    let node = open(dir.path(), "a");
    let doc = node
        .insert("entities", obj(json!({"name": "x", "_version": 7})), &admin())
        .await
        .expect("insert");
    let id = doc["_id"].as_str().expect("id").to_owned();
    assert_eq!(doc["_version"], 0);
    assert_eq!(doc["_createdby"], "admin");
    assert!(doc["_created"].as_str().expect("created").ends_with('Z'));
    assert_eq!(node.get("entities", &id).expect("get"), doc);

    let v1 = node
        .replace("entities", &id, obj(json!({"name": "y"})), &admin())
        .await
        .expect("replace");
    assert_eq!(v1["_version"], 1);
    assert_eq!(v1["_created"], doc["_created"]);
    let del = node.delete("entities", &id, &admin()).await.expect("delete");
    assert_eq!(del["_version"], 2);
    assert!(matches!(node.get("entities", &id), Err(ReadError::NotFound { .. })));

    let versions = node.versions("entities", &id).expect("versions");
    assert_eq!(versions.len(), 3);
    assert_eq!(versions[0], doc);
    assert_eq!(node.version("entities", &id, 1).expect("v1"), v1);
    assert!(node.version("entities", &id, 2).expect("v2")["_deleted"].is_string());
    assert!(matches!(
        node.version("entities", &id, 3),
        Err(ReadError::NoSuchVersion { version: 3, .. })
    ));

    // The change log has the three writes, numbered from 1.
    let seqs: Vec<u64> = all_changes(&node).iter().map(|c| c.seq).collect();
    assert_eq!(seqs, vec![1, 2, 3]);
    assert_eq!(node.version_vector().get("a"), 3);

    // Bad input writes nothing.
    assert!(matches!(
        node.insert("bad$name", Map::new(), &admin()).await,
        Err(WriteError::Name(_))
    ));
    assert!(matches!(
        node.insert("entities", obj(json!({"_id": "nope"})), &admin()).await,
        Err(WriteError::Name(_))
    ));
    assert!(matches!(
        node.insert("entities", obj(json!({"_id": 5})), &admin()).await,
        Err(WriteError::IdNotString(_))
    ));
    assert!(matches!(
        node.replace("entities", &id, Map::new(), &admin()).await,
        Err(WriteError::NotFound { .. })
    ));
    assert_eq!(node.version_vector().get("a"), 3);
}

#[tokio::test]
async fn survives_restart_and_refuses_other_site_name() {
    let dir = tempfile::tempdir().expect("tmp");
    let id = {
        let node = open(dir.path(), "a");
        let d = node
            .insert("entities", obj(json!({"k": 1})), &admin())
            .await
            .expect("insert");
        d["_id"].as_str().expect("id").to_owned()
    };
    // The writer thread ends with the last handle; give it a moment to close the file.
    let mut reopened = None;
    for _ in 0..100 {
        match Node::open(NodeConfig {
            data_dir: dir.path().into(),
            site: "a".into(),
            admin_password: None,
        }) {
            Ok(o) => {
                reopened = Some(o);
                break;
            }
            Err(_) => tokio::time::sleep(std::time::Duration::from_millis(20)).await,
        }
    }
    let opened = reopened.expect("reopen");
    assert!(opened.generated_admin_password.is_none(), "admin exists already");
    assert_eq!(opened.node.get("entities", &id).expect("get")["k"], 1);
    assert_eq!(opened.node.version_vector().get("a"), 1);
    drop(opened);
    let dir2 = tempfile::tempdir().expect("tmp");
    drop(open(dir2.path(), "a"));
    std::thread::sleep(std::time::Duration::from_millis(100));
    assert!(matches!(
        Node::open(NodeConfig {
            data_dir: dir2.path().into(),
            site: "b".into(),
            admin_password: None
        }),
        Err(OpenError::SiteMismatch { .. })
    ));
}

#[tokio::test]
async fn concurrent_writes_converge_on_both_sites_in_any_order() {
    let (da, db) = (tempfile::tempdir().expect("tmp"), tempfile::tempdir().expect("tmp"));
    let (a, b) = (open(da.path(), "a"), open(db.path(), "b"));
    let doc = a
        .insert("entities", obj(json!({"v": 0})), &admin())
        .await
        .expect("insert");
    let id = doc["_id"].as_str().expect("id").to_owned();
    b.apply(all_changes(&a)).await.expect("apply");
    assert_eq!(b.get("entities", &id).expect("get at b"), doc);

    // Both sites replace the document without hearing of the other.
    a.replace("entities", &id, obj(json!({"v": "a"})), &admin())
        .await
        .expect("a");
    b.replace("entities", &id, obj(json!({"v": "b"})), &admin())
        .await
        .expect("b");
    let from_a: Vec<Change> = all_changes(&a).into_iter().filter(|c| c.origin == "a").collect();
    let from_b: Vec<Change> = all_changes(&b).into_iter().filter(|c| c.origin == "b").collect();
    let ra = a.apply(from_b.clone()).await.expect("apply at a");
    let rb = b.apply(from_a.clone()).await.expect("apply at b");
    assert_eq!((ra.applied, rb.applied, rb.duplicates), (1, 1, 1));
    assert_eq!(a.get("entities", &id).expect("a"), b.get("entities", &id).expect("b"));
    let (va, vb) = (
        a.versions("entities", &id).expect("va"),
        b.versions("entities", &id).expect("vb"),
    );
    assert_eq!(va, vb);
    assert_eq!(va.len(), 3, "both concurrent versions stay in history");

    // Applying again changes nothing.
    let again = a.apply(from_b).await.expect("again");
    assert_eq!((again.applied, again.duplicates), (0, 1));
}

#[tokio::test]
async fn peer_batches_with_gaps_or_bad_bodies_are_refused_whole() {
    let (da, db) = (tempfile::tempdir().expect("tmp"), tempfile::tempdir().expect("tmp"));
    let (a, b) = (open(da.path(), "a"), open(db.path(), "b"));
    for i in 0..3 {
        a.insert("entities", obj(json!({"i": i})), &admin())
            .await
            .expect("insert");
    }
    let changes = all_changes(&a);
    let gap = vec![changes[0].clone(), changes[2].clone()];
    assert!(matches!(
        b.apply(gap).await,
        Err(WriteError::Apply(ApplyError::Gap {
            seq: 3,
            expected: 2,
            ..
        }))
    ));
    assert_eq!(
        b.version_vector().get("a"),
        0,
        "nothing of the refused batch was written"
    );
    let mut bad = changes[0].clone();
    bad.body = b"[1,2]".to_vec();
    assert!(matches!(
        b.apply(vec![bad]).await,
        Err(WriteError::Apply(ApplyError::BodyNotObject { .. }))
    ));
    let mut own = changes[0].clone();
    own.origin = "b".into();
    assert!(matches!(
        b.apply(vec![own]).await,
        Err(WriteError::Apply(ApplyError::OwnOrigin { .. }))
    ));
    b.apply(changes).await.expect("good batch");
    assert_eq!(b.version_vector().get("a"), 3);
}

#[tokio::test]
async fn read_changes_respects_limits_and_cursor() {
    let dir = tempfile::tempdir().expect("tmp");
    let node = open(dir.path(), "a");
    for i in 0..10 {
        node.insert("entities", obj(json!({"i": i})), &admin())
            .await
            .expect("insert");
    }
    let after: VersionVector = [("a".to_string(), 4)].into_iter().collect();
    let got = node
        .read_changes(&FetchRequest {
            after,
            max_changes: 3,
            max_bytes: usize::MAX,
        })
        .expect("read");
    assert_eq!(got.iter().map(|c| c.seq).collect::<Vec<_>>(), vec![5, 6, 7]);
    let got = node
        .read_changes(&FetchRequest {
            after: VersionVector::new(),
            max_changes: 100,
            max_bytes: 1,
        })
        .expect("read");
    assert_eq!(got.len(), 1, "one change even when it alone exceeds the byte budget");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_writers_share_commits() {
    let dir = tempfile::tempdir().expect("tmp");
    let node = open(dir.path(), "a");
    let mut tasks = Vec::new();
    for t in 0..32 {
        let node = node.clone();
        tasks.push(tokio::spawn(async move {
            for i in 0..20 {
                node.insert("entities", obj(json!({"t": t, "i": i})), &admin())
                    .await
                    .expect("insert");
            }
        }));
    }
    for t in tasks {
        t.await.expect("join");
    }
    let writes = node.stats().writes.load(Ordering::Relaxed);
    let commits = node.stats().commits.load(Ordering::Relaxed);
    assert_eq!(writes, 640);
    assert!(commits < writes / 2, "{commits} commits for {writes} writes");
    assert_eq!(node.version_vector().get("a"), 640);
}

#[tokio::test]
async fn authentication() {
    let dir = tempfile::tempdir().expect("tmp");
    let node = open(dir.path(), "a");
    let p = node.authenticate("admin", "pw").await.expect("sign in");
    assert_eq!(p.name, "admin");
    assert_eq!(node.principal_by_id(&p.id).expect("lookup"), Some(p));
    assert!(matches!(
        node.authenticate("admin", "nope").await,
        Err(AuthError::BadCredentials)
    ));
    assert!(matches!(
        node.authenticate("nobody", "pw").await,
        Err(AuthError::BadCredentials)
    ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn indexes_answer_like_a_scan_and_follow_every_write() {
    use crate::query::{Filter, Query};
    let dir = tempfile::tempdir().expect("tmp");
    let node = open(dir.path(), "a");
    let mut ids = Vec::new();
    for i in 0..300 {
        let kinds = ["pump", "valve", "fan"];
        let d = node
            .insert(
                "m",
                obj(json!({"_type": kinds[i % 3], "load": i % 10, "tags": [format!("t{}", i % 4), "all"]})),
                &admin(),
            )
            .await
            .expect("insert");
        ids.push(d["_id"].as_str().expect("id").to_owned());
    }
    node.create_index("m", "load").await.expect("index");
    node.create_index("m", "tags").await.expect("index");
    node.create_index("m", "load").await.expect("creating twice is fine");
    assert_eq!(node.indexes("m").expect("list"), vec!["_type", "load", "tags"]);

    // Writes after the index was built move entries too.
    node.replace("m", &ids[0], obj(json!({"_type": "fan", "load": 99})), &admin())
        .await
        .expect("replace");
    node.delete("m", &ids[1], &admin()).await.expect("delete");

    let filters = [
        json!({"_type": "pump"}),
        json!({"_type": "fan", "load": 99}),
        json!({"load": {"$in": [3, 4]}, "_type": {"$ne": "valve"}}),
        json!({"tags": "t2"}),
        json!({"load": 1.0}),
        json!({"load": {"$gt": 5}}),
    ];
    for f in filters {
        let filter = Filter::parse(&f).expect("filter");
        let q = Query {
            filter: filter.clone(),
            top: 1000,
            ..Query::default()
        };
        let planned = node.query("m", &q).expect("query");
        let scanned = q.run(
            node.query(
                "m",
                &Query {
                    top: 1000,
                    ..Query::default()
                },
            )
            .expect("all")
            .into_iter(),
        );
        assert_eq!(planned, scanned, "filter {f}");
        let uses_index = !matches!(node.plan("m", &filter).expect("plan"), Plan::FullScan);
        assert_eq!(uses_index, f != json!({"load": {"$gt": 5}}), "plan for {f}");
        assert_eq!(node.count("m", &filter).expect("count"), planned.len() as u64);
    }
    match node
        .plan("m", &Filter::parse(&json!({"_type": "pump"})).expect("f"))
        .expect("plan")
    {
        Plan::Index { field, ids } => assert_eq!((field.as_str(), ids.len()), ("_type", 99)),
        other => panic!("{other:?}"),
    }
    assert!(matches!(
        node.drop_index("m", "_type").await,
        Err(WriteError::BadIndex(_))
    ));
    node.drop_index("m", "load").await.expect("drop");
    assert!(matches!(
        node.drop_index("m", "load").await,
        Err(WriteError::BadIndex(_))
    ));
    assert!(matches!(
        node.plan("m", &Filter::parse(&json!({"load": 3})).expect("f"))
            .expect("plan"),
        Plan::FullScan
    ));
}
