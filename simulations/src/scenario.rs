//! Scenario files (TOML): sites, links and a fault schedule.

use serde::Deserialize;

/// A whole simulated deployment and what happens to it.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Scenario {
    pub name: String,
    /// Sites write during [0, workload_ms); link flaps happen then too.
    pub workload_ms: u64,
    /// Give up (and report non-convergence) at this virtual time.
    pub max_ms: u64,
    /// Size of the shared set of document ids all sites write to.
    #[serde(default = "default_documents")]
    pub documents: u32,
    /// Share of writes that are deletes.
    #[serde(default)]
    pub delete_ratio: f64,
    /// Most changes per sync batch.
    #[serde(default = "default_batch")]
    pub batch_changes: usize,
    pub sites: Vec<SiteSpec>,
    pub links: Vec<LinkSpec>,
    #[serde(default)]
    pub faults: Vec<Fault>,
    /// What the sites are: the node itself over an in-memory disk
    /// (`node`, the default) or the small replica model (`model`).
    #[serde(default)]
    pub backend: Backend,
    /// Node backend: share of local actions that push a work item (onto
    /// a random site's queue, served by that site).
    #[serde(default = "default_workitem_ratio")]
    pub workitem_ratio: f64,
    /// Node backend: share of local actions that are an operator's
    /// takeover of an item another site owns.
    #[serde(default = "default_takeover_ratio")]
    pub takeover_ratio: f64,
    /// Node backend: a popped item's processing lease (the queue's `leasetime`).
    #[serde(default = "default_lease_ms")]
    pub lease_ms: u64,
}

/// What a simulated site runs.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Backend {
    /// `ocmesh_node::Node` over a `MemDisk`: the real write and apply paths.
    #[default]
    Node,
    /// `crate::Replica`, a model of the node's replication rules (fast).
    Model,
}

impl std::str::FromStr for Backend {
    type Err = ScenarioError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "node" => Ok(Backend::Node),
            "model" => Ok(Backend::Model),
            other => Err(ScenarioError::Invalid(format!("backend {other:?}: use node or model"))),
        }
    }
}

fn default_workitem_ratio() -> f64 {
    0.15
}

fn default_takeover_ratio() -> f64 {
    0.01
}

fn default_lease_ms() -> u64 {
    5_000
}

fn default_documents() -> u32 {
    50
}

fn default_batch() -> usize {
    256
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SiteSpec {
    pub name: String,
    /// This site's wall clock minus true time.
    #[serde(default)]
    pub clock_skew_ms: i64,
    /// Pause between two local writes, drawn uniformly from [min, max].
    pub write_interval_ms: [u64; 2],
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LinkSpec {
    pub a: String,
    pub b: String,
    /// One-way delay of each frame, drawn uniformly from [min, max]; frames
    /// of one connection still arrive in order (a QUIC stream).
    pub latency_ms: [u64; 2],
    /// Connection drops per minute during the workload (a flaky link): each
    /// connection lives an exponentially distributed time with this rate.
    #[serde(default)]
    pub drops_per_minute: f64,
    /// The dialer's backoff `[first, max]`, as the federation shell's: after
    /// a lost connection or a failed dial it waits a time drawn from
    /// `[b/2, b]`, then doubles `b` up to `max`; a connection that lasted
    /// 10 s resets `b` to `first`.
    #[serde(default = "default_reconnect")]
    pub reconnect_ms: [u64; 2],
}

fn default_reconnect() -> [u64; 2] {
    [200, 30_000]
}

/// Something that goes wrong between `at_ms` and `until_ms`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Fault {
    pub at_ms: u64,
    pub until_ms: u64,
    /// Cut every link between a site of the first group and one of the second.
    #[serde(default)]
    pub partition: Option<[Vec<String>; 2]>,
    /// Crash this site; it restarts from its durable state at `until_ms`.
    #[serde(default)]
    pub crash: Option<String>,
}

/// Why a scenario is unusable.
#[derive(Debug, thiserror::Error)]
pub enum ScenarioError {
    #[error("scenario does not parse: {0}")]
    Parse(#[from] toml::de::Error),
    #[error("scenario names unknown site {0:?}")]
    UnknownSite(String),
    #[error("scenario: {0}")]
    Invalid(String),
}

impl Scenario {
    /// Parses and checks a scenario.
    pub fn from_toml(text: &str) -> Result<Scenario, ScenarioError> {
        let s: Scenario = toml::from_str(text)?;
        s.validate()?;
        Ok(s)
    }

    pub fn site_index(&self, name: &str) -> Result<usize, ScenarioError> {
        self.sites
            .iter()
            .position(|s| s.name == name)
            .ok_or_else(|| ScenarioError::UnknownSite(name.to_owned()))
    }

    /// Checks names, ranges and the fault schedule (`from_toml` does this;
    /// `run` reports a scenario built by hand that fails it).
    pub fn validate(&self) -> Result<(), ScenarioError> {
        if self.sites.is_empty() {
            return Err(ScenarioError::Invalid("no sites".into()));
        }
        for l in &self.links {
            self.site_index(&l.a)?;
            self.site_index(&l.b)?;
            let [first, max] = l.reconnect_ms;
            let bad_rate = !(l.drops_per_minute >= 0.0 && l.drops_per_minute.is_finite());
            if l.a == l.b || l.latency_ms[0] > l.latency_ms[1] || first == 0 || first > max || bad_rate {
                return Err(ScenarioError::Invalid(format!("link {}-{} is malformed", l.a, l.b)));
            }
        }
        for s in &self.sites {
            if s.write_interval_ms[0] == 0 || s.write_interval_ms[0] > s.write_interval_ms[1] {
                return Err(ScenarioError::Invalid(format!(
                    "site {}: write_interval_ms must be [min>0, max>=min]",
                    s.name
                )));
            }
        }
        for f in &self.faults {
            if f.until_ms < f.at_ms {
                return Err(ScenarioError::Invalid(format!(
                    "fault at {} ends before it starts",
                    f.at_ms
                )));
            }
            if let Some(groups) = &f.partition {
                for n in groups.iter().flatten() {
                    self.site_index(n)?;
                }
            }
            if let Some(n) = &f.crash {
                self.site_index(n)?;
            }
        }
        for (what, r) in [
            ("delete_ratio", self.delete_ratio),
            ("workitem_ratio", self.workitem_ratio),
            ("takeover_ratio", self.takeover_ratio),
        ] {
            if !(0.0..=1.0).contains(&r) {
                return Err(ScenarioError::Invalid(format!("{what} must lie in [0, 1]")));
            }
        }
        if self.workitem_ratio + self.takeover_ratio > 1.0 || self.lease_ms < 1_000 {
            return Err(ScenarioError::Invalid(
                "workitem_ratio + takeover_ratio must be at most 1, lease_ms at least 1000".into(),
            ));
        }
        if self.documents == 0 || self.batch_changes == 0 {
            return Err(ScenarioError::Invalid("documents and batch_changes must be > 0".into()));
        }
        if self.max_ms <= self.heal_ms() {
            return Err(ScenarioError::Invalid(
                "max_ms must come after the workload and every fault".into(),
            ));
        }
        Ok(())
    }

    /// When the workload and every fault are over.
    pub fn heal_ms(&self) -> u64 {
        self.faults.iter().map(|f| f.until_ms).fold(self.workload_ms, u64::max)
    }
}
