//! The real mesh (quinn, rustls, the session shell, real nodes on temporary
//! directories) for three sites inside turmoil, through the `AsyncUdpSocket`
//! adapter in `turmoil_udp`: links are partitioned, held and repaired while
//! every site writes, and afterwards all three must agree and hold every
//! acknowledged write. Fixed seeds; all timers run on turmoil's clock.
//!
//! What the writer thread does to simulated time: turmoil runs every host
//! on one thread, each a current-thread tokio runtime with a paused clock.
//! A node's writes are carried out by its own std thread (`ocmesh-writer`),
//! which tokio does not know about: a host that awaits a write looks idle,
//! so its clock auto-advances to the end of the tick, every tick, for as
//! long as the real fsync takes. Awaited that way a write cost hundreds of
//! virtual milliseconds, a session's batches took virtual seconds (the
//! first version of this test did not converge in 90 virtual seconds), and
//! runs of one seed differed. Tasks on tokio's blocking pool do stop the
//! auto-advance, so the mesh shell awaits `Node::apply` from
//! `spawn_blocking`, and the writers here run their writes through `held`:
//! virtual time then stands still while the store works. The checks depend
//! only on the final state, except the restart bound, which is far from
//! the values that occur (about 0.1-0.2 s; over 31 s without incarnations).

mod common;
mod turmoil_udp;

use std::collections::BTreeMap;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::{Value, json};
use turmoil::Sim;

use common::{admin, obj};
use ocmesh_federation::{Mesh, MeshConfig, ca, tls};
use ocmesh_node::{Node, NodeConfig, Principal};

const PORT: u16 = 7400;
const SITES: [&str; 3] = ["a", "b", "c"];
/// The document every site edits (a field each).
const SHARED_ID: &str = "5ba7ed000000000000000001";

struct Site {
    node: Node,
    /// How many times the site's software has started (its incarnation).
    runs: Arc<AtomicU64>,
    /// The peer table of the site's current mesh.
    peers: Arc<Mutex<Option<ocmesh_federation::PeerTable>>>,
    _data: tempfile::TempDir,
}

/// Three sites on temporary directories, each a turmoil host whose
/// software is the mesh (dialing the other two), restarted by `bounce`
/// with the next incarnation.
fn setup(sim: &mut Sim<'_>, seed: u64, ca_dir: &std::path::Path) -> BTreeMap<&'static str, Site> {
    let mut sites = BTreeMap::new();
    for (i, name) in SITES.into_iter().enumerate() {
        let data = tempfile::tempdir().expect("tmp");
        let node = Node::open(NodeConfig {
            data_dir: data.path().into(),
            site: name.into(),
            admin_password: Some("pw".into()),
        })
        .expect("open")
        .node;
        let files = ca::issue_site_cert(ca_dir, name).expect("issue");
        let identity = tls::load_identity(&ca_dir.join("ca.pem"), &files.cert, &files.key).expect("identity");
        let runs = Arc::new(AtomicU64::new(0));
        let peers = Arc::new(Mutex::new(None));
        let (host_node, host_runs, host_peers) = (node.clone(), runs.clone(), peers.clone());
        sim.host(name, move || {
            let (node, identity, runs, peers) = (
                host_node.clone(),
                identity.clone(),
                host_runs.clone(),
                host_peers.clone(),
            );
            async move {
                let run = runs.fetch_add(1, Ordering::SeqCst) + 1;
                let endpoint = turmoil_udp::endpoint(PORT, seed ^ ((i as u64) << 32) ^ (run << 48)).await?;
                let peer_addrs = SITES
                    .iter()
                    .filter(|s| **s != name)
                    .map(|s| SocketAddr::new(turmoil::lookup(*s), PORT).into())
                    .collect();
                let config = MeshConfig {
                    listen: SocketAddr::from((Ipv4Addr::UNSPECIFIED, PORT)),
                    peers: peer_addrs,
                    session: Default::default(),
                    sharing: Default::default(),
                    tap: None,
                };
                let mesh = Mesh::start_on(node, &identity, config, endpoint, run)?;
                *peers.lock().map_err(|_| "poisoned")? = Some(mesh.peers());
                std::future::pending::<()>().await;
                Ok(())
            }
        });
        sites.insert(
            name,
            Site {
                node,
                runs,
                peers,
                _data: data,
            },
        );
    }
    sites
}

fn new_sim(seed: u64) -> (Sim<'static>, tempfile::TempDir) {
    tls::install_crypto_provider();
    let ca_dir = tempfile::tempdir().expect("tmp");
    ca::init_ca(ca_dir.path()).expect("ca");
    let sim = turmoil::Builder::new()
        .rng_seed(seed)
        .tick_duration(Duration::from_millis(1))
        .simulation_duration(Duration::from_secs(3600))
        .min_message_latency(Duration::from_millis(1))
        .max_message_latency(Duration::from_millis(20))
        .udp_capacity(1 << 14)
        .build();
    (sim, ca_dir)
}

/// Steps the simulation until `done` holds or `limit` of virtual time has
/// passed; returns the virtual time at which `done` first held.
fn step_until(sim: &mut Sim<'_>, limit: Duration, mut done: impl FnMut(&mut Sim<'_>) -> bool) -> Option<Duration> {
    while sim.elapsed() < limit {
        if done(sim) {
            return Some(sim.elapsed());
        }
        sim.step().expect("simulation step");
    }
    None
}

/// What the writers got acknowledged.
#[derive(Default, Debug)]
struct Acked {
    /// Inserted documents.
    docs: Vec<String>,
    /// (document, field, value) set by an acknowledged update.
    updates: Vec<(String, String, u64)>,
    /// Work items pushed, and those completed at their site.
    items: Vec<String>,
    completed: Vec<String>,
    /// Items pushed at a or c onto `CROSS_QUEUE` (served at b only).
    crossed: Vec<String>,
    /// Every pop of a crossed item at b: (item, epoch).
    cross_pops: Vec<(String, u64)>,
    /// A crossed item handed out anywhere but at b.
    popped_elsewhere: Vec<String>,
}

/// A queue created at a and served at b only: items pushed at a and c are
/// handed to b, and only b pops them.
const CROSS_QUEUE: &str = "q-cross";

/// A turmoil client that writes at every site every 100 ms of virtual time
/// until `until`: a document each, a field of one shared document each (so
/// concurrent edits meet), and a work item pushed, popped and completed on
/// the site's own queue.
fn writers(sim: &mut Sim<'_>, sites: &BTreeMap<&'static str, Site>, until: Duration, acked: Arc<Mutex<Acked>>) {
    let nodes: Vec<(&'static str, Node)> = sites.iter().map(|(n, s)| (*n, s.node.clone())).collect();
    sim.client("writers", async move {
        let who = admin();
        let setup = nodes.clone();
        let setup_who = who.clone();
        held(async move {
            for (name, node) in &setup {
                node.add_queue(obj(json!({"name": format!("q-{name}")})), &setup_who)
                    .await
                    .map_err(|e| e.to_string())?;
            }
            setup[0]
                .1
                .add_queue(obj(json!({"name": CROSS_QUEUE, "sites": ["b"]})), &setup_who)
                .await
                .map_err(|e| e.to_string())?;
            setup[0]
                .1
                .insert("entities", obj(json!({"_id": SHARED_ID, "origin": "a"})), &setup_who)
                .await
                .map_err(|e| e.to_string())?;
            Ok(())
        })
        .await?;
        let mut round = 0u64;
        while turmoil::elapsed() < until {
            round += 1;
            for (name, node) in &nodes {
                let (name, node, who, acked) = (*name, node.clone(), who.clone(), acked.clone());
                held(async move { write_round(name, &node, &who, round, &acked).await }).await?;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        Ok(())
    });
}

/// One round of writes at one site; what is acknowledged goes to `acked`.
async fn write_round(name: &str, node: &Node, who: &Principal, round: u64, acked: &Mutex<Acked>) -> Result<(), String> {
    let e = |e: ocmesh_node::WriteError| e.to_string();
    let doc = node
        .insert("entities", obj(json!({"site": name, "round": round})), who)
        .await
        .map_err(e)?;
    let id = doc["_id"].as_str().unwrap_or_default().to_owned();
    let field = format!("by_{name}");
    // The shared document may not have reached this site yet.
    let updated = node
        .update("entities", SHARED_ID, json!({"$set": {&field: round}}), who)
        .await
        .is_ok();
    let queue = format!("q-{name}");
    let pushed = node
        .push_workitems(&queue, vec![obj(json!({"name": format!("{name}-{round}")}))], who)
        .await
        .map_err(e)?;
    {
        let mut got = acked.lock().map_err(|_| "poisoned")?;
        got.docs.push(id);
        if updated {
            got.updates.push((SHARED_ID.to_owned(), field, round));
        }
        got.items
            .extend(pushed.iter().filter_map(|d| d["_id"].as_str().map(str::to_owned)));
    }
    if round.is_multiple_of(2)
        && let Some(item) = node.pop_workitem(&queue, who, None).await.map_err(e)?
    {
        let id = item["_id"].as_str().unwrap_or_default().to_owned();
        node.update_workitem(&id, "successful", None, None, None, who)
            .await
            .map_err(e)?;
        acked.lock().map_err(|_| "poisoned")?.completed.push(id);
    }
    if name != "b" {
        // The queue's definition may not have reached c yet: such a push
        // is refused and not counted.
        if let Ok(pushed) = node
            .push_workitems(
                CROSS_QUEUE,
                vec![obj(json!({"name": format!("x-{name}-{round}")}))],
                who,
            )
            .await
        {
            let mut got = acked.lock().map_err(|_| "poisoned")?;
            got.crossed
                .extend(pushed.iter().filter_map(|d| d["_id"].as_str().map(str::to_owned)));
        }
        if let Ok(Some(item)) = node.pop_workitem(CROSS_QUEUE, who, None).await {
            let id = item["_id"].as_str().unwrap_or_default().to_owned();
            acked.lock().map_err(|_| "poisoned")?.popped_elsewhere.push(id);
        }
    }
    Ok(())
}

/// b's worker for `CROSS_QUEUE`: pops and completes what it is handed,
/// every 50 ms of virtual time, until `until`.
fn cross_worker(sim: &mut Sim<'_>, b: Node, until: Duration, acked: Arc<Mutex<Acked>>) {
    sim.client("worker-b", async move {
        let who = admin();
        while turmoil::elapsed() < until {
            let (node, who2, acked2) = (b.clone(), who.clone(), acked.clone());
            held(async move {
                let e = |e: ocmesh_node::WriteError| e.to_string();
                // The queue's definition may not have reached b yet.
                while let Ok(Some(item)) = node.pop_workitem(CROSS_QUEUE, &who2, None).await {
                    let id = item["_id"].as_str().unwrap_or_default().to_owned();
                    let epoch = item["_epoch"].as_u64().unwrap_or(0);
                    acked2
                        .lock()
                        .map_err(|_| "poisoned")?
                        .cross_pops
                        .push((id.clone(), epoch));
                    node.update_workitem(&id, "successful", None, None, None, &who2)
                        .await
                        .map_err(e)?;
                }
                Ok(())
            })
            .await?;
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Ok(())
    });
}

/// Every crossed item is done, as seen at the site that pushed it (a or
/// c; checking at a and c both covers either).
fn crossed_all_done(sites: &BTreeMap<&'static str, Site>, acked: &Mutex<Acked>) -> bool {
    let Ok(acked) = acked.lock() else { return false };
    acked.crossed.iter().all(|id| {
        ["a", "c"].iter().all(|s| {
            sites[s]
                .node
                .get("workitems", id)
                .is_ok_and(|d| d["state"] == "successful")
        })
    })
}

/// Runs `f` (node writes) with turmoil's clock held: on a blocking thread,
/// which stops tokio's paused clock from auto-advancing, instead of awaited
/// on the host, where the clock would run on while the writer thread works.
async fn held<T: Send + 'static>(f: impl Future<Output = Result<T, String>> + Send + 'static) -> Result<T, String> {
    let handle = tokio::runtime::Handle::current();
    tokio::task::spawn_blocking(move || handle.block_on(f))
        .await
        .map_err(|e| e.to_string())?
}

fn all_agree(sites: &BTreeMap<&'static str, Site>) -> bool {
    let mut vvs = sites.values().map(|s| s.node.version_vector());
    let first = vvs.next().unwrap_or_default();
    first.total() > 0 && vvs.all(|v| v == first)
}

/// Every acknowledged write is at every site, and the sites hold the same
/// documents with the same histories.
fn check_converged(sites: &BTreeMap<&'static str, Site>, acked: &Acked) {
    let (first, rest): (Vec<_>, Vec<_>) = sites.iter().partition(|(n, _)| **n == "a");
    let (_, a) = first[0];
    let mut docs = acked.docs.clone();
    docs.push(SHARED_ID.into());
    for id in &docs {
        let here = a.node.get("entities", id).expect("acknowledged document at a");
        let history = a.node.versions("entities", id).expect("history at a");
        for (name, s) in &rest {
            assert_eq!(s.node.get("entities", id).ok().as_ref(), Some(&here), "{id} at {name}");
            assert_eq!(
                s.node.versions("entities", id).expect("history"),
                history,
                "history of {id} at {name}"
            );
        }
    }
    for (name, s) in sites {
        // (document, field, value) of every version held, read once per document.
        let mut held = std::collections::HashSet::new();
        for id in acked
            .updates
            .iter()
            .map(|(id, _, _)| id)
            .collect::<std::collections::BTreeSet<_>>()
        {
            for v in s.node.versions("entities", id).expect("history") {
                if let Value::Object(fields) = v {
                    for (field, value) in fields {
                        if let Some(n) = value.as_u64() {
                            held.insert((id.clone(), field, n));
                        }
                    }
                }
            }
        }
        for update in &acked.updates {
            assert!(
                held.contains(update),
                "acknowledged update {update:?} missing at {name}"
            );
        }
    }
    for id in &acked.items {
        let here = a.node.get("workitems", id).expect("work item at a");
        for (name, s) in &rest {
            assert_eq!(
                s.node.get("workitems", id).ok().as_ref(),
                Some(&here),
                "item {id} at {name}"
            );
        }
    }
    for id in &acked.completed {
        for (name, s) in sites {
            let item = s.node.get("workitems", id).expect("completed item");
            assert_eq!(item["state"], "successful", "item {id} at {name}");
        }
    }
    // Items handed from a and c to b: popped at b only, once each, under
    // one epoch, and done everywhere with b as their owner.
    assert!(
        acked.popped_elsewhere.is_empty(),
        "crossed items popped outside b: {:?}",
        acked.popped_elsewhere
    );
    let mut pops: BTreeMap<&str, Vec<u64>> = BTreeMap::new();
    for (id, epoch) in &acked.cross_pops {
        pops.entry(id).or_default().push(*epoch);
    }
    for id in &acked.crossed {
        assert_eq!(
            pops.get(id.as_str()).map(Vec::as_slice),
            Some(&[1u64][..]),
            "pops of crossed item {id}"
        );
        for (name, s) in sites {
            let item = s.node.get("workitems", id).expect("crossed item");
            assert_eq!(item["state"], "successful", "crossed item {id} at {name}");
            assert_eq!(item["_owner"], "b", "owner of crossed item {id} at {name}");
        }
    }
}

fn partitions_holds_and_repairs(seed: u64) {
    let (mut sim, ca_dir) = new_sim(seed);
    let sites = setup(&mut sim, seed, ca_dir.path());
    let acked = Arc::new(Mutex::new(Acked::default()));
    let writes_until = Duration::from_secs(62);
    writers(&mut sim, &sites, writes_until, acked.clone());
    cross_worker(
        &mut sim,
        sites["b"].node.clone(),
        writes_until + Duration::from_secs(80),
        acked.clone(),
    );

    let s = Duration::from_secs;
    // a alone; then b-c held; a back through b only (c reaches a by relay);
    // then c alone, reachable through a only; then every link cut for
    // longer than the idle timeout, so connections die and are redialed.
    type Fault = fn(&Sim<'_>);
    let schedule: Vec<(Duration, &str, Fault)> = vec![
        (s(2), "isolate a", |sim| {
            sim.partition("a", "b");
            sim.partition("a", "c");
        }),
        (s(6), "hold b-c", |sim| sim.hold("b", "c")),
        (s(9), "repair a-b, release b-c", |sim| {
            sim.repair("a", "b");
            sim.release("b", "c");
        }),
        (s(14), "cut b-c", |sim| sim.partition("b", "c")),
        (s(16), "repair a-c", |sim| sim.repair("a", "c")),
        (s(20), "cut everything", |sim| {
            sim.partition("a", "b");
            sim.partition("a", "c");
            sim.partition("b", "c");
        }),
        (s(60), "repair everything", |sim| {
            sim.repair("a", "b");
            sim.repair("a", "c");
            sim.repair("b", "c");
        }),
    ];
    for (at, what, fault) in schedule {
        step_until(&mut sim, at, |_| false);
        fault(&sim);
        eprintln!("seed {seed}: {what} at {:?}", sim.elapsed());
    }
    step_until(&mut sim, writes_until + s(1), |_| false);
    let converged = step_until(&mut sim, writes_until + s(90), |_| {
        crossed_all_done(&sites, &acked) && all_agree(&sites)
    });
    let acked = acked.lock().expect("acked");
    assert!(
        converged.is_some(),
        "seed {seed}: no convergence by {:?}: {:?}\n{:#?}",
        sim.elapsed(),
        sites.values().map(|s| s.node.version_vector()).collect::<Vec<_>>(),
        sites
            .values()
            .map(|s| s.peers.lock().ok().and_then(|p| p.as_ref().map(|t| t.snapshot())))
            .collect::<Vec<_>>()
    );
    eprintln!(
        "seed {seed}: converged at {converged:?}: {} documents, {} updates, {} items ({} completed), {} handed to b",
        acked.docs.len(),
        acked.updates.len(),
        acked.items.len(),
        acked.completed.len(),
        acked.crossed.len()
    );
    assert!(
        acked.crossed.len() >= 2 * 300,
        "items handed to b: {}",
        acked.crossed.len()
    );
    assert!(
        acked.docs.len() >= 3 * 300,
        "writers kept writing: {}",
        acked.docs.len()
    );
    check_converged(&sites, &acked);
}

#[test]
fn three_sites_converge_through_partitions_holds_and_repairs_seed_1() {
    partitions_holds_and_repairs(1);
}

#[test]
fn three_sites_converge_through_partitions_holds_and_repairs_seed_7() {
    partitions_holds_and_repairs(7);
}

/// A site whose process dies (turmoil drops its runtime: no close reaches
/// the peers) and starts again is taken back by both peers at once, not
/// after the 30 s idle timeout: its new hello carries a newer incarnation.
#[test]
fn a_restarted_site_is_taken_back_at_once() {
    let seed = 3;
    let (mut sim, ca_dir) = new_sim(seed);
    let sites = setup(&mut sim, seed, ca_dir.path());
    let acked = Arc::new(Mutex::new(Acked::default()));
    writers(&mut sim, &sites, Duration::from_secs(4), acked.clone());
    cross_worker(
        &mut sim,
        sites["b"].node.clone(),
        Duration::from_secs(60),
        acked.clone(),
    );
    let written = step_until(&mut sim, Duration::from_secs(10), |sim| !sim.is_host_running("writers"));
    assert!(written.is_some(), "the writers finished");
    assert!(
        step_until(&mut sim, Duration::from_secs(20), |_| {
            crossed_all_done(&sites, &acked) && all_agree(&sites)
        })
        .is_some(),
        "in sync before the restart"
    );
    let before = sites["a"].node.version_vector().total();
    // Kill a and start it again right away.
    sim.crash("a");
    sim.bounce("a");
    let restarted = sim.elapsed();
    // A write at the new a must reach both peers: only possible once they
    // have taken its new connections.
    let node = sites["a"].node.clone();
    sim.client("after-restart", async move {
        node.insert("entities", obj(json!({"after": "restart"})), &admin())
            .await?;
        Ok(())
    });
    let back = step_until(&mut sim, restarted + Duration::from_secs(60), |_| {
        all_agree(&sites) && sites["b"].node.version_vector().total() > before
    })
    .map(|t| t - restarted);
    eprintln!("restarted a taken back after {back:?} of virtual time");
    let back = back.expect("the restarted site syncs again");
    assert!(
        back < Duration::from_secs(5),
        "took {back:?}: peers waited for the old connection to idle out"
    );
    assert_eq!(sites["a"].runs.load(Ordering::SeqCst), 2, "a ran twice");
    check_converged(&sites, &acked.lock().expect("acked"));
}
