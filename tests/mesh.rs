//! Two and three real `ocmesh run` processes on 127.0.0.1, with
//! certificates from `ocmesh ca`.

mod common;

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::{Value, json};

use common::{Site, free_tcp, free_udp, make_ca, peer_in_sync, peers_of, wait_until};

/// How long one write may take to show up at another site.
const SEEN: Duration = Duration::from_secs(20);
/// How long catching up (1,000 documents, a restart) may take.
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

/// (a) A document written at A is readable at B, identical.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn write_at_a_read_at_b() -> anyhow::Result<()> {
    let p = pair().await?;
    let doc =
        p.a.insert("entities", &json!({"name": "pump 7", "nested": {"x": [1, 2]}}))
            .await?;
    let id = id_of(&doc);
    wait_until(SEEN, "the document at b", || async {
        Ok(p.b.doc("entities", &id).await?.is_some())
    })
    .await?;
    assert_eq!(p.b.doc("entities", &id).await?, Some(doc), "identical at b");
    assert_eq!(
        p.b.versions("entities", &id).await?,
        p.a.versions("entities", &id).await?
    );
    let peers = p.a.peers().await?;
    assert_eq!(peers.len(), 1, "{peers:?}");
    assert_eq!(peers[0]["site"], "site-b");
    assert_eq!(peers[0]["connected"], true, "{peers:?}");
    assert!(peers[0]["address"].is_string(), "{peers:?}");
    assert!(peers[0]["unacked"].is_u64(), "{peers:?}");
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
    // a holds all 1,001 of those changes for b, none acknowledged (the
    // figure may trail the writes a little, hence the wait).
    let held_for_b = wait_until(SEEN, "a to list b disconnected with >= 1,001 unacked", || async {
        Ok(a.peers().await?.iter().any(|p| {
            p["site"] == "site-b" && p["connected"] == false && p["unacked"].as_u64().is_some_and(|n| n >= 1001)
        }))
    })
    .await;
    if let Err(e) = held_for_b {
        anyhow::bail!("{e:#}; {}", peers_of(&a).await);
    }

    p.b.start().await?;
    let b = &p.b;
    let caught_up = wait_until(SYNC, "b caught up (a lists it connected, 0 unacked)", || {
        peer_in_sync(&a, "site-b")
    })
    .await;
    if let Err(e) = caught_up {
        anyhow::bail!("{e:#}; {}", peers_of(&a).await);
    }
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
    let client = reqwest::Client::builder().timeout(Duration::from_secs(20)).build()?;
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
    assert!(acked.len() >= 300 && acked.len() < 20_000, "{} acked", acked.len());
    p.a.start().await?;
    for id in &acked {
        assert!(p.a.doc("entities", id).await?.is_some(), "acknowledged {id} lost at a");
    }
    let (a, b) = (&p.a, &p.b);
    // b still holds its connection to the killed a, which would idle out
    // only 30 s after the kill (federation's MAX_IDLE_TIMEOUT); the restarted
    // a's hello carries a newer incarnation, so b replaces the stale
    // connection at once. Without that this wait fails: it starts a few
    // seconds after the kill and ends well before the idle timeout would.
    let retaken = Duration::from_secs(10);
    if let Err(e) = wait_until(retaken, "b in sync with restarted a", || peer_in_sync(a, "site-b")).await {
        anyhow::bail!("{e:#}; {}", peers_of(a).await);
    }
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
    let mut ids = Vec::new();
    for i in 0..5 {
        ids.push(id_of(
            &p.a.insert("entities", &json!({"secret": "plans", "i": i})).await?,
        ));
    }
    // The documents do replicate to a site of the right CA.
    wait_until(SEEN, "a's documents at b", || async {
        for id in &ids {
            if p.b.doc("entities", id).await?.is_none() {
                return Ok(false);
            }
        }
        Ok(true)
    })
    .await?;

    let root = tempfile::tempdir()?;
    let other_ca = root.path().join("other-ca");
    make_ca(&other_ca, &["site-c"])?;
    let a_mesh: SocketAddr = p.a.mesh.expect("a's mesh address");
    let mut c = Site::meshed(root.path(), &other_ca, "site-c", free_udp(), &[a_mesh]);
    c.start().await?;
    tokio::time::sleep(Duration::from_secs(5)).await;

    for id in &ids {
        assert_eq!(c.doc("entities", id).await?, None, "c received a's document {id}");
    }
    let at_a = p.a.peers().await?;
    assert!(
        at_a.iter().all(|peer| peer["site"] != "site-c"),
        "a lists c as a peer: {at_a:?}"
    );
    assert!(
        at_a.iter()
            .filter(|peer| peer["connected"] == true)
            .all(|peer| peer["site"] == "site-b"),
        "a has a connected peer other than b: {at_a:?}"
    );
    let at_c = c.peers().await?;
    assert!(!at_c.is_empty(), "c does not list its configured peer: {at_c:?}");
    assert!(
        at_c.iter().all(|peer| peer["connected"] == false),
        "c believes it is connected: {at_c:?}"
    );
    let c_log = c.log_text().to_lowercase();
    assert!(
        c_log.contains("certificate") || c_log.contains("refused"),
        "c's log does not mention the refusal:\n{c_log}"
    );
    Ok(())
}

/// (e) Concurrent replaces of one document at A and at B converge: both
/// sites end with the same current document and histories of equal length
/// holding both writes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_writes_converge() -> anyhow::Result<()> {
    let p = pair().await?;
    let doc = p.a.insert("entities", &json!({"v": "start"})).await?;
    let id = id_of(&doc);
    wait_until(SEEN, "doc at b", || async {
        Ok(p.b.doc("entities", &id).await?.is_some())
    })
    .await?;
    let (body_a, body_b) = (json!({"v": "a"}), json!({"v": "b"}));
    let (ra, rb) = tokio::join!(p.a.put("entities", &id, &body_a), p.b.put("entities", &id, &body_b));
    let (ra, rb) = (ra?, rb?);
    let holds_both = |versions: &Value| {
        let list = versions.as_array().cloned().unwrap_or_default();
        list.iter().any(|v| v["v"] == "a") && list.iter().any(|v| v["v"] == "b")
    };
    let converged = wait_until(SYNC, "both sites to agree on the document and its history", || async {
        let (da, db) = (p.a.doc("entities", &id).await?, p.b.doc("entities", &id).await?);
        let (va, vb) = (
            p.a.versions("entities", &id).await?,
            p.b.versions("entities", &id).await?,
        );
        Ok(da.is_some()
            && da == db
            && va.as_array().map(|v| v.len()) == vb.as_array().map(|v| v.len())
            && holds_both(&va)
            && holds_both(&vb))
    })
    .await;
    if let Err(e) = converged {
        anyhow::bail!(
            "{e:#}\na: {:?}\nb: {:?}\na's versions: {:?}\nb's versions: {:?}",
            p.a.doc("entities", &id).await,
            p.b.doc("entities", &id).await,
            p.a.versions("entities", &id).await,
            p.b.versions("entities", &id).await,
        );
    }
    let winner = p.a.doc("entities", &id).await?.expect("current document")["v"].clone();
    assert!(
        winner == ra["v"] || winner == rb["v"],
        "winner {winner} is neither write"
    );
    Ok(())
}

/// Three sites configured three ways: A from a `--config` TOML file
/// (`peers = [..]`), B from `OCMESH_*` variables (`OCMESH_PEERS`
/// comma-separated), C from flags. Site names come from the certificates.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_sites_configured_by_file_env_and_flags() -> anyhow::Result<()> {
    let root = tempfile::tempdir()?;
    let ca = root.path().join("ca");
    make_ca(&ca, &["site-a", "site-b", "site-c"])?;
    let (ma, mb, mc) = (free_udp(), free_udp(), free_udp());
    let (ha, hb) = (free_tcp(), free_tcp());
    let file = |name: &str, ext: &str| ca.join(format!("{name}.{ext}")).display().to_string();
    let data = |name: &str| root.path().join(format!("{name}-data")).display().to_string();

    let config = root.path().join("site-a.toml");
    std::fs::write(
        &config,
        format!(
            "data = {:?}\nhttp = \"{ha}\"\nmesh = \"{ma}\"\nca = {:?}\ncert = {:?}\nkey = {:?}\npeers = [\"{mb}\", \"{mc}\"]\n",
            data("site-a"),
            file("ca", "pem"),
            file("site-a", "pem"),
            file("site-a", "key"),
        ),
    )?;
    let mut a = Site::custom(
        root.path(),
        "site-a",
        ha,
        Some(ma),
        vec!["--config".into(), config.display().to_string()],
        vec![],
    );
    let env = |k: &str, v: String| (k.to_owned(), v);
    let mut b = Site::custom(
        root.path(),
        "site-b",
        hb,
        Some(mb),
        vec![],
        vec![
            env("OCMESH_DATA", data("site-b")),
            env("OCMESH_HTTP", hb.to_string()),
            env("OCMESH_MESH", mb.to_string()),
            env("OCMESH_CA", file("ca", "pem")),
            env("OCMESH_CERT", file("site-b", "pem")),
            env("OCMESH_KEY", file("site-b", "key")),
            env("OCMESH_PEERS", format!("{ma},{mc}")),
        ],
    );
    let mut c = Site::meshed(root.path(), &ca, "site-c", mc, &[ma, mb]);
    a.start().await?;
    b.start().await?;
    c.start().await?;

    let sites = [
        (&a, ["site-b", "site-c"]),
        (&b, ["site-a", "site-c"]),
        (&c, ["site-a", "site-b"]),
    ];
    for (site, others) in &sites {
        let meshed = wait_until(SYNC, &format!("{} connected to {others:?}", site.name), || async {
            let peers = site.peers().await?;
            Ok(others
                .iter()
                .all(|o| peers.iter().any(|p| p["site"] == *o && p["connected"] == true)))
        })
        .await;
        if let Err(e) = meshed {
            anyhow::bail!("{e:#}; {}", peers_of(site).await);
        }
    }
    // Each configured peer address shows up in the list.
    for (site, dialed) in [(&a, [mb, mc]), (&b, [ma, mc]), (&c, [ma, mb])] {
        let peers = site.peers().await?;
        for addr in dialed {
            assert!(
                peers.iter().any(|p| p["address"] == addr.to_string()),
                "{addr} not in {}'s peers: {peers:?}",
                site.name
            );
        }
    }

    let from_c = c.insert("entities", &json!({"written": "at c"})).await?;
    let from_a = a.insert("entities", &json!({"written": "at a"})).await?;
    for doc in [&from_c, &from_a] {
        let id = id_of(doc);
        for site in [&a, &b, &c] {
            wait_until(SEEN, &format!("{id} at {}", site.name), || async {
                Ok(site.doc("entities", &id).await?.is_some())
            })
            .await?;
            assert_eq!(site.doc("entities", &id).await?.as_ref(), Some(doc), "at {}", site.name);
        }
    }
    Ok(())
}

/// `ocmesh ca issue` writes SITE.pem and SITE.key for names of lowercase
/// letters, digits and '-', and refuses anything else.
#[test]
fn ca_issues_certificates_only_for_valid_site_names() -> anyhow::Result<()> {
    let root = tempfile::tempdir()?;
    let ca = root.path().join("ca");
    make_ca(&ca, &["site-1", "edge-0a"])?;
    for f in [
        "ca.pem",
        "ca.key",
        "site-1.pem",
        "site-1.key",
        "edge-0a.pem",
        "edge-0a.key",
    ] {
        assert!(ca.join(f).is_file(), "{f} not written");
    }
    let dir = ca.display().to_string();
    for bad in ["Bad", "under_score", "a b", "dot.ted", "slash/ed", ""] {
        assert!(
            common::ocmesh(&["ca", "issue", &dir, bad]).is_err(),
            "issued a certificate for {bad:?}"
        );
    }
    Ok(())
}

/// A replaced document is stored with its fields in the writer's order at
/// the site that wrote it, but in merge order (kept fields first, new ones
/// appended) at every site the change reaches: the same version, equal as
/// JSON, different bytes. Found by tests/fault_proxy.rs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replaced_document_has_the_same_bytes_at_both_sites() -> anyhow::Result<()> {
    let p = pair().await?;
    let doc = p.a.insert("entities", &json!({"x": 1, "y": 2})).await?;
    let id = id_of(&doc);
    p.a.put("entities", &id, &json!({"z": 3, "x": 1})).await?;
    let path = format!("/api/v1/collections/entities/documents/{id}");
    let (a, b) = (p.a.rest(), p.b.rest());
    wait_until(SEEN, "the replace at b", || async {
        Ok(b.get_raw(&path).await?.1.contains("\"z\""))
    })
    .await?;
    let (at_a, at_b) = (a.get_raw(&path).await?.1, b.get_raw(&path).await?.1);
    assert_eq!(
        serde_json::from_str::<Value>(&at_a)?,
        serde_json::from_str::<Value>(&at_b)?,
        "different documents"
    );
    assert_eq!(at_a, at_b, "same document, different bytes");
    Ok(())
}

/// `ocmesh status` against a running site: its health, store figures and
/// peers; a wrong password and an API that is not there are named errors.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_shows_the_site_and_its_peers() -> anyhow::Result<()> {
    let p = pair().await?;
    p.a.insert("entities", &json!({"name": "shown"})).await?;
    wait_until(SYNC, "b holds a's document", || peer_in_sync(&p.a, "site-b")).await?;
    // (success, stdout, stderr) of `ocmesh status`.
    let status = |password: &str, api: String| -> anyhow::Result<(bool, String, String)> {
        let mut cmd = std::process::Command::new(common::bin());
        common::hermetic(&mut cmd).args(["status", "--api", &api, "--password", password]);
        let out = cmd.output()?;
        let text = |b: &[u8]| String::from_utf8_lossy(b).into_owned();
        Ok((out.status.success(), text(&out.stdout), text(&out.stderr)))
    };
    let held = || async { anyhow::Ok(p.a.get("/api/v1/metrics").await?.1["changes_held"].as_u64()) };
    let before = held().await?.unwrap_or_default();
    let (ok, text, err) = status(common::PASSWORD, p.a.url(""))?;
    let after = held().await?.unwrap_or_default();
    assert!(ok, "{text} {err}");
    assert!(text.contains("site site-a: ok"), "{text}");
    // The figure is the site's own, read between the two above.
    let shown: u64 = text
        .split("store: ")
        .nth(1)
        .and_then(|rest| rest.split(' ').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no store line: {text}"));
    assert!(
        before >= 1 && (before..=after).contains(&shown),
        "{before}..={after}: {text}"
    );
    assert!(
        text.lines()
            .any(|l| l.starts_with("peer site-b (") && l.contains(": connected, 0 unacknowledged")),
        "{text}"
    );

    let (ok, _, err) = status("wrong", p.a.url(""))?;
    assert!(!ok && err.contains("refused the sign-in of user \"admin\""), "{err}");

    let nowhere = format!("http://{}", free_tcp());
    let (ok, _, err) = status(common::PASSWORD, nowhere.clone())?;
    assert!(
        !ok && err.contains(&format!("cannot reach the site's API at {nowhere}")),
        "{err}"
    );
    Ok(())
}
