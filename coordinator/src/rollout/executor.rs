//! Runs rollouts: every coordinator replica ticks every rollout; each tick
//! loads it, steps the state machine, and stores the result with
//! compare-and-set. Only the replica whose write wins acts on the transition
//! (promotion, notices), so no stage runs twice, and a replica that dies
//! mid-rollout is simply not there for the next tick: another one continues
//! from the stored state.
//!
//! A rollout moves an agent by *pinning* it: the config hash the agent must
//! run is written into the agent's own record (`pinned_by`, `pinned_hash`),
//! which every replica reads when it answers the agent. Pins are reconciled
//! level-triggered on every tick: each agent's pin is compared with what the
//! rollout's state says it should be, and fixed where it differs, so a pin
//! lost with a dying replica is set again on the next tick.

use std::{
    collections::{BTreeMap, HashMap},
    sync::Arc,
    time::Duration,
};

use fleetplane_bus::{Bus, ENVELOPE_VERSION};
use fleetplane_proto::{
    InstanceUid, TenantId,
    internal::{
        AgentPhase, AgentRecord, ConfigVersion, ConnectionSettingsAssignment, PreflightFinding, Rollout, RolloutAgent,
        RolloutKind, RolloutNotice, RolloutStage, RolloutState,
    },
    opamp::{AgentCapabilities, PackagesAvailable},
};
use tokio_util::sync::CancellationToken;

use super::{
    machine::{self, Action, AgentView, Command},
    plan::{self, Candidate},
};
use crate::{
    conflict::{Conflict, retry_conflicts},
    desired,
    store::{Store, StoreError},
    worker::{Job, Pin, Shards, now_unix_ms},
};

/// What an operator asks for; every field but `assignment` and `config` has
/// the documented default.
#[derive(Debug, Clone, Default)]
pub struct RolloutRequest {
    pub assignment: String,
    pub config: String,
    /// None: the config's latest version.
    pub version: Option<u32>,
    pub stages: Option<Vec<RolloutStage>>,
    pub canaries: Vec<InstanceUid>,
    pub max_in_flight: u32,
    pub bake: Option<Duration>,
    pub stage_deadline: Option<Duration>,
    pub apply_timeout: Option<Duration>,
    pub disconnect_grace: Option<Duration>,
    /// Percent of the first stage that may fail (default 0).
    pub first_stage_max_failures_percent: Option<f64>,
    /// Percent of each later stage that may fail (default 2).
    pub max_failures_percent: Option<f64>,
    pub spread_by: Option<String>,
    /// One stage of 100% without bake, for urgent fixes.
    pub express: bool,
    /// A package rollout: `assignment` names a package set, and these are
    /// its new contents (`config` and `version` are not used).
    pub packages: Option<PackagesAvailable>,
    /// A connection-settings rollout: `assignment` names connection
    /// settings, and these are their new contents (selector and priority
    /// are kept).
    pub connection_settings: Option<ConnectionSettingsAssignment>,
    /// Go ahead although the pre-flight check found agents whose component
    /// inventory lacks a component the target declares (they are listed in
    /// the rollout); without it such a rollout is refused before anything
    /// is sent.
    pub allow_missing_components: bool,
}

/// Why a rollout could not be created or commanded.
#[derive(Debug, thiserror::Error)]
pub enum RolloutError {
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    Conflict(String),
    #[error("{0}")]
    Invalid(String),
    /// The pre-flight check found agents lacking components the target
    /// config declares.
    #[error("pre-flight: {0}; set allow_missing_components to roll out anyway")]
    Preflight(String),
    #[error(transparent)]
    Command(#[from] machine::InvalidCommand),
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl Conflict for RolloutError {
    fn is_conflict(&self) -> bool {
        matches!(self, RolloutError::Store(e) if e.is_conflict())
    }
}

/// The pre-flight findings in a line: how many agents lack what, with the
/// first few named.
pub fn preflight_summary(findings: &[PreflightFinding]) -> String {
    const NAMED: usize = 5;
    let named: Vec<String> = findings
        .iter()
        .take(NAMED)
        .map(|f| format!("{} lacks {}", hex::encode(&f.instance_uid), f.missing.join(", ")))
        .collect();
    let more = findings.len().saturating_sub(NAMED);
    format!(
        "{} agents lack components the config declares ({}{})",
        findings.len(),
        named.join("; "),
        if more > 0 {
            format!("; {more} more")
        } else {
            String::new()
        }
    )
}

/// The version hash of the part `key` of its config (`""`: the base config)
/// an agent runs before a rollout, which a rollback returns it to: what it
/// reports, told apart by what its last offer was made of; the assignment's
/// current version where the report says nothing about the part (an agent
/// that never reported the last offer, or a record from before offers were
/// noted in parts).
fn previous_part(record: &AgentRecord, key: &str, current: Option<&ConfigVersion>) -> Vec<u8> {
    let reported = record
        .remote_config_status
        .as_ref()
        .map(|s| s.last_remote_config_hash.as_slice())
        .unwrap_or_default();
    let layered = !record.offered_layer_hashes.is_empty();
    if !layered && key.is_empty() {
        // The map is the base config: exactly what it reported.
        return reported.to_vec();
    }
    let part = if key.is_empty() {
        Some(&record.offered_base_hash).filter(|h| !h.is_empty())
    } else {
        record.offered_layer_hashes.get(key)
    };
    match part {
        Some(part) if !reported.is_empty() && reported == record.offered_config_hash.as_slice() => part.clone(),
        _ => current.map(|c| c.hash.clone()).unwrap_or_default(),
    }
}

/// The agents a rollout would move, what they run now, and the
/// kind-specific fields of the rollout (target, key, packages).
struct Targets {
    candidates: Vec<Candidate>,
    /// What each runs now, by uid: where a rollback returns it.
    previous: HashMap<Vec<u8>, Vec<u8>>,
    preflight: Vec<PreflightFinding>,
    preflight_unchecked: u32,
    target: Rollout,
}

/// The agents' views for each kind of rollout (by `RolloutKind`), by uid.
#[derive(Debug, Default)]
struct Views(HashMap<i32, HashMap<Vec<u8>, AgentView>>);

impl Views {
    /// The views a rollout of this kind is stepped with.
    fn of(&self, kind: RolloutKind) -> &HashMap<Vec<u8>, AgentView> {
        static NONE: std::sync::LazyLock<HashMap<Vec<u8>, AgentView>> = std::sync::LazyLock::new(HashMap::new);
        self.0.get(&(kind as i32)).unwrap_or(&NONE)
    }
}

/// An agent as a config rollout sees it.
fn config_view(r: &AgentRecord) -> AgentView {
    let status = r.remote_config_status.clone().unwrap_or_default();
    AgentView {
        pinned_by: r.pinned_by.clone(),
        pinned_hash: r.pinned_hash.clone(),
        pinned_key: r.pinned_key.clone(),
        offered_base_hash: r.offered_base_hash.clone(),
        offered_layer_hashes: r.offered_layer_hashes.clone(),
        connected: r.connected,
        last_seen_unix_ms: r.last_seen_unix_ms,
        reported_hash: status.last_remote_config_hash,
        offered_hash: r.offered_config_hash.clone(),
        status: status.status,
        error: status.error_message,
        healthy: r.health.as_ref().map(|h| h.healthy),
        health_error: r.health.as_ref().map(|h| h.last_error.clone()).unwrap_or_default(),
    }
}

/// An agent as a package rollout sees it: its PackageStatuses read as a
/// remote config status would be. APPLIED when every package it reports for
/// the set is installed, FAILED when one failed (its error text kept) or the
/// agent reports an error for the whole set, APPLYING otherwise.
fn package_view(r: &AgentRecord) -> AgentView {
    use fleetplane_proto::opamp::{PackageStatusEnum, RemoteConfigStatuses};
    let statuses = r.package_statuses.clone().unwrap_or_default();
    let failed = statuses
        .packages
        .values()
        .find(|p| p.status == PackageStatusEnum::InstallFailed as i32);
    let (status, error) = if let Some(failed) = failed {
        (
            RemoteConfigStatuses::Failed,
            format!("package {:?}: {}", failed.name, failed.error_message),
        )
    } else if !statuses.error_message.is_empty() {
        (RemoteConfigStatuses::Failed, statuses.error_message.clone())
    } else if !statuses.packages.is_empty()
        && statuses
            .packages
            .values()
            .all(|p| p.status == PackageStatusEnum::Installed as i32)
    {
        (RemoteConfigStatuses::Applied, String::new())
    } else {
        (RemoteConfigStatuses::Applying, String::new())
    };
    AgentView {
        pinned_by: r.pinned_packages_by.clone(),
        pinned_hash: r
            .pinned_packages
            .as_ref()
            .map(|p| p.all_packages_hash.clone())
            .unwrap_or_default(),
        connected: r.connected,
        last_seen_unix_ms: r.last_seen_unix_ms,
        reported_hash: statuses.server_provided_all_packages_hash,
        offered_hash: r.offered_packages_hash.clone(),
        status: status as i32,
        error,
        healthy: r.health.as_ref().map(|h| h.healthy),
        health_error: r.health.as_ref().map(|h| h.last_error.clone()).unwrap_or_default(),
        ..Default::default()
    }
}

/// An agent as a connection-settings rollout sees it: the settings it runs
/// are known when it reports the hash of the offer built from them (the
/// offer itself is per agent), and its ConnectionSettingsStatus reads as a
/// remote config status would (the enums share their numbers).
fn connection_view(r: &AgentRecord) -> AgentView {
    let status = r.connection_settings_status.clone().unwrap_or_default();
    let runs_offer = !r.offered_connection_settings_hash.is_empty()
        && status.last_connection_settings_hash == r.offered_connection_settings_hash;
    AgentView {
        pinned_by: r.pinned_connection_by.clone(),
        pinned_hash: r
            .pinned_connection
            .as_ref()
            .map(|s| desired::settings_hash(s))
            .unwrap_or_default(),
        connected: r.connected,
        last_seen_unix_ms: r.last_seen_unix_ms,
        reported_hash: if runs_offer {
            r.offered_connection_source_hash.clone()
        } else {
            status.last_connection_settings_hash
        },
        offered_hash: r.offered_connection_source_hash.clone(),
        status: status.status,
        error: status.error_message,
        healthy: r.health.as_ref().map(|h| h.healthy),
        health_error: r.health.as_ref().map(|h| h.last_error.clone()).unwrap_or_default(),
        ..Default::default()
    }
}

/// What `rollout` holds `agent` to now (a released pin when nothing).
fn pin_for(rollout: &Rollout, agent: &RolloutAgent) -> Pin {
    let hash = machine::override_for(rollout, agent).unwrap_or_default();
    match rollout.kind() {
        RolloutKind::Config => Pin::Config {
            hash: hash.to_vec(),
            key: rollout.config_key.clone(),
        },
        RolloutKind::Packages => Pin::Packages(
            [&rollout.target_packages, &rollout.previous_packages]
                .into_iter()
                .flatten()
                .find(|p| !hash.is_empty() && p.all_packages_hash == hash)
                .cloned(),
        ),
        RolloutKind::ConnectionSettings => Pin::Connection(
            [
                &rollout.target_connection_settings,
                &rollout.previous_connection_settings,
            ]
            .into_iter()
            .flatten()
            .find(|s| !hash.is_empty() && desired::settings_hash(s) == hash)
            .cloned()
            .map(Box::new),
        ),
    }
}

/// A second live rollout of the same kind over the same `what` is refused.
fn refuse_second(existing: &[Rollout], kind: RolloutKind, what: &str, name: &str) -> Result<(), RolloutError> {
    match existing
        .iter()
        .find(|r| machine::is_live(r) && r.kind() == kind && r.assignment == name)
    {
        Some(live) => Err(RolloutError::Conflict(format!(
            "rollout {} is already {} on {what} {name:?}; pause, abort or wait for it",
            live.id,
            machine::state_name(live.state),
        ))),
        None => Ok(()),
    }
}

/// The value of the `spread_by` attribute of an agent ("" when absent).
fn spread_value(record: &AgentRecord, spread_by: &str) -> String {
    record
        .description
        .as_ref()
        .and_then(|d| fleetplane_proto::attributes::find(d, spread_by))
        .map(fleetplane_proto::attributes::value_text)
        .unwrap_or_default()
}

/// Defaults, following Argo Rollouts, Flagger and AWS AppConfig.
pub mod defaults {
    use std::time::Duration;
    pub const STAGES: [u32; 4] = [1, 10, 50, 100];
    pub const BAKE: Duration = Duration::from_secs(300);
    pub const STAGE_DEADLINE: Duration = Duration::from_secs(600);
    pub const APPLY_TIMEOUT: Duration = Duration::from_secs(600);
    pub const DISCONNECT_GRACE: Duration = Duration::from_secs(120);
    pub const FIRST_STAGE_MAX_FAILURES_PERCENT: f64 = 0.0;
    pub const MAX_FAILURES_PERCENT: f64 = 2.0;
}

fn bp(percent: f64) -> Result<u32, RolloutError> {
    if !(0.0..=100.0).contains(&percent) {
        return Err(RolloutError::Invalid(format!(
            "failure threshold {percent}% is not between 0 and 100"
        )));
    }
    Ok((percent * 100.0).round() as u32)
}

fn ms(d: Duration) -> u64 {
    d.as_millis() as u64
}

/// Runs and creates rollouts for one coordinator.
#[derive(Debug, Clone)]
pub struct Executor {
    pub(crate) store: Arc<dyn Store>,
    pub(crate) bus: Arc<dyn Bus>,
    pub(crate) shards: Shards,
    pub(crate) events: Arc<crate::events::Events>,
    /// When this replica last re-sent an unconfirmed offer, by rollout and
    /// agent (see [`Executor::resend_due`]).
    pub(crate) resent: Arc<std::sync::Mutex<ResendTimes>>,
}

/// (rollout id, agent uid) → when this replica last re-sent its offer.
pub(crate) type ResendTimes = HashMap<(String, Vec<u8>), u64>;

/// Agents read per store round trip when a tick builds its views.
const VIEW_CHUNK: usize = 1_000;

/// An offer a changing agent has not confirmed this long is sent again.
const RESEND_AFTER_MS: u64 = 5_000;

impl Executor {
    /// Plans and stores a new rollout; the next tick starts it.
    pub async fn create(&self, tenant: &TenantId, request: RolloutRequest) -> Result<Rollout, RolloutError> {
        let existing = self.store.rollouts(tenant).await?;
        let targets = match (&request.packages, &request.connection_settings) {
            (Some(packages), _) => self.package_targets(tenant, &request, packages, &existing).await?,
            (None, Some(settings)) => self.connection_targets(tenant, &request, settings, &existing).await?,
            (None, None) => self.config_targets(tenant, &request, &existing).await?,
        };
        let Targets {
            candidates,
            mut previous,
            preflight,
            preflight_unchecked,
            target,
        } = targets;
        for live in existing.iter().filter(|r| machine::is_live(r)) {
            if let Some(agent) = live.agents.iter().find(|a| previous.contains_key(&a.instance_uid)) {
                return Err(RolloutError::Conflict(format!(
                    "agent {} is already in rollout {}, which is {}",
                    hex::encode(&agent.instance_uid),
                    live.id,
                    machine::state_name(live.state)
                )));
            }
        }
        let stages = if request.express {
            vec![RolloutStage { percent: 100, count: 0 }]
        } else {
            request.stages.clone().unwrap_or_else(|| {
                defaults::STAGES
                    .iter()
                    .map(|p| RolloutStage { percent: *p, count: 0 })
                    .collect()
            })
        };
        if stages.is_empty() || stages.last().is_some_and(|s| s.percent != 100) {
            return Err(RolloutError::Invalid("stages must end at 100 percent".into()));
        }
        if let Some(bad) = stages
            .iter()
            .find(|s| s.percent > 100 || (s.percent == 0 && s.count == 0))
        {
            return Err(RolloutError::Invalid(format!(
                "a stage needs a percent from 1 to 100 or a count of at least 1, got {bad:?}"
            )));
        }
        let canaries: Vec<Vec<u8>> = request.canaries.iter().map(|u| u.to_vec()).collect();
        let planned = plan::plan(candidates, &canaries, &stages);
        let now = now_unix_ms();
        let bake = if request.express {
            Duration::ZERO
        } else {
            request.bake.unwrap_or(defaults::BAKE)
        };
        let mut rollout = Rollout {
            tenant: tenant.to_string(),
            id: format!("ro-{}", uuid_like()),
            stages,
            canaries,
            max_in_flight: request.max_in_flight,
            bake_ms: ms(bake),
            stage_deadline_ms: ms(request.stage_deadline.unwrap_or(defaults::STAGE_DEADLINE)),
            apply_timeout_ms: ms(request.apply_timeout.unwrap_or(defaults::APPLY_TIMEOUT)),
            disconnect_grace_ms: ms(request.disconnect_grace.unwrap_or(defaults::DISCONNECT_GRACE)),
            first_stage_max_failures_bp: bp(request
                .first_stage_max_failures_percent
                .unwrap_or(defaults::FIRST_STAGE_MAX_FAILURES_PERCENT))?,
            later_stages_max_failures_bp: bp(request.max_failures_percent.unwrap_or(defaults::MAX_FAILURES_PERCENT))?,
            spread_by: request.spread_by.clone().unwrap_or_default(),
            state: RolloutState::Progressing as i32,
            stage: 0,
            stage_started_unix_ms: now,
            created_unix_ms: now,
            updated_unix_ms: now,
            agents: planned
                .into_iter()
                .map(|(uid, stage)| RolloutAgent {
                    previous_hash: previous.remove(&uid).unwrap_or_default(),
                    instance_uid: uid,
                    stage,
                    ..Default::default()
                })
                .collect(),
            preflight_unchecked,
            ..target
        };
        if !preflight.is_empty() {
            rollout.events.push(fleetplane_proto::internal::RolloutEvent {
                unix_ms: now,
                message: format!("pre-flight, gone ahead anyway: {}", preflight_summary(&preflight)),
            });
        }
        rollout.preflight = preflight;
        rollout.events.push(fleetplane_proto::internal::RolloutEvent {
            unix_ms: now,
            message: match rollout.kind() {
                RolloutKind::ConnectionSettings => format!(
                    "created: {} agents of connection settings {:?} to settings {}, {} stages",
                    rollout.agents.len(),
                    rollout.assignment,
                    hex::encode(&rollout.target_hash),
                    rollout.stages.len()
                ),
                RolloutKind::Packages => format!(
                    "created: {} agents of package set {:?} to packages {}, {} stages",
                    rollout.agents.len(),
                    rollout.assignment,
                    hex::encode(&rollout.target_hash),
                    rollout.stages.len()
                ),
                RolloutKind::Config => format!(
                    "created: {} agents of assignment {:?} to {} v{}, {} stages",
                    rollout.agents.len(),
                    rollout.assignment,
                    rollout.config_name,
                    rollout.config_version,
                    rollout.stages.len()
                ),
            },
        });
        let rollout = self.store.put_rollout(rollout).await?;
        self.notify(&rollout, 0).await;
        // Start at once rather than on the next tick.
        if let Err(e) = self.tick().await {
            tracing::debug!(error = %e, "first rollout step deferred to the next tick");
        }
        Ok(self.store.rollout(tenant, &rollout.id).await?.unwrap_or(rollout))
    }

    /// The agents of an assignment a config rollout moves, what each runs
    /// now, and the target.
    async fn config_targets(
        &self,
        tenant: &TenantId,
        request: &RolloutRequest,
        existing: &[Rollout],
    ) -> Result<Targets, RolloutError> {
        let store = self.store.as_ref();
        let assignments = store.assignments(tenant).await?;
        let assignment = assignments
            .iter()
            .find(|a| a.name == request.assignment)
            .ok_or_else(|| RolloutError::NotFound(format!("no assignment {:?}", request.assignment)))?;
        if assignment.config_version == 0 {
            return Err(RolloutError::Invalid(format!(
                "assignment {:?} follows the latest version of {:?}, so new versions reach its agents at once; \
                 pin it to a version (PUT /api/v1/assignments/{} with \"version\") and roll out from there",
                assignment.name, assignment.config_name, assignment.name
            )));
        }
        let target = store
            .config_version(tenant, &request.config, request.version.unwrap_or(0))
            .await?
            .ok_or_else(|| RolloutError::NotFound(format!("no such version of config {:?}", request.config)))?;
        if let Some(live) = existing
            .iter()
            .find(|r| machine::is_live(r) && r.assignment == assignment.name)
        {
            return Err(RolloutError::Conflict(format!(
                "rollout {} is already {} on assignment {:?}; pause, abort or wait for it",
                live.id,
                machine::state_name(live.state),
                assignment.name
            )));
        }
        let records = store.agents(tenant).await?;
        let declared = crate::components::declared(target.files.values().map(|f| f.body.as_slice()));
        let mut preflight = Vec::new();
        let mut preflight_unchecked = 0u32;
        let spread_by = request.spread_by.as_deref().unwrap_or_default();
        let mut candidates = Vec::new();
        let mut previous: HashMap<Vec<u8>, Vec<u8>> = HashMap::new();
        let base = desired::base_assignments(&assignments);
        let key = assignment.config_key.as_str();
        let current = store
            .config_version(tenant, &assignment.config_name, assignment.config_version)
            .await?;
        if !key.is_empty() && target.files.len() != 1 {
            return Err(RolloutError::Invalid(format!(
                "assignment {:?} is a layer (key {key:?}): its config must have exactly one file, and {} v{} has {}",
                assignment.name,
                target.name,
                target.version,
                target.files.len()
            )));
        }
        for record in &records {
            let facts = record.into();
            let targeted = if key.is_empty() {
                desired::pick(&base, facts).is_some_and(|a| a.name == assignment.name)
            } else {
                desired::layers_for(&assignments, facts)
                    .iter()
                    .any(|a| a.name == assignment.name)
            };
            if !targeted {
                continue;
            }
            candidates.push(Candidate {
                uid: record.instance_uid.clone(),
                spread_value: spread_value(record, spread_by),
            });
            match crate::components::missing(&declared, record.available_components.as_ref()) {
                None => preflight_unchecked += 1,
                Some(missing) if !missing.is_empty() => preflight.push(PreflightFinding {
                    instance_uid: record.instance_uid.clone(),
                    missing: missing.iter().map(ToString::to_string).collect(),
                }),
                Some(_) => {}
            }
            previous.insert(
                record.instance_uid.clone(),
                previous_part(record, key, current.as_deref()),
            );
        }
        if !preflight.is_empty() && !request.allow_missing_components {
            return Err(RolloutError::Preflight(preflight_summary(&preflight)));
        }
        Ok(Targets {
            candidates,
            previous,
            preflight,
            preflight_unchecked,
            target: Rollout {
                assignment: assignment.name.clone(),
                config_name: target.name.clone(),
                config_version: target.version,
                target_hash: target.hash.clone(),
                config_key: assignment.config_key.clone(),
                ..Default::default()
            },
        })
    }

    /// The agents of connection settings a rollout moves (those that report
    /// their connection settings status, so that they can confirm), the
    /// settings each runs now, and the new ones (the stored settings' name,
    /// selector and priority with `settings`' contents).
    async fn connection_targets(
        &self,
        tenant: &TenantId,
        request: &RolloutRequest,
        settings: &ConnectionSettingsAssignment,
        existing: &[Rollout],
    ) -> Result<Targets, RolloutError> {
        let store = self.store.as_ref();
        let all = store.connection_settings(tenant).await?;
        let current = all
            .iter()
            .find(|s| s.name == request.assignment)
            .ok_or_else(|| RolloutError::NotFound(format!("no connection settings {:?}", request.assignment)))?;
        refuse_second(
            existing,
            RolloutKind::ConnectionSettings,
            "connection settings",
            &current.name,
        )?;
        let target = ConnectionSettingsAssignment {
            tenant: current.tenant.clone(),
            name: current.name.clone(),
            selector: current.selector.clone(),
            priority: current.priority,
            updated_unix_ms: now_unix_ms(),
            ..settings.clone()
        };
        let (target_hash, previous_hash) = (desired::settings_hash(&target), desired::settings_hash(current));
        if target_hash == previous_hash {
            return Err(RolloutError::Invalid(format!(
                "connection settings {:?} already are these",
                current.name
            )));
        }
        let rollout = Rollout {
            kind: RolloutKind::ConnectionSettings as i32,
            assignment: current.name.clone(),
            target_hash,
            target_connection_settings: Some(target),
            previous_connection_settings: Some(current.clone()),
            ..Default::default()
        };
        let capability = AgentCapabilities::ReportsConnectionSettingsStatus;
        Ok(self
            .picked_targets(tenant, &all, capability, request, &previous_hash, rollout)
            .await?)
    }

    /// The targets of a rollout over something picked by selector (a
    /// package set, connection settings: `target.assignment` names it among
    /// `all`): the agents for which it wins that advertise `capability`,
    /// each returning to `previous_hash` on rollback.
    async fn picked_targets<T: desired::Targeted>(
        &self,
        tenant: &TenantId,
        all: &[T],
        capability: AgentCapabilities,
        request: &RolloutRequest,
        previous_hash: &[u8],
        target: Rollout,
    ) -> Result<Targets, StoreError> {
        let spread_by = request.spread_by.as_deref().unwrap_or_default();
        let mut candidates = Vec::new();
        let mut previous = HashMap::new();
        for record in self.store.agents(tenant).await? {
            let capable = fleetplane_proto::capabilities::AgentCaps(record.capabilities).has(capability);
            if !capable || desired::pick(all, (&record).into()).is_none_or(|s| s.name() != target.assignment) {
                continue;
            }
            candidates.push(Candidate {
                uid: record.instance_uid.clone(),
                spread_value: spread_value(&record, spread_by),
            });
            previous.insert(record.instance_uid.clone(), previous_hash.to_vec());
        }
        Ok(Targets {
            candidates,
            previous,
            preflight: Vec::new(),
            preflight_unchecked: 0,
            target,
        })
    }

    /// The agents of a package set a package rollout moves (those that
    /// accept packages), what each has now, and the new contents.
    async fn package_targets(
        &self,
        tenant: &TenantId,
        request: &RolloutRequest,
        packages: &PackagesAvailable,
        existing: &[Rollout],
    ) -> Result<Targets, RolloutError> {
        let store = self.store.as_ref();
        let sets = store.package_sets(tenant).await?;
        let set = sets
            .iter()
            .find(|s| s.name == request.assignment)
            .ok_or_else(|| RolloutError::NotFound(format!("no package set {:?}", request.assignment)))?;
        refuse_second(existing, RolloutKind::Packages, "package set", &set.name)?;
        let current = set.packages.clone().unwrap_or_default();
        if current.all_packages_hash == packages.all_packages_hash {
            return Err(RolloutError::Invalid(format!(
                "package set {:?} already has these packages",
                set.name
            )));
        }
        let previous_hash = current.all_packages_hash.clone();
        let rollout = Rollout {
            kind: RolloutKind::Packages as i32,
            assignment: set.name.clone(),
            target_hash: packages.all_packages_hash.clone(),
            target_packages: Some(packages.clone()),
            previous_packages: Some(current),
            ..Default::default()
        };
        Ok(self
            .picked_targets(
                tenant,
                &sets,
                AgentCapabilities::AcceptsPackages,
                request,
                &previous_hash,
                rollout,
            )
            .await?)
    }

    /// Applies an operator command, retrying lost write races.
    pub async fn command(&self, tenant: &TenantId, id: &str, command: Command) -> Result<Rollout, RolloutError> {
        let outcome = retry_conflicts(|| async {
            let mut rollout = self
                .store
                .rollout(tenant, id)
                .await?
                .ok_or_else(|| RolloutError::NotFound(format!("no rollout {id:?}")))?;
            let events_before = rollout.events.len();
            let actions = machine::command(&mut rollout, command, now_unix_ms())?;
            rollout.updated_unix_ms = now_unix_ms();
            let rollout = self.store.put_rollout(rollout).await?;
            Ok((rollout, actions, events_before))
        })
        .await;
        let (rollout, actions, events_before) = match outcome {
            Ok(won) => won,
            Err(RolloutError::Store(StoreError::Conflict(_))) => {
                return Err(RolloutError::Conflict(format!(
                    "rollout {id} keeps changing; try again"
                )));
            }
            Err(e) => return Err(e),
        };
        // Only the winning write acts and tells.
        self.after_write(tenant, &rollout, actions, events_before).await;
        let views = self.views(tenant, &[&rollout]).await?;
        self.reconcile_pins(tenant, &rollout, views.of(rollout.kind())).await;
        Ok(rollout)
    }

    /// One pass over every tenant's rollouts.
    pub async fn tick(&self) -> Result<(), StoreError> {
        for tenant in self.store.tenants().await? {
            let now = now_unix_ms();
            // Only the newest rollout of an assignment holds its agents
            // (the list is oldest first). Owned from here on: a step changes
            // the rollout read, and the write hands it back, with no copy.
            let mut newest: BTreeMap<(i32, String), Rollout> = BTreeMap::new();
            for r in self.store.rollouts(&tenant).await? {
                newest.insert((r.kind, r.assignment.clone()), r);
            }
            let holding: Vec<Rollout> = newest.into_values().filter(|r| holds_pins(r, now)).collect();
            if holding.is_empty() {
                continue;
            }
            let views = self.views(&tenant, &holding.iter().collect::<Vec<_>>()).await?;
            for mut rollout in holding {
                let span = tracing::info_span!("rollout.step", rollout = %rollout.id, stage = rollout.stage + 1);
                let (before, events_before) = (machine::progress(&rollout), rollout.events.len());
                let actions = {
                    let _entered = span.enter();
                    let kind = rollout.kind();
                    machine::step(&mut rollout, views.of(kind), now)
                };
                let rollout = if machine::progress(&rollout) == before {
                    rollout
                } else {
                    rollout.updated_unix_ms = now;
                    match self.store.put_rollout(rollout).await {
                        Ok(stored) => {
                            self.after_write(&tenant, &stored, actions, events_before).await;
                            stored
                        }
                        // Another replica stepped it first; its result stands
                        // and is pinned from next tick.
                        Err(StoreError::Conflict(_)) => continue,
                        Err(e) => return Err(e),
                    }
                };
                self.reconcile_pins(&tenant, &rollout, views.of(rollout.kind())).await;
            }
        }
        Ok(())
    }

    /// Whether an unconfirmed offer to `agent` is due to be sent again: it
    /// changed phase more than [`RESEND_AFTER_MS`] ago, and this replica did
    /// not resend it within that long. Several replicas may each resend; an
    /// agent offered the same hash twice applies it once.
    fn resend_due(&self, rollout: &str, agent: &fleetplane_proto::internal::RolloutAgent) -> bool {
        let now = now_unix_ms();
        if now.saturating_sub(agent.changed_unix_ms) < RESEND_AFTER_MS {
            return false;
        }
        let mut resent = self.resent.lock().unwrap_or_else(|p| p.into_inner());
        if resent.len() > 100_000 {
            // Bounded: entries of long-finished rollouts go.
            resent.retain(|_, at| now.saturating_sub(*at) < 10 * RESEND_AFTER_MS);
        }
        let key = (rollout.to_owned(), agent.instance_uid.clone());
        match resent.get(&key) {
            Some(at) if now.saturating_sub(*at) < RESEND_AFTER_MS => false,
            _ => {
                resent.insert(key, now);
                true
            }
        }
    }

    /// Sets or releases pins where the agents' records differ from what the
    /// rollout's state says.
    async fn reconcile_pins(&self, tenant: &TenantId, rollout: &Rollout, views: &HashMap<Vec<u8>, AgentView>) {
        for agent in &rollout.agents {
            let expected = machine::override_for(rollout, agent).unwrap_or_default();
            let Some(view) = views.get(&agent.instance_uid) else {
                continue;
            };
            let ours = view.pinned_by == rollout.id;
            let differs = if expected.is_empty() {
                ours && !view.pinned_hash.is_empty()
            } else {
                !ours || view.pinned_hash != expected || view.pinned_key != rollout.config_key
            };
            let Ok(uid) = InstanceUid::from_slice(&agent.instance_uid) else {
                continue;
            };
            if differs {
                self.shards
                    .send(Job::Pin {
                        tenant: tenant.clone(),
                        uid,
                        rollout: rollout.id.clone(),
                        pin: pin_for(rollout, agent),
                    })
                    .await;
            } else if matches!(agent.phase(), AgentPhase::Changing | AgentPhase::Reverting)
                && view.connected
                && view.reported(&rollout.config_key) != expected
            {
                // Pinned but not there yet: the push may have died with the
                // replica that pinned it. Pushes skip offers already on their
                // way, so this mostly costs a read; but an offer the record
                // says went out may still have been lost (the replica killed
                // before its publish left the process), so one unconfirmed
                // for RESEND_AFTER is sent again, then every RESEND_AFTER.
                let job = if self.resend_due(&rollout.id, agent) {
                    Job::Resend {
                        tenant: tenant.clone(),
                        uid,
                        if_answered: false,
                    }
                } else {
                    Job::Reconcile {
                        tenant: tenant.clone(),
                        uid,
                    }
                };
                self.shards.send(job).await;
            }
        }
    }

    /// The records of the agents these rollouts hold, as the machine sees
    /// them (a config rollout by their configs, a package rollout by their
    /// packages): read by uid in chunks (one store round trip each), not by
    /// listing the tenant, so a tick costs the rollouts' agents only.
    async fn views(&self, tenant: &TenantId, rollouts: &[&Rollout]) -> Result<Views, StoreError> {
        let mut wanted: HashMap<Vec<u8>, Vec<RolloutKind>> = HashMap::new();
        for r in rollouts {
            for a in &r.agents {
                let kinds = wanted.entry(a.instance_uid.clone()).or_default();
                if !kinds.contains(&r.kind()) {
                    kinds.push(r.kind());
                }
            }
        }
        let mut uids: Vec<InstanceUid> = wanted.keys().filter_map(|u| InstanceUid::from_slice(u).ok()).collect();
        uids.sort_unstable_by(|a, b| a.as_bytes().cmp(b.as_bytes()));
        let mut views = Views::default();
        for chunk in uids.chunks(VIEW_CHUNK) {
            for record in self.store.agents_by_uid(tenant, chunk).await?.into_iter().flatten() {
                for kind in wanted.get(&record.instance_uid).into_iter().flatten() {
                    let view = match kind {
                        RolloutKind::Config => config_view(&record),
                        RolloutKind::Packages => package_view(&record),
                        RolloutKind::ConnectionSettings => connection_view(&record),
                    };
                    views
                        .0
                        .entry(*kind as i32)
                        .or_default()
                        .insert(record.instance_uid.clone(), view);
                }
            }
        }
        Ok(views)
    }

    /// What the winner of a write does, and only the winner: pin and push
    /// the agents whose desired config the transition changed (at once,
    /// without waiting for the next tick's listing), promote, tell.
    /// [`Executor::reconcile_pins`] later re-checks every pin against the
    /// stored state, so a pin lost here heals.
    async fn after_write(&self, tenant: &TenantId, rollout: &Rollout, actions: Vec<Action>, events_before: usize) {
        for action in actions {
            match action {
                Action::Push(uids) => {
                    let uids: std::collections::HashSet<&[u8]> = uids.iter().map(Vec::as_slice).collect();
                    for agent in rollout
                        .agents
                        .iter()
                        .filter(|a| uids.contains(a.instance_uid.as_slice()))
                    {
                        let Ok(uid) = InstanceUid::from_slice(&agent.instance_uid) else {
                            continue;
                        };
                        self.shards
                            .send(Job::Pin {
                                tenant: tenant.clone(),
                                uid,
                                rollout: rollout.id.clone(),
                                pin: pin_for(rollout, agent),
                            })
                            .await;
                    }
                }
                Action::Promote => {
                    if let Err(e) = self.promote(tenant, rollout).await {
                        tracing::error!(rollout = %rollout.id, error = %e, "could not point the assignment at the target");
                    }
                }
            }
        }
        self.notify(rollout, events_before).await;
    }

    async fn promote(&self, tenant: &TenantId, rollout: &Rollout) -> Result<(), StoreError> {
        match rollout.kind() {
            RolloutKind::Packages => return self.promote_packages(tenant, rollout).await,
            RolloutKind::ConnectionSettings => return self.promote_connection_settings(tenant, rollout).await,
            RolloutKind::Config => {}
        }
        let Some(mut assignment) = self
            .store
            .assignments(tenant)
            .await?
            .into_iter()
            .find(|a| a.name == rollout.assignment)
        else {
            return Ok(());
        };
        assignment.config_name = rollout.config_name.clone();
        assignment.config_version = rollout.config_version;
        assignment.updated_unix_ms = now_unix_ms();
        self.store.put_assignment(assignment).await?;
        if let Err(e) = self.bus.desired_changed(tenant).await {
            tracing::warn!(%tenant, error = %e, "could not tell the other replicas of a promotion; their caches expire within a second");
        }
        self.move_the_rest(tenant).await
    }

    /// A completed package rollout's target becomes the set's contents.
    async fn promote_packages(&self, tenant: &TenantId, rollout: &Rollout) -> Result<(), StoreError> {
        let Some(mut set) = self
            .store
            .package_sets(tenant)
            .await?
            .into_iter()
            .find(|s| s.name == rollout.assignment)
        else {
            return Ok(());
        };
        set.packages = rollout.target_packages.clone();
        set.updated_unix_ms = now_unix_ms();
        self.store.put_package_set(set).await?;
        if let Err(e) = self.bus.desired_changed(tenant).await {
            tracing::warn!(%tenant, error = %e, "could not tell the other replicas of a promotion; their caches expire within a second");
        }
        self.move_the_rest(tenant).await
    }

    /// A completed connection-settings rollout's target becomes the stored
    /// settings' contents.
    async fn promote_connection_settings(&self, tenant: &TenantId, rollout: &Rollout) -> Result<(), StoreError> {
        let stored = self.store.connection_settings(tenant).await?;
        let (Some(current), Some(target)) = (
            stored.into_iter().find(|s| s.name == rollout.assignment),
            rollout.target_connection_settings.clone(),
        ) else {
            return Ok(());
        };
        self.store
            .put_connection_settings(ConnectionSettingsAssignment {
                selector: current.selector,
                priority: current.priority,
                updated_unix_ms: now_unix_ms(),
                ..target
            })
            .await?;
        if let Err(e) = self.bus.desired_changed(tenant).await {
            tracing::warn!(%tenant, error = %e, "could not tell the other replicas of a promotion; their caches expire within a second");
        }
        self.move_the_rest(tenant).await
    }

    /// After a promotion: agents that joined during the rollout move now.
    async fn move_the_rest(&self, tenant: &TenantId) -> Result<(), StoreError> {
        for record in self.store.agents(tenant).await? {
            if record.connected
                && let Ok(uid) = InstanceUid::from_slice(&record.instance_uid)
            {
                self.shards
                    .send(Job::Reconcile {
                        tenant: tenant.clone(),
                        uid,
                    })
                    .await;
            }
        }
        Ok(())
    }

    async fn notify(&self, rollout: &Rollout, events_before: usize) {
        for event in rollout.events.iter().skip(events_before) {
            // Logged here, after the write won: a replica that lost the race
            // never logs a transition that did not happen.
            tracing::info!(rollout = %rollout.id, message = %event.message, "rollout");
            if let Ok(tenant) = TenantId::new(rollout.tenant.clone()) {
                self.events.publish(
                    &tenant,
                    "rollout",
                    &rollout.id,
                    event.message.clone(),
                    &[
                        ("state", machine::state_name(rollout.state)),
                        ("stage", &rollout.stage.to_string()),
                        ("assignment", &rollout.assignment),
                    ],
                );
            }
            crate::metrics::metrics().rollout(
                &rollout.tenant,
                &rollout.id,
                machine::state_name(rollout.state),
                rollout.stage,
            );
            let notice = RolloutNotice {
                version: ENVELOPE_VERSION,
                tenant: rollout.tenant.clone(),
                rollout_id: rollout.id.clone(),
                assignment: rollout.assignment.clone(),
                state: machine::state_name(rollout.state).to_owned(),
                stage: rollout.stage,
                message: event.message.clone(),
                unix_ms: event.unix_ms,
            };
            if let Err(e) = self.bus.rollout_notice(notice).await {
                tracing::debug!(error = %e, "rollout notice not published");
            }
        }
    }
}

fn uuid_like() -> String {
    InstanceUid::new_v7().to_string()
}

/// Rollouts whose pins need looking after: live ones, and finished ones for
/// a while (a completed rollout releases its pins; a rolled-back or aborted
/// one keeps them until a newer rollout of the assignment takes over).
fn holds_pins(r: &Rollout, now: u64) -> bool {
    machine::is_live(r) || now.saturating_sub(r.updated_unix_ms) < RECENT_MS
}

/// How long after finishing a rollout's pins are still reconciled.
const RECENT_MS: u64 = 10 * 60 * 1000;

/// Ticks rollouts until shutdown.
pub(crate) async fn run(executor: Executor, every: Duration, shutdown: CancellationToken) {
    let mut ticks = tokio::time::interval(every);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = ticks.tick() => {}
        }
        if let Err(e) = executor.tick().await {
            tracing::warn!(error = %e, "rollout tick failed; retrying next tick");
        }
    }
}

/// The phase's name for people.
pub fn phase_name(phase: i32) -> &'static str {
    match AgentPhase::try_from(phase).unwrap_or(AgentPhase::Pending) {
        AgentPhase::Pending => "PENDING",
        AgentPhase::Changing => "CHANGING",
        AgentPhase::Applied => "APPLIED",
        AgentPhase::Failed => "FAILED",
        AgentPhase::Reverting => "REVERTING",
        AgentPhase::Reverted => "REVERTED",
    }
}
