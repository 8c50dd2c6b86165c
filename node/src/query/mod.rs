//! Queries over a collection: filter, projection, sort, skip and limit,
//! count and distinct, with MongoDB's semantics for the supported subset.

pub mod filter;
pub mod update;
pub mod value;

use std::cmp::Ordering;

use serde_json::{Map, Value};

pub use filter::{Filter, FilterError};
use value::{compare, equal, resolve, split_path};

/// Results returned when a query gives no `top`.
pub const DEFAULT_TOP: usize = 100;
/// Most results one query may ask for.
pub const MAX_TOP: usize = 100_000;

/// Why a query was refused.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum QueryError {
    #[error("query must be a JSON object")]
    NotAnObject,
    #[error("invalid filter: {0}")]
    Filter(#[from] FilterError),
    #[error("projection must map fields to 0 or 1 (or true/false), got {field:?}: {value}")]
    BadProjection { field: String, value: String },
    #[error("projection mixes included and excluded fields (only _id may be excluded alongside inclusions)")]
    MixedProjection,
    #[error("sort must map fields to 1 or -1 (or \"asc\"/\"desc\"), got {field:?}: {value}")]
    BadSort { field: String, value: String },
    #[error("{field} must be a non-negative integer{limit}")]
    BadNumber { field: &'static str, limit: String },
    #[error("unknown query field {0:?}; use filter (or query), projection, sort (or orderby), skip, top")]
    UnknownField(String),
}

/// Which fields a result keeps.
#[derive(Debug, Clone)]
pub enum Projection {
    /// Only these paths (and `_id` unless `without_id`).
    Include { paths: Vec<Vec<String>>, without_id: bool },
    /// Everything but these paths.
    Exclude(Vec<Vec<String>>),
}

/// A parsed query.
#[derive(Debug, Clone)]
pub struct Query {
    pub filter: Filter,
    pub projection: Option<Projection>,
    /// Sort keys in order: (path, descending).
    pub sort: Vec<(Vec<String>, bool)>,
    pub skip: usize,
    pub top: usize,
}

impl Default for Query {
    fn default() -> Self {
        Query {
            filter: Filter::all(),
            projection: None,
            sort: Vec::new(),
            skip: 0,
            top: DEFAULT_TOP,
        }
    }
}

fn count_field(v: &Value, field: &'static str, max: usize) -> Result<usize, QueryError> {
    let limit = if max == usize::MAX {
        String::new()
    } else {
        format!(" up to {max}")
    };
    match v.as_u64() {
        Some(n) if (n as usize) <= max => Ok(n as usize),
        _ => Err(QueryError::BadNumber { field, limit }),
    }
}

impl Query {
    /// Reads `{filter|query, projection, sort|orderby, skip, top}`.
    pub fn from_json(v: &Value) -> Result<Query, QueryError> {
        let Value::Object(m) = v else {
            return Err(QueryError::NotAnObject);
        };
        let mut q = Query::default();
        for (k, v) in m {
            match k.as_str() {
                "filter" | "query" => q.filter = Filter::parse(v)?,
                "projection" => q.projection = parse_projection(v)?,
                "sort" | "orderby" => q.sort = parse_sort(v)?,
                "skip" => q.skip = count_field(v, "skip", usize::MAX)?,
                "top" | "limit" => q.top = count_field(v, "top", MAX_TOP)?,
                other => return Err(QueryError::UnknownField(other.to_owned())),
            }
        }
        Ok(q)
    }

    /// Runs the query over `docs` (already narrowed to the collection).
    pub fn run(&self, docs: impl Iterator<Item = Value>) -> Vec<Value> {
        let matching = docs.filter(|d| self.filter.matches(d));
        let page: Vec<Value> = if self.sort.is_empty() {
            matching.skip(self.skip).take(self.top).collect()
        } else {
            top_k(matching, self.skip.saturating_add(self.top), |a, b| self.order(a, b))
                .into_iter()
                .skip(self.skip)
                .collect()
        };
        match &self.projection {
            Some(p) => page.into_iter().map(|d| project(d, p)).collect(),
            None => page,
        }
    }

    fn order(&self, a: &Value, b: &Value) -> Ordering {
        for (path, desc) in &self.sort {
            let o = compare(&sort_key(a, path), &sort_key(b, path));
            let o = if *desc { o.reverse() } else { o };
            if o != Ordering::Equal {
                return o;
            }
        }
        Ordering::Equal
    }
}

/// The value a document sorts by on `path`: missing sorts as null.
fn sort_key(doc: &Value, path: &[String]) -> Value {
    let mut found = Vec::new();
    resolve(doc, path, &mut found);
    match found.as_slice() {
        [] => Value::Null,
        [one] => (*one).clone(),
        many => Value::Array(many.iter().map(|v| (*v).clone()).collect()),
    }
}

/// The first `k` items of `items` in `cmp` order, stable, without holding
/// more than 2k at a time.
fn top_k(items: impl Iterator<Item = Value>, k: usize, cmp: impl Fn(&Value, &Value) -> Ordering) -> Vec<Value> {
    let mut kept: Vec<Value> = Vec::new();
    if k == 0 {
        return kept;
    }
    for item in items {
        kept.push(item);
        if kept.len() >= k.saturating_mul(2).max(64) {
            kept.sort_by(&cmp);
            kept.truncate(k);
        }
    }
    kept.sort_by(&cmp);
    kept.truncate(k);
    kept
}

fn parse_projection(v: &Value) -> Result<Option<Projection>, QueryError> {
    let Value::Object(m) = v else {
        return Err(QueryError::BadProjection {
            field: String::new(),
            value: v.to_string(),
        });
    };
    if m.is_empty() {
        return Ok(None);
    }
    let mut include = Vec::new();
    let mut exclude = Vec::new();
    let mut without_id = false;
    for (field, flag) in m {
        let on = match flag {
            Value::Bool(b) => *b,
            Value::Number(n) if n.as_f64() == Some(0.0) => false,
            Value::Number(n) if n.as_f64() == Some(1.0) => true,
            other => {
                return Err(QueryError::BadProjection {
                    field: field.clone(),
                    value: other.to_string(),
                });
            }
        };
        match (field.as_str(), on) {
            ("_id", false) => without_id = true,
            (_, true) => include.push(split_path(field)),
            (_, false) => exclude.push(split_path(field)),
        }
    }
    match (include.is_empty(), exclude.is_empty()) {
        (false, false) => Err(QueryError::MixedProjection),
        (false, true) => Ok(Some(Projection::Include {
            paths: include,
            without_id,
        })),
        (true, _) => {
            if without_id {
                exclude.push(vec!["_id".to_owned()]);
            }
            Ok(Some(Projection::Exclude(exclude)))
        }
    }
}

fn parse_sort(v: &Value) -> Result<Vec<(Vec<String>, bool)>, QueryError> {
    let bad = |field: &str, value: &Value| QueryError::BadSort {
        field: field.to_owned(),
        value: value.to_string(),
    };
    match v {
        Value::Object(m) => m
            .iter()
            .map(|(field, dir)| {
                let desc = match dir {
                    Value::Number(n) if n.as_f64() == Some(1.0) => false,
                    Value::Number(n) if n.as_f64() == Some(-1.0) => true,
                    Value::String(s) if s.eq_ignore_ascii_case("asc") => false,
                    Value::String(s) if s.eq_ignore_ascii_case("desc") => true,
                    other => return Err(bad(field, other)),
                };
                Ok((split_path(field), desc))
            })
            .collect(),
        // A bare field name sorts ascending, as OpenCore's orderby string.
        Value::String(s) if !s.is_empty() => Ok(vec![(split_path(s), false)]),
        other => Err(bad("", other)),
    }
}

fn project(doc: Value, p: &Projection) -> Value {
    let Value::Object(mut m) = doc else { return doc };
    match p {
        Projection::Include { paths, without_id } => {
            let mut out = Map::new();
            if !without_id && let Some(id) = m.remove("_id") {
                out.insert("_id".into(), id);
            }
            for path in paths {
                copy_path(&Value::Object(m.clone()), path, &mut out);
            }
            Value::Object(out)
        }
        Projection::Exclude(paths) => {
            for path in paths {
                remove_path(&mut m, path);
            }
            Value::Object(m)
        }
    }
}

fn copy_path(src: &Value, path: &[String], out: &mut Map<String, Value>) {
    let Some((first, rest)) = path.split_first() else {
        return;
    };
    let Some(child) = src.get(first) else { return };
    if rest.is_empty() {
        out.insert(first.clone(), child.clone());
        return;
    }
    if let Value::Object(_) = child {
        let entry = out.entry(first.clone()).or_insert_with(|| Value::Object(Map::new()));
        if let Value::Object(inner) = entry {
            copy_path(child, rest, inner);
        }
    }
}

fn remove_path(m: &mut Map<String, Value>, path: &[String]) {
    match path {
        [] => {}
        [last] => {
            m.remove(last);
        }
        [first, rest @ ..] => {
            if let Some(Value::Object(inner)) = m.get_mut(first) {
                remove_path(inner, rest);
            }
        }
    }
}

/// Distinct values at `path` among `docs` (array elements count singly),
/// in sort order.
pub fn distinct(docs: impl Iterator<Item = Value>, path: &str, filter: &Filter) -> Vec<Value> {
    let path = split_path(path);
    let mut out: Vec<Value> = Vec::new();
    for d in docs.filter(|d| filter.matches(d)) {
        let mut found = Vec::new();
        resolve(&d, &path, &mut found);
        for v in found {
            let items: Vec<&Value> = match v {
                Value::Array(a) => a.iter().collect(),
                other => vec![other],
            };
            for item in items {
                if !out.iter().any(|o| equal(o, item)) {
                    out.push(item.clone());
                }
            }
        }
    }
    out.sort_by(compare);
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use serde_json::json;

    fn docs() -> Vec<Value> {
        (0..50)
            .map(|i| json!({"_id": format!("{i:024x}"), "n": i % 7, "name": format!("d{i}"), "o": {"k": i, "j": "x"}, "t": ["a", if i % 2 == 0 { "even" } else { "odd" }]}))
            .collect()
    }

    fn run(q: Value) -> Vec<Value> {
        Query::from_json(&q).expect("query").run(docs().into_iter())
    }

    #[test]
    fn sort_skip_top_projection() {
        let r = run(
            json!({"filter": {"t": "even"}, "sort": {"n": -1, "o.k": 1}, "skip": 1, "top": 3, "projection": {"n": 1, "o.k": 1}}),
        );
        assert_eq!(r.len(), 3);
        assert_eq!(r[0], json!({"_id": format!("{:024x}", 20), "n": 6, "o": {"k": 20}}));
        assert_eq!(r[1], json!({"_id": format!("{:024x}", 34), "n": 6, "o": {"k": 34}}));
        let r = run(json!({"projection": {"o": 0, "_id": 0}, "top": 1}));
        assert_eq!(r[0], json!({"n": 0, "name": "d0", "t": ["a", "even"]}));
        assert_eq!(run(json!({})).len(), DEFAULT_TOP.min(50));
        assert_eq!(run(json!({"top": 0})).len(), 0);
    }

    #[test]
    fn distinct_values() {
        let all = docs();
        let d = distinct(all.into_iter(), "t", &Filter::all());
        assert_eq!(d, vec![json!("a"), json!("even"), json!("odd")]);
    }

    #[test]
    fn refusals() {
        let err = |q: Value| Query::from_json(&q).expect_err("should fail").to_string();
        assert!(err(json!({"projection": {"a": 1, "b": 0}})).contains("mixes"));
        assert!(err(json!({"sort": {"a": 2}})).contains("sort"));
        assert!(err(json!({"top": -1})).contains("top"));
        assert!(err(json!({"top": MAX_TOP + 1})).contains("top"));
        assert!(err(json!({"limt": 1})).contains("limt"));
        assert!(err(json!({"filter": {"a": {"$size": 1}}})).contains("$size"));
    }

    proptest! {
        /// A sorted page is the same slice of the fully sorted result,
        /// whatever skip and top are (top_k never loses an item).
        #[test]
        fn paging_is_a_slice_of_the_full_sort(skip in 0usize..60, top in 0usize..60, desc in any::<bool>()) {
            let dir = if desc { -1 } else { 1 };
            let full = run(json!({"sort": {"n": dir, "name": 1}, "top": 1000}));
            let page = run(json!({"sort": {"n": dir, "name": 1}, "skip": skip, "top": top}));
            let expect: Vec<Value> = full.into_iter().skip(skip).take(top).collect();
            prop_assert_eq!(page, expect);
        }
    }
}
