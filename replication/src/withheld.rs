//! Withheld ranges: the (origin, seq) a site holds only as withheld stubs,
//! kept as ranges per origin. A site's version vector covers its stubs (so
//! catch-up stays exact); this set says which of the covered changes it
//! lacks the content of. Its hello carries the set, range-compressed, so a
//! peer that may share one of them in full sends it.

use std::collections::BTreeMap;

use ocmesh_proto::federation as pb;

/// Most ranges a hello carries (and accepts): bounds the hello's size. A
/// site withheld more ranges than this asks for the oldest first.
pub const MAX_HELLO_RANGES: usize = 4096;

/// Why a withheld range from the wire was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum RangeError {
    #[error("withheld range has an empty origin")]
    EmptyOrigin,
    #[error("withheld range {origin}:{first}..={last} is empty or starts at 0")]
    BadBounds { origin: String, first: u64, last: u64 },
    #[error("hello lists {0} withheld ranges, more than the {MAX_HELLO_RANGES} allowed")]
    TooMany(usize),
}

/// Sets of sequences per origin, as disjoint, non-adjacent ranges.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RangeSet(BTreeMap<String, BTreeMap<u64, u64>>);

impl RangeSet {
    pub fn new() -> Self {
        Self::default()
    }

    /// True when `origin`:`seq` is in the set.
    pub fn contains(&self, origin: &str, seq: u64) -> bool {
        self.0
            .get(origin)
            .and_then(|r| r.range(..=seq).next_back())
            .is_some_and(|(_, &last)| seq <= last)
    }

    /// Adds `origin`:`first..=last` (`first <= last`), merging with
    /// overlapping and adjacent ranges.
    pub fn insert_range(&mut self, origin: &str, first: u64, last: u64) {
        if first > last {
            return;
        }
        let ranges = self.0.entry(origin.to_owned()).or_default();
        let (mut lo, mut hi) = (first, last);
        let touching: Vec<u64> = ranges
            .range(..=hi.saturating_add(1))
            .rev()
            .take_while(|&(_, &l)| l.saturating_add(1) >= lo)
            .map(|(&f, _)| f)
            .collect();
        for f in touching {
            if let Some(l) = ranges.remove(&f) {
                lo = lo.min(f);
                hi = hi.max(l);
            }
        }
        ranges.insert(lo, hi);
    }

    pub fn insert(&mut self, origin: &str, seq: u64) {
        self.insert_range(origin, seq, seq);
    }

    /// Removes `origin`:`seq`; true if it was there.
    pub fn remove(&mut self, origin: &str, seq: u64) -> bool {
        let Some(ranges) = self.0.get_mut(origin) else {
            return false;
        };
        let Some((&f, &l)) = ranges.range(..=seq).next_back() else {
            return false;
        };
        if seq > l {
            return false;
        }
        ranges.remove(&f);
        if f < seq {
            ranges.insert(f, seq - 1);
        }
        if seq < l {
            ranges.insert(seq + 1, l);
        }
        if ranges.is_empty() {
            self.0.remove(origin);
        }
        true
    }

    /// Number of sequences in the set.
    pub fn len(&self) -> u64 {
        self.0.values().flat_map(|r| r.iter().map(|(f, l)| l - f + 1)).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// The ranges, per origin in name order, each in sequence order.
    pub fn ranges(&self) -> impl Iterator<Item = (&str, u64, u64)> {
        self.0
            .iter()
            .flat_map(|(o, r)| r.iter().map(move |(&f, &l)| (o.as_str(), f, l)))
    }

    /// Wire form: at most `max` ranges.
    pub fn to_proto(&self, max: usize) -> Vec<pb::SeqRange> {
        self.ranges()
            .take(max)
            .map(|(origin, first, last)| pb::SeqRange {
                origin: origin.to_owned(),
                first,
                last,
            })
            .collect()
    }

    /// Reads the wire form, refusing malformed ranges and more than
    /// [`MAX_HELLO_RANGES`].
    pub fn from_proto(ranges: &[pb::SeqRange]) -> Result<Self, RangeError> {
        if ranges.len() > MAX_HELLO_RANGES {
            return Err(RangeError::TooMany(ranges.len()));
        }
        let mut set = RangeSet::new();
        for r in ranges {
            if r.origin.is_empty() {
                return Err(RangeError::EmptyOrigin);
            }
            if r.first == 0 || r.first > r.last {
                return Err(RangeError::BadBounds {
                    origin: r.origin.clone(),
                    first: r.first,
                    last: r.last,
                });
            }
            set.insert_range(&r.origin, r.first, r.last);
        }
        Ok(set)
    }
}

impl FromIterator<(String, u64)> for RangeSet {
    fn from_iter<I: IntoIterator<Item = (String, u64)>>(iter: I) -> Self {
        let mut set = RangeSet::new();
        for (o, s) in iter {
            set.insert(&o, s);
        }
        set
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::BTreeSet;

    #[test]
    fn ranges_merge_split_and_round_trip() {
        let mut s = RangeSet::new();
        for seq in [1, 2, 3, 5, 7, 6] {
            s.insert("a", seq);
        }
        assert_eq!(s.ranges().collect::<Vec<_>>(), vec![("a", 1, 3), ("a", 5, 7)]);
        s.insert("a", 4);
        assert_eq!(s.ranges().collect::<Vec<_>>(), vec![("a", 1, 7)]);
        assert!(s.remove("a", 4));
        assert!(!s.remove("a", 4));
        assert_eq!(s.ranges().collect::<Vec<_>>(), vec![("a", 1, 3), ("a", 5, 7)]);
        assert_eq!(s.len(), 6);
        assert_eq!(RangeSet::from_proto(&s.to_proto(100)), Ok(s.clone()));
        assert_eq!(s.to_proto(1).len(), 1);
        let bad = |origin: &str, first, last| pb::SeqRange {
            origin: origin.into(),
            first,
            last,
        };
        assert_eq!(RangeSet::from_proto(&[bad("", 1, 1)]), Err(RangeError::EmptyOrigin));
        assert!(matches!(
            RangeSet::from_proto(&[bad("a", 3, 2)]),
            Err(RangeError::BadBounds { .. })
        ));
        assert!(matches!(
            RangeSet::from_proto(&[bad("a", 0, 2)]),
            Err(RangeError::BadBounds { .. })
        ));
        let many = vec![bad("a", 1, 1); MAX_HELLO_RANGES + 1];
        assert_eq!(
            RangeSet::from_proto(&many),
            Err(RangeError::TooMany(MAX_HELLO_RANGES + 1))
        );
    }

    proptest! {
        /// The set holds exactly what was inserted and not removed, in as
        /// few ranges as possible, whatever the order.
        #[test]
        fn behaves_like_a_set_of_sequences(ops in proptest::collection::vec((any::<bool>(), 0usize..2, 1u64..40), 0..120)) {
            let mut s = RangeSet::new();
            let mut model: BTreeSet<(String, u64)> = BTreeSet::new();
            for (add, o, seq) in ops {
                let origin = ["a", "b"][o];
                if add {
                    s.insert(origin, seq);
                    model.insert((origin.to_owned(), seq));
                } else {
                    prop_assert_eq!(s.remove(origin, seq), model.remove(&(origin.to_owned(), seq)));
                }
            }
            for o in ["a", "b"] {
                for seq in 0..42 {
                    prop_assert_eq!(s.contains(o, seq), model.contains(&(o.to_owned(), seq)));
                }
            }
            prop_assert_eq!(s.len(), model.len() as u64);
            // Minimal: no two ranges of an origin touch.
            let r: Vec<_> = s.ranges().collect();
            for w in r.windows(2) {
                if w[0].0 == w[1].0 {
                    prop_assert!(w[0].2 + 1 < w[1].1);
                }
            }
            prop_assert_eq!(RangeSet::from_proto(&s.to_proto(MAX_HELLO_RANGES)), Ok(s.clone()));
        }
    }
}
