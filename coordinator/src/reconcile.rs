//! Deciding what an agent must receive: compare what it reports with what it
//! should have, every time (level-triggered).
//!
//! Offers are sent only when the agent's reported hash differs from the
//! desired one (spec 4.C.18), and decided on the hash alone, never the status:
//! an agent that reports FAILED for the current hash is not sent the same config
//! again and again. For agents that do not report a hash (no
//! `ReportsRemoteConfig` / `ReportsConnectionSettingsStatus`), the hash last
//! offered stands in for it, so they get each offer once.

use std::time::Duration;

use fleetplane_proto::{
    Message,
    capabilities::{AgentCaps, ServerCaps},
    internal::{AgentRecord, ConfigVersion, ConnectionSettingsAssignment, PackageSet},
    opamp::{
        AgentCapabilities, AgentRemoteConfig, ConnectionSettingsOffers, CustomCapabilities, PackagesAvailable,
        ServerCapabilities, ServerToAgent, ServerToAgentCommand, ServerToAgentFlags,
    },
};
use sha2::{Digest, Sha256};

use crate::{inventory::Merged, store::to_agent_config};

/// What the server advertises: it accepts status, offers remote config and
/// connection settings (the heartbeat interval), and accepts effective config
/// and package statuses.
pub fn server_capabilities() -> ServerCaps {
    ServerCaps::of(&[
        ServerCapabilities::AcceptsStatus,
        ServerCapabilities::OffersRemoteConfig,
        ServerCapabilities::AcceptsEffectiveConfig,
        ServerCapabilities::AcceptsPackagesStatus,
        ServerCapabilities::OffersConnectionSettings,
        ServerCapabilities::OffersPackages,
    ])
}

/// What an agent is offered besides its config, as selectors decide.
#[derive(Debug, Clone, Copy, Default)]
pub struct Extras<'a> {
    pub connection: Option<&'a ConnectionSettingsAssignment>,
    pub packages: Option<&'a PackageSet>,
}

/// Server-wide settings that shape replies.
#[derive(Debug, Clone)]
pub struct ReplySettings {
    /// Heartbeat interval offered to agents that accept OpAMP connection
    /// settings and report heartbeats. Zero: offer nothing (agents keep theirs).
    pub heartbeat_interval: Duration,
    /// Issuing CAs for agents' certificate requests (none: not offered).
    pub issuers: crate::certificates::Issuers,
}

/// The offers an agent is missing, as a reply or push. Updates the record's
/// "offered" hashes. `merged` is `None` for a server-initiated push, which
/// leaves out a config already offered (replies do not: they heal).
pub fn plan(
    record: &mut AgentRecord,
    desired: Option<&ConfigVersion>,
    extras: Extras<'_>,
    merged: Option<&Merged>,
    settings: &ReplySettings,
) -> ServerToAgent {
    let caps = AgentCaps(record.capabilities);
    let mut reply = ServerToAgent {
        instance_uid: record.instance_uid.clone(),
        capabilities: server_capabilities().bits()
            | if settings.issuers.issues_for(&record.tenant) {
                ServerCapabilities::AcceptsConnectionSettingsRequest as u64
            } else {
                0
            },
        ..Default::default()
    };
    if merged.is_some_and(|m| m.disconnected || m.stale) {
        return reply;
    }
    if let Some(command) = take_command(record) {
        // Alone: an agent ignores everything else a command comes with
        // (spec 4.I.46); the rest follows on its next report or push.
        reply.command = Some(command);
        return reply;
    }
    if merged.is_some_and(|m| m.full_state_needed) {
        reply.flags |= ServerToAgentFlags::ReportFullState as u64;
    }
    if merged.is_some_and(|m| m.components_needed) {
        reply.flags |= ServerToAgentFlags::ReportAvailableComponents as u64;
    }
    if let Some(message) = record.pending_custom_message.take() {
        let listed = agent_custom_capabilities(record);
        if listed.contains(&message.capability) {
            // Restating the agent's list as ours: Fleetplane relays every
            // capability the agent has, which both sides must have listed.
            reply.custom_capabilities = Some(CustomCapabilities { capabilities: listed });
            reply.custom_message = Some(message);
        }
    }
    if let Some(config) = desired.filter(|_| caps.has(AgentCapabilities::AcceptsRemoteConfig)) {
        let reported = if caps.has(AgentCapabilities::ReportsRemoteConfig) {
            record
                .remote_config_status
                .as_ref()
                .map(|s| s.last_remote_config_hash.as_slice())
                .unwrap_or_default()
        } else {
            record.offered_config_hash.as_slice()
        };
        // A push repeats nothing already on its way; replies re-offer until
        // the agent reports the hash (that is what heals a lost offer).
        let already_pushed = merged.is_none() && record.offered_config_hash == config.hash;
        // An agent last offered another hash (a rollout's target, since
        // rolled back) still has that as its instruction, even if it never
        // reported it: it must be sent its desired config again, or it
        // applies the rolled-back one whenever it wakes up.
        let offered_other = !record.offered_config_hash.is_empty() && record.offered_config_hash != config.hash;
        if (reported != config.hash.as_slice() || offered_other) && !already_pushed {
            reply.remote_config = Some(AgentRemoteConfig {
                config: Some(to_agent_config(&config.files)),
                config_hash: config.hash.clone(),
            });
            record.offered_config_hash = config.hash.clone();
        }
    }
    if let Some(offer) = packages_offer(record, extras.packages, merged.is_none()) {
        reply.packages_available = Some(offer);
    }
    if let Some(offers) = connection_offer(record, extras.connection, settings) {
        let reported = if caps.has(AgentCapabilities::ReportsConnectionSettingsStatus) {
            record
                .connection_settings_status
                .as_ref()
                .map(|s| s.last_connection_settings_hash.as_slice())
                .unwrap_or_default()
        } else {
            record.offered_connection_settings_hash.as_slice()
        };
        // What the agent runs (or is now sent) is built from these settings.
        record.offered_connection_source_hash =
            extras.connection.map(crate::desired::settings_hash).unwrap_or_default();
        if reported != offers.hash.as_slice() {
            record.offered_connection_settings_hash = offers.hash.clone();
            reply.connection_settings = Some(offers);
        }
    }
    reply
}

/// The pending restart, if the agent (still) accepts one; taken either way,
/// so a command the agent stopped accepting is not kept forever.
fn take_command(record: &mut AgentRecord) -> Option<ServerToAgentCommand> {
    let command = record.pending_command.take()?;
    record.pending_command_unix_ms = 0;
    AgentCaps(record.capabilities)
        .has(AgentCapabilities::AcceptsRestartCommand)
        .then_some(command)
}

/// The custom capabilities the agent last listed (none if it never did).
pub fn agent_custom_capabilities(record: &AgentRecord) -> Vec<String> {
    record
        .custom_capabilities
        .as_ref()
        .map(|c| c.capabilities.clone())
        .unwrap_or_default()
}

/// Whether a plan has anything for a server-initiated push to carry.
pub fn worth_pushing(message: &ServerToAgent) -> bool {
    message.remote_config.is_some()
        || message.connection_settings.is_some()
        || message.packages_available.is_some()
        || message.command.is_some()
        || message.custom_message.is_some()
}

/// The package set for this agent, if it takes packages and has not reported
/// (or, without PackageStatuses, been offered) this set (spec 4.H.42). A
/// push leaves out a set already on its way. Never an empty set: agents
/// remove what is not offered.
fn packages_offer(record: &mut AgentRecord, set: Option<&PackageSet>, push: bool) -> Option<PackagesAvailable> {
    let offer = set?.packages.as_ref().filter(|p| !p.packages.is_empty())?;
    if !AgentCaps(record.capabilities).has(AgentCapabilities::AcceptsPackages) {
        return None;
    }
    let reported = record
        .package_statuses
        .as_ref()
        .map(|s| s.server_provided_all_packages_hash.as_slice())
        .filter(|h| !h.is_empty())
        .unwrap_or(record.offered_packages_hash.as_slice());
    let already_pushed = push && record.offered_packages_hash == offer.all_packages_hash;
    if reported == offer.all_packages_hash.as_slice() || already_pushed {
        return None;
    }
    record.offered_packages_hash = offer.all_packages_hash.clone();
    Some(offer.clone())
}

/// The connection settings offer for this agent, if it may receive any:
/// each part only where the agent advertises the capability for it (spec
/// 4.G). The `opamp` part always restates what the agent must keep using:
/// the endpoint (the one it used, unless the operator names another; never
/// empty), and the heartbeat interval for agents that report heartbeats,
/// because an offer without it would switch heartbeats off (spec 4.D.20).
fn connection_offer(
    record: &AgentRecord,
    connection: Option<&ConnectionSettingsAssignment>,
    settings: &ReplySettings,
) -> Option<ConnectionSettingsOffers> {
    let caps = AgentCaps(record.capabilities);
    let mut offers = ConnectionSettingsOffers::default();
    if let Some(c) = connection {
        if caps.has(AgentCapabilities::ReportsOwnMetrics) {
            offers.own_metrics = c.own_metrics.clone();
        }
        if caps.has(AgentCapabilities::ReportsOwnTraces) {
            offers.own_traces = c.own_traces.clone();
        }
        if caps.has(AgentCapabilities::ReportsOwnLogs) {
            offers.own_logs = c.own_logs.clone();
        }
        if caps.has(AgentCapabilities::AcceptsOtherConnectionSettings) {
            offers.other_connections = c.other_connections.clone();
        }
    }
    let custom = connection.and_then(|c| c.opamp.as_ref());
    let interval = custom
        .map(|o| o.heartbeat_interval_seconds)
        .filter(|i| *i > 0)
        .unwrap_or(settings.heartbeat_interval.as_secs());
    let heartbeats = caps.has(AgentCapabilities::ReportsHeartbeat);
    let certificate = record.issued_certificate.as_ref();
    if caps.has(AgentCapabilities::AcceptsOpAmpConnectionSettings)
        && (custom.is_some() || certificate.is_some() || (heartbeats && interval > 0))
    {
        let mut opamp = custom.cloned().unwrap_or_default();
        // Restated in every offer once issued: an offer without it tells the
        // agent to stop using its client certificate.
        opamp.certificate = certificate.cloned();
        if opamp.destination_endpoint.is_empty() {
            opamp.destination_endpoint = record.endpoint.clone();
        }
        opamp.heartbeat_interval_seconds = match (heartbeats, interval) {
            (false, _) => 0,
            // The spec's default, rather than switching heartbeats off.
            (true, 0) => 30,
            (true, interval) => interval,
        };
        if !opamp.destination_endpoint.is_empty() {
            offers.opamp = Some(opamp);
        }
    }
    if offers == ConnectionSettingsOffers::default() {
        return None;
    }
    let heartbeat_only = custom.is_none()
        && certificate.is_none()
        && connection.is_none_or(|c| {
            c.own_metrics.is_none() && c.own_traces.is_none() && c.own_logs.is_none() && c.other_connections.is_empty()
        });
    offers.hash = offers_hash(&offers, heartbeat_only);
    Some(offers)
}

/// The hash of an offer. A heartbeat-only offer keeps the hash earlier
/// versions gave it (endpoint and interval), so upgrading Fleetplane does not
/// re-offer every agent its unchanged settings (which makes a Supervisor
/// reconnect to verify them).
///
/// A server-generated certificate's private key is left out: the record drops
/// it once the agent connects with the certificate, and that must not look
/// like new settings to offer again.
fn offers_hash(offers: &ConnectionSettingsOffers, heartbeat_only: bool) -> Vec<u8> {
    let mut hasher = Sha256::new();
    match (&offers.opamp, heartbeat_only) {
        (Some(opamp), true) => {
            hasher.update(opamp.destination_endpoint.as_bytes());
            hasher.update(opamp.heartbeat_interval_seconds.to_le_bytes());
        }
        (Some(opamp), false) if opamp.certificate.as_ref().is_some_and(|c| !c.private_key.is_empty()) => {
            let mut keyless = offers.clone();
            if let Some(certificate) = keyless.opamp.as_mut().and_then(|o| o.certificate.as_mut()) {
                certificate.private_key.clear();
            }
            hasher.update(keyless.encode_to_vec());
        }
        _ => hasher.update(offers.encode_to_vec()),
    }
    hasher.finalize().to_vec()
}

#[cfg(test)]
mod tests;
