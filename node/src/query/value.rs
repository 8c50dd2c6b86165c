//! JSON values as MongoDB compares them: numbers by value whatever their
//! representation, a total order across types for sorting, and dotted
//! paths that reach into nested objects and through arrays.

use std::cmp::Ordering;

use serde_json::Value;

/// A value's JSON type, for messages ("a number", "an array", ...).
pub fn kind_of(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// Rank of a type in the cross-type sort order (MongoDB's, for JSON types).
fn type_rank(v: &Value) -> u8 {
    match v {
        Value::Null => 1,
        Value::Number(_) => 2,
        Value::String(_) => 3,
        Value::Object(_) => 4,
        Value::Array(_) => 5,
        Value::Bool(_) => 6,
    }
}

/// A number exactly as JSON gave it: an integer (i64 or u64) or a finite float.
enum Exact {
    Int(i128),
    Float(f64),
}

fn exact(n: &serde_json::Number) -> Exact {
    match (n.as_i64(), n.as_u64()) {
        (Some(i), _) => Exact::Int(i.into()),
        (None, Some(u)) => Exact::Int(u.into()),
        // serde_json numbers are finite; 0.0 stands in should one not be.
        (None, None) => Exact::Float(n.as_f64().unwrap_or(0.0)),
    }
}

/// Orders an integer against a float by their exact values. Converting
/// the integer to f64 instead rounds above 2^53, which made 2^53 + 1 equal
/// to 2^53 as a float but greater than 2^53 as an integer: not a total
/// order, and sorting panics on one of those.
fn cmp_int_float(i: i128, f: f64) -> Ordering {
    // Beyond ±2^127 no i64 or u64 can reach.
    const LIMIT: f64 = 170_141_183_460_469_231_731_687_303_715_884_105_728.0;
    if f >= LIMIT {
        return Ordering::Less;
    }
    if f < -LIMIT {
        return Ordering::Greater;
    }
    let whole = f.trunc();
    // Exact: `whole` is integral and within i128.
    let w = whole as i128;
    i.cmp(&w).then_with(|| {
        let frac = f - whole;
        if frac > 0.0 {
            Ordering::Less
        } else if frac < 0.0 {
            Ordering::Greater
        } else {
            Ordering::Equal
        }
    })
}

fn cmp_numbers(a: &serde_json::Number, b: &serde_json::Number) -> Ordering {
    match (exact(a), exact(b)) {
        (Exact::Int(x), Exact::Int(y)) => x.cmp(&y),
        // -0.0 equals 0.0, as it equals the integer 0.
        (Exact::Float(x), Exact::Float(y)) => x.partial_cmp(&y).unwrap_or(Ordering::Equal),
        (Exact::Int(x), Exact::Float(y)) => cmp_int_float(x, y),
        (Exact::Float(x), Exact::Int(y)) => cmp_int_float(y, x).reverse(),
    }
}

/// A total order over JSON values: by type rank, then by value; objects
/// field by field in their order, arrays element by element.
pub fn compare(a: &Value, b: &Value) -> Ordering {
    match (a, b) {
        (Value::Number(x), Value::Number(y)) => cmp_numbers(x, y),
        (Value::String(x), Value::String(y)) => x.cmp(y),
        (Value::Bool(x), Value::Bool(y)) => x.cmp(y),
        (Value::Array(x), Value::Array(y)) => {
            for (p, q) in x.iter().zip(y) {
                let o = compare(p, q);
                if o != Ordering::Equal {
                    return o;
                }
            }
            x.len().cmp(&y.len())
        }
        (Value::Object(x), Value::Object(y)) => {
            for ((ka, va), (kb, vb)) in x.iter().zip(y) {
                let o = ka.cmp(kb).then_with(|| compare(va, vb));
                if o != Ordering::Equal {
                    return o;
                }
            }
            x.len().cmp(&y.len())
        }
        _ => type_rank(a).cmp(&type_rank(b)),
    }
}

/// Equality with numbers compared by value (1 equals 1.0).
pub fn equal(a: &Value, b: &Value) -> bool {
    match (a, b) {
        (Value::Object(x), Value::Object(y)) => {
            x.len() == y.len() && x.iter().all(|(k, v)| y.get(k).is_some_and(|w| equal(v, w)))
        }
        _ => compare(a, b) == Ordering::Equal,
    }
}

/// Same type class, so `$gt` and friends may compare them (type bracketing).
pub fn comparable(a: &Value, b: &Value) -> bool {
    type_rank(a) == type_rank(b)
}

/// The values a dotted path reaches in `doc`. Arrays on the way are
/// traversed: `a.b` on `{a: [{b: 1}, {b: 2}]}` reaches 1 and 2; a numeric
/// segment also indexes an array. A missing field reaches nothing.
pub fn resolve<'a>(doc: &'a Value, path: &[String], out: &mut Vec<&'a Value>) {
    let Some((first, rest)) = path.split_first() else {
        out.push(doc);
        return;
    };
    match doc {
        Value::Object(m) => {
            if let Some(child) = m.get(first) {
                resolve(child, rest, out);
            }
        }
        Value::Array(items) => {
            if let Ok(i) = first.parse::<usize>()
                && let Some(child) = items.get(i)
            {
                resolve(child, rest, out);
            }
            for item in items {
                if item.is_object() {
                    resolve(item, path, out);
                }
            }
        }
        _ => {}
    }
}

/// Splits a dotted path.
pub fn split_path(path: &str) -> Vec<String> {
    path.split('.').map(str::to_owned).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn numbers_compare_by_value() {
        assert!(equal(&json!(1), &json!(1.0)));
        assert_eq!(compare(&json!(2), &json!(10.5)), Ordering::Less);
        assert_eq!(compare(&json!(-1), &json!(u64::MAX)), Ordering::Less);
    }

    #[test]
    fn cross_type_order() {
        let mut v = vec![
            json!(true),
            json!([1]),
            json!({"a": 1}),
            json!("s"),
            json!(3),
            json!(null),
        ];
        v.sort_by(compare);
        assert_eq!(
            v,
            vec![
                json!(null),
                json!(3),
                json!("s"),
                json!({"a": 1}),
                json!([1]),
                json!(true)
            ]
        );
    }

    #[test]
    fn paths_reach_through_arrays() {
        let doc = json!({"a": [{"b": 1}, {"b": [2, 3]}, 7], "c": {"d": null}});
        let mut out = Vec::new();
        resolve(&doc, &split_path("a.b"), &mut out);
        assert_eq!(out, vec![&json!(1), &json!([2, 3])]);
        out.clear();
        resolve(&doc, &split_path("a.1.b"), &mut out);
        assert_eq!(out, vec![&json!([2, 3])]);
        out.clear();
        resolve(&doc, &split_path("c.d"), &mut out);
        assert_eq!(out, vec![&Value::Null]);
        out.clear();
        resolve(&doc, &split_path("c.e"), &mut out);
        assert!(out.is_empty());
    }
}
