//! `/api/v1/rollouts`: create, inspect, pause, resume, abort, roll back.

use std::{collections::BTreeMap, time::Duration};

use axum::{
    Json,
    extract::{Path, State},
    http::StatusCode,
};
use fleetplane_proto::{
    InstanceUid,
    internal::{AgentPhase, Rollout, RolloutStage},
};
use serde::{Deserialize, Serialize};

use super::{AdminState, ApiError, json_error, tenant};
use crate::rollout::{
    executor::{RolloutError, RolloutRequest, phase_name},
    machine::{Command, state_name},
    plan::cumulative_sizes,
};

/// One stage in a request: a bare number is a percentage.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum StageBody {
    Percent(u32),
    Spec {
        #[serde(default)]
        percent: u32,
        #[serde(default)]
        count: u32,
    },
}

/// Body of `POST /api/v1/rollouts`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreateRollout {
    /// The assignment whose agents move to a config version…
    #[serde(default)]
    pub assignment: String,
    #[serde(default)]
    pub config: String,
    /// …or the package set whose agents move to new packages.
    #[serde(default)]
    pub package_set: Option<String>,
    #[serde(default)]
    pub packages: Option<std::collections::BTreeMap<String, super::packages::PackageRequest>>,
    /// …or the connection settings whose agents move to new settings (the
    /// body of `PUT /connection-settings/{name}` without selector and
    /// priority, which are kept).
    #[serde(default)]
    pub connection_settings: Option<String>,
    #[serde(default)]
    pub settings: Option<super::connection_settings::ConnectionSettingsRequest>,
    #[serde(default)]
    pub version: Option<u32>,
    #[serde(default)]
    pub stages: Option<Vec<StageBody>>,
    #[serde(default)]
    pub canaries: Vec<String>,
    #[serde(default)]
    pub max_in_flight: u32,
    #[serde(default)]
    pub bake_seconds: Option<f64>,
    #[serde(default)]
    pub stage_deadline_seconds: Option<f64>,
    #[serde(default)]
    pub apply_timeout_seconds: Option<f64>,
    #[serde(default)]
    pub disconnect_grace_seconds: Option<f64>,
    #[serde(default)]
    pub first_stage_max_failures_percent: Option<f64>,
    #[serde(default)]
    pub max_failures_percent: Option<f64>,
    #[serde(default)]
    pub spread_by: Option<String>,
    #[serde(default)]
    pub express: bool,
    /// Roll out although the pre-flight check found agents lacking a
    /// component the config declares (otherwise: 409, nothing sent).
    #[serde(default)]
    pub allow_missing_components: bool,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct AgentFailure {
    pub instance_uid: String,
    pub reason: String,
}

/// One stage's progress.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct StageView {
    /// 1-based.
    pub stage: u32,
    pub percent: u32,
    pub count: u32,
    /// Agents changed by this stage.
    pub agents: usize,
    /// Agents done once this stage is done (cumulative).
    pub cumulative: usize,
    /// Phase name → number of this stage's agents.
    pub phases: BTreeMap<String, usize>,
    /// Failed agents and why, in the agents' own words where they gave any.
    pub failures: Vec<AgentFailure>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct RolloutAgentView {
    pub instance_uid: String,
    pub stage: u32,
    pub phase: String,
    pub previous_hash: String,
    pub reason: String,
}

/// What the pre-flight check found when the rollout was created.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct PreflightView {
    /// Agents whose inventory was compared with the target config.
    pub checked: usize,
    /// Agents that sent no component inventory (nothing to compare).
    pub unchecked: u32,
    /// Agents lacking components the target declares, and which
    /// (`receivers/otlp`).
    pub missing: Vec<MissingComponents>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct MissingComponents {
    pub instance_uid: String,
    pub components: Vec<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct EventView {
    pub unix_ms: u64,
    pub message: String,
}

/// A rollout, as the API shows it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct RolloutView {
    pub id: String,
    /// `config` (an assignment moved to a config version) or `packages` (a
    /// package set's agents moved to new packages; `assignment` names the
    /// set, `config` and `version` are empty).
    pub kind: &'static str,
    pub assignment: String,
    pub config: String,
    pub version: u32,
    pub target_hash: String,
    /// The config-map key of a layer's rollout (absent for a whole config):
    /// only that key changes in the agents' maps.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub key: String,
    /// PROGRESSING, BAKING, PAUSED, COMPLETED, ROLLING_BACK, ROLLED_BACK, ABORTED.
    pub state: String,
    /// Current stage, 1-based.
    pub stage: u32,
    pub reason: String,
    pub stages: Vec<StageView>,
    pub max_in_flight: u32,
    pub bake_seconds: f64,
    pub stage_deadline_seconds: f64,
    pub apply_timeout_seconds: f64,
    pub disconnect_grace_seconds: f64,
    pub first_stage_max_failures_percent: f64,
    pub max_failures_percent: f64,
    pub spread_by: String,
    pub canaries: Vec<String>,
    pub created_unix_ms: u64,
    pub updated_unix_ms: u64,
    pub events: Vec<EventView>,
    /// The pre-flight check at creation.
    pub preflight: PreflightView,
    /// Every agent (only when one rollout is shown).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub agents: Option<Vec<RolloutAgentView>>,
}

fn view(r: &Rollout, with_agents: bool) -> RolloutView {
    let sizes = cumulative_sizes(&r.stages, r.agents.len());
    let stages = r
        .stages
        .iter()
        .enumerate()
        .map(|(k, s)| {
            let members: Vec<_> = r.agents.iter().filter(|a| a.stage as usize == k).collect();
            let mut phases = BTreeMap::new();
            for a in &members {
                *phases.entry(phase_name(a.phase).to_owned()).or_insert(0) += 1;
            }
            StageView {
                stage: k as u32 + 1,
                percent: s.percent,
                count: s.count,
                agents: members.len(),
                cumulative: sizes.get(k).copied().unwrap_or(0),
                phases,
                failures: members
                    .iter()
                    .filter(|a| !a.reason.is_empty() || a.phase() == AgentPhase::Failed)
                    .map(|a| AgentFailure {
                        instance_uid: hex::encode(&a.instance_uid),
                        reason: a.reason.clone(),
                    })
                    .collect(),
            }
        })
        .collect();
    RolloutView {
        id: r.id.clone(),
        kind: match r.kind() {
            fleetplane_proto::internal::RolloutKind::Config => "config",
            fleetplane_proto::internal::RolloutKind::Packages => "packages",
            fleetplane_proto::internal::RolloutKind::ConnectionSettings => "connection_settings",
        },
        assignment: r.assignment.clone(),
        config: r.config_name.clone(),
        version: r.config_version,
        target_hash: hex::encode(&r.target_hash),
        key: r.config_key.clone(),
        state: state_name(r.state).to_owned(),
        stage: r.stage + 1,
        reason: r.reason.clone(),
        stages,
        max_in_flight: r.max_in_flight,
        bake_seconds: r.bake_ms as f64 / 1000.0,
        stage_deadline_seconds: r.stage_deadline_ms as f64 / 1000.0,
        apply_timeout_seconds: r.apply_timeout_ms as f64 / 1000.0,
        disconnect_grace_seconds: r.disconnect_grace_ms as f64 / 1000.0,
        first_stage_max_failures_percent: r.first_stage_max_failures_bp as f64 / 100.0,
        max_failures_percent: r.later_stages_max_failures_bp as f64 / 100.0,
        spread_by: r.spread_by.clone(),
        canaries: r.canaries.iter().map(hex::encode).collect(),
        created_unix_ms: r.created_unix_ms,
        updated_unix_ms: r.updated_unix_ms,
        events: r
            .events
            .iter()
            .map(|e| EventView {
                unix_ms: e.unix_ms,
                message: e.message.clone(),
            })
            .collect(),
        preflight: PreflightView {
            checked: r.agents.len().saturating_sub(r.preflight_unchecked as usize),
            unchecked: r.preflight_unchecked,
            missing: r
                .preflight
                .iter()
                .map(|f| MissingComponents {
                    instance_uid: hex::encode(&f.instance_uid),
                    components: f.missing.clone(),
                })
                .collect(),
        },
        agents: with_agents.then(|| {
            r.agents
                .iter()
                .map(|a| RolloutAgentView {
                    instance_uid: hex::encode(&a.instance_uid),
                    stage: a.stage + 1,
                    phase: phase_name(a.phase).to_owned(),
                    previous_hash: hex::encode(&a.previous_hash),
                    reason: a.reason.clone(),
                })
                .collect()
        }),
    }
}

impl From<RolloutError> for ApiError {
    fn from(e: RolloutError) -> Self {
        let status = match &e {
            RolloutError::NotFound(_) => StatusCode::NOT_FOUND,
            RolloutError::Conflict(_) | RolloutError::Command(_) | RolloutError::Preflight(_) => StatusCode::CONFLICT,
            RolloutError::Invalid(_) => StatusCode::BAD_REQUEST,
            RolloutError::Store(_) => StatusCode::SERVICE_UNAVAILABLE,
        };
        ApiError::new(status, e.to_string())
    }
}

fn seconds(value: Option<f64>, field: &str) -> Result<Option<Duration>, ApiError> {
    value
        .map(|s| {
            Duration::try_from_secs_f64(s)
                .map_err(|_| ApiError::bad_request(format!("{field} must be a non-negative number of seconds")))
        })
        .transpose()
}

pub(super) async fn create(
    State(state): State<AdminState>,
    body: Result<Json<CreateRollout>, axum::extract::rejection::JsonRejection>,
) -> Result<(StatusCode, Json<RolloutView>), ApiError> {
    let Json(body) = body.map_err(json_error)?;
    let canaries = body
        .canaries
        .iter()
        .map(|c| InstanceUid::parse(c).map_err(|e| ApiError::bad_request(e.to_string())))
        .collect::<Result<Vec<_>, _>>()?;
    let stages = body.stages.map(|stages| {
        stages
            .into_iter()
            .map(|s| match s {
                StageBody::Percent(percent) => RolloutStage { percent, count: 0 },
                StageBody::Spec { percent, count } => RolloutStage { percent, count },
            })
            .collect()
    });
    let config_rollout = !body.assignment.is_empty() || !body.config.is_empty();
    let (assignment, packages, connection_settings) =
        match (body.package_set, body.packages, body.connection_settings, body.settings) {
            (Some(set), Some(packages), None, None) if !config_rollout => {
                (set, Some(super::packages::packages_available(packages)?), None)
            }
            (None, None, Some(name), Some(settings)) if !config_rollout => {
                let settings = super::connection_settings::settings_from(name.clone(), settings)?;
                (name, None, Some(settings))
            }
            (None, None, None, None) if !body.assignment.is_empty() && !body.config.is_empty() => {
                (body.assignment, None, None)
            }
            _ => {
                return Err(ApiError::bad_request(
                    "a rollout moves an assignment to a config (assignment, config), a package set to new packages \
                     (package_set, packages) or connection settings to new settings (connection_settings, settings)",
                ));
            }
        };
    let request = RolloutRequest {
        assignment,
        packages,
        connection_settings,
        config: body.config,
        version: body.version,
        stages,
        canaries,
        max_in_flight: body.max_in_flight,
        bake: seconds(body.bake_seconds, "bake_seconds")?,
        stage_deadline: seconds(body.stage_deadline_seconds, "stage_deadline_seconds")?,
        apply_timeout: seconds(body.apply_timeout_seconds, "apply_timeout_seconds")?,
        disconnect_grace: seconds(body.disconnect_grace_seconds, "disconnect_grace_seconds")?,
        first_stage_max_failures_percent: body.first_stage_max_failures_percent,
        max_failures_percent: body.max_failures_percent,
        spread_by: body.spread_by,
        express: body.express,
        allow_missing_components: body.allow_missing_components,
    };
    let rollout = state.coordinator.rollouts().create(&tenant(), request).await?;
    Ok((StatusCode::CREATED, Json(view(&rollout, true))))
}

pub(super) async fn list(State(state): State<AdminState>) -> Result<Json<Vec<RolloutView>>, ApiError> {
    let all = state.coordinator.store().rollouts(&tenant()).await?;
    Ok(Json(all.iter().rev().map(|r| view(r, false)).collect()))
}

pub(super) async fn show(
    State(state): State<AdminState>,
    Path(id): Path<String>,
) -> Result<Json<RolloutView>, ApiError> {
    let found = state
        .coordinator
        .store()
        .rollout(&tenant(), &id)
        .await?
        .ok_or_else(|| ApiError::not_found(format!("no rollout {id:?}")))?;
    Ok(Json(view(&found, true)))
}

pub(super) async fn act(
    State(state): State<AdminState>,
    Path((id, action)): Path<(String, String)>,
) -> Result<Json<RolloutView>, ApiError> {
    let command = match action.as_str() {
        "pause" => Command::Pause,
        "resume" => Command::Resume,
        "abort" => Command::Abort,
        "rollback" => Command::Rollback,
        other => {
            return Err(ApiError::not_found(format!(
                "no rollout action {other:?}: use pause, resume, abort or rollback"
            )));
        }
    };
    let rollout = state.coordinator.rollouts().command(&tenant(), &id, command).await?;
    Ok(Json(view(&rollout, true)))
}
