//! Fleetplane's server binary, as a library so that tests run it in-process.
//!
//! [`AllInOne`] is one process with no external services: the gateway and the
//! coordinator libraries joined by the in-process bus, state in the embedded
//! store. The scaled form runs the same libraries as separate processes over
//! NATS and Redis.

pub mod config;

use std::{net::SocketAddr, sync::Arc, time::Duration};

use anyhow::Context;
use fleetplane_bus::{Bus, memory::MemoryBus};
use fleetplane_coordinator::{
    Coordinator, CoordinatorConfig,
    admin::{self, AdminConfig},
    store::{Store, embedded::EmbeddedStore},
};
use fleetplane_gateway::GatewayConfig;
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
        let store: Arc<dyn Store> = Arc::new(
            EmbeddedStore::open(&config.store.data_dir)
                .with_context(|| format!("opening the store in {}", config.store.data_dir.display()))?,
        );
        let opamp_listener = TcpListener::bind(config.opamp.listen)
            .await
            .with_context(|| format!("binding the OpAMP listener to {}", config.opamp.listen))?;
        let admin_listener = TcpListener::bind(config.admin.listen)
            .await
            .with_context(|| format!("binding the admin listener to {}", config.admin.listen))?;
        let opamp_addr = opamp_listener.local_addr()?;
        let admin_addr = admin_listener.local_addr()?;

        let shutdown = CancellationToken::new();
        let bus: Arc<dyn Bus> = Arc::new(MemoryBus::default());
        let heartbeat = Duration::from_secs(config.agents.heartbeat_interval_secs);
        let coordinator = Coordinator::start(
            bus.clone(),
            store,
            CoordinatorConfig {
                heartbeat_interval: heartbeat,
                http_offline_after: Duration::from_secs(config.agents.http_offline_after_secs),
                // Notice silence within a third of the allowance.
                sweep_interval: (Duration::from_secs(config.agents.http_offline_after_secs) / 3)
                    .clamp(Duration::from_millis(250), Duration::from_secs(10)),
                ..Default::default()
            },
            shutdown.clone(),
        )
        .await?;

        let gateway_config = GatewayConfig {
            max_message_bytes: config.opamp.max_message_bytes,
            public_url: config.opamp.public_url.clone(),
            ..Default::default()
        };
        let gateway = tokio::spawn(fleetplane_gateway::serve(
            opamp_listener,
            bus,
            gateway_config,
            shutdown.clone(),
        ));

        let router = admin::router(
            coordinator.clone(),
            AdminConfig {
                token: config.admin.token.clone(),
            },
        );
        let admin_shutdown = shutdown.clone();
        let admin = tokio::spawn(async move {
            axum::serve(admin_listener, router)
                .with_graceful_shutdown(admin_shutdown.cancelled_owned())
                .await
        });
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
