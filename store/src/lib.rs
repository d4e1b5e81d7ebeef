//! Fleetplane's store: the contract of what the coordinators keep, in
//! domain terms, its two backends, a cache in front of either, and one
//! conformance suite both backends pass.
//!
//! Implementations convert at the edge: [`embedded::EmbeddedStore`] keeps
//! everything in a redb file in the data directory (the all-in-one default);
//! [`redis::RedisStore`] is the shared store of the scaled form. All values
//! are the protobuf records of `fleetplane_proto::internal`, so every store
//! holds the same bytes. [`cached::CachedStore`] keeps what every report reads
//! and rarely changes out of the backend's round trips; [`metered::MeteredStore`]
//! times every call into a metrics sink its owner gives.

pub mod cached;
pub mod embedded;
pub mod metered;
pub mod redis;

#[cfg(test)]
mod conformance;

use std::{collections::BTreeMap, sync::Arc};

use async_trait::async_trait;
use fleetplane_proto::{
    ConfigHash, InstanceUid, TenantId,
    internal::{
        AgentRecord, ApiKey, Assignment, AuditEntry, ConfigFile, ConfigVersion, ConnectionSettingsAssignment,
        FleetEvent, PackageSet, Rollout,
    },
};

/// Why a store operation failed.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The backend (disk, database, network) failed; the operation may be
    /// retried. The backend's own error is kept as the source.
    #[error("store backend failed: {0}")]
    Backend(#[source] Box<dyn std::error::Error + Send + Sync + 'static>),
    /// A stored value does not decode: the store holds bytes this build cannot read.
    #[error("stored record {key} is corrupt: {reason}")]
    Corrupt {
        /// The record's key.
        key: String,
        /// What was wrong.
        reason: String,
    },
    /// A background task of the store has stopped (shutdown in progress).
    #[error("the store is shut down")]
    Closed,
    /// Another writer changed the record since it was read; read it again and
    /// redo the change.
    #[error("record {0} was changed by another writer")]
    Conflict(String),
    /// The store cannot be used as configured (a bad URL or key prefix).
    #[error("store configuration: {0}")]
    Config(String),
}

impl StoreError {
    /// Whether doing the same thing again can succeed: after a backend
    /// failure (a network blip, a Redis failover, a busy disk) or a lost
    /// write race (from a fresh read). A corrupt record or a closed store
    /// stays that way: retrying only repeats the error.
    ///
    /// ```
    /// # use fleetplane_store::StoreError;
    /// assert!(StoreError::Conflict("agent".into()).is_retryable());
    /// assert!(StoreError::Backend("disk full".into()).is_retryable());
    /// assert!(!StoreError::Closed.is_retryable());
    /// ```
    pub fn is_retryable(&self) -> bool {
        matches!(self, StoreError::Backend(_) | StoreError::Conflict(_))
    }
}

/// The result of creating a config version.
#[derive(Debug, Clone, PartialEq)]
pub struct CreatedVersion {
    /// The version now holding the files.
    pub version: ConfigVersion,
    /// False when the files equal the latest version's (same hash): creating
    /// is idempotent, so a retried request does not mint a new version.
    pub created: bool,
}

/// A page of a tenant's event log.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct EventPage {
    pub events: Vec<FleetEvent>,
    /// The reader's position was trimmed away (or is not an id of this
    /// log): events were missed, and it must start over.
    pub lagged: bool,
}

/// An event id, `<unix_ms>-<sequence>` (the form Redis stream ids take), as
/// a pair that orders like the log.
pub fn parse_event_id(id: &str) -> Option<(u64, u64)> {
    let (ms, seq) = id.split_once('-')?;
    Some((ms.parse().ok()?, seq.parse().ok()?))
}

/// Durable state of the coordinator.
#[async_trait]
pub trait Store: Send + Sync + std::fmt::Debug + 'static {
    /// Whether the store answers now (for readiness probes).
    async fn ping(&self) -> Result<(), StoreError> {
        Ok(())
    }

    /// One agent's record, with `revision` set to the stored revision.
    async fn agent(&self, tenant: &TenantId, uid: &InstanceUid) -> Result<Option<AgentRecord>, StoreError>;

    /// Writes one agent's record if nobody else wrote it since it was read:
    /// the stored revision must equal `record.revision` (0 for an agent not
    /// stored yet), and becomes `record.revision + 1`. Otherwise nothing is
    /// written and [`StoreError::Conflict`] tells the caller to re-read.
    async fn put_agent(&self, record: AgentRecord) -> Result<(), StoreError>;

    /// Many agents of one tenant, in the order of `uids` (`None`: unknown),
    /// each with its stored revision. A remote store reads them in one round
    /// trip; this default reads them one by one, which suits a local store.
    async fn agents_by_uid(
        &self,
        tenant: &TenantId,
        uids: &[InstanceUid],
    ) -> Result<Vec<Option<AgentRecord>>, StoreError> {
        let mut records = Vec::with_capacity(uids.len());
        for uid in uids {
            records.push(self.agent(tenant, uid).await?);
        }
        Ok(records)
    }

    /// Writes many agent records, each a compare-and-set on its revision as
    /// in [`Store::put_agent`]; per record `Ok` or [`StoreError::Conflict`],
    /// in order. A remote store writes them in one round trip; this default
    /// writes them concurrently, so a store that commits in groups commits
    /// them together. A backend failure fails the whole call (some records
    /// may have been written, each atomically).
    async fn put_agents(&self, records: Vec<AgentRecord>) -> Result<Vec<Result<(), StoreError>>, StoreError> {
        let written = futures_util::future::join_all(records.into_iter().map(|r| self.put_agent(r))).await;
        let mut outcomes = Vec::with_capacity(written.len());
        for result in written {
            match result {
                Err(StoreError::Conflict(key)) => outcomes.push(Err(StoreError::Conflict(key))),
                Err(e) => return Err(e),
                Ok(()) => outcomes.push(Ok(())),
            }
        }
        Ok(outcomes)
    }

    /// Removes an agent (for example after it was given a new instance uid).
    async fn remove_agent(&self, tenant: &TenantId, uid: &InstanceUid) -> Result<(), StoreError>;

    /// Every tenant that has at least one agent.
    async fn tenants(&self) -> Result<Vec<TenantId>, StoreError>;

    /// Every agent of a tenant.
    async fn agents(&self, tenant: &TenantId) -> Result<Vec<AgentRecord>, StoreError>;

    /// Stores `files` as the next version of config `name` (version 1 for a
    /// new name), unless they equal the latest version. Atomic: two concurrent
    /// creators never get the same version number.
    async fn create_config_version(
        &self,
        tenant: &TenantId,
        name: &str,
        files: BTreeMap<String, ConfigFile>,
        now_unix_ms: u64,
    ) -> Result<CreatedVersion, StoreError>;

    /// One version of a config; `version == 0` means the latest. Shared
    /// (`Arc`): versions are immutable, and the report path reads one per
    /// report, file bodies and all.
    async fn config_version(
        &self,
        tenant: &TenantId,
        name: &str,
        version: u32,
    ) -> Result<Option<Arc<ConfigVersion>>, StoreError>;

    /// Every version of a config, oldest first.
    async fn config_versions(&self, tenant: &TenantId, name: &str) -> Result<Vec<ConfigVersion>, StoreError>;

    /// The names of all configs of a tenant, sorted.
    async fn config_names(&self, tenant: &TenantId) -> Result<Vec<String>, StoreError>;

    /// The config version with this hash, if any.
    async fn config_by_hash(
        &self,
        tenant: &TenantId,
        hash: &ConfigHash,
    ) -> Result<Option<Arc<ConfigVersion>>, StoreError>;

    /// Creates or replaces an assignment.
    async fn put_assignment(&self, assignment: Assignment) -> Result<(), StoreError>;

    /// Deletes an assignment; false when there was none.
    async fn remove_assignment(&self, tenant: &TenantId, name: &str) -> Result<bool, StoreError>;

    /// Every assignment of a tenant, sorted by name.
    async fn assignments(&self, tenant: &TenantId) -> Result<Vec<Assignment>, StoreError>;

    /// Creates or replaces a connection-settings assignment.
    async fn put_connection_settings(&self, settings: ConnectionSettingsAssignment) -> Result<(), StoreError>;

    /// Removes one; false if there was none.
    async fn remove_connection_settings(&self, tenant: &TenantId, name: &str) -> Result<bool, StoreError>;

    /// Every connection-settings assignment of a tenant.
    async fn connection_settings(&self, tenant: &TenantId) -> Result<Vec<ConnectionSettingsAssignment>, StoreError>;

    /// Creates or replaces a package set.
    async fn put_package_set(&self, set: PackageSet) -> Result<(), StoreError>;

    /// Removes one; false if there was none.
    async fn remove_package_set(&self, tenant: &TenantId, name: &str) -> Result<bool, StoreError>;

    /// Every package set of a tenant.
    async fn package_sets(&self, tenant: &TenantId) -> Result<Vec<PackageSet>, StoreError>;

    /// One rollout, with `revision` set.
    async fn rollout(&self, tenant: &TenantId, id: &str) -> Result<Option<Rollout>, StoreError>;

    /// Every rollout of a tenant (the history included), oldest first.
    async fn rollouts(&self, tenant: &TenantId) -> Result<Vec<Rollout>, StoreError>;

    /// Writes a rollout if nobody wrote it since it was read (compare-and-set
    /// on `revision`, as [`Store::put_agent`]): this is what makes each
    /// transition happen once when several coordinators step a rollout.
    /// Returns the rollout as stored, its revision advanced, so that a caller
    /// that goes on with it (the executor acting on a transition) keeps no
    /// copy of its own.
    async fn put_rollout(&self, rollout: Rollout) -> Result<Rollout, StoreError>;

    /// Creates or replaces an agent API key (revoking is a replace).
    async fn put_api_key(&self, key: ApiKey) -> Result<(), StoreError>;

    /// One API key by its public id, whatever its tenant.
    async fn api_key(&self, id: &str) -> Result<Option<ApiKey>, StoreError>;

    /// Every API key of a tenant, revoked ones included, sorted by id.
    async fn api_keys(&self, tenant: &TenantId) -> Result<Vec<ApiKey>, StoreError>;

    /// Appends an entry to its tenant's audit log, which is never rewritten.
    async fn append_audit(&self, entry: AuditEntry) -> Result<(), StoreError>;

    /// A tenant's newest audit entries, newest first, at most `limit`.
    async fn audit(&self, tenant: &TenantId, limit: usize) -> Result<Vec<AuditEntry>, StoreError>;

    /// Appends events to the tenant's event log, each given the next id,
    /// keeping about the newest `retain`.
    async fn append_events(&self, tenant: &TenantId, events: Vec<FleetEvent>, retain: usize) -> Result<(), StoreError>;

    /// Up to `limit` events after the one with id `after` (`None`: from the
    /// oldest kept). [`EventPage::lagged`] when `after` is no longer in the
    /// log (trimmed, or never one of this tenant's ids).
    async fn events_after(&self, tenant: &TenantId, after: Option<&str>, limit: usize)
    -> Result<EventPage, StoreError>;

    /// The id of the tenant's newest event, if any.
    async fn latest_event_id(&self, tenant: &TenantId) -> Result<Option<String>, StoreError>;
}

/// The hash of a set of config files, as agents will see it.
pub fn files_hash(files: &BTreeMap<String, ConfigFile>) -> ConfigHash {
    ConfigHash::of_config(&to_agent_config(files))
}

/// Converts stored files to the OpAMP config map sent to agents.
pub fn to_agent_config(files: &BTreeMap<String, ConfigFile>) -> fleetplane_proto::opamp::AgentConfigMap {
    fleetplane_proto::opamp::AgentConfigMap {
        config_map: files
            .iter()
            .map(|(name, file)| {
                (
                    name.clone(),
                    fleetplane_proto::opamp::AgentConfigFile {
                        body: file.body.clone(),
                        content_type: file.content_type.clone(),
                        role: String::new(),
                    },
                )
            })
            .collect(),
    }
}
