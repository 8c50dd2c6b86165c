//! kill -9 under a load of mixed writes, pushes, pops and completions:
//! after restart every acknowledged write and state change is there, and
//! no work item is lost or handed out twice.

mod common;

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::{Value, json};

use common::{PASSWORD, Site, wait_until};

#[derive(Default)]
struct Acked {
    pushed: Vec<String>,
    popped: Vec<String>,
    completed: Vec<String>,
    docs: Vec<String>,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_under_mixed_load_loses_nothing() -> anyhow::Result<()> {
    let root = tempfile::tempdir()?;
    let mut site = Site::single(root.path(), "solo");
    site.start().await?;
    let c = site.client.clone();
    let r = c
        .post(site.url("/api/v1/workitemqueues"))
        .basic_auth("admin", Some(PASSWORD))
        .json(&json!({"name": "jobs", "maxretries": 10}))
        .send()
        .await?;
    assert_eq!(r.status(), 201, "{}", r.text().await?);

    let acked = Arc::new(Mutex::new(Acked::default()));
    let base = site.url("");
    let mut tasks = Vec::new();
    // Two pushers, two poppers that complete what they pop, one document writer.
    for role in 0..5 {
        let (c, acked, base) = (c.clone(), acked.clone(), base.clone());
        tasks.push(tokio::spawn(async move {
            // Bounded: stops at the first failed request (the kill) or after 3,000 steps.
            for i in 0..3_000 {
                let ok = match role {
                    0 | 1 => {
                        let r = c
                            .post(format!("{base}/api/v1/workitemqueues/jobs/workitems"))
                            .basic_auth("admin", Some(PASSWORD))
                            .json(&json!({"name": format!("p{role}-{i}"), "payload": {"i": i}}))
                            .send()
                            .await;
                        match r {
                            Ok(r) if r.status() == 201 => match r.json::<Value>().await {
                                Ok(v) => {
                                    let id = v[0]["_id"].as_str().unwrap_or_default().to_owned();
                                    acked.lock().map(|mut a| a.pushed.push(id)).is_ok()
                                }
                                Err(_) => false,
                            },
                            _ => false,
                        }
                    }
                    2 | 3 => {
                        let r = c
                            .post(format!("{base}/api/v1/workitemqueues/jobs/pop"))
                            .basic_auth("admin", Some(PASSWORD))
                            .send()
                            .await;
                        match r {
                            Ok(r) if r.status() == 204 => true,
                            Ok(r) if r.status() == 200 => {
                                let Ok(item) = r.json::<Value>().await else { return };
                                let id = item["_id"].as_str().unwrap_or_default().to_owned();
                                if acked.lock().map(|mut a| a.popped.push(id.clone())).is_err() {
                                    return;
                                }
                                let done = c
                                    .put(format!("{base}/api/v1/workitems/{id}"))
                                    .basic_auth("admin", Some(PASSWORD))
                                    .json(&json!({"state": "successful"}))
                                    .send()
                                    .await;
                                matches!(done, Ok(r) if r.status() == 200)
                                    && acked.lock().map(|mut a| a.completed.push(id)).is_ok()
                            }
                            _ => false,
                        }
                    }
                    _ => {
                        let r = c
                            .post(format!("{base}/api/v1/collections/entities/documents"))
                            .basic_auth("admin", Some(PASSWORD))
                            // Padded, so the log passes the few MiB after
                            // which it keeps zeros ahead of its end before the kill.
                            .json(&json!({"i": i, "pad": "d".repeat(32 << 10)}))
                            .send()
                            .await;
                        match r {
                            Ok(r) if r.status() == 201 => match r.json::<Value>().await {
                                Ok(v) => acked
                                    .lock()
                                    .map(|mut a| a.docs.push(v["_id"].as_str().unwrap_or_default().to_owned()))
                                    .is_ok(),
                                Err(_) => false,
                            },
                            _ => false,
                        }
                    }
                };
                if !ok {
                    return;
                }
            }
        }));
    }
    wait_until(Duration::from_secs(60), "load under way", || {
        let n = acked
            .lock()
            .map(|a| a.completed.len().min(a.pushed.len() / 2))
            .unwrap_or(0);
        async move { Ok(n >= 150) }
    })
    .await?;
    site.kill();
    for t in tasks {
        t.await?;
    }
    // The kill hit a log with zeros written ahead of its end (once it held
    // more than a few MiB): the restart below must find every record
    // anyway.
    let log = std::fs::read(site.data.join("ocmesh.wal"))?;
    let zeros_ahead = log.len() > 1 << 20 && log[log.len() - (1 << 20)..].iter().all(|b| *b == 0);
    println!("log at the kill: {} bytes, zeros ahead: {zeros_ahead}", log.len());
    assert!(
        zeros_ahead || log.len() < 12 << 20,
        "a log of {} bytes has no zeros ahead of its end",
        log.len()
    );
    let acked = Arc::try_unwrap(acked).map_err(|_| anyhow::anyhow!("tasks still hold the log"))?;
    let acked = acked.into_inner().map_err(|_| anyhow::anyhow!("poisoned"))?;

    site.start().await?;
    let popped: HashSet<&String> = acked.popped.iter().collect();
    assert_eq!(popped.len(), acked.popped.len(), "an item was handed out twice");
    let completed: HashSet<&String> = acked.completed.iter().collect();
    let mut states: HashMap<String, usize> = HashMap::new();
    let mut still_new = HashSet::new();
    for id in &acked.pushed {
        let (status, item) = site.get(&format!("/api/v1/workitems/{id}")).await?;
        assert_eq!(status, 200, "acknowledged push {id} lost");
        let state = item["state"].as_str().unwrap_or_default().to_owned();
        if completed.contains(id) {
            assert_eq!(state, "successful", "acknowledged completion of {id} lost");
        } else if popped.contains(id) {
            assert!(
                state == "processing" || state == "successful",
                "acknowledged pop of {id} lost: {state}"
            );
        } else {
            assert!(
                ["new", "processing", "successful"].contains(&state.as_str()),
                "{id}: {state}"
            );
        }
        if state == "new" {
            still_new.insert(id.clone());
        }
        *states.entry(state).or_default() += 1;
    }
    for id in &acked.docs {
        assert!(
            site.doc("entities", id).await?.is_some(),
            "acknowledged document {id} lost"
        );
    }
    // Draining the queue hands out each remaining item once, none popped before.
    let mut drained = HashSet::new();
    loop {
        let r = c
            .post(site.url("/api/v1/workitemqueues/jobs/pop"))
            .basic_auth("admin", Some(PASSWORD))
            .send()
            .await?;
        if r.status() == 204 {
            break;
        }
        let item: Value = r.json().await?;
        let id = item["_id"].as_str().unwrap_or_default().to_owned();
        assert!(!popped.contains(&id), "{id} handed out again after the restart");
        assert!(drained.insert(id), "drained twice");
    }
    // Every acknowledged item still new comes out once; the drain may also
    // hold pushes that committed but whose reply the kill cut off.
    let missing: Vec<_> = still_new.iter().filter(|id| !drained.contains(*id)).collect();
    assert!(missing.is_empty(), "new items never handed out: {missing:?}");
    println!(
        "acknowledged: {} pushes, {} pops, {} completions, {} documents; states after restart: {states:?}",
        acked.pushed.len(),
        acked.popped.len(),
        acked.completed.len(),
        acked.docs.len()
    );
    Ok(())
}
