//! The admin API: JSON over HTTP for operators and automation.
//!
//! Routes (all under `/api/v1`, documented in `docs/admin-api.yaml`):
//!
//! | method | path | what |
//! |---|---|---|
//! | GET | `/agents` | list agents; filters `selector`, `connected`, `config_hash`, `status`, `limit` |
//! | GET | `/agents/{uid}` | one agent in full |
//! | POST | `/agents/{uid}/restart` | restart one agent (AcceptsRestartCommand only) |
//! | POST | `/commands/restart` | restart the agents a selector matches |
//! | POST | `/agents/{uid}/certificate` | issue (rotate) the agent's client certificate, server-generated (admin role) |
//! | POST | `/commands/certificate` | the same for every agent a selector matches |
//! | GET, POST | `/agents/{uid}/custom-messages` | what the agent sent; send one (its custom capabilities only) |
//! | GET | `/configs` | config names with their latest version |
//! | GET | `/configs/{name}` | every version of a config |
//! | POST | `/configs/{name}/versions` | create a version (idempotent by hash) |
//! | POST | `/configs/{name}/diff` | what a new version would change (stores nothing) |
//! | GET | `/configs/{name}/versions/{version}` | one version with its files |
//! | GET, PUT, DELETE | `/assignments/{name}` | assign a config to a selector |
//! | GET | `/assignments` | every assignment |
//! | GET | `/packages` | every package set |
//! | GET, PUT, DELETE | `/packages/{name}` | the packages agents a selector matches should have |
//! | GET | `/connection-settings` | every connection-settings assignment |
//! | GET, PUT, DELETE | `/connection-settings/{name}` | own telemetry and OpAMP settings by selector |
//! | GET | `/config-status` | agents grouped by the config hash they report, by status |
//! | GET, POST | `/rollouts` | rollout history (newest first); start a rollout |
//! | GET | `/rollouts/{id}` | one rollout: stages, agents, failures and why, events |
//! | POST | `/rollouts/{id}/{pause,resume,abort,rollback}` | operator commands |
//! | GET, POST | `/keys` | agent API keys: list; create (the key is shown once) |
//! | DELETE | `/keys/{id}` | revoke an agent API key |
//! | GET | `/events` | the tenant's event stream (Server-Sent Events), resumable |
//! | GET | `/event-log` | the newest kept events as JSON; filters `subject`, `kind`, `limit` |
//! | GET | `/audit` | the tenant's audit log, newest first (`limit`) |
//!
//! Every route acts on one tenant, named by the `Fleetplane-Tenant` header
//! (default `default`): agents, configs, assignments, rollouts and keys of
//! other tenants are invisible to it.
//!
//! `/livez` and `/readyz` answer without authentication, and so do the web
//! console's static files under `/console/` (which hold no data). With a token
//! configured, everything under `/api` needs `Authorization: Bearer <token>`.

pub mod access;
mod commands;
mod connection_settings;
mod console;
mod diff;
mod event_stream;
pub mod keys;
mod packages;
pub mod rollouts;
pub mod views;

use std::collections::BTreeMap;

use axum::{
    Json, Router,
    extract::{DefaultBodyLimit, Path, Query, Request, State},
    http::{StatusCode, header},
    middleware::{self, Next},
    response::{IntoResponse, Response},
    routing::get,
};
use fleetplane_proto::{
    ConfigHash, InstanceUid, TenantId,
    internal::{Assignment, ConfigFile},
};
use serde::Deserialize;

use crate::{Coordinator, desired, selector::Selector, store::StoreError, worker::now_unix_ms};
use views::*;

/// Largest admin request body (config versions carry whole files).
const MAX_BODY_BYTES: usize = 16 * 1024 * 1024;

/// Admin API settings.
#[derive(Debug, Clone, Default)]
pub struct AdminConfig {
    /// Operators' tokens, each with a role and a tenant scope (see
    /// [`access`]). None: the API is open (bind it to loopback).
    pub tokens: Vec<access::OperatorToken>,
}

#[derive(Debug, Clone)]
struct AdminState {
    coordinator: Coordinator,
    tokens: std::sync::Arc<Vec<access::OperatorToken>>,
}

/// What a handler tells the audit log about its change (a response
/// extension; the middleware writes the entry).
#[derive(Debug, Clone)]
pub(crate) struct AuditDetail(pub String);

/// An API error: an HTTP status and a message, sent as `{"error": "..."}`.
#[derive(Debug, thiserror::Error)]
#[error("{message}")]
pub struct ApiError {
    status: StatusCode,
    message: String,
}

impl ApiError {
    fn new(status: StatusCode, message: impl Into<String>) -> Self {
        Self {
            status,
            message: message.into(),
        }
    }

    fn bad_request(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, message)
    }

    fn not_found(message: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, message)
    }
}

impl From<StoreError> for ApiError {
    /// 503 when asking again can help (the store is down or busy), 500 when
    /// it cannot (a record this build cannot read, a store shut down).
    fn from(e: StoreError) -> Self {
        let status = if e.is_retryable() {
            StatusCode::SERVICE_UNAVAILABLE
        } else {
            StatusCode::INTERNAL_SERVER_ERROR
        };
        Self::new(status, e.to_string())
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.status, Json(serde_json::json!({ "error": self.message }))).into_response()
    }
}

pub(crate) type ApiResult<T> = Result<Json<T>, ApiError>;

/// The admin router for a running coordinator.
pub fn router(coordinator: Coordinator, config: AdminConfig) -> Router {
    let state = AdminState {
        coordinator,
        tokens: std::sync::Arc::new(config.tokens.into_iter().filter(|t| !t.token.is_empty()).collect()),
    };
    let api = Router::new()
        .route("/agents", get(list_agents))
        .route("/agents/{uid}", get(show_agent))
        .route("/agents/{uid}/restart", axum::routing::post(commands::restart_one))
        .route(
            "/agents/{uid}/certificate",
            axum::routing::post(commands::certificate_one),
        )
        .route(
            "/agents/{uid}/custom-messages",
            get(commands::received_custom).post(commands::send_custom),
        )
        .route("/commands/restart", axum::routing::post(commands::restart_many))
        .route("/commands/certificate", axum::routing::post(commands::certificate_many))
        .route("/packages", get(packages::list))
        .route(
            "/packages/{name}",
            get(packages::show).put(packages::put).delete(packages::delete),
        )
        .route("/connection-settings", get(connection_settings::list))
        .route(
            "/connection-settings/{name}",
            get(connection_settings::show)
                .put(connection_settings::put)
                .delete(connection_settings::delete),
        )
        .route("/configs", get(list_configs))
        .route("/configs/{name}", get(show_config))
        .route("/configs/{name}/versions", axum::routing::post(create_version))
        .route("/configs/{name}/diff", axum::routing::post(diff_version))
        .route("/configs/{name}/versions/{version}", get(show_version))
        .route("/assignments", get(list_assignments))
        .route(
            "/assignments/{name}",
            get(show_assignment).put(put_assignment).delete(delete_assignment),
        )
        .route("/config-status", get(config_status))
        .route("/rollouts", get(rollouts::list).post(rollouts::create))
        .route("/rollouts/{id}", get(rollouts::show))
        .route("/rollouts/{id}/{action}", axum::routing::post(rollouts::act))
        .route("/keys", get(keys::list).post(keys::create))
        .route("/audit", get(audit_log))
        .route("/events", get(event_stream::events))
        .route("/event-log", get(event_stream::log))
        .route("/keys/{id}", axum::routing::delete(keys::revoke))
        .layer(middleware::from_fn_with_state(state.clone(), authenticate))
        .layer(DefaultBodyLimit::max(MAX_BODY_BYTES))
        .layer(middleware::map_response(errors_as_json));
    Router::new()
        .nest("/api/v1", api)
        .route("/livez", get(|| async { "ok" }))
        .route("/readyz", get(readyz))
        .merge(console::routes())
        .fallback(|| async { ApiError::not_found("no such route") })
        .layer(middleware::map_response(security_headers))
        .with_state(state)
}

/// Headers on every admin response: no content sniffing, and API answers
/// (which may name agents and configs) never cached by intermediaries.
async fn security_headers(mut response: Response) -> Response {
    let headers = response.headers_mut();
    headers.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        header::HeaderValue::from_static("nosniff"),
    );
    headers
        .entry(header::CACHE_CONTROL)
        .or_insert(header::HeaderValue::from_static("no-store"));
    response
}

/// Every error under `/api` has the documented shape `{"error": "..."}`,
/// including the plain-text rejections of axum's extractors (a bad query
/// string, a malformed path parameter).
async fn errors_as_json(response: Response) -> Response {
    let is_json = response
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/json"));
    let status = response.status();
    if is_json || !(status.is_client_error() || status.is_server_error()) {
        return response;
    }
    let text = match axum::body::to_bytes(response.into_body(), 64 * 1024).await {
        Ok(bytes) => String::from_utf8_lossy(&bytes).into_owned(),
        Err(_) => status.canonical_reason().unwrap_or("error").to_owned(),
    };
    ApiError::new(status, text).into_response()
}

async fn readyz(State(state): State<AdminState>) -> Response {
    match state.coordinator.ready().await {
        Ok(()) => (StatusCode::OK, "ready").into_response(),
        Err(e) => (StatusCode::SERVICE_UNAVAILABLE, format!("not ready: {e}")).into_response(),
    }
}

/// The header naming the tenant an admin request acts on.
pub const TENANT_HEADER: &str = "fleetplane-tenant";

tokio::task_local! {
    /// The tenant of the admin request being handled, decided once by
    /// [`authenticate`] before any handler runs.
    static REQUEST_TENANT: TenantId;
}

/// Identifies the operator, decides the request's tenant (from
/// `Fleetplane-Tenant`, within the operator's scope), checks the role, runs
/// the handler in that tenant, and writes every mutating call to the
/// tenant's audit log with its outcome.
async fn authenticate(State(state): State<AdminState>, request: Request, next: Next) -> Response {
    let requested = match request.headers().get(TENANT_HEADER) {
        None => None,
        Some(value) => match value.to_str().ok().map(|v| TenantId::new(v.trim().to_owned())) {
            Some(Ok(tenant)) => Some(tenant),
            Some(Err(e)) => return ApiError::bad_request(format!("{TENANT_HEADER}: {e}")).into_response(),
            None => return ApiError::bad_request(format!("{TENANT_HEADER} is not text")).into_response(),
        },
    };
    let presented = request
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split_once(' '))
        .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
        .map(|(_, token)| token.trim());
    let operator = match access::identify(&state.tokens, presented) {
        Ok(operator) => operator,
        Err(e) => return ApiError::new(StatusCode::UNAUTHORIZED, e.to_string()).into_response(),
    };
    let method = request.method().clone();
    // The full path: this layer sits inside the `/api/v1` nest.
    let path = request
        .extensions()
        .get::<axum::extract::OriginalUri>()
        .map_or_else(|| request.uri().path().to_owned(), |uri| uri.path().to_owned());
    let mutating =
        !matches!(method, axum::http::Method::GET | axum::http::Method::HEAD) && !access::is_read_only(&path);
    let audit = |tenant: TenantId, status: StatusCode, detail: String| {
        let entry = fleetplane_proto::internal::AuditEntry {
            tenant: tenant.to_string(),
            unix_ms: now_unix_ms(),
            actor: operator.name.clone(),
            action: format!("{method} {path}"),
            status: u32::from(status.as_u16()),
            detail,
        };
        let store = state.coordinator.store().clone();
        state.coordinator.events().publish(
            &tenant,
            "audit",
            "",
            format!("{} {} → {}", entry.actor, entry.action, entry.status),
            &[
                ("actor", &entry.actor),
                ("action", &entry.action),
                ("status", &entry.status.to_string()),
            ],
        );
        async move {
            if let Err(e) = store.append_audit(entry).await {
                // The call's outcome stands; its record is what failed. Say so loudly.
                tracing::error!(error = %e, "audit entry not written");
            }
        }
    };
    let tenant = match operator.tenant(requested.clone()) {
        Ok(tenant) => tenant,
        Err(e) => {
            if mutating && let Some(requested) = requested {
                // The other tenant's log shows the attempt.
                audit(requested, StatusCode::FORBIDDEN, e.to_string()).await;
            }
            return ApiError::new(StatusCode::FORBIDDEN, e.to_string()).into_response();
        }
    };
    let (permission, what) = access::required(&method, &path);
    if !operator.role.allows(permission) {
        let refusal = access::AccessError::Forbidden {
            role: operator.role,
            what,
        };
        if mutating {
            audit(tenant, StatusCode::FORBIDDEN, refusal.to_string()).await;
        }
        return ApiError::new(StatusCode::FORBIDDEN, refusal.to_string()).into_response();
    }
    let response = REQUEST_TENANT.scope(tenant.clone(), next.run(request)).await;
    if mutating {
        let detail = response
            .extensions()
            .get::<AuditDetail>()
            .map(|d| d.0.clone())
            .unwrap_or_default();
        audit(tenant, response.status(), detail).await;
    }
    response
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct AuditQuery {
    /// Most entries returned (default 100, at most 10,000).
    limit: Option<usize>,
}

/// `GET /audit`: the tenant's newest audit entries first.
async fn audit_log(
    State(state): State<AdminState>,
    Query(query): Query<AuditQuery>,
) -> ApiResult<Vec<views::AuditView>> {
    let limit = query.limit.unwrap_or(100).min(10_000);
    let entries = state.coordinator.store().audit(&tenant(), limit).await?;
    Ok(Json(entries.iter().map(views::AuditView::from).collect()))
}

/// A body that is not the JSON we take: 413 when over the size limit, else 400,
/// always with our error shape.
pub(crate) fn json_error(rejection: axum::extract::rejection::JsonRejection) -> ApiError {
    let status = if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE {
        StatusCode::PAYLOAD_TOO_LARGE
    } else {
        StatusCode::BAD_REQUEST
    };
    ApiError::new(status, rejection.body_text())
}

/// The tenant of the request being handled (see [`authenticate`]).
pub(crate) fn tenant() -> TenantId {
    REQUEST_TENANT
        .try_with(Clone::clone)
        .unwrap_or_else(|_| TenantId::default_tenant())
}

/// Config and assignment names: safe in URLs, keys and subjects.
pub(crate) fn check_name(kind: &str, name: &str) -> Result<(), ApiError> {
    // Starting with a letter or digit rules out "." and "..", which would
    // name a path segment's parent in URLs and files.
    let ok = name.len() <= 128
        && name
            .bytes()
            .next()
            .is_some_and(|b| b.is_ascii_lowercase() || b.is_ascii_digit())
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'-' | b'_' | b'.'));
    if ok {
        Ok(())
    } else {
        Err(ApiError::bad_request(format!(
            "{kind} name {name:?} must be 1 to 128 characters of [a-z0-9._-], starting with a letter or digit"
        )))
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct AgentQuery {
    selector: Option<String>,
    connected: Option<bool>,
    /// Reported config hash (hex).
    config_hash: Option<String>,
    /// Reported remote config status: UNSET, APPLYING, APPLIED, FAILED.
    status: Option<String>,
    limit: Option<usize>,
}

async fn list_agents(State(state): State<AdminState>, Query(query): Query<AgentQuery>) -> ApiResult<Vec<AgentSummary>> {
    let tenant = tenant();
    let selector = Selector::parse(query.selector.as_deref().unwrap_or_default())
        .map_err(|e| ApiError::bad_request(e.to_string()))?;
    let hash = query
        .config_hash
        .as_deref()
        .map(ConfigHash::parse)
        .transpose()
        .map_err(|e| ApiError::bad_request(e.to_string()))?;
    let status = query.status.map(|s| s.to_ascii_uppercase());
    let store = state.coordinator.store();
    let assignments = store.assignments(&tenant).await?;
    let mut agents = store.agents(&tenant).await?;
    agents.sort_by(|a, b| a.instance_uid.cmp(&b.instance_uid));
    let mut out = Vec::new();
    for record in agents {
        if !selector.matches((&record).into()) || query.connected.is_some_and(|c| c != record.connected) {
            continue;
        }
        let reported = record.remote_config_status.as_ref();
        if let Some(hash) = &hash
            && reported.is_none_or(|s| s.last_remote_config_hash != hash.as_bytes())
        {
            continue;
        }
        if let Some(status) = &status
            && status_name(reported.map_or(0, |s| s.status)) != *status
        {
            continue;
        }
        let desired = desired::resolve_among(store.as_ref(), &tenant, &record, &assignments).await?;
        if query.limit.is_some_and(|limit| out.len() >= limit) {
            break;
        }
        out.push(summary(&record, desired.as_ref()));
    }
    Ok(Json(out))
}

async fn show_agent(State(state): State<AdminState>, Path(uid): Path<String>) -> ApiResult<AgentDetail> {
    let tenant = tenant();
    let uid = InstanceUid::parse(&uid).map_err(|e| ApiError::bad_request(e.to_string()))?;
    let store = state.coordinator.store();
    let record = store
        .agent(&tenant, &uid)
        .await?
        .ok_or_else(|| ApiError::not_found(format!("no agent {uid}")))?;
    let desired = desired::resolve(store.as_ref(), &tenant, &record).await?;
    Ok(Json(detail(&record, desired.as_ref())))
}

async fn list_configs(State(state): State<AdminState>) -> ApiResult<Vec<ConfigVersionView>> {
    let tenant = tenant();
    let store = state.coordinator.store();
    let mut out = Vec::new();
    for name in store.config_names(&tenant).await? {
        if let Some(latest) = store.config_version(&tenant, &name, 0).await? {
            out.push(ConfigVersionView::new(&latest, false));
        }
    }
    Ok(Json(out))
}

async fn show_config(State(state): State<AdminState>, Path(name): Path<String>) -> ApiResult<Vec<ConfigVersionView>> {
    let versions = state.coordinator.store().config_versions(&tenant(), &name).await?;
    if versions.is_empty() {
        return Err(ApiError::not_found(format!("no config {name:?}")));
    }
    Ok(Json(
        versions.iter().map(|v| ConfigVersionView::new(v, false)).collect(),
    ))
}

async fn show_version(
    State(state): State<AdminState>,
    Path((name, version)): Path<(String, u32)>,
) -> ApiResult<ConfigVersionView> {
    if version == 0 {
        return Err(ApiError::bad_request("versions start at 1"));
    }
    let found = state
        .coordinator
        .store()
        .config_version(&tenant(), &name, version)
        .await?;
    let found = found.ok_or_else(|| ApiError::not_found(format!("no version {version} of config {name:?}")))?;
    Ok(Json(ConfigVersionView::new(&found, true)))
}

/// The files of a config version as the API takes them.
fn files_of(body: NewConfigVersion) -> BTreeMap<String, ConfigFile> {
    body.files
        .into_iter()
        .map(|(file, view)| {
            (
                file,
                ConfigFile {
                    body: view.body.into_bytes(),
                    content_type: view.content_type,
                },
            )
        })
        .collect()
}

/// `POST /configs/{name}/diff`: what creating this version would change,
/// against the latest; nothing is stored (read-only, not audited).
async fn diff_version(
    State(state): State<AdminState>,
    Path(name): Path<String>,
    body: Result<Json<NewConfigVersion>, axum::extract::rejection::JsonRejection>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let Json(body) = body.map_err(json_error)?;
    check_name("config", &name)?;
    let files = files_of(body);
    let latest = state.coordinator.store().config_version(&tenant(), &name, 0).await?;
    let hash = crate::store::files_hash(&files);
    let (against, changed, text) = match &latest {
        Some(latest) => (
            Some(latest.version),
            latest.hash != hash.as_bytes(),
            diff::files(&latest.files, &files),
        ),
        None => (None, true, diff::files(&BTreeMap::new(), &files)),
    };
    Ok(Json(serde_json::json!({
        "config": name,
        "against_version": against,
        "changed": changed,
        "hash": hash.to_string(),
        "diff": text,
    })))
}

async fn create_version(
    State(state): State<AdminState>,
    Path(name): Path<String>,
    body: Result<Json<NewConfigVersion>, axum::extract::rejection::JsonRejection>,
) -> Result<Response, ApiError> {
    let Json(body) = body.map_err(json_error)?;
    check_name("config", &name)?;
    if body.files.is_empty() {
        return Err(ApiError::bad_request("a config needs at least one file"));
    }
    let files = files_of(body);
    let tenant = tenant();
    let created = state
        .coordinator
        .store()
        .create_config_version(&tenant, &name, files, now_unix_ms())
        .await?;
    if created.created {
        tracing::info!(config = %name, version = created.version.version, hash = %hex::encode(&created.version.hash), "config version created");
        reconcile_in_background(&state, tenant.clone()).await;
    }
    let mut detail = format!(
        "version {} ({})",
        created.version.version,
        hex::encode(&created.version.hash)
    );
    if created.created && created.version.version > 1 {
        let previous = state
            .coordinator
            .store()
            .config_version(&tenant, &name, created.version.version - 1)
            .await?;
        if let Some(previous) = previous {
            detail.push('\n');
            detail.push_str(&diff::files(&previous.files, &created.version.files));
        }
    }
    let mut view = ConfigVersionView::new(&created.version, false);
    view.created = Some(created.created);
    let status = if created.created {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    let mut response = (status, Json(view)).into_response();
    response.extensions_mut().insert(AuditDetail(detail));
    Ok(response)
}

/// Pushes changed desired state to connected agents without holding up the
/// API call (see [`Coordinator::reconcile_soon`]).
/// After a change of a tenant's desired state: every replica is told to drop
/// its cached copies (before the change is acknowledged, so no replica
/// answers from an older copy for long after), and this one pushes the
/// change to the agents in the background.
async fn reconcile_in_background(state: &AdminState, tenant: TenantId) {
    state.coordinator.announce_desired_change(&tenant).await;
    state.coordinator.reconcile_soon(tenant, RECONCILE_AGAIN_AFTER);
}

/// When the second reconcile pass runs: well past the time a report takes to
/// be handled.
const RECONCILE_AGAIN_AFTER: std::time::Duration = std::time::Duration::from_secs(2);

async fn list_assignments(State(state): State<AdminState>) -> ApiResult<Vec<AssignmentView>> {
    let all = state.coordinator.store().assignments(&tenant()).await?;
    Ok(Json(all.iter().map(AssignmentView::from).collect()))
}

async fn find_assignment(state: &AdminState, name: &str) -> Result<Assignment, ApiError> {
    state
        .coordinator
        .store()
        .assignments(&tenant())
        .await?
        .into_iter()
        .find(|a| a.name == name)
        .ok_or_else(|| ApiError::not_found(format!("no assignment {name:?}")))
}

async fn show_assignment(State(state): State<AdminState>, Path(name): Path<String>) -> ApiResult<AssignmentView> {
    Ok(Json(AssignmentView::from(&find_assignment(&state, &name).await?)))
}

async fn put_assignment(
    State(state): State<AdminState>,
    Path(name): Path<String>,
    body: Result<Json<AssignmentRequest>, axum::extract::rejection::JsonRejection>,
) -> ApiResult<AssignmentView> {
    let Json(body) = body.map_err(json_error)?;
    check_name("assignment", &name)?;
    if body.version == Some(0) {
        return Err(ApiError::bad_request(
            "versions start at 1; omit version to follow the latest",
        ));
    }
    let selector = Selector::parse(&body.selector).map_err(|e| ApiError::bad_request(e.to_string()))?;
    let tenant = tenant();
    let store = state.coordinator.store();
    let version = body.version.unwrap_or(0);
    let Some(config) = store.config_version(&tenant, &body.config, version).await? else {
        return Err(ApiError::not_found(match body.version {
            Some(v) => format!("no version {v} of config {:?}", body.config),
            None => format!("no config {:?}", body.config),
        }));
    };
    let key = body.key.unwrap_or_default();
    if !key.is_empty() {
        check_config_key(&key)?;
        if config.files.len() != 1 {
            return Err(ApiError::bad_request(format!(
                "a layer delivers one file under key {key:?}; config {:?} has {} files",
                body.config,
                config.files.len()
            )));
        }
    }
    let assignment = Assignment {
        tenant: tenant.to_string(),
        name,
        selector: selector.to_string(),
        config_name: body.config,
        config_version: version,
        priority: body.priority,
        updated_unix_ms: now_unix_ms(),
        config_key: key,
    };
    if !body.allow_missing_components {
        let findings = preflight_assignment(store.as_ref(), &tenant, &assignment, &config).await?;
        if !findings.is_empty() {
            return Err(ApiError::new(
                StatusCode::CONFLICT,
                format!(
                    "pre-flight: {}; set allow_missing_components to assign anyway",
                    crate::rollout::executor::preflight_summary(&findings)
                ),
            ));
        }
    }
    store.put_assignment(assignment.clone()).await?;
    tracing::info!(assignment = %assignment.name, selector = %assignment.selector, config = %assignment.config_name, "assignment set");
    reconcile_in_background(&state, tenant).await;
    Ok(Json(AssignmentView::from(&assignment)))
}

/// The agents this assignment would give its config to (as the winner of
/// their base config, or of its layer's key) whose component inventory lacks
/// a component the config declares. Agents that sent no inventory are not
/// flagged.
async fn preflight_assignment(
    store: &dyn crate::store::Store,
    tenant: &TenantId,
    assignment: &Assignment,
    config: &fleetplane_proto::internal::ConfigVersion,
) -> Result<Vec<fleetplane_proto::internal::PreflightFinding>, StoreError> {
    let declared = crate::components::declared(config.files.values().map(|f| f.body.as_slice()));
    if declared.is_empty() {
        return Ok(Vec::new());
    }
    let mut assignments: Vec<Assignment> = store
        .assignments(tenant)
        .await?
        .into_iter()
        .filter(|a| a.name != assignment.name)
        .collect();
    assignments.push(assignment.clone());
    let base = desired::base_assignments(&assignments);
    let mut findings = Vec::new();
    for record in store.agents(tenant).await? {
        let gets_it = if assignment.config_key.is_empty() {
            desired::pick(&base, (&record).into()).is_some_and(|a| a.name == assignment.name)
        } else {
            desired::layers_for(&assignments, (&record).into())
                .iter()
                .any(|a| a.name == assignment.name)
        };
        if !gets_it {
            continue;
        }
        if let Some(missing) = crate::components::missing(&declared, record.available_components.as_ref())
            && !missing.is_empty()
        {
            findings.push(fleetplane_proto::internal::PreflightFinding {
                instance_uid: record.instance_uid,
                missing: missing.iter().map(ToString::to_string).collect(),
            });
        }
    }
    Ok(findings)
}

/// Config-map keys: the Supervisor's layer names (`00-base`), the Operator
/// bridge's `namespace/name`, file names. Printable, no control characters.
fn check_config_key(key: &str) -> Result<(), ApiError> {
    let ok = key.len() <= 253
        && key
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'/'));
    if ok {
        Ok(())
    } else {
        Err(ApiError::bad_request(format!(
            "key {key:?}: letters, digits and - _ . / only, at most 253"
        )))
    }
}

async fn delete_assignment(State(state): State<AdminState>, Path(name): Path<String>) -> Result<StatusCode, ApiError> {
    if state.coordinator.store().remove_assignment(&tenant(), &name).await? {
        // Another assignment may now win for some agents.
        reconcile_in_background(&state, tenant()).await;
        Ok(StatusCode::NO_CONTENT)
    } else {
        Err(ApiError::not_found(format!("no assignment {name:?}")))
    }
}

async fn config_status(State(state): State<AdminState>) -> ApiResult<Vec<ConfigStatusView>> {
    let tenant = tenant();
    let store = state.coordinator.store();
    let mut groups: BTreeMap<Vec<u8>, ConfigStatusView> = BTreeMap::new();
    let mut agents = store.agents(&tenant).await?;
    agents.sort_by(|a, b| a.instance_uid.cmp(&b.instance_uid));
    for record in agents {
        let (hash, status, error) = match &record.remote_config_status {
            Some(s) => (s.last_remote_config_hash.clone(), s.status, s.error_message.clone()),
            None => (Vec::new(), 0, String::new()),
        };
        if !groups.contains_key(&hash) {
            let version = match ConfigHash::from_slice(&hash) {
                Ok(h) => store.config_by_hash(&tenant, &h).await?,
                Err(_) => None,
            };
            groups.insert(
                hash.clone(),
                ConfigStatusView {
                    hash: hex::encode(&hash),
                    config: version.as_ref().map(|v| v.name.clone()),
                    version: version.as_ref().map(|v| v.version),
                    statuses: BTreeMap::new(),
                    agents: Vec::new(),
                },
            );
        }
        if let Some(group) = groups.get_mut(&hash) {
            let status = status_name(status);
            *group.statuses.entry(status.clone()).or_default() += 1;
            group.agents.push(ConfigStatusAgent {
                instance_uid: hex::encode(&record.instance_uid),
                status,
                error_message: error,
                connected: record.connected,
            });
        }
    }
    Ok(Json(groups.into_values().collect()))
}
