//! Where a node keeps its bytes: a directory (the normal case), or a
//! `MemDisk`, an in-memory disk that survives a simulated crash the way a
//! real one does.
//!
//! A `MemDisk` holds two files, the redb database and the write-ahead log.
//! Each file has its current content and a *durable image*: writes and
//! length changes go to the current content and are remembered as pending;
//! `sync_data` applies the pending ones to the durable image. `crash` throws
//! every unsynced change away (or, with `crash_tearing`, keeps a random
//! prefix of them, as a disk that wrote some of its cache before power
//! went), and starts a new generation: handles opened before the crash fail
//! every operation from then on, so a node left running on the old
//! generation (its writer thread finishing a checkpoint, say) cannot touch
//! what the restarted node reads.
//!
//! Invariant: after `crash`, each file's content is exactly its durable
//! image plus (when tearing) a prefix of the operations issued after the
//! last sync, in issue order.

use std::fmt;
use std::io;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

/// Where `Node::open_with` keeps the site's data.
#[derive(Debug, Clone, Default)]
pub enum Storage {
    /// `NodeConfig::data_dir`, as `Node::open` does.
    #[default]
    Directory,
    /// An in-memory disk (simulations, crash tests).
    Memory(MemDisk),
    /// Blocks in a store: MongoDB (feature `mongodb`), or a test's
    /// `MemBlockStore` (see `blockfile`).
    Blocks(std::sync::Arc<dyn crate::blockfile::BlockStore>),
}

#[derive(Debug, Clone)]
enum Op {
    Write { offset: u64, data: Vec<u8> },
    SetLen(u64),
}

#[derive(Debug, Default)]
struct MemFile {
    current: Vec<u8>,
    durable: Vec<u8>,
    /// Operations since the last sync, in issue order.
    pending: Vec<Op>,
}

fn apply(bytes: &mut Vec<u8>, op: &Op) {
    match op {
        Op::Write { offset, data } => {
            let start = *offset as usize;
            let end = start + data.len();
            if bytes.len() < end {
                bytes.resize(end, 0);
            }
            bytes[start..end].copy_from_slice(data);
        }
        Op::SetLen(len) => bytes.resize(*len as usize, 0),
    }
}

impl MemFile {
    fn op(&mut self, op: Op) {
        apply(&mut self.current, &op);
        self.pending.push(op);
    }

    fn sync(&mut self) {
        for op in self.pending.drain(..) {
            apply(&mut self.durable, &op);
        }
    }

    /// Back to the durable image plus the first `keep` pending operations.
    fn crash(&mut self, keep: usize) {
        let kept: Vec<Op> = self.pending.drain(..).take(keep).collect();
        for op in &kept {
            apply(&mut self.durable, op);
        }
        self.current = self.durable.clone();
    }
}

/// Which of a site's two files (on a `MemDisk` or a block store).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum FileId {
    Database,
    Wal,
}

type Keep = Box<dyn FnMut(usize) -> usize + Send>;

#[derive(Default)]
struct DiskState {
    generation: u64,
    db: MemFile,
    wal: MemFile,
    syncs: u64,
    /// A crash armed to happen at this sync (instead of it), tearing with `Keep`.
    armed: Option<(u64, Keep)>,
}

impl fmt::Debug for DiskState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DiskState")
            .field("generation", &self.generation)
            .field("syncs", &self.syncs)
            .finish_non_exhaustive()
    }
}

impl DiskState {
    fn crash(&mut self, keep: &mut dyn FnMut(usize) -> usize) {
        self.generation += 1;
        self.armed = None;
        for id in [FileId::Database, FileId::Wal] {
            let f = self.file(id);
            let k = keep(f.pending.len()).min(f.pending.len());
            f.crash(k);
        }
    }

    fn file(&mut self, id: FileId) -> &mut MemFile {
        match id {
            FileId::Database => &mut self.db,
            FileId::Wal => &mut self.wal,
        }
    }
}

/// An in-memory disk shared by handle: clone it to keep it across a
/// node's crash and reopen.
#[derive(Clone, Default)]
pub struct MemDisk {
    state: Arc<Mutex<DiskState>>,
}

impl fmt::Debug for MemDisk {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let s = self.lock();
        f.debug_struct("MemDisk")
            .field("generation", &s.generation)
            .field("db_bytes", &s.db.current.len())
            .field("wal_bytes", &s.wal.current.len())
            .finish()
    }
}

impl MemDisk {
    pub fn new() -> Self {
        MemDisk::default()
    }

    fn lock(&self) -> MutexGuard<'_, DiskState> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Power cut: every change not yet synced is lost, and handles of the
    /// node that was running fail from now on.
    pub fn crash(&self) {
        self.crash_tearing(|_| 0);
    }

    /// Power cut that keeps, of each file's unsynced operations, the first
    /// `keep(pending)` (clamped to `pending`).
    pub fn crash_tearing(&self, mut keep: impl FnMut(usize) -> usize) {
        self.lock().crash(&mut keep);
    }

    /// Arms a power cut in the middle of whatever the node is doing: the
    /// sync that would be number `at` (counting from 1, see `syncs`)
    /// crashes the disk instead, tearing with `keep` as `crash_tearing`,
    /// and fails, as does every later operation of the running node.
    pub fn crash_at_sync(&self, at: u64, keep: impl FnMut(usize) -> usize + Send + 'static) {
        self.lock().armed = Some((at, Box::new(keep)));
    }

    /// How many crashes this disk has had.
    pub fn generation(&self) -> u64 {
        self.lock().generation
    }

    /// Syncs made so far (both files): a position to crash at.
    pub fn syncs(&self) -> u64 {
        self.lock().syncs
    }

    /// Bytes of durable state (database and log).
    pub fn durable_bytes(&self) -> u64 {
        let s = self.lock();
        (s.db.durable.len() + s.wal.durable.len()) as u64
    }

    pub(crate) fn handle(&self, file: FileId) -> MemFileHandle {
        let generation = self.lock().generation;
        MemFileHandle {
            disk: self.clone(),
            file,
            generation,
        }
    }
}

/// One file of a `MemDisk`, as opened by one generation of a node.
#[derive(Clone)]
pub(crate) struct MemFileHandle {
    disk: MemDisk,
    file: FileId,
    generation: u64,
}

impl fmt::Debug for MemFileHandle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "MemFileHandle({:?}, generation {})", self.file, self.generation)
    }
}

fn crashed() -> io::Error {
    io::Error::other("the in-memory disk crashed under this handle")
}

impl MemFileHandle {
    fn with<T>(&self, f: impl FnOnce(&mut DiskState) -> io::Result<T>) -> io::Result<T> {
        let mut s = self.disk.lock();
        if s.generation != self.generation {
            return Err(crashed());
        }
        f(&mut s)
    }

    pub fn len(&self) -> io::Result<u64> {
        self.with(|s| Ok(s.file(self.file).current.len() as u64))
    }

    pub fn read_at(&self, offset: u64, out: &mut [u8]) -> io::Result<()> {
        self.with(|s| {
            let cur = &s.file(self.file).current;
            let start = usize::try_from(offset).map_err(|_| io::Error::from(io::ErrorKind::UnexpectedEof))?;
            let end = start
                .checked_add(out.len())
                .filter(|e| *e <= cur.len())
                .ok_or_else(|| io::Error::from(io::ErrorKind::UnexpectedEof))?;
            out.copy_from_slice(&cur[start..end]);
            Ok(())
        })
    }

    #[cfg(test)]
    pub fn read_all(&self) -> io::Result<Vec<u8>> {
        self.with(|s| Ok(s.file(self.file).current.clone()))
    }

    pub fn write_at(&self, offset: u64, data: &[u8]) -> io::Result<()> {
        self.with(|s| {
            s.file(self.file).op(Op::Write {
                offset,
                data: data.to_vec(),
            });
            Ok(())
        })
    }

    pub fn set_len(&self, len: u64) -> io::Result<()> {
        self.with(|s| {
            s.file(self.file).op(Op::SetLen(len));
            Ok(())
        })
    }

    pub fn sync(&self) -> io::Result<()> {
        self.with(|s| {
            if let Some((at, _)) = &s.armed
                && s.syncs + 1 >= *at
                && let Some((_, mut keep)) = s.armed.take()
            {
                s.crash(&mut keep);
                return Err(crashed());
            }
            s.file(self.file).sync();
            s.syncs += 1;
            Ok(())
        })
    }
}

/// A file of a site's store that is not a plain file (a `MemDisk`'s, a
/// block store's): what redb's backend and the write-ahead log need of it.
pub(crate) trait SiteFile: fmt::Debug + Send + Sync + 'static {
    fn len(&self) -> io::Result<u64>;
    fn read_at(&self, offset: u64, out: &mut [u8]) -> io::Result<()>;
    fn write_at(&self, offset: u64, data: &[u8]) -> io::Result<()>;
    fn set_len(&self, len: u64) -> io::Result<()>;
    /// Makes every earlier write and length change durable.
    fn sync(&self) -> io::Result<()>;
}

impl SiteFile for MemFileHandle {
    fn len(&self) -> io::Result<u64> {
        MemFileHandle::len(self)
    }

    fn read_at(&self, offset: u64, out: &mut [u8]) -> io::Result<()> {
        MemFileHandle::read_at(self, offset, out)
    }

    fn write_at(&self, offset: u64, data: &[u8]) -> io::Result<()> {
        MemFileHandle::write_at(self, offset, data)
    }

    fn set_len(&self, len: u64) -> io::Result<()> {
        MemFileHandle::set_len(self, len)
    }

    fn sync(&self) -> io::Result<()> {
        MemFileHandle::sync(self)
    }
}

/// redb's storage on a [`SiteFile`].
#[derive(Debug)]
pub(crate) struct Backend<F>(pub F);

impl<F: SiteFile> redb::StorageBackend for Backend<F> {
    fn len(&self) -> Result<u64, io::Error> {
        self.0.len()
    }

    fn read(&self, offset: u64, out: &mut [u8]) -> Result<(), io::Error> {
        self.0.read_at(offset, out)
    }

    fn set_len(&self, len: u64) -> Result<(), io::Error> {
        self.0.set_len(len)
    }

    fn sync_data(&self) -> Result<(), io::Error> {
        self.0.sync()
    }

    fn write(&self, offset: u64, data: &[u8]) -> Result<(), io::Error> {
        self.0.write_at(offset, data)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unsynced_bytes_are_lost_and_old_handles_fail() {
        let disk = MemDisk::new();
        let h = disk.handle(FileId::Wal);
        h.write_at(0, b"abc").expect("write");
        h.sync().expect("sync");
        h.write_at(3, b"def").expect("write");
        h.set_len(4).expect("set_len");
        assert_eq!(h.read_all().expect("read"), b"abcd");
        disk.crash();
        assert!(h.write_at(0, b"x").is_err(), "a handle from before the crash");
        let h2 = disk.handle(FileId::Wal);
        assert_eq!(h2.read_all().expect("read"), b"abc");
        assert_eq!(disk.handle(FileId::Database).len().expect("len"), 0);
    }

    #[test]
    fn tearing_keeps_a_prefix_of_unsynced_operations() {
        let disk = MemDisk::new();
        let h = disk.handle(FileId::Database);
        h.write_at(0, b"aa").expect("write");
        h.write_at(2, b"bb").expect("write");
        h.write_at(4, b"cc").expect("write");
        disk.crash_tearing(|n| n.saturating_sub(1));
        let mut out = [0u8; 4];
        let h2 = disk.handle(FileId::Database);
        h2.read_at(0, &mut out).expect("read");
        assert_eq!(&out, b"aabb");
        assert_eq!(h2.len().expect("len"), 4);
        assert!(h2.read_at(2, &mut out).is_err(), "reads past the end fail");
    }
}
