//! Work-item ownership between two sites, changes carried by hand: only
//! the owner pops, a push onto a queue served elsewhere hands the item
//! over, and a forced takeover beats the old owner's late result.

use std::path::Path;

use ocmesh_node::workitems::{ITEMS, WorkItemError};
use ocmesh_node::{Node, NodeConfig, Principal, WriteError};
use ocmesh_replication::{FetchRequest, VersionVector};
use serde_json::{Map, Value, json};

fn admin() -> Principal {
    Principal {
        roles: vec![ocmesh_node::acl::ADMINS_ROLE_ID.into()],
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
    v.as_object().cloned().expect("object")
}

/// Delivers to `to` every change `from` holds that `to` lacks.
async fn sync(from: &Node, to: &Node) {
    let changes = from
        .read_changes(&FetchRequest {
            after: to.version_vector(),
            max_changes: usize::MAX,
            max_bytes: usize::MAX,
        })
        .expect("read changes");
    to.apply(changes).await.expect("apply");
}

async fn heal(a: &Node, b: &Node) {
    sync(a, b).await;
    sync(b, a).await;
}

fn id_of(doc: &Value) -> String {
    doc["_id"].as_str().expect("id").to_owned()
}

async fn push(node: &Node, queue: &str) -> String {
    let pushed = node
        .push_workitems(queue, vec![obj(json!({"payload": {"n": 1}}))], &admin())
        .await
        .expect("push");
    id_of(&pushed[0])
}

fn not_owner(r: Result<Value, WriteError>) -> bool {
    matches!(r, Err(WriteError::WorkItem(WorkItemError::NotOwner { .. })))
}

#[tokio::test]
async fn a_push_onto_a_queue_served_elsewhere_hands_the_item_over() {
    let (da, db) = (tempfile::tempdir().expect("tmp"), tempfile::tempdir().expect("tmp"));
    let (a, b) = (open(da.path(), "a"), open(db.path(), "b"));
    a.add_queue(
        obj(json!({"name": "q", "sites": ["b"], "success_wiq": "done"})),
        &admin(),
    )
    .await
    .expect("queue q");
    a.add_queue(obj(json!({"name": "done"})), &admin())
        .await
        .expect("queue done");
    let id = push(&a, "q").await;
    let item = a.get(ITEMS, &id).expect("item at a");
    assert_eq!((&item["_owner"], &item["_epoch"]), (&json!("b"), &json!(1)));

    // Cut off from b, the item waits at a: a neither pops nor completes it.
    assert!(a.pop_workitem("q", &admin(), None).await.expect("pop at a").is_none());
    assert!(not_owner(
        a.update_workitem(&id, "successful", None, None, None, &admin()).await
    ));

    sync(&a, &b).await;
    let popped = b
        .pop_workitem("q", &admin(), None)
        .await
        .expect("pop at b")
        .expect("item");
    assert_eq!(id_of(&popped), id);
    b.update_workitem(&id, "successful", None, None, None, &admin())
        .await
        .expect("complete at b");
    heal(&a, &b).await;
    assert_eq!(a.get(ITEMS, &id).expect("a")["state"], json!("successful"));
    assert_eq!(a.get(ITEMS, &id).expect("a"), b.get(ITEMS, &id).expect("b"));

    // The routed copy was pushed at b onto a queue with no sites: b owns it.
    let routed = b
        .pop_workitem("done", &admin(), None)
        .await
        .expect("pop done")
        .expect("routed");
    assert_eq!(routed["_owner"], json!("b"));
    sync(&b, &a).await;
    assert!(
        a.pop_workitem("done", &admin(), None)
            .await
            .expect("pop at a")
            .is_none()
    );
}

#[tokio::test]
async fn an_item_replicated_to_another_site_is_popped_only_where_it_was_pushed() {
    let (da, db) = (tempfile::tempdir().expect("tmp"), tempfile::tempdir().expect("tmp"));
    let (a, b) = (open(da.path(), "a"), open(db.path(), "b"));
    a.add_queue(obj(json!({"name": "q"})), &admin()).await.expect("queue");
    let id = push(&a, "q").await;
    sync(&a, &b).await;
    assert!(b.pop_workitem("q", &admin(), None).await.expect("pop at b").is_none());
    let popped = a
        .pop_workitem("q", &admin(), None)
        .await
        .expect("pop at a")
        .expect("item");
    assert_eq!(id_of(&popped), id);
}

#[tokio::test]
async fn a_takeover_beats_the_old_owners_late_result() {
    let (da, db) = (tempfile::tempdir().expect("tmp"), tempfile::tempdir().expect("tmp"));
    let (a, b) = (open(da.path(), "a"), open(db.path(), "b"));
    a.add_queue(obj(json!({"name": "q", "sites": ["b"]})), &admin())
        .await
        .expect("queue");
    let id = push(&a, "q").await;
    sync(&a, &b).await;
    b.pop_workitem("q", &admin(), None)
        .await
        .expect("pop at b")
        .expect("item");
    sync(&b, &a).await;

    // The link drops. An operator at a takes the item over.
    let taken = a.takeover_workitem(&id, &admin()).await.expect("takeover");
    assert_eq!(
        (&taken["_owner"], &taken["_epoch"], &taken["state"]),
        (&json!("a"), &json!(2), &json!("new"))
    );
    assert!(taken.get("_leaseuntil").is_none());
    let popped = a
        .pop_workitem("q", &admin(), None)
        .await
        .expect("pop at a")
        .expect("item");
    assert_eq!(id_of(&popped), id);
    a.update_workitem(&id, "successful", None, None, None, &admin())
        .await
        .expect("complete at a");
    // Meanwhile b, still the owner in its own view, fails it.
    b.update_workitem(&id, "failed", Some("business"), Some("late".into()), None, &admin())
        .await
        .expect("complete at b");

    heal(&a, &b).await;
    let (at_a, at_b) = (a.get(ITEMS, &id).expect("a"), b.get(ITEMS, &id).expect("b"));
    assert_eq!(at_a, at_b, "both sites agree");
    assert_eq!(
        (&at_a["state"], &at_a["_owner"], &at_a["_epoch"]),
        (&json!("successful"), &json!("a"), &json!(2))
    );
    // b's result is in history, flagged as a conflict on the epoch.
    let versions = a.versions(ITEMS, &id).expect("versions");
    assert!(versions.iter().any(|v| v["state"] == json!("failed")));
    for node in [&a, &b] {
        let conflicts = node.conflicts(Some(ITEMS), Some(&id), &admin()).expect("conflicts");
        assert!(conflicts.iter().any(|c| c["field"] == json!("_epoch")), "{conflicts:?}");
    }
    // b no longer owns it: it cannot pop or complete it again.
    assert!(b.pop_workitem("q", &admin(), None).await.expect("pop at b").is_none());
    assert!(not_owner(
        b.update_workitem(&id, "successful", None, None, None, &admin()).await
    ));
}

#[tokio::test]
async fn takeovers_are_refused_where_they_make_no_sense() {
    let (da, db) = (tempfile::tempdir().expect("tmp"), tempfile::tempdir().expect("tmp"));
    let (a, b) = (open(da.path(), "a"), open(db.path(), "b"));
    a.add_queue(obj(json!({"name": "q"})), &admin()).await.expect("queue");
    let id = push(&a, "q").await;
    assert!(matches!(
        a.takeover_workitem(&id, &admin()).await,
        Err(WriteError::WorkItem(WorkItemError::AlreadyOwner { .. }))
    ));
    a.pop_workitem("q", &admin(), None).await.expect("pop").expect("item");
    a.update_workitem(&id, "successful", None, None, None, &admin())
        .await
        .expect("complete");
    sync(&a, &b).await;
    assert!(matches!(
        b.takeover_workitem(&id, &admin()).await,
        Err(WriteError::WorkItem(WorkItemError::Finished { .. }))
    ));
    let nobody = Principal {
        roles: Vec::new(),
        id: "1".repeat(24),
        name: "nobody".into(),
    };
    let other = push(&a, "q").await;
    sync(&a, &b).await;
    assert!(b.takeover_workitem(&other, &nobody).await.is_err());
    assert!(matches!(
        b.takeover_workitem("not-an-id", &admin()).await,
        Err(WriteError::Name(_))
    ));
    assert!(matches!(
        a.add_queue(obj(json!({"name": "bad", "sites": ["B A"]})), &admin())
            .await,
        Err(WriteError::WorkItem(WorkItemError::BadSetting { field: "sites", .. }))
    ));
}

#[tokio::test]
async fn the_version_vector_is_unchanged_by_a_refused_takeover() {
    let dir = tempfile::tempdir().expect("tmp");
    let a = open(dir.path(), "a");
    a.add_queue(obj(json!({"name": "q"})), &admin()).await.expect("queue");
    let id = push(&a, "q").await;
    let before: VersionVector = a.version_vector();
    assert!(a.takeover_workitem(&id, &admin()).await.is_err());
    assert_eq!(a.version_vector(), before);
}

/// Found by the simulator (two-sites, seed 2): the old owner's pop and
/// completion under the superseded epoch arrive at the new owner one after
/// the other. The first refolds (and counts for nothing); the second
/// builds on the first, and must not slip its fields (here `_modified`)
/// into the current document through the fast path: both sites must end
/// with the same document.
#[tokio::test]
async fn a_stale_owners_second_change_does_not_leak_into_the_current_document() {
    let (da, db) = (tempfile::tempdir().expect("tmp"), tempfile::tempdir().expect("tmp"));
    let (a, b) = (open(da.path(), "a"), open(db.path(), "b"));
    a.add_queue(obj(json!({"name": "q", "sites": ["b"]})), &admin())
        .await
        .expect("queue");
    let id = push(&a, "q").await;
    sync(&a, &b).await;
    // a takes the item over and finishes it; b has not heard of that.
    a.takeover_workitem(&id, &admin()).await.expect("takeover");
    a.pop_workitem("q", &admin(), None)
        .await
        .expect("pop at a")
        .expect("item");
    a.update_workitem(&id, "successful", None, None, None, &admin())
        .await
        .expect("complete at a");
    tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    b.pop_workitem("q", &admin(), None)
        .await
        .expect("pop at b")
        .expect("item");
    tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    b.update_workitem(&id, "successful", None, None, None, &admin())
        .await
        .expect("late completion at b");
    heal(&a, &b).await;
    let (at_a, at_b) = (a.get(ITEMS, &id).expect("a"), b.get(ITEMS, &id).expect("b"));
    assert_eq!(at_a, at_b);
    assert_eq!(at_a["_owner"], json!("a"));
    assert_eq!(at_a["_epoch"], json!(2));
}
