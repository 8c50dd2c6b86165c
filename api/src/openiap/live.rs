//! What a connection keeps running between its requests: watches (change
//! streams), consumers of message queues, the token refresher, and the
//! node-wide registry of live connections (`getclients`).
//!
//! Invariants: every event a server pushes goes through the connection's
//! bounded event queue (`GrpcLimits::event_queue`); a watch whose events
//! find that queue full for `watch_stall` is dropped (logged, counted, and
//! announced with an `error` envelope if room comes back within 5 s), so a slow
//! client never holds more than its queue and never slows the node (watches
//! read the change log at their own pace); a queue consumer waits instead,
//! leaving messages in the broker. Closing a connection aborts all of its
//! tasks and deletes the temporary queues it made. The registry holds at
//! most one entry per open stream (`max_connections` bounds both).

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, SystemTime};

use prost_types::Any;
use serde_json::{Value, json};
use tokio::sync::mpsc;
use tokio::task::AbortHandle;

use ocmesh_node::messaging::{Broker, Message as MqMessage};
use ocmesh_node::query::Filter;
use ocmesh_node::{Node, Principal, acl};
use ocmesh_proto::federation::{Change, ChangeKind};
use ocmesh_proto::openiap as pb;
use ocmesh_replication::{RangeRequest, RangeSet};

use super::convert::pack;
use super::dispatch::SignedIn;

/// Events a server pushes to one connection, in order.
pub type Events = mpsc::Receiver<pb::Envelope>;

/// Counters of pushed events.
#[derive(Debug, Default)]
pub struct LiveStats {
    pub watch_events: AtomicU64,
    pub queue_events: AtomicU64,
    pub refreshes: AtomicU64,
    /// Watches ended because their client did not keep up.
    pub watches_dropped: AtomicU64,
    /// Watch events over the message limit, skipped.
    pub events_too_large: AtomicU64,
    /// Refilled changes read for watches, and refill notices watches
    /// fell too far behind to read.
    pub watch_refills: AtomicU64,
    pub watch_refills_missed: AtomicU64,
}

/// The part of a connection its background tasks share.
#[derive(Debug)]
pub(crate) struct Shared {
    pub(crate) id: u64,
    events: mpsc::Sender<pb::Envelope>,
    next_event: AtomicU64,
    pub(crate) signed_in: Mutex<Option<SignedIn>>,
}

impl Shared {
    pub(crate) fn event(&self, command: &str, data: Any) -> pb::Envelope {
        let n = self.next_event.fetch_add(1, Ordering::Relaxed);
        pb::Envelope {
            command: command.into(),
            id: format!("e{}-{n}", self.id),
            data: Some(data),
            ..Default::default()
        }
    }

    pub(crate) fn signed_in(&self) -> Option<SignedIn> {
        lock(&self.signed_in).clone()
    }

    /// An envelope answering request `rid` (a streamed reply or chunk).
    pub(crate) fn answer(&self, command: &str, rid: &str, data: Any) -> pb::Envelope {
        pb::Envelope {
            rid: rid.to_owned(),
            ..self.event(command, data)
        }
    }

    /// Queues an event, waiting for room; false when the connection is gone.
    pub(crate) async fn push(&self, ev: pb::Envelope) -> bool {
        self.events.send(ev).await.is_ok()
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

#[derive(Debug, Default)]
struct Tasks {
    watches: HashMap<String, AbortHandle>,
    /// Queue name → (consumer task, made by this connection without a name).
    queues: HashMap<String, (AbortHandle, bool)>,
    refresh: Option<AbortHandle>,
}

/// A file `upload` in progress, keyed by the upload request's id.
#[derive(Debug)]
pub(crate) struct UploadState {
    pub upload: ocmesh_node::files::Upload,
    pub filename: String,
    pub mimetype: String,
    pub who: Principal,
    pub started: std::time::Instant,
    pub chunks: u64,
    /// A part failed (and an error answered the upload): later parts are
    /// ignored, and `endstream` closes it quietly.
    pub failed: bool,
}

/// One live OpenIAP connection (a gRPC stream or a WebSocket).
#[derive(Debug)]
pub struct Connection {
    pub(crate) shared: Arc<Shared>,
    pub transport: String,
    pub peer: String,
    pub connected: SystemTime,
    tasks: Mutex<Tasks>,
    next_watch: AtomicU64,
    uploads: Mutex<HashMap<String, UploadState>>,
}

impl Connection {
    pub(crate) fn new(id: u64, transport: &str, peer: &str, queue: usize) -> (Arc<Connection>, Events) {
        let (tx, rx) = mpsc::channel(queue.max(1));
        let conn = Connection {
            shared: Arc::new(Shared {
                id,
                events: tx,
                next_event: AtomicU64::new(1),
                signed_in: Mutex::new(None),
            }),
            transport: transport.to_owned(),
            peer: peer.to_owned(),
            connected: SystemTime::now(),
            tasks: Mutex::new(Tasks::default()),
            next_watch: AtomicU64::new(1),
            uploads: Mutex::new(HashMap::new()),
        };
        (Arc::new(conn), rx)
    }

    pub fn id(&self) -> u64 {
        self.shared.id
    }

    /// Watches still running (one that was dropped has ended on its own).
    pub(crate) fn watch_count(&self) -> usize {
        let mut t = lock(&self.tasks);
        t.watches.retain(|_, h| !h.is_finished());
        t.watches.len()
    }

    pub(crate) fn queue_count(&self) -> usize {
        lock(&self.tasks).queues.len()
    }

    pub(crate) fn has_queue(&self, name: &str) -> bool {
        lock(&self.tasks).queues.contains_key(name)
    }

    /// Starts a watch; returns its id.
    pub(crate) fn start_watch(&self, w: WatchSpec) -> String {
        let id = format!(
            "w{}-{}",
            self.shared.id,
            self.next_watch.fetch_add(1, Ordering::Relaxed)
        );
        // From here on: changes committed after this reply are sent.
        let mut vv = w.node.subscribe();
        let mut seen = vv.borrow_and_update().clone();
        let mut fills = w.node.subscribe_fills();
        let mut fills_seen = *fills.borrow_and_update();
        // Withheld stubs this watch passed over: if a peer later refills
        // one, the change lands below the vector and comes as a notice.
        let mut stubs = RangeSet::new();
        let (conn, wid) = (self.shared.clone(), id.clone());
        let task = async move {
            loop {
                loop {
                    let (node, after, who) = (w.node.clone(), seen.clone(), w.who.clone());
                    let read = tokio::task::spawn_blocking(move || {
                        let changes = node.changes_since(&after, WATCH_BATCH, WATCH_BATCH_BYTES)?;
                        let who = node.with_roles(who)?;
                        Ok::<_, ocmesh_node::ReadError>((changes, who))
                    })
                    .await;
                    let (changes, who) = match read {
                        Ok(Ok(r)) => r,
                        Ok(Err(e)) => {
                            return end_watch(&conn, &wid, &format!("cannot read changes: {e}"), w.stall).await;
                        }
                        Err(e) => return end_watch(&conn, &wid, &format!("change reader failed: {e}"), w.stall).await,
                    };
                    if changes.is_empty() {
                        break;
                    }
                    for c in &changes {
                        seen.advance(&c.origin, c.seq);
                        if c.withheld && stubs.len() < MAX_STUBS_FOLLOWED {
                            stubs.insert(&c.origin, c.seq);
                        }
                    }
                    if !deliver(&conn, &wid, &w, changes, &who).await {
                        return;
                    }
                }
                if !stubs.is_empty() && *fills.borrow_and_update() != fills_seen {
                    match refilled(&w, &mut stubs, &mut fills_seen).await {
                        Ok(Some((changes, who))) => {
                            if !deliver(&conn, &wid, &w, changes, &who).await {
                                return;
                            }
                        }
                        Ok(None) => {}
                        Err(e) => {
                            return end_watch(&conn, &wid, &format!("cannot read refilled changes: {e}"), w.stall)
                                .await;
                        }
                    }
                }
                tokio::select! {
                    changed = vv.changed() => if changed.is_err() { return }, // the node closed
                    changed = fills.changed() => if changed.is_err() { return },
                }
            }
        };
        let mut tasks = lock(&self.tasks);
        let handle = tokio::spawn(task).abort_handle();
        tasks.watches.insert(id.clone(), handle);
        id
    }

    /// Stops a watch; false when this connection has none by that id.
    pub(crate) fn stop_watch(&self, id: &str) -> bool {
        match lock(&self.tasks).watches.remove(id) {
            Some(h) => {
                h.abort();
                true
            }
            None => false,
        }
    }

    /// Forwards a queue's deliveries as `queueevent`s.
    pub(crate) fn start_consumer(
        &self,
        queue: String,
        temporary: bool,
        rx: mpsc::Receiver<MqMessage>,
        stats: Arc<LiveStats>,
    ) {
        let handle = tokio::spawn(run_consumer(self.shared.clone(), queue.clone(), rx, stats)).abort_handle();
        if let Some((old, _)) = lock(&self.tasks).queues.insert(queue, (handle, temporary)) {
            old.abort();
        }
    }

    /// Stops consuming `queue`; `Some(temporary)` if it was consumed here.
    pub(crate) fn stop_consumer(&self, queue: &str) -> Option<bool> {
        lock(&self.tasks).queues.remove(queue).map(|(h, temp)| {
            h.abort();
            temp
        })
    }

    /// Registers an upload; false when `max` are open already.
    pub(crate) fn begin_upload(&self, id: String, state: UploadState, max: usize) -> bool {
        let mut u = lock(&self.uploads);
        if u.len() >= max {
            return false;
        }
        u.insert(id, state);
        true
    }

    /// Takes an upload out (to write to it without holding the lock).
    pub(crate) fn take_upload(&self, id: &str) -> Option<UploadState> {
        lock(&self.uploads).remove(id)
    }

    pub(crate) fn put_upload(&self, id: String, state: UploadState) {
        lock(&self.uploads).insert(id, state);
    }

    pub(crate) fn set_refresh(&self, handle: AbortHandle) {
        if let Some(old) = lock(&self.tasks).refresh.replace(handle) {
            old.abort();
        }
    }

    /// Aborts every task; returns the temporary queues to delete.
    pub(crate) fn close(&self) -> Vec<String> {
        // Unfinished uploads leave only unnamed chunks behind.
        lock(&self.uploads).clear();
        let mut t = lock(&self.tasks);
        for (_, h) in t.watches.drain() {
            h.abort();
        }
        if let Some(h) = t.refresh.take() {
            h.abort();
        }
        t.queues
            .drain()
            .filter_map(|(name, (h, temp))| {
                h.abort();
                temp.then_some(name)
            })
            .collect()
    }

    /// This connection as `getclients` lists it.
    pub(crate) fn describe(&self) -> Value {
        let who = self.shared.signed_in();
        let connected = chrono_like(self.connected);
        let t = lock(&self.tasks);
        json!({
            "id": self.shared.id.to_string(),
            "transport": self.transport,
            "remoteip": self.peer,
            "user": who.as_ref().map(|s| json!({"_id": s.user_id, "username": s.username})),
            "username": who.as_ref().map(|s| s.username.clone()),
            "connected": connected,
            "watches": t.watches.len(),
            "queues": t.queues.keys().collect::<Vec<_>>(),
        })
    }
}

impl Drop for Connection {
    fn drop(&mut self) {
        // Safety net: `close` normally ran already.
        let _ = self.close();
    }
}

/// RFC 3339 UTC time of `t`, to the millisecond.
fn chrono_like(t: SystemTime) -> String {
    let d = t.duration_since(SystemTime::UNIX_EPOCH).unwrap_or_default();
    let ts = prost_types::Timestamp {
        seconds: i64::try_from(d.as_secs()).unwrap_or(i64::MAX),
        nanos: i32::try_from(d.subsec_millis() * 1_000_000).unwrap_or(0),
    };
    super::convert::timestamp_to_iso("connected", &ts).unwrap_or_default()
}

/// What a watch follows.
#[derive(Debug)]
pub(crate) struct WatchSpec {
    pub node: Node,
    /// The watcher, roles resolved again for every batch of changes.
    pub who: Principal,
    pub collection: String,
    /// A document is sent when it matches any (none: every document).
    pub filters: Vec<Filter>,
    pub stall: Duration,
    pub max_message_bytes: usize,
    pub stats: Arc<LiveStats>,
}

const WATCH_BATCH: usize = 256;
const WATCH_BATCH_BYTES: usize = 4 << 20;

/// Sends the events of one batch of changes; false when the watch ended.
/// Withheld stubs a watch follows at most (each a range entry; contiguous
/// stubs share one).
const MAX_STUBS_FOLLOWED: u64 = 10_000;

/// The changes that refilled stubs in `stubs` since `fills_seen`, with the
/// watcher's roles; the refilled stubs are no longer followed.
async fn refilled(
    w: &WatchSpec,
    stubs: &mut RangeSet,
    fills_seen: &mut u64,
) -> Result<Option<(Vec<Change>, Principal)>, String> {
    let news = w.node.fills_since(*fills_seen);
    *fills_seen = news.generation;
    if news.missed > 0 {
        w.stats.watch_refills_missed.fetch_add(news.missed, Ordering::Relaxed);
        tracing::warn!(
            groups = news.missed,
            "a watch fell behind the refill notices; refilled changes may be missing from it"
        );
    }
    // Walk the stubs (bounded), not the notice's ranges (which may be long).
    let mut wanted = Vec::new();
    for (origin, first, last) in stubs.ranges() {
        for seq in first..=last {
            if news.ranges.contains(origin, seq) {
                wanted.push((origin.to_owned(), seq, seq));
            }
        }
    }
    for (origin, seq, _) in &wanted {
        stubs.remove(origin, *seq);
    }
    if wanted.is_empty() {
        return Ok(None);
    }
    let (node, who, n) = (w.node.clone(), w.who.clone(), wanted.len());
    let read = tokio::task::spawn_blocking(move || {
        let changes = node.read_change_ranges(&RangeRequest {
            ranges: wanted,
            max_changes: n,
            max_bytes: usize::MAX,
        })?;
        Ok::<_, ocmesh_node::ReadError>((changes, node.with_roles(who)?))
    })
    .await;
    match read {
        Ok(Ok((changes, who))) => {
            w.stats.watch_refills.fetch_add(changes.len() as u64, Ordering::Relaxed);
            Ok(Some((changes, who)))
        }
        Ok(Err(e)) => Err(e.to_string()),
        Err(e) => Err(e.to_string()),
    }
}

async fn deliver(conn: &Shared, id: &str, w: &WatchSpec, changes: Vec<Change>, who: &Principal) -> bool {
    for c in changes {
        if c.collection != w.collection {
            continue;
        }
        let Ok(doc) = serde_json::from_slice::<Value>(&c.body) else {
            continue;
        };
        if !acl::allowed(&doc, who, acl::READ) {
            continue;
        }
        if !w.filters.is_empty() && !w.filters.iter().any(|f| f.matches(&doc)) {
            continue;
        }
        let operation = match ChangeKind::try_from(c.kind) {
            Ok(ChangeKind::Insert) => "insert",
            Ok(ChangeKind::Delete) => "delete",
            _ => "update",
        };
        let body = pb::WatchEvent {
            id: id.to_owned(),
            operation: operation.into(),
            document: doc.to_string(),
        };
        let ev = conn.event("watchevent", pack("WatchEvent", &body));
        if prost::Message::encoded_len(&ev) > w.max_message_bytes {
            w.stats.events_too_large.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(watch = %id, doc = %c.doc_id, "watch event over the message limit, skipped");
            continue;
        }
        match conn.events.send_timeout(ev, w.stall).await {
            Ok(()) => {
                w.stats.watch_events.fetch_add(1, Ordering::Relaxed);
            }
            Err(mpsc::error::SendTimeoutError::Timeout(_)) => {
                w.stats.watches_dropped.fetch_add(1, Ordering::Relaxed);
                let why = format!(
                    "watch {id} dropped: the client did not take its events for {} ms",
                    w.stall.as_millis()
                );
                end_watch(conn, id, &why, w.stall).await;
                return false;
            }
            Err(mpsc::error::SendTimeoutError::Closed(_)) => return false,
        }
    }
    true
}

/// Logs why a watch ended and tells the client, if room comes back in time.
async fn end_watch(conn: &Shared, id: &str, why: &str, wait: Duration) {
    tracing::warn!(connection = conn.id, watch = %id, reason = %why, "openiap watch ended");
    let body = pb::ErrorResponse {
        message: why.to_owned(),
        code: 503,
        stack: String::new(),
    };
    let _ = conn
        .events
        .send_timeout(
            conn.event("error", pack("ErrorResponse", &body)),
            wait.max(Duration::from_secs(5)),
        )
        .await;
}

async fn run_consumer(conn: Arc<Shared>, queue: String, mut rx: mpsc::Receiver<MqMessage>, stats: Arc<LiveStats>) {
    while let Some(m) = rx.recv().await {
        let body = pb::QueueEvent {
            queuename: queue.clone(),
            correlation_id: m.correlation_id.unwrap_or_default(),
            replyto: m.reply_to.unwrap_or_default(),
            routingkey: String::new(),
            exchangename: String::new(),
            data: String::from_utf8_lossy(&m.body).into_owned(),
        };
        if conn
            .events
            .send(conn.event("queueevent", pack("QueueEvent", &body)))
            .await
            .is_err()
        {
            return;
        }
        stats.queue_events.fetch_add(1, Ordering::Relaxed);
    }
}

/// Live connections by id (weak: a closed connection leaves on its own).
#[derive(Debug, Default)]
pub(crate) struct Registry {
    map: Mutex<HashMap<u64, Weak<Connection>>>,
}

impl Registry {
    pub(crate) fn add(&self, conn: &Arc<Connection>, bound: usize) -> bool {
        let mut m = lock(&self.map);
        m.retain(|_, c| c.strong_count() > 0);
        if m.len() >= bound {
            return false;
        }
        m.insert(conn.id(), Arc::downgrade(conn));
        true
    }

    pub(crate) fn remove(&self, id: u64) {
        lock(&self.map).remove(&id);
    }

    pub(crate) fn live(&self) -> Vec<Arc<Connection>> {
        let mut v: Vec<_> = lock(&self.map).values().filter_map(Weak::upgrade).collect();
        v.sort_by_key(|c| c.id());
        v
    }
}

/// Deletes temporary queues a closed connection made.
pub(crate) async fn delete_queues(broker: Option<Broker>, queues: Vec<String>) {
    let Some(broker) = broker else { return };
    for q in queues {
        if let Err(e) = broker.delete_queue(&q).await {
            tracing::debug!(queue = %q, error = %e, "temporary queue already gone");
        }
    }
}
