//! The MongoDB storage backend. The round trips need a server: they run
//! where `OCMESH_MONGODB_URI` is set (e.g. `mongodb://127.0.0.1:27017`) and
//! say that they skipped otherwise. Refusals of a bad URI or an unreachable
//! server run everywhere.
#![cfg(feature = "mongodb")]

use std::io::Write;
use std::sync::Arc;

use ocmesh_node::blockfile::{BLOCK, BlockFile, BlockStore};
use ocmesh_node::disk::FileId;
use ocmesh_node::mongo::{MongoBlockStore, MongoOpenError};
use ocmesh_node::{Node, NodeConfig, OpenOptions, Principal, Storage};
use serde_json::{Map, Value, json};

/// The server to test against, or `None` after saying why `test` skips.
fn server(test: &str) -> Option<String> {
    match std::env::var("OCMESH_MONGODB_URI") {
        Ok(uri) if !uri.is_empty() => Some(uri),
        _ => {
            // Straight to stderr, not eprintln!, so the test harness does
            // not swallow it: a skip shows in every run's output.
            let _ = writeln!(
                std::io::stderr(),
                "SKIPPED {test}: no MongoDB server here; set OCMESH_MONGODB_URI=mongodb://HOST:PORT to run it"
            );
            None
        }
    }
}

/// A site name no earlier run used, so its collection starts empty.
fn fresh_site(what: &str) -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or_default();
    format!("test-{what}-{nanos:x}")
}

fn drop_collection(uri: &str, site: &str) {
    let store = MongoBlockStore::connect(uri, site).expect("connect");
    // Truncating both files to nothing removes every block document.
    for file in [FileId::Database, FileId::Wal] {
        store.commit(file, &Default::default(), 0, 0).expect("clear");
    }
}

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

fn open(uri: &str, site: &str) -> Node {
    let store = MongoBlockStore::connect(uri, site).expect("connect to MongoDB");
    let options = OpenOptions {
        storage: Storage::Blocks(Arc::new(store)),
        ..OpenOptions::default()
    };
    Node::open_with(
        NodeConfig {
            data_dir: "unused".into(),
            site: site.into(),
            admin_password: Some("pw".into()),
        },
        options,
    )
    .expect("open the node on MongoDB")
    .node
}

#[test]
fn a_bad_uri_and_an_unreachable_server_are_named_errors() {
    match MongoBlockStore::connect("http://not-mongo", "a") {
        Err(MongoOpenError::Uri { uri, .. }) => assert_eq!(uri, "http://not-mongo"),
        other => panic!("expected a URI error, got {other:?}"),
    }
    // Port 1 on loopback: nothing listens; the driver gives up quickly.
    match MongoBlockStore::connect("mongodb://127.0.0.1:1/?serverSelectionTimeoutMS=300", "a") {
        Err(e @ MongoOpenError::Unreachable { .. }) => {
            assert!(e.to_string().contains("127.0.0.1:1"), "{e}");
        }
        other => panic!("expected an unreachable server, got {other:?}"),
    }
}

#[test]
fn blocks_round_trip_through_mongodb() {
    let Some(uri) = server("blocks_round_trip_through_mongodb") else {
        return;
    };
    let site = fresh_site("blocks");
    let store: Arc<dyn BlockStore> = Arc::new(MongoBlockStore::connect(&uri, &site).expect("connect"));
    let file = BlockFile::open(store.clone(), FileId::Wal).expect("open");
    let data: Vec<u8> = (0..3 * BLOCK + 17).map(|i| (i % 251) as u8).collect();
    file.write_at(5, &data).expect("write");
    file.sync().expect("sync");
    file.set_len(BLOCK + 1).expect("truncate");
    file.sync().expect("sync");
    let again = BlockFile::open(store.clone(), FileId::Wal).expect("reopen");
    assert_eq!(again.len(), BLOCK + 1);
    let mut out = vec![0u8; (BLOCK + 1 - 5) as usize];
    again.read_at(5, &mut out).expect("read");
    assert_eq!(out, data[..out.len()]);
    assert_eq!(
        store.get(FileId::Wal, 2..10).expect("get"),
        Vec::new(),
        "blocks past the end dropped"
    );
    drop_collection(&uri, &site);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_on_mongodb_keeps_everything_across_a_restart() {
    let Some(uri) = server("a_node_on_mongodb_keeps_everything_across_a_restart") else {
        return;
    };
    let site = fresh_site("node");
    let who = admin();
    let node = open(&uri, &site);
    node.add_queue(obj(json!({"name": "jobs"})), &who).await.expect("queue");
    let mut ids = Vec::new();
    for n in 0..50u32 {
        let doc = node
            .insert("things", obj(json!({"n": n, "pad": "x".repeat(1000)})), &who)
            .await
            .expect("insert");
        ids.push(doc["_id"].as_str().expect("id").to_owned());
    }
    node.update("things", &ids[0], json!({"$set": {"n": 100}}), &who)
        .await
        .expect("update");
    node.push_workitems("jobs", vec![obj(json!({"name": "one", "payload": {}}))], &who)
        .await
        .expect("push");
    drop(node);
    // The writer thread lets go of the store when it sees the node gone.
    tokio::time::sleep(std::time::Duration::from_millis(500)).await;

    let node = open(&uri, &site);
    assert_eq!(node.get("things", &ids[0]).expect("doc")["n"], 100);
    assert_eq!(node.versions("things", &ids[0]).expect("history").len(), 2);
    for id in &ids[1..] {
        assert!(node.get("things", id).is_ok(), "{id}");
    }
    let popped = node.pop_workitem("jobs", &who, None).await.expect("pop");
    assert_eq!(popped.expect("the pushed item")["name"], "one");
    drop(node);
    tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    drop_collection(&uri, &site);
}
