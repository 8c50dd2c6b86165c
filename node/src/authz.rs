//! Whether a peer's change may join its document's history: its author must
//! have held the right to make it under the `_acl` of the version it was
//! based on.
//!
//! - An update needs update right (on a work item, invoke on the item or
//!   on its queue will do: pop and completion are made with it), a delete
//!   needs delete right, both judged on the change's base version. When this site does not hold the base
//!   (or the change names none), the greatest version held below the
//!   change stands in for it, or the earliest held when none is below (a
//!   change stamped before the history must not pass as a create); a
//!   document with no version held here has nothing to protect yet, and
//!   the change is let in.
//! - An insert over a history held here (a recover) needs update right on
//!   the greatest live version below it. A create needs no prior `_acl`,
//!   except a role's (`_type: "role"` in `users`): only admins create those.
//! - This site's own changes (replayed from the write-ahead log) were
//!   checked when they were made. A change whose author acted as an admin
//!   at its origin (`author_admin`), the node's own principal, this site's
//!   `admin` user and members of the `admins` role (resolved here from the
//!   role documents in `users`) bypass the check.
//!
//! A refused change stays in the change log (version vectors stay
//! contiguous and catch-up exact) but joins no history, so it never becomes
//! a current document, an index entry or a work-item table row.

use redb::ReadableTable;
use serde_json::{Map, Value};

use ocmesh_replication::{Change, ChangeKind};

use crate::Principal;
use crate::acl::{self, DELETE, INVOKE, UPDATE};
use crate::store::{Changes, ORIGIN_MAX, StorageError, WriteTables, body_object};

/// Collections where only admins create roles (`_type: "role"`).
const SYSTEM_COLLECTIONS: &[&str] = &["users"];

fn is_role(change: &Change) -> bool {
    body_object(change).is_ok_and(|b| b.get("_type").and_then(Value::as_str) == Some("role"))
}

/// Why a peer's change was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Refusal {
    /// The right the author lacked, by name.
    pub missing: &'static str,
}

/// Checks a change that did not come from a local write; `None` lets it in.
/// Logs a refusal (with origin, seq, author and the missing right).
pub(crate) fn refuse(t: &WriteTables<'_>, change: &Change) -> Result<Option<Refusal>, StorageError> {
    let refusal = judge(t, change)?;
    if let Some(r) = &refusal {
        tracing::warn!(
            origin = %change.origin,
            seq = change.seq,
            author = %change.author,
            collection = %change.collection,
            id = %change.doc_id,
            missing = r.missing,
            "refused a replicated change whose author lacked the right"
        );
    }
    Ok(refusal)
}

fn judge(t: &WriteTables<'_>, change: &Change) -> Result<Option<Refusal>, StorageError> {
    if change.author_admin || change.author == crate::system_principal().id {
        return Ok(None);
    }
    // The site name is fixed for a data directory (see `META_SITE`).
    if change.origin == t.site {
        return Ok(None);
    }
    let collection = change.collection.as_str();
    let kind = ChangeKind::try_from(change.kind).unwrap_or(ChangeKind::Update);
    let (rights, on): (&[u64], Option<Map<String, Value>>) = match kind {
        ChangeKind::Insert => match below(t, change, true)? {
            Some(live) => (&[UPDATE], Some(live)),
            None if SYSTEM_COLLECTIONS.contains(&collection) && is_role(change) => (&[], None),
            None => return Ok(None),
        },
        ChangeKind::Delete => match based_on(t, change)? {
            Some(doc) => (&[DELETE], Some(doc)),
            None => return Ok(None),
        },
        _ => match based_on(t, change)? {
            Some(doc) if collection == crate::workitems::ITEMS => (&[UPDATE, INVOKE], Some(doc)),
            Some(doc) => (&[UPDATE], Some(doc)),
            None => return Ok(None),
        },
    };
    let missing = match rights.first() {
        Some(&r) => acl::name(r),
        None => "admin",
    };
    let by = Principal {
        id: change.author.clone(),
        name: String::new(),
        roles: vec![acl::USERS_ROLE_ID.to_owned()],
    };
    let granted = |who: &Principal| {
        on.as_ref()
            .is_some_and(|d| rights.iter().any(|&r| acl::allowed_map(d, who, r)))
    };
    // Most changes are granted to the author by id or to every user, with
    // no deny in the way: no need to resolve roles.
    let has_deny = on
        .as_ref()
        .and_then(|d| d.get("_acl"))
        .and_then(Value::as_array)
        .is_some_and(|a| {
            a.iter()
                .any(|e| e.get("deny").and_then(Value::as_bool).unwrap_or(false))
        });
    if !has_deny && granted(&by) {
        return Ok(None);
    }
    let by = with_roles(t, by)?;
    if by.is_admin() || granted(&by) || invokes_queue_of(t, change, on.as_ref(), &by)? {
        return Ok(None);
    }
    Ok(Some(Refusal { missing }))
}

/// Whether a work item's update is by a principal that may invoke the
/// item's queue (as this site holds it): that, not the `_acl` the item
/// copied from the queue when pushed, is what a local pop or completion
/// checks.
fn invokes_queue_of(
    t: &WriteTables<'_>,
    change: &Change,
    item: Option<&Map<String, Value>>,
    by: &Principal,
) -> Result<bool, StorageError> {
    let is_item_update = change.collection == crate::workitems::ITEMS && change.kind == ChangeKind::Update as i32;
    let Some(queue) = item
        .filter(|_| is_item_update)
        .and_then(|i| i.get("wiqid"))
        .and_then(Value::as_str)
    else {
        return Ok(false);
    };
    Ok(t.current(crate::workitems::QUEUES, queue)?
        .is_some_and(|q| acl::allowed_map(&q, by, INVOKE)))
}

/// The author's roles as this site knows them, `admins` for its local
/// `admin` user.
fn with_roles(t: &WriteTables<'_>, who: Principal) -> Result<Principal, StorageError> {
    let mut roles: Vec<(String, Vec<String>)> = Vec::new();
    for entry in t.documents.range(("users", "")..=("users", ORIGIN_MAX))? {
        let (k, v) = entry?;
        let Ok(d) = crate::store::read_stored_doc("users", k.value().1, v.value(), t) else {
            continue;
        };
        let d = Value::Object(d);
        if d.get("_type").and_then(Value::as_str) == Some("role") {
            roles.extend(role_members(&d));
        }
    }
    let mut start = vec![who.id.clone(), acl::USERS_ROLE_ID.to_owned()];
    if let Some(c) = t.credentials.open()?.get("admin")?
        && let Ok(c) = serde_json::from_slice::<crate::users::Credential>(c.value())
        && c.id == who.id
    {
        start.push(acl::ADMINS_ROLE_ID.to_owned());
    }
    let mut held = acl::expand_roles(&start, &roles);
    held.retain(|r| *r != who.id);
    Ok(Principal { roles: held, ..who })
}

/// A role document's id and its members' ids (`members` lists `{_id}`
/// objects or bare ids).
pub(crate) fn role_members(role: &Value) -> Option<(String, Vec<String>)> {
    let id = role.get("_id")?.as_str()?.to_owned();
    let members = role
        .get("members")
        .and_then(Value::as_array)
        .map(|m| {
            m.iter()
                .filter_map(|e| e.get("_id").and_then(Value::as_str).or(e.as_str()).map(str::to_owned))
                .collect()
        })
        .unwrap_or_default();
    Some((id, members))
}

/// The body of the version `change` was based on, or of the greatest
/// version held below it when the base is not held here.
fn based_on(t: &WriteTables<'_>, change: &Change) -> Result<Option<Map<String, Value>>, StorageError> {
    let (collection, id) = (change.collection.as_str(), change.doc_id.as_str());
    if change.base_hlc != 0 || !change.base_origin.is_empty() {
        let seq = t
            .versions
            .get((collection, id, change.base_hlc, change.base_origin.as_str()))?
            .map(|g| g.value());
        if let Some(seq) = seq
            && let Some(body) = body_at(t, &change.base_origin, seq)?
        {
            return Ok(Some(body));
        }
    }
    below(t, change, false)
}

/// The body of the greatest version held below `change` (a live one only,
/// when `live`); when none is below but the document has versions here,
/// the earliest of them: a change stamped before a document's history
/// (a forged low HLC) is judged on that history, not let in as a create.
fn below(t: &WriteTables<'_>, change: &Change, live: bool) -> Result<Option<Map<String, Value>>, StorageError> {
    let (collection, id) = (change.collection.as_str(), change.doc_id.as_str());
    let range = t
        .versions
        .range((collection, id, 0u64, "")..(collection, id, change.hlc, change.origin.as_str()))?;
    for entry in range.rev() {
        let (k, seq) = entry?;
        if let Some(version) = version_at(t, k.value().3, seq.value(), live)? {
            return body_object(&version).map(Some);
        }
    }
    let above = t
        .versions
        .range((collection, id, change.hlc, change.origin.as_str())..=(collection, id, u64::MAX, ORIGIN_MAX))?;
    for entry in above {
        let (k, seq) = entry?;
        if let Some(version) = version_at(t, k.value().3, seq.value(), live)? {
            return body_object(&version).map(Some);
        }
    }
    Ok(None)
}

/// The version `origin`:`seq` from the log (only a live one, when `live`).
fn version_at(t: &WriteTables<'_>, origin: &str, seq: u64, live: bool) -> Result<Option<Change>, StorageError> {
    let Some(version) = t.change(origin, seq)? else {
        return Ok(None);
    };
    if live && version.kind == ChangeKind::Delete as i32 {
        return Ok(None);
    }
    Ok(Some(version))
}

fn body_at(t: &WriteTables<'_>, origin: &str, seq: u64) -> Result<Option<Map<String, Value>>, StorageError> {
    match t.change(origin, seq)? {
        Some(change) => body_object(&change).map(Some),
        None => Ok(None),
    }
}
