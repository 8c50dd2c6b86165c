//! The second half of a group commit: the publisher thread syncs the log
//! under the groups the writer has committed and only then lets anyone see
//! them.
//!
//! The writer applies a group, writes its log record (without waiting for
//! the disk), commits redb without syncing, takes a read snapshot of that
//! commit, and goes on to the next group while this thread waits for
//! `fdatasync`; one sync covers every group written meanwhile. So the
//! writer's CPU and the disk's latency overlap instead of adding up.
//!
//! Invariants:
//! - A group is answered, its snapshot becomes the one readers read, its
//!   version vector is published to federation, and its ready queues wake
//!   poppers, only after the log holding it is synced. Nobody ever sees a
//!   write a crash could take back.
//! - Groups are published in the order the writer committed them.
//! - Once a sync fails, no later group is published or acknowledged (a
//!   failed `fdatasync` may not fail again for the same lost pages); the
//!   writer sees the failure and refuses all writes until restart.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};

use redb::ReadTransaction;
use tokio::sync::{oneshot, watch};

use ocmesh_replication::{RangeSet, VersionVector};

use crate::NodeStats;
use crate::error::WriteError;
use crate::store::StorageError;
use crate::wal::LogReader;
use crate::writer::WriteDone;

/// Groups committed but not yet published, at most.
pub(crate) const PUBLISH_QUEUE_BOUND: usize = 64;

pub(crate) type Reply = oneshot::Sender<Result<WriteDone, WriteError>>;

/// The read snapshot every reader starts from: the newest published
/// commit. A group may be acknowledged (its log record synced) before the
/// redb commit that holds it is published, when the writer runs several
/// groups in one transaction; a reader then waits for that commit, so a
/// caller still reads its own write.
#[derive(Debug)]
pub(crate) struct Snapshot {
    visible: Mutex<Visible>,
    published: Condvar,
    /// The newest transaction an acknowledged write needs to be seen.
    acked: AtomicU64,
    failure: Arc<Failure>,
    bell: Arc<crate::writer::Doorbell>,
}

#[derive(Debug)]
struct Visible {
    txn: Arc<ReadTransaction>,
    /// The writer's number of the transaction `txn` reads.
    through: u64,
}

impl Snapshot {
    pub fn new(first: ReadTransaction, failure: Arc<Failure>, bell: Arc<crate::writer::Doorbell>) -> Self {
        Snapshot {
            visible: Mutex::new(Visible {
                txn: Arc::new(first),
                through: 0,
            }),
            published: Condvar::new(),
            acked: AtomicU64::new(0),
            failure,
            bell,
        }
    }

    /// The newest snapshot, once it holds every acknowledged write. The
    /// wait is short: a waiting reader asks the writer to commit the open
    /// transaction as soon as the group it is running ends, and a
    /// transaction spans at most `MAX_SHARED_TIME`. After a failure the
    /// writer commits nothing more; readers then get what was published
    /// (a restart replays the rest from the log).
    pub fn current(&self) -> Arc<ReadTransaction> {
        let want = self.acked.load(Ordering::Acquire);
        {
            let v = self.visible.lock().unwrap_or_else(|p| p.into_inner());
            if v.through >= want {
                return v.txn.clone();
            }
        }
        // The writer may be holding the transaction open for more writes:
        // no reason to, once a reader waits.
        self.bell.ask_commit();
        // Readers are called from async handlers: on a multi-threaded
        // runtime, the worker's other tasks move elsewhere while this one
        // waits, instead of waiting with it.
        let on_worker = tokio::runtime::Handle::try_current()
            .is_ok_and(|h| h.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread);
        match on_worker {
            true => tokio::task::block_in_place(|| self.wait_for(want)),
            false => self.wait_for(want),
        }
    }

    /// The newest snapshot once it reads transaction `want`, or after a
    /// failure whatever was published.
    fn wait_for(&self, want: u64) -> Arc<ReadTransaction> {
        let mut v = self.visible.lock().unwrap_or_else(|p| p.into_inner());
        while v.through < want && self.failure.get().is_none() {
            v = self
                .published
                .wait_timeout(v, std::time::Duration::from_millis(5))
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
        v.txn.clone()
    }

    fn set(&self, txn: Arc<ReadTransaction>, through: u64) {
        // The old snapshot is dropped outside the lock (it may be the last
        // reference, and closing a transaction takes redb's own locks).
        let old = {
            let mut v = self.visible.lock().unwrap_or_else(|p| p.into_inner());
            v.through = v.through.max(through);
            std::mem::replace(&mut v.txn, txn)
        };
        self.published.notify_all();
        drop(old);
    }

    /// Callers are about to learn of writes that transaction `txn` holds.
    fn acknowledging(&self, txn: u64) {
        self.acked.fetch_max(txn, Ordering::AcqRel);
    }
}

/// Why writes stopped: set once, by the writer or the publisher.
#[derive(Debug, Default)]
pub(crate) struct Failure(Mutex<Option<String>>);

impl Failure {
    pub fn get(&self) -> Option<String> {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Stops all writes until restart, whose recovery replays the log;
    /// returns the reason every refused write is given.
    pub fn stop(&self, cause: impl std::fmt::Display) -> String {
        let why = format!("the writer stopped: {cause}; restart the node to recover from the write-ahead log");
        tracing::error!("{why}");
        self.0
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get_or_insert(why.clone());
        why
    }
}

/// Nanoseconds on one monotonic clock since this process first read it:
/// the moments a write's round trip is timed by (see `NodeStats`).
pub(crate) fn mono_ns() -> u64 {
    static START: std::sync::OnceLock<std::time::Instant> = std::sync::OnceLock::new();
    u64::try_from(START.get_or_init(std::time::Instant::now).elapsed().as_nanos()).unwrap_or(u64::MAX)
}

/// A group the writer wrote, or a transaction it committed, waiting to be
/// published.
#[derive(Default)]
pub(crate) struct Committed {
    /// The sum of the moments its requests were queued, and the moment
    /// the writer handed it over (`mono_ns`).
    pub queued: u128,
    pub logged_ns: u64,
    /// Whether its log record may still be unsynced.
    pub needs_sync: bool,
    /// redb as of the commit of transaction `txn`; `None` for a group of a
    /// transaction still open, or one that committed nothing.
    pub snapshot: Option<ReadTransaction>,
    /// The writer's number of the transaction the group ran in.
    pub txn: u64,
    /// Whether the replies speak of writes in transaction `txn` (readers
    /// must then see that commit before the callers are answered).
    pub reads_txn: bool,
    /// The version vector after the group, when it advanced.
    pub vv: Option<VersionVector>,
    /// Queues that got ready items.
    pub readied: Vec<String>,
    /// Withheld stubs the commit replaced.
    pub filled: Vec<RangeSet>,
    pub replies: Vec<(Reply, Result<WriteDone, WriteError>)>,
}

pub(crate) struct Publisher {
    pub log: LogReader,
    pub snapshot: Arc<Snapshot>,
    pub published: watch::Sender<VersionVector>,
    pub signals: Arc<crate::workitems::QueueSignals>,
    pub fills: Arc<crate::fills::FillNotices>,
    pub stats: Arc<NodeStats>,
    pub failure: Arc<Failure>,
}

impl Publisher {
    /// Runs until the writer is gone and every group it sent is published.
    pub fn run(self, rx: std::sync::mpsc::Receiver<Committed>) {
        while let Ok(first) = rx.recv() {
            let mut groups = vec![first];
            groups.extend(rx.try_iter().take(PUBLISH_QUEUE_BOUND));
            self.stats.publish_queue.store(groups.len() as u64, Ordering::Relaxed);
            let synced = match self.failure.get() {
                Some(why) => Err(why),
                None if groups.iter().any(|g| g.needs_sync) => {
                    let started = std::time::Instant::now();
                    let r = self.log.sync();
                    self.stats
                        .wal_nanos
                        .fetch_add(started.elapsed().as_nanos() as u64, Ordering::Relaxed);
                    self.stats.wal_syncs.fetch_add(1, Ordering::Relaxed);
                    r.map_err(|e| self.failure.stop(e))
                }
                None => Ok(()),
            };
            match synced {
                Ok(()) => {
                    let synced_ns = mono_ns();
                    for g in &groups {
                        let waited = g.replies.len() as u64 * synced_ns.saturating_sub(g.logged_ns);
                        self.stats.until_synced_nanos.fetch_add(waited, Ordering::Relaxed);
                    }
                    self.publish(groups, synced_ns)
                }
                Err(why) => {
                    for g in groups {
                        for (reply, _) in g.replies {
                            let _ = reply.send(Err(WriteError::Storage(StorageError(why.clone()))));
                        }
                    }
                }
            }
        }
    }

    fn publish(&self, groups: Vec<Committed>, synced_ns: u64) {
        // In order: a commit's snapshot becomes the one readers read before
        // anyone is answered, so a caller reads its own write; a group
        // answered before its transaction's commit makes readers wait for it.
        for g in groups {
            if let Some(txn) = g.snapshot {
                self.snapshot.set(Arc::new(txn), g.txn);
            }
            // From here on a reader waits for the group's commit: whoever
            // learns of the group (its callers, federation through the
            // version vector) reads it.
            if g.reads_txn {
                self.snapshot.acknowledging(g.txn);
            }
            if let Some(vv) = g.vv {
                self.published.send_replace(vv);
            }
            self.signals.ready(&g.readied);
            for f in g.filled {
                self.fills.record(f);
            }
            let answered = g.replies.len() as u64;
            for (reply, result) in g.replies {
                // The caller may have gone away; the write stands regardless.
                let _ = reply.send(result);
            }
            let waited = answered * mono_ns().saturating_sub(synced_ns);
            self.stats.until_answered_nanos.fetch_add(waited, Ordering::Relaxed);
            self.stats.answered.fetch_add(answered, Ordering::Relaxed);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use redb::{Database, ReadableDatabase, TableDefinition};

    const T: TableDefinition<&str, u64> = TableDefinition::new("t");

    fn db() -> (tempfile::TempDir, Database) {
        let dir = tempfile::tempdir().expect("tmp");
        let db = Database::create(dir.path().join("db")).expect("db");
        (dir, db)
    }

    fn put(db: &Database, v: u64) {
        let txn = db.begin_write().expect("write");
        txn.open_table(T).expect("table").insert("k", v).expect("insert");
        txn.commit().expect("commit");
    }

    /// A database holding 1, and a snapshot of it that readers start from
    /// (waiting readers ring `bell`).
    fn db_at_one(bell: Arc<crate::writer::Doorbell>) -> (tempfile::TempDir, Database, Arc<Snapshot>) {
        let (dir, db) = db();
        put(&db, 1);
        let snapshot = Arc::new(Snapshot::new(db.begin_read().expect("read"), Arc::default(), bell));
        (dir, db, snapshot)
    }

    fn read(txn: &ReadTransaction) -> Option<u64> {
        let table = txn.open_table(T).ok()?;
        table.get("k").expect("get").map(|g| g.value())
    }

    #[test]
    fn a_reader_waits_for_the_commit_holding_an_acknowledged_write() {
        let (_dir, db, snapshot) = db_at_one(Arc::default());
        // Published and acknowledged through transaction 1: no wait.
        snapshot.set(Arc::new(db.begin_read().expect("read")), 1);
        snapshot.acknowledging(1);
        assert_eq!(read(&snapshot.current()), Some(1));
        // A write of transaction 2 is acknowledged before its commit is
        // published: a reader must not get the older snapshot.
        put(&db, 2);
        let later = db.begin_read().expect("read");
        snapshot.acknowledging(2);
        let publishing = std::thread::spawn({
            let snapshot = snapshot.clone();
            move || {
                std::thread::sleep(std::time::Duration::from_millis(50));
                snapshot.set(Arc::new(later), 2);
            }
        });
        let asked = std::time::Instant::now();
        assert_eq!(read(&snapshot.current()), Some(2));
        assert!(asked.elapsed() >= std::time::Duration::from_millis(40));
        publishing.join().expect("join");
    }

    /// A reader waiting for a commit on a runtime worker does not hold up
    /// the other tasks of that worker (the runtime has just one here).
    #[test]
    fn a_waiting_reader_lets_the_workers_other_tasks_run() {
        let (_dir, db) = db();
        put(&db, 1);
        let bell = Arc::new(crate::writer::Doorbell::default());
        let snapshot = Arc::new(Snapshot::new(
            db.begin_read().expect("read"),
            Arc::default(),
            bell.clone(),
        ));
        snapshot.acknowledging(1);
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .expect("runtime");
        let within = |done: &dyn Fn() -> bool| {
            let until = std::time::Instant::now() + std::time::Duration::from_secs(5);
            while !done() && std::time::Instant::now() < until {
                std::thread::sleep(std::time::Duration::from_millis(1));
            }
            done()
        };
        let reader = rt.spawn({
            let snapshot = snapshot.clone();
            async move { read(&snapshot.current()) }
        });
        // The reader asks for the commit just before it waits, on the only worker.
        assert!(within(&|| bell.commit_asked()), "the reader never waited");
        let other_ran = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let other = rt.spawn({
            let other_ran = other_ran.clone();
            async move { other_ran.store(true, Ordering::SeqCst) }
        });
        let ran_while_waiting = within(&|| other_ran.load(Ordering::SeqCst));
        snapshot.set(Arc::new(db.begin_read().expect("read")), 1);
        assert_eq!(rt.block_on(reader).expect("reader"), Some(1));
        rt.block_on(other).expect("other");
        assert!(ran_while_waiting, "the other task waited for the reader");
    }

    #[test]
    fn after_a_failure_a_reader_gets_what_was_published() {
        let (_dir, db) = db();
        put(&db, 1);
        let failure = Arc::new(Failure::default());
        let snapshot = Snapshot::new(db.begin_read().expect("read"), failure.clone(), Arc::default());
        snapshot.acknowledging(3);
        failure.stop("test");
        assert_eq!(read(&snapshot.current()), Some(1));
    }
}
