//! Helpers shared by the mesh tests.

use serde_json::{Map, Value};

use ocmesh_node::Principal;

/// The local admin, who may write anything.
pub fn admin() -> Principal {
    Principal {
        roles: vec![ocmesh_node::acl::ADMINS_ROLE_ID.into()],
        id: "0".repeat(24),
        name: "admin".into(),
    }
}

/// The object inside `v` (empty when `v` is not one).
pub fn obj(v: Value) -> Map<String, Value> {
    match v {
        Value::Object(m) => m,
        _ => Map::new(),
    }
}
