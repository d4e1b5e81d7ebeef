//! The embedded store: a redb database file in the data directory, with every
//! record also held in memory for reads.
//!
//! Why this shape: the all-in-one server serves small fleets from one process,
//! so reads (every agent report reads its record, assignments and configs) are
//! served from memory, and only writes touch the disk. Agent writes are
//! group-committed: one writer thread drains all pending writes into a single
//! redb transaction, so a burst of reports costs one fsync, not one each, and
//! `put_agent` still returns only once its record is durable.

use std::{
    collections::{BTreeMap, HashMap},
    path::{Path, PathBuf},
    sync::{Arc, RwLock},
};

use async_trait::async_trait;
use fleetplane_proto::{
    ConfigHash, InstanceUid, Message, TenantId,
    internal::{
        AgentRecord, ApiKey, Assignment, AuditEntry, ConfigFile, ConfigVersion, ConnectionSettingsAssignment,
        FleetEvent, PackageSet, Rollout,
    },
};
use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};
use tokio::sync::{mpsc, oneshot};

use super::{CreatedVersion, EventPage, Store, StoreError, files_hash};

const AGENTS: TableDefinition<&[u8], &[u8]> = TableDefinition::new("agents");
const CONFIGS: TableDefinition<&str, &[u8]> = TableDefinition::new("config_versions");
const ASSIGNMENTS: TableDefinition<&str, &[u8]> = TableDefinition::new("assignments");
const ROLLOUTS: TableDefinition<&str, &[u8]> = TableDefinition::new("rollouts");
const CONNECTION_SETTINGS: TableDefinition<&str, &[u8]> = TableDefinition::new("connection_settings");
const PACKAGE_SETS: TableDefinition<&str, &[u8]> = TableDefinition::new("package_sets");
const API_KEYS: TableDefinition<&str, &[u8]> = TableDefinition::new("api_keys");
/// Audit entries keyed `{tenant}/{unix_ms:020}/{sequence:020}`: one tenant's
/// entries are one key range, in order.
const AUDIT: TableDefinition<&str, &[u8]> = TableDefinition::new("audit");

/// Most agent writes folded into one transaction.
const MAX_GROUP: usize = 4096;

type AgentKey = (TenantId, InstanceUid);

#[derive(Debug, Default)]
struct Cache {
    agents: HashMap<AgentKey, AgentRecord>,
    /// (tenant, config name) → versions by number.
    configs: BTreeMap<(TenantId, String), BTreeMap<u32, Arc<ConfigVersion>>>,
    assignments: BTreeMap<(TenantId, String), Assignment>,
    connection_settings: BTreeMap<(TenantId, String), ConnectionSettingsAssignment>,
    package_sets: BTreeMap<(TenantId, String), PackageSet>,
    rollouts: BTreeMap<(TenantId, String), Rollout>,
    /// API keys by public id.
    api_keys: BTreeMap<String, ApiKey>,
}

enum AgentWrite {
    Put(Vec<u8>, Vec<u8>),
    Remove(Vec<u8>),
}

type WriteRequest = (AgentWrite, oneshot::Sender<Result<(), StoreError>>);

/// A [`Store`] in one redb file, `fleetplane.redb` in the data directory.
#[derive(Debug)]
pub struct EmbeddedStore {
    db: Arc<Database>,
    path: PathBuf,
    cache: RwLock<Cache>,
    agent_writes: mpsc::Sender<WriteRequest>,
    /// The group-commit thread; joined on drop so that the database file is
    /// closed (and can be reopened) once the store is gone.
    writer: Option<std::thread::JoinHandle<()>>,
    /// Serialises config-version creation so version numbers never collide.
    config_lock: tokio::sync::Mutex<()>,
    /// Orders audit entries written in the same millisecond.
    audit_sequence: std::sync::atomic::AtomicU64,
    /// Event logs, in memory only: the all-in-one server's event stream
    /// starts empty after a restart (the audit log is durable).
    events: std::sync::Mutex<HashMap<TenantId, EventLog>>,
}

/// One tenant's capped event log.
#[derive(Debug, Default)]
struct EventLog {
    last: (u64, u64),
    events: std::collections::VecDeque<((u64, u64), FleetEvent)>,
}

impl std::fmt::Debug for AgentWrite {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Put(..) => "Put",
            Self::Remove(..) => "Remove",
        })
    }
}

fn backend(e: impl Into<Box<dyn std::error::Error + Send + Sync + 'static>>) -> StoreError {
    StoreError::Backend(e.into())
}

fn agent_key(tenant: &TenantId, uid: &InstanceUid) -> Vec<u8> {
    let mut key = Vec::with_capacity(tenant.as_str().len() + 17);
    key.extend_from_slice(tenant.as_str().as_bytes());
    key.push(0);
    key.extend_from_slice(uid.as_bytes());
    key
}

fn config_key(tenant: &TenantId, name: &str, version: u32) -> String {
    format!("{tenant}/{name}/{version:010}")
}

fn assignment_key(tenant: &TenantId, name: &str) -> String {
    format!("{tenant}/{name}")
}

fn decode<M: Message + Default>(key: &str, bytes: &[u8]) -> Result<M, StoreError> {
    M::decode(bytes).map_err(|e| StoreError::Corrupt {
        key: key.to_owned(),
        reason: e.to_string(),
    })
}

fn tenant_of(key: &str, tenant: &str) -> Result<TenantId, StoreError> {
    TenantId::new(tenant).map_err(|e| StoreError::Corrupt {
        key: key.to_owned(),
        reason: e.to_string(),
    })
}

impl EmbeddedStore {
    /// Opens (or creates) the store in `data_dir` and loads it into memory.
    /// Fails if another process has the database open.
    pub fn open(data_dir: &Path) -> Result<Self, StoreError> {
        std::fs::create_dir_all(data_dir).map_err(|e| backend(format!("cannot create {}: {e}", data_dir.display())))?;
        let path = data_dir.join("fleetplane.redb");
        let db = Database::create(&path).map_err(|e| backend(format!("cannot open {}: {e}", path.display())))?;
        // Create the tables so that read transactions find them.
        let txn = db.begin_write().map_err(backend)?;
        {
            txn.open_table(AGENTS).map_err(backend)?;
            txn.open_table(CONFIGS).map_err(backend)?;
            txn.open_table(ASSIGNMENTS).map_err(backend)?;
            txn.open_table(ROLLOUTS).map_err(backend)?;
            txn.open_table(API_KEYS).map_err(backend)?;
            txn.open_table(AUDIT).map_err(backend)?;
            txn.open_table(CONNECTION_SETTINGS).map_err(backend)?;
            txn.open_table(PACKAGE_SETS).map_err(backend)?;
        }
        txn.commit().map_err(backend)?;
        let cache = load(&db)?;
        let db = Arc::new(db);
        let (agent_writes, rx) = mpsc::channel(MAX_GROUP);
        let writer_db = db.clone();
        let writer = std::thread::Builder::new()
            .name("fleetplane-store-writer".into())
            .spawn(move || write_agents(&writer_db, rx))
            .map_err(backend)?;
        tracing::info!(
            path = %path.display(),
            agents = cache.agents.len(),
            configs = cache.configs.len(),
            assignments = cache.assignments.len(),
            "opened embedded store"
        );
        Ok(Self {
            db,
            path,
            cache: RwLock::new(cache),
            agent_writes,
            writer: Some(writer),
            config_lock: tokio::sync::Mutex::new(()),
            events: std::sync::Mutex::default(),
            audit_sequence: std::sync::atomic::AtomicU64::new(0),
        })
    }

    /// The database file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, Cache> {
        self.cache.read().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, Cache> {
        self.cache.write().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    async fn agent_write(&self, write: AgentWrite) -> Result<(), StoreError> {
        let (tx, rx) = oneshot::channel();
        self.agent_writes
            .send((write, tx))
            .await
            .map_err(|_| StoreError::Closed)?;
        rx.await.map_err(|_| StoreError::Closed)?
    }

    /// Runs one write transaction on the blocking pool.
    async fn transact<F>(&self, f: F) -> Result<(), StoreError>
    where
        F: FnOnce(&redb::WriteTransaction) -> Result<(), redb::Error> + Send + 'static,
    {
        let db = self.db.clone();
        tokio::task::spawn_blocking(move || {
            let txn = db.begin_write()?;
            f(&txn)?;
            txn.commit()?;
            Ok::<_, redb::Error>(())
        })
        .await
        .map_err(backend)?
        .map_err(backend)
    }
}

impl Drop for EmbeddedStore {
    fn drop(&mut self) {
        // Closing the channel ends the writer after its last batch.
        let (closed, _) = mpsc::channel(1);
        drop(std::mem::replace(&mut self.agent_writes, closed));
        if let Some(writer) = self.writer.take() {
            let _ = writer.join();
        }
    }
}

fn load(db: &Database) -> Result<Cache, StoreError> {
    let mut cache = Cache::default();
    let txn = db.begin_read().map_err(backend)?;
    for entry in txn.open_table(AGENTS).map_err(backend)?.iter().map_err(backend)? {
        let (key, value) = entry.map_err(backend)?;
        let key_text = hex_key(key.value());
        let record: AgentRecord = decode(&key_text, value.value())?;
        let uid = InstanceUid::from_slice(&record.instance_uid).map_err(|e| StoreError::Corrupt {
            key: key_text.clone(),
            reason: e.to_string(),
        })?;
        let tenant = tenant_of(&key_text, &record.tenant)?;
        cache.agents.insert((tenant, uid), record);
    }
    for entry in txn.open_table(CONFIGS).map_err(backend)?.iter().map_err(backend)? {
        let (key, value) = entry.map_err(backend)?;
        let version: ConfigVersion = decode(key.value(), value.value())?;
        let tenant = tenant_of(key.value(), &version.tenant)?;
        cache
            .configs
            .entry((tenant, version.name.clone()))
            .or_default()
            .insert(version.version, Arc::new(version));
    }
    for entry in txn.open_table(ASSIGNMENTS).map_err(backend)?.iter().map_err(backend)? {
        let (key, value) = entry.map_err(backend)?;
        let assignment: Assignment = decode(key.value(), value.value())?;
        let tenant = tenant_of(key.value(), &assignment.tenant)?;
        cache.assignments.insert((tenant, assignment.name.clone()), assignment);
    }
    for entry in txn
        .open_table(CONNECTION_SETTINGS)
        .map_err(backend)?
        .iter()
        .map_err(backend)?
    {
        let (key, value) = entry.map_err(backend)?;
        let settings: ConnectionSettingsAssignment = decode(key.value(), value.value())?;
        let tenant = tenant_of(key.value(), &settings.tenant)?;
        cache
            .connection_settings
            .insert((tenant, settings.name.clone()), settings);
    }
    for entry in txn.open_table(PACKAGE_SETS).map_err(backend)?.iter().map_err(backend)? {
        let (key, value) = entry.map_err(backend)?;
        let set: PackageSet = decode(key.value(), value.value())?;
        let tenant = tenant_of(key.value(), &set.tenant)?;
        cache.package_sets.insert((tenant, set.name.clone()), set);
    }
    for entry in txn.open_table(ROLLOUTS).map_err(backend)?.iter().map_err(backend)? {
        let (key, value) = entry.map_err(backend)?;
        let rollout: Rollout = decode(key.value(), value.value())?;
        let tenant = tenant_of(key.value(), &rollout.tenant)?;
        cache.rollouts.insert((tenant, rollout.id.clone()), rollout);
    }
    for entry in txn.open_table(API_KEYS).map_err(backend)?.iter().map_err(backend)? {
        let (key, value) = entry.map_err(backend)?;
        let api_key: ApiKey = decode(key.value(), value.value())?;
        cache.api_keys.insert(api_key.id.clone(), api_key);
    }
    Ok(cache)
}

fn hex_key(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The group-commit loop: one transaction for everything that is waiting.
fn write_agents(db: &Database, mut rx: mpsc::Receiver<WriteRequest>) {
    let mut batch: Vec<WriteRequest> = Vec::new();
    while let Some(first) = rx.blocking_recv() {
        batch.push(first);
        while batch.len() < MAX_GROUP {
            match rx.try_recv() {
                Ok(next) => batch.push(next),
                Err(_) => break,
            }
        }
        let result = (|| -> Result<(), redb::Error> {
            let txn = db.begin_write()?;
            {
                let mut table = txn.open_table(AGENTS)?;
                for (write, _) in &batch {
                    match write {
                        AgentWrite::Put(key, value) => {
                            table.insert(key.as_slice(), value.as_slice())?;
                        }
                        AgentWrite::Remove(key) => {
                            table.remove(key.as_slice())?;
                        }
                    }
                }
            }
            txn.commit()?;
            Ok(())
        })();
        if let Err(e) = &result {
            tracing::error!(error = %e, writes = batch.len(), "embedded store: agent write failed");
        }
        for (_, done) in batch.drain(..) {
            // Each waiter gets the error's text: one redb error cannot be shared.
            let _ = done.send(result.as_ref().map(|_| ()).map_err(|e| backend(e.to_string())));
        }
    }
}

#[async_trait]
impl Store for EmbeddedStore {
    async fn agent(&self, tenant: &TenantId, uid: &InstanceUid) -> Result<Option<AgentRecord>, StoreError> {
        Ok(self.read().agents.get(&(tenant.clone(), *uid)).cloned())
    }

    async fn put_agent(&self, record: AgentRecord) -> Result<(), StoreError> {
        let tenant = tenant_of("agent", &record.tenant)?;
        let uid = InstanceUid::from_slice(&record.instance_uid).map_err(|e| StoreError::Corrupt {
            key: "agent".into(),
            reason: e.to_string(),
        })?;
        let key = agent_key(&tenant, &uid);
        let value = {
            let mut cache = self.write();
            let stored = cache.agents.get(&(tenant.clone(), uid)).map_or(0, |r| r.revision);
            if stored != record.revision {
                return Err(StoreError::Conflict(uid.to_string()));
            }
            let mut record = record;
            record.revision += 1;
            let value = record.encode_to_vec();
            cache.agents.insert((tenant, uid), record);
            value
        };
        self.agent_write(AgentWrite::Put(key, value)).await
    }

    async fn remove_agent(&self, tenant: &TenantId, uid: &InstanceUid) -> Result<(), StoreError> {
        self.write().agents.remove(&(tenant.clone(), *uid));
        self.agent_write(AgentWrite::Remove(agent_key(tenant, uid))).await
    }

    async fn tenants(&self) -> Result<Vec<TenantId>, StoreError> {
        let tenants: std::collections::BTreeSet<TenantId> = self.read().agents.keys().map(|(t, _)| t.clone()).collect();
        Ok(tenants.into_iter().collect())
    }

    async fn agents(&self, tenant: &TenantId) -> Result<Vec<AgentRecord>, StoreError> {
        Ok(self
            .read()
            .agents
            .iter()
            .filter(|((t, _), _)| t == tenant)
            .map(|(_, record)| record.clone())
            .collect())
    }

    async fn create_config_version(
        &self,
        tenant: &TenantId,
        name: &str,
        files: BTreeMap<String, ConfigFile>,
        now_unix_ms: u64,
    ) -> Result<CreatedVersion, StoreError> {
        let _guard = self.config_lock.lock().await;
        let hash = files_hash(&files);
        let latest = self.config_version(tenant, name, 0).await?;
        if let Some(latest) = latest.as_ref().filter(|v| v.hash == hash.to_vec()) {
            return Ok(CreatedVersion {
                version: (**latest).clone(),
                created: false,
            });
        }
        let version = ConfigVersion {
            tenant: tenant.to_string(),
            name: name.to_owned(),
            version: latest.map_or(1, |v| v.version + 1),
            hash: hash.to_vec(),
            files,
            created_unix_ms: now_unix_ms,
        };
        let key = config_key(tenant, name, version.version);
        let value = version.encode_to_vec();
        self.transact(move |txn| {
            txn.open_table(CONFIGS)?.insert(key.as_str(), value.as_slice())?;
            Ok(())
        })
        .await?;
        self.write()
            .configs
            .entry((tenant.clone(), name.to_owned()))
            .or_default()
            .insert(version.version, Arc::new(version.clone()));
        Ok(CreatedVersion { version, created: true })
    }

    async fn config_version(
        &self,
        tenant: &TenantId,
        name: &str,
        version: u32,
    ) -> Result<Option<Arc<ConfigVersion>>, StoreError> {
        let cache = self.read();
        let Some(versions) = cache.configs.get(&(tenant.clone(), name.to_owned())) else {
            return Ok(None);
        };
        Ok(if version == 0 {
            versions.values().next_back().cloned()
        } else {
            versions.get(&version).cloned()
        })
    }

    async fn config_versions(&self, tenant: &TenantId, name: &str) -> Result<Vec<ConfigVersion>, StoreError> {
        Ok(self
            .read()
            .configs
            .get(&(tenant.clone(), name.to_owned()))
            .map(|versions| versions.values().map(|v| (**v).clone()).collect())
            .unwrap_or_default())
    }

    async fn config_names(&self, tenant: &TenantId) -> Result<Vec<String>, StoreError> {
        Ok(self
            .read()
            .configs
            .keys()
            .filter(|(t, _)| t == tenant)
            .map(|(_, name)| name.clone())
            .collect())
    }

    async fn config_by_hash(
        &self,
        tenant: &TenantId,
        hash: &ConfigHash,
    ) -> Result<Option<Arc<ConfigVersion>>, StoreError> {
        let cache = self.read();
        Ok(cache
            .configs
            .iter()
            .filter(|((t, _), _)| t == tenant)
            .flat_map(|(_, versions)| versions.values())
            .find(|v| v.hash == hash.as_bytes())
            .cloned())
    }

    async fn put_assignment(&self, assignment: Assignment) -> Result<(), StoreError> {
        let tenant = tenant_of("assignment", &assignment.tenant)?;
        let key = assignment_key(&tenant, &assignment.name);
        let value = assignment.encode_to_vec();
        self.transact(move |txn| {
            txn.open_table(ASSIGNMENTS)?.insert(key.as_str(), value.as_slice())?;
            Ok(())
        })
        .await?;
        self.write()
            .assignments
            .insert((tenant, assignment.name.clone()), assignment);
        Ok(())
    }

    async fn remove_assignment(&self, tenant: &TenantId, name: &str) -> Result<bool, StoreError> {
        let key = assignment_key(tenant, name);
        self.transact(move |txn| {
            txn.open_table(ASSIGNMENTS)?.remove(key.as_str())?;
            Ok(())
        })
        .await?;
        Ok(self
            .write()
            .assignments
            .remove(&(tenant.clone(), name.to_owned()))
            .is_some())
    }

    async fn assignments(&self, tenant: &TenantId) -> Result<Vec<Assignment>, StoreError> {
        Ok(self
            .read()
            .assignments
            .iter()
            .filter(|((t, _), _)| t == tenant)
            .map(|(_, a)| a.clone())
            .collect())
    }

    async fn put_connection_settings(&self, settings: ConnectionSettingsAssignment) -> Result<(), StoreError> {
        let tenant = tenant_of("connection settings", &settings.tenant)?;
        let key = assignment_key(&tenant, &settings.name);
        let value = settings.encode_to_vec();
        self.transact(move |txn| {
            txn.open_table(CONNECTION_SETTINGS)?
                .insert(key.as_str(), value.as_slice())?;
            Ok(())
        })
        .await?;
        self.write()
            .connection_settings
            .insert((tenant, settings.name.clone()), settings);
        Ok(())
    }

    async fn remove_connection_settings(&self, tenant: &TenantId, name: &str) -> Result<bool, StoreError> {
        let key = assignment_key(tenant, name);
        self.transact(move |txn| {
            txn.open_table(CONNECTION_SETTINGS)?.remove(key.as_str())?;
            Ok(())
        })
        .await?;
        Ok(self
            .write()
            .connection_settings
            .remove(&(tenant.clone(), name.to_owned()))
            .is_some())
    }

    async fn connection_settings(&self, tenant: &TenantId) -> Result<Vec<ConnectionSettingsAssignment>, StoreError> {
        Ok(self
            .read()
            .connection_settings
            .iter()
            .filter(|((t, _), _)| t == tenant)
            .map(|(_, a)| a.clone())
            .collect())
    }

    async fn append_events(&self, tenant: &TenantId, events: Vec<FleetEvent>, retain: usize) -> Result<(), StoreError> {
        let mut logs = self.events.lock().unwrap_or_else(|p| p.into_inner());
        let log = logs.entry(tenant.clone()).or_default();
        for mut event in events {
            let ms = event.unix_ms.max(log.last.0);
            let id = if ms == log.last.0 {
                (ms, log.last.1 + 1)
            } else {
                (ms, 0)
            };
            log.last = id;
            event.id = format!("{}-{}", id.0, id.1);
            log.events.push_back((id, event));
        }
        while log.events.len() > retain.max(1) {
            log.events.pop_front();
        }
        Ok(())
    }

    async fn events_after(
        &self,
        tenant: &TenantId,
        after: Option<&str>,
        limit: usize,
    ) -> Result<EventPage, StoreError> {
        let logs = self.events.lock().unwrap_or_else(|p| p.into_inner());
        let Some(log) = logs.get(tenant) else {
            return Ok(EventPage {
                events: Vec::new(),
                lagged: after.is_some(),
            });
        };
        let start = match after {
            None => 0,
            Some(after) => {
                let found =
                    super::parse_event_id(after).and_then(|id| log.events.binary_search_by(|(k, _)| k.cmp(&id)).ok());
                match found {
                    Some(i) => i + 1,
                    None => {
                        return Ok(EventPage {
                            events: Vec::new(),
                            lagged: true,
                        });
                    }
                }
            }
        };
        Ok(EventPage {
            events: log
                .events
                .iter()
                .skip(start)
                .take(limit)
                .map(|(_, e)| e.clone())
                .collect(),
            lagged: false,
        })
    }

    async fn latest_event_id(&self, tenant: &TenantId) -> Result<Option<String>, StoreError> {
        let logs = self.events.lock().unwrap_or_else(|p| p.into_inner());
        Ok(logs
            .get(tenant)
            .and_then(|l| l.events.back())
            .map(|(_, e)| e.id.clone()))
    }

    async fn put_package_set(&self, set: PackageSet) -> Result<(), StoreError> {
        let tenant = tenant_of("package set", &set.tenant)?;
        let key = assignment_key(&tenant, &set.name);
        let value = set.encode_to_vec();
        self.transact(move |txn| {
            txn.open_table(PACKAGE_SETS)?.insert(key.as_str(), value.as_slice())?;
            Ok(())
        })
        .await?;
        self.write().package_sets.insert((tenant, set.name.clone()), set);
        Ok(())
    }

    async fn remove_package_set(&self, tenant: &TenantId, name: &str) -> Result<bool, StoreError> {
        let key = assignment_key(tenant, name);
        self.transact(move |txn| {
            txn.open_table(PACKAGE_SETS)?.remove(key.as_str())?;
            Ok(())
        })
        .await?;
        Ok(self
            .write()
            .package_sets
            .remove(&(tenant.clone(), name.to_owned()))
            .is_some())
    }

    async fn package_sets(&self, tenant: &TenantId) -> Result<Vec<PackageSet>, StoreError> {
        Ok(self
            .read()
            .package_sets
            .iter()
            .filter(|((t, _), _)| t == tenant)
            .map(|(_, s)| s.clone())
            .collect())
    }

    async fn put_api_key(&self, key: ApiKey) -> Result<(), StoreError> {
        tenant_of("api key", &key.tenant)?;
        let id = key.id.clone();
        let value = key.encode_to_vec();
        self.transact(move |txn| {
            txn.open_table(API_KEYS)?.insert(id.as_str(), value.as_slice())?;
            Ok(())
        })
        .await?;
        self.write().api_keys.insert(key.id.clone(), key);
        Ok(())
    }

    async fn api_key(&self, id: &str) -> Result<Option<ApiKey>, StoreError> {
        Ok(self.read().api_keys.get(id).cloned())
    }

    async fn api_keys(&self, tenant: &TenantId) -> Result<Vec<ApiKey>, StoreError> {
        Ok(self
            .read()
            .api_keys
            .values()
            .filter(|k| k.tenant == tenant.as_str())
            .cloned()
            .collect())
    }

    async fn append_audit(&self, entry: AuditEntry) -> Result<(), StoreError> {
        tenant_of("audit entry", &entry.tenant)?;
        let sequence = self.audit_sequence.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let key = format!("{}/{:020}/{sequence:020}", entry.tenant, entry.unix_ms);
        let value = entry.encode_to_vec();
        self.transact(move |txn| {
            txn.open_table(AUDIT)?.insert(key.as_str(), value.as_slice())?;
            Ok(())
        })
        .await
    }

    async fn audit(&self, tenant: &TenantId, limit: usize) -> Result<Vec<AuditEntry>, StoreError> {
        let db = self.db.clone();
        // "/" + 1 is "0": the range holds exactly this tenant's keys.
        let (from, to) = (format!("{tenant}/"), format!("{tenant}0"));
        tokio::task::spawn_blocking(move || {
            let txn = db.begin_read().map_err(backend)?;
            let table = txn.open_table(AUDIT).map_err(backend)?;
            let mut entries = Vec::new();
            for row in table
                .range(from.as_str()..to.as_str())
                .map_err(backend)?
                .rev()
                .take(limit)
            {
                let (key, value) = row.map_err(backend)?;
                entries.push(decode(key.value(), value.value())?);
            }
            Ok(entries)
        })
        .await
        .map_err(|e| backend(e.to_string()))?
    }

    async fn rollout(&self, tenant: &TenantId, id: &str) -> Result<Option<Rollout>, StoreError> {
        Ok(self.read().rollouts.get(&(tenant.clone(), id.to_owned())).cloned())
    }

    async fn rollouts(&self, tenant: &TenantId) -> Result<Vec<Rollout>, StoreError> {
        let mut all: Vec<Rollout> = self
            .read()
            .rollouts
            .iter()
            .filter(|((t, _), _)| t == tenant)
            .map(|(_, r)| r.clone())
            .collect();
        all.sort_by(|a, b| (a.created_unix_ms, &a.id).cmp(&(b.created_unix_ms, &b.id)));
        Ok(all)
    }

    async fn put_rollout(&self, rollout: Rollout) -> Result<Rollout, StoreError> {
        let tenant = tenant_of("rollout", &rollout.tenant)?;
        let key = (tenant.clone(), rollout.id.clone());
        // One writer at a time decides, then persists, then publishes.
        let _guard = self.config_lock.lock().await;
        let stored = self.read().rollouts.get(&key).map_or(0, |r| r.revision);
        if stored != rollout.revision {
            return Err(StoreError::Conflict(rollout.id.clone()));
        }
        let mut rollout = rollout;
        rollout.revision += 1;
        let db_key = format!("{tenant}/{}", rollout.id);
        let value = rollout.encode_to_vec();
        self.transact(move |txn| {
            txn.open_table(ROLLOUTS)?.insert(db_key.as_str(), value.as_slice())?;
            Ok(())
        })
        .await?;
        // The memory copy is this store's own; the caller gets the rollout back.
        self.write().rollouts.insert(key, rollout.clone());
        Ok(rollout)
    }
}

#[cfg(test)]
mod tests;
