//! Change records: the unit of replication. Every local write appends one,
//! in the same store transaction as the write. A change is immutable and
//! applying it twice has the effect of applying it once.

use std::cmp::Ordering;

pub use ocmesh_proto::federation::{Change, ChangeKind};

use crate::hlc::Timestamp;

/// Largest accepted document body in a change (bytes of JSON).
pub const MAX_BODY_BYTES: usize = 16 * 1024 * 1024;

/// Deepest nesting of arrays and objects a site writes into a body (the
/// body itself is level 1). serde_json refuses to parse past 127 levels,
/// so a deeper body could be written once and then never read back, here
/// or at any peer; the margin leaves room for the envelopes that carry a
/// document (a REST body, a work item's `payload`).
pub const MAX_BODY_DEPTH: usize = 100;

/// Nesting depth of `value`: 0 for a scalar, 1 for a flat array or
/// object. Iterative, so any depth is measured without recursion.
pub fn depth(value: &serde_json::Value) -> usize {
    use serde_json::Value;
    fn nested(v: &&Value) -> bool {
        matches!(v, Value::Array(_) | Value::Object(_))
    }
    if !nested(&value) {
        return 0;
    }
    // Only arrays and objects go on the stack: a scalar adds no level, and
    // most values of a document are scalars.
    let mut deepest = 0;
    let mut stack = vec![(value, 1usize)];
    while let Some((v, level)) = stack.pop() {
        deepest = deepest.max(level);
        match v {
            Value::Array(items) => stack.extend(items.iter().filter(nested).map(|i| (i, level + 1))),
            Value::Object(m) => stack.extend(m.values().filter(nested).map(|i| (i, level + 1))),
            _ => {}
        }
    }
    deepest
}

/// Why a change record was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ChangeError {
    #[error("change has an empty origin")]
    EmptyOrigin,
    #[error("change from {origin} has sequence 0; sequences start at 1")]
    ZeroSequence { origin: String },
    #[error("change {origin}:{seq} has an unknown kind {kind}")]
    UnknownKind { origin: String, seq: u64, kind: i32 },
    #[error("change {origin}:{seq} has an empty collection or document id")]
    MissingTarget { origin: String, seq: u64 },
    #[error("change {origin}:{seq} body is {len} bytes, over the {MAX_BODY_BYTES} byte limit")]
    BodyTooLarge { origin: String, seq: u64, len: usize },
    #[error("withheld stub {origin}:{seq} carries content; a stub has only origin and seq")]
    StubWithContent { origin: String, seq: u64 },
}

/// A withheld stub for `origin`:`seq`: it holds the change's place in the
/// origin's sequence and nothing else.
pub fn stub(origin: &str, seq: u64) -> Change {
    Change {
        origin: origin.to_owned(),
        seq,
        withheld: true,
        ..Default::default()
    }
}

/// The stub standing for `change` (itself when it is one).
pub fn stub_of(change: &Change) -> Change {
    stub(&change.origin, change.seq)
}

/// Checks the fields a receiver relies on; does not look at the body's JSON.
pub fn validate(change: &Change) -> Result<(), ChangeError> {
    let origin = || change.origin.clone();
    if change.origin.is_empty() {
        return Err(ChangeError::EmptyOrigin);
    }
    if change.seq == 0 {
        return Err(ChangeError::ZeroSequence { origin: origin() });
    }
    if change.withheld {
        let empty = change.hlc == 0
            && change.kind == 0
            && change.collection.is_empty()
            && change.doc_id.is_empty()
            && change.body.is_empty()
            && change.author.is_empty()
            && !change.partial
            && change.fields.is_empty()
            && change.base_hlc == 0
            && change.base_origin.is_empty()
            && !change.author_admin;
        if !empty {
            return Err(ChangeError::StubWithContent {
                origin: origin(),
                seq: change.seq,
            });
        }
        return Ok(());
    }
    match ChangeKind::try_from(change.kind) {
        Ok(ChangeKind::Insert | ChangeKind::Update | ChangeKind::Delete) => {}
        _ => {
            return Err(ChangeError::UnknownKind {
                origin: origin(),
                seq: change.seq,
                kind: change.kind,
            });
        }
    }
    if change.collection.is_empty() || change.doc_id.is_empty() {
        return Err(ChangeError::MissingTarget {
            origin: origin(),
            seq: change.seq,
        });
    }
    if change.body.len() > MAX_BODY_BYTES {
        return Err(ChangeError::BodyTooLarge {
            origin: origin(),
            seq: change.seq,
            len: change.body.len(),
        });
    }
    Ok(())
}

/// Identifies one version of a document and orders versions: by HLC, then
/// by origin name. The greatest key is the current version, on every site,
/// whatever order the changes arrived in. Two versions never share a key: a
/// site's clock never issues the same timestamp twice.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct VersionKey {
    pub hlc: Timestamp,
    pub origin: String,
}

impl VersionKey {
    /// The key of the version a change writes.
    pub fn of(change: &Change) -> Self {
        VersionKey {
            hlc: Timestamp::from_raw(change.hlc),
            origin: change.origin.clone(),
        }
    }
}

impl Ord for VersionKey {
    fn cmp(&self, other: &Self) -> Ordering {
        self.hlc.cmp(&other.hlc).then_with(|| self.origin.cmp(&other.origin))
    }
}

impl PartialOrd for VersionKey {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn change(origin: &str, seq: u64) -> Change {
        Change {
            origin: origin.into(),
            seq,
            hlc: 1,
            kind: ChangeKind::Insert as i32,
            collection: "entities".into(),
            doc_id: "0123456789abcdef01234567".into(),
            body: b"{}".to_vec(),
            author: "u".into(),
            ..Default::default()
        }
    }

    #[test]
    fn validation_names_the_problem() {
        assert_eq!(validate(&change("a", 1)), Ok(()));
        assert_eq!(validate(&change("", 1)), Err(ChangeError::EmptyOrigin));
        assert_eq!(
            validate(&change("a", 0)),
            Err(ChangeError::ZeroSequence { origin: "a".into() })
        );
        let mut c = change("a", 1);
        c.kind = 99;
        assert!(matches!(validate(&c), Err(ChangeError::UnknownKind { kind: 99, .. })));
        let mut c = change("a", 1);
        c.collection.clear();
        assert!(matches!(validate(&c), Err(ChangeError::MissingTarget { .. })));
        assert_eq!(validate(&stub("a", 3)), Ok(()), "a stub needs no target");
        let mut leaky = stub_of(&change("a", 4));
        leaky.body = b"{\"secret\":1}".to_vec();
        assert!(matches!(
            validate(&leaky),
            Err(ChangeError::StubWithContent { seq: 4, .. })
        ));
    }

    #[test]
    fn depth_counts_nesting() {
        use serde_json::json;
        assert_eq!(depth(&json!(1)), 0);
        assert_eq!(depth(&json!({})), 1);
        assert_eq!(depth(&json!({"a": [1, {"b": []}], "c": 2})), 4);
        let mut deep = json!(0);
        for _ in 0..10_000 {
            deep = serde_json::Value::Array(vec![deep]);
        }
        assert_eq!(depth(&deep), 10_000);
        // Dropping it recursively would overflow the stack: take it apart.
        let mut v = deep;
        while let serde_json::Value::Array(mut a) = v {
            v = a.pop().unwrap_or_default();
        }
    }

    proptest! {
        /// The winner of a set of versions is the same whatever order they
        /// are considered in.
        #[test]
        fn winner_is_order_independent(mut keys in proptest::collection::vec((any::<u64>(), "[a-c]"), 1..20), seed in any::<u64>()) {
            let as_keys = |ks: &[(u64, String)]| ks.iter().map(|(h, o)| VersionKey { hlc: Timestamp::from_raw(*h), origin: o.clone() }).collect::<Vec<_>>();
            let first = as_keys(&keys).into_iter().max();
            // A deterministic shuffle from the seed.
            let n = keys.len();
            let mut s = seed;
            for i in (1..n).rev() {
                s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                keys.swap(i, (s >> 33) as usize % (i + 1));
            }
            prop_assert_eq!(as_keys(&keys).into_iter().max(), first);
        }
    }
}
