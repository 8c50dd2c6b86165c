//! File content crosses the mesh by chunk hash: a chain a - b - c over
//! loopback QUIC, where c gets a's file through b, and content a site
//! already holds is never sent to it again.

use std::sync::atomic::Ordering;

use serde_json::{Value, json};

use ocmesh_node::Node;
use ocmesh_node::files::{CHUNK_BYTES, chunk_hashes};

mod common;
mod loopback;
use common::{admin, obj};
use loopback::{Site, eventually, new_ca, start};

async fn upload(node: &Node, name: &str, content: &[u8]) -> Value {
    let mut up = node.upload(64 << 20);
    up.write(content).await.expect("write");
    up.finish(name, "application/octet-stream", obj(json!({"from": "test"})), &admin())
        .await
        .expect("finish")
}

/// True once `node` holds the file document and every chunk it names.
fn has_whole_file(node: &Node, file: &Value) -> bool {
    let id = file["_id"].as_str().expect("id");
    let Ok(doc) = node.file(id) else { return false };
    let hashes = chunk_hashes(&doc).expect("hashes");
    hashes.iter().all(|h| node.read_chunk(h).is_ok_and(|c| c.is_some()))
}

/// Bytes with no period, so no two chunks are alike (xorshift).
fn content(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed.max(1);
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn file_content_reaches_a_site_two_hops_away_and_only_once() {
    let ca_dir = new_ca();
    let any = "127.0.0.1:0".parse().expect("addr");
    let a = start(ca_dir.path(), "a", any, Vec::new());
    let b = start(ca_dir.path(), "b", any, vec![a.mesh.local_addr().expect("addr")]);
    let c = start(ca_dir.path(), "c", any, vec![b.mesh.local_addr().expect("addr")]);

    // Three chunks: two whole, one short.
    let bytes = content(2 * CHUNK_BYTES + 1000, 7);
    let first = upload(&a.node, "first.bin", &bytes).await;
    eventually("the file at c", || has_whole_file(&c.node, &first)).await;
    let stored = |s: &Site| s.mesh.stats().chunks_stored.load(Ordering::Relaxed);
    // The count follows the store by a moment.
    eventually("three chunks counted at b and c", || (stored(&b), stored(&c)) == (3, 3)).await;
    assert!(b.node.wanted_chunks(10).expect("wanted").is_empty());
    assert!(c.node.wanted_chunks(10).expect("wanted").is_empty());

    // The same content again: a new document, no chunk travels.
    let again = upload(&a.node, "again.bin", &bytes).await;
    eventually("the second file at c", || has_whole_file(&c.node, &again)).await;
    // One chunk differs: only it travels.
    let mut edited = bytes.clone();
    edited[CHUNK_BYTES + 5] ^= 0xff;
    let third = upload(&a.node, "third.bin", &edited).await;
    eventually("the third file at c", || has_whole_file(&c.node, &third)).await;
    eventually("four chunks counted at b and c", || (stored(&b), stored(&c)) == (4, 4)).await;
    // A few more polls later, still nothing more has travelled.
    tokio::time::sleep(std::time::Duration::from_secs(5)).await;
    assert_eq!((stored(&b), stored(&c)), (4, 4));
    for s in [&a, &b, &c] {
        assert_eq!(s.mesh.stats().chunks_refused.load(Ordering::Relaxed), 0);
    }
    for s in [a, b, c] {
        s.mesh.shutdown().await;
    }
}
