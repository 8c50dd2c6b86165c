//! Per-document access control, with OpenCore's `_acl` entries
//! `{_id, name, rights, deny?}` and rights bits. Unlike OpenCore, `deny`
//! entries are enforced: a deny that covers the caller beats any grant.
//! Members of `admins` bypass ACLs.

use serde_json::{Map, Value, json};

use crate::Principal;

pub const CREATE: u64 = 1;
pub const READ: u64 = 2;
pub const UPDATE: u64 = 4;
pub const DELETE: u64 = 8;
pub const INVOKE: u64 = 16;
pub const FULL_CONTROL: u64 = 65_535;

/// OpenCore's well-known ids.
pub const ADMINS_ROLE_ID: &str = "5a1702fa245d9013697656fb";
pub const USERS_ROLE_ID: &str = "5a23f18a2e8987292ddbe061";

/// Why an `_acl` was refused.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum AclError {
    #[error("_acl must be an array of {{_id, name, rights}} entries")]
    NotArray,
    #[error("_acl[{0}] needs a string _id and a numeric rights value from 0 to 65535")]
    BadEntry(usize),
}

impl Principal {
    /// True for members of `admins`.
    pub fn is_admin(&self) -> bool {
        self.roles.iter().any(|r| r == ADMINS_ROLE_ID)
    }

    /// The ids this principal acts as: itself and its roles.
    pub fn ids(&self) -> impl Iterator<Item = &str> {
        std::iter::once(self.id.as_str()).chain(self.roles.iter().map(String::as_str))
    }
}

/// Whether `who` holds `right` on `doc`.
pub fn allowed(doc: &Value, who: &Principal, right: u64) -> bool {
    match doc {
        Value::Object(m) => allowed_map(m, who, right),
        _ => who.is_admin(),
    }
}

/// `allowed` on a document's fields.
pub fn allowed_map(doc: &serde_json::Map<String, Value>, who: &Principal, right: u64) -> bool {
    if who.is_admin() {
        return true;
    }
    let Some(entries) = doc.get("_acl").and_then(Value::as_array) else {
        return false;
    };
    let mut granted = false;
    for e in entries {
        let Some(id) = e.get("_id").and_then(Value::as_str) else {
            continue;
        };
        if !who.ids().any(|mine| mine == id) {
            continue;
        }
        let rights = e.get("rights").and_then(Value::as_u64).unwrap_or(0);
        if rights & right == 0 {
            continue;
        }
        if e.get("deny").and_then(Value::as_bool).unwrap_or(false) {
            return false;
        }
        granted = true;
    }
    granted
}

/// The name of a right, for messages.
pub fn name(right: u64) -> &'static str {
    match right {
        CREATE => "create",
        READ => "read",
        UPDATE => "update",
        DELETE => "delete",
        INVOKE => "invoke",
        _ => "full control",
    }
}

/// Checks the shape of a document's `_acl`.
pub fn validate(doc: &Map<String, Value>) -> Result<(), AclError> {
    let entries = match doc.get("_acl") {
        None | Some(Value::Null) => return Ok(()),
        Some(Value::Array(a)) => a,
        Some(_) => return Err(AclError::NotArray),
    };
    for (i, e) in entries.iter().enumerate() {
        let ok = e.get("_id").and_then(Value::as_str).is_some()
            && e.get("rights")
                .and_then(Value::as_u64)
                .is_some_and(|r| r <= FULL_CONTROL);
        if !ok {
            return Err(AclError::BadEntry(i));
        }
    }
    Ok(())
}

/// Checks a client-supplied `_acl` and makes sure the creator has full
/// control, as OpenCore does on insert.
pub fn with_creator(doc: &mut Map<String, Value>, by: &Principal) -> Result<(), AclError> {
    validate(doc)?;
    let mut entries = doc.get("_acl").and_then(Value::as_array).cloned().unwrap_or_default();
    if !entries
        .iter()
        .any(|e| e.get("_id").and_then(Value::as_str) == Some(by.id.as_str()) && e.get("deny").is_none())
    {
        entries.push(json!({"_id": by.id, "name": by.name, "rights": FULL_CONTROL}));
    }
    doc.insert("_acl".into(), Value::Array(entries));
    Ok(())
}

/// Resolves nested role membership: starting from `start`, adds every role
/// whose members include an id already held, until nothing changes. Cycles
/// end because each role is added once.
pub fn expand_roles(start: &[String], roles: &[(String, Vec<String>)]) -> Vec<String> {
    let mut held: Vec<String> = start.to_vec();
    loop {
        let before = held.len();
        for (role, members) in roles {
            if !held.contains(role) && members.iter().any(|m| held.contains(m)) {
                held.push(role.clone());
            }
        }
        if held.len() == before {
            return held;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn user(roles: &[&str]) -> Principal {
        Principal {
            id: "u1".into(),
            name: "u".into(),
            roles: roles.iter().map(|r| (*r).to_owned()).collect(),
        }
    }

    #[test]
    fn grants_denies_and_admins() {
        let doc = json!({"_acl": [
            {"_id": "u1", "rights": READ | UPDATE},
            {"_id": "r1", "rights": DELETE},
            {"_id": "r2", "rights": UPDATE, "deny": true},
        ]});
        assert!(allowed(&doc, &user(&[]), READ));
        assert!(!allowed(&doc, &user(&[]), DELETE));
        assert!(allowed(&doc, &user(&["r1"]), DELETE));
        assert!(allowed(&doc, &user(&[]), UPDATE));
        assert!(!allowed(&doc, &user(&["r2"]), UPDATE), "deny wins");
        assert!(allowed(&doc, &user(&["r2"]), READ), "deny covers only its bits");
        assert!(allowed(&doc, &user(&[ADMINS_ROLE_ID]), INVOKE));
        assert!(!allowed(&json!({}), &user(&[]), READ), "no _acl, no access");
    }

    #[test]
    fn creator_gets_full_control_and_bad_acls_are_refused() {
        let mut doc = json!({"_acl": [{"_id": "r1", "rights": 2}]})
            .as_object()
            .cloned()
            .expect("o");
        with_creator(&mut doc, &user(&[])).expect("ok");
        assert!(allowed(&Value::Object(doc), &user(&[]), DELETE));
        let mut bad = json!({"_acl": [{"rights": 2}]}).as_object().cloned().expect("o");
        assert_eq!(with_creator(&mut bad, &user(&[])), Err(AclError::BadEntry(0)));
        let mut bad = json!({"_acl": "all"}).as_object().cloned().expect("o");
        assert_eq!(with_creator(&mut bad, &user(&[])), Err(AclError::NotArray));
    }

    #[test]
    fn nested_roles_and_cycles() {
        let roles = vec![
            ("a".to_string(), vec!["u1".to_string()]),
            ("b".to_string(), vec!["a".to_string()]),
            ("c".to_string(), vec!["b".to_string(), "d".to_string()]),
            ("d".to_string(), vec!["c".to_string()]),
            ("e".to_string(), vec!["nobody".to_string()]),
        ];
        let mut got = expand_roles(&["u1".to_string()], &roles);
        got.sort();
        assert_eq!(got, vec!["a", "b", "c", "d", "u1"]);
    }

    proptest! {
        /// Adding a deny entry for any of the caller's ids never grants
        /// more; removing one never grants less.
        #[test]
        fn deny_only_takes_away(bits in 0u64..32, deny_bits in 0u64..32, right_bit in 0u32..5) {
            let right = 1u64 << right_bit;
            let base = json!({"_acl": [{"_id": "u1", "rights": bits}]});
            let denied = json!({"_acl": [{"_id": "u1", "rights": bits}, {"_id": "r", "rights": deny_bits, "deny": true}]});
            let who = user(&["r"]);
            prop_assert!(!allowed(&denied, &who, right) || allowed(&base, &who, right));
            prop_assert_eq!(allowed(&denied, &who, right), bits & right != 0 && deny_bits & right == 0);
        }
    }
}
