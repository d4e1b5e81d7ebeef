//! The Redis store: Fleetplane's durable state for the scaled form, shared by
//! every coordinator replica.
//!
//! Key layout (`P` is the configured prefix, default `fp`; every value is a
//! protobuf record of `fleetplane_proto::internal`). Braces are Redis
//! Cluster hash tags: keys with the same tag live in one slot, so every
//! script and every pipeline below touches one slot only and the same code
//! runs on one Redis primary or on a Redis Cluster.
//!
//! | key | type | holds |
//! |---|---|---|
//! | `P:v2:tenants` | set | tenants that have agents or rollouts |
//! | `P:v2:apikeys` | hash | API key id → ApiKey (every tenant's) |
//! | `{P:v2:t:T:aNN}:agents` | set | uids (hex) of the tenant's agents in bucket `NN` |
//! | `{P:v2:t:T:aNN}:agent:{uid}` | hash | `rev` (revision), `rec` (AgentRecord) |
//! | `{P:v2:t:T}:configs` | set | config names |
//! | `{P:v2:t:T}:config:{name}` | hash | version number → ConfigVersion |
//! | `{P:v2:t:T}:config:{name}:latest` | string | `{version}:{hash hex}` of the latest version |
//! | `{P:v2:t:T}:confighash:{hash}` | string | `{name}/{version}` first holding that hash |
//! | `{P:v2:t:T}:assignments` | hash | assignment name → Assignment |
//! | `{P:v2:t:T}:connsettings` | hash | name → ConnectionSettingsAssignment |
//! | `{P:v2:t:T}:packagesets` | hash | name → PackageSet |
//! | `{P:v2:t:T}:rollouts` | set | rollout ids |
//! | `{P:v2:t:T}:rollout:{id}` | hash | `rev` (revision), `rec` (Rollout) |
//! | `{P:v2:t:T}:audit` | list | AuditEntry, oldest first (append-only) |
//! | `{P:v2:t:T}:events` | stream | FleetEvent in field `e`, capped (`MAXLEN`) |
//!
//! A tenant's agents are spread over [`AGENT_BUCKETS`] slots by a hash of
//! their uid (an agent's record and its index entry share one), so a large
//! tenant's agents spread over the cluster's primaries; everything else of a
//! tenant is small and shares the tenant's slot. The tenants set is the one
//! key written beside another slot's: it is added to before the agent or
//! rollout it names, so a crash between the two leaves an extra entry,
//! never a missing one.
//!
//! Writes where two coordinators can meet are Lua scripts, atomic in Redis:
//! an agent write is a compare-and-set on `rev` (see [`Store::put_agent`]), and
//! a config version is numbered and deduplicated by hash in one step. Lists
//! read in pipelines, never one round trip per agent.
//!
//! Replication in Redis is asynchronous: a write a primary acknowledged and
//! had not yet sent to its replica is lost when that primary dies and the
//! replica is promoted. Agent records heal by themselves (the agent's next
//! report shows a sequence gap and is asked for its full state); an admin
//! change made in that window must be made again.

use std::{
    collections::{BTreeMap, HashMap},
    sync::{Arc, Mutex},
};

use async_trait::async_trait;
use fleetplane_proto::{
    ConfigHash, InstanceUid, Message, TenantId,
    internal::{
        AgentRecord, ApiKey, Assignment, AuditEntry, ConfigFile, ConfigVersion, ConnectionSettingsAssignment,
        FleetEvent, PackageSet, Rollout,
    },
};
use redis::{AsyncCommands, aio::ConnectionManager, cluster::ClusterClientBuilder, cluster_async::ClusterConnection};

use super::{CreatedVersion, EventPage, Store, StoreError, files_hash};

/// Agents read per pipeline when listing.
const READ_BATCH: usize = 1000;

/// Agent buckets per tenant: how many cluster slots one tenant's agents
/// spread over. Fixed, since it is part of every agent's key.
pub const AGENT_BUCKETS: u8 = 32;

/// How long a tenant once added to the tenants set is trusted to be there
/// before the next write adds it again (a lost write heals within this).
const TENANT_RECHECK: std::time::Duration = std::time::Duration::from_secs(60);

/// Compare-and-set of a revisioned record (agents, rollouts): KEYS record,
/// index set (one slot); ARGV expected revision, new revision, bytes,
/// member of the index.
const PUT_REVISIONED: &str = r"
local current = redis.call('HGET', KEYS[1], 'rev') or '0'
if current ~= ARGV[1] then return 0 end
redis.call('HSET', KEYS[1], 'rev', ARGV[2], 'rec', ARGV[3])
redis.call('SADD', KEYS[2], ARGV[4])
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

/// The agent bucket of a uid: FNV-1a over its bytes, so uids that share a
/// prefix (time-ordered UUIDv7s) still spread evenly.
fn bucket(uid: &InstanceUid) -> u8 {
    let hash = uid
        .as_bytes()
        .iter()
        .fold(0x811c_9dc5_u32, |h, b| (h ^ u32::from(*b)).wrapping_mul(0x0100_0193));
    (hash % u32::from(AGENT_BUCKETS)) as u8
}

/// Every Redis key Fleetplane uses, spelled here and nowhere else.
#[derive(Debug, Clone)]
struct Keys {
    prefix: String,
}

impl Keys {
    fn tenants(&self) -> String {
        format!("{}:v2:tenants", self.prefix)
    }
    /// Every tenant's API keys in one hash (id → record): keys are looked
    /// up by id before the tenant is known.
    fn api_keys(&self) -> String {
        format!("{}:v2:apikeys", self.prefix)
    }
    /// The hash-tagged stem of a tenant's own (small) keys.
    fn tenant(&self, tenant: &TenantId) -> String {
        format!("{{{}:v2:t:{tenant}}}", self.prefix)
    }
    /// The hash-tagged stem of one agent bucket of a tenant.
    fn bucket(&self, tenant: &TenantId, bucket: u8) -> String {
        format!("{{{}:v2:t:{tenant}:a{bucket:02}}}", self.prefix)
    }
    fn agents(&self, tenant: &TenantId, bucket: u8) -> String {
        format!("{}:agents", self.bucket(tenant, bucket))
    }
    fn agent(&self, tenant: &TenantId, bucket: u8, uid: &str) -> String {
        format!("{}:agent:{uid}", self.bucket(tenant, bucket))
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
}

/// One Redis primary (with replicas or Sentinel in front of it) or a Redis
/// Cluster; both speak the same commands to this store.
#[derive(Clone)]
enum Conn {
    Single(ConnectionManager),
    Cluster(ClusterConnection),
}

impl redis::aio::ConnectionLike for Conn {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a redis::Cmd) -> redis::RedisFuture<'a, redis::Value> {
        match self {
            Self::Single(conn) => conn.req_packed_command(cmd),
            Self::Cluster(conn) => conn.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        cmd: &'a redis::Pipeline,
        offset: usize,
        count: usize,
    ) -> redis::RedisFuture<'a, Vec<redis::Value>> {
        match self {
            Self::Single(conn) => conn.req_packed_commands(cmd, offset, count),
            Self::Cluster(conn) => conn.req_packed_commands(cmd, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Self::Single(conn) => conn.get_db(),
            Self::Cluster(conn) => conn.get_db(),
        }
    }
}

/// A [`Store`] in Redis or Redis Cluster.
#[derive(Clone)]
pub struct RedisStore {
    conn: Conn,
    keys: Keys,
    /// Tenants this process added to the tenants set, and when.
    known_tenants: Arc<Mutex<HashMap<TenantId, tokio::time::Instant>>>,
}

impl std::fmt::Debug for RedisStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisStore")
            .field("prefix", &self.keys.prefix)
            .field("cluster", &matches!(self.conn, Conn::Cluster(_)))
            .finish()
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

/// An `EVAL` of `script` (never `EVALSHA`: a restarted or newly promoted
/// Redis has forgotten loaded scripts, and `EVAL` needs no retry for that;
/// Redis caches the compiled script by its digest either way).
fn eval(script: &str, keys: &[&str]) -> redis::Cmd {
    let mut cmd = redis::cmd("EVAL");
    cmd.arg(script).arg(keys.len());
    for key in keys {
        cmd.arg(*key);
    }
    cmd
}

/// Reads `rev` and `rec` of a revisioned record.
fn read_revisioned(key: &str) -> redis::Cmd {
    let mut cmd = redis::cmd("HMGET");
    cmd.arg(key).arg("rev").arg("rec");
    cmd
}

/// One agent record as stored: revision and bytes, either absent.
type Row = (Option<u64>, Option<Vec<u8>>);

fn agent_from_row(key: &str, (rev, rec): Row) -> Result<Option<AgentRecord>, StoreError> {
    rec.map(|bytes| {
        let record: AgentRecord = decode(key, &bytes)?;
        Ok(AgentRecord {
            revision: rev.unwrap_or(0),
            ..record
        })
    })
    .transpose()
}

impl RedisStore {
    /// Connects to `urls`: one `redis://host:port/db`, or a comma-separated
    /// list of a Redis Cluster's nodes (any one is enough to find the rest).
    /// Whether the server is a cluster is asked, not configured. Keys start
    /// with `prefix`, so several deployments (or tests) can share one Redis.
    /// The connection reconnects by itself (and follows a cluster's
    /// failovers); operations during an outage fail with
    /// [`StoreError::Backend`] and agents are told to retry.
    pub async fn connect(urls: &str, prefix: &str) -> Result<Self, StoreError> {
        if prefix.contains(['{', '}']) {
            return Err(StoreError::Config(format!(
                "Redis key prefix {prefix:?} must not contain braces (they are Redis Cluster hash tags)"
            )));
        }
        let urls: Vec<&str> = urls.split(',').map(str::trim).filter(|u| !u.is_empty()).collect();
        let Some(first) = urls.first() else {
            return Err(StoreError::Config("no Redis URL".into()));
        };
        let timeout = std::time::Duration::from_secs(2);
        let client = redis::Client::open(*first).map_err(backend)?;
        let config = redis::aio::ConnectionManagerConfig::new()
            .set_connection_timeout(Some(timeout))
            .set_response_timeout(Some(timeout))
            .set_number_of_retries(2)
            .set_max_delay(std::time::Duration::from_millis(500));
        let single = ConnectionManager::new_with_config(client, config)
            .await
            .map_err(backend)?;
        let conn = if cluster_enabled(single.clone()).await? {
            let cluster = ClusterClientBuilder::new(urls.iter().copied())
                .connection_timeout(timeout)
                .response_timeout(timeout)
                // A failover takes the cluster's node timeout plus an
                // election; retries with backoff ride it out.
                .retries(6)
                .min_retry_wait(100)
                .max_retry_wait(1000)
                .build()
                .map_err(backend)?;
            Conn::Cluster(cluster.get_async_connection().await.map_err(backend)?)
        } else {
            Conn::Single(single)
        };
        Ok(Self {
            conn,
            keys: Keys {
                prefix: prefix.to_owned(),
            },
            known_tenants: Arc::default(),
        })
    }

    /// Whether this store talks to a Redis Cluster.
    pub fn is_cluster(&self) -> bool {
        matches!(self.conn, Conn::Cluster(_))
    }

    /// Adds `tenant` to the tenants set unless this process did so lately.
    async fn ensure_tenant(&self, tenant: &TenantId) -> Result<(), StoreError> {
        let now = tokio::time::Instant::now();
        {
            let known = self.known_tenants.lock().unwrap_or_else(|e| e.into_inner());
            if known
                .get(tenant)
                .is_some_and(|at| now.duration_since(*at) < TENANT_RECHECK)
            {
                return Ok(());
            }
        }
        let mut conn = self.conn.clone();
        conn.sadd::<_, _, ()>(self.keys.tenants(), tenant.as_str())
            .await
            .map_err(backend)?;
        self.known_tenants
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(tenant.clone(), now);
        Ok(())
    }

    /// Reads a revisioned record (hash with `rev` and `rec`).
    async fn get_revisioned<M: Message + Default>(&self, key: &str) -> Result<Option<(u64, M)>, StoreError> {
        let mut conn = self.conn.clone();
        let (rev, rec): Row = read_revisioned(key).query_async(&mut conn).await.map_err(backend)?;
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
        self.ensure_tenant(tenant).await?;
        let mut conn = self.conn.clone();
        let written: i64 = eval(PUT_REVISIONED, &[&key, &index])
            .arg(expected.to_string())
            .arg((expected + 1).to_string())
            .arg(bytes)
            .arg(member)
            .query_async(&mut conn)
            .await
            .map_err(backend)?;
        if written == 1 {
            Ok(())
        } else {
            Err(StoreError::Conflict(member.to_owned()))
        }
    }

    /// Reads the agents of one bucket, in pipelines of [`READ_BATCH`].
    async fn bucket_agents(&self, tenant: &TenantId, bucket: u8) -> Result<Vec<AgentRecord>, StoreError> {
        let mut conn = self.conn.clone();
        let uids: Vec<String> = conn.smembers(self.keys.agents(tenant, bucket)).await.map_err(backend)?;
        let mut records = Vec::with_capacity(uids.len());
        for chunk in uids.chunks(READ_BATCH) {
            let keys: Vec<String> = chunk.iter().map(|uid| self.keys.agent(tenant, bucket, uid)).collect();
            let mut pipe = redis::pipe();
            for key in &keys {
                pipe.add_command(read_revisioned(key));
            }
            let rows: Vec<Row> = pipe.query_async(&mut conn).await.map_err(backend)?;
            for (key, row) in keys.iter().zip(rows) {
                // Removed between SMEMBERS and HMGET: skipped.
                records.extend(agent_from_row(key, row)?);
            }
        }
        Ok(records)
    }

    fn version_from(&self, key: &str, number: u32, bytes: &[u8]) -> Result<ConfigVersion, StoreError> {
        let mut version: ConfigVersion = decode(key, bytes)?;
        version.version = number;
        Ok(version)
    }
}

/// Whether the server behind `conn` runs in cluster mode.
async fn cluster_enabled(mut conn: ConnectionManager) -> Result<bool, StoreError> {
    let info: String = redis::cmd("INFO")
        .arg("cluster")
        .query_async(&mut conn)
        .await
        .map_err(backend)?;
    Ok(info.lines().any(|line| line.trim() == "cluster_enabled:1"))
}

/// Positions of `items` grouped by a key, in first-seen order of the keys.
fn group_by<T, K: Eq + std::hash::Hash + Clone>(items: &[T], key: impl Fn(&T) -> K) -> Vec<(K, Vec<usize>)> {
    let mut order: Vec<(K, Vec<usize>)> = Vec::new();
    let mut at: HashMap<K, usize> = HashMap::new();
    for (i, item) in items.iter().enumerate() {
        let k = key(item);
        let slot = *at.entry(k.clone()).or_insert_with(|| {
            order.push((k, Vec::new()));
            order.len() - 1
        });
        order[slot].1.push(i);
    }
    order
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
        let key = self.keys.agent(tenant, bucket(uid), &uid.to_string());
        let found = self.get_revisioned::<AgentRecord>(&key).await?;
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
        let key = self.keys.agent(&tenant, bucket(&uid), &uid_text);
        let index = self.keys.agents(&tenant, bucket(&uid));
        self.put_revisioned(&tenant, key, index, &uid_text, expected, stored.encode_to_vec())
            .await
    }

    async fn agents_by_uid(
        &self,
        tenant: &TenantId,
        uids: &[InstanceUid],
    ) -> Result<Vec<Option<AgentRecord>>, StoreError> {
        // One pipeline per bucket (one slot each), all in flight at once.
        let reads = group_by(uids, bucket).into_iter().map(|(bucket, positions)| {
            let mut conn = self.conn.clone();
            async move {
                let keys: Vec<String> = positions
                    .iter()
                    .map(|i| self.keys.agent(tenant, bucket, &uids[*i].to_string()))
                    .collect();
                let mut pipe = redis::pipe();
                for key in &keys {
                    pipe.add_command(read_revisioned(key));
                }
                let rows: Vec<Row> = pipe.query_async(&mut conn).await.map_err(backend)?;
                let records = keys
                    .iter()
                    .zip(rows)
                    .map(|(key, row)| agent_from_row(key, row))
                    .collect::<Result<Vec<_>, StoreError>>()?;
                Ok::<_, StoreError>(positions.into_iter().zip(records))
            }
        });
        let mut found = vec![None; uids.len()];
        for group in futures_util::future::try_join_all(reads).await? {
            for (i, record) in group {
                found[i] = record;
            }
        }
        Ok(found)
    }

    async fn put_agents(&self, records: Vec<AgentRecord>) -> Result<Vec<Result<(), StoreError>>, StoreError> {
        if records.is_empty() {
            return Ok(Vec::new());
        }
        let mut writes = Vec::with_capacity(records.len());
        for record in records {
            let (tenant, uid) = identity(&record)?;
            let expected = record.revision;
            let stored = AgentRecord {
                revision: expected + 1,
                ..record
            };
            writes.push((tenant, uid, expected, stored.encode_to_vec()));
        }
        let mut tenants: Vec<&TenantId> = writes.iter().map(|(tenant, ..)| tenant).collect();
        tenants.dedup();
        for tenant in tenants {
            self.ensure_tenant(tenant).await?;
        }
        // One pipeline of compare-and-set scripts per bucket (one slot
        // each), all in flight at once.
        let groups = group_by(&writes, |(tenant, uid, ..)| (tenant.clone(), bucket(uid)));
        let pipelines = groups.into_iter().map(|((tenant, bucket), positions)| {
            let mut conn = self.conn.clone();
            let writes = &writes;
            async move {
                let index = self.keys.agents(&tenant, bucket);
                let mut pipe = redis::pipe();
                for i in &positions {
                    let (_, uid, expected, bytes) = &writes[*i];
                    let member = uid.to_string();
                    let key = self.keys.agent(&tenant, bucket, &member);
                    pipe.add_command(
                        eval(PUT_REVISIONED, &[&key, &index])
                            .arg(expected.to_string())
                            .arg((expected + 1).to_string())
                            .arg(bytes.as_slice())
                            .arg(&member)
                            .clone(),
                    );
                }
                let written: Vec<i64> = pipe.query_async(&mut conn).await.map_err(backend)?;
                Ok::<_, StoreError>(positions.into_iter().zip(written))
            }
        });
        let mut results: Vec<Result<(), StoreError>> = writes
            .iter()
            .map(|(_, uid, ..)| Err(StoreError::Conflict(uid.to_string())))
            .collect();
        for group in futures_util::future::try_join_all(pipelines).await? {
            for (i, written) in group {
                if written == 1 {
                    results[i] = Ok(());
                }
            }
        }
        Ok(results)
    }

    async fn remove_agent(&self, tenant: &TenantId, uid: &InstanceUid) -> Result<(), StoreError> {
        let uid_text = uid.to_string();
        let mut conn = self.conn.clone();
        redis::pipe()
            .atomic()
            .del(self.keys.agent(tenant, bucket(uid), &uid_text))
            .srem(self.keys.agents(tenant, bucket(uid)), &uid_text)
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
        let buckets = (0..AGENT_BUCKETS).map(|bucket| self.bucket_agents(tenant, bucket));
        Ok(futures_util::future::try_join_all(buckets)
            .await?
            .into_iter()
            .flatten()
            .collect())
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
        let keys = [
            self.keys.config(tenant, name),
            self.keys.config_latest(tenant, name),
            self.keys.configs(tenant),
            self.keys.config_hash(tenant, &hash_text),
        ];
        let (created, number): (i64, u32) = eval(CREATE_VERSION, &keys.each_ref().map(String::as_str))
            .arg(&hash_text)
            .arg(version.encode_to_vec())
            .arg(name)
            .query_async(&mut conn)
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
            pipe.add_command(read_revisioned(&self.keys.rollout(tenant, id)));
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
