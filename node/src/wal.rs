//! The log: the site's change log on disk, and what makes a group of
//! writes durable.
//!
//! Every group of writes that makes changes appends them, already encoded,
//! as one checksummed record, and syncs it before anyone is answered. The
//! file only grows: the records are where every change's encoding lives
//! (redb's `changes` table holds each change's place in this file, see
//! `crate::store`), so a change's body is written once. redb's own commits
//! are not durable except at a checkpoint (every second, or after 64 MiB
//! of log), which also records where the log stood (`wal_from`): recovery
//! replays the records from there, which redb may not hold yet.
//!
//! A record is `magic, epoch (u64 LE), length (u32 LE), checksum (8 bytes),
//! payload`; the payload is the group's changes, each length-delimited
//! protobuf. The magic names the checksum: `OMW2` records (written since
//! session 11) carry XXH3-64 of the payload seeded with the epoch, `OMW1`
//! records (still read) the first 8 bytes of BLAKE3 over epoch and
//! payload. A torn write is an accident, not an attack, so a fast
//! non-cryptographic hash does: BLAKE3 took 6-7% of the writer's time.
//!
//! Recovery reads records of the current epoch from the checkpointed
//! offset until the first that is torn or damaged: a record is synced
//! before its writes are acknowledged, so only unacknowledged writes can
//! be lost with a torn tail. Each opening starts a new epoch at the end of
//! the intact records, so whatever a torn write left past that end is
//! never mistaken for a record later.
//!
//! Once a process has logged a few MiB, a helper thread keeps zeros
//! written (and synced) ahead of the log's end (`ZeroAhead`): a sync of a
//! record written over blocks that already exist has no new file length or
//! block allocation to journal, which on ext4 made each sync about 1.7
//! times faster. Zeros read as the end of the log (no magic), so they
//! change nothing a recovery finds.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use crate::disk::SiteFile;

/// The magic of the records this version writes (XXH3 checksum).
const MAGIC: [u8; 4] = *b"OMW2";
/// The magic of records written before session 11 (BLAKE3 checksum).
const MAGIC_BLAKE3: [u8; 4] = *b"OMW1";
/// Bytes before a record's payload.
pub(crate) const HEADER: usize = 4 + 8 + 4 + 8;
/// Largest record accepted on recovery; a group's changes stay far below.
const MAX_RECORD: usize = 1 << 30;
/// A checkpoint is due after this long...
pub(crate) const CHECKPOINT_EVERY: Duration = Duration::from_secs(1);
/// ...or once this many bytes were logged since the last one (what a
/// recovery replays at most, give or take a group).
pub(crate) const CHECKPOINT_BYTES: u64 = 64 << 20;

/// Why the log could not be read or written.
#[derive(Debug, thiserror::Error)]
#[error("log {path}: {what}: {source}")]
pub struct WalError {
    path: String,
    what: &'static str,
    #[source]
    source: std::io::Error,
}

/// The log's file: on disk, or another kind of site file (a `MemDisk`'s,
/// a block store's).
#[derive(Debug)]
enum WalFile {
    Disk(File),
    Other(Box<dyn SiteFile>),
}

impl WalFile {
    fn write_all_at(&self, data: &[u8], offset: u64) -> std::io::Result<()> {
        match self {
            WalFile::Disk(f) => f.write_all_at(data, offset),
            WalFile::Other(f) => f.write_at(offset, data),
        }
    }

    fn read_exact_at(&self, out: &mut [u8], offset: u64) -> std::io::Result<()> {
        match self {
            WalFile::Disk(f) => f.read_exact_at(out, offset),
            WalFile::Other(f) => f.read_at(offset, out),
        }
    }

    fn sync_data(&self) -> std::io::Result<()> {
        match self {
            WalFile::Disk(f) => f.sync_data(),
            WalFile::Other(f) => f.sync(),
        }
    }

    fn len(&self) -> std::io::Result<u64> {
        match self {
            WalFile::Disk(f) => Ok(f.metadata()?.len()),
            WalFile::Other(f) => f.len(),
        }
    }
}

/// Reads changes back from the log by their place; shared by the writer
/// and every reader. It only reads what a committed redb transaction
/// points at, which the log synced before that commit.
#[derive(Debug, Clone)]
pub(crate) struct LogReader {
    path: Arc<str>,
    file: Arc<WalFile>,
}

impl LogReader {
    /// `len` bytes at `offset`.
    pub fn read(&self, offset: u64, len: usize) -> Result<Vec<u8>, WalError> {
        let mut out = vec![0u8; len];
        self.file
            .read_exact_at(&mut out, offset)
            .map_err(self.err("cannot read"))?;
        Ok(out)
    }

    /// Waits until every record written so far is on disk.
    pub fn sync(&self) -> Result<(), WalError> {
        self.file.sync_data().map_err(self.err("cannot sync"))
    }

    /// Names the file in an I/O error; the path is copied only on error
    /// (reads and appends are hot).
    fn err(&self, what: &'static str) -> impl FnOnce(std::io::Error) -> WalError + '_ {
        move |source| WalError {
            path: self.path.to_string(),
            what,
            source,
        }
    }
}

/// The open log of a site.
#[derive(Debug)]
pub(crate) struct Wal {
    reader: LogReader,
    /// Where the next record goes: the end of the intact records.
    end: u64,
    /// Bytes appended since the last checkpoint.
    since_checkpoint: u64,
    /// Wall-clock ms (the node's clock) of the last checkpoint.
    last_checkpoint_ms: u64,
    /// The record being written, kept between writes so that a group does
    /// not allocate (and fault in) a fresh buffer.
    record: Vec<u8>,
    /// Bytes this process logged: zeros go ahead only after a few MiB, so
    /// a node that writes little (and every test's) never writes them.
    written: u64,
    /// Zeros ahead of the end, for a log on a plain file.
    ahead: Option<ZeroAhead>,
}

/// Zeros go ahead of the log once this process logged this much...
const ZERO_AFTER: u64 = 4 << 20;
/// ...and are kept at least this far ahead of its end...
const ZERO_LOW: u64 = 8 << 20;
/// ...topped up to this far, one synced chunk at a time.
const ZERO_HIGH: u64 = 16 << 20;
const ZERO_CHUNK: usize = 1 << 20;
static ZEROS: [u8; ZERO_CHUNK] = [0; ZERO_CHUNK];

/// Where the file is written, records or zeros, and how far zeros are
/// wanted.
#[derive(Debug, Default)]
struct Filled {
    /// Every byte below this is written: a record there lands on blocks
    /// that exist.
    upto: u64,
    /// The helper fills up to here.
    wanted: u64,
    stop: bool,
}

#[derive(Debug, Default)]
struct FillState {
    filled: Mutex<Filled>,
    /// `filled.upto`, read without the lock on every record.
    upto: AtomicU64,
    wake: Condvar,
}

/// The helper thread that writes zeros ahead of the log's end, with its
/// own handle on the file: its syncs then never take an error report that
/// the log's own sync must see (Linux reports a writeback error once per
/// open file). Zeros are only ever written above every record (under the
/// lock, see `claim`), so they never overwrite one.
#[derive(Debug)]
struct ZeroAhead {
    state: Arc<FillState>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl ZeroAhead {
    fn start(path: &Path, file_len: u64) -> Option<ZeroAhead> {
        let file = match OpenOptions::new().write(true).open(path) {
            Ok(f) => f,
            Err(e) => {
                tracing::warn!(path = %path.display(), error = %e, "log: no zeros ahead (cannot open a second handle)");
                return None;
            }
        };
        let state = Arc::new(FillState::default());
        {
            let mut f = state.filled.lock().unwrap_or_else(|p| p.into_inner());
            f.upto = file_len;
            f.wanted = file_len;
        }
        state.upto.store(file_len, Ordering::Release);
        let shared = state.clone();
        let path = path.display().to_string();
        let thread = std::thread::Builder::new()
            .name("ocmesh-log-ahead".into())
            .spawn(move || fill(&shared, &file, &path))
            .ok()?;
        Some(ZeroAhead {
            state,
            thread: Some(thread),
        })
    }

    /// Before a record is written over `..upto`: a record above the zeros
    /// moves their start past it, so the helper never writes over it.
    fn claim(&self, upto: u64) {
        if upto <= self.state.upto.load(Ordering::Acquire) {
            return;
        }
        // The helper writes its chunk under this lock: once we hold it, no
        // zeros are being written, and none will be below `upto`.
        let mut f = self.state.filled.lock().unwrap_or_else(|p| p.into_inner());
        if upto > f.upto {
            f.upto = upto;
            self.state.upto.store(upto, Ordering::Release);
        }
    }

    /// After a record ended at `end`: asks for more zeros when they run low.
    fn top_up(&self, end: u64) {
        if self.state.upto.load(Ordering::Acquire) >= end + ZERO_LOW {
            return;
        }
        let mut f = self.state.filled.lock().unwrap_or_else(|p| p.into_inner());
        if f.wanted < end + ZERO_HIGH {
            f.wanted = end + ZERO_HIGH;
            self.state.wake.notify_one();
        }
    }
}

impl Drop for ZeroAhead {
    fn drop(&mut self) {
        self.state.filled.lock().unwrap_or_else(|p| p.into_inner()).stop = true;
        self.state.wake.notify_one();
        // Joined, so a node reopened on this file right after never races
        // a helper of the closed one.
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// The helper's loop: one chunk of zeros written under the lock, then
/// synced outside it. A failure only ends the zeros: the log works
/// without them.
fn fill(state: &FillState, file: &File, path: &str) {
    loop {
        let mut f = state.filled.lock().unwrap_or_else(|p| p.into_inner());
        while !f.stop && f.wanted <= f.upto {
            f = state.wake.wait(f).unwrap_or_else(|p| p.into_inner());
        }
        if f.stop {
            return;
        }
        let at = f.upto;
        let n = (f.wanted - at).min(ZERO_CHUNK as u64) as usize;
        if let Err(e) = file.write_all_at(&ZEROS[..n], at) {
            tracing::warn!(path, error = %e, "log: stopped writing zeros ahead");
            return;
        }
        f.upto = at + n as u64;
        state.upto.store(f.upto, Ordering::Release);
        drop(f);
        if let Err(e) = file.sync_data() {
            tracing::warn!(path, error = %e, "log: stopped writing zeros ahead");
            return;
        }
    }
}

/// The checksum of the records this version writes.
fn xxh3_checksum(epoch: u64, payload: &[u8]) -> [u8; 8] {
    xxhash_rust::xxh3::xxh3_64_with_seed(payload, epoch).to_le_bytes()
}

/// The checksum a record with `magic` carries; `None` for no record's magic.
fn checksum(magic: &[u8], epoch: u64, payload: &[u8]) -> Option<[u8; 8]> {
    if magic == MAGIC {
        return Some(xxh3_checksum(epoch, payload));
    }
    if magic != MAGIC_BLAKE3 {
        return None;
    }
    let mut h = blake3::Hasher::new();
    h.update(&epoch.to_le_bytes());
    h.update(payload);
    let mut out = [0u8; 8];
    out.copy_from_slice(&h.finalize().as_bytes()[..8]);
    Some(out)
}

/// An intact record found by `parse_records`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Record<'a> {
    /// Offset of the payload in the file.
    pub at: u64,
    pub payload: &'a [u8],
}

/// The intact records of `epoch`, in order, in `bytes` (which start at
/// file offset `base`), and the offset where they end.
pub(crate) fn parse_records(bytes: &[u8], base: u64, epoch: u64) -> (Vec<Record<'_>>, u64) {
    let mut out = Vec::new();
    let mut pos = 0usize;
    loop {
        let rest = &bytes[pos..];
        if rest.len() < HEADER {
            break;
        }
        let rec_epoch = u64::from_le_bytes(rest[4..12].try_into().unwrap_or_default());
        let len = u32::from_le_bytes(rest[12..16].try_into().unwrap_or_default()) as usize;
        if len > MAX_RECORD || rest.len() < HEADER + len {
            break;
        }
        let payload = &rest[HEADER..HEADER + len];
        // Another epoch's record is what an earlier opening left past its
        // end: never part of this log.
        let intact =
            rec_epoch == epoch && checksum(&rest[..4], rec_epoch, payload).is_some_and(|sum| rest[16..24] == sum);
        if !intact {
            break;
        }
        out.push(Record {
            at: base + (pos + HEADER) as u64,
            payload,
        });
        pos += HEADER + len;
    }
    (out, base + pos as u64)
}

impl Wal {
    /// The log on a site file other than a plain one (an in-memory disk's,
    /// a block store's).
    pub fn open_site_file(file: impl SiteFile, place: &str, now_ms: u64) -> Wal {
        Wal::opened(place, WalFile::Other(Box::new(file)), now_ms)
    }

    fn opened(path: &str, file: WalFile, now_ms: u64) -> Wal {
        Wal {
            reader: LogReader {
                path: path.into(),
                file: Arc::new(file),
            },
            end: 0,
            since_checkpoint: 0,
            last_checkpoint_ms: now_ms,
            record: Vec::new(),
            written: 0,
            ahead: None,
        }
    }

    /// Opens (or creates) the log file.
    pub fn open(path: &Path, now_ms: u64) -> Result<Wal, WalError> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .truncate(false)
            .create(true)
            .open(path)
            .map_err(|source| WalError {
                path: path.display().to_string(),
                what: "cannot open",
                source,
            })?;
        let mut wal = Wal::opened(&path.display().to_string(), WalFile::Disk(file), now_ms);
        let len = wal.reader.file.len().map_err(wal.err("cannot stat"))?;
        wal.ahead = ZeroAhead::start(path, len);
        Ok(wal)
    }

    fn err(&self, what: &'static str) -> impl FnOnce(std::io::Error) -> WalError + '_ {
        self.reader.err(what)
    }

    /// Everything in the file from `from` on (the records a recovery may
    /// replay, and whatever a torn write left after them).
    pub fn read_from(&self, from: u64) -> Result<Vec<u8>, WalError> {
        let len = self.reader.file.len().map_err(self.err("cannot stat"))?;
        let n = usize::try_from(len.saturating_sub(from))
            .map_err(|_| self.err("cannot read")(std::io::Error::other("log too large")))?;
        self.reader.read(from, n)
    }

    /// Sets where the next record goes, after a recovery found the end.
    pub fn set_end(&mut self, end: u64) {
        self.end = end;
    }

    /// Where the next record goes.
    pub fn end(&self) -> u64 {
        self.end
    }

    /// Where the payload of the next record will be.
    pub fn next_payload_at(&self) -> u64 {
        self.end + HEADER as u64
    }

    pub fn reader(&self) -> LogReader {
        self.reader.clone()
    }

    /// Whether the next group should also be a checkpoint.
    pub fn checkpoint_due(&self, now_ms: u64) -> bool {
        self.since_checkpoint >= CHECKPOINT_BYTES
            || now_ms.saturating_sub(self.last_checkpoint_ms) >= CHECKPOINT_EVERY.as_millis() as u64
            // A clock that went back (a wall clock stepped) also checkpoints.
            || now_ms < self.last_checkpoint_ms
    }

    /// Appends one record and waits until it is on disk.
    #[cfg(test)]
    pub fn append(&mut self, epoch: u64, payload: &[u8]) -> Result<(), WalError> {
        self.write(epoch, payload)?;
        self.reader.sync()
    }

    /// Appends one record without waiting for the disk: it is durable once
    /// a later `LogReader::sync` returns, and must not be acknowledged
    /// before.
    pub fn write(&mut self, epoch: u64, payload: &[u8]) -> Result<(), WalError> {
        let mut record = std::mem::take(&mut self.record);
        record.clear();
        record.reserve(HEADER + payload.len());
        record.extend_from_slice(&MAGIC);
        record.extend_from_slice(&epoch.to_le_bytes());
        record.extend_from_slice(&(payload.len() as u32).to_le_bytes());
        record.extend_from_slice(&xxh3_checksum(epoch, payload));
        record.extend_from_slice(payload);
        let len = record.len() as u64;
        if let Some(ahead) = &self.ahead {
            ahead.claim(self.end + len);
        }
        let written = self.reader.file.write_all_at(&record, self.end);
        self.record = record;
        written.map_err(self.err("cannot append"))?;
        self.end += len;
        self.since_checkpoint += len;
        self.written += len;
        if self.written >= ZERO_AFTER
            && let Some(ahead) = &self.ahead
        {
            ahead.top_up(self.end);
        }
        Ok(())
    }

    /// After a checkpoint: recovery now starts at `end`.
    pub fn checkpointed(&mut self, now_ms: u64) {
        self.last_checkpoint_ms = now_ms;
        self.since_checkpoint = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn payloads<'a>(records: &[Record<'a>]) -> Vec<&'a [u8]> {
        records.iter().map(|r| r.payload).collect()
    }

    #[test]
    fn records_round_trip_and_stop_at_damage() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("wal");
        let mut wal = Wal::open(&path, 0).expect("open");
        assert!(wal.read_from(0).expect("read").is_empty());
        wal.append(7, b"one").expect("append");
        wal.append(7, b"two").expect("append");
        wal.append(7, b"three").expect("append");
        drop(wal);
        let wal = Wal::open(&path, 0).expect("reopen");
        let content = wal.read_from(0).expect("read");
        let (records, end) = parse_records(&content, 0, 7);
        assert_eq!(payloads(&records), vec![&b"one"[..], b"two", b"three"]);
        assert_eq!(end, content.len() as u64);
        // Each payload is where the record says.
        for r in &records {
            assert_eq!(wal.reader().read(r.at, r.payload.len()).expect("read"), r.payload);
        }
        // Another epoch's records are not replayed.
        assert!(parse_records(&content, 0, 8).0.is_empty());
        // A torn tail loses only the torn record.
        let (torn, torn_end) = parse_records(&content[..content.len() - 2], 0, 7);
        assert_eq!(torn.len(), 2);
        assert_eq!(torn_end, (2 * HEADER + 6) as u64);
        // A flipped byte in the second payload stops there.
        let mut bad = content.clone();
        let second = HEADER + 3 + HEADER;
        bad[second] ^= 1;
        assert_eq!(payloads(&parse_records(&bad, 0, 7).0), vec![&b"one"[..]]);
        // Reading from the middle: offsets stay the file's.
        let (tail, _) = parse_records(&content[HEADER + 3..], (HEADER + 3) as u64, 7);
        assert_eq!(tail, records[1..].to_vec());
    }

    /// A record as written before session 11: BLAKE3 checksum, `OMW1`.
    fn blake3_record(epoch: u64, payload: &[u8]) -> Vec<u8> {
        let mut h = blake3::Hasher::new();
        h.update(&epoch.to_le_bytes());
        h.update(payload);
        let mut out = MAGIC_BLAKE3.to_vec();
        out.extend_from_slice(&epoch.to_le_bytes());
        out.extend_from_slice(&(payload.len() as u32).to_le_bytes());
        out.extend_from_slice(&h.finalize().as_bytes()[..8]);
        out.extend_from_slice(payload);
        out
    }

    #[test]
    fn records_of_the_blake3_format_are_read_before_and_between_new_ones() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("wal");
        let mut wal = Wal::open(&path, 0).expect("open");
        let old = blake3_record(4, b"old");
        wal.reader().file.write_all_at(&old, 0).expect("write");
        wal.set_end(old.len() as u64);
        wal.append(4, b"new").expect("append");
        let at = wal.end();
        let old_again = blake3_record(4, b"old again");
        wal.reader().file.write_all_at(&old_again, at).expect("write");
        wal.set_end(at + old_again.len() as u64);
        wal.append(4, b"last").expect("append");
        let content = wal.read_from(0).expect("read");
        assert_eq!(&content[..4], b"OMW1");
        assert_eq!(&content[old.len()..old.len() + 4], b"OMW2");
        let (records, end) = parse_records(&content, 0, 4);
        assert_eq!(payloads(&records), vec![&b"old"[..], b"new", b"old again", b"last"]);
        assert_eq!(end, content.len() as u64);
        // A record with an old magic but the new checksum (or the reverse)
        // is damage, not a record.
        let mut swapped = content.clone();
        swapped[old.len()..old.len() + 4].copy_from_slice(&MAGIC_BLAKE3);
        assert_eq!(payloads(&parse_records(&swapped, 0, 4).0), vec![&b"old"[..]]);
        let mut unknown = content.clone();
        unknown[old.len()..old.len() + 4].copy_from_slice(b"OMW9");
        assert_eq!(payloads(&parse_records(&unknown, 0, 4).0), vec![&b"old"[..]]);
    }

    #[test]
    fn a_new_epoch_written_over_a_torn_tail_ends_where_it_ends() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("wal");
        let mut wal = Wal::open(&path, 0).expect("open");
        wal.append(1, b"first record").expect("append");
        wal.append(1, b"a second, longer record").expect("append");
        // The second record was torn: the next opening ends after the first.
        let content = wal.read_from(0).expect("read");
        let (_, end) = parse_records(&content[..content.len() - 1], 0, 1);
        wal.set_end(end);
        wal.append(2, b"y").expect("append");
        drop(wal);
        let wal = Wal::open(&path, 0).expect("reopen");
        let content = wal.read_from(end).expect("read");
        // The new epoch's record overwrote the front of the torn one; what
        // is left of that is not replayed.
        assert_eq!(payloads(&parse_records(&content, end, 2).0), vec![&b"y"[..]]);
        assert!(parse_records(&content, end, 1).0.is_empty());
    }

    #[test]
    fn zeros_ahead_of_the_end_read_as_the_end_and_records_land_over_them() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("wal");
        let mut wal = Wal::open(&path, 0).expect("open");
        let payload = vec![7u8; 64 << 10];
        let mut n = 0;
        while wal.end() < ZERO_AFTER + (1 << 20) {
            wal.write(3, &payload).expect("write");
            n += 1;
        }
        wal.reader().sync().expect("sync");
        let end = wal.end();
        // The helper fills in the background: wait (bounded) for it.
        for _ in 0..500 {
            if std::fs::metadata(&path).expect("stat").len() >= end + ZERO_LOW {
                break;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        let len = std::fs::metadata(&path).expect("stat").len();
        assert!(
            len >= end + ZERO_LOW,
            "zeros ahead: file {len} bytes, log ends at {end}"
        );
        drop(wal);
        // Every record is found, and the zeros end the log.
        let mut wal = Wal::open(&path, 0).expect("reopen");
        let content = wal.read_from(0).expect("read");
        let (records, found_end) = parse_records(&content, 0, 3);
        assert_eq!(records.len(), n);
        assert_eq!(found_end, end);
        assert!(content[end as usize..].iter().all(|b| *b == 0));
        // A new epoch written over the zeros reads back, and the zeros
        // after it still end the log.
        wal.set_end(end);
        wal.append(4, b"after the zeros").expect("append");
        drop(wal);
        let wal = Wal::open(&path, 0).expect("reopen");
        let content = wal.read_from(end).expect("read");
        assert_eq!(
            payloads(&parse_records(&content, end, 4).0),
            vec![&b"after the zeros"[..]]
        );
    }

    #[test]
    fn records_that_outrun_the_zeros_are_never_written_over() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("wal");
        let mut wal = Wal::open(&path, 0).expect("open");
        // Records of 3 MiB and a few bytes, alternating, with no pause:
        // the big ones pass the zeros' end while the helper is filling.
        let big: Vec<u8> = (0..3 << 20).map(|i| (i % 251) as u8 + 1).collect();
        let mut sent = Vec::new();
        for i in 0..24u32 {
            let payload = if i % 2 == 0 {
                big.clone()
            } else {
                i.to_le_bytes().to_vec()
            };
            wal.write(5, &payload).expect("write");
            sent.push(payload);
        }
        wal.reader().sync().expect("sync");
        let end = wal.end();
        drop(wal);
        let wal = Wal::open(&path, 0).expect("reopen");
        let content = wal.read_from(0).expect("read");
        let (records, found_end) = parse_records(&content, 0, 5);
        assert_eq!(found_end, end);
        assert_eq!(records.len(), sent.len());
        for (r, p) in records.iter().zip(&sent) {
            assert!(r.payload == p.as_slice(), "record at {} damaged", r.at);
        }
    }
}
