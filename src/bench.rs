//! `ocmesh bench`: throughput and latency figures measured in one run.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context;
use serde_json::{Map, Value, json};

use ocmesh_node::{Node, NodeConfig, Principal};

/// Settings of `ocmesh bench workitems`.
#[derive(clap::Args, Debug, Clone)]
pub struct WorkItemBench {
    /// Items to run through the full cycle.
    #[arg(long, default_value_t = 20_000)]
    pub items: u64,
    /// Concurrent pushers, and as many concurrent poppers.
    #[arg(long, default_value_t = 16)]
    pub workers: u64,
    /// Payload bytes per item.
    #[arg(long, default_value_t = 1024)]
    pub payload: usize,
    /// Deepest queue to measure pop latency on (also measured at 1,000).
    #[arg(long, default_value_t = 1_000_000)]
    pub depth: u64,
    /// Also run the same cycle against this RabbitMQ broker (amqp://...).
    #[arg(long)]
    pub against: Option<String>,
}

/// Throughput and per-item latency (push start to completion acknowledged).
#[derive(Debug)]
pub struct Figures {
    pub items: u64,
    pub elapsed: Duration,
    pub p50: Duration,
    pub p99: Duration,
}

impl Figures {
    pub fn rate(&self) -> f64 {
        self.items as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }

    pub(crate) fn from_latencies(mut lat: Vec<Duration>, elapsed: Duration) -> Figures {
        lat.sort();
        let pick = |q: f64| {
            lat.get(((lat.len() as f64 - 1.0) * q).round() as usize)
                .copied()
                .unwrap_or_default()
        };
        Figures {
            items: lat.len() as u64,
            elapsed,
            p50: pick(0.5),
            p99: pick(0.99),
        }
    }
}

impl std::fmt::Display for Figures {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} items in {:.2} s: {:.0} items/s, latency p50 {:.2} ms, p99 {:.2} ms",
            self.items,
            self.elapsed.as_secs_f64(),
            self.rate(),
            self.p50.as_secs_f64() * 1e3,
            self.p99.as_secs_f64() * 1e3
        )
    }
}

pub(crate) fn bench_principal() -> Principal {
    Principal {
        roles: vec![ocmesh_node::acl::ADMINS_ROLE_ID.into()],
        id: "000000000000000000000001".into(),
        name: "bench".into(),
    }
}

/// A fresh node in a temporary directory, removed on drop.
pub(crate) struct TempNode {
    pub(crate) node: Node,
    dir: std::path::PathBuf,
}

impl Drop for TempNode {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn temp_node(tag: &str) -> anyhow::Result<TempNode> {
    temp_node_with(tag, "bench")
}

/// `temp_node` whose admin signs in with `admin_password`.
pub(crate) fn temp_node_with(tag: &str, admin_password: &str) -> anyhow::Result<TempNode> {
    let dir = std::env::temp_dir().join(format!("ocmesh-bench-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let opened = Node::open(NodeConfig {
        data_dir: dir.clone(),
        site: "bench".into(),
        admin_password: Some(admin_password.into()),
    })
    .with_context(|| format!("opening a bench node in {}", dir.display()))?;
    Ok(TempNode { node: opened.node, dir })
}

/// Push, pop, complete through the node's API, every step durable.
pub async fn workitems_ocmesh(b: &WorkItemBench) -> anyhow::Result<Figures> {
    let tmp = temp_node("workitems")?;
    let node = tmp.node.clone();
    let who = bench_principal();
    node.add_queue(json!({"name": "bench"}).as_object().cloned().unwrap_or_default(), &who)
        .await?;
    let payload = "x".repeat(b.payload);
    let pushed = Arc::new(AtomicU64::new(0));
    let done = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let mut pushers = Vec::new();
    for _ in 0..b.workers {
        let (node, who, pushed, payload, total) = (node.clone(), who.clone(), pushed.clone(), payload.clone(), b.items);
        pushers.push(tokio::spawn(async move {
            while pushed.fetch_add(1, Ordering::Relaxed) < total {
                let sent_at = started.elapsed().as_nanos() as u64;
                let mut item = Map::new();
                item.insert("payload".into(), json!({"data": payload, "sent_at": sent_at}));
                node.push_workitems("bench", vec![item], &who).await?;
            }
            anyhow::Ok(())
        }));
    }
    let mut poppers = Vec::new();
    for _ in 0..b.workers {
        let (node, who, done, total) = (node.clone(), who.clone(), done.clone(), b.items);
        poppers.push(tokio::spawn(async move {
            let mut lat = Vec::new();
            while done.load(Ordering::Relaxed) < total {
                let Some(item) = node
                    .pop_workitem("bench", &who, Some(Duration::from_millis(100)))
                    .await?
                else {
                    continue;
                };
                let id = item["_id"].as_str().unwrap_or_default().to_owned();
                node.update_workitem(&id, "successful", None, None, None, &who).await?;
                let sent_at = item["payload"]["sent_at"].as_u64().unwrap_or(0);
                lat.push(started.elapsed().saturating_sub(Duration::from_nanos(sent_at)));
                done.fetch_add(1, Ordering::Relaxed);
            }
            anyhow::Ok(lat)
        }));
    }
    for p in pushers {
        p.await??;
    }
    // The cycle has two phases: pushers and poppers together, then
    // poppers alone draining the queue (latency-bound: 16 callers, two
    // durable round trips per item). Their figures differ, so both show.
    let (pushed_at, done_then, at_push_end) = (
        started.elapsed(),
        done.load(Ordering::Relaxed),
        Stages::of(node.stats()),
    );
    let mut lat = Vec::new();
    for p in poppers {
        lat.extend(p.await??);
    }
    let elapsed = started.elapsed();
    let stats = node.stats();
    let (writes, commits) = (
        stats.writes.load(Ordering::Relaxed),
        stats.commits.load(Ordering::Relaxed),
    );
    println!(
        "  ocmesh store: {writes} writes in {commits} commits ({:.1} per commit, {} durable checkpoints); writer busy {:.0} ms applying, {:.0} ms committing; {} log syncs took {:.0} ms (beside the writer)",
        writes as f64 / commits.max(1) as f64,
        stats.checkpoints.load(Ordering::Relaxed),
        stats.apply_nanos.load(Ordering::Relaxed) as f64 / 1e6,
        stats.commit_nanos.load(Ordering::Relaxed) as f64 / 1e6,
        stats.wal_syncs.load(Ordering::Relaxed),
        stats.wal_nanos.load(Ordering::Relaxed) as f64 / 1e6
    );
    let at_end = Stages::of(stats);
    println!("  per acknowledged write: {}", at_end.since(&Stages::default()));
    println!(
        "  while pushing ({:.2} s, {done_then} items done): {}",
        pushed_at.as_secs_f64(),
        at_push_end.since(&Stages::default())
    );
    println!(
        "  after the pushers ({:.2} s): {}",
        (elapsed - pushed_at).as_secs_f64(),
        at_end.since(&at_push_end)
    );
    Ok(Figures::from_latencies(lat, elapsed))
}

/// The node's sums of where its acknowledged writes spent their time (see
/// `NodeStats`), read at one moment.
#[derive(Default)]
struct Stages {
    answered: u64,
    until_logged: u64,
    until_synced: u64,
    until_answered: u64,
    round_trips: u64,
    round_trip: u64,
    syncs: u64,
}

impl Stages {
    fn of(s: &ocmesh_node::NodeStats) -> Stages {
        let n = |a: &AtomicU64| a.load(Ordering::Relaxed);
        Stages {
            answered: n(&s.answered),
            until_logged: n(&s.until_logged_nanos),
            until_synced: n(&s.until_synced_nanos),
            until_answered: n(&s.until_answered_nanos),
            round_trips: n(&s.round_trips),
            round_trip: n(&s.round_trip_nanos),
            syncs: n(&s.wal_syncs),
        }
    }

    /// What happened between `before` and `self`, per write.
    fn since(&self, before: &Stages) -> String {
        let answered = self.answered.saturating_sub(before.answered).max(1) as f64;
        let us = |now: u64, then: u64| now.saturating_sub(then) as f64 / 1e3 / answered;
        let round_trips = self.round_trips.saturating_sub(before.round_trips).max(1) as f64;
        format!(
            "{:.0} µs until its log record was written (waiting for the writer, then its group), {:.0} µs more until synced, {:.0} µs more until answered; {:.0} µs round trip at the caller; {:.1} writes per log sync",
            us(self.until_logged, before.until_logged),
            us(self.until_synced, before.until_synced),
            us(self.until_answered, before.until_answered),
            self.round_trip.saturating_sub(before.round_trip) as f64 / 1e3 / round_trips,
            answered / self.syncs.saturating_sub(before.syncs).max(1) as f64,
        )
    }
}

/// Pop latency on a queue holding `depth` items: it must not grow with depth.
pub async fn pop_latency_at_depth(depth: u64) -> anyhow::Result<Duration> {
    let tmp = temp_node("depth")?;
    let node = tmp.node.clone();
    let who = bench_principal();
    node.add_queue(json!({"name": "deep"}).as_object().cloned().unwrap_or_default(), &who)
        .await?;
    let mut left = depth;
    while left > 0 {
        let n = left.min(5_000);
        let items: Vec<Map<String, Value>> = (0..n)
            .map(|i| json!({"payload": {"i": i}}).as_object().cloned().unwrap_or_default())
            .collect();
        node.push_workitems("deep", items, &who).await?;
        left -= n;
    }
    let mut lat = Vec::new();
    for _ in 0..depth.clamp(1, 200) {
        let t = Instant::now();
        node.pop_workitem("deep", &who, None).await?.context("queue ran dry")?;
        lat.push(t.elapsed());
    }
    lat.sort();
    Ok(lat[lat.len() / 2])
}

pub async fn run_workitems(b: WorkItemBench) -> anyhow::Result<()> {
    println!(
        "work-item cycle (push, pop, complete; {} B payload; {} pushers + {} poppers)",
        b.payload, b.workers, b.workers
    );
    let ours = workitems_ocmesh(&b).await?;
    println!("  ocmesh:   {ours}");
    if let Some(url) = &b.against {
        let theirs = crate::amqp_bench::workitems_rabbitmq(&b, url).await?;
        println!("  rabbitmq: {theirs}");
        println!("  ratio ocmesh/rabbitmq: {:.2}", ours.rate() / theirs.rate().max(1e-9));
    }
    for depth in [1_000u64.min(b.depth), b.depth] {
        let p50 = pop_latency_at_depth(depth).await?;
        println!("  pop p50 with {depth} items queued: {:.3} ms", p50.as_secs_f64() * 1e3);
    }
    Ok(())
}
