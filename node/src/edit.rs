//! Editing a current document in place instead of copying it.
//!
//! A work item's transition (pop, completion, progress) changes a handful
//! of its fields, but the index and work-item tables, the changed-field
//! list and the history count all need the document as it was. Copying the
//! whole parsed document to keep the old one was the writer's largest
//! single cost (about 12% of its time under the work-item cycle). An
//! [`Edit`] owns the document, changes it, and remembers the first value
//! each touched field had; the old document is then the new one seen
//! through that undo list ([`Undone`]).
//!
//! Invariant: a field an [`Edit`] changed or removed is in its undo list
//! with the value it had before the first change (`None` when absent), so
//! for every field `Undone::field` answers what the old document held.

use serde_json::{Map, Value};

use crate::store::{HistoryEnds, SharedDoc};

/// A document's top-level fields, however it is held.
pub(crate) trait Fields {
    fn field(&self, name: &str) -> Option<&Value>;
}

impl Fields for Map<String, Value> {
    fn field(&self, name: &str) -> Option<&Value> {
        self.get(name)
    }
}

/// The first value each field an edit touched had (`None`: absent).
#[derive(Debug, Default)]
pub(crate) struct Undo(Vec<(String, Option<Value>)>);

impl Undo {
    fn record(&mut self, name: &str, old: Option<Value>) {
        // Only the first change of a field holds what the old document had.
        if !self.0.iter().any(|(k, _)| k == name) {
            self.0.push((name.to_owned(), old));
        }
    }

    fn get(&self, name: &str) -> Option<&Option<Value>> {
        self.0.iter().find(|(k, _)| k == name).map(|(_, v)| v)
    }
}

/// A document being changed, which remembers what it replaced.
pub(crate) struct Edit {
    pub doc: Map<String, Value>,
    pub undo: Undo,
    /// The document's history's ends, when the writer had them at hand.
    pub ends: Option<HistoryEnds>,
}

impl Edit {
    pub fn new(doc: Map<String, Value>, ends: Option<HistoryEnds>) -> Self {
        Edit {
            doc,
            undo: Undo::default(),
            ends,
        }
    }

    pub fn get(&self, name: &str) -> Option<&Value> {
        self.doc.get(name)
    }

    /// Sets a field; a new one goes where key order puts it (see
    /// `insert_in_order`).
    pub fn set(&mut self, name: &str, value: Value) {
        let old = insert_in_order(&mut self.doc, name, value);
        self.undo.record(name, old);
    }

    /// Removes a field, keeping the others in their order.
    pub fn remove(&mut self, name: &str) {
        let old = self.doc.shift_remove(name);
        self.undo.record(name, old);
    }
}

/// Sets `name` in `doc`: in place when present, else where key order puts
/// it, so a document stored in key order stays so and need not be sorted
/// again (which rehashes every key).
pub(crate) fn insert_in_order(doc: &mut Map<String, Value>, name: &str, value: Value) -> Option<Value> {
    if let Some(slot) = doc.get_mut(name) {
        return Some(std::mem::replace(slot, value));
    }
    let at = doc.keys().take_while(|k| k.as_str() < name).count();
    doc.shift_insert(at, name.to_owned(), value);
    None
}

/// An edited document as it was before the edit: `new` (none when the
/// write deleted it) with the undo list's fields put back.
pub(crate) struct Undone<'a> {
    pub new: Option<&'a Map<String, Value>>,
    pub undo: &'a Undo,
}

impl Fields for Undone<'_> {
    fn field(&self, name: &str) -> Option<&Value> {
        match self.undo.get(name) {
            Some(old) => old.as_ref(),
            None => self.new?.get(name),
        }
    }
}

/// The current document a local write replaces.
pub(crate) enum Prior {
    /// Whole, as read.
    Whole(SharedDoc),
    /// The write's own body with an edit's changes undone (see [`Edit`]),
    /// and its history's ends when the writer had them at hand.
    Edited { undo: Undo, ends: Option<HistoryEnds> },
}

impl Prior {
    /// The old document, given the new one an `Edited` prior was made from
    /// (with any field the store sets itself, such as `_version`, in its
    /// undo list).
    pub fn view<'a>(&'a self, new: Option<&'a Map<String, Value>>) -> Undone<'a> {
        static NOTHING: Undo = Undo(Vec::new());
        match self {
            Prior::Whole(doc) => Undone {
                new: Some(doc),
                undo: &NOTHING,
            },
            Prior::Edited { undo, .. } => Undone { new, undo },
        }
    }

    /// The top-level fields whose value differs between this and `new`:
    /// those of `new` in its order, then those `new` lacks.
    pub fn changed_fields(&self, new: &Map<String, Value>) -> Vec<String> {
        match self {
            Prior::Whole(old) => ocmesh_replication::merge::changed_fields(old, new),
            Prior::Edited { undo, .. } => {
                let mut out: Vec<String> = new
                    .iter()
                    .filter(|(k, v)| undo.get(k).is_some_and(|old| old.as_ref() != Some(*v)))
                    .map(|(k, _)| k.clone())
                    .collect();
                out.extend(
                    undo.0
                        .iter()
                        .filter(|(k, old)| old.is_some() && !new.contains_key(k))
                        .map(|(k, _)| k.clone()),
                );
                out
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use serde_json::json;

    fn obj(v: Value) -> Map<String, Value> {
        v.as_object().cloned().unwrap_or_default()
    }

    /// A step of an edit: set a field (to a value, or an object), or remove it.
    #[derive(Debug, Clone)]
    enum Step {
        Set(usize, i64),
        SetObject(usize, i64),
        Remove(usize),
    }

    const NAMES: [&str; 5] = ["a", "b", "_version", "state", "payload"];

    fn step() -> impl Strategy<Value = Step> {
        prop_oneof![
            (0..NAMES.len(), -3i64..3).prop_map(|(f, v)| Step::Set(f, v)),
            (0..NAMES.len(), -3i64..3).prop_map(|(f, v)| Step::SetObject(f, v)),
            (0..NAMES.len()).prop_map(Step::Remove),
        ]
    }

    proptest! {
        /// Seen through its undo list, an edited document is the document
        /// before the edit, field by field, and its changed fields are the
        /// ones a comparison of two whole copies finds.
        #[test]
        fn an_edit_undone_is_the_document_before_it(
            start in proptest::collection::vec((0..NAMES.len(), -3i64..3), 0..5),
            steps in proptest::collection::vec(step(), 0..8),
        ) {
            let mut before = Map::new();
            for (f, v) in start {
                before.insert(NAMES[f].into(), v.into());
            }
            let mut edit = Edit::new(before.clone(), None);
            for s in steps {
                match s {
                    Step::Set(f, v) => edit.set(NAMES[f], v.into()),
                    Step::SetObject(f, v) => edit.set(NAMES[f], json!({"x": v})),
                    Step::Remove(f) => edit.remove(NAMES[f]),
                }
            }
            let Edit { doc, undo, .. } = edit;
            let prior = Prior::Edited { undo, ends: None };
            let old = prior.view(Some(&doc));
            for name in NAMES.iter().chain(["absent"].iter()) {
                prop_assert_eq!(old.field(name), before.get(*name), "{}", name);
            }
            let mut changed = prior.changed_fields(&doc);
            let mut expected = ocmesh_replication::merge::changed_fields(&before, &doc);
            changed.sort();
            expected.sort();
            prop_assert_eq!(changed, expected);
            let whole = Prior::Whole(std::sync::Arc::new(before.clone()));
            let whole_view = whole.view(Some(&doc));
            for name in NAMES {
                prop_assert_eq!(whole_view.field(name), before.get(name), "{}", name);
            }
        }
    }

    #[test]
    fn edits_of_a_document_in_key_order_keep_it_in_key_order() {
        let mut edit = Edit::new(obj(json!({"_id": "x", "_version": 2, "b": 1, "state": "new"})), None);
        edit.remove("_version");
        edit.set("lastrun", "now".into());
        edit.set("_leaseuntil", "later".into());
        edit.set("state", "processing".into());
        edit.set("a", 0.into());
        let keys: Vec<&str> = edit.doc.keys().map(String::as_str).collect();
        assert_eq!(keys, ["_id", "_leaseuntil", "a", "b", "lastrun", "state"]);
        insert_in_order(&mut edit.doc, "_version", 3.into());
        assert!(edit.doc.keys().is_sorted());
        assert_eq!(edit.doc.get("_version"), Some(&json!(3)));
    }

    #[test]
    fn a_field_set_twice_remembers_its_first_value() {
        let mut edit = Edit::new(obj(json!({"state": "new", "n": 1})), None);
        edit.set("state", "processing".into());
        edit.set("state", "successful".into());
        edit.remove("n");
        edit.set("n", 5.into());
        let Edit { doc, undo, .. } = edit;
        let old = Undone {
            new: Some(&doc),
            undo: &undo,
        };
        assert_eq!(old.field("state"), Some(&json!("new")));
        assert_eq!(old.field("n"), Some(&json!(1)));
        assert_eq!(doc.get("state"), Some(&json!("successful")));
    }
}
