//! Update operators: `$set $unset $inc $push $pull`, applied to a copy of
//! a document. Unknown operators and type mismatches are refused by name;
//! a refused update changes nothing.

use serde_json::{Map, Value};

use super::value::equal;

/// Why an update document was refused.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum UpdateError {
    #[error("update must be a JSON object of operators like {{\"$set\": {{...}}}}")]
    NotAnObject,
    #[error("unsupported update operator {0}; supported: $set $unset $inc $push $pull")]
    UnknownOperator(String),
    #[error("{0} needs an object of field paths")]
    BadOperand(String),
    #[error("update operators and plain fields cannot be mixed (found {0:?}); replace the document instead")]
    PlainField(String),
    #[error("{op} on {field}: {problem}")]
    Field {
        op: &'static str,
        field: String,
        problem: String,
    },
    #[error("field {0} is assigned by the store and cannot be updated")]
    Reserved(String),
    #[error("{op} names a field path of {steps} steps; at most {max} are allowed")]
    PathTooLong { op: String, steps: usize, max: usize },
}

const RESERVED: &[&str] = &[
    "_id",
    "_version",
    "_created",
    "_createdby",
    "_createdbyid",
    "_modified",
    "_modifiedby",
    "_modifiedbyid",
];

/// Applies `update` to `doc`; on error `doc` is left untouched.
pub fn apply_update(doc: &Map<String, Value>, update: &Value) -> Result<Map<String, Value>, UpdateError> {
    let Value::Object(ops) = update else {
        return Err(UpdateError::NotAnObject);
    };
    if ops.is_empty() {
        return Err(UpdateError::NotAnObject);
    }
    let mut out = doc.clone();
    for (op, arg) in ops {
        if !op.starts_with('$') {
            return Err(UpdateError::PlainField(op.clone()));
        }
        let Value::Object(fields) = arg else {
            return Err(UpdateError::BadOperand(op.clone()));
        };
        for (field, value) in fields {
            let top = field.split('.').next().unwrap_or_default();
            if RESERVED.contains(&top) {
                return Err(UpdateError::Reserved(field.clone()));
            }
            let path: Vec<&str> = field.split('.').collect();
            if path.iter().any(|p| p.is_empty()) {
                return Err(UpdateError::BadOperand(op.clone()));
            }
            // `$set` creates the objects on its way: a path of a million
            // steps would build a value whose drop alone overflows the stack.
            if path.len() > ocmesh_replication::change::MAX_BODY_DEPTH {
                return Err(UpdateError::PathTooLong {
                    op: op.clone(),
                    steps: path.len(),
                    max: ocmesh_replication::change::MAX_BODY_DEPTH,
                });
            }
            match op.as_str() {
                "$set" => *slot(&mut out, &path, "$set")? = value.clone(),
                "$unset" => unset(&mut out, &path),
                "$inc" => {
                    let by = value
                        .as_f64()
                        .ok_or_else(|| field_err("$inc", field, "the increment must be a number"))?;
                    let target = slot(&mut out, &path, "$inc")?;
                    *target = match (&*target, value.as_i64()) {
                        (Value::Null, _) => value.clone(),
                        (Value::Number(n), Some(i)) if n.as_i64().is_some() => Value::from(
                            n.as_i64()
                                .unwrap_or(0)
                                .checked_add(i)
                                .ok_or_else(|| field_err("$inc", field, "integer overflow"))?,
                        ),
                        (Value::Number(n), _) => serde_json::Number::from_f64(n.as_f64().unwrap_or(0.0) + by)
                            .map(Value::Number)
                            .ok_or_else(|| field_err("$inc", field, "result is not a finite number"))?,
                        (other, _) => {
                            return Err(field_err("$inc", field, &format!("field holds {other}, not a number")));
                        }
                    };
                }
                "$push" => {
                    let target = slot(&mut out, &path, "$push")?;
                    match target {
                        Value::Null => *target = Value::Array(vec![value.clone()]),
                        Value::Array(a) => a.push(value.clone()),
                        other => return Err(field_err("$push", field, &format!("field holds {other}, not an array"))),
                    }
                }
                "$pull" => {
                    let target = slot(&mut out, &path, "$pull")?;
                    match target {
                        Value::Null => {}
                        Value::Array(a) => a.retain(|x| !equal(x, value)),
                        other => return Err(field_err("$pull", field, &format!("field holds {other}, not an array"))),
                    }
                }
                _ => return Err(UpdateError::UnknownOperator(op.clone())),
            }
        }
    }
    Ok(out)
}

fn field_err(op: &'static str, field: &str, problem: &str) -> UpdateError {
    UpdateError::Field {
        op,
        field: field.to_owned(),
        problem: problem.to_owned(),
    }
}

/// The value at `path`, creating objects on the way (a missing leaf is null).
fn slot<'a>(doc: &'a mut Map<String, Value>, path: &[&str], op: &'static str) -> Result<&'a mut Value, UpdateError> {
    let (last, parents) = path
        .split_last()
        .ok_or_else(|| UpdateError::BadOperand(op.to_owned()))?;
    let mut cur = doc;
    for (i, p) in parents.iter().enumerate() {
        let next = cur.entry((*p).to_owned()).or_insert_with(|| Value::Object(Map::new()));
        if next.is_null() {
            *next = Value::Object(Map::new());
        }
        cur = match next {
            Value::Object(m) => m,
            other => {
                return Err(field_err(
                    op,
                    &path[..=i].join("."),
                    &format!("holds {other}, not an object"),
                ));
            }
        };
    }
    Ok(cur.entry((*last).to_owned()).or_insert(Value::Null))
}

fn unset(doc: &mut Map<String, Value>, path: &[&str]) {
    match path {
        [] => {}
        [last] => {
            doc.remove(*last);
        }
        [first, rest @ ..] => {
            if let Some(Value::Object(inner)) = doc.get_mut(*first) {
                unset(inner, rest);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn up(doc: Value, update: Value) -> Result<Value, UpdateError> {
        apply_update(doc.as_object().expect("object"), &update).map(Value::Object)
    }

    #[test]
    fn operators() {
        let doc = json!({"a": 1, "b": {"c": 2.5}, "tags": ["x", "y"], "gone": true});
        let out = up(doc, json!({"$set": {"b.d": "new", "e": [1]}, "$inc": {"a": 2, "b.c": 1, "n": 5}, "$push": {"tags": "z"}, "$pull": {"tags": "x"}, "$unset": {"gone": ""}}))
            .expect("update");
        assert_eq!(
            out,
            json!({"a": 3, "b": {"c": 3.5, "d": "new"}, "tags": ["y", "z"], "e": [1], "n": 5})
        );
    }

    #[test]
    fn refusals() {
        let doc = json!({"s": "text", "n": 1});
        let err = |u: Value| up(doc.clone(), u).expect_err("refused").to_string();
        assert!(err(json!({"$rename": {"a": "b"}})).contains("$rename"));
        assert!(err(json!({"s": 1})).contains("mixed"));
        assert!(err(json!({"$inc": {"s": 1}})).contains("not a number"));
        assert!(err(json!({"$inc": {"n": "1"}})).contains("must be a number"));
        assert!(err(json!({"$push": {"n": 1}})).contains("not an array"));
        assert!(err(json!({"$set": {"_id": "x"}})).contains("assigned by the store"));
        assert!(err(json!({"$set": {"s.x": 1}})).contains("not an object"));
        assert!(err(json!({})).contains("operators"));
        assert!(err(json!({"$inc": {"n": i64::MAX}})).contains("overflow"));
        let long = vec!["a"; 200_000].join(".");
        assert!(err(json!({"$set": {long: 1}})).contains("200000 steps"));
    }
}
