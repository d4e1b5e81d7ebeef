//! Agent API keys through the admin API: create (the key is shown once),
//! list (ids and labels, never secrets), revoke.
//!
//! Revocation is effective on every gateway within seconds: gateways cache a
//! key for a few seconds at most and re-check the keys of open connections
//! on the same schedule, closing those whose key was revoked.

use axum::{
    Json,
    extract::{Path, State},
    http::StatusCode,
};
use fleetplane_proto::{credentials::MintedKey, internal::ApiKey};
use serde::{Deserialize, Serialize};

use super::{AdminState, ApiError, ApiResult, json_error, tenant};
use crate::worker::now_unix_ms;

/// `POST /keys` body.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NewKey {
    /// A label for operators ("prod collectors").
    pub name: String,
}

/// A key as listed: no secret, ever.
#[derive(Debug, Serialize)]
pub struct KeyView {
    pub id: String,
    pub tenant: String,
    pub name: String,
    pub created_unix_ms: u64,
    /// Absent while the key is valid.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub revoked_unix_ms: Option<u64>,
}

impl From<&ApiKey> for KeyView {
    fn from(key: &ApiKey) -> Self {
        Self {
            id: key.id.clone(),
            tenant: key.tenant.clone(),
            name: key.name.clone(),
            created_unix_ms: key.created_unix_ms,
            revoked_unix_ms: (key.revoked_unix_ms != 0).then_some(key.revoked_unix_ms),
        }
    }
}

/// The answer to a creation: the listed fields and the key itself, once.
#[derive(Debug, Serialize)]
pub struct CreatedKey {
    #[serde(flatten)]
    pub view: KeyView,
    /// `fp_<id>_<secret>`: give it to agents (bearer token); it cannot be
    /// shown again.
    pub key: String,
}

pub(super) async fn create(
    State(state): State<AdminState>,
    body: Result<Json<NewKey>, axum::extract::rejection::JsonRejection>,
) -> Result<(StatusCode, Json<CreatedKey>), ApiError> {
    let Json(body) = body.map_err(json_error)?;
    if body.name.is_empty() || body.name.len() > 128 || body.name.chars().any(char::is_control) {
        return Err(ApiError::bad_request(
            "a key's name must be 1 to 128 printable characters",
        ));
    }
    let minted = MintedKey::generate();
    let record = ApiKey {
        id: minted.id().to_owned(),
        tenant: tenant().to_string(),
        name: body.name,
        secret_sha256: minted.secret_sha256().to_vec(),
        created_unix_ms: now_unix_ms(),
        revoked_unix_ms: 0,
    };
    state.coordinator.store().put_api_key(record.clone()).await?;
    tracing::info!(key_id = %record.id, tenant = %record.tenant, "API key created");
    Ok((
        StatusCode::CREATED,
        Json(CreatedKey {
            view: KeyView::from(&record),
            key: minted.token().to_owned(),
        }),
    ))
}

pub(super) async fn list(State(state): State<AdminState>) -> ApiResult<Vec<KeyView>> {
    let mut keys = state.coordinator.store().api_keys(&tenant()).await?;
    keys.sort_by(|a, b| a.id.cmp(&b.id));
    Ok(Json(keys.iter().map(KeyView::from).collect()))
}

pub(super) async fn revoke(State(state): State<AdminState>, Path(id): Path<String>) -> ApiResult<KeyView> {
    let store = state.coordinator.store();
    let mut key = store
        .api_key(&id)
        .await?
        .filter(|k| k.tenant == tenant().as_str())
        .ok_or_else(|| ApiError::not_found(format!("no API key {id:?}")))?;
    if key.revoked_unix_ms == 0 {
        key.revoked_unix_ms = now_unix_ms();
        store.put_api_key(key.clone()).await?;
        tracing::info!(key_id = %key.id, tenant = %key.tenant, "API key revoked");
    }
    Ok(Json(KeyView::from(&key)))
}
