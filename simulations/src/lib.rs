//! ocmesh-sim: a deterministic many-site simulator over the replication core.
//!
//! Role: tell, before deployment, how a topology behaves under faults, and
//! catch replication bugs that only show under unlucky timing. Sites are
//! the node itself over an in-memory disk (`NodeSite`, the default
//! backend), or a small model of its replication rules (`Replica`, for
//! many fast seeds); links carry frames
//! between the same `SyncSession`s the federation shell runs, in virtual
//! time, with latency, flapping connections, partitions, crashes with
//! restart from durable state, and clock skew. After the workload and the
//! faults end, the run goes on until nothing is in flight, then the
//! checkers look at every replica.
//!
//! Invariants:
//! - one seed gives one run, event for event: a single seeded RNG, events
//!   ordered by virtual time then insertion, no hash-ordered iteration;
//! - frames of one connection arrive in order, as on a QUIC stream; loss is
//!   a dropped connection, after which the link redials with the shell's
//!   jittered exponential backoff and both ends start fresh sessions;
//! - a crashed node site restarts from its disk's durable image (unsynced
//!   bytes lost) and loses its sessions and its workers' items in hand; a
//!   model site keeps all it had applied;
//! - a run passes only if every replica is identical (digest, histories,
//!   current versions), every acknowledged write is everywhere, no session
//!   closed with a protocol error, every session ended idle, and (node
//!   backend) every work item was completed exactly once unless an
//!   operator's takeover is recorded, and none was popped under one
//!   ownership claim (epoch, claiming site) anywhere but at that site.

mod engine;
pub mod node_site;
pub mod replica;
pub mod scenario;
pub mod site;

pub use engine::{Report, Sim, check};
pub use node_site::{NodeSite, check_nodes};
pub use replica::Replica;
pub use scenario::{Backend, Scenario, ScenarioError};
pub use site::{Journal, SimSite};

/// Runs one scenario with one seed, on the scenario's backend.
pub fn run(scenario: &Scenario, seed: u64) -> Report {
    run_on(scenario, scenario.backend, seed)
}

/// Runs one scenario with one seed on `backend`.
pub fn run_on(scenario: &Scenario, backend: Backend, seed: u64) -> Report {
    match backend {
        Backend::Node => Sim::<NodeSite>::new(scenario, seed).run().0,
        Backend::Model => Sim::<Replica>::new(scenario, seed).run().0,
    }
}
