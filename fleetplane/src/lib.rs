//! Fleetplane's server binary, as a library so that tests run it in-process.
//!
//! One [`Node`] shape for the three ways to run the same libraries, made of
//! parts:
//! - [`Role::AllInOne`]: a gateway part and a coordinator part joined by the
//!   in-process bus, state in the embedded store, no external services;
//! - [`Role::Gateway`]: a gateway part on NATS, with `/livez` and `/readyz`;
//! - [`Role::Coordinator`]: a coordinator part on NATS with state in Redis,
//!   serving the admin API.
//!
//! Shutdown is ordered and every step bounded (see [`Node::stop`]): the
//! gateway part drains while the coordinator part still answers, so agents
//! are served normally until their connection's turn to close.

pub mod config;

use std::{net::SocketAddr, sync::Arc, time::Duration};

use anyhow::Context;
use fleetplane_bus::{
    Bus,
    memory::MemoryBus,
    nats::{NatsBus, NatsConfig},
};
use fleetplane_coordinator::{
    Coordinator, CoordinatorConfig,
    admin::{self, AdminConfig},
    store::{Store, embedded::EmbeddedStore, redis::RedisStore},
};
use fleetplane_gateway::{
    GatewayConfig,
    listener::{self, ListenerConfig},
};
use fleetplane_proto::GatewayId;
use tokio::{net::TcpListener, task::JoinHandle};
use tokio_util::sync::CancellationToken;

pub use config::Config;

/// Which parts a node runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// Gateway and coordinator in one process over the memory bus.
    AllInOne,
    /// A stateless gateway on NATS.
    Gateway,
    /// A coordinator replica on NATS and Redis.
    Coordinator,
}

impl Role {
    /// The name used on the command line and in the ready line.
    pub fn name(self) -> &'static str {
        match self {
            Self::AllInOne => "all-in-one",
            Self::Gateway => "gateway",
            Self::Coordinator => "coordinator",
        }
    }
}

/// The agent-facing part: its own token, so that it drains first.
#[derive(Debug)]
struct GatewayPart {
    shutdown: CancellationToken,
    task: JoinHandle<std::io::Result<()>>,
    /// Longest the drain may take: spread closes plus the grace.
    drain_budget: Duration,
}

/// The state-owning part: stopped only after the gateway part is gone.
#[derive(Debug)]
struct CoordinatorPart {
    shutdown: CancellationToken,
    coordinator: Coordinator,
}

/// A running Fleetplane process: one or both parts, plus its HTTP listener
/// (the admin API, or a gateway's health endpoints).
#[derive(Debug)]
pub struct Node {
    /// What this node runs.
    pub role: Role,
    /// Where agents connect (WebSocket and HTTP, path `/v1/opamp`); `None`
    /// on a coordinator.
    pub opamp_addr: Option<SocketAddr>,
    /// The admin API (all-in-one, coordinator) or `/livez` and `/readyz`
    /// (gateway).
    pub http_addr: SocketAddr,
    gateway: Option<GatewayPart>,
    coordinator: Option<CoordinatorPart>,
    http_shutdown: CancellationToken,
    http: JoinHandle<()>,
    /// Stops the TLS certificate watcher.
    tls_stop: CancellationToken,
    grace: Duration,
}

/// What the process prints on stdout, as one JSON line, once it serves:
/// the documented readiness signal that scripts and tests read.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize, PartialEq, Eq)]
pub struct ReadyLine {
    /// Always `"ready"`.
    pub event: String,
    /// `all-in-one`, `gateway` or `coordinator`.
    pub role: String,
    /// The server's version.
    pub version: String,
    /// OpAMP address (`host:port`), absent on a coordinator.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub opamp: Option<SocketAddr>,
    /// Admin API address (all-in-one, coordinator).
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub admin: Option<SocketAddr>,
    /// Health endpoints' address (gateway).
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub health: Option<SocketAddr>,
}

impl Node {
    /// Validates, binds every listener, connects to what the role needs and
    /// starts serving; fails before serving anything if a port is taken or
    /// a store or broker cannot be reached. `extra` routes (such as
    /// `/metrics`) are served on the node's HTTP listener.
    pub async fn start(role: Role, config: &Config, extra: axum::Router) -> anyhow::Result<Self> {
        let mut config = config.clone();
        if config.gateway.id.is_none() {
            // One id for the bus connection's name and the gateway itself.
            config.gateway.id = Some(GatewayId::random().to_string());
        }
        let tls_stop = CancellationToken::new();
        let mut client_certs = None;
        let tls = match (&config.tls.cert_file, &config.tls.key_file) {
            (Some(cert), Some(key)) => {
                let files = fleetplane_gateway::tls::TlsFiles {
                    cert: cert.clone(),
                    key: key.clone(),
                };
                let resolver =
                    fleetplane_gateway::tls::ReloadingCert::load(files).context("loading the TLS certificate")?;
                if !config.tls.client_cas.is_empty() {
                    let cas = config
                        .tls
                        .client_cas
                        .iter()
                        .map(|ca| Ok((fleetplane_proto::TenantId::new(ca.tenant.clone())?, ca.ca_file.clone())))
                        .collect::<anyhow::Result<Vec<_>>>()?;
                    client_certs = Some(Arc::new(
                        fleetplane_gateway::tls::ClientTenants::load(&cas).context("loading the client CAs")?,
                    ));
                }
                let server_config = resolver
                    .server_config(client_certs.as_deref())
                    .context("building the TLS configuration")?;
                tokio::spawn(resolver.watch(Duration::from_secs(config.tls.reload_interval_secs), tls_stop.clone()));
                Some(server_config)
            }
            _ => None,
        };
        let config = &config;
        let grace = Duration::from_millis(config.gateway.shutdown_grace_ms);
        let http_listener = bind(
            config.admin.listen,
            if role == Role::Gateway { "health" } else { "admin" },
        )?;
        let opamp_listener = match role {
            Role::Coordinator => None,
            _ => Some(bind(config.opamp.listen, "OpAMP")?),
        };
        let (bus, store): (Arc<dyn Bus>, Option<Arc<dyn Store>>) = match role {
            Role::AllInOne => {
                let store = EmbeddedStore::open(&config.store.data_dir)
                    .with_context(|| format!("opening the store in {}", config.store.data_dir.display()))?;
                (Arc::new(MemoryBus::default()), Some(Arc::new(store)))
            }
            Role::Gateway => (
                connect_nats(config, &format!("fleetplane-{}", gateway_id(config)?)).await?,
                None,
            ),
            Role::Coordinator => {
                let store = RedisStore::connect(&config.redis.url, &config.redis.prefix)
                    .await
                    .with_context(|| format!("connecting to Redis at {}", config.redis.url))?;
                (
                    connect_nats(config, "fleetplane-coordinator").await?,
                    Some(Arc::new(store)),
                )
            }
        };
        let coordinator = match store {
            Some(store) => {
                let shutdown = CancellationToken::new();
                let coordinator =
                    Coordinator::start(bus.clone(), store, coordinator_config(config)?, shutdown.clone()).await?;
                Some(CoordinatorPart { shutdown, coordinator })
            }
            None => None,
        };
        let opamp_addr = opamp_listener.as_ref().map(TcpListener::local_addr).transpose()?;
        let gateway = match opamp_listener {
            Some(listener) => {
                let mut gateway_config = gateway_config(config)?;
                gateway_config.tls = tls.clone();
                gateway_config.auth.client_certs = client_certs.clone();
                let drain_budget = gateway_config.drain_period + 3 * gateway_config.shutdown_grace;
                let shutdown = CancellationToken::new();
                let task = tokio::spawn(fleetplane_gateway::serve(
                    listener,
                    bus.clone(),
                    gateway_config,
                    shutdown.clone(),
                ));
                Some(GatewayPart {
                    shutdown,
                    task,
                    drain_budget,
                })
            }
            None => None,
        };
        let router = match (&coordinator, &gateway) {
            (Some(part), _) => admin_router(&part.coordinator, config),
            // A gateway is not ready once its part is draining.
            (None, Some(part)) => fleetplane_gateway::health_router(bus.clone(), part.shutdown.clone()),
            (None, None) => axum::Router::new(),
        };
        let http_addr = http_listener.local_addr()?;
        let http_shutdown = CancellationToken::new();
        let limits = ListenerConfig {
            tls: tls.clone(),
            max_connections: 1024,
            header_read_timeout: Duration::from_millis(config.gateway.header_read_timeout_ms),
            grace,
        };
        let http = tokio::spawn(listener::serve(
            http_listener,
            router.merge(extra),
            limits,
            http_shutdown.clone(),
        ));
        tracing::info!(
            version = env!("CARGO_PKG_VERSION"),
            role = role.name(),
            opamp = %opamp_addr.map(|a| format!("ws://{a}/v1/opamp, http://{a}/v1/opamp")).unwrap_or_default(),
            http = %http_addr,
            "fleetplane started"
        );
        Ok(Self {
            role,
            opamp_addr,
            http_addr,
            gateway,
            coordinator,
            http_shutdown,
            http,
            tls_stop,
            grace,
        })
    }

    /// The readiness line this node prints once it serves.
    pub fn ready_line(&self) -> ReadyLine {
        let (admin, health) = match self.role {
            Role::Gateway => (None, Some(self.http_addr)),
            _ => (Some(self.http_addr), None),
        };
        ReadyLine {
            event: "ready".into(),
            role: self.role.name().into(),
            version: env!("CARGO_PKG_VERSION").into(),
            opamp: self.opamp_addr,
            admin,
            health,
        }
    }

    /// Stops in order, each step bounded so that one stalled peer, broker or
    /// store cannot hold the process:
    ///
    /// 1. the gateway part stops accepting and drains its agents over
    ///    `drain_ms` while the coordinator part still answers them (bounded
    ///    by the drain plus the grace periods of the gateway's own steps);
    /// 2. the coordinator part stops consuming and finishes its tasks
    ///    (bounded by `shutdown_grace_ms`);
    /// 3. the HTTP listener stops (requests in flight get the grace).
    ///
    /// Whatever a step cuts short is logged.
    pub async fn stop(self) -> anyhow::Result<()> {
        let mut result = Ok(());
        if let Some(gateway) = self.gateway {
            gateway.shutdown.cancel();
            match tokio::time::timeout(gateway.drain_budget, gateway.task).await {
                Ok(Ok(Ok(()))) => {}
                Ok(Ok(Err(e))) => result = Err(anyhow::Error::new(e).context("gateway")),
                Ok(Err(e)) => result = Err(anyhow::Error::new(e).context("gateway task")),
                Err(_) => tracing::warn!(
                    budget_secs = gateway.drain_budget.as_secs_f64(),
                    "gateway drain cut short: still running after its budget"
                ),
            }
        }
        if let Some(coordinator) = self.coordinator {
            coordinator.shutdown.cancel();
            if tokio::time::timeout(self.grace, coordinator.coordinator.wait())
                .await
                .is_err()
            {
                tracing::warn!(
                    grace_secs = self.grace.as_secs_f64(),
                    "coordinator tasks cut short: still running after the grace period"
                );
            }
        }
        self.http_shutdown.cancel();
        match tokio::time::timeout(self.grace + Duration::from_secs(2), self.http).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => result = result.and(Err(anyhow::Error::new(e).context("HTTP listener task"))),
            Err(_) => tracing::warn!("HTTP listener cut short after the grace period"),
        }
        self.tls_stop.cancel();
        tracing::info!(role = self.role.name(), "fleetplane stopped");
        result
    }
}

/// A running all-in-one control plane (a [`Node`] of [`Role::AllInOne`]),
/// with both addresses at hand.
#[derive(Debug)]
pub struct AllInOne {
    /// Where agents connect (WebSocket and HTTP, path `/v1/opamp`).
    pub opamp_addr: SocketAddr,
    /// Where the admin API listens.
    pub admin_addr: SocketAddr,
    node: Node,
}

impl AllInOne {
    /// Opens the store, binds both listeners and starts serving.
    pub async fn start(config: &Config) -> anyhow::Result<Self> {
        Self::start_with(config, axum::Router::new()).await
    }

    /// [`AllInOne::start`], with `extra` routes served on the admin port.
    pub async fn start_with(config: &Config, extra: axum::Router) -> anyhow::Result<Self> {
        let node = Node::start(Role::AllInOne, config, extra).await?;
        let opamp_addr = node.opamp_addr.context("an all-in-one node serves OpAMP")?;
        Ok(Self {
            opamp_addr,
            admin_addr: node.http_addr,
            node,
        })
    }

    /// See [`Node::stop`].
    pub async fn stop(self) -> anyhow::Result<()> {
        self.node.stop().await
    }
}

/// What this process reports about itself.
pub fn telemetry_config(config: &Config, service: &str, instance: &str) -> fleetplane_telemetry::TelemetryConfig {
    fleetplane_telemetry::TelemetryConfig {
        service_name: service.to_owned(),
        instance_id: instance.to_owned(),
        otlp_endpoint: config.telemetry.otlp_endpoint.clone(),
        trace_sample_ratio: config.telemetry.trace_sample_ratio,
        metrics_interval: Duration::from_millis(config.telemetry.metrics_interval_ms),
        log_format: match config.log.format {
            config::LogFormat::Text => fleetplane_telemetry::LogFormat::Text,
            config::LogFormat::Json => fleetplane_telemetry::LogFormat::Json,
        },
        log_filter: config.log.filter.clone(),
    }
}

fn coordinator_config(config: &Config) -> anyhow::Result<CoordinatorConfig> {
    let http_offline_after = Duration::from_secs(config.agents.http_offline_after_secs);
    let mut specs = Vec::new();
    for issuer in &config.agents.issuers {
        let tenant = fleetplane_proto::TenantId::new(issuer.tenant.clone())
            .map_err(|e| anyhow::anyhow!("agents.issuers: tenant {:?}: {e}", issuer.tenant))?;
        specs.push((tenant, issuer.ca_cert_file.as_path(), issuer.ca_key_file.as_path()));
    }
    let issuers = fleetplane_coordinator::certificates::Issuers::load(
        &specs,
        Duration::from_secs(config.agents.certificate_lifetime_days.max(1) * 86_400),
    )?;
    Ok(CoordinatorConfig {
        issuers,
        shards: config.coordinator.shards,
        heartbeat_interval: Duration::from_secs(config.agents.heartbeat_interval_secs),
        http_offline_after,
        // Notice silence within a third of the allowance.
        sweep_interval: (http_offline_after / 3).clamp(Duration::from_millis(250), Duration::from_secs(10)),
        store_retry_after: Duration::from_secs(config.gateway.retry_after_secs),
        gateway_dead_after: Duration::from_secs(config.coordinator.gateway_dead_after_secs),
        events_retained: config.coordinator.events_retained.max(1),
        ..Default::default()
    })
}

fn gateway_config(config: &Config) -> anyhow::Result<GatewayConfig> {
    Ok(GatewayConfig {
        gateway_id: gateway_id(config)?,
        max_message_bytes: config.opamp.max_message_bytes,
        public_url: config.opamp.public_url.clone(),
        retry_after: Duration::from_secs(config.gateway.retry_after_secs),
        presence_interval: Duration::from_millis(config.gateway.presence_interval_ms),
        heartbeat_forward_interval: Duration::from_secs(config.gateway.heartbeat_forward_interval_secs),
        drain_period: Duration::from_millis(config.gateway.drain_ms),
        first_message_timeout: Duration::from_secs(config.gateway.first_message_timeout_secs),
        idle_timeout: Duration::from_secs(config.gateway.idle_timeout_secs),
        send_timeout: Duration::from_secs(config.gateway.send_timeout_secs),
        header_read_timeout: Duration::from_millis(config.gateway.header_read_timeout_ms),
        shutdown_grace: Duration::from_millis(config.gateway.shutdown_grace_ms),
        auth: fleetplane_gateway::auth::AuthConfig {
            mode: match config.agents.auth {
                config::AgentAuth::ApiKey => fleetplane_gateway::auth::AuthMode::ApiKey,
                config::AgentAuth::None => fleetplane_gateway::auth::AuthMode::None,
            },
            header: axum::http::HeaderName::from_bytes(config.agents.auth_header.to_ascii_lowercase().as_bytes())?,
            cache_ttl: Duration::from_millis(config.agents.key_cache_ttl_ms),
            failures_per_minute: config.agents.auth_failures_per_minute,
            open_tenant: fleetplane_proto::TenantId::default_tenant(),
            client_certs: None,
        },
        admission: fleetplane_gateway::admission::AdmissionConfig {
            max_connections: config.gateway.max_connections,
            connections_per_second: config.gateway.connections_per_second,
            tenant_connections_per_second: config.gateway.tenant_connections_per_second,
            messages_per_agent_per_minute: config.gateway.messages_per_agent_per_minute,
            max_pending_reports: config.gateway.max_pending_reports,
        },
        ..Default::default()
    })
}

fn admin_router(coordinator: &Coordinator, config: &Config) -> axum::Router {
    use admin::access::{OperatorToken, Role, Scope};
    let legacy = config
        .admin
        .token
        .iter()
        .filter(|t| !t.is_empty())
        .map(|token| OperatorToken {
            name: "admin".into(),
            token: token.clone(),
            role: Role::Admin,
            scope: Scope::All,
        });
    let tokens = config.admin.tokens.iter().map(|t| OperatorToken {
        name: t.name.clone(),
        token: t.token.clone(),
        role: t.role,
        // Validated with the configuration.
        scope: match fleetplane_proto::TenantId::new(t.tenant.clone()) {
            Ok(tenant) if t.tenant != "*" => Scope::Tenant(tenant),
            _ => Scope::All,
        },
    });
    admin::router(
        coordinator.clone(),
        AdminConfig {
            tokens: legacy.chain(tokens).collect(),
        },
    )
}

fn bind(addr: SocketAddr, what: &str) -> anyhow::Result<TcpListener> {
    listener::bind(addr).with_context(|| format!("binding the {what} listener to {addr}"))
}

/// The gateway id from the configuration, or a random one.
fn gateway_id(config: &Config) -> anyhow::Result<GatewayId> {
    Ok(match &config.gateway.id {
        Some(id) => GatewayId::new(id.clone())?,
        None => GatewayId::random(),
    })
}

async fn connect_nats(config: &Config, name: &str) -> anyhow::Result<Arc<dyn Bus>> {
    let bus = NatsBus::connect(NatsConfig {
        url: config.nats.url.clone(),
        name: name.to_owned(),
        request_timeout: Duration::from_millis(config.nats.request_timeout_ms),
        ..Default::default()
    })
    .await
    .with_context(|| format!("connecting to NATS at {}", config.nats.url))?;
    Ok(Arc::new(bus))
}
