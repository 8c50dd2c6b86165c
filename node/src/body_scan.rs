//! Reading a change's JSON body without building all of it.
//!
//! A peer's first version of a plain document is stored as a reference to
//! its change (see `crate::store`), so the writer needs only the fields it
//! indexes; parsing every body into a map cost about a fifth of a catching
//! up site's CPU. These scans read the whole body as a full parse does,
//! accepting and refusing exactly the same bodies (valid JSON, an object,
//! numbers in range, strings valid UTF-8, nesting within serde_json's
//! limit), while allocating only what they keep.

use serde::Deserialize;
use serde::de::{DeserializeSeed, Deserializer, MapAccess, SeqAccess, Visitor};
use serde_json::{Map, Value};

/// Whether `body` is a JSON object.
pub(crate) fn is_object(body: &[u8]) -> bool {
    pick(body, &[]).is_some()
}

/// The top-level fields of `body` named in `wanted` (the first segment of
/// a dotted path names its top-level field), or `None` when `body` is not
/// a JSON object. A field given twice keeps its last value, as a full
/// parse does.
pub(crate) fn pick(body: &[u8], wanted: &[&str]) -> Option<Map<String, Value>> {
    let mut de = serde_json::Deserializer::from_slice(body);
    let picked = de.deserialize_map(Picker { wanted }).ok()?;
    de.end().ok()?;
    Some(picked)
}

struct Picker<'w> {
    wanted: &'w [&'w str],
}

impl<'de> Visitor<'de> for Picker<'_> {
    type Value = Map<String, Value>;

    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("a JSON object")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        let mut picked = Map::new();
        while let Some(key) = map.next_key_seed(KeySeed { wanted: self.wanted })? {
            match key {
                Some(name) => {
                    let value: Value = map.next_value()?;
                    picked.insert(name, value);
                }
                None => {
                    map.next_value::<Skipped>()?;
                }
            }
        }
        Ok(picked)
    }
}

/// A value read through as a full parse reads it (numbers in range,
/// strings valid UTF-8, nesting within serde_json's limit), and dropped.
/// serde's `IgnoredAny` checks none of that in serde_json, so a body it
/// passes could still fail every later full parse.
struct Skipped;

impl<'de> Deserialize<'de> for Skipped {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(Skipped)
    }
}

impl<'de> Visitor<'de> for Skipped {
    type Value = Skipped;

    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("any JSON value")
    }

    fn visit_bool<E>(self, _: bool) -> Result<Self, E> {
        Ok(Skipped)
    }

    fn visit_i64<E>(self, _: i64) -> Result<Self, E> {
        Ok(Skipped)
    }

    fn visit_u64<E>(self, _: u64) -> Result<Self, E> {
        Ok(Skipped)
    }

    fn visit_f64<E>(self, _: f64) -> Result<Self, E> {
        Ok(Skipped)
    }

    fn visit_str<E>(self, _: &str) -> Result<Self, E> {
        Ok(Skipped)
    }

    fn visit_unit<E>(self) -> Result<Self, E> {
        Ok(Skipped)
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self, A::Error> {
        while seq.next_element::<Skipped>()?.is_some() {}
        Ok(Skipped)
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self, A::Error> {
        while map.next_entry::<Skipped, Skipped>()?.is_some() {}
        Ok(Skipped)
    }
}

/// A key: `Some(name)` when it is wanted.
struct KeySeed<'w> {
    wanted: &'w [&'w str],
}

impl<'de> DeserializeSeed<'de> for KeySeed<'_> {
    type Value = Option<String>;

    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
        d.deserialize_str(self)
    }
}

impl<'de> Visitor<'de> for KeySeed<'_> {
    type Value = Option<String>;

    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("a field name")
    }

    fn visit_str<E: serde::de::Error>(self, key: &str) -> Result<Self::Value, E> {
        let wanted = self.wanted.iter().any(|w| w.split('.').next() == Some(key));
        Ok(wanted.then(|| key.to_owned()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn picks_what_a_full_parse_would_hold() {
        let body = br#"{"_type":"thing","a":{"b":[1,2]},"skip":"x\"y","n":1.5,"a":{"b":3}}"#;
        let picked = pick(body, &["_type", "a.b", "missing"]).expect("an object");
        assert_eq!(
            Value::Object(picked),
            serde_json::json!({"_type": "thing", "a": {"b": 3}})
        );
        assert!(is_object(br#"{}"#));
        assert!(is_object(br#" {"k": [true, null, {"x": "\u00e9"}]} "#));
    }

    #[test]
    fn refuses_what_is_not_an_object() {
        for bad in [
            &b"[1]"[..],
            b"\"s\"",
            b"3",
            b"{\"a\":1",
            b"{\"a\":1} x",
            b"{\"a\":tru}",
            b"",
            b"{\"a\":\"\xff\"}",
            b"{\"a\":1e400}",
            b"{\"a\":[1,]}",
            b"{\"a\":\"\\x\"}",
        ] {
            assert!(!is_object(bad), "{:?}", String::from_utf8_lossy(bad));
            assert!(pick(bad, &["a"]).is_none());
        }
        // Nesting: refused exactly where a full parse refuses it, with
        // brackets inside strings not counted.
        for n in 120..140 {
            let deep = format!("{{\"s\":\"[[{{\",\"a\":{}{}}}", "[".repeat(n), "]".repeat(n));
            assert_eq!(
                is_object(deep.as_bytes()),
                serde_json::from_str::<Value>(&deep).is_ok(),
                "nesting {n}"
            );
        }
    }

    fn json_value() -> impl Strategy<Value = Value> {
        let leaf = prop_oneof![
            Just(Value::Null),
            any::<bool>().prop_map(Value::Bool),
            any::<i64>().prop_map(Value::from),
            "[a-c\"\\\\é]{0,6}".prop_map(Value::String),
        ];
        leaf.prop_recursive(3, 24, 4, |inner| {
            prop_oneof![
                prop::collection::vec(inner.clone(), 0..4).prop_map(Value::Array),
                prop::collection::vec(("[a-c_]{1,3}", inner), 0..4)
                    .prop_map(|kv| Value::Object(kv.into_iter().collect())),
            ]
        })
    }

    proptest! {
        /// Whatever the body, the scan agrees with a full parse: the same
        /// verdict on whether it is an object, the same values picked.
        #[test]
        fn agrees_with_a_full_parse(v in json_value(), fields in prop::collection::vec("[a-c_]{1,3}(\\.[a-c])?", 0..3), cut in any::<prop::sample::Index>()) {
            let text = serde_json::to_vec(&v).expect("encode");
            for body in [&text[..], &text[..cut.index(text.len() + 1)]] {
                let full = serde_json::from_slice::<Value>(body).ok();
                let wanted: Vec<&str> = fields.iter().map(String::as_str).collect();
                match (&full, pick(body, &wanted)) {
                    (Some(Value::Object(m)), Some(picked)) => {
                        let expected: Map<String, Value> = m
                            .iter()
                            .filter(|(k, _)| wanted.iter().any(|w| w.split('.').next() == Some(k.as_str())))
                            .map(|(k, v)| (k.clone(), v.clone()))
                            .collect();
                        prop_assert_eq!(picked, expected);
                    }
                    (Some(Value::Object(_)), None) => prop_assert!(false, "an object was refused"),
                    (_, Some(_)) => prop_assert!(false, "a non-object was accepted"),
                    (_, None) => {}
                }
            }
        }
    }
}
