//! The write-ahead log: what makes a group of writes durable between
//! checkpoints.
//!
//! redb's durable commit costs far more than appending the same changes to
//! a file and syncing it (it rewrites and syncs every touched B-tree page).
//! So most groups are committed to redb without durability and their
//! changes, already encoded, are appended here and synced before anyone is
//! answered. Every second (or 64 MiB of log) the writer makes one durable
//! redb commit, a checkpoint, which bumps the log's epoch and empties it.
//!
//! A record is `magic, epoch (u64 LE), length (u32 LE), checksum (8 bytes
//! of BLAKE3 over epoch and payload), payload`; the payload is the group's
//! changes, each length-delimited protobuf. Recovery reads records of the
//! current epoch until the first that is torn or damaged: a record is
//! synced before its writes are acknowledged, so only unacknowledged writes
//! can be lost with a torn tail. Records of older epochs are already in
//! redb and are ignored, which also makes an unsynced truncation harmless.

use std::fs::{File, OpenOptions};
use std::io::Read;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::disk::SiteFile;

const MAGIC: [u8; 4] = *b"OMW1";
const HEADER: usize = 4 + 8 + 4 + 8;
/// Largest record accepted on recovery; a group's changes stay far below.
const MAX_RECORD: usize = 1 << 30;
/// A checkpoint is due after this long...
pub(crate) const CHECKPOINT_EVERY: Duration = Duration::from_secs(1);
/// ...or once the log holds this many bytes.
pub(crate) const CHECKPOINT_BYTES: u64 = 64 << 20;

/// Why the log could not be read or written.
#[derive(Debug, thiserror::Error)]
#[error("write-ahead log {path}: {what}: {source}")]
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

    fn set_len(&self, len: u64) -> std::io::Result<()> {
        match self {
            WalFile::Disk(f) => f.set_len(len),
            WalFile::Other(f) => f.set_len(len),
        }
    }
}

/// The open log file of a site.
#[derive(Debug)]
pub(crate) struct Wal {
    path: PathBuf,
    file: WalFile,
    /// Where the next record goes: records since the last checkpoint end here.
    bytes: u64,
    /// Wall-clock ms (the node's clock) of the last checkpoint.
    last_checkpoint_ms: u64,
}

fn checksum(epoch: u64, payload: &[u8]) -> [u8; 8] {
    let mut h = blake3::Hasher::new();
    h.update(&epoch.to_le_bytes());
    h.update(payload);
    let mut out = [0u8; 8];
    out.copy_from_slice(&h.finalize().as_bytes()[..8]);
    out
}

/// The payloads of the intact records of `epoch`, in order, from `bytes`.
pub(crate) fn parse_records(bytes: &[u8], epoch: u64) -> Vec<&[u8]> {
    let mut out = Vec::new();
    let mut rest = bytes;
    while rest.len() >= HEADER && rest[..4] == MAGIC {
        let rec_epoch = u64::from_le_bytes(rest[4..12].try_into().unwrap_or_default());
        let len = u32::from_le_bytes(rest[12..16].try_into().unwrap_or_default()) as usize;
        if len > MAX_RECORD || rest.len() < HEADER + len {
            break;
        }
        let payload = &rest[HEADER..HEADER + len];
        if rest[16..24] != checksum(rec_epoch, payload) {
            break;
        }
        // A stale record of an earlier epoch: everything from here on is
        // older than the last checkpoint.
        if rec_epoch != epoch {
            break;
        }
        out.push(payload);
        rest = &rest[HEADER + len..];
    }
    out
}

impl Wal {
    /// Opens the log on a site file other than a plain one (an in-memory
    /// disk's, a block store's) and returns it with its content.
    pub fn open_site_file(file: impl SiteFile, place: &str, now_ms: u64) -> Result<(Wal, Vec<u8>), WalError> {
        let content = file.len().and_then(|len| {
            let mut out = vec![0u8; usize::try_from(len).map_err(std::io::Error::other)?];
            file.read_at(0, &mut out).map(|()| out)
        });
        Wal::opened(PathBuf::from(place), WalFile::Other(Box::new(file)), content, now_ms)
    }

    /// The log over `file`, whose content (or why it could not be read) is `content`.
    fn opened(
        path: PathBuf,
        file: WalFile,
        content: std::io::Result<Vec<u8>>,
        now_ms: u64,
    ) -> Result<(Wal, Vec<u8>), WalError> {
        let content = content.map_err(|source| WalError {
            path: path.display().to_string(),
            what: "cannot read",
            source,
        })?;
        let wal = Wal {
            path,
            file,
            bytes: content.len() as u64,
            last_checkpoint_ms: now_ms,
        };
        Ok((wal, content))
    }

    /// Opens (or creates) the log and returns it with its whole content.
    pub fn open(path: &Path, now_ms: u64) -> Result<(Wal, Vec<u8>), WalError> {
        let err = |what| {
            let path = path.display().to_string();
            move |source| WalError { path, what, source }
        };
        let mut file = OpenOptions::new()
            .read(true)
            .write(true)
            .truncate(false)
            .create(true)
            .open(path)
            .map_err(err("cannot open"))?;
        let mut content = Vec::new();
        let read = file.read_to_end(&mut content).map(|_| content);
        Wal::opened(path.to_owned(), WalFile::Disk(file), read, now_ms)
    }

    fn err(&self, what: &'static str) -> impl FnOnce(std::io::Error) -> WalError {
        let path = self.path.display().to_string();
        move |source| WalError { path, what, source }
    }

    /// Whether the next group should be a durable checkpoint instead.
    pub fn checkpoint_due(&self, now_ms: u64) -> bool {
        self.bytes >= CHECKPOINT_BYTES
            || now_ms.saturating_sub(self.last_checkpoint_ms) >= CHECKPOINT_EVERY.as_millis() as u64
            // A clock that went back (a wall clock stepped) also checkpoints.
            || now_ms < self.last_checkpoint_ms
    }

    /// Appends one record and waits until it is on disk.
    pub fn append(&mut self, epoch: u64, payload: &[u8]) -> Result<(), WalError> {
        let mut record = Vec::with_capacity(HEADER + payload.len());
        record.extend_from_slice(&MAGIC);
        record.extend_from_slice(&epoch.to_le_bytes());
        record.extend_from_slice(&(payload.len() as u32).to_le_bytes());
        record.extend_from_slice(&checksum(epoch, payload));
        record.extend_from_slice(payload);
        // Overwriting blocks the file already has keeps the sync to data
        // only; the file's size changes only while it grows past its peak.
        self.file
            .write_all_at(&record, self.bytes)
            .map_err(self.err("cannot append"))?;
        self.file.sync_data().map_err(self.err("cannot sync"))?;
        self.bytes += record.len() as u64;
        Ok(())
    }

    /// After a checkpoint: everything logged is in redb now, so new
    /// records start again at the front, over the old ones (whose older
    /// epoch stops recovery where the new records end).
    pub fn checkpointed(&mut self, now_ms: u64) {
        self.last_checkpoint_ms = now_ms;
        self.bytes = 0;
    }

    /// Shrinks the file when it has grown past `CHECKPOINT_BYTES`.
    pub fn trim(&mut self) -> Result<(), WalError> {
        let len = self.file.len().map_err(self.err("cannot stat"))?;
        if len > CHECKPOINT_BYTES + (1 << 20) && self.bytes == 0 {
            self.file.set_len(0).map_err(self.err("cannot truncate"))?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_round_trip_and_stop_at_damage() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("wal");
        let (mut wal, content) = Wal::open(&path, 0).expect("open");
        assert!(content.is_empty());
        wal.append(7, b"one").expect("append");
        wal.append(7, b"two").expect("append");
        wal.append(7, b"three").expect("append");
        drop(wal);
        let (_, content) = Wal::open(&path, 0).expect("reopen");
        assert_eq!(parse_records(&content, 7), vec![&b"one"[..], b"two", b"three"]);
        // Another epoch's records are not replayed.
        assert!(parse_records(&content, 8).is_empty());
        // A torn tail loses only the torn record.
        assert_eq!(parse_records(&content[..content.len() - 2], 7).len(), 2);
        // A flipped byte in the second payload stops there.
        let mut bad = content.clone();
        let second = HEADER + 3 + HEADER;
        bad[second] ^= 1;
        assert_eq!(parse_records(&bad, 7), vec![&b"one"[..]]);
    }

    #[test]
    fn a_checkpoint_restarts_the_log() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("wal");
        let (mut wal, _) = Wal::open(&path, 0).expect("open");
        wal.append(1, b"first record").expect("append");
        wal.append(1, b"second record").expect("append");
        wal.checkpointed(0);
        wal.append(2, b"y").expect("append");
        drop(wal);
        let (_, content) = Wal::open(&path, 0).expect("reopen");
        // The new epoch's record overwrote the front; the stale rest is not replayed.
        assert_eq!(parse_records(&content, 2), vec![&b"y"[..]]);
        assert!(parse_records(&content, 1).is_empty());
    }
}
