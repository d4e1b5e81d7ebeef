//! The bus: how gateways and coordinators talk, without knowing each other.
//!
//! Gateways hold agent connections; coordinators hold state and decide. They
//! meet only here, through the [`Bus`] trait, which speaks the domain types of
//! [`envelope`] (ids parsed once, at the edge of each bus implementation):
//!
//! ```text
//!  gateway ── report(Report) ───────────────────▶ coordinator   (request/reply:
//!          ◀── ServerToAgent reply ─────────────               every agent message
//!  gateway ── connections_closed(..) ───────────▶ coordinator    gets one answer)
//!  gateway ◀── Delivery (pushed to one gateway) ── coordinator
//! ```
//!
//! [`memory::MemoryBus`] is the in-process implementation used by the
//! all-in-one server; a NATS implementation plugs in behind the same trait.

pub mod envelope;
pub mod memory;
pub mod nats;
pub mod subjects;
pub mod trace_context;

use std::time::Duration;

use async_trait::async_trait;
pub use envelope::{ConnectionsClosed, Delivery, EnvelopeError, GatewayPresence, Heartbeat, LivenessBatch, Report};
use fleetplane_proto::{
    GatewayId,
    internal::{ApiKey, RolloutNotice},
    opamp::ServerToAgent,
};
use tokio::sync::{mpsc, oneshot};

/// Version written into every envelope this build sends.
pub const ENVELOPE_VERSION: u32 = 1;

/// Why a bus operation failed. Every variant is transient from the gateway's
/// point of view: it answers the agent "unavailable, retry later".
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BusError {
    /// No coordinator is consuming reports (none started, or all stopped).
    #[error("no coordinator is listening")]
    NoCoordinator,
    /// A coordinator took the report but dropped it without replying.
    #[error("the coordinator dropped the request without replying")]
    NoReply,
    /// The reply did not come within the request timeout.
    #[error("no reply within {0:?}")]
    Timeout(std::time::Duration),
    /// The bus is shutting down.
    #[error("the bus is closed")]
    Closed,
    /// The gateway named in a delivery is not connected to the bus.
    #[error("gateway {0} is not subscribed")]
    UnknownGateway(String),
    /// The broker could not be reached or refused the operation.
    #[error("broker: {0}")]
    Broker(String),
    /// The coordinator answered that it could not do what was asked.
    #[error("the coordinator could not answer: {0}")]
    Failed(String),
}

/// An agent report waiting for its answer, as a coordinator receives it.
#[derive(Debug)]
pub struct ReportRequest {
    /// The report itself.
    pub report: Report,
    reply: oneshot::Sender<ServerToAgent>,
    /// When the asking gateway stops waiting, by this process's clock
    /// (arrival plus most of the report's budget; no clocks are compared
    /// across machines).
    expires: Option<tokio::time::Instant>,
}

impl ReportRequest {
    /// Pairs a report with the channel its answer goes back on. Called when
    /// the report arrives, which starts its budget.
    pub fn new(report: Report) -> (Self, oneshot::Receiver<ServerToAgent>) {
        let (reply, rx) = oneshot::channel();
        // A tenth of the budget is left for the way back.
        let expires = (report.budget_ms > 0)
            .then(|| tokio::time::Instant::now() + Duration::from_millis(u64::from(report.budget_ms) * 9 / 10));
        (Self { report, reply, expires }, rx)
    }

    /// The gateway has stopped waiting for the answer: it told the agent to
    /// retry later, so working on the report would only delay the others.
    pub fn is_expired(&self) -> bool {
        self.expires.is_some_and(|at| tokio::time::Instant::now() >= at)
    }

    /// Sends the answer to the gateway that asked. A gateway that has given up
    /// (timeout, agent gone) is not an error: the agent's next report heals it.
    pub fn respond(self, message: ServerToAgent) {
        let _ = self.reply.send(message);
    }
}

/// A gateway's question about an API key, waiting for its answer.
#[derive(Debug)]
pub struct KeyLookupRequest {
    /// The key's public id.
    pub id: String,
    reply: oneshot::Sender<Result<Option<ApiKey>, String>>,
}

impl KeyLookupRequest {
    /// Pairs a lookup with the channel its answer goes back on.
    pub fn new(id: String) -> (Self, oneshot::Receiver<Result<Option<ApiKey>, String>>) {
        let (reply, rx) = oneshot::channel();
        (Self { id, reply }, rx)
    }

    /// Answers: the key (revoked or not), or `None` when there is no such key.
    pub fn respond(self, key: Option<ApiKey>) {
        let _ = self.reply.send(Ok(key));
    }

    /// Answers that the key cannot be looked up now (the store failed), so
    /// the gateway refuses with "retry later" at once instead of waiting out
    /// its request timeout.
    pub fn fail(self, reason: String) {
        let _ = self.reply.send(Err(reason));
    }
}

/// Connections a gateway lost, waiting to be recorded. The gateway retries
/// until a coordinator acknowledges, because a lost notice (a replica killed
/// while holding it) would leave the record claiming a live connection, and
/// the agent locked out of every other gateway (spec 4.B.11 duplicate check).
#[derive(Debug)]
pub struct ClosedNotice {
    /// Which connections ended.
    pub closed: ConnectionsClosed,
    ack: Option<oneshot::Sender<()>>,
}

impl ClosedNotice {
    /// Pairs the notice with the channel its acknowledgement goes back on.
    pub fn new(closed: ConnectionsClosed) -> (Self, oneshot::Receiver<()>) {
        let (ack, rx) = oneshot::channel();
        (Self { closed, ack: Some(ack) }, rx)
    }

    /// The notice and its acknowledgement, apart: [`ClosedAck::done`] once
    /// every connection is recorded. Dropping the ack unsent tells the
    /// gateway to try again.
    pub fn into_parts(self) -> (ConnectionsClosed, ClosedAck) {
        (self.closed, ClosedAck(self.ack))
    }
}

/// The acknowledgement of a [`ClosedNotice`].
#[derive(Debug)]
pub struct ClosedAck(Option<oneshot::Sender<()>>);

impl ClosedAck {
    /// Tells the gateway its notice is recorded.
    pub fn done(mut self) {
        if let Some(ack) = self.0.take() {
            let _ = ack.send(());
        }
    }
}

/// What a coordinator consumes: agent reports to answer, and connection events.
#[derive(Debug)]
pub enum CoordinatorInput {
    /// An agent message that needs a reply.
    Report(Box<ReportRequest>),
    /// Connections a gateway lost without an `agent_disconnect`.
    Closed(ClosedNotice),
    /// A gateway's periodic "I am alive" (or its goodbye).
    Presence(GatewayPresence),
    /// Heartbeats a gateway answered itself.
    Liveness(LivenessBatch),
    /// A gateway checking an agent's credentials.
    KeyLookup(KeyLookupRequest),
    /// A coordinator (this one or another) changed a tenant's assignments,
    /// connection settings or package sets: copies cached for reports are
    /// stale.
    DesiredChanged(fleetplane_proto::TenantId),
}

/// The contract between gateways and coordinators.
#[async_trait]
pub trait Bus: Send + Sync + std::fmt::Debug + 'static {
    /// Gateway side: hands an agent message to a coordinator and waits for the
    /// answer that goes back to the agent.
    async fn report(&self, report: Report) -> Result<ServerToAgent, BusError>;

    /// Gateway side: connections that ended without `agent_disconnect`;
    /// `Ok` once a coordinator has recorded them.
    async fn connections_closed(&self, closed: ConnectionsClosed) -> Result<(), BusError>;

    /// Gateway side: heartbeats the gateway answered itself, in one batch.
    async fn liveness(&self, batch: LivenessBatch) -> Result<(), BusError>;

    /// Gateway side: announces that this gateway is alive (or leaving).
    async fn announce(&self, presence: GatewayPresence) -> Result<(), BusError>;

    /// Gateway side: a counter that goes up each time the bus connection was
    /// re-established. Messages may have been lost in the gap, so gateways ask
    /// their agents for a full state report on their next message.
    fn epoch(&self) -> tokio::sync::watch::Receiver<u64>;

    /// Whether the bus is connected now (for readiness probes).
    fn is_connected(&self) -> bool;

    /// Gateway side: the stream of messages coordinators address to agents on
    /// this gateway. Bounded: when the gateway falls behind, deliveries are
    /// dropped and counted, and the agent's next report heals the gap.
    async fn subscribe_deliveries(&self, gateway: &GatewayId) -> Result<mpsc::Receiver<Delivery>, BusError>;

    /// Coordinator side: sends a message to an agent through the gateway that
    /// holds its connection.
    async fn deliver(&self, delivery: Delivery) -> Result<(), BusError>;

    /// Coordinator side: tells whoever listens about a rollout decision.
    async fn rollout_notice(&self, notice: RolloutNotice) -> Result<(), BusError>;

    /// Coordinator side: tells every coordinator replica (this one too) that
    /// a tenant's desired state changed, so none answers a report from a
    /// cached copy older than the change. Best effort: a lost notice leaves
    /// the cache's own expiry (a second) to catch up.
    async fn desired_changed(&self, tenant: &fleetplane_proto::TenantId) -> Result<(), BusError>;

    /// Gateway side: the API key with this public id, as the coordinators'
    /// store holds it (`None`: no such key).
    async fn lookup_key(&self, id: &str) -> Result<Option<ApiKey>, BusError>;

    /// Coordinator side: the stream of reports and events to process.
    async fn subscribe_coordinator(&self) -> Result<mpsc::Receiver<CoordinatorInput>, BusError>;
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A report of an agent with this sequence number, for the tests of
    /// every bus implementation.
    pub(crate) fn report(seq: u64) -> Report {
        let uid = fleetplane_proto::InstanceUid::from_array([1; 16]);
        Report::new(
            fleetplane_proto::TenantId::default_tenant(),
            uid,
            GatewayId::new("gw-test").expect("valid id"),
            fleetplane_proto::Link::Http,
            fleetplane_proto::opamp::AgentToServer {
                instance_uid: uid.to_vec(),
                sequence_num: seq,
                ..Default::default()
            },
        )
    }

    #[tokio::test(start_paused = true)]
    async fn a_report_expires_before_its_gateway_stops_waiting() {
        let mut bounded = report(1);
        bounded.budget_ms = 1000;
        let (request, _answer) = ReportRequest::new(bounded);
        assert!(!request.is_expired());
        tokio::time::advance(Duration::from_millis(850)).await;
        assert!(!request.is_expired());
        tokio::time::advance(Duration::from_millis(60)).await;
        assert!(request.is_expired(), "a tenth of the budget is kept for the way back");
        let (unbounded, _answer) = ReportRequest::new(report(1));
        tokio::time::advance(Duration::from_secs(3600)).await;
        assert!(!unbounded.is_expired(), "no budget, no expiry");
    }
}
