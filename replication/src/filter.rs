//! What a site may share with one peer: a pure decision per change.
//!
//! Inputs are the change itself (its collection, and the document body it
//! carries, `_acl` included), the peer's share settings from the site's
//! configuration and the peer site's principal: `site:<name>`, a member of
//! the role `sites` and of every role whose `members` list it (resolved by
//! the shell like a user's roles).
//!
//! A change is withheld from the peer when
//! - its collection is not among the collections shared with the peer;
//! - it is a work item (`workitems`, by its `wiq`) or a queue definition
//!   (`mq`, `_type: "workitemqueue"`, by its `name`) of a queue not shared
//!   with the peer;
//! - its `_acl` keeps it from the peer. In `trusted` mode (the default: a
//!   trusted mesh replicates everything) only a deny entry with the read bit
//!   for the site principal or one of its roles withholds. In `enforce`
//!   mode the `_acl` must grant read to the site principal or one of its
//!   roles, and a deny covering it beats any grant. A site principal that
//!   holds the `admins` role bypasses ACLs, as users do.
//!
//! Each version is judged on the `_acl` in its own body (a delete carries
//! the document as it was), never on state the deciding site happens to
//! hold, so every site that relays a change decides the same for the same
//! peer. A withheld change goes to the peer as a stub (`change::stub`).

use std::collections::BTreeSet;

use serde_json::{Map, Value};

use crate::change::Change;

/// The read bit of an `_acl` entry's `rights`.
pub const READ: u64 = 2;
/// The role every peer site's principal holds.
pub const SITES_ROLE: &str = "sites";
/// Work-item queue definitions and work items.
pub const QUEUES: &str = "mq";
pub const ITEMS: &str = "workitems";
const QUEUE_TYPE: &str = "workitemqueue";

/// The principal id a peer site acts as.
pub fn site_principal(site: &str) -> String {
    format!("site:{site}")
}

/// How a record's `_acl` decides whether it goes to a peer.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum AclMode {
    /// Only a deny of read covering the peer withholds.
    #[default]
    Trusted,
    /// Read must be granted to the peer, and not denied.
    Enforce,
}

/// What this site shares with one peer (from its configuration).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ShareConfig {
    /// Collections shared; `None` shares all.
    pub collections: Option<BTreeSet<String>>,
    /// Work-item queues shared; `None` shares all.
    pub queues: Option<BTreeSet<String>>,
    pub acl: AclMode,
}

/// The share settings for one peer with its principal resolved.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PeerPolicy {
    pub share: ShareConfig,
    /// The ids the peer acts as: `site:<name>`, `sites` and its roles.
    pub ids: Vec<String>,
    /// The peer's principal holds `admins`: ACLs do not withhold.
    pub admin: bool,
}

impl PeerPolicy {
    /// The policy for `site` with `share` settings and the ids of the roles
    /// its principal holds (besides `sites`, which every site holds).
    pub fn new(share: ShareConfig, site: &str, roles: impl IntoIterator<Item = String>, admin: bool) -> Self {
        let mut ids = vec![site_principal(site), SITES_ROLE.to_owned()];
        for r in roles {
            if !ids.contains(&r) {
                ids.push(r);
            }
        }
        PeerPolicy { share, ids, admin }
    }
}

/// Why a change was withheld.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Withhold {
    /// Its collection is not shared with the peer.
    Collection,
    /// Its work-item queue is not shared with the peer.
    Queue,
    /// Its `_acl` keeps it from the peer.
    Acl,
    /// Its body is not a JSON object, so its `_acl` cannot be read (enforce mode).
    Unreadable,
}

/// Whether `change` may go to the peer in full; `Err` says why not. A stub
/// is always passed on (as a stub).
pub fn decide(change: &Change, policy: &PeerPolicy) -> Result<(), Withhold> {
    if change.withheld {
        return Ok(());
    }
    // The common case, kept cheap: sharing everything in trusted mode,
    // only a deny entry can withhold, and a body without the key "deny"
    // has none (bodies are written by serde_json, which does not escape
    // ASCII letters in keys).
    let quick = policy.share.collections.is_none()
        && policy.share.queues.is_none()
        && policy.share.acl == AclMode::Trusted
        && memchr::memmem::find(&change.body, b"\"deny\"").is_none();
    if quick {
        return Ok(());
    }
    let body = serde_json::from_slice::<Value>(&change.body).ok();
    let body = match &body {
        Some(Value::Object(m)) => Some(m),
        _ => None,
    };
    decide_doc(&change.collection, body, policy)
}

/// `decide` on a collection and a document body (`None` when it is not a
/// JSON object): also how a file's chunks are judged, on its `fs.files`
/// document.
pub fn decide_doc(collection: &str, body: Option<&Map<String, Value>>, policy: &PeerPolicy) -> Result<(), Withhold> {
    let share = &policy.share;
    if let Some(shared) = &share.collections
        && !shared.contains(collection)
    {
        return Err(Withhold::Collection);
    }
    let Some(body) = body else {
        return match share.acl {
            AclMode::Trusted => Ok(()),
            AclMode::Enforce if policy.admin => Ok(()),
            AclMode::Enforce => Err(Withhold::Unreadable),
        };
    };
    if let Some(queues) = &share.queues {
        let queue = match collection {
            ITEMS => body.get("wiq").and_then(Value::as_str),
            QUEUES if body.get("_type").and_then(Value::as_str) == Some(QUEUE_TYPE) => {
                body.get("name").and_then(Value::as_str)
            }
            _ => None,
        };
        if let Some(q) = queue
            && !queues.contains(q)
        {
            return Err(Withhold::Queue);
        }
    }
    if policy.admin {
        return Ok(());
    }
    let entries = body
        .get("_acl")
        .and_then(Value::as_array)
        .map(Vec::as_slice)
        .unwrap_or(&[]);
    let mut granted = false;
    for e in entries {
        let Some(id) = e.get("_id").and_then(Value::as_str) else {
            continue;
        };
        if !policy.ids.iter().any(|mine| mine == id) {
            continue;
        }
        let rights = e.get("rights").and_then(Value::as_u64).unwrap_or(0);
        if rights & READ == 0 {
            continue;
        }
        if e.get("deny").and_then(Value::as_bool).unwrap_or(false) {
            return Err(Withhold::Acl);
        }
        granted = true;
    }
    match share.acl {
        AclMode::Trusted => Ok(()),
        AclMode::Enforce if granted => Ok(()),
        AclMode::Enforce => Err(Withhold::Acl),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::change::{ChangeKind, stub};
    use proptest::prelude::*;
    use serde_json::json;

    fn change(collection: &str, body: Value) -> Change {
        Change {
            origin: "a".into(),
            seq: 1,
            hlc: 1,
            kind: ChangeKind::Insert as i32,
            collection: collection.into(),
            doc_id: "0123456789abcdef01234567".into(),
            body: serde_json::to_vec(&body).expect("json"),
            author: "u".into(),
            ..Default::default()
        }
    }

    fn policy(share: ShareConfig, roles: &[&str]) -> PeerPolicy {
        PeerPolicy::new(share, "b", roles.iter().map(|r| (*r).to_owned()), false)
    }

    fn set(names: &[&str]) -> Option<BTreeSet<String>> {
        Some(names.iter().map(|n| (*n).to_owned()).collect())
    }

    #[test]
    fn trusted_shares_all_but_what_denies_the_site() {
        let p = policy(ShareConfig::default(), &["r1"]);
        let creator_only = json!({"_acl": [{"_id": "u", "rights": 65535}]});
        assert_eq!(decide(&change("entities", creator_only), &p), Ok(()));
        assert_eq!(decide(&change("entities", json!({})), &p), Ok(()));
        for who in ["site:b", "sites", "r1"] {
            let denied = json!({"_acl": [{"_id": who, "rights": READ, "deny": true}]});
            assert_eq!(decide(&change("entities", denied), &p), Err(Withhold::Acl), "{who}");
        }
        let other_site = json!({"_acl": [{"_id": "site:c", "rights": READ, "deny": true}]});
        assert_eq!(decide(&change("entities", other_site), &p), Ok(()));
        let update_only = json!({"_acl": [{"_id": "sites", "rights": 4, "deny": true}]});
        assert_eq!(
            decide(&change("entities", update_only), &p),
            Ok(()),
            "deny covers its bits"
        );
    }

    #[test]
    fn enforce_needs_a_grant_and_deny_wins() {
        let share = ShareConfig {
            acl: AclMode::Enforce,
            ..Default::default()
        };
        let p = policy(share.clone(), &["r1"]);
        let creator_only = json!({"_acl": [{"_id": "u", "rights": 65535}]});
        assert_eq!(decide(&change("e", creator_only), &p), Err(Withhold::Acl));
        let to_sites = json!({"_acl": [{"_id": "sites", "rights": READ}]});
        assert_eq!(decide(&change("e", to_sites), &p), Ok(()));
        let to_role = json!({"_acl": [{"_id": "r1", "rights": 65535}]});
        assert_eq!(decide(&change("e", to_role), &p), Ok(()));
        let both = json!({"_acl": [{"_id": "sites", "rights": READ}, {"_id": "site:b", "rights": READ, "deny": true}]});
        assert_eq!(decide(&change("e", both.clone()), &p), Err(Withhold::Acl));
        let admin = PeerPolicy::new(share, "b", [], true);
        assert_eq!(decide(&change("e", both), &admin), Ok(()), "admins bypass ACLs");
        let mut bad = change("e", json!({}));
        bad.body = b"[1]".to_vec();
        assert_eq!(decide(&bad, &p), Err(Withhold::Unreadable));
    }

    #[test]
    fn collections_and_queues() {
        let p = policy(
            ShareConfig {
                collections: set(&["entities", "mq", "workitems"]),
                queues: set(&["shared"]),
                acl: AclMode::Trusted,
            },
            &[],
        );
        assert_eq!(decide(&change("entities", json!({})), &p), Ok(()));
        assert_eq!(decide(&change("secrets", json!({})), &p), Err(Withhold::Collection));
        let item = |q: &str| change("workitems", json!({"wiq": q, "_type": "workitem"}));
        assert_eq!(decide(&item("shared"), &p), Ok(()));
        assert_eq!(decide(&item("private"), &p), Err(Withhold::Queue));
        let queue = |q: &str| change("mq", json!({"name": q, "_type": "workitemqueue"}));
        assert_eq!(decide(&queue("shared"), &p), Ok(()));
        assert_eq!(decide(&queue("private"), &p), Err(Withhold::Queue));
        let exchange = change("mq", json!({"name": "private", "_type": "exchange"}));
        assert_eq!(decide(&exchange, &p), Ok(()), "only queue definitions go by queue");
        assert_eq!(decide(&stub("a", 9), &p), Ok(()), "a stub passes on as a stub");
    }

    proptest! {
        /// Enforce never shares what trusted withholds; a deny of read for
        /// any of the peer's ids always withholds; the decision depends only
        /// on the change and the policy (same inputs, same answer).
        #[test]
        fn enforce_is_stricter_and_deny_always_withholds(
            entries in proptest::collection::vec((0usize..5, 0u64..32, any::<bool>()), 0..6),
        ) {
            let ids = ["site:b", "sites", "r1", "u", "site:c"];
            let acl: Vec<Value> = entries.iter().map(|&(i, rights, deny)| {
                if deny { json!({"_id": ids[i], "rights": rights, "deny": true}) } else { json!({"_id": ids[i], "rights": rights}) }
            }).collect();
            let c = change("e", json!({"_acl": acl}));
            let trusted = policy(ShareConfig::default(), &["r1"]);
            let enforce = policy(ShareConfig { acl: AclMode::Enforce, ..Default::default() }, &["r1"]);
            let t = decide(&c, &trusted);
            let e = decide(&c, &enforce);
            prop_assert!(t.is_ok() || e.is_err());
            let denied = entries.iter().any(|&(i, rights, deny)| deny && i < 3 && rights & READ != 0);
            prop_assert_eq!(t.is_err(), denied);
            let granted = entries.iter().any(|&(i, rights, deny)| !deny && i < 3 && rights & READ != 0);
            prop_assert_eq!(e.is_ok(), granted && !denied);
            prop_assert_eq!(decide(&c, &enforce), e);
        }
    }
}
