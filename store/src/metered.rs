//! A [`Store`] decorator that times every operation (a span, and a call to
//! the owner's metrics sink), so store latency and errors are visible
//! whichever store is configured. The sink is the caller's, so this crate
//! stays free of any metrics library.

use std::{collections::BTreeMap, future::Future, sync::Arc};

use tokio::time::Instant;

use async_trait::async_trait;
use fleetplane_proto::{
    ConfigHash, InstanceUid, TenantId,
    internal::{
        AgentRecord, ApiKey, Assignment, AuditEntry, ConfigFile, ConfigVersion, ConnectionSettingsAssignment,
        FleetEvent, PackageSet, Rollout,
    },
};
use tracing::Instrument;

use super::{CreatedVersion, EventPage, Store, StoreError};

/// Where timings go: the operation (`agent.put`), its outcome (`ok`,
/// `conflict`, `error`) and its duration in seconds.
pub type Sink = Arc<dyn Fn(&'static str, &'static str, f64) + Send + Sync>;

/// Wraps a store with timing.
pub struct MeteredStore {
    inner: Arc<dyn Store>,
    sink: Sink,
}

impl std::fmt::Debug for MeteredStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MeteredStore").field("inner", &self.inner).finish()
    }
}

impl MeteredStore {
    /// Times `inner`, reporting each operation to `sink`.
    pub fn new(inner: Arc<dyn Store>, sink: Sink) -> Self {
        Self { inner, sink }
    }

    async fn timed<T>(
        &self,
        op: &'static str,
        call: impl Future<Output = Result<T, StoreError>>,
    ) -> Result<T, StoreError> {
        let span = tracing::debug_span!("store", otel.name = op, otel.kind = "client");
        let started = Instant::now();
        let result = call.instrument(span).await;
        let outcome = match &result {
            Ok(_) => "ok",
            Err(StoreError::Conflict(_)) => "conflict",
            Err(_) => "error",
        };
        (self.sink)(op, outcome, started.elapsed().as_secs_f64());
        result
    }
}

#[async_trait]
impl Store for MeteredStore {
    async fn ping(&self) -> Result<(), StoreError> {
        self.timed("ping", self.inner.ping()).await
    }
    async fn agent(&self, tenant: &TenantId, uid: &InstanceUid) -> Result<Option<AgentRecord>, StoreError> {
        self.timed("agent.get", self.inner.agent(tenant, uid)).await
    }
    async fn put_agent(&self, record: AgentRecord) -> Result<(), StoreError> {
        self.timed("agent.put", self.inner.put_agent(record)).await
    }
    async fn agents_by_uid(
        &self,
        tenant: &TenantId,
        uids: &[InstanceUid],
    ) -> Result<Vec<Option<AgentRecord>>, StoreError> {
        self.timed("agent.get_many", self.inner.agents_by_uid(tenant, uids))
            .await
    }
    async fn put_agents(&self, records: Vec<AgentRecord>) -> Result<Vec<Result<(), StoreError>>, StoreError> {
        self.timed("agent.put_many", self.inner.put_agents(records)).await
    }
    async fn remove_agent(&self, tenant: &TenantId, uid: &InstanceUid) -> Result<(), StoreError> {
        self.timed("agent.remove", self.inner.remove_agent(tenant, uid)).await
    }
    async fn tenants(&self) -> Result<Vec<TenantId>, StoreError> {
        self.timed("tenants", self.inner.tenants()).await
    }
    async fn agents(&self, tenant: &TenantId) -> Result<Vec<AgentRecord>, StoreError> {
        self.timed("agent.list", self.inner.agents(tenant)).await
    }
    async fn create_config_version(
        &self,
        tenant: &TenantId,
        name: &str,
        files: BTreeMap<String, ConfigFile>,
        now_unix_ms: u64,
    ) -> Result<CreatedVersion, StoreError> {
        self.timed(
            "config.create",
            self.inner.create_config_version(tenant, name, files, now_unix_ms),
        )
        .await
    }
    async fn config_version(
        &self,
        tenant: &TenantId,
        name: &str,
        version: u32,
    ) -> Result<Option<Arc<ConfigVersion>>, StoreError> {
        self.timed("config.get", self.inner.config_version(tenant, name, version))
            .await
    }
    async fn config_versions(&self, tenant: &TenantId, name: &str) -> Result<Vec<ConfigVersion>, StoreError> {
        self.timed("config.versions", self.inner.config_versions(tenant, name))
            .await
    }
    async fn config_names(&self, tenant: &TenantId) -> Result<Vec<String>, StoreError> {
        self.timed("config.names", self.inner.config_names(tenant)).await
    }
    async fn config_by_hash(
        &self,
        tenant: &TenantId,
        hash: &ConfigHash,
    ) -> Result<Option<Arc<ConfigVersion>>, StoreError> {
        self.timed("config.by_hash", self.inner.config_by_hash(tenant, hash))
            .await
    }
    async fn put_assignment(&self, assignment: Assignment) -> Result<(), StoreError> {
        self.timed("assignment.put", self.inner.put_assignment(assignment))
            .await
    }
    async fn remove_assignment(&self, tenant: &TenantId, name: &str) -> Result<bool, StoreError> {
        self.timed("assignment.remove", self.inner.remove_assignment(tenant, name))
            .await
    }
    async fn assignments(&self, tenant: &TenantId) -> Result<Vec<Assignment>, StoreError> {
        self.timed("assignment.list", self.inner.assignments(tenant)).await
    }
    async fn put_connection_settings(&self, settings: ConnectionSettingsAssignment) -> Result<(), StoreError> {
        self.timed("connection_settings.put", self.inner.put_connection_settings(settings))
            .await
    }
    async fn remove_connection_settings(&self, tenant: &TenantId, name: &str) -> Result<bool, StoreError> {
        self.timed(
            "connection_settings.remove",
            self.inner.remove_connection_settings(tenant, name),
        )
        .await
    }
    async fn connection_settings(&self, tenant: &TenantId) -> Result<Vec<ConnectionSettingsAssignment>, StoreError> {
        self.timed("connection_settings.list", self.inner.connection_settings(tenant))
            .await
    }
    async fn put_package_set(&self, set: PackageSet) -> Result<(), StoreError> {
        self.timed("package_set.put", self.inner.put_package_set(set)).await
    }
    async fn remove_package_set(&self, tenant: &TenantId, name: &str) -> Result<bool, StoreError> {
        self.timed("package_set.remove", self.inner.remove_package_set(tenant, name))
            .await
    }
    async fn package_sets(&self, tenant: &TenantId) -> Result<Vec<PackageSet>, StoreError> {
        self.timed("package_set.list", self.inner.package_sets(tenant)).await
    }
    async fn append_events(&self, tenant: &TenantId, events: Vec<FleetEvent>, retain: usize) -> Result<(), StoreError> {
        self.timed("events.append", self.inner.append_events(tenant, events, retain))
            .await
    }
    async fn events_after(
        &self,
        tenant: &TenantId,
        after: Option<&str>,
        limit: usize,
    ) -> Result<EventPage, StoreError> {
        self.timed("events.read", self.inner.events_after(tenant, after, limit))
            .await
    }
    async fn latest_event_id(&self, tenant: &TenantId) -> Result<Option<String>, StoreError> {
        self.timed("events.latest", self.inner.latest_event_id(tenant)).await
    }
    async fn rollout(&self, tenant: &TenantId, id: &str) -> Result<Option<Rollout>, StoreError> {
        self.timed("rollout.get", self.inner.rollout(tenant, id)).await
    }
    async fn rollouts(&self, tenant: &TenantId) -> Result<Vec<Rollout>, StoreError> {
        self.timed("rollout.list", self.inner.rollouts(tenant)).await
    }
    async fn put_rollout(&self, rollout: Rollout) -> Result<Rollout, StoreError> {
        self.timed("rollout.put", self.inner.put_rollout(rollout)).await
    }

    async fn put_api_key(&self, key: ApiKey) -> Result<(), StoreError> {
        self.timed("api_key.put", self.inner.put_api_key(key)).await
    }

    async fn api_key(&self, id: &str) -> Result<Option<ApiKey>, StoreError> {
        self.timed("api_key.get", self.inner.api_key(id)).await
    }

    async fn api_keys(&self, tenant: &TenantId) -> Result<Vec<ApiKey>, StoreError> {
        self.timed("api_key.list", self.inner.api_keys(tenant)).await
    }

    async fn append_audit(&self, entry: AuditEntry) -> Result<(), StoreError> {
        self.timed("audit.append", self.inner.append_audit(entry)).await
    }

    async fn audit(&self, tenant: &TenantId, limit: usize) -> Result<Vec<AuditEntry>, StoreError> {
        self.timed("audit.list", self.inner.audit(tenant, limit)).await
    }
}
