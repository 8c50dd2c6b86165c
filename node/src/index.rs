//! Secondary indexes: for an indexed field, one entry per scalar value the
//! field holds (each element of an array), keyed so that byte order is the
//! query value order. `_type` is indexed in every collection. Indexes only
//! narrow the candidates; the filter is always applied to the documents
//! they yield, so an index can never change a query's answer.

use serde_json::Value;

use crate::edit::Fields;
use crate::query::value::{resolve, split_path};

/// Fields indexed in every collection.
pub const ALWAYS_INDEXED: &[&str] = &["_type"];

/// Order-preserving bytes of a scalar: a type tag in the cross-type sort
/// order, then the value. `None` for null, objects and arrays, which
/// indexes do not hold (queries on them scan).
pub fn key_of(v: &Value) -> Option<Vec<u8>> {
    match v {
        Value::Number(n) => {
            let f = n.as_f64()?;
            // IEEE-754 order trick: flip all bits of negatives, the sign bit of positives.
            let bits = f.to_bits();
            let ordered = if bits >> 63 == 1 { !bits } else { bits | (1 << 63) };
            let mut out = vec![2u8];
            out.extend_from_slice(&ordered.to_be_bytes());
            Some(out)
        }
        Value::String(s) => {
            let mut out = Vec::with_capacity(1 + s.len());
            out.push(3u8);
            out.extend_from_slice(s.as_bytes());
            Some(out)
        }
        Value::Bool(b) => Some(vec![6u8, u8::from(*b)]),
        Value::Null | Value::Object(_) | Value::Array(_) => None,
    }
}

/// The index keys of `doc` for `field`, deduplicated.
#[cfg(test)]
pub fn keys_for(doc: &Value, field: &str) -> Vec<Vec<u8>> {
    let mut found = Vec::new();
    resolve(doc, &split_path(field), &mut found);
    keys_of_found(found)
}

/// `keys_for` on a document's fields, however it is held (see
/// `crate::edit`), without wrapping them in a `Value`.
pub(crate) fn keys_for_fields(doc: &dyn Fields, field: &str) -> Vec<Vec<u8>> {
    let path = split_path(field);
    let mut found = Vec::new();
    if let Some((first, rest)) = path.split_first()
        && let Some(child) = doc.field(first)
    {
        resolve(child, rest, &mut found);
    }
    keys_of_found(found)
}

fn keys_of_found(found: Vec<&Value>) -> Vec<Vec<u8>> {
    let mut keys: Vec<Vec<u8>> = found
        .into_iter()
        .flat_map(|v| match v {
            Value::Array(items) => items.iter().filter_map(key_of).collect::<Vec<_>>(),
            other => key_of(other).into_iter().collect(),
        })
        .collect();
    keys.sort();
    keys.dedup();
    keys
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use serde_json::json;

    proptest! {
        /// Byte order of keys is numeric order.
        #[test]
        fn number_keys_sort_like_numbers(a in -1e12f64..1e12, b in -1e12f64..1e12) {
            let (ka, kb) = (key_of(&json!(a)).expect("a"), key_of(&json!(b)).expect("b"));
            prop_assert_eq!(ka.cmp(&kb), a.total_cmp(&b));
        }
    }

    #[test]
    fn arrays_index_each_element() {
        let doc = json!({"tags": ["b", "a", "b", {"x": 1}], "n": 1, "o": {"p": true}});
        assert_eq!(keys_for(&doc, "tags").len(), 2);
        assert_eq!(keys_for(&doc, "o.p"), vec![vec![6, 1]]);
        let map = doc.as_object().expect("object");
        for field in ["tags", "o.p", "n", "missing"] {
            assert_eq!(keys_for_fields(map, field), keys_for(&doc, field), "{field}");
        }
        assert!(keys_for(&doc, "missing").is_empty());
        assert_eq!(key_of(&json!(1)), key_of(&json!(1.0)));
    }
}
