//! The sync session driven with no I/O: in-memory logs, frames carried by
//! hand, every delivery order chosen by the test.

use std::collections::{BTreeMap, VecDeque};

use proptest::prelude::*;
use prost::Message;

use super::*;
use crate::change::ChangeKind;
use crate::withheld::RangeSet;

/// A site's log in memory: per origin, its changes in sequence order.
#[derive(Default)]
struct MemLog {
    name: String,
    by_origin: BTreeMap<String, Vec<Change>>,
    /// Changes offered to `apply` that were already held.
    duplicates: u64,
    /// File chunks held, by hash.
    chunks: BTreeMap<crate::chunks::Hash, Vec<u8>>,
    /// Changes held only as stubs.
    withheld: RangeSet,
}

impl MemLog {
    fn new(name: &str) -> Self {
        MemLog {
            name: name.into(),
            ..Default::default()
        }
    }

    fn vv(&self) -> VersionVector {
        self.by_origin
            .iter()
            .map(|(o, cs)| (o.clone(), cs.len() as u64))
            .collect()
    }

    fn write(&mut self, n: usize) {
        for _ in 0..n {
            let log = self.by_origin.entry(self.name.clone()).or_default();
            let seq = log.len() as u64 + 1;
            log.push(Change {
                origin: self.name.clone(),
                seq,
                hlc: seq,
                kind: ChangeKind::Insert as i32,
                collection: "entities".into(),
                doc_id: format!("{:024x}", seq),
                body: vec![b'x'; 100],
                author: "admin".into(),
                ..Default::default()
            });
        }
    }

    /// Writes one document whose `_acl` denies read to `denied` (a
    /// principal id) when given; its body holds `marker`.
    fn write_doc(&mut self, denied: Option<&str>, marker: &str) {
        let log = self.by_origin.entry(self.name.clone()).or_default();
        let seq = log.len() as u64 + 1;
        let acl = match denied {
            Some(who) => serde_json::json!([{"_id": who, "rights": 2, "deny": true}]),
            None => serde_json::json!([{"_id": "u", "rights": 65535}]),
        };
        log.push(Change {
            origin: self.name.clone(),
            seq,
            hlc: seq,
            kind: ChangeKind::Insert as i32,
            collection: "entities".into(),
            doc_id: format!("{:024x}", seq),
            body: serde_json::to_vec(&serde_json::json!({"marker": marker, "_acl": acl})).expect("json"),
            author: "u".into(),
            ..Default::default()
        });
    }

    fn fetch_ranges(&self, req: &RangeRequest) -> Vec<Change> {
        let mut out = Vec::new();
        let mut bytes = 0;
        for (origin, first, last) in &req.ranges {
            let Some(cs) = self.by_origin.get(origin) else { continue };
            for c in cs.iter().filter(|c| (*first..=*last).contains(&c.seq)) {
                if out.len() >= req.max_changes || (bytes > 0 && bytes + c.body.len() > req.max_bytes) {
                    return out;
                }
                bytes += c.body.len();
                out.push(c.clone());
            }
        }
        out
    }

    fn fetch(&self, req: &FetchRequest) -> Vec<Change> {
        let mut out = Vec::new();
        let mut bytes = 0;
        for (origin, cs) in &self.by_origin {
            for c in cs.iter().skip(req.after.get(origin) as usize) {
                if out.len() >= req.max_changes || (bytes > 0 && bytes + c.body.len() > req.max_bytes) {
                    return out;
                }
                bytes += c.body.len();
                out.push(c.clone());
            }
        }
        out
    }

    /// Applies a batch; returns the stubs it logged and the stubs it filled.
    fn apply(&mut self, changes: Vec<Change>) -> (RangeSet, RangeSet) {
        let (mut stubs, mut filled) = (RangeSet::new(), RangeSet::new());
        for c in changes {
            let log = self.by_origin.entry(c.origin.clone()).or_default();
            let held = log.len() as u64;
            if c.seq <= held {
                if !c.withheld && self.withheld.remove(&c.origin, c.seq) {
                    filled.insert(&c.origin, c.seq);
                    let at = (c.seq - 1) as usize;
                    log[at] = c;
                } else {
                    self.duplicates += 1;
                }
            } else {
                assert_eq!(c.seq, held + 1, "gap applying {}:{} at {}", c.origin, c.seq, self.name);
                if c.withheld {
                    self.withheld.insert(&c.origin, c.seq);
                    stubs.insert(&c.origin, c.seq);
                }
                log.push(c);
            }
        }
        (stubs, filled)
    }
}

/// One direction of a link: frames in flight, in order (a QUIC stream).
type Wire = VecDeque<pb::Frame>;

/// A link between sites `a` and `b`: a session at each end and a wire each way.
struct Link {
    a: usize,
    b: usize,
    session_a: SyncSession,
    session_b: SyncSession,
    to_a: Wire,
    to_b: Wire,
    bytes: usize,
    frames: usize,
    closed: Vec<SessionError>,
    /// Every frame sent towards b, and towards a, encoded.
    sent_to_b: Vec<Vec<u8>>,
    sent_to_a: Vec<Vec<u8>>,
    /// Batches each end's store has made durable and not yet answered,
    /// oldest first, with the stubs they logged and filled (pipelined
    /// stores only).
    durable_a: VecDeque<(u64, RangeSet, RangeSet)>,
    durable_b: VecDeque<(u64, RangeSet, RangeSet)>,
    /// Last batch each end acknowledged.
    acked_by_a: u64,
    acked_by_b: u64,
}

/// A batch handed to a site's store and not yet durable.
struct Queued {
    link: usize,
    at_a: bool,
    batch: u64,
    changes: Vec<Change>,
}

struct Net {
    logs: Vec<MemLog>,
    links: Vec<Link>,
    config: SessionConfig,
    max_in_flight_seen: u64,
    /// Stores as the node's: `Apply` only queues a batch on its site's
    /// writer (one FIFO queue per site, shared by its sessions); the
    /// writer makes the oldest durable at `store_step`, and the session
    /// hears of it at `answer`, in order, with the vector held then.
    pipelined: bool,
    writers: Vec<VecDeque<Queued>>,
    max_applying_seen: u64,
}

impl Net {
    fn new(names: &[&str], config: SessionConfig) -> Self {
        Net {
            logs: names.iter().map(|n| MemLog::new(n)).collect(),
            links: Vec::new(),
            config,
            max_in_flight_seen: 0,
            pipelined: false,
            writers: names.iter().map(|_| VecDeque::new()).collect(),
            max_applying_seen: 0,
        }
    }

    fn pipelined(names: &[&str], config: SessionConfig) -> Self {
        Net {
            pipelined: true,
            ..Net::new(names, config)
        }
    }

    /// The writer of `site` makes its oldest queued batch durable; true if
    /// there was one. Other sessions see the log grow at once, as they
    /// see the node's version vector.
    fn store_step(&mut self, site: usize) -> bool {
        let Some(q) = self.writers[site].pop_front() else {
            return false;
        };
        let (stubs, filled) = self.logs[site].apply(q.changes);
        let link = &mut self.links[q.link];
        let durable = if q.at_a {
            &mut link.durable_a
        } else {
            &mut link.durable_b
        };
        durable.push_back((q.batch, stubs, filled));
        self.advance_others(site, q.link);
        true
    }

    /// The session at one end of link `l` hears that its oldest batch is
    /// durable; true if one was.
    fn answer(&mut self, l: usize, at_a: bool) -> bool {
        let link = &mut self.links[l];
        let (site, durable) = if at_a {
            (link.a, &mut link.durable_a)
        } else {
            (link.b, &mut link.durable_b)
        };
        let Some((batch, stubs, filled)) = durable.pop_front() else {
            return false;
        };
        // What the site holds now: later batches may be durable already.
        let have = self.logs[site].vv();
        let out = self.session(l, at_a).handle(Input::Applied { batch, have }, 0);
        self.notify_others(site, l, &stubs, &filled);
        self.run_outputs(l, at_a, out);
        true
    }

    fn connect(&mut self, a: usize, b: usize) {
        self.connect_with(a, b, PeerPolicy::default(), PeerPolicy::default());
    }

    /// Links `a` and `b`; `a_to_b` says what a may share with b.
    fn connect_with(&mut self, a: usize, b: usize, a_to_b: PeerPolicy, b_to_a: PeerPolicy) {
        let mut session_a = SyncSession::new(self.config.clone(), self.logs[a].name.clone(), self.logs[a].vv())
            .with_policy(a_to_b)
            .with_withheld(self.logs[a].withheld.clone());
        let mut session_b = SyncSession::new(self.config.clone(), self.logs[b].name.clone(), self.logs[b].vv())
            .with_policy(b_to_a)
            .with_withheld(self.logs[b].withheld.clone());
        let mut link = Link {
            a,
            b,
            to_a: Wire::new(),
            to_b: Wire::new(),
            bytes: 0,
            frames: 0,
            closed: Vec::new(),
            sent_to_b: Vec::new(),
            sent_to_a: Vec::new(),
            durable_a: VecDeque::new(),
            durable_b: VecDeque::new(),
            acked_by_a: 0,
            acked_by_b: 0,
            session_a: SyncSession::new(self.config.clone(), "", VersionVector::new()),
            session_b: SyncSession::new(self.config.clone(), "", VersionVector::new()),
        };
        let oa = session_a.open();
        let ob = session_b.open();
        link.session_a = session_a;
        link.session_b = session_b;
        self.links.push(link);
        let l = self.links.len() - 1;
        self.run_outputs(l, true, oa);
        self.run_outputs(l, false, ob);
    }

    /// Carries out a session's outputs; `at_a` says which end produced them.
    fn run_outputs(&mut self, l: usize, at_a: bool, outputs: Vec<Output>) {
        let mut queue: VecDeque<Output> = outputs.into();
        while let Some(o) = queue.pop_front() {
            let site = if at_a { self.links[l].a } else { self.links[l].b };
            let more = match o {
                Output::Send(f) => {
                    let link = &mut self.links[l];
                    if let Some(Kind::Ack(ack)) = &f.kind {
                        let last = if at_a {
                            &mut link.acked_by_a
                        } else {
                            &mut link.acked_by_b
                        };
                        assert_eq!(ack.batch, *last + 1, "acks in batch order, one per batch");
                        *last = ack.batch;
                    }
                    link.bytes += f.encoded_len();
                    link.frames += 1;
                    if at_a {
                        link.sent_to_b.push(f.encode_to_vec());
                        link.to_b.push_back(f)
                    } else {
                        link.sent_to_a.push(f.encode_to_vec());
                        link.to_a.push_back(f)
                    }
                    Vec::new()
                }
                Output::Fetch(req) => {
                    let got = self.logs[site].fetch(&req);
                    assert!(got.len() <= req.max_changes);
                    self.session(l, at_a).handle(Input::Fetched(got), 0)
                }
                Output::FetchRanges(req) => {
                    let got = self.logs[site].fetch_ranges(&req);
                    assert!(got.len() <= req.max_changes);
                    self.session(l, at_a).handle(Input::FetchedRanges(got), 0)
                }
                Output::Apply { batch, changes } if self.pipelined => {
                    self.writers[site].push_back(Queued {
                        link: l,
                        at_a,
                        batch,
                        changes,
                    });
                    Vec::new()
                }
                Output::Apply { batch, changes } => {
                    let (stubs, filled) = self.logs[site].apply(changes);
                    let have = self.logs[site].vv();
                    let out = self.session(l, at_a).handle(
                        Input::Applied {
                            batch,
                            have: have.clone(),
                        },
                        0,
                    );
                    // Notices first: an ask may then reach a peer before
                    // the stub does, and wait there.
                    self.notify_others(site, l, &stubs, &filled);
                    self.advance_others(site, l);
                    out
                }
                Output::PeerHas(_) => Vec::new(),
                Output::ReadChunk(hash) => {
                    let data = self.logs[site].chunks.get(&hash).cloned();
                    self.session(l, at_a).handle(Input::ChunkRead { hash, data }, 0)
                }
                Output::StoreChunk { hash, data } => {
                    self.logs[site].chunks.insert(hash, data);
                    Vec::new()
                }
                Output::Close(e) => {
                    self.links[l].closed.push(e);
                    Vec::new()
                }
            };
            queue.extend(more);
            let s = self.session(l, at_a);
            let in_flight = s.last_batch_sent - s.last_batch_acked;
            let applying = s.applying();
            self.max_in_flight_seen = self.max_in_flight_seen.max(in_flight);
            self.max_applying_seen = self.max_applying_seen.max(applying);
        }
    }

    fn session(&mut self, l: usize, at_a: bool) -> &mut SyncSession {
        if at_a {
            &mut self.links[l].session_a
        } else {
            &mut self.links[l].session_b
        }
    }

    /// Tells every other session at `site` that its log grew.
    fn advance_others(&mut self, site: usize, except: usize) {
        let have = self.logs[site].vv();
        for l in 0..self.links.len() {
            if l == except {
                continue;
            }
            for at_a in [true, false] {
                let end = if at_a { self.links[l].a } else { self.links[l].b };
                if end == site {
                    let out = self.session(l, at_a).handle(Input::LocalAdvanced(have.clone()), 0);
                    self.run_outputs(l, at_a, out);
                }
            }
        }
    }

    /// Tells every other session at `site` of stubs received and filled.
    fn notify_others(&mut self, site: usize, except: usize, stubs: &RangeSet, filled: &RangeSet) {
        if stubs.is_empty() && filled.is_empty() {
            return;
        }
        for l in 0..self.links.len() {
            if l == except {
                continue;
            }
            for at_a in [true, false] {
                let end = if at_a { self.links[l].a } else { self.links[l].b };
                if end == site {
                    let mut out = Vec::new();
                    if !stubs.is_empty() {
                        out.extend(self.session(l, at_a).handle(Input::LocalWithheld(stubs.clone()), 0));
                    }
                    if !filled.is_empty() {
                        out.extend(self.session(l, at_a).handle(Input::Offer(filled.clone()), 0));
                    }
                    self.run_outputs(l, at_a, out);
                }
            }
        }
    }

    fn write(&mut self, site: usize, n: usize) {
        self.logs[site].write(n);
        self.advance_others(site, usize::MAX);
    }

    /// Delivers one frame on link `l` towards `to_a` if any; true if it did.
    /// A pipelined store's session takes no frame while its share of the
    /// store is full, as the shell does.
    fn deliver(&mut self, l: usize, to_a: bool) -> bool {
        if self.pipelined && !self.session(l, to_a).accepts_frames() {
            return false;
        }
        let link = &mut self.links[l];
        let Some(f) = (if to_a {
            link.to_a.pop_front()
        } else {
            link.to_b.pop_front()
        }) else {
            return false;
        };
        let out = self.session(l, to_a).handle(Input::Frame(f), 0);
        self.run_outputs(l, to_a, out);
        true
    }

    /// Delivers everything until no frame is in flight.
    fn settle(&mut self) {
        let mut progress = true;
        let mut rounds = 0;
        while progress {
            rounds += 1;
            assert!(rounds < 1_000_000, "did not settle");
            progress = false;
            for l in 0..self.links.len() {
                progress |= self.deliver(l, true);
                progress |= self.deliver(l, false);
            }
            for site in 0..self.logs.len() {
                progress |= self.store_step(site);
            }
            for l in 0..self.links.len() {
                progress |= self.answer(l, true);
                progress |= self.answer(l, false);
            }
        }
    }

    fn closed(&self) -> Vec<&SessionError> {
        self.links.iter().flat_map(|l| l.closed.iter()).collect()
    }
}

fn small_batches() -> SessionConfig {
    SessionConfig {
        max_batch_changes: 64,
        max_batch_bytes: 4096,
        max_in_flight: 3,
        max_applying: 2,
    }
}

#[test]
fn catch_up_sends_exactly_what_is_missing() {
    let mut net = Net::new(&["a", "b"], small_batches());
    net.write(0, 2_500);
    net.write(1, 300);
    net.connect(0, 1);
    net.settle();
    assert!(net.closed().is_empty(), "{:?}", net.closed());
    assert_eq!(net.logs[0].vv(), net.logs[1].vv());
    assert_eq!(net.logs[1].vv().total(), 2_800);
    let link = &net.links[0];
    assert_eq!(link.session_a.stats().changes_sent, 2_500);
    assert_eq!(link.session_b.stats().changes_sent, 300);
    assert_eq!(net.logs[0].duplicates + net.logs[1].duplicates, 0);
    assert!(net.max_in_flight_seen <= 3, "in flight {}", net.max_in_flight_seen);
    assert!(link.session_a.is_idle() && link.session_b.is_idle());
    assert_eq!(link.session_a.unacked(), 0);
}

#[test]
fn batches_respect_limits() {
    let mut net = Net::new(&["a", "b"], small_batches());
    net.write(0, 1_000);
    net.connect(0, 1);
    // Deliver only a's hello to b and b's hello to a: a may then have at
    // most max_in_flight batches on the wire before any ack.
    net.deliver(0, true);
    net.deliver(0, false);
    let link = &net.links[0];
    let batches: Vec<usize> = link
        .to_b
        .iter()
        .filter_map(|f| match &f.kind {
            Some(Kind::Batch(b)) => Some(b.changes.len()),
            _ => None,
        })
        .collect();
    assert_eq!(batches.len(), 3, "window of 3 batches");
    // 100-byte bodies, 4096-byte budget: 40 changes per batch.
    assert!(batches.iter().all(|&n| n == 40), "{batches:?}");
    assert_eq!(link.session_a.ack_wait_ms(5), Some(5));
    net.settle();
    assert_eq!(net.logs[1].vv().total(), 1_000);
}

#[test]
fn reconnect_in_sync_is_one_exchange_under_a_kilobyte() {
    let names: Vec<String> = (0..10).map(|i| format!("site-{i:02}")).collect();
    let refs: Vec<&str> = names.iter().map(|s| s.as_str()).collect();
    let mut net = Net::new(&refs, SessionConfig::default());
    // Everyone writes, and the star around site 0 spreads it to all.
    for i in 0..10 {
        net.write(i, 1_000 + i);
    }
    for i in 1..10 {
        net.connect(0, i);
    }
    net.settle();
    let all = net.logs[0].vv();
    assert!(net.logs.iter().all(|l| l.vv() == all));
    // A new link between two sites already in sync.
    net.connect(1, 2);
    net.settle();
    let link = net.links.last().expect("link");
    assert_eq!(link.frames, 2, "only the two hellos");
    assert!(link.bytes < 1024, "{} bytes", link.bytes);
}

#[test]
fn chunks_travel_only_to_a_site_that_lacks_them() {
    let mut net = Net::new(&["a", "b"], SessionConfig::default());
    let chunks: Vec<(crate::chunks::Hash, Vec<u8>)> = (0..20u8)
        .map(|i| {
            let data = vec![i; 4096];
            (*blake3::hash(&data).as_bytes(), data)
        })
        .collect();
    net.logs[0].chunks.extend(chunks.iter().cloned());
    // b already holds the first five.
    net.logs[1].chunks.extend(chunks[..5].iter().cloned());
    net.connect(0, 1);
    net.settle();
    let wanted: Vec<_> = chunks[5..].iter().map(|(h, _)| *h).collect();
    let out = net.links[0].session_b.handle(Input::ChunksWanted(wanted), 0);
    net.run_outputs(0, false, out);
    net.settle();
    assert_eq!(net.logs[1].chunks.len(), 20);
    let link = &net.links[0];
    assert_eq!(link.session_a.chunk_stats().chunks_sent, 15);
    assert_eq!(link.session_b.chunk_stats().chunks_received, 15);
    assert!(link.closed.is_empty(), "{:?}", link.closed);
    assert!(link.session_a.is_idle() && link.session_b.is_idle());
}

#[test]
fn live_tail_pushes_new_writes() {
    let mut net = Net::new(&["a", "b"], small_batches());
    net.connect(0, 1);
    net.settle();
    net.write(0, 5);
    net.settle();
    assert_eq!(net.logs[1].vv().get("a"), 5);
    net.write(1, 7);
    net.settle();
    assert_eq!(net.logs[0].vv().get("b"), 7);
    assert_eq!(net.links[0].session_a.unacked(), 0);
}

#[test]
fn relay_through_a_middle_site_without_loops_or_duplicates() {
    let mut net = Net::new(&["a", "b", "c"], small_batches());
    net.write(0, 200);
    net.write(2, 150);
    net.connect(0, 1);
    net.connect(1, 2);
    net.settle();
    net.write(0, 10);
    net.write(2, 10);
    net.settle();
    for l in &net.logs {
        assert_eq!(l.vv().get("a"), 210);
        assert_eq!(l.vv().get("c"), 160);
        assert_eq!(l.duplicates, 0, "{} got duplicates", l.name);
    }
    // a's changes crossed each link once, and c's back once.
    assert_eq!(net.links[0].session_a.stats().changes_sent, 210);
    assert_eq!(net.links[0].session_b.stats().changes_sent, 160);
    assert_eq!(net.links[1].session_a.stats().changes_sent, 210);
    assert_eq!(net.links[1].session_b.stats().changes_sent, 160);
}

fn opened(local_site: &str, local: VersionVector) -> SyncSession {
    let mut s = SyncSession::new(small_batches(), local_site, local);
    s.open();
    s
}

fn hello(have: &[(&str, u64)]) -> pb::Frame {
    frame(Kind::Hello(pb::Hello {
        protocol_version: pb::PROTOCOL_VERSION,
        have: Some(
            have.iter()
                .map(|(o, s)| (o.to_string(), *s))
                .collect::<VersionVector>()
                .to_proto(),
        ),
        withheld: Vec::new(),
    }))
}

fn close_reason(out: Vec<Output>) -> Option<SessionError> {
    out.into_iter().find_map(|o| match o {
        Output::Close(e) => Some(e),
        _ => None,
    })
}

fn change(origin: &str, seq: u64) -> Change {
    let mut log = MemLog::new(origin);
    log.write(seq as usize);
    log.by_origin.remove(origin).and_then(|mut v| v.pop()).expect("change")
}

#[test]
fn protocol_violations_close_the_session_with_a_reason() {
    let batch = |n: u64, changes: Vec<Change>| frame(Kind::Batch(pb::Batch { batch: n, changes }));

    let mut s = opened("a", VersionVector::new());
    assert_eq!(
        close_reason(s.handle(Input::Frame(batch(1, vec![])), 0)),
        Some(SessionError::BeforeHello("a batch"))
    );
    assert!(s.is_closed());
    assert!(
        s.handle(Input::Frame(hello(&[])), 0).is_empty(),
        "closed sessions ignore input"
    );

    let mut s = opened("a", VersionVector::new());
    s.handle(Input::Frame(hello(&[])), 0);
    assert_eq!(
        close_reason(s.handle(Input::Frame(hello(&[])), 0)),
        Some(SessionError::DuplicateHello)
    );

    let mut s = opened("a", VersionVector::new());
    assert_eq!(
        close_reason(s.handle(Input::Frame(pb::Frame { kind: None }), 0)),
        Some(SessionError::EmptyFrame)
    );

    let local: VersionVector = [("a".to_string(), 5)].into_iter().collect();
    let mut s = opened("a", local);
    assert_eq!(
        close_reason(s.handle(Input::Frame(hello(&[("a", 9)])), 0)),
        Some(SessionError::ImpossibleClaim {
            origin: "a".into(),
            claimed: 9,
            ours: 5
        })
    );

    let mut s = opened("a", VersionVector::new());
    s.handle(Input::Frame(hello(&[])), 0);
    assert_eq!(
        close_reason(s.handle(Input::Frame(batch(2, vec![])), 0)),
        Some(SessionError::BatchOutOfOrder { expected: 1, got: 2 })
    );

    let mut s = opened("a", VersionVector::new());
    s.handle(Input::Frame(hello(&[])), 0);
    assert_eq!(
        close_reason(s.handle(Input::Frame(batch(1, vec![change("b", 1), change("b", 3)])), 0)),
        Some(SessionError::ChangeOutOfOrder {
            origin: "b".into(),
            seq: 3,
            expected: 2
        })
    );

    let mut s = opened("a", VersionVector::new());
    s.handle(Input::Frame(hello(&[])), 0);
    let ack = frame(Kind::Ack(pb::Ack { batch: 1, have: None }));
    assert_eq!(
        close_reason(s.handle(Input::Frame(ack), 0)),
        Some(SessionError::AckForUnsentBatch { got: 1, sent: 0 })
    );

    let mut s = opened("a", VersionVector::new());
    let v2 = frame(Kind::Hello(pb::Hello {
        protocol_version: 2,
        have: None,
        withheld: Vec::new(),
    }));
    assert_eq!(
        close_reason(s.handle(Input::Frame(v2), 0)),
        Some(SessionError::UnsupportedVersion(2))
    );

    let mut s = opened("a", VersionVector::new());
    s.handle(Input::Frame(hello(&[])), 0);
    let mut bad = change("b", 1);
    bad.kind = 42;
    assert!(matches!(
        close_reason(s.handle(Input::Frame(batch(1, vec![bad])), 0)),
        Some(SessionError::InvalidChange(_))
    ));
}

#[test]
fn duplicated_changes_from_two_peers_are_offered_but_never_gapped() {
    // A triangle: c hears a's changes from both a and b.
    let mut net = Net::new(&["a", "b", "c"], small_batches());
    net.write(0, 300);
    net.connect(0, 1);
    net.connect(0, 2);
    net.connect(1, 2);
    net.settle();
    assert!(net.closed().is_empty(), "{:?}", net.closed());
    assert!(net.logs.iter().all(|l| l.vv().get("a") == 300));
}

#[derive(Clone, Debug)]
enum Step {
    Write { site: usize, n: usize },
    Deliver { link: usize, to_a: bool },
}

fn step() -> impl Strategy<Value = Step> {
    prop_oneof![
        1 => (0usize..3, 1usize..30).prop_map(|(site, n)| Step::Write { site, n }),
        4 => (0usize..3, any::<bool>()).prop_map(|(link, to_a)| Step::Deliver { link, to_a }),
    ]
}

proptest! {
    /// Three fully linked sites, random writes, frames delivered in any
    /// interleaving across links (in order within a link): no session ever
    /// closes, no gap is applied, and all sites end with the same log.
    #[test]
    fn any_interleaving_converges(steps in proptest::collection::vec(step(), 1..300)) {
        let mut net = Net::new(&["a", "b", "c"], small_batches());
        net.connect(0, 1);
        net.connect(1, 2);
        net.connect(0, 2);
        for s in steps {
            match s {
                Step::Write { site, n } => net.write(site, n),
                Step::Deliver { link, to_a } => { net.deliver(link, to_a); }
            }
        }
        net.settle();
        prop_assert!(net.closed().is_empty(), "{:?}", net.closed());
        let first = net.logs[0].vv();
        for l in &net.logs {
            prop_assert_eq!(l.vv(), first.clone());
        }
        for link in &net.links {
            prop_assert_eq!(link.session_a.unacked(), 0);
            prop_assert_eq!(link.session_b.unacked(), 0);
        }
    }
}

fn policy_for(site: &str) -> PeerPolicy {
    PeerPolicy::new(crate::filter::ShareConfig::default(), site, [], false)
}

/// True when any frame sent towards b holds `needle`.
fn on_wire(link: &Link, needle: &str) -> bool {
    link.sent_to_b
        .iter()
        .any(|f| f.windows(needle.len()).any(|w| w == needle.as_bytes()))
}

#[test]
fn withheld_changes_go_as_stubs_and_catch_up_stays_exact() {
    let mut net = Net::new(&["a", "b"], small_batches());
    for i in 0..300 {
        let denied = (i % 7 == 3).then_some("site:b");
        net.logs[0].write_doc(
            denied,
            &format!("m{i:04}-{}", if denied.is_some() { "SECRET" } else { "open" }),
        );
    }
    net.connect_with(0, 1, policy_for("b"), policy_for("a"));
    net.settle();
    assert!(net.closed().is_empty(), "{:?}", net.closed());
    assert_eq!(net.logs[1].vv(), net.logs[0].vv(), "the vector catches up exactly");
    let expected: RangeSet = (0..300u64)
        .filter(|i| i % 7 == 3)
        .map(|i| ("a".to_owned(), i + 1))
        .collect();
    assert_eq!(net.logs[1].withheld, expected, "withheld is exactly what was filtered");
    let link = &net.links[0];
    assert!(!on_wire(link, "SECRET"), "a withheld body crossed the wire");
    assert!(on_wire(link, "m0000-open"));
    assert_eq!(link.session_a.stats().withheld, expected.len());
    assert!(link.session_a.is_idle() && link.session_b.is_idle());
    // A reconnect: b's hello lists its withheld ranges, a still may not
    // share them: nothing but the hellos crosses.
    net.connect_with(0, 1, policy_for("b"), policy_for("a"));
    net.settle();
    let link = net.links.last().expect("link");
    assert_eq!(link.frames, 2, "only the hellos");
    assert!(!on_wire(link, "SECRET"));
    assert_eq!(net.logs[1].withheld, expected);
}

#[test]
fn a_site_that_got_stubs_through_a_relay_is_refilled_by_a_direct_link() {
    // a withholds from b (the `_acl` denies site:b) but not from c; c
    // first hears of a's changes through b, then links to a directly.
    let mut net = Net::new(&["a", "b", "c"], small_batches());
    for i in 0..100 {
        let denied = (i % 3 == 0).then_some("site:b");
        net.logs[0].write_doc(denied, &format!("doc{i}"));
    }
    net.connect_with(0, 1, policy_for("b"), policy_for("a"));
    net.connect_with(1, 2, policy_for("c"), policy_for("b"));
    net.settle();
    assert_eq!(net.logs[2].vv(), net.logs[0].vv());
    assert_eq!(net.logs[2].withheld.len(), 34, "c got b's stubs as stubs");
    assert_eq!(net.links[1].session_a.stats().stubs_relayed, 34);
    net.connect_with(0, 2, policy_for("c"), policy_for("a"));
    net.settle();
    assert!(net.closed().is_empty(), "{:?}", net.closed());
    assert!(net.logs[2].withheld.is_empty(), "{:?}", net.logs[2].withheld);
    assert_eq!(net.links[2].session_a.stats().refilled, 34);
    assert_eq!(
        net.logs[2].by_origin["a"], net.logs[0].by_origin["a"],
        "c holds a's log in full"
    );
    assert_eq!(net.logs[1].withheld.len(), 34, "b still lacks them");
    // c never hands them to b either: the same `_acl` denies b.
    net.connect_with(1, 2, policy_for("c"), policy_for("b"));
    net.settle();
    assert_eq!(net.logs[1].withheld.len(), 34);
    assert!(net.links.iter().all(|l| l.session_a.is_idle() && l.session_b.is_idle()));
}

#[test]
fn refills_respect_the_batch_limits_and_resume() {
    let mut net = Net::new(&["a", "b"], small_batches());
    for i in 0..500 {
        net.logs[0].write_doc(None, &format!("d{i}"));
    }
    net.logs[1]
        .by_origin
        .insert("a".into(), (1..=500).map(|s| crate::change::stub("a", s)).collect());
    net.logs[1].withheld.insert_range("a", 1, 500);
    net.connect_with(0, 1, policy_for("b"), policy_for("a"));
    net.settle();
    assert!(net.closed().is_empty(), "{:?}", net.closed());
    assert!(net.logs[1].withheld.is_empty());
    assert_eq!(net.links[0].session_a.stats().refilled, 500);
    assert!(net.max_in_flight_seen <= 3);
}

#[test]
fn bad_withheld_ranges_in_a_hello_close_the_session() {
    let mut s = opened("a", VersionVector::new());
    let h = frame(Kind::Hello(pb::Hello {
        protocol_version: pb::PROTOCOL_VERSION,
        have: None,
        withheld: vec![pb::SeqRange {
            origin: "x".into(),
            first: 5,
            last: 2,
        }],
    }));
    assert!(matches!(
        close_reason(s.handle(Input::Frame(h), 0)),
        Some(SessionError::BadWithheld(_))
    ));
}

proptest! {
    /// Any filter, any batch limits: after a full exchange the receiver's
    /// vector equals the sender's, its withheld set is exactly the
    /// filtered changes, and no withheld body crossed the wire.
    #[test]
    fn filtering_keeps_catch_up_exact(
        denied in proptest::collection::vec(any::<bool>(), 1..200),
        max_batch_changes in 1usize..50,
        max_in_flight in 1u64..4,
    ) {
        let config = SessionConfig { max_batch_changes, max_batch_bytes: 4096, max_in_flight, max_applying: 1 };
        let mut net = Net::new(&["a", "b"], config);
        for (i, d) in denied.iter().enumerate() {
            net.logs[0].write_doc(d.then_some("sites"), &format!("{}{i}", if *d { "HIDDEN" } else { "shown" }));
        }
        net.connect_with(0, 1, policy_for("b"), policy_for("a"));
        net.settle();
        prop_assert!(net.closed().is_empty(), "{:?}", net.closed());
        prop_assert_eq!(net.logs[1].vv(), net.logs[0].vv());
        let expected: RangeSet = denied.iter().enumerate().filter(|(_, d)| **d).map(|(i, _)| ("a".to_owned(), i as u64 + 1)).collect();
        prop_assert_eq!(&net.logs[1].withheld, &expected);
        prop_assert!(!on_wire(&net.links[0], "HIDDEN"));
        prop_assert!(net.links[0].session_a.is_idle());
    }
}

#[derive(Clone, Debug)]
enum FilteredStep {
    Write { site: usize, denied: Option<usize> },
    Deliver { link: usize, to_a: bool },
}

fn filtered_step() -> impl Strategy<Value = FilteredStep> {
    prop_oneof![
        1 => (0usize..4, proptest::option::of(0usize..4)).prop_map(|(site, denied)| FilteredStep::Write { site, denied }),
        4 => (0usize..4, any::<bool>()).prop_map(|(link, to_a)| FilteredStep::Deliver { link, to_a }),
    ]
}

/// Runs `steps` on sites linked as `links`, every link filtering by
/// `_acl` (a record may deny one site), then checks: all vectors equal,
/// each site holds as stubs exactly the records that deny it, and nothing
/// denied to a site was ever sent to it in full.
fn run_filtered(names: &[&str], links: &[(usize, usize)], steps: Vec<FilteredStep>) -> Result<(), TestCaseError> {
    let mut net = Net::new(names, small_batches());
    for &(x, y) in links {
        net.connect_with(x, y, policy_for(names[y]), policy_for(names[x]));
    }
    let mut n = 0;
    for s in steps {
        match s {
            FilteredStep::Write { site, denied } => {
                let site = site % names.len();
                n += 1;
                let denied = denied.map(|d| d % names.len());
                let who = denied.map(|d| format!("site:{}", names[d]));
                let marker = match denied {
                    Some(d) => format!("NOT-FOR-{}-{n}", names[d].to_uppercase()),
                    None => format!("open-{n}"),
                };
                net.logs[site].write_doc(who.as_deref(), &marker);
                net.advance_others(site, usize::MAX);
            }
            FilteredStep::Deliver { link, to_a } => {
                net.deliver(link % links.len(), to_a);
            }
        }
    }
    net.settle();
    prop_assert!(net.closed().is_empty(), "{:?}", net.closed());
    let first = net.logs[0].vv();
    for (i, log) in net.logs.iter().enumerate() {
        prop_assert_eq!(log.vv(), first.clone());
        let denied_here = format!("site:{}", names[i]);
        let expected: RangeSet = net
            .logs
            .iter()
            .enumerate()
            .filter(|(j, _)| *j != i)
            .flat_map(|(j, other)| other.by_origin.get(names[j]).into_iter().flatten())
            .filter(|c| !c.withheld && String::from_utf8_lossy(&c.body).contains(&denied_here))
            .map(|c| (c.origin.clone(), c.seq))
            .collect();
        prop_assert_eq!(&log.withheld, &expected, "at {}", names[i]);
    }
    for link in &net.links {
        let upper = format!("NOT-FOR-{}-", names[link.b].to_uppercase());
        prop_assert!(
            !on_wire(link, &upper),
            "a record denied to {} went to it",
            names[link.b]
        );
        let upper = format!("NOT-FOR-{}-", names[link.a].to_uppercase());
        prop_assert!(
            !link
                .sent_to_a
                .iter()
                .any(|f| f.windows(upper.len()).any(|w| w == upper.as_bytes())),
            "a record denied to {} went to it",
            names[link.a]
        );
    }
    Ok(())
}

proptest! {
    /// Three fully linked sites filtering by `_acl`, random writes and
    /// interleavings: a stub relayed ahead of the direct copy is asked for
    /// and refilled at once.
    #[test]
    fn filtered_triangle_converges_exactly(steps in proptest::collection::vec(filtered_step(), 1..200)) {
        run_filtered(&["a", "b", "c"], &[(0, 1), (1, 2), (0, 2)], steps)?;
    }

    /// Four sites in a ring: the direct copy may reach a neighbour after
    /// the site asked it (the ask waits there until it holds the change),
    /// and a refilled change is offered on.
    #[test]
    fn filtered_ring_converges_exactly(steps in proptest::collection::vec(filtered_step(), 1..250)) {
        run_filtered(&["a", "b", "c", "d"], &[(0, 1), (1, 2), (2, 3), (3, 0)], steps)?;
    }
}

#[test]
fn an_ask_for_a_change_not_held_yet_waits_until_it_is() {
    // A ring a - b - c - d - a; a's record denies b. c hears of it first
    // as a stub through b, and asks d, which does not hold it yet.
    let names = ["a", "b", "c", "d"];
    let mut net = Net::new(&names, small_batches());
    for (x, y) in [(0, 1), (1, 2), (2, 3), (3, 0)] {
        net.connect_with(x, y, policy_for(names[y]), policy_for(names[x]));
    }
    net.settle();
    net.logs[0].write_doc(Some("site:b"), "NOT-FOR-B");
    net.advance_others(0, usize::MAX);
    // a's stub reaches b; b's ask and its stub reach c, before a's copy
    // reaches d.
    while net.deliver(0, false) {}
    while net.deliver(1, false) {}
    // c's ask goes ahead of its stub to d (link 2), which lacks the
    // change: the ask waits there.
    assert!(matches!(
        net.links[2].to_b.front().and_then(|f| f.kind.as_ref()),
        Some(Kind::Withheld(_))
    ));
    net.deliver(2, false);
    assert_eq!(net.logs[2].withheld.len(), 1, "c holds a stub");
    assert_eq!(net.logs[3].vv().get("a"), 0, "d has nothing from a yet");
    assert!(!net.links[2].session_b.deferred.is_empty(), "d keeps c's ask");
    net.settle();
    assert!(net.closed().is_empty(), "{:?}", net.closed());
    assert!(net.logs[2].withheld.is_empty(), "c got the record");
    assert!(net.logs[3].withheld.is_empty());
    assert_eq!(net.logs[1].withheld.len(), 1, "b never does");
    assert_eq!(net.links[2].session_b.stats().refilled, 1, "from d");
}

/// Two batches received, neither durable yet.
fn receiving_two(config: SessionConfig) -> SyncSession {
    let batch = |n: u64, changes: Vec<Change>| frame(Kind::Batch(pb::Batch { batch: n, changes }));
    let mut s = SyncSession::new(config, "a", VersionVector::new());
    s.open();
    s.handle(Input::Frame(hello(&[])), 0);
    for (n, seq) in [(1, 1), (2, 2)] {
        let out = s.handle(Input::Frame(batch(n, vec![change("b", seq)])), 0);
        assert!(
            matches!(out.as_slice(), [Output::Apply { batch, .. }] if *batch == n),
            "{out:?}"
        );
    }
    s
}

fn acks(out: &[Output]) -> Vec<(u64, VersionVector)> {
    out.iter()
        .filter_map(|o| match o {
            Output::Send(pb::Frame {
                kind: Some(Kind::Ack(a)),
            }) => Some((a.batch, VersionVector::from_proto(a.have.as_ref()?).ok()?)),
            _ => None,
        })
        .collect()
}

#[test]
fn batches_in_the_store_are_bounded_and_acknowledged_in_order() {
    let config = SessionConfig {
        max_applying: 2,
        ..SessionConfig::default()
    };
    let mut s = receiving_two(config);
    assert_eq!(s.applying(), 2);
    assert!(!s.accepts_frames(), "the store holds max_applying batches");
    assert!(!s.is_idle(), "acks are owed");
    assert_eq!(s.stats().applying_peak, 2);
    assert_eq!(s.stats().applying_full, 1);
    // Batch 2 became durable with batch 1 (one group): the ack of 1 may
    // say so, since all of it is durable.
    let both: VersionVector = [("b".to_string(), 2)].into_iter().collect();
    let out = s.handle(
        Input::Applied {
            batch: 1,
            have: both.clone(),
        },
        0,
    );
    assert_eq!(acks(&out), vec![(1, both.clone())]);
    assert!(s.accepts_frames());
    let out = s.handle(
        Input::Applied {
            batch: 2,
            have: both.clone(),
        },
        0,
    );
    assert_eq!(acks(&out), vec![(2, both)]);
    assert_eq!(s.applying(), 0);
    assert!(s.is_idle());
}

#[test]
fn a_store_answer_out_of_order_closes_the_session() {
    let have: VersionVector = [("b".to_string(), 2)].into_iter().collect();
    let mut s = receiving_two(SessionConfig::default());
    assert_eq!(
        close_reason(s.handle(
            Input::Applied {
                batch: 2,
                have: have.clone()
            },
            0
        )),
        Some(SessionError::AppliedOutOfOrder {
            expected: Some(1),
            got: 2
        })
    );

    let mut s = opened("a", VersionVector::new());
    s.handle(Input::Frame(hello(&[])), 0);
    assert_eq!(
        close_reason(s.handle(Input::Applied { batch: 1, have }, 0)),
        Some(SessionError::AppliedOutOfOrder { expected: None, got: 1 })
    );
}

#[test]
fn a_max_applying_of_zero_still_takes_one_batch() {
    let config = SessionConfig {
        max_applying: 0,
        ..SessionConfig::default()
    };
    let mut s = opened("a", VersionVector::new());
    s = SyncSession { config, ..s };
    s.handle(Input::Frame(hello(&[])), 0);
    assert!(s.accepts_frames());
    s.handle(
        Input::Frame(frame(Kind::Batch(pb::Batch {
            batch: 1,
            changes: vec![change("b", 1)],
        }))),
        0,
    );
    assert!(!s.accepts_frames());
}

#[test]
fn pipelined_catch_up_keeps_the_store_busy_and_ends_exact() {
    let mut net = Net::pipelined(&["a", "b"], small_batches());
    net.write(0, 2_500);
    net.write(1, 300);
    net.connect(0, 1);
    // Deliver hellos, then batches until b's store holds its share: b
    // takes a second batch before the first is durable.
    net.deliver(0, true);
    net.deliver(0, false);
    while net.deliver(0, false) {}
    assert_eq!(net.links[0].session_b.applying(), 2);
    assert_eq!(net.writers[1].len(), 2);
    net.settle();
    assert!(net.closed().is_empty(), "{:?}", net.closed());
    assert_eq!(net.logs[0].vv(), net.logs[1].vv());
    assert_eq!(net.logs[1].vv().total(), 2_800);
    assert_eq!(net.max_applying_seen, 2);
    let link = &net.links[0];
    assert!(link.session_a.is_idle() && link.session_b.is_idle());
    assert_eq!(link.session_a.unacked(), 0);
    assert_eq!(link.session_b.unacked(), 0);
}

#[derive(Clone, Debug)]
enum PipelinedStep {
    Write { site: usize, n: usize },
    Deliver { link: usize, to_a: bool },
    Store { site: usize },
    Answer { link: usize, at_a: bool },
}

fn pipelined_step() -> impl Strategy<Value = PipelinedStep> {
    prop_oneof![
        1 => (0usize..3, 1usize..30).prop_map(|(site, n)| PipelinedStep::Write { site, n }),
        4 => (0usize..3, any::<bool>()).prop_map(|(link, to_a)| PipelinedStep::Deliver { link, to_a }),
        2 => (0usize..3).prop_map(|site| PipelinedStep::Store { site }),
        2 => (0usize..3, any::<bool>()).prop_map(|(link, at_a)| PipelinedStep::Answer { link, at_a }),
    ]
}

proptest! {
    /// Three fully linked sites whose stores take batches ahead of making
    /// them durable, one writer queue per site shared by its sessions;
    /// writes, deliveries, store progress and answers interleaved at
    /// random: no session closes, no gap is applied (MemLog asserts it),
    /// acks go out one per batch in order (`run_outputs` asserts it), no
    /// session has more than `max_applying` batches in the store, and all
    /// sites end with the same log, everything acknowledged.
    #[test]
    fn pipelined_stores_converge_in_any_interleaving(
        steps in proptest::collection::vec(pipelined_step(), 1..400),
        max_applying in 1u64..4,
    ) {
        let config = SessionConfig { max_applying, ..small_batches() };
        let mut net = Net::pipelined(&["a", "b", "c"], config);
        net.connect(0, 1);
        net.connect(1, 2);
        net.connect(0, 2);
        for s in steps {
            match s {
                PipelinedStep::Write { site, n } => net.write(site, n),
                PipelinedStep::Deliver { link, to_a } => { net.deliver(link, to_a); }
                PipelinedStep::Store { site } => { net.store_step(site); }
                PipelinedStep::Answer { link, at_a } => { net.answer(link, at_a); }
            }
        }
        net.settle();
        prop_assert!(net.closed().is_empty(), "{:?}", net.closed());
        prop_assert!(net.max_applying_seen <= max_applying, "{} in the store", net.max_applying_seen);
        let first = net.logs[0].vv();
        for l in &net.logs {
            prop_assert_eq!(l.vv(), first.clone());
        }
        for link in &net.links {
            prop_assert_eq!(link.session_a.unacked(), 0);
            prop_assert_eq!(link.session_b.unacked(), 0);
            prop_assert!(link.session_a.is_idle() && link.session_b.is_idle());
        }
    }
}
