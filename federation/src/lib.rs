//! ocmesh-federation: joins ocmesh sites into a mesh over QUIC.
//!
//! - [`ca`]: the federation CA and site certificates (rcgen).
//! - [`tls`]: mutual TLS for quinn: both sides verify the other against the
//!   CA; a peer's site name comes from its certificate, never a message.
//! - [`frame`]: length-prefixed protobuf frames on the sync stream.
//! - [`mesh`]: the endpoint, dialing with jittered exponential backoff, one
//!   connection per peer pair, and the shell that drives a
//!   `SyncSession` per peer against the node's store.
//! - [`status`]: the peer status table the API shows.
//!
//! Invariants: no data flows before both certificates are verified; a
//! malformed frame or a refused change ends that session only (the node
//! and its other sessions go on); every channel is bounded.

pub mod ca;
pub mod frame;
pub mod mesh;
pub mod peer_addr;
pub mod status;
pub mod tls;

pub use mesh::{FrameTap, Mesh, MeshConfig, MeshError, MeshStats, bind_udp};
pub use peer_addr::PeerAddr;
pub use status::{PeerStatus, PeerTable};
