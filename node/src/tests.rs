use serde_json::json;

use super::*;
use std::sync::atomic::Ordering;

fn admin() -> Principal {
    Principal {
        roles: vec![acl::ADMINS_ROLE_ID.into()],
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

/// A document's `_version` counts its whole history through deletes and
/// recoveries, where it is written and at every peer, however its versions
/// are batched (the count lives in the current document, and in
/// `history_len` only while the document is deleted).
#[tokio::test]
async fn version_numbers_count_history_through_deletes() {
    let dir = tempfile::tempdir().expect("tmp");
    let a = open(&dir.path().join("a"), "a");
    let who = admin();
    let doc = a.insert("entities", obj(json!({"n": 0})), &who).await.expect("insert");
    let id = doc["_id"].as_str().expect("id").to_owned();
    let mut numbers = vec![doc["_version"].clone()];
    numbers.push(a.delete("entities", &id, &who).await.expect("delete")["_version"].clone());
    numbers.push(a.recover("entities", &id, &who).await.expect("recover")["_version"].clone());
    numbers.push(
        a.replace("entities", &id, obj(json!({"n": 3})), &who)
            .await
            .expect("replace")["_version"]
            .clone(),
    );
    numbers.push(a.delete("entities", &id, &who).await.expect("delete")["_version"].clone());
    numbers.push(a.recover("entities", &id, &who).await.expect("recover")["_version"].clone());
    assert_eq!(numbers, (0..6).map(|n| json!(n)).collect::<Vec<_>>());
    let current = a.get("entities", &id).expect("get");
    assert_eq!(
        (current["_version"].clone(), current["n"].clone()),
        (json!(5), json!(3))
    );

    let changes = all_changes(&a);
    // One batch, or one change per batch (meeting each delete): the same document.
    let b = open(&dir.path().join("b"), "b");
    b.apply(changes.clone()).await.expect("apply");
    assert_eq!(b.get("entities", &id).expect("b"), current);
    let c = open(&dir.path().join("c"), "c");
    for ch in &changes {
        c.apply(vec![ch.clone()]).await.expect("apply one");
    }
    assert_eq!(c.get("entities", &id).expect("c"), current);
    assert_eq!(c.versions("entities", &id).expect("versions").len(), 6);
    // The count goes on after the writer's next update and at the peers.
    let next = a
        .replace("entities", &id, obj(json!({"n": 6})), &who)
        .await
        .expect("replace");
    assert_eq!(next["_version"], 6);
    let newest: Vec<Change> = all_changes(&a).into_iter().filter(|ch| ch.seq == 7).collect();
    b.apply(newest).await.expect("apply newest");
    assert_eq!(b.get("entities", &id).expect("b"), next);
}

/// The writer keeps the documents its local writes stored (see
/// `store::DocCache`); a peer's change to one must replace what it keeps,
/// or the next local update would build on a stale document.
#[tokio::test]
async fn a_local_update_after_a_peer_change_builds_on_it() {
    let dir = tempfile::tempdir().expect("tmp");
    let (a, b) = (open(&dir.path().join("a"), "a"), open(&dir.path().join("b"), "b"));
    let who = admin();
    let doc = a
        .insert("entities", obj(json!({"x": 0, "y": 0})), &who)
        .await
        .expect("insert");
    let id = doc["_id"].as_str().expect("id").to_owned();
    a.update("entities", &id, json!({"$set": {"x": 1}}), &who)
        .await
        .expect("a");
    b.apply(all_changes(&a)).await.expect("apply at b");
    b.update("entities", &id, json!({"$set": {"y": 2}}), &who)
        .await
        .expect("b");
    let from_b: Vec<Change> = all_changes(&b).into_iter().filter(|c| c.origin == "b").collect();
    a.apply(from_b).await.expect("apply at a");
    let after = a
        .update("entities", &id, json!({"$set": {"z": 3}}), &who)
        .await
        .expect("a again");
    assert_eq!(
        (after["x"].clone(), after["y"].clone(), after["z"].clone()),
        (json!(1), json!(2), json!(3))
    );
    assert_eq!(after["_version"], 3);
    assert_eq!(a.get("entities", &id).expect("get"), after);
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

/// Concurrent writes share commits (see `Writer::run_shared`) and are
/// acknowledged before their commit is published: each caller must still
/// read its own write at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_writers_share_commits_and_read_their_own_writes() {
    let dir = tempfile::tempdir().expect("tmp");
    let node = open(dir.path(), "a");
    let mut tasks = Vec::new();
    for t in 0..32 {
        let node = node.clone();
        tasks.push(tokio::spawn(async move {
            for i in 0..20 {
                let doc = node
                    .insert("entities", obj(json!({"t": t, "i": i})), &admin())
                    .await
                    .expect("insert");
                let id = doc["_id"].as_str().expect("id").to_owned();
                assert_eq!(node.get("entities", &id).expect("get"), doc, "writer {t} write {i}");
                let v1 = node
                    .replace("entities", &id, obj(json!({"t": t, "i": i, "again": true})), &admin())
                    .await
                    .expect("replace");
                assert_eq!(node.get("entities", &id).expect("get"), v1, "writer {t} write {i}");
            }
        }));
    }
    for t in tasks {
        t.await.expect("join");
    }
    let writes = node.stats().writes.load(Ordering::Relaxed);
    let commits = node.stats().commits.load(Ordering::Relaxed);
    assert_eq!(writes, 1280);
    assert!(commits < writes / 2, "{commits} commits for {writes} writes");
    assert_eq!(node.version_vector().get("a"), 1280);
    // Every acknowledged write's time is split into its stages.
    let m = node.metrics();
    assert!(m["answered_writes"].as_u64() >= Some(1280), "{m}");
    assert!(m["round_trips"].as_u64() >= Some(1280), "{m}");
    let stats = node.stats();
    for (stage, nanos) in [
        ("until logged", &stats.until_logged_nanos),
        ("until synced", &stats.until_synced_nanos),
        ("until answered", &stats.until_answered_nanos),
        ("round trip", &stats.round_trip_nanos),
    ] {
        assert!(nanos.load(Ordering::Relaxed) > 0, "{stage}: {m}");
    }
}

#[tokio::test]
async fn authentication() {
    let dir = tempfile::tempdir().expect("tmp");
    let node = open(dir.path(), "a");
    let p = node.authenticate("admin", "pw").await.expect("sign in");
    assert_eq!(p.name, "admin");
    assert!(p.is_admin() && p.roles.iter().any(|r| r == acl::USERS_ROLE_ID), "{p:?}");
    let found = node.principal_by_id(&p.id).expect("lookup").expect("known");
    assert_eq!((found.id, found.name), (p.id.clone(), p.name.clone()));
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
async fn repeated_failed_sign_ins_make_the_name_wait() {
    let dir = tempfile::tempdir().expect("tmp");
    let clock = ManualClock::new(1_000_000);
    let node = Node::open_with(
        NodeConfig {
            data_dir: dir.path().into(),
            site: "a".into(),
            admin_password: Some("pw".into()),
        },
        OpenOptions {
            clock: Arc::new(clock.clone()),
            ..OpenOptions::default()
        },
    )
    .expect("open")
    .node;
    for _ in 0..6 {
        assert!(matches!(
            node.authenticate("admin", "guess").await,
            Err(AuthError::BadCredentials)
        ));
    }
    // Even the right password waits now, and the answer says how long.
    match node.authenticate("admin", "pw").await {
        Err(e @ AuthError::TooManyAttempts { retry_after_secs: 1 }) => {
            assert!(e.to_string().contains("try again in 1 s"), "{e}");
        }
        other => panic!("expected TooManyAttempts, got {other:?}"),
    }
    clock.set(1_001_000);
    node.authenticate("admin", "pw").await.expect("after the wait");
    // The success cleared the name.
    assert!(matches!(
        node.authenticate("admin", "guess").await,
        Err(AuthError::BadCredentials)
    ));
    node.authenticate("admin", "pw").await.expect("not blocked");
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
    // Updates that leave an indexed field alone keep its entries; updates
    // of a nested path under an indexed top-level field move them.
    node.create_index("m", "spec.size").await.expect("index");
    for id in &ids[2..40] {
        node.update("m", id, json!({"$set": {"note": "seen"}}), &admin())
            .await
            .expect("update");
    }
    node.update("m", &ids[5], json!({"$set": {"spec": {"size": 1}}}), &admin())
        .await
        .expect("update");
    node.update("m", &ids[5], json!({"$set": {"spec.size": 2}}), &admin())
        .await
        .expect("update");
    node.update("m", &ids[6], json!({"$set": {"load": 77}}), &admin())
        .await
        .expect("update");

    let filters = [
        json!({"spec.size": 2}),
        json!({"spec.size": 1}),
        json!({"load": 77}),
        json!({"load": 6}),
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
    node.drop_index("m", "spec.size").await.expect("drop");
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

mod workitems {
    use super::*;
    use crate::workitems::WorkItemError;
    use std::time::Duration;

    async fn queue(node: &Node, doc: Value) {
        node.add_queue(obj(doc), &admin()).await.expect("queue");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn priority_then_fifo_and_never_twice() {
        let dir = tempfile::tempdir().expect("tmp");
        let node = open(dir.path(), "a");
        queue(&node, json!({"name": "jobs"})).await;
        let mut pushed = Vec::new();
        for (i, p) in [3, 1, 2, 1, 3, 1].iter().enumerate() {
            let d = node
                .push_workitems(
                    "jobs",
                    vec![obj(
                        json!({"name": format!("i{i}"), "priority": p, "payload": {"i": i}}),
                    )],
                    &admin(),
                )
                .await
                .expect("push");
            pushed.push(d[0]["name"].as_str().expect("name").to_owned());
        }
        let mut order = Vec::new();
        while let Some(item) = node.pop_workitem("jobs", &admin(), None).await.expect("pop") {
            assert_eq!(item["state"], "processing");
            order.push(item["name"].as_str().expect("name").to_owned());
        }
        assert_eq!(order, vec!["i1", "i3", "i5", "i2", "i0", "i4"]);

        // Many poppers at once: every item exactly once.
        let items: Vec<Map<String, Value>> = (0..200).map(|i| obj(json!({"payload": {"n": i}}))).collect();
        node.push_workitems("jobs", items, &admin()).await.expect("push many");
        let mut tasks = Vec::new();
        for _ in 0..8 {
            let node = node.clone();
            tasks.push(tokio::spawn(async move {
                let mut got = Vec::new();
                while let Some(item) = node.pop_workitem("jobs", &admin(), None).await.expect("pop") {
                    got.push(item["payload"]["n"].as_u64().expect("n"));
                }
                got
            }));
        }
        let mut all = Vec::new();
        for t in tasks {
            all.extend(t.await.expect("join"));
        }
        all.sort();
        assert_eq!(all, (0..200).collect::<Vec<u64>>());
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn retries_business_errors_and_routing() {
        let dir = tempfile::tempdir().expect("tmp");
        let node = open(dir.path(), "a");
        queue(
            &node,
            json!({"name": "work", "maxretries": 2, "retrydelay": 0, "success_wiq": "done", "failed_wiq": "broken"}),
        )
        .await;
        queue(&node, json!({"name": "done"})).await;
        queue(&node, json!({"name": "broken"})).await;
        node.push_workitems("work", vec![obj(json!({"name": "a", "payload": {"k": 1}}))], &admin())
            .await
            .expect("push");

        // Application errors retry until maxretries.
        for expected_retries in 1..=2u64 {
            let item = node
                .pop_workitem("work", &admin(), None)
                .await
                .expect("pop")
                .expect("an item");
            let id = item["_id"].as_str().expect("id").to_owned();
            let after = node
                .update_workitem(&id, "retry", Some("application"), Some("flaky".into()), None, &admin())
                .await
                .expect("update");
            assert_eq!(after["retries"], expected_retries);
            let expect_state = if expected_retries < 2 { "new" } else { "failed" };
            assert_eq!(after["state"], expect_state, "{after}");
        }
        let routed = node
            .pop_workitem("broken", &admin(), None)
            .await
            .expect("pop")
            .expect("routed to failed_wiq");
        assert_eq!(routed["payload"], json!({"k": 1}));

        // Business errors never retry; success routes to success_wiq.
        node.push_workitems(
            "work",
            vec![
                obj(json!({"name": "b"})),
                obj(json!({"name": "c", "success_wiq": "broken"})),
            ],
            &admin(),
        )
        .await
        .expect("push");
        let b = node
            .pop_workitem("work", &admin(), None)
            .await
            .expect("pop")
            .expect("b");
        let b = node
            .update_workitem(
                b["_id"].as_str().expect("id"),
                "failed",
                Some("business"),
                None,
                None,
                &admin(),
            )
            .await
            .expect("fail");
        assert_eq!((b["state"].as_str(), b["retries"].as_u64()), (Some("failed"), Some(0)));
        let c = node
            .pop_workitem("work", &admin(), None)
            .await
            .expect("pop")
            .expect("c");
        node.update_workitem(
            c["_id"].as_str().expect("id"),
            "successful",
            None,
            None,
            Some(obj(json!({"out": 1}))),
            &admin(),
        )
        .await
        .expect("ok");
        // b's business failure went to broken first, then c by its own success_wiq.
        let b2 = node
            .pop_workitem("broken", &admin(), None)
            .await
            .expect("pop")
            .expect("b routed");
        assert_eq!(b2["name"], "b");
        let c2 = node
            .pop_workitem("broken", &admin(), None)
            .await
            .expect("pop")
            .expect("per-item override");
        assert_eq!(
            (c2["name"].as_str(), c2["payload"].clone()),
            (Some("c"), json!({"out": 1}))
        );
        assert!(node.pop_workitem("done", &admin(), None).await.expect("pop").is_none());

        // History of a work item is kept.
        let versions = node
            .versions("workitems", c["_id"].as_str().expect("id"))
            .expect("history");
        assert!(versions.len() >= 3);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn bad_input_writes_nothing() {
        let dir = tempfile::tempdir().expect("tmp");
        let node = open(dir.path(), "a");
        assert!(matches!(
            node.add_queue(obj(json!({"name": "q", "maxretries": "many"})), &admin())
                .await,
            Err(WriteError::WorkItem(WorkItemError::BadSetting { .. }))
        ));
        queue(&node, json!({"name": "q"})).await;
        assert!(matches!(
            node.add_queue(obj(json!({"name": "q"})), &admin()).await,
            Err(WriteError::WorkItem(WorkItemError::QueueExists(_)))
        ));
        let before = node.version_vector();
        let r = node
            .push_workitems(
                "q",
                vec![obj(json!({"payload": {}})), obj(json!({"payload": [1]}))],
                &admin(),
            )
            .await;
        assert!(matches!(
            r,
            Err(WriteError::WorkItem(WorkItemError::BadItem { field: "payload", .. }))
        ));
        assert_eq!(node.version_vector(), before, "nothing half-written");
        assert!(matches!(
            node.pop_workitem("nope", &admin(), None).await,
            Err(WriteError::WorkItem(WorkItemError::NoQueue(_)))
        ));
        assert!(matches!(
            node.update_workitem("0123456789abcdef01234567", "successful", None, None, None, &admin())
                .await,
            Err(WriteError::WorkItem(WorkItemError::NoItem(_)))
        ));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn waiting_pop_wakes_on_push_and_delays_hold() {
        let dir = tempfile::tempdir().expect("tmp");
        let node = open(dir.path(), "a");
        queue(&node, json!({"name": "w", "initialdelay": 1})).await;
        let waiter = {
            let node = node.clone();
            tokio::spawn(async move { node.pop_workitem("w", &admin(), Some(Duration::from_secs(10))).await })
        };
        tokio::time::sleep(Duration::from_millis(100)).await;
        let started = tokio::time::Instant::now();
        node.push_workitems("w", vec![obj(json!({"name": "late"}))], &admin())
            .await
            .expect("push");
        assert!(
            node.pop_workitem("w", &admin(), None).await.expect("pop").is_none(),
            "initialdelay holds it"
        );
        let got = waiter.await.expect("join").expect("pop").expect("item after the delay");
        let waited = started.elapsed();
        assert_eq!(got["name"], "late");
        assert!(
            waited >= Duration::from_millis(900) && waited < Duration::from_secs(5),
            "{waited:?}"
        );
        assert!(
            node.pop_workitem("w", &admin(), Some(Duration::from_millis(300)))
                .await
                .expect("pop")
                .is_none()
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_expired_lease_returns_the_item() {
        let dir = tempfile::tempdir().expect("tmp");
        let node = open(dir.path(), "a");
        queue(&node, json!({"name": "l", "leasetime": 1, "maxretries": 5})).await;
        node.push_workitems("l", vec![obj(json!({"name": "stuck"}))], &admin())
            .await
            .expect("push");
        let first = node
            .pop_workitem("l", &admin(), None)
            .await
            .expect("pop")
            .expect("item");
        let again = node
            .pop_workitem("l", &admin(), Some(Duration::from_secs(6)))
            .await
            .expect("pop")
            .expect("back after the lease");
        assert_eq!(first["_id"], again["_id"]);
        assert_eq!(again["retries"], 1);
        assert_eq!(again["errormessage"], "processing lease expired");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_finished_item_is_not_completed_again() {
        let dir = tempfile::tempdir().expect("tmp");
        let node = open(dir.path(), "a");
        queue(&node, json!({"name": "once", "success_wiq": "next"})).await;
        queue(&node, json!({"name": "next"})).await;
        node.push_workitems("once", vec![obj(json!({"name": "one"}))], &admin())
            .await
            .expect("push");
        let item = node
            .pop_workitem("once", &admin(), None)
            .await
            .expect("pop")
            .expect("item");
        let id = item["_id"].as_str().expect("id").to_owned();
        node.update_workitem(&id, "successful", None, None, None, &admin())
            .await
            .expect("complete");
        for state in ["successful", "failed", "retry"] {
            let again = node.update_workitem(&id, state, None, None, None, &admin()).await;
            assert!(
                matches!(
                    again,
                    Err(WriteError::WorkItem(WorkItemError::AlreadyDone { ref state, .. })) if state == "successful"
                ),
                "{state} after successful: {again:?}"
            );
        }
        // One routed copy, and the item's history holds one completion.
        assert!(node.pop_workitem("next", &admin(), None).await.expect("pop").is_some());
        assert!(node.pop_workitem("next", &admin(), None).await.expect("pop").is_none());
        assert_eq!(node.versions("workitems", &id).expect("versions").len(), 3);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn identical_file_content_is_stored_once() {
    let dir = tempfile::tempdir().expect("tmp");
    let node = open(dir.path(), "a");
    let content: Vec<u8> = (0..600_000u32).map(|i| (i % 251) as u8).collect();
    let mut metas = Vec::new();
    for name in ["a.bin", "b.bin"] {
        let mut up = node.upload(10_000_000);
        for part in content.chunks(70_001) {
            up.write(part).await.expect("write");
        }
        metas.push(
            up.finish(name, "application/octet-stream", Map::new(), &admin())
                .await
                .expect("finish"),
        );
    }
    assert_eq!(metas[0]["chunks"], metas[1]["chunks"]);
    let txn = node.read().expect("read");
    let chunks = txn.open_table(store::CHUNKS).expect("table");
    use redb::ReadableTableMetadata;
    // 600,000 bytes = two full 256 KiB chunks and a tail, held once.
    assert_eq!(chunks.len().expect("len"), 3);
    let mut round_trip = Vec::new();
    for h in files::chunk_hashes(&metas[1]).expect("hashes") {
        round_trip.extend(node.read_chunk(&h).expect("read").expect("held"));
    }
    assert_eq!(round_trip, content);
    let mut small = node.upload(10);
    assert!(matches!(
        small.write(&[0; 11]).await,
        Err(WriteError::File(files::FileError::TooLarge { limit: 10 }))
    ));
}

/// The files of a running node, copied between checkpoints, are what a
/// crash leaves: redb at its last durable commit plus the synced log.
/// Opening the copy must bring back every acknowledged write.
#[tokio::test]
async fn acknowledged_writes_survive_a_crash_through_the_log() {
    let dir = tempfile::tempdir().expect("tmp");
    let node = open(dir.path(), "a");
    node.add_queue(obj(json!({"name": "q"})), &admin())
        .await
        .expect("queue");
    let mut ids = Vec::new();
    for i in 0..40 {
        let d = node
            .insert("entities", obj(json!({"i": i})), &admin())
            .await
            .expect("insert");
        ids.push(d["_id"].as_str().expect("id").to_owned());
    }
    node.push_workitems(
        "q",
        vec![obj(json!({"payload": {"n": 1}})), obj(json!({"payload": {"n": 2}}))],
        &admin(),
    )
    .await
    .expect("push");
    let popped = node
        .pop_workitem("q", &admin(), None)
        .await
        .expect("pop")
        .expect("item");
    let popped_id = popped["_id"].as_str().expect("id").to_owned();
    let before = node.version_vector();
    assert!(
        node.stats().wal_bytes.load(Ordering::Relaxed) > 0,
        "the writes went through the log"
    );

    let crash = tempfile::tempdir().expect("tmp");
    for f in ["ocmesh.redb", "ocmesh.wal"] {
        std::fs::copy(dir.path().join(f), crash.path().join(f)).expect("copy");
    }
    let reopened = open(crash.path(), "a");
    assert!(
        reopened.stats().wal_replayed.load(Ordering::Relaxed) > 0,
        "recovery replayed the log"
    );
    assert_eq!(reopened.version_vector(), before);
    for id in &ids {
        reopened.get("entities", id).expect("acknowledged insert");
    }
    assert_eq!(
        reopened.get("workitems", &popped_id).expect("item")["state"],
        "processing"
    );
    // The other item is still ready, and only it.
    let next = reopened
        .pop_workitem("q", &admin(), None)
        .await
        .expect("pop")
        .expect("item");
    assert_ne!(next["_id"], popped["_id"]);
    assert!(reopened.pop_workitem("q", &admin(), None).await.expect("pop").is_none());
    // New writes continue the sequence (the pop above made one change).
    reopened
        .insert("entities", obj(json!({"after": true})), &admin())
        .await
        .expect("insert");
    assert_eq!(reopened.version_vector().get("a"), before.get("a") + 2);

    // A damaged log tail loses only what follows the damage.
    let torn = tempfile::tempdir().expect("tmp");
    std::fs::copy(dir.path().join("ocmesh.redb"), torn.path().join("ocmesh.redb")).expect("copy");
    let log = std::fs::read(dir.path().join("ocmesh.wal")).expect("read");
    std::fs::write(torn.path().join("ocmesh.wal"), &log[..log.len() - 3]).expect("write");
    let partial = open(torn.path(), "a");
    let held = partial.version_vector().get("a");
    assert!(held < before.get("a"), "the torn last record is not replayed");
    assert!(held > 0);
}

/// Sites a and b (and their directories), both holding a document a
/// inserted with `body`; returns the document as a wrote it.
async fn shared_document(body: Value) -> ((tempfile::TempDir, tempfile::TempDir), Node, Node, Value) {
    let (da, db) = (tempfile::tempdir().expect("tmp"), tempfile::tempdir().expect("tmp"));
    let (a, b) = (open(da.path(), "a"), open(db.path(), "b"));
    let doc = a.insert("entities", obj(body), &admin()).await.expect("insert");
    b.apply(all_changes(&a)).await.expect("apply");
    ((da, db), a, b, doc)
}

/// A peer's first versions are stored without parsing their bodies whole
/// (`crate::body_scan`): b's indexes, among them one on a nested field,
/// answer exactly as a scan does and as a's do, and b shows a's documents
/// unchanged; a later update of one of them moves its entries.
#[tokio::test]
async fn a_peers_first_versions_are_indexed_from_their_fields_alone() {
    use crate::query::{Filter, Query};
    let (da, db) = (tempfile::tempdir().expect("tmp"), tempfile::tempdir().expect("tmp"));
    let (a, b) = (open(da.path(), "a"), open(db.path(), "b"));
    for node in [&a, &b] {
        node.create_index("m", "spec.load").await.expect("index");
        node.create_index("m", "tags").await.expect("index");
    }
    let mut ids = Vec::new();
    for i in 0..60 {
        let kinds = ["pump", "valve", "fan"];
        let body = json!({
            "_type": kinds[i % 3],
            "note": "x\"y\u{e9}",
            "spec": {"load": i % 7, "deep": [{"load": 1}]},
            "tags": [format!("t{}", i % 4), "all"],
        });
        let d = a.insert("m", obj(body), &admin()).await.expect("insert");
        ids.push(d["_id"].as_str().expect("id").to_owned());
    }
    b.apply(all_changes(&a)).await.expect("apply");
    a.update(
        "m",
        &ids[0],
        json!({"$set": {"spec": {"load": 99}, "_type": "fan"}}),
        &admin(),
    )
    .await
    .expect("update");
    b.apply(from_origin(&a, "a")).await.expect("apply the update");
    let all = Query {
        top: 1000,
        ..Query::default()
    };
    assert_eq!(a.query("m", &all).expect("a"), b.query("m", &all).expect("b"));
    for f in [
        json!({"_type": "pump"}),
        json!({"_type": "fan", "spec.load": 99}),
        json!({"spec.load": {"$in": [3, 4]}}),
        json!({"tags": "t2"}),
    ] {
        let filter = Filter::parse(&f).expect("filter");
        assert!(
            !matches!(b.plan("m", &filter).expect("plan"), Plan::FullScan),
            "{f} uses an index"
        );
        let q = Query {
            filter,
            top: 1000,
            ..Query::default()
        };
        let planned = b.query("m", &q).expect("query");
        assert!(!planned.is_empty(), "{f}");
        assert_eq!(
            planned,
            q.run(b.query("m", &all).expect("all").into_iter()),
            "filter {f}"
        );
        assert_eq!(planned, a.query("m", &q).expect("at a"), "filter {f}");
    }
}

/// Sites a and b each apply the changes the other made itself.
async fn exchange_own_changes(a: &Node, b: &Node) {
    let (from_a, from_b) = (from_origin(a, "a"), from_origin(b, "b"));
    a.apply(from_b).await.expect("apply at a");
    b.apply(from_a).await.expect("apply at b");
}

/// Two sites edit different fields of one document while apart: both edits
/// survive the merge. Edits of the same field keep the later one, both stay
/// in history, and the conflict is listed the same on both sites.
#[tokio::test]
async fn concurrent_field_edits_merge_and_same_field_edits_are_conflicts() {
    let (_dirs, a, b, doc) = shared_document(json!({"x": 0, "y": 0, "z": 0})).await;
    let id = doc["_id"].as_str().expect("id").to_owned();

    a.update("entities", &id, json!({"$set": {"x": "a", "z": "a"}}), &admin())
        .await
        .expect("a");
    b.update("entities", &id, json!({"$set": {"y": "b", "z": "b"}}), &admin())
        .await
        .expect("b");
    exchange_own_changes(&a, &b).await;
    let (ga, gb) = (a.get("entities", &id).expect("a"), b.get("entities", &id).expect("b"));
    assert_eq!(ga, gb, "both sites show the same document");
    assert_eq!(ga["x"], "a", "a's edit of x survived");
    assert_eq!(ga["y"], "b", "b's edit of y survived");
    assert_eq!(ga["_version"], 2);
    let (ca, cb) = (
        a.conflicts(None, None, &admin()).expect("a"),
        b.conflicts(Some("entities"), Some(&id), &admin()).expect("b"),
    );
    assert_eq!(ca, cb);
    assert_eq!(ca.len(), 1, "{ca:?}");
    assert_eq!(ca[0]["field"], "z");
    // The later version's value stands; the other is still in history.
    let kept = ca[0]["kept"].as_u64().expect("kept");
    let lost = ca[0]["lost"].as_u64().expect("lost");
    assert_eq!(ga["z"], a.version("entities", &id, kept).expect("kept")["z"]);
    assert_ne!(ga["z"], a.version("entities", &id, lost).expect("lost")["z"]);
    // A user who cannot read the document does not see its conflicts.
    let stranger = Principal {
        id: "1".repeat(24),
        name: "stranger".into(),
        roles: vec![acl::USERS_ROLE_ID.into()],
    };
    assert!(a.conflicts(None, None, &stranger).expect("list").is_empty());
}

/// The stored form of a current document: its first byte tells a
/// reference to a version (0) from JSON (`{`).
fn stored_form(node: &Node, collection: &str, id: &str) -> u8 {
    let txn = node.read().expect("read");
    let docs = txn.open_table(store::DOCUMENTS).expect("table");
    let v = docs.get((collection, id)).expect("get").expect("stored");
    v.value()[0]
}

/// A document that is one version's body is stored as a reference to that
/// change (its body is kept once); a merge of several versions is stored
/// as JSON. Both read back the same way, fields in key order, on every site.
#[tokio::test]
async fn a_current_document_is_a_reference_to_its_version_unless_merged() {
    let (dirs, a, b, doc) = shared_document(json!({"z": 0, "y": 0, "x": 0})).await;
    let id = doc["_id"].as_str().expect("id").to_owned();
    assert_eq!(stored_form(&a, "entities", &id), 0, "a local insert is a reference");
    assert_eq!(stored_form(&b, "entities", &id), 0, "a peer's insert is a reference");
    let text = |v: &Value| serde_json::to_string(v).expect("text");
    let (ga, gb) = (a.get("entities", &id).expect("a"), b.get("entities", &id).expect("b"));
    assert_eq!(text(&ga), text(&gb));
    let keys: Vec<&String> = ga.as_object().expect("object").keys().collect();
    let mut sorted = keys.clone();
    sorted.sort();
    assert_eq!(keys, sorted, "fields in key order");
    assert_eq!(text(&ga), text(&doc), "the write's answer is what a read shows");

    a.update("entities", &id, json!({"$set": {"x": "a"}}), &admin())
        .await
        .expect("a");
    b.update("entities", &id, json!({"$set": {"y": "b"}}), &admin())
        .await
        .expect("b");
    exchange_own_changes(&a, &b).await;
    // Whichever version is greater, one of the two sites had to merge.
    let forms = (stored_form(&a, "entities", &id), stored_form(&b, "entities", &id));
    assert!(forms.0 == b'{' || forms.1 == b'{', "{forms:?}");
    let (ga, gb) = (a.get("entities", &id).expect("a"), b.get("entities", &id).expect("b"));
    assert_eq!(text(&ga), text(&gb), "both forms read the same");
    assert_eq!((ga["x"].clone(), ga["y"].clone()), (json!("a"), json!("b")));
    let q = query::Query::from_json(&json!({"filter": {"x": "a"}})).expect("query");
    assert_eq!(a.query("entities", &q).expect("query"), vec![ga.clone()]);
    assert_eq!(b.query("entities", &q).expect("query"), vec![gb]);
    drop(a);
    let a = reopen(dirs.0.path(), "a").await;
    assert_eq!(text(&a.get("entities", &id).expect("a")), text(&ga), "after a restart");
}

/// A delete made at one site is not undone by an edit a late peer made to
/// the old document.
#[tokio::test]
async fn a_late_edit_does_not_bring_a_deleted_document_back() {
    let (da, db) = (tempfile::tempdir().expect("tmp"), tempfile::tempdir().expect("tmp"));
    let (a, b) = (open(da.path(), "a"), open(db.path(), "b"));
    let doc = a
        .insert("entities", obj(json!({"x": 0})), &admin())
        .await
        .expect("insert");
    let id = doc["_id"].as_str().expect("id").to_owned();
    b.apply(all_changes(&a)).await.expect("apply");
    a.delete("entities", &id, &admin()).await.expect("delete");
    // b edits later (a greater HLC) without having seen the delete.
    tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    b.update("entities", &id, json!({"$set": {"x": 1}}), &admin())
        .await
        .expect("edit");
    let from_b: Vec<Change> = all_changes(&b).into_iter().filter(|c| c.origin == "b").collect();
    let from_a: Vec<Change> = all_changes(&a).into_iter().filter(|c| c.origin == "a").collect();
    a.apply(from_b).await.expect("apply at a");
    b.apply(from_a).await.expect("apply at b");
    for n in [&a, &b] {
        assert!(matches!(n.get("entities", &id), Err(ReadError::NotFound { .. })));
        assert_eq!(n.versions("entities", &id).expect("history").len(), 3);
        assert_eq!(n.conflicts(None, None, &admin()).expect("list")[0]["field"], "_deleted");
    }
}

/// Three sites edit one document while apart, then two fresh sites receive
/// everything in different interleavings (and with duplicates): every site
/// ends with the same document and the same conflicts.
#[tokio::test]
async fn merged_state_does_not_depend_on_delivery_order() {
    for seed in 1..=4u64 {
        let dirs: Vec<_> = (0..5).map(|_| tempfile::tempdir().expect("tmp")).collect();
        let names = ["a", "b", "c", "d", "e"];
        let nodes: Vec<Node> = dirs.iter().zip(names).map(|(d, n)| open(d.path(), n)).collect();
        let doc = nodes[0]
            .insert("entities", obj(json!({"p": 0, "q": 0, "r": 0})), &admin())
            .await
            .expect("insert");
        let id = doc["_id"].as_str().expect("id").to_owned();
        let base = all_changes(&nodes[0]);
        for n in &nodes[1..] {
            n.apply(base.clone()).await.expect("apply");
        }
        let mut s = seed;
        let mut next = |m: u64| {
            s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            (s >> 33) % m
        };
        for step in 0..9 {
            let site = &nodes[(next(3)) as usize];
            let field = ["p", "q", "r"][next(3) as usize];
            let update = if next(4) == 0 {
                json!({"$unset": {field: ""}})
            } else {
                json!({"$set": {field: format!("{}{step}", site.site())}})
            };
            site.update("entities", &id, update, &admin()).await.expect("edit");
        }
        let per_origin: Vec<Vec<Change>> = ["a", "b", "c"]
            .iter()
            .map(|o| {
                all_changes(nodes[0..3].iter().find(|n| n.site() == *o).expect("site"))
                    .into_iter()
                    .filter(|c| c.origin == *o)
                    .collect()
            })
            .collect();
        // d: origin by origin; e: interleaved one change at a time, some twice.
        for changes in &per_origin {
            nodes[3].apply(changes.clone()).await.expect("apply d");
        }
        let mut cursors = [0usize; 3];
        while cursors.iter().zip(&per_origin).any(|(c, l)| *c < l.len()) {
            let o = next(3) as usize;
            let Some(c) = per_origin[o].get(cursors[o]) else {
                continue;
            };
            nodes[4].apply(vec![c.clone()]).await.expect("apply e");
            if next(3) == 0 {
                nodes[4].apply(vec![c.clone()]).await.expect("duplicate");
            }
            cursors[o] += 1;
        }
        // The three writers exchange everything too.
        for n in &nodes[0..3] {
            for (o, changes) in per_origin.iter().enumerate() {
                if ["a", "b", "c"][o] != n.site() {
                    n.apply(changes.clone()).await.expect("exchange");
                }
            }
        }
        let expect = (
            nodes[3].get("entities", &id).expect("d"),
            nodes[3].conflicts(None, None, &admin()).expect("d"),
        );
        for n in &nodes {
            let got = (
                n.get("entities", &id).expect("get"),
                n.conflicts(None, None, &admin()).expect("conflicts"),
            );
            assert_eq!(got, expect, "seed {seed}: site {} differs", n.site());
        }
    }
}

fn user(id: char, name: &str) -> Principal {
    Principal {
        id: id.to_string().repeat(24),
        name: name.into(),
        roles: vec![acl::USERS_ROLE_ID.into()],
    }
}

/// The changes `node` holds from `origin`.
fn from_origin(node: &Node, origin: &str) -> Vec<Change> {
    all_changes(node).into_iter().filter(|c| c.origin == origin).collect()
}

/// Opens a site's directory again once the previous handle has let go.
async fn reopen(dir: &Path, site: &str) -> Node {
    for _ in 0..100 {
        if let Ok(o) = Node::open(NodeConfig {
            data_dir: dir.into(),
            site: site.into(),
            admin_password: None,
        }) {
            return o.node;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    panic!("cannot reopen {site}");
}

/// A site receives an update forged for a user who may only read the
/// document: it logs and relays the change but refuses it (the document is
/// unchanged, also after a restart replays it), and counts it. A real
/// update by a user with update right is applied.
#[tokio::test]
async fn a_change_whose_author_lacked_the_right_is_refused_and_counted() {
    let (da, db) = (tempfile::tempdir().expect("tmp"), tempfile::tempdir().expect("tmp"));
    let (a, b) = (open(da.path(), "a"), open(db.path(), "b"));
    let (reader, writer) = (user('1', "reader"), user('2', "writer"));
    let acl = json!([
        {"_id": reader.id, "name": "reader", "rights": acl::READ},
        {"_id": writer.id, "name": "writer", "rights": acl::READ | acl::UPDATE},
    ]);
    let doc = a
        .insert("entities", obj(json!({"v": 0, "_acl": acl})), &admin())
        .await
        .expect("insert");
    let id = doc["_id"].as_str().expect("id").to_owned();
    b.apply(all_changes(&a)).await.expect("apply");

    // The reader cannot make the update at a...
    assert!(matches!(
        a.update("entities", &id, json!({"$set": {"v": 666}}), &reader).await,
        Err(WriteError::Forbidden { .. })
    ));
    // ...so a site "x" forges it, based on the version b holds.
    let mut body = obj(doc.clone());
    body.remove("_version");
    body.insert("v".into(), json!(666));
    let insert = &from_origin(&a, "a")[0];
    let forged = |seq: u64, kind: ocmesh_replication::ChangeKind, author: &Principal| Change {
        origin: "x".into(),
        seq,
        hlc: insert.hlc + seq * 1_000_000,
        kind: kind as i32,
        collection: "entities".into(),
        doc_id: id.clone(),
        body: serde_json::to_vec(&body).expect("json"),
        author: author.id.clone(),
        author_admin: false,
        partial: kind == ocmesh_replication::ChangeKind::Update,
        fields: vec!["v".into()],
        base_hlc: insert.hlc,
        base_origin: "a".into(),
        withheld: false,
    };
    let report = b
        .apply(vec![
            forged(1, ocmesh_replication::ChangeKind::Update, &reader),
            forged(2, ocmesh_replication::ChangeKind::Delete, &writer),
        ])
        .await
        .expect("apply");
    assert_eq!((report.applied, report.refused), (2, 2));
    assert_eq!(b.stats().remote_refused.load(Ordering::Relaxed), 2);
    assert_eq!(b.metrics()["remote_refused"], 2);
    assert_eq!(b.get("entities", &id).expect("get"), doc, "unchanged at b");
    assert_eq!(b.versions("entities", &id).expect("history").len(), 1);
    // Still in the log, so catch-up stays exact and the change is relayed.
    assert_eq!(b.version_vector().get("x"), 2);
    assert_eq!(from_origin(&b, "x").len(), 2);
    let c = tempfile::tempdir().expect("tmp");
    let c = open(c.path(), "c");
    c.apply(all_changes(&b)).await.expect("relay");
    assert_eq!(c.get("entities", &id).expect("get"), doc, "unchanged at c");
    assert_eq!(c.stats().remote_refused.load(Ordering::Relaxed), 2);

    // Another site's admin (not named in the `_acl`) may.
    let mut by_admin = forged(3, ocmesh_replication::ChangeKind::Update, &user('9', "admin-x"));
    by_admin.author_admin = true;
    by_admin.fields = vec!["w".into()];
    // A version's body is the whole document as written.
    let mut whole = obj(doc.clone());
    whole.remove("_version");
    whole.insert("w".into(), json!("admin"));
    by_admin.body = serde_json::to_vec(&whole).expect("json");
    assert_eq!(b.apply(vec![by_admin]).await.expect("apply").refused, 0);
    assert_eq!(b.get("entities", &id).expect("get")["w"], "admin");
    // a refuses the same two.
    let report = a.apply(from_origin(&b, "x")).await.expect("apply at a");
    assert_eq!((report.applied, report.refused), (3, 2));

    // The writer's real update made at a is applied at b, on top.
    a.update("entities", &id, json!({"$set": {"v": 1}}), &writer)
        .await
        .expect("update");
    let report = b.apply(from_origin(&a, "a")).await.expect("apply");
    assert_eq!((report.applied, report.refused), (1, 0));
    assert_eq!(b.get("entities", &id).expect("get")["v"], 1);
    assert_eq!(b.get("entities", &id).expect("get"), a.get("entities", &id).expect("a"));

    // A restart replays the log through the same check.
    drop(b);
    let b = reopen(db.path(), "b").await;
    assert_eq!(b.get("entities", &id).expect("get")["v"], 1);
    assert_eq!(b.versions("entities", &id).expect("history").len(), 3);
}

/// One site grants a user update right while another revokes the user's
/// entry: both end with the entry revoked, whichever write is later.
#[tokio::test]
async fn a_revoke_concurrent_with_a_grant_wins_on_both_sites() {
    for revoke_first in [false, true] {
        let (da, db) = (tempfile::tempdir().expect("tmp"), tempfile::tempdir().expect("tmp"));
        let (a, b) = (open(da.path(), "a"), open(db.path(), "b"));
        let (u, other) = (user('1', "u"), user('2', "other"));
        let entry = |rights: u64| json!({"_id": u.id, "name": "u", "rights": rights});
        let keep = json!({"_id": other.id, "name": "other", "rights": acl::READ | acl::UPDATE});
        let doc = a
            .insert(
                "entities",
                obj(json!({"v": 0, "_acl": [entry(acl::READ), keep]})),
                &admin(),
            )
            .await
            .expect("insert");
        let id = doc["_id"].as_str().expect("id").to_owned();
        b.apply(all_changes(&a)).await.expect("apply");

        let grant = json!({"$set": {"_acl": [entry(acl::READ | acl::UPDATE), keep]}});
        let revoke = json!({"$set": {"_acl": [keep]}});
        let (first, second) = if revoke_first { (&b, &a) } else { (&a, &b) };
        let (first_op, second_op) = if revoke_first {
            (&revoke, &grant)
        } else {
            (&grant, &revoke)
        };
        first
            .update("entities", &id, first_op.clone(), &admin())
            .await
            .expect("first");
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        second
            .update("entities", &id, second_op.clone(), &admin())
            .await
            .expect("second");
        let (from_a, from_b) = (from_origin(&a, "a"), from_origin(&b, "b"));
        a.apply(from_b).await.expect("apply at a");
        b.apply(from_a).await.expect("apply at b");

        let (ga, gb) = (a.get("entities", &id).expect("a"), b.get("entities", &id).expect("b"));
        assert_eq!(ga, gb, "revoke first: {revoke_first}");
        assert_eq!(ga["_acl"], json!([keep]), "revoke first: {revoke_first}");
        for n in [&a, &b] {
            assert!(
                n.update("entities", &id, json!({"$set": {"v": 1}}), &u).await.is_err(),
                "u lost its rights at {}",
                n.site()
            );
            n.update("entities", &id, json!({"$set": {"v": 2}}), &other)
                .await
                .expect("the other entry is untouched");
        }
    }
}

/// A work item popped by a user who may invoke its queue, but was granted
/// that after the item (and its copy of the queue's `_acl`) was pushed, is
/// let in at the other site: the queue, not the item's `_acl`, decides.
#[tokio::test]
async fn a_pop_by_a_queue_invoker_is_let_in_at_the_other_site() {
    let (da, db) = (tempfile::tempdir().expect("tmp"), tempfile::tempdir().expect("tmp"));
    let (a, b) = (open(da.path(), "a"), open(db.path(), "b"));
    let (pusher, popper) = (user('1', "pusher"), user('2', "popper"));
    let rights = acl::INVOKE | acl::READ;
    let entry = |p: &Principal| json!({"_id": p.id, "name": p.name, "rights": rights});
    a.add_queue(obj(json!({"name": "jobs", "_acl": [entry(&pusher)]})), &admin())
        .await
        .expect("queue");
    a.push_workitems("jobs", vec![obj(json!({"payload": {"n": 1}}))], &pusher)
        .await
        .expect("push");
    a.update_queue(
        "jobs",
        obj(json!({"name": "jobs", "_acl": [entry(&pusher), entry(&popper)]})),
        &admin(),
    )
    .await
    .expect("grant");
    let item = a.pop_workitem("jobs", &popper, None).await.expect("pop").expect("item");
    let report = b.apply(all_changes(&a)).await.expect("apply");
    assert_eq!(report.refused, 0);
    let id = item["_id"].as_str().expect("id");
    assert_eq!(b.get("workitems", id).expect("item")["state"], "processing");
}

/// A write of several documents that is refused after its first one was
/// appended leaves nothing behind, even when its group carries other
/// writes, which still succeed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_refused_midway_leaves_nothing_and_spares_its_group() {
    let dir = tempfile::tempdir().expect("tmp");
    let node = open(dir.path(), "a");
    for round in 0..20 {
        let mut tasks = Vec::new();
        for i in 0..8 {
            let node = node.clone();
            tasks.push(tokio::spawn(async move {
                node.insert("good", obj(json!({"round": round, "i": i})), &admin())
                    .await
                    .map(|_| ())
            }));
        }
        // The second document's `_acl` is malformed: found only when it is
        // written, after the first one was.
        let bad = node
            .insert_many(
                "bad",
                vec![
                    obj(json!({"round": round})),
                    obj(json!({"round": round, "_acl": "everyone"})),
                ],
                &admin(),
            )
            .await;
        assert!(bad.is_err(), "the malformed batch must be refused");
        for t in tasks {
            t.await.expect("task").expect("the other writes of the group succeed");
        }
    }
    let q = query::Query::from_json(&json!({})).expect("query");
    assert_eq!(
        node.count("good", &query::Filter::parse(&json!({})).expect("f"))
            .expect("n"),
        160
    );
    assert!(
        node.query("bad", &q).expect("bad").is_empty(),
        "nothing of a refused batch"
    );
    let changes = all_changes(&node);
    assert!(changes.iter().all(|c| c.collection != "bad"));
    // The log has no gaps: sequence numbers were not burnt by the reruns.
    let seqs: Vec<u64> = changes.iter().filter(|c| c.origin == "a").map(|c| c.seq).collect();
    assert_eq!(seqs, (1..=seqs.len() as u64).collect::<Vec<_>>());
}

/// Withheld stubs advance the vector, join no history and are listed as
/// withheld; the change itself later replaces its stub (a refill), also
/// after a crash replays the write-ahead log. An update that is the first
/// version held of its document shows the document whole.
#[tokio::test]
async fn withheld_stubs_and_refills() {
    let a_dir = tempfile::tempdir().expect("tmp");
    let a = open(a_dir.path(), "a");
    let secret = a
        .insert("entities", obj(json!({"v": "secret"})), &admin())
        .await
        .expect("insert");
    let id = secret["_id"].as_str().expect("id").to_owned();
    let mut edited = obj(secret.clone());
    edited.insert("v".into(), json!("public"));
    a.replace("entities", &id, edited, &admin()).await.expect("replace");
    let log = from_origin(&a, "a");
    let (insert, update) = (log[log.len() - 2].clone(), log[log.len() - 1].clone());
    assert!(update.partial, "the edit is a partial update");

    let b_dir = tempfile::tempdir().expect("tmp");
    let b = open(b_dir.path(), "b");
    // Everything before the insert in full, the insert as a stub, then the update.
    let mut batch: Vec<Change> = log[..log.len() - 2].to_vec();
    batch.push(ocmesh_replication::change::stub_of(&insert));
    batch.push(update.clone());
    let report = b.apply(batch).await.expect("apply");
    assert_eq!(report.withheld, 1);
    assert_eq!(b.version_vector().get("a"), a.version_vector().get("a"));
    assert_eq!(b.withheld_count().expect("count"), 1);
    let ranges: Vec<_> = b
        .withheld(10)
        .expect("withheld")
        .ranges()
        .map(|(o, f, l)| (o.to_owned(), f, l))
        .collect();
    assert_eq!(ranges, vec![("a".to_owned(), insert.seq, insert.seq)]);
    let doc = b.get("entities", &id).expect("the update shows the document whole");
    assert_eq!(doc["v"], "public");
    assert_eq!(doc["_version"], 0);
    // The stub is read back as a stub, for relaying.
    let stub = from_origin(&b, "a")
        .into_iter()
        .find(|c| c.seq == insert.seq)
        .expect("stub in the log");
    assert!(stub.withheld && stub.body.is_empty());

    // A refill: the insert itself. Copy the files first to replay it after a crash.
    let report = b.apply(vec![insert.clone(), update.clone()]).await.expect("refill");
    assert_eq!((report.filled, report.duplicates), (1, 1));
    assert_eq!(b.withheld_count().expect("count"), 0);
    let doc = b.get("entities", &id).expect("doc");
    assert_eq!((doc["v"].clone(), doc["_version"].clone()), (json!("public"), json!(1)));
    assert_eq!(b.versions("entities", &id).expect("history").len(), 2);
    let crash = tempfile::tempdir().expect("tmp");
    for f in ["ocmesh.redb", "ocmesh.wal"] {
        std::fs::copy(b_dir.path().join(f), crash.path().join(f)).expect("copy");
    }
    let replayed = open(crash.path(), "b");
    assert_eq!(
        replayed.withheld_count().expect("count"),
        0,
        "the refill survived the crash"
    );
    assert_eq!(replayed.versions("entities", &id).expect("history").len(), 2);
    // A stub with content is refused whole.
    let mut leaky = ocmesh_replication::change::stub("z", 1);
    leaky.body = b"{}".to_vec();
    assert!(b.apply(vec![leaky]).await.is_err());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_to_a_document_stamped_beyond_the_drift_bound_is_refused_clearly() {
    let (dir_a, dir_b) = (tempfile::tempdir().expect("tmp"), tempfile::tempdir().expect("tmp"));
    let a = open(dir_a.path(), "a");
    // b's clock runs ten minutes ahead, far beyond the drift bound.
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_millis() as u64;
    let b = Node::open_with(
        NodeConfig {
            data_dir: dir_b.path().into(),
            site: "b".into(),
            admin_password: Some("pw".into()),
        },
        OpenOptions {
            clock: Arc::new(ManualClock::new(now + 10 * 60_000)),
            ..OpenOptions::default()
        },
    )
    .expect("open b")
    .node;
    let doc = b
        .insert("entities", obj(json!({"x": 1})), &admin())
        .await
        .expect("insert at b");
    let id = doc["_id"].as_str().expect("id").to_owned();
    let report = a.apply(from_origin(&b, "b")).await.expect("apply at a");
    assert!(report.clock_clamped > 0, "{report:?}");

    let refused = a.update("entities", &id, json!({"$set": {"x": 2}}), &admin()).await;
    match refused {
        Err(WriteError::ClockBehind { ref origin, .. }) if origin == "b" => {
            let text = refused.as_ref().expect_err("refused").to_string();
            assert!(text.contains(&id) && text.contains("site b"), "{text}");
        }
        other => panic!("expected ClockBehind, got {other:?}"),
    }
    assert!(
        a.delete("entities", &id, &admin()).await.is_err(),
        "a delete is refused too"
    );
    // Nothing was written, and a's other documents take writes as usual.
    assert_eq!(a.versions("entities", &id).expect("history").len(), 1);
    a.insert("entities", obj(json!({"y": 1})), &admin())
        .await
        .expect("an unrelated write");
}
