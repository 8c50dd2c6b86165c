//! How a node meets the world outside its logic: where its bytes live,
//! what its wall clock reads, where its randomness comes from, and whether
//! background threads run. `Node::open` uses the real ones; a simulator
//! passes its own to `Node::open_with` so that one seed gives one run.

use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use crate::disk::Storage;

/// The node's wall clock, in milliseconds since the Unix epoch. It feeds
/// the hybrid logical clock, `_created`/`_modified` stamps, work-item
/// times (nextrun, leases) and the checkpoint timer.
pub trait WallClock: fmt::Debug + Send + Sync {
    fn now_ms(&self) -> u64;
}

/// The operating system's clock.
#[derive(Debug, Default, Clone, Copy)]
pub struct SystemClock;

impl WallClock for SystemClock {
    fn now_ms(&self) -> u64 {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .unwrap_or(0)
    }
}

/// A clock that reads whatever was last set: a simulator's virtual time
/// (plus the site's skew). Clones share the reading.
#[derive(Debug, Default, Clone)]
pub struct ManualClock(Arc<AtomicU64>);

impl ManualClock {
    pub fn new(ms: u64) -> Self {
        ManualClock(Arc::new(AtomicU64::new(ms)))
    }

    pub fn set(&self, ms: u64) {
        self.0.store(ms, Ordering::SeqCst);
    }
}

impl WallClock for ManualClock {
    fn now_ms(&self) -> u64 {
        self.0.load(Ordering::SeqCst)
    }
}

/// Options of `Node::open_with`; the default is what `Node::open` does.
#[derive(Debug, Clone)]
pub struct OpenOptions {
    pub storage: Storage,
    pub clock: Arc<dyn WallClock>,
    /// Seed for the node's ids (document ids, the token secret); `None`
    /// draws them from the operating system. A reopened node should get a
    /// different seed than its last run (ids carry the clock's seconds and
    /// a counter too, but a seed reused within one second would repeat).
    pub id_seed: Option<u64>,
    /// Run the thread that returns expired work-item leases once a second
    /// (wall time). Without it, call `Node::expire_leases`.
    pub lease_thread: bool,
    /// Create the local `admin` user on first start (an argon2 hash).
    pub create_admin: bool,
}

impl Default for OpenOptions {
    fn default() -> Self {
        OpenOptions {
            storage: Storage::Directory,
            clock: Arc::new(SystemClock),
            id_seed: None,
            lease_thread: true,
            create_admin: true,
        }
    }
}

impl OpenOptions {
    /// Everything deterministic: a `MemDisk`, the given clock and seed, no
    /// background thread, no admin user.
    pub fn simulated(disk: crate::disk::MemDisk, clock: Arc<dyn WallClock>, id_seed: u64) -> Self {
        OpenOptions {
            storage: Storage::Memory(disk),
            clock,
            id_seed: Some(id_seed),
            lease_thread: false,
            create_admin: false,
        }
    }
}
