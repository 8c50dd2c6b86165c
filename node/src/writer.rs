//! The single writer: every write of the site goes through one thread that
//! groups the requests waiting in its queue into one redb transaction and
//! one fsync (group commit), then answers each. A write is answered only
//! after its log record is durable, and no reader sees it before the redb
//! commit holding it is published behind that sync.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use redb::{Database, ReadableDatabase, ReadableTable};
use serde_json::{Map, Value};
use tokio::sync::mpsc;

use ocmesh_replication::change::validate;
use ocmesh_replication::{Change, ChangeKind, Clock, Timestamp, VersionVector};

use crate::edit::{Edit, Prior};
use crate::error::{ApplyError, WriteError};
use crate::ids::{IdGen, iso8601, validate_collection, validate_id};
use crate::publisher::Committed;
use crate::store::{
    Changes, LocalWrite, META_HLC, META_WAL_FROM, SharedDoc, Source, StorageError, WriteTables, body_object,
};
use crate::{NodeStats, Principal};

/// Most requests committed together.
const MAX_GROUP: usize = 512;

/// Most writes in a transaction several groups share, and the longest it
/// stays open: readers wait for its commit (see `run_shared`).
const MAX_SHARED_OPS: usize = 512;
const MAX_SHARED_TIME: std::time::Duration = std::time::Duration::from_millis(2);

/// How long a shared transaction waits, open, for the next write once the
/// queue has run dry, before it commits: the next write usually comes
/// from a caller just answered, and joining its transaction saves a commit
/// and the tables' reopening. A reader waiting for the commit cuts the
/// wait short (see `Doorbell`).
const IDLE_WAIT: std::time::Duration = std::time::Duration::from_micros(500);

/// Wakes the writer while it waits, with a transaction open, for more
/// writes (`Writer::next_shared`): every new request rings it, and a
/// reader waiting for that transaction's commit asks it to commit now.
#[derive(Debug, Default)]
pub(crate) struct Doorbell {
    writer: std::sync::OnceLock<std::thread::Thread>,
    commit_now: std::sync::atomic::AtomicBool,
}

impl Doorbell {
    /// Names the writer's thread, once it runs.
    pub fn set_writer(&self, thread: std::thread::Thread) {
        let _ = self.writer.set(thread);
    }

    /// A request was queued.
    pub fn ring(&self) {
        if let Some(t) = self.writer.get() {
            t.unpark();
        }
    }

    /// A reader waits for the open transaction's commit.
    pub fn ask_commit(&self) {
        self.commit_now.store(true, Ordering::Release);
        self.ring();
    }
    /// Whether a reader asked for a commit not yet taken up.
    #[cfg(test)]
    pub fn commit_asked(&self) -> bool {
        self.commit_now.load(Ordering::Acquire)
    }
}

/// A write to carry out.
#[derive(Debug, Clone)]
pub(crate) enum WriteOp {
    Insert {
        collection: String,
        doc: Map<String, Value>,
        by: Principal,
    },
    Replace {
        collection: String,
        id: String,
        doc: Map<String, Value>,
        by: Principal,
    },
    Delete {
        collection: String,
        id: String,
        by: Principal,
    },
    /// Changes from a peer, in per-origin sequence order.
    Apply {
        changes: Vec<Incoming>,
    },
    CreateIndex {
        collection: String,
        field: String,
    },
    DropIndex {
        collection: String,
        field: String,
    },
    AddQueue {
        doc: Map<String, Value>,
        by: Principal,
    },
    UpdateQueue {
        name: String,
        doc: Map<String, Value>,
        by: Principal,
    },
    DeleteQueue {
        name: String,
        by: Principal,
    },
    /// Deletes a queue's items, and the queue too when `delete_queue`.
    PurgeQueue {
        name: String,
        delete_queue: bool,
        by: Principal,
    },
    PushItems {
        queue: String,
        items: Vec<Map<String, Value>>,
        by: Principal,
    },
    PopItem {
        queue: String,
        by: Principal,
    },
    FinishItem {
        id: String,
        state: String,
        errortype: Option<String>,
        errormessage: Option<String>,
        payload: Option<Map<String, Value>>,
        by: Principal,
    },
    DeleteItem {
        id: String,
        by: Principal,
    },
    /// An operator moves an item to this site (a new ownership epoch).
    TakeoverItem {
        id: String,
        by: Principal,
    },
    /// Returns items whose processing lease ran out to their queues.
    ExpireLeases,
    UpdateOne {
        collection: String,
        id: String,
        update: Value,
        by: Principal,
    },
    UpdateMany {
        collection: String,
        filter: crate::query::Filter,
        update: Value,
        by: Principal,
    },
    InsertMany {
        collection: String,
        docs: Vec<Map<String, Value>>,
        by: Principal,
    },
    InsertOrUpdate {
        collection: String,
        doc: Map<String, Value>,
        uniqueness: Vec<String>,
        by: Principal,
    },
    DeleteMany {
        collection: String,
        filter: crate::query::Filter,
        by: Principal,
    },
    Recover {
        collection: String,
        id: String,
        by: Principal,
    },
    /// Stores a chunk under its BLAKE3 hash unless already held.
    PutChunk {
        hash: [u8; 32],
        data: Vec<u8>,
    },
    CreateFile {
        doc: Map<String, Value>,
        by: Principal,
    },
    DeleteFile {
        id: String,
        by: Principal,
    },
    CreateUser {
        username: String,
        name: String,
        hash: String,
        by: Principal,
    },
}

/// A peer's change with what the writer thread would otherwise compute:
/// its encoding (the change log's bytes) and its parsed body. The caller
/// prepares it on its own thread, since the single writer is the node's
/// bottleneck.
#[derive(Debug, Clone)]
pub(crate) struct Incoming {
    pub change: Change,
    pub encoded: Vec<u8>,
    /// Whether the body is a JSON object (false for a withheld stub; a
    /// new change without one is refused).
    pub object: bool,
    /// The parsed body, except for an insert into a plain collection: that
    /// is most likely the document's first version, which the writer
    /// stores as a reference to the change, reading only the indexed
    /// fields (`crate::body_scan`); it parses the body itself if not.
    pub body: Option<Map<String, Value>>,
}

impl Incoming {
    pub fn new(change: Change) -> Self {
        use prost::Message;
        let encoded = change.encode_to_vec();
        let (object, body) = if change.withheld {
            (false, None)
        } else if crate::store::first_version_is_plain(&change) {
            (crate::body_scan::is_object(&change.body), None)
        } else {
            let body = body_object(&change).ok();
            (body.is_some(), body)
        };
        Incoming {
            change,
            encoded,
            object,
            body,
        }
    }
}

/// What a write produced.
#[derive(Debug)]
pub(crate) enum WriteDone {
    /// Shared with the writer's cache; the caller copies it on its own
    /// thread if it needs its own.
    Document(SharedDoc),
    Applied(ApplyReport),
    Documents(Vec<SharedDoc>),
    Nothing,
}

/// Outcome of applying a peer's batch.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct ApplyReport {
    /// Changes new to this site, now durable.
    pub applied: u64,
    /// Changes already held (from this or another peer), skipped.
    pub duplicates: u64,
    /// Changes whose HLC was further ahead of our clock than the drift bound.
    pub clock_clamped: u64,
    /// Changes logged but refused: their author lacked the right.
    pub refused: u64,
    /// Withheld stubs logged (their content was not shared with this site).
    pub withheld: u64,
    /// Changes that replaced a withheld stub held here (refills).
    pub filled: u64,
    /// Which changes were logged as stubs, and which stubs were replaced.
    pub new_stubs: ocmesh_replication::RangeSet,
    pub filled_ranges: ocmesh_replication::RangeSet,
}

/// What a group came to, for the publisher.
#[derive(Default)]
struct GroupOutcome {
    results: Vec<Result<WriteDone, WriteError>>,
    /// Queues that got ready items.
    readied: Vec<String>,
    /// Whether the group's log record still needs a sync.
    needs_sync: bool,
    /// redb as of the group's commit, if it committed.
    snapshot: Option<redb::ReadTransaction>,
}

impl GroupOutcome {
    /// Every write of a group of `n` refused with `e`.
    fn refused(n: usize, e: StorageError) -> Self {
        GroupOutcome {
            results: (0..n).map(|_| Err(WriteError::Storage(e.clone()))).collect(),
            ..GroupOutcome::default()
        }
    }
}

impl WriteOp {
    /// Ops that write redb tables the write-ahead log does not carry; their
    /// group is committed durably.
    fn writes_outside_changes(&self) -> bool {
        matches!(
            self,
            WriteOp::CreateIndex { .. }
                | WriteOp::DropIndex { .. }
                | WriteOp::PutChunk { .. }
                | WriteOp::CreateUser { .. }
        )
    }

    /// Ops that append several changes and can fail after the first: if
    /// one does, its group is run again without it, so nothing of a
    /// refused write is ever committed.
    fn writes_several(&self) -> bool {
        match self {
            WriteOp::PushItems { items, .. } => items.len() > 1,
            WriteOp::UpdateMany { .. }
            | WriteOp::InsertMany { .. }
            | WriteOp::DeleteMany { .. }
            | WriteOp::PurgeQueue { .. } => true,
            _ => false,
        }
    }
}

/// Why a group did not commit.
enum GroupFailure {
    /// The store failed: every write of the group is refused.
    Storage(StorageError),
    /// Op `index` was refused after appending some of its changes: the
    /// transaction was aborted; run the group again without it.
    Partial { index: usize, error: WriteError },
}

impl From<StorageError> for GroupFailure {
    fn from(e: StorageError) -> Self {
        GroupFailure::Storage(e)
    }
}

impl From<redb::TransactionError> for GroupFailure {
    fn from(e: redb::TransactionError) -> Self {
        GroupFailure::Storage(e.into())
    }
}

impl From<redb::CommitError> for GroupFailure {
    fn from(e: redb::CommitError) -> Self {
        GroupFailure::Storage(e.into())
    }
}

impl From<redb::StorageError> for GroupFailure {
    fn from(e: redb::StorageError) -> Self {
        GroupFailure::Storage(e.into())
    }
}

pub(crate) struct Request {
    pub op: WriteOp,
    pub reply: crate::publisher::Reply,
    /// When it was queued (`publisher::mono_ns`).
    pub queued_ns: u64,
}

/// A batch's operations, its callers, and the sum of when they queued.
fn unzip_batch(batch: Vec<Request>) -> (Vec<WriteOp>, Vec<crate::publisher::Reply>, u128) {
    let queued = batch.iter().map(|r| u128::from(r.queued_ns)).sum();
    let (ops, replies) = batch.into_iter().map(|r| (r.op, r.reply)).unzip();
    (ops, replies, queued)
}

/// State only the writer thread touches.
pub(crate) struct Writer {
    pub db: Arc<Database>,
    pub site: String,
    pub clock: Clock,
    pub vv: VersionVector,
    pub stats: Arc<NodeStats>,
    pub wal: crate::wal::Wal,
    /// Epoch of the log records written since the last checkpoint.
    pub wal_epoch: u64,
    /// Set when a group reached the log but not redb (later writes would
    /// reuse its sequence numbers), or when the log could not be synced:
    /// the writer refuses all writes until restart. Shared with the
    /// publisher.
    pub failure: Arc<crate::publisher::Failure>,
    /// Where committed groups go to be made durable and visible.
    pub publish: std::sync::mpsc::SyncSender<Committed>,
    /// The number of the newest transaction begun (see
    /// `publisher::Snapshot`).
    pub txn_no: u64,
    /// The publisher's thread, joined at shutdown.
    pub publisher: Option<std::thread::JoinHandle<()>>,
    /// The node's wall clock (see `crate::options`).
    pub wall: Arc<dyn crate::options::WallClock>,
    pub ids: IdGen,
    /// Documents recent local writes stored (see `DocCache`).
    pub docs: crate::store::DocCache,
    /// Queue documents and index definitions (see `Lookups`).
    pub lookups: crate::store::Lookups,
    /// The buffer a group's log record is built in, kept between groups
    /// (a fresh one per group cost its growth and page faults each time).
    pub log_buf: Vec<u8>,
    /// Rung by callers and readers while a shared transaction waits open.
    pub bell: Arc<Doorbell>,
    /// The size of the last body this writer encoded (a guess at the next).
    pub last_body_len: usize,
}

impl Writer {
    /// Runs until every sender is gone.
    pub fn run(mut self, mut rx: mpsc::Receiver<Request>) {
        let mut carried = None;
        loop {
            let batch = match carried.take() {
                Some(batch) => batch,
                None => match rx.blocking_recv() {
                    Some(first) => self.gather(first, &mut rx),
                    None => break,
                },
            };
            carried = match self.may_share(&batch) {
                true => self.run_shared(batch, &mut rx),
                false => {
                    self.run_alone(batch);
                    None
                }
            };
        }
        // Clean shutdown: wait until every group is published, then make
        // everything durable in redb, so the next opening replays nothing.
        drop(self.publish);
        if let Some(publisher) = self.publisher.take() {
            let _ = publisher.join();
        }
        if self.failure.get().is_none() {
            let end = self.wal.end();
            let done = self.db.begin_write().map_err(StorageError::from).and_then(|txn| {
                txn.open_table(crate::store::META)?
                    .insert(META_WAL_FROM, end.to_be_bytes().as_slice())?;
                txn.commit().map_err(StorageError::from)
            });
            if let Err(e) = done {
                tracing::warn!(error = %e, "final checkpoint failed; the log will be replayed");
            }
        }
    }

    /// `first` and whatever waits behind it: the next group. The writer
    /// does not wait for more: the publisher syncs the log under every
    /// group written while it was syncing the last, so small groups still
    /// share an fsync, and the writer's time goes to writing.
    fn gather(&self, first: Request, rx: &mut mpsc::Receiver<Request>) -> Vec<Request> {
        let mut batch = vec![first];
        while batch.len() < MAX_GROUP {
            match rx.try_recv() {
                Ok(r) => batch.push(r),
                Err(_) => break,
            }
        }
        self.stats.writer_queue.store(rx.len() as u64, Ordering::Relaxed);
        batch
    }

    /// Whether `batch` may run in a transaction shared with other groups:
    /// not when a checkpoint is due (its commit is durable), nor when an op
    /// writes outside the log (durable commit) or may fail after its first
    /// change (its group is rerun after an abort, which must not take
    /// other groups with it).
    fn may_share(&self, batch: &[Request]) -> bool {
        !self.wal.checkpoint_due(self.wall.now_ms())
            && self.failure.get().is_none()
            && batch
                .iter()
                .all(|r| !r.op.writes_outside_changes() && !r.op.writes_several())
    }

    /// One group in a transaction of its own.
    fn run_alone(&mut self, batch: Vec<Request>) {
        let (requests, replies, queued) = unzip_batch(batch);
        let vv_before = self.vv.clone();
        self.txn_no += 1;
        let outcome = self.commit_group(requests);
        let filled = filled_ranges(&outcome.results);
        self.send(Committed {
            needs_sync: outcome.needs_sync,
            snapshot: outcome.snapshot,
            txn: self.txn_no,
            reads_txn: false,
            vv: (self.vv != vv_before).then(|| self.vv.clone()),
            readied: outcome.readied,
            filled,
            replies: replies.into_iter().zip(outcome.results).collect(),
            queued,
            ..Committed::default()
        });
    }

    /// Runs `batch`, and the groups queued behind it, in one redb
    /// transaction, which saves a commit, the tables' opening and their
    /// copied pages per group. Each group's log record is written as soon
    /// as the group has run, and the publisher answers its callers once
    /// that record is synced; readers wait for the commit (see
    /// `publisher::Snapshot`). The transaction commits when the queue stays
    /// dry for `IDLE_WAIT` or a reader waits for it (`next_shared`), after
    /// `MAX_SHARED_OPS` writes or `MAX_SHARED_TIME`, or before a group that
    /// may not share it, which is returned to run next.
    fn run_shared(&mut self, mut batch: Vec<Request>, rx: &mut mpsc::Receiver<Request>) -> Option<Vec<Request>> {
        let started = std::time::Instant::now();
        let opened = self.db.begin_write().map_err(StorageError::from).and_then(|mut txn| {
            txn.set_durability(redb::Durability::None)
                .map_err(|e| StorageError(e.to_string()))?;
            Ok(txn)
        });
        let txn = match opened {
            Ok(txn) => txn,
            Err(e) => {
                self.refuse(batch.into_iter().map(|r| r.reply).collect(), e);
                return None;
            }
        };
        self.txn_no += 1;
        let (mut filled, mut wrote, mut ops) = (Vec::new(), false, 0);
        // Time spent waiting for the next group, which is not applying.
        let mut waited = std::time::Duration::ZERO;
        let mut carried = None;
        let mut t = match WriteTables::open(&txn, &self.site, self.wal.reader(), self.wal.next_payload_at()) {
            Ok(t) => t,
            Err(e) => {
                self.refuse(batch.into_iter().map(|r| r.reply).collect(), e);
                return None;
            }
        };
        // Lent to the transaction; returned only once it has committed.
        t.docs = std::mem::take(&mut self.docs);
        t.cache = std::mem::take(&mut self.lookups);
        t.log = std::mem::take(&mut self.log_buf);
        loop {
            let (requests, replies, queued) = unzip_batch(batch);
            let (clock, vv_before_group) = (self.clock.clone(), self.vv.clone());
            t.now_ms = self.wall.now_ms();
            let mut results = Vec::with_capacity(requests.len());
            ops += requests.len();
            for op in requests {
                match self.run_op(&mut t, op) {
                    Err(WriteError::Storage(e)) => {
                        // A failed store poisons the transaction. Groups
                        // already logged in it cannot be taken back: stop
                        // until a restart replays them.
                        let why = match wrote {
                            false => {
                                (self.clock, self.vv) = (clock, vv_before_group);
                                e
                            }
                            true => self.fail(format!("{e} (in a transaction other groups were logged in)")),
                        };
                        drop(t);
                        let _ = txn.abort();
                        self.refuse(replies, why);
                        return None;
                    }
                    r => results.push(r),
                }
            }
            let logged = !t.log.is_empty();
            if logged {
                if let Err(e) = self.wal.write(self.wal_epoch, &t.log) {
                    let why = self.fail(e.to_string());
                    drop(t);
                    let _ = txn.abort();
                    self.refuse(replies, why);
                    return None;
                }
                self.stats.wal_bytes.fetch_add(t.log.len() as u64, Ordering::Relaxed);
                t.log.clear();
                t.log_base = self.wal.next_payload_at();
            }
            wrote |= logged || self.vv != vv_before_group;
            filled.extend(filled_ranges(&results));
            self.stats.writes.fetch_add(results.len() as u64, Ordering::Relaxed);
            self.send(Committed {
                needs_sync: logged,
                txn: self.txn_no,
                reads_txn: wrote,
                vv: (self.vv != vv_before_group).then(|| self.vv.clone()),
                readied: std::mem::take(&mut t.readied),
                replies: replies.into_iter().zip(results).collect(),
                queued,
                ..Committed::default()
            });
            if ops >= MAX_SHARED_OPS || started.elapsed() >= MAX_SHARED_TIME {
                break;
            }
            let waiting = std::time::Instant::now();
            let next = self.next_shared(rx, started);
            waited += waiting.elapsed();
            let Some(first) = next else {
                break;
            };
            let next = self.gather(first, rx);
            if !self.may_share(&next) {
                carried = Some(next);
                break;
            }
            batch = next;
        }
        let applied = std::time::Instant::now();
        self.stats.apply_nanos.fetch_add(
            applied.duration_since(started).saturating_sub(waited).as_nanos() as u64,
            Ordering::Relaxed,
        );
        let (docs, lookups, log) = (
            std::mem::take(&mut t.docs),
            std::mem::take(&mut t.cache),
            std::mem::take(&mut t.log),
        );
        if !wrote {
            // Nothing changed (empty pops, refused writes): no commit.
            drop(t);
            let _ = txn.abort();
            (self.docs, self.lookups, self.log_buf) = (docs, lookups, log);
            return carried;
        }
        let finished = t
            .flush_vv()
            .and_then(|()| t.set_meta(META_HLC, &self.clock.last().raw().to_be_bytes()));
        drop(t);
        let committed = finished
            .and_then(|()| txn.commit().map_err(StorageError::from))
            .and_then(|()| self.db.begin_read().map_err(StorageError::from));
        let snapshot = match committed {
            Ok(snapshot) => snapshot,
            Err(e) => {
                // The groups are in the log: a restart replays them.
                self.fail(format!("{e} (after the log took the transaction's groups)"));
                return carried;
            }
        };
        self.stats.commits.fetch_add(1, Ordering::Relaxed);
        self.stats
            .commit_nanos
            .fetch_add(applied.elapsed().as_nanos() as u64, Ordering::Relaxed);
        (self.docs, self.lookups, self.log_buf) = (docs, lookups, log);
        self.send(Committed {
            snapshot: Some(snapshot),
            txn: self.txn_no,
            filled,
            ..Committed::default()
        });
        carried
    }

    /// The next request to run in the shared transaction begun at
    /// `started`: one already queued, or one that comes within `IDLE_WAIT`
    /// (and before the transaction's time is up), unless a reader asks for
    /// the commit first. `None`: commit now.
    fn next_shared(&self, rx: &mut mpsc::Receiver<Request>, started: std::time::Instant) -> Option<Request> {
        let deadline = (std::time::Instant::now() + IDLE_WAIT).min(started + MAX_SHARED_TIME);
        loop {
            match rx.try_recv() {
                Ok(r) => return Some(r),
                Err(mpsc::error::TryRecvError::Disconnected) => return None,
                Err(mpsc::error::TryRecvError::Empty) => {}
            }
            if self.bell.commit_now.swap(false, Ordering::AcqRel) {
                return None;
            }
            let now = std::time::Instant::now();
            if now >= deadline {
                return None;
            }
            std::thread::park_timeout(deadline - now);
        }
    }

    /// Answers every caller in `replies` with `e`, in order behind the
    /// groups before them.
    fn refuse(&mut self, replies: Vec<crate::publisher::Reply>, e: StorageError) {
        let results = GroupOutcome::refused(replies.len(), e).results;
        self.send(Committed {
            replies: replies.into_iter().zip(results).collect(),
            ..Committed::default()
        });
    }

    fn send(&mut self, mut c: Committed) {
        if !c.replies.is_empty() {
            c.logged_ns = crate::publisher::mono_ns();
            let waited = (c.replies.len() as u128 * u128::from(c.logged_ns)).saturating_sub(c.queued);
            self.stats
                .until_logged_nanos
                .fetch_add(u64::try_from(waited).unwrap_or(u64::MAX), Ordering::Relaxed);
        }
        if self.publish.send(c).is_err() {
            // The publisher is gone only if its thread died: nothing can
            // be acknowledged any more.
            self.fail("the publisher thread stopped".into());
        }
    }

    /// Executes a group of writes in one transaction. On a storage failure
    /// every write of the group fails and in-memory state is rolled back.
    fn commit_group(&mut self, ops: Vec<WriteOp>) -> GroupOutcome {
        self.commit_group_refusing(ops, Vec::new())
    }

    /// `commit_group`, answering the ops at the `refused` positions with
    /// their error instead of running them.
    fn commit_group_refusing(&mut self, ops: Vec<WriteOp>, mut refused: Vec<(usize, WriteError)>) -> GroupOutcome {
        let n = ops.len();
        // Only groups that could need a second run pay for a copy.
        let rerun = ops.iter().any(WriteOp::writes_several).then(|| ops.clone());
        if let Some(why) = self.failure.get() {
            return GroupOutcome::refused(n, StorageError(why));
        }
        let (clock, vv) = (self.clock.clone(), self.vv.clone());
        match self.try_commit_group(ops, &mut refused) {
            Ok(outcome) => {
                self.stats.commits.fetch_add(1, Ordering::Relaxed);
                self.stats.writes.fetch_add(n as u64, Ordering::Relaxed);
                outcome
            }
            Err(GroupFailure::Partial { index, error }) => {
                self.clock = clock;
                self.vv = vv;
                refused.push((index, error));
                match rerun {
                    Some(ops) => self.commit_group_refusing(ops, refused),
                    None => GroupOutcome::refused(
                        n,
                        StorageError("a refused write left changes behind and could not be rerun".into()),
                    ),
                }
            }
            Err(GroupFailure::Storage(e)) => {
                tracing::error!(error = %e, writes = n, "commit failed; the group's writes are refused");
                self.clock = clock;
                self.vv = vv;
                GroupOutcome::refused(n, e)
            }
        }
    }

    /// Returns each write's result and the queues that got ready items.
    ///
    /// Durability: a group's changes are appended to the log, then the
    /// group is committed to redb without syncing, and the publisher syncs
    /// the log before anyone sees the group. A group that writes outside
    /// the change log (indexes, chunks, credentials), or when a checkpoint
    /// is due, is committed durably instead, after syncing the log here
    /// (redb must never durably point at log records a crash could tear);
    /// a checkpoint also moves the point a recovery replays from to the
    /// log's end.
    fn try_commit_group(
        &mut self,
        ops: Vec<WriteOp>,
        refused: &mut Vec<(usize, WriteError)>,
    ) -> Result<GroupOutcome, GroupFailure> {
        let started = std::time::Instant::now();
        let wall_ms = self.wall.now_ms();
        let checkpoint = self.wal.checkpoint_due(wall_ms) || ops.iter().any(WriteOp::writes_outside_changes);
        let mut txn = self.db.begin_write()?;
        if !checkpoint {
            txn.set_durability(redb::Durability::None)
                .map_err(|e| GroupFailure::Storage(StorageError(e.to_string())))?;
        }
        let mut results = Vec::with_capacity(ops.len());
        let vv_before = self.vv.clone();
        let (log, readied, docs);
        {
            let mut t = WriteTables::open(&txn, &self.site, self.wal.reader(), self.wal.next_payload_at())?;
            t.now_ms = wall_ms;
            // Lent to the transaction; returned only once it has committed.
            t.docs = std::mem::take(&mut self.docs);
            t.cache = std::mem::take(&mut self.lookups);
            t.log = std::mem::take(&mut self.log_buf);
            for (index, op) in ops.into_iter().enumerate() {
                if let Some(at) = refused.iter().position(|(i, _)| *i == index) {
                    results.push(Err(refused.swap_remove(at).1));
                    continue;
                }
                let several = op.writes_several();
                let appended_before = self.vv.get(&self.site);
                let r = self.run_op(&mut t, op);
                // A storage failure poisons the transaction: give up on the group.
                let r = match r {
                    Err(WriteError::Storage(e)) => return Err(GroupFailure::Storage(e)),
                    Err(error) if several && self.vv.get(&self.site) != appended_before => {
                        drop(t);
                        txn.abort()?;
                        return Err(GroupFailure::Partial { index, error });
                    }
                    r => r,
                };
                results.push(r);
            }
            if !checkpoint && self.vv == vv_before && t.log.is_empty() {
                // Nothing changed (empty pops, refused writes): no commit.
                // (A refill of a withheld stub logs a change below the
                // version vector: that is a change.)
                self.docs = std::mem::take(&mut t.docs);
                self.lookups = std::mem::take(&mut t.cache);
                self.log_buf = std::mem::take(&mut t.log);
                drop(t);
                txn.abort()?;
                return Ok(GroupOutcome {
                    results,
                    ..GroupOutcome::default()
                });
            }
            t.flush_vv()?;
            t.set_meta(META_HLC, &self.clock.last().raw().to_be_bytes())?;
            if checkpoint {
                // This group's record, if any, is replayed no more.
                let end = match t.log.is_empty() {
                    true => self.wal.end(),
                    false => self.wal.next_payload_at() + t.log.len() as u64,
                };
                t.set_meta(META_WAL_FROM, &end.to_be_bytes())?;
            }
            log = std::mem::take(&mut t.log);
            readied = std::mem::take(&mut t.readied);
            docs = (std::mem::take(&mut t.docs), std::mem::take(&mut t.cache));
        }
        let committing = std::time::Instant::now();
        self.stats
            .apply_nanos
            .fetch_add(committing.duration_since(started).as_nanos() as u64, Ordering::Relaxed);
        // The log first: it holds the changes the transaction points at,
        // and once it holds the group, the group must reach redb too, or
        // later groups would reuse its sequence numbers.
        if !log.is_empty() {
            if let Err(e) = self.wal.write(self.wal_epoch, &log) {
                return Err(self.fail(e.to_string()).into());
            }
            self.stats.wal_bytes.fetch_add(log.len() as u64, Ordering::Relaxed);
        }
        if checkpoint {
            // A durable commit may only point at synced records.
            let logging = std::time::Instant::now();
            if let Err(e) = self.wal.reader().sync() {
                return Err(self.fail(e.to_string()).into());
            }
            self.stats
                .wal_nanos
                .fetch_add(logging.elapsed().as_nanos() as u64, Ordering::Relaxed);
        }
        if let Err(e) = txn.commit() {
            if log.is_empty() {
                return Err(e.into());
            }
            return Err(self.fail(format!("{e} (after the log took the group)")).into());
        }
        if checkpoint {
            self.stats.checkpoints.fetch_add(1, Ordering::Relaxed);
            self.wal.checkpointed(wall_ms);
        }
        // What readers see once the publisher has synced the log.
        let snapshot = match self.db.begin_read() {
            Ok(txn) => txn,
            Err(e) => return Err(self.fail(format!("cannot read the commit back: {e}")).into()),
        };
        self.stats
            .commit_nanos
            .fetch_add(committing.elapsed().as_nanos() as u64, Ordering::Relaxed);
        (self.docs, self.lookups) = docs;
        let needs_sync = !log.is_empty() && !checkpoint;
        self.log_buf = log;
        self.log_buf.clear();
        Ok(GroupOutcome {
            results,
            readied,
            needs_sync,
            snapshot: Some(snapshot),
        })
    }

    /// Carries out one write inside the open transaction.
    fn run_op(&mut self, t: &mut WriteTables<'_>, op: WriteOp) -> Result<WriteDone, WriteError> {
        match op {
            WriteOp::Insert { collection, doc, by } => self.insert(t, collection, doc, &by),
            WriteOp::Replace {
                collection,
                id,
                doc,
                by,
            } => self.replace(t, collection, id, doc, &by),
            WriteOp::Delete { collection, id, by } => self.delete(t, collection, id, &by),
            WriteOp::Apply { changes } => self.apply(t, changes).map(WriteDone::Applied),
            WriteOp::CreateIndex { collection, field } => create_index(t, &collection, &field),
            WriteOp::DropIndex { collection, field } => drop_index(t, &collection, &field),
            WriteOp::AddQueue { doc, by } => self.add_queue(t, doc, &by),
            WriteOp::UpdateQueue { name, doc, by } => self.update_queue(t, &name, doc, &by),
            WriteOp::DeleteQueue { name, by } => self.delete_queue(t, &name, &by),
            WriteOp::PurgeQueue { name, delete_queue, by } => self.purge_queue(t, &name, delete_queue, &by),
            WriteOp::PushItems { queue, items, by } => self.push(t, &queue, items, &by),
            WriteOp::PopItem { queue, by } => self.pop(t, &queue, &by),
            WriteOp::FinishItem {
                id,
                state,
                errortype,
                errormessage,
                payload,
                by,
            } => self.finish(t, &id, &state, errortype.as_deref(), errormessage, payload, &by),
            WriteOp::DeleteItem { id, by } => self.delete_item(t, &id, &by),
            WriteOp::TakeoverItem { id, by } => self.takeover(t, &id, &by),
            WriteOp::ExpireLeases => self.expire_leases(t, &crate::system_principal()),
            WriteOp::UpdateOne {
                collection,
                id,
                update,
                by,
            } => self.update_one(t, collection, id, &update, &by),
            WriteOp::UpdateMany {
                collection,
                filter,
                update,
                by,
            } => self.update_many(t, collection, &filter, &update, &by),
            WriteOp::InsertMany { collection, docs, by } => self.insert_many(t, collection, docs, &by),
            WriteOp::InsertOrUpdate {
                collection,
                doc,
                uniqueness,
                by,
            } => self.insert_or_update(t, collection, doc, &uniqueness, &by),
            WriteOp::DeleteMany { collection, filter, by } => self.delete_many(t, collection, &filter, &by),
            WriteOp::Recover { collection, id, by } => self.recover(t, collection, id, &by),
            WriteOp::PutChunk { hash, data } => put_chunk(t, &hash, &data),
            WriteOp::CreateFile { doc, by } => self.create_file(t, doc, &by),
            WriteOp::DeleteFile { id, by } => self.delete_file(t, id, &by),
            WriteOp::CreateUser {
                username,
                name,
                hash,
                by,
            } => self.create_user(t, username, name, hash, &by),
        }
    }

    /// Stops all further writes until restart, whose recovery replays the log.
    fn fail(&mut self, why: String) -> StorageError {
        StorageError(self.failure.stop(why))
    }

    /// Fresh HLC reading for a local write.
    pub(crate) fn stamp(&mut self) -> Timestamp {
        self.clock.now(self.wall.now_ms())
    }

    pub(crate) fn insert(
        &mut self,
        t: &mut WriteTables<'_>,
        collection: String,
        mut doc: Map<String, Value>,
        by: &Principal,
    ) -> Result<WriteDone, WriteError> {
        validate_collection(&collection)?;
        let hlc = self.stamp();
        let id = match doc.get("_id") {
            None | Some(Value::Null) => self.ids.object_id(hlc.physical_ms() / 1000),
            Some(Value::String(s)) => {
                validate_id(s)?;
                s.clone()
            }
            Some(other) => return Err(WriteError::IdNotString(other.to_string())),
        };
        if t.current(&collection, &id)?.is_some() {
            return Err(WriteError::AlreadyExists { collection, id });
        }
        crate::acl::with_creator(&mut doc, by)?;
        let now = Value::String(iso8601(hlc.physical_ms()));
        strip_store_fields(&mut doc);
        doc.insert("_id".into(), Value::String(id.clone()));
        doc.insert("_created".into(), now.clone());
        doc.insert("_createdby".into(), by.name.clone().into());
        doc.insert("_createdbyid".into(), by.id.clone().into());
        stamp_modified(&mut doc, now, by);
        self.local_change(t, ChangeKind::Insert, &collection, &id, doc, None, hlc, by)
            .map(WriteDone::Document)
    }

    /// Replaces a document the caller may update.
    pub(crate) fn replace(
        &mut self,
        t: &mut WriteTables<'_>,
        collection: String,
        id: String,
        doc: Map<String, Value>,
        by: &Principal,
    ) -> Result<WriteDone, WriteError> {
        validate_collection(&collection)?;
        validate_id(&id)?;
        if let Some(current) = t.current(&collection, &id)? {
            check(&current, by, crate::acl::UPDATE, &collection, &id)?;
        }
        self.replace_unchecked(t, collection, id, doc, by)
    }

    /// Replaces a document; the caller has checked the rights. A body
    /// without `_acl` keeps the current one.
    pub(crate) fn replace_unchecked(
        &mut self,
        t: &mut WriteTables<'_>,
        collection: String,
        id: String,
        doc: Map<String, Value>,
        by: &Principal,
    ) -> Result<WriteDone, WriteError> {
        validate_collection(&collection)?;
        validate_id(&id)?;
        let Some(current) = t.current(&collection, &id)? else {
            return Err(WriteError::NotFound { collection, id });
        };
        self.replace_current(t, collection, id, doc, current, by)
    }

    /// `replace_unchecked` with the current document already read.
    pub(crate) fn replace_current(
        &mut self,
        t: &mut WriteTables<'_>,
        collection: String,
        id: String,
        mut doc: Map<String, Value>,
        current: SharedDoc,
        by: &Principal,
    ) -> Result<WriteDone, WriteError> {
        match doc.get("_id") {
            None | Some(Value::Null) => {}
            Some(Value::String(s)) if *s == id => {}
            Some(other) => {
                return Err(WriteError::IdMismatch {
                    path: id,
                    body: other.to_string(),
                });
            }
        }
        match doc.get("_acl") {
            None | Some(Value::Null) => {
                if let Some(acl) = current.get("_acl") {
                    doc.insert("_acl".into(), acl.clone());
                }
            }
            Some(_) => crate::acl::validate(&doc)?,
        }
        let hlc = self.stamp();
        strip_store_fields(&mut doc);
        doc.insert("_id".into(), Value::String(id.clone()));
        for kept in ["_created", "_createdby", "_createdbyid"] {
            if let Some(v) = current.get(kept) {
                doc.insert(kept.into(), v.clone());
            }
        }
        stamp_modified(&mut doc, Value::String(iso8601(hlc.physical_ms())), by);
        let old = Some(Prior::Whole(current));
        self.local_change(t, ChangeKind::Update, &collection, &id, doc, old, hlc, by)
            .map(WriteDone::Document)
    }

    /// Stores `edit` (of the document `take_current` handed out) as the
    /// document's next version: `replace_current` for a write that changes
    /// the stored document itself, which has its id, ACL and creation
    /// fields already, without a copy of the old document (see
    /// `crate::edit`). The caller has checked the rights.
    pub(crate) fn edit_current(
        &mut self,
        t: &mut WriteTables<'_>,
        collection: &str,
        id: String,
        mut edit: Edit,
        by: &Principal,
    ) -> Result<WriteDone, WriteError> {
        let hlc = self.stamp();
        for f in STORE_FIELDS {
            edit.remove(f);
        }
        for (field, value) in modified_fields(Value::String(iso8601(hlc.physical_ms())), by) {
            edit.set(field, value);
        }
        let Edit { doc, undo, ends } = edit;
        let old = Prior::Edited { undo, ends };
        self.local_change(t, ChangeKind::Update, collection, &id, doc, Some(old), hlc, by)
            .map(WriteDone::Document)
    }

    pub(crate) fn delete(
        &mut self,
        t: &mut WriteTables<'_>,
        collection: String,
        id: String,
        by: &Principal,
    ) -> Result<WriteDone, WriteError> {
        validate_collection(&collection)?;
        validate_id(&id)?;
        let Some(current) = t.current(&collection, &id)? else {
            return Err(WriteError::NotFound { collection, id });
        };
        check(&current, by, crate::acl::DELETE, &collection, &id)?;
        let mut doc = (*current).clone();
        let hlc = self.stamp();
        let now = Value::String(iso8601(hlc.physical_ms()));
        strip_store_fields(&mut doc);
        doc.insert("_deleted".into(), now.clone());
        stamp_modified(&mut doc, now, by);
        let old = Some(Prior::Whole(current));
        self.local_change(t, ChangeKind::Delete, &collection, &id, doc, old, hlc, by)
            .map(WriteDone::Document)
    }

    /// Appends one local change and returns the version it made.
    #[allow(clippy::too_many_arguments)]
    fn local_change(
        &mut self,
        t: &mut WriteTables<'_>,
        kind: ChangeKind,
        collection: &str,
        id: &str,
        body: Map<String, Value>,
        mut old: Option<Prior>,
        hlc: Timestamp,
        by: &Principal,
    ) -> Result<SharedDoc, WriteError> {
        // Every site, this one included, must be able to read the body
        // back: a body past serde_json's depth limit or over the size peers
        // accept would be written once and then refused everywhere,
        // stalling replication behind it.
        use ocmesh_replication::change::{MAX_BODY_BYTES, MAX_BODY_DEPTH, depth};
        // The last body's size, with room to grow, spares the buffer its
        // regrowth: bodies written one after another tend to be alike. (At
        // most 64 KiB: a huge body must not make the next small one
        // allocate as much.)
        let guess = (self.last_body_len + self.last_body_len / 4).min(64 << 10);
        let Ok(bytes) = crate::json_out::encode_body(&body, MAX_BODY_DEPTH, guess) else {
            return Err(WriteError::TooDeep {
                collection: collection.to_owned(),
                id: id.to_owned(),
                depth: body.values().map(depth).max().unwrap_or(0) + 1,
                max: MAX_BODY_DEPTH,
            });
        };
        self.last_body_len = bytes.len();
        if bytes.len() > MAX_BODY_BYTES {
            return Err(WriteError::TooLarge {
                collection: collection.to_owned(),
                id: id.to_owned(),
                bytes: bytes.len(),
                max: MAX_BODY_BYTES,
            });
        }
        let seq = self.vv.get(&self.site) + 1;
        // An update names the fields it changed, so a concurrent update of
        // other fields at another site survives the merge.
        let fields = match (kind, &old) {
            (ChangeKind::Update, Some(old)) => {
                let mut f = old.changed_fields(&body);
                f.retain(|f| f != "_version");
                Some(f)
            }
            _ => None,
        };
        let ends = match &mut old {
            Some(Prior::Edited { ends, .. }) if ends.is_some() => t.history_ends_or(collection, id, ends.take())?,
            _ => t.history_ends(collection, id)?,
        };
        let (first, greatest) = match ends {
            Some(e) => (Some(e.first), Some(e.greatest)),
            None => (None, None),
        };
        if let Some((stamped, origin)) = &greatest
            && *stamped >= hlc.raw()
        {
            return Err(WriteError::ClockBehind {
                collection: collection.to_owned(),
                id: id.to_owned(),
                origin: origin.clone(),
                stamped: Timestamp::from_raw(*stamped).to_string(),
            });
        }
        let (base_hlc, base_origin) = match kind {
            ChangeKind::Insert => (0, String::new()),
            _ => greatest.unwrap_or_default(),
        };
        let change = Change {
            origin: self.site.clone(),
            seq,
            hlc: hlc.raw(),
            kind: kind as i32,
            collection: collection.to_owned(),
            doc_id: id.to_owned(),
            body: bytes,
            author: by.id.clone(),
            author_admin: by.is_admin(),
            partial: fields.is_some(),
            fields: fields.unwrap_or_default(),
            base_hlc,
            base_origin,
            withheld: false,
        };
        let (_, view) = t.append(&change, Source::Local(LocalWrite { body, old, first }))?;
        self.vv.advance(&self.site, seq);
        // A local change carries the newest HLC, so it is the current version.
        view.ok_or_else(|| StorageError(format!("local change {id} did not become current")).into())
    }

    /// Applies a peer's changes: skips those already held, refuses the whole
    /// batch (writing nothing) if any change is malformed or leaves a gap.
    fn apply(&mut self, t: &mut WriteTables<'_>, changes: Vec<Incoming>) -> Result<ApplyReport, WriteError> {
        let mut report = ApplyReport::default();
        let mut expect = self.vv.clone();
        let mut fresh = Vec::with_capacity(changes.len());
        let mut fills = Vec::new();
        for incoming in changes {
            let Incoming {
                change: c,
                encoded,
                object,
                body,
            } = incoming;
            validate(&c).map_err(ApplyError::Invalid)?;
            let held = expect.get(&c.origin);
            if c.seq <= held {
                // The content of a change held here only as a stub.
                if !c.withheld && c.seq <= self.vv.get(&c.origin) && t.is_withheld(&c.origin, c.seq)? {
                    check_content(&c, object)?;
                    fills.push(c);
                } else {
                    report.duplicates += 1;
                }
                continue;
            }
            if c.origin == self.site {
                return Err(ApplyError::OwnOrigin { seq: c.seq, held }.into());
            }
            if c.seq != held + 1 {
                return Err(ApplyError::Gap {
                    origin: c.origin,
                    seq: c.seq,
                    expected: held + 1,
                }
                .into());
            }
            if !c.withheld {
                check_content(&c, object)?;
            }
            expect.advance(&c.origin, c.seq);
            fresh.push((c, encoded, body));
        }
        let now = self.wall.now_ms();
        let refused = t.refused;
        for (c, encoded, body) in fresh {
            if c.withheld {
                report.withheld += 1;
                report.new_stubs.insert(&c.origin, c.seq);
            } else if self.clock.observe(Timestamp::from_raw(c.hlc), now).clamped {
                report.clock_clamped += 1;
            }
            t.append_encoded(&c, Some(&encoded), Source::Peer(body))?;
            self.vv.advance(&c.origin, c.seq);
            report.applied += 1;
        }
        for c in fills {
            if self.clock.observe(Timestamp::from_raw(c.hlc), now).clamped {
                report.clock_clamped += 1;
            }
            if t.fill(&c)? {
                report.filled += 1;
                report.filled_ranges.insert(&c.origin, c.seq);
            } else {
                report.duplicates += 1;
            }
        }
        report.refused = t.refused - refused;
        self.stats.remote_refused.fetch_add(report.refused, Ordering::Relaxed);
        if report.clock_clamped > 0 {
            tracing::warn!(
                changes = report.clock_clamped,
                "received changes stamped beyond the clock drift bound"
            );
        }
        self.stats.remote_applied.fetch_add(report.applied, Ordering::Relaxed);
        self.stats.remote_withheld.fetch_add(report.withheld, Ordering::Relaxed);
        self.stats.remote_filled.fetch_add(report.filled, Ordering::Relaxed);
        self.stats
            .remote_duplicates
            .fetch_add(report.duplicates, Ordering::Relaxed);
        self.stats
            .clock_clamped
            .fetch_add(report.clock_clamped, Ordering::Relaxed);
        Ok(report)
    }
}

/// Checks what a receiver relies on in a change's content (`body_ok`:
/// whether its body parsed as a JSON object, see `Incoming`).
fn check_content(c: &Change, body_ok: bool) -> Result<(), WriteError> {
    validate_collection(&c.collection).map_err(ApplyError::Name)?;
    validate_id(&c.doc_id).map_err(ApplyError::Name)?;
    if !body_ok {
        return Err(ApplyError::BodyNotObject {
            origin: c.origin.clone(),
            seq: c.seq,
        }
        .into());
    }
    Ok(())
}

fn check_index_field(field: &str) -> Result<(), WriteError> {
    if field.is_empty() || field.split('.').any(str::is_empty) || field.starts_with('$') {
        return Err(WriteError::BadIndex(format!("{field:?} is not a field path")));
    }
    Ok(())
}

/// Records the index and backfills it from the current documents, in the
/// same transaction.
fn create_index(t: &mut WriteTables<'_>, collection: &str, field: &str) -> Result<WriteDone, WriteError> {
    validate_collection(collection)?;
    check_index_field(field)?;
    if t.indexed_fields(collection)?.iter().any(|f| f == field) {
        return Ok(WriteDone::Nothing);
    }
    t.cache.indexed.remove(collection);
    t.index_defs
        .open_mut()?
        .insert((collection, field), b"{}".as_slice())
        .map_err(StorageError::from)?;
    let docs: Vec<(String, Value)> = {
        let range = t
            .documents
            .range((collection, "")..=(collection, crate::store::ORIGIN_MAX))
            .map_err(StorageError::from)?;
        let mut out = Vec::new();
        for entry in range {
            let (k, v) = entry.map_err(StorageError::from)?;
            let id = k.value().1;
            let doc = crate::store::read_stored_doc(collection, id, v.value(), t)?;
            out.push((id.to_owned(), Value::Object(doc)));
        }
        out
    };
    for (id, doc) in docs {
        t.reindex(collection, field, &id, None, Some(&doc))?;
    }
    Ok(WriteDone::Nothing)
}

fn drop_index(t: &mut WriteTables<'_>, collection: &str, field: &str) -> Result<WriteDone, WriteError> {
    validate_collection(collection)?;
    check_index_field(field)?;
    if crate::index::ALWAYS_INDEXED.contains(&field) {
        return Err(WriteError::BadIndex(format!(
            "the index on {field} is built in and cannot be dropped"
        )));
    }
    t.cache.indexed.remove(collection);
    if t.index_defs
        .open_mut()?
        .remove((collection, field))
        .map_err(StorageError::from)?
        .is_none()
    {
        return Err(WriteError::BadIndex(format!("{collection} has no index on {field}")));
    }
    let keys: Vec<(Vec<u8>, String)> = {
        let range = t
            .index
            .range(
                (collection, field, [].as_slice(), "")
                    ..=(collection, field, [0xffu8; 16].as_slice(), crate::store::ORIGIN_MAX),
            )
            .map_err(StorageError::from)?;
        let mut out = Vec::new();
        for entry in range {
            let (k, _) = entry.map_err(StorageError::from)?;
            let (_, _, key, id) = k.value();
            out.push((key.to_vec(), id.to_owned()));
        }
        out
    };
    for (key, id) in keys {
        t.index
            .remove((collection, field, key.as_slice(), id.as_str()))
            .map_err(StorageError::from)?;
    }
    Ok(WriteDone::Nothing)
}

fn put_chunk(t: &mut WriteTables<'_>, hash: &[u8; 32], data: &[u8]) -> Result<WriteDone, WriteError> {
    if t.chunks
        .open()?
        .get(hash.as_slice())
        .map_err(StorageError::from)?
        .is_none()
    {
        t.chunks
            .open_mut()?
            .insert(hash.as_slice(), data)
            .map_err(StorageError::from)?;
    }
    t.chunks_wanted
        .open_mut()?
        .remove(hash.as_slice())
        .map_err(StorageError::from)?;
    Ok(WriteDone::Nothing)
}

impl Writer {
    /// Writes a file's metadata once every chunk it names is held.
    fn create_file(
        &mut self,
        t: &mut WriteTables<'_>,
        doc: Map<String, Value>,
        by: &Principal,
    ) -> Result<WriteDone, WriteError> {
        let hashes = crate::files::chunk_hashes(&Value::Object(doc.clone()))
            .ok_or_else(|| StorageError("file metadata lists malformed chunk hashes".into()))?;
        for h in hashes {
            if t.chunks
                .open()?
                .get(h.as_slice())
                .map_err(StorageError::from)?
                .is_none()
            {
                let name = doc
                    .get("filename")
                    .and_then(Value::as_str)
                    .unwrap_or_default()
                    .to_owned();
                return Err(crate::files::FileError::MissingChunk {
                    file: name,
                    chunk: hex::encode(h),
                }
                .into());
            }
        }
        self.insert(t, crate::files::FILES.into(), doc, by)
    }

    /// Deletes a file's metadata unless a work item still lists it.
    fn delete_file(&mut self, t: &mut WriteTables<'_>, id: String, by: &Principal) -> Result<WriteDone, WriteError> {
        validate_id(&id)?;
        if t.current(crate::files::FILES, &id)?.is_none() {
            return Err(crate::files::FileError::NotFound(id).into());
        }
        let users = crate::query::Filter::parse(&serde_json::json!({"$or": [{"files._id": id}, {"files": id}]}))?;
        if let Some((item, _)) = matching(t, crate::workitems::ITEMS, &users)?.into_iter().next() {
            return Err(crate::files::FileError::InUse(id, item).into());
        }
        self.delete(t, crate::files::FILES.into(), id, by)
    }
}

impl Writer {
    fn create_user(
        &mut self,
        t: &mut WriteTables<'_>,
        username: String,
        name: String,
        hash: String,
        by: &Principal,
    ) -> Result<WriteDone, WriteError> {
        if !by.is_admin() {
            return Err(WriteError::Forbidden {
                right: "admin",
                collection: "users".into(),
                id: username,
            });
        }
        if t.credentials
            .open()?
            .get(username.as_str())
            .map_err(StorageError::from)?
            .is_some()
        {
            return Err(WriteError::BadUser(format!("user name {username:?} is taken")));
        }
        let id = self.ids.object_id(self.clock.last().physical_ms() / 1000);
        let mut doc = Map::new();
        doc.insert("_id".into(), id.clone().into());
        doc.insert("_type".into(), "user".into());
        doc.insert(
            "name".into(),
            (if name.is_empty() {
                username.clone()
            } else {
                name.clone()
            })
            .into(),
        );
        doc.insert("username".into(), username.clone().into());
        doc.insert(
            "_acl".into(),
            serde_json::json!([{"_id": id, "name": username, "rights": crate::acl::READ}]),
        );
        let done = self.insert(t, "users".into(), doc, by)?;
        let cred = crate::users::Credential {
            id,
            username: username.clone(),
            name: if name.is_empty() { username.clone() } else { name },
            hash,
        };
        let bytes = serde_json::to_vec(&cred).map_err(|e| StorageError(e.to_string()))?;
        t.credentials
            .open_mut()?
            .insert(username.as_str(), bytes.as_slice())
            .map_err(StorageError::from)?;
        Ok(done)
    }
}

fn may(doc: &Map<String, Value>, by: &Principal, right: u64) -> bool {
    crate::acl::allowed_map(doc, by, right)
}

/// Refuses a write the caller lacks `right` for: as a missing document
/// when it may not even read it, so existence does not leak.
pub(crate) fn check(
    doc: &Map<String, Value>,
    by: &Principal,
    right: u64,
    collection: &str,
    id: &str,
) -> Result<(), WriteError> {
    if may(doc, by, right) {
        return Ok(());
    }
    if may(doc, by, crate::acl::READ) {
        return Err(WriteError::Forbidden {
            right: crate::acl::name(right),
            collection: collection.into(),
            id: id.into(),
        });
    }
    Err(WriteError::NotFound {
        collection: collection.into(),
        id: id.into(),
    })
}

/// A document's id and its current body.
type IdDoc = (String, Map<String, Value>);

/// Current documents of `collection` that match `filter`, in id order.
pub(crate) fn matching(
    t: &WriteTables<'_>,
    collection: &str,
    filter: &crate::query::Filter,
) -> Result<Vec<IdDoc>, WriteError> {
    validate_collection(collection)?;
    let mut out = Vec::new();
    let range = t
        .documents
        .range((collection, "")..=(collection, crate::store::ORIGIN_MAX))
        .map_err(StorageError::from)?;
    for entry in range {
        let (k, v) = entry.map_err(StorageError::from)?;
        let id = k.value().1;
        let doc = Value::Object(crate::store::read_stored_doc(collection, id, v.value(), t)?);
        if filter.matches(&doc)
            && let Value::Object(m) = doc
        {
            out.push((id.to_owned(), m));
        }
    }
    Ok(out)
}

impl Writer {
    fn update_one(
        &mut self,
        t: &mut WriteTables<'_>,
        collection: String,
        id: String,
        update: &Value,
        by: &Principal,
    ) -> Result<WriteDone, WriteError> {
        validate_collection(&collection)?;
        validate_id(&id)?;
        let Some(current) = t.current(&collection, &id)? else {
            return Err(WriteError::NotFound { collection, id });
        };
        let updated = crate::query::update::apply_update(&current, update)?;
        self.replace(t, collection, id, updated, by)
    }

    /// Updates every match; all updates are computed before any is written.
    fn update_many(
        &mut self,
        t: &mut WriteTables<'_>,
        collection: String,
        filter: &crate::query::Filter,
        update: &Value,
        by: &Principal,
    ) -> Result<WriteDone, WriteError> {
        let targets = matching(t, &collection, filter)?;
        let targets = targets.into_iter().filter(|(_, d)| may(d, by, crate::acl::UPDATE));
        let mut updated = Vec::new();
        for (id, doc) in targets {
            updated.push((id, crate::query::update::apply_update(&doc, update)?));
        }
        let mut out = Vec::with_capacity(updated.len());
        for (id, doc) in updated {
            if let WriteDone::Document(d) = self.replace(t, collection.clone(), id, doc, by)? {
                out.push(d);
            }
        }
        Ok(WriteDone::Documents(out))
    }

    /// Inserts all documents or none: ids are checked up front.
    fn insert_many(
        &mut self,
        t: &mut WriteTables<'_>,
        collection: String,
        docs: Vec<Map<String, Value>>,
        by: &Principal,
    ) -> Result<WriteDone, WriteError> {
        validate_collection(&collection)?;
        let mut seen = std::collections::HashSet::new();
        for doc in &docs {
            match doc.get("_id") {
                None | Some(Value::Null) => {}
                Some(Value::String(id)) => {
                    validate_id(id)?;
                    if !seen.insert(id.clone()) || t.current(&collection, id)?.is_some() {
                        return Err(WriteError::AlreadyExists {
                            collection,
                            id: id.clone(),
                        });
                    }
                }
                Some(other) => return Err(WriteError::IdNotString(other.to_string())),
            }
        }
        let mut out = Vec::with_capacity(docs.len());
        for doc in docs {
            if let WriteDone::Document(d) = self.insert(t, collection.clone(), doc, by)? {
                out.push(d);
            }
        }
        Ok(WriteDone::Documents(out))
    }

    /// OpenCore's insertOrUpdateOne: replaces the one document whose
    /// `uniqueness` fields (default `_id`) equal the given ones, or inserts.
    fn insert_or_update(
        &mut self,
        t: &mut WriteTables<'_>,
        collection: String,
        doc: Map<String, Value>,
        uniqueness: &[String],
        by: &Principal,
    ) -> Result<WriteDone, WriteError> {
        let fields: Vec<String> = if uniqueness.is_empty() {
            vec!["_id".into()]
        } else {
            uniqueness.to_vec()
        };
        let mut cond = Map::new();
        for f in &fields {
            match doc.get(f) {
                Some(v) if !v.is_null() => {
                    cond.insert(f.clone(), serde_json::json!({"$eq": v}));
                }
                _ if f == "_id" && fields.len() == 1 => return self.insert(t, collection, doc, by),
                _ => return Err(WriteError::MissingUniqueField(f.clone())),
            }
        }
        let filter = crate::query::Filter::parse(&Value::Object(cond))?;
        let found = matching(t, &collection, &filter)?;
        match found.as_slice() {
            [] => self.insert(t, collection, doc, by),
            [(id, _)] => {
                let id = id.clone();
                let mut doc = doc;
                doc.remove("_id");
                self.replace(t, collection, id, doc, by)
            }
            many => Err(WriteError::NotUnique {
                fields: fields.join(","),
                count: many.len(),
            }),
        }
    }

    fn delete_many(
        &mut self,
        t: &mut WriteTables<'_>,
        collection: String,
        filter: &crate::query::Filter,
        by: &Principal,
    ) -> Result<WriteDone, WriteError> {
        let targets = matching(t, &collection, filter)?;
        let mut out = Vec::with_capacity(targets.len());
        for (id, _) in targets.into_iter().filter(|(_, d)| may(d, by, crate::acl::DELETE)) {
            if let WriteDone::Document(d) = self.delete(t, collection.clone(), id, by)? {
                out.push(d);
            }
        }
        Ok(WriteDone::Documents(out))
    }

    /// Brings a deleted document back as a new version of its last live one.
    fn recover(
        &mut self,
        t: &mut WriteTables<'_>,
        collection: String,
        id: String,
        by: &Principal,
    ) -> Result<WriteDone, WriteError> {
        validate_collection(&collection)?;
        validate_id(&id)?;
        if t.current(&collection, &id)?.is_some() {
            return Err(WriteError::NotDeleted { collection, id });
        }
        let mut live = None;
        {
            let range = t
                .versions
                .range(
                    (collection.as_str(), id.as_str(), 0u64, "")
                        ..=(collection.as_str(), id.as_str(), u64::MAX, crate::store::ORIGIN_MAX),
                )
                .map_err(StorageError::from)?;
            for entry in range.rev() {
                let (k, seq) = entry.map_err(StorageError::from)?;
                let origin = k.value().3.to_owned();
                let Some(change) = t.change(&origin, seq.value())? else {
                    continue;
                };
                if change.kind != ChangeKind::Delete as i32 {
                    live = Some(body_object(&change)?);
                    break;
                }
            }
        }
        let Some(mut doc) = live else {
            return Err(WriteError::NotFound { collection, id });
        };
        check(&doc, by, crate::acl::UPDATE, &collection, &id)?;
        let hlc = self.stamp();
        strip_store_fields(&mut doc);
        stamp_modified(&mut doc, Value::String(iso8601(hlc.physical_ms())), by);
        self.local_change(t, ChangeKind::Insert, &collection, &id, doc, None, hlc, by)
            .map(WriteDone::Document)
    }
}

/// Fields the store assigns; a client's values for them are dropped.
/// The withheld stubs a group's writes replaced.
fn filled_ranges(results: &[Result<WriteDone, WriteError>]) -> Vec<ocmesh_replication::RangeSet> {
    results
        .iter()
        .filter_map(|r| match r {
            Ok(WriteDone::Applied(report)) if !report.filled_ranges.is_empty() => Some(report.filled_ranges.clone()),
            _ => None,
        })
        .collect()
}

/// Fields the store sets itself, never taken from a written body.
const STORE_FIELDS: [&str; 4] = ["_version", "_deleted", "_deletedby", "_deletedbyid"];

fn strip_store_fields(doc: &mut Map<String, Value>) {
    for f in STORE_FIELDS {
        doc.remove(f);
    }
}

/// The fields that record a document's last change: when and by whom.
fn modified_fields(now: Value, by: &Principal) -> [(&'static str, Value); 3] {
    [
        ("_modified", now),
        ("_modifiedby", by.name.clone().into()),
        ("_modifiedbyid", by.id.clone().into()),
    ]
}

fn stamp_modified(doc: &mut Map<String, Value>, now: Value, by: &Principal) {
    for (field, value) in modified_fields(now, by) {
        doc.insert(field.into(), value);
    }
}
