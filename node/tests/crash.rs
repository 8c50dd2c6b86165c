//! Crash tests through the in-memory disk: a power cut at a random sync
//! (in the middle of a write, a checkpoint, or the log append), tearing a
//! random prefix of the unsynced writes, then a restart from what the disk
//! kept. Every acknowledged write must be there, unchanged; the change log
//! must stay gapless and the clock must not go back.

use std::collections::BTreeMap;
use std::sync::Arc;

use ocmesh_node::{ManualClock, MemDisk, Node, NodeConfig, OpenOptions, Principal, WriteError};
use ocmesh_replication::{Change, FetchRequest, VersionVector};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::json;

const SITE: &str = "crashy";
const DOCS: u32 = 12;

fn admin() -> Principal {
    Principal {
        roles: vec![ocmesh_node::acl::ADMINS_ROLE_ID.into()],
        id: "0".repeat(24),
        name: "admin".into(),
    }
}

fn open(disk: &MemDisk, clock: &ManualClock, seed: u64) -> Node {
    Node::open_with(
        NodeConfig {
            data_dir: "unused".into(),
            site: SITE.into(),
            admin_password: None,
        },
        OpenOptions::simulated(disk.clone(), Arc::new(clock.clone()), seed),
    )
    .expect("open from the durable image")
    .node
}

fn log_after(node: &Node, after: u64) -> Vec<Change> {
    let mut vv = VersionVector::new();
    vv.advance(SITE, after);
    node.read_changes(&FetchRequest {
        after: vv,
        max_changes: usize::MAX,
        max_bytes: usize::MAX,
    })
    .expect("read the log")
}

/// One write of a random kind; `Ok(false)` when the disk crashed under it.
async fn random_write(node: &Node, rng: &mut StdRng) -> Result<bool, WriteError> {
    let id = format!("{:024x}", rng.random_range(0..DOCS));
    let n: u32 = rng.random();
    let exists = node.get("entities", &id).is_ok();
    let r = if !exists {
        node.insert(
            "entities",
            json!({"_id": id, "n": n}).as_object().cloned().unwrap_or_default(),
            &admin(),
        )
        .await
    } else if rng.random_bool(0.2) {
        node.delete("entities", &id, &admin()).await
    } else {
        node.update("entities", &id, json!({"$set": {"n": n}}), &admin()).await
    };
    match r {
        Ok(_) => Ok(true),
        Err(WriteError::Storage(_)) => Ok(false),
        Err(e) => Err(e),
    }
}

/// Returns how many crashes came in the middle of a write.
async fn crash_cycles(seed: u64) -> u32 {
    let mut mid_write = 0;
    let mut rng = StdRng::seed_from_u64(seed);
    let disk = MemDisk::new();
    let clock = ManualClock::new(1_700_000_000_000);
    let mut opens = 0;
    let mut node = open(&disk, &clock, seed << 8);
    let mut acked: BTreeMap<u64, Change> = BTreeMap::new();
    for cycle in 0..5 {
        let at = disk.syncs() + rng.random_range(1..60);
        let mut tear = StdRng::seed_from_u64(rng.random());
        disk.crash_at_sync(at, move |pending| tear.random_range(0..=pending));
        let generation = disk.generation();
        for _ in 0..300 {
            clock.set(clock_now(&clock) + rng.random_range(0..400));
            let held = node.version_vector().get(SITE);
            match random_write(&node, &mut rng).await {
                Ok(true) => {
                    for c in log_after(&node, held) {
                        acked.insert(c.seq, c);
                    }
                }
                Ok(false) => {
                    mid_write += 1;
                    break;
                }
                Err(e) => panic!("seed {seed} cycle {cycle}: a write failed for another reason: {e}"),
            }
        }
        if disk.generation() == generation {
            // The armed sync never came: cut the power between writes.
            let mut tear = StdRng::seed_from_u64(rng.random());
            disk.crash_tearing(move |pending| tear.random_range(0..=pending));
        }
        drop(node);
        opens += 1;
        clock.set(clock_now(&clock) + rng.random_range(0..3_000));
        node = open(&disk, &clock, (seed << 8) + opens);
        let log = log_after(&node, 0);
        let replay = format!("seed {seed} cycle {cycle}");
        for (i, c) in log.iter().enumerate() {
            assert_eq!(c.seq, i as u64 + 1, "{replay}: the log has a gap");
        }
        for (seq, c) in &acked {
            assert_eq!(
                log.get(*seq as usize - 1),
                Some(c),
                "{replay}: acknowledged change {seq} lost or changed"
            );
        }
        // A change that was logged but not acknowledged may survive: then
        // it is acknowledged from now on (later writes build on it).
        for c in log.iter().skip(acked.len()) {
            acked.insert(c.seq, c.clone());
        }
        // Every surviving version is in its document's history.
        let mut per_doc: BTreeMap<&str, usize> = BTreeMap::new();
        for c in &log {
            *per_doc.entry(c.doc_id.as_str()).or_default() += 1;
        }
        for (id, n) in per_doc {
            let versions = node.versions("entities", id).expect("history");
            assert_eq!(versions.len(), n, "{replay}: history of {id}");
        }
        // The clock does not go back past what was acknowledged.
        let before = acked.values().map(|c| c.hlc).max().unwrap_or(0);
        let held = node.version_vector().get(SITE);
        assert!(
            random_write(&node, &mut rng).await.expect("a write after restart"),
            "{replay}"
        );
        let next = log_after(&node, held);
        assert!(next.iter().all(|c| c.hlc > before), "{replay}: the clock went back");
        for c in next {
            acked.insert(c.seq, c);
        }
    }
    mid_write
}

fn clock_now(clock: &ManualClock) -> u64 {
    use ocmesh_node::WallClock;
    clock.now_ms()
}

#[tokio::test]
async fn acknowledged_writes_survive_crashes_at_random_syncs() {
    let mut mid_write = 0;
    for seed in 0..24 {
        mid_write += crash_cycles(seed).await;
    }
    // 120 crashes; most should land inside a write, or the test is weak.
    assert!(mid_write > 60, "only {mid_write} crashes came in the middle of a write");
}

#[tokio::test]
async fn a_clean_reopen_keeps_everything_and_a_crash_only_loses_unsynced_bytes() {
    let disk = MemDisk::new();
    let clock = ManualClock::new(1_700_000_000_000);
    let node = open(&disk, &clock, 1);
    let doc = node
        .insert(
            "entities",
            json!({"x": 1}).as_object().cloned().unwrap_or_default(),
            &admin(),
        )
        .await
        .expect("insert");
    let id = doc["_id"].as_str().expect("id").to_owned();
    disk.crash();
    drop(node);
    let node = open(&disk, &clock, 2);
    assert_eq!(node.get("entities", &id).expect("acknowledged insert")["x"], 1);
    assert!(disk.durable_bytes() > 0);
}
