//! `ocmesh bench crosssite`: the latency of a work item that crosses the
//! mesh. Two sites in one process, joined by the real federation over
//! loopback QUIC with mutual TLS: an item pushed at site A onto a queue that
//! only site B serves is handed to B, popped and completed there by a
//! worker, and the time until A sees it `successful` is measured.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use serde_json::{Map, json};

use ocmesh_federation::{Mesh, MeshConfig, ca, tls};
use ocmesh_node::workitems::ITEMS;
use ocmesh_node::{Node, NodeConfig};

use crate::bench::{Figures, bench_principal};

#[derive(clap::Args, Debug, Clone)]
pub struct CrossSiteBench {
    /// Items to send across.
    #[arg(long, default_value_t = 500)]
    pub items: u64,
    /// Items in flight at once.
    #[arg(long, default_value_t = 1)]
    pub concurrency: u64,
}

/// How long the sites get to find each other and to deliver one item.
const PATIENCE: Duration = Duration::from_secs(30);

struct Site {
    node: Node,
    mesh: Mesh,
}

fn start_site(dir: &Path, site: &str, ca_dir: &Path, peers: Vec<SocketAddr>) -> anyhow::Result<Site> {
    let files = ca::issue_site_cert(ca_dir, site)?;
    let identity = tls::load_identity(&ca_dir.join("ca.pem"), &files.cert, &files.key)?;
    let node = Node::open(NodeConfig {
        data_dir: dir.join(site),
        site: site.into(),
        admin_password: Some("bench".into()),
    })
    .with_context(|| format!("opening site {site}"))?
    .node;
    let mesh = Mesh::start(
        node.clone(),
        &identity,
        MeshConfig {
            listen: "127.0.0.1:0".parse()?,
            peers: peers.into_iter().map(Into::into).collect(),
            session: Default::default(),
            sharing: Default::default(),
            tap: None,
        },
    )?;
    Ok(Site { node, mesh })
}

/// Waits until `done` holds, re-checking after each change the node takes in.
async fn until(node: &Node, mut done: impl FnMut() -> bool) -> anyhow::Result<()> {
    let mut changes = node.subscribe();
    let deadline = tokio::time::Instant::now() + PATIENCE;
    while !done() {
        match tokio::time::timeout_at(deadline, changes.changed()).await {
            Ok(Ok(())) => {}
            Ok(Err(_)) => bail!("the node stopped"),
            Err(_) => bail!("gave up after {} s", PATIENCE.as_secs()),
        }
    }
    Ok(())
}

pub async fn run(b: CrossSiteBench) -> anyhow::Result<()> {
    tls::install_crypto_provider();
    let dir = std::env::temp_dir().join(format!("ocmesh-bench-crosssite-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let result = measure(&b, &dir).await;
    let _ = std::fs::remove_dir_all(&dir);
    let figures = result?;
    println!(
        "cross-site work item (push at a, done at b, seen at a), concurrency {}:",
        b.concurrency
    );
    println!("  {figures}");
    Ok(())
}

async fn measure(b: &CrossSiteBench, dir: &Path) -> anyhow::Result<Figures> {
    let ca_dir = dir.join("ca");
    ca::init_ca(&ca_dir)?;
    let site_b = start_site(dir, "b", &ca_dir, Vec::new())?;
    let site_a = start_site(dir, "a", &ca_dir, vec![site_b.mesh.local_addr()?])?;
    let who = bench_principal();
    let queue: Map<String, serde_json::Value> = json!({"name": "crosssite", "sites": ["b"]})
        .as_object()
        .cloned()
        .unwrap_or_default();
    site_a.node.add_queue(queue, &who).await?;
    let b_node = site_b.node.clone();
    until(&b_node, || b_node.queue("crosssite").is_ok())
        .await
        .context("the queue never reached site b")?;

    // B's worker completes whatever it is handed.
    let stop = Arc::new(AtomicBool::new(false));
    let worker = {
        let (node, who, stop) = (site_b.node.clone(), who.clone(), stop.clone());
        tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                let Some(item) = node
                    .pop_workitem("crosssite", &who, Some(Duration::from_millis(200)))
                    .await?
                else {
                    continue;
                };
                let id = item["_id"].as_str().unwrap_or_default().to_owned();
                node.update_workitem(&id, "successful", None, None, None, &who).await?;
            }
            anyhow::Ok(())
        })
    };

    let started = Instant::now();
    let sent = Arc::new(AtomicU64::new(0));
    let mut senders = Vec::new();
    for _ in 0..b.concurrency.max(1) {
        let (node, who, sent, total) = (site_a.node.clone(), who.clone(), sent.clone(), b.items);
        senders.push(tokio::spawn(async move {
            let mut lat = Vec::new();
            while sent.fetch_add(1, Ordering::Relaxed) < total {
                let t0 = Instant::now();
                let mut item = Map::new();
                item.insert("payload".into(), json!({"n": lat.len()}));
                let pushed = node.push_workitems("crosssite", vec![item], &who).await?;
                let id = pushed
                    .first()
                    .and_then(|d| d["_id"].as_str())
                    .context("push returned no item")?
                    .to_owned();
                until(&node, || {
                    node.get(ITEMS, &id).is_ok_and(|d| d["state"] == json!("successful"))
                })
                .await
                .with_context(|| format!("item {id} never came back done"))?;
                lat.push(t0.elapsed());
            }
            anyhow::Ok(lat)
        }));
    }
    let mut lat = Vec::new();
    for s in senders {
        lat.extend(s.await??);
    }
    let elapsed = started.elapsed();
    stop.store(true, Ordering::Relaxed);
    worker.await??;
    site_a.mesh.shutdown().await;
    site_b.mesh.shutdown().await;
    Ok(Figures::from_latencies(lat, elapsed))
}
