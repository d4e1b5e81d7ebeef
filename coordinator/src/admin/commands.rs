//! Operators acting on agents: restart them, send them custom messages, read
//! the custom messages they sent (see [`crate::commands`]).

use axum::{
    Json,
    extract::{Path, Query, State},
    http::StatusCode,
    response::{IntoResponse, Response},
};
use base64::{Engine, engine::general_purpose::STANDARD as BASE64};
use fleetplane_proto::{InstanceUid, opamp::CustomMessage};
use serde::{Deserialize, Serialize};

use super::{AdminState, ApiError, AuditDetail, json_error, tenant};
use crate::{
    commands::{Ask, AskError, Delivery},
    selector::Selector,
};

impl From<AskError> for ApiError {
    fn from(e: AskError) -> Self {
        let status = match &e {
            AskError::UnknownAgent(_) => StatusCode::NOT_FOUND,
            AskError::NotAccepted { .. } => StatusCode::CONFLICT,
            AskError::TooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            AskError::Certificate(crate::certificates::CertificateError::NoIssuer(_)) => StatusCode::CONFLICT,
            AskError::Certificate(_) => StatusCode::INTERNAL_SERVER_ERROR,
            AskError::Store(_) => StatusCode::SERVICE_UNAVAILABLE,
        };
        ApiError::new(status, e.to_string())
    }
}

fn parse_uid(uid: &str) -> Result<InstanceUid, ApiError> {
    InstanceUid::parse(uid).map_err(|e| ApiError::bad_request(e.to_string()))
}

/// What happened to one agent's ask.
#[derive(Debug, Serialize)]
pub struct Asked {
    pub instance_uid: String,
    pub delivery: Delivery,
}

fn accepted(body: impl Serialize, detail: String) -> Response {
    let mut response = (StatusCode::ACCEPTED, Json(body)).into_response();
    response.extensions_mut().insert(AuditDetail(detail));
    response
}

/// `POST /agents/{uid}/restart`: 202 with when it is delivered; 409 when the
/// agent does not advertise AcceptsRestartCommand.
pub(super) async fn restart_one(
    State(state): State<AdminState>,
    Path(uid): Path<String>,
) -> Result<Response, ApiError> {
    let uid = parse_uid(&uid)?;
    let delivery = state.coordinator.ask(&tenant(), &uid, Ask::Restart).await?;
    Ok(accepted(
        Asked {
            instance_uid: uid.to_string(),
            delivery,
        },
        format!("restart {uid}: {delivery:?}"),
    ))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AskMany {
    /// Which agents (the agent-list selector syntax). Required, and must not
    /// be empty: the whole fleet takes `"selector": "*"`.
    selector: String,
}

/// One agent that was not asked, and why.
#[derive(Debug, Serialize)]
pub struct Refused {
    pub instance_uid: String,
    pub reason: String,
}

#[derive(Debug, Serialize)]
pub struct AskManyView {
    pub requested: Vec<Asked>,
    pub refused: Vec<Refused>,
}

/// `POST /commands/restart` `{"selector": "..."}`: restarts every matching
/// agent that accepts restarts; the others are listed with the reason.
pub(super) async fn restart_many(
    State(state): State<AdminState>,
    body: Result<Json<AskMany>, axum::extract::rejection::JsonRejection>,
) -> Result<Response, ApiError> {
    ask_many(&state, body, Ask::Restart, "restart").await
}

/// `POST /commands/certificate` `{"selector": "..."}`: issues (rotates) the
/// client certificate of every matching agent that can take one (see
/// [`certificate_one`]); the others are listed with the reason. Admin role.
pub(super) async fn certificate_many(
    State(state): State<AdminState>,
    body: Result<Json<AskMany>, axum::extract::rejection::JsonRejection>,
) -> Result<Response, ApiError> {
    ask_many(&state, body, Ask::Certificate, "certificate").await
}

/// Asks every agent the selector matches; those that cannot take it are
/// listed with the reason.
async fn ask_many(
    state: &AdminState,
    body: Result<Json<AskMany>, axum::extract::rejection::JsonRejection>,
    ask: Ask,
    what: &str,
) -> Result<Response, ApiError> {
    let Json(body) = body.map_err(json_error)?;
    let text = body.selector.trim();
    if text.is_empty() {
        return Err(ApiError::bad_request(format!(
            "selector is required; \"*\" is every agent ({what})"
        )));
    }
    let selector =
        Selector::parse(if text == "*" { "" } else { text }).map_err(|e| ApiError::bad_request(e.to_string()))?;
    let tenant = tenant();
    let mut view = AskManyView {
        requested: Vec::new(),
        refused: Vec::new(),
    };
    for record in state.coordinator.store().agents(&tenant).await? {
        if !selector.matches((&record).into()) {
            continue;
        }
        let Ok(uid) = InstanceUid::from_slice(&record.instance_uid) else {
            continue;
        };
        match state.coordinator.ask(&tenant, &uid, ask.clone()).await {
            Ok(delivery) => view.requested.push(Asked {
                instance_uid: uid.to_string(),
                delivery,
            }),
            Err(AskError::NotAccepted { reason, .. }) => view.refused.push(Refused {
                instance_uid: uid.to_string(),
                reason,
            }),
            // Gone since the listing: nothing to ask.
            Err(AskError::UnknownAgent(_)) => {}
            Err(e) => return Err(e.into()),
        }
    }
    let detail = format!(
        "{what} {text:?}: {} requested, {} refused",
        view.requested.len(),
        view.refused.len()
    );
    Ok(accepted(view, detail))
}

/// `POST /agents/{uid}/certificate`: a new client certificate and key from
/// the tenant's issuing CA, offered in the agent's connection settings (it
/// reconnects with it); the one it had may speak for it until it does. 202
/// with when it is delivered; 409 when the agent does not advertise
/// AcceptsOpAMPConnectionSettings or the tenant has no issuing CA. The key
/// is never shown; the audit says only that a certificate was issued.
pub(super) async fn certificate_one(
    State(state): State<AdminState>,
    Path(uid): Path<String>,
) -> Result<Response, ApiError> {
    let uid = parse_uid(&uid)?;
    let delivery = state.coordinator.ask(&tenant(), &uid, Ask::Certificate).await?;
    Ok(accepted(
        Asked {
            instance_uid: uid.to_string(),
            delivery,
        },
        format!("certificate issued for {uid}: {delivery:?}"),
    ))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SendCustom {
    capability: String,
    #[serde(rename = "type")]
    kind: String,
    /// Payload, base64 (standard alphabet). Or use `text`.
    data: Option<String>,
    /// Payload as UTF-8 text, for text-based capabilities.
    text: Option<String>,
}

/// `POST /agents/{uid}/custom-messages`: 202; 409 unless the agent lists the
/// capability.
pub(super) async fn send_custom(
    State(state): State<AdminState>,
    Path(uid): Path<String>,
    body: Result<Json<SendCustom>, axum::extract::rejection::JsonRejection>,
) -> Result<Response, ApiError> {
    let uid = parse_uid(&uid)?;
    let Json(body) = body.map_err(json_error)?;
    if body.capability.trim().is_empty() || body.kind.trim().is_empty() {
        return Err(ApiError::bad_request("capability and type are required"));
    }
    let data = match (body.data, body.text) {
        (Some(_), Some(_)) => return Err(ApiError::bad_request("give data (base64) or text, not both")),
        (Some(data), None) => BASE64
            .decode(data.trim())
            .map_err(|e| ApiError::bad_request(format!("data is not base64: {e}")))?,
        (None, Some(text)) => text.into_bytes(),
        (None, None) => Vec::new(),
    };
    let detail = format!(
        "custom message {}/{} ({} bytes) to {uid}",
        body.capability,
        body.kind,
        data.len()
    );
    let message = CustomMessage {
        capability: body.capability,
        r#type: body.kind,
        data,
    };
    let delivery = state.coordinator.ask(&tenant(), &uid, Ask::Custom(message)).await?;
    Ok(accepted(
        Asked {
            instance_uid: uid.to_string(),
            delivery,
        },
        detail,
    ))
}

/// A custom message an agent sent.
#[derive(Debug, Serialize)]
pub struct CustomMessageView {
    pub capability: String,
    #[serde(rename = "type")]
    pub kind: String,
    /// Payload, base64.
    pub data: String,
    /// Payload as text, when it is UTF-8.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub text: Option<String>,
    pub unix_ms: u64,
    /// Only the first 64 KiB of the data were kept.
    pub truncated: bool,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CustomQuery {
    /// Only this capability.
    capability: Option<String>,
}

/// `GET /agents/{uid}/custom-messages`: the newest messages the agent sent
/// (at most [`crate::inventory::KEPT_CUSTOM_MESSAGES`]), oldest first.
pub(super) async fn received_custom(
    State(state): State<AdminState>,
    Path(uid): Path<String>,
    Query(query): Query<CustomQuery>,
) -> Result<Json<Vec<CustomMessageView>>, ApiError> {
    let uid = parse_uid(&uid)?;
    let record = state
        .coordinator
        .store()
        .agent(&tenant(), &uid)
        .await?
        .ok_or_else(|| ApiError::not_found(format!("no agent {uid}")))?;
    Ok(Json(
        record
            .custom_messages
            .iter()
            .filter_map(|received| {
                let message = received.message.as_ref()?;
                if query.capability.as_ref().is_some_and(|c| *c != message.capability) {
                    return None;
                }
                Some(CustomMessageView {
                    capability: message.capability.clone(),
                    kind: message.r#type.clone(),
                    data: BASE64.encode(&message.data),
                    text: String::from_utf8(message.data.clone()).ok(),
                    unix_ms: received.unix_ms,
                    truncated: received.truncated,
                })
            })
            .collect(),
    ))
}
