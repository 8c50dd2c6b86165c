//! Per-peer filtering on the wire: real sites over loopback QUIC. What a
//! site may not share with a peer (its `_acl` keeps it from the peer site's
//! principal, or its collection is not shared with that peer) never reaches
//! the peer's store, and its content is in no frame sent to the peer; the
//! peer's version vector still catches up exactly (withheld stubs), and a
//! site that got stubs through a relay is refilled when it links directly
//! to a site that may share with it.

use std::collections::{BTreeSet, HashMap};
use std::net::SocketAddr;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::{Value, json};

mod common;
mod loopback;
use common::{admin, obj};
use loopback::{
    Site, eventually, frame_counters, free_udp, identity, issued, new_ca, open_node, start, start_mesh_with,
};
use ocmesh_federation::FrameTap;
use ocmesh_replication::{AclMode, ShareConfig};

/// A frame sent, encoded, and the peer site it went to.
type Sent = (String, Vec<u8>);

/// Frames sent to each peer site, encoded.
#[derive(Clone, Default)]
struct Wire(Arc<Mutex<Vec<Sent>>>);

impl Wire {
    fn tap(&self) -> FrameTap {
        let frames = self.0.clone();
        FrameTap(Arc::new(move |site: &str, bytes: &[u8]| {
            if let Ok(mut f) = frames.lock() {
                f.push((site.to_owned(), bytes.to_vec()));
            }
        }))
    }

    /// True when a frame sent to `site` holds `needle`.
    fn carried(&self, site: &str, needle: &str) -> bool {
        self.0
            .lock()
            .expect("lock")
            .iter()
            .any(|(s, f)| s == site && f.windows(needle.len()).any(|w| w == needle.as_bytes()))
    }

    fn frames_to(&self, site: &str) -> usize {
        self.0.lock().expect("lock").iter().filter(|(s, _)| s == site).count()
    }
}

/// Inserts a document as the admin.
async fn insert(node: &ocmesh_node::Node, collection: &str, doc: Value) -> Value {
    node.insert(collection, obj(doc), &admin()).await.expect("insert")
}

fn id_of(doc: &Value) -> String {
    doc["_id"].as_str().expect("id").to_owned()
}

fn names(list: &[&str]) -> Option<BTreeSet<String>> {
    Some(list.iter().map(|s| (*s).to_owned()).collect())
}

/// a shares with b only `entities` and `users` (trusted ACL mode): a
/// record whose `_acl` denies the site principal, and a record of another
/// collection, never reach b nor cross the wire to it; everything else
/// does; b's vector equals a's; a later version that b may see arrives
/// whole; a reconnect in sync is still one hello each way.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn what_a_peer_may_not_see_never_leaves_the_site() {
    let ca_dir = new_ca();
    let (addr_a, addr_b) = (free_udp(), free_udp());
    let wire = Wire::default();
    let (a_node, _a_data) = open_node("a");
    let sharing = HashMap::from([(
        "b".to_owned(),
        ShareConfig {
            collections: names(&["entities", "users"]),
            ..Default::default()
        },
    )]);
    let a_mesh = start_mesh_with(
        a_node.clone(),
        identity(ca_dir.path(), "a"),
        addr_a,
        vec![],
        sharing.clone(),
        Some(wire.tap()),
    );
    let b = start(ca_dir.path(), "b", addr_b, vec![addr_a]);

    let open = insert(&a_node, "entities", json!({"note": "OPEN-MARKER-1"})).await;
    let denied = insert(
        &a_node,
        "entities",
        json!({"note": "DENIED-MARKER-2", "_acl": [{"_id": "site:b", "name": "b", "rights": 2, "deny": true}]}),
    )
    .await;
    let denied_to_sites = insert(
        &a_node,
        "entities",
        json!({"note": "DENIED-MARKER-3", "_acl": [{"_id": "sites", "name": "sites", "rights": 65535, "deny": true}]}),
    )
    .await;
    let home = insert(&a_node, "secrets", json!({"note": "HOME-MARKER-4"})).await;
    let later = insert(&a_node, "entities", json!({"note": "OPEN-MARKER-5"})).await;

    eventually("b's vector to equal a's", || {
        b.node.version_vector() == a_node.version_vector()
    })
    .await;
    assert_eq!(
        b.node.get("entities", &id_of(&open)).expect("open record")["note"],
        "OPEN-MARKER-1"
    );
    assert_eq!(
        b.node.get("entities", &id_of(&later)).expect("later record")["note"],
        "OPEN-MARKER-5"
    );
    for (collection, doc) in [
        ("entities", &denied),
        ("entities", &denied_to_sites),
        ("secrets", &home),
    ] {
        assert!(
            b.node.get(collection, &id_of(doc)).is_err(),
            "{collection}/{} reached b",
            id_of(doc)
        );
    }
    assert_eq!(b.node.withheld_count().expect("count"), 3);
    for marker in ["DENIED-MARKER-2", "DENIED-MARKER-3", "HOME-MARKER-4"] {
        assert!(!wire.carried("b", marker), "{marker} was on the wire to b");
    }
    assert!(wire.carried("b", "OPEN-MARKER-1") && wire.carried("b", "OPEN-MARKER-5"));
    eventually("a's status to count what it withheld from b", || {
        a_mesh
            .peers()
            .snapshot()
            .iter()
            .any(|p| p.site.as_deref() == Some("b") && p.changes_withheld == 3 && p.unacked == 0)
    })
    .await;
    assert_eq!(a_mesh.stats().changes_withheld.load(Relaxed), 3);

    // A later version b may see (the deny is lifted): it arrives whole,
    // though b holds none of the versions before it.
    let mut lifted = obj(denied.clone());
    lifted.insert("_acl".into(), json!([]));
    lifted.insert("note".into(), json!("LIFTED-MARKER-6"));
    a_node
        .replace("entities", &id_of(&denied), lifted, &admin())
        .await
        .expect("replace");
    eventually("the lifted record at b", || {
        b.node
            .get("entities", &id_of(&denied))
            .is_ok_and(|d| d["note"] == "LIFTED-MARKER-6")
    })
    .await;
    assert!(!wire.carried("b", "DENIED-MARKER-2"), "the earlier version stays home");
    eventually("in sync again", || b.node.version_vector() == a_node.version_vector()).await;
    assert_eq!(
        b.node.withheld_count().expect("count"),
        3,
        "the first version stays withheld"
    );

    // A reconnect in sync: one hello each way. b's hello lists its
    // withheld ranges; a may still not share them, so nothing else crosses.
    eventually("a's changes acknowledged", || {
        a_mesh.peers().snapshot().iter().any(|p| p.connected && p.unacked == 0)
    })
    .await;
    a_mesh.shutdown().await;
    eventually("b to see a gone", || {
        b.mesh.peers().snapshot().iter().all(|p| !p.connected)
    })
    .await;
    let stats = b.mesh.stats();
    let before = frame_counters(stats);
    let frames_before = wire.frames_to("b");
    let a_mesh = start_mesh_with(
        a_node.clone(),
        issued(ca_dir.path(), "a"),
        free_udp(),
        vec![addr_b],
        sharing,
        Some(wire.tap()),
    );
    eventually("the reconnect", || {
        b.mesh.peers().snapshot().iter().any(|p| p.connected) && a_mesh.stats().frames_received.load(Relaxed) >= 1
    })
    .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let after = frame_counters(stats);
    let [frames_sent, frames_received, bytes_sent, bytes_received] = [0, 1, 2, 3].map(|i| after[i] - before[i]);
    eprintln!(
        "filtered in-sync reconnect at b: {frames_sent} frame(s) sent ({bytes_sent} B), {frames_received} received ({bytes_received} B)"
    );
    assert_eq!((frames_sent, frames_received), (1, 1), "one hello each way");
    assert_eq!(wire.frames_to("b") - frames_before, 1);
    assert!(
        bytes_sent + bytes_received < 1024,
        "{bytes_sent} + {bytes_received} bytes"
    );
    a_mesh.shutdown().await;
    b.mesh.shutdown().await;
}

/// In `enforce` mode a record goes to the peer only when its `_acl` grants
/// read to the peer site's principal, to `sites`, or to a role whose
/// members list the site.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn enforce_mode_sends_only_what_the_acl_grants_the_site() {
    let ca_dir = new_ca();
    let (addr_a, addr_b) = (free_udp(), free_udp());
    let wire = Wire::default();
    let (a_node, _a_data) = open_node("a");
    let sharing = HashMap::from([(
        "b".to_owned(),
        ShareConfig {
            acl: AclMode::Enforce,
            ..Default::default()
        },
    )]);
    // A role that lists site b as a member; created before the mesh starts.
    insert(
        &a_node,
        "users",
        json!({"_id": "aaaaaaaaaaaaaaaaaaaaaaaa", "_type": "role", "name": "partners", "members": [{"_id": "site:b"}]}),
    )
    .await;
    let a_mesh = start_mesh_with(
        a_node.clone(),
        identity(ca_dir.path(), "a"),
        addr_a,
        vec![],
        sharing,
        Some(wire.tap()),
    );
    let b = start(ca_dir.path(), "b", addr_b, vec![addr_a]);
    let grant = |who: &str| json!([{"_id": who, "name": who, "rights": 2}]);
    let to_site = insert(
        &a_node,
        "entities",
        json!({"note": "GRANT-SITE", "_acl": grant("site:b")}),
    )
    .await;
    let to_sites = insert(
        &a_node,
        "entities",
        json!({"note": "GRANT-SITES", "_acl": grant("sites")}),
    )
    .await;
    let to_role = insert(
        &a_node,
        "entities",
        json!({"note": "GRANT-ROLE", "_acl": grant("aaaaaaaaaaaaaaaaaaaaaaaa")}),
    )
    .await;
    let creator_only = insert(&a_node, "entities", json!({"note": "CREATOR-ONLY"})).await;
    eventually("b's vector to equal a's", || {
        b.node.version_vector() == a_node.version_vector()
    })
    .await;
    for doc in [&to_site, &to_sites, &to_role] {
        assert!(
            b.node.get("entities", &id_of(doc)).is_ok(),
            "{} missing at b",
            doc["note"]
        );
    }
    assert!(b.node.get("entities", &id_of(&creator_only)).is_err());
    assert!(!wire.carried("b", "CREATOR-ONLY"));
    assert!(wire.carried("b", "GRANT-ROLE"));
    a_mesh.shutdown().await;
    b.mesh.shutdown().await;
}

/// a - b - c, where a's record denies b but not c: c first gets it as a
/// stub through b, then links to a directly and ends with the record; b
/// never gets it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_site_that_got_a_stub_through_a_relay_gets_the_record_from_a_direct_link() {
    let ca_dir = new_ca();
    let (addr_a, addr_b, addr_c) = (free_udp(), free_udp(), free_udp());
    let wire = Wire::default();
    let (a_node, _a_data) = open_node("a");
    let a_mesh = start_mesh_with(
        a_node.clone(),
        identity(ca_dir.path(), "a"),
        addr_a,
        vec![],
        HashMap::new(),
        Some(wire.tap()),
    );
    let b = start(ca_dir.path(), "b", addr_b, vec![addr_a]);
    let (c_node, _c_data) = open_node("c");
    let c_mesh = start_mesh_with(
        c_node.clone(),
        identity(ca_dir.path(), "c"),
        addr_c,
        vec![addr_b],
        HashMap::new(),
        None,
    );
    let secret = insert(
        &a_node,
        "entities",
        json!({"note": "NOT-FOR-B", "_acl": [{"_id": "site:b", "name": "b", "rights": 2, "deny": true}]}),
    )
    .await;
    let open = insert(&a_node, "entities", json!({"note": "FOR-ALL"})).await;
    eventually("c's vector to equal a's", || {
        c_node.version_vector() == a_node.version_vector()
    })
    .await;
    assert!(c_node.get("entities", &id_of(&open)).is_ok());
    assert!(
        c_node.get("entities", &id_of(&secret)).is_err(),
        "c got only a stub through b"
    );
    assert_eq!(c_node.withheld_count().expect("count"), 1);
    assert!(!wire.carried("b", "NOT-FOR-B"));

    // c now links to a directly.
    c_mesh.shutdown().await;
    let c_mesh = start_mesh_with(
        c_node.clone(),
        issued(ca_dir.path(), "c"),
        free_udp(),
        vec![addr_b, addr_a],
        HashMap::new(),
        None,
    );
    eventually("the record at c", || {
        c_node
            .get("entities", &id_of(&secret))
            .is_ok_and(|d| d["note"] == "NOT-FOR-B")
    })
    .await;
    assert_eq!(c_node.withheld_count().expect("count"), 0);
    assert!(wire.carried("c", "NOT-FOR-B"));
    eventually("a's status to show the refill to c", || {
        a_mesh
            .peers()
            .snapshot()
            .iter()
            .any(|p| p.site.as_deref() == Some("c") && p.refilled == 1)
    })
    .await;
    // c does not hand it to b either: the same `_acl` denies b.
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert!(b.node.get("entities", &id_of(&secret)).is_err());
    assert_eq!(b.node.withheld_count().expect("count"), 1);
    assert_eq!(b.node.version_vector(), a_node.version_vector());
    for m in [a_mesh, c_mesh] {
        m.shutdown().await;
    }
    b.mesh.shutdown().await;
}

/// A peer that asks for a chunk of a file it may not receive (here: a
/// does not share `fs.files` with b) is answered "missing", even when it
/// knows the hash.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chunks_are_served_only_for_files_the_peer_may_read() {
    use ocmesh_proto::federation::{Change, ChangeKind};

    let ca_dir = new_ca();
    let any: SocketAddr = "127.0.0.1:0".parse().expect("addr");
    let (a_node, _a_data) = open_node("a");
    let sharing = HashMap::from([(
        "b".to_owned(),
        ShareConfig {
            collections: names(&["entities", "users"]),
            ..Default::default()
        },
    )]);
    let a_mesh = start_mesh_with(a_node.clone(), identity(ca_dir.path(), "a"), any, vec![], sharing, None);
    let b = start(ca_dir.path(), "b", any, vec![a_mesh.local_addr().expect("addr")]);
    let content = vec![7u8; 1000];
    let mut up = a_node.upload(1 << 20);
    up.write(&content).await.expect("write");
    let file = up
        .finish("secret.bin", "application/octet-stream", obj(json!({})), &admin())
        .await
        .expect("finish");
    eventually("b in sync", || b.node.version_vector() == a_node.version_vector()).await;
    assert!(b.node.file(&id_of(&file)).is_err(), "the file document stayed home");
    // b learns the hash some other way: a file document of its own (from
    // a third origin, kept from a by its `_acl`) lists it.
    let hash = file["chunks"][0].as_str().expect("hash").to_owned();
    let forged = Change {
        origin: "x".into(),
        seq: 1,
        hlc: (1_764_000_000_000u64) << 16,
        kind: ChangeKind::Insert as i32,
        collection: "fs.files".into(),
        doc_id: "bbbbbbbbbbbbbbbbbbbbbbbb".into(),
        body: serde_json::to_vec(&json!({
            "_id": "bbbbbbbbbbbbbbbbbbbbbbbb", "_type": "file", "chunks": [hash],
            "_acl": [{"_id": "sites", "name": "sites", "rights": 2, "deny": true}],
        }))
        .expect("json"),
        author: "0".repeat(24),
        ..Default::default()
    };
    b.node.apply(vec![forged]).await.expect("apply");
    assert_eq!(b.node.wanted_chunks(10).expect("wanted").len(), 1);
    eventually("a to refuse the chunk", || {
        a_mesh.stats().chunks_withheld.load(Relaxed) >= 1
    })
    .await;
    assert_eq!(b.mesh.stats().chunks_stored.load(Relaxed), 0);
    assert_eq!(b.node.wanted_chunks(10).expect("wanted").len(), 1, "b still lacks it");
    assert!(
        a_node.get("fs.files", "bbbbbbbbbbbbbbbbbbbbbbbb").is_err(),
        "the forged document stayed at b"
    );
    a_mesh.shutdown().await;
    let Site { mesh, .. } = b;
    mesh.shutdown().await;
}

/// a shares only the queue `shared` with b: the other queue's definition
/// and its work items stay home, while `shared` and its items arrive.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_queue_not_shared_with_a_peer_stays_home_with_its_items() {
    let ca_dir = new_ca();
    let (addr_a, addr_b) = (free_udp(), free_udp());
    let wire = Wire::default();
    let (a_node, _a_data) = open_node("a");
    let sharing = HashMap::from([(
        "b".to_owned(),
        ShareConfig {
            queues: names(&["shared"]),
            ..Default::default()
        },
    )]);
    let a_mesh = start_mesh_with(
        a_node.clone(),
        identity(ca_dir.path(), "a"),
        addr_a,
        vec![],
        sharing,
        Some(wire.tap()),
    );
    let b = start(ca_dir.path(), "b", addr_b, vec![addr_a]);
    for q in ["shared", "private"] {
        a_node
            .add_queue(obj(json!({"name": q})), &admin())
            .await
            .expect("queue");
    }
    let shared = a_node
        .push_workitems("shared", vec![obj(json!({"payload": {"m": "SHARED-ITEM"}}))], &admin())
        .await
        .expect("push");
    let private = a_node
        .push_workitems(
            "private",
            vec![obj(json!({"payload": {"m": "PRIVATE-ITEM"}}))],
            &admin(),
        )
        .await
        .expect("push");
    eventually("b's vector to equal a's", || {
        b.node.version_vector() == a_node.version_vector()
    })
    .await;
    assert!(b.node.queue("shared").is_ok());
    assert!(b.node.queue("private").is_err(), "the private queue stayed home");
    assert!(b.node.get("workitems", &id_of(&shared[0])).is_ok());
    assert!(b.node.get("workitems", &id_of(&private[0])).is_err());
    assert!(wire.carried("b", "SHARED-ITEM"));
    assert!(!wire.carried("b", "PRIVATE-ITEM"));
    assert!(!wire.carried("b", "\"private\""), "not even the queue's name");
    a_mesh.shutdown().await;
    b.mesh.shutdown().await;
}
