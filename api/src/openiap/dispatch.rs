//! One OpenIAP command at a time: `(connection state, Envelope)` → replies.
//!
//! No sockets here, so every command and every error path is testable with
//! a node alone. Invariants: each request gets exactly one reply, `rid` =
//! the request's `id` (`download` and `upload` send theirs, after their
//! stream parts, through the connection's event queue; an upload's parts
//! get none); a reply is `<command>reply` (`pong` for `ping`) or `error`
//! with an `ErrorResponse`; client input never panics; a request that
//! fails wrote nothing (the node's writes are all-or-none; the exception
//! is `insertorupdatemany`, item by item); a reply larger than the message
//! limit becomes an `error`. Server-pushed events (`watchevent`,
//! `queueevent`, `refreshtoken`) have no `rid`.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use prost::Message;
use prost_types::Any;
use serde_json::{Map, Value, json};

use ocmesh_node::messaging::{Broker, MqError};
use ocmesh_node::query::{Filter, Query};
use ocmesh_node::{AuthError, Node, Principal, ReadError, WriteError, acl, files, workitems};
use ocmesh_proto::openiap as pb;

use super::GrpcLimits;
use super::convert::{self, ConvertError, pack};
use super::live::{self, Connection, Events, LiveStats, Registry};
use super::workitem_files::{self, Stored};
use crate::auth::{TOKEN_LIFETIME_SECS, issue_token, verify_token};
use crate::error::ApiError;

/// Lifetime of a token asked for with `longtoken`.
pub const LONG_TOKEN_SECS: u64 = 30 * 24 * 3600;

/// Commands that run as a signed-in user (the connection's, or the
/// envelope's `jwt`).
const USER_COMMANDS: &[&str] = &[
    "query",
    "getdocumentversion",
    "count",
    "distinct",
    "insertone",
    "insertmany",
    "updateone",
    "updatedocument",
    "insertorupdateone",
    "deleteone",
    "deletemany",
    "pushworkitem",
    "pushworkitems",
    "popworkitem",
    "updateworkitem",
    "deleteworkitem",
    "addworkitemqueue",
    "updateworkitemqueue",
    "deleteworkitemqueue",
    "watch",
    "unwatch",
    "registerqueue",
    "registerexchange",
    "queuemessage",
    "unregisterqueue",
    "listcollections",
    "createcollection",
    "dropcollection",
    "createindex",
    "getindexes",
    "dropindex",
    "insertorupdatemany",
    "customcommand",
    "aggregate",
    "download",
    "upload",
];

/// Why a command failed; its text is the `ErrorResponse.message`.
#[derive(Debug, thiserror::Error)]
pub enum CommandError {
    #[error("unknown command {0:?}")]
    UnknownCommand(String),
    #[error("{command}: data is a {got}, expected openiap.{expected}")]
    WrongType {
        command: String,
        expected: &'static str,
        got: String,
    },
    #[error("{command}: data does not decode as openiap.{expected}: {reason}")]
    BadData {
        command: String,
        expected: &'static str,
        reason: String,
    },
    #[error("not signed in: send signin first, or set the envelope's jwt")]
    NotSignedIn,
    #[error("{0}")]
    BadToken(String),
    #[error(transparent)]
    Convert(#[from] ConvertError),
    #[error("{0}")]
    Invalid(String),
    #[error("{0} is not supported by ocmesh yet")]
    Unsupported(&'static str),
    /// The node refused or failed; `code` is the status REST gives it.
    #[error("{message}")]
    Node { message: String, code: u16 },
    #[error("message of {size} bytes is over this connection's limit of {limit} bytes")]
    TooLarge { size: usize, limit: usize },
    #[error("reply of {size} bytes would be over the limit of {limit} bytes; ask for less (top, projection)")]
    ReplyTooLarge { size: usize, limit: usize },
    #[error("{limit} requests are already in flight on this connection; wait for replies before sending more")]
    TooManyInFlight { limit: usize },
    #[error("internal error: {0}")]
    Internal(String),
    /// A per-connection limit (watches, queues) was reached.
    #[error("{0}")]
    Limit(String),
    /// The command needs a live connection (a stream), not a lone request.
    #[error("{0} needs a streaming connection (SetupStream or /ws/v2)")]
    NeedsConnection(&'static str),
    #[error("no message broker is attached to this OpenIAP server")]
    NoBroker,
}

impl CommandError {
    /// `ErrorResponse.code`: the HTTP status the REST API gives the same failure.
    pub fn code(&self) -> i32 {
        let status = match self {
            CommandError::NotSignedIn | CommandError::BadToken(_) => 401,
            CommandError::Node { code, .. } => *code,
            CommandError::Unsupported(_) => 501,
            CommandError::TooLarge { .. } | CommandError::ReplyTooLarge { .. } => 413,
            CommandError::TooManyInFlight { .. } | CommandError::Limit(_) => 429,
            CommandError::NeedsConnection(_) => 400,
            CommandError::NoBroker => 503,
            CommandError::Internal(_) => 500,
            CommandError::UnknownCommand(_)
            | CommandError::WrongType { .. }
            | CommandError::BadData { .. }
            | CommandError::Convert(_)
            | CommandError::Invalid(_) => 400,
        };
        i32::from(status)
    }
}

impl From<ApiError> for CommandError {
    fn from(e: ApiError) -> Self {
        CommandError::Node {
            message: e.detail,
            code: e.status.as_u16(),
        }
    }
}

macro_rules! node_error_from {
    ($($t:ty),*) => {$(
        impl From<$t> for CommandError {
            fn from(e: $t) -> Self {
                ApiError::from(e).into()
            }
        }
    )*};
}
node_error_from!(WriteError, ReadError, AuthError, MqError);

/// Who a connection is signed in as.
#[derive(Debug, Clone)]
pub struct SignedIn {
    pub user_id: String,
    pub username: String,
    /// The token issued at sign-in; checked (signature, expiry) on every
    /// request, so an expired sign-in needs a new `signin`.
    pub jwt: String,
}

/// Per-connection state the dispatcher reads and `signin` replaces.
#[derive(Debug, Clone, Default)]
pub struct Session {
    pub signed_in: Option<SignedIn>,
    /// The live connection (for watches, queues, pushed events); `None`
    /// for requests handled alone.
    pub conn: Option<Arc<Connection>>,
}

/// What one request produced.
#[derive(Debug)]
pub struct Handled {
    /// One reply; none when the reply was pushed through the connection's
    /// event queue (a download sends its chunks, then its reply, that way).
    pub replies: Vec<pb::Envelope>,
    /// The connection's new state, when the command changed it.
    pub session: Option<Session>,
    /// Whether the reply is an `error`.
    pub failed: bool,
}

pub(super) struct Done {
    command: String,
    data: Any,
    session: Option<Session>,
}

impl Done {
    /// The reply was pushed already (see `Dispatcher::handle`).
    pub(super) fn pushed() -> Result<Done, CommandError> {
        Ok(Done {
            command: String::new(),
            data: Any::default(),
            session: None,
        })
    }

    pub(super) fn reply(command: &str, data: Any) -> Result<Done, CommandError> {
        Ok(Done {
            command: format!("{command}reply"),
            data,
            session: None,
        })
    }
}

/// Runs OpenIAP commands against a node.
#[derive(Debug)]
pub struct Dispatcher {
    pub(super) node: Node,
    pub(super) limits: GrpcLimits,
    next_id: AtomicU64,
    next_conn: AtomicU64,
    broker: tokio::sync::watch::Sender<Option<Broker>>,
    pub(super) clients: Registry,
    pub(super) live: Arc<LiveStats>,
}

/// How long a queue command waits for `set_broker` before failing.
const BROKER_WAIT: Duration = Duration::from_secs(5);

impl Dispatcher {
    pub fn new(node: Node, limits: GrpcLimits) -> Self {
        Dispatcher {
            node,
            limits,
            next_id: AtomicU64::new(1),
            next_conn: AtomicU64::new(1),
            broker: tokio::sync::watch::Sender::new(None),
            clients: Registry::default(),
            live: Arc::new(LiveStats::default()),
        }
    }

    /// Attaches the message broker queue commands use (the first one wins).
    pub fn set_broker(&self, broker: Broker) {
        self.broker.send_if_modified(|b| {
            if b.is_none() {
                *b = Some(broker);
                true
            } else {
                false
            }
        });
    }

    pub(super) async fn broker(&self) -> Result<Broker, CommandError> {
        let mut rx = self.broker.subscribe();
        match tokio::time::timeout(BROKER_WAIT, rx.wait_for(Option::is_some)).await {
            Ok(Ok(b)) => b.clone().ok_or(CommandError::NoBroker),
            _ => Err(CommandError::NoBroker),
        }
    }

    pub fn live_stats(&self) -> Arc<LiveStats> {
        self.live.clone()
    }

    /// A session for a new connection, and the events pushed to it (watch
    /// and queue events, token refreshes). End it with `close_session`.
    pub fn open_session(&self, transport: &str, peer: &str) -> (Session, Events) {
        let id = self.next_conn.fetch_add(1, Ordering::Relaxed);
        let (conn, events) = Connection::new(id, transport, peer, self.limits.event_queue);
        if !self.clients.add(&conn, self.limits.max_connections.max(1)) {
            tracing::warn!(connection = id, "client registry full; this connection is not listed");
        }
        (
            Session {
                signed_in: None,
                conn: Some(conn),
            },
            events,
        )
    }

    /// Stops a session's watches, consumers and token refresh, and deletes
    /// the temporary queues it made.
    pub async fn close_session(&self, session: &Session) {
        if let Some(conn) = &session.conn {
            self.clients.remove(conn.id());
            let temporary = conn.close();
            if !temporary.is_empty() {
                let broker = self.broker.borrow().clone();
                live::delete_queues(broker, temporary).await;
            }
        }
    }

    pub fn node(&self) -> &Node {
        &self.node
    }

    fn envelope(&self, request: &pb::Envelope, command: String, data: Any) -> pb::Envelope {
        pb::Envelope {
            command,
            priority: request.priority,
            seq: 0,
            id: format!("s{}", self.next_id.fetch_add(1, Ordering::Relaxed)),
            rid: request.id.clone(),
            data: Some(data),
            jwt: String::new(),
            traceid: request.traceid.clone(),
            spanid: request.spanid.clone(),
        }
    }

    /// The `error` reply to `request`.
    pub fn error_reply(&self, request: &pb::Envelope, e: &CommandError) -> pb::Envelope {
        let body = pb::ErrorResponse {
            message: e.to_string(),
            code: e.code(),
            stack: String::new(),
        };
        self.envelope(request, "error".into(), pack("ErrorResponse", &body))
    }

    /// Handles one request.
    pub async fn handle(&self, session: &Session, request: pb::Envelope) -> Handled {
        let size = request.encoded_len();
        let outcome = if size > self.limits.max_message_bytes {
            Err(CommandError::TooLarge {
                size,
                limit: self.limits.max_message_bytes,
            })
        } else {
            self.run(session, &request).await
        };
        let (reply, session, failed) = match outcome {
            // A streamed reply (download) already went out through the
            // connection's event queue, after its chunks.
            Ok(done) if done.command.is_empty() => {
                return Handled {
                    replies: Vec::new(),
                    session: None,
                    failed: false,
                };
            }
            Ok(done) => {
                let reply = self.envelope(&request, done.command, done.data);
                let size = reply.encoded_len();
                if size > self.limits.max_message_bytes {
                    let e = CommandError::ReplyTooLarge {
                        size,
                        limit: self.limits.max_message_bytes,
                    };
                    (self.error_reply(&request, &e), done.session, true)
                } else {
                    (reply, done.session, false)
                }
            }
            Err(e) => {
                tracing::debug!(command = %request.command, id = %request.id, error = %e, "openiap command failed");
                (self.error_reply(&request, &e), None, true)
            }
        };
        Handled {
            replies: vec![reply],
            session,
            failed,
        }
    }

    async fn run(&self, session: &Session, env: &pb::Envelope) -> Result<Done, CommandError> {
        let command = env.command.as_str();
        match command {
            "ping" => {
                let _: pb::PingRequest = unpack(env, "PingRequest")?;
                Ok(Done {
                    command: "pong".into(),
                    data: pack("PingResponse", &pb::PingResponse {}),
                    session: None,
                })
            }
            "signin" => self.signin(session, env).await,
            "beginstream" | "stream" | "endstream" => self.upload_part(session, env).await,
            c if USER_COMMANDS.contains(&c) => {
                let who = self.caller(session, env).await?;
                match self.live_command(command, &who, session, env).await {
                    Some(done) => done,
                    None => self.as_user(command, &who, env).await,
                }
            }
            other => Err(CommandError::UnknownCommand(other.to_owned())),
        }
    }

    /// The user a request runs as: its envelope's jwt, else the connection's sign-in.
    async fn caller(&self, session: &Session, env: &pb::Envelope) -> Result<Principal, CommandError> {
        if !env.jwt.is_empty() {
            return self.principal_of(&env.jwt).await;
        }
        // The connection's token, refreshed in place, else the session's.
        let current = session.conn.as_ref().and_then(|c| c.shared.signed_in());
        match current.as_ref().or(session.signed_in.as_ref()) {
            Some(s) => self.principal_of(&s.jwt).await,
            None => Err(CommandError::NotSignedIn),
        }
    }

    async fn principal_of(&self, token: &str) -> Result<Principal, CommandError> {
        let who = verify_token(&self.node, token).map_err(|e| CommandError::BadToken(e.detail))?;
        let node = self.node.clone();
        blocking(move || node.with_roles(who)).await
    }

    async fn signin(&self, current: &Session, env: &pb::Envelope) -> Result<Done, CommandError> {
        let req: pb::SigninRequest = unpack(env, "SigninRequest")?;
        let who = if !req.password.is_empty() {
            if req.username.is_empty() {
                return Err(CommandError::Invalid("signin: a password needs a username".into()));
            }
            self.node.authenticate(&req.username, &req.password).await?
        } else {
            // The Python client sends a token in `jwt`, or in `username` with no password.
            let token = if req.jwt.is_empty() { &req.username } else { &req.jwt };
            if token.is_empty() {
                return Err(CommandError::Invalid(
                    "signin needs a username and password, or a jwt".into(),
                ));
            }
            self.principal_of(token).await?
        };
        let lifetime = if req.longtoken {
            LONG_TOKEN_SECS
        } else {
            TOKEN_LIFETIME_SECS
        };
        let jwt = issue_token(&self.node, &who, lifetime).map_err(|e| CommandError::Internal(e.detail))?;
        let user = self.user_message(&who).await?;
        let session = (!req.validateonly).then(|| Session {
            signed_in: Some(SignedIn {
                user_id: who.id.clone(),
                username: user.username.clone(),
                jwt: jwt.clone(),
            }),
            conn: current.conn.clone(),
        });
        if let (Some(s), Some(conn)) = (&session, &current.conn) {
            *conn.shared.signed_in.lock().unwrap_or_else(|e| e.into_inner()) = s.signed_in.clone();
            self.start_refresh(conn, lifetime);
        }
        tracing::info!(user = %user.username, validateonly = req.validateonly, agent = %req.agent, "openiap signin");
        Ok(Done {
            command: "signinreply".into(),
            data: pack("SigninResponse", &pb::SigninResponse { jwt, user: Some(user) }),
            session,
        })
    }

    /// OpenCore's user shape: id, name, username, email and role names.
    async fn user_message(&self, who: &Principal) -> Result<pb::User, CommandError> {
        user_message(&self.node, who).await
    }
}

/// OpenCore's user shape: id, name, username, email and role names.
pub(super) async fn user_message(node: &Node, who: &Principal) -> Result<pb::User, CommandError> {
    let node = node.clone();
    let who = who.clone();
    blocking(move || {
        let doc = node.get("users", &who.id).ok();
        let field = |d: &Option<Value>, k: &str| {
            d.as_ref()
                .and_then(|d| d.get(k))
                .and_then(Value::as_str)
                .map(str::to_owned)
        };
        let roles = who
            .roles
            .iter()
            .map(|rid| {
                let name = field(&node.get("users", rid).ok(), "name").unwrap_or_else(|| match rid.as_str() {
                    acl::ADMINS_ROLE_ID => "admins".to_owned(),
                    acl::USERS_ROLE_ID => "users".to_owned(),
                    other => other.to_owned(),
                });
                pb::Role { id: rid.clone(), name }
            })
            .collect();
        Ok::<_, CommandError>(pb::User {
            id: who.id.clone(),
            name: field(&doc, "name").unwrap_or_else(|| who.name.clone()),
            username: field(&doc, "username").unwrap_or_else(|| who.name.clone()),
            email: field(&doc, "email").unwrap_or_default(),
            roles,
        })
    })
    .await
}

impl Dispatcher {
    async fn as_user(&self, command: &str, who: &Principal, env: &pb::Envelope) -> Result<Done, CommandError> {
        let node = &self.node;
        match command {
            "query" => {
                let r: pb::QueryRequest = unpack(env, "QueryRequest")?;
                let who = &queryas_principal(node, &r.queryas, who).await?;
                let q = query_of(&r)?;
                let (n, c, w) = (node.clone(), r.collectionname, who.clone());
                let docs = blocking(move || n.query_as(&c, &q, &w)).await?;
                Done::reply(
                    command,
                    pack(
                        "QueryResponse",
                        &pb::QueryResponse {
                            results: Value::Array(docs).to_string(),
                        },
                    ),
                )
            }
            "getdocumentversion" => {
                let r: pb::GetDocumentVersionRequest = unpack(env, "GetDocumentVersionRequest")?;
                let version = u64::try_from(r.version)
                    .map_err(|_| CommandError::Invalid(format!("version {} is negative", r.version)))?;
                let (n, c, w) = (node.clone(), r.collectionname, who.clone());
                let doc = blocking(move || n.version_as(&c, &r.id, version, &w)).await?;
                Done::reply(
                    command,
                    pack(
                        "GetDocumentVersionResponse",
                        &pb::GetDocumentVersionResponse {
                            result: doc.to_string(),
                        },
                    ),
                )
            }
            "count" => {
                let r: pb::CountRequest = unpack(env, "CountRequest")?;
                let who = &queryas_principal(node, &r.queryas, who).await?;
                let filter = filter_of("query", &r.query)?;
                let (n, c, w) = (node.clone(), r.collectionname, who.clone());
                let count = blocking(move || n.count_as(&c, &filter, &w)).await?;
                let result = i32::try_from(count).unwrap_or(i32::MAX);
                Done::reply(command, pack("CountResponse", &pb::CountResponse { result }))
            }
            "distinct" => {
                let r: pb::DistinctRequest = unpack(env, "DistinctRequest")?;
                let who = &queryas_principal(node, &r.queryas, who).await?;
                if r.field.is_empty() {
                    return Err(CommandError::Invalid("distinct needs a field".into()));
                }
                let filter = filter_of("query", &r.query)?;
                let (n, c, w) = (node.clone(), r.collectionname, who.clone());
                let values = blocking(move || n.distinct_as(&c, &r.field, &filter, &w)).await?;
                let results = values
                    .into_iter()
                    .map(|v| match v {
                        Value::String(s) => s,
                        other => other.to_string(),
                    })
                    .collect();
                Done::reply(command, pack("DistinctResponse", &pb::DistinctResponse { results }))
            }
            "insertone" => {
                let r: pb::InsertOneRequest = unpack(env, "InsertOneRequest")?;
                let item = convert::json_object("item", &r.item)?;
                let stored = node.insert(&r.collectionname, item, who).await?;
                Done::reply(
                    command,
                    pack(
                        "InsertOneResponse",
                        &pb::InsertOneResponse {
                            result: stored.to_string(),
                        },
                    ),
                )
            }
            "insertmany" => {
                let r: pb::InsertManyRequest = unpack(env, "InsertManyRequest")?;
                let items = convert::json_objects("items", &r.items)?;
                let stored = node.insert_many(&r.collectionname, items, who).await?;
                let results = if r.skipresults {
                    "[]".to_owned()
                } else {
                    Value::Array(stored).to_string()
                };
                Done::reply(command, pack("InsertManyResponse", &pb::InsertManyResponse { results }))
            }
            "updateone" => {
                let r: pb::UpdateOneRequest = unpack(env, "UpdateOneRequest")?;
                let item = convert::json_object("item", &r.item)?;
                let id = match item.get("_id") {
                    Some(Value::String(id)) => id.clone(),
                    _ => return Err(CommandError::Invalid("updateone: item needs a string _id".into())),
                };
                let stored = node.replace(&r.collectionname, &id, item, who).await?;
                Done::reply(
                    command,
                    pack(
                        "UpdateOneResponse",
                        &pb::UpdateOneResponse {
                            result: stored.to_string(),
                        },
                    ),
                )
            }
            "updatedocument" => {
                let r: pb::UpdateDocumentRequest = unpack(env, "UpdateDocumentRequest")?;
                let filter = filter_of("query", &r.query)?;
                let update = Value::Object(convert::json_object("document", &r.document)?);
                let changed = node.update_many(&r.collectionname, filter, update, who).await?;
                let n = i32::try_from(changed.len()).unwrap_or(i32::MAX);
                let opresult = pb::UpdateResult {
                    acknowledged: true,
                    matched_count: n,
                    modified_count: n,
                    upserted_count: 0,
                    upserted_id: String::new(),
                };
                Done::reply(
                    command,
                    pack(
                        "UpdateDocumentResponse",
                        &pb::UpdateDocumentResponse {
                            opresult: Some(opresult),
                        },
                    ),
                )
            }
            "insertorupdateone" => {
                let r: pb::InsertOrUpdateOneRequest = unpack(env, "InsertOrUpdateOneRequest")?;
                let item = convert::json_object("item", &r.item)?;
                let uniqueness = r
                    .uniqeness
                    .split(',')
                    .map(|f| f.trim().to_owned())
                    .filter(|f| !f.is_empty())
                    .collect();
                let stored = node.insert_or_update(&r.collectionname, item, uniqueness, who).await?;
                Done::reply(
                    command,
                    pack(
                        "InsertOrUpdateOneResponse",
                        &pb::InsertOrUpdateOneResponse {
                            result: stored.to_string(),
                        },
                    ),
                )
            }
            "deleteone" => {
                let r: pb::DeleteOneRequest = unpack(env, "DeleteOneRequest")?;
                if r.recursive {
                    return Err(CommandError::Unsupported("deleteone with recursive"));
                }
                if r.collectionname == files::FILES {
                    // Through the file API, which refuses a file a work item still lists.
                    node.delete_file(&r.id, who).await?;
                } else {
                    node.delete(&r.collectionname, &r.id, who).await?;
                }
                Done::reply(
                    command,
                    pack("DeleteOneResponse", &pb::DeleteOneResponse { affectedrows: 1 }),
                )
            }
            "deletemany" => {
                let r: pb::DeleteManyRequest = unpack(env, "DeleteManyRequest")?;
                if r.recursive {
                    return Err(CommandError::Unsupported("deletemany with recursive"));
                }
                if r.collectionname == files::FILES {
                    return Err(CommandError::Invalid(format!(
                        "deletemany on {}: delete files one at a time with deleteone, which checks \
                         that no work item still lists the file",
                        files::FILES
                    )));
                }
                let query = convert::json_object("query", &r.query)?;
                let filter = match (r.ids.is_empty(), query.is_empty()) {
                    (true, true) => {
                        return Err(CommandError::Invalid(
                            "deletemany needs a query or ids (use {\"_id\": {\"$exists\": true}} to mean all)".into(),
                        ));
                    }
                    (true, false) => Value::Object(query),
                    (false, true) => json!({"_id": {"$in": r.ids}}),
                    (false, false) => json!({"$and": [Value::Object(query), {"_id": {"$in": r.ids}}]}),
                };
                let filter = Filter::parse(&filter).map_err(|e| CommandError::Invalid(format!("query: {e}")))?;
                let deleted = node.delete_many(&r.collectionname, filter, who).await?;
                let affectedrows = i32::try_from(deleted.len()).unwrap_or(i32::MAX);
                Done::reply(
                    command,
                    pack("DeleteManyResponse", &pb::DeleteManyResponse { affectedrows }),
                )
            }
            "pushworkitem" => {
                let r: pb::PushWorkitemRequest = unpack(env, "PushWorkitemRequest")?;
                let queue = self.queue_name(&r.wiq, &r.wiqid, who).await?;
                let item = pb::Workitem {
                    name: r.name,
                    payload: r.payload,
                    priority: r.priority,
                    nextrun: r.nextrun,
                    files: r.files,
                    success_wiqid: r.success_wiqid,
                    failed_wiqid: r.failed_wiqid,
                    success_wiq: r.success_wiq,
                    failed_wiq: r.failed_wiq,
                    ..Default::default()
                };
                let mut pushed = self
                    .push_with_files(&queue, &[item], &pb::PushWorkitemsRequest::default(), who)
                    .await?;
                let workitem = pushed.pop().map(|d| convert::workitem(&d));
                Done::reply(
                    command,
                    pack("PushWorkitemResponse", &pb::PushWorkitemResponse { workitem }),
                )
            }
            "pushworkitems" => {
                let r: pb::PushWorkitemsRequest = unpack(env, "PushWorkitemsRequest")?;
                let queue = self.queue_name(&r.wiq, &r.wiqid, who).await?;
                let pushed = self.push_with_files(&queue, &r.items, &r, who).await?;
                let workitems = pushed.iter().map(convert::workitem).collect();
                Done::reply(
                    command,
                    pack("PushWorkitemsResponse", &pb::PushWorkitemsResponse { workitems }),
                )
            }
            "popworkitem" => {
                let r: pb::PopWorkitemRequest = unpack(env, "PopWorkitemRequest")?;
                let queue = self.queue_name(&r.wiq, &r.wiqid, who).await?;
                let item = node.pop_workitem(&queue, who, None).await?;
                let mut workitem = item.as_ref().map(convert::workitem);
                if let Some(w) = workitem.as_mut().filter(|_| r.includefiles) {
                    self.include_files(w, who).await.map_err(|e| e.popped(&w.id))?;
                }
                Done::reply(
                    command,
                    pack("PopWorkitemResponse", &pb::PopWorkitemResponse { workitem }),
                )
            }
            "updateworkitem" => {
                let r: pb::UpdateWorkitemRequest = unpack(env, "UpdateWorkitemRequest")?;
                let w = r
                    .workitem
                    .ok_or_else(|| CommandError::Invalid("updateworkitem needs a workitem".into()))?;
                // Files in the request or the item's list that the item does
                // not list yet (a popped item sent back lists its own).
                let added: Vec<pb::WorkitemFile> = w.files.iter().chain(&r.files).cloned().collect();
                let mut stored = Stored::default();
                if !added.is_empty() && matches!(w.state.as_str(), "processing" | "successful" | "failed" | "retry") {
                    let attached = self.attach_files(&w.id, &added, who, &mut stored).await;
                    if let Err(e) = attached {
                        self.forget_files(stored, who).await;
                        return Err(e);
                    }
                }
                let payload = if w.payload.trim().is_empty() {
                    None
                } else {
                    Some(convert::json_object("workitem.payload", &w.payload)?)
                };
                let nonempty = |s: &str| (!s.is_empty()).then(|| s.to_owned());
                let stored = node
                    .update_workitem(
                        &w.id,
                        &w.state,
                        nonempty(&w.errortype).as_deref(),
                        nonempty(&w.errormessage),
                        payload,
                        who,
                    )
                    .await?;
                Done::reply(
                    command,
                    pack(
                        "UpdateWorkitemResponse",
                        &pb::UpdateWorkitemResponse {
                            workitem: Some(convert::workitem(&stored)),
                        },
                    ),
                )
            }
            "deleteworkitem" => {
                let r: pb::DeleteWorkitemRequest = unpack(env, "DeleteWorkitemRequest")?;
                node.delete_workitem(&r.id, who).await?;
                Done::reply(command, pack("DeleteWorkitemResponse", &pb::DeleteWorkitemResponse {}))
            }
            "addworkitemqueue" => {
                let r: pb::AddWorkItemQueueRequest = unpack(env, "AddWorkItemQueueRequest")?;
                let stored = node.add_queue(convert::add_queue_doc(&r), who).await?;
                Done::reply(
                    command,
                    pack(
                        "AddWorkItemQueueResponse",
                        &pb::AddWorkItemQueueResponse {
                            workitemqueue: Some(convert::workitemqueue(&stored)),
                        },
                    ),
                )
            }
            "updateworkitemqueue" => {
                let r: pb::UpdateWorkItemQueueRequest = unpack(env, "UpdateWorkItemQueueRequest")?;
                let q = r
                    .workitemqueue
                    .ok_or_else(|| CommandError::Invalid("updateworkitemqueue needs a workitemqueue".into()))?;
                // By id when given (so a queue can be renamed), else by name.
                let current = if q.id.is_empty() {
                    self.queue_name(&q.name, "", who).await?
                } else {
                    self.queue_name("", &q.id, who).await?
                };
                // OpenCore's purge: the queue's items are deleted first.
                if r.purge {
                    node.purge_queue(&current, false, who).await?;
                }
                let mut doc = convert::queue_doc(&q);
                doc.entry("name").or_insert_with(|| current.clone().into());
                let stored = node.update_queue(&current, doc, who).await?;
                Done::reply(
                    command,
                    pack(
                        "UpdateWorkItemQueueResponse",
                        &pb::UpdateWorkItemQueueResponse {
                            workitemqueue: Some(convert::workitemqueue(&stored)),
                        },
                    ),
                )
            }
            "deleteworkitemqueue" => {
                let r: pb::DeleteWorkItemQueueRequest = unpack(env, "DeleteWorkItemQueueRequest")?;
                let queue = self.queue_name(&r.wiq, &r.wiqid, who).await?;
                if r.purge {
                    node.purge_queue(&queue, true, who).await?;
                } else {
                    node.delete_queue(&queue, who).await?;
                }
                Done::reply(
                    command,
                    pack("DeleteWorkItemQueueResponse", &pb::DeleteWorkItemQueueResponse {}),
                )
            }
            other => Err(CommandError::UnknownCommand(other.to_owned())),
        }
    }

    /// Pushes `items` onto `queue`, their file content stored first (with
    /// the queue's ACL) and deleted again if the push fails.
    async fn push_with_files(
        &self,
        queue: &str,
        items: &[pb::Workitem],
        defaults: &pb::PushWorkitemsRequest,
        who: &Principal,
    ) -> Result<Vec<Value>, CommandError> {
        // Only content needs the ACL (and the queue, which the push reads anyway).
        let acl = if items.iter().any(|i| workitem_files::any_content(&i.files)) {
            self.queue_file_acl(queue, who).await?
        } else {
            Value::Null
        };
        let mut stored = Stored::default();
        let pushed = async {
            let mut docs = Vec::with_capacity(items.len());
            for item in items {
                // The item is checked before its files are stored.
                let mut doc = item_doc(item, defaults)?;
                let files = self.store_files(&item.files, &acl, who, &mut stored).await?;
                if !files.is_empty() {
                    doc.insert("files".into(), Value::Array(files));
                }
                docs.push(doc);
            }
            Ok::<_, CommandError>(self.node.push_workitems(queue, docs, who).await?)
        }
        .await;
        if pushed.is_err() {
            self.forget_files(stored, who).await;
        }
        pushed
    }

    /// Stores `added` with item `id`'s ACL and appends their references to
    /// the item's `files`, before the item is finished (so routing copies them).
    async fn attach_files(
        &self,
        id: &str,
        added: &[pb::WorkitemFile],
        who: &Principal,
        stored: &mut Stored,
    ) -> Result<(), CommandError> {
        let (n, i, w) = (self.node.clone(), id.to_owned(), who.clone());
        let item = blocking(move || n.get_as(workitems::ITEMS, &i, &w)).await?;
        let mut files = item.get("files").and_then(Value::as_array).cloned().unwrap_or_default();
        let listed: Vec<&str> = files
            .iter()
            .filter_map(|f| f.get("_id").and_then(Value::as_str))
            .collect();
        let added: Vec<pb::WorkitemFile> = added
            .iter()
            .filter(|f| f.id.is_empty() || !listed.contains(&f.id.as_str()))
            .cloned()
            .collect();
        if added.is_empty() {
            return Ok(());
        }
        let acl = self.item_file_acl(&item, who)?;
        files.extend(self.store_files(&added, &acl, who, stored).await?);
        self.node
            .update(workitems::ITEMS, id, json!({"$set": {"files": files}}), who)
            .await?;
        Ok(())
    }

    /// A queue's name from `wiq`, or from the id of its document when only `wiqid` is given.
    async fn queue_name(&self, wiq: &str, wiqid: &str, who: &Principal) -> Result<String, CommandError> {
        if !wiq.is_empty() {
            return Ok(wiq.to_owned());
        }
        if wiqid.is_empty() {
            return Err(CommandError::Invalid(
                "give the queue's name (wiq) or id (wiqid)".into(),
            ));
        }
        let (n, id, w) = (self.node.clone(), wiqid.to_owned(), who.clone());
        let doc = blocking(move || n.get_as(workitems::QUEUES, &id, &w)).await?;
        match doc.get("name").and_then(Value::as_str) {
            Some(name) => Ok(name.to_owned()),
            None => Err(CommandError::Invalid(format!("{wiqid} is not a work item queue"))),
        }
    }
}

/// Whom a read with `queryas` runs as (OpenCore's "query as another user
/// or role"): the caller when empty or its own id; otherwise only an admin
/// may ask, and the read runs as that user or role with its roles resolved,
/// so it sees exactly what they would.
pub(super) async fn queryas_principal(node: &Node, queryas: &str, who: &Principal) -> Result<Principal, CommandError> {
    if queryas.is_empty() || queryas == who.id {
        return Ok(who.clone());
    }
    if !who.is_admin() {
        return Err(CommandError::Node {
            message: format!("queryas {queryas:?}: only admins may read as another user or role"),
            code: 403,
        });
    }
    let (n, id) = (node.clone(), queryas.to_owned());
    blocking(move || {
        let doc = n.get("users", &id).map_err(|_| ReadError::NotFound {
            collection: "users".into(),
            id: id.clone(),
        })?;
        let name = doc.get("name").and_then(Value::as_str).unwrap_or_default().to_owned();
        n.with_roles(Principal {
            id,
            name,
            roles: Vec::new(),
        })
    })
    .await
    .map_err(|e| match e {
        CommandError::Node { code: 404, .. } => {
            CommandError::Invalid(format!("queryas {queryas:?} names no user or role"))
        }
        other => other,
    })
}

fn filter_of(field: &'static str, text: &str) -> Result<Filter, CommandError> {
    let v = Value::Object(convert::json_object(field, text)?);
    Filter::parse(&v).map_err(|e| CommandError::Invalid(format!("{field}: {e}")))
}

/// OpenIAP's query fields as the node's query.
fn query_of(r: &pb::QueryRequest) -> Result<Query, CommandError> {
    let mut q = Map::new();
    q.insert("query".into(), Value::Object(convert::json_object("query", &r.query)?));
    match convert::json_text("projection", &r.projection, Value::Null)? {
        Value::Null => {}
        Value::Object(p) if p.is_empty() => {}
        p @ Value::Object(_) => {
            q.insert("projection".into(), p);
        }
        other => {
            return Err(CommandError::Invalid(format!(
                "projection must be a JSON object, not {other}"
            )));
        }
    }
    // orderby: JSON object, JSON string, or a bare field name; "null" is none.
    let orderby = r.orderby.trim();
    if !orderby.is_empty() {
        match serde_json::from_str::<Value>(orderby) {
            Ok(Value::Null) => {}
            Ok(Value::Object(o)) if o.is_empty() => {}
            Ok(o @ Value::Object(_)) => {
                q.insert("orderby".into(), o);
            }
            Ok(Value::String(field)) if !field.is_empty() => {
                q.insert("orderby".into(), json!({ field: 1 }));
            }
            Ok(other) => {
                return Err(CommandError::Invalid(format!(
                    "orderby must be a JSON object or a field name, not {other}"
                )));
            }
            Err(_) => {
                q.insert("orderby".into(), json!({ orderby: 1 }));
            }
        }
    }
    if r.top > 0 {
        q.insert("top".into(), r.top.into());
    }
    match r.skip {
        0 => {}
        s if s > 0 => {
            q.insert("skip".into(), s.into());
        }
        s => return Err(CommandError::Invalid(format!("skip {s} is negative"))),
    }
    Query::from_json(&Value::Object(q)).map_err(|e| CommandError::Invalid(e.to_string()))
}

/// A work item to push, from an OpenIAP `Workitem` with the request's
/// defaults (priority, nextrun, routing) filling what the item leaves
/// empty; without its files (see `push_with_files`).
fn item_doc(w: &pb::Workitem, defaults: &pb::PushWorkitemsRequest) -> Result<Map<String, Value>, CommandError> {
    let mut doc = Map::new();
    convert::put_text(&mut doc, "name", &w.name);
    doc.insert(
        "payload".into(),
        Value::Object(convert::json_object("payload", &w.payload)?),
    );
    let priority = if w.priority != 0 { w.priority } else { defaults.priority };
    if priority != 0 {
        doc.insert("priority".into(), priority.into());
    }
    if let Some(t) = w.nextrun.as_ref().or(defaults.nextrun.as_ref()) {
        doc.insert("nextrun".into(), convert::timestamp_to_iso("nextrun", t)?.into());
    }
    let or = |a: &str, b: &str| if a.is_empty() { b.to_owned() } else { a.to_owned() };
    convert::put_text(&mut doc, "success_wiq", &or(&w.success_wiq, &defaults.success_wiq));
    convert::put_text(&mut doc, "failed_wiq", &or(&w.failed_wiq, &defaults.failed_wiq));
    convert::put_text(
        &mut doc,
        "success_wiqid",
        &or(&w.success_wiqid, &defaults.success_wiqid),
    );
    convert::put_text(&mut doc, "failed_wiqid", &or(&w.failed_wiqid, &defaults.failed_wiqid));
    Ok(doc)
}

/// Decodes a request's `data` as `expected` (`openiap.<expected>`). No data
/// is the empty message; a type URL naming another type is refused.
pub fn unpack<M: Message + Default>(env: &pb::Envelope, expected: &'static str) -> Result<M, CommandError> {
    let Some(any) = &env.data else {
        return Ok(M::default());
    };
    if !any.type_url.is_empty() {
        let name = any.type_url.rsplit('/').next().unwrap_or_default();
        if name.strip_prefix("openiap.") != Some(expected) {
            return Err(CommandError::WrongType {
                command: env.command.clone(),
                expected,
                got: any.type_url.clone(),
            });
        }
    }
    M::decode(any.value.as_slice()).map_err(|e| CommandError::BadData {
        command: env.command.clone(),
        expected,
        reason: e.to_string(),
    })
}

/// Runs a synchronous store read on the blocking pool.
pub(super) async fn blocking<T, E>(f: impl FnOnce() -> Result<T, E> + Send + 'static) -> Result<T, CommandError>
where
    T: Send + 'static,
    E: Into<CommandError> + Send + 'static,
{
    match tokio::task::spawn_blocking(f).await {
        Ok(r) => r.map_err(Into::into),
        Err(e) => Err(CommandError::Internal(format!("read task failed: {e}"))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ocmesh_node::NodeConfig;

    fn dispatcher(limits: GrpcLimits) -> (Dispatcher, tempfile::TempDir) {
        let dir = tempfile::tempdir().expect("tempdir");
        let opened = ocmesh_node::Node::open(NodeConfig {
            data_dir: dir.path().to_path_buf(),
            site: "a".into(),
            admin_password: Some("pw".into()),
        })
        .expect("open node");
        (Dispatcher::new(opened.node, limits), dir)
    }

    fn request<M: Message>(command: &str, id: &str, type_name: &str, msg: &M) -> pb::Envelope {
        pb::Envelope {
            command: command.into(),
            id: id.into(),
            data: Some(pack(type_name, msg)),
            ..Default::default()
        }
    }

    fn only(h: Handled) -> pb::Envelope {
        assert_eq!(h.replies.len(), 1, "one reply per request");
        h.replies.into_iter().next().expect("one reply")
    }

    fn error_of(reply: &pb::Envelope) -> pb::ErrorResponse {
        assert_eq!(reply.command, "error", "{reply:?}");
        let any = reply.data.as_ref().expect("error data");
        assert_eq!(any.type_url, "type.googleapis.com/openiap.ErrorResponse");
        pb::ErrorResponse::decode(any.value.as_slice()).expect("ErrorResponse")
    }

    async fn signed_in(d: &Dispatcher) -> Session {
        let h = d
            .handle(
                &Session::default(),
                request(
                    "signin",
                    "1",
                    "SigninRequest",
                    &pb::SigninRequest {
                        username: "admin".into(),
                        password: "pw".into(),
                        ..Default::default()
                    },
                ),
            )
            .await;
        let session = h.session.clone().expect("signin sets the session");
        assert_eq!(only(h).command, "signinreply");
        session
    }

    #[tokio::test]
    async fn unknown_commands_and_bad_data_get_errors_naming_them() {
        let (d, _dir) = dispatcher(GrpcLimits::default());
        let reply = only(
            d.handle(
                &Session::default(),
                request("frobnicate", "7", "PingRequest", &pb::PingRequest {}),
            )
            .await,
        );
        assert_eq!(reply.rid, "7");
        let e = error_of(&reply);
        assert!(e.message.contains("\"frobnicate\""), "{}", e.message);
        assert_eq!(e.code, 400);

        let garbage = pb::Envelope {
            command: "signin".into(),
            id: "8".into(),
            data: Some(Any {
                type_url: "type.googleapis.com/openiap.SigninRequest".into(),
                value: vec![0xff, 0xff, 0xff],
            }),
            ..Default::default()
        };
        let e = error_of(&only(d.handle(&Session::default(), garbage).await));
        assert!(
            e.message.contains("does not decode as openiap.SigninRequest"),
            "{}",
            e.message
        );

        let wrong = request("signin", "9", "QueryRequest", &pb::QueryRequest::default());
        let e = error_of(&only(d.handle(&Session::default(), wrong).await));
        assert!(e.message.contains("expected openiap.SigninRequest"), "{}", e.message);
    }

    #[tokio::test]
    async fn user_commands_need_a_sign_in_and_bad_input_writes_nothing() {
        let (d, _dir) = dispatcher(GrpcLimits::default());
        let insert = |item: &str| {
            request(
                "insertone",
                "2",
                "InsertOneRequest",
                &pb::InsertOneRequest {
                    collectionname: "entities".into(),
                    item: item.into(),
                    ..Default::default()
                },
            )
        };
        let e = error_of(&only(d.handle(&Session::default(), insert(r#"{"a":1}"#)).await));
        assert_eq!(e.code, 401, "{}", e.message);
        let session = signed_in(&d).await;
        let e = error_of(&only(d.handle(&session, insert("{not json")).await));
        assert!(e.message.starts_with("item is not valid JSON"), "{}", e.message);
        let count = request(
            "count",
            "3",
            "CountRequest",
            &pb::CountRequest {
                collectionname: "entities".into(),
                query: "{}".into(),
                ..Default::default()
            },
        );
        let reply = only(d.handle(&session, count).await);
        assert_eq!(reply.command, "countreply");
        let n = pb::CountResponse::decode(reply.data.expect("data").value.as_slice()).expect("CountResponse");
        assert_eq!(n.result, 0, "the refused insert wrote nothing");
    }

    #[tokio::test]
    async fn oversized_requests_and_replies_become_errors() {
        let limits = GrpcLimits {
            max_message_bytes: 2048,
            ..GrpcLimits::default()
        };
        let (d, _dir) = dispatcher(limits);
        let session = signed_in(&d).await;
        let big = "x".repeat(4096);
        let e = error_of(&only(
            d.handle(
                &session,
                request(
                    "ping",
                    "1",
                    "PingRequest",
                    &pb::QueryRequest {
                        query: big.clone(),
                        ..Default::default()
                    },
                ),
            )
            .await,
        ));
        assert_eq!(e.code, 413, "{}", e.message);
        // Two inserts under the limit, whose query reply together is over it.
        for _ in 0..2 {
            let item = json!({"blob": "y".repeat(1200)}).to_string();
            let r = only(
                d.handle(
                    &session,
                    request(
                        "insertone",
                        "2",
                        "InsertOneRequest",
                        &pb::InsertOneRequest {
                            collectionname: "entities".into(),
                            item,
                            ..Default::default()
                        },
                    ),
                )
                .await,
            );
            assert_eq!(r.command, "insertonereply");
        }
        let q = request(
            "query",
            "3",
            "QueryRequest",
            &pb::QueryRequest {
                collectionname: "entities".into(),
                query: "{}".into(),
                ..Default::default()
            },
        );
        let e = error_of(&only(d.handle(&session, q).await));
        assert!(e.message.contains("reply of"), "{}", e.message);
    }
}
