//! The commands that live on a connection (watch, message queues,
//! `getclients`), the collection and index commands, and the token
//! refresher. Same contract as dispatch.rs: one reply per request, typed
//! errors, nothing written by a request that fails (except
//! `insertorupdatemany`, which writes item by item; see there).

use std::sync::Arc;
use std::time::Duration;

use serde_json::{Value, json};

use ocmesh_node::files;
use ocmesh_node::messaging::{ExchangeKind, Message as MqMessage};
use ocmesh_node::query::{Filter, Query};
use ocmesh_node::{Principal, acl, ids};
use ocmesh_proto::openiap as pb;

use super::aggregate;
use super::convert::{self, pack};
use super::dispatch::{CommandError, Dispatcher, Done, Session, blocking, unpack, user_message};
use super::jsonpath;
use super::live::{Connection, UploadState, WatchSpec};
use crate::auth::{issue_token, verify_token};

fn conn_of<'a>(session: &'a Session, command: &'static str) -> Result<&'a Arc<Connection>, CommandError> {
    session.conn.as_ref().ok_or(CommandError::NeedsConnection(command))
}

fn collection_name(name: &str) -> Result<(), CommandError> {
    ids::validate_collection(name).map_err(|e| CommandError::Invalid(e.to_string()))
}

fn nonempty(s: &str) -> Option<String> {
    (!s.is_empty()).then(|| s.to_owned())
}

fn not_found(message: String) -> CommandError {
    CommandError::Node { message, code: 404 }
}

/// A MongoDB-style index name for a one-field index.
fn index_name(field: &str) -> String {
    format!("{field}_1")
}

/// A watch's filters from its paths: JSON filters (`{"_type": "x"}`) or
/// OpenCore's JSONPath filters (`$.[?(@._type == 'x')]`); a change matching
/// any of them is sent. No filters means every change: no paths, or a path
/// that selects all (empty, `[]`, `$`).
fn watch_filters(paths: &[String]) -> Result<Vec<Filter>, CommandError> {
    let (mut filters, mut all) = (Vec::new(), paths.is_empty());
    for path in paths.iter().map(|p| p.trim()) {
        let json = if path.starts_with('{') {
            serde_json::from_str::<Value>(path)
                .map_err(|e| CommandError::Invalid(format!("watch path {path:?} is not a JSON filter: {e}")))?
        } else {
            match jsonpath::parse(path) {
                Ok(jsonpath::Selection::All) => {
                    all = true;
                    continue;
                }
                Ok(jsonpath::Selection::Filter(f)) => f,
                Err(e) => {
                    return Err(CommandError::Invalid(format!(
                        "watch path {path:?} {e}; ocmesh takes $.[?(@.field == value)] filters \
                         (==, !=, &&, ||) or JSON filters"
                    )));
                }
            }
        };
        filters.push(Filter::parse(&json).map_err(|e| CommandError::Invalid(format!("watch path {path:?}: {e}")))?);
    }
    if all {
        filters.clear();
    }
    Ok(filters)
}

impl Dispatcher {
    /// Runs `command` if it is one of this file's; `None` otherwise.
    pub(super) async fn live_command(
        &self,
        command: &str,
        who: &Principal,
        session: &Session,
        env: &pb::Envelope,
    ) -> Option<Result<Done, CommandError>> {
        let done = match command {
            "watch" => self.watch(who, session, env).await,
            "unwatch" => {
                let run = || {
                    let r: pb::UnWatchRequest = unpack(env, "UnWatchRequest")?;
                    let conn = conn_of(session, "unwatch")?;
                    if !conn.stop_watch(&r.id) {
                        return Err(not_found(format!("no watch {:?} on this connection", r.id)));
                    }
                    Done::reply(command, pack("UnWatchResponse", &pb::UnWatchResponse {}))
                };
                run()
            }
            "registerqueue" => self.register_queue(session, env).await,
            "registerexchange" => self.register_exchange(session, env).await,
            "queuemessage" => self.queue_message(env).await,
            "unregisterqueue" => self.unregister_queue(session, env).await,
            "listcollections" => self.list_collections(env).await,
            "createcollection" => (|| {
                let r: pb::CreateCollectionRequest = unpack(env, "CreateCollectionRequest")?;
                collection_name(&r.collectionname)?;
                if r.timeseries.is_some() || r.capped || r.expire_after_seconds != 0 || r.collation.is_some() {
                    return Err(CommandError::Unsupported(
                        "createcollection with collation, timeseries, capped or expireAfterSeconds",
                    ));
                }
                // Collections exist implicitly: the first document makes one.
                Done::reply(
                    command,
                    pack("CreateCollectionResponse", &pb::CreateCollectionResponse {}),
                )
            })(),
            "dropcollection" => self.drop_collection(who, env).await,
            "createindex" => self.create_index(env).await,
            "getindexes" => self.get_indexes(env).await,
            "dropindex" => self.drop_index(env).await,
            "insertorupdatemany" => self.insert_or_update_many(who, env).await,
            "customcommand" => self.custom_command(who, env),
            "aggregate" => self.aggregate(who, env).await,
            "download" => self.download(who, session, env).await,
            "upload" => self.upload(who, session, env),
            _ => return None,
        };
        Some(done)
    }

    async fn watch(&self, who: &Principal, session: &Session, env: &pb::Envelope) -> Result<Done, CommandError> {
        let r: pb::WatchRequest = unpack(env, "WatchRequest")?;
        let conn = conn_of(session, "watch")?;
        collection_name(&r.collectionname)?;
        if conn.watch_count() >= self.limits.max_watches {
            return Err(CommandError::Limit(format!(
                "this connection already has {} watches; unwatch one first",
                self.limits.max_watches
            )));
        }
        let filters = watch_filters(&r.paths)?;
        let id = conn.start_watch(WatchSpec {
            node: self.node.clone(),
            who: who.clone(),
            collection: r.collectionname,
            filters,
            stall: self.limits.watch_stall,
            max_message_bytes: self.limits.max_message_bytes,
            stats: self.live.clone(),
        });
        Done::reply("watch", pack("WatchResponse", &pb::WatchResponse { id }))
    }

    fn queue_room(&self, conn: &Connection) -> Result<(), CommandError> {
        if conn.queue_count() >= self.limits.max_queues {
            return Err(CommandError::Limit(format!(
                "this connection already consumes {} queues; unregister one first",
                self.limits.max_queues
            )));
        }
        Ok(())
    }

    async fn register_queue(&self, session: &Session, env: &pb::Envelope) -> Result<Done, CommandError> {
        let r: pb::RegisterQueueRequest = unpack(env, "RegisterQueueRequest")?;
        let conn = conn_of(session, "registerqueue")?;
        if !r.queuename.is_empty() && conn.has_queue(&r.queuename) {
            // Already consumed here: registering again changes nothing.
            return Done::reply(
                "registerqueue",
                pack(
                    "RegisterQueueResponse",
                    &pb::RegisterQueueResponse { queuename: r.queuename },
                ),
            );
        }
        self.queue_room(conn)?;
        let broker = self.broker().await?;
        let temporary = r.queuename.is_empty();
        let name = broker.declare_queue(nonempty(&r.queuename).as_deref()).await?;
        let rx = broker.consume(&name).await?;
        conn.start_consumer(name.clone(), temporary, rx, self.live.clone());
        Done::reply(
            "registerqueue",
            pack("RegisterQueueResponse", &pb::RegisterQueueResponse { queuename: name }),
        )
    }

    async fn register_exchange(&self, session: &Session, env: &pb::Envelope) -> Result<Done, CommandError> {
        let r: pb::RegisterExchangeRequest = unpack(env, "RegisterExchangeRequest")?;
        if r.exchangename.is_empty() {
            return Err(CommandError::Invalid("registerexchange needs an exchangename".into()));
        }
        let algorithm = if r.algorithm.is_empty() {
            "fanout"
        } else {
            r.algorithm.as_str()
        };
        let kind = ExchangeKind::parse(algorithm)?;
        let broker = self.broker().await?;
        let mut queuename = String::new();
        if r.addqueue {
            let conn = conn_of(session, "registerexchange with addqueue")?;
            self.queue_room(conn)?;
            broker.declare_exchange(&r.exchangename, kind).await?;
            let q = broker.declare_queue(None).await?;
            let bound = async {
                broker.bind(&q, &r.exchangename, &r.routingkey).await?;
                broker.consume(&q).await
            }
            .await;
            match bound {
                Ok(rx) => conn.start_consumer(q.clone(), true, rx, self.live.clone()),
                Err(e) => {
                    let _ = broker.delete_queue(&q).await;
                    return Err(e.into());
                }
            }
            queuename = q;
        } else {
            broker.declare_exchange(&r.exchangename, kind).await?;
        }
        Done::reply(
            "registerexchange",
            pack("RegisterExchangeResponse", &pb::RegisterExchangeResponse { queuename }),
        )
    }

    async fn queue_message(&self, env: &pb::Envelope) -> Result<Done, CommandError> {
        let r: pb::QueueMessageRequest = unpack(env, "QueueMessageRequest")?;
        let (exchange, key) = match (r.exchangename.is_empty(), r.queuename.is_empty()) {
            (false, _) => (r.exchangename.clone(), r.routingkey.clone()),
            (true, false) => (String::new(), r.queuename.clone()),
            (true, true) => {
                return Err(CommandError::Invalid(
                    "queuemessage needs a queuename, or an exchangename (with routingkey)".into(),
                ));
            }
        };
        let broker = self.broker().await?;
        let msg = MqMessage {
            body: r.data.clone().into_bytes(),
            reply_to: nonempty(&r.replyto),
            correlation_id: nonempty(&r.correlation_id),
            expiration: None,
        };
        broker.publish(&exchange, &key, msg).await?;
        let reply = pb::QueueMessageResponse {
            queuename: r.queuename,
            correlation_id: r.correlation_id,
            replyto: r.replyto,
            routingkey: r.routingkey,
            exchangename: r.exchangename,
            data: String::new(),
        };
        Done::reply("queuemessage", pack("QueueMessageResponse", &reply))
    }

    async fn unregister_queue(&self, session: &Session, env: &pb::Envelope) -> Result<Done, CommandError> {
        let r: pb::UnRegisterQueueRequest = unpack(env, "UnRegisterQueueRequest")?;
        let conn = conn_of(session, "unregisterqueue")?;
        match conn.stop_consumer(&r.queuename) {
            None => {
                return Err(not_found(format!(
                    "queue {:?} is not registered on this connection",
                    r.queuename
                )));
            }
            Some(true) => {
                // A temporary queue lives only as long as its registration.
                if let Ok(broker) = self.broker().await {
                    let _ = broker.delete_queue(&r.queuename).await;
                }
            }
            Some(false) => {}
        }
        Done::reply(
            "unregisterqueue",
            pack("UnRegisterQueueResponse", &pb::UnRegisterQueueResponse {}),
        )
    }

    async fn list_collections(&self, env: &pb::Envelope) -> Result<Done, CommandError> {
        let _: pb::ListCollectionsRequest = unpack(env, "ListCollectionsRequest")?;
        let node = self.node.clone();
        let names = blocking(move || node.collection_names()).await?;
        let results: Vec<Value> = names
            .into_iter()
            .map(|n| json!({"name": n, "type": "collection"}))
            .collect();
        Done::reply(
            "listcollections",
            pack(
                "ListCollectionsResponse",
                &pb::ListCollectionsResponse {
                    results: Value::Array(results).to_string(),
                },
            ),
        )
    }

    /// Deletes every document of a collection (admins only; never one of
    /// the node's own collections): see `Node::drop_collection`.
    async fn drop_collection(&self, who: &Principal, env: &pb::Envelope) -> Result<Done, CommandError> {
        let r: pb::DropCollectionRequest = unpack(env, "DropCollectionRequest")?;
        let name = r.collectionname.as_str();
        collection_name(name)?;
        if ocmesh_node::SYSTEM_COLLECTIONS.contains(&name) {
            return Err(CommandError::Node {
                message: format!(
                    "dropcollection: {name} is one of the node's own collections ({}) and cannot be dropped",
                    ocmesh_node::SYSTEM_COLLECTIONS.join(", ")
                ),
                code: 403,
            });
        }
        if !who.is_admin() {
            return Err(CommandError::Node {
                message: format!("dropcollection {name}: only admins may drop a collection"),
                code: 403,
            });
        }
        let deleted = self.node.drop_collection(name, who).await?;
        // As in MongoDB, the collection's indexes go with it.
        for field in self.indexed_fields(name.to_owned()).await? {
            match self.node.drop_index(name, &field).await {
                // Built-in indexes (`_type`) stay.
                Ok(()) | Err(ocmesh_node::WriteError::BadIndex(_)) => {}
                Err(e) => return Err(e.into()),
            }
        }
        tracing::info!(collection = %name, documents = deleted.len(), user = %who.name, "openiap dropcollection");
        Done::reply(
            "dropcollection",
            pack("DropCollectionResponse", &pb::DropCollectionResponse {}),
        )
    }

    async fn create_index(&self, env: &pb::Envelope) -> Result<Done, CommandError> {
        let r: pb::CreateIndexRequest = unpack(env, "CreateIndexRequest")?;
        let key = convert::json_object("index", &r.index)?;
        let field = match key.iter().collect::<Vec<_>>().as_slice() {
            [(field, Value::Number(_))] => (*field).clone(),
            [(_, other)] => {
                return Err(CommandError::Invalid(format!(
                    "index: ocmesh indexes take 1 or -1 as the direction, not {other}"
                )));
            }
            _ => {
                return Err(CommandError::Invalid(
                    "index: give exactly one field ({\"field\": 1}); compound indexes are not supported".into(),
                ));
            }
        };
        let options = convert::json_text("options", &r.options, Value::Null)?;
        if let Value::Object(o) = &options
            && let Some(opt) = o.keys().find(|k| !matches!(k.as_str(), "name" | "background"))
        {
            return Err(CommandError::Invalid(format!(
                "index option {opt:?} is not supported; ocmesh indexes are plain one-field indexes"
            )));
        }
        self.node.create_index(&r.collectionname, &field).await?;
        Done::reply(
            "createindex",
            pack(
                "CreateIndexResponse",
                &pb::CreateIndexResponse {
                    result: index_name(&field),
                },
            ),
        )
    }

    async fn indexed_fields(&self, collection: String) -> Result<Vec<String>, CommandError> {
        let node = self.node.clone();
        blocking(move || node.indexes(&collection)).await
    }

    async fn get_indexes(&self, env: &pb::Envelope) -> Result<Done, CommandError> {
        let r: pb::GetIndexesRequest = unpack(env, "GetIndexesRequest")?;
        let fields = self.indexed_fields(r.collectionname).await?;
        let mut results = vec![json!({"name": "_id_", "key": {"_id": 1}})];
        results.extend(
            fields
                .iter()
                .map(|f| json!({"name": index_name(f), "key": {f.as_str(): 1}})),
        );
        Done::reply(
            "getindexes",
            pack(
                "GetIndexesResponse",
                &pb::GetIndexesResponse {
                    results: Value::Array(results).to_string(),
                },
            ),
        )
    }

    async fn drop_index(&self, env: &pb::Envelope) -> Result<Done, CommandError> {
        let r: pb::DropIndexRequest = unpack(env, "DropIndexRequest")?;
        if r.name == "_id_" || r.name == "_id" {
            return Err(CommandError::Invalid("the _id index cannot be dropped".into()));
        }
        let fields = self.indexed_fields(r.collectionname.clone()).await?;
        let field = fields
            .into_iter()
            .find(|f| r.name == *f || r.name == index_name(f) || r.name == format!("{f}_-1"))
            .ok_or_else(|| not_found(format!("no index {:?} on {}", r.name, r.collectionname)))?;
        self.node.drop_index(&r.collectionname, &field).await?;
        Done::reply("dropindex", pack("DropIndexResponse", &pb::DropIndexResponse {}))
    }

    /// Writes the items one after another (the node has no many-item
    /// upsert): if item k fails, items before it stay written.
    async fn insert_or_update_many(&self, who: &Principal, env: &pb::Envelope) -> Result<Done, CommandError> {
        let r: pb::InsertOrUpdateManyRequest = unpack(env, "InsertOrUpdateManyRequest")?;
        let items = convert::json_objects("items", &r.items)?;
        let uniqueness: Vec<String> = r
            .uniqeness
            .split(',')
            .map(|f| f.trim().to_owned())
            .filter(|f| !f.is_empty())
            .collect();
        let mut stored = Vec::with_capacity(items.len());
        for (i, item) in items.into_iter().enumerate() {
            let doc = self
                .node
                .insert_or_update(&r.collectionname, item, uniqueness.clone(), who)
                .await
                .map_err(|e| {
                    let e = CommandError::from(e);
                    let code = u16::try_from(e.code()).unwrap_or(500);
                    CommandError::Node {
                        message: format!("item {i} (items before it were written): {e}"),
                        code,
                    }
                })?;
            stored.push(doc);
        }
        let results = if r.skipresults {
            "[]".to_owned()
        } else {
            Value::Array(stored).to_string()
        };
        Done::reply(
            "insertorupdatemany",
            pack(
                "InsertOrUpdateManyResponse",
                &pb::InsertOrUpdateManyResponse { results },
            ),
        )
    }

    async fn aggregate(&self, who: &Principal, env: &pb::Envelope) -> Result<Done, CommandError> {
        let r: pb::AggregateRequest = unpack(env, "AggregateRequest")?;
        let who = &super::dispatch::queryas_principal(&self.node, &r.queryas, who).await?;
        let mut stages = aggregate::parse(&r.aggregates)?;
        let q = aggregate::source(&mut stages)?;
        let (n, c, w) = (self.node.clone(), r.collectionname, who.clone());
        let docs = blocking(move || n.query_as(&c, &q, &w)).await?;
        let results = aggregate::run(docs, &stages)?;
        Done::reply(
            "aggregate",
            pack(
                "AggregateResponse",
                &pb::AggregateResponse {
                    results: Value::Array(results).to_string(),
                },
            ),
        )
    }

    /// Sends a file as `beginstream`, `stream` chunks and `endstream`
    /// (each with `rid` = the request's id), then `downloadreply`, all in
    /// order through the connection's bounded event queue: a slow client
    /// slows only its own download.
    async fn download(&self, who: &Principal, session: &Session, env: &pb::Envelope) -> Result<Done, CommandError> {
        let r: pb::DownloadRequest = unpack(env, "DownloadRequest")?;
        let conn = conn_of(session, "download")?;
        let (n, w) = (self.node.clone(), who.clone());
        let doc = match (r.id.is_empty(), r.filename.is_empty()) {
            (false, _) => {
                let id = r.id.clone();
                blocking(move || n.get_as(files::FILES, &id, &w)).await?
            }
            (true, false) => {
                let q = Query::from_json(
                    &json!({"query": {"filename": r.filename}, "orderby": {"_created": -1}, "top": 1}),
                )
                .map_err(|e| CommandError::Invalid(e.to_string()))?;
                let mut found = blocking(move || n.query_as(files::FILES, &q, &w)).await?;
                found
                    .pop()
                    .ok_or_else(|| not_found(format!("no file named {:?}", r.filename)))?
            }
            (true, true) => return Err(CommandError::Invalid("download needs an id or a filename".into())),
        };
        let hashes = files::chunk_hashes(&doc)
            .ok_or_else(|| CommandError::Internal("the file document lists malformed chunks".into()))?;
        let text = |k: &str| doc.get(k).and_then(Value::as_str).unwrap_or_default().to_owned();
        let rid = env.id.as_str();
        let shared = &conn.shared;
        let begin = pb::BeginStream {
            checksum: text("blake3"),
            stat: Some(pb::Stat {
                size: doc
                    .get("length")
                    .and_then(Value::as_i64)
                    .and_then(|l| i32::try_from(l).ok())
                    .unwrap_or(-1),
                ..Default::default()
            }),
        };
        let gone = || CommandError::Internal("the connection closed during the download".into());
        if !shared
            .push(shared.answer("beginstream", rid, pack("BeginStream", &begin)))
            .await
        {
            return Err(gone());
        }
        // Pieces well under the message limit.
        let piece = (self.limits.max_message_bytes / 2).clamp(1, files::CHUNK_BYTES);
        for hash in hashes {
            let n = self.node.clone();
            let chunk = blocking(move || n.read_chunk(&hash))
                .await?
                .ok_or_else(|| CommandError::Internal("a chunk of the file is missing".into()))?;
            for data in chunk.chunks(piece) {
                let ev = shared.answer("stream", rid, pack("Stream", &pb::Stream { data: data.to_vec() }));
                if !shared.push(ev).await {
                    return Err(gone());
                }
            }
        }
        let end = shared.answer("endstream", rid, pack("EndStream", &pb::EndStream {}));
        let reply = pb::DownloadResponse {
            id: text("_id"),
            filename: text("filename"),
            mimetype: text("contentType"),
        };
        let done = shared.answer("downloadreply", rid, pack("DownloadResponse", &reply));
        if !shared.push(end).await || !shared.push(done).await {
            return Err(gone());
        }
        Done::pushed()
    }

    /// Opens an upload: its parts follow as `beginstream`, `stream` and
    /// `endstream` with `rid` = this request's id, and the `uploadreply`
    /// (or an `error`) answers this request after `endstream`.
    fn upload(&self, who: &Principal, session: &Session, env: &pb::Envelope) -> Result<Done, CommandError> {
        let r: pb::UploadRequest = unpack(env, "UploadRequest")?;
        let conn = conn_of(session, "upload")?;
        if env.id.is_empty() {
            return Err(CommandError::Invalid(
                "upload needs an envelope id (its parts name it in rid)".into(),
            ));
        }
        if r.filename.is_empty() || r.filename.len() > 1024 {
            return Err(CommandError::Invalid(
                "upload needs a filename of 1 to 1024 characters".into(),
            ));
        }
        let state = UploadState {
            upload: self.node.upload(self.limits.max_upload_bytes),
            filename: r.filename,
            mimetype: if r.mimetype.is_empty() {
                "application/octet-stream".into()
            } else {
                r.mimetype
            },
            who: who.clone(),
            started: std::time::Instant::now(),
            chunks: 0,
            failed: false,
        };
        if !conn.begin_upload(env.id.clone(), state, self.limits.max_uploads) {
            return Err(CommandError::Limit(format!(
                "this connection already has {} uploads open",
                self.limits.max_uploads
            )));
        }
        Done::pushed()
    }

    /// One part of an upload (`rid` names it). Parts get no reply; a
    /// failure ends the upload with an `error` answering the upload.
    pub(super) async fn upload_part(&self, session: &Session, env: &pb::Envelope) -> Result<Done, CommandError> {
        let conn = conn_of(session, "upload")?;
        let id = env.rid.clone();
        let mut state = conn
            .take_upload(&id)
            .ok_or_else(|| not_found(format!("no upload {id:?} is open on this connection")))?;
        let shared = &conn.shared;
        let fail = |e: CommandError| {
            let body = pb::ErrorResponse {
                message: e.to_string(),
                code: e.code(),
                stack: String::new(),
            };
            shared.answer("error", &id, pack("ErrorResponse", &body))
        };
        match env.command.as_str() {
            "beginstream" => {
                let _: pb::BeginStream = unpack(env, "BeginStream")?;
                conn.put_upload(id, state);
            }
            "stream" if state.failed => conn.put_upload(id, state),
            "stream" => {
                let part: pb::Stream = unpack(env, "Stream")?;
                if let Err(e) = state.upload.write(&part.data).await {
                    state.failed = true;
                    shared.push(fail(e.into())).await;
                } else {
                    state.chunks += 1;
                }
                conn.put_upload(id, state);
            }
            _ if state.failed => {}
            _ => {
                let _: pb::EndStream = unpack(env, "EndStream")?;
                let (chunks, started) = (state.chunks, state.started);
                match state
                    .upload
                    .finish(&state.filename, &state.mimetype, serde_json::Map::new(), &state.who)
                    .await
                {
                    Ok(doc) => {
                        let bytes = doc.get("length").and_then(Value::as_u64).unwrap_or(0);
                        let secs = started.elapsed().as_secs_f64().max(1e-6);
                        let mb = bytes as f64 / (1024.0 * 1024.0);
                        let reply = pb::UploadResponse {
                            id: doc.get("_id").and_then(Value::as_str).unwrap_or_default().to_owned(),
                            filename: state.filename.clone(),
                            bytes: i32::try_from(bytes).unwrap_or(i32::MAX),
                            chunks: i32::try_from(chunks).unwrap_or(i32::MAX),
                            mb: mb as f32,
                            elapsed_time: i32::try_from(started.elapsed().as_millis()).unwrap_or(i32::MAX),
                            mbps: (mb / secs) as f32,
                        };
                        shared
                            .push(shared.answer("uploadreply", &id, pack("UploadResponse", &reply)))
                            .await;
                    }
                    Err(e) => {
                        shared.push(fail(e.into())).await;
                    }
                }
            }
        }
        Done::pushed()
    }

    fn custom_command(&self, who: &Principal, env: &pb::Envelope) -> Result<Done, CommandError> {
        let r: pb::CustomCommandRequest = unpack(env, "CustomCommandRequest")?;
        match r.command.as_str() {
            "getclients" => {
                let admin = who.roles.iter().any(|r| r == acl::ADMINS_ROLE_ID);
                let clients: Vec<Value> = self
                    .clients
                    .live()
                    .iter()
                    .filter(|c| admin || c.shared.signed_in().is_some_and(|s| s.user_id == who.id))
                    .map(|c| c.describe())
                    .collect();
                Done::reply(
                    "customcommand",
                    pack(
                        "CustomCommandResponse",
                        &pb::CustomCommandResponse {
                            result: Value::Array(clients).to_string(),
                        },
                    ),
                )
            }
            other => Err(CommandError::Invalid(format!(
                "customcommand {other:?} is not supported; ocmesh knows getclients"
            ))),
        }
    }

    /// Pushes a `refreshtoken` with a new token `token_refresh_lead` before
    /// the connection's token expires, for as long as the connection lives.
    pub(super) fn start_refresh(&self, conn: &Arc<Connection>, lifetime_secs: u64) {
        let (node, shared, stats) = (self.node.clone(), conn.shared.clone(), self.live.clone());
        let wait = Duration::from_secs(lifetime_secs)
            .saturating_sub(self.limits.token_refresh_lead)
            .max(Duration::from_secs(1));
        let task = async move {
            loop {
                tokio::time::sleep(wait).await;
                let Some(current) = shared.signed_in() else { return };
                let who = match verify_token(&node, &current.jwt) {
                    Ok(who) => who,
                    Err(e) => {
                        tracing::info!(connection = shared.id, error = %e.detail, "token not refreshed");
                        return;
                    }
                };
                let n = node.clone();
                let who = match blocking(move || n.with_roles(who)).await {
                    Ok(who) => who,
                    Err(e) => {
                        tracing::warn!(connection = shared.id, error = %e, "token not refreshed");
                        return;
                    }
                };
                let (jwt, user) = match (issue_token(&node, &who, lifetime_secs), user_message(&node, &who).await) {
                    (Ok(jwt), Ok(user)) => (jwt, user),
                    _ => {
                        tracing::warn!(connection = shared.id, "cannot issue a refreshed token");
                        return;
                    }
                };
                if let Some(s) = shared.signed_in.lock().unwrap_or_else(|e| e.into_inner()).as_mut() {
                    s.jwt = jwt.clone();
                }
                let body = pb::RefreshToken {
                    username: user.username.clone(),
                    jwt,
                    user: Some(user),
                };
                if !shared
                    .push(shared.event("refreshtoken", pack("RefreshToken", &body)))
                    .await
                {
                    return;
                }
                stats.refreshes.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            }
        };
        conn.set_refresh(tokio::spawn(task).abort_handle());
    }
}
