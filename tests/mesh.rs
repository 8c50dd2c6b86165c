//! Two and three real `ocmesh run` processes on 127.0.0.1, with
//! certificates from `ocmesh ca`.

mod common;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::{Value, json};

use common::{Site, free_udp, make_ca, wait_until};

const SYNC: Duration = Duration::from_secs(30);

struct Pair {
    a: Site,
    b: Site,
    _root: tempfile::TempDir,
}

async fn pair() -> anyhow::Result<Pair> {
    let root = tempfile::tempdir()?;
    let ca = root.path().join("ca");
    make_ca(&ca, &["site-a", "site-b"])?;
    let (ma, mb) = (free_udp(), free_udp());
    let mut a = Site::meshed(root.path(), &ca, "site-a", ma, &[mb]);
    let mut b = Site::meshed(root.path(), &ca, "site-b", mb, &[ma]);
    a.start().await?;
    b.start().await?;
    Ok(Pair { a, b, _root: root })
}

fn id_of(doc: &Value) -> String {
    doc["_id"].as_str().unwrap_or_default().to_owned()
}

async fn peer_in_sync(site: &Site, peer: &str) -> anyhow::Result<bool> {
    Ok(site
        .peers()
        .await?
        .iter()
        .any(|p| p["site"] == peer && p["connected"] == true && p["unacked"] == 0))
}

/// (a) A document written at A is readable at B, identical.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn write_at_a_read_at_b() -> anyhow::Result<()> {
    let p = pair().await?;
    let doc =
        p.a.insert("entities", &json!({"name": "pump 7", "nested": {"x": [1, 2]}}))
            .await?;
    let id = id_of(&doc);
    wait_until(SYNC, "the document at b", || async {
        Ok(p.b.doc("entities", &id).await?.as_ref() == Some(&doc))
    })
    .await?;
    assert_eq!(
        p.b.versions("entities", &id).await?,
        p.a.versions("entities", &id).await?
    );
    let peers = p.a.peers().await?;
    assert_eq!(peers.len(), 1, "{peers:?}");
    assert_eq!(peers[0]["site"], "site-b");
    Ok(())
}

/// (b) Writes made while B is down reach B when it returns, identical in
/// content and versions.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_while_b_is_down_reach_b() -> anyhow::Result<()> {
    let mut p = pair().await?;
    wait_until(SYNC, "a and b connected", || peer_in_sync(&p.a, "site-b")).await?;
    p.b.stop();
    let a = Arc::new(std::mem::replace(&mut p.a, Site::single(p._root.path(), "placeholder")));
    let mut writers = Vec::new();
    for w in 0..8 {
        let a = a.clone();
        writers.push(tokio::spawn(async move {
            let mut ids = Vec::new();
            for i in 0..125 {
                let d = a
                    .insert("entities", &json!({"writer": w, "i": i, "pad": "x".repeat(200)}))
                    .await?;
                ids.push(id_of(&d));
            }
            anyhow::Ok(ids)
        }));
    }
    let mut ids = Vec::new();
    for w in writers {
        ids.extend(w.await??);
    }
    assert_eq!(ids.len(), 1000);
    // One document also changes while b is away.
    a.put("entities", &ids[0], &json!({"changed": true})).await?;

    p.b.start().await?;
    let b = &p.b;
    wait_until(SYNC, "b caught up", || peer_in_sync(&a, "site-b")).await?;
    for id in &ids {
        let (at_a, at_b) = (a.doc("entities", id).await?, b.doc("entities", id).await?);
        assert!(at_a.is_some(), "{id} missing at a");
        assert_eq!(at_a, at_b, "document {id} differs");
    }
    assert_eq!(
        a.versions("entities", &ids[0]).await?,
        b.versions("entities", &ids[0]).await?
    );
    assert_eq!(
        b.versions("entities", &ids[0]).await?.as_array().map(|v| v.len()),
        Some(2)
    );
    Ok(())
}

/// (c) kill -9 A while a client writes; every write that got a 201 is
/// there after restart, on A and on B.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acknowledged_writes_survive_kill_9() -> anyhow::Result<()> {
    let mut p = pair().await?;
    let acked = Arc::new(Mutex::new(Vec::<String>::new()));
    let client = reqwest::Client::new();
    let url = p.a.url("/api/v1/collections/entities/documents");
    let mut writers = Vec::new();
    for w in 0..4 {
        let (acked, client, url) = (acked.clone(), client.clone(), url.clone());
        writers.push(tokio::spawn(async move {
            // Bounded: stops at the first failure (the kill) or after 5,000 writes.
            for i in 0..5_000 {
                let r = client
                    .post(&url)
                    .basic_auth("admin", Some(common::PASSWORD))
                    .json(&json!({"writer": w, "i": i}))
                    .send()
                    .await;
                match r {
                    Ok(r) if r.status() == 201 => {
                        let Ok(doc) = r.json::<Value>().await else { return };
                        if let Ok(mut a) = acked.lock() {
                            a.push(id_of(&doc));
                        }
                    }
                    _ => return,
                }
            }
        }));
    }
    wait_until(SYNC, "300 acknowledged writes", || {
        let n = acked.lock().map(|a| a.len()).unwrap_or(0);
        async move { Ok(n >= 300) }
    })
    .await?;
    p.a.kill();
    for w in writers {
        w.await?;
    }
    let acked: Vec<String> = acked.lock().map(|a| a.clone()).unwrap_or_default();
    p.a.start().await?;
    for id in &acked {
        assert!(p.a.doc("entities", id).await?.is_some(), "acknowledged {id} lost at a");
    }
    let (a, b) = (&p.a, &p.b);
    wait_until(SYNC, "b in sync with restarted a", || peer_in_sync(a, "site-b")).await?;
    for id in &acked {
        assert_eq!(
            b.doc("entities", id).await?,
            a.doc("entities", id).await?,
            "{id} differs at b"
        );
    }
    Ok(())
}

/// (d) A site whose certificate comes from another CA cannot connect and
/// receives nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_site_from_another_ca_is_refused() -> anyhow::Result<()> {
    let p = pair().await?;
    let doc = p.a.insert("entities", &json!({"secret": "plans"})).await?;
    let root = tempfile::tempdir()?;
    let other_ca = root.path().join("other-ca");
    make_ca(&other_ca, &["site-c"])?;
    let mut c = Site::meshed(
        root.path(),
        &other_ca,
        "site-c",
        free_udp(),
        &[p.a.mesh.expect("a's mesh address")],
    );
    c.start().await?;
    tokio::time::sleep(Duration::from_secs(4)).await;
    assert_eq!(c.doc("entities", &id_of(&doc)).await?, None, "c received a's document");
    assert!(
        p.a.peers().await?.iter().all(|peer| peer["site"] != "site-c"),
        "a lists c as a peer"
    );
    let c_log = c.log_text().to_lowercase();
    assert!(
        c_log.contains("cannot connect to peer") && c_log.contains("certificate"),
        "c's log:\n{c_log}"
    );
    let a_log = p.a.log_text().to_lowercase();
    assert!(
        a_log.contains("refused an incoming peer connection"),
        "a's log:\n{a_log}"
    );
    Ok(())
}

/// Concurrent replaces of one document converge to the same winner on
/// both sites, and both versions stay in history.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_writes_converge() -> anyhow::Result<()> {
    let p = pair().await?;
    let doc = p.a.insert("entities", &json!({"v": "start"})).await?;
    let id = id_of(&doc);
    wait_until(SYNC, "doc at b", || async {
        Ok(p.b.doc("entities", &id).await?.is_some())
    })
    .await?;
    let (body_a, body_b) = (json!({"v": "from a"}), json!({"v": "from b"}));
    let (ra, rb) = tokio::join!(p.a.put("entities", &id, &body_a), p.b.put("entities", &id, &body_b));
    let (ra, rb) = (ra?, rb?);
    wait_until(SYNC, "both histories complete", || async {
        let (va, vb) = (
            p.a.versions("entities", &id).await?,
            p.b.versions("entities", &id).await?,
        );
        Ok(va == vb && va.as_array().map(|v| v.len()) == Some(3))
    })
    .await?;
    let (da, db) = (p.a.doc("entities", &id).await?, p.b.doc("entities", &id).await?);
    assert_eq!(da, db, "same winner on both sites");
    let winner = da.expect("current document")["v"].clone();
    assert!(winner == ra["v"] || winner == rb["v"]);
    let bodies: Vec<Value> =
        p.a.versions("entities", &id)
            .await?
            .as_array()
            .cloned()
            .unwrap_or_default();
    assert!(bodies.iter().any(|v| v["v"] == "from a") && bodies.iter().any(|v| v["v"] == "from b"));
    Ok(())
}
