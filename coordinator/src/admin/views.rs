//! The JSON shapes of the admin API (documented in `docs/admin-api.yaml`).
//! Protobuf records are converted here and nowhere else.

use std::collections::BTreeMap;

use fleetplane_proto::{
    attributes::value_text,
    internal::{AgentRecord, Assignment, ConfigVersion, Transport},
    opamp::{AgentCapabilities, ComponentHealth, KeyValue, PackageStatusEnum, RemoteConfigStatuses},
};
use serde::{Deserialize, Serialize};

use crate::desired::Desired;

/// One file of a config, as the API takes and shows it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct FileView {
    /// The file's content as UTF-8 text.
    pub body: String,
    /// MIME type, e.g. `text/yaml`.
    #[serde(default)]
    pub content_type: String,
}

impl FileView {
    /// A file as text (bytes that are not UTF-8 show as replacement characters).
    pub fn new(body: &[u8], content_type: &str) -> Self {
        Self {
            body: String::from_utf8_lossy(body).into_owned(),
            content_type: content_type.to_owned(),
        }
    }
}

/// Body of `POST /api/v1/configs/{name}/versions`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NewConfigVersion {
    /// File name → file. A single-file agent may use the empty name.
    pub files: BTreeMap<String, FileView>,
}

/// A config version.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ConfigVersionView {
    pub name: String,
    pub version: u32,
    /// Hex SHA-256, as agents report it.
    pub hash: String,
    pub created_unix_ms: u64,
    /// Present when one version is shown, absent in lists.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub files: Option<BTreeMap<String, FileView>>,
    /// On creation: false when the files equalled the latest version.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub created: Option<bool>,
}

impl ConfigVersionView {
    pub fn new(v: &ConfigVersion, with_files: bool) -> Self {
        Self {
            name: v.name.clone(),
            version: v.version,
            hash: hex::encode(&v.hash),
            created_unix_ms: v.created_unix_ms,
            files: with_files.then(|| {
                v.files
                    .iter()
                    .map(|(name, f)| (name.clone(), FileView::new(&f.body, &f.content_type)))
                    .collect()
            }),
            created: None,
        }
    }
}

/// Body of `PUT /api/v1/assignments/{name}`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AssignmentRequest {
    /// Label selector; empty matches every agent.
    #[serde(default)]
    pub selector: String,
    /// Name of the config to run.
    pub config: String,
    /// Pinned version; absent follows the latest version.
    #[serde(default)]
    pub version: Option<u32>,
    /// Higher wins when several assignments match an agent.
    #[serde(default)]
    pub priority: i32,
    /// A layer: the config's one file goes under this config-map key, next
    /// to the agent's other keys. Absent: the config is the whole map.
    #[serde(default)]
    pub key: Option<String>,
    /// Assign although the pre-flight check found agents whose component
    /// inventory lacks a component the config declares (otherwise: 409,
    /// nothing changes).
    #[serde(default)]
    pub allow_missing_components: bool,
}

/// An assignment.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct AssignmentView {
    pub name: String,
    pub selector: String,
    pub config: String,
    /// Absent when following the latest version.
    pub version: Option<u32>,
    pub priority: i32,
    pub updated_unix_ms: u64,
    /// The config-map key of a layer; absent for a whole-config assignment.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key: Option<String>,
}

impl From<&Assignment> for AssignmentView {
    fn from(a: &Assignment) -> Self {
        Self {
            name: a.name.clone(),
            selector: a.selector.clone(),
            config: a.config_name.clone(),
            version: (a.config_version != 0).then_some(a.config_version),
            priority: a.priority,
            updated_unix_ms: a.updated_unix_ms,
            key: (!a.config_key.is_empty()).then(|| a.config_key.clone()),
        }
    }
}

/// What an agent last said about the remote config it was sent.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct RemoteConfigView {
    pub hash: String,
    /// UNSET, APPLYING, APPLIED or FAILED.
    pub status: String,
    /// The agent's own error text when FAILED.
    pub error_message: String,
}

/// The config an agent should run.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct DesiredView {
    pub assignment: String,
    pub config: String,
    pub version: u32,
    pub hash: String,
    /// The rollout holding this agent, if one overrides the assignment.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rollout: Option<String>,
    /// Layers (keyed assignments) adding keys; `hash` covers them all.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub layers: Vec<String>,
}

impl From<&Desired> for DesiredView {
    fn from(d: &Desired) -> Self {
        Self {
            assignment: d.assignment.clone(),
            config: d.config.name.clone(),
            version: d.config.version,
            hash: hex::encode(&d.config.hash),
            rollout: d.rollout.clone(),
            layers: d.layers.clone(),
        }
    }
}

/// A component's health, recursively.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct HealthView {
    pub healthy: bool,
    pub status: String,
    pub last_error: String,
    pub start_time_unix_nano: u64,
    pub status_time_unix_nano: u64,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub components: BTreeMap<String, HealthView>,
}

impl From<&ComponentHealth> for HealthView {
    fn from(h: &ComponentHealth) -> Self {
        Self {
            healthy: h.healthy,
            status: h.status.clone(),
            last_error: h.last_error.clone(),
            start_time_unix_nano: h.start_time_unix_nano,
            status_time_unix_nano: h.status_time_unix_nano,
            components: h
                .component_health_map
                .iter()
                .map(|(k, v)| (k.clone(), v.into()))
                .collect(),
        }
    }
}

/// One package on an agent.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct PackageView {
    pub version: String,
    pub status: String,
    pub error_message: String,
}

/// An agent, as lists show it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct AgentSummary {
    pub instance_uid: String,
    pub connected: bool,
    /// websocket or http.
    pub transport: String,
    pub gateway_id: String,
    pub first_seen_unix_ms: u64,
    pub last_seen_unix_ms: u64,
    pub identifying_attributes: BTreeMap<String, String>,
    pub non_identifying_attributes: BTreeMap<String, String>,
    pub healthy: Option<bool>,
    pub remote_config: Option<RemoteConfigView>,
    pub desired_config: Option<DesiredView>,
}

/// An agent in full.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct AgentDetail {
    #[serde(flatten)]
    pub summary: AgentSummary,
    pub sequence_num: u64,
    pub capabilities: u64,
    /// Names of the capability bits set, as the spec spells them.
    pub capability_names: Vec<String>,
    pub health: Option<HealthView>,
    /// The config the agent reports running, by key; alternative views are
    /// listed in `redacted_views` instead.
    pub effective_config: Option<BTreeMap<String, FileView>>,
    /// Reported keys that are alternative views of the config (the
    /// Collector's `raw`, which may hold literal secrets): their content is
    /// never stored nor shown.
    #[serde(default)]
    pub redacted_views: Vec<String>,
    /// Drift: how each config key compares with what the agent reports
    /// (`in_sync`, `differs`, `not_reported`, `unmanaged`,
    /// `merged_by_agent`); empty when there is nothing to compare.
    #[serde(default)]
    pub config_keys: BTreeMap<String, String>,
    pub packages: BTreeMap<String, PackageView>,
    pub custom_capabilities: Vec<String>,
    pub available_components_hash: Option<String>,
    /// Component kinds (`receivers`, `processors`, ...) with the component
    /// types the agent has, once it sent its full inventory.
    #[serde(default)]
    pub available_components: BTreeMap<String, Vec<String>>,
    /// A restart asked for and not yet sent, since when.
    #[serde(default)]
    pub pending_restart_since_unix_ms: Option<u64>,
    /// A custom message (`capability/type`) waiting to be sent.
    #[serde(default)]
    pub pending_custom_message: Option<String>,
    /// Connection settings last offered, and what the agent reported.
    #[serde(default)]
    pub connection_settings: Option<ConnectionSettingsStatusView>,
}

/// Connection settings of one agent: offered and reported hashes, status.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ConnectionSettingsStatusView {
    pub offered_hash: String,
    pub reported_hash: String,
    /// APPLIED, APPLYING, FAILED, UNSET (not reported).
    pub status: String,
    pub error_message: String,
}

/// Agents running one config hash, by status.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ConfigStatusView {
    /// The hash agents report (empty: agents that never reported one).
    pub hash: String,
    /// The config version with this hash, if it is one of ours.
    pub config: Option<String>,
    pub version: Option<u32>,
    /// Status name → number of agents.
    pub statuses: BTreeMap<String, usize>,
    pub agents: Vec<ConfigStatusAgent>,
}

/// One agent in a [`ConfigStatusView`].
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ConfigStatusAgent {
    pub instance_uid: String,
    pub status: String,
    pub error_message: String,
    pub connected: bool,
}

fn attributes(list: &[KeyValue]) -> BTreeMap<String, String> {
    list.iter()
        .map(|kv| (kv.key.clone(), kv.value.as_ref().map(value_text).unwrap_or_default()))
        .collect()
}

/// `RemoteConfigStatuses_APPLIED` → `APPLIED`.
pub fn status_name(status: i32) -> String {
    RemoteConfigStatuses::try_from(status)
        .map(|s| s.as_str_name().trim_start_matches("RemoteConfigStatuses_").to_owned())
        .unwrap_or_else(|_| format!("UNKNOWN({status})"))
}

pub fn transport_name(transport: i32) -> String {
    match Transport::try_from(transport) {
        Ok(Transport::Websocket) => "websocket",
        Ok(Transport::Http) => "http",
        _ => "unknown",
    }
    .to_owned()
}

fn capability_names(bits: u64) -> Vec<String> {
    (0..64)
        .map(|i| 1u64 << i)
        .filter(|bit| bits & bit != 0)
        .map(|bit| {
            i32::try_from(bit)
                .ok()
                .and_then(|b| AgentCapabilities::try_from(b).ok())
                .map(|c| c.as_str_name().trim_start_matches("AgentCapabilities_").to_owned())
                .unwrap_or_else(|| format!("0x{bit:x}"))
        })
        .collect()
}

pub fn summary(record: &AgentRecord, desired: Option<&Desired>) -> AgentSummary {
    let description = record.description.clone().unwrap_or_default();
    AgentSummary {
        instance_uid: hex::encode(&record.instance_uid),
        connected: record.connected,
        transport: transport_name(record.transport),
        gateway_id: record.gateway_id.clone(),
        first_seen_unix_ms: record.first_seen_unix_ms,
        last_seen_unix_ms: record.last_seen_unix_ms,
        identifying_attributes: attributes(&description.identifying_attributes),
        non_identifying_attributes: attributes(&description.non_identifying_attributes),
        healthy: record.health.as_ref().map(|h| h.healthy),
        remote_config: record.remote_config_status.as_ref().map(|s| RemoteConfigView {
            hash: hex::encode(&s.last_remote_config_hash),
            status: status_name(s.status),
            error_message: s.error_message.clone(),
        }),
        desired_config: desired.map(DesiredView::from),
    }
}

pub fn detail(record: &AgentRecord, desired: Option<&Desired>) -> AgentDetail {
    let reported = record.effective_config.as_ref().and_then(|e| e.config_map.as_ref());
    AgentDetail {
        summary: summary(record, desired),
        sequence_num: record.sequence_num,
        capabilities: record.capabilities,
        capability_names: capability_names(record.capabilities),
        health: record.health.as_ref().map(HealthView::from),
        effective_config: reported.map(|map| {
            map.config_map
                .iter()
                .filter(|(name, _)| !crate::drift::is_alternative_view(name))
                .map(|(name, f)| (name.clone(), FileView::new(&f.body, &f.content_type)))
                .collect()
        }),
        redacted_views: reported
            .map(|map| {
                map.config_map
                    .keys()
                    .filter(|name| crate::drift::is_alternative_view(name))
                    .cloned()
                    .collect()
            })
            .unwrap_or_default(),
        config_keys: crate::drift::per_key(desired.map(|d| &d.config.files), reported)
            .into_iter()
            .map(|(key, state)| (key, state.name().to_owned()))
            .collect(),
        packages: record
            .package_statuses
            .as_ref()
            .map(|p| {
                p.packages
                    .iter()
                    .map(|(name, s)| {
                        let status = PackageStatusEnum::try_from(s.status)
                            .map(|e| e.as_str_name().trim_start_matches("PackageStatusEnum_").to_owned())
                            .unwrap_or_else(|_| s.status.to_string());
                        (
                            name.clone(),
                            PackageView {
                                version: s.agent_has_version.clone(),
                                status,
                                error_message: s.error_message.clone(),
                            },
                        )
                    })
                    .collect()
            })
            .unwrap_or_default(),
        custom_capabilities: record
            .custom_capabilities
            .as_ref()
            .map(|c| c.capabilities.clone())
            .unwrap_or_default(),
        available_components_hash: record.available_components.as_ref().map(|a| hex::encode(&a.hash)),
        available_components: record
            .available_components
            .as_ref()
            .map(|a| {
                a.components
                    .iter()
                    .map(|(kind, details)| (kind.clone(), details.sub_component_map.keys().cloned().collect()))
                    .collect()
            })
            .unwrap_or_default(),
        pending_restart_since_unix_ms: record
            .pending_command
            .is_some()
            .then_some(record.pending_command_unix_ms),
        connection_settings: (!record.offered_connection_settings_hash.is_empty()
            || record.connection_settings_status.is_some())
        .then(|| {
            let status = record.connection_settings_status.clone().unwrap_or_default();
            ConnectionSettingsStatusView {
                offered_hash: hex::encode(&record.offered_connection_settings_hash),
                reported_hash: hex::encode(&status.last_connection_settings_hash),
                status: fleetplane_proto::opamp::ConnectionSettingsStatuses::try_from(status.status)
                    .map(|s| {
                        s.as_str_name()
                            .trim_start_matches("ConnectionSettingsStatuses_")
                            .to_owned()
                    })
                    .unwrap_or_else(|_| format!("UNKNOWN({})", status.status)),
                error_message: status.error_message,
            }
        }),
        pending_custom_message: record
            .pending_custom_message
            .as_ref()
            .map(|m| format!("{}/{}", m.capability, m.r#type)),
    }
}

/// One audit log entry.
#[derive(Debug, Serialize)]
pub struct AuditView {
    pub unix_ms: u64,
    pub actor: String,
    pub action: String,
    pub status: u32,
    #[serde(skip_serializing_if = "String::is_empty")]
    pub detail: String,
}

impl From<&fleetplane_proto::internal::AuditEntry> for AuditView {
    fn from(entry: &fleetplane_proto::internal::AuditEntry) -> Self {
        Self {
            unix_ms: entry.unix_ms,
            actor: entry.actor.clone(),
            action: entry.action.clone(),
            status: entry.status,
            detail: entry.detail.clone(),
        }
    }
}
