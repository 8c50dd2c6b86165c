//! What the engine needs from a simulated site, and what sites tell the
//! checkers (the journal). Two kinds of site implement it: the node itself
//! over an in-memory disk (`crate::NodeSite`) and the replica model
//! (`crate::Replica`).

use std::collections::{BTreeMap, BTreeSet};

use rand::rngs::StdRng;

use ocmesh_replication::{Change, FetchRequest, VersionVector};

use crate::scenario::Scenario;

/// Something a site asked the engine to do to it later.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SiteEvent {
    /// Look at the work-item queue this site serves: expire leases, pop.
    /// Stale unless `token` is the site's latest.
    Work { token: u64 },
    /// A worker finishes an item it popped (lost if the site restarted:
    /// `incarnation` is the site's restart count at pop time).
    Complete { item: String, epoch: u64, incarnation: u64 },
}

/// What the sites did that the checkers hold them to.
#[derive(Debug, Default, Clone)]
pub struct Journal {
    /// (origin, seq) of every acknowledged local change.
    pub acked: Vec<(String, u64)>,
    /// Local writes acknowledged (each may be several changes).
    pub writes: u64,
    /// Work items whose push was acknowledged.
    pub pushed: BTreeSet<String>,
    /// (item, epoch, owner) → the sites that popped it under that claim.
    /// A claim is an epoch together with the site that made it: two
    /// operators' concurrent takeovers at sites cut off from each other both
    /// make epoch n + 1, but they are two claims, ordered by
    /// `ownership::settle`, and only the winner's result counts.
    pub pops: BTreeMap<(String, u64, String), BTreeSet<String>>,
    /// Item → every acknowledged completion: (site, epoch).
    pub completions: BTreeMap<String, Vec<(String, u64)>>,
    /// Items an operator took over (acknowledged).
    pub takeovers: BTreeSet<String>,
    /// Local writes refused with `WriteError::ClockBehind`.
    pub clock_refused: u64,
}

/// What a site's step may use.
#[derive(Debug)]
pub struct Ctx<'a> {
    pub rng: &'a mut StdRng,
    pub scenario: &'a Scenario,
    /// Virtual time.
    pub now: u64,
    /// This site's wall clock (virtual time, epoch and skew).
    pub physical: u64,
    pub journal: &'a mut Journal,
    /// Events to schedule: (delay in virtual ms, event).
    pub later: Vec<(u64, SiteEvent)>,
    /// Names of every site, in scenario order.
    pub sites: &'a [String],
}

/// A batch applied.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Applied {
    /// Changes new to the site.
    pub fresh: u64,
    pub duplicates: u64,
    pub clock_clamped: u64,
}

/// A simulated site.
pub trait SimSite: Sized {
    /// Site `index` of `scenario`, for the run with `seed`, starting at `physical`.
    fn create(scenario: &Scenario, index: usize, seed: u64, physical: u64) -> Result<Self, String>;
    fn name(&self) -> &str;
    /// What the site holds, per origin.
    fn vv(&self) -> VersionVector;
    /// The log read a session asks for.
    fn fetch(&mut self, req: &FetchRequest, physical: u64) -> Result<Vec<Change>, String>;
    /// A peer's batch, durable once this returns.
    fn apply(&mut self, changes: Vec<Change>, physical: u64) -> Result<Applied, String>;
    /// One local action during the workload.
    fn act(&mut self, ctx: &mut Ctx<'_>) -> Result<(), String>;
    /// An event this site scheduled.
    fn event(&mut self, _event: SiteEvent, _ctx: &mut Ctx<'_>) -> Result<(), String> {
        Ok(())
    }
    /// Fresh changes arrived from a peer (a queue may have work now).
    fn received(&mut self, _ctx: &mut Ctx<'_>) {}
    /// Power cut: keep only what is durable.
    fn crash(&mut self) {}
    /// Start again from durable state.
    fn restart(&mut self, _physical: u64) -> Result<(), String> {
        Ok(())
    }
    /// A digest of everything a user could read.
    fn digest(&self) -> Result<u64, String>;
    /// Checks all sites at the end of a run; each broken invariant adds an anomaly.
    fn check(sites: &[Self], journal: &Journal, anomalies: &mut Vec<String>);
}
