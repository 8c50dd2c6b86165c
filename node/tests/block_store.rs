//! A node whose store lives in a block store (the layer under the MongoDB
//! backend) instead of a directory, with an in-memory store: everything
//! acknowledged before a power cut is there after a restart from what the
//! store had committed, through checkpoints, and the node goes on writing.
//! tests/mongodb.rs runs the same kind of check against a real MongoDB.

use std::sync::Arc;

use ocmesh_node::blockfile::MemBlockStore;
use ocmesh_node::query::Query;
use ocmesh_node::{ManualClock, MemDisk, Node, NodeConfig, OpenOptions, Principal, Storage, WallClock};
use serde_json::{Map, Value, json};

fn admin() -> Principal {
    Principal {
        roles: vec![ocmesh_node::acl::ADMINS_ROLE_ID.into()],
        id: "0".repeat(24),
        name: "admin".into(),
    }
}

fn obj(v: Value) -> Map<String, Value> {
    v.as_object().cloned().unwrap_or_default()
}

fn open(store: &MemBlockStore, clock: &ManualClock) -> Node {
    let mut options = OpenOptions::simulated(MemDisk::new(), Arc::new(clock.clone()), 7);
    options.storage = Storage::Blocks(Arc::new(store.clone()));
    Node::open_with(
        NodeConfig {
            data_dir: "unused".into(),
            site: "blocky".into(),
            admin_password: None,
        },
        options,
    )
    .expect("open on the block store")
    .node
}

/// Every document of `collection` with its full history.
fn state(node: &Node, collection: &str) -> Vec<(Value, Vec<Value>)> {
    let docs = node.query(collection, &Query::default()).expect("query");
    docs.into_iter()
        .map(|d| {
            let id = d["_id"].as_str().unwrap_or_default().to_owned();
            let history = node.versions(collection, &id).expect("history");
            (d, history)
        })
        .collect()
}

#[tokio::test]
async fn acknowledged_writes_survive_a_restart_from_the_committed_blocks() {
    let store = MemBlockStore::new();
    let clock = ManualClock::new(1_700_000_000_000);
    let node = open(&store, &clock);
    let who = admin();
    node.add_queue(obj(json!({"name": "jobs"})), &who).await.expect("queue");
    // Kilobyte bodies so the database spans many blocks.
    let pad = "x".repeat(1024);
    for n in 0..400u32 {
        let id = format!("{:024x}", n % 150);
        if node.get("things", &id).is_err() {
            node.insert("things", obj(json!({"_id": id, "n": n, "pad": pad})), &who)
                .await
                .expect("insert");
        } else if n % 7 == 0 {
            node.delete("things", &id, &who).await.expect("delete");
        } else {
            node.update("things", &id, json!({"$set": {"n": n}}), &who)
                .await
                .expect("update");
        }
        if n % 40 == 0 {
            node.push_workitems(
                "jobs",
                vec![obj(json!({"name": format!("job{n}"), "payload": {"n": n}}))],
                &who,
            )
            .await
            .expect("push");
            if let Some(item) = node.pop_workitem("jobs", &who, None).await.expect("pop") {
                let id = item["_id"].as_str().unwrap_or_default().to_owned();
                node.update_workitem(&id, "successful", None, None, None, &who)
                    .await
                    .expect("complete");
            }
        }
        // Past the checkpoint interval now and then: durable redb commits
        // (the database's blocks), not only the log's.
        if n % 100 == 99 {
            clock.set(clock.now_ms() + 1_500);
        }
    }
    let commits_before = store.commits();
    let (things, items) = (state(&node, "things"), state(&node, "workitems"));
    assert!(
        things.len() > 50 && items.len() == 10,
        "{} things, {} items",
        things.len(),
        items.len()
    );

    // Power cut: the restarted node sees only what the store committed.
    let image = store.snapshot();
    let restarted = open(&image, &clock);
    assert_eq!(
        state(&restarted, "things"),
        things,
        "documents and histories after the restart"
    );
    assert_eq!(state(&restarted, "workitems"), items);
    assert!(
        commits_before > 10,
        "the log and checkpoints went through the store: {commits_before} commits"
    );

    // It goes on: a write after the restart, and a clean reopen keeps it.
    restarted
        .insert("things", obj(json!({"_id": "a".repeat(24), "n": 1})), &who)
        .await
        .expect("write after restart");
    drop(restarted);
    let again = open(&image.snapshot(), &clock);
    assert_eq!(again.get("things", &"a".repeat(24)).expect("kept")["n"], 1);
}

#[tokio::test]
async fn a_store_that_fails_refuses_writes_and_loses_nothing_acknowledged() {
    let store = MemBlockStore::new();
    let clock = ManualClock::new(1_700_000_000_000);
    let node = open(&store, &clock);
    let who = admin();
    node.insert("things", obj(json!({"_id": "b".repeat(24), "n": 1})), &who)
        .await
        .expect("insert");
    store.fail_after(0);
    let refused = node
        .insert("things", obj(json!({"_id": "c".repeat(24), "n": 2})), &who)
        .await;
    assert!(refused.is_err(), "a write whose log commit failed is not acknowledged");
    // Readers still see only what was published: never the refused write.
    assert!(
        node.get("things", &"c".repeat(24)).is_err(),
        "a write whose log sync failed is never visible"
    );
    // The acknowledged write is durable in the log. Whether the failed node
    // still shows it depends on whether the transaction holding it was
    // committed before the failure: the writer keeps a transaction open a
    // moment for the next write, and here that write is the refused one,
    // which takes the transaction with it. So a read answers promptly with
    // the acknowledged version or with none, and a restart (below) shows it.
    match node.get("things", &"b".repeat(24)) {
        Ok(doc) => assert_eq!(doc["n"], 1, "the acknowledged version"),
        Err(ocmesh_node::ReadError::NotFound { .. }) => {}
        Err(e) => panic!("a read on a failed store: {e}"),
    }
    let later = node
        .insert("things", obj(json!({"_id": "d".repeat(24), "n": 3})), &who)
        .await;
    assert!(
        later.is_err(),
        "after a failed sync the writer refuses writes until restart"
    );
    let restarted = open(&store.snapshot(), &clock);
    assert_eq!(
        restarted.get("things", &"b".repeat(24)).expect("acknowledged write")["n"],
        1
    );
    assert!(restarted.get("things", &"c".repeat(24)).is_err());
}
