//! ocmesh-sim: a deterministic many-site simulator over the replication core.
//!
//! Role: tell, before deployment, how a topology behaves under faults, and
//! catch replication bugs that only show under unlucky timing. Sites are
//! in-memory replicas that follow the node's rules; links carry frames
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
//! - a crashed site keeps exactly what it had applied (apply is durable
//!   before it is acknowledged) and loses only its sessions;
//! - a run passes only if every replica is identical (digest, histories,
//!   current versions), every acknowledged write is everywhere, no session
//!   closed with a protocol error, and every session ended idle.

mod engine;
pub mod replica;
pub mod scenario;

pub use engine::{Report, Sim, check};
pub use replica::Replica;
pub use scenario::{Scenario, ScenarioError};

/// Runs one scenario with one seed.
pub fn run(scenario: &Scenario, seed: u64) -> Report {
    Sim::new(scenario, seed).run().0
}
