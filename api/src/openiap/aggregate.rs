//! `aggregate`: a MongoDB pipeline subset over the documents the caller may
//! read. A leading `$match` is the node query's filter (so indexes apply);
//! the other stages run in memory over at most `MAX_TOP` documents (more is
//! refused, never cut silently). Stages: `$match $project $sort $skip
//! $limit $group $count`; `$group` accumulators: `$sum $avg $min $max
//! $first $last $push $addToSet $count`. Anything else is refused by name.

use std::collections::HashMap;

use serde_json::{Map, Value, json};

use ocmesh_node::query::value::{compare, equal};
use ocmesh_node::query::{Filter, MAX_TOP, Query};

use super::dispatch::CommandError;

fn invalid(msg: String) -> CommandError {
    CommandError::Invalid(msg)
}

/// The stages of `text`: a JSON array of one-key objects (or one object).
pub(super) fn parse(text: &str) -> Result<Vec<(String, Value)>, CommandError> {
    let v: Value = serde_json::from_str(text).map_err(|e| invalid(format!("aggregates is not valid JSON: {e}")))?;
    let stages = match v {
        Value::Array(a) => a,
        o @ Value::Object(_) => vec![o],
        other => {
            return Err(invalid(format!(
                "aggregates must be a JSON array of stages, not {other}"
            )));
        }
    };
    stages
        .into_iter()
        .enumerate()
        .map(|(i, s)| match s {
            Value::Object(m) if m.len() == 1 => Ok(m.into_iter().next().unwrap_or_default()),
            other => Err(invalid(format!(
                "stage {i} must be an object with one operator, not {other}"
            ))),
        })
        .collect()
}

/// The query that feeds the pipeline: its leading `$match`, if any, and
/// room for one document over the limit (to tell that the limit was hit).
pub(super) fn source(stages: &mut Vec<(String, Value)>) -> Result<Query, CommandError> {
    let filter = match stages.first() {
        Some((op, m)) if op == "$match" => {
            let f = m.clone();
            stages.remove(0);
            f
        }
        _ => json!({}),
    };
    Query::from_json(&json!({"query": filter, "top": MAX_TOP})).map_err(|e| invalid(format!("$match: {e}")))
}

/// Runs the remaining stages over `docs`.
pub(super) fn run(mut docs: Vec<Value>, stages: &[(String, Value)]) -> Result<Vec<Value>, CommandError> {
    if docs.len() >= MAX_TOP {
        return Err(invalid(format!(
            "aggregate reads at most {} documents; narrow it with a leading $match",
            MAX_TOP - 1
        )));
    }
    for (op, arg) in stages {
        docs = match op.as_str() {
            "$match" => {
                let f = Filter::parse(arg).map_err(|e| invalid(format!("$match: {e}")))?;
                docs.into_iter().filter(|d| f.matches(d)).collect()
            }
            "$project" => query_stage("$project", json!({"projection": arg, "top": MAX_TOP}), docs)?,
            "$sort" => query_stage("$sort", json!({"sort": arg, "top": MAX_TOP}), docs)?,
            "$skip" => {
                let n = count(op, arg)?;
                docs.into_iter().skip(n).collect()
            }
            "$limit" => {
                let n = count(op, arg)?;
                docs.truncate(n);
                docs
            }
            "$count" => match arg {
                Value::String(name) if !name.is_empty() && !name.starts_with('$') => {
                    vec![json!({ name.as_str(): docs.len() })]
                }
                other => return Err(invalid(format!("$count takes a field name, not {other}"))),
            },
            "$group" => group(docs, arg)?,
            other => {
                return Err(invalid(format!(
                    "aggregate stage {other} is not supported; ocmesh runs $match $project $sort $skip $limit $group \
                     $count"
                )));
            }
        };
    }
    Ok(docs)
}

fn query_stage(op: &str, q: Value, docs: Vec<Value>) -> Result<Vec<Value>, CommandError> {
    let q = Query::from_json(&q).map_err(|e| invalid(format!("{op}: {e}")))?;
    Ok(q.run(docs.into_iter()))
}

fn count(op: &str, v: &Value) -> Result<usize, CommandError> {
    v.as_u64()
        .and_then(|n| usize::try_from(n).ok())
        .ok_or_else(|| invalid(format!("{op} takes a non-negative integer, not {v}")))
}

/// A field of `doc` by dotted path (objects only; array elements by index).
fn field<'a>(doc: &'a Value, path: &str) -> Option<&'a Value> {
    path.split('.').try_fold(doc, |v, key| match v {
        Value::Object(m) => m.get(key),
        Value::Array(a) => key.parse::<usize>().ok().and_then(|i| a.get(i)),
        _ => None,
    })
}

/// An expression: `"$path"` is a field, an object is evaluated per key,
/// anything else is itself.
fn eval(expr: &Value, doc: &Value) -> Value {
    match expr {
        Value::String(s) if s.starts_with('$') => field(doc, &s[1..]).cloned().unwrap_or(Value::Null),
        Value::Object(m) => Value::Object(m.iter().map(|(k, e)| (k.clone(), eval(e, doc))).collect()),
        other => other.clone(),
    }
}

#[derive(Debug)]
enum Acc {
    Sum { int: i64, float: f64, is_float: bool },
    Avg { total: f64, n: u64 },
    Min(Option<Value>),
    Max(Option<Value>),
    First(Option<Value>),
    Last(Value),
    Push(Vec<Value>),
    AddToSet(Vec<Value>),
    Count(u64),
}

fn add_number(int: &mut i64, float: &mut f64, is_float: &mut bool, v: &Value) {
    match (v.as_i64(), v.as_f64()) {
        (Some(i), _) if !*is_float => match int.checked_add(i) {
            Some(s) => *int = s,
            None => {
                *is_float = true;
                *float = *int as f64 + i as f64;
            }
        },
        (_, Some(f)) => {
            if !*is_float {
                *is_float = true;
                *float = *int as f64;
            }
            *float += f;
        }
        _ => {} // non-numbers are ignored, as MongoDB does
    }
}

impl Acc {
    fn new(op: &str) -> Option<Acc> {
        Some(match op {
            "$sum" => Acc::Sum {
                int: 0,
                float: 0.0,
                is_float: false,
            },
            "$avg" => Acc::Avg { total: 0.0, n: 0 },
            "$min" => Acc::Min(None),
            "$max" => Acc::Max(None),
            "$first" => Acc::First(None),
            "$last" => Acc::Last(Value::Null),
            "$push" => Acc::Push(Vec::new()),
            "$addToSet" => Acc::AddToSet(Vec::new()),
            "$count" => Acc::Count(0),
            _ => return None,
        })
    }

    fn add(&mut self, v: Value) {
        match self {
            Acc::Sum { int, float, is_float } => add_number(int, float, is_float, &v),
            Acc::Avg { total, n } => {
                if let Some(f) = v.as_f64() {
                    *total += f;
                    *n += 1;
                }
            }
            Acc::Min(m) => {
                if !v.is_null() && m.as_ref().is_none_or(|cur| compare(&v, cur).is_lt()) {
                    *m = Some(v);
                }
            }
            Acc::Max(m) => {
                if !v.is_null() && m.as_ref().is_none_or(|cur| compare(&v, cur).is_gt()) {
                    *m = Some(v);
                }
            }
            Acc::First(f) => {
                if f.is_none() {
                    *f = Some(v);
                }
            }
            Acc::Last(l) => *l = v,
            Acc::Push(a) => a.push(v),
            Acc::AddToSet(a) => {
                if !a.iter().any(|x| equal(x, &v)) {
                    a.push(v);
                }
            }
            Acc::Count(n) => *n += 1,
        }
    }

    fn value(self) -> Value {
        match self {
            Acc::Sum { int, float, is_float } => {
                if is_float {
                    json!(float)
                } else {
                    json!(int)
                }
            }
            Acc::Avg { total, n } => {
                if n == 0 {
                    Value::Null
                } else {
                    json!(total / n as f64)
                }
            }
            Acc::Min(m) | Acc::Max(m) | Acc::First(m) => m.unwrap_or(Value::Null),
            Acc::Last(l) => l,
            Acc::Push(a) | Acc::AddToSet(a) => Value::Array(a),
            Acc::Count(n) => json!(n),
        }
    }
}

fn group(docs: Vec<Value>, spec: &Value) -> Result<Vec<Value>, CommandError> {
    let Value::Object(spec) = spec else {
        return Err(invalid(format!("$group takes an object, not {spec}")));
    };
    let key_expr = spec
        .get("_id")
        .ok_or_else(|| invalid("$group needs an _id (null for one group)".into()))?;
    let mut fields: Vec<(String, String, Value)> = Vec::new();
    for (name, acc) in spec.iter().filter(|(k, _)| *k != "_id") {
        match acc {
            Value::Object(m) if m.len() == 1 => {
                let (op, arg) = m.iter().next().map(|(o, a)| (o.clone(), a.clone())).unwrap_or_default();
                if Acc::new(&op).is_none() {
                    return Err(invalid(format!(
                        "$group accumulator {op} is not supported; use $sum $avg $min $max $first $last $push \
                         $addToSet $count"
                    )));
                }
                fields.push((name.clone(), op, arg));
            }
            other => {
                return Err(invalid(format!(
                    "$group field {name} must be {{accumulator: expression}}, not {other}"
                )));
            }
        }
    }
    let mut order: Vec<(Value, Vec<Acc>)> = Vec::new();
    let mut index: HashMap<String, usize> = HashMap::new();
    for doc in &docs {
        let key = eval(key_expr, doc);
        let k = key.to_string();
        let i = match index.get(&k) {
            Some(&i) => i,
            None => {
                let accs = fields.iter().filter_map(|(_, op, _)| Acc::new(op)).collect();
                order.push((key, accs));
                index.insert(k, order.len() - 1);
                order.len() - 1
            }
        };
        for ((_, _, arg), acc) in fields.iter().zip(order[i].1.iter_mut()) {
            acc.add(eval(arg, doc));
        }
    }
    Ok(order
        .into_iter()
        .map(|(key, accs)| {
            let mut out = Map::new();
            out.insert("_id".into(), key);
            for ((name, _, _), acc) in fields.iter().zip(accs) {
                out.insert(name.clone(), acc.value());
            }
            Value::Object(out)
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn leaf() -> impl Strategy<Value = Value> {
        prop_oneof![
            Just(Value::Null),
            any::<bool>().prop_map(Value::from),
            any::<i64>().prop_map(Value::from),
            any::<u64>().prop_map(Value::from),
            Just(json!(1e308)),
            Just(json!(-1e308)),
            any::<f64>()
                .prop_filter("finite", |f| f.is_finite())
                .prop_map(Value::from),
            prop_oneof![Just("$a"), Just("$b.c"), Just("$"), Just("$$"), Just("$b.0"), Just("x")].prop_map(Value::from),
        ]
    }

    fn expr() -> impl Strategy<Value = Value> {
        leaf().prop_recursive(3, 12, 3, |inner| {
            prop_oneof![
                proptest::collection::vec(inner.clone(), 0..3).prop_map(Value::Array),
                proptest::collection::btree_map(
                    prop_oneof![
                        Just("_id".to_owned()),
                        Just("$sum".to_owned()),
                        Just("$avg".to_owned()),
                        Just("$min".to_owned()),
                        Just("$max".to_owned()),
                        Just("$push".to_owned()),
                        Just("$addToSet".to_owned()),
                        Just("$count".to_owned()),
                        Just("$first".to_owned()),
                        Just("$last".to_owned()),
                        Just("$eq".to_owned()),
                        "[a-c]{1,2}",
                    ],
                    inner,
                    0..3,
                )
                .prop_map(|m| Value::Object(m.into_iter().collect())),
            ]
        })
    }

    fn stage() -> impl Strategy<Value = Value> {
        (
            prop_oneof![
                Just("$match"),
                Just("$project"),
                Just("$sort"),
                Just("$skip"),
                Just("$limit"),
                Just("$group"),
                Just("$count"),
                Just("$lookup"),
                Just("$unwind"),
            ],
            expr(),
        )
            .prop_map(|(op, arg)| json!({ op: arg }))
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

        /// Any pipeline over any documents: results, or an error naming
        /// the stage; never a panic, and never more documents than it read
        /// (but for `$group`, one per key, and `$count`, one).
        #[test]
        fn any_pipeline_runs_or_is_refused(
            stages in proptest::collection::vec(stage(), 0..5),
            docs in proptest::collection::vec(expr(), 0..8),
            raw in ".{0,40}",
        ) {
            let _ = parse(&raw);
            let text = Value::Array(stages).to_string();
            let Ok(mut stages) = parse(&text) else {
                return Ok(());
            };
            let Ok(_query) = source(&mut stages) else {
                return Ok(());
            };
            if let Err(e) = run(docs, &stages) {
                prop_assert!(!e.to_string().is_empty());
            }
        }

        /// Sums that overflow i64 and f64 stay numbers or null, never a panic.
        #[test]
        fn group_sums_survive_any_numbers(ns in proptest::collection::vec(leaf(), 0..12)) {
            let docs: Vec<Value> = ns.into_iter().map(|n| json!({"a": n})).collect();
            let out = run(docs, &[("$group".into(), json!({"_id": null, "s": {"$sum": "$a"}, "v": {"$avg": "$a"}, "m": {"$max": "$a"}}))]);
            prop_assert!(out.is_ok());
        }
    }
}
