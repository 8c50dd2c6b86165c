//! ocmesh-node: one site of ocmesh.
//!
//! A node keeps documents with their full version history in an embedded
//! redb file, signs users in, and records every write in a durable change
//! log that federation replicates.
//!
//! Invariants:
//! - Every write (local, or a peer's change) goes through one writer thread
//!   and appends its change record in the same redb transaction as the data
//!   it changes; a write is acknowledged only after that commit is durable.
//!   Concurrent writers share commits (group commit).
//! - This site's changes are numbered 1, 2, 3, ... without gaps, stamped by
//!   a hybrid logical clock that never goes backwards across restarts.
//! - A document's versions are ordered by (HLC, origin); the greatest is the
//!   current one, `_version` is a version's position in that order, and a
//!   delete is a version too, so history is never lost.

pub mod acl;
mod authz;
pub mod blockfile;
mod body_scan;
pub mod disk;
mod edit;
mod error;
pub mod files;
pub mod fills;
pub mod ids;
mod index;
mod json_out;
pub mod messaging;
#[cfg(feature = "mongodb")]
pub mod mongo;
pub mod options;
mod publisher;
pub mod query;
mod store;
mod users;
mod wal;
pub mod workitems;
mod writer;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::AtomicU64;

use redb::{Database, ReadTransaction, ReadableDatabase, ReadableTable};
use serde_json::{Map, Value};
use tokio::sync::{mpsc, oneshot, watch};

use ocmesh_replication::{Change, Clock, FetchRequest, RangeRequest, RangeSet, Timestamp, VersionVector};

pub use disk::{MemDisk, Storage};
pub use error::{ApplyError, AuthError, OpenError, ReadError, StorageError, WriteError};
pub use options::{ManualClock, OpenOptions, SystemClock, WallClock};
pub use workitems::{QueueSettings, WorkItemError};
pub use writer::ApplyReport;

/// Collections the node itself keeps (users and roles, work-item queues
/// and items, files, and OpenCore's names for file storage):
/// `drop_collection` refuses them.
pub const SYSTEM_COLLECTIONS: &[&str] = &[
    "users",
    workitems::QUEUES,
    workitems::ITEMS,
    files::FILES,
    "fs.chunks",
    "files",
];

/// The principal of the node's own housekeeping writes (lease expiry).
pub(crate) fn system_principal() -> Principal {
    Principal {
        id: "000000000000000000000000".into(),
        name: "ocmesh".into(),
        roles: vec![acl::ADMINS_ROLE_ID.into()],
    }
}

use store::{
    CHANGES, CREDENTIALS, Changes, DOCUMENTS, INDEX, INDEX_DEFS, META_HLC, META_SITE, META_TOKEN_SECRET,
    META_WAL_EPOCH, META_WAL_FROM, ORIGIN_MAX, VERSIONS, VV,
};
use users::{Credential, VerifiedCache};
use writer::{Request, WriteDone, WriteOp, Writer};

/// Most writes waiting for the writer thread before callers wait for room.
pub const WRITE_QUEUE_BOUND: usize = 4096;
/// How far ahead of our clock a peer's timestamp may pull it.
pub const MAX_CLOCK_DRIFT_MS: u64 = 60_000;

/// Who makes a request: a user id, its name, and the ids of the roles it
/// holds (nested roles resolved; `users` always; `admins` bypasses ACLs).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Principal {
    pub id: String,
    pub name: String,
    pub roles: Vec<String>,
}

/// redb's page cache. Its default (1 GiB) let a site's resident memory grow
/// with the store during a catch-up; pages beyond this come from the OS's
/// file cache, which the kernel can reclaim.
const STORE_CACHE_BYTES: usize = 64 << 20;

/// How to open a node.
#[derive(Debug, Clone)]
pub struct NodeConfig {
    pub data_dir: PathBuf,
    pub site: String,
    /// Password for the `admin` user created on first start; `None`
    /// generates one (returned by `Node::open`).
    pub admin_password: Option<String>,
}

/// Counters a node keeps (read with `Node::stats`).
#[derive(Debug, Default)]
pub struct NodeStats {
    pub commits: AtomicU64,
    pub writes: AtomicU64,
    pub remote_applied: AtomicU64,
    pub remote_duplicates: AtomicU64,
    pub clock_clamped: AtomicU64,
    /// Peers' changes refused because their author lacked the right.
    pub remote_refused: AtomicU64,
    /// Withheld stubs received from peers, and stubs later replaced by
    /// their change (refills).
    pub remote_withheld: AtomicU64,
    pub remote_filled: AtomicU64,
    /// Requests waiting for the writer when it last took a group.
    pub writer_queue: AtomicU64,
    /// Time the writer spent carrying out writes, and in redb's commit.
    pub apply_nanos: AtomicU64,
    pub commit_nanos: AtomicU64,
    /// Durable redb commits (each empties the write-ahead log).
    pub checkpoints: AtomicU64,
    /// Bytes appended to the write-ahead log, and time spent syncing them.
    pub wal_bytes: AtomicU64,
    pub wal_nanos: AtomicU64,
    /// Syncs of the log (one may cover several groups).
    pub wal_syncs: AtomicU64,
    /// Groups committed and waiting for the publisher when it last took them.
    pub publish_queue: AtomicU64,
    /// Changes replayed from the write-ahead log when the node opened.
    pub wal_replayed: AtomicU64,
    /// Where an acknowledged write's time goes, summed over `answered`
    /// writes: from its queueing until its group's log record was written
    /// (waiting for the writer, then for its group to run), until that
    /// record was synced (the sync in flight, then its own), and until its
    /// caller was answered.
    pub answered: AtomicU64,
    pub until_logged_nanos: AtomicU64,
    pub until_synced_nanos: AtomicU64,
    pub until_answered_nanos: AtomicU64,
    /// Round trips of `Node`'s writes as their callers saw them (the above
    /// and the wake-up of the caller; empty pops and refused writes
    /// included).
    pub round_trips: AtomicU64,
    pub round_trip_nanos: AtomicU64,
}

/// A running site. Cheap to clone.
#[derive(Debug, Clone)]
pub struct Node {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    site: String,
    writes: mpsc::Sender<Request>,
    /// Wakes the writer when it waits for more writes (`writer::Doorbell`).
    bell: Arc<writer::Doorbell>,
    vv: watch::Receiver<VersionVector>,
    token_secret: Vec<u8>,
    verified: VerifiedCache,
    sign_in_guard: users::SignInGuard,
    wall: Arc<dyn WallClock>,
    stats: Arc<NodeStats>,
    signals: Arc<workitems::QueueSignals>,
    fills: Arc<fills::FillNotices>,
    /// The log the `changes` table points into.
    log: wal::LogReader,
    /// What readers read (see `publisher`).
    snapshot: Arc<publisher::Snapshot>,
}

/// What `Node::open` reports besides the node.
#[derive(Debug)]
pub struct Opened {
    pub node: Node,
    /// Set when this start created the admin user with a generated password.
    pub generated_admin_password: Option<String>,
}

/// A document the writer answered with, as the caller's own value. The
/// copy, when the writer's cache still shares it, is made here, on the
/// caller's thread.
fn owned(doc: store::SharedDoc) -> Value {
    Value::Object(Arc::unwrap_or_clone(doc))
}

fn is_valid_site(site: &str) -> bool {
    !site.is_empty()
        && site.len() <= 63
        && site
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !site.starts_with('-')
        && !site.ends_with('-')
}

impl Node {
    /// Opens (or creates) the site's store in `config.data_dir` and starts
    /// its writer thread. Must be called inside a tokio runtime's context
    /// only for the async methods; opening itself is synchronous.
    pub fn open(config: NodeConfig) -> Result<Opened, OpenError> {
        Node::open_with(config, OpenOptions::default())
    }

    /// `open`, with the storage, clock, id source and background threads
    /// of `options` (a simulator's, or a crash test's `MemDisk`).
    pub fn open_with(config: NodeConfig, options: OpenOptions) -> Result<Opened, OpenError> {
        if !is_valid_site(&config.site) {
            return Err(OpenError::BadSiteName(config.site));
        }
        let storage_err = |e: &dyn std::fmt::Display| OpenError::Storage(StorageError(e.to_string()));
        let now_ms = options.clock.now_ms();
        let (db, mut wal) = match &options.storage {
            Storage::Directory => {
                std::fs::create_dir_all(&config.data_dir).map_err(|source| OpenError::DataDir {
                    path: config.data_dir.display().to_string(),
                    source,
                })?;
                let path = config.data_dir.join("ocmesh.redb");
                let db = Database::builder()
                    .set_cache_size(STORE_CACHE_BYTES)
                    .create(&path)
                    .map_err(|source| OpenError::Database {
                        path: path.display().to_string(),
                        source,
                    })?;
                let wal_path = config.data_dir.join("ocmesh.wal");
                (db, wal::Wal::open(&wal_path, now_ms).map_err(|e| storage_err(&e))?)
            }
            Storage::Memory(disk) => {
                let backend = disk::Backend(disk.handle(disk::FileId::Database));
                let db = Database::builder()
                    .create_with_backend(backend)
                    .map_err(|source| OpenError::Database {
                        path: "<memory>".into(),
                        source,
                    })?;
                let wal_file = disk.handle(disk::FileId::Wal);
                (db, wal::Wal::open_site_file(wal_file, "<memory>", now_ms))
            }
            Storage::Blocks(store) => {
                let open = |file| blockfile::BlockFile::open(store.clone(), file).map_err(|e| storage_err(&e));
                let db = Database::builder()
                    .set_cache_size(STORE_CACHE_BYTES)
                    .create_with_backend(disk::Backend(open(disk::FileId::Database)?))
                    .map_err(|source| OpenError::Database {
                        path: format!("{store:?}"),
                        source,
                    })?;
                let wal_file = open(disk::FileId::Wal)?;
                (db, wal::Wal::open_site_file(wal_file, "<block store>", now_ms))
            }
        };
        let db = Arc::new(db);
        let mut ids = ids::IdGen::new(options.id_seed);
        let init = init_store(&db, &config, &mut wal, &options, &mut ids)?;
        wal.checkpointed(now_ms);
        let log = wal.reader();
        if init.replayed > 0 {
            tracing::info!(changes = init.replayed, "replayed the write-ahead log");
        }
        let (last_hlc, vv, token_secret, generated) = (init.last_hlc, init.vv, init.token_secret, init.generated);

        let stats = Arc::new(NodeStats::default());
        stats
            .wal_replayed
            .store(init.replayed, std::sync::atomic::Ordering::Relaxed);
        let (vv_tx, vv_rx) = watch::channel(vv.clone());
        let (tx, rx) = mpsc::channel(WRITE_QUEUE_BOUND);
        let signals = Arc::new(workitems::QueueSignals::default());
        let fills = Arc::new(fills::FillNotices::default());
        let failure = Arc::new(publisher::Failure::default());
        let bell = Arc::new(writer::Doorbell::default());
        let snapshot = Arc::new(publisher::Snapshot::new(
            db.begin_read().map_err(|e| storage_err(&e))?,
            failure.clone(),
            bell.clone(),
        ));
        let (publish_tx, publish_rx) = std::sync::mpsc::sync_channel(publisher::PUBLISH_QUEUE_BOUND);
        let publisher = publisher::Publisher {
            log: wal.reader(),
            snapshot: snapshot.clone(),
            published: vv_tx,
            signals: signals.clone(),
            fills: fills.clone(),
            stats: stats.clone(),
            failure: failure.clone(),
        };
        let publisher = std::thread::Builder::new()
            .name("ocmesh-publisher".into())
            .spawn(move || publisher.run(publish_rx))
            .map_err(|e| OpenError::Storage(StorageError(format!("cannot start publisher thread: {e}"))))?;
        let writer = Writer {
            db: db.clone(),
            site: config.site.clone(),
            clock: Clock::resume(last_hlc, MAX_CLOCK_DRIFT_MS),
            vv,
            stats: stats.clone(),
            wal,
            wal_epoch: init.wal_epoch,
            failure,
            publish: publish_tx,
            txn_no: 0,
            publisher: Some(publisher),
            wall: options.clock.clone(),
            ids,
            docs: Default::default(),
            lookups: Default::default(),
            log_buf: Vec::new(),
            bell: bell.clone(),
            last_body_len: 0,
        };
        let lease_tick = tx.downgrade();
        let writer_thread = std::thread::Builder::new()
            .name("ocmesh-writer".into())
            .spawn(move || writer.run(rx))
            .map_err(|e| OpenError::Storage(StorageError(format!("cannot start writer thread: {e}"))))?;
        bell.set_writer(writer_thread.thread().clone());
        // Returns expired work-item leases to their queues, once a second,
        // for as long as the node is open.
        if options.lease_thread {
            let lease_bell = bell.clone();
            std::thread::Builder::new()
                .name("ocmesh-leases".into())
                .spawn(move || {
                    loop {
                        std::thread::sleep(std::time::Duration::from_secs(1));
                        let Some(tx) = lease_tick.upgrade() else { return };
                        let (reply, _) = oneshot::channel();
                        // A full queue means the writer is busy: try next tick.
                        if tx
                            .try_send(Request {
                                op: WriteOp::ExpireLeases,
                                reply,
                                queued_ns: publisher::mono_ns(),
                            })
                            .is_ok()
                        {
                            lease_bell.ring();
                        }
                    }
                })
                .map_err(|e| OpenError::Storage(StorageError(format!("cannot start lease thread: {e}"))))?;
        }
        let node = Node {
            inner: Arc::new(Inner {
                site: config.site,
                writes: tx,
                bell,
                vv: vv_rx,
                token_secret,
                verified: VerifiedCache::new(),
                sign_in_guard: users::SignInGuard::default(),
                wall: options.clock.clone(),
                stats,
                signals,
                fills,
                log,
                snapshot,
            }),
        };
        Ok(Opened {
            node,
            generated_admin_password: generated,
        })
    }

    /// This site's name.
    pub fn site(&self) -> &str {
        &self.inner.site
    }

    /// A per-site secret for signing sign-in tokens, made on first start.
    pub fn token_secret(&self) -> &[u8] {
        &self.inner.token_secret
    }

    pub fn stats(&self) -> &NodeStats {
        &self.inner.stats
    }

    /// The node's counters and queue depths as one JSON object.
    pub fn metrics(&self) -> Value {
        use std::sync::atomic::Ordering::Relaxed;
        let s = &self.inner.stats;
        serde_json::json!({
            "site": self.site(),
            "commits": s.commits.load(Relaxed),
            "writes": s.writes.load(Relaxed),
            "writer_queue": s.writer_queue.load(Relaxed),
            "writer_queue_bound": WRITE_QUEUE_BOUND,
            "writer_queue_now": WRITE_QUEUE_BOUND - self.inner.writes.capacity(),
            "writer_apply_ms": s.apply_nanos.load(Relaxed) / 1_000_000,
            "writer_commit_ms": s.commit_nanos.load(Relaxed) / 1_000_000,
            "checkpoints": s.checkpoints.load(Relaxed),
            "wal_bytes": s.wal_bytes.load(Relaxed),
            "wal_ms": s.wal_nanos.load(Relaxed) / 1_000_000,
            "wal_syncs": s.wal_syncs.load(Relaxed),
            "publish_queue": s.publish_queue.load(Relaxed),
            "publish_queue_bound": publisher::PUBLISH_QUEUE_BOUND,
            "wal_replayed": s.wal_replayed.load(Relaxed),
            "answered_writes": s.answered.load(Relaxed),
            "until_logged_ms": s.until_logged_nanos.load(Relaxed) / 1_000_000,
            "until_synced_ms": s.until_synced_nanos.load(Relaxed) / 1_000_000,
            "until_answered_ms": s.until_answered_nanos.load(Relaxed) / 1_000_000,
            "round_trips": s.round_trips.load(Relaxed),
            "round_trip_ms": s.round_trip_nanos.load(Relaxed) / 1_000_000,
            "remote_applied": s.remote_applied.load(Relaxed),
            "remote_duplicates": s.remote_duplicates.load(Relaxed),
            "clock_clamped": s.clock_clamped.load(Relaxed),
            "remote_refused": s.remote_refused.load(Relaxed),
            "remote_withheld": s.remote_withheld.load(Relaxed),
            "remote_filled": s.remote_filled.load(Relaxed),
            "changes_withheld_here": self.withheld_count().unwrap_or(0),
            "changes_held": self.version_vector().total(),
        })
    }

    /// What this site holds, per origin.
    pub fn version_vector(&self) -> VersionVector {
        self.inner.vv.borrow().clone()
    }

    /// Follows the version vector as writes commit.
    pub fn subscribe(&self) -> watch::Receiver<VersionVector> {
        self.inner.vv.clone()
    }

    /// Changes when peers' changes replace withheld stubs (refills), which
    /// land below the version vector `subscribe` follows.
    pub fn subscribe_fills(&self) -> watch::Receiver<u64> {
        self.inner.fills.subscribe()
    }

    /// The refilled changes (origin and sequence ranges) after generation
    /// `seen` of `subscribe_fills`; read them with `read_change_ranges`.
    pub fn fills_since(&self, seen: u64) -> fills::FillsSince {
        self.inner.fills.since(seen)
    }

    async fn write(&self, op: WriteOp) -> Result<WriteDone, WriteError> {
        let (reply, rx) = oneshot::channel();
        let queued_ns = publisher::mono_ns();
        self.inner
            .writes
            .send(Request { op, reply, queued_ns })
            .await
            .map_err(|_| WriteError::Closed)?;
        self.inner.bell.ring();
        let answer = rx.await.map_err(|_| WriteError::Closed)?;
        use std::sync::atomic::Ordering::Relaxed;
        let stats = &self.inner.stats;
        stats.round_trips.fetch_add(1, Relaxed);
        stats
            .round_trip_nanos
            .fetch_add(publisher::mono_ns().saturating_sub(queued_ns), Relaxed);
        answer
    }

    async fn write_document(&self, op: WriteOp) -> Result<Value, WriteError> {
        match self.write(op).await? {
            WriteDone::Document(v) => Ok(owned(v)),
            _ => Err(WriteError::Closed),
        }
    }

    /// Inserts a document; returns it as stored, with `_version` 0 (or
    /// higher if the id had a history).
    pub async fn insert(&self, collection: &str, doc: Map<String, Value>, by: &Principal) -> Result<Value, WriteError> {
        self.write_document(WriteOp::Insert {
            collection: collection.into(),
            doc,
            by: by.clone(),
        })
        .await
    }

    /// Replaces a document whole, keeping its creation fields.
    pub async fn replace(
        &self,
        collection: &str,
        id: &str,
        doc: Map<String, Value>,
        by: &Principal,
    ) -> Result<Value, WriteError> {
        self.write_document(WriteOp::Replace {
            collection: collection.into(),
            id: id.into(),
            doc,
            by: by.clone(),
        })
        .await
    }

    /// Deletes a document; returns the delete version.
    pub async fn delete(&self, collection: &str, id: &str, by: &Principal) -> Result<Value, WriteError> {
        self.write_document(WriteOp::Delete {
            collection: collection.into(),
            id: id.into(),
            by: by.clone(),
        })
        .await
    }

    async fn write_documents(&self, op: WriteOp) -> Result<Vec<Value>, WriteError> {
        match self.write(op).await? {
            WriteDone::Documents(d) => Ok(d.into_iter().map(owned).collect()),
            _ => Err(WriteError::Closed),
        }
    }

    /// Applies update operators (`$set $unset $inc $push $pull`) to one document.
    pub async fn update(&self, collection: &str, id: &str, update: Value, by: &Principal) -> Result<Value, WriteError> {
        self.write_document(WriteOp::UpdateOne {
            collection: collection.into(),
            id: id.into(),
            update,
            by: by.clone(),
        })
        .await
    }

    /// Applies update operators to every matching document; returns the new versions.
    pub async fn update_many(
        &self,
        collection: &str,
        filter: query::Filter,
        update: Value,
        by: &Principal,
    ) -> Result<Vec<Value>, WriteError> {
        self.write_documents(WriteOp::UpdateMany {
            collection: collection.into(),
            filter,
            update,
            by: by.clone(),
        })
        .await
    }

    /// Inserts all the documents or none.
    pub async fn insert_many(
        &self,
        collection: &str,
        docs: Vec<Map<String, Value>>,
        by: &Principal,
    ) -> Result<Vec<Value>, WriteError> {
        self.write_documents(WriteOp::InsertMany {
            collection: collection.into(),
            docs,
            by: by.clone(),
        })
        .await
    }

    /// Replaces the document whose `uniqueness` fields match, or inserts it.
    pub async fn insert_or_update(
        &self,
        collection: &str,
        doc: Map<String, Value>,
        uniqueness: Vec<String>,
        by: &Principal,
    ) -> Result<Value, WriteError> {
        self.write_document(WriteOp::InsertOrUpdate {
            collection: collection.into(),
            doc,
            uniqueness,
            by: by.clone(),
        })
        .await
    }

    /// Deletes every matching document; returns the delete versions.
    pub async fn delete_many(
        &self,
        collection: &str,
        filter: query::Filter,
        by: &Principal,
    ) -> Result<Vec<Value>, WriteError> {
        self.write_documents(WriteOp::DeleteMany {
            collection: collection.into(),
            filter,
            by: by.clone(),
        })
        .await
    }

    /// Drops a collection: deletes every current document of it through
    /// the normal delete path, in one write, so each gets a delete version
    /// that history and replication carry (and `collection_names` no
    /// longer lists it). Admins only, as in OpenCore; the node's own
    /// collections (`SYSTEM_COLLECTIONS`) are refused. Returns the delete
    /// versions.
    pub async fn drop_collection(&self, collection: &str, by: &Principal) -> Result<Vec<Value>, WriteError> {
        ids::validate_collection(collection)?;
        if !by.is_admin() || SYSTEM_COLLECTIONS.contains(&collection) {
            return Err(WriteError::Forbidden {
                right: "drop",
                collection: collection.into(),
                id: "*".into(),
            });
        }
        self.delete_many(collection, query::Filter::all(), by).await
    }

    /// Brings a deleted document back (a new version; history intact).
    pub async fn recover(&self, collection: &str, id: &str, by: &Principal) -> Result<Value, WriteError> {
        self.write_document(WriteOp::Recover {
            collection: collection.into(),
            id: id.into(),
            by: by.clone(),
        })
        .await
    }

    pub(crate) async fn put_chunk(&self, hash: [u8; 32], data: Vec<u8>) -> Result<(), WriteError> {
        self.write(WriteOp::PutChunk { hash, data }).await.map(|_| ())
    }

    pub(crate) async fn create_file(&self, doc: Map<String, Value>, by: &Principal) -> Result<Value, WriteError> {
        self.write_document(WriteOp::CreateFile { doc, by: by.clone() }).await
    }

    /// Starts a streaming upload of at most `limit` bytes.
    pub fn upload(&self, limit: u64) -> files::Upload {
        files::Upload::new(self.clone(), limit)
    }

    /// A file's metadata document.
    pub fn file(&self, id: &str) -> Result<Value, ReadError> {
        self.get(files::FILES, id)
    }

    /// One chunk of file content by its hash.
    pub fn read_chunk(&self, hash: &[u8; 32]) -> Result<Option<Vec<u8>>, ReadError> {
        let txn = self.read()?;
        let Some(table) = open_existing(&txn, store::CHUNKS)? else {
            return Ok(None);
        };
        Ok(table.get(hash.as_slice())?.map(|g| g.value().to_vec()))
    }

    /// The current file documents (`fs.files`) that list chunk `hash`
    /// (at most 16): what decides whether a peer may be sent the chunk.
    /// Uses an index on `chunks` when there is one, else reads every file
    /// document.
    pub fn files_with_chunk(&self, hash: &[u8; 32]) -> Result<Vec<Map<String, Value>>, ReadError> {
        let filter = query::Filter::parse(&serde_json::json!({"chunks": hex::encode(hash)}))
            .map_err(|e| ReadError::Storage(StorageError(e.to_string())))?;
        self.with_documents(files::FILES, &filter, |docs| {
            docs.filter(|d| filter.matches(d))
                .filter_map(|d| match d {
                    Value::Object(m) => Some(m),
                    _ => None,
                })
                .take(16)
                .collect()
        })
    }

    /// Up to `limit` chunks that files replicated here name but this site
    /// does not hold yet, to ask peers for.
    pub fn wanted_chunks(&self, limit: usize) -> Result<Vec<[u8; 32]>, ReadError> {
        let txn = self.read()?;
        let Some(table) = open_existing(&txn, store::CHUNKS_WANTED)? else {
            return Ok(Vec::new());
        };
        let mut out = Vec::new();
        for entry in table.iter()?.take(limit) {
            let (k, _) = entry?;
            if let Ok(hash) = k.value().try_into() {
                out.push(hash);
            }
        }
        Ok(out)
    }

    /// Which of `hashes` this site does not hold.
    pub fn missing_chunks(&self, hashes: &[[u8; 32]]) -> Result<Vec<[u8; 32]>, ReadError> {
        let txn = self.read()?;
        let Some(table) = open_existing(&txn, store::CHUNKS)? else {
            return Ok(hashes.to_vec());
        };
        let mut out = Vec::new();
        for h in hashes {
            if table.get(h.as_slice())?.is_none() {
                out.push(*h);
            }
        }
        Ok(out)
    }

    /// Stores a chunk a peer sent, after checking its content matches its
    /// BLAKE3 hash.
    pub async fn receive_chunk(&self, hash: [u8; 32], data: Vec<u8>) -> Result<(), WriteError> {
        if *blake3::hash(&data).as_bytes() != hash {
            return Err(files::FileError::ChunkMismatch(hex::encode(hash)).into());
        }
        self.put_chunk(hash, data).await
    }

    /// Deletes a file unless a work item still lists it.
    pub async fn delete_file(&self, id: &str, by: &Principal) -> Result<Value, WriteError> {
        self.write_document(WriteOp::DeleteFile {
            id: id.into(),
            by: by.clone(),
        })
        .await
    }

    /// Defines a work-item queue (a document in `mq`).
    pub async fn add_queue(&self, doc: Map<String, Value>, by: &Principal) -> Result<Value, WriteError> {
        self.write_document(WriteOp::AddQueue { doc, by: by.clone() }).await
    }

    /// Replaces a queue's definition.
    pub async fn update_queue(&self, name: &str, doc: Map<String, Value>, by: &Principal) -> Result<Value, WriteError> {
        self.write_document(WriteOp::UpdateQueue {
            name: name.into(),
            doc,
            by: by.clone(),
        })
        .await
    }

    pub async fn delete_queue(&self, name: &str, by: &Principal) -> Result<Value, WriteError> {
        self.write_document(WriteOp::DeleteQueue {
            name: name.into(),
            by: by.clone(),
        })
        .await
    }

    /// Deletes every item of a queue, and the queue itself when
    /// `delete_queue`, in one write; returns the deleted items' last
    /// versions. Needs the delete right on the queue and on each item.
    pub async fn purge_queue(&self, name: &str, delete_queue: bool, by: &Principal) -> Result<Vec<Value>, WriteError> {
        self.write_documents(WriteOp::PurgeQueue {
            name: name.into(),
            delete_queue,
            by: by.clone(),
        })
        .await
    }

    /// Pushes items onto a queue: all or none.
    pub async fn push_workitems(
        &self,
        queue: &str,
        items: Vec<Map<String, Value>>,
        by: &Principal,
    ) -> Result<Vec<Value>, WriteError> {
        self.write_documents(WriteOp::PushItems {
            queue: queue.into(),
            items,
            by: by.clone(),
        })
        .await
    }

    /// Pops the most urgent due item; with `wait`, returns as soon as one
    /// becomes available within that time.
    pub async fn pop_workitem(
        &self,
        queue: &str,
        by: &Principal,
        wait: Option<std::time::Duration>,
    ) -> Result<Option<Value>, WriteError> {
        let deadline = wait.map(|w| tokio::time::Instant::now() + w);
        let mut signal = None;
        loop {
            // Registered before the attempt, so an item readied between the
            // attempt and the wait still wakes us.
            let notified = signal.as_ref().map(|s: &Arc<tokio::sync::Notify>| {
                let mut n = Box::pin(s.clone().notified_owned());
                n.as_mut().enable();
                n
            });
            match self
                .write(WriteOp::PopItem {
                    queue: queue.into(),
                    by: by.clone(),
                })
                .await?
            {
                WriteDone::Document(d) => return Ok(Some(owned(d))),
                WriteDone::Nothing => {}
                _ => return Err(WriteError::Closed),
            }
            let Some(deadline) = deadline else { return Ok(None) };
            if tokio::time::Instant::now() >= deadline {
                return Ok(None);
            }
            // Wake when an item is readied on this queue, or every 200 ms
            // for items whose nextrun arrives.
            let tick = (tokio::time::Instant::now() + std::time::Duration::from_millis(200)).min(deadline);
            match notified {
                Some(n) => {
                    let _ = tokio::time::timeout_at(tick, n).await;
                }
                // First miss: the queue exists; watch it from now on.
                None => signal = Some(self.inner.signals.of(queue)),
            }
        }
    }

    /// Ends an item's processing: `successful`, `failed` or `retry`, with
    /// `errortype` business or application.
    pub async fn update_workitem(
        &self,
        id: &str,
        state: &str,
        errortype: Option<&str>,
        errormessage: Option<String>,
        payload: Option<Map<String, Value>>,
        by: &Principal,
    ) -> Result<Value, WriteError> {
        self.write_document(WriteOp::FinishItem {
            id: id.into(),
            state: state.into(),
            errortype: errortype.map(str::to_owned),
            errormessage,
            payload,
            by: by.clone(),
        })
        .await
    }

    /// Forces an item whose owner is out of reach over to this site, under
    /// a new ownership epoch (see `ocmesh_replication::ownership`).
    pub async fn takeover_workitem(&self, id: &str, by: &Principal) -> Result<Value, WriteError> {
        self.write_document(WriteOp::TakeoverItem {
            id: id.into(),
            by: by.clone(),
        })
        .await
    }

    pub async fn delete_workitem(&self, id: &str, by: &Principal) -> Result<Value, WriteError> {
        self.write_document(WriteOp::DeleteItem {
            id: id.into(),
            by: by.clone(),
        })
        .await
    }

    /// A queue's definition by name, if the caller may read it.
    pub fn queue_as(&self, name: &str, who: &Principal) -> Result<Value, ReadError> {
        let doc = self.queue(name)?;
        if acl::allowed(&doc, who, acl::READ) {
            Ok(doc)
        } else {
            Err(ReadError::NotFound {
                collection: workitems::QUEUES.into(),
                id: name.into(),
            })
        }
    }

    /// A queue's definition by name.
    pub fn queue(&self, name: &str) -> Result<Value, ReadError> {
        let filter = query::Filter::parse(&serde_json::json!({"_type": workitems::QUEUE_TYPE, "name": name}))
            .map_err(|e| ReadError::Storage(StorageError(e.to_string())))?;
        let q = query::Query {
            filter,
            top: 1,
            ..query::Query::default()
        };
        self.query(workitems::QUEUES, &q)?
            .into_iter()
            .next()
            .ok_or_else(|| ReadError::NotFound {
                collection: workitems::QUEUES.into(),
                id: name.into(),
            })
    }

    /// Returns work items whose processing lease ran out (by the node's
    /// clock) to their queues now; the lease thread does this once a
    /// second unless `OpenOptions::lease_thread` is off.
    pub async fn expire_leases(&self) -> Result<(), WriteError> {
        self.write(WriteOp::ExpireLeases).await.map(|_| ())
    }

    /// Applies a peer's changes durably (skipping those already held).
    pub async fn apply(&self, changes: Vec<Change>) -> Result<ApplyReport, WriteError> {
        let changes = changes.into_iter().map(writer::Incoming::new).collect();
        match self.write(WriteOp::Apply { changes }).await? {
            WriteDone::Applied(r) => Ok(r),
            _ => Err(WriteError::Closed),
        }
    }

    /// redb as of the newest group whose log record is durable.
    fn read(&self) -> Result<Arc<ReadTransaction>, ReadError> {
        Ok(self.inner.snapshot.current())
    }

    /// The change log as of `txn`.
    fn log_view(&self, txn: &ReadTransaction) -> Result<store::ReadLogView, ReadError> {
        Ok(store::LogView {
            table: txn.open_table(CHANGES)?,
            log: self.inner.log.clone(),
        })
    }

    /// The current document, or `NotFound` (also when deleted).
    pub fn get(&self, collection: &str, id: &str) -> Result<Value, ReadError> {
        ids::validate_collection(collection)?;
        ids::validate_id(id)?;
        let txn = self.read()?;
        let not_found = || ReadError::NotFound {
            collection: collection.into(),
            id: id.into(),
        };
        let Some(table) = open_existing(&txn, DOCUMENTS)? else {
            return Err(not_found());
        };
        let Some(bytes) = table.get((collection, id))? else {
            return Err(not_found());
        };
        let changes = self.log_view(&txn)?;
        Ok(Value::Object(store::read_stored_doc(
            collection,
            id,
            bytes.value(),
            &changes,
        )?))
    }

    /// How a read of `collection` with `filter` finds its candidates: an
    /// index on a field the filter pins to values, or a full scan.
    pub fn plan(&self, collection: &str, filter: &query::Filter) -> Result<Plan, ReadError> {
        ids::validate_collection(collection)?;
        let txn = self.read()?;
        plan(&txn, collection, filter)
    }

    /// Streams the candidate documents for `filter` (id order, one
    /// snapshot) into `f`; `f` still applies the filter. A stored document
    /// that does not parse ends the stream and fails the read.
    fn with_documents<T>(
        &self,
        collection: &str,
        filter: &query::Filter,
        f: impl FnOnce(&mut dyn Iterator<Item = Value>) -> T,
    ) -> Result<T, ReadError> {
        ids::validate_collection(collection)?;
        let txn = self.read()?;
        let Some(table) = open_existing(&txn, DOCUMENTS)? else {
            return Ok(f(&mut std::iter::empty()));
        };
        let changes = self.log_view(&txn)?;
        let parse = |id: &str, bytes: &[u8]| store::read_stored_doc(collection, id, bytes, &changes).map(Value::Object);
        let mut failure = None;
        let out = match plan(&txn, collection, filter)? {
            Plan::FullScan => {
                let range = table.range((collection, "")..=(collection, ORIGIN_MAX))?;
                let mut docs = range.map_while(|entry| {
                    let parsed = entry
                        .map_err(|e| StorageError(e.to_string()))
                        .and_then(|(k, v)| parse(k.value().1, v.value()));
                    parsed.map_err(|e| failure = Some(e)).ok()
                });
                f(&mut docs)
            }
            Plan::Index { ids, .. } => {
                let mut docs = ids.iter().filter_map(|id| match table.get((collection, id.as_str())) {
                    Ok(Some(v)) => parse(id, v.value()).map_err(|e| failure = Some(e)).ok(),
                    Ok(None) => None,
                    Err(e) => {
                        failure = Some(StorageError(e.to_string()));
                        None
                    }
                });
                f(&mut docs)
            }
        };
        match failure {
            Some(e) => Err(ReadError::Storage(e)),
            None => Ok(out),
        }
    }

    /// Indexes `field` of `collection` (existing documents included).
    pub async fn create_index(&self, collection: &str, field: &str) -> Result<(), WriteError> {
        match self
            .write(WriteOp::CreateIndex {
                collection: collection.into(),
                field: field.into(),
            })
            .await?
        {
            WriteDone::Nothing => Ok(()),
            _ => Err(WriteError::Closed),
        }
    }

    /// Drops the index on `field`; `_type` cannot be dropped.
    pub async fn drop_index(&self, collection: &str, field: &str) -> Result<(), WriteError> {
        match self
            .write(WriteOp::DropIndex {
                collection: collection.into(),
                field: field.into(),
            })
            .await?
        {
            WriteDone::Nothing => Ok(()),
            _ => Err(WriteError::Closed),
        }
    }

    /// Indexed fields of a collection, `_type` first.
    pub fn indexes(&self, collection: &str) -> Result<Vec<String>, ReadError> {
        ids::validate_collection(collection)?;
        let txn = self.read()?;
        indexed_fields(&txn, collection)
    }

    /// Runs a query over a collection.
    pub fn query(&self, collection: &str, q: &query::Query) -> Result<Vec<Value>, ReadError> {
        self.with_documents(collection, &q.filter, |docs| q.run(docs))
    }

    /// Counts the documents of a collection that match `filter`.
    pub fn count(&self, collection: &str, filter: &query::Filter) -> Result<u64, ReadError> {
        self.with_documents(collection, filter, |docs| {
            docs.filter(|d| filter.matches(d)).count() as u64
        })
    }

    /// Distinct values of `field` among matching documents.
    pub fn distinct(&self, collection: &str, field: &str, filter: &query::Filter) -> Result<Vec<Value>, ReadError> {
        self.with_documents(collection, filter, |docs| query::distinct(docs, field, filter))
    }

    /// Visits a document's versions in order, stopping when `f` says so.
    fn each_version(
        &self,
        collection: &str,
        id: &str,
        mut f: impl FnMut(u64, &Change) -> Result<bool, ReadError>,
    ) -> Result<u64, ReadError> {
        ids::validate_collection(collection)?;
        ids::validate_id(id)?;
        let txn = self.read()?;
        let versions = txn.open_table(VERSIONS)?;
        let changes = self.log_view(&txn)?;
        let mut n = 0;
        for entry in versions.range((collection, id, 0u64, "")..=(collection, id, u64::MAX, ORIGIN_MAX))? {
            let (k, seq) = entry?;
            let origin = k.value().3;
            let Some(change) = changes.change(origin, seq.value())? else {
                return Err(ReadError::Storage(StorageError(format!(
                    "missing change {origin}:{}",
                    seq.value()
                ))));
            };
            let go_on = f(n, &change)?;
            n += 1;
            if !go_on {
                break;
            }
        }
        Ok(n)
    }

    /// Every version of a document, oldest first; `NotFound` if it never existed.
    pub fn versions(&self, collection: &str, id: &str) -> Result<Vec<Value>, ReadError> {
        let mut out = Vec::new();
        let n = self.each_version(collection, id, |i, c| {
            out.push(store::version_view(c, i)?);
            Ok(true)
        })?;
        if n == 0 {
            return Err(ReadError::NotFound {
                collection: collection.into(),
                id: id.into(),
            });
        }
        Ok(out)
    }

    /// Version `number` of a document (deleted documents included).
    pub fn version(&self, collection: &str, id: &str, number: u64) -> Result<Value, ReadError> {
        let mut found = None;
        let n = self.each_version(collection, id, |i, c| {
            if i == number {
                found = Some(store::version_view(c, i)?);
                return Ok(false);
            }
            Ok(true)
        })?;
        match found {
            Some(v) => Ok(v),
            None if n == 0 => Err(ReadError::NotFound {
                collection: collection.into(),
                id: id.into(),
            }),
            None => Err(ReadError::NoSuchVersion {
                collection: collection.into(),
                id: id.into(),
                version: number,
            }),
        }
    }

    /// Reads changes from the log for a sync session: per origin (in name
    /// order), those with a sequence above `req.after`, in sequence order,
    /// within the request's limits (at least one change if any is due).
    pub fn read_changes(&self, req: &FetchRequest) -> Result<Vec<Change>, ReadError> {
        let txn = self.read()?;
        let held = {
            let vv = txn.open_table(VV)?;
            store::read_vv(&vv)?
        };
        let ranges = held
            .iter()
            .map(|(origin, top)| (origin, req.after.get(origin) + 1, top));
        read_log_ranges(&txn, &self.inner.log, ranges, req.max_changes, req.max_bytes)
    }

    /// Reads the given sequences of the log, in the order of the ranges,
    /// within the request's limits (at least one change if any is held).
    /// Stubs come back as stubs.
    pub fn read_change_ranges(&self, req: &RangeRequest) -> Result<Vec<Change>, ReadError> {
        let txn = self.read()?;
        let ranges = req
            .ranges
            .iter()
            .map(|(origin, first, last)| (origin.as_str(), *first, *last));
        read_log_ranges(&txn, &self.inner.log, ranges, req.max_changes, req.max_bytes)
    }

    /// The changes this site holds only as withheld stubs, as ranges: at
    /// most `max_ranges` of them, oldest first per origin.
    pub fn withheld(&self, max_ranges: usize) -> Result<RangeSet, ReadError> {
        let txn = self.read()?;
        let Some(table) = open_existing(&txn, store::WITHHELD)? else {
            return Ok(RangeSet::new());
        };
        let mut set = RangeSet::new();
        let mut ranges = 0usize;
        let mut last: Option<(String, u64)> = None;
        for entry in table.iter()? {
            let (k, _) = entry?;
            let (origin, seq) = k.value();
            let extends = last.as_ref().is_some_and(|(o, s)| o == origin && s + 1 == seq);
            if !extends {
                ranges += 1;
                if ranges > max_ranges {
                    break;
                }
            }
            set.insert(origin, seq);
            last = Some((origin.to_owned(), seq));
        }
        Ok(set)
    }

    /// How many changes this site holds only as withheld stubs.
    pub fn withheld_count(&self) -> Result<u64, ReadError> {
        use redb::ReadableTableMetadata;
        let txn = self.read()?;
        Ok(match open_existing(&txn, store::WITHHELD)? {
            Some(t) => t.len()?,
            None => 0,
        })
    }

    /// The principal a peer site acts as when this site decides what to
    /// share with it: `site:<name>`, holding `sites` and every role whose
    /// `members` list it or one of its roles (nested, as for users).
    pub fn site_principal(&self, site: &str) -> Result<Principal, ReadError> {
        let filter = query::Filter::parse(&serde_json::json!({"_type": "role"}))
            .map_err(|e| ReadError::Storage(StorageError(e.to_string())))?;
        let roles: Vec<(String, Vec<String>)> = self.with_documents("users", &filter, |docs| {
            docs.filter(|d| filter.matches(d))
                .filter_map(|d| authz::role_members(&d))
                .collect()
        })?;
        let id = ocmesh_replication::filter::site_principal(site);
        let start = vec![id.clone(), ocmesh_replication::filter::SITES_ROLE.to_owned()];
        let mut held = acl::expand_roles(&start, &roles);
        held.retain(|r| *r != id);
        Ok(Principal {
            id,
            name: site.to_owned(),
            roles: held,
        })
    }

    /// `get`, for a caller: a document it may not read is not found.
    pub fn get_as(&self, collection: &str, id: &str, who: &Principal) -> Result<Value, ReadError> {
        let doc = self.get(collection, id)?;
        if acl::allowed(&doc, who, acl::READ) {
            Ok(doc)
        } else {
            Err(ReadError::NotFound {
                collection: collection.into(),
                id: id.into(),
            })
        }
    }

    /// Checks read right on a document, or on its last version if deleted.
    fn readable_history(&self, collection: &str, id: &str, who: &Principal) -> Result<(), ReadError> {
        let gate = match self.get(collection, id) {
            Ok(doc) => doc,
            Err(ReadError::NotFound { .. }) => {
                self.versions(collection, id)?
                    .pop()
                    .ok_or_else(|| ReadError::NotFound {
                        collection: collection.into(),
                        id: id.into(),
                    })?
            }
            Err(e) => return Err(e),
        };
        if acl::allowed(&gate, who, acl::READ) {
            Ok(())
        } else {
            Err(ReadError::NotFound {
                collection: collection.into(),
                id: id.into(),
            })
        }
    }

    /// Same-field conflicts in the histories of `collection` (all
    /// collections when `None`), or of one document, that `who` may read:
    /// `{collection, _id, field, kept, lost}` with version numbers.
    pub fn conflicts(
        &self,
        collection: Option<&str>,
        id: Option<&str>,
        who: &Principal,
    ) -> Result<Vec<Value>, ReadError> {
        let txn = self.read()?;
        let Some(table) = open_existing(&txn, store::CONFLICTS)? else {
            // No conflict was ever recorded.
            return Ok(Vec::new());
        };
        let (lo, hi) = match (collection, id) {
            (Some(c), Some(i)) => ((c, i), (c, i)),
            (Some(c), None) => ((c, ""), (c, ORIGIN_MAX)),
            _ => (("", ""), (ORIGIN_MAX, ORIGIN_MAX)),
        };
        let mut out = Vec::new();
        for entry in table
            .range((lo.0, lo.1, "", 0u64, 0u64)..=(hi.0, hi.1, ORIGIN_MAX, u64::MAX, u64::MAX))
            .map_err(StorageError::from)?
        {
            let (k, _) = entry.map_err(StorageError::from)?;
            let (c, i, field, kept, lost) = k.value();
            if self.readable_history(c, i, who).is_err() {
                continue;
            }
            out.push(serde_json::json!({
                "collection": c, "_id": i, "field": field, "kept": kept, "lost": lost,
            }));
        }
        Ok(out)
    }

    /// `versions`, for a caller with read right on the document.
    pub fn versions_as(&self, collection: &str, id: &str, who: &Principal) -> Result<Vec<Value>, ReadError> {
        self.readable_history(collection, id, who)?;
        self.versions(collection, id)
    }

    /// `version`, for a caller with read right on the document.
    pub fn version_as(&self, collection: &str, id: &str, number: u64, who: &Principal) -> Result<Value, ReadError> {
        self.readable_history(collection, id, who)?;
        self.version(collection, id, number)
    }

    /// `query` over the documents the caller may read.
    pub fn query_as(&self, collection: &str, q: &query::Query, who: &Principal) -> Result<Vec<Value>, ReadError> {
        self.with_documents(collection, &q.filter, |docs| {
            q.run(docs.filter(|d| acl::allowed(d, who, acl::READ)))
        })
    }

    /// `count` over the documents the caller may read.
    pub fn count_as(&self, collection: &str, filter: &query::Filter, who: &Principal) -> Result<u64, ReadError> {
        self.with_documents(collection, filter, |docs| {
            docs.filter(|d| acl::allowed(d, who, acl::READ) && filter.matches(d))
                .count() as u64
        })
    }

    /// `distinct` over the documents the caller may read.
    pub fn distinct_as(
        &self,
        collection: &str,
        field: &str,
        filter: &query::Filter,
        who: &Principal,
    ) -> Result<Vec<Value>, ReadError> {
        self.with_documents(collection, filter, |docs| {
            query::distinct(docs.filter(|d| acl::allowed(d, who, acl::READ)), field, filter)
        })
    }

    /// Creates a user who can sign in here: a `users` document (readable
    /// by the user) and a local argon2 password record. Admins only.
    pub async fn create_user(
        &self,
        username: &str,
        password: &str,
        name: &str,
        by: &Principal,
    ) -> Result<Value, WriteError> {
        if username.is_empty() || username.len() > 128 || password.is_empty() {
            return Err(WriteError::BadUser(
                "username (1 to 128 characters) and password are required".into(),
            ));
        }
        let pw = password.to_owned();
        let hash = tokio::task::spawn_blocking(move || users::hash_password(&pw))
            .await
            .map_err(|e| WriteError::Storage(StorageError(e.to_string())))?
            .map_err(|e| WriteError::Storage(StorageError(e)))?;
        self.write_document(WriteOp::CreateUser {
            username: username.into(),
            name: name.into(),
            hash,
            by: by.clone(),
        })
        .await
    }

    /// Fills in the roles `who` holds: `users`, every role (a document
    /// of `_type: "role"` in `users`) that lists it or one of its roles
    /// among `members`, nested without a depth limit; the local `admin`
    /// user is in `admins`.
    pub fn with_roles(&self, who: Principal) -> Result<Principal, ReadError> {
        let filter = query::Filter::parse(&serde_json::json!({"_type": "role"}))
            .map_err(|e| ReadError::Storage(StorageError(e.to_string())))?;
        let roles: Vec<(String, Vec<String>)> = self.with_documents("users", &filter, |docs| {
            docs.filter(|d| filter.matches(d))
                .filter_map(|d| authz::role_members(&d))
                .collect()
        })?;
        let mut start = vec![who.id.clone(), acl::USERS_ROLE_ID.to_owned()];
        if self.is_local_admin(&who.id) {
            start.push(acl::ADMINS_ROLE_ID.to_owned());
        }
        let mut held = acl::expand_roles(&start, &roles);
        held.retain(|r| *r != who.id);
        Ok(Principal { roles: held, ..who })
    }

    fn is_local_admin(&self, id: &str) -> bool {
        matches!(self.credential("admin"), Ok(Some(c)) if c.id == id)
    }

    /// Checks a user name and password.
    pub async fn authenticate(&self, username: &str, password: &str) -> Result<Principal, AuthError> {
        let guard = &self.inner.sign_in_guard;
        if let Err(wait_ms) = guard.check(username, self.inner.wall.now_ms()) {
            return Err(AuthError::TooManyAttempts {
                retry_after_secs: wait_ms.div_ceil(1000),
            });
        }
        let verified = self.verify_password(username, password).await?;
        let who = match verified {
            Some(who) => who,
            None => {
                guard.failed(username, self.inner.wall.now_ms());
                return Err(AuthError::BadCredentials);
            }
        };
        guard.succeeded(username);
        self.with_roles(who)
            .map_err(|e| AuthError::Storage(StorageError(e.to_string())))
    }

    /// The user whose password this is, if it is and the user still has
    /// its document in `users`. Deleting a user's document ends its access:
    /// the password record is a local table the delete does not reach.
    async fn verify_password(&self, username: &str, password: &str) -> Result<Option<Principal>, AuthError> {
        let Some(cred) = self.credential(username)? else {
            return Ok(None);
        };
        let node = self.clone();
        let password = password.to_owned();
        let ok =
            tokio::task::spawn_blocking(move || node.inner.verified.verify(&cred, &password).then(|| cred.principal()))
                .await
                .map_err(|e| AuthError::Storage(StorageError(format!("password check failed: {e}"))))?;
        match ok {
            Some(who) if self.user_exists(&who.id)? => Ok(Some(who)),
            _ => Ok(None),
        }
    }

    /// Whether the user with this id has a current (not deleted) document
    /// in `users`, or is the local `admin` (a credential only, which
    /// cannot be deleted). Signing in and tokens need one.
    /// Runs on every authenticated request: a key lookup, nothing parsed.
    pub fn user_exists(&self, id: &str) -> Result<bool, StorageError> {
        let held = self
            .holds_document("users", id)
            .map_err(|e| StorageError(e.to_string()))?;
        Ok(held || self.is_local_admin(id))
    }

    /// Whether a current document with this id is held (nothing parsed).
    fn holds_document(&self, collection: &str, id: &str) -> Result<bool, ReadError> {
        let txn = self.read()?;
        Ok(match open_existing(&txn, DOCUMENTS)? {
            Some(table) => table.get((collection, id))?.is_some(),
            None => false,
        })
    }

    /// The principal with this user id, if it can sign in here.
    pub fn principal_by_id(&self, id: &str) -> Result<Option<Principal>, AuthError> {
        let txn = self.inner.snapshot.current();
        let table = txn.open_table(CREDENTIALS).map_err(StorageError::from)?;
        for entry in table.range::<&str>(..).map_err(StorageError::from)? {
            let (_, v) = entry.map_err(StorageError::from)?;
            let cred: Credential = serde_json::from_slice(v.value()).map_err(|e| StorageError(e.to_string()))?;
            if cred.id == id {
                return Ok(Some(cred.principal()));
            }
        }
        Ok(None)
    }

    fn credential(&self, username: &str) -> Result<Option<Credential>, AuthError> {
        let txn = self.inner.snapshot.current();
        let table = txn.open_table(CREDENTIALS).map_err(StorageError::from)?;
        let Some(v) = table.get(username).map_err(StorageError::from)? else {
            return Ok(None);
        };
        let cred =
            serde_json::from_slice(v.value()).map_err(|e| StorageError(format!("credential of {username}: {e}")))?;
        Ok(Some(cred))
    }

    /// Names of the collections that hold at least one current (not
    /// deleted) document, in name order. Reads one key per collection.
    pub fn collection_names(&self) -> Result<Vec<String>, ReadError> {
        let txn = self.read()?;
        let Some(table) = open_existing(&txn, DOCUMENTS)? else {
            return Ok(Vec::new());
        };
        let mut out = Vec::new();
        let mut next = table.first()?.map(|(k, _)| k.value().0.to_owned());
        while let Some(collection) = next {
            // Document ids are hex, so (collection, ORIGIN_MAX) sorts after all of its keys.
            next = match table.range((collection.as_str(), ORIGIN_MAX)..)?.next() {
                Some(entry) => Some(entry?.0.value().0.to_owned()),
                None => None,
            };
            out.push(collection);
        }
        Ok(out)
    }

    /// `read_changes` with the request's parts: changes above `after` (a
    /// vector from `subscribe`), at most `max_changes` and about `max_bytes`.
    pub fn changes_since(
        &self,
        after: &VersionVector,
        max_changes: usize,
        max_bytes: usize,
    ) -> Result<Vec<Change>, ReadError> {
        self.read_changes(&FetchRequest {
            after: after.clone(),
            max_changes,
            max_bytes,
        })
    }
}

/// Creates the tables, checks the site name, makes the token secret and the
/// admin user on first start. Returns the last HLC, the version vector, the
/// token secret and a generated admin password if one was made.
/// What opening the store found or made.
struct Init {
    last_hlc: Timestamp,
    vv: VersionVector,
    token_secret: Vec<u8>,
    generated: Option<String>,
    /// Changes recovered from the write-ahead log.
    replayed: u64,
    /// Epoch for new log records.
    wal_epoch: u64,
}

fn init_store(
    db: &Database,
    config: &NodeConfig,
    wal: &mut wal::Wal,
    options: &OpenOptions,
    ids: &mut ids::IdGen,
) -> Result<Init, OpenError> {
    let txn = db.begin_write().map_err(StorageError::from)?;
    let mut generated = None;
    let (last, vv, secret, replayed, wal_epoch) = {
        let mut t = store::WriteTables::open(&txn, &config.site, wal.reader(), u64::MAX)?;
        t.create_all()?;
        t.now_ms = options.clock.now_ms();
        let epoch = t.meta_u64(META_WAL_EPOCH, "write-ahead log epoch")?.unwrap_or(0);
        let stored = t
            .meta
            .get(META_SITE)
            .map_err(StorageError::from)?
            .map(|v| String::from_utf8_lossy(v.value()).into_owned());
        match stored {
            Some(stored) => {
                if stored != config.site {
                    return Err(OpenError::SiteMismatch {
                        stored,
                        configured: config.site.clone(),
                    });
                }
            }
            None => t.set_meta(META_SITE, config.site.as_bytes())?,
        }
        let last = Timestamp::from_raw(t.meta_u64(META_HLC, "clock reading")?.unwrap_or_default());
        // Groups acknowledged after the last checkpoint.
        let from = t.meta_u64(META_WAL_FROM, "log position")?.unwrap_or(0);
        let logged = wal.read_from(from).map_err(|e| StorageError(e.to_string()))?;
        let (records, end) = wal::parse_records(&logged, from, epoch);
        let (replayed, replayed_hlc) = t.replay(&records)?;
        drop(records);
        drop(logged);
        // New records (a new epoch) go after the intact ones.
        wal.set_end(end);
        let last = last.max(Timestamp::from_raw(replayed_hlc));
        t.set_meta(META_HLC, &last.raw().to_be_bytes())?;
        t.set_meta(META_WAL_EPOCH, &(epoch + 1).to_be_bytes())?;
        t.set_meta(META_WAL_FROM, &end.to_be_bytes())?;
        let stored = t
            .meta
            .get(META_TOKEN_SECRET)
            .map_err(StorageError::from)?
            .map(|v| v.value().to_vec());
        let secret = match stored {
            Some(v) => v,
            None => {
                let s = ids.secret();
                t.set_meta(META_TOKEN_SECRET, &s)?;
                s.to_vec()
            }
        };
        if options.create_admin
            && t.credentials
                .open()?
                .get("admin")
                .map_err(StorageError::from)?
                .is_none()
        {
            let password = match &config.admin_password {
                Some(p) => p.clone(),
                None => {
                    let p = users::generate_password();
                    generated = Some(p.clone());
                    p
                }
            };
            let secs = options.clock.now_ms() / 1000;
            let cred = Credential {
                id: ids.object_id(secs),
                username: "admin".into(),
                name: "admin".into(),
                hash: users::hash_password(&password).map_err(OpenError::Hash)?,
            };
            let bytes = serde_json::to_vec(&cred).map_err(|e| OpenError::Credentials(e.to_string()))?;
            t.credentials
                .open_mut()?
                .insert("admin", bytes.as_slice())
                .map_err(StorageError::from)?;
        }
        (last, store::read_vv(&t.vv)?, secret, replayed, epoch + 1)
    };
    txn.commit().map_err(StorageError::from)?;
    Ok(Init {
        last_hlc: last,
        vv,
        token_secret: secret,
        generated,
        replayed,
        wal_epoch,
    })
}

/// How a read finds its candidate documents.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Plan {
    FullScan,
    /// Documents whose `field` holds one of the looked-up values, in id order.
    Index {
        field: String,
        ids: Vec<String>,
    },
}

fn indexed_fields(txn: &ReadTransaction, collection: &str) -> Result<Vec<String>, ReadError> {
    let mut fields: Vec<String> = index::ALWAYS_INDEXED.iter().map(|f| (*f).to_owned()).collect();
    let Some(defs) = open_existing(txn, INDEX_DEFS)? else {
        return Ok(fields);
    };
    for entry in defs.range((collection, "")..=(collection, ORIGIN_MAX))? {
        let (k, _) = entry?;
        fields.push(k.value().1.to_owned());
    }
    Ok(fields)
}

/// Picks the first top-level equality or `$in` on an indexed field whose
/// values are all indexable scalars (null, objects and arrays are not in
/// indexes, so they force a scan).
fn plan(txn: &ReadTransaction, collection: &str, filter: &query::Filter) -> Result<Plan, ReadError> {
    let fields = indexed_fields(txn, collection)?;
    for (field, values) in filter.index_lookups() {
        if !fields.contains(&field) {
            continue;
        }
        let Some(keys) = values.iter().map(|v| index::key_of(v)).collect::<Option<Vec<_>>>() else {
            continue;
        };
        let Some(table) = open_existing(txn, INDEX)? else {
            return Ok(Plan::Index { field, ids: Vec::new() });
        };
        let mut ids = Vec::new();
        for key in &keys {
            let k = key.as_slice();
            for entry in
                table.range((collection, field.as_str(), k, "")..=(collection, field.as_str(), k, ORIGIN_MAX))?
            {
                let (e, _) = entry?;
                ids.push(e.value().3.to_owned());
            }
        }
        ids.sort();
        ids.dedup();
        return Ok(Plan::Index { field, ids });
    }
    Ok(Plan::FullScan)
}

/// Where a node keeps its data by default.
pub fn default_data_dir() -> &'static Path {
    Path::new("ocmesh-data")
}

/// Opens a table for reading; `None` while no write has created it yet.
fn open_existing<K: redb::Key + 'static, V: redb::Value + 'static>(
    txn: &ReadTransaction,
    table: redb::TableDefinition<K, V>,
) -> Result<Option<redb::ReadOnlyTable<K, V>>, ReadError> {
    match txn.open_table(table) {
        Ok(t) => Ok(Some(t)),
        Err(redb::TableError::TableDoesNotExist(_)) => Ok(None),
        Err(e) => Err(e.into()),
    }
}

/// Reads the change log's (origin, first, last) ranges, inclusive, in the
/// order given, stopping before `max_changes` or `max_bytes` would be
/// exceeded (but returning at least one change if any is held).
fn read_log_ranges<'a>(
    txn: &redb::ReadTransaction,
    log: &wal::LogReader,
    ranges: impl Iterator<Item = (&'a str, u64, u64)>,
    max_changes: usize,
    max_bytes: usize,
) -> Result<Vec<Change>, ReadError> {
    let changes = txn.open_table(CHANGES)?;
    let mut values = Vec::new();
    let mut bytes = 0usize;
    'ranges: for (origin, first, last) in ranges {
        if first > last {
            continue;
        }
        for entry in changes.range((origin, first)..=(origin, last))? {
            let (_, v) = entry?;
            let len = store::stored_change_len(v.value())?;
            if values.len() >= max_changes || (!values.is_empty() && bytes + len > max_bytes) {
                break 'ranges;
            }
            bytes += len;
            values.push(v.value().to_vec());
        }
    }
    Ok(store::load_changes(&values, log)?)
}

#[cfg(test)]
mod tests;
