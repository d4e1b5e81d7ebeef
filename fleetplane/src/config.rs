//! The server's configuration: a TOML file, then environment overrides, with a
//! default for everything, validated before anything binds.
//!
//! ```toml
//! [opamp]
//! listen = "127.0.0.1:4320"        # OpAMP, WebSocket and HTTP, path /v1/opamp
//! max_message_bytes = 67108864     # inbound limit after decompression
//! # public_url = "wss://opamp.example.com/v1/opamp"
//!
//! [admin]
//! listen = "127.0.0.1:4321"        # admin API, /livez, /readyz
//! # token = "secret"               # Authorization: Bearer <token>: admin of every tenant
//!
//! # [[admin.tokens]]                # operators with roles and tenant scopes
//! # name = "acme-release"           # the actor in the audit log
//! # token = "long-random-secret"
//! # role = "rollout_operator"       # viewer, config_editor, rollout_operator, operator, admin
//! # tenant = "acme"                 # or "*" (default) for every tenant
//!
//! [store]
//! data_dir = "./fleetplane-data"   # embedded database
//!
//! [agents]
//! heartbeat_interval_secs = 30     # offered to agents; 0 = offer none
//! http_offline_after_secs = 90     # silent HTTP agents count as offline
//! auth = "api_key"                 # or "none" (open mode: a laptop's first run only)
//! auth_header = "authorization"    # carries "Bearer fp_<id>_<secret>"
//! key_cache_ttl_ms = 5000          # revocation takes effect within this
//! auth_failures_per_minute = 60    # per source address, then refused for a while
//! certificate_lifetime_days = 30  # certificates signed for agents' CSRs
//!
//! # [[agents.issuers]]               # per tenant, the CA signing agents' CSRs
//! # tenant = "acme"
//! # ca_cert_file = "/etc/fleetplane/acme-agents-ca.crt"
//! # ca_key_file = "/etc/fleetplane/acme-agents-ca.key"
//!
//! [log]
//! format = "text"                  # or "json"
//! filter = "info"                  # RUST_LOG syntax; RUST_LOG wins when set
//!
//! # Scaled form only (fleetplane gateway / fleetplane coordinator):
//! [nats]
//! url = "nats://127.0.0.1:4222"
//! request_timeout_ms = 5000        # gateway's wait for a coordinator
//!
//! [redis]
//! url = "redis://127.0.0.1:6379/0"   # or a Redis Cluster: "redis://a:7000,redis://b:7001"
//! prefix = "fp"                    # key prefix
//!
//! [gateway]
//! # id = "gw-a"                    # default: random per start
//! retry_after_secs = 10            # base of jittered retry hints
//! presence_interval_ms = 1000
//! heartbeat_forward_interval_secs = 300
//! drain_ms = 10000                 # spread connection closes on shutdown
//! max_connections = 100000         # admission control; 0 disables a limit
//! connections_per_second = 5000
//! tenant_connections_per_second = 5000
//! messages_per_agent_per_minute = 120
//! max_pending_reports = 1000       # reports awaiting a coordinator before shedding
//! first_message_timeout_secs = 30  # a WebSocket's first OpAMP message; 0 = none
//! idle_timeout_secs = 90           # silent WebSockets closed (pinged at half); 0 = never
//! send_timeout_secs = 30           # a peer that stops reading is dropped
//! header_read_timeout_ms = 10000   # every listener: headers must arrive within this
//! shutdown_grace_ms = 5000         # bound on each shutdown step after the drain
//!
//! [coordinator]
//! gateway_dead_after_secs = 5      # silent gateways' agents count as disconnected
//! shards = 8
//! events_retained = 10000          # per tenant, for the admin API's event stream
//!
//! [tls]                            # TLS on every listener when both are set
//! # cert_file = "/etc/fleetplane/tls.crt"    # PEM chain, reloaded when it changes
//! # key_file = "/etc/fleetplane/tls.key"
//! reload_interval_secs = 10
//!
//! [telemetry]
//! # otlp_endpoint = "http://127.0.0.1:4318"   # OTLP/HTTP; off when unset
//! trace_sample_ratio = 0.1
//! metrics_interval_ms = 15000
//! ```
//!
//! Environment overrides: every setting as `FLEETPLANE_<SECTION>_<KEY>`, for
//! example `FLEETPLANE_GATEWAY_IDLE_TIMEOUT_SECS=120`; and, as aliases kept
//! from earlier releases: `FLEETPLANE_OPAMP_LISTEN`, `FLEETPLANE_ADMIN_LISTEN`,
//! `FLEETPLANE_ADMIN_TOKEN`, `FLEETPLANE_DATA_DIR`,
//! `FLEETPLANE_HEARTBEAT_INTERVAL_SECS`, `FLEETPLANE_HTTP_OFFLINE_AFTER_SECS`,
//! `FLEETPLANE_LOG_FORMAT`, `FLEETPLANE_NATS_URL`, `FLEETPLANE_REDIS_URL`,
//! `FLEETPLANE_REDIS_PREFIX`, `FLEETPLANE_GATEWAY_ID`, `FLEETPLANE_RETRY_AFTER_SECS`,
//! `FLEETPLANE_GATEWAY_DEAD_AFTER_SECS`, `FLEETPLANE_OTLP_ENDPOINT`,
//! `FLEETPLANE_TRACE_SAMPLE_RATIO`, `FLEETPLANE_METRICS_INTERVAL_MS`,
//! `FLEETPLANE_DRAIN_MS`, `FLEETPLANE_MAX_CONNECTIONS`,
//! `FLEETPLANE_CONNECTIONS_PER_SECOND`, `FLEETPLANE_MESSAGES_PER_AGENT_PER_MINUTE`,
//! `FLEETPLANE_MAX_PENDING_REPORTS`.

use std::{net::SocketAddr, path::PathBuf};

use serde::Deserialize;

/// Why the configuration is unusable.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read config file {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The file is not valid TOML for this schema (unknown keys included).
    #[error("invalid config file {path}: {message}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// The parser's message, with line and column.
        message: String,
    },
    /// An environment variable holds a value of the wrong form.
    #[error("environment variable {name}={value:?} is invalid: {reason}")]
    Env {
        /// The variable.
        name: String,
        /// Its value.
        value: String,
        /// Why it is wrong.
        reason: String,
    },
    /// A value is out of range.
    #[error("{0}")]
    Invalid(String),
}

/// Settings without a default value, which a serialized default config
/// leaves out: listed so that their environment variables are still known.
const OPTIONAL_KEYS: [(&str, &str); 7] = [
    ("telemetry", "metrics_token"),
    ("gateway", "id"),
    ("admin", "token"),
    ("opamp", "public_url"),
    ("telemetry", "otlp_endpoint"),
    ("tls", "cert_file"),
    ("tls", "key_file"),
];

/// The whole configuration of the all-in-one server.
#[derive(Debug, Clone, Deserialize, serde::Serialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// The agent-facing OpAMP listener.
    pub opamp: OpampConfig,
    /// The operators' admin API.
    pub admin: AdminConfig,
    /// Durable state.
    pub store: StoreConfig,
    /// Behaviour towards agents.
    pub agents: AgentsConfig,
    /// Logging.
    pub log: LogConfig,
    /// The bus between gateways and coordinators (gateway and coordinator modes).
    pub nats: NatsSection,
    /// Durable state of the scaled form (coordinator mode).
    pub redis: RedisSection,
    /// Gateway behaviour.
    pub gateway: GatewaySection,
    /// Coordinator behaviour.
    pub coordinator: CoordinatorSection,
    /// Fleetplane's own traces and metrics.
    pub telemetry: TelemetrySection,
    /// TLS on the OpAMP and admin (or health) listeners.
    pub tls: TlsSection,
}

/// `[tls]`: when both files are set, every listener of the process serves
/// TLS (`wss://`, `https://`) with them, reloading them when they change.
#[derive(Debug, Clone, Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct TlsSection {
    /// PEM certificate chain, leaf first.
    pub cert_file: Option<PathBuf>,
    /// PEM private key (PKCS#8, PKCS#1 or SEC1).
    pub key_file: Option<PathBuf>,
    /// How often the files are checked for changes (seconds). Default 10.
    pub reload_interval_secs: u64,
    /// Mutual TLS: agents presenting a client certificate issued by a
    /// tenant's CA belong to that tenant (`[[tls.client_cas]]`).
    pub client_cas: Vec<ClientCaSection>,
}

/// `[[tls.client_cas]]`: the CA whose client certificates name a tenant.
#[derive(Debug, Clone, Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct ClientCaSection {
    /// The tenant of the agents it certifies.
    pub tenant: String,
    /// PEM CA certificate(s).
    pub ca_file: PathBuf,
}

impl Default for TlsSection {
    fn default() -> Self {
        Self {
            cert_file: None,
            key_file: None,
            reload_interval_secs: 10,
            client_cas: Vec::new(),
        }
    }
}

/// `[telemetry]`
#[derive(Debug, Clone, Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct TelemetrySection {
    /// Base URL of an OTLP/HTTP receiver, e.g. `http://127.0.0.1:4318`
    /// (`/v1/traces` and `/v1/metrics` are appended). Unset: no export.
    pub otlp_endpoint: Option<String>,
    /// Share of traces kept, 0.0 to 1.0. Default 0.1, so a busy gateway does
    /// not drown its collector; decisions follow the trace's parent.
    pub trace_sample_ratio: f64,
    /// How often metrics are pushed over OTLP (milliseconds). Default 15000.
    pub metrics_interval_ms: u64,
    /// When set, `/metrics` requires `Authorization: Bearer <token>` (the
    /// metrics name tenants and gateways). None by default.
    pub metrics_token: Option<String>,
}

impl Default for TelemetrySection {
    fn default() -> Self {
        Self {
            otlp_endpoint: None,
            trace_sample_ratio: 0.1,
            metrics_interval_ms: 15_000,
            metrics_token: None,
        }
    }
}

/// `[nats]`
#[derive(Debug, Clone, Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct NatsSection {
    /// Server URL(s), comma-separated. Default `nats://127.0.0.1:4222`.
    pub url: String,
    /// How long a gateway waits for a coordinator's answer (milliseconds). Default 5000.
    pub request_timeout_ms: u64,
}

impl Default for NatsSection {
    fn default() -> Self {
        Self {
            url: "nats://127.0.0.1:4222".into(),
            request_timeout_ms: 5000,
        }
    }
}

/// `[redis]`
#[derive(Debug, Clone, Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct RedisSection {
    /// `redis://host:port/db`. Default `redis://127.0.0.1:6379/0`.
    pub url: String,
    /// Prefix of every key, so deployments can share a Redis. Default `fp`.
    pub prefix: String,
}

impl Default for RedisSection {
    fn default() -> Self {
        Self {
            url: "redis://127.0.0.1:6379/0".into(),
            prefix: "fp".into(),
        }
    }
}

/// `[gateway]`
#[derive(Debug, Clone, Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct GatewaySection {
    /// This gateway's id on the bus (`[a-z0-9_-]`). Default: random per start.
    pub id: Option<String>,
    /// Base of the retry hint sent when the control plane is unavailable
    /// (seconds); hints are jittered up to twice this. Default 10.
    pub retry_after_secs: u64,
    /// How often the gateway tells coordinators it is alive and flushes the
    /// liveness of heartbeats it answered itself (milliseconds). Default 1000.
    pub presence_interval_ms: u64,
    /// Heartbeats that change nothing are answered by the gateway, but one
    /// per agent at least this often still goes to a coordinator (seconds).
    /// Default 300.
    pub heartbeat_forward_interval_secs: u64,
    /// On shutdown, agent connections close at random moments over this
    /// period (milliseconds), each told when to come back. Default 10000.
    pub drain_ms: u64,
    /// Most WebSocket connections held at once; 0 = no cap. Default 100000.
    pub max_connections: usize,
    /// New WebSocket connections per second; 0 = no limit. Default 5000.
    pub connections_per_second: u32,
    /// New WebSocket connections per second per tenant; 0 = no limit. Default 5000.
    pub tenant_connections_per_second: u32,
    /// Messages per agent per minute; 0 = no limit. Default 120.
    pub messages_per_agent_per_minute: u32,
    /// Reports waiting for a coordinator's answer before new connections and
    /// reports are refused with a retry hint; 0 = no limit. Default 1000.
    pub max_pending_reports: usize,
    /// A WebSocket must send its first OpAMP message within this (seconds);
    /// 0 = no deadline. Default 30.
    pub first_message_timeout_secs: u64,
    /// A WebSocket silent this long is closed, after a ping at half of it
    /// (seconds); keep it a few heartbeat intervals; 0 = never. Default 90.
    pub idle_timeout_secs: u64,
    /// A peer that does not take a message within this is dropped (seconds). Default 30.
    pub send_timeout_secs: u64,
    /// Request headers must arrive within this, on every listener
    /// (milliseconds). Default 10000.
    pub header_read_timeout_ms: u64,
    /// On shutdown, the bound on each step after the drain: closing the
    /// connections left, reporting them, saying goodbye, stopping the
    /// coordinator (milliseconds). Default 5000.
    pub shutdown_grace_ms: u64,
}

impl Default for GatewaySection {
    fn default() -> Self {
        Self {
            id: None,
            retry_after_secs: 10,
            presence_interval_ms: 1000,
            heartbeat_forward_interval_secs: 300,
            drain_ms: 10_000,
            max_connections: 100_000,
            connections_per_second: 5_000,
            tenant_connections_per_second: 5_000,
            messages_per_agent_per_minute: 120,
            max_pending_reports: 1_000,
            first_message_timeout_secs: 30,
            idle_timeout_secs: 90,
            send_timeout_secs: 30,
            header_read_timeout_ms: 10_000,
            shutdown_grace_ms: 5_000,
        }
    }
}

/// `[coordinator]`
#[derive(Debug, Clone, Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct CoordinatorSection {
    /// A gateway silent this long is dead, its agents disconnected (seconds). Default 5.
    pub gateway_dead_after_secs: u64,
    /// Shard workers per coordinator. Default 8.
    pub shards: usize,
    /// Events kept per tenant for the admin API's event stream (`/events`);
    /// a reader further behind than this is told it lagged. Default 10000.
    pub events_retained: usize,
}

impl Default for CoordinatorSection {
    fn default() -> Self {
        Self {
            gateway_dead_after_secs: 5,
            shards: 8,
            events_retained: 10_000,
        }
    }
}

/// `[opamp]`
#[derive(Debug, Clone, Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct OpampConfig {
    /// Address for OpAMP over WebSocket and HTTP. Default 127.0.0.1:4320.
    pub listen: SocketAddr,
    /// Largest inbound message in bytes, after decompression. Default 64 MiB.
    pub max_message_bytes: usize,
    /// URL agents use to reach us, restated in connection-settings offers.
    pub public_url: Option<String>,
}

impl Default for OpampConfig {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], fleetplane_proto::http::DEFAULT_PORT)),
            max_message_bytes: fleetplane_proto::http::DEFAULT_MAX_MESSAGE_BYTES,
            public_url: None,
        }
    }
}

/// `[admin]`
#[derive(Debug, Clone, Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct AdminConfig {
    /// Address of the admin API. Default 127.0.0.1:4321.
    pub listen: SocketAddr,
    /// A bearer token with the `admin` role on every tenant (named `admin`
    /// in the audit log); none by default (bind to loopback).
    pub token: Option<String>,
    /// Operators' tokens, each with a role and a tenant scope. With no token
    /// at all the API is open.
    pub tokens: Vec<OperatorTokenSection>,
}

impl Default for AdminConfig {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 4321)),
            token: None,
            tokens: Vec::new(),
        }
    }
}

/// `[[admin.tokens]]`: one operator.
#[derive(Clone, Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct OperatorTokenSection {
    /// Who this is, as the audit log names them.
    pub name: String,
    /// The bearer token (long and random).
    pub token: String,
    /// `viewer`, `config_editor`, `rollout_operator`, `operator` or `admin`.
    pub role: fleetplane_coordinator::admin::access::Role,
    /// The tenant it acts on, or `*` for every tenant. Default `*`.
    #[serde(default = "all_tenants")]
    pub tenant: String,
}

fn all_tenants() -> String {
    "*".into()
}

impl std::fmt::Debug for OperatorTokenSection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OperatorTokenSection")
            .field("name", &self.name)
            .field("token", &"[REDACTED]")
            .field("role", &self.role)
            .field("tenant", &self.tenant)
            .finish()
    }
}

/// `[store]`
#[derive(Debug, Clone, Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct StoreConfig {
    /// Directory of the embedded database. Default `./fleetplane-data`.
    pub data_dir: PathBuf,
}

impl Default for StoreConfig {
    fn default() -> Self {
        Self {
            data_dir: PathBuf::from("fleetplane-data"),
        }
    }
}

/// How agents authenticate (`agents.auth`).
#[derive(Debug, Clone, Copy, Deserialize, serde::Serialize, PartialEq, Eq, Default)]
#[serde(rename_all = "snake_case")]
pub enum AgentAuth {
    /// Tenant-scoped API keys (`fp_<id>_<secret>`) as bearer tokens.
    #[default]
    ApiKey,
    /// Nobody is checked; every agent is in the default tenant. For a first
    /// run on a laptop only, and logged as such.
    None,
}

/// `[agents]`
#[derive(Debug, Clone, Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct AgentsConfig {
    /// Heartbeat interval offered to agents (seconds). 0 offers none. Default 30.
    pub heartbeat_interval_secs: u64,
    /// HTTP agents silent this long count as offline (seconds). Default 90.
    pub http_offline_after_secs: u64,
    /// `api_key` (default): agents present a tenant's API key; `none`: open
    /// mode, every agent in the default tenant.
    pub auth: AgentAuth,
    /// Header carrying the API key. Default `authorization` (`Bearer <key>`).
    pub auth_header: String,
    /// How long a checked key is trusted, and how often open connections'
    /// keys are re-checked (milliseconds): revocation takes effect within
    /// this. Default 5000.
    pub key_cache_ttl_ms: u64,
    /// Failed authentications per source address per minute before the
    /// address is refused outright for a while; 0 = no limit. Default 60.
    pub auth_failures_per_minute: u32,
    /// Lifetime of the certificates signed for agents' CSRs (days). Default 30.
    pub certificate_lifetime_days: u64,
    /// `[[agents.issuers]]`: per tenant, the CA that signs its agents'
    /// certificate requests (spec 4.G.38). None: CSRs are refused.
    pub issuers: Vec<IssuerSection>,
}

/// `[[agents.issuers]]`: one tenant's issuing CA (PEM files).
#[derive(Debug, Clone, Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct IssuerSection {
    pub tenant: String,
    pub ca_cert_file: std::path::PathBuf,
    pub ca_key_file: std::path::PathBuf,
}

impl Default for AgentsConfig {
    fn default() -> Self {
        Self {
            heartbeat_interval_secs: 30,
            http_offline_after_secs: 90,
            auth: AgentAuth::ApiKey,
            auth_header: "authorization".into(),
            key_cache_ttl_ms: 5_000,
            auth_failures_per_minute: 60,
            certificate_lifetime_days: 30,
            issuers: Vec::new(),
        }
    }
}

/// Log output format.
#[derive(Debug, Clone, Copy, Deserialize, serde::Serialize, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Human-readable lines.
    #[default]
    Text,
    /// One JSON object per line.
    Json,
}

/// `[log]`
#[derive(Debug, Clone, Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct LogConfig {
    /// Text or JSON.
    pub format: LogFormat,
    /// Filter in `RUST_LOG` syntax; `RUST_LOG` overrides it. Default "info".
    pub filter: String,
}

impl Default for LogConfig {
    fn default() -> Self {
        Self {
            format: LogFormat::Text,
            filter: "info".into(),
        }
    }
}

impl Config {
    /// Reads `path` (if given), applies environment overrides from `env`, and
    /// validates. `env` is a parameter so tests never touch the process env.
    pub fn load(path: Option<&std::path::Path>, env: impl Fn(&str) -> Option<String>) -> Result<Self, ConfigError> {
        let mut config = match path {
            Some(path) => {
                let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
                    path: path.to_owned(),
                    source,
                })?;
                toml::from_str(&text).map_err(|e| ConfigError::Parse {
                    path: path.to_owned(),
                    message: e.to_string(),
                })?
            }
            None => Config::default(),
        };
        config.apply_env(&env)?;
        let config = config.apply_systematic_env(&env)?;
        config.validate()?;
        Ok(config)
    }

    /// Applies `FLEETPLANE_<SECTION>_<KEY>` for every setting (for example
    /// `FLEETPLANE_GATEWAY_IDLE_TIMEOUT_SECS`), each parsed as the type of
    /// the setting it names. Runs after the older names, so it wins.
    fn apply_systematic_env(self, env: &impl Fn(&str) -> Option<String>) -> Result<Self, ConfigError> {
        let invalid = |e: toml::ser::Error| ConfigError::Invalid(format!("configuration cannot be represented: {e}"));
        let mut tree = toml::Table::try_from(&self).map_err(invalid)?;
        let mut changed = false;
        for (section, table) in tree.iter_mut() {
            let Some(table) = table.as_table_mut() else { continue };
            let optional = OPTIONAL_KEYS
                .iter()
                .filter(|(s, _)| *s == section.as_str())
                .map(|(_, k)| *k);
            let keys: Vec<String> = table.keys().cloned().chain(optional.map(str::to_owned)).collect();
            for key in keys {
                let name = format!("FLEETPLANE_{}_{}", section.to_uppercase(), key.to_uppercase());
                let Some(raw) = env(&name) else { continue };
                let value = match table.get(&key) {
                    Some(toml::Value::Integer(_)) => raw
                        .trim()
                        .parse::<i64>()
                        .map(toml::Value::Integer)
                        .map_err(|e| e.to_string()),
                    Some(toml::Value::Float(_)) => raw
                        .trim()
                        .parse::<f64>()
                        .map(toml::Value::Float)
                        .map_err(|e| e.to_string()),
                    Some(toml::Value::Boolean(_)) => raw
                        .trim()
                        .parse::<bool>()
                        .map(toml::Value::Boolean)
                        .map_err(|e| e.to_string()),
                    _ => Ok(toml::Value::String(raw.clone())),
                };
                let value = value.map_err(|reason| ConfigError::Env {
                    name: name.clone(),
                    value: raw.clone(),
                    reason,
                })?;
                table.insert(key, value);
                changed = true;
            }
        }
        if !changed {
            return Ok(self);
        }
        toml::Value::Table(tree)
            .try_into()
            .map_err(|e: toml::de::Error| ConfigError::Invalid(format!("environment override: {}", e.message())))
    }

    fn apply_env(&mut self, env: &impl Fn(&str) -> Option<String>) -> Result<(), ConfigError> {
        fn parse<T: std::str::FromStr>(name: &'static str, value: String) -> Result<T, ConfigError>
        where
            T::Err: std::fmt::Display,
        {
            value.parse().map_err(|e: T::Err| ConfigError::Env {
                name: name.to_owned(),
                reason: e.to_string(),
                value,
            })
        }
        if let Some(v) = env("FLEETPLANE_OPAMP_LISTEN") {
            self.opamp.listen = parse("FLEETPLANE_OPAMP_LISTEN", v)?;
        }
        if let Some(v) = env("FLEETPLANE_ADMIN_LISTEN") {
            self.admin.listen = parse("FLEETPLANE_ADMIN_LISTEN", v)?;
        }
        if let Some(v) = env("FLEETPLANE_ADMIN_TOKEN") {
            self.admin.token = Some(v);
        }
        if let Some(v) = env("FLEETPLANE_DATA_DIR") {
            self.store.data_dir = PathBuf::from(v);
        }
        if let Some(v) = env("FLEETPLANE_HEARTBEAT_INTERVAL_SECS") {
            self.agents.heartbeat_interval_secs = parse("FLEETPLANE_HEARTBEAT_INTERVAL_SECS", v)?;
        }
        if let Some(v) = env("FLEETPLANE_NATS_URL") {
            self.nats.url = v;
        }
        if let Some(v) = env("FLEETPLANE_REDIS_URL") {
            self.redis.url = v;
        }
        if let Some(v) = env("FLEETPLANE_REDIS_PREFIX") {
            self.redis.prefix = v;
        }
        if let Some(v) = env("FLEETPLANE_GATEWAY_ID") {
            self.gateway.id = Some(v);
        }
        if let Some(v) = env("FLEETPLANE_RETRY_AFTER_SECS") {
            self.gateway.retry_after_secs = parse("FLEETPLANE_RETRY_AFTER_SECS", v)?;
        }
        if let Some(v) = env("FLEETPLANE_DRAIN_MS") {
            self.gateway.drain_ms = parse("FLEETPLANE_DRAIN_MS", v)?;
        }
        if let Some(v) = env("FLEETPLANE_MAX_CONNECTIONS") {
            self.gateway.max_connections = parse("FLEETPLANE_MAX_CONNECTIONS", v)?;
        }
        if let Some(v) = env("FLEETPLANE_CONNECTIONS_PER_SECOND") {
            self.gateway.connections_per_second = parse("FLEETPLANE_CONNECTIONS_PER_SECOND", v)?;
        }
        if let Some(v) = env("FLEETPLANE_MESSAGES_PER_AGENT_PER_MINUTE") {
            self.gateway.messages_per_agent_per_minute = parse("FLEETPLANE_MESSAGES_PER_AGENT_PER_MINUTE", v)?;
        }
        if let Some(v) = env("FLEETPLANE_MAX_PENDING_REPORTS") {
            self.gateway.max_pending_reports = parse("FLEETPLANE_MAX_PENDING_REPORTS", v)?;
        }
        if let Some(v) = env("FLEETPLANE_GATEWAY_DEAD_AFTER_SECS") {
            self.coordinator.gateway_dead_after_secs = parse("FLEETPLANE_GATEWAY_DEAD_AFTER_SECS", v)?;
        }
        if let Some(v) = env("FLEETPLANE_HTTP_OFFLINE_AFTER_SECS") {
            self.agents.http_offline_after_secs = parse("FLEETPLANE_HTTP_OFFLINE_AFTER_SECS", v)?;
        }
        if let Some(v) = env("FLEETPLANE_OTLP_ENDPOINT").filter(|v| !v.is_empty()) {
            self.telemetry.otlp_endpoint = Some(v);
        }
        if let Some(v) = env("FLEETPLANE_TRACE_SAMPLE_RATIO") {
            self.telemetry.trace_sample_ratio = parse("FLEETPLANE_TRACE_SAMPLE_RATIO", v)?;
        }
        if let Some(v) = env("FLEETPLANE_METRICS_INTERVAL_MS") {
            self.telemetry.metrics_interval_ms = parse("FLEETPLANE_METRICS_INTERVAL_MS", v)?;
        }
        if let Some(v) = env("FLEETPLANE_LOG_FORMAT") {
            self.log.format = match v.as_str() {
                "text" => LogFormat::Text,
                "json" => LogFormat::Json,
                _ => {
                    return Err(ConfigError::Env {
                        name: "FLEETPLANE_LOG_FORMAT".into(),
                        value: v,
                        reason: "expected text or json".into(),
                    });
                }
            };
        }
        Ok(())
    }

    fn validate(&self) -> Result<(), ConfigError> {
        if self.opamp.max_message_bytes < 1024 {
            return Err(ConfigError::Invalid(format!(
                "opamp.max_message_bytes = {} is too small (at least 1024)",
                self.opamp.max_message_bytes
            )));
        }
        if self.opamp.listen == self.admin.listen && self.opamp.listen.port() != 0 {
            return Err(ConfigError::Invalid(format!(
                "opamp.listen and admin.listen are both {}",
                self.opamp.listen
            )));
        }
        if !(0.0..=1.0).contains(&self.telemetry.trace_sample_ratio) {
            return Err(ConfigError::Invalid(format!(
                "telemetry.trace_sample_ratio = {} must be between 0 and 1",
                self.telemetry.trace_sample_ratio
            )));
        }
        if self.telemetry.metrics_interval_ms == 0 {
            return Err(ConfigError::Invalid(
                "telemetry.metrics_interval_ms must be positive".into(),
            ));
        }
        if let Some(url) = &self.telemetry.otlp_endpoint
            && !(url.starts_with("http://") || url.starts_with("https://"))
        {
            return Err(ConfigError::Invalid(format!(
                "telemetry.otlp_endpoint {url:?} must be an http:// or https:// URL (OTLP/HTTP)"
            )));
        }
        if let Some(id) = &self.gateway.id {
            fleetplane_proto::GatewayId::new(id.clone())
                .map_err(|e| ConfigError::Invalid(format!("gateway.id: {e}")))?;
        }
        if self.gateway.send_timeout_secs == 0 || self.gateway.header_read_timeout_ms == 0 {
            return Err(ConfigError::Invalid(
                "gateway.send_timeout_secs and gateway.header_read_timeout_ms must be positive".into(),
            ));
        }
        if self.gateway.idle_timeout_secs != 0
            && self.agents.heartbeat_interval_secs != 0
            && self.gateway.idle_timeout_secs < 2 * self.agents.heartbeat_interval_secs
        {
            return Err(ConfigError::Invalid(format!(
                "gateway.idle_timeout_secs ({}) must be at least twice agents.heartbeat_interval_secs ({}), \
                 or agents that heartbeat on time would be closed as idle",
                self.gateway.idle_timeout_secs, self.agents.heartbeat_interval_secs
            )));
        }
        if self.coordinator.gateway_dead_after_secs == 0 || self.gateway.presence_interval_ms == 0 {
            return Err(ConfigError::Invalid(
                "gateway.presence_interval_ms and coordinator.gateway_dead_after_secs must be positive".into(),
            ));
        }
        if self.gateway.presence_interval_ms >= self.coordinator.gateway_dead_after_secs * 1000 {
            return Err(ConfigError::Invalid(format!(
                "gateway.presence_interval_ms ({}) must be shorter than coordinator.gateway_dead_after_secs ({} s), \
                 or live gateways would be declared dead",
                self.gateway.presence_interval_ms, self.coordinator.gateway_dead_after_secs
            )));
        }
        for token in &self.admin.tokens {
            if token.name.is_empty() || token.token.len() < 16 {
                return Err(ConfigError::Invalid(format!(
                    "admin.tokens {:?}: a token needs a name and at least 16 characters of secret",
                    token.name
                )));
            }
            if token.tenant != "*" {
                fleetplane_proto::TenantId::new(token.tenant.clone())
                    .map_err(|e| ConfigError::Invalid(format!("admin.tokens {:?}: tenant: {e}", token.name)))?;
            }
        }
        if self.tls.cert_file.is_some() != self.tls.key_file.is_some() {
            return Err(ConfigError::Invalid(
                "tls.cert_file and tls.key_file go together: set both or neither".into(),
            ));
        }
        if !self.tls.client_cas.is_empty() && self.tls.cert_file.is_none() {
            return Err(ConfigError::Invalid(
                "tls.client_cas needs tls.cert_file and tls.key_file (client certificates come with TLS)".into(),
            ));
        }
        for ca in &self.tls.client_cas {
            fleetplane_proto::TenantId::new(ca.tenant.clone())
                .map_err(|e| ConfigError::Invalid(format!("tls.client_cas tenant: {e}")))?;
        }
        if self.tls.reload_interval_secs == 0 {
            return Err(ConfigError::Invalid("tls.reload_interval_secs must be positive".into()));
        }
        if axum::http::HeaderName::from_bytes(self.agents.auth_header.as_bytes()).is_err() {
            return Err(ConfigError::Invalid(format!(
                "agents.auth_header {:?} is not a valid HTTP header name",
                self.agents.auth_header
            )));
        }
        if let Some(url) = &self.opamp.public_url
            && !["ws://", "wss://", "http://", "https://"]
                .iter()
                .any(|s| url.starts_with(s))
        {
            return Err(ConfigError::Invalid(format!(
                "opamp.public_url {url:?} must start with ws://, wss://, http:// or https://"
            )));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn no_env(_: &str) -> Option<String> {
        None
    }

    fn write(text: &str) -> tempfile::NamedTempFile {
        let file = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(file.path(), text).unwrap();
        file
    }

    #[test]
    fn defaults_listen_on_loopback_4320() {
        let config = Config::load(None, no_env).unwrap();
        assert_eq!(config.opamp.listen.to_string(), "127.0.0.1:4320");
        assert_eq!(config.admin.listen.to_string(), "127.0.0.1:4321");
        assert_eq!(config.agents.heartbeat_interval_secs, 30);
    }

    #[test]
    fn file_then_env() {
        let file = write("[opamp]\nlisten = \"127.0.0.1:5000\"\n[agents]\nheartbeat_interval_secs = 5\n");
        let env = |name: &str| (name == "FLEETPLANE_HEARTBEAT_INTERVAL_SECS").then(|| "7".to_owned());
        let config = Config::load(Some(file.path()), env).unwrap();
        assert_eq!(config.opamp.listen.port(), 5000);
        assert_eq!(config.agents.heartbeat_interval_secs, 7);
    }

    #[test]
    fn unknown_keys_are_errors() {
        let file = write("[opamp]\nlisten_addr = \"127.0.0.1:5000\"\n");
        let err = Config::load(Some(file.path()), no_env).unwrap_err();
        assert!(err.to_string().contains("listen_addr"), "{err}");
    }

    #[test]
    fn bad_env_values_name_the_variable() {
        let env = |name: &str| (name == "FLEETPLANE_OPAMP_LISTEN").then(|| "nowhere".to_owned());
        let err = Config::load(None, env).unwrap_err();
        assert!(err.to_string().contains("FLEETPLANE_OPAMP_LISTEN"), "{err}");
    }

    #[test]
    fn every_setting_has_a_systematic_environment_name() {
        let env = |name: &str| match name {
            "FLEETPLANE_GATEWAY_IDLE_TIMEOUT_SECS" => Some("120".to_owned()),
            "FLEETPLANE_TELEMETRY_TRACE_SAMPLE_RATIO" => Some("0.5".to_owned()),
            "FLEETPLANE_GATEWAY_ID" => Some("gw-7".to_owned()),
            "FLEETPLANE_OPAMP_PUBLIC_URL" => Some("wss://opamp.example.com/v1/opamp".to_owned()),
            // An alias and its systematic name: the systematic one wins.
            "FLEETPLANE_DRAIN_MS" => Some("1".to_owned()),
            "FLEETPLANE_GATEWAY_DRAIN_MS" => Some("2".to_owned()),
            _ => None,
        };
        let config = Config::load(None, env).unwrap();
        assert_eq!(config.gateway.idle_timeout_secs, 120);
        assert_eq!(config.telemetry.trace_sample_ratio, 0.5);
        assert_eq!(config.gateway.id.as_deref(), Some("gw-7"));
        assert_eq!(
            config.opamp.public_url.as_deref(),
            Some("wss://opamp.example.com/v1/opamp")
        );
        assert_eq!(config.gateway.drain_ms, 2);
    }

    #[test]
    fn a_systematic_name_with_a_bad_value_is_named() {
        let env = |name: &str| (name == "FLEETPLANE_GATEWAY_SEND_TIMEOUT_SECS").then(|| "soon".to_owned());
        let err = Config::load(None, env).unwrap_err();
        assert!(
            err.to_string().contains("FLEETPLANE_GATEWAY_SEND_TIMEOUT_SECS"),
            "{err}"
        );
    }

    #[test]
    fn clashing_ports_are_refused() {
        let file = write("[opamp]\nlisten = \"127.0.0.1:5000\"\n[admin]\nlisten = \"127.0.0.1:5000\"\n");
        assert!(matches!(
            Config::load(Some(file.path()), no_env),
            Err(ConfigError::Invalid(_))
        ));
    }
}
