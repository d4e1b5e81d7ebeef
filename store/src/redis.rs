//! The Redis store: Fleetplane's durable state for the scaled form, shared by
//! every coordinator replica.
//!
//! Key layout (`P` is the configured prefix, default `fp`; every value is a
//! protobuf record of `fleetplane_proto::internal`):
//!
//! | key | type | holds |
//! |---|---|---|
//! | `P:v1:tenants` | set | tenants that have agents |
//! | `P:v1:t:{tenant}:agents` | set | uids (hex) of the tenant's agents |
//! | `P:v1:t:{tenant}:agent:{uid}` | hash | `rev` (revision), `rec` (AgentRecord) |
//! | `P:v1:t:{tenant}:configs` | set | config names |
//! | `P:v1:t:{tenant}:config:{name}` | hash | version number → ConfigVersion |
//! | `P:v1:t:{tenant}:config:{name}:latest` | string | `{version}:{hash hex}` of the latest version |
//! | `P:v1:t:{tenant}:confighash:{hash}` | string | `{name}/{version}` first holding that hash |
//! | `P:v1:t:{tenant}:assignments` | hash | assignment name → Assignment |
//! | `P:v1:t:{tenant}:connsettings` | hash | name → ConnectionSettingsAssignment |
//! | `P:v1:t:{tenant}:packagesets` | hash | name → PackageSet |
//! | `P:v1:t:{tenant}:rollouts` | set | rollout ids |
//! | `P:v1:t:{tenant}:rollout:{id}` | hash | `rev` (revision), `rec` (Rollout) |
//! | `P:v1:apikeys` | hash | API key id → ApiKey (every tenant's) |
//! | `P:v1:t:{tenant}:audit` | list | AuditEntry, oldest first (append-only) |
//! | `P:v1:t:{tenant}:events` | stream | FleetEvent in field `e`, capped (`MAXLEN`) |
//!
//! Writes where two coordinators can meet are Lua scripts, atomic in Redis:
//! an agent write is a compare-and-set on `rev` (see [`Store::put_agent`]), and
//! a config version is numbered and deduplicated by hash in one step. Lists
//! read in pipelines, never one round trip per agent. The scripts touch keys
//! of several slots, so this targets a single Redis primary (with replicas or
//! Sentinel), not Redis Cluster.

use std::{collections::BTreeMap, sync::Arc};

use async_trait::async_trait;
use fleetplane_proto::{
    ConfigHash, InstanceUid, Message, TenantId,
    internal::{
        AgentRecord, ApiKey, Assignment, AuditEntry, ConfigFile, ConfigVersion, ConnectionSettingsAssignment,
        FleetEvent, PackageSet, Rollout,
    },
};
use redis::{AsyncCommands, Script, aio::ConnectionManager};

use super::{CreatedVersion, EventPage, Store, StoreError, files_hash};

/// Agents read per pipeline when listing.
const READ_BATCH: usize = 1000;

/// Compare-and-set of a revisioned record (agents, rollouts): KEYS record,
/// index set, tenants set; ARGV expected revision, new revision, bytes,
/// member of the index, tenant.
const PUT_AGENT: &str = r"
local current = redis.call('HGET', KEYS[1], 'rev') or '0'
if current ~= ARGV[1] then return 0 end
redis.call('HSET', KEYS[1], 'rev', ARGV[2], 'rec', ARGV[3])
redis.call('SADD', KEYS[2], ARGV[4])
redis.call('SADD', KEYS[3], ARGV[5])
return 1
";

const CREATE_VERSION: &str = r"
local latest = redis.call('GET', KEYS[2])
if latest then
  local sep = string.find(latest, ':', 1, true)
  if string.sub(latest, sep + 1) == ARGV[1] then
    return {0, tonumber(string.sub(latest, 1, sep - 1))}
  end
end
local version = redis.call('HLEN', KEYS[1]) + 1
redis.call('HSET', KEYS[1], tostring(version), ARGV[2])
redis.call('SET', KEYS[2], tostring(version) .. ':' .. ARGV[1])
redis.call('SADD', KEYS[3], ARGV[3])
redis.call('SET', KEYS[4], ARGV[3] .. '/' .. tostring(version), 'NX')
return {1, version}
";

/// The tenant and uid a record is stored under.
fn identity(record: &AgentRecord) -> Result<(TenantId, InstanceUid), StoreError> {
    let corrupt = |reason: String| StoreError::Corrupt {
        key: "agent".into(),
        reason,
    };
    let tenant = TenantId::new(record.tenant.clone()).map_err(|e| corrupt(e.to_string()))?;
    let uid = InstanceUid::from_slice(&record.instance_uid).map_err(|e| corrupt(e.to_string()))?;
    Ok((tenant, uid))
}

/// Every Redis key Fleetplane uses, spelled here and nowhere else.
#[derive(Debug, Clone)]
struct Keys {
    prefix: String,
}

impl Keys {
    fn tenants(&self) -> String {
        format!("{}:v1:tenants", self.prefix)
    }
    fn tenant(&self, tenant: &TenantId) -> String {
        format!("{}:v1:t:{tenant}", self.prefix)
    }
    fn agents(&self, tenant: &TenantId) -> String {
        format!("{}:agents", self.tenant(tenant))
    }
    fn agent(&self, tenant: &TenantId, uid: &str) -> String {
        format!("{}:agent:{uid}", self.tenant(tenant))
    }
    fn configs(&self, tenant: &TenantId) -> String {
        format!("{}:configs", self.tenant(tenant))
    }
    fn config(&self, tenant: &TenantId, name: &str) -> String {
        format!("{}:config:{name}", self.tenant(tenant))
    }
    fn config_latest(&self, tenant: &TenantId, name: &str) -> String {
        format!("{}:latest", self.config(tenant, name))
    }
    fn config_hash(&self, tenant: &TenantId, hash: &str) -> String {
        format!("{}:confighash:{hash}", self.tenant(tenant))
    }
    fn assignments(&self, tenant: &TenantId) -> String {
        format!("{}:assignments", self.tenant(tenant))
    }
    fn package_sets(&self, tenant: &TenantId) -> String {
        format!("{}:packagesets", self.tenant(tenant))
    }
    fn connection_settings(&self, tenant: &TenantId) -> String {
        format!("{}:connsettings", self.tenant(tenant))
    }
    fn rollouts(&self, tenant: &TenantId) -> String {
        format!("{}:rollouts", self.tenant(tenant))
    }
    fn rollout(&self, tenant: &TenantId, id: &str) -> String {
        format!("{}:rollout:{id}", self.tenant(tenant))
    }
    fn events(&self, tenant: &TenantId) -> String {
        format!("{}:events", self.tenant(tenant))
    }
    fn audit(&self, tenant: &TenantId) -> String {
        format!("{}:audit", self.tenant(tenant))
    }
    /// Every tenant's API keys in one hash (id → record): keys are looked
    /// up by id before the tenant is known.
    fn api_keys(&self) -> String {
        format!("{}:v1:apikeys", self.prefix)
    }
}

/// A [`Store`] in Redis.
#[derive(Clone)]
pub struct RedisStore {
    conn: ConnectionManager,
    keys: Keys,
    put_agent: Script,
    create_version: Script,
}

impl std::fmt::Debug for RedisStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisStore").field("prefix", &self.keys.prefix).finish()
    }
}

fn backend(e: redis::RedisError) -> StoreError {
    StoreError::Backend(Box::new(e))
}

fn decode<M: Message + Default>(key: &str, bytes: &[u8]) -> Result<M, StoreError> {
    M::decode(bytes).map_err(|e| StoreError::Corrupt {
        key: key.to_owned(),
        reason: e.to_string(),
    })
}

impl RedisStore {
    /// Connects to `url` (`redis://host:port/db`). Keys start with `prefix`,
    /// so several deployments (or tests) can share one Redis. The connection
    /// reconnects by itself; operations during an outage fail with
    /// [`StoreError::Backend`] and agents are told to retry.
    pub async fn connect(url: &str, prefix: &str) -> Result<Self, StoreError> {
        let client = redis::Client::open(url).map_err(backend)?;
        let config = redis::aio::ConnectionManagerConfig::new()
            .set_connection_timeout(Some(std::time::Duration::from_secs(2)))
            .set_response_timeout(Some(std::time::Duration::from_secs(2)))
            .set_number_of_retries(2)
            .set_max_delay(std::time::Duration::from_millis(500));
        let conn = ConnectionManager::new_with_config(client, config)
            .await
            .map_err(backend)?;
        Ok(Self {
            conn,
            keys: Keys {
                prefix: prefix.to_owned(),
            },
            put_agent: Script::new(PUT_AGENT),
            create_version: Script::new(CREATE_VERSION),
        })
    }

    /// Reads a revisioned record (hash with `rev` and `rec`).
    async fn get_revisioned<M: Message + Default>(&self, key: &str) -> Result<Option<(u64, M)>, StoreError> {
        let mut conn = self.conn.clone();
        let (rev, rec): (Option<u64>, Option<Vec<u8>>) = redis::cmd("HMGET")
            .arg(key)
            .arg("rev")
            .arg("rec")
            .query_async(&mut conn)
            .await
            .map_err(backend)?;
        rec.map(|bytes| Ok((rev.unwrap_or(0), decode(key, &bytes)?)))
            .transpose()
    }

    /// Compare-and-set of a revisioned record: written as revision
    /// `expected + 1` only if the stored revision is still `expected`.
    async fn put_revisioned(
        &self,
        tenant: &TenantId,
        key: String,
        index: String,
        member: &str,
        expected: u64,
        bytes: Vec<u8>,
    ) -> Result<(), StoreError> {
        let mut conn = self.conn.clone();
        let written: i64 = self
            .put_agent
            .key(key)
            .key(index)
            .key(self.keys.tenants())
            .arg(expected.to_string())
            .arg((expected + 1).to_string())
            .arg(bytes)
            .arg(member)
            .arg(tenant.as_str())
            .invoke_async(&mut conn)
            .await
            .map_err(backend)?;
        if written == 1 {
            Ok(())
        } else {
            Err(StoreError::Conflict(member.to_owned()))
        }
    }

    fn version_from(&self, key: &str, number: u32, bytes: &[u8]) -> Result<ConfigVersion, StoreError> {
        let mut version: ConfigVersion = decode(key, bytes)?;
        version.version = number;
        Ok(version)
    }
}

#[async_trait]
impl Store for RedisStore {
    async fn ping(&self) -> Result<(), StoreError> {
        let mut conn = self.conn.clone();
        redis::cmd("PING")
            .query_async::<String>(&mut conn)
            .await
            .map_err(backend)?;
        Ok(())
    }

    async fn agent(&self, tenant: &TenantId, uid: &InstanceUid) -> Result<Option<AgentRecord>, StoreError> {
        let found = self
            .get_revisioned::<AgentRecord>(&self.keys.agent(tenant, &uid.to_string()))
            .await?;
        Ok(found.map(|(revision, record)| AgentRecord { revision, ..record }))
    }

    async fn put_agent(&self, record: AgentRecord) -> Result<(), StoreError> {
        let (tenant, uid) = identity(&record)?;
        let expected = record.revision;
        let stored = AgentRecord {
            revision: expected + 1,
            ..record
        };
        let uid_text = uid.to_string();
        let key = self.keys.agent(&tenant, &uid_text);
        let index = self.keys.agents(&tenant);
        self.put_revisioned(&tenant, key, index, &uid_text, expected, stored.encode_to_vec())
            .await
    }

    async fn agents_by_uid(
        &self,
        tenant: &TenantId,
        uids: &[InstanceUid],
    ) -> Result<Vec<Option<AgentRecord>>, StoreError> {
        if uids.is_empty() {
            return Ok(Vec::new());
        }
        let mut pipe = redis::pipe();
        let keys: Vec<String> = uids
            .iter()
            .map(|uid| self.keys.agent(tenant, &uid.to_string()))
            .collect();
        for key in &keys {
            pipe.cmd("HMGET").arg(key).arg("rev").arg("rec");
        }
        let mut conn = self.conn.clone();
        let rows: Vec<(Option<u64>, Option<Vec<u8>>)> = pipe.query_async(&mut conn).await.map_err(backend)?;
        keys.iter()
            .zip(rows)
            .map(|(key, (rev, rec))| {
                rec.map(|bytes| {
                    let record: AgentRecord = decode(key, &bytes)?;
                    Ok(AgentRecord {
                        revision: rev.unwrap_or(0),
                        ..record
                    })
                })
                .transpose()
            })
            .collect()
    }

    async fn put_agents(&self, records: Vec<AgentRecord>) -> Result<Vec<Result<(), StoreError>>, StoreError> {
        if records.is_empty() {
            return Ok(Vec::new());
        }
        // One pipeline of compare-and-set scripts. EVAL (not EVALSHA) so that
        // a restarted Redis, which forgot loaded scripts, needs no retry;
        // Redis caches the compiled script by its digest either way.
        let mut pipe = redis::pipe();
        let mut members = Vec::with_capacity(records.len());
        for record in records {
            let (tenant, uid) = identity(&record)?;
            let expected = record.revision;
            let stored = AgentRecord {
                revision: expected + 1,
                ..record
            };
            let member = uid.to_string();
            pipe.cmd("EVAL")
                .arg(PUT_AGENT)
                .arg(3)
                .arg(self.keys.agent(&tenant, &member))
                .arg(self.keys.agents(&tenant))
                .arg(self.keys.tenants())
                .arg(expected.to_string())
                .arg((expected + 1).to_string())
                .arg(stored.encode_to_vec())
                .arg(&member)
                .arg(tenant.as_str());
            members.push(member);
        }
        let mut conn = self.conn.clone();
        let written: Vec<i64> = pipe.query_async(&mut conn).await.map_err(backend)?;
        Ok(members
            .into_iter()
            .zip(written)
            .map(|(member, written)| {
                if written == 1 {
                    Ok(())
                } else {
                    Err(StoreError::Conflict(member))
                }
            })
            .collect())
    }

    async fn remove_agent(&self, tenant: &TenantId, uid: &InstanceUid) -> Result<(), StoreError> {
        let uid_text = uid.to_string();
        let mut conn = self.conn.clone();
        redis::pipe()
            .atomic()
            .del(self.keys.agent(tenant, &uid_text))
            .srem(self.keys.agents(tenant), &uid_text)
            .query_async::<()>(&mut conn)
            .await
            .map_err(backend)
    }

    async fn tenants(&self) -> Result<Vec<TenantId>, StoreError> {
        let mut conn = self.conn.clone();
        let names: Vec<String> = conn.smembers(self.keys.tenants()).await.map_err(backend)?;
        let mut tenants: Vec<TenantId> = names.into_iter().filter_map(|t| TenantId::new(t).ok()).collect();
        tenants.sort();
        Ok(tenants)
    }

    async fn agents(&self, tenant: &TenantId) -> Result<Vec<AgentRecord>, StoreError> {
        let mut conn = self.conn.clone();
        let uids: Vec<String> = conn.smembers(self.keys.agents(tenant)).await.map_err(backend)?;
        let mut records = Vec::with_capacity(uids.len());
        for chunk in uids.chunks(READ_BATCH) {
            let mut pipe = redis::pipe();
            for uid in chunk {
                pipe.cmd("HMGET")
                    .arg(self.keys.agent(tenant, uid))
                    .arg("rev")
                    .arg("rec");
            }
            let rows: Vec<(Option<u64>, Option<Vec<u8>>)> = pipe.query_async(&mut conn).await.map_err(backend)?;
            for (uid, (rev, rec)) in chunk.iter().zip(rows) {
                // Removed between SMEMBERS and HMGET: skip.
                if let Some(bytes) = rec {
                    let mut record: AgentRecord = decode(uid, &bytes)?;
                    record.revision = rev.unwrap_or(0);
                    records.push(record);
                }
            }
        }
        Ok(records)
    }

    async fn create_config_version(
        &self,
        tenant: &TenantId,
        name: &str,
        files: BTreeMap<String, ConfigFile>,
        now_unix_ms: u64,
    ) -> Result<CreatedVersion, StoreError> {
        let hash = files_hash(&files);
        // The script numbers the version; the stored bytes leave it at 0 and
        // readers take the number from the hash field.
        let mut version = ConfigVersion {
            tenant: tenant.to_string(),
            name: name.to_owned(),
            version: 0,
            hash: hash.to_vec(),
            files,
            created_unix_ms: now_unix_ms,
        };
        let hash_text = hash.to_string();
        let mut conn = self.conn.clone();
        let (created, number): (i64, u32) = self
            .create_version
            .key(self.keys.config(tenant, name))
            .key(self.keys.config_latest(tenant, name))
            .key(self.keys.configs(tenant))
            .key(self.keys.config_hash(tenant, &hash_text))
            .arg(&hash_text)
            .arg(version.encode_to_vec())
            .arg(name)
            .invoke_async(&mut conn)
            .await
            .map_err(backend)?;
        if created == 1 {
            version.version = number;
            return Ok(CreatedVersion { version, created: true });
        }
        let existing = self
            .config_version(tenant, name, number)
            .await?
            .ok_or_else(|| StoreError::Corrupt {
                key: self.keys.config(tenant, name),
                reason: format!("latest version {number} is missing"),
            })?;
        Ok(CreatedVersion {
            version: Arc::unwrap_or_clone(existing),
            created: false,
        })
    }

    async fn config_version(
        &self,
        tenant: &TenantId,
        name: &str,
        version: u32,
    ) -> Result<Option<Arc<ConfigVersion>>, StoreError> {
        let mut conn = self.conn.clone();
        let number = if version == 0 {
            let latest: Option<String> = conn.get(self.keys.config_latest(tenant, name)).await.map_err(backend)?;
            match latest.and_then(|l| l.split(':').next().and_then(|v| v.parse::<u32>().ok())) {
                Some(number) => number,
                None => return Ok(None),
            }
        } else {
            version
        };
        let key = self.keys.config(tenant, name);
        let bytes: Option<Vec<u8>> = conn.hget(&key, number.to_string()).await.map_err(backend)?;
        Ok(bytes
            .map(|b| self.version_from(&key, number, &b))
            .transpose()?
            .map(Arc::new))
    }

    async fn config_versions(&self, tenant: &TenantId, name: &str) -> Result<Vec<ConfigVersion>, StoreError> {
        let key = self.keys.config(tenant, name);
        let mut conn = self.conn.clone();
        let all: BTreeMap<String, Vec<u8>> = conn.hgetall(&key).await.map_err(backend)?;
        let mut versions = all
            .iter()
            .map(|(number, bytes)| {
                let number = number.parse().map_err(|_| StoreError::Corrupt {
                    key: key.clone(),
                    reason: format!("version field {number:?}"),
                })?;
                self.version_from(&key, number, bytes)
            })
            .collect::<Result<Vec<_>, _>>()?;
        versions.sort_by_key(|v| v.version);
        Ok(versions)
    }

    async fn config_names(&self, tenant: &TenantId) -> Result<Vec<String>, StoreError> {
        let mut conn = self.conn.clone();
        let mut names: Vec<String> = conn.smembers(self.keys.configs(tenant)).await.map_err(backend)?;
        names.sort();
        Ok(names)
    }

    async fn config_by_hash(
        &self,
        tenant: &TenantId,
        hash: &ConfigHash,
    ) -> Result<Option<Arc<ConfigVersion>>, StoreError> {
        let mut conn = self.conn.clone();
        let found: Option<String> = conn
            .get(self.keys.config_hash(tenant, &hash.to_string()))
            .await
            .map_err(backend)?;
        let Some((name, number)) = found.as_deref().and_then(|f| f.rsplit_once('/')) else {
            return Ok(None);
        };
        let Ok(number) = number.parse() else {
            return Ok(None);
        };
        self.config_version(tenant, name, number).await
    }

    async fn put_assignment(&self, assignment: Assignment) -> Result<(), StoreError> {
        let tenant = TenantId::new(assignment.tenant.clone()).map_err(|e| StoreError::Corrupt {
            key: "assignment".into(),
            reason: e.to_string(),
        })?;
        let mut conn = self.conn.clone();
        conn.hset::<_, _, _, ()>(
            self.keys.assignments(&tenant),
            &assignment.name,
            assignment.encode_to_vec(),
        )
        .await
        .map_err(backend)
    }

    async fn remove_assignment(&self, tenant: &TenantId, name: &str) -> Result<bool, StoreError> {
        let mut conn = self.conn.clone();
        let removed: i64 = conn.hdel(self.keys.assignments(tenant), name).await.map_err(backend)?;
        Ok(removed > 0)
    }

    async fn assignments(&self, tenant: &TenantId) -> Result<Vec<Assignment>, StoreError> {
        let key = self.keys.assignments(tenant);
        let mut conn = self.conn.clone();
        let all: BTreeMap<String, Vec<u8>> = conn.hgetall(&key).await.map_err(backend)?;
        all.values().map(|bytes| decode(&key, bytes)).collect()
    }

    async fn put_connection_settings(&self, settings: ConnectionSettingsAssignment) -> Result<(), StoreError> {
        let tenant = TenantId::new(settings.tenant.clone()).map_err(|e| StoreError::Corrupt {
            key: "connection settings".into(),
            reason: e.to_string(),
        })?;
        let mut conn = self.conn.clone();
        conn.hset::<_, _, _, ()>(
            self.keys.connection_settings(&tenant),
            &settings.name,
            settings.encode_to_vec(),
        )
        .await
        .map_err(backend)
    }

    async fn remove_connection_settings(&self, tenant: &TenantId, name: &str) -> Result<bool, StoreError> {
        let mut conn = self.conn.clone();
        let removed: i64 = conn
            .hdel(self.keys.connection_settings(tenant), name)
            .await
            .map_err(backend)?;
        Ok(removed > 0)
    }

    async fn connection_settings(&self, tenant: &TenantId) -> Result<Vec<ConnectionSettingsAssignment>, StoreError> {
        let key = self.keys.connection_settings(tenant);
        let mut conn = self.conn.clone();
        let all: BTreeMap<String, Vec<u8>> = conn.hgetall(&key).await.map_err(backend)?;
        all.values().map(|bytes| decode(&key, bytes)).collect()
    }

    async fn put_package_set(&self, set: PackageSet) -> Result<(), StoreError> {
        let tenant = TenantId::new(set.tenant.clone()).map_err(|e| StoreError::Corrupt {
            key: "package set".into(),
            reason: e.to_string(),
        })?;
        let mut conn = self.conn.clone();
        conn.hset::<_, _, _, ()>(self.keys.package_sets(&tenant), &set.name, set.encode_to_vec())
            .await
            .map_err(backend)
    }

    async fn remove_package_set(&self, tenant: &TenantId, name: &str) -> Result<bool, StoreError> {
        let mut conn = self.conn.clone();
        let removed: i64 = conn.hdel(self.keys.package_sets(tenant), name).await.map_err(backend)?;
        Ok(removed > 0)
    }

    async fn package_sets(&self, tenant: &TenantId) -> Result<Vec<PackageSet>, StoreError> {
        let key = self.keys.package_sets(tenant);
        let mut conn = self.conn.clone();
        let all: BTreeMap<String, Vec<u8>> = conn.hgetall(&key).await.map_err(backend)?;
        all.values().map(|bytes| decode(&key, bytes)).collect()
    }

    async fn put_api_key(&self, key: ApiKey) -> Result<(), StoreError> {
        let mut conn = self.conn.clone();
        conn.hset::<_, _, _, ()>(self.keys.api_keys(), &key.id, key.encode_to_vec())
            .await
            .map_err(backend)
    }

    async fn api_key(&self, id: &str) -> Result<Option<ApiKey>, StoreError> {
        let key = self.keys.api_keys();
        let mut conn = self.conn.clone();
        let found: Option<Vec<u8>> = conn.hget(&key, id).await.map_err(backend)?;
        found.map(|bytes| decode(&key, &bytes)).transpose()
    }

    async fn api_keys(&self, tenant: &TenantId) -> Result<Vec<ApiKey>, StoreError> {
        let key = self.keys.api_keys();
        let mut conn = self.conn.clone();
        let all: BTreeMap<String, Vec<u8>> = conn.hgetall(&key).await.map_err(backend)?;
        let mut keys = Vec::new();
        for bytes in all.values() {
            let api_key: ApiKey = decode(&key, bytes)?;
            if api_key.tenant == tenant.as_str() {
                keys.push(api_key);
            }
        }
        Ok(keys)
    }

    async fn append_audit(&self, entry: AuditEntry) -> Result<(), StoreError> {
        let tenant = TenantId::new(entry.tenant.clone()).map_err(|e| StoreError::Corrupt {
            key: "audit entry".into(),
            reason: e.to_string(),
        })?;
        let mut conn = self.conn.clone();
        conn.rpush::<_, _, ()>(self.keys.audit(&tenant), entry.encode_to_vec())
            .await
            .map_err(backend)
    }

    async fn audit(&self, tenant: &TenantId, limit: usize) -> Result<Vec<AuditEntry>, StoreError> {
        if limit == 0 {
            return Ok(Vec::new());
        }
        let key = self.keys.audit(tenant);
        let mut conn = self.conn.clone();
        let newest: Vec<Vec<u8>> = conn
            .lrange(&key, -(limit.min(isize::MAX as usize) as isize), -1)
            .await
            .map_err(backend)?;
        newest.iter().rev().map(|bytes| decode(&key, bytes)).collect()
    }

    async fn append_events(&self, tenant: &TenantId, events: Vec<FleetEvent>, retain: usize) -> Result<(), StoreError> {
        if events.is_empty() {
            return Ok(());
        }
        let key = self.keys.events(tenant);
        let mut pipe = redis::pipe();
        for event in &events {
            // The stream assigns the id; the stored copy carries none.
            pipe.cmd("XADD")
                .arg(&key)
                .arg("MAXLEN")
                .arg(retain.max(1))
                .arg("*")
                .arg("e")
                .arg(event.encode_to_vec())
                .ignore();
        }
        let mut conn = self.conn.clone();
        pipe.query_async::<()>(&mut conn).await.map_err(backend)
    }

    async fn events_after(
        &self,
        tenant: &TenantId,
        after: Option<&str>,
        limit: usize,
    ) -> Result<EventPage, StoreError> {
        let key = self.keys.events(tenant);
        let mut conn = self.conn.clone();
        let start = match after {
            None => "-".to_owned(),
            Some(after) => {
                // A position no longer in the log was trimmed away (we never
                // delete otherwise), or was never ours: the reader lagged.
                let Some((ms, seq)) = super::parse_event_id(after) else {
                    return Ok(EventPage {
                        events: Vec::new(),
                        lagged: true,
                    });
                };
                let id = format!("{ms}-{seq}");
                let present: Vec<(String, Vec<(String, Vec<u8>)>)> = redis::cmd("XRANGE")
                    .arg(&key)
                    .arg(&id)
                    .arg(&id)
                    .query_async(&mut conn)
                    .await
                    .map_err(backend)?;
                if present.is_empty() {
                    return Ok(EventPage {
                        events: Vec::new(),
                        lagged: true,
                    });
                }
                format!("({id}")
            }
        };
        let entries: Vec<(String, Vec<(String, Vec<u8>)>)> = redis::cmd("XRANGE")
            .arg(&key)
            .arg(start)
            .arg("+")
            .arg("COUNT")
            .arg(limit.max(1))
            .query_async(&mut conn)
            .await
            .map_err(backend)?;
        let mut events = Vec::with_capacity(entries.len());
        for (id, fields) in entries {
            let Some((_, bytes)) = fields.into_iter().find(|(name, _)| name == "e") else {
                continue;
            };
            let mut event: FleetEvent = decode(&key, &bytes)?;
            event.id = id;
            events.push(event);
        }
        Ok(EventPage { events, lagged: false })
    }

    async fn latest_event_id(&self, tenant: &TenantId) -> Result<Option<String>, StoreError> {
        let mut conn = self.conn.clone();
        let newest: Vec<(String, Vec<(String, Vec<u8>)>)> = redis::cmd("XREVRANGE")
            .arg(self.keys.events(tenant))
            .arg("+")
            .arg("-")
            .arg("COUNT")
            .arg(1)
            .query_async(&mut conn)
            .await
            .map_err(backend)?;
        Ok(newest.into_iter().next().map(|(id, _)| id))
    }

    async fn rollout(&self, tenant: &TenantId, id: &str) -> Result<Option<Rollout>, StoreError> {
        let found = self.get_revisioned::<Rollout>(&self.keys.rollout(tenant, id)).await?;
        Ok(found.map(|(revision, rollout)| Rollout { revision, ..rollout }))
    }

    async fn rollouts(&self, tenant: &TenantId) -> Result<Vec<Rollout>, StoreError> {
        let mut conn = self.conn.clone();
        let ids: Vec<String> = conn.smembers(self.keys.rollouts(tenant)).await.map_err(backend)?;
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        let mut pipe = redis::pipe();
        for id in &ids {
            pipe.cmd("HMGET")
                .arg(self.keys.rollout(tenant, id))
                .arg("rev")
                .arg("rec");
        }
        let rows: Vec<(Option<u64>, Option<Vec<u8>>)> = pipe.query_async(&mut conn).await.map_err(backend)?;
        let mut all = Vec::with_capacity(rows.len());
        for (id, (rev, rec)) in ids.iter().zip(rows) {
            if let Some(bytes) = rec {
                let mut rollout: Rollout = decode(id, &bytes)?;
                rollout.revision = rev.unwrap_or(0);
                all.push(rollout);
            }
        }
        all.sort_by(|a, b| (a.created_unix_ms, &a.id).cmp(&(b.created_unix_ms, &b.id)));
        Ok(all)
    }

    async fn put_rollout(&self, rollout: Rollout) -> Result<Rollout, StoreError> {
        let tenant = TenantId::new(rollout.tenant.clone()).map_err(|e| StoreError::Corrupt {
            key: "rollout".into(),
            reason: e.to_string(),
        })?;
        let expected = rollout.revision;
        let stored = Rollout {
            revision: expected + 1,
            ..rollout
        };
        let key = self.keys.rollout(&tenant, &stored.id);
        let index = self.keys.rollouts(&tenant);
        self.put_revisioned(&tenant, key, index, &stored.id, expected, stored.encode_to_vec())
            .await?;
        Ok(stored)
    }
}

#[cfg(test)]
mod tests;
