//! ocmesh-proto: the wire schemas of ocmesh and their generated Rust types.
//!
//! `proto/*.proto` is the source of truth; Rust code is generated at build
//! time with protox + prost (no protoc binary). Invariant: the wire format is
//! versioned and only grows: fields are added, never renumbered or retyped.

/// The federation (site-to-site) protocol, version 1.
pub mod federation {
    #![allow(missing_docs, clippy::all)]
    include!(concat!(env!("OUT_DIR"), "/ocmesh.federation.v1.rs"));

    /// Protocol version carried in `Hello`.
    pub const PROTOCOL_VERSION: u32 = 1;
}

/// The OpenIAP client protocol (package `openiap`): the `Envelope` every
/// command travels in, the request and reply messages, and the tonic
/// `FlowService` server and client.
pub mod openiap {
    #![allow(missing_docs, missing_debug_implementations, clippy::all)]
    include!(concat!(env!("OUT_DIR"), "/openiap.rs"));

    /// Prefix of every `google.protobuf.Any` type URL OpenIAP sends.
    pub const TYPE_URL_PREFIX: &str = "type.googleapis.com/openiap.";
}

pub use prost;
pub use prost_types;
