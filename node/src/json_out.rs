//! Encoding a document body: the bytes `serde_json::to_vec` gives, made
//! faster, with the nesting limit checked in the same pass.
//!
//! Every local write encodes its whole document, so a work item's payload
//! is encoded at its push, pop and completion. serde_json looks up every
//! byte of a string in an escape table, which made string escaping about
//! 7% of the writer's time under the work-item cycle. Here a string is
//! first checked for bytes that need escaping (control characters, `"`,
//! `\`) in a loop the compiler vectorizes; a clean string is copied whole,
//! and any other string, every number and every key that needs escaping
//! goes through serde_json itself.
//!
//! Invariant: for any value within the depth limit, [`encode_body`] gives
//! exactly the bytes of `serde_json::to_vec`, so stored bodies and change
//! records do not depend on which encoder wrote them.

use serde_json::{Map, Value};

/// A body nested deeper than the limit; it was not encoded.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct TooDeep;

/// `body` as compact JSON, or [`TooDeep`] when an array or object in it
/// sits deeper than `max_depth` (the body itself is at depth 1, as
/// `ocmesh_replication::change::depth` counts). `capacity` is a guess of
/// the encoded size, which saves the buffer's regrowth.
pub(crate) fn encode_body(body: &Map<String, Value>, max_depth: usize, capacity: usize) -> Result<Vec<u8>, TooDeep> {
    let mut out = Vec::with_capacity(capacity);
    if max_depth == 0 {
        return Err(TooDeep);
    }
    write_object(&mut out, body, 1, max_depth)?;
    Ok(out)
}

fn write_value(out: &mut Vec<u8>, value: &Value, depth: usize, max_depth: usize) -> Result<(), TooDeep> {
    // An array or object here sits one level below `depth`.
    if matches!(value, Value::Array(_) | Value::Object(_)) && depth >= max_depth {
        return Err(TooDeep);
    }
    match value {
        Value::Null => out.extend_from_slice(b"null"),
        Value::Bool(true) => out.extend_from_slice(b"true"),
        Value::Bool(false) => out.extend_from_slice(b"false"),
        Value::Number(n) => serde_json_into(out, n),
        Value::String(s) => write_str(out, s),
        Value::Array(items) => {
            out.push(b'[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                write_value(out, item, depth + 1, max_depth)?;
            }
            out.push(b']');
        }
        Value::Object(map) => write_object(out, map, depth + 1, max_depth)?,
    }
    Ok(())
}

/// An object at `depth` (already checked against the limit).
fn write_object(out: &mut Vec<u8>, map: &Map<String, Value>, depth: usize, max_depth: usize) -> Result<(), TooDeep> {
    out.push(b'{');
    for (i, (key, value)) in map.iter().enumerate() {
        if i > 0 {
            out.push(b',');
        }
        write_str(out, key);
        out.push(b':');
        write_value(out, value, depth, max_depth)?;
    }
    out.push(b'}');
    Ok(())
}

fn write_str(out: &mut Vec<u8>, s: &str) {
    if needs_escape(s.as_bytes()) {
        serde_json_into(out, s);
    } else {
        out.reserve(s.len() + 2);
        out.push(b'"');
        out.extend_from_slice(s.as_bytes());
        out.push(b'"');
    }
}

/// Whether serde_json escapes any byte of `s`: control characters, `"`
/// and `\` (it leaves `/`, DEL and non-ASCII as they are). Each chunk is
/// folded without an early exit, so the compiler checks it in wide steps.
fn needs_escape(s: &[u8]) -> bool {
    s.chunks(64).any(|chunk| {
        chunk
            .iter()
            .fold(false, |seen, &b| seen | (b < 0x20) | (b == b'"') | (b == b'\\'))
    })
}

fn serde_json_into<T: serde::Serialize + ?Sized>(out: &mut Vec<u8>, value: &T) {
    // Writing a string or a number into a Vec cannot fail.
    let _ = serde_json::to_writer(&mut *out, value);
}

#[cfg(test)]
mod tests {
    use super::*;
    use ocmesh_replication::change::depth;
    use proptest::prelude::*;

    fn json_value() -> impl Strategy<Value = Value> {
        let leaf = prop_oneof![
            Just(Value::Null),
            any::<bool>().prop_map(Value::Bool),
            any::<i64>().prop_map(Value::from),
            any::<u64>().prop_map(Value::from),
            any::<f64>().prop_map(Value::from),
            // Every byte class that escaping treats apart: controls, quote,
            // backslash, slash, DEL, multi-byte characters, and long runs.
            "[a-z\"\\\\/\u{0}-\u{1f}\u{7f}é€😀]{0,80}".prop_map(Value::String),
            "x{60,200}".prop_map(Value::String),
        ];
        leaf.prop_recursive(4, 40, 5, |inner| {
            prop_oneof![
                prop::collection::vec(inner.clone(), 0..5).prop_map(Value::Array),
                prop::collection::vec(("[a-c_\"\\\\\u{1}é]{0,3}", inner), 0..5)
                    .prop_map(|kv| Value::Object(kv.into_iter().collect())),
            ]
        })
    }

    fn nested(levels: usize) -> Value {
        (0..levels).fold(Value::from(1), |v, i| {
            if i % 2 == 0 {
                Value::Array(vec![v])
            } else {
                Value::Object([("k".to_owned(), v)].into_iter().collect())
            }
        })
    }

    #[test]
    fn the_limit_counts_levels_as_change_depth_does() {
        for levels in 0..8 {
            let body: Map<String, Value> = [("a".to_owned(), nested(levels))].into_iter().collect();
            let measured = depth(&Value::Object(body.clone()));
            for max in 0..10 {
                let encoded = encode_body(&body, max, 0);
                assert_eq!(encoded.is_ok(), measured <= max, "levels {levels}, max {max}");
                if let Ok(bytes) = encoded {
                    assert_eq!(bytes, serde_json::to_vec(&body).expect("serde_json encodes"));
                }
            }
        }
    }

    #[test]
    fn clean_and_dirty_strings_of_every_length_around_a_chunk() {
        for len in [0usize, 1, 63, 64, 65, 127, 128, 129, 1000] {
            for dirty_at in [None, Some(0), Some(len / 2), Some(len.saturating_sub(1))] {
                let mut s = "y".repeat(len);
                if let Some(at) = dirty_at.filter(|_| len > 0) {
                    s.replace_range(at..at + 1, "\n");
                }
                let body: Map<String, Value> = [(s.clone(), Value::String(s))].into_iter().collect();
                assert_eq!(
                    encode_body(&body, 100, 16).expect("within the limit"),
                    serde_json::to_vec(&body).expect("serde_json encodes")
                );
            }
        }
    }

    proptest! {
        /// Byte for byte what serde_json writes, whenever the value is
        /// within the limit; refused exactly when it is not.
        #[test]
        fn encodes_what_serde_json_encodes(fields in prop::collection::vec(("[a-z_\"\u{2}]{0,4}", json_value()), 0..6), max in 1usize..6) {
            let body: Map<String, Value> = fields.into_iter().collect();
            let within = depth(&Value::Object(body.clone())) <= max;
            match encode_body(&body, max, 0) {
                Ok(bytes) => {
                    prop_assert!(within);
                    prop_assert_eq!(bytes, serde_json::to_vec(&body).expect("serde_json encodes"));
                }
                Err(TooDeep) => prop_assert!(!within),
            }
        }
    }
}
