//! The management page at `GET /ui`: served as HTML with a policy that
//! keeps it on this site, every request its script makes reaches a real
//! route of the router (not the fallback) with the method it uses, the
//! queries it sends are accepted and answer what it reads, and it names no
//! external address.

use axum::Router;
use axum::body::Body;
use axum::http::{Method, Request, StatusCode, header};
use http_body_util::BodyExt;
use serde_json::{Value, json};
use tower::ServiceExt;

use ocmesh_node::{Node, NodeConfig};

const PASSWORD: &str = "pw";
const PAGE: &str = ocmesh_api::UI_HTML;

struct Site {
    app: Router,
    _dir: tempfile::TempDir,
}

fn site() -> Site {
    let dir = tempfile::tempdir().expect("tempdir");
    let opened = Node::open(NodeConfig {
        data_dir: dir.path().to_path_buf(),
        site: "a".into(),
        admin_password: Some(PASSWORD.into()),
    })
    .expect("open node");
    Site {
        app: ocmesh_api::router(opened.node, None),
        _dir: dir,
    }
}

struct Reply {
    status: StatusCode,
    content_type: String,
    csp: String,
    text: String,
}

async fn send(app: &Router, method: Method, uri: &str, auth: Option<&str>, body: &Value) -> Reply {
    let mut req = Request::builder()
        .method(method)
        .uri(uri)
        .header(header::CONTENT_TYPE, "application/json");
    if let Some(a) = auth {
        req = req.header(header::AUTHORIZATION, a);
    }
    let body = if body.is_null() {
        Body::empty()
    } else {
        Body::from(body.to_string())
    };
    let resp = app
        .clone()
        .oneshot(req.body(body).expect("request"))
        .await
        .expect("router is infallible");
    let header_text = |name: header::HeaderName| {
        resp.headers()
            .get(name)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_owned()
    };
    let (content_type, csp) = (
        header_text(header::CONTENT_TYPE),
        header_text(header::CONTENT_SECURITY_POLICY),
    );
    let status = resp.status();
    let bytes = resp.into_body().collect().await.expect("body").to_bytes();
    Reply {
        status,
        content_type,
        csp,
        text: String::from_utf8_lossy(&bytes).into_owned(),
    }
}

fn json_of(r: &Reply) -> Value {
    serde_json::from_str(&r.text).unwrap_or(Value::Null)
}

/// Every `call("METHOD", "/path"` in the page's script: the one helper
/// through which it makes requests.
fn calls_in_page() -> Vec<(String, String)> {
    let mut out = Vec::new();
    for chunk in PAGE.split("call(\"").skip(1) {
        let Some((method, rest)) = chunk.split_once('"') else {
            continue;
        };
        if !method.chars().all(|c| c.is_ascii_uppercase()) {
            continue;
        }
        let rest = rest.trim_start_matches([',', ' ']);
        let path = rest
            .strip_prefix('"')
            .and_then(|r| r.split_once('"'))
            .map(|(p, _)| p.to_owned())
            .unwrap_or_else(|| panic!("call(\"{method}\", ...) without a literal path: {rest:.60}"));
        out.push((method.to_owned(), path));
    }
    out
}

#[tokio::test]
async fn the_page_is_html_and_public() {
    let s = site();
    let r = send(&s.app, Method::GET, "/ui", None, &Value::Null).await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(r.content_type, "text/html; charset=utf-8");
    assert_eq!(r.text, PAGE);
    assert!(r.text.starts_with("<!doctype html>"), "{:.40}", r.text);
    for directive in ["default-src 'none'", "connect-src 'self'"] {
        assert!(r.csp.contains(directive), "policy {:?} lacks {directive}", r.csp);
    }
    // The root is not taken by the page.
    let r = send(&s.app, Method::GET, "/", None, &Value::Null).await;
    assert_eq!(r.status, StatusCode::NOT_FOUND);
}

#[tokio::test]
async fn every_request_of_the_page_reaches_a_route() {
    let calls = calls_in_page();
    let paths: Vec<&str> = calls.iter().map(|(_, p)| p.as_str()).collect();
    for needed in [
        "/health",
        "/api/v1/signin",
        "/api/v1/mesh/peers",
        "/api/v1/metrics",
        "/api/v1/conflicts",
    ] {
        assert!(paths.contains(&needed), "the page does not call {needed}: {calls:?}");
    }
    // Requests go through `call` only: one fetch, inside it, which sends no
    // browser credentials (a 401 with `WWW-Authenticate: Basic` would make
    // the browser prompt for a password instead of answering the script).
    assert_eq!(PAGE.matches("fetch(").count(), 1, "fetch outside call()");
    assert!(
        PAGE.contains("credentials: \"omit\""),
        "fetch without credentials: \"omit\""
    );
    for word in ["XMLHttpRequest", "WebSocket", "EventSource", "import("] {
        assert!(!PAGE.contains(word), "the page uses {word}");
    }
    // Every "/api/..." string in the page is a path it calls.
    for chunk in PAGE.split("\"/api/").skip(1) {
        let path = format!("/api/{}", &chunk[..chunk.find('"').expect("end of string")]);
        assert!(paths.contains(&path.as_str()), "{path} appears but is not called");
    }
    let s = site();
    let auth = format!(
        "Bearer {}",
        json_of(
            &send(
                &s.app,
                Method::POST,
                "/api/v1/signin",
                None,
                &json!({"username": "admin", "password": PASSWORD}),
            )
            .await
        )["jwt"]
            .as_str()
            .expect("sign-in gives a jwt")
    );
    for (method, path) in &calls {
        let m = Method::from_bytes(method.as_bytes()).expect("method");
        let r = send(&s.app, m, path, Some(&auth), &json!({})).await;
        let body = json_of(&r);
        assert!(
            !(r.status == StatusCode::NOT_FOUND && body["detail"] == "no such route"),
            "{method} {path} fell through to the router's fallback"
        );
        assert_ne!(r.status, StatusCode::METHOD_NOT_ALLOWED, "{method} {path}: {}", r.text);
    }
}

#[tokio::test]
async fn the_queries_of_the_page_answer_what_it_reads() {
    let s = site();
    let admin = {
        use base64::Engine;
        let creds = base64::engine::general_purpose::STANDARD.encode(format!("admin:{PASSWORD}"));
        format!("Basic {creds}")
    };
    let auth = Some(admin.as_str());
    let r = send(
        &s.app,
        Method::POST,
        "/api/v1/workitemqueues",
        auth,
        &json!({"name": "orders"}),
    )
    .await;
    assert!(r.status.is_success(), "{} {}", r.status, r.text);
    let r = send(
        &s.app,
        Method::POST,
        "/api/v1/workitemqueues/orders/workitems",
        auth,
        &json!({"items": [{"name": "one", "payload": {}}, {"name": "two", "payload": {}}]}),
    )
    .await;
    assert!(r.status.is_success(), "{} {}", r.status, r.text);

    // The bodies the page sends (its `showQueues`).
    assert!(PAGE.contains("filter: { _type: \"workitemqueue\" }, projection: { name: 1 }, sort: { name: 1 }"));
    assert!(PAGE.contains("{ filter: { wiq: q.name, state } }"));
    let queues = send(
        &s.app,
        Method::POST,
        "/api/v1/collections/mq/query",
        auth,
        &json!({"filter": {"_type": "workitemqueue"}, "projection": {"name": 1}, "sort": {"name": 1}, "top": 20}),
    )
    .await;
    assert_eq!(queues.status, StatusCode::OK, "{}", queues.text);
    let names: Vec<Value> = json_of(&queues)
        .as_array()
        .expect("list")
        .iter()
        .map(|q| q["name"].clone())
        .collect();
    assert_eq!(names, vec![json!("orders")]);
    let count = send(
        &s.app,
        Method::POST,
        "/api/v1/collections/workitems/count",
        auth,
        &json!({"filter": {"wiq": "orders", "state": "new"}}),
    )
    .await;
    assert_eq!(json_of(&count), json!({"count": 2}), "{}", count.text);

    // What the other panels read.
    let health = json_of(&send(&s.app, Method::GET, "/health", None, &Value::Null).await);
    assert_eq!(
        (health["site"].as_str(), health["status"].as_str()),
        (Some("a"), Some("ok"))
    );
    let metrics = json_of(&send(&s.app, Method::GET, "/api/v1/metrics", auth, &Value::Null).await);
    assert!(metrics.is_object() && metrics["peers"].is_array(), "{metrics}");
    let conflicts = send(&s.app, Method::GET, "/api/v1/conflicts", auth, &Value::Null).await;
    assert!(json_of(&conflicts).is_array(), "{}", conflicts.text);
    let peers = send(&s.app, Method::GET, "/api/v1/mesh/peers", auth, &Value::Null).await;
    assert_eq!(json_of(&peers), json!([]));
    for field in ["p.site", "p.address", "p.connected", "p.unacked", "p.last_error"] {
        assert!(PAGE.contains(field), "peers panel reads {field}");
    }
    for field in [
        "c.collection",
        "c._id",
        "c.field",
        "c.kept",
        "c.lost",
        "r.jwt",
        "h.site",
        "h.status",
    ] {
        assert!(PAGE.contains(field), "the page reads {field}");
    }
}

#[test]
fn the_page_names_no_external_address() {
    let lower = PAGE.to_ascii_lowercase();
    for needle in [
        "http:",
        "https:",
        "ws:",
        "wss:",
        "ftp:",
        "//",
        "src=",
        "href=",
        "<link",
        "<iframe",
        "<img",
        "@import",
        "url(",
        "integrity=",
    ] {
        let hits: Vec<&str> = lower
            .match_indices(needle)
            .map(|(i, _)| {
                let line_start = lower[..i].rfind('\n').map_or(0, |j| j + 1);
                let line_end = lower[i..].find('\n').map_or(lower.len(), |j| i + j);
                lower[line_start..line_end].trim()
            })
            // JavaScript comments are the only `//` the page may hold.
            .filter(|line| !(needle == "//" && line.starts_with("//")))
            .collect();
        assert!(hits.is_empty(), "the page contains {needle:?}: {hits:?}");
    }
    // One inline script and one inline style block, nothing loaded.
    assert_eq!(lower.matches("<script").count(), 1);
    assert_eq!(lower.matches("<style").count(), 1);
}
