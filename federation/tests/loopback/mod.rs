//! Sites in one process joined by the real mesh over loopback QUIC.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use ocmesh_federation::{FrameTap, Mesh, MeshConfig, ca, tls};
use ocmesh_node::{Node, NodeConfig};
use ocmesh_replication::ShareConfig;

/// A running site; its data lives as long as it does.
pub struct Site {
    pub node: Node,
    pub mesh: Mesh,
    pub _data: tempfile::TempDir,
}

/// Issues and loads `site`'s certificate from the CA in `ca_dir`.
pub fn identity(ca_dir: &Path, site: &str) -> tls::SiteIdentity {
    let files = ca::issue_site_cert(ca_dir, site).expect("issue");
    tls::load_identity(&ca_dir.join("ca.pem"), &files.cert, &files.key).expect("identity")
}

/// `site`'s certificate, issued earlier by `identity`, loaded again.
#[allow(dead_code)]
pub fn issued(ca_dir: &Path, site: &str) -> tls::SiteIdentity {
    tls::load_identity(
        &ca_dir.join("ca.pem"),
        &ca_dir.join(format!("{site}.pem")),
        &ca_dir.join(format!("{site}.key")),
    )
    .expect("identity")
}

/// A free UDP port on loopback (bound and released).
#[allow(dead_code)]
pub fn free_udp() -> SocketAddr {
    let s = std::net::UdpSocket::bind("127.0.0.1:0").expect("bind");
    s.local_addr().expect("addr")
}

/// Opens a node on a temporary directory, without a mesh.
pub fn open_node(site: &str) -> (Node, tempfile::TempDir) {
    let data = tempfile::tempdir().expect("tmp");
    let node = Node::open(NodeConfig {
        data_dir: data.path().into(),
        site: site.into(),
        admin_password: Some("pw".into()),
    })
    .expect("open")
    .node;
    (node, data)
}

/// The mesh's frame counters: [frames sent, frames received, bytes sent,
/// bytes received].
#[allow(dead_code)]
pub fn frame_counters(stats: &ocmesh_federation::MeshStats) -> [u64; 4] {
    use std::sync::atomic::Ordering::Relaxed;
    [
        stats.frames_sent.load(Relaxed),
        stats.frames_received.load(Relaxed),
        stats.bytes_sent.load(Relaxed),
        stats.bytes_received.load(Relaxed),
    ]
}

/// Opens a node on a temporary directory and starts its mesh.
pub fn start(ca_dir: &Path, site: &str, listen: SocketAddr, peers: Vec<SocketAddr>) -> Site {
    let (node, data) = open_node(site);
    let mesh = start_mesh(node.clone(), identity(ca_dir, site), listen, peers);
    Site {
        node,
        mesh,
        _data: data,
    }
}

/// Starts the mesh of an open node (a first start, or a restart after a cut).
pub fn start_mesh(node: Node, id: tls::SiteIdentity, listen: SocketAddr, peers: Vec<SocketAddr>) -> Mesh {
    start_mesh_with(node, id, listen, peers, Default::default(), None)
}

/// `start_mesh` with per-peer share settings and a tap on sent frames.
#[allow(dead_code)]
pub fn start_mesh_with(
    node: Node,
    id: tls::SiteIdentity,
    listen: SocketAddr,
    peers: Vec<SocketAddr>,
    sharing: HashMap<String, ShareConfig>,
    tap: Option<FrameTap>,
) -> Mesh {
    Mesh::start(
        node,
        &id,
        MeshConfig {
            listen,
            peers: peers.into_iter().map(Into::into).collect(),
            session: Default::default(),
            sharing,
            tap,
        },
    )
    .expect("mesh")
}

/// Waits up to 20 s for `f` to hold.
pub async fn eventually(what: &str, mut f: impl FnMut() -> bool) {
    for _ in 0..400 {
        if f() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("timed out waiting for {what}");
}

/// A fresh federation CA in a temporary directory.
pub fn new_ca() -> tempfile::TempDir {
    tls::install_crypto_provider();
    let dir = tempfile::tempdir().expect("tmp");
    ca::init_ca(dir.path()).expect("ca");
    dir
}
