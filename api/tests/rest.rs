//! The REST API driven in-process through `tower::ServiceExt::oneshot`:
//! who may call (none, wrong, Basic, bearer, garbage, expired, forged
//! tokens), a document's whole life including its history after delete,
//! every kind of bad input with its status and JSON error, unknown routes,
//! the peers endpoint, and `serve`'s graceful shutdown.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::Router;
use axum::body::{Body, Bytes};
use axum::http::{HeaderMap, HeaderValue, Method, Request, StatusCode, header};
use base64::Engine;
use http_body_util::BodyExt;
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde_json::{Value, json};
use tower::ServiceExt;

use ocmesh_federation::{PeerStatus, PeerTable};
use ocmesh_node::{Node, NodeConfig};

const PASSWORD: &str = "pw";
const DOCS: &str = "/api/v1/collections/things/documents";
/// The request body limit the API promises.
const LIMIT: usize = 16 * 1024 * 1024;

struct Site {
    app: Router,
    node: Node,
    _dir: tempfile::TempDir,
}

struct Reply {
    status: StatusCode,
    headers: HeaderMap,
    body: Value,
}

fn site_with(peers: Option<PeerTable>) -> Site {
    let dir = tempfile::tempdir().expect("tempdir");
    let opened = Node::open(NodeConfig {
        data_dir: dir.path().to_path_buf(),
        site: "a".into(),
        admin_password: Some(PASSWORD.into()),
    })
    .expect("open node");
    Site {
        app: ocmesh_api::router(opened.node.clone(), peers),
        node: opened.node,
        _dir: dir,
    }
}

fn site() -> Site {
    site_with(None)
}

fn basic(user: &str, password: &str) -> String {
    let creds = base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}"));
    format!("Basic {creds}")
}

fn admin() -> String {
    basic("admin", PASSWORD)
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock after 1970")
        .as_secs()
}

/// A token over arbitrary claims, as anyone holding `secret` could make it.
fn forge(alg: Algorithm, secret: &[u8], claims: &Value) -> String {
    jsonwebtoken::encode(&Header::new(alg), claims, &EncodingKey::from_secret(secret)).expect("encode token")
}

impl Site {
    async fn send(&self, req: Request<Body>) -> Reply {
        let resp = self.app.clone().oneshot(req).await.expect("router is infallible");
        let status = resp.status();
        let headers = resp.headers().clone();
        let bytes = resp.into_body().collect().await.expect("read body").to_bytes();
        let body = if bytes.is_empty() {
            Value::Null
        } else {
            serde_json::from_slice(&bytes).unwrap_or_else(|e| {
                panic!(
                    "{status}: body is not JSON ({e}): {:?}",
                    String::from_utf8_lossy(&bytes)
                )
            })
        };
        Reply { status, headers, body }
    }

    /// A request with a raw body and optional `Authorization`.
    async fn raw(&self, method: Method, uri: &str, auth: Option<&str>, body: impl Into<Body>) -> Reply {
        let mut req = Request::builder()
            .method(method)
            .uri(uri)
            .header(header::CONTENT_TYPE, "application/json");
        if let Some(a) = auth {
            req = req.header(header::AUTHORIZATION, a);
        }
        self.send(req.body(body.into()).expect("request")).await
    }

    /// A request with a JSON body (or none).
    async fn call(&self, method: Method, uri: &str, auth: Option<&str>, body: Option<Value>) -> Reply {
        let bytes = match body {
            Some(v) => serde_json::to_vec(&v).expect("encode body"),
            None => Vec::new(),
        };
        self.raw(method, uri, auth, bytes).await
    }

    /// A request as the admin, with HTTP Basic.
    async fn admin(&self, method: Method, uri: &str, body: Option<Value>) -> Reply {
        self.call(method, uri, Some(&admin()), body).await
    }

    async fn signin(&self, username: &str, password: &str) -> Reply {
        self.call(
            Method::POST,
            "/api/v1/signin",
            None,
            Some(json!({"username": username, "password": password})),
        )
        .await
    }
}

/// A failure: the status, the short code, a non-empty detail.
#[track_caller]
fn assert_error(r: &Reply, status: StatusCode, code: &str) {
    assert_eq!(r.status, status, "body: {}", r.body);
    assert_eq!(r.body["error"], code, "body: {}", r.body);
    assert!(
        r.body["detail"].as_str().is_some_and(|d| !d.is_empty()),
        "no detail in {}",
        r.body
    );
}

#[track_caller]
fn assert_unauthorized(r: &Reply) {
    assert_error(r, StatusCode::UNAUTHORIZED, "unauthorized");
    assert_eq!(
        r.headers.get(header::WWW_AUTHENTICATE),
        Some(&HeaderValue::from_static("Basic realm=\"ocmesh\"")),
        "401 without a Basic challenge"
    );
}

#[track_caller]
fn detail(r: &Reply) -> &str {
    r.body["detail"].as_str().unwrap_or_default()
}

#[tokio::test]
async fn health_needs_no_caller() {
    let s = site();
    let r = s.call(Method::GET, "/health", None, None).await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(r.body, json!({"status": "ok", "site": "a"}));
}

#[tokio::test]
async fn signin_issues_a_token_for_this_site() {
    let s = site();
    let r = s.signin("admin", PASSWORD).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    let user = &r.body["user"];
    assert_eq!(user["name"], "admin");
    assert_eq!(user["username"], "admin");
    let id = user["_id"].as_str().expect("user _id");
    assert_eq!(id.len(), 24);

    let jwt = r.body["jwt"].as_str().expect("jwt");
    let mut v = Validation::new(Algorithm::HS256);
    v.set_issuer(&["a"]);
    let claims = jsonwebtoken::decode::<Value>(jwt, &DecodingKey::from_secret(s.node.token_secret()), &v)
        .expect("token verifies with the node's secret")
        .claims;
    assert_eq!(claims["sub"], id);
    assert_eq!(claims["name"], "admin");
    assert_eq!(claims["iss"], "a");
    let (iat, exp) = (
        claims["iat"].as_u64().expect("iat"),
        claims["exp"].as_u64().expect("exp"),
    );
    assert_eq!(exp - iat, 24 * 3600);
    assert!(iat.abs_diff(unix_now()) < 60);

    assert_unauthorized(&s.signin("admin", "wrong").await);
    assert_unauthorized(&s.signin("nobody", PASSWORD).await);
    let r = s
        .call(Method::POST, "/api/v1/signin", None, Some(json!({"username": "admin"})))
        .await;
    assert_error(&r, StatusCode::BAD_REQUEST, "bad_request");
    assert!(detail(&r).contains("password"), "{}", r.body);
    let r = s.raw(Method::POST, "/api/v1/signin", None, "{\"username\":").await;
    assert_error(&r, StatusCode::BAD_REQUEST, "bad_request");
}

#[tokio::test]
async fn a_deleted_user_loses_its_tokens_and_its_password() {
    let s = site();
    let r = s
        .admin(
            Method::POST,
            "/api/v1/users",
            Some(json!({"username": "robot", "password": "robot-pw"})),
        )
        .await;
    assert_eq!(r.status, StatusCode::CREATED, "{}", r.body);
    let id = r.body["_id"].as_str().expect("user _id").to_owned();
    let jwt = s.signin("robot", "robot-pw").await.body["jwt"]
        .as_str()
        .expect("jwt")
        .to_owned();
    let bearer = format!("Bearer {jwt}");
    let url = "/api/v1/conflicts";
    assert_eq!(
        s.call(Method::GET, url, Some(&bearer), None).await.status,
        StatusCode::OK
    );
    assert_eq!(
        s.call(Method::GET, url, Some(&basic("robot", "robot-pw")), None)
            .await
            .status,
        StatusCode::OK
    );

    let r = s
        .admin(
            Method::DELETE,
            &format!("/api/v1/collections/users/documents/{id}"),
            None,
        )
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    let r = s.call(Method::GET, url, Some(&bearer), None).await;
    assert_unauthorized(&r);
    assert!(detail(&r).contains("no longer exists"), "{}", r.body);
    assert_unauthorized(&s.call(Method::GET, url, Some(&basic("robot", "robot-pw")), None).await);
    assert_unauthorized(&s.signin("robot", "robot-pw").await);
}

#[tokio::test]
async fn authentication() {
    let s = site();
    let url = "/api/v1/mesh/peers";
    let secret = s.node.token_secret().to_vec();
    let now = unix_now();
    let id = s.signin("admin", PASSWORD).await.body["user"]["_id"]
        .as_str()
        .expect("user _id")
        .to_owned();
    let claims =
        |iss: &str, iat: u64, exp: u64| json!({"sub": id, "name": "admin", "iss": iss, "iat": iat, "exp": exp});

    let refused = [
        ("no header", None),
        ("wrong password", Some(basic("admin", "wrong"))),
        ("unknown user", Some(basic("nobody", PASSWORD))),
        ("empty password", Some(basic("admin", ""))),
        ("Basic not base64", Some("Basic !!!not-base64".into())),
        (
            "Basic without a colon",
            Some(format!(
                "Basic {}",
                base64::engine::general_purpose::STANDARD.encode("adminpw")
            )),
        ),
        ("Basic with nothing", Some("Basic".into())),
        ("garbage bearer", Some("Bearer garbage".into())),
        ("three-part garbage bearer", Some("Bearer a.b.c".into())),
        ("empty bearer", Some("Bearer ".into())),
        (
            "expired bearer",
            Some(format!(
                "Bearer {}",
                forge(Algorithm::HS256, &secret, &claims("a", now - 7200, now - 3600))
            )),
        ),
        (
            "bearer from another site",
            Some(format!(
                "Bearer {}",
                forge(Algorithm::HS256, &secret, &claims("b", now, now + 3600))
            )),
        ),
        (
            "bearer with another secret",
            Some(format!(
                "Bearer {}",
                forge(Algorithm::HS256, b"not the secret", &claims("a", now, now + 3600))
            )),
        ),
        (
            "bearer with another algorithm",
            Some(format!(
                "Bearer {}",
                forge(Algorithm::HS512, &secret, &claims("a", now, now + 3600))
            )),
        ),
        (
            "bearer without expiry",
            Some(format!(
                "Bearer {}",
                forge(
                    Algorithm::HS256,
                    &secret,
                    &json!({"sub": id, "name": "admin", "iss": "a", "iat": now})
                )
            )),
        ),
        ("unsupported scheme", Some("Digest username=\"admin\"".into())),
    ];
    for (case, auth) in refused {
        let r = s.call(Method::GET, url, auth.as_deref(), None).await;
        assert_eq!(r.status, StatusCode::UNAUTHORIZED, "{case}: {}", r.body);
        assert_unauthorized(&r);
    }

    // A header that is not visible ASCII.
    let req = Request::builder()
        .uri(url)
        .header(
            header::AUTHORIZATION,
            HeaderValue::from_bytes(b"Basic \xff\xfe").expect("obs-text header"),
        )
        .body(Body::empty())
        .expect("request");
    assert_unauthorized(&s.send(req).await);

    // Basic, twice (the second check hits the node's cache).
    for _ in 0..2 {
        let r = s.admin(Method::GET, url, None).await;
        assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    }

    // The token from sign-in, and one made by hand with the same secret.
    let jwt = s.signin("admin", PASSWORD).await.body["jwt"]
        .as_str()
        .expect("jwt")
        .to_owned();
    let forged_ok = forge(Algorithm::HS256, &secret, &claims("a", now, now + 600));
    for auth in [
        format!("Bearer {jwt}"),
        format!("bearer {jwt}"),
        format!("Bearer {forged_ok}"),
    ] {
        let r = s.call(Method::GET, url, Some(&auth), None).await;
        assert_eq!(r.status, StatusCode::OK, "{auth}: {}", r.body);
    }

    // The bearer's claims are who writes.
    let r = s
        .call(
            Method::POST,
            DOCS,
            Some(&format!("Bearer {jwt}")),
            Some(json!({"by": "token"})),
        )
        .await;
    assert_eq!(r.status, StatusCode::CREATED, "{}", r.body);
    assert_eq!(r.body["_createdbyid"], id.as_str());
    assert_eq!(r.body["_createdby"], "admin");

    // Writes need a caller too, and a refused one writes nothing.
    let r = s.call(Method::POST, DOCS, None, Some(json!({"x": 1}))).await;
    assert_unauthorized(&r);
    let r = s
        .call(
            Method::GET,
            &format!("{DOCS}/{}/versions", "0".repeat(24)),
            Some("Bearer garbage"),
            None,
        )
        .await;
    assert_unauthorized(&r);
}

#[tokio::test]
async fn document_lifecycle() {
    let s = site();

    let r = s
        .admin(Method::POST, DOCS, Some(json!({"name": "first", "n": 1})))
        .await;
    assert_eq!(r.status, StatusCode::CREATED, "{}", r.body);
    let created = r.body;
    let id = created["_id"].as_str().expect("_id assigned").to_owned();
    assert!(id.len() == 24 && id.bytes().all(|b| b.is_ascii_hexdigit()), "{id}");
    assert_eq!(created["name"], "first");
    assert_eq!(created["_version"], 0);
    assert_eq!(created["_createdby"], "admin");
    let doc_url = format!("{DOCS}/{id}");

    let r = s.admin(Method::GET, &doc_url, None).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    assert_eq!(r.body, created);

    // Whole-document replace: `n` goes, creation fields stay.
    let r = s.admin(Method::PUT, &doc_url, Some(json!({"name": "second"}))).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    assert_eq!(r.body["name"], "second");
    assert!(r.body.get("n").is_none(), "replace kept an old field: {}", r.body);
    assert_eq!(r.body["_id"], id.as_str());
    assert_eq!(r.body["_version"], 1);
    assert_eq!(r.body["_created"], created["_created"]);

    // A body that repeats the path's id is fine.
    let r = s
        .admin(Method::PUT, &doc_url, Some(json!({"_id": id, "name": "third"})))
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    assert_eq!(r.body["_version"], 2);
    let r = s.admin(Method::GET, &doc_url, None).await;
    assert_eq!(r.body["name"], "third");

    let r = s.admin(Method::DELETE, &doc_url, None).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    assert_eq!(r.body["_id"], id.as_str());
    assert_eq!(r.body["_version"], 3);
    assert!(r.body["_deleted"].is_string(), "delete version: {}", r.body);

    assert_error(
        &s.admin(Method::GET, &doc_url, None).await,
        StatusCode::NOT_FOUND,
        "not_found",
    );
    assert_error(
        &s.admin(Method::DELETE, &doc_url, None).await,
        StatusCode::NOT_FOUND,
        "not_found",
    );
    assert_error(
        &s.admin(Method::PUT, &doc_url, Some(json!({"name": "ghost"}))).await,
        StatusCode::NOT_FOUND,
        "not_found",
    );

    // History survives the delete.
    let r = s.admin(Method::GET, &format!("{doc_url}/versions"), None).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    let versions = r.body.as_array().expect("versions array");
    assert_eq!(versions.len(), 4);
    for (i, v) in versions.iter().enumerate() {
        assert_eq!(v["_version"], i, "{v}");
        assert_eq!(v["_id"], id.as_str());
    }
    assert_eq!(versions[0]["name"], "first");
    assert_eq!(versions[0]["n"], 1);
    assert_eq!(versions[1]["name"], "second");
    assert_eq!(versions[2]["name"], "third");
    assert!(versions[3]["_deleted"].is_string());

    for (n, name) in [(0, "first"), (2, "third")] {
        let r = s.admin(Method::GET, &format!("{doc_url}/versions/{n}"), None).await;
        assert_eq!(r.status, StatusCode::OK, "{}", r.body);
        assert_eq!(r.body["name"], name);
        assert_eq!(r.body["_version"], n);
    }
    let r = s.admin(Method::GET, &format!("{doc_url}/versions/3"), None).await;
    assert!(r.body["_deleted"].is_string(), "{}", r.body);
    let r = s.admin(Method::GET, &format!("{doc_url}/versions/4"), None).await;
    assert_error(&r, StatusCode::NOT_FOUND, "not_found");
    assert!(detail(&r).contains("no version 4"), "{}", r.body);

    // A caller-chosen id; reusing a deleted one starts on top of its history.
    let mine = "0123456789abcdef01234567";
    let r = s.admin(Method::POST, DOCS, Some(json!({"_id": mine, "k": true}))).await;
    assert_eq!(r.status, StatusCode::CREATED, "{}", r.body);
    assert_eq!(r.body["_id"], mine);
    let r = s.admin(Method::GET, &format!("{DOCS}/{mine}"), None).await;
    assert_eq!(r.body["k"], true);
}

#[tokio::test]
async fn bad_input() {
    let s = site();
    let a = admin();
    let auth = Some(a.as_str());
    let r = s.admin(Method::POST, DOCS, Some(json!({"x": 1}))).await;
    let id = r.body["_id"].as_str().expect("_id").to_owned();
    let doc_url = format!("{DOCS}/{id}");
    let missing = format!("{DOCS}/{}", "f".repeat(24));

    // Bodies that are not JSON: serde's message, with its position.
    for (method, url) in [(Method::POST, DOCS), (Method::PUT, doc_url.as_str())] {
        for body in ["{\"a\":", "{'a': 1}", "not json", "{\"a\": 1} trailing"] {
            let r = s.raw(method.clone(), url, auth, body).await;
            assert_error(&r, StatusCode::BAD_REQUEST, "bad_request");
            assert!(detail(&r).contains("line 1 column"), "{body}: {}", r.body);
        }
        let r = s.raw(method.clone(), url, auth, "").await;
        assert_error(&r, StatusCode::BAD_REQUEST, "bad_request");
        assert!(detail(&r).contains("EOF"), "{}", r.body);
        let r = s.raw(method.clone(), url, auth, vec![0xff, 0xfe]).await;
        assert_error(&r, StatusCode::BAD_REQUEST, "bad_request");

        // JSON, but not an object.
        for body in ["[1, 2]", "\"text\"", "42", "null", "true"] {
            let r = s.raw(method.clone(), url, auth, body).await;
            assert_error(&r, StatusCode::BAD_REQUEST, "bad_request");
            assert!(
                detail(&r).contains("document must be a JSON object"),
                "{body}: {}",
                r.body
            );
        }
    }

    // Names the node refuses.
    for collection in ["system.users", "bad$name", ".hidden"] {
        let r = s
            .admin(
                Method::POST,
                &format!("/api/v1/collections/{collection}/documents"),
                Some(json!({})),
            )
            .await;
        assert_error(&r, StatusCode::BAD_REQUEST, "bad_request");
        assert!(detail(&r).contains("collection name"), "{}", r.body);
    }
    let long = "c".repeat(121);
    let r = s
        .admin(Method::GET, &format!("/api/v1/collections/{long}/documents/{id}"), None)
        .await;
    assert_error(&r, StatusCode::BAD_REQUEST, "bad_request");
    for bad_id in ["not-an-id", "0123", "zzzzzzzzzzzzzzzzzzzzzzzz"] {
        for (method, suffix) in [(Method::GET, ""), (Method::DELETE, ""), (Method::GET, "/versions")] {
            let r = s.admin(method, &format!("{DOCS}/{bad_id}{suffix}"), None).await;
            assert_error(&r, StatusCode::BAD_REQUEST, "bad_request");
            assert!(detail(&r).contains("ObjectId"), "{}", r.body);
        }
        let r = s.admin(Method::GET, &format!("{DOCS}/{bad_id}/versions/0"), None).await;
        assert_error(&r, StatusCode::BAD_REQUEST, "bad_request");
        let r = s.admin(Method::PUT, &format!("{DOCS}/{bad_id}"), Some(json!({}))).await;
        assert_error(&r, StatusCode::BAD_REQUEST, "bad_request");
    }
    // A path segment that is not UTF-8 once decoded.
    let r = s
        .admin(Method::GET, &format!("/api/v1/collections/%FF/documents/{id}"), None)
        .await;
    assert_error(&r, StatusCode::BAD_REQUEST, "bad_request");
    assert!(detail(&r).contains("UTF-8"), "{}", r.body);

    // `_id` in a body.
    for bad in [json!(5), json!({"$oid": "x"}), json!(["a"]), json!(true)] {
        let r = s.admin(Method::POST, DOCS, Some(json!({"_id": bad}))).await;
        assert_error(&r, StatusCode::BAD_REQUEST, "bad_request");
        assert!(detail(&r).contains("must be a string"), "{}", r.body);
    }
    let r = s.admin(Method::POST, DOCS, Some(json!({"_id": "short"}))).await;
    assert_error(&r, StatusCode::BAD_REQUEST, "bad_request");
    let r = s
        .admin(Method::PUT, &doc_url, Some(json!({"_id": "f".repeat(24)})))
        .await;
    assert_error(&r, StatusCode::BAD_REQUEST, "bad_request");
    assert!(detail(&r).contains("differs"), "{}", r.body);
    let r = s.admin(Method::PUT, &doc_url, Some(json!({"_id": 7}))).await;
    assert_error(&r, StatusCode::BAD_REQUEST, "bad_request");

    // Conflicts and absences.
    let r = s.admin(Method::POST, DOCS, Some(json!({"_id": id}))).await;
    assert_error(&r, StatusCode::CONFLICT, "conflict");
    assert!(detail(&r).contains("already exists"), "{}", r.body);
    for (method, suffix) in [
        (Method::GET, ""),
        (Method::DELETE, ""),
        (Method::GET, "/versions"),
        (Method::GET, "/versions/0"),
    ] {
        let r = s.admin(method, &format!("{missing}{suffix}"), None).await;
        assert_error(&r, StatusCode::NOT_FOUND, "not_found");
    }
    let r = s.admin(Method::PUT, &missing, Some(json!({}))).await;
    assert_error(&r, StatusCode::NOT_FOUND, "not_found");

    // Version numbers.
    for n in ["-1", "abc", "1.5", "+1", "1e3", "%201", "99999999999999999999999"] {
        let r = s.admin(Method::GET, &format!("{doc_url}/versions/{n}"), None).await;
        assert_error(&r, StatusCode::BAD_REQUEST, "bad_request");
        assert!(detail(&r).contains("non-negative integer"), "{n}: {}", r.body);
    }
    let r = s.admin(Method::GET, &format!("{doc_url}/versions/00"), None).await;
    assert_eq!(r.status, StatusCode::OK, "leading zeros are still a number: {}", r.body);

    // A query string that does not parse.
    let r = s
        .admin(Method::POST, "/api/v1/workitemqueues/q/pop?wait=soon", None)
        .await;
    assert_error(&r, StatusCode::BAD_REQUEST, "bad_request");

    // A method a route does not have.
    let r = s.admin(Method::PATCH, DOCS, Some(json!({}))).await;
    assert_error(&r, StatusCode::METHOD_NOT_ALLOWED, "method_not_allowed");
    assert!(r.headers.contains_key(header::ALLOW), "405 names the allowed methods");
}

#[tokio::test]
async fn body_over_the_limit() {
    let s = site();
    let a = admin();

    // Within the limit with room for the node's fields: stored.
    let filler = "x".repeat(LIMIT - 4096);
    let body = serde_json::to_vec(&json!({ "big": filler })).expect("encode");
    let r = s.raw(Method::POST, DOCS, Some(&a), body).await;
    assert_eq!(r.status, StatusCode::CREATED, "{}", r.body["error"]);

    // Within the request limit, but the stored document (with `_id`,
    // `_acl`, `_created`, ...) would be over what peers accept: refused,
    // or it would be written here and refused by every peer.
    let filler = "x".repeat(LIMIT - 64);
    let body = serde_json::to_vec(&json!({ "big": filler })).expect("encode");
    assert!(body.len() <= LIMIT);
    let r = s.raw(Method::POST, DOCS, Some(&a), body).await;
    assert_error(&r, StatusCode::PAYLOAD_TOO_LARGE, "payload_too_large");
    assert!(
        r.body["detail"].as_str().is_some_and(|d| d.contains("bytes of JSON")),
        "{}",
        r.body
    );

    // One byte over, with a length up front.
    let mut over = b"{\"big\": \"".to_vec();
    over.resize(LIMIT - 1, b'x');
    over.extend_from_slice(b"\"}");
    assert_eq!(over.len(), LIMIT + 1);
    let r = s.raw(Method::POST, DOCS, Some(&a), over.clone()).await;
    assert_error(&r, StatusCode::PAYLOAD_TOO_LARGE, "payload_too_large");

    // And streamed without a length.
    let chunks: Vec<Result<Bytes, std::io::Error>> =
        over.chunks(1 << 20).map(|c| Ok(Bytes::copy_from_slice(c))).collect();
    let r = s
        .raw(
            Method::POST,
            DOCS,
            Some(&a),
            Body::from_stream(futures_util::stream::iter(chunks)),
        )
        .await;
    assert_error(&r, StatusCode::PAYLOAD_TOO_LARGE, "payload_too_large");

    // PUT has the same limit.
    let id = "0123456789abcdef01234567";
    let r = s.raw(Method::PUT, &format!("{DOCS}/{id}"), Some(&a), over).await;
    assert_error(&r, StatusCode::PAYLOAD_TOO_LARGE, "payload_too_large");
}

#[tokio::test]
async fn unknown_routes_are_json_404s() {
    let s = site();
    let auth = admin();
    for (method, url) in [
        (Method::GET, "/"),
        (Method::GET, "/nope"),
        (Method::GET, "/api/v1"),
        (Method::GET, "/api/v2/collections/things/documents"),
        (Method::GET, "/api/v1/collections/things"),
        (
            Method::GET,
            "/api/v1/collections/things/documents/0123456789abcdef01234567/extra",
        ),
        (Method::POST, "/api/v1/collections/things/documents/"),
        (Method::GET, "/health/"),
    ] {
        for a in [None, Some(auth.as_str())] {
            let r = s.call(method.clone(), url, a, None).await;
            assert_error(&r, StatusCode::NOT_FOUND, "not_found");
        }
    }
}

#[tokio::test]
async fn peers_without_a_mesh_is_an_empty_list() {
    let s = site();
    let r = s.admin(Method::GET, "/api/v1/mesh/peers", None).await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(r.body, json!([]));
}

#[tokio::test]
async fn peers_show_the_table() {
    let peers = PeerTable::default();
    let status = PeerStatus {
        site: Some("b".into()),
        address: "10.0.0.2:7443".into(),
        direction: "outbound",
        connected: true,
        unacked: 3,
        changes_sent: 10,
        changes_received: 7,
        changes_withheld: 2,
        wire_bytes_sent: 4096,
        last_error: None,
        ..PeerStatus::default()
    };
    let init = status.clone();
    peers.update("b", move || init, |_| {});
    let s = site_with(Some(peers.clone()));

    assert_unauthorized(&s.call(Method::GET, "/api/v1/mesh/peers", None, None).await);
    let r = s.admin(Method::GET, "/api/v1/mesh/peers", None).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    assert_eq!(r.body, json!([serde_json::to_value(&status).expect("encode status")]));
    assert_eq!(r.body[0]["site"], "b");
    assert_eq!(r.body[0]["direction"], "outbound");
    assert_eq!(r.body[0]["unacked"], 3);
    assert_eq!(r.body[0]["last_error"], Value::Null);

    // The endpoint reads the live table.
    peers.update("b", unreachable_status, |p| {
        p.connected = false;
        p.last_error = Some("connection lost".into());
    });
    let r = s.admin(Method::GET, "/api/v1/mesh/peers", None).await;
    assert_eq!(r.body[0]["connected"], false);
    assert_eq!(r.body[0]["last_error"], "connection lost");
}

fn unreachable_status() -> PeerStatus {
    PeerStatus {
        site: None,
        address: String::new(),
        direction: "outbound",
        connected: false,
        last_error: Some("the slot should already exist".into()),
        ..PeerStatus::default()
    }
}

#[tokio::test]
async fn serve_answers_then_shuts_down_gracefully() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    let s = site();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("local addr");
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(ocmesh_api::serve(listener, s.app.clone(), async {
        let _ = stopped.await;
    }));

    let mut conn = tokio::net::TcpStream::connect(addr).await.expect("connect");
    conn.write_all(b"GET /health HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
        .await
        .expect("send request");
    let mut reply = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), conn.read_to_end(&mut reply))
        .await
        .expect("reply in time")
        .expect("read reply");
    let reply = String::from_utf8_lossy(&reply);
    assert!(reply.starts_with("HTTP/1.1 200"), "{reply}");
    assert!(reply.contains(r#""site":"a""#), "{reply}");

    stop.send(()).expect("server still running");
    tokio::time::timeout(Duration::from_secs(10), server)
        .await
        .expect("server stops in time")
        .expect("server task")
        .expect("serve returns Ok");
    assert!(
        tokio::net::TcpStream::connect(addr).await.is_err(),
        "listener closed after shutdown"
    );
}

/// Conflicts made by a concurrent edit at another site are listed over
/// REST, for all documents and per document; a missing document is a 404.
#[tokio::test]
async fn conflicts_are_listed() {
    let s = site();
    let r = s.admin(Method::POST, DOCS, Some(json!({"x": 0}))).await;
    assert_eq!(r.status, StatusCode::CREATED, "{}", r.body);
    let id = r.body["_id"].as_str().expect("id").to_owned();
    let doc_url = format!("{DOCS}/{id}");
    let r = s.admin(Method::GET, &format!("{doc_url}/conflicts"), None).await;
    assert_eq!((r.status, r.body.clone()), (StatusCode::OK, json!([])));

    // Site b gets the document, edits x; site a edits x too, unaware.
    let dir = tempfile::tempdir().expect("tempdir");
    let b = Node::open(NodeConfig {
        data_dir: dir.path().to_path_buf(),
        site: "b".into(),
        admin_password: Some(PASSWORD.into()),
    })
    .expect("open b")
    .node;
    let everything = ocmesh_replication::FetchRequest {
        after: ocmesh_replication::VersionVector::new(),
        max_changes: usize::MAX,
        max_bytes: usize::MAX,
    };
    b.apply(s.node.read_changes(&everything).expect("read a"))
        .await
        .expect("apply at b");
    let r = s
        .admin(Method::PATCH, &doc_url, Some(json!({"$set": {"x": "a"}})))
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    let b_admin = ocmesh_node::Principal {
        id: "0".repeat(24),
        name: "admin".into(),
        roles: vec![ocmesh_node::acl::ADMINS_ROLE_ID.into()],
    };
    b.update("things", &id, json!({"$set": {"x": "b"}}), &b_admin)
        .await
        .expect("edit at b");
    let from_b: Vec<_> = b
        .read_changes(&everything)
        .expect("read b")
        .into_iter()
        .filter(|c| c.origin == "b")
        .collect();
    s.node.apply(from_b).await.expect("apply at a");

    for url in [
        "/api/v1/conflicts".to_owned(),
        format!("{doc_url}/conflicts"),
        "/api/v1/conflicts?collection=things".into(),
    ] {
        let r = s.admin(Method::GET, &url, None).await;
        assert_eq!(r.status, StatusCode::OK, "{url}: {}", r.body);
        let list = r.body.as_array().expect("array");
        assert_eq!(list.len(), 1, "{url}: {}", r.body);
        assert_eq!(list[0]["field"], "x");
        assert_eq!(list[0]["_id"], id.as_str());
    }
    let r = s.admin(Method::GET, "/api/v1/conflicts?collection=other", None).await;
    assert_eq!(r.body, json!([]));
    let r = s
        .admin(Method::GET, &format!("{DOCS}/0123456789abcdef01234567/conflicts"), None)
        .await;
    assert_error(&r, StatusCode::NOT_FOUND, "not_found");
}

#[tokio::test]
async fn deleting_a_queue_with_purge_takes_its_items() {
    let s = site();
    let r = s
        .admin(Method::POST, "/api/v1/workitemqueues", Some(json!({"name": "gone"})))
        .await;
    assert!(r.status.is_success(), "{:?}", r.body);
    let mut ids = Vec::new();
    for n in 0..2 {
        let r = s
            .admin(
                Method::POST,
                "/api/v1/workitemqueues/gone/workitems",
                Some(json!({"name": format!("job{n}"), "payload": {}})),
            )
            .await;
        assert!(r.status.is_success(), "{:?}", r.body);
        ids.push(r.body[0]["_id"].as_str().expect("pushed item's id").to_owned());
    }
    let r = s
        .admin(Method::DELETE, "/api/v1/workitemqueues/gone?purge=yes", None)
        .await;
    assert_error(&r, StatusCode::BAD_REQUEST, "bad_request");
    let r = s
        .admin(Method::DELETE, "/api/v1/workitemqueues/gone?purge=true", None)
        .await;
    assert_eq!(r.status, StatusCode::OK, "{:?}", r.body);
    let purged: Vec<&str> = r.body["purged"]
        .as_array()
        .expect("purged items")
        .iter()
        .filter_map(|d| d["_id"].as_str())
        .collect();
    assert_eq!(purged.len(), 2, "{:?}", r.body);
    for id in &ids {
        assert!(purged.contains(&id.as_str()));
        let r = s
            .admin(
                Method::GET,
                &format!("/api/v1/collections/workitems/documents/{id}"),
                None,
            )
            .await;
        assert_eq!(r.status, StatusCode::NOT_FOUND, "{:?}", r.body);
    }
    let r = s.admin(Method::GET, "/api/v1/workitemqueues/gone", None).await;
    assert_eq!(r.status, StatusCode::NOT_FOUND, "{:?}", r.body);
}
