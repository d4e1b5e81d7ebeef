//! The in-process bus of the all-in-one server: bounded channels, no network.
//!
//! One coordinator subscription consumes everything (the all-in-one server runs
//! one coordinator); each gateway gets its own bounded delivery channel.

use std::{collections::HashMap, sync::Mutex, time::Duration};

use async_trait::async_trait;
use fleetplane_proto::{
    GatewayId,
    internal::{ApiKey, RolloutNotice},
    opamp::ServerToAgent,
};
use tokio::sync::mpsc;

use crate::{
    Bus, BusError, ConnectionsClosed, CoordinatorInput, Delivery, GatewayPresence, LivenessBatch, Report, ReportRequest,
};

/// Sizes of the in-process queues.
#[derive(Debug, Clone)]
pub struct MemoryBusConfig {
    /// Reports and events waiting for the coordinator. When full, gateways wait
    /// (up to `request_timeout`), which is back-pressure, not loss.
    pub coordinator_queue: usize,
    /// Deliveries waiting for one gateway; overflow is dropped and counted.
    pub delivery_queue: usize,
    /// How long a gateway waits for a coordinator's reply.
    pub request_timeout: Duration,
}

impl Default for MemoryBusConfig {
    fn default() -> Self {
        Self {
            coordinator_queue: 8192,
            delivery_queue: 4096,
            request_timeout: Duration::from_secs(10),
        }
    }
}

/// In-process [`Bus`].
#[derive(Debug)]
pub struct MemoryBus {
    config: MemoryBusConfig,
    coordinator: Mutex<Option<mpsc::Sender<CoordinatorInput>>>,
    gateways: Mutex<HashMap<GatewayId, mpsc::Sender<Delivery>>>,
    /// Never advances: an in-process bus does not lose its connection.
    epoch: tokio::sync::watch::Sender<u64>,
    /// Rollout notices, for in-process listeners.
    notices: tokio::sync::broadcast::Sender<RolloutNotice>,
}

impl MemoryBus {
    /// A bus with the given queue sizes.
    pub fn new(config: MemoryBusConfig) -> Self {
        Self {
            config,
            coordinator: Mutex::new(None),
            gateways: Mutex::new(HashMap::new()),
            epoch: tokio::sync::watch::Sender::new(0),
            notices: tokio::sync::broadcast::Sender::new(1024),
        }
    }

    /// Rollout notices published on this bus from now on.
    pub fn rollout_notices(&self) -> tokio::sync::broadcast::Receiver<RolloutNotice> {
        self.notices.subscribe()
    }

    /// Hands `input` to the coordinator and waits for its answer on `reply`,
    /// within the request timeout.
    async fn ask<T>(&self, input: CoordinatorInput, reply: tokio::sync::oneshot::Receiver<T>) -> Result<T, BusError> {
        let timeout = self.config.request_timeout;
        let sender = self.coordinator()?;
        let exchange = async {
            sender.send(input).await.map_err(|_| BusError::NoCoordinator)?;
            reply.await.map_err(|_| BusError::NoReply)
        };
        tokio::time::timeout(timeout, exchange)
            .await
            .map_err(|_| BusError::Timeout(timeout))?
    }

    fn coordinator(&self) -> Result<mpsc::Sender<CoordinatorInput>, BusError> {
        self.coordinator
            .lock()
            .map_err(|_| BusError::Closed)?
            .clone()
            .ok_or(BusError::NoCoordinator)
    }
}

impl Default for MemoryBus {
    fn default() -> Self {
        Self::new(MemoryBusConfig::default())
    }
}

#[async_trait]
impl Bus for MemoryBus {
    async fn report(&self, mut report: Report) -> Result<ServerToAgent, BusError> {
        let timeout = self.config.request_timeout;
        report.budget_ms = u32::try_from(timeout.as_millis()).unwrap_or(u32::MAX);
        let (request, reply) = ReportRequest::new(report);
        self.ask(CoordinatorInput::Report(Box::new(request)), reply).await
    }

    async fn lookup_key(&self, id: &str) -> Result<Option<ApiKey>, BusError> {
        let (request, reply) = crate::KeyLookupRequest::new(id.to_owned());
        self.ask(CoordinatorInput::KeyLookup(request), reply)
            .await?
            .map_err(BusError::Failed)
    }

    async fn connections_closed(&self, closed: ConnectionsClosed) -> Result<(), BusError> {
        let (notice, ack) = crate::ClosedNotice::new(closed);
        self.ask(CoordinatorInput::Closed(notice), ack).await
    }

    async fn liveness(&self, batch: LivenessBatch) -> Result<(), BusError> {
        let timeout = self.config.request_timeout;
        let sender = self.coordinator()?;
        tokio::time::timeout(timeout, sender.send(CoordinatorInput::Liveness(batch)))
            .await
            .map_err(|_| BusError::Timeout(timeout))?
            .map_err(|_| BusError::NoCoordinator)
    }

    async fn announce(&self, presence: GatewayPresence) -> Result<(), BusError> {
        // Best effort: presence that cannot be queued now is simply late.
        if let Ok(sender) = self.coordinator() {
            let _ = sender.try_send(CoordinatorInput::Presence(presence));
        }
        Ok(())
    }

    fn epoch(&self) -> tokio::sync::watch::Receiver<u64> {
        self.epoch.subscribe()
    }

    fn is_connected(&self) -> bool {
        true
    }

    async fn subscribe_deliveries(&self, gateway: &GatewayId) -> Result<mpsc::Receiver<Delivery>, BusError> {
        let (tx, rx) = mpsc::channel(self.config.delivery_queue);
        self.gateways
            .lock()
            .map_err(|_| BusError::Closed)?
            .insert(gateway.clone(), tx);
        Ok(rx)
    }

    async fn deliver(&self, delivery: Delivery) -> Result<(), BusError> {
        let gateway = delivery.gateway.clone();
        let sender = self
            .gateways
            .lock()
            .map_err(|_| BusError::Closed)?
            .get(&gateway)
            .cloned()
            .ok_or_else(|| BusError::UnknownGateway(gateway.to_string()))?;
        match sender.try_send(delivery) {
            Ok(()) => Ok(()),
            Err(mpsc::error::TrySendError::Full(_)) => {
                // Level-triggered: the agent's next report gets the same answer.
                tracing::debug!(%gateway, "delivery queue full, dropped a delivery");
                Ok(())
            }
            Err(mpsc::error::TrySendError::Closed(_)) => Err(BusError::UnknownGateway(gateway.to_string())),
        }
    }

    async fn desired_changed(&self, tenant: &fleetplane_proto::TenantId) -> Result<(), BusError> {
        // Best effort, as over NATS.
        if let Ok(sender) = self.coordinator() {
            let _ = sender.try_send(CoordinatorInput::DesiredChanged(tenant.clone()));
        }
        Ok(())
    }

    async fn rollout_notice(&self, notice: RolloutNotice) -> Result<(), BusError> {
        // No listener is fine: notices are for whoever follows.
        let _ = self.notices.send(notice);
        Ok(())
    }

    async fn subscribe_coordinator(&self) -> Result<mpsc::Receiver<CoordinatorInput>, BusError> {
        let (tx, rx) = mpsc::channel(self.config.coordinator_queue);
        *self.coordinator.lock().map_err(|_| BusError::Closed)? = Some(tx);
        Ok(rx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::tests::report;

    #[tokio::test]
    async fn report_without_coordinator_fails_fast() {
        let bus = MemoryBus::default();
        assert_eq!(bus.report(report(1)).await, Err(BusError::NoCoordinator));
    }

    #[tokio::test]
    async fn reports_get_their_own_replies() {
        let bus = std::sync::Arc::new(MemoryBus::default());
        let mut inputs = bus.subscribe_coordinator().await.unwrap();
        tokio::spawn(async move {
            while let Some(CoordinatorInput::Report(request)) = inputs.recv().await {
                let seq = request.report.message.sequence_num;
                request.respond(ServerToAgent {
                    flags: seq,
                    ..Default::default()
                });
            }
        });
        for seq in 1..5 {
            assert_eq!(bus.report(report(seq)).await.unwrap().flags, seq);
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_silent_coordinator_times_out() {
        let bus = MemoryBus::new(MemoryBusConfig {
            request_timeout: Duration::from_secs(2),
            ..Default::default()
        });
        let _inputs = bus.subscribe_coordinator().await.unwrap();
        assert_eq!(
            bus.report(report(1)).await,
            Err(BusError::Timeout(Duration::from_secs(2)))
        );
    }

    #[tokio::test]
    async fn deliveries_reach_only_their_gateway() {
        let bus = MemoryBus::default();
        let a = GatewayId::new("a").unwrap();
        let b = GatewayId::new("b").unwrap();
        let mut rx_a = bus.subscribe_deliveries(&a).await.unwrap();
        let mut rx_b = bus.subscribe_deliveries(&b).await.unwrap();
        let delivery = |gateway: &str| Delivery {
            tenant: fleetplane_proto::TenantId::default_tenant(),
            uid: fleetplane_proto::InstanceUid::from_array([1; 16]),
            gateway: GatewayId::new(gateway).unwrap(),
            connection: fleetplane_proto::ConnectionId::new(7).unwrap(),
            message: ServerToAgent::default(),
        };
        bus.deliver(delivery("b")).await.unwrap();
        assert_eq!(rx_b.recv().await.unwrap().connection.get(), 7);
        assert!(rx_a.try_recv().is_err());
        assert!(matches!(
            bus.deliver(delivery("c")).await,
            Err(BusError::UnknownGateway(_))
        ));
    }
}
