//! The discrete-event engine: virtual time, one seeded RNG, and the same
//! `SyncSession` the federation shell runs, one pair per connected link.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, VecDeque};
use std::fmt;

use prost::Message;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use ocmesh_proto::federation::Frame;
use ocmesh_replication::{Input, Output, SessionConfig, SyncSession};

use crate::replica::Replica;
use crate::scenario::Scenario;

/// What one run found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Report {
    pub scenario: String,
    pub seed: u64,
    /// Every checker passed.
    pub ok: bool,
    /// Virtual ms from the end of the workload and faults until the last
    /// change reached its last replica; `None` if the run never went quiet.
    pub convergence_ms: Option<u64>,
    pub writes: u64,
    pub changes_sent: u64,
    pub frames_sent: u64,
    pub bytes_sent: u64,
    pub connections: u64,
    pub events: u64,
    pub anomalies: Vec<String>,
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "scenario {} seed {}: {}",
            self.scenario,
            self.seed,
            if self.ok { "ok" } else { "FAILED" }
        )?;
        match self.convergence_ms {
            Some(ms) => writeln!(f, "  converged {ms} ms (virtual) after the last fault healed")?,
            None => writeln!(f, "  did not converge")?,
        }
        writeln!(
            f,
            "  {} writes; {} changes, {} frames, {} bytes sent; {} connections; {} events",
            self.writes, self.changes_sent, self.frames_sent, self.bytes_sent, self.connections, self.events
        )?;
        for a in &self.anomalies {
            writeln!(f, "  anomaly: {a}")?;
        }
        Ok(())
    }
}

#[derive(Debug)]
enum Event {
    Write {
        site: usize,
    },
    Deliver {
        link: usize,
        epoch: u64,
        to: usize,
        frame: Frame,
    },
    Connect {
        link: usize,
    },
    Drop {
        link: usize,
        epoch: u64,
    },
    FaultStart(usize),
    FaultEnd(usize),
}

/// Queue entry ordered by (time, insertion order) only.
#[derive(Debug)]
struct Scheduled {
    at: u64,
    seq: u64,
    event: Event,
}

impl PartialEq for Scheduled {
    fn eq(&self, o: &Self) -> bool {
        (self.at, self.seq) == (o.at, o.seq)
    }
}
impl Eq for Scheduled {}
impl PartialOrd for Scheduled {
    fn partial_cmp(&self, o: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(o))
    }
}
impl Ord for Scheduled {
    fn cmp(&self, o: &Self) -> std::cmp::Ordering {
        (self.at, self.seq).cmp(&(o.at, o.seq))
    }
}

#[derive(Debug)]
struct Link {
    ends: [usize; 2],
    /// Active partitions covering this link.
    cut: u32,
    epoch: u64,
    /// Sessions at each end while connected.
    sessions: Option<[SyncSession; 2]>,
    /// Latest arrival time scheduled towards each end (keeps order).
    last_arrival: [u64; 2],
    reconnect_pending: bool,
}

/// A simulation in progress.
#[derive(Debug)]
pub struct Sim<'s> {
    scenario: &'s Scenario,
    rng: StdRng,
    now: u64,
    seq: u64,
    queue: BinaryHeap<Reverse<Scheduled>>,
    replicas: Vec<Replica>,
    up: Vec<bool>,
    links: Vec<Link>,
    config: SessionConfig,
    acked: Vec<(String, u64)>,
    last_sync_event: u64,
    report: Report,
}

impl<'s> Sim<'s> {
    pub fn new(scenario: &'s Scenario, seed: u64) -> Self {
        let mut sim = Sim {
            scenario,
            rng: StdRng::seed_from_u64(seed),
            now: 0,
            seq: 0,
            queue: BinaryHeap::new(),
            replicas: scenario.sites.iter().map(|s| Replica::new(&s.name)).collect(),
            up: vec![true; scenario.sites.len()],
            links: Vec::new(),
            config: SessionConfig {
                max_batch_changes: scenario.batch_changes,
                ..SessionConfig::default()
            },
            acked: Vec::new(),
            last_sync_event: 0,
            report: Report {
                scenario: scenario.name.clone(),
                seed,
                ok: false,
                convergence_ms: None,
                writes: 0,
                changes_sent: 0,
                frames_sent: 0,
                bytes_sent: 0,
                connections: 0,
                events: 0,
                anomalies: Vec::new(),
            },
        };
        for l in &scenario.links {
            // Scenario::from_toml checked the names; unknown ones cannot get here.
            let ends = [
                scenario.site_index(&l.a).unwrap_or(0),
                scenario.site_index(&l.b).unwrap_or(0),
            ];
            sim.links.push(Link {
                ends,
                cut: 0,
                epoch: 0,
                sessions: None,
                last_arrival: [0, 0],
                reconnect_pending: false,
            });
        }
        for i in 0..sim.links.len() {
            sim.schedule(0, Event::Connect { link: i });
            sim.links[i].reconnect_pending = true;
        }
        for site in 0..scenario.sites.len() {
            let first = sim.write_gap(site);
            sim.schedule(first, Event::Write { site });
        }
        for (i, f) in scenario.faults.iter().enumerate() {
            sim.schedule(f.at_ms, Event::FaultStart(i));
            sim.schedule(f.until_ms, Event::FaultEnd(i));
        }
        sim
    }

    /// Runs to quiescence (or `max_ms`) and checks the invariants.
    pub fn run(mut self) -> (Report, Vec<Replica>) {
        while let Some(Reverse(next)) = self.queue.pop() {
            if next.at > self.scenario.max_ms {
                self.queue.push(Reverse(next));
                break;
            }
            self.now = next.at;
            self.report.events += 1;
            self.step(next.event);
        }
        let quiet = self.queue.is_empty();
        let heal = self.scenario.heal_ms();
        self.report.convergence_ms = quiet.then(|| self.last_sync_event.saturating_sub(heal));
        if !quiet {
            self.report
                .anomalies
                .push(format!("still syncing at the {} ms limit", self.scenario.max_ms));
        }
        check(&self.replicas, &self.acked, &mut self.report.anomalies);
        self.report.ok = self.report.anomalies.is_empty();
        (self.report, self.replicas)
    }

    fn schedule(&mut self, at: u64, event: Event) {
        self.seq += 1;
        self.queue.push(Reverse(Scheduled {
            at,
            seq: self.seq,
            event,
        }));
    }

    fn between(&mut self, range: [u64; 2]) -> u64 {
        self.rng.random_range(range[0]..=range[1])
    }

    fn write_gap(&mut self, site: usize) -> u64 {
        self.now + self.between(self.scenario.sites[site].write_interval_ms)
    }

    fn physical(&self, site: usize) -> u64 {
        self.now
            .saturating_add_signed(self.scenario.sites[site].clock_skew_ms)
            .max(1)
    }

    fn step(&mut self, event: Event) {
        match event {
            Event::Write { site } => {
                if self.now >= self.scenario.workload_ms {
                    return;
                }
                if self.up[site] {
                    let doc = self.rng.random_range(0..self.scenario.documents);
                    let delete = self.rng.random_bool(self.scenario.delete_ratio.clamp(0.0, 1.0));
                    let id = format!("{doc:024x}");
                    let body = format!(
                        "{{\"by\":\"{}\",\"n\":{}}}",
                        self.replicas[site].name, self.report.writes
                    );
                    let physical = self.physical(site);
                    let c = self.replicas[site].write(&id, body.as_bytes(), delete, physical);
                    self.acked.push((c.origin, c.seq));
                    self.report.writes += 1;
                    self.local_advanced(site, usize::MAX);
                }
                let next = self.write_gap(site);
                self.schedule(next, Event::Write { site });
            }
            Event::Connect { link } => {
                self.links[link].reconnect_pending = false;
                self.connect(link);
            }
            Event::Drop { link, epoch } => {
                // Links flap only while the workload runs.
                if self.now < self.scenario.workload_ms
                    && self.links[link].epoch == epoch
                    && self.links[link].sessions.is_some()
                {
                    self.disconnect(link);
                }
            }
            Event::Deliver { link, epoch, to, frame } => {
                if self.links[link].epoch != epoch || self.links[link].sessions.is_none() {
                    return;
                }
                let out = self
                    .session(link, to)
                    .map(|s| s.handle(Input::Frame(frame), 0))
                    .unwrap_or_default();
                self.run_outputs(VecDeque::from([(link, to, out)]));
            }
            Event::FaultStart(i) => {
                let f = &self.scenario.faults[i];
                if let Some(groups) = &f.partition {
                    for l in self.links_between(groups) {
                        self.links[l].cut += 1;
                        self.disconnect(l);
                    }
                }
                if let Some(site) = &f.crash {
                    let s = self.scenario.site_index(site).unwrap_or(0);
                    self.up[s] = false;
                    for l in 0..self.links.len() {
                        if self.links[l].ends.contains(&s) {
                            self.disconnect(l);
                        }
                    }
                }
            }
            Event::FaultEnd(i) => {
                let f = &self.scenario.faults[i];
                if let Some(groups) = &f.partition {
                    for l in self.links_between(groups) {
                        self.links[l].cut = self.links[l].cut.saturating_sub(1);
                        self.reconnect_later(l);
                    }
                }
                if let Some(site) = &f.crash {
                    // Restart from durable state: the replica is what was committed.
                    let s = self.scenario.site_index(site).unwrap_or(0);
                    self.up[s] = true;
                    for l in 0..self.links.len() {
                        if self.links[l].ends.contains(&s) {
                            self.reconnect_later(l);
                        }
                    }
                }
            }
        }
    }

    fn links_between(&self, groups: &[Vec<String>; 2]) -> Vec<usize> {
        let names = |end: usize| self.scenario.sites[end].name.as_str();
        (0..self.links.len())
            .filter(|&l| {
                let [x, y] = self.links[l].ends;
                let in_group = |g: &Vec<String>, n: &str| g.iter().any(|m| m == n);
                (in_group(&groups[0], names(x)) && in_group(&groups[1], names(y)))
                    || (in_group(&groups[1], names(x)) && in_group(&groups[0], names(y)))
            })
            .collect()
    }

    fn session(&mut self, link: usize, end: usize) -> Option<&mut SyncSession> {
        self.links[link].sessions.as_mut().map(|s| &mut s[end])
    }

    fn connect(&mut self, link: usize) {
        let [x, y] = self.links[link].ends;
        if self.links[link].sessions.is_some() || self.links[link].cut > 0 || !self.up[x] || !self.up[y] {
            return;
        }
        let l = &mut self.links[link];
        l.epoch += 1;
        l.last_arrival = [self.now, self.now];
        let mut sx = SyncSession::new(
            self.config.clone(),
            self.replicas[x].name.clone(),
            self.replicas[x].vv(),
        );
        let mut sy = SyncSession::new(
            self.config.clone(),
            self.replicas[y].name.clone(),
            self.replicas[y].vv(),
        );
        let (ox, oy) = (sx.open(), sy.open());
        l.sessions = Some([sx, sy]);
        self.report.connections += 1;
        let spec = &self.scenario.links[link];
        if spec.drops_per_minute > 0.0 && self.now < self.scenario.workload_ms {
            // Exponential time to the next drop.
            let mean = 60_000.0 / spec.drops_per_minute;
            let u: f64 = self.rng.random_range(f64::EPSILON..1.0);
            let after = (-u.ln() * mean) as u64;
            let epoch = self.links[link].epoch;
            self.schedule(self.now + after.max(1), Event::Drop { link, epoch });
        }
        self.run_outputs(VecDeque::from([(link, 0, ox), (link, 1, oy)]));
    }

    fn disconnect(&mut self, link: usize) {
        if self.links[link].sessions.take().is_some() {
            self.links[link].epoch += 1;
        }
        self.reconnect_later(link);
    }

    fn reconnect_later(&mut self, link: usize) {
        if self.links[link].reconnect_pending {
            return;
        }
        self.links[link].reconnect_pending = true;
        let delay = self.between(self.scenario.links[link].reconnect_ms);
        self.schedule(self.now + delay, Event::Connect { link });
    }

    /// Tells every session at `site` (but the one on `except`) that its log grew.
    fn local_advanced(&mut self, site: usize, except: usize) {
        let vv = self.replicas[site].vv();
        let mut work = VecDeque::new();
        for l in 0..self.links.len() {
            if l == except {
                continue;
            }
            for end in 0..2 {
                if self.links[l].ends[end] != site {
                    continue;
                }
                if let Some(s) = self.session(l, end) {
                    let out = s.handle(Input::LocalAdvanced(vv.clone()), 0);
                    work.push_back((l, end, out));
                }
            }
        }
        self.run_outputs(work);
    }

    /// Carries out session outputs until none are left.
    fn run_outputs(&mut self, mut work: VecDeque<(usize, usize, Vec<Output>)>) {
        while let Some((link, end, outputs)) = work.pop_front() {
            let site = self.links[link].ends[end];
            for o in outputs {
                if self.links[link].sessions.is_none() {
                    break;
                }
                match o {
                    Output::Send(frame) => {
                        self.report.frames_sent += 1;
                        self.report.bytes_sent += frame.encoded_len() as u64;
                        if let Some(ocmesh_proto::federation::frame::Kind::Batch(b)) = &frame.kind {
                            self.report.changes_sent += b.changes.len() as u64;
                        }
                        let to = 1 - end;
                        let delay = self.between(self.scenario.links[link].latency_ms);
                        let at = (self.now + delay).max(self.links[link].last_arrival[to]);
                        self.links[link].last_arrival[to] = at;
                        let epoch = self.links[link].epoch;
                        self.schedule(at, Event::Deliver { link, epoch, to, frame });
                    }
                    Output::Fetch(req) => {
                        let changes = self.replicas[site].fetch(&req);
                        if let Some(s) = self.session(link, end) {
                            work.push_back((link, end, s.handle(Input::Fetched(changes), 0)));
                        }
                    }
                    Output::Apply { batch, changes } => {
                        let physical = self.physical(site);
                        match self.replicas[site].apply(changes, physical) {
                            Ok(fresh) => {
                                if fresh > 0 {
                                    self.last_sync_event = self.now;
                                }
                                let have = self.replicas[site].vv();
                                if let Some(s) = self.session(link, end) {
                                    work.push_back((link, end, s.handle(Input::Applied { batch, have }, 0)));
                                }
                                self.local_advanced(site, link);
                            }
                            Err(e) => {
                                self.report
                                    .anomalies
                                    .push(format!("{} refused a batch: {e}", self.replicas[site].name));
                                self.disconnect(link);
                            }
                        }
                    }
                    Output::PeerHas(_) => {}
                    Output::Close(e) => {
                        let who = &self.replicas[site].name;
                        self.report.anomalies.push(format!("{who} closed a session: {e}"));
                        self.disconnect(link);
                    }
                }
            }
        }
    }
}

/// The invariants every run must end with.
pub fn check(replicas: &[Replica], acked: &[(String, u64)], anomalies: &mut Vec<String>) {
    let Some(first) = replicas.first() else { return };
    let digest = first.digest();
    for r in replicas {
        if r.digest() != digest {
            anomalies.push(format!("replica {} differs from {} (state digest)", r.name, first.name));
        }
        let missing = acked.iter().filter(|(o, s)| r.change(o, *s).is_none()).count();
        if missing > 0 {
            anomalies.push(format!("replica {} lacks {missing} acknowledged writes", r.name));
        }
        for id in first.documents() {
            if r.history_len(id) != first.history_len(id) {
                anomalies.push(format!("replica {} has an incomplete history of {id}", r.name));
                break;
            }
        }
    }
}
