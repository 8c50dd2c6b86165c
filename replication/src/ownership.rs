//! Work-item ownership across sites: which versions of an item count after
//! a forced takeover.
//!
//! Every work item names its owner, `_owner` (a site) and `_epoch` (1 at
//! push). Only the owner pops and completes it, so without takeovers an
//! item is never worked at two sites. An operator whose site cannot reach
//! the owner may take the item over: a partial update that sets `_owner`
//! to its own site and `_epoch` to one more than it saw. That update is the
//! takeover record.
//!
//! The old owner may still finish the item under the old epoch before it
//! hears of the takeover. Such a result must stay in history but must
//! never overwrite the new owner's work. [`settle`] therefore picks the
//! winning claim, the takeover with the highest epoch (ties: the greatest
//! version), and neutralises every update whose claim differs from it and
//! that the takeover did not see (ordered after the takeover's base): the
//! update keeps its place in history but sets no field, and the pair is
//! reported as a conflict on `_epoch`. The outcome is a pure function of the
//! set of versions, like the merge it feeds.

use serde_json::Value;

use crate::change::ChangeKind;
use crate::merge::{Conflict, VersionRecord};

/// The site that owns a work item.
pub const OWNER_FIELD: &str = "_owner";
/// How many times the item has been taken over, plus one.
pub const EPOCH_FIELD: &str = "_epoch";

/// The (epoch, owner) a version was written under; items from before
/// ownership existed have epoch 0 and no owner.
fn claim(v: &VersionRecord) -> (u64, Option<&str>) {
    (
        v.body.get(EPOCH_FIELD).and_then(Value::as_u64).unwrap_or(0),
        v.body.get(OWNER_FIELD).and_then(Value::as_str),
    )
}

/// A takeover is an update that names the epoch among the fields it set.
fn is_takeover(v: &VersionRecord) -> bool {
    v.kind == ChangeKind::Update && v.fields.as_ref().is_some_and(|f| f.iter().any(|f| f == EPOCH_FIELD))
}

/// Sorts and deduplicates a work item's versions the way
/// [`crate::merge::merge`] does, and neutralises the updates that a
/// concurrent takeover made stale. Returns one conflict per neutralised
/// version (`kept` is the winning takeover's position).
pub fn settle(versions: &mut Vec<VersionRecord>) -> Vec<Conflict> {
    versions.sort_by(|a, b| a.key.cmp(&b.key));
    versions.dedup_by(|a, b| a.key == b.key);
    // The greatest (epoch, key) among takeovers; positions follow key order.
    let Some(winner) = (0..versions.len())
        .filter(|&i| is_takeover(&versions[i]))
        .max_by_key(|&i| (claim(&versions[i]).0, i))
    else {
        return Vec::new();
    };
    let (epoch, owner) = claim(&versions[winner]);
    let (epoch, owner) = (epoch, owner.map(str::to_owned));
    let seen_up_to = versions[winner]
        .base
        .clone()
        .unwrap_or_else(|| versions[winner].key.clone());
    let mut conflicts = Vec::new();
    for (pos, v) in versions.iter_mut().enumerate() {
        let stale = pos != winner
            && v.kind == ChangeKind::Update
            && v.key > seen_up_to
            && claim(v) != (epoch, owner.as_deref());
        if stale {
            v.fields = Some(Vec::new());
            conflicts.push(Conflict {
                field: EPOCH_FIELD.into(),
                kept: winner as u64,
                lost: pos as u64,
            });
        }
    }
    conflicts
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::VersionKey;
    use crate::hlc::Timestamp;
    use crate::merge::merge;
    use proptest::prelude::*;
    use serde_json::{Map, json};

    fn key(hlc: u64, origin: &str) -> VersionKey {
        VersionKey {
            hlc: Timestamp::from_raw(hlc),
            origin: origin.into(),
        }
    }

    fn body(v: Value) -> Map<String, Value> {
        v.as_object().cloned().expect("object")
    }

    fn push(hlc: u64, at: &str, owner: &str) -> VersionRecord {
        VersionRecord {
            key: key(hlc, at),
            kind: ChangeKind::Insert,
            fields: None,
            base: None,
            body: body(json!({"state": "new", "_owner": owner, "_epoch": 1})),
        }
    }

    fn update(hlc: u64, at: &str, base: (u64, &str), doc: Value, fields: &[&str]) -> VersionRecord {
        VersionRecord {
            key: key(hlc, at),
            kind: ChangeKind::Update,
            fields: Some(fields.iter().map(|f| (*f).to_owned()).collect()),
            base: Some(key(base.0, base.1)),
            body: body(doc),
        }
    }

    fn settled(mut versions: Vec<VersionRecord>) -> (Option<Map<String, Value>>, Vec<Conflict>) {
        let mut conflicts = settle(&mut versions);
        let merged = merge(versions);
        conflicts.extend(merged.conflicts);
        conflicts.sort_by(|a, b| (&a.field, a.kept, a.lost).cmp(&(&b.field, b.kept, b.lost)));
        (merged.doc, conflicts)
    }

    #[test]
    fn an_old_owners_late_result_never_overwrites_the_new_owners() {
        // Pushed at a, owned by b; b pops; a takes it over while cut off.
        let versions = vec![
            push(10, "a", "b"),
            update(
                20,
                "b",
                (10, "a"),
                json!({"state": "processing", "_owner": "b", "_epoch": 1}),
                &["state"],
            ),
            update(
                30,
                "a",
                (10, "a"),
                json!({"state": "new", "_owner": "a", "_epoch": 2}),
                &["_owner", "_epoch"],
            ),
            update(
                40,
                "a",
                (30, "a"),
                json!({"state": "successful", "_owner": "a", "_epoch": 2}),
                &["state"],
            ),
            // b's result arrives last, written under epoch 1.
            update(
                50,
                "b",
                (20, "b"),
                json!({"state": "failed", "_owner": "b", "_epoch": 1}),
                &["state"],
            ),
        ];
        let (doc, conflicts) = settled(versions);
        let doc = doc.expect("live");
        assert_eq!(
            (&doc["state"], &doc["_owner"], &doc["_epoch"]),
            (&json!("successful"), &json!("a"), &json!(2))
        );
        // b's pop (20) and b's result (50) were unseen by the takeover (30).
        let lost: Vec<u64> = conflicts
            .iter()
            .filter(|c| c.field == EPOCH_FIELD)
            .map(|c| c.lost)
            .collect();
        assert_eq!(lost, vec![1, 4]);
        assert!(conflicts.iter().all(|c| c.field != EPOCH_FIELD || c.kept == 2));
    }

    #[test]
    fn versions_the_takeover_saw_count_as_history() {
        let versions = vec![
            push(10, "a", "b"),
            update(
                20,
                "b",
                (10, "a"),
                json!({"state": "processing", "_owner": "b", "_epoch": 1}),
                &["state"],
            ),
            update(
                30,
                "a",
                (20, "b"),
                json!({"state": "new", "_owner": "a", "_epoch": 2}),
                &["_owner", "_epoch", "state"],
            ),
        ];
        let (doc, conflicts) = settled(versions);
        assert_eq!(doc.expect("live")["_owner"], json!("a"));
        assert!(conflicts.is_empty(), "{conflicts:?}");
    }

    #[test]
    fn of_two_concurrent_takeovers_one_wins_everywhere() {
        let versions = vec![
            push(10, "a", "b"),
            update(
                30,
                "a",
                (10, "a"),
                json!({"state": "new", "_owner": "a", "_epoch": 2}),
                &["_owner", "_epoch"],
            ),
            update(
                31,
                "c",
                (10, "a"),
                json!({"state": "new", "_owner": "c", "_epoch": 2}),
                &["_owner", "_epoch"],
            ),
            update(
                40,
                "a",
                (30, "a"),
                json!({"state": "successful", "_owner": "a", "_epoch": 2}),
                &["state"],
            ),
        ];
        let (doc, conflicts) = settled(versions);
        let doc = doc.expect("live");
        // The greater takeover (c's) wins; a's takeover and a's work lose.
        assert_eq!((&doc["_owner"], &doc["state"]), (&json!("c"), &json!("new")));
        let lost: Vec<u64> = conflicts
            .iter()
            .filter(|c| c.field == EPOCH_FIELD)
            .map(|c| c.lost)
            .collect();
        assert_eq!(lost, vec![1, 3]);
    }

    #[test]
    fn items_without_takeovers_are_untouched() {
        let mut versions = vec![
            push(10, "a", "a"),
            update(
                20,
                "a",
                (10, "a"),
                json!({"state": "processing", "_owner": "a", "_epoch": 1}),
                &["state"],
            ),
        ];
        let before: Vec<_> = versions.iter().map(|v| v.fields.clone()).collect();
        assert!(settle(&mut versions).is_empty());
        assert_eq!(before, versions.iter().map(|v| v.fields.clone()).collect::<Vec<_>>());
    }

    fn arb_item_history() -> impl Strategy<Value = Vec<VersionRecord>> {
        let site = prop_oneof![Just("a"), Just("b"), Just("c")];
        let state = prop_oneof![Just("new"), Just("processing"), Just("successful"), Just("failed")];
        let step = (1u64..6, site, state, any::<bool>(), 0u64..60);
        proptest::collection::vec(step, 0..10).prop_map(|steps| {
            let mut out = vec![push(1, "a", "b")];
            for (i, (epoch, at, state, takeover, base)) in steps.into_iter().enumerate() {
                let hlc = 2 + i as u64 * 3;
                let base = base.min(hlc - 1);
                let mut fields = vec!["state"];
                if takeover {
                    fields.extend(["_owner", "_epoch"]);
                }
                out.push(update(
                    hlc,
                    at,
                    (base, "a"),
                    json!({"state": state, "_owner": at, "_epoch": epoch}),
                    &fields,
                ));
            }
            out
        })
    }

    proptest! {
        /// Delivery order and duplicates never change the settled item.
        #[test]
        fn settling_is_order_and_duplicate_independent(versions in arb_item_history(), seed in any::<u64>()) {
            let reference = settled(versions.clone());
            let mut shuffled = versions.clone();
            shuffled.extend(versions.iter().take(seed as usize % (versions.len() + 1)).cloned());
            let n = shuffled.len();
            for i in 0..n {
                let j = ((seed.rotate_left(i as u32 % 64) ^ i as u64) % n as u64) as usize;
                shuffled.swap(i, j);
            }
            prop_assert_eq!(settled(shuffled), reference);
        }

        /// Settling twice is settling once.
        #[test]
        fn settling_is_idempotent(versions in arb_item_history()) {
            let mut once = versions.clone();
            let first = settle(&mut once);
            let mut twice = once.clone();
            let second = settle(&mut twice);
            prop_assert_eq!(first, second);
            prop_assert_eq!(
                once.iter().map(|v| v.fields.clone()).collect::<Vec<_>>(),
                twice.iter().map(|v| v.fields.clone()).collect::<Vec<_>>()
            );
        }
    }
}
