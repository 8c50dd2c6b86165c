//! MongoDB-style filters: parsed once into a tree, then matched against
//! documents. Operators outside the supported set are refused by name;
//! nothing is silently ignored.

use serde_json::{Map, Value};

use super::value::{comparable, compare, equal, kind_of as kind, resolve, split_path};

/// Longest accepted `$regex` pattern, and the compiled-size cap.
const MAX_REGEX_LEN: usize = 1024;
const REGEX_SIZE_LIMIT: usize = 1 << 20;

/// Why a filter was refused.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum FilterError {
    #[error("filter must be a JSON object, not {0}")]
    NotAnObject(&'static str),
    #[error(
        "unsupported operator {0}; supported: $eq $ne $gt $gte $lt $lte $in $nin $exists $regex $not $and $or $nor"
    )]
    UnknownOperator(String),
    #[error("{op} needs {expected}")]
    BadOperand { op: String, expected: &'static str },
    #[error("field {field:?} mixes operators and plain fields in one object")]
    MixedOperators { field: String },
    #[error("$options is only allowed next to $regex")]
    OptionsWithoutRegex,
    #[error("invalid regular expression {pattern:?}: {reason}")]
    BadRegex { pattern: String, reason: String },
    #[error("empty field name in filter")]
    EmptyField,
}

/// A parsed filter.
#[derive(Debug, Clone)]
pub enum Filter {
    And(Vec<Filter>),
    Or(Vec<Filter>),
    Nor(Vec<Filter>),
    Field { path: Vec<String>, cond: Cond },
}

/// A condition on the values a path reaches.
#[derive(Debug, Clone)]
pub enum Cond {
    Eq(Value),
    Ne(Value),
    Gt(Value),
    Gte(Value),
    Lt(Value),
    Lte(Value),
    In(Vec<Value>),
    Nin(Vec<Value>),
    Exists(bool),
    Regex(regex::Regex),
    Not(Box<Cond>),
    All(Vec<Cond>),
}

impl Filter {
    /// Parses a filter document. An empty object matches everything.
    pub fn parse(v: &Value) -> Result<Filter, FilterError> {
        match v {
            Value::Object(m) => parse_object(m),
            other => Err(FilterError::NotAnObject(kind(other))),
        }
    }

    /// The filter that matches every document.
    pub fn all() -> Filter {
        Filter::And(Vec::new())
    }

    pub fn matches(&self, doc: &Value) -> bool {
        match self {
            Filter::And(fs) => fs.iter().all(|f| f.matches(doc)),
            Filter::Or(fs) => fs.iter().any(|f| f.matches(doc)),
            Filter::Nor(fs) => !fs.iter().any(|f| f.matches(doc)),
            Filter::Field { path, cond } => {
                let mut found = Vec::new();
                resolve(doc, path, &mut found);
                cond.holds(&found)
            }
        }
    }

    /// Top-level conditions an index on the field can answer: for each,
    /// the field and the values it must equal (`field: v`, `$eq`, `$in`).
    pub fn index_lookups(&self) -> Vec<(String, Vec<&Value>)> {
        let parts: Vec<&Filter> = match self {
            Filter::And(fs) => fs.iter().collect(),
            other => vec![other],
        };
        parts
            .into_iter()
            .filter_map(|f| match f {
                Filter::Field {
                    path,
                    cond: Cond::Eq(v),
                } => Some((path.join("."), vec![v])),
                Filter::Field {
                    path,
                    cond: Cond::In(vs),
                } => Some((path.join("."), vs.iter().collect())),
                _ => None,
            })
            .collect()
    }
}

fn parse_object(m: &Map<String, Value>) -> Result<Filter, FilterError> {
    let mut parts = Vec::with_capacity(m.len());
    for (k, v) in m {
        if let Some(op) = k.strip_prefix('$') {
            let list = |v: &Value| -> Result<Vec<Filter>, FilterError> {
                match v {
                    Value::Array(items) if !items.is_empty() => items.iter().map(Filter::parse).collect(),
                    _ => Err(FilterError::BadOperand {
                        op: k.clone(),
                        expected: "a non-empty array of filters",
                    }),
                }
            };
            parts.push(match op {
                "and" => Filter::And(list(v)?),
                "or" => Filter::Or(list(v)?),
                "nor" => Filter::Nor(list(v)?),
                _ => return Err(FilterError::UnknownOperator(k.clone())),
            });
        } else {
            if k.is_empty() || k.split('.').any(str::is_empty) {
                return Err(FilterError::EmptyField);
            }
            parts.push(Filter::Field {
                path: split_path(k),
                cond: parse_field(k, v)?,
            });
        }
    }
    Ok(if parts.len() == 1 {
        parts.remove(0)
    } else {
        Filter::And(parts)
    })
}

/// `field: value` is equality; `field: {$op: ...}` a set of operators.
fn parse_field(field: &str, v: &Value) -> Result<Cond, FilterError> {
    let Value::Object(m) = v else {
        return Ok(Cond::Eq(v.clone()));
    };
    let ops = m.keys().filter(|k| k.starts_with('$')).count();
    if ops == 0 {
        return Ok(Cond::Eq(v.clone()));
    }
    if ops != m.len() {
        return Err(FilterError::MixedOperators {
            field: field.to_owned(),
        });
    }
    parse_ops(m)
}

fn parse_ops(m: &Map<String, Value>) -> Result<Cond, FilterError> {
    let mut conds = Vec::with_capacity(m.len());
    let options = match m.get("$options") {
        None => "",
        Some(Value::String(s)) => s.as_str(),
        Some(_) => {
            return Err(FilterError::BadOperand {
                op: "$options".into(),
                expected: "a string",
            });
        }
    };
    if m.contains_key("$options") && !m.contains_key("$regex") {
        return Err(FilterError::OptionsWithoutRegex);
    }
    for (op, arg) in m {
        let array = |arg: &Value| match arg {
            Value::Array(a) => Ok(a.clone()),
            _ => Err(FilterError::BadOperand {
                op: op.clone(),
                expected: "an array",
            }),
        };
        conds.push(match op.as_str() {
            "$eq" => Cond::Eq(arg.clone()),
            "$ne" => Cond::Ne(arg.clone()),
            "$gt" => Cond::Gt(arg.clone()),
            "$gte" => Cond::Gte(arg.clone()),
            "$lt" => Cond::Lt(arg.clone()),
            "$lte" => Cond::Lte(arg.clone()),
            "$in" => Cond::In(array(arg)?),
            "$nin" => Cond::Nin(array(arg)?),
            "$exists" => match arg {
                Value::Bool(b) => Cond::Exists(*b),
                Value::Number(n) => Cond::Exists(n.as_f64() != Some(0.0)),
                _ => {
                    return Err(FilterError::BadOperand {
                        op: op.clone(),
                        expected: "true or false",
                    });
                }
            },
            "$regex" => match arg {
                Value::String(p) => Cond::Regex(regex(p, options)?),
                _ => {
                    return Err(FilterError::BadOperand {
                        op: op.clone(),
                        expected: "a pattern string",
                    });
                }
            },
            "$options" => continue,
            "$not" => match arg {
                Value::Object(inner) if !inner.is_empty() && inner.keys().all(|k| k.starts_with('$')) => {
                    Cond::Not(Box::new(parse_ops(inner)?))
                }
                Value::String(p) => Cond::Not(Box::new(Cond::Regex(regex(p, "")?))),
                _ => {
                    return Err(FilterError::BadOperand {
                        op: op.clone(),
                        expected: "an operator object or a pattern",
                    });
                }
            },
            _ => return Err(FilterError::UnknownOperator(op.clone())),
        });
    }
    Ok(if conds.len() == 1 {
        conds.remove(0)
    } else {
        Cond::All(conds)
    })
}

fn regex(pattern: &str, options: &str) -> Result<regex::Regex, FilterError> {
    let bad = |reason: String| FilterError::BadRegex {
        pattern: pattern.to_owned(),
        reason,
    };
    if pattern.len() > MAX_REGEX_LEN {
        return Err(bad(format!("longer than {MAX_REGEX_LEN} characters")));
    }
    let mut b = regex::RegexBuilder::new(pattern);
    b.size_limit(REGEX_SIZE_LIMIT);
    for o in options.chars() {
        match o {
            'i' => b.case_insensitive(true),
            'm' => b.multi_line(true),
            's' => b.dot_matches_new_line(true),
            'x' => b.ignore_whitespace(true),
            other => return Err(bad(format!("unknown option {other:?}; use i, m, s or x"))),
        };
    }
    b.build().map_err(|e| bad(e.to_string()))
}

/// The values a condition tests: each reached value, and the elements of
/// reached arrays (so `tags: "x"` matches `tags: ["x", "y"]`).
fn candidates<'a>(found: &[&'a Value]) -> impl Iterator<Item = &'a Value> {
    found.iter().flat_map(|v| {
        let elems: &'a [Value] = match v {
            Value::Array(a) => a.as_slice(),
            _ => &[],
        };
        std::iter::once(*v).chain(elems.iter())
    })
}

impl Cond {
    fn holds(&self, found: &[&Value]) -> bool {
        let cmp = |target: &Value, ok: fn(std::cmp::Ordering) -> bool| {
            candidates(found).any(|v| comparable(v, target) && ok(compare(v, target)))
        };
        match self {
            Cond::Eq(target) => eq(found, target),
            Cond::Ne(target) => !eq(found, target),
            Cond::Gt(t) => cmp(t, |o| o.is_gt()),
            Cond::Gte(t) => cmp(t, |o| o.is_ge()),
            Cond::Lt(t) => cmp(t, |o| o.is_lt()),
            Cond::Lte(t) => cmp(t, |o| o.is_le()),
            Cond::In(ts) => ts.iter().any(|t| eq(found, t)),
            Cond::Nin(ts) => !ts.iter().any(|t| eq(found, t)),
            Cond::Exists(want) => found.is_empty() != *want,
            Cond::Regex(re) => candidates(found).any(|v| v.as_str().is_some_and(|s| re.is_match(s))),
            Cond::Not(inner) => !inner.holds(found),
            Cond::All(cs) => cs.iter().all(|c| c.holds(found)),
        }
    }
}

/// Equality as MongoDB has it: `null` also matches a missing field.
fn eq(found: &[&Value], target: &Value) -> bool {
    if target.is_null() && found.is_empty() {
        return true;
    }
    candidates(found).any(|v| equal(v, target))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn m(filter: Value, doc: Value) -> bool {
        Filter::parse(&filter).expect("filter").matches(&doc)
    }

    #[test]
    fn operators() {
        let doc = json!({"n": 5, "s": "Pump-7", "tags": ["a", "b"], "o": {"x": 1.0}, "z": null, "items": [{"q": 1}, {"q": 9}]});
        assert!(m(json!({}), doc.clone()));
        assert!(m(json!({"n": 5}), doc.clone()));
        assert!(m(json!({"n": 5.0}), doc.clone()));
        assert!(m(json!({"n": {"$gt": 4, "$lte": 5}}), doc.clone()));
        assert!(!m(json!({"n": {"$gt": "4"}}), doc.clone()), "type bracketing");
        assert!(m(json!({"n": {"$ne": 6}}), doc.clone()));
        assert!(m(json!({"n": {"$in": [1, 5]}}), doc.clone()));
        assert!(m(json!({"n": {"$nin": [1, 2]}}), doc.clone()));
        assert!(m(json!({"tags": "b"}), doc.clone()));
        assert!(m(json!({"tags": ["a", "b"]}), doc.clone()));
        assert!(m(json!({"o.x": 1}), doc.clone()));
        assert!(m(json!({"items.q": 9}), doc.clone()));
        assert!(m(json!({"items.q": {"$gt": 5}}), doc.clone()));
        assert!(m(json!({"items.1.q": 9}), doc.clone()));
        assert!(m(json!({"missing": null}), doc.clone()));
        assert!(m(json!({"z": null}), doc.clone()));
        assert!(m(json!({"z": {"$exists": true}}), doc.clone()));
        assert!(m(json!({"missing": {"$exists": false}}), doc.clone()));
        assert!(m(json!({"s": {"$regex": "^pump", "$options": "i"}}), doc.clone()));
        assert!(!m(json!({"s": {"$regex": "^pump"}}), doc.clone()));
        assert!(m(json!({"n": {"$not": {"$gt": 10}}}), doc.clone()));
        assert!(m(json!({"$or": [{"n": 1}, {"s": "Pump-7"}]}), doc.clone()));
        assert!(!m(json!({"$and": [{"n": 5}, {"s": "x"}]}), doc.clone()));
        assert!(m(json!({"$nor": [{"n": 1}, {"s": "x"}]}), doc.clone()));
    }

    #[test]
    fn refusals_name_the_problem() {
        let err = |f: Value| Filter::parse(&f).expect_err("should fail").to_string();
        assert!(err(json!({"a": {"$elemMatch": {}}})).contains("$elemMatch"));
        assert!(err(json!({"$where": "1"})).contains("$where"));
        assert!(err(json!({"a": {"$in": 3}})).contains("$in needs an array"));
        assert!(err(json!({"a": {"$gt": 1, "b": 2}})).contains("mixes"));
        assert!(err(json!({"a": {"$regex": "("}})).contains("invalid regular expression"));
        assert!(err(json!({"a": {"$regex": "x", "$options": "q"}})).contains("unknown option"));
        assert!(err(json!({"$or": []})).contains("non-empty"));
        assert!(err(json!([1])).contains("JSON object"));
        assert!(err(json!({"a..b": 1})).contains("empty field"));
    }
}
