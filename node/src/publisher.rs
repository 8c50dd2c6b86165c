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

use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};

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

/// The read snapshot every reader starts from: the newest published group.
#[derive(Debug)]
pub(crate) struct Snapshot(Mutex<Arc<ReadTransaction>>);

impl Snapshot {
    pub fn new(first: ReadTransaction) -> Self {
        Snapshot(Mutex::new(Arc::new(first)))
    }

    pub fn current(&self) -> Arc<ReadTransaction> {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    fn set(&self, txn: Arc<ReadTransaction>) {
        // The old snapshot is dropped outside the lock (it may be the last
        // reference, and closing a transaction takes redb's own locks).
        let old = std::mem::replace(&mut *self.0.lock().unwrap_or_else(|p| p.into_inner()), txn);
        drop(old);
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

/// A group the writer committed, waiting to be published.
pub(crate) struct Committed {
    /// Whether its log record may still be unsynced.
    pub needs_sync: bool,
    /// redb as of this group's commit; `None` when it committed nothing.
    pub snapshot: Option<ReadTransaction>,
    /// The version vector after the group, when the group advanced it.
    pub vv: Option<VersionVector>,
    /// Queues that got ready items.
    pub readied: Vec<String>,
    /// Withheld stubs the group replaced.
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
                Ok(()) => self.publish(groups),
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

    fn publish(&self, mut groups: Vec<Committed>) {
        // Readers move to the newest snapshot before anyone is answered, so
        // a caller reads its own write.
        if let Some(txn) = groups.iter_mut().rev().find_map(|g| g.snapshot.take()) {
            self.snapshot.set(Arc::new(txn));
        }
        let newest_vv = groups.iter().rev().find_map(|g| g.vv.clone());
        if let Some(vv) = newest_vv {
            self.published.send_replace(vv);
        }
        for g in groups {
            self.signals.ready(&g.readied);
            for f in g.filled {
                self.fills.record(f);
            }
            for (reply, result) in g.replies {
                // The caller may have gone away; the write stands regardless.
                let _ = reply.send(result);
            }
        }
    }
}
