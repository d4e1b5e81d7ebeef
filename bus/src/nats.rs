//! The bus over NATS, for the scaled form: many gateways, several
//! coordinator replicas. Subjects are in [`crate::subjects`]; payloads are the
//! protobuf envelopes of `fleetplane_proto::internal`, turned into the
//! contract's domain types ([`crate::envelope`]) here and nowhere else: an
//! envelope with a bad id, or a report whose tenant is not its subject's, is
//! dropped at this edge.
//!
//! Core NATS is enough: a report is a request/reply to the coordinators'
//! queue group (exactly one replica answers); deliveries go to the one gateway
//! holding the agent. Nothing is persisted on the bus, because nothing needs
//! to be: a lost message is healed by the agent's next report, which is
//! compared with its desired state again (level-triggered).

use std::{sync::Arc, time::Duration};

use async_trait::async_trait;
use bytes::Bytes;
use fleetplane_proto::{
    GatewayId, Message, TenantId,
    internal::{self, ApiKey, KeyLookup, KeyLookupReply, RolloutNotice},
    opamp::ServerToAgent,
};
use futures_util::StreamExt;
use rand::Rng;
use tokio::sync::{mpsc, watch};

use crate::{
    Bus, BusError, ConnectionsClosed, CoordinatorInput, Delivery, EnvelopeError, GatewayPresence, LivenessBatch,
    Report, ReportRequest, subjects,
};

/// How long [`NatsBus::connect`] waits for the first connection.
const INITIAL_CONNECT: Duration = Duration::from_secs(30);

/// NATS bus settings.
#[derive(Debug, Clone)]
pub struct NatsConfig {
    /// Server URL(s), comma-separated: `nats://127.0.0.1:4222`.
    pub url: String,
    /// Name shown in the NATS server's connection list.
    pub name: String,
    /// How long a gateway waits for a coordinator's reply.
    pub request_timeout: Duration,
    /// Inputs waiting for the coordinator's workers.
    pub coordinator_queue: usize,
    /// Deliveries waiting for the gateway's sessions.
    pub delivery_queue: usize,
}

impl Default for NatsConfig {
    fn default() -> Self {
        Self {
            url: "nats://127.0.0.1:4222".into(),
            name: "fleetplane".into(),
            request_timeout: Duration::from_secs(5),
            coordinator_queue: 8192,
            delivery_queue: 4096,
        }
    }
}

/// [`Bus`] over NATS.
#[derive(Debug, Clone)]
pub struct NatsBus {
    client: async_nats::Client,
    config: NatsConfig,
    epoch: Arc<watch::Sender<u64>>,
}

fn broker(e: impl std::fmt::Display) -> BusError {
    BusError::Broker(e.to_string())
}

impl NatsBus {
    /// Connects, retrying in the background if the server is not up yet; the
    /// connection reconnects by itself for as long as the process lives.
    pub async fn connect(config: NatsConfig) -> Result<Self, BusError> {
        let epoch = Arc::new(watch::Sender::new(0u64));
        let on_event = epoch.clone();
        let client = async_nats::ConnectOptions::new()
            .name(&config.name)
            .retry_on_initial_connect()
            .max_reconnects(None)
            .connection_timeout(Duration::from_secs(2))
            // Full jitter up to a 2 s cap: a restarted NATS is not stormed by
            // every gateway and coordinator at the same instant.
            .reconnect_delay_callback(|attempts| {
                let cap = Duration::from_millis(100 * 2u64.pow(attempts.min(5) as u32)).min(Duration::from_secs(2));
                cap.mul_f64(rand::rng().random::<f64>())
            })
            .event_callback(move |event| {
                let epoch = on_event.clone();
                async move {
                    match event {
                        async_nats::Event::Connected => {
                            epoch.send_modify(|e| *e += 1);
                            tracing::info!("nats connected");
                        }
                        async_nats::Event::Disconnected => tracing::warn!("nats disconnected"),
                        other => tracing::debug!(event = %other, "nats event"),
                    }
                }
            })
            // Several servers (a cluster) are given comma-separated; the
            // client moves to another when its server goes.
            .connect(
                config
                    .url
                    .split(',')
                    .map(str::trim)
                    .filter(|u| !u.is_empty())
                    .collect::<Vec<_>>(),
            )
            .await
            .map_err(broker)?;
        // Retrying in the background must not hide a broker that never
        // comes: wait for the first connection, within a bound.
        let mut connected = epoch.subscribe();
        match tokio::time::timeout(INITIAL_CONNECT, connected.wait_for(|e| *e >= 1)).await {
            Ok(Ok(_)) => Ok(Self { client, config, epoch }),
            _ => Err(BusError::Broker(format!(
                "could not connect to {} within {INITIAL_CONNECT:?}",
                config.url
            ))),
        }
    }

    /// Waits until the server has processed everything this connection sent
    /// so far: NATS orders one connection's commands, so receiving our own
    /// message back proves earlier subscriptions are registered. (`flush`
    /// only empties the client's write buffer.)
    async fn round_trip(&self) -> Result<(), BusError> {
        let subject = format!("_FP_SYNC.{}", self.client.new_inbox().replace('.', "_"));
        let mut probe = self.client.subscribe(subject.clone()).await.map_err(broker)?;
        self.client.publish(subject, Bytes::new()).await.map_err(broker)?;
        self.client.flush().await.map_err(broker)?;
        let echoed = tokio::time::timeout(Duration::from_secs(10), probe.next()).await;
        let _ = probe.unsubscribe().await;
        match echoed {
            Ok(Some(_)) => Ok(()),
            _ => Err(BusError::Broker("no round trip through the server within 10 s".into())),
        }
    }

    /// Request/reply with one coordinator of the queue group, within the
    /// request timeout; the reply's payload.
    async fn request(&self, subject: String, payload: Vec<u8>) -> Result<Bytes, BusError> {
        let timeout = self.config.request_timeout;
        let request = async_nats::Request::new()
            .payload(Bytes::from(payload))
            .timeout(Some(timeout));
        let reply = self
            .client
            .send_request(subject, request)
            .await
            .map_err(|e| match e.kind() {
                async_nats::RequestErrorKind::NoResponders => BusError::NoCoordinator,
                async_nats::RequestErrorKind::TimedOut => BusError::Timeout(timeout),
                _ => broker(e),
            })?;
        Ok(reply.payload)
    }

    async fn publish(&self, subject: String, payload: Vec<u8>) -> Result<(), BusError> {
        self.client.publish(subject, Bytes::from(payload)).await.map_err(broker)
    }
}

fn tenant_of(tenant: &str) -> Result<TenantId, BusError> {
    TenantId::new(tenant).map_err(|e| BusError::Broker(e.to_string()))
}

/// Why a payload from NATS was dropped at this edge.
#[derive(Debug, thiserror::Error)]
enum Undecodable {
    #[error("not protobuf: {0}")]
    Protobuf(#[from] fleetplane_proto::DecodeError),
    #[error(transparent)]
    Envelope(#[from] EnvelopeError),
}

/// Decodes a payload into its wire envelope, then into the contract's type.
fn decode<W, T>(
    payload: Bytes,
    wire: impl FnOnce(Bytes) -> Result<W, fleetplane_proto::DecodeError>,
    typed: impl FnOnce(W) -> Result<T, EnvelopeError>,
) -> Result<T, Undecodable> {
    Ok(typed(wire(payload)?)?)
}

#[async_trait]
impl Bus for NatsBus {
    async fn report(&self, mut report: Report) -> Result<ServerToAgent, BusError> {
        let subject = subjects::report(&report.tenant);
        let timeout = self.config.request_timeout;
        report.budget_ms = u32::try_from(timeout.as_millis()).unwrap_or(u32::MAX);
        let reply = self.request(subject, report.into_wire().encode_to_vec()).await?;
        ServerToAgent::decode(reply).map_err(|e| BusError::Broker(format!("undecodable reply: {e}")))
    }

    async fn lookup_key(&self, id: &str) -> Result<Option<ApiKey>, BusError> {
        let lookup = KeyLookup {
            version: crate::ENVELOPE_VERSION,
            id: id.to_owned(),
        };
        let reply = self.request(subjects::key_lookup(), lookup.encode_to_vec()).await?;
        let reply = KeyLookupReply::decode(reply)
            .map_err(|e| BusError::Broker(format!("undecodable key lookup reply: {e}")))?;
        if !reply.error.is_empty() {
            return Err(BusError::Failed(reply.error));
        }
        Ok(reply.key)
    }

    async fn connections_closed(&self, closed: ConnectionsClosed) -> Result<(), BusError> {
        let subject = subjects::closed(&closed.tenant);
        self.request(subject, closed.into_wire().encode_to_vec())
            .await
            .map(|_| ())
    }

    async fn liveness(&self, batch: LivenessBatch) -> Result<(), BusError> {
        let subject = subjects::liveness(&batch.tenant);
        self.publish(subject, batch.into_wire().encode_to_vec()).await
    }

    async fn announce(&self, presence: GatewayPresence) -> Result<(), BusError> {
        self.publish(subjects::presence(), presence.into_wire().encode_to_vec())
            .await
    }

    fn epoch(&self) -> watch::Receiver<u64> {
        self.epoch.subscribe()
    }

    fn is_connected(&self) -> bool {
        self.client.connection_state() == async_nats::connection::State::Connected
    }

    async fn subscribe_deliveries(&self, gateway: &GatewayId) -> Result<mpsc::Receiver<Delivery>, BusError> {
        let mut subscription = self
            .client
            .subscribe(subjects::deliver(gateway))
            .await
            .map_err(broker)?;
        self.round_trip().await?;
        let (tx, rx) = mpsc::channel(self.config.delivery_queue);
        tokio::spawn(async move {
            while let Some(message) = subscription.next().await {
                match decode(message.payload, internal::Delivery::decode, Delivery::from_wire) {
                    Ok(delivery) => {
                        if let Err(mpsc::error::TrySendError::Closed(_)) = tx.try_send(delivery) {
                            return;
                        }
                    }
                    Err(e) => tracing::warn!(error = %e, "undecodable delivery dropped"),
                }
            }
        });
        Ok(rx)
    }

    async fn deliver(&self, delivery: Delivery) -> Result<(), BusError> {
        let subject = subjects::deliver(&delivery.gateway);
        self.publish(subject, delivery.into_wire().encode_to_vec()).await
    }

    async fn rollout_notice(&self, notice: RolloutNotice) -> Result<(), BusError> {
        let subject = subjects::rollouts(&tenant_of(&notice.tenant)?);
        self.publish(subject, notice.encode_to_vec()).await
    }

    async fn desired_changed(&self, tenant: &TenantId) -> Result<(), BusError> {
        self.publish(subjects::changed(tenant), Vec::new()).await
    }

    async fn subscribe_coordinator(&self) -> Result<mpsc::Receiver<CoordinatorInput>, BusError> {
        let (tx, rx) = mpsc::channel(self.config.coordinator_queue);
        let mut reports = self
            .client
            .queue_subscribe(subjects::all_reports(), subjects::COORDINATOR_QUEUE.into())
            .await
            .map_err(broker)?;
        let mut closed = self
            .client
            .queue_subscribe(subjects::all_closed(), subjects::COORDINATOR_QUEUE.into())
            .await
            .map_err(broker)?;
        let mut liveness = self
            .client
            .queue_subscribe(subjects::all_liveness(), subjects::COORDINATOR_QUEUE.into())
            .await
            .map_err(broker)?;
        let mut presence = self.client.subscribe(subjects::presence()).await.map_err(broker)?;
        let mut changes = self.client.subscribe(subjects::all_changed()).await.map_err(broker)?;
        let mut key_lookups = self
            .client
            .queue_subscribe(subjects::key_lookup(), subjects::COORDINATOR_QUEUE.into())
            .await
            .map_err(broker)?;
        // Make sure the server has the subscriptions before we say we listen.
        self.round_trip().await?;
        let client = self.client.clone();
        tokio::spawn(async move {
            loop {
                let input = tokio::select! {
                    Some(message) = reports.next() => {
                        let Some(reply_to) = message.reply else { continue };
                        let report = match decode(message.payload, internal::AgentReport::decode, Report::from_wire) {
                            // The subject is the tenant the gateway authenticated.
                            Ok(report) if subjects::report(&report.tenant) == message.subject.as_str() => report,
                            Ok(report) => {
                                tracing::warn!(tenant = %report.tenant, subject = %message.subject, "report for another tenant than its subject dropped");
                                continue;
                            }
                            Err(e) => {
                                tracing::warn!(error = %e, "bad report envelope dropped");
                                continue;
                            }
                        };
                        let (request, answer) = ReportRequest::new(report);
                        let client = client.clone();
                        // The answer goes back on the request's inbox.
                        tokio::spawn(async move {
                            if let Ok(reply) = answer.await {
                                let _ = client.publish(reply_to, Bytes::from(reply.encode_to_vec())).await;
                            }
                        });
                        CoordinatorInput::Report(Box::new(request))
                    }
                    Some(message) = closed.next() => match decode(message.payload, internal::ConnectionsClosed::decode, ConnectionsClosed::from_wire) {
                        Ok(event) => {
                            let (notice, ack) = crate::ClosedNotice::new(event);
                            // Acknowledged on the request's inbox once recorded.
                            if let Some(reply_to) = message.reply {
                                let client = client.clone();
                                tokio::spawn(async move {
                                    if ack.await.is_ok() {
                                        let _ = client.publish(reply_to, Bytes::new()).await;
                                    }
                                });
                            }
                            CoordinatorInput::Closed(notice)
                        }
                        Err(e) => {
                            tracing::warn!(error = %e, "bad close notice dropped");
                            continue;
                        }
                    },
                    Some(message) = liveness.next() => match decode(message.payload, internal::LivenessBatch::decode, LivenessBatch::from_wire) {
                        Ok(batch) => CoordinatorInput::Liveness(batch),
                        Err(e) => {
                            tracing::warn!(error = %e, "bad liveness batch dropped");
                            continue;
                        }
                    },
                    Some(message) = key_lookups.next() => {
                        let Some(reply_to) = message.reply else { continue };
                        let Ok(lookup) = KeyLookup::decode(message.payload) else { continue };
                        let (request, answer) = crate::KeyLookupRequest::new(lookup.id);
                        let client = client.clone();
                        tokio::spawn(async move {
                            if let Ok(answer) = answer.await {
                                let reply = match answer {
                                    Ok(key) => KeyLookupReply { key, error: String::new() },
                                    Err(error) => KeyLookupReply { key: None, error },
                                };
                                let _ = client.publish(reply_to, Bytes::from(reply.encode_to_vec())).await;
                            }
                        });
                        CoordinatorInput::KeyLookup(request)
                    }
                    Some(message) = changes.next() => match subjects::changed_tenant(message.subject.as_str()) {
                        Some(tenant) => CoordinatorInput::DesiredChanged(tenant),
                        None => continue,
                    },
                    Some(message) = presence.next() => match decode(message.payload, internal::GatewayPresence::decode, GatewayPresence::from_wire) {
                        Ok(beat) => CoordinatorInput::Presence(beat),
                        Err(_) => continue,
                    },
                    else => return,
                };
                if tx.send(input).await.is_err() {
                    return;
                }
            }
        });
        Ok(rx)
    }
}
