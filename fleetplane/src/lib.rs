//! Fleetplane's server binary, as a library so that tests run it in-process.
//!
//! Three ways to run the same libraries:
//! - [`AllInOne`]: one process with no external services, the gateway and the
//!   coordinator joined by the in-process bus, state in the embedded store;
//! - [`GatewayNode`]: a stateless gateway on NATS;
//! - [`CoordinatorNode`]: a coordinator replica on NATS with state in Redis,
//!   serving the admin API.

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
use fleetplane_gateway::GatewayConfig;
use fleetplane_proto::GatewayId;
use tokio::{net::TcpListener, task::JoinHandle};
use tokio_util::sync::CancellationToken;

pub use config::Config;

/// A running all-in-one control plane.
#[derive(Debug)]
pub struct AllInOne {
    /// Where agents connect (WebSocket and HTTP, path `/v1/opamp`).
    pub opamp_addr: SocketAddr,
    /// Where the admin API listens.
    pub admin_addr: SocketAddr,
    shutdown: CancellationToken,
    coordinator: Coordinator,
    gateway: JoinHandle<std::io::Result<()>>,
    admin: JoinHandle<std::io::Result<()>>,
}

impl AllInOne {
    /// Opens the store, binds both listeners and starts serving. Fails before
    /// serving anything if the store cannot be opened or a port is taken.
    pub async fn start(config: &Config) -> anyhow::Result<Self> {
        Self::start_with(config, axum::Router::new()).await
    }

    /// [`AllInOne::start`], with `extra` routes (such as `/metrics`) served on
    /// the admin port.
    pub async fn start_with(config: &Config, extra: axum::Router) -> anyhow::Result<Self> {
        let store: Arc<dyn Store> = Arc::new(
            EmbeddedStore::open(&config.store.data_dir)
                .with_context(|| format!("opening the store in {}", config.store.data_dir.display()))?,
        );
        let opamp_listener = bind(config.opamp.listen, "OpAMP").await?;
        let admin_listener = bind(config.admin.listen, "admin").await?;
        let opamp_addr = opamp_listener.local_addr()?;
        let admin_addr = admin_listener.local_addr()?;

        let shutdown = CancellationToken::new();
        let bus: Arc<dyn Bus> = Arc::new(MemoryBus::default());
        let coordinator = Coordinator::start(bus.clone(), store, coordinator_config(config), shutdown.clone()).await?;
        let gateway = tokio::spawn(fleetplane_gateway::serve(
            opamp_listener,
            bus,
            gateway_config(config)?,
            shutdown.clone(),
        ));
        let admin = serve_http(
            admin_listener,
            admin_router(&coordinator, config).merge(extra),
            shutdown.clone(),
        );
        tracing::info!(
            version = env!("CARGO_PKG_VERSION"),
            opamp = %format!("ws://{opamp_addr}/v1/opamp, http://{opamp_addr}/v1/opamp"),
            admin = %format!("http://{admin_addr}/api/v1"),
            data_dir = %config.store.data_dir.display(),
            "fleetplane all-in-one started"
        );
        Ok(Self {
            opamp_addr,
            admin_addr,
            shutdown,
            coordinator,
            gateway,
            admin,
        })
    }

    /// Stops accepting, closes agent connections, finishes in-flight work and
    /// closes the store.
    pub async fn stop(self) -> anyhow::Result<()> {
        self.shutdown.cancel();
        let gateway = self.gateway.await;
        let admin = self.admin.await;
        self.coordinator.wait().await;
        gateway.context("gateway task")?.context("gateway")?;
        admin.context("admin task")?.context("admin API")?;
        Ok(())
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

fn coordinator_config(config: &Config) -> CoordinatorConfig {
    let http_offline_after = Duration::from_secs(config.agents.http_offline_after_secs);
    CoordinatorConfig {
        shards: config.coordinator.shards,
        heartbeat_interval: Duration::from_secs(config.agents.heartbeat_interval_secs),
        http_offline_after,
        // Notice silence within a third of the allowance.
        sweep_interval: (http_offline_after / 3).clamp(Duration::from_millis(250), Duration::from_secs(10)),
        store_retry_after: Duration::from_secs(config.gateway.retry_after_secs),
        gateway_dead_after: Duration::from_secs(config.coordinator.gateway_dead_after_secs),
        ..Default::default()
    }
}

fn gateway_config(config: &Config) -> anyhow::Result<GatewayConfig> {
    let gateway_id = match &config.gateway.id {
        Some(id) => GatewayId::new(id.clone())?,
        None => GatewayId::random(),
    };
    Ok(GatewayConfig {
        gateway_id,
        max_message_bytes: config.opamp.max_message_bytes,
        public_url: config.opamp.public_url.clone(),
        retry_after: Duration::from_secs(config.gateway.retry_after_secs),
        presence_interval: Duration::from_millis(config.gateway.presence_interval_ms),
        heartbeat_forward_interval: Duration::from_secs(config.gateway.heartbeat_forward_interval_secs),
        drain_period: Duration::from_millis(config.gateway.drain_ms),
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
    admin::router(
        coordinator.clone(),
        AdminConfig {
            token: config.admin.token.clone(),
        },
    )
}

fn serve_http(
    listener: TcpListener,
    router: axum::Router,
    shutdown: CancellationToken,
) -> JoinHandle<std::io::Result<()>> {
    tokio::spawn(async move {
        axum::serve(listener, router)
            .with_graceful_shutdown(shutdown.cancelled_owned())
            .await
    })
}

async fn bind(addr: SocketAddr, what: &str) -> anyhow::Result<TcpListener> {
    TcpListener::bind(addr)
        .await
        .with_context(|| format!("binding the {what} listener to {addr}"))
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

/// A stateless gateway: agents connect here; everything else happens in the
/// coordinators, reached over NATS.
#[derive(Debug)]
pub struct GatewayNode {
    /// Where agents connect.
    pub opamp_addr: SocketAddr,
    /// `/livez` and `/readyz`.
    pub health_addr: SocketAddr,
    shutdown: CancellationToken,
    gateway: JoinHandle<std::io::Result<()>>,
    health: JoinHandle<std::io::Result<()>>,
}

impl GatewayNode {
    /// Connects to NATS, binds and serves; `extra` routes (such as `/metrics`)
    /// are served beside the health endpoints.
    pub async fn start(config: &Config, extra: axum::Router) -> anyhow::Result<Self> {
        let gateway_config = gateway_config(config)?;
        let opamp_listener = bind(config.opamp.listen, "OpAMP").await?;
        let health_listener = bind(config.admin.listen, "health").await?;
        let bus = connect_nats(config, &format!("fleetplane-{}", gateway_config.gateway_id)).await?;
        let opamp_addr = opamp_listener.local_addr()?;
        let health_addr = health_listener.local_addr()?;
        let shutdown = CancellationToken::new();
        let gateway_id = gateway_config.gateway_id.clone();
        let health = serve_http(
            health_listener,
            fleetplane_gateway::health_router(bus.clone(), shutdown.clone()).merge(extra),
            shutdown.clone(),
        );
        let gateway = tokio::spawn(fleetplane_gateway::serve(
            opamp_listener,
            bus,
            gateway_config,
            shutdown.clone(),
        ));
        tracing::info!(
            version = env!("CARGO_PKG_VERSION"),
            %gateway_id,
            opamp = %opamp_addr,
            health = %health_addr,
            nats = %config.nats.url,
            "fleetplane gateway started"
        );
        Ok(Self {
            opamp_addr,
            health_addr,
            shutdown,
            gateway,
            health,
        })
    }

    /// Closes agent connections and stops.
    pub async fn stop(self) -> anyhow::Result<()> {
        self.shutdown.cancel();
        let gateway = self.gateway.await;
        let health = self.health.await;
        gateway.context("gateway task")?.context("gateway")?;
        health.context("health task")?.context("health endpoint")?;
        Ok(())
    }
}

/// A coordinator replica: consumes agent reports from NATS, keeps state in
/// Redis, serves the admin API. Run two or more; all are active.
#[derive(Debug)]
pub struct CoordinatorNode {
    /// The admin API, `/livez` and `/readyz`.
    pub admin_addr: SocketAddr,
    shutdown: CancellationToken,
    coordinator: Coordinator,
    admin: JoinHandle<std::io::Result<()>>,
}

impl CoordinatorNode {
    /// Connects to Redis and NATS, binds and serves; `extra` routes (such as
    /// `/metrics`) are served beside the admin API.
    pub async fn start(config: &Config, extra: axum::Router) -> anyhow::Result<Self> {
        let admin_listener = bind(config.admin.listen, "admin").await?;
        let store: Arc<dyn Store> = Arc::new(
            RedisStore::connect(&config.redis.url, &config.redis.prefix)
                .await
                .with_context(|| format!("connecting to Redis at {}", config.redis.url))?,
        );
        let bus = connect_nats(config, "fleetplane-coordinator").await?;
        let shutdown = CancellationToken::new();
        let coordinator = Coordinator::start(bus, store, coordinator_config(config), shutdown.clone()).await?;
        let admin_addr = admin_listener.local_addr()?;
        let admin = serve_http(
            admin_listener,
            admin_router(&coordinator, config).merge(extra),
            shutdown.clone(),
        );
        tracing::info!(
            version = env!("CARGO_PKG_VERSION"),
            admin = %format!("http://{admin_addr}/api/v1"),
            nats = %config.nats.url,
            redis = %config.redis.url,
            "fleetplane coordinator started"
        );
        Ok(Self {
            admin_addr,
            shutdown,
            coordinator,
            admin,
        })
    }

    /// Stops consuming and serving.
    pub async fn stop(self) -> anyhow::Result<()> {
        self.shutdown.cancel();
        let admin = self.admin.await;
        self.coordinator.wait().await;
        admin.context("admin task")?.context("admin API")?;
        Ok(())
    }
}
