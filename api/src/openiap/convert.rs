//! Between ocmesh's JSON documents and OpenIAP's typed messages: work
//! items, queues, ACL entries, users, timestamps, and `Any` packing.
//!
//! Invariant: conversions from client input never panic; a value that does
//! not fit (a timestamp out of range, a payload that is not a JSON object)
//! is a `ConvertError` naming the field.

use prost::Message;
use prost_types::{Any, Timestamp};
use serde_json::{Map, Value, json};

use ocmesh_node::ids::{iso8601, parse_iso8601};
use ocmesh_proto::openiap::{self as pb, TYPE_URL_PREFIX};

/// Why a client's field could not become part of a document.
#[derive(Debug, thiserror::Error)]
pub enum ConvertError {
    #[error("{field} is not valid JSON: {reason}")]
    Json { field: &'static str, reason: String },
    #[error("{field} must be a JSON {expected}, not {got}")]
    Shape {
        field: &'static str,
        expected: &'static str,
        got: String,
    },
    #[error("{field}: timestamp {seconds}s {nanos}ns is out of range")]
    Timestamp {
        field: &'static str,
        seconds: i64,
        nanos: i32,
    },
}

/// Packs a message as OpenIAP does: type URL `type.googleapis.com/openiap.<Name>`.
pub fn pack<M: Message>(name: &str, msg: &M) -> Any {
    Any {
        type_url: format!("{TYPE_URL_PREFIX}{name}"),
        value: msg.encode_to_vec(),
    }
}

/// Parses JSON text; an empty string is `default`.
pub fn json_text(field: &'static str, text: &str, default: Value) -> Result<Value, ConvertError> {
    if text.trim().is_empty() {
        return Ok(default);
    }
    serde_json::from_str(text).map_err(|e| ConvertError::Json {
        field,
        reason: e.to_string(),
    })
}

/// Parses JSON text that must be an object; an empty string is `{}`.
pub fn json_object(field: &'static str, text: &str) -> Result<Map<String, Value>, ConvertError> {
    match json_text(field, text, json!({}))? {
        Value::Object(m) => Ok(m),
        other => Err(ConvertError::Shape {
            field,
            expected: "object",
            got: ocmesh_node::query::value::kind_of(&other).to_owned(),
        }),
    }
}

/// Parses JSON text that must be an array of objects.
pub fn json_objects(field: &'static str, text: &str) -> Result<Vec<Map<String, Value>>, ConvertError> {
    match json_text(field, text, json!([]))? {
        Value::Array(items) => items
            .into_iter()
            .map(|v| match v {
                Value::Object(m) => Ok(m),
                other => Err(ConvertError::Shape {
                    field,
                    expected: "array of objects",
                    got: format!("an array holding {}", ocmesh_node::query::value::kind_of(&other)),
                }),
            })
            .collect(),
        other => Err(ConvertError::Shape {
            field,
            expected: "array",
            got: ocmesh_node::query::value::kind_of(&other).to_owned(),
        }),
    }
}

/// A protobuf timestamp as the node's ISO-8601 UTC text.
pub fn timestamp_to_iso(field: &'static str, t: &Timestamp) -> Result<String, ConvertError> {
    let out_of_range = || ConvertError::Timestamp {
        field,
        seconds: t.seconds,
        nanos: t.nanos,
    };
    if t.seconds < 0 || !(0..1_000_000_000).contains(&t.nanos) {
        return Err(out_of_range());
    }
    let ms = (t.seconds as u64)
        .checked_mul(1000)
        .and_then(|ms| ms.checked_add(t.nanos as u64 / 1_000_000))
        .ok_or_else(out_of_range)?;
    // Beyond year 9999 the text form has no room.
    if ms > 253_402_300_799_999 {
        return Err(out_of_range());
    }
    Ok(iso8601(ms))
}

/// The node's ISO-8601 text as a protobuf timestamp (`None` if absent or unreadable).
pub fn iso_to_timestamp(v: Option<&Value>) -> Option<Timestamp> {
    let ms = parse_iso8601(v?.as_str()?)?;
    Some(Timestamp {
        seconds: (ms / 1000) as i64,
        nanos: ((ms % 1000) * 1_000_000) as i32,
    })
}

fn text(doc: &Value, field: &str) -> String {
    match doc.get(field) {
        Some(Value::String(s)) => s.clone(),
        _ => String::new(),
    }
}

fn int(doc: &Value, field: &str) -> i32 {
    doc.get(field)
        .and_then(Value::as_f64)
        .map(|f| f.clamp(i32::MIN as f64, i32::MAX as f64) as i32)
        .unwrap_or(0)
}

/// A stored work item as OpenIAP's `Workitem` (payload as JSON text).
pub fn workitem(doc: &Value) -> pb::Workitem {
    let files = doc
        .get("files")
        .and_then(Value::as_array)
        .map(|fs| {
            fs.iter()
                .map(|f| pb::WorkitemFile {
                    filename: text(f, "filename"),
                    id: text(f, "_id"),
                    compressed: f.get("compressed").and_then(Value::as_bool).unwrap_or(false),
                    file: Vec::new(),
                })
                .collect()
        })
        .unwrap_or_default();
    pb::Workitem {
        id: text(doc, "_id"),
        name: text(doc, "name"),
        payload: doc
            .get("payload")
            .map(Value::to_string)
            .unwrap_or_else(|| "{}".to_owned()),
        priority: int(doc, "priority"),
        nextrun: iso_to_timestamp(doc.get("nextrun")),
        lastrun: iso_to_timestamp(doc.get("lastrun")),
        files,
        state: text(doc, "state"),
        wiq: text(doc, "wiq"),
        wiqid: text(doc, "wiqid"),
        retries: int(doc, "retries"),
        username: text(doc, "_createdby"),
        success_wiqid: text(doc, "success_wiqid"),
        failed_wiqid: text(doc, "failed_wiqid"),
        success_wiq: text(doc, "success_wiq"),
        failed_wiq: text(doc, "failed_wiq"),
        errormessage: text(doc, "errormessage"),
        errorsource: text(doc, "errorsource"),
        errortype: text(doc, "errortype"),
    }
}

/// `_acl` entries as OpenIAP's `Ace` list.
fn aces(doc: &Value) -> Vec<pb::Ace> {
    doc.get("_acl")
        .and_then(Value::as_array)
        .map(|a| {
            a.iter()
                .map(|e| pb::Ace {
                    id: text(e, "_id"),
                    deny: e.get("deny").and_then(Value::as_bool).unwrap_or(false),
                    rights: int(e, "rights"),
                })
                .collect()
        })
        .unwrap_or_default()
}

/// OpenIAP's `Ace` list as `_acl` entries (`None` when the list is empty).
pub fn acl_json(aces: &[pb::Ace]) -> Option<Value> {
    if aces.is_empty() {
        return None;
    }
    Some(Value::Array(
        aces.iter()
            .map(|a| {
                let mut e = json!({"_id": a.id, "rights": a.rights});
                if a.deny {
                    e["deny"] = true.into();
                }
                e
            })
            .collect(),
    ))
}

/// A stored queue document as OpenIAP's `WorkItemQueue`.
pub fn workitemqueue(doc: &Value) -> pb::WorkItemQueue {
    pb::WorkItemQueue {
        workflowid: text(doc, "workflowid"),
        robotqueue: text(doc, "robotqueue"),
        amqpqueue: text(doc, "amqpqueue"),
        projectid: text(doc, "projectid"),
        usersrole: text(doc, "usersrole"),
        maxretries: int(doc, "maxretries"),
        retrydelay: int(doc, "retrydelay"),
        initialdelay: int(doc, "initialdelay"),
        success_wiqid: text(doc, "success_wiqid"),
        failed_wiqid: text(doc, "failed_wiqid"),
        success_wiq: text(doc, "success_wiq"),
        failed_wiq: text(doc, "failed_wiq"),
        id: text(doc, "_id"),
        acl: aces(doc),
        name: text(doc, "name"),
        createdbyid: text(doc, "_createdbyid"),
        createdby: text(doc, "_createdby"),
        created: iso_to_timestamp(doc.get("_created")),
        modifiedbyid: text(doc, "_modifiedbyid"),
        modifiedby: text(doc, "_modifiedby"),
        modified: iso_to_timestamp(doc.get("_modified")),
        version: int(doc, "_version"),
    }
}

/// Puts `value` under `key` unless it is empty text.
pub fn put_text(doc: &mut Map<String, Value>, key: &str, value: &str) {
    if !value.is_empty() {
        doc.insert(key.into(), value.into());
    }
}

/// A queue definition from OpenIAP's `WorkItemQueue` fields.
pub fn queue_doc(q: &pb::WorkItemQueue) -> Map<String, Value> {
    let mut doc = Map::new();
    put_text(&mut doc, "name", &q.name);
    for (k, v) in [
        ("workflowid", &q.workflowid),
        ("robotqueue", &q.robotqueue),
        ("amqpqueue", &q.amqpqueue),
        ("projectid", &q.projectid),
        ("usersrole", &q.usersrole),
        ("success_wiqid", &q.success_wiqid),
        ("failed_wiqid", &q.failed_wiqid),
        ("success_wiq", &q.success_wiq),
        ("failed_wiq", &q.failed_wiq),
    ] {
        put_text(&mut doc, k, v);
    }
    doc.insert("maxretries".into(), q.maxretries.into());
    doc.insert("retrydelay".into(), q.retrydelay.max(0).into());
    doc.insert("initialdelay".into(), q.initialdelay.max(0).into());
    if let Some(acl) = acl_json(&q.acl) {
        doc.insert("_acl".into(), acl);
    }
    doc
}

/// A queue definition from the flat `AddWorkItemQueueRequest`.
pub fn add_queue_doc(r: &pb::AddWorkItemQueueRequest) -> Map<String, Value> {
    queue_doc(&pb::WorkItemQueue {
        name: r.name.clone(),
        robotqueue: r.robotqueue.clone(),
        amqpqueue: r.amqpqueue.clone(),
        projectid: r.projectid.clone(),
        maxretries: r.maxretries,
        initialdelay: r.initialdelay,
        retrydelay: r.retrydelay,
        success_wiqid: r.success_wiqid.clone(),
        failed_wiqid: r.failed_wiqid.clone(),
        success_wiq: r.success_wiq.clone(),
        failed_wiq: r.failed_wiq.clone(),
        acl: r.acl.clone(),
        ..Default::default()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timestamps_round_trip_and_refuse_nonsense() {
        let t = Timestamp {
            seconds: 1_700_000_000,
            nanos: 123_000_000,
        };
        let iso = timestamp_to_iso("nextrun", &t).expect("in range");
        assert_eq!(iso_to_timestamp(Some(&Value::String(iso))), Some(t));
        for bad in [
            Timestamp { seconds: -1, nanos: 0 },
            Timestamp { seconds: 0, nanos: -5 },
            Timestamp {
                seconds: i64::MAX,
                nanos: 0,
            },
        ] {
            assert!(timestamp_to_iso("nextrun", &bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn json_fields_name_themselves() {
        let e = json_object("item", "[1]").expect_err("not an object");
        assert!(e.to_string().contains("item"), "{e}");
        let e = json_objects("items", "{").expect_err("not json");
        assert!(e.to_string().starts_with("items is not valid JSON"), "{e}");
        assert_eq!(json_object("item", "").expect("empty is {}"), Map::new());
    }

    #[test]
    fn workitem_from_a_document() {
        let doc = json!({"_id": "a", "name": "n", "payload": {"x": 1}, "priority": 3,
            "state": "new", "wiq": "q", "retries": 2, "nextrun": "2024-01-02T03:04:05.006Z",
            "files": [{"filename": "f.txt", "_id": "b"}]});
        let w = workitem(&doc);
        assert_eq!((w.id.as_str(), w.priority, w.retries), ("a", 3, 2));
        assert_eq!(w.payload, r#"{"x":1}"#);
        assert_eq!(w.files[0].filename, "f.txt");
        assert!(w.nextrun.is_some());
    }
}
