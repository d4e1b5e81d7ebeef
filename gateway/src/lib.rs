//! The gateway: where agents connect.
//!
//! A gateway terminates OpAMP on one port and path (`/v1/opamp`), both
//! transports: a request with `Content-Type: application/x-protobuf` is plain
//! HTTP ([`http`]), anything else is a WebSocket upgrade ([`ws`]). It decodes
//! and validates every message, hands it to a coordinator over the bus, and
//! returns the coordinator's answer. It keeps no agent state beyond the
//! [`registry`] of live connections, which routes the messages coordinators
//! push (new configs) to the right socket. So any gateway can serve any agent,
//! and a gateway can die without losing anything but connections.
//!
//! Errors are answered the OpAMP way: malformed input gets a ServerErrorResponse
//! of type BadRequest (or an HTTP status where the spec says so), and an
//! unavailable coordinator gets Unavailable with a jittered retry hint.

pub mod admission;
pub mod auth;
mod frame_guard;
mod http;
pub mod listener;
mod metrics;
mod registry;
pub mod tls;
mod ws;

use std::{
    collections::HashMap,
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use axum::{Router, routing::any};
use fleetplane_bus::{Bus, BusError, GatewayPresence, Heartbeat, LivenessBatch, Report};
use fleetplane_proto::{
    ConnectionId, GatewayId, InstanceUid, Link, TenantId,
    http::{DEFAULT_MAX_MESSAGE_BYTES, OPAMP_PATH},
    opamp::{AgentToServer, ServerToAgent},
};
use tokio::net::TcpListener;
use tokio_util::{sync::CancellationToken, task::TaskTracker};
use tracing::Instrument;

use crate::registry::{Registry, RouteError};

/// Gateway settings. Every field has a default suited to a first run.
#[derive(Debug, Clone)]
pub struct GatewayConfig {
    /// This gateway's id on the bus; coordinators address pushes to it.
    pub gateway_id: GatewayId,
    /// Tenant of the gateway's own metrics; agents' tenants come from their
    /// credentials (see [`auth`]).
    pub tenant: TenantId,
    /// How agents authenticate.
    pub auth: auth::AuthConfig,
    /// Largest inbound message, after decompression, header included (bytes).
    /// The spec recommends 64 MiB.
    pub max_message_bytes: usize,
    /// WebSocket read buffer per connection (bytes). Small, because idle
    /// agents dominate and tungstenite's default is 128 KiB each; larger
    /// messages are read in several chunks. Default 1 KiB.
    pub ws_read_buffer_bytes: usize,
    /// WebSocket write buffer per connection (bytes) before a flush. Default 1 KiB.
    pub ws_write_buffer_bytes: usize,
    /// Pushed messages waiting per WebSocket connection; overflow is dropped
    /// (the agent's next report gets the same answer).
    pub outbound_queue: usize,
    /// Base retry hint when no coordinator answers; jittered up to twice that.
    pub retry_after: Duration,
    /// URL agents should use to reach this control plane, restated in
    /// connection-settings offers. Unset: derived from the request's Host header.
    pub public_url: Option<String>,
    /// How often the gateway tells coordinators it is alive, and flushes the
    /// liveness of the heartbeats it answered itself.
    pub presence_interval: Duration,
    /// On shutdown, connections are closed at random moments over this
    /// period, each agent told to come back after a jittered hint, so a
    /// rolling restart of all gateways causes no reconnect storm.
    pub drain_period: Duration,
    /// Connection and message limits (see [`admission`]).
    pub admission: admission::AdmissionConfig,
    /// A settled WebSocket agent's heartbeats are answered by the gateway,
    /// but one at least this often still goes to a coordinator, which
    /// compares the agent with its desired state again (level-triggered).
    pub heartbeat_forward_interval: Duration,
    /// A WebSocket whose first OpAMP message has not arrived this long after
    /// the upgrade is closed (1008), so silent sockets cannot hold slots.
    /// Zero disables. Default 30 s.
    pub first_message_timeout: Duration,
    /// A WebSocket silent this long is closed; after half of it the gateway
    /// pings, which any live client answers. A few heartbeat intervals.
    /// Zero disables. Default 90 s.
    pub idle_timeout: Duration,
    /// A send that a peer does not take within this (it stopped reading)
    /// ends its connection. Default 30 s.
    pub send_timeout: Duration,
    /// A request's headers must arrive within this (both transports; a
    /// client sending a byte a second is dropped). Default 10 s.
    pub header_read_timeout: Duration,
    /// Serve `wss://` and `https://` with this (see [`tls`]); plain when `None`.
    pub tls: Option<Arc<rustls::ServerConfig>>,
    /// On shutdown, how long past `drain_period` sessions may take to close
    /// before they are cut off, and the bound on each later step (the bus's
    /// close reports, the goodbye). Default 5 s.
    pub shutdown_grace: Duration,
}

impl Default for GatewayConfig {
    fn default() -> Self {
        Self {
            gateway_id: GatewayId::random(),
            tenant: TenantId::default_tenant(),
            auth: auth::AuthConfig::default(),
            max_message_bytes: DEFAULT_MAX_MESSAGE_BYTES,
            ws_read_buffer_bytes: 1024,
            ws_write_buffer_bytes: 1024,
            outbound_queue: 8,
            retry_after: Duration::from_secs(10),
            public_url: None,
            presence_interval: Duration::from_secs(1),
            heartbeat_forward_interval: Duration::from_secs(300),
            admission: admission::AdmissionConfig::default(),
            drain_period: Duration::from_secs(10),
            first_message_timeout: Duration::from_secs(30),
            idle_timeout: Duration::from_secs(90),
            send_timeout: Duration::from_secs(30),
            header_read_timeout: Duration::from_secs(10),
            shutdown_grace: Duration::from_secs(5),
            tls: None,
        }
    }
}

/// State shared by every connection of one gateway.
#[derive(Debug)]
struct Shared {
    bus: Arc<dyn Bus>,
    config: GatewayConfig,
    registry: Registry,
    next_connection: AtomicU64,
    shutdown: CancellationToken,
    /// Cancelled when the drain's grace has run out: sessions stop at once.
    hard_stop: CancellationToken,
    sessions: TaskTracker,
    /// Agents told "unavailable" because no coordinator answered, logged as
    /// one line with a count at most once a second, not one line per agent.
    unanswered: RateLimitedWarning,
    /// Advances when the bus reconnected; sessions then ask for full state.
    bus_epoch: tokio::sync::watch::Receiver<u64>,
    metrics: metrics::GatewayMetrics,
    /// Connection and message limits.
    admission: admission::Admission,
    /// Heartbeats answered here, waiting for the next liveness batch.
    liveness: std::sync::Mutex<HashMap<registry::AgentKey, Heartbeat>>,
    /// Who agents are.
    auth: Arc<auth::Authenticator>,
}

/// A warning that many agents may trigger at once, logged at most once a
/// second with how many times it happened.
#[derive(Debug, Default)]
struct RateLimitedWarning {
    count: AtomicU64,
    last_logged_ms: AtomicU64,
}

impl RateLimitedWarning {
    fn note(&self, what: &'static str, error: &dyn std::fmt::Display) {
        self.count.fetch_add(1, Ordering::Relaxed);
        let now = unix_ms();
        let last = self.last_logged_ms.load(Ordering::Relaxed);
        if now.saturating_sub(last) >= 1000
            && self
                .last_logged_ms
                .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
        {
            let count = self.count.swap(0, Ordering::Relaxed);
            tracing::warn!(count, last_error = %error, "{what}");
        }
    }
}

impl Shared {
    fn pending_liveness(&self) -> std::sync::MutexGuard<'_, HashMap<registry::AgentKey, Heartbeat>> {
        self.liveness.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Records a heartbeat answered here (latest wins per agent).
    fn note_liveness(&self, tenant: &TenantId, uid: InstanceUid, connection: ConnectionId, sequence_num: u64) {
        self.pending_liveness().insert(
            (tenant.clone(), uid),
            Heartbeat {
                uid,
                connection,
                sequence_num,
                seen_unix_ms: unix_ms(),
            },
        );
    }

    /// Drops pending liveness of agents whose connection just closed.
    fn forget_liveness(&self, tenant: &TenantId, agents: &[InstanceUid], connection: ConnectionId) {
        let mut pending = self.pending_liveness();
        for uid in agents {
            let key = (tenant.clone(), *uid);
            if pending.get(&key).is_some_and(|l| l.connection == connection) {
                pending.remove(&key);
            }
        }
    }

    /// Wraps a checked agent message in the bus's report: the tenant and
    /// identity come from the credentials, never from the message.
    fn envelope(
        &self,
        tenant: &TenantId,
        uid: InstanceUid,
        message: AgentToServer,
        link: Link,
        endpoint: &str,
        identity: Option<String>,
    ) -> Report {
        let mut report = Report::new(tenant.clone(), uid, self.config.gateway_id.clone(), link, message);
        report.endpoint = endpoint.to_owned();
        report.identity = identity;
        report
    }

    /// The endpoint URL an agent used, for connection-settings offers;
    /// `scheme` is the plain one (`ws`, `http`), made secure under TLS.
    fn endpoint(&self, scheme: &str, host: Option<&str>) -> String {
        let scheme = match (scheme, self.config.tls.is_some()) {
            ("ws", true) => "wss",
            ("http", true) => "https",
            (scheme, _) => scheme,
        };
        match (&self.config.public_url, host) {
            (Some(url), _) => url.clone(),
            (None, Some(host)) => format!("{scheme}://{host}{OPAMP_PATH}"),
            (None, None) => String::new(),
        }
    }

    /// Asks a coordinator, in a `bus.request` span whose context travels in
    /// the envelope, and counts the outcome.
    async fn ask(&self, mut report: Report) -> Result<ServerToAgent, BusError> {
        let span = tracing::info_span!("bus.request", otel.kind = "client", outcome = tracing::field::Empty);
        report.trace_context = fleetplane_bus::trace_context::inject(&span);
        let started = tokio::time::Instant::now();
        let result = self.bus.report(report).instrument(span.clone()).await;
        let outcome = match &result {
            Ok(_) => "ok",
            Err(BusError::Timeout(_)) => "timeout",
            Err(BusError::NoCoordinator) => "no_coordinator",
            Err(_) => "error",
        };
        span.record("outcome", outcome);
        self.metrics.bus_request(started.elapsed().as_secs_f64(), outcome);
        self.metrics.admission(
            if result.is_ok() { "accepted" } else { "shed" },
            if result.is_ok() {
                "ok"
            } else {
                "control_plane_unavailable"
            },
        );
        result
    }
}

use fleetplane_proto::clock::unix_ms;

/// The checks every agent message passes before it goes on the bus.
fn validate(message: &AgentToServer) -> Result<InstanceUid, String> {
    InstanceUid::from_slice(&message.instance_uid).map_err(|e| e.to_string())
}

/// The gateway's OpAMP routes.
fn router(shared: Arc<Shared>) -> Router {
    Router::new()
        .route(OPAMP_PATH, any(http::opamp))
        .fallback(|| async {
            (
                axum::http::StatusCode::NOT_FOUND,
                "not an OpAMP endpoint; use /v1/opamp",
            )
        })
        .with_state(shared)
}

/// Serves OpAMP on `listener` until `shutdown` is cancelled, then drains, in
/// order and with every step bounded:
///
/// 1. stop accepting (HTTP requests in flight get `shutdown_grace`);
/// 2. close WebSockets at spread-out moments over `drain_period`, each agent
///    still served normally until its connection's turn; sessions still open
///    `shutdown_grace` after that are cut off;
/// 3. stop routing pushes and announcing presence (presence goes on during
///    the drain, so coordinators do not declare this gateway dead while it
///    still holds agents);
/// 4. say goodbye on the bus, if it answers within `shutdown_grace`.
///
/// Returns after step 4 whatever the bus or the peers do.
pub async fn serve(
    listener: TcpListener,
    bus: Arc<dyn Bus>,
    config: GatewayConfig,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    let local: SocketAddr = listener.local_addr()?;
    let deliveries = bus
        .subscribe_deliveries(&config.gateway_id)
        .await
        .map_err(std::io::Error::other)?;
    let bus_epoch = bus.epoch();
    let metrics = metrics::GatewayMetrics::new(config.gateway_id.as_str(), config.tenant.as_str());
    let limits = listener::ListenerConfig {
        // Room above the WebSocket cap, so that over it agents still get a
        // 503 with a retry hint instead of waiting in the backlog.
        max_connections: match config.admission.max_connections {
            0 => 0,
            n => n + n / 10 + 64,
        },
        header_read_timeout: config.header_read_timeout,
        grace: config.shutdown_grace,
        tls: config.tls.clone(),
    };
    let shared = Arc::new(Shared {
        auth: Arc::new(auth::Authenticator::new(config.auth.clone(), bus.clone())),
        admission: admission::Admission::new(config.admission.clone(), config.retry_after),
        liveness: std::sync::Mutex::new(HashMap::new()),
        metrics,
        bus_epoch,
        bus,
        config,
        registry: Registry::default(),
        next_connection: AtomicU64::new(1),
        shutdown: shutdown.clone(),
        hard_stop: CancellationToken::new(),
        sessions: TaskTracker::new(),
        unanswered: RateLimitedWarning::default(),
    });
    tracing::info!(gateway_id = %shared.config.gateway_id, address = %local, path = OPAMP_PATH, "gateway listening");
    let background = TaskTracker::new();
    let background_stop = CancellationToken::new();
    background.spawn(route_deliveries(shared.clone(), deliveries, background_stop.clone()));
    background.spawn(announce(shared.clone(), background_stop.clone()));
    background.spawn(recheck_keys(shared.clone(), background_stop.clone()));
    background.close();

    listener::serve(listener, router(shared.clone()), limits, shutdown.clone()).await;

    let grace = shared.config.shutdown_grace;
    shared.sessions.close();
    let drain = shared.config.drain_period + grace;
    if tokio::time::timeout(drain, shared.sessions.wait()).await.is_err() {
        tracing::warn!(
            open = shared.sessions.len(),
            "connections still open {}s after the drain began; cutting them off",
            drain.as_secs_f64()
        );
        shared.hard_stop.cancel();
        if tokio::time::timeout(grace, shared.sessions.wait()).await.is_err() {
            tracing::warn!(open = shared.sessions.len(), "connections did not stop; abandoned");
        }
    }
    background_stop.cancel();
    if tokio::time::timeout(grace, background.wait()).await.is_err() {
        tracing::warn!("presence and push routing did not stop within the grace period");
    }
    // Sessions have reported their closed agents; now say goodbye.
    match tokio::time::timeout(grace, shared.bus.announce(presence(&shared, true))).await {
        Ok(Ok(())) => {}
        // The coordinators notice the silence after gateway_dead_after instead.
        Ok(Err(e)) => tracing::warn!(error = %e, "could not announce leaving"),
        Err(_) => tracing::warn!("leaving not announced: the bus did not take it within the grace period"),
    }
    tracing::info!(gateway_id = %shared.config.gateway_id, "gateway stopped");
    Ok(())
}

fn presence(shared: &Shared, leaving: bool) -> GatewayPresence {
    GatewayPresence {
        gateway: shared.config.gateway_id.clone(),
        agents: shared.registry.len() as u64,
        sent_unix_ms: unix_ms(),
        leaving,
    }
}

/// Tells the coordinators this gateway is alive, and which heartbeats it
/// answered itself, until shutdown: one presence beat and at most one
/// liveness batch per interval, whatever the number of agents.
async fn announce(shared: Arc<Shared>, stop: CancellationToken) {
    let mut ticks = tokio::time::interval(shared.config.presence_interval);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut last_prune = tokio::time::Instant::now();
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = ticks.tick() => {}
        }
        if last_prune.elapsed() >= Duration::from_secs(30) {
            shared.admission.prune();
            shared.auth.prune();
            last_prune = tokio::time::Instant::now();
        }
        // Bounded: a bus that stopped answering must not stall the beat.
        let beat = tokio::time::timeout(
            shared.config.presence_interval.max(Duration::from_millis(100)),
            shared.bus.announce(presence(&shared, false)),
        );
        match beat.await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::debug!(error = %e, "presence not announced"),
            Err(_) => tracing::debug!("presence not announced: the bus is slow"),
        }
        let mut by_tenant: HashMap<TenantId, Vec<Heartbeat>> = HashMap::new();
        for ((tenant, _), entry) in shared.pending_liveness().drain() {
            by_tenant.entry(tenant).or_default().push(entry);
        }
        for (tenant, agents) in by_tenant {
            let batch = LivenessBatch {
                tenant,
                gateway: shared.config.gateway_id.clone(),
                agents,
            };
            if let Err(e) = shared.bus.liveness(batch).await {
                // Lost liveness only delays last_seen; the agents' next
                // forwarded message carries the truth.
                tracing::debug!(error = %e, "liveness batch not sent");
            }
        }
    }
}

/// Re-checks the keys of open connections, so that revoking a key closes
/// its connections within the cache's lifetime.
async fn recheck_keys(shared: Arc<Shared>, stop: CancellationToken) {
    if shared.auth.mode() == auth::AuthMode::None {
        return;
    }
    let mut ticks = tokio::time::interval(shared.auth.recheck_interval());
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = ticks.tick() => {}
        }
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = shared.auth.recheck_watched() => {}
        }
    }
}

/// `/livez` and `/readyz` for a gateway: ready while it accepts agents and
/// its bus is connected.
pub fn health_router(bus: Arc<dyn Bus>, shutdown: CancellationToken) -> Router {
    use axum::http::StatusCode;
    Router::new()
        .route("/livez", axum::routing::get(|| async { "ok" }))
        .route(
            "/readyz",
            axum::routing::get(move || {
                let ready = !shutdown.is_cancelled() && bus.is_connected();
                async move {
                    if ready {
                        (StatusCode::OK, "ready")
                    } else {
                        (
                            StatusCode::SERVICE_UNAVAILABLE,
                            "not ready: draining or bus disconnected",
                        )
                    }
                }
            }),
        )
}

/// Hands coordinator pushes to the sessions holding their agents.
async fn route_deliveries(
    shared: Arc<Shared>,
    mut deliveries: tokio::sync::mpsc::Receiver<fleetplane_bus::Delivery>,
    stop: CancellationToken,
) {
    loop {
        let delivery = tokio::select! {
            _ = stop.cancelled() => return,
            delivery = deliveries.recv() => match delivery {
                Some(delivery) => delivery,
                None => return,
            },
        };
        let uid = delivery.uid;
        match shared
            .registry
            .route(&delivery.tenant, &uid, delivery.connection, delivery.message)
        {
            Ok(()) => {}
            Err(RouteError::NotHere) => tracing::debug!(%uid, "push for an agent no longer here"),
            Err(RouteError::Full) => tracing::debug!(%uid, "outbound queue full, push dropped"),
        }
    }
}
