//! The redb tables of a site and the transactional steps on them.
//!
//! Layout (one redb file):
//! - `changes`: (origin, seq) → encoded `Change`: the change log, and the
//!   only copy of every version's body.
//! - `version_vector`: origin → highest contiguous seq held.
//! - `versions`: (collection, id, hlc, origin) → seq: each document's history
//!   in version order; the last entry is the current version.
//! - `documents`: (collection, id) → current JSON with `_version`; absent
//!   when the current version is a delete.
//! - `history_len`: (collection, id) → number of versions.
//! - `meta`: site name, last HLC, secrets.
//! - `credentials`: user name → local login record (not replicated).
//! - `index_defs`, `index`: secondary indexes of current documents.

use prost::Message;
use redb::{ReadableTable, Table, TableDefinition, WriteTransaction};
use serde_json::{Map, Value};

use ocmesh_replication::{Change, ChangeKind, Timestamp, VersionVector};

pub(crate) const META: TableDefinition<&str, &[u8]> = TableDefinition::new("meta");
pub(crate) const CHANGES: TableDefinition<(&str, u64), &[u8]> = TableDefinition::new("changes");
pub(crate) const VV: TableDefinition<&str, u64> = TableDefinition::new("version_vector");
pub(crate) const VERSIONS: TableDefinition<(&str, &str, u64, &str), u64> = TableDefinition::new("versions");
pub(crate) const DOCUMENTS: TableDefinition<(&str, &str), &[u8]> = TableDefinition::new("documents");
pub(crate) const HISTORY_LEN: TableDefinition<(&str, &str), u64> = TableDefinition::new("history_len");
pub(crate) const CREDENTIALS: TableDefinition<&str, &[u8]> = TableDefinition::new("credentials");
/// BLAKE3 hash → chunk bytes: file content, stored once per distinct chunk.
pub(crate) const CHUNKS: TableDefinition<&[u8], &[u8]> = TableDefinition::new("chunks");
/// (collection, field) → index options (JSON).
pub(crate) const INDEX_DEFS: TableDefinition<(&str, &str), &[u8]> = TableDefinition::new("index_defs");
/// (collection, field, value key, id) → (): one entry per indexed value.
pub(crate) const INDEX: TableDefinition<(&str, &str, &[u8], &str), ()> = TableDefinition::new("index");

pub(crate) const META_SITE: &str = "site";
pub(crate) const META_HLC: &str = "hlc";
pub(crate) const META_TOKEN_SECRET: &str = "token_secret";

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

/// Decodes a stored change; a failure means the file is damaged.
pub(crate) fn decode_change(bytes: &[u8]) -> Result<Change, StorageError> {
    Change::decode(bytes).map_err(|e| StorageError(format!("stored change does not decode: {e}")))
}

/// Parses a version body into a JSON object.
pub(crate) fn body_object(change: &Change) -> Result<Map<String, Value>, StorageError> {
    match serde_json::from_slice(&change.body) {
        Ok(Value::Object(m)) => Ok(m),
        _ => Err(StorageError(format!(
            "stored change {}:{} has a body that is not a JSON object",
            change.origin, change.seq
        ))),
    }
}

/// The document a version shows, with its `_version` number.
pub(crate) fn version_view(change: &Change, number: u64) -> Result<Value, StorageError> {
    let mut doc = body_object(change)?;
    doc.insert("_version".into(), Value::from(number));
    Ok(Value::Object(doc))
}

/// Open tables of one write transaction.
pub(crate) struct WriteTables<'t> {
    pub meta: Table<'t, &'static str, &'static [u8]>,
    pub changes: Table<'t, (&'static str, u64), &'static [u8]>,
    pub vv: Table<'t, &'static str, u64>,
    pub versions: Table<'t, (&'static str, &'static str, u64, &'static str), u64>,
    pub documents: Table<'t, (&'static str, &'static str), &'static [u8]>,
    pub history_len: Table<'t, (&'static str, &'static str), u64>,
    pub credentials: Table<'t, &'static str, &'static [u8]>,
    pub index_defs: Table<'t, (&'static str, &'static str), &'static [u8]>,
    pub index: Table<'t, (&'static str, &'static str, &'static [u8], &'static str), ()>,
    pub wi_queues: Table<'t, &'static str, &'static str>,
    pub wi_ready: Table<'t, (&'static str, u64, u64, &'static str), ()>,
    pub wi_delayed: Table<'t, (&'static str, u64, &'static str), (u64, u64)>,
    pub wi_leases: Table<'t, (u64, &'static str), ()>,
    pub chunks: Table<'t, &'static [u8], &'static [u8]>,
}

impl<'t> WriteTables<'t> {
    pub fn open(txn: &'t WriteTransaction) -> Result<Self, StorageError> {
        Ok(WriteTables {
            meta: txn.open_table(META)?,
            changes: txn.open_table(CHANGES)?,
            vv: txn.open_table(VV)?,
            versions: txn.open_table(VERSIONS)?,
            documents: txn.open_table(DOCUMENTS)?,
            history_len: txn.open_table(HISTORY_LEN)?,
            credentials: txn.open_table(CREDENTIALS)?,
            index_defs: txn.open_table(INDEX_DEFS)?,
            index: txn.open_table(INDEX)?,
            wi_queues: txn.open_table(crate::workitems::WI_QUEUES)?,
            wi_ready: txn.open_table(crate::workitems::WI_READY)?,
            wi_delayed: txn.open_table(crate::workitems::WI_DELAYED)?,
            wi_leases: txn.open_table(crate::workitems::WI_LEASES)?,
            chunks: txn.open_table(CHUNKS)?,
        })
    }

    /// Appends a change to the log and to its document's history, then
    /// recomputes the document's current state. The caller has checked that
    /// `change.seq` is the origin's next sequence number. Returns the
    /// document's history length.
    pub fn append(&mut self, change: &Change) -> Result<u64, StorageError> {
        let bytes = change.encode_to_vec();
        self.changes
            .insert((change.origin.as_str(), change.seq), bytes.as_slice())?;
        self.vv.insert(change.origin.as_str(), change.seq)?;
        let key = (change.collection.as_str(), change.doc_id.as_str());
        let existed = self
            .versions
            .insert((key.0, key.1, change.hlc, change.origin.as_str()), change.seq)?
            .is_some();
        if existed {
            // Same (hlc, origin) twice means a site reused a timestamp.
            return Err(StorageError(format!(
                "version {}@{} of {}/{} already exists",
                Timestamp::from_raw(change.hlc),
                change.origin,
                key.0,
                key.1
            )));
        }
        let len = self.history_len.get(key)?.map(|g| g.value()).unwrap_or(0) + 1;
        self.history_len.insert(key, len)?;
        self.materialize(key.0, key.1, len)?;
        Ok(len)
    }

    /// Rewrites the current document from the greatest version.
    fn materialize(&mut self, collection: &str, id: &str, len: u64) -> Result<(), StorageError> {
        let last_seq_origin = {
            let mut range = self
                .versions
                .range((collection, id, 0u64, "")..=(collection, id, u64::MAX, ORIGIN_MAX))?;
            match range.next_back() {
                Some(entry) => {
                    let (k, v) = entry?;
                    Some((k.value().3.to_owned(), v.value()))
                }
                None => None,
            }
        };
        let Some((origin, seq)) = last_seq_origin else {
            return Ok(());
        };
        let change = match self.changes.get((origin.as_str(), seq))? {
            Some(g) => decode_change(g.value())?,
            None => {
                return Err(StorageError(format!(
                    "history of {collection}/{id} points at missing change {origin}:{seq}"
                )));
            }
        };
        let old = self.current(collection, id)?.map(Value::Object);
        let new = if change.kind == ChangeKind::Delete as i32 {
            self.documents.remove((collection, id))?;
            None
        } else {
            let doc = version_view(&change, len - 1)?;
            let bytes = serde_json::to_vec(&doc).map_err(|e| StorageError(e.to_string()))?;
            self.documents.insert((collection, id), bytes.as_slice())?;
            Some(doc)
        };
        for field in self.indexed_fields(collection)? {
            self.reindex(collection, &field, id, old.as_ref(), new.as_ref())?;
        }
        if collection == crate::workitems::QUEUES || collection == crate::workitems::ITEMS {
            // FIFO order within a priority: the HLC of the document's first version.
            let fifo = match self
                .versions
                .range((collection, id, 0u64, "")..=(collection, id, u64::MAX, ORIGIN_MAX))?
                .next()
            {
                Some(entry) => entry?.0.value().2,
                None => 0,
            };
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_millis() as u64)
                .unwrap_or(0);
            crate::workitems::reindex(self, collection, id, old.as_ref(), new.as_ref(), fifo, now)?;
        }
        Ok(())
    }

    /// Fields indexed in `collection`, `_type` included.
    pub fn indexed_fields(&self, collection: &str) -> Result<Vec<String>, StorageError> {
        let mut fields: Vec<String> = crate::index::ALWAYS_INDEXED.iter().map(|f| (*f).to_owned()).collect();
        for entry in self.index_defs.range((collection, "")..=(collection, ORIGIN_MAX))? {
            let (k, _) = entry?;
            fields.push(k.value().1.to_owned());
        }
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
        let old_keys = old.map(|d| crate::index::keys_for(d, field)).unwrap_or_default();
        let new_keys = new.map(|d| crate::index::keys_for(d, field)).unwrap_or_default();
        for k in old_keys.iter().filter(|k| !new_keys.contains(k)) {
            self.index.remove((collection, field, k.as_slice(), id))?;
        }
        for k in new_keys.iter().filter(|k| !old_keys.contains(k)) {
            self.index.insert((collection, field, k.as_slice(), id), ())?;
        }
        Ok(())
    }

    pub fn current(&self, collection: &str, id: &str) -> Result<Option<Map<String, Value>>, StorageError> {
        match self.documents.get((collection, id))? {
            Some(g) => match serde_json::from_slice(g.value()) {
                Ok(Value::Object(m)) => Ok(Some(m)),
                _ => Err(StorageError(format!(
                    "stored document {collection}/{id} is not a JSON object"
                ))),
            },
            None => Ok(None),
        }
    }

    pub fn set_meta(&mut self, key: &str, value: &[u8]) -> Result<(), StorageError> {
        self.meta.insert(key, value)?;
        Ok(())
    }
}
