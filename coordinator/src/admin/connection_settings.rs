//! Connection settings by selector (spec 4.D.20, 4.G): where agents send
//! their own telemetry, how they reach OpAMP, and agent-specific other
//! connections by name.
//!
//! Header values may be credentials: they are stored and offered, but never
//! shown by the API nor written to the audit log (only their names).

use std::collections::BTreeMap;

use axum::{
    Json,
    extract::{Path, State},
    http::StatusCode,
    response::{IntoResponse, Response},
};
use fleetplane_proto::internal::ConnectionSettingsAssignment;
use fleetplane_proto::opamp::{
    Header, Headers, OpAmpConnectionSettings, OtherConnectionSettings, TelemetryConnectionSettings,
    TlsConnectionSettings,
};
use serde::{Deserialize, Serialize};

use super::{AdminState, ApiError, ApiResult, AuditDetail, check_name, json_error, reconcile_in_background, tenant};
use crate::{selector::Selector, worker::now_unix_ms};

/// Where an agent sends one kind of its own telemetry (OTLP/HTTP, full URL).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct TelemetryRequest {
    endpoint: String,
    #[serde(default)]
    headers: BTreeMap<String, String>,
    /// CA certificate(s), PEM, the agent should trust for this endpoint.
    #[serde(default)]
    ca_pem: Option<String>,
}

/// How the agent reaches OpAMP.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct OpampRequest {
    /// Absent: the URL each agent used to reach us.
    #[serde(default)]
    endpoint: Option<String>,
    #[serde(default)]
    headers: BTreeMap<String, String>,
    /// CA certificate(s), PEM, for a `wss://`/`https://` endpoint. Restated in
    /// every offer: an offer without one makes some agents (the Collector's
    /// Supervisor) skip TLS verification.
    #[serde(default)]
    ca_pem: Option<String>,
    /// Absent or 0: the server's `heartbeat_interval_secs`.
    #[serde(default)]
    heartbeat_interval_seconds: u64,
}

/// One agent-specific connection (spec: OtherConnectionSettings).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct OtherRequest {
    /// URL, host:port or any destination the agent understands.
    endpoint: String,
    #[serde(default)]
    headers: BTreeMap<String, String>,
    #[serde(default)]
    ca_pem: Option<String>,
    /// Free-form settings the agent defines. Values may be credentials:
    /// only their names are ever shown.
    #[serde(default)]
    settings: BTreeMap<String, String>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConnectionSettingsRequest {
    #[serde(default)]
    selector: String,
    #[serde(default)]
    priority: i32,
    own_metrics: Option<TelemetryRequest>,
    own_traces: Option<TelemetryRequest>,
    own_logs: Option<TelemetryRequest>,
    opamp: Option<OpampRequest>,
    #[serde(default)]
    other_connections: BTreeMap<String, OtherRequest>,
}

/// One destination as shown: header names only.
#[derive(Debug, Serialize)]
pub(super) struct DestinationView {
    endpoint: String,
    /// Header names; values are never shown.
    headers: Vec<String>,
    has_ca_pem: bool,
}

#[derive(Debug, Serialize)]
pub(super) struct ConnectionSettingsView {
    name: String,
    selector: String,
    priority: i32,
    own_metrics: Option<DestinationView>,
    own_traces: Option<DestinationView>,
    own_logs: Option<DestinationView>,
    opamp: Option<OpampView>,
    /// By name; header and setting values are never shown.
    other_connections: BTreeMap<String, OtherView>,
    updated_unix_ms: u64,
}

#[derive(Debug, Serialize)]
pub(super) struct OtherView {
    endpoint: String,
    headers: Vec<String>,
    has_ca_pem: bool,
    /// Setting names.
    settings: Vec<String>,
}

#[derive(Debug, Serialize)]
pub(super) struct OpampView {
    /// Absent: each agent's own URL.
    endpoint: Option<String>,
    headers: Vec<String>,
    has_ca_pem: bool,
    heartbeat_interval_seconds: u64,
}

fn header_names(headers: Option<&Headers>) -> Vec<String> {
    headers
        .map(|h| h.headers.iter().map(|h| h.key.clone()).collect())
        .unwrap_or_default()
}

fn has_ca(tls: Option<&TlsConnectionSettings>) -> bool {
    tls.is_some_and(|t| !t.ca_pem_contents.is_empty())
}

impl From<&ConnectionSettingsAssignment> for ConnectionSettingsView {
    fn from(s: &ConnectionSettingsAssignment) -> Self {
        let destination = |t: &Option<TelemetryConnectionSettings>| {
            t.as_ref().map(|t| DestinationView {
                endpoint: t.destination_endpoint.clone(),
                headers: header_names(t.headers.as_ref()),
                has_ca_pem: has_ca(t.tls.as_ref()),
            })
        };
        Self {
            name: s.name.clone(),
            selector: s.selector.clone(),
            priority: s.priority,
            own_metrics: destination(&s.own_metrics),
            own_traces: destination(&s.own_traces),
            own_logs: destination(&s.own_logs),
            opamp: s.opamp.as_ref().map(|o| OpampView {
                endpoint: (!o.destination_endpoint.is_empty()).then(|| o.destination_endpoint.clone()),
                headers: header_names(o.headers.as_ref()),
                has_ca_pem: has_ca(o.tls.as_ref()),
                heartbeat_interval_seconds: o.heartbeat_interval_seconds,
            }),
            other_connections: s
                .other_connections
                .iter()
                .map(|(name, o)| {
                    (
                        name.clone(),
                        OtherView {
                            endpoint: o.destination_endpoint.clone(),
                            headers: header_names(o.headers.as_ref()),
                            has_ca_pem: has_ca(o.tls.as_ref()),
                            settings: o.other_settings.keys().cloned().collect(),
                        },
                    )
                })
                .collect(),
            updated_unix_ms: s.updated_unix_ms,
        }
    }
}

fn check_url(what: &str, url: &str, schemes: &[&str]) -> Result<(), ApiError> {
    // Credentials belong in headers, whose values are never shown: a URL is
    // shown and audited as it is.
    let authority = url
        .split_once("://")
        .map_or("", |(_, rest)| rest.split('/').next().unwrap_or(""));
    if authority.contains('@') {
        return Err(ApiError::bad_request(format!(
            "{what}: put credentials in headers, not in the URL (they would be shown)"
        )));
    }
    let ok = schemes.iter().any(|s| {
        url.strip_prefix(s)
            .and_then(|r| r.strip_prefix("://"))
            .is_some_and(|rest| !rest.is_empty())
    }) && url.len() <= 2048
        && !url.chars().any(char::is_whitespace);
    if ok {
        Ok(())
    } else {
        Err(ApiError::bad_request(format!(
            "{what}: {url:?} is not a {} URL",
            schemes.join("/")
        )))
    }
}

/// Checked header names and values, as OpAMP carries them (also for package
/// downloads).
pub(super) fn headers(what: &str, headers: BTreeMap<String, String>) -> Result<Option<Headers>, ApiError> {
    if headers.is_empty() {
        return Ok(None);
    }
    for (key, value) in &headers {
        let token = !key.is_empty()
            && key
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b));
        if !token || value.bytes().any(|b| b == b'\r' || b == b'\n' || b == 0) {
            return Err(ApiError::bad_request(format!(
                "{what}: header {key:?} is not a valid HTTP header"
            )));
        }
    }
    Ok(Some(Headers {
        headers: headers.into_iter().map(|(key, value)| Header { key, value }).collect(),
    }))
}

fn tls(what: &str, ca_pem: Option<String>) -> Result<Option<TlsConnectionSettings>, ApiError> {
    let Some(pem) = ca_pem.filter(|p| !p.trim().is_empty()) else {
        return Ok(None);
    };
    if !pem.contains("-----BEGIN CERTIFICATE-----") || !pem.contains("-----END CERTIFICATE-----") {
        return Err(ApiError::bad_request(format!(
            "{what}: ca_pem holds no PEM certificate"
        )));
    }
    Ok(Some(TlsConnectionSettings {
        ca_pem_contents: pem,
        ..Default::default()
    }))
}

fn telemetry(what: &str, request: Option<TelemetryRequest>) -> Result<Option<TelemetryConnectionSettings>, ApiError> {
    let Some(request) = request else {
        return Ok(None);
    };
    check_url(what, &request.endpoint, &["http", "https"])?;
    Ok(Some(TelemetryConnectionSettings {
        destination_endpoint: request.endpoint,
        headers: headers(what, request.headers)?,
        tls: tls(what, request.ca_pem)?,
        ..Default::default()
    }))
}

fn opamp(request: Option<OpampRequest>) -> Result<Option<OpAmpConnectionSettings>, ApiError> {
    let Some(request) = request else {
        return Ok(None);
    };
    if let Some(endpoint) = &request.endpoint {
        check_url("opamp", endpoint, &["ws", "wss", "http", "https"])?;
    }
    if request.heartbeat_interval_seconds > 86_400 {
        return Err(ApiError::bad_request(
            "opamp: heartbeat_interval_seconds is at most 86400",
        ));
    }
    Ok(Some(OpAmpConnectionSettings {
        destination_endpoint: request.endpoint.unwrap_or_default(),
        headers: headers("opamp", request.headers)?,
        tls: tls("opamp", request.ca_pem)?,
        heartbeat_interval_seconds: request.heartbeat_interval_seconds,
        ..Default::default()
    }))
}

/// Agent-specific connections, checked: names like config keys, a
/// destination without credentials in it, valid headers.
fn others(requests: BTreeMap<String, OtherRequest>) -> Result<BTreeMap<String, OtherConnectionSettings>, ApiError> {
    const MOST: usize = 64;
    if requests.len() > MOST {
        return Err(ApiError::bad_request(format!("at most {MOST} other_connections")));
    }
    requests
        .into_iter()
        .map(|(name, request)| {
            let what = format!("other_connections.{name}");
            let printable =
                |t: &str| !t.is_empty() && t.len() <= 253 && !t.chars().any(|c| c.is_control() || c.is_whitespace());
            if !printable(&name) {
                return Err(ApiError::bad_request(format!(
                    "other_connections: name {name:?} must be 1 to 253 printable characters without spaces"
                )));
            }
            if !printable(&request.endpoint) || request.endpoint.len() > 2048 {
                return Err(ApiError::bad_request(format!(
                    "{what}: endpoint {:?} is not a destination",
                    request.endpoint
                )));
            }
            if request.endpoint.contains("://") {
                check_url(
                    &what,
                    &request.endpoint,
                    &["http", "https", "grpc", "grpcs", "ws", "wss", "tcp", "udp"],
                )?;
            } else if request.endpoint.contains('@') {
                return Err(ApiError::bad_request(format!(
                    "{what}: put credentials in headers or settings, not in the endpoint (it is shown)"
                )));
            }
            Ok((
                name,
                OtherConnectionSettings {
                    destination_endpoint: request.endpoint,
                    headers: headers(&what, request.headers)?,
                    tls: tls(&what, request.ca_pem)?,
                    other_settings: request.settings,
                    ..Default::default()
                },
            ))
        })
        .collect()
}

/// `GET /connection-settings`.
pub(super) async fn list(State(state): State<AdminState>) -> ApiResult<Vec<ConnectionSettingsView>> {
    let mut all = state.coordinator.store().connection_settings(&tenant()).await?;
    all.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(Json(all.iter().map(ConnectionSettingsView::from).collect()))
}

/// `GET /connection-settings/{name}`.
pub(super) async fn show(
    State(state): State<AdminState>,
    Path(name): Path<String>,
) -> ApiResult<ConnectionSettingsView> {
    state
        .coordinator
        .store()
        .connection_settings(&tenant())
        .await?
        .iter()
        .find(|s| s.name == name)
        .map(|s| Json(ConnectionSettingsView::from(s)))
        .ok_or_else(|| ApiError::not_found(format!("no connection settings {name:?}")))
}

/// `PUT /connection-settings/{name}`: creates or replaces; pushed to the
/// connected agents it now wins for.
/// Checked connection settings named `name` from a request (the selector
/// parsed; at least one part given).
pub(super) fn settings_from(
    name: String,
    body: ConnectionSettingsRequest,
) -> Result<ConnectionSettingsAssignment, ApiError> {
    let selector = Selector::parse(&body.selector).map_err(|e| ApiError::bad_request(e.to_string()))?;
    let settings = ConnectionSettingsAssignment {
        tenant: tenant().to_string(),
        name,
        selector: selector.to_string(),
        priority: body.priority,
        own_metrics: telemetry("own_metrics", body.own_metrics)?,
        own_traces: telemetry("own_traces", body.own_traces)?,
        own_logs: telemetry("own_logs", body.own_logs)?,
        opamp: opamp(body.opamp)?,
        other_connections: others(body.other_connections)?,
        updated_unix_ms: now_unix_ms(),
    };
    if settings.own_metrics.is_none()
        && settings.own_traces.is_none()
        && settings.own_logs.is_none()
        && settings.opamp.is_none()
        && settings.other_connections.is_empty()
    {
        return Err(ApiError::bad_request(
            "give at least one of own_metrics, own_traces, own_logs, opamp, other_connections",
        ));
    }
    Ok(settings)
}

pub(super) async fn put(
    State(state): State<AdminState>,
    Path(name): Path<String>,
    body: Result<Json<ConnectionSettingsRequest>, axum::extract::rejection::JsonRejection>,
) -> Result<Response, ApiError> {
    let Json(body) = body.map_err(json_error)?;
    check_name("connection settings", &name)?;
    let settings = settings_from(name, body)?;
    state
        .coordinator
        .store()
        .put_connection_settings(settings.clone())
        .await?;
    reconcile_in_background(&state, tenant()).await;
    let view = ConnectionSettingsView::from(&settings);
    // Names and endpoints only: header values may be credentials.
    let detail = serde_json::to_string(&view).unwrap_or_default();
    let mut response = Json(view).into_response();
    response.extensions_mut().insert(AuditDetail(detail));
    Ok(response)
}

/// `DELETE /connection-settings/{name}`. Agents keep what they were last
/// offered (OpAMP has no "withdraw"); another match may now win.
pub(super) async fn delete(State(state): State<AdminState>, Path(name): Path<String>) -> Result<StatusCode, ApiError> {
    if state
        .coordinator
        .store()
        .remove_connection_settings(&tenant(), &name)
        .await?
    {
        reconcile_in_background(&state, tenant()).await;
        Ok(StatusCode::NO_CONTENT)
    } else {
        Err(ApiError::not_found(format!("no connection settings {name:?}")))
    }
}
