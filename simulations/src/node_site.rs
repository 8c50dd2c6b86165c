//! A simulated site that is the node itself: `ocmesh_node::Node` over an
//! in-memory disk (`MemDisk`), its wall clock the simulator's virtual time
//! plus the site's skew, its ids seeded from the run's seed.
//!
//! Local actions go through the node's public API as a client's would:
//! inserts, field updates (`$set`) of documents every site shares, deletes,
//! pushes onto another site's work-item queue (a handover), pops and
//! completions at the owner, and now and then an operator's takeover.
//! Sync sessions read the node's change log (`read_changes`) and apply
//! through its peer path (`apply`), as `federation/src/mesh.rs` does.
//! A crash cuts the disk's power (unsynced bytes are lost) and drops the
//! node; a restart opens a new node from what the disk kept.
//!
//! The node's writer thread stays, but every call blocks until the writer
//! answered and the engine makes one call at a time, so the run is as
//! deterministic as the model's; the lease thread is off (the site's Work
//! event expires leases in virtual time).

use std::collections::{BTreeMap, BTreeSet};
use std::hash::Hasher;
use std::sync::Arc;

use rand::Rng;
use serde_json::{Map, Value, json};

use ocmesh_node::workitems::{EPOCH_FIELD, ITEMS, OWNER_FIELD, WorkItemError};
use ocmesh_node::{ManualClock, MemDisk, Node, NodeConfig, OpenOptions, Principal, WriteError};
use ocmesh_replication::{Change, FetchRequest, VersionVector};

use crate::replica::Fnv64;
use crate::scenario::Scenario;
use crate::site::{Applied, Ctx, Journal, SimSite, SiteEvent};

/// Most items a site pops in one look at its queue.
const POPS_PER_LOOK: usize = 4;
/// Processing time of a popped item, drawn from this range (virtual ms).
const WORK_MS: [u64; 2] = [20, 400];

fn operator() -> Principal {
    Principal {
        id: "0".repeat(24),
        name: "sim".into(),
        roles: vec![ocmesh_node::acl::ADMINS_ROLE_ID.into()],
    }
}

/// The queue site `name` serves.
fn queue_of(name: &str) -> String {
    format!("q-{name}")
}

/// One site: its disk, clock and (while up) its node.
pub struct NodeSite {
    name: String,
    disk: MemDisk,
    clock: ManualClock,
    node: Option<Node>,
    rt: tokio::runtime::Runtime,
    seed: u64,
    index: usize,
    /// Restarts so far: a worker's pending completion dies with its run.
    incarnation: u64,
    /// The latest Work event scheduled (older ones are stale).
    work_token: u64,
    work_pending: bool,
    /// Items popped by this run's worker and not yet finished.
    in_hand: BTreeSet<String>,
}

impl std::fmt::Debug for NodeSite {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NodeSite")
            .field("name", &self.name)
            .field("up", &self.node.is_some())
            .field("incarnation", &self.incarnation)
            .finish_non_exhaustive()
    }
}

fn obj(v: Value) -> Map<String, Value> {
    match v {
        Value::Object(m) => m,
        _ => Map::new(),
    }
}

/// JSON with object keys sorted at every level: two sites that hold the
/// same document may have built its fields in another order.
fn canonical(v: &Value, out: &mut String) {
    match v {
        Value::Object(m) => {
            let sorted: BTreeMap<&String, &Value> = m.iter().collect();
            out.push('{');
            for (i, (k, v)) in sorted.into_iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                out.push_str(&Value::String(k.clone()).to_string());
                out.push(':');
                canonical(v, out);
            }
            out.push('}');
        }
        Value::Array(a) => {
            out.push('[');
            for (i, v) in a.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                canonical(v, out);
            }
            out.push(']');
        }
        other => out.push_str(&other.to_string()),
    }
}

impl NodeSite {
    fn node(&self) -> Result<&Node, String> {
        self.node.as_ref().ok_or_else(|| format!("{} is down", self.name))
    }

    fn open(&mut self, physical: u64) -> Result<(), String> {
        self.clock.set(physical);
        let id_seed = self
            .seed
            .wrapping_mul(0x9e37_79b9_7f4a_7c15)
            .wrapping_add((self.index as u64) << 32)
            .wrapping_add(self.incarnation);
        let opened = Node::open_with(
            NodeConfig {
                data_dir: "memory".into(),
                site: self.name.clone(),
                admin_password: None,
            },
            OpenOptions::simulated(self.disk.clone(), Arc::new(self.clock.clone()), id_seed),
        )
        .map_err(|e| e.to_string())?;
        self.node = Some(opened.node);
        Ok(())
    }

    /// Runs one node call to completion.
    fn call<T>(&self, f: impl std::future::Future<Output = T>) -> T {
        self.rt.block_on(f)
    }

    /// Records this site's changes made since `before` as acknowledged.
    fn ack_since(&self, before: u64, journal: &mut Journal) -> Result<(), String> {
        let now = self.node()?.version_vector().get(&self.name);
        journal
            .acked
            .extend((before + 1..=now).map(|seq| (self.name.clone(), seq)));
        if now > before {
            journal.writes += 1;
        }
        Ok(())
    }

    fn schedule_work(&mut self, delay: u64, ctx: &mut Ctx<'_>) {
        self.work_token += 1;
        self.work_pending = true;
        ctx.later.push((delay, SiteEvent::Work { token: self.work_token }));
    }

    /// A write to one of the shared documents: insert it if absent here,
    /// else set a field (several sites update one document), or delete it.
    fn write_document(&mut self, ctx: &mut Ctx<'_>) -> Result<(), String> {
        let doc = ctx.rng.random_range(0..ctx.scenario.documents);
        let delete = ctx.rng.random_bool(ctx.scenario.delete_ratio);
        let field = format!("f{}", ctx.rng.random_range(0..4u32));
        let id = format!("{doc:024x}");
        let n = ctx.journal.writes;
        let node = self.node()?;
        let exists = node.get("entities", &id).is_ok();
        let by = operator();
        let r = match (exists, delete) {
            (false, true) => return Ok(()),
            (false, false) => {
                let mut doc = obj(json!({"_id": id, "by": self.name}));
                doc.insert(field, n.into());
                self.call(node.insert("entities", doc, &by))
            }
            (true, true) => self.call(node.delete("entities", &id, &by)),
            (true, false) => {
                let mut set = obj(json!({"by": self.name}));
                set.insert(field, n.into());
                self.call(node.update("entities", &id, json!({ "$set": set }), &by))
            }
        };
        match r {
            Ok(_) => Ok(()),
            // A clear refusal, as the node answers a client: a peer stamped
            // the document beyond the drift bound (counted, not an anomaly).
            Err(WriteError::ClockBehind { .. }) => {
                ctx.journal.clock_refused += 1;
                Ok(())
            }
            Err(e) => Err(format!("write to {id} refused: {e}")),
        }
    }

    /// Pushes an item onto a random site's queue (that site will own it).
    fn push(&mut self, ctx: &mut Ctx<'_>) -> Result<(), String> {
        let target = ctx.sites[ctx.rng.random_range(0..ctx.sites.len())].clone();
        let n = ctx.journal.writes;
        let node = self.node()?;
        let item = obj(json!({"payload": {"n": n, "from": self.name}}));
        match self.call(node.push_workitems(&queue_of(&target), vec![item], &operator())) {
            Ok(docs) => {
                for d in docs {
                    if let Some(id) = d.get("_id").and_then(Value::as_str) {
                        ctx.journal.pushed.insert(id.to_owned());
                    }
                }
                if target == self.name && !self.work_pending {
                    self.schedule_work(0, ctx);
                }
                Ok(())
            }
            // That site's queue has not reached us yet.
            Err(WriteError::WorkItem(WorkItemError::NoQueue(_))) => Ok(()),
            Err(e) => Err(format!("push refused: {e}")),
        }
    }

    /// Items another site owns that are still to do, as seen here.
    fn foreign_open_items(&self) -> Result<Vec<String>, String> {
        let node = self.node()?;
        let filter = ocmesh_node::query::Filter::parse(&json!({"state": {"$in": ["new", "processing"]}}))
            .map_err(|e| e.to_string())?;
        let q = ocmesh_node::query::Query {
            filter,
            ..Default::default()
        };
        let items = node.query(ITEMS, &q).map_err(|e| e.to_string())?;
        Ok(items
            .iter()
            .filter(|d| d.get(OWNER_FIELD).and_then(Value::as_str) != Some(self.name.as_str()))
            .filter_map(|d| d.get("_id").and_then(Value::as_str).map(str::to_owned))
            .collect())
    }

    /// An operator moves an item whose owner seems out of reach here.
    fn takeover(&mut self, ctx: &mut Ctx<'_>) -> Result<(), String> {
        let candidates = self.foreign_open_items()?;
        if candidates.is_empty() {
            return Ok(());
        }
        let id = candidates[ctx.rng.random_range(0..candidates.len())].clone();
        let node = self.node()?;
        match self.call(node.takeover_workitem(&id, &operator())) {
            Ok(_) => {
                ctx.journal.takeovers.insert(id);
                if !self.work_pending {
                    self.schedule_work(0, ctx);
                }
                Ok(())
            }
            Err(e) => Err(format!("takeover of {id} refused: {e}")),
        }
    }

    /// Items this site owns that are not finished.
    fn own_open_items(&self) -> Result<u64, String> {
        let node = self.node()?;
        let filter = ocmesh_node::query::Filter::parse(
            &json!({OWNER_FIELD: self.name, "state": {"$in": ["new", "processing"]}}),
        )
        .map_err(|e| e.to_string())?;
        node.count(ITEMS, &filter).map_err(|e| e.to_string())
    }

    /// A look at this site's queue: leases that ran out come back, then
    /// up to `POPS_PER_LOOK` items are popped and handed to a worker.
    fn work(&mut self, ctx: &mut Ctx<'_>) -> Result<(), String> {
        self.work_pending = false;
        let node = self.node()?.clone();
        self.call(node.expire_leases())
            .map_err(|e| format!("lease expiry failed: {e}"))?;
        // Our own queue, and every other: an item taken over here keeps
        // its queue, and is popped here from that queue.
        let queues: Vec<String> = ctx.sites.iter().map(|s| queue_of(s)).collect();
        let mut popped = 0;
        for queue in &queues {
            for _ in 0..POPS_PER_LOOK {
                let item = match self.call(node.pop_workitem(queue, &operator(), None)) {
                    Ok(Some(item)) => item,
                    Ok(None) | Err(WriteError::WorkItem(WorkItemError::NoQueue(_))) => break,
                    Err(e) => return Err(format!("pop failed: {e}")),
                };
                self.popped(item, ctx);
                popped += 1;
            }
        }
        if popped > 0 {
            self.schedule_work(WORK_MS[1], ctx);
        } else if self.own_open_items()? > 0 || !self.in_hand.is_empty() {
            // Items due later (nextrun ahead of our clock) or leases to run out.
            self.schedule_work(ctx.scenario.lease_ms / 2, ctx);
        }
        Ok(())
    }

    /// Hands a popped item to a worker.
    fn popped(&mut self, item: Value, ctx: &mut Ctx<'_>) {
        {
            let id = item.get("_id").and_then(Value::as_str).unwrap_or_default().to_owned();
            let epoch = item.get(EPOCH_FIELD).and_then(Value::as_u64).unwrap_or(0);
            let owner = item
                .get(OWNER_FIELD)
                .and_then(Value::as_str)
                .unwrap_or_default()
                .to_owned();
            ctx.journal
                .pops
                .entry((id.clone(), epoch, owner))
                .or_default()
                .insert(self.name.clone());
            let delay = ctx.rng.random_range(WORK_MS[0]..=WORK_MS[1]);
            self.in_hand.insert(id.clone());
            ctx.later.push((
                delay,
                SiteEvent::Complete {
                    item: id,
                    epoch,
                    incarnation: self.incarnation,
                },
            ));
        }
    }

    fn complete(&mut self, item: String, epoch: u64, ctx: &mut Ctx<'_>) -> Result<(), String> {
        self.in_hand.remove(&item);
        let node = self.node()?;
        match self.call(node.update_workitem(&item, "successful", None, None, None, &operator())) {
            Ok(_) => {
                ctx.journal
                    .completions
                    .entry(item)
                    .or_default()
                    .push((self.name.clone(), epoch));
                Ok(())
            }
            // Taken over by another site meanwhile: its result no longer counts.
            Err(WriteError::WorkItem(WorkItemError::NotOwner { .. })) => Ok(()),
            Err(e) => Err(format!("completing {item} refused: {e}")),
        }
    }

    /// Every document this site has history for.
    fn documents(&self) -> Result<BTreeSet<(String, String)>, String> {
        let node = self.node()?;
        let all = node
            .read_changes(&FetchRequest {
                after: VersionVector::new(),
                max_changes: usize::MAX,
                max_bytes: usize::MAX,
            })
            .map_err(|e| e.to_string())?;
        Ok(all.into_iter().map(|c| (c.collection, c.doc_id)).collect())
    }

    /// A document's versions and current state, canonical JSON, one per line.
    fn document_text(&self, collection: &str, id: &str) -> Result<String, String> {
        let node = self.node()?;
        let mut text = String::new();
        for v in node.versions(collection, id).map_err(|e| e.to_string())? {
            canonical(&v, &mut text);
            text.push('\n');
        }
        text.push_str("current: ");
        match node.get(collection, id) {
            Ok(current) => canonical(&current, &mut text),
            Err(_) => text.push_str("absent"),
        }
        Ok(text)
    }

    fn history_len(&self, collection: &str, id: &str) -> usize {
        self.node
            .as_ref()
            .and_then(|n| n.versions(collection, id).ok())
            .map_or(0, |v| v.len())
    }

    fn item_state(&self, id: &str) -> Option<String> {
        let doc = self.node.as_ref()?.get(ITEMS, id).ok()?;
        doc.get("state").and_then(Value::as_str).map(str::to_owned)
    }
}

impl SimSite for NodeSite {
    fn create(scenario: &Scenario, index: usize, seed: u64, physical: u64) -> Result<Self, String> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .map_err(|e| e.to_string())?;
        let mut site = NodeSite {
            name: scenario.sites[index].name.clone(),
            disk: MemDisk::new(),
            clock: ManualClock::new(physical),
            node: None,
            rt,
            seed,
            index,
            incarnation: 0,
            work_token: 0,
            work_pending: false,
            in_hand: BTreeSet::new(),
        };
        site.open(physical)?;
        // Each site serves one queue; every site pushes onto any of them.
        let queue = obj(json!({
            "name": queue_of(&site.name),
            "sites": [site.name],
            "leasetime": scenario.lease_ms / 1000,
            "maxretries": 1_000_000,
        }));
        let node = site.node()?;
        site.call(node.add_queue(queue, &operator()))
            .map_err(|e| format!("cannot create its queue: {e}"))?;
        // The workload looks up open items often: an index on `state`
        // keeps that from reading every item.
        site.call(node.create_index(ITEMS, "state"))
            .map_err(|e| format!("cannot index work items: {e}"))?;
        Ok(site)
    }

    fn name(&self) -> &str {
        &self.name
    }

    fn vv(&self) -> VersionVector {
        self.node.as_ref().map(Node::version_vector).unwrap_or_default()
    }

    fn fetch(&mut self, req: &FetchRequest, physical: u64) -> Result<Vec<Change>, String> {
        self.clock.set(physical);
        self.node()?.read_changes(req).map_err(|e| e.to_string())
    }

    fn apply(&mut self, changes: Vec<Change>, physical: u64) -> Result<Applied, String> {
        self.clock.set(physical);
        let node = self.node()?;
        let r = self.call(node.apply(changes)).map_err(|e| e.to_string())?;
        Ok(Applied {
            fresh: r.applied,
            duplicates: r.duplicates,
            clock_clamped: r.clock_clamped,
        })
    }

    fn act(&mut self, ctx: &mut Ctx<'_>) -> Result<(), String> {
        self.clock.set(ctx.physical);
        let before = self.node()?.version_vector().get(&self.name);
        let r: f64 = ctx.rng.random();
        let (t, w) = (ctx.scenario.takeover_ratio, ctx.scenario.workitem_ratio);
        let done = if r < t {
            self.takeover(ctx)
        } else if r < t + w {
            self.push(ctx)
        } else {
            self.write_document(ctx)
        };
        self.ack_since(before, ctx.journal)?;
        done
    }

    fn event(&mut self, event: SiteEvent, ctx: &mut Ctx<'_>) -> Result<(), String> {
        self.clock.set(ctx.physical);
        let before = self.node()?.version_vector().get(&self.name);
        let done = match event {
            SiteEvent::Work { token } if token == self.work_token => self.work(ctx),
            SiteEvent::Work { .. } => Ok(()),
            SiteEvent::Complete {
                item,
                epoch,
                incarnation,
            } => {
                if incarnation == self.incarnation {
                    self.complete(item, epoch, ctx)
                } else {
                    Ok(()) // the worker died with the crash; the lease brings the item back
                }
            }
        };
        // Pops and completions are acknowledged writes too.
        let now = self.node()?.version_vector().get(&self.name);
        ctx.journal
            .acked
            .extend((before + 1..=now).map(|seq| (self.name.clone(), seq)));
        done
    }

    fn received(&mut self, ctx: &mut Ctx<'_>) {
        if !self.work_pending && self.node.is_some() {
            self.schedule_work(1, ctx);
        }
    }

    fn crash(&mut self) {
        self.disk.crash();
        self.node = None;
        self.incarnation += 1;
        self.in_hand.clear();
        self.work_pending = false;
    }

    fn restart(&mut self, physical: u64) -> Result<(), String> {
        if self.node.is_some() {
            return Ok(());
        }
        self.open(physical)
    }

    fn digest(&self) -> Result<u64, String> {
        let mut h = Fnv64::default();
        for (collection, id) in self.documents()? {
            h.write(collection.as_bytes());
            h.write(id.as_bytes());
            h.write(self.document_text(&collection, &id)?.as_bytes());
        }
        Ok(h.finish())
    }

    fn check(sites: &[Self], journal: &Journal, anomalies: &mut Vec<String>) {
        check_nodes(sites, journal, anomalies);
    }
}

/// The invariants of a run on nodes; each broken one adds an anomaly.
///
/// - every site has the same state digest (each document's full history
///   and current state, read from the node);
/// - every acknowledged change is held everywhere;
/// - every site holds every version any site holds (history complete);
/// - every pushed work item ended `successful` everywhere, completed
///   exactly once, or more than once only if an operator took it over;
/// - no item was popped under one ownership claim (epoch, owner) anywhere
///   but at its owner.
pub fn check_nodes(sites: &[NodeSite], journal: &Journal, anomalies: &mut Vec<String>) {
    let Some(first) = sites.first() else { return };
    let digest = |s: &NodeSite| s.digest().unwrap_or(0);
    let first_digest = digest(first);
    let mut all: BTreeMap<(String, String), usize> = BTreeMap::new();
    for s in sites {
        match s.documents() {
            Ok(docs) => {
                for d in docs {
                    let n = s.history_len(&d.0, &d.1);
                    let e = all.entry(d).or_default();
                    *e = (*e).max(n);
                }
            }
            Err(e) => anomalies.push(format!("{} cannot be read: {e}", s.name)),
        }
    }
    for s in sites {
        if let Err(e) = s.digest() {
            anomalies.push(format!("replica {} cannot be digested: {e}", s.name));
        }
        if digest(s) != first_digest {
            // Name the first document that differs, with both versions of it.
            let differs = all.keys().find_map(|(c, id)| {
                let (x, y) = (first.document_text(c, id).ok()?, s.document_text(c, id).ok()?);
                (x != y).then(|| format!("{c}/{id}:\n{}:\n{x}\n{}:\n{y}", first.name, s.name))
            });
            anomalies.push(format!(
                "replica {} differs from {} (state digest); first difference: {}",
                s.name,
                first.name,
                differs.unwrap_or_default()
            ));
        }
        let vv = s.vv();
        let missing = journal.acked.iter().filter(|(o, seq)| vv.get(o) < *seq).count();
        if missing > 0 {
            anomalies.push(format!("replica {} lacks {missing} acknowledged writes", s.name));
        }
        let incomplete = all.iter().filter(|((c, id), n)| s.history_len(c, id) < **n).count();
        if incomplete > 0 {
            anomalies.push(format!("replica {} lacks versions of {incomplete} documents", s.name));
        }
        let unfinished = journal
            .pushed
            .iter()
            .filter(|id| s.item_state(id).as_deref() != Some("successful"))
            .count();
        if unfinished > 0 {
            anomalies.push(format!(
                "replica {} shows {unfinished} work items not completed",
                s.name
            ));
        }
    }
    for ((item, epoch, owner), poppers) in &journal.pops {
        // Only the claim's own site may pop under it, so one claim is
        // popped at one site at most.
        if poppers.iter().any(|p| p != owner) {
            anomalies.push(format!(
                "work item {item} popped at {poppers:?} under one epoch {epoch} claimed by {owner:?}"
            ));
        }
    }
    for item in &journal.pushed {
        let done = journal.completions.get(item).map_or(0, Vec::len);
        let taken = journal.takeovers.contains(item);
        if done == 0 {
            let seen: Vec<String> = sites
                .iter()
                .map(|s| {
                    let doc = s.node.as_ref().and_then(|n| n.get(ITEMS, item).ok());
                    let f = |k: &str| {
                        doc.as_ref()
                            .and_then(|d| d.get(k))
                            .map(Value::to_string)
                            .unwrap_or_default()
                    };
                    format!("{}: {} {}@{}", s.name, f("state"), f(OWNER_FIELD), f(EPOCH_FIELD))
                })
                .collect();
            let popped: Vec<_> = journal.pops.keys().filter(|(i, _, _)| i == item).collect();
            anomalies.push(format!(
                "work item {item} was never completed (taken over: {taken}; popped {popped:?}; {})",
                seen.join(", ")
            ));
        } else if done > 1 && !taken {
            anomalies.push(format!(
                "work item {item} completed {done} times with no takeover recorded"
            ));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn canonical_json_ignores_key_order_only() {
        let text = |v: Value| {
            let mut s = String::new();
            canonical(&v, &mut s);
            s
        };
        let a = json!({"b": 1, "a": {"y": [1, {"q": 2, "p": 3}], "x": "s"}});
        let b = json!({"a": {"x": "s", "y": [1, {"p": 3, "q": 2}]}, "b": 1});
        assert_eq!(text(a.clone()), text(b));
        assert_ne!(
            text(a),
            text(json!({"b": 1, "a": {"x": "s", "y": [{"p": 3, "q": 2}, 1]}}))
        );
    }

    #[test]
    fn a_crashed_site_restarts_from_its_disk_with_its_queue() {
        let s = Scenario::from_toml(
            r#"
            name = "one"
            workload_ms = 1_000
            max_ms = 10_000
            links = []
            [[sites]]
            name = "solo"
            write_interval_ms = [10, 20]
            "#,
        )
        .expect("valid");
        let mut site = NodeSite::create(&s, 0, 1, 1_700_000_000_000).expect("opens");
        let before = site.vv();
        assert!(before.get("solo") >= 1, "the queue definition is a change");
        site.crash();
        assert!(site.node().is_err(), "down after a crash");
        site.restart(1_700_000_005_000).expect("restarts");
        assert_eq!(site.vv(), before, "its queue definition was durable");
        assert!(site.node().expect("up").queue("q-solo").is_ok());
    }
}
