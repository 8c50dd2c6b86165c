//! Files: content split into 256 KiB chunks stored once per BLAKE3 hash,
//! and a metadata document in `fs.files` (`_type: "file"`) listing the
//! chunks, so identical content is stored once and the metadata has
//! history, ACL fields and replication like any document.
//!
//! An upload streams: at most one chunk is held in memory. Chunks are
//! durable before the metadata document that names them is written, so a
//! file that exists is always whole; an aborted upload leaves only chunks
//! no document names.

use serde_json::{Map, Value, json};

use crate::error::WriteError;
use crate::{Node, Principal};

pub const FILES: &str = "fs.files";
pub const FILE_TYPE: &str = "file";
pub const CHUNK_BYTES: usize = 256 * 1024;

/// Why an upload was refused.
#[derive(Debug, thiserror::Error)]
pub enum FileError {
    #[error("file is larger than the {limit} byte limit")]
    TooLarge { limit: u64 },
    #[error("file {0} is attached to work item {1}; delete or detach the work item first")]
    InUse(String, String),
    #[error("file {0} not found")]
    NotFound(String),
    #[error("file {file} names chunk {chunk}, which this site does not hold")]
    MissingChunk { file: String, chunk: String },
    #[error("file name must be 1 to 1024 characters")]
    BadName,
    #[error("chunk content does not match its hash {0}")]
    ChunkMismatch(String),
}

/// A streaming upload: feed bytes with `write`, then `finish`.
#[derive(Debug)]
pub struct Upload {
    node: Node,
    buf: Vec<u8>,
    chunks: Vec<String>,
    length: u64,
    limit: u64,
    whole: blake3::Hasher,
}

impl Upload {
    pub(crate) fn new(node: Node, limit: u64) -> Self {
        Upload {
            node,
            buf: Vec::with_capacity(CHUNK_BYTES),
            chunks: Vec::new(),
            length: 0,
            limit,
            whole: blake3::Hasher::new(),
        }
    }

    /// Adds bytes; full chunks are stored durably as they fill.
    pub async fn write(&mut self, mut data: &[u8]) -> Result<(), WriteError> {
        self.length += data.len() as u64;
        if self.length > self.limit {
            return Err(FileError::TooLarge { limit: self.limit }.into());
        }
        self.whole.update(data);
        while !data.is_empty() {
            let room = CHUNK_BYTES - self.buf.len();
            let take = room.min(data.len());
            self.buf.extend_from_slice(&data[..take]);
            data = &data[take..];
            if self.buf.len() == CHUNK_BYTES {
                self.flush().await?;
            }
        }
        Ok(())
    }

    async fn flush(&mut self) -> Result<(), WriteError> {
        if self.buf.is_empty() {
            return Ok(());
        }
        let data = std::mem::replace(&mut self.buf, Vec::with_capacity(CHUNK_BYTES));
        let hash = blake3::hash(&data);
        self.node.put_chunk(*hash.as_bytes(), data).await?;
        self.chunks.push(hash.to_hex().to_string());
        Ok(())
    }

    /// Stores the last chunk and writes the metadata document.
    pub async fn finish(
        mut self,
        filename: &str,
        content_type: &str,
        metadata: Map<String, Value>,
        by: &Principal,
    ) -> Result<Value, WriteError> {
        if filename.is_empty() || filename.len() > 1024 {
            return Err(FileError::BadName.into());
        }
        self.flush().await?;
        let mut doc = Map::new();
        doc.insert("_type".into(), FILE_TYPE.into());
        doc.insert("name".into(), filename.into());
        doc.insert("filename".into(), filename.into());
        doc.insert("contentType".into(), content_type.into());
        doc.insert("length".into(), self.length.into());
        doc.insert("chunkSize".into(), CHUNK_BYTES.into());
        doc.insert("chunks".into(), json!(self.chunks));
        doc.insert("blake3".into(), self.whole.finalize().to_hex().to_string().into());
        doc.insert("metadata".into(), Value::Object(metadata));
        self.node.create_file(doc, by).await
    }
}

/// The chunk hashes a file document lists, decoded.
pub fn chunk_hashes(doc: &Value) -> Option<Vec<[u8; 32]>> {
    doc.get("chunks")?.as_array()?.iter().map(chunk_hash).collect()
}

/// One listed chunk hash (64 hex digits), decoded.
pub fn chunk_hash(listed: &Value) -> Option<[u8; 32]> {
    hex::decode(listed.as_str()?).ok()?.try_into().ok()
}
