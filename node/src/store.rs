//! The redb tables of a site and the transactional steps on them.
//!
//! Layout (one redb file):
//! - `changes`: (origin, seq) → where the encoded `Change` is in the log
//!   file (`crate::wal`), the only copy of every version's body. (A store
//!   written before the log kept the changes holds the encoding itself;
//!   both forms read the same.)
//! - `version_vector`: origin → highest contiguous seq held.
//! - `versions`: (collection, id, hlc, origin) → seq: each document's history
//!   in version order; the last entry is the current version.
//! - `documents`: (collection, id) → the current document; absent when the
//!   current version is a delete. Stored as a reference to the change whose
//!   body it is (its `_version` and the change's (origin, seq)) whenever it
//!   is one version's body as written, so a body is stored once; as JSON
//!   with `_version` only when it is a merge of several versions. Either
//!   way it reads back with its fields in key order (see `read_stored_doc`).
//! - `history_len`: (collection, id) → number of versions.
//! - `meta`: site name, last HLC, write-ahead log epoch, secrets.
//! - `credentials`: user name → local login record (not replicated).
//! - `index_defs`, `index`: secondary indexes of current documents.
//! - `conflicts`: same-field conflicts found when a history was merged.
//! - `withheld`: (origin, seq) → (): changes held only as withheld stubs
//!   (a peer was not allowed to share them with this site). The stub sits
//!   in `changes` in the change's place, so the log stays contiguous; it
//!   joins no history. When the change itself arrives later (a refill), it
//!   replaces the stub and leaves this table.

use std::sync::Arc;

use prost::Message;
use redb::{ReadableTable, Table, TableDefinition, WriteTransaction};
use serde_json::{Map, Value};

use ocmesh_replication::{Change, ChangeKind, Timestamp, VersionVector};

use crate::edit::{Edit, Fields, Prior};
use crate::wal::LogReader;

pub(crate) const META: TableDefinition<&str, &[u8]> = TableDefinition::new("meta");
pub(crate) const CHANGES: TableDefinition<(&str, u64), &[u8]> = TableDefinition::new("changes");
pub(crate) const VV: TableDefinition<&str, u64> = TableDefinition::new("version_vector");
pub(crate) const VERSIONS: TableDefinition<(&str, &str, u64, &str), u64> = TableDefinition::new("versions");
pub(crate) const DOCUMENTS: TableDefinition<(&str, &str), &[u8]> = TableDefinition::new("documents");
pub(crate) const HISTORY_LEN: TableDefinition<(&str, &str), u64> = TableDefinition::new("history_len");
pub(crate) const CREDENTIALS: TableDefinition<&str, &[u8]> = TableDefinition::new("credentials");
/// BLAKE3 hash → chunk bytes: file content, stored once per distinct chunk.
pub(crate) const CHUNKS: TableDefinition<&[u8], &[u8]> = TableDefinition::new("chunks");
/// Chunks that a peer's file document names and this site does not hold
/// yet: federation asks peers for them by hash.
pub(crate) const CHUNKS_WANTED: TableDefinition<&[u8], ()> = TableDefinition::new("chunks_wanted");
/// (collection, field) → index options (JSON).
pub(crate) const INDEX_DEFS: TableDefinition<(&str, &str), &[u8]> = TableDefinition::new("index_defs");
/// (collection, id, field, kept version, lost version) → (): same-field
/// conflicts of a document's history (see `ocmesh_replication::merge`).
pub(crate) const CONFLICTS: TableDefinition<(&str, &str, &str, u64, u64), ()> = TableDefinition::new("conflicts");
/// (collection, field, value key, id) → (): one entry per indexed value.
pub(crate) const INDEX: TableDefinition<(&str, &str, &[u8], &str), ()> = TableDefinition::new("index");
/// (origin, seq) → (): changes held only as withheld stubs.
pub(crate) const WITHHELD: TableDefinition<(&str, u64), ()> = TableDefinition::new("withheld");

pub(crate) const META_SITE: &str = "site";
pub(crate) const META_HLC: &str = "hlc";
pub(crate) const META_TOKEN_SECRET: &str = "token_secret";
/// Epoch of the log records written since this store was last opened (u64 BE).
pub(crate) const META_WAL_EPOCH: &str = "wal_epoch";
/// Where in the log the records start that the last checkpoint may not
/// hold (u64 BE): a recovery replays from there. Absent in a store written
/// before the log kept the changes, whose log started at 0.
pub(crate) const META_WAL_FROM: &str = "wal_from";

/// Upper bound for origin names in range scans: site names are ASCII.
pub(crate) const ORIGIN_MAX: &str = "\u{7f}";

/// A storage failure, with redb's message.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
#[error("storage: {0}")]
pub struct StorageError(pub String);

macro_rules! storage_from {
    ($($t:ty),*) => {$(
        impl From<$t> for StorageError {
            fn from(e: $t) -> Self {
                StorageError(e.to_string())
            }
        }
    )*};
}
storage_from!(
    redb::Error,
    redb::StorageError,
    redb::TableError,
    redb::TransactionError,
    redb::CommitError,
    redb::DatabaseError
);

/// Reads every stored version vector entry.
pub(crate) fn read_vv(table: &impl ReadableTable<&'static str, u64>) -> Result<VersionVector, StorageError> {
    let mut vv = VersionVector::new();
    for entry in table.range::<&str>(..)? {
        let (k, v) = entry?;
        vv.advance(k.value(), v.value());
    }
    Ok(vv)
}

/// Decodes a change's encoding; a failure means the store is damaged.
pub(crate) fn decode_change(bytes: &[u8]) -> Result<Change, StorageError> {
    Change::decode(bytes).map_err(|e| StorageError(format!("stored change does not decode: {e}")))
}

/// First byte of a `changes` value that gives the change's place in the
/// log. No protobuf encoding starts with it (it would be field 31 of wire
/// type 7, which does not exist).
const CHANGE_AT: u8 = 0xFF;

/// A `changes` value: the change's encoding is `len` bytes at `at` in the log.
fn encode_place(at: u64, len: usize) -> [u8; 13] {
    let mut out = [0u8; 13];
    out[0] = CHANGE_AT;
    out[1..9].copy_from_slice(&at.to_be_bytes());
    out[9..13].copy_from_slice(&(len as u32).to_be_bytes());
    out
}

/// Where a `changes` value's encoding is.
enum ChangePlace<'a> {
    Log {
        at: u64,
        len: usize,
    },
    /// Stored in the table itself (a store from before the log kept them).
    Inline(&'a [u8]),
}

fn change_place(value: &[u8]) -> Result<ChangePlace<'_>, StorageError> {
    if value.first() != Some(&CHANGE_AT) {
        return Ok(ChangePlace::Inline(value));
    }
    let (Some(at), Some(len)) = (value.get(1..9), value.get(9..13)) else {
        return Err(StorageError("stored change place is damaged".into()));
    };
    Ok(ChangePlace::Log {
        at: u64::from_be_bytes(at.try_into().unwrap_or_default()),
        len: u32::from_be_bytes(len.try_into().unwrap_or_default()) as usize,
    })
}

/// The length of the encoding a `changes` value stands for.
pub(crate) fn stored_change_len(value: &[u8]) -> Result<usize, StorageError> {
    Ok(match change_place(value)? {
        ChangePlace::Log { len, .. } => len,
        ChangePlace::Inline(b) => b.len(),
    })
}

/// The change a `changes` value stands for. `pending` is the writer's
/// record not yet in the file: (its payload's offset, the payload).
pub(crate) fn load_change(
    value: &[u8],
    log: &LogReader,
    pending: Option<(u64, &[u8])>,
) -> Result<Change, StorageError> {
    match change_place(value)? {
        ChangePlace::Inline(bytes) => decode_change(bytes),
        ChangePlace::Log { at, len } => match pending {
            Some((base, buf)) if at >= base => {
                let from = usize::try_from(at - base).unwrap_or(usize::MAX);
                match buf.get(from..from.saturating_add(len)) {
                    Some(bytes) => decode_change(bytes),
                    None => Err(StorageError(format!("change place {at}+{len} is past the log"))),
                }
            }
            _ => decode_change(&log.read(at, len).map_err(|e| StorageError(e.to_string()))?),
        },
    }
}

/// The changes `values` (from the `changes` table) stand for, in order.
/// Neighbours in the log are read together, a span at a time.
pub(crate) fn load_changes(values: &[Vec<u8>], log: &LogReader) -> Result<Vec<Change>, StorageError> {
    /// Most bytes read at once; a gap this small between two changes is
    /// read rather than skipped.
    const SPAN: u64 = 1 << 20;
    const GAP: u64 = 4096;
    let places = values.iter().map(|v| change_place(v)).collect::<Result<Vec<_>, _>>()?;
    let mut out = Vec::with_capacity(places.len());
    let mut i = 0;
    while i < places.len() {
        let (start, len) = match places[i] {
            ChangePlace::Log { at, len } => (at, len),
            ChangePlace::Inline(bytes) => {
                out.push(decode_change(bytes)?);
                i += 1;
                continue;
            }
        };
        let mut end = start + len as u64;
        let mut j = i + 1;
        while let Some(ChangePlace::Log { at, len }) = places.get(j) {
            let next_end = at + *len as u64;
            if *at < end || *at > end + GAP || next_end - start > SPAN {
                break;
            }
            end = next_end;
            j += 1;
        }
        let span = log
            .read(start, (end - start) as usize)
            .map_err(|e| StorageError(e.to_string()))?;
        for place in &places[i..j] {
            if let ChangePlace::Log { at, len } = place {
                let from = (at - start) as usize;
                out.push(decode_change(&span[from..from + len])?);
            }
        }
        i = j;
    }
    Ok(out)
}

/// Looks changes up by (origin, seq).
pub(crate) trait Changes {
    fn change(&self, origin: &str, seq: u64) -> Result<Option<Change>, StorageError>;
}

/// A read transaction's `changes` table with the log it points into.
pub(crate) type ReadLogView = LogView<redb::ReadOnlyTable<(&'static str, u64), &'static [u8]>>;

/// A `changes` table with the log it points into: how readers find changes.
pub(crate) struct LogView<T> {
    pub table: T,
    pub log: LogReader,
}

impl<T: ReadableTable<(&'static str, u64), &'static [u8]>> Changes for LogView<T> {
    fn change(&self, origin: &str, seq: u64) -> Result<Option<Change>, StorageError> {
        match self.table.get((origin, seq))? {
            Some(v) => load_change(v.value(), &self.log, None).map(Some),
            None => Ok(None),
        }
    }
}

impl Changes for WriteTables<'_> {
    fn change(&self, origin: &str, seq: u64) -> Result<Option<Change>, StorageError> {
        match self.changes.get((origin, seq))? {
            Some(v) => load_change(v.value(), &self.log_file, Some((self.log_base, &self.log))).map(Some),
            None => Ok(None),
        }
    }
}

/// Parses a version body into a JSON object.
pub(crate) fn body_object(change: &Change) -> Result<Map<String, Value>, StorageError> {
    match serde_json::from_slice(&change.body) {
        Ok(Value::Object(m)) => Ok(m),
        _ => Err(not_an_object(change)),
    }
}

fn not_an_object(change: &Change) -> StorageError {
    StorageError(format!(
        "stored change {}:{} has a body that is not a JSON object",
        change.origin, change.seq
    ))
}

/// The document a version shows, with its `_version` number.
pub(crate) fn version_view(change: &Change, number: u64) -> Result<Value, StorageError> {
    let mut doc = body_object(change)?;
    doc.insert("_version".into(), Value::from(number));
    Ok(Value::Object(doc))
}

/// A stored change as the merge reads it.
pub(crate) fn version_record(change: &Change) -> Result<ocmesh_replication::merge::VersionRecord, StorageError> {
    let base = (change.base_hlc != 0 || !change.base_origin.is_empty()).then(|| ocmesh_replication::VersionKey {
        hlc: Timestamp::from_raw(change.base_hlc),
        origin: change.base_origin.clone(),
    });
    Ok(ocmesh_replication::merge::VersionRecord {
        key: ocmesh_replication::VersionKey::of(change),
        kind: ChangeKind::try_from(change.kind).unwrap_or(ChangeKind::Update),
        fields: change.partial.then(|| change.fields.clone()),
        base,
        body: body_object(change)?,
    })
}

/// First byte of a `documents` value that refers to a change instead of
/// holding JSON (which always starts with `{`).
const DOC_REF: u8 = 0;

/// A `documents` value that refers to change (`origin`, `seq`), whose body
/// shown as version number `version` is the current document.
fn encode_doc_ref(version: u64, origin: &str, seq: u64) -> Vec<u8> {
    let mut out = Vec::with_capacity(17 + origin.len());
    out.push(DOC_REF);
    out.extend_from_slice(&version.to_be_bytes());
    out.extend_from_slice(&seq.to_be_bytes());
    out.extend_from_slice(origin.as_bytes());
    out
}

/// A `documents` value that is a reference: (version, origin, seq).
fn decode_doc_ref(bytes: &[u8]) -> Option<(u64, &str, u64)> {
    if bytes.first() != Some(&DOC_REF) || bytes.len() < 17 {
        return None;
    }
    let version = u64::from_be_bytes(bytes[1..9].try_into().ok()?);
    let seq = u64::from_be_bytes(bytes[9..17].try_into().ok()?);
    let origin = std::str::from_utf8(&bytes[17..]).ok()?;
    Some((version, origin, seq))
}

/// The current document a `documents` value stands for: its JSON, or the
/// body of the change it refers to (read from `changes`) with `_version`,
/// fields in key order as the JSON form stores them.
pub(crate) fn read_stored_doc(
    collection: &str,
    id: &str,
    bytes: &[u8],
    changes: &impl Changes,
) -> Result<Map<String, Value>, StorageError> {
    let damaged = |what: String| StorageError(format!("stored document {collection}/{id}: {what}"));
    if bytes.first() != Some(&DOC_REF) {
        return match serde_json::from_slice(bytes) {
            Ok(Value::Object(m)) => Ok(m),
            Ok(_) => Err(damaged("not a JSON object".into())),
            Err(e) => Err(damaged(e.to_string())),
        };
    }
    let (version, origin, seq) = decode_doc_ref(bytes).ok_or_else(|| damaged("malformed reference".into()))?;
    let Some(change) = changes.change(origin, seq)? else {
        return Err(damaged(format!("refers to missing change {origin}:{seq}")));
    };
    let mut doc = body_object(&change)?;
    doc.insert("_version".into(), Value::from(version));
    doc.sort_keys();
    Ok(doc)
}

/// A peer change's body: the one its caller parsed, or parsed now.
fn take_body(change: &Change, parsed: &mut Option<Map<String, Value>>) -> Result<Map<String, Value>, StorageError> {
    match parsed.take() {
        Some(body) => Ok(body),
        None => body_object(change),
    }
}

/// Whether `change`, if it is the first version of its document held
/// here, needs nothing of its body but the indexed fields: an insert
/// outside the collections whose documents drive other tables (queues,
/// work items, files).
pub(crate) fn first_version_is_plain(change: &Change) -> bool {
    change.kind == ChangeKind::Insert as i32
        && !change.withheld
        && ![crate::workitems::QUEUES, crate::workitems::ITEMS, crate::files::FILES]
            .contains(&change.collection.as_str())
}

/// The greatest version's effect on the document before it, and whether
/// the result is the change's body as written.
fn apply_fields(
    change: &Change,
    body: Map<String, Value>,
    old: Option<Map<String, Value>>,
) -> (Option<Map<String, Value>>, bool) {
    let doc = match ChangeKind::try_from(change.kind) {
        Ok(ChangeKind::Delete) => None,
        Ok(ChangeKind::Update) if change.partial => old.map(|mut doc| {
            doc.remove("_version");
            for f in &change.fields {
                match body.get(f) {
                    Some(v) => {
                        doc.insert(f.clone(), v.clone());
                    }
                    None => {
                        doc.shift_remove(f);
                    }
                }
            }
            doc
        }),
        // A whole-document update of a deleted document leaves it deleted.
        Ok(ChangeKind::Update) if old.is_none() => None,
        _ => return (Some(body), true),
    };
    (doc, false)
}

/// A parsed document shared between the writer's cache, the transaction
/// and the caller's answer, so a transition does not copy it.
pub(crate) type SharedDoc = Arc<Map<String, Value>>;

/// What a local write hands to `WriteTables::append`: its body, and the
/// current document it replaces, both already parsed.
pub(crate) struct LocalWrite {
    pub body: Map<String, Value>,
    pub old: Option<Prior>,
    /// The (origin, hlc) of the document's first version, when it had any
    /// before this write (the writer looked up its history's ends already).
    pub first: Option<(String, u64)>,
}

/// Most bytes (of the documents' JSON) a `DocCache` holds.
const DOC_CACHE_BYTES: usize = 32 << 20;

/// Current documents that this writer's local writes stored lately, as
/// parsed maps, with the ends of their history: a work item's pop and its
/// completion read back what the transition before wrote, which would
/// otherwise be a B-tree read, a log read and a JSON parse each, plus a
/// range over its versions. Bounded by the documents' size, so a queue
/// backed up by thousands of items still pops from memory. It moves into a
/// transaction's tables and back to the writer only once that transaction
/// has committed, so whatever an aborted group wrote leaves with it; a
/// peer's change to a document drops the document's entry. Every version
/// a document gains passes through `materialize`, which either replaces
/// the entry or drops it, so the ends kept here are the history's.
#[derive(Default)]
pub(crate) struct DocCache {
    /// collection → id → entry. Looked up by `&str`: no key is built per
    /// lookup. foldhash, not SipHash: hashing ids was a few percent of the
    /// writer's time, and foldhash's per-process seed still keeps chosen
    /// ids from colliding at will.
    docs: foldhash::HashMap<Arc<str>, foldhash::HashMap<Arc<str>, CachedDoc>>,
    /// Insertion order, for eviction; an entry replaced later is skipped.
    order: std::collections::VecDeque<(Arc<str>, Arc<str>, u64)>,
    next: u64,
    /// Sum of the sizes of the entries in `docs`.
    bytes: usize,
}

struct CachedDoc {
    /// Insertion number (see `DocCache::order`).
    n: u64,
    size: usize,
    doc: SharedDoc,
    ends: HistoryEnds,
}

impl DocCache {
    fn entry(&self, collection: &str, id: &str) -> Option<&CachedDoc> {
        self.docs.get(collection)?.get(id)
    }

    fn get(&self, collection: &str, id: &str) -> Option<&SharedDoc> {
        self.entry(collection, id).map(|e| &e.doc)
    }

    /// Keeps `doc`, evicting the oldest entries to make room; with
    /// `only_if_room`, keeps it only if it fits without evicting any.
    fn put(&mut self, collection: &str, id: &str, doc: SharedDoc, size: usize, ends: HistoryEnds, only_if_room: bool) {
        if only_if_room {
            let replaced = self.entry(collection, id).map_or(0, |e| e.size);
            if self.bytes - replaced + size > DOC_CACHE_BYTES {
                self.remove(collection, id);
                return;
            }
        }
        self.next += 1;
        let n = self.next;
        let collection: Arc<str> = match self.docs.get_key_value(collection) {
            Some((c, _)) => c.clone(),
            None => collection.into(),
        };
        let by_id = self.docs.entry(collection.clone()).or_default();
        let entry = CachedDoc { n, size, doc, ends };
        let id = match by_id.get_key_value(id) {
            Some((key, _)) => key.clone(),
            None => id.into(),
        };
        if let Some(replaced) = by_id.insert(id.clone(), entry) {
            self.bytes -= replaced.size;
        }
        self.bytes += size;
        self.order.push_back((collection, id, n));
        while self.bytes > DOC_CACHE_BYTES {
            let Some((c, id, n)) = self.order.pop_front() else {
                break;
            };
            if self.entry(&c, &id).is_some_and(|e| e.n == n) {
                self.remove(&c, &id);
            }
        }
        // Entries replaced later leave stale places in `order`; drop them
        // once they outnumber the live ones.
        let entries: usize = self.docs.values().map(|by_id| by_id.len()).sum();
        if self.order.len() > 2 * entries + 1024 {
            let docs = &self.docs;
            self.order
                .retain(|(c, id, n)| docs.get(c).and_then(|m| m.get(id)).is_some_and(|e| e.n == *n));
        }
    }

    fn remove(&mut self, collection: &str, id: &str) -> Option<CachedDoc> {
        let e = self.docs.get_mut(collection)?.remove(id)?;
        self.bytes -= e.size;
        Some(e)
    }
}

/// The first version of a document, as (origin, hlc), and its greatest,
/// as (hlc, origin): see `WriteTables::history_ends`.
#[derive(Clone)]
pub(crate) struct HistoryEnds {
    pub first: (String, u64),
    pub greatest: (u64, String),
}

/// Where an appended change comes from.
pub(crate) enum Source {
    /// A write made here (see `LocalWrite`).
    Local(LocalWrite),
    /// A peer's change (or one replayed from the write-ahead log), with its
    /// body when the caller has parsed it already.
    Peer(Option<Map<String, Value>>),
}

/// The version number a stored current document shows.
fn shown_version(doc: &dyn Fields) -> Option<u64> {
    doc.field("_version").and_then(Value::as_u64)
}

/// A table opened on first use. Most groups touch a few of the store's
/// tables, and redb looks each open table up in its table tree when it is
/// opened, closed and committed.
pub(crate) struct Lazy<'t, K: redb::Key + 'static, V: redb::Value + 'static> {
    txn: &'t WriteTransaction,
    definition: TableDefinition<'static, K, V>,
    table: std::cell::OnceCell<Table<'t, K, V>>,
}

impl<'t, K: redb::Key + 'static, V: redb::Value + 'static> Lazy<'t, K, V> {
    fn new(txn: &'t WriteTransaction, definition: TableDefinition<'static, K, V>) -> Self {
        Lazy {
            txn,
            definition,
            table: std::cell::OnceCell::new(),
        }
    }

    /// The table, to read.
    pub fn open(&self) -> Result<&Table<'t, K, V>, StorageError> {
        if let Some(table) = self.table.get() {
            return Ok(table);
        }
        let table = self.txn.open_table(self.definition)?;
        Ok(self.table.get_or_init(|| table))
    }

    /// The table, to write.
    pub fn open_mut(&mut self) -> Result<&mut Table<'t, K, V>, StorageError> {
        self.open()?;
        self.table
            .get_mut()
            .ok_or_else(|| StorageError(format!("table {} did not open", self.definition)))
    }
}

/// Open tables of one write transaction.
pub(crate) struct WriteTables<'t> {
    pub meta: Table<'t, &'static str, &'static [u8]>,
    pub changes: Table<'t, (&'static str, u64), &'static [u8]>,
    pub vv: Table<'t, &'static str, u64>,
    pub versions: Table<'t, (&'static str, &'static str, u64, &'static str), u64>,
    pub documents: Table<'t, (&'static str, &'static str), &'static [u8]>,
    pub history_len: Lazy<'t, (&'static str, &'static str), u64>,
    pub credentials: Lazy<'t, &'static str, &'static [u8]>,
    pub index_defs: Lazy<'t, (&'static str, &'static str), &'static [u8]>,
    pub index: Table<'t, (&'static str, &'static str, &'static [u8], &'static str), ()>,
    pub wi_queues: Lazy<'t, &'static str, &'static str>,
    pub wi_ready: Table<'t, (&'static str, u64, u64, &'static str), ()>,
    pub wi_delayed: Table<'t, (&'static str, u64, &'static str), (u64, u64)>,
    pub wi_leases: Table<'t, (u64, &'static str), ()>,
    pub chunks: Lazy<'t, &'static [u8], &'static [u8]>,
    pub chunks_wanted: Lazy<'t, &'static [u8], ()>,
    pub conflicts: Lazy<'t, (&'static str, &'static str, &'static str, u64, u64), ()>,
    pub withheld: Lazy<'t, (&'static str, u64), ()>,
    /// Queues that got an item ready to pop in this transaction, once per
    /// item: poppers waiting on them are woken after the commit.
    pub readied: Vec<String>,
    /// The changes appended in this transaction, each length-delimited: the
    /// payload of the group's log record.
    pub log: Vec<u8>,
    /// Where that payload will be in the log file.
    pub log_base: u64,
    /// The log, to read changes of earlier groups.
    pub log_file: LogReader,
    /// Highest seq appended per origin, written to `version_vector` once
    /// per transaction by `flush_vv`.
    vv_pending: Vec<(String, u64)>,
    /// Lookups repeated by most writes (see `Lookups`), lent to this
    /// transaction.
    pub cache: Lookups,
    /// This site's name: only items it owns enter its work-item tables.
    pub site: String,
    /// Peers' changes refused in this transaction (see `crate::authz`).
    pub refused: u64,
    /// The node's wall clock when the transaction began (work-item times).
    pub now_ms: u64,
    /// The writer's recent documents (see `DocCache`), lent to this
    /// transaction.
    pub docs: DocCache,
}

/// What writes look up again and again. Like `DocCache` it is lent to each
/// transaction and returned to the writer only after that transaction
/// committed; whoever changes the underlying tables clears the matching
/// part (a queue document changed by anyone, here or at a peer, clears
/// the queues; index definitions change only here).
#[derive(Default)]
pub(crate) struct Lookups {
    /// Collection → indexed fields (`index_defs`).
    pub indexed: std::collections::HashMap<String, Vec<String>>,
    /// Queue name → (queue document id, current queue document).
    pub queues: std::collections::HashMap<String, (String, SharedDoc)>,
}

impl<'t> WriteTables<'t> {
    /// The tables of `txn`; the group's log record will go to `log_base`.
    pub fn open(
        txn: &'t WriteTransaction,
        site: &str,
        log_file: LogReader,
        log_base: u64,
    ) -> Result<Self, StorageError> {
        Ok(WriteTables {
            meta: txn.open_table(META)?,
            changes: txn.open_table(CHANGES)?,
            vv: txn.open_table(VV)?,
            versions: txn.open_table(VERSIONS)?,
            documents: txn.open_table(DOCUMENTS)?,
            history_len: Lazy::new(txn, HISTORY_LEN),
            credentials: Lazy::new(txn, CREDENTIALS),
            index_defs: Lazy::new(txn, INDEX_DEFS),
            index: txn.open_table(INDEX)?,
            wi_queues: Lazy::new(txn, crate::workitems::WI_QUEUES),
            wi_ready: txn.open_table(crate::workitems::WI_READY)?,
            wi_delayed: txn.open_table(crate::workitems::WI_DELAYED)?,
            wi_leases: txn.open_table(crate::workitems::WI_LEASES)?,
            chunks: Lazy::new(txn, CHUNKS),
            chunks_wanted: Lazy::new(txn, CHUNKS_WANTED),
            conflicts: Lazy::new(txn, CONFLICTS),
            withheld: Lazy::new(txn, WITHHELD),
            readied: Vec::new(),
            log: Vec::new(),
            log_base,
            log_file,
            vv_pending: Vec::new(),
            cache: Lookups::default(),
            site: site.to_owned(),
            refused: 0,
            now_ms: 0,
            docs: DocCache::default(),
        })
    }

    /// Creates every table that does not exist yet, so that readers find
    /// them all (groups open the rarer ones only when they use them).
    pub fn create_all(&mut self) -> Result<(), StorageError> {
        self.history_len.open_mut()?;
        self.credentials.open_mut()?;
        self.index_defs.open_mut()?;
        self.wi_queues.open_mut()?;
        self.chunks.open_mut()?;
        self.chunks_wanted.open_mut()?;
        self.conflicts.open_mut()?;
        self.withheld.open_mut()?;
        Ok(())
    }

    /// Appends a change to the log and to its document's history, then
    /// recomputes the document's current state. The caller has checked that
    /// `change.seq` is the origin's next sequence number. A local write
    /// passes its body and the document it replaces (`Source::Local`),
    /// already parsed, so nothing is decoded again. Returns the document's
    /// history length and, when this change became the current version, its
    /// view (`(0, None)` for a peer's change refused by `crate::authz`).
    /// A withheld stub takes its place in the log and in `withheld` only.
    pub fn append(&mut self, change: &Change, source: Source) -> Result<(u64, Option<SharedDoc>), StorageError> {
        self.append_encoded(change, None, source)
    }

    /// `append`, with the change's encoding when the caller has it already.
    pub fn append_encoded(
        &mut self,
        change: &Change,
        encoded: Option<&[u8]>,
        source: Source,
    ) -> Result<(u64, Option<SharedDoc>), StorageError> {
        self.append_logged(change, encoded, None, source)
    }

    /// `append_encoded`, for a change already in the log at `logged_at`.
    fn append_logged(
        &mut self,
        change: &Change,
        encoded: Option<&[u8]>,
        logged_at: Option<(u64, usize)>,
        source: Source,
    ) -> Result<(u64, Option<SharedDoc>), StorageError> {
        self.log_change(change, encoded, logged_at)?;
        match self.vv_pending.iter_mut().find(|(o, _)| *o == change.origin) {
            Some(entry) => entry.1 = change.seq,
            None => self.vv_pending.push((change.origin.clone(), change.seq)),
        }
        if change.withheld {
            self.withheld
                .open_mut()?
                .insert((change.origin.as_str(), change.seq), ())?;
            return Ok((0, None));
        }
        self.join_history(change, source)
    }

    /// Whether this site holds `origin`:`seq` only as a withheld stub.
    pub fn is_withheld(&self, origin: &str, seq: u64) -> Result<bool, StorageError> {
        Ok(self.withheld.open()?.get((origin, seq))?.is_some())
    }

    /// Replaces the withheld stub of `change` with the change itself and
    /// lets it join its document's history (as `append` does for a peer's
    /// change). Returns false, doing nothing, when the change is not
    /// withheld here.
    pub fn fill(&mut self, change: &Change) -> Result<bool, StorageError> {
        self.fill_logged(change, None)
    }

    /// `fill`, for a change already in the log at `logged_at`.
    fn fill_logged(&mut self, change: &Change, logged_at: Option<(u64, usize)>) -> Result<bool, StorageError> {
        if change.withheld
            || self
                .withheld
                .open_mut()?
                .remove((change.origin.as_str(), change.seq))?
                .is_none()
        {
            return Ok(false);
        }
        self.log_change(change, None, logged_at)?;
        self.join_history(change, Source::Peer(None))?;
        Ok(true)
    }

    /// Adds `change` to this group's log record and its place to the
    /// `changes` table; a change replayed from the log (`logged_at`) is
    /// there already.
    fn log_change(
        &mut self,
        change: &Change,
        encoded: Option<&[u8]>,
        logged_at: Option<(u64, usize)>,
    ) -> Result<(), StorageError> {
        let (at, len) = match logged_at {
            Some(place) => place,
            None => {
                // Encoded straight into the record: no buffer per change.
                let len = encoded.map_or_else(|| change.encoded_len(), <[u8]>::len);
                prost::encoding::encode_varint(len as u64, &mut self.log);
                let at = self.log_base + self.log.len() as u64;
                match encoded {
                    Some(bytes) => self.log.extend_from_slice(bytes),
                    None => change.encode_raw(&mut self.log),
                }
                (at, len)
            }
        };
        let place = encode_place(at, len);
        self.changes
            .insert((change.origin.as_str(), change.seq), place.as_slice())?;
        Ok(())
    }

    fn join_history(&mut self, change: &Change, source: Source) -> Result<(u64, Option<SharedDoc>), StorageError> {
        // A peer's change whose author lacked the right stays in the log only.
        if matches!(source, Source::Peer(_)) && crate::authz::refuse(self, change)?.is_some() {
            self.refused += 1;
            return Ok((0, None));
        }
        let key = (change.collection.as_str(), change.doc_id.as_str());
        let version = (key.0, key.1, change.hlc, change.origin.as_str());
        let existed = self.versions.insert(version, change.seq)?.map(|g| g.value());
        if let Some(first) = existed
            && matches!(source, Source::Peer(_))
        {
            // A peer reused a version stamp (a site never issues one twice,
            // so it is broken or hostile): the first change keeps the
            // version, this one stays in the log only, like a refused one.
            // Failing here would fail every write grouped with it.
            self.versions.insert(version, first)?;
            self.refused += 1;
            tracing::warn!(
                origin = %change.origin,
                seq = change.seq,
                collection = key.0,
                id = key.1,
                hlc = %Timestamp::from_raw(change.hlc),
                "refused a replicated change that reuses a version stamp already held"
            );
            return Ok((0, None));
        }
        if existed.is_some() {
            // Same (hlc, origin) twice from this site means its clock failed.
            return Err(StorageError(format!(
                "version {}@{} of {}/{} already exists",
                Timestamp::from_raw(change.hlc),
                change.origin,
                key.0,
                key.1
            )));
        }
        self.materialize(change, source)
    }

    /// The number of versions of a document, the one just added included.
    /// A current document shows it as `_version` + 1 (before the addition),
    /// so `history_len` holds it only for documents whose current state is
    /// deleted; counting the history is the last resort.
    fn history_count(&self, collection: &str, id: &str, current: Option<&dyn Fields>) -> Result<u64, StorageError> {
        if let Some(v) = current.and_then(shown_version) {
            return Ok(v + 2);
        }
        if let Some(n) = self.history_len.open()?.get((collection, id))? {
            return Ok(n.value() + 1);
        }
        let mut n = 0;
        for entry in self
            .versions
            .range((collection, id, 0u64, "")..=(collection, id, u64::MAX, ORIGIN_MAX))?
        {
            entry?;
            n += 1;
        }
        Ok(n)
    }

    /// Recomputes the current document after `change` joined its history
    /// (see `ocmesh_replication::merge`); returns the history length and
    /// the current view when `change` is the greatest version.
    ///
    /// Fast paths: a local write, or a peer's write that built on our
    /// greatest version, is the new greatest and saw everything we hold,
    /// so the current document is the old one with its fields applied.
    /// Anything else (a concurrent or late version) refolds the history.
    /// A document's first version needs no history read at all.
    fn materialize(&mut self, change: &Change, source: Source) -> Result<(u64, Option<SharedDoc>), StorageError> {
        let (collection, id) = (change.collection.as_str(), change.doc_id.as_str());
        let from_peer = matches!(source, Source::Peer(_));
        let deleted = change.kind == ChangeKind::Delete as i32;
        // Only the work-item tables need where the document began.
        let wants_first = collection == crate::workitems::QUEUES || collection == crate::workitems::ITEMS;
        // `verbatim`: the new current document is this change's body as
        // written, so `documents` can refer to the change.
        let (len, is_this, new, verbatim, old, first) = match source {
            Source::Local(l) => {
                // A local change carries the newest HLC (the writer refused
                // an older one), so it is the current version.
                let len = match l.first {
                    Some(_) => {
                        let old = l.old.as_ref().map(|o| o.view(Some(&l.body)));
                        self.history_count(collection, id, old.as_ref().map(|o| o as &dyn Fields))?
                    }
                    None => 1,
                };
                (len, true, (!deleted).then_some(l.body), true, l.old, l.first)
            }
            Source::Peer(mut body) => {
                let (greatest, previous, first) = {
                    let mut range = self
                        .versions
                        .range((collection, id, 0u64, "")..=(collection, id, u64::MAX, ORIGIN_MAX))?;
                    let mut next = |back: bool| -> Result<Option<(String, u64, u64)>, StorageError> {
                        let entry = if back { range.next_back() } else { range.next() };
                        Ok(match entry {
                            Some(entry) => {
                                let (k, v) = entry?;
                                let k = k.value();
                                Some((k.3.to_owned(), v.value(), k.2))
                            }
                            None => None,
                        })
                    };
                    let Some(first) = next(false)? else {
                        return Ok((0, None));
                    };
                    match next(true)? {
                        // The change just added is the only version.
                        None => (None, None, None),
                        // The version before the greatest (the first, when
                        // there are two).
                        Some(last) => (
                            Some(last),
                            Some(next(true)?.unwrap_or_else(|| first.clone())),
                            Some(first),
                        ),
                    }
                };
                if greatest.is_none() && body.is_none() && first_version_is_plain(change) {
                    return self.store_first_plain_version(change).map(|()| (1, None));
                }
                let (len, old) = match &greatest {
                    None => (1, None),
                    Some(_) => {
                        let old = self.current(collection, id)?;
                        let len = self.history_count(collection, id, old.as_deref().map(|o| o as &dyn Fields))?;
                        (len, old.map(Prior::Whole))
                    }
                };
                let is_this = match &greatest {
                    None => true,
                    Some((origin, seq, _)) => *origin == change.origin && *seq == change.seq,
                };
                let builds_on_previous = match &previous {
                    Some((origin, _, hlc)) => change.base_hlc == *hlc && change.base_origin == *origin,
                    None => true,
                };
                // A work item's version may come from a superseded owner
                // (see `ownership::settle`), which only a refold sees: a
                // stale owner's second change builds on its first and would
                // otherwise slip its fields in here.
                let settles = collection == crate::workitems::ITEMS;
                let (new, verbatim) = if is_this && len == 1 && change.kind == ChangeKind::Update as i32 {
                    // The first version held here is an update: the ones
                    // before it were withheld from this site (see
                    // `ocmesh_replication::merge`).
                    (Some(take_body(change, &mut body)?), true)
                } else if is_this && builds_on_previous && !settles {
                    let old = match &old {
                        Some(Prior::Whole(doc)) => Some((**doc).clone()),
                        _ => None,
                    };
                    apply_fields(change, take_body(change, &mut body)?, old)
                } else {
                    (self.refold(collection, id)?, false)
                };
                (
                    len,
                    is_this,
                    new,
                    verbatim,
                    old,
                    first.map(|(origin, _, hlc)| (origin, hlc)),
                )
            }
        };
        let (first_origin, first_hlc) = match &first {
            Some((origin, hlc)) => (origin.as_str(), *hlc),
            None => (change.origin.as_str(), change.hlc),
        };
        let new = match new {
            None => {
                if old.is_some() {
                    self.documents.remove((collection, id))?;
                }
                self.docs.remove(collection, id);
                // Only a deleted document keeps its history length here.
                self.history_len.open_mut()?.insert((collection, id), len)?;
                None
            }
            Some(mut doc) => {
                crate::edit::insert_in_order(&mut doc, "_version", Value::from(len - 1));
                // One field order on every site: the writer holds its
                // client's order, a peer's fold appends changed fields, and
                // the stored bytes must not depend on which site wrote them.
                // (An edit of a stored document keeps it in order.)
                if !doc.keys().is_sorted() {
                    doc.sort_keys();
                }
                let (bytes, size) = if verbatim {
                    (encode_doc_ref(len - 1, &change.origin, change.seq), change.body.len())
                } else {
                    let json = serde_json::to_vec(&doc).map_err(|e| StorageError(e.to_string()))?;
                    let size = json.len();
                    (json, size)
                };
                self.documents.insert((collection, id), bytes.as_slice())?;
                let doc = Arc::new(doc);
                let item_state = crate::workitems::item_state(collection, &doc);
                if from_peer || matches!(item_state, Some("successful" | "failed")) {
                    // A finished item is rarely written again: keeping it
                    // would only cost its eviction later, and the caller
                    // its own copy of the answer.
                    self.docs.remove(collection, id);
                } else {
                    // A local change is the greatest version (see above).
                    let ends = HistoryEnds {
                        first: (first_origin.to_owned(), first_hlc),
                        greatest: (change.hlc, change.origin.clone()),
                    };
                    // Waiting items are popped oldest first: once the cache
                    // is full, keeping the ones it holds beats evicting
                    // them, the next to be popped, for the newest.
                    let only_if_room = item_state == Some("new");
                    self.docs.put(collection, id, doc.clone(), size, ends, only_if_room);
                }
                Some(doc)
            }
        };
        // The document before, seen through the new one when the write
        // edited it (`_version`, set above, is in the edit's undo list).
        let old_view = old.as_ref().map(|o| o.view(new.as_deref()));
        let old_fields = old_view.as_ref().map(|o| o as &dyn Fields);
        let new_fields = new.as_deref().map(|n| n as &dyn Fields);
        for field in self.indexed_fields(collection)? {
            self.reindex_map(collection, &field, id, old_fields, new_fields)?;
        }
        if collection == crate::workitems::QUEUES {
            self.cache.queues.clear();
        }
        if collection == crate::files::FILES
            && from_peer
            && let Some(doc) = &new
        {
            self.want_missing_chunks(doc)?;
        }
        if wants_first {
            // FIFO order within a priority: the HLC of the document's first version.
            let now = self.now_ms;
            let created = crate::workitems::Created {
                fifo: first_hlc,
                at: first_origin,
            };
            crate::workitems::reindex(self, collection, id, old_fields, new_fields, created, now)?;
        }
        if !is_this {
            return Ok((len, None));
        }
        Ok((
            len,
            Some(match new {
                Some(doc) => doc,
                // A delete shows the document as it was deleted.
                None => {
                    let mut doc = body_object(change)?;
                    doc.insert("_version".into(), Value::from(len - 1));
                    Arc::new(doc)
                }
            }),
        ))
    }

    /// A peer's first version of a plain document (see
    /// `first_version_is_plain`), body unparsed: what `materialize` would
    /// do with the whole body, from its indexed fields alone. No caller
    /// reads the view of a peer's change, so none is made.
    fn store_first_plain_version(&mut self, change: &Change) -> Result<(), StorageError> {
        let (collection, id) = (change.collection.as_str(), change.doc_id.as_str());
        let fields = self.indexed_fields(collection)?;
        let wanted: Vec<&str> = fields.iter().map(String::as_str).collect();
        let picked = crate::body_scan::pick(&change.body, &wanted).ok_or_else(|| not_an_object(change))?;
        self.documents.insert(
            (collection, id),
            encode_doc_ref(0, &change.origin, change.seq).as_slice(),
        )?;
        self.docs.remove(collection, id);
        for field in &fields {
            self.reindex_map(collection, field, id, None, Some(&picked as &dyn Fields))?;
        }
        Ok(())
    }

    /// Records the chunks a file document names that this site lacks.
    fn want_missing_chunks(&mut self, doc: &Map<String, Value>) -> Result<(), StorageError> {
        let Some(Value::Array(hashes)) = doc.get("chunks") else {
            return Ok(());
        };
        for h in hashes {
            // A malformed hash can never be fetched; the file stays unreadable here.
            let Some(hash) = crate::files::chunk_hash(h) else {
                continue;
            };
            if self.chunks.open()?.get(hash.as_slice())?.is_none() {
                self.chunks_wanted.open_mut()?.insert(hash.as_slice(), ())?;
            }
        }
        Ok(())
    }

    /// Merges the whole history of a document and records its conflicts.
    fn refold(&mut self, collection: &str, id: &str) -> Result<Option<Map<String, Value>>, StorageError> {
        let keys: Vec<(String, u64)> = {
            let mut out = Vec::new();
            for entry in self
                .versions
                .range((collection, id, 0u64, "")..=(collection, id, u64::MAX, ORIGIN_MAX))?
            {
                let (k, v) = entry?;
                out.push((k.value().3.to_owned(), v.value()));
            }
            out
        };
        let mut records = Vec::with_capacity(keys.len());
        for (origin, seq) in keys {
            let Some(change) = self.change(&origin, seq)? else {
                return Err(StorageError(format!(
                    "history of {collection}/{id} points at missing change {origin}:{seq}"
                )));
            };
            records.push(version_record(&change)?);
        }
        // A work item's versions from a superseded owner count for nothing.
        let stale = if collection == crate::workitems::ITEMS {
            ocmesh_replication::ownership::settle(&mut records)
        } else {
            Vec::new()
        };
        let mut merged = ocmesh_replication::merge::merge(records);
        merged.conflicts.extend(stale);
        let outdated: Vec<(String, u64, u64)> = {
            let mut out = Vec::new();
            for entry in self
                .conflicts
                .open()?
                .range((collection, id, "", 0u64, 0u64)..=(collection, id, ORIGIN_MAX, u64::MAX, u64::MAX))?
            {
                let (k, _) = entry?;
                let k = k.value();
                out.push((k.2.to_owned(), k.3, k.4));
            }
            out
        };
        for (field, kept, lost) in outdated {
            self.conflicts
                .open_mut()?
                .remove((collection, id, field.as_str(), kept, lost))?;
        }
        for c in &merged.conflicts {
            self.conflicts
                .open_mut()?
                .insert((collection, id, c.field.as_str(), c.kept, c.lost), ())?;
        }
        Ok(merged.doc)
    }

    /// The ends of a document's history, if it has any: the (origin, hlc)
    /// of its first version and the (hlc, origin) of its greatest.
    pub fn history_ends(&self, collection: &str, id: &str) -> Result<Option<HistoryEnds>, StorageError> {
        let cached = self.docs.entry(collection, id).map(|e| e.ends.clone());
        self.history_ends_or(collection, id, cached)
    }

    /// `history_ends`, when the caller may know them already (`known`,
    /// from the cache): read from the versions only when it does not.
    pub fn history_ends_or(
        &self,
        collection: &str,
        id: &str,
        known: Option<HistoryEnds>,
    ) -> Result<Option<HistoryEnds>, StorageError> {
        let Some(ends) = known else {
            return self.stored_history_ends(collection, id);
        };
        // Every test run checks the cached ends against the versions.
        #[cfg(debug_assertions)]
        {
            let stored = self.stored_history_ends(collection, id)?;
            let same = stored.as_ref().map(|s| (&s.first, &s.greatest)) == Some((&ends.first, &ends.greatest));
            debug_assert!(
                same,
                "cached history ends of {collection}/{id} differ from its versions"
            );
        }
        Ok(Some(ends))
    }

    fn stored_history_ends(&self, collection: &str, id: &str) -> Result<Option<HistoryEnds>, StorageError> {
        let mut range = self
            .versions
            .range((collection, id, 0u64, "")..=(collection, id, u64::MAX, ORIGIN_MAX))?;
        let first = match range.next() {
            Some(entry) => {
                let (k, _) = entry?;
                let k = k.value();
                (k.3.to_owned(), k.2)
            }
            None => return Ok(None),
        };
        let greatest = match range.next_back() {
            Some(entry) => {
                let (k, _) = entry?;
                let k = k.value();
                (k.2, k.3.to_owned())
            }
            None => (first.1, first.0.clone()),
        };
        Ok(Some(HistoryEnds { first, greatest }))
    }

    /// Fields indexed in `collection`, `_type` included.
    pub fn indexed_fields(&mut self, collection: &str) -> Result<Vec<String>, StorageError> {
        if let Some(fields) = self.cache.indexed.get(collection) {
            return Ok(fields.clone());
        }
        let mut fields: Vec<String> = crate::index::ALWAYS_INDEXED.iter().map(|f| (*f).to_owned()).collect();
        for entry in self
            .index_defs
            .open()?
            .range((collection, "")..=(collection, ORIGIN_MAX))?
        {
            let (k, _) = entry?;
            fields.push(k.value().1.to_owned());
        }
        self.cache.indexed.insert(collection.to_owned(), fields.clone());
        Ok(fields)
    }

    /// Moves `id`'s entries for `field` from the `old` to the `new` document.
    pub fn reindex(
        &mut self,
        collection: &str,
        field: &str,
        id: &str,
        old: Option<&Value>,
        new: Option<&Value>,
    ) -> Result<(), StorageError> {
        self.reindex_map(
            collection,
            field,
            id,
            old.and_then(Value::as_object).map(|m| m as &dyn Fields),
            new.and_then(Value::as_object).map(|m| m as &dyn Fields),
        )
    }

    fn reindex_map(
        &mut self,
        collection: &str,
        field: &str,
        id: &str,
        old: Option<&dyn Fields>,
        new: Option<&dyn Fields>,
    ) -> Result<(), StorageError> {
        // An edit that leaves the field's top-level value as it was leaves
        // its keys as they were (most work-item transitions and `_type`).
        if let (Some(o), Some(n)) = (old, new) {
            let top = field.split_once('.').map_or(field, |(top, _)| top);
            if o.field(top) == n.field(top) {
                return Ok(());
            }
        }
        let old_keys = old.map(|d| crate::index::keys_for_fields(d, field)).unwrap_or_default();
        let new_keys = new.map(|d| crate::index::keys_for_fields(d, field)).unwrap_or_default();
        for k in old_keys.iter().filter(|k| !new_keys.contains(k)) {
            self.index.remove((collection, field, k.as_slice(), id))?;
        }
        for k in new_keys.iter().filter(|k| !old_keys.contains(k)) {
            self.index.insert((collection, field, k.as_slice(), id), ())?;
        }
        Ok(())
    }

    pub fn current(&self, collection: &str, id: &str) -> Result<Option<SharedDoc>, StorageError> {
        if let Some(doc) = self.docs.get(collection, id) {
            return Ok(Some(doc.clone()));
        }
        match self.documents.get((collection, id))? {
            Some(g) => read_stored_doc(collection, id, g.value(), self).map(|d| Some(Arc::new(d))),
            None => Ok(None),
        }
    }

    /// The current document to edit (see `crate::edit`), with its history's
    /// ends when the cache had them. It leaves the cache, so that a write
    /// whose document nobody else holds any more owns it without a copy;
    /// the write puts its new version back.
    pub fn take_current(&mut self, collection: &str, id: &str) -> Result<Option<Edit>, StorageError> {
        if let Some(e) = self.docs.remove(collection, id) {
            return Ok(Some(Edit::new(Arc::unwrap_or_clone(e.doc), Some(e.ends))));
        }
        Ok(self
            .current(collection, id)?
            .map(|d| Edit::new(Arc::unwrap_or_clone(d), None)))
    }

    /// Writes the version vector entries of the changes appended so far.
    pub fn flush_vv(&mut self) -> Result<(), StorageError> {
        for (origin, seq) in self.vv_pending.drain(..) {
            self.vv.insert(origin.as_str(), seq)?;
        }
        Ok(())
    }

    /// Re-applies the changes of log records that the last checkpoint may
    /// not hold (they stay where they are in the log); returns how many
    /// and the greatest HLC.
    pub fn replay(&mut self, records: &[crate::wal::Record<'_>]) -> Result<(u64, u64), StorageError> {
        let mut vv = read_vv(&self.vv)?;
        let (mut applied, mut max_hlc) = (0, 0);
        for record in records {
            let mut buf = record.payload;
            while !buf.is_empty() {
                let bad = |e: prost::DecodeError| StorageError(format!("log record does not decode: {e}"));
                let len = prost::encoding::decode_varint(&mut buf).map_err(bad)? as usize;
                let at = record.at + (record.payload.len() - buf.len()) as u64;
                let Some(encoded) = buf.get(..len) else {
                    return Err(StorageError(format!(
                        "log record at {} ends inside a change",
                        record.at
                    )));
                };
                let change = Change::decode(encoded).map_err(bad)?;
                buf = &buf[len..];
                let place = Some((at, len));
                let held = vv.get(&change.origin);
                if change.seq <= held {
                    // A refill of a stub this site held is logged again.
                    if self.fill_logged(&change, place)? {
                        max_hlc = max_hlc.max(change.hlc);
                        applied += 1;
                    }
                    continue;
                }
                if change.seq != held + 1 {
                    return Err(StorageError(format!(
                        "write-ahead log skips from {}:{held} to seq {}",
                        change.origin, change.seq
                    )));
                }
                self.append_logged(&change, None, place, Source::Peer(None))?;
                vv.advance(&change.origin, change.seq);
                max_hlc = max_hlc.max(change.hlc);
                applied += 1;
            }
        }
        self.flush_vv()?;
        self.log.clear();
        Ok((applied, max_hlc))
    }

    /// A `meta` entry holding a u64 (big-endian); `what` names it when damaged.
    pub fn meta_u64(&self, key: &str, what: &str) -> Result<Option<u64>, StorageError> {
        match self.meta.get(key)? {
            Some(v) => match <[u8; 8]>::try_from(v.value()) {
                Ok(b) => Ok(Some(u64::from_be_bytes(b))),
                Err(_) => Err(StorageError(format!("stored {what} is damaged"))),
            },
            None => Ok(None),
        }
    }

    pub fn set_meta(&mut self, key: &str, value: &[u8]) -> Result<(), StorageError> {
        self.meta.insert(key, value)?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::disk::{FileId, MemDisk};

    #[test]
    fn the_cache_evicts_its_oldest_but_admits_waiting_items_only_into_room() {
        let ends = || HistoryEnds {
            first: ("a".into(), 1),
            greatest: (1, "a".into()),
        };
        let doc = || Arc::new(Map::new());
        let quarter = DOC_CACHE_BYTES / 4;
        let mut cache = DocCache::default();
        for id in ["1", "2", "3", "4"] {
            cache.put("c", id, doc(), quarter, ends(), true);
        }
        // Full: a waiting item that does not fit is not kept, and keeps
        // none of its older version either; the oldest stay.
        cache.put("c", "5", doc(), quarter, ends(), true);
        assert!(cache.get("c", "5").is_none());
        // A new version of a cached item fits in its own place.
        cache.put("c", "2", doc(), quarter, ends(), true);
        assert!(cache.get("c", "2").is_some());
        cache.put("c", "3", doc(), quarter + 1, ends(), true);
        assert!(cache.get("c", "3").is_none());
        assert_eq!(cache.bytes, 3 * quarter);
        // Anything else makes room by evicting the oldest entry.
        cache.put("c", "6", doc(), quarter, ends(), false);
        cache.put("c", "7", doc(), quarter, ends(), false);
        assert!(cache.get("c", "1").is_none());
        assert!(cache.get("c", "2").is_some() && cache.get("c", "4").is_some());
        assert!(cache.get("c", "6").is_some() && cache.get("c", "7").is_some());
        assert_eq!(cache.bytes, 4 * quarter);
    }

    fn change(seq: u64, body: &str) -> Change {
        Change {
            origin: "a".into(),
            seq,
            collection: "c".into(),
            doc_id: format!("{seq:024x}"),
            body: body.as_bytes().to_vec(),
            ..Default::default()
        }
    }

    /// A `changes` row is either a place in the log or (in a store from
    /// before the log kept the changes) the encoding itself; a read of
    /// several gets them in order whichever form each has, neighbours in
    /// the log read as one span and far ones apart.
    #[test]
    fn changes_read_back_from_places_and_inline_rows_alike() {
        let disk = MemDisk::new();
        let mut wal = crate::wal::Wal::open_site_file(disk.handle(FileId::Wal), "<memory>", 0);
        let changes: Vec<Change> = (1..=5).map(|s| change(s, &format!("{{\"n\":{s}}}"))).collect();
        let mut payload = Vec::new();
        let mut places = Vec::new();
        for c in &changes[..3] {
            let bytes = c.encode_to_vec();
            prost::encoding::encode_varint(bytes.len() as u64, &mut payload);
            places.push(encode_place(wal.next_payload_at() + payload.len() as u64, bytes.len()).to_vec());
            payload.extend_from_slice(&bytes);
        }
        wal.append(1, &payload).expect("append");
        // A record far behind: read apart from the first span.
        wal.append(1, &vec![0u8; 10_000]).expect("append");
        let far = changes[4].encode_to_vec();
        let far_at = wal.next_payload_at();
        wal.append(1, &far).expect("append");
        let rows = vec![
            places[0].clone(),
            places[1].clone(),
            changes[3].encode_to_vec(),
            places[2].clone(),
            encode_place(far_at, far.len()).to_vec(),
        ];
        let expected = vec![
            changes[0].clone(),
            changes[1].clone(),
            changes[3].clone(),
            changes[2].clone(),
            changes[4].clone(),
        ];
        assert_eq!(load_changes(&rows, &wal.reader()).expect("load"), expected);
        assert_eq!(stored_change_len(&rows[2]).expect("len"), changes[3].encoded_len());
        assert_eq!(stored_change_len(&rows[4]).expect("len"), far.len());
        // A place past the log's end is an error, not a panic.
        let beyond = encode_place(far_at + 1_000_000, 10).to_vec();
        assert!(load_changes(&[beyond], &wal.reader()).is_err());
        assert!(load_change(&[CHANGE_AT, 1, 2], &wal.reader(), None).is_err());
    }
}
