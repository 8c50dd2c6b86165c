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
        if !(0.0..=1.0).contains(&self.delete_ratio) {
            return Err(ScenarioError::Invalid("delete_ratio must lie in [0, 1]".into()));
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
