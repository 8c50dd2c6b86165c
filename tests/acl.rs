//! ACLs through the REST API of a real node: nested roles (with a cycle),
//! enforced deny entries, creator rights, reads that hide existence,
//! filtered queries, and work-item queues gated by invoke.

mod common;

use serde_json::{Value, json};

use common::{PASSWORD, Site};

const READ: u64 = 2;
const UPDATE: u64 = 4;
const INVOKE: u64 = 16;
const USERS_ROLE: &str = "5a23f18a2e8987292ddbe061";

struct As<'a> {
    site: &'a Site,
    user: &'a str,
    password: &'a str,
}

impl As<'_> {
    async fn send(&self, method: reqwest::Method, path: &str, body: Option<Value>) -> anyhow::Result<(u16, Value)> {
        let mut r = self
            .site
            .client
            .request(method, self.site.url(path))
            .basic_auth(self.user, Some(self.password));
        if let Some(b) = body {
            r = r.json(&b);
        }
        let r = r.send().await?;
        let status = r.status().as_u16();
        Ok((status, r.json().await.unwrap_or(Value::Null)))
    }

    async fn post(&self, path: &str, body: Value) -> anyhow::Result<(u16, Value)> {
        self.send(reqwest::Method::POST, path, Some(body)).await
    }

    async fn get(&self, path: &str) -> anyhow::Result<(u16, Value)> {
        self.send(reqwest::Method::GET, path, None).await
    }
}

fn id(v: &Value) -> String {
    v["_id"].as_str().unwrap_or_default().to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acls_roles_and_deny() -> anyhow::Result<()> {
    let root = tempfile::tempdir()?;
    let mut site = Site::single(root.path(), "acl");
    site.start().await?;
    let admin = As {
        site: &site,
        user: "admin",
        password: PASSWORD,
    };
    let (s, alice_doc) = admin
        .post("/api/v1/users", json!({"username": "alice", "password": "a-pw"}))
        .await?;
    assert_eq!(s, 201, "{alice_doc}");
    let (s, bob_doc) = admin
        .post("/api/v1/users", json!({"username": "bob", "password": "b-pw"}))
        .await?;
    assert_eq!(s, 201, "{bob_doc}");
    let (alice_id, _bob_id) = (id(&alice_doc), id(&bob_doc));
    let alice = As {
        site: &site,
        user: "alice",
        password: "a-pw",
    };
    let bob = As {
        site: &site,
        user: "bob",
        password: "b-pw",
    };
    assert_eq!(
        alice
            .post("/api/v1/users", json!({"username": "eve", "password": "x"}))
            .await?
            .0,
        403,
        "only admins make users"
    );

    // Roles nest: alice ∈ ops ∈ night; night and loop form a cycle.
    let roles = "/api/v1/collections/users/documents";
    let (_, ops) = admin
        .post(
            roles,
            json!({"_type": "role", "name": "ops", "members": [{"_id": alice_id}]}),
        )
        .await?;
    let (_, night) = admin
        .post(
            roles,
            json!({"_type": "role", "name": "night", "members": [{"_id": id(&ops)}]}),
        )
        .await?;
    let (_, looped) = admin
        .post(
            roles,
            json!({"_type": "role", "name": "loop", "members": [{"_id": id(&night)}]}),
        )
        .await?;
    let (s, _) = admin
        .send(
            reqwest::Method::PATCH,
            &format!("{roles}/{}", id(&night)),
            Some(json!({"$push": {"members": {"_id": id(&looped)}}})),
        )
        .await?;
    assert_eq!(s, 200);

    let docs = "/api/v1/collections/plans/documents";
    let (_, d1) = admin
        .post(
            docs,
            json!({"name": "d1", "_acl": [{"_id": id(&night), "name": "night", "rights": READ}]}),
        )
        .await?;
    let d1_path = format!("{docs}/{}", id(&d1));
    assert_eq!(alice.get(&d1_path).await?.0, 200, "read through two nested roles");
    let (s, body) = bob.get(&d1_path).await?;
    assert_eq!(s, 404, "bob cannot learn d1 exists: {body}");
    assert_eq!(bob.get(&format!("{d1_path}/versions")).await?.0, 404);
    assert_eq!(alice.get(&format!("{d1_path}/versions")).await?.0, 200);
    let (s, _) = alice
        .send(reqwest::Method::PUT, &d1_path, Some(json!({"name": "changed"})))
        .await?;
    assert_eq!(s, 403, "read but no update right");
    let (s, _) = bob
        .send(reqwest::Method::PUT, &d1_path, Some(json!({"name": "changed"})))
        .await?;
    assert_eq!(s, 404, "no read right: same answer as a missing document");

    // Deny is enforced: every user may read d2, except alice.
    let (_, d2) = admin
        .post(
            docs,
            json!({"name": "d2", "_acl": [{"_id": USERS_ROLE, "rights": READ}, {"_id": alice_id, "rights": READ, "deny": true}]}),
        )
        .await?;
    let d2_path = format!("{docs}/{}", id(&d2));
    assert_eq!(bob.get(&d2_path).await?.0, 200);
    assert_eq!(alice.get(&d2_path).await?.0, 404);

    // Creators get full control; others see nothing of it.
    let (s, mine) = alice.post(docs, json!({"name": "alice's"})).await?;
    assert_eq!(s, 201);
    let mine_path = format!("{docs}/{}", id(&mine));
    assert_eq!(
        alice
            .send(reqwest::Method::PUT, &mine_path, Some(json!({"name": "still mine"})))
            .await?
            .0,
        200
    );
    assert_eq!(bob.get(&mine_path).await?.0, 404);

    // Queries and counts are filtered by read right.
    for (who, expect) in [(&admin, 3), (&alice, 2), (&bob, 1)] {
        let (_, c) = who.post("/api/v1/collections/plans/count", json!({})).await?;
        assert_eq!(c["count"], expect, "count for {}", who.user);
    }
    let (_, names) = bob
        .post("/api/v1/collections/plans/query", json!({"projection": {"name": 1}}))
        .await?;
    assert_eq!(names.as_array().map(|a| a.len()), Some(1));

    // Work items: invoke on the queue gates push and pop.
    let (s, _) = admin
        .post(
            "/api/v1/workitemqueues",
            json!({"name": "jobs", "_acl": [{"_id": id(&ops), "rights": INVOKE | READ | UPDATE}]}),
        )
        .await?;
    assert_eq!(s, 201);
    let (s, pushed) = alice
        .post("/api/v1/workitemqueues/jobs/workitems", json!({"payload": {"x": 1}}))
        .await?;
    assert_eq!(s, 201, "{pushed}");
    assert_eq!(
        bob.post("/api/v1/workitemqueues/jobs/workitems", json!({"payload": {}}))
            .await?
            .0,
        404
    );
    assert_eq!(bob.post("/api/v1/workitemqueues/jobs/pop", json!({})).await?.0, 404);
    let (s, popped) = alice.post("/api/v1/workitemqueues/jobs/pop", json!({})).await?;
    assert_eq!((s, id(&popped)), (200, id(&pushed[0])));
    assert_eq!(
        bob.get(&format!("/api/v1/workitems/{}", id(&popped))).await?.0,
        404,
        "items inherit the queue's ACL"
    );

    // A bearer token carries the same roles.
    let r = site
        .client
        .post(site.url("/api/v1/signin"))
        .json(&json!({"username": "alice", "password": "a-pw"}))
        .send()
        .await?;
    let jwt = r.json::<Value>().await?["jwt"].as_str().unwrap_or_default().to_owned();
    let r = site.client.get(site.url(&d1_path)).bearer_auth(&jwt).send().await?;
    assert_eq!(r.status(), 200);
    // Bad ACLs are refused.
    assert_eq!(admin.post(docs, json!({"_acl": [{"rights": 2}]})).await?.0, 400);
    Ok(())
}
