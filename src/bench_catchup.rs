//! `ocmesh bench catchup`: a site returning after a long absence catches up.
//!
//! Site A (this process: a node and the real mesh) holds N changes of a
//! 1 KiB incompressible payload each. Site B is a separate `ocmesh run`
//! process that dials A over loopback QUIC with mutual TLS, and the bench
//! times from B's start until A sees every change acknowledged by B (B
//! acknowledges a batch only once it is durable). It reads the bytes the
//! connection put on the wire from quinn's counters at A and B's peak RSS
//! from /proc. In the same run a raw quinn stream moves the same payload
//! bytes from this process to a second child process (`ocmesh bench
//! raw-sink`), over the same TLS configuration and socket setup, as the
//! baseline.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use rand::RngCore;
use serde_json::{Map, Value};
use std::io::{BufRead, BufReader};
use std::process::{Child, Command};

use ocmesh_federation::{Mesh, MeshConfig, bind_udp, ca, tls};
use ocmesh_node::{Node, NodeConfig};

use crate::bench::bench_principal;

#[derive(clap::Args, Debug, Clone)]
pub struct CatchUpBench {
    /// Changes A holds that B lacks.
    #[arg(long, default_value_t = 1_000_000)]
    pub changes: u64,
    /// Bytes per change: the document version a change carries, metadata
    /// included, padded with random text to this size.
    #[arg(long, default_value_t = 1024)]
    pub payload: usize,
}

/// Settings of the hidden `ocmesh bench raw-sink`: the receiving end of the
/// raw quinn baseline, run as its own process.
#[derive(clap::Args, Debug, Clone)]
pub struct RawSink {
    #[arg(long)]
    pub ca: PathBuf,
    #[arg(long)]
    pub cert: PathBuf,
    #[arg(long)]
    pub key: PathBuf,
}

/// Documents written to A per insert (one group commit each).
const FILL_BATCH: u64 = 1000;
/// How long B gets to catch up before the bench gives up.
const PATIENCE: Duration = Duration::from_secs(1800);
const COLLECTION: &str = "catchup";

pub async fn run(b: CatchUpBench) -> anyhow::Result<()> {
    tls::install_crypto_provider();
    let dir = std::env::temp_dir().join(format!("ocmesh-bench-catchup-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let result = measure(&b, &dir).await;
    let _ = std::fs::remove_dir_all(&dir);
    result
}

/// What the mesh run measured.
struct CatchUp {
    elapsed: Duration,
    wire_bytes: u64,
    packets_lost: u64,
    body_bytes: u64,
    peak_rss: u64,
}

async fn measure(b: &CatchUpBench, dir: &Path) -> anyhow::Result<()> {
    let ca_dir = dir.join("ca");
    ca::init_ca(&ca_dir)?;
    let a_files = ca::issue_site_cert(&ca_dir, "a")?;
    let b_files = ca::issue_site_cert(&ca_dir, "b")?;
    let identity = tls::load_identity(&ca_dir.join("ca.pem"), &a_files.cert, &a_files.key)?;
    let node = Node::open(NodeConfig {
        data_dir: dir.join("a"),
        site: "a".into(),
        admin_password: Some("bench".into()),
    })
    .context("opening site a")?
    .node;

    let t = Instant::now();
    let body_bytes = fill(&node, b.changes, b.payload).await?;
    let fill_time = t.elapsed();
    println!(
        "filled a with {} changes in {:.1} s ({:.0} changes/s, {:.0} payload bytes per change)",
        b.changes,
        fill_time.as_secs_f64(),
        b.changes as f64 / fill_time.as_secs_f64().max(1e-9),
        body_bytes as f64 / b.changes.max(1) as f64,
    );

    let mesh = Mesh::start(
        node.clone(),
        &identity,
        MeshConfig {
            listen: "127.0.0.1:0".parse()?,
            peers: Vec::new(),
            session: Default::default(),
            sharing: Default::default(),
            tap: None,
        },
    )?;
    let mesh_result = catch_up(&mesh, &ca_dir, &b_files, dir, b.changes, body_bytes).await;
    mesh.shutdown().await;
    let mesh_run = mesh_result?;
    let (raw, raw_wire) = raw_quinn(&ca_dir, &a_files, &b_files, b.changes, b.payload).await?;

    let rate = b.changes as f64 / mesh_run.elapsed.as_secs_f64().max(1e-9);
    let raw_rate = b.changes as f64 / raw.as_secs_f64().max(1e-9);
    let payload_bytes = b.changes * b.payload as u64;
    println!(
        "catch-up of {} changes: {:.1} s, {:.0} changes/s applied durably at b",
        b.changes,
        mesh_run.elapsed.as_secs_f64(),
        rate
    );
    println!(
        "  wire bytes {} ({} packets lost and resent): {:.3} per payload byte",
        mesh_run.wire_bytes,
        mesh_run.packets_lost,
        mesh_run.wire_bytes as f64 / mesh_run.body_bytes.max(1) as f64,
    );
    println!(
        "  peak RSS of b: {:.1} MiB",
        mesh_run.peak_rss as f64 / (1 << 20) as f64
    );
    println!(
        "raw quinn stream, same payload bytes between two processes: {:.2} s, {:.0} payloads/s",
        raw.as_secs_f64(),
        raw_rate
    );
    println!(
        "  raw wire bytes {} ({} packets lost): {:.3} per payload byte",
        raw_wire.udp_tx.bytes + raw_wire.udp_rx.bytes,
        raw_wire.path.lost_packets,
        (raw_wire.udp_tx.bytes + raw_wire.udp_rx.bytes) as f64 / payload_bytes.max(1) as f64
    );
    println!("ratio ocmesh / raw quinn: {:.3}", rate / raw_rate.max(1e-9));
    Ok(())
}

/// Writes `changes` documents whose bodies (the document version as the
/// change carries it, metadata and `_acl` included) are `body` bytes each,
/// padded with random text; returns the total size of the bodies.
async fn fill(node: &Node, changes: u64, body: usize) -> anyhow::Result<u64> {
    let who = bench_principal();
    let doc = |text: String| {
        let mut doc = Map::new();
        doc.insert("p".into(), Value::String(text));
        doc
    };
    // The first document measures what the metadata costs.
    let probe = node.insert_many(COLLECTION, vec![doc(String::new())], &who).await?;
    let overhead = probe
        .first()
        .map(|d| serde_json::to_vec(d).map(|v| v.len()))
        .transpose()?
        .unwrap_or(0);
    let mut body_bytes = overhead as u64;
    let text_len = body.saturating_sub(overhead);
    let mut rng = rand::rng();
    let mut raw = vec![0u8; text_len.div_ceil(2)];
    let mut written = 1u64;
    while written < changes {
        let n = FILL_BATCH.min(changes - written);
        let docs: Vec<Map<String, Value>> = (0..n)
            .map(|_| {
                rng.fill_bytes(&mut raw);
                let mut text = hex::encode(&raw);
                text.truncate(text_len);
                doc(text)
            })
            .collect();
        let inserted = node.insert_many(COLLECTION, docs, &who).await?;
        for d in &inserted {
            body_bytes += serde_json::to_vec(d)?.len() as u64;
        }
        written += n;
    }
    Ok(body_bytes)
}

/// A child process killed (and reaped) when dropped, so a failed bench
/// leaves nothing running.
struct Reaped(Child);

impl Drop for Reaped {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A free TCP port on loopback (bound and released).
fn free_tcp() -> anyhow::Result<SocketAddr> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?)
}

/// Peak resident set of a process, from /proc (bytes).
fn peak_rss(pid: u32) -> anyhow::Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let kib = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .context("no VmHWM in /proc status")?;
    Ok(kib * 1024)
}

async fn catch_up(
    mesh: &Mesh,
    ca_dir: &Path,
    b_files: &ca::SiteFiles,
    dir: &Path,
    changes: u64,
    body_bytes: u64,
) -> anyhow::Result<CatchUp> {
    let exe = std::env::current_exe()?;
    let a_addr = mesh.local_addr()?;
    let started = Instant::now();
    let mut child = Command::new(exe)
        .arg("run")
        .arg("--data")
        .arg(dir.join("b"))
        .args(["--http", &free_tcp()?.to_string(), "--grpc", &free_tcp()?.to_string()])
        .args(["--mesh", "127.0.0.1:0", "--peer", &a_addr.to_string()])
        .arg("--ca")
        .arg(ca_dir.join("ca.pem"))
        .arg("--cert")
        .arg(&b_files.cert)
        .arg("--key")
        .arg(&b_files.key)
        .env("OCMESH_ADMIN_PASSWORD", "bench")
        .env("OCMESH_LOG", "warn")
        .stdout(Stdio::null())
        .spawn()
        .map(Reaped)
        .context("starting site b")?;
    let pid = child.0.id();
    let peers = mesh.peers();
    let result = loop {
        let done = peers
            .snapshot()
            .into_iter()
            .find(|p| p.site.as_deref() == Some("b") && p.connected && p.unacked == 0 && p.changes_sent >= changes);
        if let Some(p) = done {
            break Ok(CatchUp {
                elapsed: started.elapsed(),
                wire_bytes: p.wire_bytes_sent + p.wire_bytes_received,
                packets_lost: p.wire_packets_lost,
                body_bytes,
                peak_rss: peak_rss(pid)?,
            });
        }
        if let Some(status) = child.0.try_wait()? {
            break Err(anyhow::anyhow!("site b exited early: {status}"));
        }
        if started.elapsed() > PATIENCE {
            break Err(anyhow::anyhow!(
                "site b did not catch up within {} s: {:?}",
                PATIENCE.as_secs(),
                peers.snapshot()
            ));
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    drop(child);
    result
}

/// Moves `changes * payload` bytes over one quinn stream from this process
/// to a `raw-sink` child; returns the time from opening the stream to the
/// sink's confirmation that it read everything, and the connection's
/// counters.
async fn raw_quinn(
    ca_dir: &Path,
    a_files: &ca::SiteFiles,
    b_files: &ca::SiteFiles,
    changes: u64,
    payload: usize,
) -> anyhow::Result<(Duration, quinn::ConnectionStats)> {
    let exe = std::env::current_exe()?;
    let mut child = Command::new(exe)
        .args(["bench", "raw-sink", "--ca"])
        .arg(ca_dir.join("ca.pem"))
        .arg("--cert")
        .arg(&b_files.cert)
        .arg("--key")
        .arg(&b_files.key)
        .stdout(Stdio::piped())
        .spawn()
        .map(Reaped)
        .context("starting the raw sink")?;
    let stdout = child.0.stdout.take().context("raw sink has no stdout")?;
    let line = tokio::task::spawn_blocking(move || {
        let mut line = String::new();
        BufReader::new(stdout).read_line(&mut line).map(|_| line)
    })
    .await??;
    let sink: SocketAddr = line
        .trim()
        .parse()
        .with_context(|| format!("raw sink printed {line:?}, not an address"))?;

    let identity = tls::load_identity(&ca_dir.join("ca.pem"), &a_files.cert, &a_files.key)?;
    let mut endpoint = quinn::Endpoint::new(
        quinn::EndpointConfig::default(),
        None,
        bind_udp("127.0.0.1:0".parse()?)?,
        std::sync::Arc::new(quinn::TokioRuntime),
    )?;
    endpoint.set_default_client_config(tls::client_config(&identity)?);
    let conn = endpoint.connect(sink, tls::SERVER_NAME)?.await?;
    let mut block = vec![0u8; payload];
    rand::rng().fill_bytes(&mut block);
    let started = Instant::now();
    let (mut send, mut recv) = conn.open_bi().await?;
    for _ in 0..changes {
        send.write_all(&block).await?;
    }
    send.finish()?;
    let confirm = recv.read_to_end(16).await?;
    let elapsed = started.elapsed();
    let got = u64::from_le_bytes(
        confirm
            .get(..8)
            .and_then(|b| b.try_into().ok())
            .context("raw sink's confirmation is short")?,
    );
    if got != changes * payload as u64 {
        bail!("raw sink read {got} bytes, {} were sent", changes * payload as u64);
    }
    let stats = conn.stats();
    conn.close(0u32.into(), b"done");
    endpoint.wait_idle().await;
    drop(child);
    Ok((elapsed, stats))
}

/// The raw baseline's receiver: prints its address, reads one stream to its
/// end and answers with the byte count.
pub async fn raw_sink(s: RawSink) -> anyhow::Result<()> {
    tls::install_crypto_provider();
    let identity = tls::load_identity(&s.ca, &s.cert, &s.key)?;
    let endpoint = quinn::Endpoint::new(
        quinn::EndpointConfig::default(),
        Some(tls::server_config(&identity)?),
        bind_udp("127.0.0.1:0".parse()?)?,
        std::sync::Arc::new(quinn::TokioRuntime),
    )?;
    println!("{}", endpoint.local_addr()?);
    let incoming = endpoint.accept().await.context("endpoint closed")?;
    let conn = incoming.await?;
    let (mut send, mut recv) = conn.accept_bi().await?;
    let mut total = 0u64;
    let mut buf = vec![0u8; 64 * 1024];
    while let Some(n) = recv.read(&mut buf).await? {
        total += n as u64;
    }
    send.write_all(&total.to_le_bytes()).await?;
    send.finish()?;
    let _ = tokio::time::timeout(Duration::from_secs(5), conn.closed()).await;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn peak_rss_of_this_process_is_read() -> anyhow::Result<()> {
        let rss = peak_rss(std::process::id())?;
        assert!(rss > 1 << 20, "implausible peak RSS {rss}");
        Ok(())
    }
}
