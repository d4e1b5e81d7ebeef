//! Package sets by selector (spec 4.H): the packages the agents a selector
//! matches should have, each one file at a download URL with its SHA-256.
//!
//! An offer is the complete set an agent should have (agents remove what is
//! not offered), so a set is never empty, and the winner among several
//! matching sets is decided by the assignment rule, never merged. Download
//! header values may be credentials: stored and offered, never shown.

use std::collections::BTreeMap;

use axum::{
    Json,
    extract::{Path, State},
    http::StatusCode,
    response::{IntoResponse, Response},
};
use base64::{Engine, engine::general_purpose::STANDARD as BASE64};
use fleetplane_proto::{
    internal::PackageSet,
    opamp::{DownloadableFile, PackageAvailable, PackageType, PackagesAvailable},
};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::{AdminState, ApiError, ApiResult, AuditDetail, check_name, json_error, reconcile_in_background, tenant};
use crate::{selector::Selector, worker::now_unix_ms};

/// Packages per set.
const MAX_PACKAGES: usize = 64;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PackageRequest {
    /// `top_level` (the agent itself; the Collector's Supervisor names it
    /// `""`) or `addon`. Default `top_level` for `""`, else `addon`.
    #[serde(rename = "type")]
    kind: Option<String>,
    version: String,
    download_url: String,
    /// SHA-256 of the file, 64 hex digits.
    content_hash: String,
    /// Detached signature, base64 (format as the agent expects).
    #[serde(default)]
    signature: Option<String>,
    /// Headers for the download (authorization).
    #[serde(default)]
    headers: BTreeMap<String, String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct PackageSetRequest {
    #[serde(default)]
    selector: String,
    #[serde(default)]
    priority: i32,
    packages: BTreeMap<String, PackageRequest>,
}

#[derive(Debug, Serialize)]
pub(super) struct PackageView {
    #[serde(rename = "type")]
    kind: &'static str,
    version: String,
    download_url: String,
    content_hash: String,
    has_signature: bool,
    /// Header names only.
    headers: Vec<String>,
    hash: String,
}

#[derive(Debug, Serialize)]
pub(super) struct PackageSetView {
    name: String,
    selector: String,
    priority: i32,
    packages: BTreeMap<String, PackageView>,
    all_packages_hash: String,
    updated_unix_ms: u64,
}

impl From<&PackageSet> for PackageSetView {
    fn from(s: &PackageSet) -> Self {
        let offer = s.packages.clone().unwrap_or_default();
        Self {
            name: s.name.clone(),
            selector: s.selector.clone(),
            priority: s.priority,
            packages: offer
                .packages
                .iter()
                .map(|(name, p)| {
                    let file = p.file.clone().unwrap_or_default();
                    (
                        name.clone(),
                        PackageView {
                            kind: if p.r#type == PackageType::Addon as i32 {
                                "addon"
                            } else {
                                "top_level"
                            },
                            version: p.version.clone(),
                            download_url: file.download_url,
                            content_hash: hex::encode(&file.content_hash),
                            has_signature: !file.signature.is_empty(),
                            headers: file
                                .headers
                                .map(|h| h.headers.into_iter().map(|h| h.key).collect())
                                .unwrap_or_default(),
                            hash: hex::encode(&p.hash),
                        },
                    )
                })
                .collect(),
            all_packages_hash: hex::encode(&offer.all_packages_hash),
            updated_unix_ms: s.updated_unix_ms,
        }
    }
}

/// A set's packages as offered: checked, each with its hash, and the hash of
/// them all. Never empty (agents remove packages not offered).
pub(super) fn packages_available(requests: BTreeMap<String, PackageRequest>) -> Result<PackagesAvailable, ApiError> {
    if requests.is_empty() {
        return Err(ApiError::bad_request(
            "a package set needs at least one package (agents remove packages not offered)",
        ));
    }
    if requests.len() > MAX_PACKAGES {
        return Err(ApiError::bad_request(format!(
            "at most {MAX_PACKAGES} packages per set"
        )));
    }
    let mut packages = BTreeMap::new();
    let mut all = Sha256::new();
    for (package_name, request) in requests {
        let offered = package(&package_name, request)?;
        // Names in order (BTreeMap), each with its package hash.
        all.update(package_name.as_bytes());
        all.update([0]);
        all.update(&offered.hash);
        packages.insert(package_name, offered);
    }
    Ok(PackagesAvailable {
        packages,
        all_packages_hash: all.finalize().to_vec(),
    })
}

fn package(name: &str, request: PackageRequest) -> Result<PackageAvailable, ApiError> {
    let bad = |why: String| ApiError::bad_request(format!("package {name:?}: {why}"));
    let kind = match request.kind.as_deref() {
        None if name.is_empty() => PackageType::TopLevel,
        None => PackageType::Addon,
        Some("top_level") => PackageType::TopLevel,
        Some("addon") => PackageType::Addon,
        Some(other) => return Err(bad(format!("type {other:?} is not top_level or addon"))),
    };
    if request.version.trim().is_empty() || request.version.len() > 128 {
        return Err(bad("a version is required".into()));
    }
    let url = &request.download_url;
    let authority = url
        .split_once("://")
        .map(|(scheme, rest)| (scheme, rest.split('/').next().unwrap_or("")));
    match authority {
        Some(("http" | "https", host)) if !host.is_empty() && !host.contains('@') => {}
        _ => {
            return Err(bad(format!(
                "download_url {url:?} is not an http(s) URL without credentials"
            )));
        }
    }
    let content_hash = hex::decode(request.content_hash.trim())
        .ok()
        .filter(|h| h.len() == 32)
        .ok_or_else(|| bad("content_hash must be the file's SHA-256, 64 hex digits".into()))?;
    let signature = match request.signature {
        Some(s) => BASE64
            .decode(s.trim())
            .map_err(|e| bad(format!("signature is not base64: {e}")))?,
        None => Vec::new(),
    };
    let headers = super::connection_settings::headers(&format!("package {name:?}"), request.headers)?;
    // The package hash covers every field the agent acts on (spec 4.H.41).
    let mut hasher = Sha256::new();
    hasher.update((kind as i32).to_le_bytes());
    hasher.update(request.version.as_bytes());
    hasher.update([0]);
    hasher.update(url.as_bytes());
    hasher.update([0]);
    hasher.update(&content_hash);
    hasher.update(&signature);
    // Headers too: a corrected download token must be a new offer.
    for header in headers.iter().flat_map(|h| h.headers.iter()) {
        hasher.update(header.key.as_bytes());
        hasher.update([0]);
        hasher.update(header.value.as_bytes());
        hasher.update([0]);
    }
    Ok(PackageAvailable {
        r#type: kind as i32,
        version: request.version,
        file: Some(DownloadableFile {
            download_url: request.download_url,
            content_hash,
            signature,
            headers,
        }),
        hash: hasher.finalize().to_vec(),
    })
}

/// `GET /packages`.
pub(super) async fn list(State(state): State<AdminState>) -> ApiResult<Vec<PackageSetView>> {
    let mut all = state.coordinator.store().package_sets(&tenant()).await?;
    all.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(Json(all.iter().map(PackageSetView::from).collect()))
}

/// `GET /packages/{name}`.
pub(super) async fn show(State(state): State<AdminState>, Path(name): Path<String>) -> ApiResult<PackageSetView> {
    state
        .coordinator
        .store()
        .package_sets(&tenant())
        .await?
        .iter()
        .find(|s| s.name == name)
        .map(|s| Json(PackageSetView::from(s)))
        .ok_or_else(|| ApiError::not_found(format!("no package set {name:?}")))
}

/// `PUT /packages/{name}`: creates or replaces; offered to the connected
/// agents it now wins for that take packages.
pub(super) async fn put(
    State(state): State<AdminState>,
    Path(name): Path<String>,
    body: Result<Json<PackageSetRequest>, axum::extract::rejection::JsonRejection>,
) -> Result<Response, ApiError> {
    let Json(body) = body.map_err(json_error)?;
    check_name("package set", &name)?;
    let selector = Selector::parse(&body.selector).map_err(|e| ApiError::bad_request(e.to_string()))?;
    let packages = packages_available(body.packages)?;
    let set = PackageSet {
        tenant: tenant().to_string(),
        name,
        selector: selector.to_string(),
        priority: body.priority,
        packages: Some(packages),
        updated_unix_ms: now_unix_ms(),
    };
    state.coordinator.store().put_package_set(set.clone()).await?;
    reconcile_in_background(&state, tenant()).await;
    let view = PackageSetView::from(&set);
    let detail = serde_json::to_string(&view).unwrap_or_default();
    let mut response = Json(view).into_response();
    response.extensions_mut().insert(AuditDetail(detail));
    Ok(response)
}

/// `DELETE /packages/{name}`. Agents keep what they have (offering nothing
/// is not offering an empty set); another set may now win.
pub(super) async fn delete(State(state): State<AdminState>, Path(name): Path<String>) -> Result<StatusCode, ApiError> {
    if state.coordinator.store().remove_package_set(&tenant(), &name).await? {
        reconcile_in_background(&state, tenant()).await;
        Ok(StatusCode::NO_CONTENT)
    } else {
        Err(ApiError::not_found(format!("no package set {name:?}")))
    }
}
