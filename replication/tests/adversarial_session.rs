//! The sync session fed what a hostile or broken peer could send: random
//! frames (well-typed but with impossible vectors, huge or overlapping
//! ranges, sequences at `u64::MAX`, empty and duplicate origins, garbage
//! HLCs, batches out of order) and random bytes decoded as frames. The
//! shell around it is honest (an in-memory log answering every read and
//! apply), so whatever goes wrong is the session's doing.
//!
//! Properties: `handle` never panics; it either goes on or closes with a
//! reason, and says nothing after closing; every batch it asks to apply is
//! made of valid changes that leave no gap in the local log; batches sent
//! are numbered 1, 2, 3, ... with at most `max_in_flight` unacknowledged;
//! every read it asks of the log is bounded by the batch limits; and a
//! step always settles (the shell's work queue empties).

use std::collections::BTreeMap;

use ocmesh_proto::federation::{self as pb, frame::Kind};
use ocmesh_replication::change::{self, Change, ChangeKind};
use ocmesh_replication::{Input, Output, RangeSet, SessionConfig, SyncSession, VersionVector};
use proptest::prelude::*;
use prost::Message;

const LOCAL: &str = "a";

/// The site's log in memory, per origin in sequence order.
struct Log {
    by_origin: BTreeMap<String, Vec<Change>>,
}

impl Log {
    fn new() -> Self {
        let mut log = Log {
            by_origin: BTreeMap::new(),
        };
        for (origin, n) in [(LOCAL, 5), ("c", 3)] {
            for _ in 0..n {
                log.push_new(origin);
            }
        }
        log
    }

    fn push_new(&mut self, origin: &str) {
        let list = self.by_origin.entry(origin.to_owned()).or_default();
        let seq = list.len() as u64 + 1;
        list.push(Change {
            origin: origin.to_owned(),
            seq,
            hlc: seq << 16,
            kind: ChangeKind::Insert as i32,
            collection: "entities".into(),
            doc_id: format!("{seq:024x}"),
            body: br#"{"n":1}"#.to_vec(),
            author: "u".into(),
            ..Default::default()
        });
    }

    fn vv(&self) -> VersionVector {
        self.by_origin
            .iter()
            .map(|(o, cs)| (o.clone(), cs.len() as u64))
            .collect()
    }

    fn read(&self, after: &VersionVector, max: usize) -> Vec<Change> {
        let mut out = Vec::new();
        for (origin, list) in &self.by_origin {
            let from = after.get(origin) as usize;
            for c in list.iter().skip(from) {
                if out.len() >= max {
                    return out;
                }
                out.push(c.clone());
            }
        }
        out
    }

    fn read_ranges(&self, ranges: &[(String, u64, u64)], max: usize) -> Vec<Change> {
        let mut out = Vec::new();
        for (origin, first, last) in ranges {
            let Some(list) = self.by_origin.get(origin) else {
                continue;
            };
            for seq in *first..=*last {
                if out.len() >= max {
                    return out;
                }
                match list.get(seq as usize - 1) {
                    Some(c) => out.push(c.clone()),
                    None => break,
                }
            }
        }
        out
    }

    /// Applies as the node does: duplicates skipped, a gap is the
    /// session's fault (it must never let one through).
    fn apply(&mut self, changes: Vec<Change>) -> Result<(), String> {
        for c in changes {
            change::validate(&c).map_err(|e| format!("session passed an invalid change: {e}"))?;
            let list = self.by_origin.entry(c.origin.clone()).or_default();
            let held = list.len() as u64;
            if c.seq <= held {
                continue;
            }
            if c.seq != held + 1 {
                return Err(format!(
                    "session let a gap through: {}:{} after {held}",
                    c.origin, c.seq
                ));
            }
            list.push(c);
        }
        Ok(())
    }
}

/// Runs one input and everything the shell must answer, checking each output.
struct Harness {
    session: SyncSession,
    log: Log,
    config: SessionConfig,
    batches_sent: u64,
    acked: u64,
    closed: bool,
    /// The shell's answers not yet given (reads and applies take time, so
    /// peer frames arrive in between).
    pending: std::collections::VecDeque<Input>,
}

impl Harness {
    fn new(config: SessionConfig) -> Self {
        let log = Log::new();
        let mut session = SyncSession::new(config.clone(), LOCAL, log.vv());
        let opened = session.open();
        assert_eq!(opened.len(), 1, "open sends one hello");
        Harness {
            session,
            log,
            config,
            batches_sent: 0,
            acked: 0,
            closed: false,
            pending: Default::default(),
        }
    }

    /// Gives the session up to `n` of the shell's pending answers.
    fn answer(&mut self, n: usize, now: u64) -> Result<(), TestCaseError> {
        let mut rounds = 0;
        while rounds < n {
            let Some(input) = self.pending.pop_front() else {
                return Ok(());
            };
            rounds += 1;
            prop_assert!(rounds < 10_000, "the session does not settle");
            self.step(input, now)?;
        }
        Ok(())
    }

    fn step(&mut self, input: Input, now: u64) -> Result<(), TestCaseError> {
        // An ack the session accepts opens the window before it answers.
        if let Input::Frame(pb::Frame {
            kind: Some(Kind::Ack(a)),
        }) = &input
            && a.batch <= self.batches_sent
        {
            self.acked = self.acked.max(a.batch);
        }
        let work = &mut self.pending;
        {
            let was_closed = self.session.is_closed();
            let out = self.session.handle(input, now);
            if was_closed {
                prop_assert!(out.is_empty(), "output after close: {out:?}");
            }
            for o in out {
                prop_assert!(!self.closed, "output after Close: {o:?}");
                match o {
                    Output::Send(f) => sent(&f, &self.config, &self.log, &mut self.batches_sent, self.acked)?,
                    Output::Fetch(req) => {
                        prop_assert!(req.max_changes <= self.config.max_batch_changes);
                        let changes = self.log.read(&req.after, req.max_changes);
                        work.push_back(Input::Fetched(changes));
                    }
                    Output::FetchRanges(req) => {
                        let span: u64 = req.ranges.iter().map(|(_, f, l)| l - f + 1).sum();
                        prop_assert!(
                            span <= self.config.max_batch_changes as u64,
                            "a refill read of {span} sequences"
                        );
                        for (o, f, l) in &req.ranges {
                            prop_assert!(*f >= 1 && f <= l, "bad range {o}:{f}..={l}");
                        }
                        let changes = self.log.read_ranges(&req.ranges, req.max_changes);
                        work.push_back(Input::FetchedRanges(changes));
                    }
                    Output::Apply { batch, changes } => {
                        self.log.apply(changes).map_err(TestCaseError::fail)?;
                        work.push_back(Input::Applied {
                            batch,
                            have: self.log.vv(),
                        });
                    }
                    Output::PeerHas(_) => {}
                    Output::ReadChunk(hash) => work.push_back(Input::ChunkRead { hash, data: None }),
                    Output::StoreChunk { hash, data } => {
                        prop_assert_eq!(
                            *blake3::hash(&data).as_bytes(),
                            hash,
                            "stored a chunk that does not match"
                        );
                    }
                    Output::Close(reason) => {
                        prop_assert!(!reason.to_string().is_empty());
                        self.closed = true;
                    }
                }
            }
        }
        Ok(())
    }
}

/// Checks a frame the session sends.
fn sent(
    f: &pb::Frame,
    config: &SessionConfig,
    log: &Log,
    batches_sent: &mut u64,
    acked: u64,
) -> Result<(), TestCaseError> {
    if let Some(Kind::Batch(b)) = &f.kind {
        *batches_sent += 1;
        prop_assert_eq!(b.batch, *batches_sent, "batches are numbered in order");
        prop_assert!(
            *batches_sent - acked <= config.max_in_flight,
            "more than max_in_flight batches unacknowledged"
        );
        prop_assert!(b.changes.len() <= config.max_batch_changes.max(1));
        let vv = log.vv();
        for c in &b.changes {
            prop_assert!(c.seq >= 1 && c.seq <= vv.get(&c.origin), "sent a change not held");
        }
    }
    Ok(())
}

fn origin() -> impl Strategy<Value = String> {
    prop_oneof![
        3 => Just(LOCAL.to_owned()),
        3 => Just("b".to_owned()),
        3 => Just("c".to_owned()),
        1 => Just(String::new()),
        1 => "[a-z]{1,3}",
        1 => Just("x".repeat(300)),
    ]
}

fn seq() -> impl Strategy<Value = u64> {
    prop_oneof![
        6 => 0u64..8,
        1 => Just(u64::MAX),
        1 => Just(u64::MAX - 1),
        1 => any::<u64>(),
    ]
}

fn vv() -> impl Strategy<Value = Option<pb::VersionVector>> {
    proptest::option::weighted(
        0.9,
        proptest::collection::vec((origin(), seq()), 0..5).prop_map(|entries| pb::VersionVector {
            entries: entries
                .into_iter()
                .map(|(origin, seq)| pb::OriginSeq { origin, seq })
                .collect(),
        }),
    )
}

fn ranges() -> impl Strategy<Value = Vec<pb::SeqRange>> {
    prop_oneof![
        8 => proptest::collection::vec((origin(), seq(), seq()), 0..6),
        1 => (origin(), seq(), seq()).prop_map(|r| vec![r; 4097]),
    ]
    .prop_map(|rs| {
        rs.into_iter()
            .map(|(origin, first, last)| pb::SeqRange { origin, first, last })
            .collect()
    })
}

fn body() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        Just(br#"{"n":1}"#.to_vec()),
        Just(b"[1,2]".to_vec()),
        Just(b"not json".to_vec()),
        Just(br#"{"_acl":[{"_id":"site:a","rights":2,"deny":true}]}"#.to_vec()),
        proptest::collection::vec(any::<u8>(), 0..16),
    ]
}

fn a_change() -> impl Strategy<Value = Change> {
    (
        origin(),
        seq(),
        prop_oneof![Just(0u64), Just(u64::MAX), any::<u64>()],
        -1i32..5,
        prop_oneof![Just("entities".to_owned()), Just(String::new()), "[a-z.$]{0,5}"],
        prop_oneof![
            Just("0123456789abcdef01234567".to_owned()),
            Just(String::new()),
            ".{0,4}"
        ],
        body(),
        any::<bool>(),
        any::<bool>(),
        proptest::collection::vec(".{0,3}", 0..3),
    )
        .prop_map(
            |(origin, seq, hlc, kind, collection, doc_id, body, withheld, partial, fields)| {
                if withheld {
                    return change::stub(&origin, seq);
                }
                Change {
                    origin,
                    seq,
                    hlc,
                    kind,
                    collection,
                    doc_id,
                    body,
                    author: "u".into(),
                    partial,
                    fields,
                    base_hlc: hlc / 2,
                    base_origin: "b".into(),
                    withheld: false,
                    author_admin: false,
                }
            },
        )
}

fn hash_bytes() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        4 => proptest::collection::vec(any::<u8>(), 32),
        1 => proptest::collection::vec(any::<u8>(), 0..40),
    ]
}

fn frame() -> impl Strategy<Value = pb::Frame> {
    let kind = prop_oneof![
        3 => (prop_oneof![9 => Just(pb::PROTOCOL_VERSION), 1 => any::<u32>()], vv(), ranges())
            .prop_map(|(protocol_version, have, withheld)| Kind::Hello(pb::Hello { protocol_version, have, withheld })),
        5 => (prop_oneof![4 => 1u64..4, 1 => seq()], proptest::collection::vec(a_change(), 0..6))
            .prop_map(|(batch, changes)| Kind::Batch(pb::Batch { batch, changes })),
        3 => (prop_oneof![4 => 0u64..4, 1 => seq()], vv()).prop_map(|(batch, have)| Kind::Ack(pb::Ack { batch, have })),
        1 => proptest::collection::vec(hash_bytes(), 0..20).prop_map(|hashes| Kind::ChunkWant(pb::ChunkWant { hashes })),
        1 => (hash_bytes(), proptest::collection::vec(any::<u8>(), 0..8), any::<bool>())
            .prop_map(|(hash, data, missing)| Kind::ChunkData(pb::ChunkData { hash, data, missing })),
        2 => ranges().prop_map(|ranges| Kind::Withheld(pb::Withheld { ranges })),
    ];
    proptest::option::weighted(0.97, kind).prop_map(|kind| pb::Frame { kind })
}

/// What happens between two frames: a frame from the peer, local writes,
/// stubs received over another link, refills, or chunks wanted here.
#[derive(Debug, Clone)]
enum Step {
    Peer(pb::Frame),
    Bytes(Vec<u8>),
    Write(u8),
    LocalStubs(Vec<(String, u64, u64)>),
    Offer(Vec<(String, u64, u64)>),
    Want(Vec<[u8; 32]>),
    /// The shell answers this many of its pending reads and applies.
    Answer(u8),
}

fn step() -> impl Strategy<Value = Step> {
    let range = ("[bc]", 1u64..12, 0u64..4).prop_map(|(o, f, n)| (o, f, f + n));
    prop_oneof![
        12 => frame().prop_map(Step::Peer),
        2 => proptest::collection::vec(any::<u8>(), 0..64).prop_map(Step::Bytes),
        2 => (1u8..4).prop_map(Step::Write),
        1 => proptest::collection::vec(range.clone(), 0..3).prop_map(Step::LocalStubs),
        1 => proptest::collection::vec(range, 0..3).prop_map(Step::Offer),
        1 => proptest::collection::vec(any::<[u8; 32]>(), 0..20).prop_map(Step::Want),
        6 => (0u8..4).prop_map(Step::Answer),
    ]
}

fn config() -> impl Strategy<Value = SessionConfig> {
    (1usize..5, 1usize..4096, 1u64..4, 0u64..4).prop_map(
        |(max_batch_changes, max_batch_bytes, max_in_flight, max_applying)| SessionConfig {
            max_batch_changes,
            max_batch_bytes,
            max_in_flight,
            max_applying,
        },
    )
}

fn range_set(ranges: &[(String, u64, u64)]) -> RangeSet {
    let mut s = RangeSet::new();
    for (o, f, l) in ranges {
        s.insert_range(o, *f, *l);
    }
    s
}

fn run(config: SessionConfig, opening_hello: bool, steps: Vec<Step>) -> Result<(), TestCaseError> {
    let mut h = Harness::new(config);
    let mut now = 0;
    if opening_hello {
        let hello = pb::Frame {
            kind: Some(Kind::Hello(pb::Hello {
                protocol_version: pb::PROTOCOL_VERSION,
                have: Some(pb::VersionVector {
                    entries: vec![pb::OriginSeq {
                        origin: "b".into(),
                        seq: 2,
                    }],
                }),
                withheld: Vec::new(),
            })),
        };
        h.step(Input::Frame(hello), now)?;
    }
    for step in steps {
        now += 7;
        match step {
            Step::Peer(f) => h.step(Input::Frame(f), now)?,
            Step::Bytes(bytes) => {
                if let Ok(f) = pb::Frame::decode(bytes.as_slice()) {
                    h.step(Input::Frame(f), now)?;
                }
            }
            Step::Write(n) => {
                for _ in 0..n {
                    h.log.push_new(LOCAL);
                }
                let vv = h.log.vv();
                h.step(Input::LocalAdvanced(vv), now)?;
            }
            Step::LocalStubs(ranges) => {
                // Stubs this site took in over another link: they are in its log.
                for (o, _, l) in &ranges {
                    while h.log.vv().get(o) < *l {
                        let seq = h.log.vv().get(o) + 1;
                        h.log.by_origin.entry(o.clone()).or_default().push(change::stub(o, seq));
                    }
                }
                h.step(Input::LocalWithheld(range_set(&ranges)), now)?;
            }
            Step::Offer(ranges) => {
                let held = h.log.vv();
                let ranges: Vec<_> = ranges
                    .into_iter()
                    .filter_map(|(o, f, l)| {
                        let l = l.min(held.get(&o));
                        (f <= l).then_some((o, f, l))
                    })
                    .collect();
                h.step(Input::Offer(range_set(&ranges)), now)?;
            }
            Step::Want(hashes) => h.step(Input::ChunksWanted(hashes), now)?,
            Step::Answer(n) => h.answer(n.into(), now)?,
        }
    }
    // Whatever is left settles.
    h.answer(10_000, now)?;
    prop_assert!(h.pending.is_empty(), "the session does not settle");
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    /// No sequence of peer frames makes the session panic, let a gap or an
    /// invalid change through, break batch numbering or the window, or ask
    /// for unbounded reads.
    #[test]
    fn hostile_frames_never_break_the_session(
        config in config(),
        opening_hello in any::<bool>(),
        steps in proptest::collection::vec(step(), 0..40),
    ) {
        run(config, opening_hello, steps)?;
    }
}

/// A peer naming ever more made-up origins (in hellos, acks, withheld
/// ranges) would grow the session's vectors without bound: past
/// `MAX_ORIGINS` the session ends instead.
#[test]
fn made_up_origins_are_bounded() {
    use ocmesh_replication::session::{MAX_ORIGINS, SessionError};
    let log = Log::new();
    let mut s = SyncSession::new(SessionConfig::default(), LOCAL, log.vv());
    s.open();
    let hello = pb::Frame {
        kind: Some(Kind::Hello(pb::Hello {
            protocol_version: pb::PROTOCOL_VERSION,
            have: Some(pb::VersionVector::default()),
            withheld: Vec::new(),
        })),
    };
    assert!(
        !s.handle(Input::Frame(hello), 0)
            .iter()
            .any(|o| matches!(o, Output::Close(_)))
    );
    let mut closed = None;
    for round in 0..20u64 {
        let entries = (0..1000)
            .map(|i| pb::OriginSeq {
                origin: format!("made-up-{round}-{i}"),
                seq: 1,
            })
            .collect();
        let withheld = pb::Frame {
            kind: Some(Kind::Withheld(pb::Withheld {
                ranges: vec![pb::SeqRange {
                    origin: format!("made-up-w-{round}"),
                    first: 1,
                    last: 1,
                }],
            })),
        };
        let ack = pb::Frame {
            kind: Some(Kind::Ack(pb::Ack {
                batch: 0,
                have: Some(pb::VersionVector { entries }),
            })),
        };
        for f in [withheld, ack] {
            for o in s.handle(Input::Frame(f), round) {
                if let Output::Close(e) = o {
                    closed = Some((round, e));
                }
            }
        }
        if closed.is_some() {
            break;
        }
    }
    let (round, e) = closed.expect("the session ends");
    assert_eq!(e, SessionError::TooManyOrigins);
    assert_eq!(
        round as usize,
        MAX_ORIGINS / 1000 - 1,
        "ends as soon as the bound is passed"
    );
}

/// The cases the random search is least likely to hit, each on its own.
#[test]
fn extreme_claims_close_or_are_survived() {
    let hello = |entries: Vec<(&str, u64)>, withheld: Vec<(&str, u64, u64)>| {
        Step::Peer(pb::Frame {
            kind: Some(Kind::Hello(pb::Hello {
                protocol_version: pb::PROTOCOL_VERSION,
                have: Some(pb::VersionVector {
                    entries: entries
                        .into_iter()
                        .map(|(o, s)| pb::OriginSeq {
                            origin: o.into(),
                            seq: s,
                        })
                        .collect(),
                }),
                withheld: withheld
                    .into_iter()
                    .map(|(o, f, l)| pb::SeqRange {
                        origin: o.into(),
                        first: f,
                        last: l,
                    })
                    .collect(),
            })),
        })
    };
    let ack = |batch, entries: Vec<(&str, u64)>| {
        Step::Peer(pb::Frame {
            kind: Some(Kind::Ack(pb::Ack {
                batch,
                have: Some(pb::VersionVector {
                    entries: entries
                        .into_iter()
                        .map(|(o, s)| pb::OriginSeq {
                            origin: o.into(),
                            seq: s,
                        })
                        .collect(),
                }),
            })),
        })
    };
    let withheld = |o: &str, f, l| {
        Step::Peer(pb::Frame {
            kind: Some(Kind::Withheld(pb::Withheld {
                ranges: vec![pb::SeqRange {
                    origin: o.into(),
                    first: f,
                    last: l,
                }],
            })),
        })
    };
    let small = SessionConfig {
        max_batch_changes: 1,
        max_batch_bytes: 10,
        max_in_flight: 1,
        ..SessionConfig::default()
    };
    let two = SessionConfig {
        max_batch_changes: 1,
        max_batch_bytes: 10,
        max_in_flight: 2,
        ..SessionConfig::default()
    };
    let cases: Vec<Vec<Step>> = vec![
        // An ack raising an origin to u64::MAX while a read of it is under way.
        vec![
            hello(vec![(LOCAL, 5)], vec![]),
            Step::Answer(1),
            ack(1, vec![("c", u64::MAX)]),
            Step::Answer(5),
        ],
        // Withheld ranges reaching u64::MAX while a read is under way.
        vec![
            hello(vec![(LOCAL, 5)], vec![]),
            Step::Answer(1),
            withheld("c", 2, u64::MAX),
            Step::Answer(5),
        ],
        // A third origin claimed at u64::MAX, then local writes.
        vec![hello(vec![("c", u64::MAX)], vec![]), Step::Write(2)],
        // Withheld ranges up to u64::MAX of a third origin, with a read under way.
        vec![
            hello(vec![], vec![("c", 1, u64::MAX)]),
            withheld("c", 1, u64::MAX),
            Step::Write(1),
        ],
        // An ack raising a third origin to u64::MAX while a read is under way.
        vec![hello(vec![], vec![]), ack(1, vec![("c", u64::MAX)]), Step::Write(3)],
        vec![hello(vec![], vec![]), withheld("c", u64::MAX, u64::MAX), Step::Write(3)],
        vec![hello(vec![("b", u64::MAX)], vec![("b", 1, u64::MAX)]), Step::Write(1)],
    ];
    for steps in cases {
        run(small.clone(), false, steps.clone()).unwrap_or_else(|e| panic!("{steps:?}: {e}"));
        run(two.clone(), false, steps.clone()).unwrap_or_else(|e| panic!("{steps:?}: {e}"));
        run(SessionConfig::default(), false, steps.clone()).unwrap_or_else(|e| panic!("{steps:?}: {e}"));
    }
}
