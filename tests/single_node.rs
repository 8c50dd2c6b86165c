//! One real `ocmesh run` process: auth, documents with history, bad input,
//! settings precedence, restart.

mod common;

use std::process::{Command, Stdio};
use std::time::Duration;

use serde_json::{Value, json};

use common::{PASSWORD, Site, bin, free_tcp, hermetic, wait_until};

async fn site() -> anyhow::Result<(Site, tempfile::TempDir)> {
    let root = tempfile::tempdir()?;
    let mut s = Site::single(root.path(), "solo");
    s.start().await?;
    Ok((s, root))
}

/// A site whose picked HTTP port was taken before it started gets another
/// one instead of failing the test that started it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_taken_http_port_is_picked_again() -> anyhow::Result<()> {
    let root = tempfile::tempdir()?;
    let taken = std::net::TcpListener::bind("127.0.0.1:0")?;
    let mut s = Site::single(root.path(), "moved");
    s.http = taken.local_addr()?;
    s.start().await?;
    assert_ne!(s.http, taken.local_addr()?);
    assert!(std::fs::read_to_string(&s.log)?.contains("cannot listen for HTTP on"));
    s.stop();
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn authentication() -> anyhow::Result<()> {
    let (s, _root) = site().await?;
    let url = s.url("/api/v1/collections/entities/documents");
    let c = &s.client;
    // Listening on the address it was given, health needs no credentials.
    let health = c.get(format!("http://{}/health", s.http)).send().await?;
    assert_eq!(health.status(), 200);
    let none = c.post(&url).json(&json!({})).send().await?;
    assert_eq!(none.status(), 401);
    assert!(none.headers().contains_key("www-authenticate"));
    let body: Value = none.json().await?;
    assert_eq!(body["error"], "unauthorized");
    assert!(body["detail"].is_string());
    let wrong = c
        .post(&url)
        .basic_auth("admin", Some("wrong"))
        .json(&json!({}))
        .send()
        .await?;
    assert_eq!(wrong.status(), 401);
    let body: Value = wrong.json().await?;
    assert!(body["error"].is_string() && body["detail"].is_string(), "{body}");
    // Reads need credentials too.
    assert_eq!(
        c.get(s.doc_url("entities", "0123456789abcdef01234567"))
            .send()
            .await?
            .status(),
        401
    );
    assert_eq!(
        c.post(&url)
            .basic_auth("nobody", Some(PASSWORD))
            .json(&json!({}))
            .send()
            .await?
            .status(),
        401
    );
    let garbage = c.post(&url).bearer_auth("garbage").json(&json!({})).send().await?;
    assert_eq!(garbage.status(), 401);
    let body: Value = garbage.json().await?;
    assert!(body["error"].is_string() && body["detail"].is_string(), "{body}");
    assert_eq!(
        c.post(&url)
            .header("authorization", "Digest x")
            .json(&json!({}))
            .send()
            .await?
            .status(),
        401
    );

    let signin = c
        .post(s.url("/api/v1/signin"))
        .json(&json!({"username": "admin", "password": PASSWORD}))
        .send()
        .await?;
    assert_eq!(signin.status(), 200);
    let signed_in: Value = signin.json().await?;
    assert!(signed_in["user"].is_object(), "{signed_in}");
    let jwt = signed_in["jwt"].as_str().unwrap_or_default().to_owned();
    assert!(!jwt.is_empty(), "{signed_in}");
    assert_eq!(
        c.post(&url)
            .bearer_auth(&jwt)
            .json(&json!({"via": "jwt"}))
            .send()
            .await?
            .status(),
        201
    );
    let bad = c
        .post(s.url("/api/v1/signin"))
        .json(&json!({"username": "admin", "password": "no"}))
        .send()
        .await?;
    assert_eq!(bad.status(), 401);
    // A token with a flipped signature character is refused.
    let mut forged = jwt.clone();
    let last = forged.pop().map(|ch| if ch == 'A' { 'B' } else { 'A' }).unwrap_or('A');
    forged.push(last);
    assert_eq!(
        c.post(&url)
            .bearer_auth(&forged)
            .json(&json!({}))
            .send()
            .await?
            .status(),
        401
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn document_lifecycle_and_history() -> anyhow::Result<()> {
    let (s, _root) = site().await?;
    let doc = s
        .insert("entities", &json!({"name": "first", "_type": "thing"}))
        .await?;
    let id = doc["_id"].as_str().unwrap_or_default().to_owned();
    assert_eq!(id.len(), 24, "{doc}");
    assert!(
        id.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)),
        "_id is not 24 lowercase hex: {doc}"
    );
    assert_eq!(doc["_version"], 0);
    for f in ["_created", "_modified", "_createdby", "_modifiedby"] {
        assert!(doc[f].is_string(), "{f} missing: {doc}");
    }
    assert_eq!(s.doc("entities", &id).await?, Some(doc.clone()));

    let v1 = s.put("entities", &id, &json!({"name": "second"})).await?;
    assert_eq!(v1["_version"], 1);
    assert_eq!(v1["name"], "second");
    assert_eq!(v1["_created"], doc["_created"]);
    assert_eq!(s.doc("entities", &id).await?, Some(v1.clone()));
    let versions = s.versions("entities", &id).await?;
    assert_eq!(versions.as_array().map(|v| v.len()), Some(2), "{versions}");
    assert_eq!(
        (versions[0]["_version"].as_u64(), versions[1]["_version"].as_u64()),
        (Some(0), Some(1))
    );

    let del = s
        .client
        .delete(s.doc_url("entities", &id))
        .basic_auth("admin", Some(PASSWORD))
        .send()
        .await?;
    assert!(del.status() == 200 || del.status() == 204, "delete: {}", del.status());
    assert_eq!(s.doc("entities", &id).await?, None);
    let (status, gone) = s.get(&format!("/api/v1/collections/entities/documents/{id}")).await?;
    assert_eq!((status, gone["error"].as_str()), (404, Some("not_found")));

    let versions = s.versions("entities", &id).await?;
    assert_eq!(versions.as_array().map(|v| v.len()), Some(3), "{versions}");
    for (n, v) in versions.as_array().into_iter().flatten().enumerate() {
        assert_eq!(v["_version"].as_u64(), Some(n as u64), "{versions}");
    }
    assert_eq!(versions[0], doc);
    let (status, v0) = s
        .get(&format!("/api/v1/collections/entities/documents/{id}/versions/0"))
        .await?;
    assert_eq!((status, v0), (200, doc));
    let (status, v2) = s
        .get(&format!("/api/v1/collections/entities/documents/{id}/versions/2"))
        .await?;
    assert_eq!(status, 200, "{v2}");
    assert_eq!(v2["_version"], 2, "{v2}");
    assert!(v2["_deleted"].is_string(), "{v2}");
    let (status, _) = s
        .get(&format!("/api/v1/collections/entities/documents/{id}/versions/3"))
        .await?;
    assert_eq!(status, 404);

    // A client-supplied id is kept.
    let mine = s
        .insert("entities", &json!({"_id": "0123456789abcdef01234567"}))
        .await?;
    assert_eq!(mine["_id"], "0123456789abcdef01234567");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_gets_a_precise_4xx() -> anyhow::Result<()> {
    let (s, _root) = site().await?;
    let c = &s.client;
    let post = |collection: &str, body: &'static str| {
        c.post(s.url(&format!("/api/v1/collections/{collection}/documents")))
            .basic_auth("admin", Some(PASSWORD))
            .header("content-type", "application/json")
            .body(body)
    };
    let cases: Vec<(reqwest::RequestBuilder, u16, &str)> = vec![
        (post("entities", "{\"name\": "), 400, "not valid JSON"),
        (post("entities", "[1, 2]"), 400, "JSON object"),
        (post("bad$name", "{}"), 400, "bad$name"),
        (post("a%20b", "{}"), 400, "a b"),
        (post("entities", "{\"_id\": \"xyz\"}"), 400, "ObjectId"),
        (post("entities", "{\"_id\": 12}"), 400, "_id"),
        (
            c.get(s.url("/api/v1/collections/entities/documents/not-an-id"))
                .basic_auth("admin", Some(PASSWORD)),
            400,
            "ObjectId",
        ),
        (
            c.get(s.url("/api/v1/collections/entities/documents/0123456789abcdef01234567/versions/x"))
                .basic_auth("admin", Some(PASSWORD)),
            400,
            "non-negative integer",
        ),
        (
            c.get(s.url("/api/v1/collections/entities/documents/0123456789abcdef01234567/versions/0"))
                .basic_auth("admin", Some(PASSWORD)),
            404,
            "not found",
        ),
        (
            c.put(s.url("/api/v1/collections/entities/documents/0123456789abcdef01234567"))
                .basic_auth("admin", Some(PASSWORD))
                .json(&json!({})),
            404,
            "not found",
        ),
        (
            c.get(s.url("/no/such/route")).basic_auth("admin", Some(PASSWORD)),
            404,
            "no such route",
        ),
    ];
    for (req, status, needle) in cases {
        let r = req.send().await?;
        let got = r.status().as_u16();
        let body: Value = r.json().await?;
        assert_eq!(got, status, "{body}");
        assert!(body["error"].is_string(), "{body}");
        assert!(
            body["detail"].as_str().unwrap_or_default().contains(needle),
            "{needle:?} not in {body}"
        );
    }
    let dup = s
        .insert("entities", &json!({"_id": "0123456789abcdef0123456a"}))
        .await?;
    let r = post("entities", "{\"_id\": \"0123456789abcdef0123456a\"}")
        .send()
        .await?;
    assert_eq!(r.status(), 409, "{dup}");
    // Still serving.
    let (status, _) = s.get("/health").await?;
    assert_eq!(status, 200);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn data_survives_restart() -> anyhow::Result<()> {
    let (mut s, _root) = site().await?;
    let doc = s.insert("entities", &json!({"keep": "me"})).await?;
    let (status, metrics) = s.get("/api/v1/metrics").await?;
    assert_eq!(status, 200);
    assert!(
        metrics["writes"].as_u64().unwrap_or(0) >= 1 && metrics["commits"].as_u64().unwrap_or(0) >= 1,
        "{metrics}"
    );
    assert_eq!(metrics["changes_held"], 1);
    // The publisher's queue is shown with its bound.
    assert!(
        metrics["publish_queue"].is_u64() && metrics["wal_syncs"].is_u64(),
        "{metrics}"
    );
    assert_eq!(metrics["publish_queue_bound"], 64, "{metrics}");
    let id = doc["_id"].as_str().unwrap_or_default().to_owned();
    s.stop();
    s.start().await?;
    assert_eq!(s.doc("entities", &id).await?, Some(doc));
    Ok(())
}

/// Flags win over OCMESH_* variables, which win over the --config file.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn settings_precedence() -> anyhow::Result<()> {
    let root = tempfile::tempdir()?;
    let (from_file, from_env, from_flag) = (free_tcp(), free_tcp(), free_tcp());
    let config = root.path().join("ocmesh.toml");
    std::fs::write(&config, format!("http = \"{from_file}\"\nsite = \"from-file\"\n"))?;
    let client = reqwest::Client::new();
    let log_path = |data: &str| root.path().join(format!("{data}.log"));
    let run = |extra: &[String], env_http: Option<String>, data: &str| -> anyhow::Result<std::process::Child> {
        let mut cmd = Command::new(bin());
        hermetic(&mut cmd);
        cmd.arg("run")
            .arg("--config")
            .arg(&config)
            .arg("--data")
            .arg(root.path().join(data))
            .args(extra);
        if let Some(h) = env_http {
            cmd.env("OCMESH_HTTP", h);
        }
        Ok(cmd
            .env("OCMESH_ADMIN_PASSWORD", PASSWORD)
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(log_path(data))?)
            .spawn()?)
    };
    let cases = [
        (vec![], None, from_file, "d1"),
        (vec![], Some(from_env.to_string()), from_env, "d2"),
        (
            vec!["--http".to_string(), from_flag.to_string()],
            Some(from_env.to_string()),
            from_flag,
            "d3",
        ),
    ];
    for (extra, env_http, expect, data) in cases {
        let mut child = run(&extra, env_http, data)?;
        let url = format!("http://{expect}/health");
        let result = wait_until(Duration::from_secs(20), &format!("health on {expect}"), || {
            let (client, url) = (client.clone(), url.clone());
            async move {
                Ok(client
                    .get(&url)
                    .send()
                    .await
                    .map(|r| r.status() == 200)
                    .unwrap_or(false))
            }
        })
        .await;
        let health: Value = match &result {
            Ok(()) => client.get(&url).send().await?.json().await?,
            Err(_) => Value::Null,
        };
        let _ = child.kill();
        let _ = child.wait();
        if let Err(e) = result {
            let log = std::fs::read_to_string(log_path(data)).unwrap_or_default();
            anyhow::bail!("{e:#}\nexpected to listen on {expect}; its stderr:\n{log}");
        }
        assert_eq!(health["site"], "from-file");
    }
    // A bad file is refused with a message naming the problem.
    std::fs::write(&config, "http = \"not an address\"\n")?;
    let out = hermetic(&mut Command::new(bin()))
        .arg("run")
        .arg("--config")
        .arg(&config)
        .arg("--data")
        .arg(root.path().join("d4"))
        .output()?;
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("`http`"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(())
}

/// With no password given, the first start prints a generated one once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn generated_admin_password_is_printed_once_and_works() -> anyhow::Result<()> {
    let root = tempfile::tempdir()?;
    let http = free_tcp();
    let log = root.path().join("log");
    let start = || -> anyhow::Result<std::process::Child> {
        Ok(hermetic(&mut Command::new(bin()))
            .args(["run", "--http", &http.to_string(), "--data"])
            .arg(root.path().join("data"))
            .env_remove("OCMESH_ADMIN_PASSWORD")
            .stderr(std::fs::OpenOptions::new().create(true).append(true).open(&log)?)
            .stdout(Stdio::null())
            .spawn()?)
    };
    let client = reqwest::Client::new();
    let health = format!("http://{http}/health");
    let healthy = || {
        let (client, health) = (client.clone(), health.clone());
        async move {
            Ok(client
                .get(&health)
                .send()
                .await
                .map(|r| r.status() == 200)
                .unwrap_or(false))
        }
    };
    let mut child = start()?;
    wait_until(Duration::from_secs(20), "first start", healthy).await?;
    let text = std::fs::read_to_string(&log)?;
    let password = text
        .split("created user admin with password ")
        .nth(1)
        .and_then(|rest| rest.split_whitespace().next())
        .unwrap_or_default()
        .to_owned();
    assert_eq!(password.len(), 20, "{text}");
    let r = client
        .post(format!("http://{http}/api/v1/signin"))
        .json(&json!({"username": "admin", "password": password}))
        .send()
        .await?;
    assert_eq!(r.status(), 200);
    let _ = Command::new("kill").arg("-TERM").arg(child.id().to_string()).status();
    let _ = child.wait();
    let mut child = start()?;
    wait_until(Duration::from_secs(20), "second start", healthy).await?;
    let _ = child.kill();
    let _ = child.wait();
    let text = std::fs::read_to_string(&log)?;
    assert_eq!(
        text.matches("created user admin").count(),
        1,
        "printed only on first start"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queries_count_and_distinct() -> anyhow::Result<()> {
    let (s, _root) = site().await?;
    for i in 0..30 {
        let kind = ["pump", "valve", "fan"][i % 3];
        s.insert(
            "machines",
            &json!({"name": format!("m{i:02}"), "kind": kind, "load": i, "site": {"hall": i % 2}}),
        )
        .await?;
    }
    let post = |path: &str, body: Value| {
        s.client
            .post(s.url(&format!("/api/v1/collections/machines/{path}")))
            .basic_auth("admin", Some(PASSWORD))
            .json(&body)
            .send()
    };
    let r: Value = post(
        "query",
        json!({"filter": {"kind": "pump", "load": {"$gte": 10}}, "sort": {"load": -1}, "top": 2, "projection": {"name": 1}}),
    )
    .await?
    .json()
    .await?;
    let names: Vec<&str> = r
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|d| d["name"].as_str())
        .collect();
    assert_eq!(names, vec!["m27", "m24"], "{r}");
    assert!(r[0]["_id"].is_string() && r[0].get("load").is_none(), "{r}");

    let c: Value = post("count", json!({"filter": {"$or": [{"kind": "fan"}, {"site.hall": 1}]}}))
        .await?
        .json()
        .await?;
    assert_eq!(c["count"], 20);
    let d: Value = post("distinct", json!({"field": "kind", "filter": {"load": {"$lt": 2}}}))
        .await?
        .json()
        .await?;
    assert_eq!(d, json!(["pump", "valve"]));

    let bad = post("query", json!({"filter": {"load": {"$where": 1}}})).await?;
    assert_eq!(bad.status(), 400);
    let body: Value = bad.json().await?;
    assert!(body["detail"].as_str().unwrap_or_default().contains("$where"), "{body}");
    let bad = post("query", json!({"top": "ten"})).await?;
    assert_eq!(bad.status(), 400);

    // An index changes how, never what.
    let before: Value = post("query", json!({"filter": {"load": {"$in": [3, 4]}}}))
        .await?
        .json()
        .await?;
    assert_eq!(post("indexes", json!({"field": "load"})).await?.status(), 201);
    let after: Value = post("query", json!({"filter": {"load": {"$in": [3, 4]}}}))
        .await?
        .json()
        .await?;
    assert_eq!(before, after);
    let (_, list) = s.get("/api/v1/collections/machines/indexes").await?;
    assert_eq!(list, json!([{"field": "_type"}, {"field": "load"}]));
    assert_eq!(post("indexes", json!({"field": ""})).await?.status(), 400);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn work_item_rest_and_its_errors() -> anyhow::Result<()> {
    let (s, _root) = site().await?;
    let c = &s.client;
    let send = |method: reqwest::Method, path: &str, body: Option<Value>| {
        let r = c.request(method, s.url(path)).basic_auth("admin", Some(PASSWORD));
        match body {
            Some(b) => r.json(&b),
            None => r,
        }
        .send()
    };
    use reqwest::Method;
    let r = send(
        Method::POST,
        "/api/v1/workitemqueues",
        Some(json!({"name": "q", "maxretries": "lots"})),
    )
    .await?;
    assert_eq!(r.status(), 400);
    assert!(r.text().await?.contains("maxretries"));
    assert_eq!(
        send(
            Method::POST,
            "/api/v1/workitemqueues",
            Some(json!({"name": "q", "success_wiq": "out"}))
        )
        .await?
        .status(),
        201
    );
    assert_eq!(
        send(Method::POST, "/api/v1/workitemqueues", Some(json!({"name": "out"})))
            .await?
            .status(),
        201
    );
    assert_eq!(
        send(Method::POST, "/api/v1/workitemqueues", Some(json!({"name": "q"})))
            .await?
            .status(),
        409
    );
    let r = send(
        Method::POST,
        "/api/v1/workitemqueues/q/workitems",
        Some(json!({"payload": "text"})),
    )
    .await?;
    assert_eq!(r.status(), 400);
    assert!(r.text().await?.contains("payload"));
    assert_eq!(
        send(Method::POST, "/api/v1/workitemqueues/nope/pop", None)
            .await?
            .status(),
        404
    );
    assert_eq!(
        send(Method::POST, "/api/v1/workitemqueues/q/pop", None).await?.status(),
        204
    );
    let pushed: Value = send(
        Method::POST,
        "/api/v1/workitemqueues/q/workitems",
        Some(json!({"items": [{"payload": {"a": 1}}, {"payload": {"a": 2}, "priority": 1}]})),
    )
    .await?
    .json()
    .await?;
    assert_eq!(pushed.as_array().map(|a| a.len()), Some(2));
    let first: Value = send(Method::POST, "/api/v1/workitemqueues/q/pop?wait=1", None)
        .await?
        .json()
        .await?;
    assert_eq!(first["payload"], json!({"a": 2}), "priority 1 first");
    let id = first["_id"].as_str().unwrap_or_default().to_owned();
    let bad = send(
        Method::PUT,
        &format!("/api/v1/workitems/{id}"),
        Some(json!({"state": "done"})),
    )
    .await?;
    assert_eq!(bad.status(), 400);
    let bad = send(
        Method::PUT,
        &format!("/api/v1/workitems/{id}"),
        Some(json!({"state": "failed", "errortype": "cosmic"})),
    )
    .await?;
    assert_eq!(bad.status(), 400);
    let ok: Value = send(
        Method::PUT,
        &format!("/api/v1/workitems/{id}"),
        Some(json!({"state": "successful"})),
    )
    .await?
    .json()
    .await?;
    assert_eq!(ok["state"], "successful");
    let routed: Value = send(Method::POST, "/api/v1/workitemqueues/out/pop", None)
        .await?
        .json()
        .await?;
    assert_eq!(routed["payload"], json!({"a": 2}));
    assert_eq!(
        send(Method::POST, "/api/v1/workitemqueues/q/pop?wait=999", None)
            .await?
            .status(),
        400
    );
    let versions = s.versions("workitems", &id).await?;
    assert_eq!(versions.as_array().map(|v| v.len()), Some(3), "push, pop, complete");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn updates_many_and_recovery() -> anyhow::Result<()> {
    let (s, _root) = site().await?;
    use reqwest::Method;
    let send = |method: Method, path: &str, body: Value| {
        s.client
            .request(method, s.url(&format!("/api/v1/collections/things{path}")))
            .basic_auth("admin", Some(PASSWORD))
            .json(&body)
            .send()
    };
    let many: Value = send(
        Method::POST,
        "/insertmany",
        json!({"documents": [{"k": 1, "tags": []}, {"k": 2}, {"k": 3}]}),
    )
    .await?
    .json()
    .await?;
    let ids: Vec<String> = many
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|d| d["_id"].as_str().map(str::to_owned))
        .collect();
    assert_eq!(ids.len(), 3);
    // All or nothing: a duplicate id refuses the whole batch.
    let dup = send(
        Method::POST,
        "/insertmany",
        json!({"documents": [{"k": 9}, {"_id": ids[0]}]}),
    )
    .await?;
    assert_eq!(dup.status(), 409);
    let count: Value = send(Method::POST, "/count", json!({})).await?.json().await?;
    assert_eq!(count["count"], 3);

    let patched: Value = send(
        Method::PATCH,
        &format!("/documents/{}", ids[0]),
        json!({"$inc": {"k": 10}, "$push": {"tags": "hot"}, "$set": {"o.p": true}}),
    )
    .await?
    .json()
    .await?;
    assert_eq!(
        (patched["k"].as_i64(), patched["_version"].as_u64()),
        (Some(11), Some(1))
    );
    assert_eq!(patched["tags"], json!(["hot"]));
    let bad = send(
        Method::PATCH,
        &format!("/documents/{}", ids[0]),
        json!({"$rename": {"k": "j"}}),
    )
    .await?;
    assert_eq!(bad.status(), 400);
    assert!(bad.text().await?.contains("$rename"));

    let r: Value = send(
        Method::POST,
        "/updatemany",
        json!({"filter": {"k": {"$lt": 5}}, "update": {"$set": {"small": true}}}),
    )
    .await?
    .json()
    .await?;
    assert_eq!(r["modified"], 2);

    let up: Value = send(
        Method::POST,
        "/insertorupdate",
        json!({"document": {"name": "x", "v": 1}, "uniqeness": "name"}),
    )
    .await?
    .json()
    .await?;
    let up2: Value = send(
        Method::POST,
        "/insertorupdate",
        json!({"document": {"name": "x", "v": 2}, "uniqueness": ["name"]}),
    )
    .await?
    .json()
    .await?;
    assert_eq!(
        (up2["_id"].clone(), up2["v"].clone(), up2["_version"].clone()),
        (up["_id"].clone(), json!(2), json!(1))
    );

    let r: Value = send(Method::POST, "/deletemany", json!({"filter": {"small": true}}))
        .await?
        .json()
        .await?;
    assert_eq!(r["deleted"], 2);
    let recovered = send(Method::POST, &format!("/documents/{}/recover", ids[1]), json!({})).await?;
    assert_eq!(recovered.status(), 201);
    let recovered: Value = recovered.json().await?;
    assert_eq!(
        (recovered["k"].as_i64(), recovered["_version"].as_u64()),
        (Some(2), Some(3)),
        "{recovered}"
    );
    assert_eq!(s.doc("things", &ids[1]).await?, Some(recovered));
    let again = send(Method::POST, &format!("/documents/{}/recover", ids[1]), json!({})).await?;
    assert_eq!(again.status(), 409, "a live document has nothing to recover");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn files_stream_in_and_out_and_stay_while_referenced() -> anyhow::Result<()> {
    let root = tempfile::tempdir()?;
    let mut s = Site::single_with(root.path(), "files", &["--max-file-bytes", "2000000"]);
    s.start().await?;
    let c = &s.client;
    // 1 MiB + 17 bytes: four full chunks and a tail.
    let content: Vec<u8> = (0..(1 << 20) + 17)
        .map(|i: u32| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    let up = c
        .post(s.url("/api/v1/files?filename=data.bin&contentType=application/x-test"))
        .basic_auth("admin", Some(PASSWORD))
        .body(content.clone())
        .send()
        .await?;
    assert_eq!(up.status(), 201);
    let meta: Value = up.json().await?;
    assert_eq!(meta["length"], content.len() as u64);
    assert_eq!(meta["chunks"].as_array().map(|a| a.len()), Some(5));
    let id = meta["_id"].as_str().unwrap_or_default().to_owned();
    let down = c
        .get(s.url(&format!("/api/v1/files/{id}")))
        .basic_auth("admin", Some(PASSWORD))
        .send()
        .await?;
    assert_eq!(down.status(), 200);
    assert_eq!(down.headers()["content-type"], "application/x-test");
    assert_eq!(down.bytes().await?.as_ref(), content.as_slice());

    // Same content again: same chunk hashes (stored once).
    let again: Value = c
        .post(s.url("/api/v1/files?filename=copy.bin"))
        .basic_auth("admin", Some(PASSWORD))
        .body(content.clone())
        .send()
        .await?
        .json()
        .await?;
    assert_eq!(again["chunks"], meta["chunks"]);

    // Over the limit: 413, and no file document appears.
    let before: Value = c
        .post(s.url("/api/v1/collections/fs.files/count"))
        .basic_auth("admin", Some(PASSWORD))
        .json(&json!({}))
        .send()
        .await?
        .json()
        .await?;
    let big = c
        .post(s.url("/api/v1/files?filename=big.bin"))
        .basic_auth("admin", Some(PASSWORD))
        .body(vec![7u8; 2_100_000])
        .send()
        .await?;
    assert_eq!(big.status(), 413);
    let after: Value = c
        .post(s.url("/api/v1/collections/fs.files/count"))
        .basic_auth("admin", Some(PASSWORD))
        .json(&json!({}))
        .send()
        .await?
        .json()
        .await?;
    assert_eq!(before, after);

    // A file attached to a work item cannot be deleted.
    c.post(s.url("/api/v1/workitemqueues"))
        .basic_auth("admin", Some(PASSWORD))
        .json(&json!({"name": "q"}))
        .send()
        .await?;
    let item: Value = c
        .post(s.url("/api/v1/workitemqueues/q/workitems"))
        .basic_auth("admin", Some(PASSWORD))
        .json(&json!({"payload": {}, "files": [{"_id": id, "filename": "data.bin"}]}))
        .send()
        .await?
        .json()
        .await?;
    let del = c
        .delete(s.url(&format!("/api/v1/files/{id}")))
        .basic_auth("admin", Some(PASSWORD))
        .send()
        .await?;
    assert_eq!(del.status(), 409);
    let item_id = item[0]["_id"].as_str().unwrap_or_default().to_owned();
    c.delete(s.url(&format!("/api/v1/workitems/{item_id}")))
        .basic_auth("admin", Some(PASSWORD))
        .send()
        .await?;
    let del = c
        .delete(s.url(&format!("/api/v1/files/{id}")))
        .basic_auth("admin", Some(PASSWORD))
        .send()
        .await?;
    assert_eq!(del.status(), 200);
    let gone = c
        .get(s.url(&format!("/api/v1/files/{id}")))
        .basic_auth("admin", Some(PASSWORD))
        .send()
        .await?;
    assert_eq!(gone.status(), 404);
    Ok(())
}

/// `--mongodb` pointing at nothing: the process exits at once with an
/// error naming the server, and writes no data directory.
#[test]
fn an_unreachable_mongodb_is_a_clear_startup_error() -> anyhow::Result<()> {
    let root = tempfile::tempdir()?;
    let data = root.path().join("data");
    let mut cmd = Command::new(bin());
    hermetic(&mut cmd);
    let out = cmd
        .args([
            "run",
            "--http",
            &free_tcp().to_string(),
            "--grpc",
            &free_tcp().to_string(),
        ])
        .arg("--data")
        .arg(&data)
        .args(["--mongodb", "mongodb://127.0.0.1:1/?serverSelectionTimeoutMS=300"])
        .output()?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    if cfg!(feature = "mongodb") {
        assert!(stderr.contains("MongoDB at 127.0.0.1:1 did not answer"), "{stderr}");
    } else {
        assert!(stderr.contains("needs a build with the mongodb feature"), "{stderr}");
    }
    assert!(!data.exists(), "nothing written locally");
    Ok(())
}
