//! The coordinator: Fleetplane's brain.
//!
//! It consumes what gateways send over the bus, keeps every agent's state in a
//! [`store::Store`], decides what each agent must receive, and serves the admin
//! API. Data flows through these modules in order:
//!
//! - `worker`: shards jobs by agent so each agent's updates apply in order;
//! - [`inventory`]: merges (compressed) agent reports into the agent record;
//! - [`desired`] with [`selector`]: which config version an agent should run;
//! - [`reconcile`]: what to send, decided level-triggered on every report;
//! - [`store`]: the durable state ([`store::embedded`] in all-in-one mode);
//! - [`admin`]: the operators' JSON API.
//!
//! [`Coordinator::start`] runs all of it against any [`fleetplane_bus::Bus`] and
//! [`store::Store`], which is what makes the all-in-one and scaled modes one
//! code path.

pub mod admin;
pub mod certificates;
pub mod commands;
pub mod components;
pub(crate) mod conflict;
pub mod desired;
pub mod drift;
pub mod events;
pub mod inventory;
mod liveness;
mod metrics;
pub mod presence;
pub mod reconcile;
pub mod rollout;
pub mod selector;
pub mod store;
mod worker;
pub mod yaml;

use std::{
    sync::{Arc, Mutex, MutexGuard},
    time::Duration,
};

use fleetplane_bus::{Bus, BusError, CoordinatorInput, ReportRequest};
use fleetplane_proto::{
    ConnectionId, GatewayId, InstanceUid, TenantId, errors::error_reply, internal::Transport,
    opamp::ServerErrorResponseType, retry,
};
use tokio::sync::mpsc;
use tokio_util::{sync::CancellationToken, task::TaskTracker};

use crate::{
    presence::Presence,
    reconcile::ReplySettings,
    store::{Store, StoreError},
    worker::{Job, Shards, WorkerContext},
};

/// Coordinator settings.
#[derive(Debug, Clone)]
pub struct CoordinatorConfig {
    /// Number of shard workers; each handles its agents one message at a time.
    pub shards: usize,
    /// Jobs waiting per shard before senders wait.
    pub shard_queue: usize,
    /// Heartbeat interval offered to agents that accept it (zero: offer none).
    /// Also the expected polling interval of HTTP agents.
    pub heartbeat_interval: Duration,
    /// An HTTP agent that has not polled for this long counts as disconnected.
    pub http_offline_after: Duration,
    /// How often HTTP agents are checked for silence.
    pub sweep_interval: Duration,
    /// Base of the retry hint when the store is unavailable (jittered up to 2x).
    pub store_retry_after: Duration,
    /// A gateway silent this long is dead; its WebSocket agents count as
    /// disconnected until they reconnect elsewhere.
    pub gateway_dead_after: Duration,
    /// How often rollouts are stepped (their decisions come within this).
    pub rollout_tick: Duration,
    /// Events kept per tenant for the event stream.
    pub events_retained: usize,
    /// Issuing CAs for agents' certificate requests.
    pub issuers: certificates::Issuers,
}

impl Default for CoordinatorConfig {
    fn default() -> Self {
        Self {
            shards: 8,
            shard_queue: 1024,
            heartbeat_interval: Duration::from_secs(30),
            http_offline_after: Duration::from_secs(90),
            sweep_interval: Duration::from_secs(10),
            store_retry_after: Duration::from_secs(10),
            gateway_dead_after: Duration::from_secs(5),
            rollout_tick: Duration::from_millis(500),
            events_retained: 10_000,
            issuers: certificates::Issuers::default(),
        }
    }
}

/// A running coordinator. Cheap to clone; every clone drives the same one.
#[derive(Debug, Clone)]
pub struct Coordinator {
    shards: Shards,
    store: Arc<dyn Store>,
    bus: Arc<dyn Bus>,
    tracker: TaskTracker,
    rollouts: rollout::executor::Executor,
    events: Arc<events::Events>,
    /// The tenants' issuing CAs, for certificates an operator asks for.
    issuers: certificates::Issuers,
    /// Reconcile requests per tenant, coalesced (see [`Coordinator::reconcile_soon`]).
    reconciles: Arc<Mutex<std::collections::HashMap<TenantId, Arc<ReconcileRequests>>>>,
    /// Reconcile passes run so far (each lists a tenant's agents).
    reconcile_passes: Arc<std::sync::atomic::AtomicU64>,
    shutdown: CancellationToken,
}

/// One tenant's reconcile requests: how many were made, and a wake-up for
/// its runner.
#[derive(Debug, Default)]
struct ReconcileRequests {
    requested: std::sync::atomic::AtomicU64,
    wake: tokio::sync::Notify,
}

impl Coordinator {
    /// Subscribes to the bus and starts the shard workers and the sweeper.
    /// Everything stops when `shutdown` is cancelled; [`Coordinator::wait`]
    /// waits for that.
    pub async fn start(
        bus: Arc<dyn Bus>,
        store: Arc<dyn Store>,
        config: CoordinatorConfig,
        shutdown: CancellationToken,
    ) -> Result<Self, BusError> {
        let tracker = TaskTracker::new();
        let cached = Arc::new(store::cached::CachedStore::new(Arc::new(
            store::metered::MeteredStore::new(
                store,
                Arc::new(|op, outcome, seconds| metrics::metrics().store(op, outcome, seconds)),
            ),
        )));
        let store: Arc<dyn Store> = cached.clone();
        let presence = Arc::new(Mutex::new(Presence::new(
            config.gateway_dead_after,
            tokio::time::Instant::now(),
        )));
        let events = events::Events::start(store.clone(), config.events_retained, &tracker, shutdown.clone());
        let context = WorkerContext {
            store: store.clone(),
            events: events.clone(),
            bus: bus.clone(),
            settings: ReplySettings {
                heartbeat_interval: config.heartbeat_interval,
                issuers: config.issuers.clone(),
            },
            retry_after: config.store_retry_after,
            presence: presence.clone(),
            inventories: Default::default(),
        };
        let shards = worker::start(config.shards, config.shard_queue, context, &tracker, &shutdown);
        let inputs = bus.subscribe_coordinator().await?;
        // Reports wait here, not in the dispatch loop, so that presence
        // beats, liveness and close events are never stuck behind them.
        let (reports_tx, reports_rx) = mpsc::channel(config.shards.max(1) * config.shard_queue);
        tracker.spawn(feed_shards(reports_rx, shards.clone(), shutdown.clone()));
        let liveness_events = liveness::start(store.clone(), shards.clone(), &tracker, shutdown.clone());
        tracker.spawn(dispatch(
            inputs,
            reports_tx,
            config.store_retry_after,
            cached,
            liveness_events,
            presence.clone(),
            shutdown.clone(),
        ));
        tracker.spawn(sweep(store.clone(), shards.clone(), config.clone(), shutdown.clone()));
        tracker.spawn(watch_gateways(
            store.clone(),
            shards.clone(),
            presence,
            config.clone(),
            shutdown.clone(),
        ));
        let rollouts = rollout::executor::Executor {
            store: store.clone(),
            bus: bus.clone(),
            shards: shards.clone(),
            events: events.clone(),
            resent: Arc::default(),
        };
        tracker.spawn(rollout::executor::run(
            rollouts.clone(),
            config.rollout_tick,
            shutdown.clone(),
        ));
        tracker.close();
        Ok(Self {
            shards,
            store,
            bus,
            tracker,
            rollouts,
            events,
            issuers: config.issuers.clone(),
            reconciles: Arc::default(),
            reconcile_passes: Arc::default(),
            shutdown,
        })
    }

    /// Ready to serve: the bus is connected and the store answers.
    pub async fn ready(&self) -> Result<(), String> {
        if !self.bus.is_connected() {
            return Err("bus disconnected".into());
        }
        self.store.ping().await.map_err(|e| e.to_string())
    }

    /// Creates and commands rollouts.
    pub fn rollouts(&self) -> &rollout::executor::Executor {
        &self.rollouts
    }

    /// The tenant event stream's publisher.
    pub fn events(&self) -> &Arc<events::Events> {
        &self.events
    }

    /// Fires when this coordinator stops (event streams end with it).
    pub fn stopping(&self) -> CancellationToken {
        self.shutdown.clone()
    }

    /// The store this coordinator uses.
    pub fn store(&self) -> &Arc<dyn Store> {
        &self.store
    }

    /// Re-evaluates every connected WebSocket agent of a tenant and pushes
    /// what they miss. Called after configs or assignments change; HTTP agents
    /// get the same answer on their next poll.
    pub async fn reconcile_tenant(&self, tenant: &TenantId) -> Result<usize, StoreError> {
        self.reconcile_connected(tenant, false).await
    }

    /// [`Coordinator::reconcile_tenant`]; with `resend`, a config already
    /// offered is offered again to agents that do not report it yet.
    async fn reconcile_connected(&self, tenant: &TenantId, resend: bool) -> Result<usize, StoreError> {
        let mut queued = 0;
        for record in self.store.agents(tenant).await? {
            if !record.connected || record.transport != Transport::Websocket as i32 {
                continue;
            }
            let Ok(uid) = InstanceUid::from_slice(&record.instance_uid) else {
                continue;
            };
            let job = if resend {
                Job::Resend {
                    tenant: tenant.clone(),
                    uid,
                    if_answered: true,
                }
            } else {
                Job::Reconcile {
                    tenant: tenant.clone(),
                    uid,
                }
            };
            self.shards.send(job).await;
            queued += 1;
        }
        Ok(queued)
    }

    /// Tells every coordinator replica (over the bus; this one too) that a
    /// tenant's assignments, connection settings or package sets changed,
    /// so that none answers reports or pins from a copy cached before the
    /// change. A notice the bus loses leaves the cache's one-second expiry.
    pub async fn announce_desired_change(&self, tenant: &TenantId) {
        if let Err(e) = self.bus.desired_changed(tenant).await {
            tracing::warn!(%tenant, error = %e, "could not tell the other replicas of a change; their caches expire within a second");
        }
    }

    /// Pushes changed desired state to a tenant's connected agents in the
    /// background, twice: at once, and again after `again_after`, because a
    /// report being handled at the moment of the change (on any replica, with
    /// its assignments cached up to a second) may have resolved the old
    /// desired state, and an older offer still in flight may land after the
    /// new one. The second pass re-sends to agents that do not report their
    /// desired config yet, whatever the record says was offered; the others
    /// cost a read. Stops with the coordinator.
    ///
    /// Requests are coalesced per tenant: each pass lists the tenant's agents,
    /// so a burst of changes (a pipeline applying fifty assignments) runs one
    /// first pass for all the requests made while one was running, and one
    /// second pass `again_after` the last first pass, instead of a hundred
    /// listings. A first pass always starts after the request that asks for
    /// it.
    pub fn reconcile_soon(&self, tenant: TenantId, again_after: Duration) {
        let mut tenants = self.reconciles.lock().unwrap_or_else(|p| p.into_inner());
        let (requests, start) = match tenants.get(&tenant) {
            Some(requests) => (requests.clone(), false),
            None => {
                let requests = Arc::new(ReconcileRequests::default());
                tenants.insert(tenant.clone(), requests.clone());
                (requests, true)
            }
        };
        // Counted under the lock, where the runner decides to leave: a
        // request is never left to a runner that has gone.
        requests.requested.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        drop(tenants);
        requests.wake.notify_one();
        if start {
            let coordinator = self.clone();
            self.tracker.spawn(async move {
                coordinator.run_reconciles(tenant, requests, again_after).await;
            });
        }
    }

    /// The runner of one tenant's reconcile requests; leaves when none is
    /// left.
    async fn run_reconciles(&self, tenant: TenantId, requests: Arc<ReconcileRequests>, again_after: Duration) {
        use std::sync::atomic::Ordering;
        let mut done = 0;
        let mut second_due: Option<tokio::time::Instant> = None;
        loop {
            let requested = requests.requested.load(Ordering::SeqCst);
            if requested > done {
                done = requested;
                self.reconcile_pass(&tenant, false).await;
                second_due = Some(tokio::time::Instant::now() + again_after);
                continue;
            }
            if let Some(due) = second_due {
                tokio::select! {
                    _ = self.shutdown.cancelled() => return,
                    _ = requests.wake.notified() => {}
                    _ = tokio::time::sleep_until(due) => {
                        self.reconcile_pass(&tenant, true).await;
                        second_due = None;
                    }
                }
                continue;
            }
            let mut tenants = self.reconciles.lock().unwrap_or_else(|p| p.into_inner());
            if requests.requested.load(Ordering::SeqCst) == done {
                tenants.remove(&tenant);
                return;
            }
        }
    }

    async fn reconcile_pass(&self, tenant: &TenantId, second: bool) {
        self.reconcile_passes.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        match self.reconcile_connected(tenant, second).await {
            Ok(queued) => tracing::debug!(%tenant, queued, second, "reconcile queued"),
            Err(e) => tracing::warn!(%tenant, error = %e, "reconcile failed; agents heal on their next report"),
        }
    }

    /// Reconcile passes run so far (each lists a tenant's agents), for
    /// tests and diagnostics.
    pub fn reconcile_passes(&self) -> u64 {
        self.reconcile_passes.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Whether a tenant has reconcile work scheduled or running.
    pub fn reconciling(&self, tenant: &TenantId) -> bool {
        self.reconciles
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .contains_key(tenant)
    }

    /// Waits until every task has stopped (after `shutdown` was cancelled).
    pub async fn wait(&self) {
        self.tracker.wait().await;
    }
}

/// Hands queued reports to the shard owning each agent, waiting when that
/// shard is busy.
async fn feed_shards(mut reports: mpsc::Receiver<Box<ReportRequest>>, shards: Shards, shutdown: CancellationToken) {
    loop {
        let report = tokio::select! {
            _ = shutdown.cancelled() => return,
            report = reports.recv() => report,
        };
        let Some(report) = report else { return };
        shards.send(Job::Report(report)).await;
    }
}

/// Routes bus input: reports to the report queue (never waiting: when it is
/// full the report is answered Unavailable at once, with a retry hint),
/// liveness and close events to the liveness writer, presence beats to the
/// presence tracker. Nothing here waits behind reports.
async fn dispatch(
    mut inputs: mpsc::Receiver<CoordinatorInput>,
    reports: mpsc::Sender<Box<ReportRequest>>,
    retry_after: Duration,
    store: Arc<store::cached::CachedStore>,
    events: mpsc::Sender<liveness::Event>,
    presence: Arc<Mutex<Presence>>,
    shutdown: CancellationToken,
) {
    loop {
        let input = tokio::select! {
            _ = shutdown.cancelled() => return,
            input = inputs.recv() => input,
        };
        match input {
            None => return,
            Some(CoordinatorInput::Report(request)) => {
                if let Err(mpsc::error::TrySendError::Full(request)) = reports.try_send(request) {
                    metrics::metrics().report_expired_as("coordinator_busy");
                    let uid = request.report.uid;
                    request.respond(error_reply(
                        uid.as_bytes(),
                        ServerErrorResponseType::Unavailable,
                        "coordinator busy; retry later",
                        Some(retry::spread(retry_after, 1.0)),
                    ));
                }
            }
            Some(CoordinatorInput::Liveness(batch)) => {
                if let Err(mpsc::error::TrySendError::Full(liveness::Event::Batch(batch))) =
                    events.try_send(liveness::Event::Batch(batch))
                {
                    tracing::warn!(
                        gateway_id = %batch.gateway,
                        agents = batch.agents.len(),
                        "liveness batch dropped: the store is behind; each agent's next heartbeat is recorded"
                    );
                }
            }
            Some(CoordinatorInput::KeyLookup(lookup)) => {
                // Answered off the loop: a remote store's round trip must not
                // hold presence beats and reports. Short-lived, and bounded
                // by the gateways' credential caches.
                let store = store.clone();
                tokio::spawn(async move {
                    match store.api_key(&lookup.id).await {
                        Ok(key) => lookup.respond(key),
                        // The gateway refuses with 503 and a retry hint at
                        // once, instead of treating the key as unknown.
                        Err(e) => {
                            tracing::warn!(error = %e, "API key lookup failed");
                            lookup.fail(e.to_string());
                        }
                    }
                });
            }
            Some(CoordinatorInput::Presence(beat)) => {
                lock(&presence).beat(&beat, tokio::time::Instant::now());
            }
            Some(CoordinatorInput::DesiredChanged(tenant)) => {
                tracing::debug!(%tenant, "desired state changed on a replica: cached assignments dropped");
                store.forget_assignments();
            }
            Some(CoordinatorInput::Closed(closed)) => {
                // Queued behind the liveness batches that came before it.
                if events.send(liveness::Event::Closed(closed)).await.is_err() {
                    return;
                }
            }
        }
    }
}

/// Marks HTTP agents offline when they stop polling (plain-HTTP agents often
/// never send `agent_disconnect`, and would otherwise count as connected
/// forever), and records the agent gauges from the same pass.
async fn sweep(store: Arc<dyn Store>, shards: Shards, config: CoordinatorConfig, shutdown: CancellationToken) {
    let mut ticks = tokio::time::interval(config.sweep_interval);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = ticks.tick() => {}
        }
        let cutoff = worker::now_unix_ms().saturating_sub(config.http_offline_after.as_millis() as u64);
        let tenants = match store.tenants().await {
            Ok(tenants) => tenants,
            Err(e) => {
                tracing::warn!(error = %e, "sweep: store unavailable");
                continue;
            }
        };
        for tenant in tenants {
            let Ok(agents) = store.agents(&tenant).await else {
                continue;
            };
            let mut connected = std::collections::BTreeMap::new();
            let mut statuses = std::collections::BTreeMap::new();
            for record in &agents {
                if record.connected {
                    *connected.entry(transport_label(record.transport)).or_insert(0u64) += 1;
                }
                let status = admin::views::status_name(record.remote_config_status.as_ref().map_or(0, |s| s.status));
                *statuses.entry(status).or_insert(0u64) += 1;
            }
            metrics::metrics().agents(tenant.as_str(), &connected, &statuses);
            for record in agents {
                if record.connected && record.transport == Transport::Http as i32 && record.last_seen_unix_ms < cutoff {
                    let Ok(uid) = InstanceUid::from_slice(&record.instance_uid) else {
                        continue;
                    };
                    shards
                        .send(Job::Expire {
                            tenant: tenant.clone(),
                            uid,
                            last_seen_unix_ms: record.last_seen_unix_ms,
                        })
                        .await;
                }
            }
        }
    }
}

fn lock(presence: &Mutex<Presence>) -> MutexGuard<'_, Presence> {
    presence.lock().unwrap_or_else(|p| p.into_inner())
}

/// Declares silent gateways dead and disconnects their WebSocket agents.
async fn watch_gateways(
    store: Arc<dyn Store>,
    shards: Shards,
    presence: Arc<Mutex<Presence>>,
    config: CoordinatorConfig,
    shutdown: CancellationToken,
) {
    let mut ticks = tokio::time::interval((config.gateway_dead_after / 4).max(Duration::from_millis(100)));
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = ticks.tick() => {}
        }
        let verdict = lock(&presence).check(tokio::time::Instant::now());
        if verdict.dead.is_empty() && !verdict.check_orphans {
            continue;
        }
        for gateway in &verdict.dead {
            tracing::warn!(gateway_id = %gateway, "gateway gone; its agents count as disconnected until they reconnect");
        }
        let Ok(tenants) = store.tenants().await else { continue };
        for tenant in tenants {
            let Ok(agents) = store.agents(&tenant).await else {
                continue;
            };
            for record in agents {
                if !record.connected || record.transport != Transport::Websocket as i32 {
                    continue;
                }
                let gone = verdict.dead.iter().any(|g| g.as_str() == record.gateway_id)
                    || (verdict.check_orphans && !lock(&presence).is_alive(&record.gateway_id));
                let (Ok(uid), Ok(gateway), Some(connection)) = (
                    InstanceUid::from_slice(&record.instance_uid),
                    GatewayId::new(record.gateway_id.as_str()),
                    ConnectionId::new(record.connection_id),
                ) else {
                    continue;
                };
                if gone {
                    shards
                        .send(Job::Closed {
                            tenant: tenant.clone(),
                            uid,
                            gateway,
                            connection,
                            reported: false,
                            recorded: None,
                        })
                        .await;
                }
            }
        }
    }
}

fn transport_label(transport: i32) -> &'static str {
    if transport == Transport::Http as i32 {
        "http"
    } else {
        "websocket"
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Store operations by name, counted by a metering sink.
    type Counts = Arc<Mutex<std::collections::HashMap<&'static str, u64>>>;

    fn counted(counts: &Counts) -> std::sync::MutexGuard<'_, std::collections::HashMap<&'static str, u64>> {
        counts.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A coordinator over an embedded store whose every operation is counted,
    /// with `agents` agents of which the first `rolled` run service `ro`
    /// (assigned v1 of config `ro`, v2 waiting), and no background ticks.
    async fn counted_fleet(
        dir: &std::path::Path,
        agents: usize,
        rolled: usize,
    ) -> (Coordinator, Counts, CancellationToken) {
        use fleetplane_proto::{
            attributes::string_kv,
            internal::{AgentRecord, Assignment, ConfigFile},
            opamp::{AgentCapabilities, AgentDescription},
        };
        let counts: Counts = Arc::default();
        let sink_counts = counts.clone();
        let embedded: Arc<dyn Store> = Arc::new(store::embedded::EmbeddedStore::open(dir).unwrap());
        let store: Arc<dyn Store> = Arc::new(store::metered::MeteredStore::new(
            embedded,
            Arc::new(move |op, _, _| *counted(&sink_counts).entry(op).or_default() += 1),
        ));
        let tenant = TenantId::default_tenant();
        let caps = AgentCapabilities::ReportsStatus as u64
            | AgentCapabilities::AcceptsRemoteConfig as u64
            | AgentCapabilities::ReportsRemoteConfig as u64;
        let records = (0..agents)
            .map(|i| AgentRecord {
                tenant: tenant.to_string(),
                instance_uid: fleetplane_proto::InstanceUid::new_v7().to_vec(),
                connected: true,
                capabilities: caps,
                description: Some(AgentDescription {
                    identifying_attributes: vec![string_kv("service.name", if i < rolled { "ro" } else { "other" })],
                    non_identifying_attributes: Vec::new(),
                }),
                ..Default::default()
            })
            .collect();
        store.put_agents(records).await.unwrap();
        for body in ["v: 1", "v: 2"] {
            let file = ConfigFile {
                body: body.into(),
                content_type: "text/yaml".into(),
            };
            store
                .create_config_version(&tenant, "ro", [("c.yaml".to_owned(), file)].into(), 1)
                .await
                .unwrap();
        }
        store
            .put_assignment(Assignment {
                tenant: tenant.to_string(),
                name: "ro".into(),
                selector: "service.name=ro".into(),
                config_name: "ro".into(),
                config_version: 1,
                ..Default::default()
            })
            .await
            .unwrap();
        let config = CoordinatorConfig {
            rollout_tick: Duration::from_secs(3600),
            sweep_interval: Duration::from_secs(3600),
            ..CoordinatorConfig::default()
        };
        let bus: Arc<dyn Bus> = Arc::new(fleetplane_bus::memory::MemoryBus::default());
        let shutdown = CancellationToken::new();
        let coordinator = Coordinator::start(bus, store, config, shutdown.clone()).await.unwrap();
        (coordinator, counts, shutdown)
    }

    /// A rollout's tick costs the agents it holds, not the fleet: with the
    /// same rollout in a fleet of 30 and of 1,500 agents, ticks make the same
    /// store calls, read the rollout's agents by uid, and never list the
    /// tenant (counted, not timed).
    #[tokio::test]
    async fn a_rollout_tick_reads_the_same_whatever_the_fleet_size() {
        let mut per_fleet = Vec::new();
        for agents in [30, 1_500] {
            let dir = tempfile::tempdir().unwrap();
            let (coordinator, counts, shutdown) = counted_fleet(dir.path(), agents, 10).await;
            let request = rollout::executor::RolloutRequest {
                assignment: "ro".into(),
                config: "ro".into(),
                version: Some(2),
                ..Default::default()
            };
            let created = coordinator
                .rollouts()
                .create(&TenantId::default_tenant(), request)
                .await
                .unwrap();
            assert_eq!(created.agents.len(), 10);
            counted(&counts).clear();
            for _ in 0..3 {
                coordinator.rollouts().tick().await.unwrap();
            }
            let ticks = counted(&counts).clone();
            assert_eq!(
                ticks.get("agent.list"),
                None,
                "a tick never lists the tenant: {ticks:?}"
            );
            assert_eq!(
                ticks.get("agent.get_many"),
                Some(&3),
                "one read of the rollout's agents per tick: {ticks:?}"
            );
            // The tick's own reads (the pins and pushes it queues run on the
            // shards meanwhile, per changed agent).
            per_fleet.push(
                ticks
                    .into_iter()
                    .filter(|(op, _)| ["tenants", "rollout.list", "agent.get_many", "agent.list"].contains(op))
                    .collect::<std::collections::BTreeMap<_, _>>(),
            );
            shutdown.cancel();
            coordinator.wait().await;
        }
        assert_eq!(
            per_fleet[0], per_fleet[1],
            "30 agents and 1,500: the same reads per tick"
        );
    }

    /// A burst of changes runs a few listings of the tenant, not two per
    /// change; a change made after the burst settled gets passes of its own.
    #[tokio::test]
    async fn reconcile_requests_are_coalesced_per_tenant() {
        let dir = tempfile::tempdir().unwrap();
        let store: Arc<dyn Store> = Arc::new(store::embedded::EmbeddedStore::open(dir.path()).unwrap());
        let bus: Arc<dyn Bus> = Arc::new(fleetplane_bus::memory::MemoryBus::default());
        let shutdown = CancellationToken::new();
        let coordinator = Coordinator::start(bus, store, CoordinatorConfig::default(), shutdown.clone())
            .await
            .unwrap();
        let tenant = TenantId::default_tenant();
        let again = Duration::from_millis(100);
        let settled = || async {
            fleetplane_testkit::wait::eventually("reconciles done", Duration::from_secs(10), || async {
                Ok((!coordinator.reconciling(&tenant)).then_some(()))
            })
            .await
            .unwrap();
        };
        for _ in 0..100 {
            coordinator.reconcile_soon(tenant.clone(), again);
        }
        settled().await;
        let burst = coordinator.reconcile_passes();
        assert!((2..=4).contains(&burst), "100 requests, {burst} passes");
        coordinator.reconcile_soon(tenant.clone(), again);
        settled().await;
        assert_eq!(
            coordinator.reconcile_passes(),
            burst + 2,
            "a later change: a first and a second pass"
        );
        shutdown.cancel();
        coordinator.wait().await;
    }
}
