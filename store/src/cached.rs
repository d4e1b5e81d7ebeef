//! A [`Store`] decorator that keeps what every report reads and rarely
//! changes out of the store's round trips: config versions (immutable once
//! written, so cached for good) and each tenant's assignments (cached for
//! [`ASSIGNMENTS_TTL`]).
//!
//! Assignment writes through this store drop its cached copy at once; a
//! write made by another coordinator replica is seen here within the TTL.
//! That is shorter than the second reconcile pass after an admin change, so a
//! report resolved here with the old assignments in that window is corrected
//! by that pass; and an agent given an old config reports its status, which is
//! compared with the fresh desired state (level-triggered).

use std::{
    collections::{BTreeMap, HashMap},
    sync::{Arc, Mutex, MutexGuard},
    time::Duration,
};

use async_trait::async_trait;
use fleetplane_proto::{
    ConfigHash, InstanceUid, TenantId,
    internal::{
        AgentRecord, ApiKey, Assignment, AuditEntry, ConfigFile, ConfigVersion, ConnectionSettingsAssignment,
        FleetEvent, PackageSet, Rollout,
    },
};

use super::{CreatedVersion, EventPage, Store, StoreError};

/// How long a tenant's assignments are reused.
pub const ASSIGNMENTS_TTL: Duration = Duration::from_secs(1);

/// Config versions kept per map; the map starts over when full (configs are
/// few and each is read on every report of its agents).
const MAX_CONFIGS: usize = 512;

#[derive(Debug, Default)]
struct Caches {
    assignments: PerTenant<Assignment>,
    /// Connection-settings assignments, cached the same way (same TTL, same
    /// write counter).
    connection_settings: PerTenant<ConnectionSettingsAssignment>,
    package_sets: PerTenant<PackageSet>,
    /// Bumped by every assignment write here: a read that began before a
    /// write must not put its older list back after the write dropped it.
    assignment_writes: u64,
    versions: HashMap<(TenantId, String, u32), Arc<ConfigVersion>>,
    by_hash: HashMap<(TenantId, ConfigHash), Arc<ConfigVersion>>,
}

/// Wraps a store with the caches.
#[derive(Debug)]
pub struct CachedStore {
    inner: Arc<dyn Store>,
    caches: Mutex<Caches>,
}

impl CachedStore {
    /// Caches in front of `inner`.
    pub fn new(inner: Arc<dyn Store>) -> Self {
        Self {
            inner,
            caches: Mutex::default(),
        }
    }

    fn caches(&self) -> MutexGuard<'_, Caches> {
        self.caches.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Drops every cached assignment list (writes are rare): after a write
    /// through this store, and when another replica says it wrote.
    pub fn forget_assignments(&self) {
        let mut caches = self.caches();
        caches.assignments.clear();
        caches.connection_settings.clear();
        caches.package_sets.clear();
        caches.assignment_writes += 1;
    }

    fn keep_version(&self, key: (TenantId, String, u32), version: &Arc<ConfigVersion>) {
        let mut caches = self.caches();
        if caches.versions.len() >= MAX_CONFIGS {
            caches.versions.clear();
        }
        caches.versions.insert(key, version.clone());
    }
}

/// A list per tenant, with when it was read.
type PerTenant<T> = HashMap<TenantId, (tokio::time::Instant, Vec<T>)>;

impl CachedStore {
    /// A tenant's list of what selectors pick (assignments, connection
    /// settings, package sets): reused for [`ASSIGNMENTS_TTL`]; a read that
    /// began before a write here does not put its older list back.
    async fn selected<T: Clone>(
        &self,
        tenant: &TenantId,
        cache: fn(&mut Caches) -> &mut PerTenant<T>,
        load: impl std::future::Future<Output = Result<Vec<T>, StoreError>>,
    ) -> Result<Vec<T>, StoreError> {
        let writes_before = {
            let mut caches = self.caches();
            let writes = caches.assignment_writes;
            if let Some((at, list)) = cache(&mut caches).get(tenant)
                && at.elapsed() < ASSIGNMENTS_TTL
            {
                return Ok(list.clone());
            }
            writes
        };
        let read_at = tokio::time::Instant::now();
        let list = load.await?;
        let mut caches = self.caches();
        if caches.assignment_writes == writes_before {
            cache(&mut caches).insert(tenant.clone(), (read_at, list.clone()));
        }
        Ok(list)
    }
}

#[async_trait]
impl Store for CachedStore {
    async fn ping(&self) -> Result<(), StoreError> {
        self.inner.ping().await
    }
    async fn agent(&self, tenant: &TenantId, uid: &InstanceUid) -> Result<Option<AgentRecord>, StoreError> {
        self.inner.agent(tenant, uid).await
    }
    async fn put_agent(&self, record: AgentRecord) -> Result<(), StoreError> {
        self.inner.put_agent(record).await
    }
    async fn agents_by_uid(
        &self,
        tenant: &TenantId,
        uids: &[InstanceUid],
    ) -> Result<Vec<Option<AgentRecord>>, StoreError> {
        self.inner.agents_by_uid(tenant, uids).await
    }
    async fn put_agents(&self, records: Vec<AgentRecord>) -> Result<Vec<Result<(), StoreError>>, StoreError> {
        self.inner.put_agents(records).await
    }
    async fn remove_agent(&self, tenant: &TenantId, uid: &InstanceUid) -> Result<(), StoreError> {
        self.inner.remove_agent(tenant, uid).await
    }
    async fn tenants(&self) -> Result<Vec<TenantId>, StoreError> {
        self.inner.tenants().await
    }
    async fn agents(&self, tenant: &TenantId) -> Result<Vec<AgentRecord>, StoreError> {
        self.inner.agents(tenant).await
    }
    async fn create_config_version(
        &self,
        tenant: &TenantId,
        name: &str,
        files: BTreeMap<String, ConfigFile>,
        now_unix_ms: u64,
    ) -> Result<CreatedVersion, StoreError> {
        self.inner.create_config_version(tenant, name, files, now_unix_ms).await
    }
    /// Numbered versions come from the cache; version 0 ("the latest") is
    /// always read from the store.
    async fn config_version(
        &self,
        tenant: &TenantId,
        name: &str,
        version: u32,
    ) -> Result<Option<Arc<ConfigVersion>>, StoreError> {
        let key = (tenant.clone(), name.to_owned(), version);
        if version > 0
            && let Some(found) = self.caches().versions.get(&key)
        {
            return Ok(Some(found.clone()));
        }
        let found = self.inner.config_version(tenant, name, version).await?;
        if let Some(found) = &found {
            self.keep_version((tenant.clone(), name.to_owned(), found.version), found);
        }
        Ok(found)
    }
    async fn config_versions(&self, tenant: &TenantId, name: &str) -> Result<Vec<ConfigVersion>, StoreError> {
        self.inner.config_versions(tenant, name).await
    }
    async fn config_names(&self, tenant: &TenantId) -> Result<Vec<String>, StoreError> {
        self.inner.config_names(tenant).await
    }
    async fn config_by_hash(
        &self,
        tenant: &TenantId,
        hash: &ConfigHash,
    ) -> Result<Option<Arc<ConfigVersion>>, StoreError> {
        let key = (tenant.clone(), *hash);
        if let Some(found) = self.caches().by_hash.get(&key) {
            return Ok(Some(found.clone()));
        }
        let found = self.inner.config_by_hash(tenant, hash).await?;
        if let Some(found) = &found {
            let mut caches = self.caches();
            if caches.by_hash.len() >= MAX_CONFIGS {
                caches.by_hash.clear();
            }
            caches.by_hash.insert(key, found.clone());
        }
        Ok(found)
    }
    async fn put_assignment(&self, assignment: Assignment) -> Result<(), StoreError> {
        let result = self.inner.put_assignment(assignment).await;
        self.forget_assignments();
        result
    }
    async fn remove_assignment(&self, tenant: &TenantId, name: &str) -> Result<bool, StoreError> {
        let result = self.inner.remove_assignment(tenant, name).await;
        self.forget_assignments();
        result
    }
    async fn assignments(&self, tenant: &TenantId) -> Result<Vec<Assignment>, StoreError> {
        self.selected(tenant, |c| &mut c.assignments, self.inner.assignments(tenant))
            .await
    }
    async fn put_connection_settings(&self, settings: ConnectionSettingsAssignment) -> Result<(), StoreError> {
        let result = self.inner.put_connection_settings(settings).await;
        self.forget_assignments();
        result
    }
    async fn remove_connection_settings(&self, tenant: &TenantId, name: &str) -> Result<bool, StoreError> {
        let result = self.inner.remove_connection_settings(tenant, name).await;
        self.forget_assignments();
        result
    }
    async fn connection_settings(&self, tenant: &TenantId) -> Result<Vec<ConnectionSettingsAssignment>, StoreError> {
        self.selected(
            tenant,
            |c| &mut c.connection_settings,
            self.inner.connection_settings(tenant),
        )
        .await
    }
    async fn append_events(&self, tenant: &TenantId, events: Vec<FleetEvent>, retain: usize) -> Result<(), StoreError> {
        self.inner.append_events(tenant, events, retain).await
    }
    async fn events_after(
        &self,
        tenant: &TenantId,
        after: Option<&str>,
        limit: usize,
    ) -> Result<EventPage, StoreError> {
        self.inner.events_after(tenant, after, limit).await
    }
    async fn latest_event_id(&self, tenant: &TenantId) -> Result<Option<String>, StoreError> {
        self.inner.latest_event_id(tenant).await
    }
    async fn put_package_set(&self, set: PackageSet) -> Result<(), StoreError> {
        let result = self.inner.put_package_set(set).await;
        self.forget_assignments();
        result
    }
    async fn remove_package_set(&self, tenant: &TenantId, name: &str) -> Result<bool, StoreError> {
        let result = self.inner.remove_package_set(tenant, name).await;
        self.forget_assignments();
        result
    }
    async fn package_sets(&self, tenant: &TenantId) -> Result<Vec<PackageSet>, StoreError> {
        self.selected(tenant, |c| &mut c.package_sets, self.inner.package_sets(tenant))
            .await
    }
    async fn rollout(&self, tenant: &TenantId, id: &str) -> Result<Option<Rollout>, StoreError> {
        self.inner.rollout(tenant, id).await
    }
    async fn rollouts(&self, tenant: &TenantId) -> Result<Vec<Rollout>, StoreError> {
        self.inner.rollouts(tenant).await
    }
    async fn put_rollout(&self, rollout: Rollout) -> Result<Rollout, StoreError> {
        self.inner.put_rollout(rollout).await
    }

    // Not cached here: the gateways' credential cache sits in front of
    // key lookups, and a revocation must be read fresh.
    async fn put_api_key(&self, key: ApiKey) -> Result<(), StoreError> {
        self.inner.put_api_key(key).await
    }

    async fn api_key(&self, id: &str) -> Result<Option<ApiKey>, StoreError> {
        self.inner.api_key(id).await
    }

    async fn api_keys(&self, tenant: &TenantId) -> Result<Vec<ApiKey>, StoreError> {
        self.inner.api_keys(tenant).await
    }

    async fn append_audit(&self, entry: AuditEntry) -> Result<(), StoreError> {
        self.inner.append_audit(entry).await
    }

    async fn audit(&self, tenant: &TenantId, limit: usize) -> Result<Vec<AuditEntry>, StoreError> {
        self.inner.audit(tenant, limit).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{conformance::files, embedded::EmbeddedStore};

    async fn store() -> (CachedStore, Arc<dyn Store>, tempfile::TempDir) {
        let dir = tempfile::tempdir().unwrap();
        let inner: Arc<dyn Store> = Arc::new(EmbeddedStore::open(dir.path()).unwrap());
        (CachedStore::new(inner.clone()), inner, dir)
    }

    fn assignment(name: &str) -> Assignment {
        Assignment {
            tenant: TenantId::default_tenant().to_string(),
            name: name.into(),
            config_name: "c".into(),
            config_version: 1,
            ..Default::default()
        }
    }

    #[tokio::test]
    async fn own_assignment_writes_are_seen_at_once_and_others_within_the_ttl() {
        let (cached, inner, _dir) = store().await;
        let tenant = TenantId::default_tenant();
        assert!(cached.assignments(&tenant).await.unwrap().is_empty());
        cached.put_assignment(assignment("mine")).await.unwrap();
        assert_eq!(
            cached.assignments(&tenant).await.unwrap().len(),
            1,
            "own write invalidates"
        );
        // Another replica writes behind this cache's back.
        inner.put_assignment(assignment("theirs")).await.unwrap();
        let seen = cached.assignments(&tenant).await.unwrap();
        assert_eq!(seen.len(), 1, "within the TTL the cached list is served");
        tokio::time::sleep(ASSIGNMENTS_TTL).await;
        assert_eq!(
            cached.assignments(&tenant).await.unwrap().len(),
            2,
            "after the TTL it is read again"
        );
        assert!(cached.remove_assignment(&tenant, "mine").await.unwrap());
        assert_eq!(
            cached.assignments(&tenant).await.unwrap().len(),
            1,
            "own removal invalidates"
        );
    }

    #[tokio::test]
    async fn numbered_versions_are_cached_and_the_latest_is_always_read() {
        let (cached, _inner, _dir) = store().await;
        let tenant = TenantId::default_tenant();
        assert_eq!(
            cached.config_version(&tenant, "c", 1).await.unwrap(),
            None,
            "absence is not cached"
        );
        let v1 = cached.create_config_version(&tenant, "c", files("a"), 1).await.unwrap();
        assert_eq!(
            cached.config_version(&tenant, "c", 1).await.unwrap(),
            Some(std::sync::Arc::new(v1.version.clone()))
        );
        let v2 = cached.create_config_version(&tenant, "c", files("b"), 2).await.unwrap();
        assert_eq!(
            cached.config_version(&tenant, "c", 0).await.unwrap(),
            Some(std::sync::Arc::new(v2.version.clone()))
        );
        let hash = ConfigHash::from_slice(&v2.version.hash).unwrap();
        assert_eq!(
            cached.config_by_hash(&tenant, &hash).await.unwrap(),
            Some(std::sync::Arc::new(v2.version))
        );
    }
}
