//! Merging a document's `_acl` per principal, as part of `merge`.
//!
//! An `_acl` is a list of entries `{_id, name, rights, deny?}`. The merge
//! keys entries by (`_id`, deny): a grant and a deny for one principal are
//! separate entries. While no version this one's writer had not seen has
//! changed the `_acl`, the version's `_acl` is taken as written: sequential
//! edits simply apply in order. Otherwise only the entries the version
//! changed (against the `_acl` of the merged state at its base) are
//! applied, one by one, and an entry that a version unknown to the writer
//! also changed is resolved towards less access:
//! - a grant: removed if either side removed it, else the intersection of
//!   the two rights;
//! - a deny: present if either side has it, with the union of the rights.
//!
//! The fold runs in version order, so the outcome is a function of the set
//! of versions only.

use std::collections::HashMap;

use serde_json::{Map, Value};

/// An entry's identity: its principal (`_id`; the entry's JSON when it has
/// no string `_id`) and whether it denies.
type AclKey = (String, bool);

/// Entries in order, each under its key (the first of duplicates).
type Entries = Vec<(AclKey, Value)>;

fn key_of(entry: &Value) -> AclKey {
    let id = match entry.get("_id").and_then(Value::as_str) {
        Some(id) => id.to_owned(),
        None => entry.to_string(),
    };
    let deny = entry.get("deny").and_then(Value::as_bool).unwrap_or(false);
    (id, deny)
}

/// A document body's `_acl` as keyed entries; absent or not a list: none.
fn entries_of(doc: &Map<String, Value>) -> Entries {
    let mut out: Entries = Vec::new();
    for e in doc.get("_acl").and_then(Value::as_array).into_iter().flatten() {
        let k = key_of(e);
        if !out.iter().any(|(o, _)| *o == k) {
            out.push((k, e.clone()));
        }
    }
    out
}

fn find<'a>(entries: &'a Entries, k: &AclKey) -> Option<&'a Value> {
    entries.iter().find(|(o, _)| o == k).map(|(_, v)| v)
}

fn rights(entry: &Value) -> u64 {
    entry.get("rights").and_then(Value::as_u64).unwrap_or(0)
}

fn with_rights(entry: &Value, rights: u64) -> Value {
    let mut e = entry.clone();
    if let Some(m) = e.as_object_mut() {
        m.insert("rights".into(), Value::from(rights));
    }
    e
}

/// The less permissive of two concurrent values of one entry.
fn restrictive(deny: bool, current: Option<&Value>, theirs: Option<&Value>) -> Option<Value> {
    match (deny, current, theirs) {
        (false, Some(a), Some(b)) => Some(with_rights(b, rights(a) & rights(b))),
        (false, _, _) => None,
        (true, Some(a), Some(b)) => Some(with_rights(b, rights(a) | rights(b))),
        (true, a, b) => a.or(b).cloned(),
    }
}

/// The `_acl` side of the fold: the merged entries, who last changed each
/// of them, and the `_acl` after each version that changed it.
#[derive(Debug, Default)]
pub(crate) struct AclState {
    /// Entry → position of the version that last changed it (removals too).
    setter: HashMap<AclKey, usize>,
    /// Position of the last version that changed the `_acl`.
    last: Option<usize>,
    /// (position, `_acl` entries after it), for each version that set it.
    snapshots: Vec<(usize, Entries)>,
}

impl AclState {
    /// The document was inserted (or wholly written) at `pos` with `body`:
    /// its `_acl` is taken as written and every entry was set by `pos`.
    pub fn reset(&mut self, pos: usize, body: &Map<String, Value>) {
        let entries = entries_of(body);
        self.setter = entries.iter().map(|(k, _)| (k.clone(), pos)).collect();
        self.last = Some(pos);
        self.snapshots.push((pos, entries));
    }

    /// The document was deleted at `pos`.
    pub fn clear(&mut self, pos: usize) {
        self.setter.clear();
        self.last = Some(pos);
        self.snapshots.push((pos, Vec::new()));
    }

    /// Folds in the version at `pos`, whose body is `body` and which set the
    /// `_acl` of the live document `doc`. `seen(p)` tells whether the
    /// version at position `p` is at or below the writer's base (known to
    /// it). Returns the positions of versions whose concurrent change of
    /// the same entry was combined with this one.
    pub fn apply(
        &mut self,
        pos: usize,
        body: &Map<String, Value>,
        doc: &mut Map<String, Value>,
        seen: impl Fn(usize) -> bool,
    ) -> Vec<usize> {
        let written = entries_of(body);
        if self.last.is_none_or(&seen) {
            // Nothing changed the `_acl` behind the writer's back.
            match body.get("_acl") {
                Some(acl) => doc.insert("_acl".into(), acl.clone()),
                None => doc.shift_remove("_acl"),
            };
            let base = self.base_entries(&seen);
            for k in changed(&base, &written) {
                self.setter.insert(k, pos);
            }
            self.last = Some(pos);
            self.snapshots.push((pos, written));
            return Vec::new();
        }
        let base = self.base_entries(&seen);
        let mut current = entries_of(doc);
        let mut combined = Vec::new();
        for k in changed(&base, &written) {
            let theirs = find(&written, &k);
            let value = match self.setter.get(&k) {
                Some(&prev) if !seen(prev) => {
                    combined.push(prev);
                    restrictive(k.1, find(&current, &k), theirs)
                }
                _ => theirs.cloned(),
            };
            match (value, current.iter().position(|(o, _)| *o == k)) {
                (Some(v), Some(i)) => current[i].1 = v,
                (Some(v), None) => current.push((k.clone(), v)),
                (None, Some(i)) => {
                    current.remove(i);
                }
                (None, None) => {}
            }
            self.setter.insert(k, pos);
        }
        doc.insert(
            "_acl".into(),
            Value::Array(current.iter().map(|(_, v)| v.clone()).collect()),
        );
        self.last = Some(pos);
        self.snapshots.push((pos, current));
        combined.sort_unstable();
        combined.dedup();
        combined
    }

    /// The merged `_acl` after the greatest version at or below the base.
    fn base_entries(&self, seen: impl Fn(usize) -> bool) -> Entries {
        self.snapshots
            .iter()
            .rev()
            .find(|(p, _)| seen(*p))
            .map(|(_, e)| e.clone())
            .unwrap_or_default()
    }
}

/// Keys whose entry differs between `old` and `new`, in a fixed order.
fn changed(old: &Entries, new: &Entries) -> Vec<AclKey> {
    let mut out: Vec<AclKey> = new
        .iter()
        .filter(|(k, v)| find(old, k) != Some(v))
        .map(|(k, _)| k.clone())
        .collect();
    out.extend(
        old.iter()
            .filter(|(k, _)| find(new, k).is_none())
            .map(|(k, _)| k.clone()),
    );
    out
}
