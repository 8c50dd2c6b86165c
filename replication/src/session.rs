//! The sync session between two linked sites, as a state machine with no I/O.
//!
//! Each side of a link runs one `SyncSession`. The shell (federation/) feeds
//! it frames from the peer and results of store reads and writes, and
//! carries out what it asks for: frames to send, changes to read from the
//! local log, changes to apply durably. Both sides run the same protocol:
//!
//! 1. each sends `Hello` with the version vector of what it holds;
//! 2. each streams the changes the other lacks, oldest first per origin, in
//!    batches of bounded size with at most `max_in_flight` unacknowledged;
//! 3. the receiver applies a batch durably, then acknowledges it with its
//!    new version vector; it may hand the store up to `max_applying`
//!    batches before the first is durable (so the store is never idle
//!    waiting for the next), and acknowledges them in batch order;
//! 4. afterwards new local changes (written here or received from a third
//!    site) are pushed as they appear: the live tail.
//!
//! Filtering: every change goes out either in full or, when the session's
//! [`PeerPolicy`] withholds it from this peer (see [`crate::filter`]), as a
//! withheld stub that only holds its (origin, seq) place, so sequences stay
//! contiguous and the peer's version vector catches up exactly. A stub
//! read from the local log (this site got it as a stub) goes on as a stub.
//! Each hello carries the sender's withheld ranges; the receiver sends any
//! of those it holds in full and may share (a refill), so two sites that
//! first met through a filtering relay end up exact once linked directly.
//! During a session the same request goes as a `Withheld` frame when the
//! site receives stubs over another link (`Input::LocalWithheld`), so a
//! stub relayed ahead of the direct copy does not leave a gap until the
//! next reconnect; ranges the receiver does not hold yet wait until it
//! does. A site that replaced stubs by their changes offers them to its
//! other peers (`Input::Offer`), which receive them unless they hold them.
//!
//! Invariants: a change the peer is known to hold (from its `Hello`, its
//! acks, or because it sent it to us) is never sent to it, so relayed
//! changes do not loop back; per origin, changes go out in sequence order
//! with no gaps, starting right after what the peer holds.

use ocmesh_proto::federation::{self as pb, frame::Kind};

use std::collections::VecDeque;

use crate::change::{self, Change, ChangeError};
use crate::chunks::{ChunkExchange, ChunkOutput, ChunkStats, Hash};
use crate::filter::{self, PeerPolicy};
use crate::vv::{VersionVector, VersionVectorError};
use crate::withheld::{MAX_HELLO_RANGES, RangeError, RangeSet};

/// Most ranges waiting to be refilled to the peer; more are dropped (and
/// counted) until the peer's next hello asks again.
pub const MAX_REFILL_RANGES: usize = 4 * MAX_HELLO_RANGES;

/// Most origins a session keeps track of for its peer: far more sites than
/// a mesh has, and a bound on what a peer naming made-up origins in hello
/// after ack can make this site hold.
pub const MAX_ORIGINS: usize = 10_000;

/// Limits of one session.
#[derive(Clone, Debug)]
pub struct SessionConfig {
    /// Most changes in one batch.
    pub max_batch_changes: usize,
    /// Most body bytes in one batch (a single larger change still goes alone).
    pub max_batch_bytes: usize,
    /// Most batches sent and not yet acknowledged.
    pub max_in_flight: u64,
    /// Most received batches handed to the store (`Output::Apply`) and not
    /// yet durable (`Input::Applied`); see [`SyncSession::accepts_frames`].
    /// 0 counts as 1.
    pub max_applying: u64,
}

impl Default for SessionConfig {
    fn default() -> Self {
        SessionConfig {
            max_batch_changes: 1024,
            max_batch_bytes: 1024 * 1024,
            max_in_flight: 4,
            // Two keep the writer busy: it works on one while the next
            // waits in its queue, and the one after is decoded and
            // pre-parsed meanwhile. More only hold more parsed batches in
            // memory (a third took the bench's peak RSS past 200 MiB).
            max_applying: 2,
        }
    }
}

/// What the shell tells the session.
#[derive(Debug)]
pub enum Input {
    /// A frame decoded from the peer.
    Frame(pb::Frame),
    /// The answer to `Output::Fetch`: changes from the local log.
    Fetched(Vec<Change>),
    /// `Output::Apply { batch }` is durable; `have` is what the site now
    /// holds durably (it may include later batches already durable too).
    /// Answers come in the order of the `Apply` outputs.
    Applied { batch: u64, have: VersionVector },
    /// The local log has grown (local writes, or changes from other peers).
    LocalAdvanced(VersionVector),
    /// File chunks this site lacks (a page of them): ask the peer.
    ChunksWanted(Vec<Hash>),
    /// The answer to `Output::ReadChunk`: the chunk, or `None` if not held.
    ChunkRead { hash: Hash, data: Option<Vec<u8>> },
    /// The answer to `Output::FetchRanges`: changes (full or stubs) from
    /// the local log, in the order of the requested ranges.
    FetchedRanges(Vec<Change>),
    /// This site now holds these changes only as stubs (received over
    /// another link): ask the peer for them.
    LocalWithheld(RangeSet),
    /// This site now holds these changes in full after holding them as
    /// stubs (refilled over another link): send them to the peer if it may
    /// have them (it skips those it holds).
    Offer(RangeSet),
}

/// Read request for given sequences of the local log (a refill of the
/// peer's withheld ranges).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RangeRequest {
    /// (origin, first, last), inclusive; read in this order.
    pub ranges: Vec<(String, u64, u64)>,
    pub max_changes: usize,
    /// Stop before exceeding this many body bytes (at least one change).
    pub max_bytes: usize,
}

/// Read request for the local log.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FetchRequest {
    /// For every origin, return changes with a sequence above this one,
    /// per origin in sequence order.
    pub after: VersionVector,
    pub max_changes: usize,
    pub max_bytes: usize,
}

/// What the session asks of the shell.
#[derive(Debug)]
pub enum Output {
    /// Send this frame to the peer.
    Send(pb::Frame),
    /// Read changes from the local log and answer with `Input::Fetched`.
    Fetch(FetchRequest),
    /// Read these sequences from the local log and answer with
    /// `Input::FetchedRanges`.
    FetchRanges(RangeRequest),
    /// Apply these changes durably (skipping any already held), then answer
    /// with `Input::Applied`. Batches must be applied, and answered, in the
    /// order given; the next may be handed to the store before the last is
    /// answered (at most `max_applying` outstanding).
    Apply { batch: u64, changes: Vec<Change> },
    /// The peer has acknowledged holding (at least) this.
    PeerHas(VersionVector),
    /// The peer asks for this chunk: read it and answer with `Input::ChunkRead`.
    ReadChunk(Hash),
    /// A chunk from the peer, checked against its hash: store it.
    StoreChunk { hash: Hash, data: Vec<u8> },
    /// The session is over: close the link and log the reason.
    Close(SessionError),
}

/// Why a session ended.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SessionError {
    #[error("peer sent {0} before Hello")]
    BeforeHello(&'static str),
    #[error("peer sent a second Hello")]
    DuplicateHello,
    #[error("peer sent a frame with no content")]
    EmptyFrame,
    #[error("peer speaks protocol version {0}, which this site does not")]
    UnsupportedVersion(u32),
    #[error("peer sent a malformed version vector: {0}")]
    BadVersionVector(#[from] VersionVectorError),
    #[error("peer claims {claimed} changes from this site ({origin}), which has only made {ours}")]
    ImpossibleClaim { origin: String, claimed: u64, ours: u64 },
    #[error("peer sent batch {got}, expected {expected}")]
    BatchOutOfOrder { expected: u64, got: u64 },
    #[error("peer acknowledged batch {got}, but only {sent} were sent")]
    AckForUnsentBatch { got: u64, sent: u64 },
    #[error("peer sent an invalid change: {0}")]
    InvalidChange(#[from] ChangeError),
    #[error("peer sent {origin}:{seq} out of order (expected {expected})")]
    ChangeOutOfOrder { origin: String, seq: u64, expected: u64 },
    #[error("local log returned {origin}:{seq}, expected {expected}")]
    LocalLogGap { origin: String, seq: u64, expected: u64 },
    #[error("peer sent a chunk hash of {len} bytes; hashes are 32")]
    BadChunkHash { len: usize },
    #[error("peer asked for {asked} chunks while owed {owed}: more than the bound")]
    ChunkFlood { asked: usize, owed: usize },
    #[error("peer sent chunk {0}, which was not asked for")]
    UnaskedChunk(String),
    #[error("peer sent content for chunk {0} that does not match its hash")]
    ChunkMismatch(String),
    #[error("peer's hello lists bad withheld ranges: {0}")]
    BadWithheld(#[from] RangeError),
    #[error("local log returned {origin}:{seq}, which was not asked for")]
    UnaskedRange { origin: String, seq: u64 },
    #[error("peer named more than {MAX_ORIGINS} origins")]
    TooManyOrigins,
    /// The shell answered an `Apply` out of order (a bug here, not the peer's).
    #[error("store answered batch {got}, but the oldest batch being applied is {expected:?}")]
    AppliedOutOfOrder { expected: Option<u64>, got: u64 },
}

/// Counters of one session.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SessionStats {
    pub batches_sent: u64,
    pub changes_sent: u64,
    pub batches_received: u64,
    pub changes_received: u64,
    /// Changes this site withheld from the peer (sent as stubs).
    pub withheld: u64,
    /// Stubs this site holds that it passed on as stubs.
    pub stubs_relayed: u64,
    /// Changes sent in full because the peer's hello listed them as withheld.
    pub refilled: u64,
    /// Stubs received from the peer.
    pub stubs_received: u64,
    /// Ranges to refill dropped because the queue was full.
    pub refills_dropped: u64,
    /// Most received batches in the store at once (handed over, not yet
    /// durable); at most `max_applying`.
    pub applying_peak: u64,
    /// Times a received batch filled the store's share to `max_applying`,
    /// so the next frame waited for the oldest to become durable.
    pub applying_full: u64,
}

/// One side of a sync session.
#[derive(Debug)]
pub struct SyncSession {
    config: SessionConfig,
    local_site: String,
    /// What this site holds, as last told.
    local: VersionVector,
    /// What the peer holds or has been sent: nothing at or below this is
    /// ever sent again.
    sent: VersionVector,
    /// What the peer has acknowledged holding.
    acked: VersionVector,
    peer_hello: bool,
    hello_sent: bool,
    fetching: bool,
    /// Last batch number sent, and last acknowledged.
    last_batch_sent: u64,
    last_batch_acked: u64,
    /// Last batch number received from the peer.
    last_batch_received: u64,
    /// Received batches handed to the store and not yet durable, oldest
    /// first; at most `max_applying` long while the shell heeds
    /// `accepts_frames`.
    applying: VecDeque<u64>,
    /// Everything we have told the peer we hold (in Hello, acks, or by
    /// sending it): the peer sends each origin's changes from just above
    /// this, so a received change above it + 1 is a gap.
    told: VersionVector,
    /// When each unacknowledged batch went out (caller's milliseconds),
    /// oldest first; at most `max_in_flight` long.
    in_flight_since: VecDeque<u64>,
    closed: bool,
    stats: SessionStats,
    chunks: ChunkExchange,
    /// What may go to this peer in full.
    policy: PeerPolicy,
    /// What this site holds only as stubs (for its hello).
    local_withheld: RangeSet,
    /// The peer's withheld ranges still to look at, in order.
    refill: VecDeque<(String, u64, u64)>,
    /// The ranges of the refill read under way.
    refilling: Option<Vec<(String, u64, u64)>>,
    /// Ranges the peer asked for that this site does not hold yet: they
    /// join `refill` as the local log grows past them.
    deferred: RangeSet,
}

impl SyncSession {
    /// A session for `local_site`, which holds `local`.
    pub fn new(config: SessionConfig, local_site: impl Into<String>, local: VersionVector) -> Self {
        SyncSession {
            config,
            local_site: local_site.into(),
            local,
            sent: VersionVector::new(),
            acked: VersionVector::new(),
            peer_hello: false,
            hello_sent: false,
            fetching: false,
            last_batch_sent: 0,
            last_batch_acked: 0,
            last_batch_received: 0,
            applying: VecDeque::new(),
            told: VersionVector::new(),
            in_flight_since: VecDeque::new(),
            closed: false,
            stats: SessionStats::default(),
            chunks: ChunkExchange::default(),
            policy: PeerPolicy::default(),
            local_withheld: RangeSet::new(),
            refill: VecDeque::new(),
            refilling: None,
            deferred: RangeSet::new(),
        }
    }

    /// What may go to the peer in full (default: everything).
    pub fn with_policy(mut self, policy: PeerPolicy) -> Self {
        self.policy = policy;
        self
    }

    /// What this site holds only as stubs: its hello asks for them.
    pub fn with_withheld(mut self, withheld: RangeSet) -> Self {
        self.local_withheld = withheld;
        self
    }

    /// Replaces the policy (the peer's roles changed); applies to changes
    /// read from now on.
    pub fn set_policy(&mut self, policy: PeerPolicy) {
        self.policy = policy;
    }

    pub fn policy(&self) -> &PeerPolicy {
        &self.policy
    }

    /// The opening frame. Call once, when the link is up.
    pub fn open(&mut self) -> Vec<Output> {
        if self.hello_sent {
            return Vec::new();
        }
        self.hello_sent = true;
        self.told = self.local.clone();
        vec![Output::Send(frame(Kind::Hello(pb::Hello {
            protocol_version: pb::PROTOCOL_VERSION,
            have: Some(self.local.to_proto()),
            withheld: self.local_withheld.to_proto(MAX_HELLO_RANGES),
        })))]
    }

    /// Feeds one input at the caller's time `now_ms`; returns what to do,
    /// in order.
    pub fn handle(&mut self, input: Input, now_ms: u64) -> Vec<Output> {
        let mut out = Vec::new();
        if self.closed {
            return out;
        }
        if let Err(e) = self.step(input, now_ms, &mut out) {
            self.closed = true;
            out.push(Output::Close(e));
        }
        out
    }

    /// True once the session has asked to close.
    pub fn is_closed(&self) -> bool {
        self.closed
    }

    /// What the peer has acknowledged.
    pub fn peer_acked(&self) -> &VersionVector {
        &self.acked
    }

    /// Changes held here that the peer has not acknowledged.
    pub fn unacked(&self) -> u64 {
        self.local.missing_from(&self.acked)
    }

    /// True when the peer's hello has arrived and nothing is in flight or
    /// waiting to be sent (acks of batches being applied included).
    pub fn is_idle(&self) -> bool {
        self.peer_hello
            && !self.fetching
            && self.applying.is_empty()
            && self.last_batch_acked == self.last_batch_sent
            && !self.local.exceeds(&self.sent)
            && self.refill.is_empty()
            && self.chunks.is_idle()
    }

    pub fn stats(&self) -> &SessionStats {
        &self.stats
    }

    /// Received batches handed to the store and not yet answered.
    pub fn applying(&self) -> u64 {
        self.applying.len() as u64
    }

    /// False while `max_applying` received batches are in the store: the
    /// shell should then read no frame from the peer until an
    /// `Input::Applied` (a frame can carry a batch, one more `Apply`). The
    /// peer's frames wait in the stream meanwhile, as they did when a
    /// session applied one batch at a time.
    pub fn accepts_frames(&self) -> bool {
        self.applying() < self.config.max_applying.max(1)
    }

    pub fn chunk_stats(&self) -> &ChunkStats {
        self.chunks.stats()
    }

    /// How long the oldest unacknowledged batch has waited for its ack, at
    /// `now_ms`: a growing figure means the peer is not keeping up.
    pub fn ack_wait_ms(&self, now_ms: u64) -> Option<u64> {
        self.in_flight_since.front().map(|&t| now_ms.saturating_sub(t))
    }

    fn step(&mut self, input: Input, now_ms: u64, out: &mut Vec<Output>) -> Result<(), SessionError> {
        match input {
            Input::Frame(f) => {
                self.on_frame(f, now_ms, out)?;
                // Every origin the peer names stays in these vectors for
                // the session's life: bound them.
                if self.sent.len().max(self.acked.len()).max(self.told.len()) > MAX_ORIGINS {
                    return Err(SessionError::TooManyOrigins);
                }
            }
            Input::Fetched(changes) => self.on_fetched(changes, now_ms, out)?,
            Input::Applied { batch, have } => {
                // Acks go out in batch order: the peer takes an ack of
                // batch N as covering every batch up to N.
                match self.applying.front() {
                    Some(&oldest) if oldest == batch => {
                        self.applying.pop_front();
                    }
                    oldest => {
                        return Err(SessionError::AppliedOutOfOrder {
                            expected: oldest.copied(),
                            got: batch,
                        });
                    }
                }
                self.local.merge(&have);
                self.told.merge(&self.local);
                self.release_deferred();
                out.push(Output::Send(frame(Kind::Ack(pb::Ack {
                    batch,
                    have: Some(self.local.to_proto()),
                }))));
            }
            Input::LocalAdvanced(have) => {
                self.local.merge(&have);
                self.release_deferred();
            }
            Input::LocalWithheld(stubs) => {
                // The stubs are in the log, so the vector covers them:
                // the peer may answer with any change up to them.
                for (origin, _, last) in stubs.ranges() {
                    self.local.advance(origin, last);
                    self.told.advance(origin, last);
                }
                let ranges = stubs.to_proto(usize::MAX);
                for chunk in ranges.chunks(MAX_HELLO_RANGES) {
                    out.push(Output::Send(frame(Kind::Withheld(pb::Withheld {
                        ranges: chunk.to_vec(),
                    }))));
                }
            }
            Input::Offer(filled) => {
                let ranges: Vec<(String, u64, u64)> = filled.ranges().map(|(o, f, l)| (o.to_owned(), f, l)).collect();
                for (o, f, l) in ranges {
                    self.queue_refill(&o, f, l);
                }
            }
            Input::ChunksWanted(hashes) => {
                let mut asks = Vec::new();
                self.chunks.want(hashes, now_ms, &mut asks);
                chunk_outputs(asks, out);
            }
            Input::ChunkRead { hash, data } => {
                let answer = self.chunks.on_read(hash, data);
                out.push(Output::Send(frame(Kind::ChunkData(answer))));
            }
            Input::FetchedRanges(changes) => self.on_fetched_ranges(changes, now_ms, out)?,
        }
        self.maybe_fetch(out);
        Ok(())
    }

    fn on_frame(&mut self, f: pb::Frame, now_ms: u64, out: &mut Vec<Output>) -> Result<(), SessionError> {
        let kind = f.kind.ok_or(SessionError::EmptyFrame)?;
        match kind {
            Kind::Hello(h) => {
                if self.peer_hello {
                    return Err(SessionError::DuplicateHello);
                }
                if h.protocol_version != pb::PROTOCOL_VERSION {
                    return Err(SessionError::UnsupportedVersion(h.protocol_version));
                }
                let have = self.check_claim(h.have.unwrap_or_default())?;
                let withheld = RangeSet::from_proto(&h.withheld)?;
                // Only what the peer's vector covers can be refilled.
                for (origin, first, last) in withheld.ranges() {
                    self.queue_refill(origin, first, last.min(have.get(origin)));
                }
                self.peer_hello = true;
                self.sent.merge(&have);
                self.acked.merge(&have);
                out.push(Output::PeerHas(have));
            }
            Kind::Batch(b) => {
                if !self.peer_hello {
                    return Err(SessionError::BeforeHello("a batch"));
                }
                let expected = self.last_batch_received + 1;
                if b.batch != expected {
                    return Err(SessionError::BatchOutOfOrder { expected, got: b.batch });
                }
                for c in &b.changes {
                    change::validate(c)?;
                    if c.withheld {
                        self.stats.stubs_received += 1;
                    }
                    let next = self.told.get(&c.origin).saturating_add(1);
                    if c.seq > next {
                        return Err(SessionError::ChangeOutOfOrder {
                            origin: c.origin.clone(),
                            seq: c.seq,
                            expected: next,
                        });
                    }
                    self.told.advance(&c.origin, c.seq);
                    // The peer holds it: never send it back.
                    self.sent.advance(&c.origin, c.seq);
                    self.acked.advance(&c.origin, c.seq);
                }
                self.last_batch_received = b.batch;
                self.applying.push_back(b.batch);
                let applying = self.applying();
                self.stats.applying_peak = self.stats.applying_peak.max(applying);
                if applying >= self.config.max_applying.max(1) {
                    self.stats.applying_full += 1;
                }
                self.stats.batches_received += 1;
                self.stats.changes_received += b.changes.len() as u64;
                out.push(Output::Apply {
                    batch: b.batch,
                    changes: b.changes,
                });
            }
            Kind::Ack(a) => {
                if !self.peer_hello {
                    return Err(SessionError::BeforeHello("an ack"));
                }
                if a.batch > self.last_batch_sent {
                    return Err(SessionError::AckForUnsentBatch {
                        got: a.batch,
                        sent: self.last_batch_sent,
                    });
                }
                let have = self.check_claim(a.have.unwrap_or_default())?;
                while self.last_batch_acked < a.batch {
                    self.last_batch_acked += 1;
                    self.in_flight_since.pop_front();
                }
                self.acked.merge(&have);
                self.sent.merge(&have);
                out.push(Output::PeerHas(self.acked.clone()));
            }
            Kind::ChunkWant(w) => {
                if !self.peer_hello {
                    return Err(SessionError::BeforeHello("a chunk request"));
                }
                let mut reads = Vec::new();
                self.chunks.on_want(w, &mut reads)?;
                chunk_outputs(reads, out);
            }
            Kind::Withheld(w) => {
                if !self.peer_hello {
                    return Err(SessionError::BeforeHello("withheld ranges"));
                }
                let withheld = RangeSet::from_proto(&w.ranges)?;
                for (origin, first, last) in withheld.ranges() {
                    if origin == self.local_site {
                        // This site made them; nobody holds stubs of them
                        // that it has not made.
                        let ours = self.local.get(origin);
                        if last > ours {
                            return Err(SessionError::ImpossibleClaim {
                                origin: origin.to_owned(),
                                claimed: last,
                                ours,
                            });
                        }
                    }
                    // The peer holds stubs up to `last`: a gap-free answer.
                    self.sent.advance(origin, last);
                    self.acked.advance(origin, last);
                    self.queue_refill(origin, first, last);
                }
            }
            Kind::ChunkData(d) => {
                let mut next = Vec::new();
                self.chunks.on_data(d, now_ms, &mut next)?;
                chunk_outputs(next, out);
            }
        }
        Ok(())
    }

    /// Queues `origin`:`first..=last` for a refill: the part this site
    /// holds now, and the rest once it does.
    fn queue_refill(&mut self, origin: &str, first: u64, last: u64) {
        let held = self.local.get(origin);
        let now = last.min(held);
        if first <= now {
            if self.refill.len() < MAX_REFILL_RANGES {
                self.refill.push_back((origin.to_owned(), first, now));
            } else {
                self.stats.refills_dropped += 1;
            }
        }
        if last > held {
            if self.deferred.ranges().count() < MAX_HELLO_RANGES {
                self.deferred
                    .insert_range(origin, first.max(held.saturating_add(1)), last);
            } else {
                self.stats.refills_dropped += 1;
            }
        }
    }

    /// Moves deferred ranges the local log now covers to the refill queue.
    fn release_deferred(&mut self) {
        if self.deferred.is_empty() {
            return;
        }
        let due = self.deferred.ranges().any(|(o, f, _)| f <= self.local.get(o));
        if !due {
            return;
        }
        let all: Vec<(String, u64, u64)> = self.deferred.ranges().map(|(o, f, l)| (o.to_owned(), f, l)).collect();
        self.deferred = RangeSet::new();
        for (o, f, l) in all {
            self.queue_refill(&o, f, l);
        }
    }

    /// Refuses a vector that claims more of our own changes than we made.
    fn check_claim(&self, v: pb::VersionVector) -> Result<VersionVector, SessionError> {
        let have = VersionVector::from_proto(&v)?;
        let claimed = have.get(&self.local_site);
        let ours = self.local.get(&self.local_site);
        if claimed > ours {
            return Err(SessionError::ImpossibleClaim {
                origin: self.local_site.clone(),
                claimed,
                ours,
            });
        }
        Ok(have)
    }

    fn on_fetched(&mut self, changes: Vec<Change>, now_ms: u64, out: &mut Vec<Output>) -> Result<(), SessionError> {
        self.fetching = false;
        let mut batch = Vec::with_capacity(changes.len());
        for c in changes {
            // The peer's ack or withheld ranges may have raised `sent` to
            // anything up to u64::MAX while this read was under way.
            let sent = self.sent.get(&c.origin);
            if c.seq <= sent {
                // Learnt meanwhile that the peer holds it.
                continue;
            }
            if c.seq != sent + 1 {
                return Err(SessionError::LocalLogGap {
                    origin: c.origin.clone(),
                    seq: c.seq,
                    expected: sent + 1,
                });
            }
            self.sent.advance(&c.origin, c.seq);
            self.local.advance(&c.origin, c.seq);
            self.told.advance(&c.origin, c.seq);
            if c.withheld {
                self.stats.stubs_relayed += 1;
                batch.push(c);
            } else if filter::decide(&c, &self.policy).is_err() {
                self.stats.withheld += 1;
                batch.push(change::stub_of(&c));
            } else {
                batch.push(c);
            }
        }
        self.send_batch(batch, now_ms, out);
        Ok(())
    }

    /// Sends the changes of the peer's withheld ranges that this site holds
    /// in full and may share; puts back what the read did not reach.
    fn on_fetched_ranges(
        &mut self,
        changes: Vec<Change>,
        now_ms: u64,
        out: &mut Vec<Output>,
    ) -> Result<(), SessionError> {
        self.fetching = false;
        let requested = self.refilling.take().unwrap_or_default();
        // Index in `requested` and seq of the last change read.
        let mut reached: Option<(usize, u64)> = None;
        let mut batch = Vec::new();
        for c in changes {
            let from = reached.map_or(0, |(i, _)| i);
            let after = reached.map_or(0, |(_, s)| s);
            let Some(i) = requested
                .iter()
                .enumerate()
                .skip(from)
                .find(|(j, (o, f, l))| {
                    *o == c.origin && (*f..=*l).contains(&c.seq) && (*j > from || reached.is_none() || c.seq > after)
                })
                .map(|(i, _)| i)
            else {
                return Err(SessionError::UnaskedRange {
                    origin: c.origin,
                    seq: c.seq,
                });
            };
            reached = Some((i, c.seq));
            if !c.withheld && filter::decide(&c, &self.policy).is_ok() {
                self.stats.refilled += 1;
                batch.push(c);
            }
        }
        // The read stops at its limits: what it did not reach comes next.
        if let Some((i, seq)) = reached {
            let mut rest: Vec<(String, u64, u64)> = Vec::new();
            let (o, _, l) = &requested[i];
            if seq < *l {
                rest.push((o.clone(), seq + 1, *l));
            }
            rest.extend(requested[i + 1..].iter().cloned());
            for r in rest.into_iter().rev() {
                self.refill.push_front(r);
            }
        }
        self.send_batch(batch, now_ms, out);
        Ok(())
    }

    fn send_batch(&mut self, batch: Vec<Change>, now_ms: u64, out: &mut Vec<Output>) {
        if batch.is_empty() {
            return;
        }
        self.last_batch_sent += 1;
        self.in_flight_since.push_back(now_ms);
        self.stats.batches_sent += 1;
        self.stats.changes_sent += batch.len() as u64;
        out.push(Output::Send(frame(Kind::Batch(pb::Batch {
            batch: self.last_batch_sent,
            changes: batch,
        }))));
    }

    fn maybe_fetch(&mut self, out: &mut Vec<Output>) {
        let in_flight = self.last_batch_sent - self.last_batch_acked;
        if !self.peer_hello || self.fetching || in_flight >= self.config.max_in_flight {
            return;
        }
        // New changes first; the peer's withheld ranges when none are due.
        if !self.refill.is_empty() && !self.local.exceeds(&self.sent) {
            // At most a batch's worth of sequences per read.
            let mut ranges = Vec::new();
            let mut span = 0u64;
            let max = self.config.max_batch_changes.max(1) as u64;
            while span < max {
                let Some((o, f, l)) = self.refill.pop_front() else {
                    break;
                };
                let take = (l - f + 1).min(max - span);
                if take < l - f + 1 {
                    self.refill.push_front((o.clone(), f + take, l));
                }
                ranges.push((o, f, f + take - 1));
                span += take;
            }
            self.fetching = true;
            self.refilling = Some(ranges.clone());
            out.push(Output::FetchRanges(RangeRequest {
                ranges,
                max_changes: self.config.max_batch_changes,
                max_bytes: self.config.max_batch_bytes,
            }));
            return;
        }
        if self.local.exceeds(&self.sent) {
            self.fetching = true;
            out.push(Output::Fetch(FetchRequest {
                after: self.sent.clone(),
                max_changes: self.config.max_batch_changes,
                max_bytes: self.config.max_batch_bytes,
            }));
        }
    }
}

fn chunk_outputs(from: Vec<ChunkOutput>, out: &mut Vec<Output>) {
    out.extend(from.into_iter().map(|o| match o {
        ChunkOutput::Send(w) => Output::Send(frame(Kind::ChunkWant(w))),
        ChunkOutput::Read(hash) => Output::ReadChunk(hash),
        ChunkOutput::Store(hash, data) => Output::StoreChunk { hash, data },
    }));
}

fn frame(kind: Kind) -> pb::Frame {
    pb::Frame { kind: Some(kind) }
}

#[cfg(test)]
mod tests;
