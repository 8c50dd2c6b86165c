//! Work-item queues with OpenCore's fields and state machine, plus FIFO
//! within a priority, a processing lease, and pop in one transaction.
//!
//! Queues are documents in `mq` (`_type: "workitemqueue"`), items documents
//! in `workitems` (`_type: "workitem"`), so history and replication carry
//! them like any document. Local tables derived from the current documents
//! make pop cheap: `wi_ready` orders new items of a queue by (priority,
//! first-version HLC), `wi_delayed` holds new items whose `nextrun` lies
//! ahead, `wi_leases` holds processing items by lease expiry.

use redb::{ReadableTable, TableDefinition};
use serde_json::{Map, Value, json};

use crate::Principal;
use crate::edit::{Edit, Fields};
use crate::error::WriteError;
use crate::ids::{iso8601, parse_iso8601};
use crate::store::{ORIGIN_MAX, SharedDoc, StorageError, WriteTables};
use crate::writer::{WriteDone, Writer};

pub const QUEUES: &str = "mq";
pub const ITEMS: &str = "workitems";
pub const QUEUE_TYPE: &str = "workitemqueue";
pub const ITEM_TYPE: &str = "workitem";
pub const DEFAULT_PRIORITY: i64 = 2;
pub use ocmesh_replication::ownership::{EPOCH_FIELD, OWNER_FIELD};
/// How long a popped item may stay in `processing` by default.
pub const DEFAULT_LEASE_SECS: u64 = 300;

/// Queue name → queue document id.
pub(crate) const WI_QUEUES: TableDefinition<&str, &str> = TableDefinition::new("wi_queues");
/// (queue, priority key, fifo, id) → (): new items that may run now.
pub(crate) const WI_READY: TableDefinition<(&str, u64, u64, &str), ()> = TableDefinition::new("wi_ready");
/// (queue, nextrun ms, id) → (priority key, fifo): new items due later.
pub(crate) const WI_DELAYED: TableDefinition<(&str, u64, &str), (u64, u64)> = TableDefinition::new("wi_delayed");
/// (lease expiry ms, id) → (): processing items.
pub(crate) const WI_LEASES: TableDefinition<(u64, &str), ()> = TableDefinition::new("wi_leases");

/// Queue signals kept before the ones nobody waits on are dropped.
const SIGNALS_KEPT: usize = 256;

/// Wakes poppers waiting on a queue when items become ready there, one
/// waiter per ready item, instead of every waiter on every commit.
#[derive(Debug, Default)]
pub(crate) struct QueueSignals {
    by_queue: std::sync::Mutex<std::collections::HashMap<String, std::sync::Arc<tokio::sync::Notify>>>,
}

impl QueueSignals {
    /// The signal of `queue`, made on first use. A signal no waiter holds
    /// any more is dropped once the map passes `SIGNALS_KEPT` entries
    /// (queues come and go); losing one is harmless because a waiter
    /// registers before its last attempt to pop.
    pub fn of(&self, queue: &str) -> std::sync::Arc<tokio::sync::Notify> {
        let mut map = self.by_queue.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if map.len() >= SIGNALS_KEPT && !map.contains_key(queue) {
            map.retain(|_, signal| std::sync::Arc::strong_count(signal) > 1);
        }
        map.entry(queue.to_owned()).or_default().clone()
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.by_queue
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .len()
    }

    /// Called after a commit with one entry per item made ready.
    pub fn ready(&self, queues: &[String]) {
        if queues.is_empty() {
            return;
        }
        let map = self.by_queue.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        for q in queues {
            if let Some(signal) = map.get(q) {
                signal.notify_one();
            }
        }
    }
}

/// Why a work-item operation was refused.
#[derive(Debug, thiserror::Error)]
pub enum WorkItemError {
    #[error("work item queue {0:?} does not exist")]
    NoQueue(String),
    #[error("work item queue {0:?} already exists")]
    QueueExists(String),
    #[error("work item {0} not found")]
    NoItem(String),
    #[error("queue setting {field}: {problem}")]
    BadSetting { field: &'static str, problem: String },
    #[error("work item field {field}: {problem}")]
    BadItem { field: &'static str, problem: String },
    #[error("state {0:?} cannot be set; use processing (a progress report), successful, failed or retry")]
    BadState(String),
    #[error("work item {id} is {state}; only an item being processed takes a progress report (state processing)")]
    NotProcessing { id: String, state: String },
    #[error("errortype {0:?} is neither business nor application")]
    BadErrorType(String),
    #[error("work item {id} is owned by site {owner:?}; only its owner completes it (an operator may take it over)")]
    NotOwner { id: String, owner: String },
    #[error("work item {id} is already owned by this site")]
    AlreadyOwner { id: String },
    #[error("work item {id} is {state}; only new or processing items can be taken over")]
    Finished { id: String, state: String },
    #[error("work item {id} is already {state}; a finished item is not completed again")]
    AlreadyDone { id: String, state: String },
}

/// A queue's settings, read from its document.
#[derive(Debug, Clone, PartialEq)]
pub struct QueueSettings {
    pub name: String,
    pub maxretries: u64,
    pub retrydelay_ms: u64,
    pub initialdelay_ms: u64,
    pub success_wiq: Option<String>,
    pub failed_wiq: Option<String>,
    pub lease_ms: u64,
    /// Sites that serve the queue (ocmesh's `sites`); empty means the site
    /// an item is pushed at serves it.
    pub sites: Vec<String>,
}

fn bad(field: &'static str, problem: impl Into<String>) -> WorkItemError {
    WorkItemError::BadSetting {
        field,
        problem: problem.into(),
    }
}

fn opt_u64(doc: &Map<String, Value>, field: &'static str) -> Result<Option<u64>, WorkItemError> {
    match doc.get(field) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Number(n)) => match n.as_f64() {
            Some(f) if f >= 0.0 && f.is_finite() => Ok(Some(f as u64)),
            _ => Err(bad(field, format!("must be a non-negative number, not {n}"))),
        },
        Some(other) => Err(bad(field, format!("must be a number, not {other}"))),
    }
}

fn opt_string(doc: &Map<String, Value>, field: &'static str) -> Result<Option<String>, WorkItemError> {
    match doc.get(field) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) if s.is_empty() => Ok(None),
        Some(Value::String(s)) => Ok(Some(s.clone())),
        Some(other) => Err(bad(field, format!("must be a string, not {other}"))),
    }
}

impl QueueSettings {
    /// Reads and checks a queue document (OpenCore's field names; delays in seconds).
    pub fn from_doc(doc: &Map<String, Value>) -> Result<Self, WorkItemError> {
        let name = opt_string(doc, "name")?.ok_or_else(|| bad("name", "is required"))?;
        let maxretries = match doc.get("maxretries") {
            // OpenCore: below 1 means 3.
            Some(Value::Number(n)) if n.as_f64().is_some_and(|f| f < 1.0) => 3,
            _ => opt_u64(doc, "maxretries")?.unwrap_or(3),
        };
        Ok(QueueSettings {
            name,
            maxretries,
            retrydelay_ms: opt_u64(doc, "retrydelay")?.unwrap_or(0).saturating_mul(1000),
            initialdelay_ms: opt_u64(doc, "initialdelay")?.unwrap_or(0).saturating_mul(1000),
            success_wiq: opt_string(doc, "success_wiq")?,
            failed_wiq: opt_string(doc, "failed_wiq")?,
            lease_ms: opt_u64(doc, "leasetime")?
                .unwrap_or(DEFAULT_LEASE_SECS)
                .max(1)
                .saturating_mul(1000),
            sites: sites(doc)?,
        })
    }

    /// The site that will own an item pushed at `here`: `here` when it
    /// serves the queue (or the queue names no sites), else the first
    /// serving site, to which the push hands the item over.
    pub fn owner_for(&self, here: &str) -> String {
        match self.sites.first() {
            Some(first) if !self.sites.iter().any(|s| s == here) => first.clone(),
            _ => here.to_owned(),
        }
    }
}

fn sites(doc: &Map<String, Value>) -> Result<Vec<String>, WorkItemError> {
    match doc.get("sites") {
        None | Some(Value::Null) => Ok(Vec::new()),
        Some(Value::Array(list)) => list
            .iter()
            .map(|s| match s {
                Value::String(s) if is_site_name(s) => Ok(s.clone()),
                other => Err(bad("sites", format!("{other} is not a site name"))),
            })
            .collect(),
        Some(other) => Err(bad("sites", format!("must be an array of site names, not {other}"))),
    }
}

/// Site names as certificates carry them: 1 to 63 of a-z, 0-9 and '-'.
fn is_site_name(s: &str) -> bool {
    (1..=63).contains(&s.len())
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
}

/// The site that owns an item: its `_owner`, or for items pushed before
/// ownership was recorded, the site whose version created it.
pub(crate) fn owner_of<'d>(doc: &'d dyn Fields, created_at: &'d str) -> &'d str {
    doc.field(OWNER_FIELD).and_then(Value::as_str).unwrap_or(created_at)
}

/// The state of `doc` when it is a work item (`doc` is of `collection`).
pub(crate) fn item_state<'d>(collection: &str, doc: &'d Map<String, Value>) -> Option<&'d str> {
    match collection {
        ITEMS => doc.get("state").and_then(Value::as_str),
        _ => None,
    }
}

/// Sort key of a priority: lower numbers first, negatives before positives.
fn priority_key(doc: &dyn Fields) -> u64 {
    let p = doc
        .field("priority")
        .and_then(Value::as_i64)
        .unwrap_or(DEFAULT_PRIORITY);
    (p as u64) ^ (1 << 63)
}

fn time_field(doc: &dyn Fields, field: &str) -> Option<u64> {
    doc.field(field).and_then(Value::as_str).and_then(parse_iso8601)
}

/// Where a document's first version came from.
pub(crate) struct Created<'a> {
    /// Its HLC: FIFO order within a priority.
    pub fifo: u64,
    /// Its origin: the owner of an item that names none.
    pub at: &'a str,
}

/// Keeps the work-item tables in step with a document's new current state.
/// Only items this site owns enter them: another site's items are shown
/// here but never popped or expired here.
pub(crate) fn reindex(
    t: &mut WriteTables<'_>,
    collection: &str,
    id: &str,
    old: Option<&dyn Fields>,
    new: Option<&dyn Fields>,
    created: Created<'_>,
    now_ms: u64,
) -> Result<(), StorageError> {
    let fifo = created.fifo;
    fn typed<'d>(d: Option<&'d dyn Fields>, ty: &str) -> Option<&'d dyn Fields> {
        d.filter(|m| m.field("_type").and_then(Value::as_str) == Some(ty))
    }
    if collection == QUEUES {
        let queues = t.wi_queues.open_mut()?;
        if let Some(name) = typed(old, QUEUE_TYPE).and_then(|m| m.field("name").and_then(Value::as_str)) {
            queues.remove(name)?;
        }
        if let Some(name) = typed(new, QUEUE_TYPE).and_then(|m| m.field("name").and_then(Value::as_str)) {
            queues.insert(name, id)?;
        }
        return Ok(());
    }
    if collection != ITEMS {
        return Ok(());
    }
    let site = t.site.as_str();
    let old = old.filter(|m| owner_of(*m, created.at) == site);
    let new = new.filter(|m| owner_of(*m, created.at) == site);
    let (ready, delayed, leases) = (&mut t.wi_ready, &mut t.wi_delayed, &mut t.wi_leases);
    if let Some(o) = typed(old, ITEM_TYPE) {
        let queue = o.field("wiq").and_then(Value::as_str).unwrap_or_default();
        // Only `new` items sit in ready/delayed, only `processing` ones in leases.
        match o.field("state").and_then(Value::as_str) {
            Some("new") => {
                ready.remove((queue, priority_key(o), fifo, id))?;
                if let Some(at) = time_field(o, "nextrun") {
                    delayed.remove((queue, at, id))?;
                }
            }
            Some("processing") => {
                if let Some(until) = time_field(o, "_leaseuntil") {
                    leases.remove((until, id))?;
                }
            }
            _ => {}
        }
    }
    if let Some(n) = typed(new, ITEM_TYPE) {
        let queue = n.field("wiq").and_then(Value::as_str).unwrap_or_default();
        match n.field("state").and_then(Value::as_str) {
            Some("new") => match time_field(n, "nextrun") {
                Some(at) if at > now_ms => {
                    delayed.insert((queue, at, id), (priority_key(n), fifo))?;
                }
                _ => {
                    ready.insert((queue, priority_key(n), fifo, id), ())?;
                    t.readied.push(queue.to_owned());
                }
            },
            Some("processing") => {
                if let Some(until) = time_field(n, "_leaseuntil") {
                    leases.insert((until, id), ())?;
                }
            }
            _ => {}
        }
    }
    Ok(())
}

/// What to do with an item whose work ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Outcome {
    /// Back to `new`, to run again at `nextrun_ms`.
    Retry { nextrun_ms: u64 },
    /// Done; a copy goes to the target queue if there is one.
    Final {
        state: &'static str,
        route_to: Option<String>,
    },
}

/// OpenCore's rules: business errors never retry; application errors
/// retry until `retries` reaches `maxretries`; the item's own
/// `success_wiq`/`failed_wiq` override the queue's.
pub(crate) fn outcome(
    q: &QueueSettings,
    item: &Map<String, Value>,
    success: bool,
    business: bool,
    retries_after: u64,
    now_ms: u64,
) -> Outcome {
    let item_target = |f: &str| {
        item.get(f)
            .and_then(Value::as_str)
            .filter(|s| !s.is_empty())
            .map(str::to_owned)
    };
    if success {
        return Outcome::Final {
            state: "successful",
            route_to: item_target("success_wiq").or(q.success_wiq.clone()),
        };
    }
    if !business && retries_after < q.maxretries {
        return Outcome::Retry {
            nextrun_ms: now_ms.saturating_add(q.retrydelay_ms),
        };
    }
    Outcome::Final {
        state: "failed",
        route_to: item_target("failed_wiq").or(q.failed_wiq.clone()),
    }
}

impl Writer {
    fn queue(&self, t: &mut WriteTables<'_>, name: &str) -> Result<(String, QueueSettings), WriteError> {
        let (id, doc) = self.queue_doc(t, name)?;
        Ok((id, QueueSettings::from_doc(&doc)?))
    }

    fn queue_doc(&self, t: &mut WriteTables<'_>, name: &str) -> Result<(String, SharedDoc), WriteError> {
        if let Some(found) = t.cache.queues.get(name) {
            return Ok(found.clone());
        }
        let id = match t.wi_queues.open()?.get(name).map_err(StorageError::from)? {
            Some(id) => id.value().to_owned(),
            None => return Err(WorkItemError::NoQueue(name.to_owned()).into()),
        };
        let doc = t
            .current(QUEUES, &id)?
            .ok_or_else(|| WorkItemError::NoQueue(name.to_owned()))?;
        t.cache.queues.insert(name.to_owned(), (id.clone(), doc.clone()));
        Ok((id, doc))
    }

    /// The queue, if `by` may invoke it (push, pop, complete); a queue the
    /// caller cannot even read looks like a missing one.
    fn invocable_queue(
        &self,
        t: &mut WriteTables<'_>,
        name: &str,
        by: &Principal,
    ) -> Result<(String, SharedDoc, QueueSettings), WriteError> {
        let (id, doc) = self.queue_doc(t, name)?;
        match crate::writer::check(&doc, by, crate::acl::INVOKE, QUEUES, &id) {
            Ok(()) => {}
            Err(WriteError::NotFound { .. }) => return Err(WorkItemError::NoQueue(name.to_owned()).into()),
            Err(e) => return Err(e),
        }
        let settings = QueueSettings::from_doc(&doc)?;
        Ok((id, doc, settings))
    }

    pub(crate) fn add_queue(
        &mut self,
        t: &mut WriteTables<'_>,
        mut doc: Map<String, Value>,
        by: &Principal,
    ) -> Result<WriteDone, WriteError> {
        let settings = QueueSettings::from_doc(&doc)?;
        if self.queue(t, &settings.name).is_ok() {
            return Err(WorkItemError::QueueExists(settings.name).into());
        }
        doc.insert("_type".into(), QUEUE_TYPE.into());
        self.insert(t, QUEUES.into(), doc, by)
    }

    pub(crate) fn update_queue(
        &mut self,
        t: &mut WriteTables<'_>,
        name: &str,
        mut doc: Map<String, Value>,
        by: &Principal,
    ) -> Result<WriteDone, WriteError> {
        let (id, _) = self.queue(t, name)?;
        let renamed = QueueSettings::from_doc(&doc)?;
        if renamed.name != name && self.queue(t, &renamed.name).is_ok() {
            return Err(WorkItemError::QueueExists(renamed.name).into());
        }
        doc.insert("_type".into(), QUEUE_TYPE.into());
        self.replace(t, QUEUES.into(), id, doc, by)
    }

    pub(crate) fn delete_queue(
        &mut self,
        t: &mut WriteTables<'_>,
        name: &str,
        by: &Principal,
    ) -> Result<WriteDone, WriteError> {
        let (id, _) = self.queue(t, name)?;
        self.delete(t, QUEUES.into(), id, by)
    }

    /// Deletes every item of a queue (OpenCore's `purge`), and then the
    /// queue itself when `delete_queue`. Needs the delete right on the
    /// queue and on every item: a purge empties the queue or, refused,
    /// writes nothing (it is a multi-document write, so the group reruns
    /// without it).
    pub(crate) fn purge_queue(
        &mut self,
        t: &mut WriteTables<'_>,
        name: &str,
        delete_queue: bool,
        by: &Principal,
    ) -> Result<WriteDone, WriteError> {
        let (qid, qdoc) = self.queue_doc(t, name)?;
        crate::writer::check(&qdoc, by, crate::acl::DELETE, QUEUES, &qid)?;
        let of_queue = crate::query::Filter::parse(&json!({ "wiq": name }))?;
        let mut out = Vec::new();
        for (id, item) in crate::writer::matching(t, ITEMS, &of_queue)? {
            crate::writer::check(&item, by, crate::acl::DELETE, ITEMS, &id)?;
            if let WriteDone::Document(d) = self.delete(t, ITEMS.into(), id, by)? {
                out.push(d);
            }
        }
        if delete_queue {
            self.delete(t, QUEUES.into(), qid, by)?;
        }
        Ok(WriteDone::Documents(out))
    }

    /// Pushes items onto a queue; all are checked before any is written.
    pub(crate) fn push(
        &mut self,
        t: &mut WriteTables<'_>,
        queue: &str,
        items: Vec<Map<String, Value>>,
        by: &Principal,
    ) -> Result<WriteDone, WriteError> {
        let (qid, qdoc, q) = self.invocable_queue(t, queue, by)?;
        let now = self.wall.now_ms();
        let mut docs = Vec::with_capacity(items.len());
        for mut item in items {
            let item_err = |field, problem: String| WriteError::from(WorkItemError::BadItem { field, problem });
            match item.get("payload") {
                None | Some(Value::Null) => {
                    item.insert("payload".into(), json!({}));
                }
                Some(Value::Object(_)) => {}
                Some(other) => return Err(item_err("payload", format!("must be a JSON object, not {other}"))),
            }
            match item.get("priority") {
                None | Some(Value::Null) => {
                    item.insert("priority".into(), DEFAULT_PRIORITY.into());
                }
                Some(v) if v.as_i64().is_some() => {}
                Some(other) => return Err(item_err("priority", format!("must be an integer, not {other}"))),
            }
            let nextrun = match item.get("nextrun") {
                None | Some(Value::Null) => now + q.initialdelay_ms,
                Some(Value::String(s)) => {
                    parse_iso8601(s).ok_or_else(|| item_err("nextrun", format!("{s:?} is not an ISO-8601 UTC time")))?
                }
                Some(other) => return Err(item_err("nextrun", format!("must be an ISO-8601 string, not {other}"))),
            };
            for f in ["success_wiq", "failed_wiq", "name"] {
                if let Some(v) = item.get(f)
                    && !v.is_string()
                    && !v.is_null()
                {
                    return Err(item_err("name", format!("{f} must be a string, not {v}")));
                }
            }
            if let Some(files) = item.get("files")
                && !files.is_array()
            {
                return Err(item_err("files", format!("must be an array, not {files}")));
            }
            item.entry("name").or_insert_with(|| "workitem".into());
            item.entry("files").or_insert_with(|| json!([]));
            // Items inherit the queue's ACL (the pusher gets full control on insert).
            if let Some(acl) = qdoc.get("_acl") {
                item.insert("_acl".into(), acl.clone());
            }
            item.insert("_type".into(), ITEM_TYPE.into());
            item.insert("wiq".into(), queue.into());
            item.insert("wiqid".into(), qid.clone().into());
            item.insert("state".into(), "new".into());
            item.insert("retries".into(), 0.into());
            item.insert("nextrun".into(), iso8601(nextrun).into());
            // The push records the owner: here, or the site serving the queue.
            item.insert(OWNER_FIELD.into(), q.owner_for(&self.site).into());
            item.insert(EPOCH_FIELD.into(), 1.into());
            docs.push(item);
        }
        let mut out = Vec::with_capacity(docs.len());
        for doc in docs {
            if let WriteDone::Document(d) = self.insert(t, ITEMS.into(), doc, by)? {
                out.push(d);
            }
        }
        Ok(WriteDone::Documents(out))
    }

    /// Takes the most urgent due item of a queue into `processing`.
    pub(crate) fn pop(
        &mut self,
        t: &mut WriteTables<'_>,
        queue: &str,
        by: &Principal,
    ) -> Result<WriteDone, WriteError> {
        let (_, _, q) = self.invocable_queue(t, queue, by)?;
        let now = self.wall.now_ms();
        t.promote_due(queue, now)?;
        let Some(id) = t.first_ready(queue)? else {
            return Ok(WriteDone::Nothing);
        };
        let Some(mut edit) = t.take_current(ITEMS, &id)? else {
            return Err(StorageError(format!("ready work item {id} has no document")).into());
        };
        edit.set("state", "processing".into());
        edit.set("lastrun", iso8601(now).into());
        edit.set("_leaseuntil", iso8601(now + q.lease_ms).into());
        self.edit_current(t, ITEMS, id, edit, by)
    }

    /// Records the end of an item's work and routes or retries it.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn finish(
        &mut self,
        t: &mut WriteTables<'_>,
        id: &str,
        state: &str,
        errortype: Option<&str>,
        errormessage: Option<String>,
        payload: Option<Map<String, Value>>,
        by: &Principal,
    ) -> Result<WriteDone, WriteError> {
        if state == "processing" {
            return self.progress(t, id, payload, by);
        }
        let success = match state {
            "successful" => true,
            "failed" | "retry" => false,
            other => return Err(WorkItemError::BadState(other.to_owned()).into()),
        };
        let business = match errortype {
            None | Some("application") => false,
            Some("business") => true,
            Some(other) => return Err(WorkItemError::BadErrorType(other.to_owned()).into()),
        };
        let (current, q) = self.held_item(t, id, by)?;
        // A final state is final: completing again would route a second
        // copy to the next queue (a worker whose lease ran out, a retried
        // request), which is running the item's follow-up twice.
        let state_now = current.get("state").and_then(Value::as_str).unwrap_or_default();
        if matches!(state_now, "successful" | "failed") {
            return Err(WorkItemError::AlreadyDone {
                id: id.to_owned(),
                state: state_now.to_owned(),
            }
            .into());
        }
        drop(current);
        let mut edit = take_item(t, id)?;
        if let Some(p) = payload {
            edit.set("payload", Value::Object(p));
        }
        let retries = edit.get("retries").and_then(Value::as_u64).unwrap_or(0);
        let retries_after = if success || business { retries } else { retries + 1 };
        let now = self.wall.now_ms();
        edit.remove("_leaseuntil");
        if !success {
            edit.set("errortype", (if business { "business" } else { "application" }).into());
            edit.set("errormessage", errormessage.unwrap_or_default().into());
            edit.set("retries", retries_after.into());
        }
        let route = match outcome(&q, &edit.doc, success, business, retries_after, now) {
            Outcome::Retry { nextrun_ms } => {
                edit.set("state", "new".into());
                edit.set("nextrun", iso8601(nextrun_ms).into());
                None
            }
            Outcome::Final { state, route_to } => {
                edit.set("state", state.into());
                route_to
            }
        };
        // The routed copy's fields, taken before the item moves on.
        let route = route.map(|target| {
            let mut copy = Map::new();
            for f in ["name", "payload", "priority", "files"] {
                if let Some(v) = edit.get(f) {
                    copy.insert(f.into(), v.clone());
                }
            }
            (target, copy)
        });
        let done = self.edit_current(t, ITEMS, id.to_owned(), edit, by)?;
        if let Some((target, copy)) = route {
            // Routing is the node's act, whoever completed the item.
            // The completion stands whatever becomes of the copy: a copy
            // the target refuses is logged, never a half-written finish.
            match self.push(t, &target, vec![copy], &crate::system_principal()) {
                Ok(_) => {}
                Err(WriteError::Storage(e)) => return Err(e.into()),
                Err(e) => {
                    tracing::warn!(item = %id, %target, error = %e, "work item completed but not routed to its target queue");
                }
            }
        }
        Ok(done)
    }

    /// An item the caller may work on here: one it may read, on a queue it
    /// may invoke, owned by this site. Returns the item and its queue's
    /// settings.
    fn held_item(
        &mut self,
        t: &mut WriteTables<'_>,
        id: &str,
        by: &Principal,
    ) -> Result<(SharedDoc, QueueSettings), WriteError> {
        let current = stored_item(t, id)?;
        if !crate::acl::allowed_map(&current, by, crate::acl::READ) {
            return Err(WorkItemError::NoItem(id.to_owned()).into());
        }
        let queue = current
            .get("wiq")
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_owned();
        let (_, _, q) = self.invocable_queue(t, &queue, by)?;
        let owner = item_owner(t, id, &current)?;
        if owner != self.site {
            return Err(WorkItemError::NotOwner {
                id: id.to_owned(),
                owner,
            }
            .into());
        }
        Ok((current, q))
    }

    /// A progress report on an item being processed (OpenCore's
    /// `updateworkitem` with state `processing`): the payload is replaced
    /// when one is given and the lease starts again, so a long job that
    /// reports progress is not handed to another worker.
    fn progress(
        &mut self,
        t: &mut WriteTables<'_>,
        id: &str,
        payload: Option<Map<String, Value>>,
        by: &Principal,
    ) -> Result<WriteDone, WriteError> {
        let (current, q) = self.held_item(t, id, by)?;
        let state_now = current.get("state").and_then(Value::as_str).unwrap_or_default();
        if state_now != "processing" {
            return Err(WorkItemError::NotProcessing {
                id: id.to_owned(),
                state: state_now.to_owned(),
            }
            .into());
        }
        drop(current);
        let mut edit = take_item(t, id)?;
        if let Some(p) = payload {
            edit.set("payload", Value::Object(p));
        }
        edit.set("_leaseuntil", iso8601(self.wall.now_ms() + q.lease_ms).into());
        self.edit_current(t, ITEMS, id.to_owned(), edit, by)
    }

    /// An operator's forced move of an item to this site, for when its
    /// owner is out of reach: the epoch goes up, a `processing` item goes
    /// back to `new`, and whatever the old owner does under the old epoch
    /// is kept in history but never counts (see
    /// `ocmesh_replication::ownership`).
    pub(crate) fn takeover(
        &mut self,
        t: &mut WriteTables<'_>,
        id: &str,
        by: &Principal,
    ) -> Result<WriteDone, WriteError> {
        let current = stored_item(t, id)?;
        crate::writer::check(&current, by, crate::acl::UPDATE, ITEMS, id)?;
        if item_owner(t, id, &current)? == self.site {
            return Err(WorkItemError::AlreadyOwner { id: id.to_owned() }.into());
        }
        let state = current.get("state").and_then(Value::as_str).unwrap_or_default();
        if !matches!(state, "new" | "processing") {
            return Err(WorkItemError::Finished {
                id: id.to_owned(),
                state: state.to_owned(),
            }
            .into());
        }
        let epoch = current.get(EPOCH_FIELD).and_then(Value::as_u64).unwrap_or(0) + 1;
        let mut doc = (*current).clone();
        doc.insert(OWNER_FIELD.into(), self.site.clone().into());
        doc.insert(EPOCH_FIELD.into(), epoch.into());
        if state == "processing" {
            doc.insert("state".into(), "new".into());
            doc.remove("_leaseuntil");
        }
        tracing::warn!(item = %id, epoch, "work item taken over by this site");
        self.replace_current(t, ITEMS.into(), id.to_owned(), doc, current, by)
    }

    pub(crate) fn delete_item(
        &mut self,
        t: &mut WriteTables<'_>,
        id: &str,
        by: &Principal,
    ) -> Result<WriteDone, WriteError> {
        stored_item(t, id)?;
        self.delete(t, ITEMS.into(), id.to_owned(), by)
    }

    /// Items whose lease ran out go back to `new` as an application error.
    pub(crate) fn expire_leases(&mut self, t: &mut WriteTables<'_>, by: &Principal) -> Result<WriteDone, WriteError> {
        let now = self.wall.now_ms();
        let expired = t.expired_leases(now)?;
        for id in &expired {
            self.finish(
                t,
                id,
                "retry",
                Some("application"),
                Some("processing lease expired".into()),
                None,
                by,
            )?;
        }
        if !expired.is_empty() {
            tracing::info!(
                items = expired.len(),
                "work items whose lease expired went back to their queue"
            );
        }
        Ok(WriteDone::Nothing)
    }
}

/// A work item's current document, for an id that must name one.
fn stored_item(t: &WriteTables<'_>, id: &str) -> Result<SharedDoc, WriteError> {
    crate::ids::validate_id(id)?;
    Ok(t.current(ITEMS, id)?
        .ok_or_else(|| WorkItemError::NoItem(id.to_owned()))?)
}

/// The stored item `id` to edit in place (see `crate::edit`).
fn take_item(t: &mut WriteTables<'_>, id: &str) -> Result<Edit, WriteError> {
    Ok(t.take_current(ITEMS, id)?
        .ok_or_else(|| WorkItemError::NoItem(id.to_owned()))?)
}

/// The owner of a stored item (see [`owner_of`]).
fn item_owner(t: &WriteTables<'_>, id: &str, doc: &Map<String, Value>) -> Result<String, StorageError> {
    if let Some(owner) = doc.get(OWNER_FIELD).and_then(Value::as_str) {
        return Ok(owner.to_owned());
    }
    let mut first = t
        .versions
        .range((ITEMS, id, 0u64, "")..=(ITEMS, id, u64::MAX, ORIGIN_MAX))?;
    match first.next() {
        Some(entry) => Ok(entry?.0.value().3.to_owned()),
        None => Err(StorageError(format!("work item {id} has no history"))),
    }
}

impl WriteTables<'_> {
    /// Moves a queue's delayed items whose time has come into the ready set.
    fn promote_due(&mut self, queue: &str, now: u64) -> Result<(), StorageError> {
        let due: Vec<(u64, String, (u64, u64))> = {
            let mut out = Vec::new();
            for entry in self.wi_delayed.range((queue, 0u64, "")..=(queue, now, ORIGIN_MAX))? {
                let (k, v) = entry?;
                let (_, at, id) = k.value();
                out.push((at, id.to_owned(), v.value()));
            }
            out
        };
        for (at, id, (prio, fifo)) in due {
            self.wi_delayed.remove((queue, at, id.as_str()))?;
            self.wi_ready.insert((queue, prio, fifo, id.as_str()), ())?;
            self.readied.push(queue.to_owned());
        }
        Ok(())
    }

    fn first_ready(&self, queue: &str) -> Result<Option<String>, StorageError> {
        let mut range = self
            .wi_ready
            .range((queue, 0u64, 0u64, "")..=(queue, u64::MAX, u64::MAX, ORIGIN_MAX))?;
        match range.next() {
            Some(entry) => Ok(Some(entry?.0.value().3.to_owned())),
            None => Ok(None),
        }
    }

    fn expired_leases(&self, now: u64) -> Result<Vec<String>, StorageError> {
        let mut out = Vec::new();
        for entry in self.wi_leases.range((0u64, "")..=(now, ORIGIN_MAX))? {
            out.push(entry?.0.value().1.to_owned());
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn q(doc: Value) -> QueueSettings {
        QueueSettings::from_doc(doc.as_object().expect("object")).expect("settings")
    }

    #[test]
    fn signals_nobody_waits_on_do_not_pile_up() {
        let signals = QueueSignals::default();
        let held = signals.of("busy");
        for n in 0..10 * SIGNALS_KEPT {
            drop(signals.of(&format!("gone-{n}")));
        }
        assert!(signals.len() <= SIGNALS_KEPT + 1, "{} signals kept", signals.len());
        // The one a waiter holds is the same signal as before.
        assert!(std::sync::Arc::ptr_eq(&held, &signals.of("busy")));
    }

    #[test]
    fn settings_follow_opencore() {
        let s = q(json!({"name": "q", "maxretries": 0, "retrydelay": 2, "success_wiq": "done"}));
        assert_eq!(
            (s.maxretries, s.retrydelay_ms, s.success_wiq.as_deref()),
            (3, 2000, Some("done"))
        );
        let err = QueueSettings::from_doc(json!({"name": "q", "retrydelay": "soon"}).as_object().expect("o"));
        assert!(err.expect_err("string delay").to_string().contains("retrydelay"));
        assert!(QueueSettings::from_doc(json!({}).as_object().expect("o")).is_err());
    }

    #[test]
    fn outcomes() {
        let s = q(json!({"name": "q", "maxretries": 2, "retrydelay": 1, "success_wiq": "ok", "failed_wiq": "bad"}));
        let item = Map::new();
        assert_eq!(
            outcome(&s, &item, true, false, 0, 0),
            Outcome::Final {
                state: "successful",
                route_to: Some("ok".into())
            }
        );
        assert_eq!(
            outcome(&s, &item, false, true, 0, 0),
            Outcome::Final {
                state: "failed",
                route_to: Some("bad".into())
            }
        );
        assert_eq!(
            outcome(&s, &item, false, false, 1, 10),
            Outcome::Retry { nextrun_ms: 1010 }
        );
        assert_eq!(
            outcome(&s, &item, false, false, 2, 10),
            Outcome::Final {
                state: "failed",
                route_to: Some("bad".into())
            }
        );
        let own = json!({"success_wiq": "mine"}).as_object().cloned().expect("o");
        assert_eq!(
            outcome(&s, &own, true, false, 0, 0),
            Outcome::Final {
                state: "successful",
                route_to: Some("mine".into())
            }
        );
    }
}
