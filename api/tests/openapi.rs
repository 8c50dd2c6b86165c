//! The OpenAPI document at `GET /api/openapi.json`, fetched through the
//! router: it is OpenAPI 3.x, open to anyone, lists every route the router
//! serves (read from the router's own source) and nothing it does not
//! (every documented path and method is requested and must reach a
//! handler, not the fallback), documents the JSON error shape on its
//! failures, and declares Basic and bearer security.

use std::collections::BTreeSet;

use axum::Router;
use axum::body::Body;
use axum::http::{Method, Request, StatusCode, header};
use base64::Engine;
use http_body_util::BodyExt;
use serde_json::Value;
use tower::ServiceExt;

use ocmesh_node::{Node, NodeConfig};

const PASSWORD: &str = "pw";
/// The router's source: the routes it serves are read from here.
const ROUTER_SOURCE: &str = include_str!("../src/lib.rs");

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

fn admin() -> String {
    let creds = base64::engine::general_purpose::STANDARD.encode(format!("admin:{PASSWORD}"));
    format!("Basic {creds}")
}

/// Status and body (JSON when it parses, else `Null`).
async fn send(app: &Router, method: Method, uri: &str, auth: Option<&str>, body: &'static str) -> (StatusCode, Value) {
    let mut req = Request::builder()
        .method(method)
        .uri(uri)
        .header(header::CONTENT_TYPE, "application/json");
    if let Some(a) = auth {
        req = req.header(header::AUTHORIZATION, a);
    }
    let resp = app
        .clone()
        .oneshot(req.body(Body::from(body)).expect("request"))
        .await
        .expect("router is infallible");
    let status = resp.status();
    let bytes = resp.into_body().collect().await.expect("read body").to_bytes();
    (status, serde_json::from_slice(&bytes).unwrap_or(Value::Null))
}

async fn document(app: &Router) -> Value {
    let (status, doc) = send(app, Method::GET, "/api/openapi.json", None, "").await;
    assert_eq!(status, StatusCode::OK, "{doc}");
    doc
}

const METHODS: [&str; 5] = ["get", "post", "put", "patch", "delete"];

/// (method, path template) of every `.route(...)` in `router_with_openiap`,
/// read from its source: a route added there without documentation fails
/// `every_served_route_is_documented`.
fn routes_in_source() -> BTreeSet<(String, String)> {
    let start = ROUTER_SOURCE
        .find("pub fn router_with_openiap(")
        .expect("router_with_openiap in lib.rs");
    let body = &ROUTER_SOURCE[start..];
    let body = &body[..body.find(".fallback(").expect("the router ends with .fallback")];
    let docs = {
        let at = body.find("let docs = \"").expect("let docs = \"...\"") + "let docs = \"".len();
        let rest = &body[at..];
        rest[..rest.find('"').expect("end of docs")].to_owned()
    };
    let mut routes = BTreeSet::new();
    for chunk in body.split(".route(").skip(1) {
        let chunk = chunk.trim_start();
        let path = if let Some(rest) = chunk.strip_prefix("docs,") {
            let _ = rest;
            docs.clone()
        } else if let Some(rest) = chunk.strip_prefix("&format!(\"") {
            rest[..rest.find('"').expect("end of format string")]
                .replace("{docs}", &docs)
                .replace("{{", "{")
                .replace("}}", "}")
        } else if let Some(rest) = chunk.strip_prefix('"') {
            rest[..rest.find('"').expect("end of path")].to_owned()
        } else {
            panic!("cannot read the path of route {chunk:?}");
        };
        let bytes = chunk.as_bytes();
        for m in METHODS {
            let needle = format!("{m}(");
            let mut from = 0;
            while let Some(i) = chunk[from..].find(&needle) {
                let at = from + i;
                let before = at.checked_sub(1).map(|j| bytes[j]);
                if !before.is_some_and(|b| b.is_ascii_alphanumeric() || b == b'_') {
                    routes.insert((m.to_owned(), path.clone()));
                }
                from = at + needle.len();
            }
        }
    }
    routes
}

/// (method, path template) of every operation in the document.
fn documented(doc: &Value) -> BTreeSet<(String, String)> {
    let mut ops = BTreeSet::new();
    for (path, item) in doc["paths"].as_object().expect("paths is an object") {
        for m in METHODS {
            if item.get(m).is_some() {
                ops.insert((m.to_owned(), path.clone()));
            }
        }
    }
    ops
}

/// A concrete request path for a template (`{n}` is a version number).
fn concrete(template: &str) -> String {
    template
        .split('/')
        .map(|seg| match seg {
            "{n}" => "0".to_owned(),
            s if s.starts_with('{') => "0123456789abcdef01234567".to_owned(),
            s => s.to_owned(),
        })
        .collect::<Vec<_>>()
        .join("/")
}

#[tokio::test]
async fn the_document_is_openapi_3_and_public() {
    let s = site();
    let doc = document(&s.app).await;
    let version = doc["openapi"].as_str().expect("openapi version string");
    assert!(version.starts_with("3."), "{version}");
    assert!(doc["info"]["title"].as_str().is_some_and(|t| !t.is_empty()));
    assert!(doc["info"]["version"].is_string());
    assert!(doc["paths"].as_object().is_some_and(|p| !p.is_empty()));
    // Every reference resolves.
    let text = doc.to_string();
    for piece in text.split("\"$ref\":\"#/components/schemas/").skip(1) {
        let name = &piece[..piece.find('"').expect("end of ref")];
        assert!(
            doc["components"]["schemas"].get(name).is_some(),
            "dangling reference to {name}"
        );
    }
    // Every operation has at least one response, each with a description.
    for (path, item) in doc["paths"].as_object().expect("paths") {
        for (method, op) in item.as_object().expect("path item") {
            let responses = op["responses"].as_object().expect("responses");
            assert!(!responses.is_empty(), "{method} {path}");
            for (status, r) in responses {
                assert!(r["description"].is_string(), "{method} {path} {status}");
            }
        }
    }
}

#[tokio::test]
async fn every_served_route_is_documented() {
    let s = site();
    let doc = document(&s.app).await;
    let served = routes_in_source();
    assert!(served.len() >= 40, "the router source parse found only {served:?}");
    let documented = documented(&doc);
    let missing: Vec<_> = served.difference(&documented).collect();
    assert!(missing.is_empty(), "served but not documented: {missing:?}");
    let extra: Vec<_> = documented.difference(&served).collect();
    assert!(extra.is_empty(), "documented but not in the router source: {extra:?}");
}

#[tokio::test]
async fn every_documented_operation_reaches_a_handler() {
    let s = site();
    let doc = document(&s.app).await;
    let ops = documented(&doc);
    assert!(ops.len() >= 40, "{ops:?}");
    let auth = admin();
    for (method, template) in &ops {
        let uri = concrete(template);
        let method = Method::from_bytes(method.to_uppercase().as_bytes()).expect("method");
        let (status, body) = send(&s.app, method.clone(), &uri, Some(&auth), "{}").await;
        assert!(
            !(status == StatusCode::NOT_FOUND && body["detail"] == "no such route"),
            "{method} {uri} ({template}) fell through to the router's fallback"
        );
        assert_ne!(status, StatusCode::METHOD_NOT_ALLOWED, "{method} {uri}: {body}");
        // The fallback itself answers as expected, so the check above means something.
        let (status, body) = send(
            &s.app,
            method.clone(),
            &format!("{uri}/no-such-thing/x/y"),
            Some(&auth),
            "",
        )
        .await;
        assert!(
            status == StatusCode::NOT_FOUND && body["detail"] == "no such route",
            "{method} {uri}/no-such-thing/x/y: {status} {body}"
        );
    }
}

#[tokio::test]
async fn errors_and_security_are_documented() {
    let s = site();
    let doc = document(&s.app).await;
    let schemes = &doc["components"]["securitySchemes"];
    assert_eq!(schemes["basic"]["type"], "http", "{schemes}");
    assert_eq!(schemes["basic"]["scheme"], "basic", "{schemes}");
    assert_eq!(schemes["bearer"]["type"], "http", "{schemes}");
    assert_eq!(schemes["bearer"]["scheme"], "bearer", "{schemes}");

    let error = &doc["components"]["schemas"]["ErrorBody"];
    assert_eq!(error["type"], "object", "{error}");
    let required: BTreeSet<&str> = error["required"]
        .as_array()
        .expect("required list")
        .iter()
        .filter_map(Value::as_str)
        .collect();
    assert_eq!(required, BTreeSet::from(["error", "detail"]), "{error}");
    assert_eq!(error["properties"]["error"]["type"], "string");
    assert_eq!(error["properties"]["detail"]["type"], "string");

    let error_ref = "#/components/schemas/ErrorBody";
    let public = [
        "/health",
        "/ui",
        "/api/openapi.json",
        "/config",
        "/ws/v2",
        "/api/v1/signin",
    ];
    let auth = admin();
    for (path, item) in doc["paths"].as_object().expect("paths") {
        for (method, op) in item.as_object().expect("path item") {
            let responses = op["responses"].as_object().expect("responses");
            let error_statuses: Vec<&String> = responses
                .iter()
                .filter(|(status, r)| {
                    (status.starts_with('4') || status.starts_with('5'))
                        && r["content"]["application/json"]["schema"]["$ref"] == error_ref
                })
                .map(|(status, _)| status)
                .collect();
            if ["/health", "/ui", "/api/openapi.json", "/config", "/ws/v2"].contains(&path.as_str()) {
                // No JSON errors of ours: the WebSocket upgrade's refusals are
                // axum's plain text, and the page and health never fail.
                continue;
            }
            assert!(
                !error_statuses.is_empty(),
                "{method} {path} documents no error response with the ErrorBody schema"
            );
            if public.contains(&path.as_str()) {
                assert!(op.get("security").is_none(), "{method} {path} is open to anyone");
                continue;
            }
            // Secured: both schemes, and 401 with the error shape.
            let security = op["security"].as_array().expect("security list");
            let names: BTreeSet<&str> = security
                .iter()
                .filter_map(|s| s.as_object())
                .flat_map(|s| s.keys().map(String::as_str))
                .collect();
            assert_eq!(names, BTreeSet::from(["basic", "bearer"]), "{method} {path}");
            for status in ["400", "401", "404", "500"] {
                assert!(
                    error_statuses.iter().any(|s| *s == status),
                    "{method} {path} does not document {status}"
                );
            }
            // What the router really answers without credentials is a
            // documented 401 of that shape.
            let m = Method::from_bytes(method.to_uppercase().as_bytes()).expect("method");
            let (status, body) = send(&s.app, m.clone(), &concrete(path), None, "{}").await;
            assert_eq!(status, StatusCode::UNAUTHORIZED, "{method} {path}: {body}");
            assert!(body["error"].is_string() && body["detail"].is_string(), "{body}");
            // And a failure with credentials is one the document lists.
            let (status, body) = send(&s.app, m, &concrete(path), Some(&auth), "[1]").await;
            if !status.is_success() && status != StatusCode::NO_CONTENT {
                assert!(
                    responses.contains_key(status.as_str()),
                    "{method} {path} answered {status}, which is not documented: {body}"
                );
                assert!(body["error"].is_string() && body["detail"].is_string(), "{body}");
            }
        }
    }
}
