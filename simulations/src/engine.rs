//! The discrete-event engine: virtual time, one seeded RNG, and the same
//! `SyncSession` the federation shell runs, one pair per connected link.
//!
//! A link is one QUIC connection at a time. Its frames arrive in order, each
//! after a drawn latency but never before the frame sent ahead of it. Loss
//! shows as the connection dropping: frames in flight are gone, both
//! sessions end, and the link's dialer reconnects with the shell's jittered
//! exponential backoff, opening two new sessions with fresh hellos.

use std::cmp::Reverse;
use std::collections::{BTreeMap, BTreeSet, BinaryHeap, VecDeque};
use std::fmt;

use prost::Message;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use ocmesh_proto::federation::{Frame, frame::Kind};
use ocmesh_replication::{Input, Output, SessionConfig, SyncSession, VersionKey};

use crate::replica::Replica;
use crate::scenario::{Scenario, ScenarioError};
use crate::site::{Ctx, Journal, SimSite, SiteEvent};

/// A connection that lasted this long resets the dial backoff (the shell's
/// `STABLE_SESSION`).
const STABLE_SESSION_MS: u64 = 10_000;
/// What the sites' clocks read at virtual time 0 (November 2023), so that a
/// negative skew is simply an earlier time.
const EPOCH_MS: u64 = 1_700_000_000_000;

/// What one run found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Report {
    pub scenario: String,
    pub seed: u64,
    /// Every checker passed.
    pub ok: bool,
    /// The run went quiet before `max_ms` with every replica identical.
    pub converged: bool,
    /// Virtual ms from the end of the workload and faults until the last
    /// change reached its last replica; `None` unless converged.
    pub convergence_ms: Option<u64>,
    /// Local writes the sites made (and so acknowledged).
    pub writes: u64,
    pub changes_sent: u64,
    pub frames_sent: u64,
    /// Encoded size of every frame sent.
    pub bytes_sent: u64,
    pub connections: u64,
    /// Received changes a site already held.
    pub duplicates: u64,
    /// Received changes stamped beyond the clock drift bound.
    pub clock_clamped: u64,
    /// Local writes refused because a peer stamped the document beyond the
    /// drift bound (`WriteError::ClockBehind`, node backend).
    pub clock_refused: u64,
    pub events: u64,
    /// Work items pushed, completions, and operator takeovers (node backend).
    pub workitems: u64,
    pub completions: u64,
    pub takeovers: u64,
    /// Per site, its state digest at the end.
    pub digests: Vec<(String, u64)>,
    pub anomalies: Vec<String>,
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let verdict = if self.ok { "ok" } else { "FAILED" };
        writeln!(f, "scenario {} seed {}: {verdict}", self.scenario, self.seed)?;
        match self.convergence_ms {
            Some(ms) => writeln!(f, "  converged {ms} ms (virtual) after the workload and faults ended")?,
            None => writeln!(f, "  did not converge")?,
        }
        writeln!(
            f,
            "  {} writes; {} changes, {} frames, {} bytes sent; {} connections; {} duplicates; {} events",
            self.writes,
            self.changes_sent,
            self.frames_sent,
            self.bytes_sent,
            self.connections,
            self.duplicates,
            self.events
        )?;
        if self.workitems > 0 {
            writeln!(
                f,
                "  {} work items pushed, {} completions, {} takeovers",
                self.workitems, self.completions, self.takeovers
            )?;
        }
        if self.clock_clamped > 0 {
            writeln!(
                f,
                "  {} changes stamped beyond the clock drift bound",
                self.clock_clamped
            )?;
        }
        if self.clock_refused > 0 {
            writeln!(
                f,
                "  {} local writes refused: their document was stamped beyond the drift bound",
                self.clock_refused
            )?;
        }
        for a in &self.anomalies {
            writeln!(f, "  anomaly: {a}")?;
        }
        Ok(())
    }
}

#[derive(Debug)]
enum Event {
    /// A site's next local write.
    Write {
        site: usize,
    },
    /// The link's dialer tries to connect; stale unless `attempt` is current.
    Dial {
        link: usize,
        attempt: u64,
    },
    /// A frame of connection `conn` reaches end `to`.
    Deliver {
        link: usize,
        conn: u64,
        to: usize,
        frame: Frame,
    },
    /// Connection `conn` of a flaky link drops.
    Drop {
        link: usize,
        conn: u64,
    },
    FaultStart(usize),
    FaultEnd(usize),
    /// Something a site scheduled for itself; stale if the site restarted since.
    Site {
        site: usize,
        event: SiteEvent,
    },
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
    /// The two sessions while connected.
    sessions: Option<[SyncSession; 2]>,
    /// Number of the current (or last) connection; frames of older ones are dropped.
    conn: u64,
    connected_at: u64,
    /// Latest arrival scheduled towards each end (keeps a connection's frames in order).
    last_arrival: [u64; 2],
    /// The dialer: current attempt number and backoff.
    attempt: u64,
    backoff_ms: u64,
}

/// A fault with its names resolved.
#[derive(Debug)]
struct FaultPlan {
    links: Vec<usize>,
    crash: Option<usize>,
}

/// A simulation in progress.
#[derive(Debug)]
pub struct Sim<'s, S: SimSite = Replica> {
    scenario: &'s Scenario,
    rng: StdRng,
    now: u64,
    seq: u64,
    queue: BinaryHeap<Reverse<Scheduled>>,
    replicas: Vec<S>,
    names: Vec<String>,
    /// Active crashes per site; a site runs when this is 0.
    down: Vec<u32>,
    links: Vec<Link>,
    faults: Vec<FaultPlan>,
    config: SessionConfig,
    /// What the sites did, for the checkers.
    journal: Journal,
    /// When a change last reached a replica that lacked it.
    last_fresh_apply: u64,
    report: Report,
}

impl<'s, S: SimSite> Sim<'s, S> {
    /// Sets up the sites, links and schedule. A scenario that fails
    /// `Scenario::validate` gives a run that does nothing and reports why.
    pub fn new(scenario: &'s Scenario, seed: u64) -> Self {
        let mut sim = Sim {
            scenario,
            rng: StdRng::seed_from_u64(seed),
            now: 0,
            seq: 0,
            queue: BinaryHeap::new(),
            replicas: Vec::new(),
            names: scenario.sites.iter().map(|s| s.name.clone()).collect(),
            down: vec![0; scenario.sites.len()],
            links: Vec::new(),
            faults: Vec::new(),
            config: SessionConfig {
                max_batch_changes: scenario.batch_changes,
                ..SessionConfig::default()
            },
            journal: Journal::default(),
            last_fresh_apply: 0,
            report: Report {
                scenario: scenario.name.clone(),
                seed,
                ok: false,
                converged: false,
                convergence_ms: None,
                writes: 0,
                changes_sent: 0,
                frames_sent: 0,
                bytes_sent: 0,
                connections: 0,
                duplicates: 0,
                clock_clamped: 0,
                clock_refused: 0,
                events: 0,
                workitems: 0,
                completions: 0,
                takeovers: 0,
                digests: Vec::new(),
                anomalies: Vec::new(),
            },
        };
        let (ends, faults) = match plan(scenario) {
            Ok(p) => p,
            Err(e) => {
                sim.report.anomalies.push(format!("invalid scenario: {e}"));
                return sim;
            }
        };
        sim.faults = faults;
        for i in 0..scenario.sites.len() {
            match S::create(scenario, i, seed, sim.physical(i)) {
                Ok(site) => sim.replicas.push(site),
                Err(e) => {
                    sim.report
                        .anomalies
                        .push(format!("site {} does not open: {e}", scenario.sites[i].name));
                    return sim;
                }
            }
        }
        for (i, ends) in ends.into_iter().enumerate() {
            sim.links.push(Link {
                ends,
                cut: 0,
                sessions: None,
                conn: 0,
                connected_at: 0,
                last_arrival: [0, 0],
                attempt: 0,
                backoff_ms: scenario.links[i].reconnect_ms[0],
            });
            sim.dial_now(i);
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

    /// Runs until nothing is left to happen (or `max_ms`), then checks the
    /// invariants. Returns the replicas too, for inspection.
    pub fn run(mut self) -> (Report, Vec<S>) {
        let valid = self.report.anomalies.is_empty();
        if !valid {
            return (self.report, self.replicas);
        }
        let mut quiet = true;
        while let Some(Reverse(next)) = self.queue.pop() {
            if next.at > self.scenario.max_ms {
                quiet = false;
                break;
            }
            self.now = next.at;
            self.report.events += 1;
            self.step(next.event);
        }
        if quiet {
            self.check_sessions_idle();
        } else {
            let limit = self.scenario.max_ms;
            self.report
                .anomalies
                .push(format!("still syncing at the {limit} ms limit"));
        }
        // A site still down at the end restarts, so that it can be checked.
        for site in 0..self.replicas.len() {
            if !self.up(site) {
                let physical = self.physical(site);
                if let Err(e) = self.replicas[site].restart(physical) {
                    self.report
                        .anomalies
                        .push(format!("{} does not restart: {e}", self.names[site]));
                }
            }
        }
        S::check(&self.replicas, &self.journal, &mut self.report.anomalies);
        let digests: Vec<(String, u64)> = self
            .replicas
            .iter()
            .map(|x| (x.name().to_owned(), x.digest().unwrap_or(0)))
            .collect();
        let identical = digests.windows(2).all(|w| w[0].1 == w[1].1);
        let r = &mut self.report;
        r.digests = digests;
        r.writes = self.journal.writes;
        r.workitems = self.journal.pushed.len() as u64;
        r.completions = self.journal.completions.values().map(|c| c.len() as u64).sum();
        r.takeovers = self.journal.takeovers.len() as u64;
        r.clock_refused = self.journal.clock_refused;
        r.converged = valid && quiet && identical;
        r.convergence_ms = r
            .converged
            .then(|| self.last_fresh_apply.saturating_sub(self.scenario.heal_ms()));
        r.ok = r.anomalies.is_empty();
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

    /// The site's skewed wall clock.
    fn physical(&self, site: usize) -> u64 {
        (EPOCH_MS + self.now).saturating_add_signed(self.scenario.sites[site].clock_skew_ms)
    }

    fn up(&self, site: usize) -> bool {
        self.down[site] == 0
    }

    fn step(&mut self, event: Event) {
        match event {
            Event::Write { site } => {
                if self.now >= self.scenario.workload_ms {
                    return;
                }
                if self.up(site) {
                    self.site_step(site, None);
                }
                let next = self.write_gap(site);
                self.schedule(next, Event::Write { site });
            }
            Event::Site { site, event } => {
                if self.up(site) {
                    self.site_step(site, Some(event));
                }
            }
            Event::Dial { link, attempt } => {
                let l = &self.links[link];
                if attempt != l.attempt || l.sessions.is_some() {
                    return;
                }
                let [x, y] = l.ends;
                if l.cut > 0 || !self.up(x) || !self.up(y) {
                    self.dial_later(link);
                } else {
                    self.connect(link);
                }
            }
            Event::Drop { link, conn } => {
                // Links flap only while the workload runs.
                if self.now < self.scenario.workload_ms && self.connected(link, conn) {
                    self.disconnect(link);
                }
            }
            Event::Deliver { link, conn, to, frame } => {
                if !self.connected(link, conn) {
                    return;
                }
                let now = self.now;
                let out = self
                    .session(link, to)
                    .map(|s| s.handle(Input::Frame(frame), now))
                    .unwrap_or_default();
                self.run_outputs(VecDeque::from([(link, to, out)]));
            }
            Event::FaultStart(i) => {
                for l in self.faults[i].links.clone() {
                    self.links[l].cut += 1;
                    self.disconnect(l);
                }
                if let Some(site) = self.faults[i].crash {
                    // In-flight sessions are lost, and whatever the site
                    // had not made durable.
                    if self.up(site) {
                        self.replicas[site].crash();
                    }
                    self.down[site] += 1;
                    for l in self.links_of(site) {
                        self.disconnect(l);
                    }
                }
            }
            Event::FaultEnd(i) => {
                // Cut links come back when their dialer next tries.
                for l in self.faults[i].links.clone() {
                    self.links[l].cut = self.links[l].cut.saturating_sub(1);
                }
                if let Some(site) = self.faults[i].crash {
                    self.down[site] = self.down[site].saturating_sub(1);
                    if self.up(site) {
                        let physical = self.physical(site);
                        if let Err(e) = self.replicas[site].restart(physical) {
                            let who = &self.names[site];
                            self.report.anomalies.push(format!("{who} does not restart: {e}"));
                        }
                        self.received(site);
                        // A restarted site dials its peers at once.
                        for l in self.links_of(site) {
                            self.dial_now(l);
                        }
                    }
                }
            }
        }
    }

    /// A local action (`None`) or a scheduled site event; tells the
    /// site's sessions if its log grew.
    fn site_step(&mut self, site: usize, event: Option<SiteEvent>) {
        let before = self.replicas[site].vv();
        let r = self.in_site(site, |s, ctx| match event {
            None => s.act(ctx),
            Some(e) => s.event(e, ctx),
        });
        if let Err(e) = r {
            let who = &self.names[site];
            self.report.anomalies.push(format!("{who}: {e}"));
        }
        if self.replicas[site].vv() != before {
            self.local_advanced(site, None);
        }
    }

    /// Runs `f` on `site` with a context for this instant, then schedules
    /// the events it asked for.
    fn in_site<R>(&mut self, site: usize, f: impl FnOnce(&mut S, &mut Ctx<'_>) -> R) -> R {
        let physical = self.physical(site);
        let mut ctx = Ctx {
            rng: &mut self.rng,
            scenario: self.scenario,
            now: self.now,
            physical,
            journal: &mut self.journal,
            later: Vec::new(),
            sites: &self.names,
        };
        let r = f(&mut self.replicas[site], &mut ctx);
        let later = std::mem::take(&mut ctx.later);
        for (delay, event) in later {
            self.schedule(self.now + delay, Event::Site { site, event });
        }
        r
    }

    /// Fresh changes reached `site` (or it restarted): let it look at its queue.
    fn received(&mut self, site: usize) {
        self.in_site(site, |s, ctx| s.received(ctx));
    }

    fn links_of(&self, site: usize) -> Vec<usize> {
        (0..self.links.len())
            .filter(|&l| self.links[l].ends.contains(&site))
            .collect()
    }

    fn connected(&self, link: usize, conn: u64) -> bool {
        self.links[link].conn == conn && self.links[link].sessions.is_some()
    }

    fn session(&mut self, link: usize, end: usize) -> Option<&mut SyncSession> {
        self.links[link].sessions.as_mut().map(|s| &mut s[end])
    }

    /// Dials now with the backoff reset (start-up, restart).
    fn dial_now(&mut self, link: usize) {
        if self.links[link].sessions.is_some() {
            return;
        }
        let l = &mut self.links[link];
        l.backoff_ms = self.scenario.links[link].reconnect_ms[0];
        l.attempt += 1;
        let attempt = l.attempt;
        self.schedule(self.now, Event::Dial { link, attempt });
    }

    /// Dials after the shell's wait: drawn from [b/2, b], then b doubles up to the max.
    fn dial_later(&mut self, link: usize) {
        let max = self.scenario.links[link].reconnect_ms[1];
        let b = self.links[link].backoff_ms;
        let wait = self.rng.random_range(b / 2..=b);
        let l = &mut self.links[link];
        l.backoff_ms = b.saturating_mul(2).min(max);
        l.attempt += 1;
        let attempt = l.attempt;
        self.schedule(self.now + wait, Event::Dial { link, attempt });
    }

    fn connect(&mut self, link: usize) {
        let [x, y] = self.links[link].ends;
        let mut sx = SyncSession::new(self.config.clone(), self.names[x].clone(), self.replicas[x].vv());
        let mut sy = SyncSession::new(self.config.clone(), self.names[y].clone(), self.replicas[y].vv());
        let (ox, oy) = (sx.open(), sy.open());
        let l = &mut self.links[link];
        l.sessions = Some([sx, sy]);
        l.conn += 1;
        l.connected_at = self.now;
        l.last_arrival = [self.now, self.now];
        let conn = l.conn;
        self.report.connections += 1;
        let rate = self.scenario.links[link].drops_per_minute;
        if rate > 0.0 && self.now < self.scenario.workload_ms {
            // Exponential lifetime; 1 - u lies in (0, 1], so ln is finite.
            let u: f64 = self.rng.random();
            let after = (-(1.0 - u).ln() * 60_000.0 / rate) as u64;
            self.schedule(self.now + after.max(1), Event::Drop { link, conn });
        }
        self.run_outputs(VecDeque::from([(link, 0, ox), (link, 1, oy)]));
    }

    fn disconnect(&mut self, link: usize) {
        let l = &mut self.links[link];
        if l.sessions.take().is_none() {
            return; // already down: its dialer is running
        }
        if self.now - l.connected_at >= STABLE_SESSION_MS {
            l.backoff_ms = self.scenario.links[link].reconnect_ms[0];
        }
        self.dial_later(link);
    }

    /// Tells every session at `site` (but the one on `except`) that its log grew.
    fn local_advanced(&mut self, site: usize, except: Option<usize>) {
        let vv = self.replicas[site].vv();
        let now = self.now;
        let mut work = VecDeque::new();
        for l in self.links_of(site) {
            if Some(l) == except {
                continue;
            }
            let end = usize::from(self.links[l].ends[1] == site);
            if let Some(s) = self.session(l, end) {
                work.push_back((l, end, s.handle(Input::LocalAdvanced(vv.clone()), now)));
            }
        }
        self.run_outputs(work);
    }

    /// Carries out session outputs until none are left.
    fn run_outputs(&mut self, mut work: VecDeque<(usize, usize, Vec<Output>)>) {
        let now = self.now;
        while let Some((link, end, outputs)) = work.pop_front() {
            let site = self.links[link].ends[end];
            for o in outputs {
                if self.links[link].sessions.is_none() {
                    break;
                }
                match o {
                    Output::Send(frame) => self.send(link, end, frame),
                    Output::Fetch(req) => {
                        let physical = self.physical(site);
                        match self.replicas[site].fetch(&req, physical) {
                            Ok(changes) => {
                                if let Some(s) = self.session(link, end) {
                                    work.push_back((link, end, s.handle(Input::Fetched(changes), now)));
                                }
                            }
                            Err(e) => {
                                let who = &self.names[site];
                                self.report.anomalies.push(format!("{who} cannot read its log: {e}"));
                                self.disconnect(link);
                            }
                        }
                    }
                    Output::Apply { batch, changes } => {
                        // Durable once applied: a crash after this keeps the batch.
                        let physical = self.physical(site);
                        match self.replicas[site].apply(changes, physical) {
                            Ok(applied) => {
                                self.report.duplicates += applied.duplicates;
                                self.report.clock_clamped += applied.clock_clamped;
                                let fresh = applied.fresh;
                                if fresh > 0 {
                                    self.last_fresh_apply = now;
                                }
                                let have = self.replicas[site].vv();
                                if let Some(s) = self.session(link, end) {
                                    work.push_back((link, end, s.handle(Input::Applied { batch, have }, now)));
                                }
                                if fresh > 0 {
                                    self.local_advanced(site, Some(link));
                                    self.received(site);
                                }
                            }
                            Err(e) => {
                                let who = &self.names[site];
                                self.report.anomalies.push(format!("{who} refused a batch: {e}"));
                                self.disconnect(link);
                            }
                        }
                    }
                    Output::PeerHas(_) => {}
                    // Simulated sites share everything, so no hello lists
                    // withheld ranges and none are ever asked for; an ask
                    // is answered with nothing, which ends it.
                    Output::FetchRanges(_) => {
                        if let Some(s) = self.session(link, end) {
                            work.push_back((link, end, s.handle(Input::FetchedRanges(Vec::new()), now)));
                        }
                    }
                    // Simulated sites hold no file content: nothing is ever
                    // asked for, and an ask is answered "missing".
                    Output::ReadChunk(hash) => {
                        if let Some(s) = self.session(link, end) {
                            work.push_back((link, end, s.handle(Input::ChunkRead { hash, data: None }, now)));
                        }
                    }
                    Output::StoreChunk { .. } => {}
                    Output::Close(e) => {
                        let who = &self.names[site];
                        self.report.anomalies.push(format!("{who} closed a session: {e}"));
                        self.disconnect(link);
                    }
                }
            }
        }
    }

    fn send(&mut self, link: usize, end: usize, frame: Frame) {
        self.report.frames_sent += 1;
        self.report.bytes_sent += frame.encoded_len() as u64;
        if let Some(Kind::Batch(b)) = &frame.kind {
            self.report.changes_sent += b.changes.len() as u64;
        }
        let to = 1 - end;
        let delay = self.between(self.scenario.links[link].latency_ms);
        let l = &mut self.links[link];
        let at = (self.now + delay).max(l.last_arrival[to]);
        l.last_arrival[to] = at;
        let conn = l.conn;
        self.schedule(at, Event::Deliver { link, conn, to, frame });
    }

    /// With nothing left in flight, every session must be idle: one that is
    /// not is stuck.
    fn check_sessions_idle(&mut self) {
        for l in &self.links {
            let Some(sessions) = &l.sessions else { continue };
            for (end, s) in sessions.iter().enumerate() {
                if !s.is_idle() {
                    let (a, b) = (&self.names[l.ends[end]], &self.names[l.ends[1 - end]]);
                    self.report
                        .anomalies
                        .push(format!("session {a}->{b} is not idle with nothing in flight"));
                }
            }
        }
    }
}

/// Resolves the scenario's names: link ends, and per fault the links it
/// cuts and the site it crashes.
fn plan(scenario: &Scenario) -> Result<(Vec<[usize; 2]>, Vec<FaultPlan>), ScenarioError> {
    scenario.validate()?;
    let ends = scenario
        .links
        .iter()
        .map(|l| Ok([scenario.site_index(&l.a)?, scenario.site_index(&l.b)?]))
        .collect::<Result<Vec<_>, ScenarioError>>()?;
    let mut faults = Vec::new();
    for f in &scenario.faults {
        let mut links = Vec::new();
        if let Some([g0, g1]) = &f.partition {
            let indexes = |g: &Vec<String>| g.iter().map(|n| scenario.site_index(n)).collect::<Result<Vec<_>, _>>();
            let (g0, g1) = (indexes(g0)?, indexes(g1)?);
            for (i, [x, y]) in ends.iter().enumerate() {
                if (g0.contains(x) && g1.contains(y)) || (g1.contains(x) && g0.contains(y)) {
                    links.push(i);
                }
            }
        }
        let crash = f.crash.as_deref().map(|n| scenario.site_index(n)).transpose()?;
        faults.push(FaultPlan { links, crash });
    }
    Ok((ends, faults))
}

/// The invariants every run must end with; each broken one adds an anomaly.
///
/// - every replica has the same state digest (current documents and full histories);
/// - every acknowledged write, `(origin, seq)`, is in every replica's log;
/// - every replica holds every version any replica holds;
/// - every document's current version is the same everywhere.
pub fn check(replicas: &[Replica], acked: &[(String, u64)], anomalies: &mut Vec<String>) {
    let Some(first) = replicas.first() else { return };
    let mut all: BTreeMap<&str, BTreeSet<&VersionKey>> = BTreeMap::new();
    for r in replicas {
        for id in r.documents() {
            all.entry(id).or_default().extend(r.versions(id));
        }
    }
    let digest = first.digest();
    for r in replicas {
        if r.digest() != digest {
            anomalies.push(format!("replica {} differs from {} (state digest)", r.name, first.name));
        }
        let missing = acked.iter().filter(|(o, s)| r.change(o, *s).is_none()).count();
        if missing > 0 {
            anomalies.push(format!("replica {} lacks {missing} acknowledged writes", r.name));
        }
        let incomplete = all.iter().filter(|(id, keys)| r.history_len(id) < keys.len()).count();
        if incomplete > 0 {
            anomalies.push(format!("replica {} lacks versions of {incomplete} documents", r.name));
        }
        let disagree = all
            .keys()
            .filter(|id| r.current_version(id) != first.current_version(id) || r.current(id) != first.current(id))
            .count();
        if disagree > 0 {
            anomalies.push(format!(
                "replicas {} and {} disagree on the current version of {disagree} documents",
                r.name, first.name
            ));
        }
    }
}
