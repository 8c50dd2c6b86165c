//! A site's two files (the redb database and the write-ahead log) kept as
//! fixed-size blocks in a [`BlockStore`] instead of a local directory: the
//! storage layer under the MongoDB backend (feature `mongodb`), and, with
//! [`MemBlockStore`], under the tests that check it without a server.
//!
//! A [`BlockFile`] behaves like a file opened for `pread`/`pwrite`: writes
//! and length changes stay in memory (dirty blocks) until `sync`, which
//! hands them to the store in one `commit`; only a returned `commit` is
//! durable. That is the contract redb and the write-ahead log already rely
//! on from `fdatasync`: redb syncs between writing pages and writing the
//! commit slot that points at them, and the log's records are checksummed,
//! so whatever subset of an interrupted commit the store kept is never
//! taken for committed data.
//!
//! Invariant: after a crash (the handle dropped without `sync`), reopening
//! gives exactly the content as of the last successful `sync`, bytes past
//! the length read as nothing, and a block never written reads as zeros.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::fmt;
use std::io;
use std::ops::Range;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use crate::disk::FileId;

/// Bytes per block. Large enough that a checkpoint's pages are a few
/// hundred store writes, small enough that a log sync rewrites little.
pub const BLOCK: u64 = 64 << 10;

/// Blocks kept after they were read or synced (16 MiB), beyond which the
/// oldest are dropped; redb keeps its own page cache above this one.
const CLEAN_BLOCKS: usize = 256;

/// Blocks fetched together on a miss (1 MiB), since redb reads a new
/// database's pages mostly in order.
const PREFETCH_BLOCKS: u64 = 16;

/// Where the blocks live. Every method may block on I/O.
pub trait BlockStore: Send + Sync + fmt::Debug {
    /// The length `file` had at its last commit (0 if never committed).
    fn len(&self, file: FileId) -> io::Result<u64>;
    /// The committed blocks of `file` numbered in `blocks`, in any order;
    /// a block not listed was never written.
    fn get(&self, file: FileId, blocks: Range<u64>) -> io::Result<Vec<(u64, Vec<u8>)>>;
    /// Makes `blocks` and `len` durable, and forgets every other block
    /// numbered `drop_from` or more. Returns only once all of it is
    /// durable; on error any part of it may have been kept.
    fn commit(&self, file: FileId, blocks: &BTreeMap<u64, Vec<u8>>, len: u64, drop_from: u64) -> io::Result<()>;
}

#[derive(Default)]
struct State {
    /// Length as written (what reads see).
    len: u64,
    /// Length as of the last successful sync.
    synced_len: u64,
    /// Blocks changed since the last sync, each `BLOCK` bytes long.
    dirty: BTreeMap<u64, Vec<u8>>,
    /// The lowest block a truncation since the last sync cut off whole:
    /// the store's copies from there on are stale and read as zeros.
    cut_from: Option<u64>,
    /// Blocks as committed, oldest first in `order`.
    clean: HashMap<u64, Vec<u8>>,
    order: VecDeque<u64>,
}

impl State {
    fn remember(&mut self, block: u64, data: Vec<u8>) {
        if self.clean.insert(block, data).is_none() {
            self.order.push_back(block);
        }
        while self.clean.len() > CLEAN_BLOCKS {
            let Some(oldest) = self.order.pop_front() else { break };
            self.clean.remove(&oldest);
        }
    }
}

/// One file of a site on a [`BlockStore`].
pub struct BlockFile {
    store: Arc<dyn BlockStore>,
    file: FileId,
    state: Mutex<State>,
}

impl fmt::Debug for BlockFile {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let s = self.lock();
        f.debug_struct("BlockFile")
            .field("file", &self.file)
            .field("len", &s.len)
            .field("dirty_blocks", &s.dirty.len())
            .finish()
    }
}

fn block_range(offset: u64, len: u64) -> Range<u64> {
    if len == 0 {
        return 0..0;
    }
    offset / BLOCK..(offset + len - 1) / BLOCK + 1
}

impl BlockFile {
    /// Opens `file` as last committed to `store`.
    pub fn open(store: Arc<dyn BlockStore>, file: FileId) -> io::Result<BlockFile> {
        let len = store.len(file)?;
        Ok(BlockFile {
            store,
            file,
            state: Mutex::new(State {
                len,
                synced_len: len,
                ..State::default()
            }),
        })
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    pub fn len(&self) -> u64 {
        self.lock().len
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Makes sure every block of `blocks` is in memory (dirty or clean).
    fn load(&self, s: &mut State, blocks: Range<u64>) -> io::Result<()> {
        let mut at = blocks.start;
        while at < blocks.end {
            if s.dirty.contains_key(&at) || s.clean.contains_key(&at) {
                at += 1;
                continue;
            }
            if s.cut_from.is_some_and(|cut| at >= cut) {
                s.remember(at, vec![0u8; BLOCK as usize]);
                at += 1;
                continue;
            }
            // A run of missing blocks, read ahead a little.
            let mut end = at + 1;
            while end < blocks.end.max(at + PREFETCH_BLOCKS)
                && !s.dirty.contains_key(&end)
                && !s.clean.contains_key(&end)
                && end * BLOCK < s.synced_len.max(s.len)
            {
                end += 1;
            }
            let mut got: HashMap<u64, Vec<u8>> = self.store.get(self.file, at..end)?.into_iter().collect();
            for b in at..end {
                let mut data = got.remove(&b).unwrap_or_default();
                data.resize(BLOCK as usize, 0);
                s.remember(b, data);
            }
            at = end;
        }
        Ok(())
    }

    pub fn read_at(&self, offset: u64, out: &mut [u8]) -> io::Result<()> {
        let mut s = self.lock();
        let end = offset
            .checked_add(out.len() as u64)
            .filter(|e| *e <= s.len)
            .ok_or_else(|| io::Error::from(io::ErrorKind::UnexpectedEof))?;
        let mut written = 0usize;
        for b in block_range(offset, end - offset) {
            // Loaded and copied one at a time: a read may span more blocks
            // than the clean cache keeps.
            self.load(&mut s, b..b + 1)?;
            let data = s
                .dirty
                .get(&b)
                .or_else(|| s.clean.get(&b))
                .ok_or_else(|| io::Error::other(format!("block {b} was loaded but is not cached")))?;
            let from = (offset + written as u64 - b * BLOCK) as usize;
            let n = (BLOCK as usize - from).min(out.len() - written);
            out[written..written + n].copy_from_slice(&data[from..from + n]);
            written += n;
        }
        Ok(())
    }

    pub fn read_all(&self) -> io::Result<Vec<u8>> {
        let len = usize::try_from(self.len()).map_err(io::Error::other)?;
        let mut out = vec![0u8; len];
        self.read_at(0, &mut out)?;
        Ok(out)
    }

    pub fn write_at(&self, offset: u64, data: &[u8]) -> io::Result<()> {
        if data.is_empty() {
            return Ok(());
        }
        let mut s = self.lock();
        let end = offset
            .checked_add(data.len() as u64)
            .ok_or_else(|| io::Error::other("write past the largest offset"))?;
        let mut written = 0usize;
        for b in block_range(offset, data.len() as u64) {
            let from = (offset + written as u64 - b * BLOCK) as usize;
            let n = (BLOCK as usize - from).min(data.len() - written);
            let mut block = match s.dirty.remove(&b) {
                Some(block) => block,
                // A block overwritten whole needs no read.
                None if n == BLOCK as usize => vec![0u8; BLOCK as usize],
                None => {
                    self.load(&mut s, b..b + 1)?;
                    s.clean.get(&b).cloned().unwrap_or_else(|| vec![0u8; BLOCK as usize])
                }
            };
            block[from..from + n].copy_from_slice(&data[written..written + n]);
            s.dirty.insert(b, block);
            written += n;
        }
        s.len = s.len.max(end);
        Ok(())
    }

    pub fn set_len(&self, len: u64) -> io::Result<()> {
        let mut s = self.lock();
        if len < s.len {
            // Bytes cut off read as zeros if the file grows again.
            let keep_blocks = len.div_ceil(BLOCK);
            s.cut_from = Some(s.cut_from.map_or(keep_blocks, |cut| cut.min(keep_blocks)));
            s.dirty.retain(|b, _| *b < keep_blocks);
            s.clean.retain(|b, _| *b < keep_blocks);
            s.order.retain(|b| *b < keep_blocks);
            let tail = (len % BLOCK) as usize;
            if tail != 0 {
                let last = len / BLOCK;
                let mut block = match s.dirty.remove(&last) {
                    Some(block) => block,
                    None => {
                        self.load(&mut s, last..last + 1)?;
                        s.clean.get(&last).cloned().unwrap_or_else(|| vec![0u8; BLOCK as usize])
                    }
                };
                block[tail..].fill(0);
                s.dirty.insert(last, block);
            }
        }
        s.len = len;
        Ok(())
    }

    /// Commits every change since the last sync; on error they stay pending.
    pub fn sync(&self) -> io::Result<()> {
        let mut s = self.lock();
        if s.dirty.is_empty() && s.len == s.synced_len && s.cut_from.is_none() {
            return Ok(());
        }
        let len = s.len;
        let drop_from = s.cut_from.unwrap_or(u64::MAX).min(len.div_ceil(BLOCK));
        self.store.commit(self.file, &s.dirty, len, drop_from)?;
        for (b, d) in std::mem::take(&mut s.dirty) {
            s.remember(b, d);
        }
        s.synced_len = len;
        s.cut_from = None;
        Ok(())
    }
}

impl crate::disk::SiteFile for BlockFile {
    fn len(&self) -> io::Result<u64> {
        Ok(BlockFile::len(self))
    }

    fn read_at(&self, offset: u64, out: &mut [u8]) -> io::Result<()> {
        BlockFile::read_at(self, offset, out)
    }

    fn write_at(&self, offset: u64, data: &[u8]) -> io::Result<()> {
        BlockFile::write_at(self, offset, data)
    }

    fn set_len(&self, len: u64) -> io::Result<()> {
        BlockFile::set_len(self, len)
    }

    fn sync(&self) -> io::Result<()> {
        BlockFile::sync(self)
    }
}

/// A [`BlockStore`] in memory: committed blocks survive the node that
/// wrote them (clone it to keep it across a reopen), uncommitted ones die
/// with it. For tests of the block layer without a server.
#[derive(Debug, Clone, Default)]
pub struct MemBlockStore {
    inner: Arc<Mutex<MemBlocks>>,
}

#[derive(Debug, Default)]
struct MemBlocks {
    files: HashMap<FileId, (u64, BTreeMap<u64, Vec<u8>>)>,
    commits: u64,
    /// Commits left before every commit fails (a store that went away).
    fail_after: Option<u64>,
}

impl MemBlockStore {
    pub fn new() -> Self {
        MemBlockStore::default()
    }

    fn lock(&self) -> MutexGuard<'_, MemBlocks> {
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// A separate store holding what this one has committed now: what a
    /// node restarted after a power cut at this instant would find. The
    /// node still running keeps writing to this one only.
    pub fn snapshot(&self) -> MemBlockStore {
        let s = self.lock();
        MemBlockStore {
            inner: Arc::new(Mutex::new(MemBlocks {
                files: s.files.clone(),
                commits: 0,
                fail_after: None,
            })),
        }
    }

    /// Commits made so far.
    pub fn commits(&self) -> u64 {
        self.lock().commits
    }

    /// Makes every commit after the next `n` fail, as a store that became
    /// unreachable.
    pub fn fail_after(&self, n: u64) {
        self.lock().fail_after = Some(n);
    }
}

impl BlockStore for MemBlockStore {
    fn len(&self, file: FileId) -> io::Result<u64> {
        Ok(self.lock().files.get(&file).map_or(0, |(len, _)| *len))
    }

    fn get(&self, file: FileId, blocks: Range<u64>) -> io::Result<Vec<(u64, Vec<u8>)>> {
        let s = self.lock();
        Ok(s.files
            .get(&file)
            .map(|(_, map)| map.range(blocks).map(|(b, d)| (*b, d.clone())).collect())
            .unwrap_or_default())
    }

    fn commit(&self, file: FileId, blocks: &BTreeMap<u64, Vec<u8>>, len: u64, drop_from: u64) -> io::Result<()> {
        let mut s = self.lock();
        if let Some(left) = s.fail_after.as_mut() {
            if *left == 0 {
                return Err(io::Error::other("block store unreachable"));
            }
            *left -= 1;
        }
        s.commits += 1;
        let (stored_len, map) = s.files.entry(file).or_default();
        map.retain(|b, _| *b < drop_from);
        map.extend(blocks.iter().map(|(b, d)| (*b, d.clone())));
        *stored_len = len;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[derive(Debug, Clone)]
    enum Op {
        Write { offset: u64, len: usize, byte: u8 },
        SetLen(u64),
        Sync,
        Crash,
    }

    fn op() -> impl Strategy<Value = Op> {
        // Offsets around block edges, where the arithmetic can go wrong.
        let offset = prop_oneof![
            0..3 * BLOCK,
            (0u64..4).prop_flat_map(|b| b * BLOCK - b.min(1) * 8..b * BLOCK + 8),
        ];
        prop_oneof![
            4 => (offset.clone(), 0usize..(BLOCK as usize + 300), any::<u8>())
                .prop_map(|(offset, len, byte)| Op::Write { offset, len, byte }),
            1 => offset.prop_map(Op::SetLen),
            2 => Just(Op::Sync),
            1 => Just(Op::Crash),
        ]
    }

    fn apply(model: &mut Vec<u8>, op: &Op) {
        match op {
            Op::Write { len: 0, .. } => {}
            Op::Write { offset, len, byte } => {
                let (start, end) = (*offset as usize, *offset as usize + len);
                if model.len() < end {
                    model.resize(end, 0);
                }
                model[start..end].fill(*byte);
            }
            Op::SetLen(len) => model.resize(*len as usize, 0),
            Op::Sync | Op::Crash => {}
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]

        /// Against a plain byte vector: reads see every write, and a crash
        /// goes back to exactly what was last synced.
        #[test]
        fn behaves_like_a_file_that_loses_unsynced_writes(ops in prop::collection::vec(op(), 1..40)) {
            let store = MemBlockStore::new();
            let mut file = BlockFile::open(Arc::new(store.clone()), FileId::Database).expect("open");
            let (mut current, mut synced) = (Vec::new(), Vec::new());
            for op in &ops {
                match op {
                    Op::Write { offset, len, byte } => {
                        file.write_at(*offset, &vec![*byte; *len]).expect("write");
                    }
                    Op::SetLen(len) => file.set_len(*len).expect("set_len"),
                    Op::Sync => {
                        file.sync().expect("sync");
                        synced = current.clone();
                    }
                    Op::Crash => {
                        file = BlockFile::open(Arc::new(store.clone()), FileId::Database).expect("reopen");
                        current = synced.clone();
                    }
                }
                apply(&mut current, op);
                prop_assert_eq!(file.len(), current.len() as u64);
                prop_assert!(file.read_all().expect("read") == current, "content after {:?}", op);
            }
            // The other file was never touched.
            prop_assert_eq!(store.len(FileId::Wal).expect("len"), 0);
        }
    }

    #[test]
    fn reads_past_the_end_fail_and_a_failed_commit_keeps_changes_pending() {
        let store = MemBlockStore::new();
        let file = BlockFile::open(Arc::new(store.clone()), FileId::Wal).expect("open");
        file.write_at(10, b"hello").expect("write");
        let mut out = [0u8; 6];
        assert!(file.read_at(10, &mut out).is_err(), "one byte past the end");
        store.fail_after(0);
        assert!(file.sync().is_err());
        assert_eq!(store.len(FileId::Wal).expect("len"), 0, "nothing committed");
        store.lock().fail_after = None;
        file.sync().expect("sync once the store is back");
        let again = BlockFile::open(Arc::new(store.clone()), FileId::Wal).expect("reopen");
        let mut out = [0u8; 15];
        again.read_at(0, &mut out).expect("read");
        assert_eq!(&out, b"\0\0\0\0\0\0\0\0\0\0hello");
    }

    #[test]
    fn more_blocks_than_the_clean_cache_holds_read_back() {
        let store = MemBlockStore::new();
        let file = BlockFile::open(Arc::new(store.clone()), FileId::Database).expect("open");
        let blocks = CLEAN_BLOCKS as u64 + 40;
        for b in 0..blocks {
            file.write_at(b * BLOCK + 3, &[b as u8; 2]).expect("write");
        }
        file.sync().expect("sync");
        let again = BlockFile::open(Arc::new(store), FileId::Database).expect("reopen");
        for b in (0..blocks).rev() {
            let mut out = [0u8; 2];
            again.read_at(b * BLOCK + 3, &mut out).expect("read");
            assert_eq!(out, [b as u8; 2], "block {b}");
        }
    }
}
