//! Two and three sites in one process over loopback QUIC: replication,
//! catch-up, relay, and what a misbehaving peer gets.

mod common;
mod loopback;

use std::time::Duration;

use serde_json::json;

use common::{admin, obj};
use loopback::{Site, eventually, frame_counters, free_udp, identity, issued, new_ca, start, start_mesh};
use ocmesh_federation::{ca, frame, tls};
use ocmesh_node::{Node, NodeConfig};

/// The already issued certificate of `site` from the CA in `ca_dir`.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_sites_replicate_both_ways_and_catch_up() {
    let ca_dir = new_ca();
    let (addr_a, addr_b) = (free_udp(), free_udp());
    let a = start(ca_dir.path(), "a", addr_a, vec![addr_b]);
    let b = start(ca_dir.path(), "b", addr_b, vec![addr_a]);

    let doc = a
        .node
        .insert("entities", obj(json!({"name": "from a"})), &admin())
        .await
        .expect("insert");
    let id = doc["_id"].as_str().expect("id").to_owned();
    eventually("a's document at b", || {
        b.node.get("entities", &id).ok() == Some(doc.clone())
    })
    .await;
    let back = b
        .node
        .insert("entities", obj(json!({"name": "from b"})), &admin())
        .await
        .expect("insert");
    let back_id = back["_id"].as_str().expect("id").to_owned();
    eventually("b's document at a", || a.node.get("entities", &back_id).is_ok()).await;

    // One connection between the two, whoever dialed: both show the other connected.
    eventually("peer status", || {
        let (pa, pb) = (a.mesh.peers().snapshot(), b.mesh.peers().snapshot());
        pa.iter()
            .any(|p| p.site.as_deref() == Some("b") && p.connected && p.unacked == 0)
            && pb
                .iter()
                .any(|p| p.site.as_deref() == Some("a") && p.connected && p.unacked == 0)
    })
    .await;

    // b goes away; a writes; a new b with the same data comes back and catches up.
    let Site {
        node: b_node,
        mesh: b_mesh,
        _data: b_data,
    } = b;
    b_mesh.shutdown().await;
    drop(b_node);
    let mut ids = Vec::new();
    for i in 0..300 {
        let d = a
            .node
            .insert("entities", obj(json!({"i": i})), &admin())
            .await
            .expect("insert");
        ids.push(d["_id"].as_str().expect("id").to_owned());
    }
    eventually("a to see b gone", || {
        a.mesh
            .peers()
            .snapshot()
            .iter()
            .any(|p| !p.connected && p.unacked >= 300)
    })
    .await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    let node = Node::open(NodeConfig {
        data_dir: b_data.path().into(),
        site: "b".into(),
        admin_password: None,
    })
    .expect("reopen b")
    .node;
    let mesh = start_mesh(node.clone(), issued(ca_dir.path(), "b"), addr_b, vec![addr_a]);
    eventually("catch-up", || node.version_vector() == a.node.version_vector()).await;
    for id in &ids {
        assert_eq!(
            node.versions("entities", id).expect("b"),
            a.node.versions("entities", id).expect("a")
        );
    }
    mesh.shutdown().await;
    a.mesh.shutdown().await;
}

/// A catch-up in many small batches: b hands its writer the next batch
/// before the last is durable (at most `max_applying` at once), acks each
/// once durable, and ends with a's exact histories.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_catch_up_in_many_batches_is_pipelined_and_exact() {
    use std::sync::atomic::Ordering::Relaxed;

    let ca_dir = new_ca();
    let (addr_a, addr_b) = (free_udp(), free_udp());
    let (a_node, _a_data) = loopback::open_node("a");
    let mut ids = Vec::new();
    for i in 0..400 {
        let d = a_node
            .insert("entities", obj(json!({"i": i})), &admin())
            .await
            .expect("insert");
        ids.push(d["_id"].as_str().expect("id").to_owned());
    }
    let session = ocmesh_replication::SessionConfig {
        max_batch_changes: 8,
        ..Default::default()
    };
    let config = |listen, peers: Vec<std::net::SocketAddr>| ocmesh_federation::MeshConfig {
        listen,
        peers: peers.into_iter().map(Into::into).collect(),
        session: session.clone(),
        sharing: Default::default(),
        tap: None,
    };
    let a_mesh = ocmesh_federation::Mesh::start(a_node.clone(), &identity(ca_dir.path(), "a"), config(addr_a, vec![]))
        .expect("mesh a");
    let (b_node, _b_data) = loopback::open_node("b");
    let b_mesh = ocmesh_federation::Mesh::start(
        b_node.clone(),
        &identity(ca_dir.path(), "b"),
        config(addr_b, vec![addr_a]),
    )
    .expect("mesh b");
    eventually("catch-up", || b_node.version_vector() == a_node.version_vector()).await;
    eventually("a sees all acknowledged", || {
        a_mesh
            .peers()
            .snapshot()
            .iter()
            .any(|p| p.site.as_deref() == Some("b") && p.connected && p.unacked == 0)
    })
    .await;
    for id in &ids {
        assert_eq!(
            b_node.versions("entities", id).expect("b"),
            a_node.versions("entities", id).expect("a")
        );
    }
    let peak = b_mesh.stats().applying_peak.load(Relaxed);
    assert!(
        (1..=session.max_applying).contains(&peak),
        "{peak} batches in b's writer at once"
    );
    assert_eq!(b_mesh.stats().protocol_errors.load(Relaxed), 0);
    b_mesh.shutdown().await;
    a_mesh.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn changes_relay_through_a_middle_site() {
    let ca_dir = new_ca();
    let (addr_a, addr_b, addr_c) = (free_udp(), free_udp(), free_udp());
    let a = start(ca_dir.path(), "a", addr_a, vec![addr_b]);
    let b = start(ca_dir.path(), "b", addr_b, vec![]);
    let c = start(ca_dir.path(), "c", addr_c, vec![addr_b]);
    for i in 0..50 {
        a.node
            .insert("entities", obj(json!({"a": i})), &admin())
            .await
            .expect("a");
        c.node
            .insert("entities", obj(json!({"c": i})), &admin())
            .await
            .expect("c");
    }
    eventually("all three agree", || {
        let v = b.node.version_vector();
        v.total() == 100 && a.node.version_vector() == v && c.node.version_vector() == v
    })
    .await;
    // Nothing was applied twice anywhere.
    for s in [&a, &b, &c] {
        assert_eq!(
            s.node
                .stats()
                .remote_duplicates
                .load(std::sync::atomic::Ordering::Relaxed),
            0
        );
    }
    for s in [a, b, c] {
        s.mesh.shutdown().await;
    }
}

/// A peer with a valid certificate that sends garbage: its session is
/// closed with a logged error, and the site goes on serving and syncing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_frames_close_only_that_session() {
    let ca_dir = new_ca();
    let (addr_a, addr_b) = (free_udp(), free_udp());
    let a = start(ca_dir.path(), "a", addr_a, vec![]);
    let rogue_id = identity(ca_dir.path(), "rogue");

    for payload in [
        vec![0xffu8, 0xff, 0xff, 0x7f],                 // length over the limit
        vec![5, 0, 0, 0, 0xff, 0xff, 0xff, 0xff, 0xff], // does not decode
        vec![9, 0, 0, 0, 1, 2],                         // truncated
    ] {
        let mut ep = quinn::Endpoint::client("127.0.0.1:0".parse().expect("addr")).expect("client");
        ep.set_default_client_config(tls::client_config(&rogue_id).expect("client config"));
        let conn = ep
            .connect(addr_a, tls::SERVER_NAME)
            .expect("connect")
            .await
            .expect("handshake");
        let (mut send, mut recv) = conn.open_bi().await.expect("stream");
        send.write_all(&payload).await.expect("write");
        send.finish().expect("finish");
        // a may get its hello out before it closes; either way the
        // connection ends with a's "bad frame" close code.
        let mut buf = Vec::new();
        let _ = tokio::time::timeout(Duration::from_secs(5), frame::read_frame(&mut recv, &mut buf)).await;
        let closed = tokio::time::timeout(Duration::from_secs(5), conn.closed())
            .await
            .expect("a closes the connection");
        match closed {
            quinn::ConnectionError::ApplicationClosed(c) => {
                assert_eq!(c.error_code, quinn::VarInt::from_u32(4), "{c:?}")
            }
            other => panic!("expected an application close, got {other:?}"),
        }
        ep.close(0u32.into(), b"");
    }
    assert!(
        a.mesh
            .stats()
            .protocol_errors
            .load(std::sync::atomic::Ordering::Relaxed)
            >= 3
    );

    // A well-behaved peer still syncs with a.
    let doc = a
        .node
        .insert("entities", obj(json!({"still": "working"})), &admin())
        .await
        .expect("insert");
    let b = start(ca_dir.path(), "b", addr_b, vec![addr_a]);
    let id = doc["_id"].as_str().expect("id").to_owned();
    eventually("b syncs after the rogue", || b.node.get("entities", &id).is_ok()).await;
    a.mesh.shutdown().await;
    b.mesh.shutdown().await;
}

/// A certificate that expires while its site runs is refused at the next
/// handshake, before any stream opens, and the refusal is counted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_expired_certificate_is_refused() {
    let ca_dir = new_ca();
    let addr_a = free_udp();
    let a = start(ca_dir.path(), "a", addr_a, vec![]);
    let now = std::time::SystemTime::now();
    let files = ca::issue_site_cert_with_validity(
        ca_dir.path(),
        "late",
        now - Duration::from_secs(86_400),
        now + Duration::from_secs(2),
    )
    .expect("issue");
    let late = tls::load_identity(&ca_dir.path().join("ca.pem"), &files.cert, &files.key).expect("valid for now");
    tokio::time::sleep(Duration::from_millis(3_500)).await;
    assert!(
        tls::load_identity(&ca_dir.path().join("ca.pem"), &files.cert, &files.key).is_err(),
        "an expired identity does not load"
    );
    let mut ep = quinn::Endpoint::client("127.0.0.1:0".parse().expect("addr")).expect("client");
    ep.set_default_client_config(tls::client_config(&late).expect("client config"));
    let outcome = tokio::time::timeout(Duration::from_secs(10), async {
        let conn = ep
            .connect(addr_a, tls::SERVER_NAME)
            .map_err(|e| e.to_string())?
            .await
            .map_err(|e| e.to_string())?;
        // TLS 1.3: a refused client certificate may show only at the first read.
        let (_send, mut recv) = conn.open_bi().await.map_err(|e| e.to_string())?;
        let mut buf = Vec::new();
        match frame::read_frame(&mut recv, &mut buf).await {
            Ok(Some(f)) => Ok(f),
            Ok(None) => Err("stream ended".to_string()),
            Err(e) => Err(e.to_string()),
        }
    })
    .await
    .expect("bounded");
    assert!(outcome.is_err(), "an expired client got data: {outcome:?}");
    eventually("a counts the refusal", || {
        a.mesh
            .stats()
            .refused_connections
            .load(std::sync::atomic::Ordering::Relaxed)
            >= 1
    })
    .await;
    assert_eq!(
        a.mesh
            .stats()
            .sessions_started
            .load(std::sync::atomic::Ordering::Relaxed),
        0
    );
    a.mesh.shutdown().await;
}

/// Reconnecting two sites that already hold the same changes from 10
/// origins costs one round trip, each side's hello, and under 1 KiB of
/// sync frames in all (counted at the session level, length prefixes
/// included; the QUIC handshake is not counted).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_in_sync_reconnect_costs_one_round_trip_under_1_kib() {
    use ocmesh_proto::federation::{Change, ChangeKind};
    use std::sync::atomic::Ordering::Relaxed;

    let ca_dir = new_ca();
    let (addr_a, addr_b) = (free_udp(), free_udp());
    let a = start(ca_dir.path(), "site-a", addr_a, vec![addr_b]);
    let b = start(ca_dir.path(), "site-b", addr_b, vec![]);
    // Eight more origins (as if relayed from other sites), then a write at
    // each of the two: 10 origins.
    let relayed: Vec<Change> = (0..8u64)
        .map(|i| Change {
            origin: format!("site-{i:02}"),
            seq: 1,
            hlc: (1_764_000_000_000 + i) << 16,
            kind: ChangeKind::Insert as i32,
            collection: "entities".into(),
            doc_id: format!("{:024x}", i + 1),
            body: serde_json::to_vec(&json!({"_id": format!("{:024x}", i + 1), "i": i})).expect("json"),
            author: "0".repeat(24),
            ..Default::default()
        })
        .collect();
    a.node.apply(relayed).await.expect("apply");
    a.node
        .insert("entities", obj(json!({"at": "a"})), &admin())
        .await
        .expect("insert");
    b.node
        .insert("entities", obj(json!({"at": "b"})), &admin())
        .await
        .expect("insert");
    eventually("10 origins at both sites", || {
        let v = a.node.version_vector();
        v.iter().count() == 10 && b.node.version_vector() == v
    })
    .await;
    eventually("nothing unacknowledged", || {
        a.mesh.peers().snapshot().iter().any(|p| p.connected && p.unacked == 0)
            && b.mesh.peers().snapshot().iter().any(|p| p.connected && p.unacked == 0)
    })
    .await;

    let Site {
        node: a_node,
        mesh: a_mesh,
        _data: a_data,
    } = a;
    a_mesh.shutdown().await;
    eventually("b to see a gone", || {
        b.mesh.peers().snapshot().iter().all(|p| !p.connected)
    })
    .await;
    let stats = b.mesh.stats();
    let before = frame_counters(stats);
    // The old endpoint's socket may linger: a dials b, so any port does.
    let a_mesh = start_mesh(
        a_node.clone(),
        issued(ca_dir.path(), "site-a"),
        free_udp(),
        vec![addr_b],
    );
    eventually("the reconnect", || {
        b.mesh.peers().snapshot().iter().any(|p| p.connected) && a_mesh.stats().frames_received.load(Relaxed) >= 1
    })
    .await;
    // Leave time for anything more either side would send.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let after = frame_counters(stats);
    let [frames_sent, frames_received, bytes_sent, bytes_received] = [0, 1, 2, 3].map(|i| after[i] - before[i]);
    eprintln!(
        "in-sync reconnect at b: {frames_sent} frame(s) sent ({bytes_sent} B), {frames_received} received ({bytes_received} B)"
    );
    assert_eq!(
        (frames_sent, frames_received),
        (1, 1),
        "one hello each way, nothing else"
    );
    assert_eq!(a_mesh.stats().frames_sent.load(Relaxed), 1);
    assert_eq!(a_mesh.stats().bytes_sent.load(Relaxed), bytes_received);
    assert!(
        bytes_sent + bytes_received < 1024,
        "{bytes_sent} + {bytes_received} bytes"
    );
    a_mesh.shutdown().await;
    b.mesh.shutdown().await;
    drop(a_data);
}

/// A work item pushed at a onto a queue only b serves waits while b is
/// cut off (popped nowhere), reaches b as soon as the link returns, and
/// b's result comes back to a.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_handed_over_work_item_waits_through_a_cut_and_moves_when_the_link_returns() {
    use ocmesh_node::workitems::ITEMS;
    let ca_dir = new_ca();
    let (addr_a, addr_b) = (free_udp(), free_udp());
    let a = start(ca_dir.path(), "a", addr_a, vec![addr_b]);
    let b = start(ca_dir.path(), "b", addr_b, vec![addr_a]);
    a.node
        .add_queue(obj(json!({"name": "q", "sites": ["b"]})), &admin())
        .await
        .expect("queue");
    eventually("the queue at b", || b.node.queue("q").is_ok()).await;

    // The link drops: b's mesh stops, its node stays.
    let Site {
        node: b_node,
        mesh: b_mesh,
        _data: _b_data,
    } = b;
    b_mesh.shutdown().await;
    let pushed = a
        .node
        .push_workitems("q", vec![obj(json!({"payload": {"n": 1}}))], &admin())
        .await
        .expect("push");
    let id = pushed[0]["_id"].as_str().expect("id").to_owned();
    assert_eq!(pushed[0]["_owner"], json!("b"));
    assert!(
        a.node
            .pop_workitem("q", &admin(), None)
            .await
            .expect("pop at a")
            .is_none()
    );
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(b_node.get(ITEMS, &id).is_err(), "nothing crosses a cut link");

    // The link returns.
    let mesh = start_mesh(b_node.clone(), issued(ca_dir.path(), "b"), addr_b, vec![addr_a]);
    let popped = b_node
        .pop_workitem("q", &admin(), Some(Duration::from_secs(20)))
        .await
        .expect("pop at b")
        .expect("the item reached b");
    assert_eq!(popped["_id"], json!(id));
    b_node
        .update_workitem(&id, "successful", None, None, None, &admin())
        .await
        .expect("complete at b");
    eventually("b's result at a", || {
        a.node.get(ITEMS, &id).is_ok_and(|d| d["state"] == json!("successful"))
    })
    .await;
    assert!(
        a.node
            .pop_workitem("q", &admin(), None)
            .await
            .expect("pop at a")
            .is_none()
    );
    mesh.shutdown().await;
    a.mesh.shutdown().await;
}
