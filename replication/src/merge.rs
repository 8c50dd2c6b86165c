//! Merging a document's versions into its current state, field by field.
//!
//! A document's history is a set of versions; its current state is a pure
//! function of that set, so every site that holds the same versions shows
//! the same document, whatever order they arrived in and however often.
//! The versions are folded in `VersionKey` order (HLC, then origin):
//! - an insert (or a whole-document write) sets the whole document;
//! - a partial update sets or removes just the top-level fields it names,
//!   so concurrent updates of different fields both survive;
//! - a delete removes the document. An update ordered after a delete it did
//!   not see leaves the document deleted: a late peer's edit never brings a
//!   deleted document back (only an insert, such as a recover, does).
//!
//! A same-field conflict is two updates that set the same field where the
//! later one did not build on the earlier one (the earlier is ordered after
//! the later one's base). The later one's value stands; both stay in
//! history, and the pair is reported. Bookkeeping fields (`_modified`...)
//! are set by every write and never reported.
//!
//! An update that is the first version a site holds of a document (the
//! versions before it were withheld from this site, see `crate::filter`)
//! sets the whole document from its body, which is always the document as
//! written: the first version a site may see, it sees whole.
//!
//! `_acl` is merged per principal (see `acl_merge`): a revoke concurrent
//! with a grant of the same principal's rights wins, and concurrent edits
//! of different principals both survive.

use std::collections::HashMap;

use serde_json::{Map, Value};

use crate::acl_merge::AclState;
use crate::change::{ChangeKind, VersionKey};

/// Fields every write stamps; their last writer wins without a conflict.
pub const BOOKKEEPING: &[&str] = &["_modified", "_modifiedby", "_modifiedbyid", "_version"];

/// One version of a document, as the merge reads it.
#[derive(Debug, Clone)]
pub struct VersionRecord {
    pub key: VersionKey,
    pub kind: ChangeKind,
    /// `Some(fields)` for a partial update; `None` for a whole-document write.
    pub fields: Option<Vec<String>>,
    /// The version the writer replaced, when it said.
    pub base: Option<VersionKey>,
    pub body: Map<String, Value>,
}

/// A same-field conflict: `kept` overwrote `lost` without having seen it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Conflict {
    pub field: String,
    /// Positions in version order (the `_version` numbers).
    pub kept: u64,
    pub lost: u64,
}

/// A document's current state and its conflicts.
#[derive(Debug, Clone, PartialEq)]
pub struct Merged {
    /// `None` when the document is deleted (or never existed).
    pub doc: Option<Map<String, Value>>,
    pub conflicts: Vec<Conflict>,
}

/// Folds a document's versions (any order, duplicates allowed) into its
/// current state.
pub fn merge(mut versions: Vec<VersionRecord>) -> Merged {
    versions.sort_by(|a, b| a.key.cmp(&b.key));
    versions.dedup_by(|a, b| a.key == b.key);
    let mut doc: Option<Map<String, Value>> = None;
    // Field → position of the version that last set it.
    let mut setter: HashMap<String, usize> = HashMap::new();
    let mut deleted_at: Option<usize> = None;
    let mut acl = AclState::default();
    let mut conflicts = Vec::new();
    for (pos, v) in versions.iter().enumerate() {
        // Whether the version at `other` was unknown to this one's writer.
        let unseen = |other: usize| v.base.as_ref().is_some_and(|b| versions[other].key > *b);
        let acl_conflicts = |lost: Vec<usize>| {
            lost.into_iter().map(move |l| Conflict {
                field: "_acl".into(),
                kept: pos as u64,
                lost: l as u64,
            })
        };
        let starts_history = pos == 0 && v.kind == ChangeKind::Update;
        match v.kind {
            _ if starts_history => {
                doc = Some(v.body.clone());
                setter = v.body.keys().map(|k| (k.clone(), pos)).collect();
                acl.reset(pos, &v.body);
            }
            ChangeKind::Delete => {
                doc = None;
                setter.clear();
                acl.clear(pos);
                deleted_at = Some(pos);
            }
            ChangeKind::Update if v.fields.is_some() => {
                let Some(current) = doc.as_mut() else {
                    // An edit of a document deleted behind its back.
                    if let Some(d) = deleted_at.filter(|d| unseen(*d)) {
                        conflicts.push(Conflict {
                            field: "_deleted".into(),
                            kept: d as u64,
                            lost: pos as u64,
                        });
                    }
                    continue;
                };
                for f in v.fields.iter().flatten() {
                    if f == "_acl" {
                        let lost = acl.apply(pos, &v.body, current, |p| !unseen(p));
                        conflicts.extend(acl_conflicts(lost));
                        setter.insert(f.clone(), pos);
                        continue;
                    }
                    if !BOOKKEEPING.contains(&f.as_str())
                        && let Some(&prev) = setter.get(f)
                        && prev != pos
                        && unseen(prev)
                    {
                        conflicts.push(Conflict {
                            field: f.clone(),
                            kept: pos as u64,
                            lost: prev as u64,
                        });
                    }
                    match v.body.get(f) {
                        Some(value) => {
                            current.insert(f.clone(), value.clone());
                        }
                        None => {
                            current.shift_remove(f);
                        }
                    }
                    setter.insert(f.clone(), pos);
                }
            }
            ChangeKind::Update if doc.is_none() => {
                // A whole-document update after a delete it did not see.
                if let Some(d) = deleted_at.filter(|d| unseen(*d)) {
                    conflicts.push(Conflict {
                        field: "_deleted".into(),
                        kept: d as u64,
                        lost: pos as u64,
                    });
                }
            }
            // A whole-document update of a live document: its `_acl` is
            // merged per principal.
            ChangeKind::Update => {
                let mut new = v.body.clone();
                match doc.as_mut().and_then(|d| d.shift_remove("_acl")) {
                    Some(old) => new.insert("_acl".into(), old),
                    None => new.shift_remove("_acl"),
                };
                conflicts.extend(acl_conflicts(acl.apply(pos, &v.body, &mut new, |p| !unseen(p))));
                doc = Some(new);
                setter = v.body.keys().map(|k| (k.clone(), pos)).collect();
            }
            // An insert.
            _ => {
                doc = Some(v.body.clone());
                setter = v.body.keys().map(|k| (k.clone(), pos)).collect();
                acl.reset(pos, &v.body);
                deleted_at = None;
            }
        }
    }
    Merged { doc, conflicts }
}

/// The top-level fields whose values differ between two versions of a
/// document (present in one only, or unequal), bookkeeping included.
pub fn changed_fields(old: &Map<String, Value>, new: &Map<String, Value>) -> Vec<String> {
    let mut out: Vec<String> = new
        .iter()
        .filter(|(k, v)| old.get(*k) != Some(*v))
        .map(|(k, _)| k.clone())
        .collect();
    out.extend(old.keys().filter(|k| !new.contains_key(*k)).cloned());
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hlc::Timestamp;
    use proptest::prelude::*;
    use serde_json::json;

    fn key(hlc: u64, origin: &str) -> VersionKey {
        VersionKey {
            hlc: Timestamp::from_raw(hlc),
            origin: origin.into(),
        }
    }

    fn obj(v: Value) -> Map<String, Value> {
        v.as_object().cloned().unwrap_or_default()
    }

    fn insert(hlc: u64, origin: &str, body: Value) -> VersionRecord {
        VersionRecord {
            key: key(hlc, origin),
            kind: ChangeKind::Insert,
            fields: None,
            base: None,
            body: obj(body),
        }
    }

    fn update(hlc: u64, origin: &str, base: (u64, &str), body: Value, fields: &[&str]) -> VersionRecord {
        VersionRecord {
            key: key(hlc, origin),
            kind: ChangeKind::Update,
            fields: Some(fields.iter().map(|f| (*f).to_owned()).collect()),
            base: Some(key(base.0, base.1)),
            body: obj(body),
        }
    }

    fn delete(hlc: u64, origin: &str, base: (u64, &str)) -> VersionRecord {
        VersionRecord {
            key: key(hlc, origin),
            kind: ChangeKind::Delete,
            fields: None,
            base: Some(key(base.0, base.1)),
            body: Map::new(),
        }
    }

    #[test]
    fn an_update_first_held_sets_the_whole_document() {
        // The insert was withheld from this site: the update it holds
        // shows the document as written.
        let m = merge(vec![update(
            2,
            "a",
            (1, "a"),
            json!({"x": 1, "y": 0, "_acl": []}),
            &["x"],
        )]);
        assert_eq!(m.doc, Some(obj(json!({"x": 1, "y": 0, "_acl": []}))));
        // Once the insert arrives, the fold is the origin's.
        let full = merge(vec![
            insert(1, "a", json!({"x": 0, "y": 0, "z": 9})),
            update(2, "a", (1, "a"), json!({"x": 1, "y": 0, "_acl": []}), &["x"]),
        ]);
        assert_eq!(full.doc, Some(obj(json!({"x": 1, "y": 0, "z": 9}))));
        // A later update on top of a first-held one applies its fields.
        let m = merge(vec![
            update(2, "a", (1, "a"), json!({"x": 1, "y": 0}), &["x"]),
            update(3, "a", (2, "a"), json!({"x": 1, "y": 5}), &["y"]),
        ]);
        assert_eq!(m.doc, Some(obj(json!({"x": 1, "y": 5}))));
        assert!(m.conflicts.is_empty());
    }

    #[test]
    fn concurrent_edits_of_different_fields_both_survive() {
        let m = merge(vec![
            insert(1, "a", json!({"x": 0, "y": 0})),
            update(2, "a", (1, "a"), json!({"x": 1, "y": 0}), &["x"]),
            update(3, "b", (1, "a"), json!({"x": 0, "y": 2}), &["y"]),
        ]);
        assert_eq!(m.doc, Some(obj(json!({"x": 1, "y": 2}))));
        assert!(m.conflicts.is_empty());
    }

    #[test]
    fn a_same_field_conflict_is_reported_and_the_later_value_stands() {
        let m = merge(vec![
            insert(1, "a", json!({"x": 0})),
            update(2, "a", (1, "a"), json!({"x": 1}), &["x", "_modified"]),
            update(3, "b", (1, "a"), json!({"x": 2}), &["x", "_modified"]),
        ]);
        assert_eq!(m.doc, Some(obj(json!({"x": 2}))));
        assert_eq!(
            m.conflicts,
            vec![Conflict {
                field: "x".into(),
                kept: 2,
                lost: 1
            }]
        );
        // An edit that built on the other is no conflict.
        let m = merge(vec![
            insert(1, "a", json!({"x": 0})),
            update(2, "a", (1, "a"), json!({"x": 1}), &["x"]),
            update(3, "b", (2, "a"), json!({"x": 2}), &["x"]),
        ]);
        assert!(m.conflicts.is_empty());
    }

    #[test]
    fn a_late_edit_never_brings_a_deleted_document_back() {
        let m = merge(vec![
            insert(1, "a", json!({"x": 0})),
            delete(2, "a", (1, "a")),
            update(9, "b", (1, "a"), json!({"x": 5}), &["x"]),
        ]);
        assert_eq!(m.doc, None);
        assert_eq!(m.conflicts.len(), 1);
        // A recover (an insert) does.
        let m = merge(vec![
            insert(1, "a", json!({"x": 0})),
            delete(2, "a", (1, "a")),
            insert(3, "a", json!({"x": 0})),
        ]);
        assert_eq!(m.doc, Some(obj(json!({"x": 0}))));
    }

    #[test]
    fn changed_fields_names_sets_and_removals() {
        let mut f = changed_fields(
            &obj(json!({"a": 1, "b": 2, "c": 3})),
            &obj(json!({"a": 1, "b": 9, "d": 4})),
        );
        f.sort();
        assert_eq!(f, vec!["b", "c", "d"]);
    }

    fn acl_of(m: &Merged) -> Vec<Value> {
        m.doc
            .as_ref()
            .and_then(|d| d.get("_acl"))
            .and_then(Value::as_array)
            .cloned()
            .unwrap_or_default()
    }

    fn rights_of(m: &Merged, id: &str, deny: bool) -> Option<u64> {
        acl_of(m)
            .iter()
            .find(|e| e["_id"] == id && e.get("deny").and_then(Value::as_bool).unwrap_or(false) == deny)
            .map(|e| e["rights"].as_u64().unwrap_or(0))
    }

    /// An `_acl` edit: its key, its base, its `_acl`.
    type AclEdit<'a> = ((u64, &'a str), (u64, &'a str), Value);

    /// Merges an insert of `start` at (1, a) and two `_acl` edits.
    fn acl_edits(start: &Value, edits: [AclEdit<'_>; 2]) -> Merged {
        let mut versions = vec![insert(1, "a", json!({"_acl": start}))];
        for ((h, o), base, acl) in edits {
            versions.push(update(h, o, base, json!({"_acl": acl}), &["_acl"]));
        }
        merge(versions)
    }

    #[test]
    fn a_revoke_concurrent_with_a_grant_wins_in_either_order() {
        let base = json!([{"_id": "u", "rights": 2}, {"_id": "o", "rights": 65535}]);
        let grant = json!([{"_id": "u", "rights": 6}, {"_id": "o", "rights": 65535}]);
        let revoke = json!([{"_id": "o", "rights": 65535}]);
        for (g, r) in [((2, "a"), (3, "b")), ((3, "b"), (2, "a"))] {
            let m = acl_edits(&base, [(g, (1, "a"), grant.clone()), (r, (1, "a"), revoke.clone())]);
            assert_eq!(rights_of(&m, "u", false), None, "removed stays removed");
            assert_eq!(rights_of(&m, "o", false), Some(65535));
            assert_eq!(m.conflicts.len(), 1);
        }
        // Concurrent edits of one principal's rights: the intersection.
        let read_delete = json!([{"_id": "u", "rights": 10}, {"_id": "o", "rights": 65535}]);
        let m = acl_edits(
            &base,
            [((2, "a"), (1, "a"), grant.clone()), ((3, "b"), (1, "a"), read_delete)],
        );
        assert_eq!(rights_of(&m, "u", false), Some(2));
        // Sequential edits apply in order: a grant after the revoke it saw.
        let m = acl_edits(&base, [((2, "a"), (1, "a"), revoke), ((3, "b"), (2, "a"), grant)]);
        assert_eq!(rights_of(&m, "u", false), Some(6));
        assert!(m.conflicts.is_empty());
    }

    #[test]
    fn concurrent_edits_of_different_principals_both_survive() {
        let base = json!([{"_id": "u", "rights": 2}, {"_id": "v", "rights": 2}]);
        let m = acl_edits(
            &base,
            [
                ((2, "a"), (1, "a"), json!([{"_id": "v", "rights": 2}])),
                (
                    (3, "b"),
                    (1, "a"),
                    json!([{"_id": "u", "rights": 2}, {"_id": "v", "rights": 2}, {"_id": "w", "rights": 4}]),
                ),
            ],
        );
        assert_eq!(rights_of(&m, "u", false), None);
        assert_eq!(rights_of(&m, "v", false), Some(2));
        assert_eq!(rights_of(&m, "w", false), Some(4));
        assert!(m.conflicts.is_empty());
    }

    #[test]
    fn a_deny_added_concurrently_with_its_removal_stays() {
        let deny = |r: u64| json!([{"_id": "u", "rights": 6}, {"_id": "u", "rights": r, "deny": true}]);
        let undenied = json!([{"_id": "u", "rights": 6}]);
        let m = acl_edits(
            &deny(4),
            [((2, "a"), (1, "a"), undenied.clone()), ((3, "b"), (1, "a"), deny(12))],
        );
        assert_eq!(rights_of(&m, "u", true), Some(12));
        // A deny added while another site edits the grant: both stay.
        let m = acl_edits(
            &undenied,
            [
                ((2, "a"), (1, "a"), deny(4)),
                ((3, "b"), (1, "a"), json!([{"_id": "u", "rights": 2}])),
            ],
        );
        assert_eq!(rights_of(&m, "u", true), Some(4));
        assert_eq!(rights_of(&m, "u", false), Some(2));
        // One site removes the deny, the other changes it: it stays, changed.
        let m = acl_edits(
            &deny(4),
            [((2, "b"), (1, "a"), undenied), ((3, "a"), (1, "a"), deny(8))],
        );
        assert_eq!(rights_of(&m, "u", true), Some(8));
    }
    #[test]
    fn a_whole_document_update_merges_its_acl_per_principal() {
        let m = merge(vec![
            insert(1, "a", json!({"x": 0, "_acl": [{"_id": "u", "rights": 6}]})),
            update(
                2,
                "a",
                (1, "a"),
                json!({"_acl": [{"_id": "u", "rights": 2}]}),
                &["_acl"],
            ),
            VersionRecord {
                fields: None,
                ..update(
                    3,
                    "b",
                    (1, "a"),
                    json!({"x": 1, "_acl": [{"_id": "u", "rights": 6}, {"_id": "w", "rights": 2}]}),
                    &[],
                )
            },
        ]);
        assert_eq!(m.doc.as_ref().and_then(|d| d.get("x")), Some(&json!(1)));
        assert_eq!(rights_of(&m, "u", false), Some(2));
        assert_eq!(rights_of(&m, "w", false), Some(2));
    }

    /// An `_acl` over principals u, v, w: each absent, a grant, or a deny.
    fn arb_acl() -> impl Strategy<Value = Value> {
        proptest::collection::vec((0u8..3, 0u64..8, any::<bool>(), any::<bool>()), 0..4).prop_map(|es| {
            let mut out: Vec<Value> = Vec::new();
            for (p, rights, deny, present) in es {
                let id = ["u", "v", "w"][p as usize];
                if present {
                    let e = if deny {
                        json!({"_id": id, "rights": rights, "deny": true})
                    } else {
                        json!({"_id": id, "rights": rights})
                    };
                    out.push(e);
                }
            }
            Value::Array(out)
        })
    }

    fn arb_versions() -> impl Strategy<Value = Vec<VersionRecord>> {
        let update = (
            2u64..40,
            "[a-c]",
            0u64..40,
            "[a-c]",
            proptest::collection::vec(("[p-s]", proptest::option::of(0i64..4)), 1..3),
        )
            .prop_map(|(h, o, bh, bo, sets)| {
                let mut body = Map::new();
                let mut fields = Vec::new();
                for (f, v) in sets {
                    if let Some(v) = v {
                        body.insert(f.clone(), Value::from(v));
                    }
                    fields.push(f);
                }
                VersionRecord {
                    key: key(h, &o),
                    kind: ChangeKind::Update,
                    fields: Some(fields),
                    base: Some(key(bh.min(h - 1), &bo)),
                    body,
                }
            });
        let del = (2u64..40, "[a-c]").prop_map(|(h, o)| delete(h, &o, (1, "a")));
        let acl = (2u64..40, "[a-c]", 0u64..40, "[a-c]", arb_acl(), any::<bool>()).prop_map(
            |(h, o, bh, bo, acl, partial)| VersionRecord {
                key: key(h, &o),
                kind: ChangeKind::Update,
                fields: partial.then(|| vec!["_acl".to_owned()]),
                base: Some(key(bh.min(h - 1), &bo)),
                body: obj(json!({"p": h, "_acl": acl})),
            },
        );
        let reinsert =
            (2u64..40, "[a-c]", arb_acl()).prop_map(|(h, o, acl)| insert(h, &o, json!({"p": 1, "_acl": acl})));
        let some = prop_oneof![4 => update, 1 => del, 3 => acl, 1 => reinsert];
        proptest::collection::vec(some, 0..12).prop_map(|v| {
            // Keys are unique in real histories (a clock never repeats).
            let mut out = vec![insert(1, "a", json!({"p": 0, "_acl": [{"_id": "u", "rights": 7}]}))];
            for r in v {
                if !out.iter().any(|o| o.key == r.key) {
                    out.push(r);
                }
            }
            out
        })
    }

    proptest! {
        /// Order, duplication and grouping of delivery never change the outcome:
        /// merging is commutative, idempotent and associative.
        #[test]
        fn merge_is_order_and_duplicate_independent(versions in arb_versions(), seed in any::<u64>()) {
            let once = merge(versions.clone());
            let mut shuffled = versions.clone();
            let mut s = seed;
            for i in (1..shuffled.len()).rev() {
                s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                shuffled.swap(i, (s >> 33) as usize % (i + 1));
            }
            // Duplicates, as a peer re-sending what was already applied.
            let dup: Vec<_> = shuffled.iter().take(3).cloned().collect();
            shuffled.extend(dup);
            prop_assert_eq!(&merge(shuffled), &once);
            // Associativity: a site that merged a prefix, then received the
            // rest, holds the union; the union's merge is the same.
            let (left, right) = versions.split_at(versions.len() / 2);
            let mut union: Vec<_> = right.to_vec();
            union.extend(left.iter().cloned());
            prop_assert_eq!(merge(union), once);
        }

        /// Two sites edit one principal's entry from the same base without
        /// seeing each other: whatever the version order, the merged grant
        /// holds no right either removed, and a deny either added stays.
        #[test]
        fn concurrent_acl_edits_resolve_towards_less_access(
            start in proptest::option::of(0u64..16),
            a in proptest::option::of(0u64..16),
            b in proptest::option::of(0u64..16),
            deny in any::<bool>(),
            a_first in any::<bool>(),
        ) {
            let entry = |r: Option<u64>| -> Value {
                let mut acl = vec![json!({"_id": "o", "rights": 65535})];
                if let Some(r) = r {
                    acl.push(if deny { json!({"_id": "u", "rights": r, "deny": true}) } else { json!({"_id": "u", "rights": r}) });
                }
                json!({"_acl": acl})
            };
            let (ha, hb) = if a_first { (2, 3) } else { (3, 2) };
            let m = merge(vec![
                insert(1, "a", entry(start)),
                update(ha, "a", (1, "a"), entry(a), &["_acl"]),
                update(hb, "b", (1, "a"), entry(b), &["_acl"]),
            ]);
            let got = rights_of(&m, "u", deny);
            // What each side did to the entry, relative to the start.
            let (ca, cb) = (a != start, b != start);
            let expected = match (ca, cb) {
                (false, false) => start,
                (true, false) => a,
                (false, true) => b,
                (true, true) if deny => match (a, b) {
                    (Some(x), Some(y)) => Some(x | y),
                    (x, y) => x.or(y),
                },
                (true, true) => match (a, b) {
                    (Some(x), Some(y)) => Some(x & y),
                    _ => None,
                },
            };
            prop_assert_eq!(got, expected);
            prop_assert_eq!(rights_of(&m, "o", false), Some(65535));
        }
    }
}
