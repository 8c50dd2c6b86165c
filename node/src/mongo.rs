//! The MongoDB storage backend (feature `mongodb`): a site's store kept in
//! a MongoDB collection instead of a local directory, so a site can run on
//! a host whose own disk is not trusted to keep anything.
//!
//! What is stored is the embedded store itself (see `blockfile`): redb's
//! pages and the write-ahead log as 64 KiB blocks, one document per block
//! (`{_id: "db:<block in hex>", d: <binary>}`, `{_id: "db:len", len}`, and
//! the same under `wal:`), in the collection `ocmesh_store_<site>` of the
//! URI's database (default `ocmesh`). Every query, ACL, merge and history
//! rule is the same code as on a directory; documents are not readable as
//! MongoDB collections.
//!
//! Durability: a commit returns only after MongoDB acknowledged every block
//! and the length with write concern `majority` and journaling, so a
//! write ocmesh acknowledged survives the node's host and a MongoDB
//! primary's failover. A commit's block writes run concurrently and the
//! length goes last; an interrupted commit may leave some of its blocks
//! written, which is the torn write that redb and the log already tolerate
//! from a disk (see `blockfile`).
//!
//! The driver is async and redb calls its storage synchronously, from the
//! writer thread and from readers that may be on a tokio worker. The store
//! therefore owns a small runtime of its own and every call waits on a
//! plain channel for its task, never `block_on` inside someone else's
//! runtime. Each call has a time limit, so a MongoDB that went away turns
//! into an I/O error (the writer then refuses writes until restart), not
//! a hang.

use std::collections::BTreeMap;
use std::fmt;
use std::io;
use std::ops::Range;
use std::time::Duration;

use futures_util::future::try_join_all;
use mongodb::bson::spec::BinarySubtype;
use mongodb::bson::{Binary, Bson, Document, doc};
use mongodb::options::{Acknowledgment, ClientOptions, CollectionOptions, WriteConcern};
use mongodb::{Client, Collection};

use crate::blockfile::BlockStore;
use crate::disk::FileId;

/// How long one store call may take before it is an I/O error.
const CALL_LIMIT: Duration = Duration::from_secs(30);

/// Block writes of one commit in flight at once.
const WRITES_IN_FLIGHT: usize = 16;

/// Why the MongoDB store could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum MongoOpenError {
    #[error("MongoDB URI {uri:?}: {source}")]
    Uri {
        uri: String,
        #[source]
        source: mongodb::error::Error,
    },
    #[error("cannot start the MongoDB client's runtime: {0}")]
    Runtime(#[source] io::Error),
    #[error("MongoDB at {hosts} did not answer a ping: {source}")]
    Unreachable {
        hosts: String,
        #[source]
        source: mongodb::error::Error,
    },
    #[error("MongoDB at {hosts} did not answer a ping within {secs} s")]
    Timeout { hosts: String, secs: u64 },
}

/// A site's blocks in one MongoDB collection.
pub struct MongoBlockStore {
    runtime: Option<tokio::runtime::Runtime>,
    blocks: Collection<Document>,
    /// For messages: database and collection.
    place: String,
}

impl fmt::Debug for MongoBlockStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "MongoDB {}", self.place)
    }
}

impl Drop for MongoBlockStore {
    fn drop(&mut self) {
        // Dropping a runtime inside another one's task panics; this may
        // be dropped anywhere.
        if let Some(rt) = self.runtime.take() {
            rt.shutdown_background();
        }
    }
}

fn file_prefix(file: FileId) -> &'static str {
    match file {
        FileId::Database => "db",
        FileId::Wal => "wal",
    }
}

fn block_id(file: FileId, block: u64) -> String {
    format!("{}:{block:016x}", file_prefix(file))
}

fn len_id(file: FileId) -> String {
    // "len" sorts after every hex block id of the file, so block ranges
    // never include it.
    format!("{}:len", file_prefix(file))
}

fn io_err(what: &str, e: impl fmt::Display) -> io::Error {
    io::Error::other(format!("MongoDB {what}: {e}"))
}

impl MongoBlockStore {
    /// Connects to `uri` and checks that the server answers; the blocks of
    /// site `site` go to the collection `ocmesh_store_<site>`.
    pub fn connect(uri: &str, site: &str) -> Result<MongoBlockStore, MongoOpenError> {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("ocmesh-mongodb")
            .enable_all()
            .build()
            .map_err(MongoOpenError::Runtime)?;
        match Self::open_on(&runtime, uri, site) {
            Ok((blocks, place)) => Ok(MongoBlockStore {
                runtime: Some(runtime),
                blocks,
                place,
            }),
            Err(e) => {
                // Callers are often inside a runtime, where dropping this
                // one would panic.
                runtime.shutdown_background();
                Err(e)
            }
        }
    }

    fn open_on(
        runtime: &tokio::runtime::Runtime,
        uri: &str,
        site: &str,
    ) -> Result<(Collection<Document>, String), MongoOpenError> {
        let uri_owned = uri.to_owned();
        let options = wait(runtime, async move { ClientOptions::parse(&uri_owned).await })
            .ok_or_else(|| MongoOpenError::Timeout {
                hosts: uri.to_owned(),
                secs: CALL_LIMIT.as_secs(),
            })?
            .map_err(|source| MongoOpenError::Uri {
                uri: uri.to_owned(),
                source,
            })?;
        let hosts = options
            .hosts
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join(",");
        let database = options.default_database.clone().unwrap_or_else(|| "ocmesh".into());
        let client = {
            let _entered = runtime.enter();
            Client::with_options(options).map_err(|source| MongoOpenError::Uri {
                uri: uri.to_owned(),
                source,
            })?
        };
        let db = client.database(&database);
        let pinged = {
            let db = db.clone();
            wait(runtime, async move { db.run_command(doc! {"ping": 1}).await })
        };
        match pinged {
            None => {
                return Err(MongoOpenError::Timeout {
                    hosts,
                    secs: CALL_LIMIT.as_secs(),
                });
            }
            Some(Err(source)) => return Err(MongoOpenError::Unreachable { hosts, source }),
            Some(Ok(_)) => {}
        }
        let mut concern = WriteConcern::from(Acknowledgment::Majority);
        concern.journal = Some(true);
        let collection = format!("ocmesh_store_{site}");
        let blocks =
            db.collection_with_options(&collection, CollectionOptions::builder().write_concern(concern).build());
        Ok((blocks, format!("{hosts}/{database}.{collection}")))
    }

    /// Runs `task` on the store's runtime and waits for it from any thread.
    fn call<T: Send + 'static>(
        &self,
        what: &str,
        task: impl Future<Output = mongodb::error::Result<T>> + Send + 'static,
    ) -> io::Result<T> {
        let runtime = self
            .runtime
            .as_ref()
            .ok_or_else(|| io::Error::other("MongoDB store is closed"))?;
        match wait(runtime, task) {
            Some(result) => result.map_err(|e| io_err(what, e)),
            None => Err(io_err(
                what,
                format!("no answer from {} within {} s", self.place, CALL_LIMIT.as_secs()),
            )),
        }
    }
}

/// Spawns `task` on `runtime` and blocks this thread (never a runtime's
/// `block_on`) until it ends or `CALL_LIMIT` passes.
fn wait<T: Send + 'static>(
    runtime: &tokio::runtime::Runtime,
    task: impl Future<Output = T> + Send + 'static,
) -> Option<T> {
    let (tx, rx) = std::sync::mpsc::sync_channel(1);
    runtime.spawn(async move {
        if let Ok(out) = tokio::time::timeout(CALL_LIMIT, task).await {
            let _ = tx.send(out);
        }
    });
    rx.recv().ok()
}

impl BlockStore for MongoBlockStore {
    fn len(&self, file: FileId) -> io::Result<u64> {
        let blocks = self.blocks.clone();
        let found = self.call("read of a file length", async move {
            blocks.find_one(doc! {"_id": len_id(file)}).await
        })?;
        match found.as_ref().map(|d| d.get("len")) {
            None => Ok(0),
            Some(Some(Bson::Int64(n))) if *n >= 0 => Ok(*n as u64),
            Some(other) => Err(io_err("file length", format!("{:?} is not a length", other))),
        }
    }

    fn get(&self, file: FileId, range: Range<u64>) -> io::Result<Vec<(u64, Vec<u8>)>> {
        let blocks = self.blocks.clone();
        let filter = doc! {"_id": {"$gte": block_id(file, range.start), "$lt": block_id(file, range.end)}};
        let docs = self.call("read of blocks", async move {
            let mut cursor = blocks.find(filter).await?;
            let mut out = Vec::new();
            while cursor.advance().await? {
                out.push(cursor.deserialize_current()?);
            }
            Ok(out)
        })?;
        let prefix = format!("{}:", file_prefix(file));
        docs.into_iter()
            .map(|d| {
                let id = d.get_str("_id").map_err(|e| io_err("block id", e))?;
                let block = id
                    .strip_prefix(&prefix)
                    .and_then(|hex| u64::from_str_radix(hex, 16).ok())
                    .ok_or_else(|| io_err("block id", format!("{id:?} is not a block of this file")))?;
                match d.get("d") {
                    Some(Bson::Binary(b)) => Ok((block, b.bytes.clone())),
                    _ => Err(io_err("block", format!("{id} has no binary data"))),
                }
            })
            .collect()
    }

    fn commit(&self, file: FileId, blocks: &BTreeMap<u64, Vec<u8>>, len: u64, drop_from: u64) -> io::Result<()> {
        let coll = self.blocks.clone();
        // One copy of each block, into the document the task owns.
        let blocks: Vec<(String, Document)> = blocks
            .iter()
            .map(|(b, data)| {
                let id = block_id(file, *b);
                let body = doc! {
                    "_id": id.clone(),
                    "d": Binary { subtype: BinarySubtype::Generic, bytes: data.clone() },
                };
                (id, body)
            })
            .collect();
        let len = i64::try_from(len).map_err(|e| io_err("file length", e))?;
        self.call("commit", async move {
            let written: Vec<String> = blocks.iter().map(|(id, _)| id.clone()).collect();
            let mut blocks = blocks.into_iter();
            loop {
                let chunk: Vec<(String, Document)> = blocks.by_ref().take(WRITES_IN_FLIGHT).collect();
                if chunk.is_empty() {
                    break;
                }
                try_join_all(chunk.into_iter().map(|(id, body)| {
                    let coll = coll.clone();
                    async move { coll.replace_one(doc! {"_id": id}, body).upsert(true).await }
                }))
                .await?;
            }
            // Blocks past a truncation, other than those just written.
            coll.delete_many(doc! {
                "_id": {
                    "$gte": block_id(file, drop_from),
                    "$lte": block_id(file, u64::MAX),
                    "$nin": written,
                }
            })
            .await?;
            coll.replace_one(doc! {"_id": len_id(file)}, doc! {"_id": len_id(file), "len": len})
                .upsert(true)
                .await?;
            Ok(())
        })
    }
}
