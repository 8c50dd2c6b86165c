//! Version vectors: for each origin site, the highest change sequence held
//! with no gap below it. Because every origin numbers its changes 1, 2, 3, ...
//! and sessions deliver them in order, one number per origin says exactly
//! which changes a site holds.

use std::collections::BTreeMap;

use ocmesh_proto::federation as pb;

/// A version vector. Origins absent from the map are at 0 (nothing held).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct VersionVector(BTreeMap<String, u64>);

/// Why a version vector from the wire was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum VersionVectorError {
    #[error("version vector has an entry with an empty origin")]
    EmptyOrigin,
    #[error("version vector names origin {0:?} twice")]
    DuplicateOrigin(String),
}

impl VersionVector {
    /// The empty vector.
    pub fn new() -> Self {
        Self::default()
    }

    /// Highest contiguous sequence held from `origin`.
    pub fn get(&self, origin: &str) -> u64 {
        self.0.get(origin).copied().unwrap_or(0)
    }

    /// Raises `origin` to `seq` if that is higher; never lowers it.
    pub fn advance(&mut self, origin: &str, seq: u64) {
        if seq > self.get(origin) {
            self.0.insert(origin.to_owned(), seq);
        }
    }

    /// Pointwise maximum with `other`.
    pub fn merge(&mut self, other: &VersionVector) {
        for (origin, &seq) in &other.0 {
            self.advance(origin, seq);
        }
    }

    /// Number of changes held here that `other` lacks.
    pub fn missing_from(&self, other: &VersionVector) -> u64 {
        self.0.iter().map(|(o, &s)| s.saturating_sub(other.get(o))).sum()
    }

    /// True when this vector holds something `other` lacks.
    pub fn exceeds(&self, other: &VersionVector) -> bool {
        self.0.iter().any(|(o, &s)| s > other.get(o))
    }

    /// Origins and their sequences, ordered by origin.
    pub fn iter(&self) -> impl Iterator<Item = (&str, u64)> {
        self.0.iter().map(|(o, &s)| (o.as_str(), s))
    }

    /// Number of origins named.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Total number of changes covered.
    pub fn total(&self) -> u64 {
        self.0.values().sum()
    }

    /// Wire form.
    pub fn to_proto(&self) -> pb::VersionVector {
        pb::VersionVector {
            entries: self
                .iter()
                .map(|(origin, seq)| pb::OriginSeq {
                    origin: origin.to_owned(),
                    seq,
                })
                .collect(),
        }
    }

    /// Reads the wire form, refusing malformed vectors.
    pub fn from_proto(v: &pb::VersionVector) -> Result<Self, VersionVectorError> {
        let mut map = BTreeMap::new();
        for e in &v.entries {
            if e.origin.is_empty() {
                return Err(VersionVectorError::EmptyOrigin);
            }
            if map.insert(e.origin.clone(), e.seq).is_some() {
                return Err(VersionVectorError::DuplicateOrigin(e.origin.clone()));
            }
        }
        map.retain(|_, s| *s > 0);
        Ok(VersionVector(map))
    }
}

impl FromIterator<(String, u64)> for VersionVector {
    fn from_iter<I: IntoIterator<Item = (String, u64)>>(iter: I) -> Self {
        let mut vv = VersionVector::new();
        for (o, s) in iter {
            vv.advance(&o, s);
        }
        vv
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn merge_is_pointwise_max() {
        let mut a: VersionVector = [("a".into(), 3), ("b".into(), 1)].into_iter().collect();
        let b: VersionVector = [("b".into(), 5), ("c".into(), 2)].into_iter().collect();
        a.merge(&b);
        assert_eq!((a.get("a"), a.get("b"), a.get("c")), (3, 5, 2));
        assert_eq!(a.missing_from(&b), 3);
        assert!(!b.exceeds(&a));
    }

    #[test]
    fn wire_round_trip_and_refusals() {
        let a: VersionVector = [("a".into(), 3), ("b".into(), 1)].into_iter().collect();
        assert_eq!(VersionVector::from_proto(&a.to_proto()), Ok(a));
        let dup = pb::VersionVector {
            entries: vec![
                pb::OriginSeq {
                    origin: "a".into(),
                    seq: 1,
                },
                pb::OriginSeq {
                    origin: "a".into(),
                    seq: 2,
                },
            ],
        };
        assert_eq!(
            VersionVector::from_proto(&dup),
            Err(VersionVectorError::DuplicateOrigin("a".into()))
        );
        let empty = pb::VersionVector {
            entries: vec![pb::OriginSeq {
                origin: String::new(),
                seq: 1,
            }],
        };
        assert_eq!(VersionVector::from_proto(&empty), Err(VersionVectorError::EmptyOrigin));
    }
}
