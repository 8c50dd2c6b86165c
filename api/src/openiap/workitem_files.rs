//! Work-item files over OpenIAP, as OpenCore keeps them: content sent in a
//! `WorkitemFile.file` (by `pushworkitem`, `pushworkitems` or
//! `updateworkitem`) is stored through the node's file API (content-
//! addressed chunks and an `fs.files` document, like an `upload`), and the
//! item lists a reference `{_id, filename, compressed}` in its `files`.
//! `popworkitem` with `includefiles` puts the content back into
//! `WorkitemFile.file`; without it the item carries only the references.
//!
//! Rights: a stored file gets the ACL its item has (the queue's ACL for a
//! pushed item, the item's own for an update) plus full control for the
//! caller, so whoever may pop the item may read its files. Content is kept
//! as sent: `compressed` records that the client compressed it, and a pop
//! returns the bytes and the flag as stored (ocmesh does not recompress, so
//! `PopWorkitemRequest.compressed` changes nothing). The node refuses to
//! delete a file a work item still lists.
//!
//! Sizes: a request is already bounded by the connection's message limit;
//! each file also by `GrpcLimits::max_upload_bytes`. A pop whose files
//! would make the reply larger than the message limit is an `error` naming
//! the item (which stays `processing` until its lease ends); the files can
//! then be fetched one by one with `download`.

use serde_json::{Map, Value, json};

use ocmesh_node::{Principal, acl, files};
use ocmesh_proto::openiap as pb;

use super::dispatch::{CommandError, Dispatcher, blocking};

/// What to do with one `WorkitemFile` of a request.
enum Sent<'a> {
    /// Content to store (an empty file when it has a name but no id).
    Content(&'a pb::WorkitemFile),
    /// A reference to a file stored before.
    Reference(&'a pb::WorkitemFile),
}

fn classify(f: &pb::WorkitemFile) -> Result<Sent<'_>, CommandError> {
    match (f.file.is_empty(), f.id.is_empty(), f.filename.is_empty()) {
        (false, _, true) => Err(CommandError::Invalid(
            "a work item file with content needs a filename".into(),
        )),
        (false, _, false) | (true, true, false) => Ok(Sent::Content(f)),
        (true, false, _) => Ok(Sent::Reference(f)),
        (true, true, true) => Err(CommandError::Invalid(
            "a work item file needs content (file) and a filename, or the _id of a stored file".into(),
        )),
    }
}

fn reference(id: &str, filename: &str, compressed: bool) -> Value {
    json!({"_id": id, "filename": filename, "compressed": compressed})
}

/// Whether a request's files carry content to store.
pub(super) fn any_content(files: &[pb::WorkitemFile]) -> bool {
    files.iter().any(|f| matches!(classify(f), Ok(Sent::Content(_))))
}

/// `acl` (a document's `_acl`, or none) with full control for `who`.
fn acl_for(acl: Option<&Value>, who: &Principal) -> Result<Value, CommandError> {
    let mut doc = Map::new();
    if let Some(a) = acl {
        doc.insert("_acl".into(), a.clone());
    }
    acl::with_creator(&mut doc, who).map_err(|e| CommandError::Internal(format!("the item's _acl: {e}")))?;
    Ok(doc.remove("_acl").unwrap_or(Value::Null))
}

/// Files stored for one request; deleted again if the request fails.
#[derive(Debug, Default)]
pub(super) struct Stored {
    ids: Vec<String>,
}

impl Dispatcher {
    /// The `_acl` files pushed onto `queue` get: the queue's, as its items.
    pub(super) async fn queue_file_acl(&self, queue: &str, who: &Principal) -> Result<Value, CommandError> {
        let (n, q, w) = (self.node.clone(), queue.to_owned(), who.clone());
        let doc = blocking(move || n.queue_as(&q, &w)).await?;
        acl_for(doc.get("_acl"), who)
    }

    /// The `_acl` files added to a work item get: the item's.
    pub(super) fn item_file_acl(&self, item: &Value, who: &Principal) -> Result<Value, CommandError> {
        acl_for(item.get("_acl"), who)
    }

    /// The `files` array entries for `sent`: content stored (recorded in
    /// `stored`) with `acl`, references passed through.
    pub(super) async fn store_files(
        &self,
        sent: &[pb::WorkitemFile],
        acl: &Value,
        who: &Principal,
        stored: &mut Stored,
    ) -> Result<Vec<Value>, CommandError> {
        let mut refs = Vec::with_capacity(sent.len());
        for f in sent {
            match classify(f)? {
                Sent::Reference(f) => refs.push(reference(&f.id, &f.filename, f.compressed)),
                Sent::Content(f) => {
                    let mut upload = self.node.upload(self.limits.max_upload_bytes);
                    upload.write(&f.file).await?;
                    let doc = upload
                        .finish(&f.filename, "application/octet-stream", Map::new(), who)
                        .await?;
                    let id = doc.get("_id").and_then(Value::as_str).unwrap_or_default().to_owned();
                    stored.ids.push(id.clone());
                    self.node
                        .update(files::FILES, &id, json!({"$set": {"_acl": acl}}), who)
                        .await?;
                    refs.push(reference(&id, &f.filename, f.compressed));
                }
            }
        }
        Ok(refs)
    }

    /// Deletes the files a failed request stored (best effort: what is
    /// left is a file no item lists).
    pub(super) async fn forget_files(&self, stored: Stored, who: &Principal) {
        for id in stored.ids {
            if let Err(e) = self.node.delete_file(&id, who).await {
                tracing::warn!(file = %id, error = %e, "work item file of a failed request not deleted");
            }
        }
    }

    /// Puts each referenced file's content into `item.files[..].file`,
    /// keeping the reply within the message limit.
    pub(super) async fn include_files(&self, item: &mut pb::Workitem, who: &Principal) -> Result<(), CommandError> {
        let ids: Vec<String> = item.files.iter().map(|f| f.id.clone()).collect();
        let (n, w) = (self.node.clone(), who.clone());
        let docs = blocking(move || {
            ids.iter()
                .map(|id| {
                    if id.is_empty() {
                        Ok(None)
                    } else {
                        n.get_as(files::FILES, id, &w).map(Some)
                    }
                })
                .collect::<Result<Vec<_>, _>>()
        })
        .await?;
        let limit = self.limits.max_message_bytes;
        let mut size = prost::Message::encoded_len(item);
        for doc in docs.iter().flatten() {
            size = size.saturating_add(
                usize::try_from(doc.get("length").and_then(Value::as_u64).unwrap_or(0)).unwrap_or(usize::MAX),
            );
        }
        if size > limit {
            return Err(CommandError::TooLarge { size, limit });
        }
        for (file, doc) in item.files.iter_mut().zip(docs) {
            let Some(doc) = doc else { continue };
            let hashes = files::chunk_hashes(&doc)
                .ok_or_else(|| CommandError::Internal(format!("file {} lists malformed chunks", file.id)))?;
            let n = self.node.clone();
            let id = file.id.clone();
            file.file = blocking(move || {
                let mut content = Vec::new();
                for hash in hashes {
                    match n.read_chunk(&hash)? {
                        Some(chunk) => content.extend_from_slice(&chunk),
                        None => {
                            return Err(CommandError::Internal(format!("a chunk of file {id} is missing")));
                        }
                    }
                }
                Ok::<_, CommandError>(content)
            })
            .await?;
        }
        Ok(())
    }
}

impl CommandError {
    /// This error, for a pop that took item `id` but could not include its files.
    pub(super) fn popped(self, id: &str) -> CommandError {
        CommandError::Node {
            code: u16::try_from(self.code()).unwrap_or(500),
            message: format!(
                "work item {id} was popped, but its files could not be included: {self}; \
                 it stays processing until its lease ends; fetch its files with download"
            ),
        }
    }
}
