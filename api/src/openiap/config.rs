//! `GET /config`: what OpenIAP clients read before connecting (the Rust SDK
//! looks at the HTTP port next to the gRPC one; 50051 maps to 3000, our
//! default). Field names are OpenCore's; values describe this node: the
//! WebSocket endpoint, the version, and every optional OpenCore feature
//! this node lacks switched off (no watch, no multi-tenancy, no telemetry
//! endpoints, analytics off). Needs no sign-in, as in OpenCore.

use axum::Json;
use axum::extract::State;
use axum::http::HeaderMap;
use axum::http::header::HOST;
use serde_json::{Value, json};

use crate::ApiState;

/// `GET /config`.
pub async fn config(State(s): State<ApiState>, headers: HeaderMap) -> Json<Value> {
    // The address the client used, so the URLs work from where it stands.
    let host = headers
        .get(HOST)
        .and_then(|h| h.to_str().ok())
        .filter(|h| !h.is_empty() && h.bytes().all(|b| b.is_ascii_graphic()))
        .unwrap_or("localhost:3000")
        .to_owned();
    let domain = match host.rsplit_once(':') {
        Some((name, port)) if port.bytes().all(|b| b.is_ascii_digit()) => name.to_owned(),
        _ => host.clone(),
    };
    Json(json!({
        "wshost": format!("ws://{host}"),
        "wsurl": format!("ws://{host}/ws/v2"),
        "domain": domain,
        "site": s.node.site(),
        "version": env!("CARGO_PKG_VERSION"),
        "auto_create_users": false,
        "namespace": "",
        "agent_domain_schema": "",
        "validate_emails": false,
        "forgot_pass_emails": false,
        "supports_watch": false,
        "amqp_enabled_exchange": false,
        "multi_tenant": false,
        "enable_entity_restriction": false,
        "enable_web_tours": false,
        "collections_with_text_index": [],
        "timeseries_collections": [],
        "ping_clients_interval": 0,
        "validlicense": false,
        "forceddomains": [],
        "grafana_url": "",
        "otel_metric_url": "",
        "otel_trace_url": "",
        "otel_log_url": "",
        "enable_analytics": false,
    }))
}
