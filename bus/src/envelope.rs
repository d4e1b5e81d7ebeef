//! The bus contract in domain types: what gateways and coordinators say to
//! each other, with every id parsed once.
//!
//! Each bus implementation decodes at its own edge: the in-process bus hands
//! these values over as they are; the NATS bus turns them into the protobuf
//! envelopes of `fleetplane_proto::internal` on the way out and back (and
//! checks them) on the way in, so an envelope that names no valid tenant,
//! uid, gateway or connection never reaches a coordinator or a gateway.

use std::collections::BTreeMap;

use fleetplane_proto::{
    ConnectionId, GatewayId, InstanceUid, Link, TenantId, internal,
    opamp::{AgentToServer, ServerToAgent},
};

use crate::ENVELOPE_VERSION;

/// Why an envelope from the wire is not a message of the contract.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EnvelopeError {
    /// A field is missing or holds what no sender of this version writes.
    #[error("{envelope}: {problem}")]
    Invalid {
        /// Which kind of envelope.
        envelope: &'static str,
        /// What is wrong with it.
        problem: String,
    },
}

fn invalid(envelope: &'static str, problem: impl std::fmt::Display) -> EnvelopeError {
    EnvelopeError::Invalid {
        envelope,
        problem: problem.to_string(),
    }
}

/// An agent's message, as its gateway hands it to a coordinator.
#[derive(Debug, Clone, PartialEq)]
pub struct Report {
    /// The tenant of the credentials the agent presented.
    pub tenant: TenantId,
    /// The message's `instance_uid`, checked.
    pub uid: InstanceUid,
    /// The gateway that holds the agent.
    pub gateway: GatewayId,
    /// How the message came.
    pub link: Link,
    /// The endpoint URL the agent used, for connection-settings offers.
    pub endpoint: String,
    /// When the gateway received it (Unix ms, the gateway's clock).
    pub received_unix_ms: u64,
    /// The agent's message itself.
    pub message: AgentToServer,
    /// W3C trace context of the gateway's span.
    pub trace_context: BTreeMap<String, String>,
    /// Highest `sequence_num` the gateway answered itself on this connection.
    pub acked_sequence_num: u64,
    /// How long the gateway waits for the answer (ms; 0: unknown).
    pub budget_ms: u32,
    /// Another live WebSocket connection on this gateway that holds the uid.
    pub other_live_connection: Option<ConnectionId>,
    /// Who the agent proved to be: an API key's id or a certificate's
    /// identity; `None` in open mode.
    pub identity: Option<String>,
}

impl Report {
    /// A report of `message` whose uid the gateway has checked; the rest
    /// is filled in by the caller.
    pub fn new(tenant: TenantId, uid: InstanceUid, gateway: GatewayId, link: Link, message: AgentToServer) -> Self {
        Self {
            tenant,
            uid,
            gateway,
            link,
            endpoint: String::new(),
            received_unix_ms: fleetplane_proto::clock::unix_ms(),
            message,
            trace_context: BTreeMap::new(),
            acked_sequence_num: 0,
            budget_ms: 0,
            other_live_connection: None,
            identity: None,
        }
    }

    /// The wire envelope.
    pub fn into_wire(self) -> internal::AgentReport {
        internal::AgentReport {
            version: ENVELOPE_VERSION,
            tenant: self.tenant.to_string(),
            gateway_id: self.gateway.to_string(),
            connection_id: ConnectionId::wire(self.link.connection()),
            transport: self.link.transport() as i32,
            endpoint: self.endpoint,
            received_unix_ms: self.received_unix_ms,
            message: Some(self.message),
            trace_context: self.trace_context,
            acked_sequence_num: self.acked_sequence_num,
            budget_ms: self.budget_ms,
            other_live_connection: ConnectionId::wire(self.other_live_connection),
            key_id: self.identity.unwrap_or_default(),
        }
    }

    /// Reads a wire envelope, checking every id.
    pub fn from_wire(wire: internal::AgentReport) -> Result<Self, EnvelopeError> {
        const WHAT: &str = "agent report";
        let message = wire.message.ok_or_else(|| invalid(WHAT, "no agent message"))?;
        Ok(Self {
            tenant: TenantId::new(wire.tenant).map_err(|e| invalid(WHAT, e))?,
            uid: InstanceUid::from_slice(&message.instance_uid).map_err(|e| invalid(WHAT, e))?,
            gateway: GatewayId::new(wire.gateway_id).map_err(|e| invalid(WHAT, e))?,
            link: Link::from_wire(wire.transport, wire.connection_id)
                .ok_or_else(|| invalid(WHAT, "transport and connection do not agree"))?,
            endpoint: wire.endpoint,
            received_unix_ms: wire.received_unix_ms,
            message,
            trace_context: wire.trace_context,
            acked_sequence_num: wire.acked_sequence_num,
            budget_ms: wire.budget_ms,
            other_live_connection: ConnectionId::new(wire.other_live_connection),
            identity: Some(wire.key_id).filter(|k| !k.is_empty()),
        })
    }
}

/// A message from a coordinator for one agent on one gateway's connection.
#[derive(Debug, Clone, PartialEq)]
pub struct Delivery {
    /// The agent's tenant.
    pub tenant: TenantId,
    /// The agent.
    pub uid: InstanceUid,
    /// The gateway that holds it.
    pub gateway: GatewayId,
    /// The connection the coordinator knows it on: a message for an older
    /// connection of the agent never reaches a newer one.
    pub connection: ConnectionId,
    /// What to send (its `instance_uid` is the agent's).
    pub message: ServerToAgent,
}

impl Delivery {
    /// The wire envelope.
    pub fn into_wire(self) -> internal::Delivery {
        internal::Delivery {
            version: ENVELOPE_VERSION,
            tenant: self.tenant.to_string(),
            gateway_id: self.gateway.to_string(),
            connection_id: self.connection.get(),
            message: Some(self.message),
        }
    }

    /// Reads a wire envelope, checking every id.
    pub fn from_wire(wire: internal::Delivery) -> Result<Self, EnvelopeError> {
        const WHAT: &str = "delivery";
        let message = wire.message.ok_or_else(|| invalid(WHAT, "no message"))?;
        Ok(Self {
            tenant: TenantId::new(wire.tenant).map_err(|e| invalid(WHAT, e))?,
            uid: InstanceUid::from_slice(&message.instance_uid).map_err(|e| invalid(WHAT, e))?,
            gateway: GatewayId::new(wire.gateway_id).map_err(|e| invalid(WHAT, e))?,
            connection: ConnectionId::new(wire.connection_id).ok_or_else(|| invalid(WHAT, "no connection"))?,
            message,
        })
    }
}

/// WebSocket connections a gateway lost without an `agent_disconnect`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConnectionsClosed {
    /// Their tenant.
    pub tenant: TenantId,
    /// The gateway that held them.
    pub gateway: GatewayId,
    /// Each agent and the connection it was on.
    pub connections: Vec<(InstanceUid, ConnectionId)>,
}

impl ConnectionsClosed {
    /// The wire envelope.
    pub fn into_wire(self) -> internal::ConnectionsClosed {
        internal::ConnectionsClosed {
            version: ENVELOPE_VERSION,
            tenant: self.tenant.to_string(),
            gateway_id: self.gateway.to_string(),
            connections: self
                .connections
                .into_iter()
                .map(|(uid, connection)| internal::ClosedConnection {
                    instance_uid: uid.to_vec(),
                    connection_id: connection.get(),
                })
                .collect(),
        }
    }

    /// Reads a wire envelope; an entry with a bad uid or no connection is
    /// refused with the whole notice, since no gateway sends one.
    pub fn from_wire(wire: internal::ConnectionsClosed) -> Result<Self, EnvelopeError> {
        const WHAT: &str = "closed connections";
        Ok(Self {
            tenant: TenantId::new(wire.tenant).map_err(|e| invalid(WHAT, e))?,
            gateway: GatewayId::new(wire.gateway_id).map_err(|e| invalid(WHAT, e))?,
            connections: wire
                .connections
                .into_iter()
                .map(|c| {
                    Ok((
                        InstanceUid::from_slice(&c.instance_uid).map_err(|e| invalid(WHAT, e))?,
                        ConnectionId::new(c.connection_id).ok_or_else(|| invalid(WHAT, "no connection"))?,
                    ))
                })
                .collect::<Result<_, EnvelopeError>>()?,
        })
    }
}

/// A heartbeat a gateway answered itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Heartbeat {
    /// The agent.
    pub uid: InstanceUid,
    /// The connection it came on.
    pub connection: ConnectionId,
    /// Its `sequence_num`.
    pub sequence_num: u64,
    /// When the gateway saw it (Unix ms).
    pub seen_unix_ms: u64,
}

/// Heartbeats one gateway answered itself, for one tenant, in one batch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LivenessBatch {
    /// Their tenant.
    pub tenant: TenantId,
    /// The gateway that answered them.
    pub gateway: GatewayId,
    /// The latest heartbeat of each agent.
    pub agents: Vec<Heartbeat>,
}

impl LivenessBatch {
    /// The wire envelope.
    pub fn into_wire(self) -> internal::LivenessBatch {
        internal::LivenessBatch {
            version: ENVELOPE_VERSION,
            tenant: self.tenant.to_string(),
            gateway_id: self.gateway.to_string(),
            agents: self
                .agents
                .into_iter()
                .map(|h| internal::Liveness {
                    instance_uid: h.uid.to_vec(),
                    connection_id: h.connection.get(),
                    sequence_num: h.sequence_num,
                    seen_unix_ms: h.seen_unix_ms,
                })
                .collect(),
        }
    }

    /// Reads a wire envelope; entries without a valid uid or connection
    /// are skipped (each agent's next heartbeat is recorded anyway).
    pub fn from_wire(wire: internal::LivenessBatch) -> Result<Self, EnvelopeError> {
        const WHAT: &str = "liveness batch";
        Ok(Self {
            tenant: TenantId::new(wire.tenant).map_err(|e| invalid(WHAT, e))?,
            gateway: GatewayId::new(wire.gateway_id).map_err(|e| invalid(WHAT, e))?,
            agents: wire
                .agents
                .into_iter()
                .filter_map(|l| {
                    Some(Heartbeat {
                        uid: InstanceUid::from_slice(&l.instance_uid).ok()?,
                        connection: ConnectionId::new(l.connection_id)?,
                        sequence_num: l.sequence_num,
                        seen_unix_ms: l.seen_unix_ms,
                    })
                })
                .collect(),
        })
    }
}

/// A gateway's "I am alive" (or its goodbye).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GatewayPresence {
    /// The gateway.
    pub gateway: GatewayId,
    /// WebSocket agents bound to its live connections.
    pub agents: u64,
    /// When it was sent (Unix ms, the gateway's clock).
    pub sent_unix_ms: u64,
    /// Sent once on graceful shutdown, after the gateway closed its agents.
    pub leaving: bool,
}

impl GatewayPresence {
    /// The wire envelope.
    pub fn into_wire(self) -> internal::GatewayPresence {
        internal::GatewayPresence {
            version: ENVELOPE_VERSION,
            gateway_id: self.gateway.to_string(),
            agents: self.agents,
            sent_unix_ms: self.sent_unix_ms,
            leaving: self.leaving,
        }
    }

    /// Reads a wire envelope.
    pub fn from_wire(wire: internal::GatewayPresence) -> Result<Self, EnvelopeError> {
        Ok(Self {
            gateway: GatewayId::new(wire.gateway_id).map_err(|e| invalid("presence", e))?,
            agents: wire.agents,
            sent_unix_ms: wire.sent_unix_ms,
            leaving: wire.leaving,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use fleetplane_proto::internal::Transport;

    fn report() -> Report {
        let uid = InstanceUid::from_array([7; 16]);
        let mut report = Report::new(
            TenantId::new("acme").unwrap(),
            uid,
            GatewayId::new("gw-a").unwrap(),
            Link::WebSocket(ConnectionId::new(3).unwrap()),
            AgentToServer {
                instance_uid: uid.to_vec(),
                sequence_num: 4,
                ..Default::default()
            },
        );
        report.identity = Some("k1".into());
        report.other_live_connection = ConnectionId::new(2);
        report
    }

    #[test]
    fn a_report_survives_the_wire() {
        let original = report();
        assert_eq!(Report::from_wire(original.clone().into_wire()).unwrap(), original);
        let mut http = report();
        http.link = Link::Http;
        http.identity = None;
        let wire = http.clone().into_wire();
        assert_eq!((wire.connection_id, wire.transport), (0, Transport::Http as i32));
        assert_eq!(Report::from_wire(wire).unwrap(), http);
    }

    #[test]
    fn envelopes_no_sender_writes_are_refused() {
        let mut no_connection = report().into_wire();
        no_connection.connection_id = 0;
        let mut bad_uid = report().into_wire();
        bad_uid.message.as_mut().unwrap().instance_uid = b"01ARZ3NDEKTSV4RRFFQ69G5FAV".to_vec();
        let mut bad_tenant = report().into_wire();
        bad_tenant.tenant = "../other".into();
        let mut no_message = report().into_wire();
        no_message.message = None;
        for wire in [no_connection, bad_uid, bad_tenant, no_message] {
            assert!(Report::from_wire(wire).is_err());
        }
        let closed = internal::ConnectionsClosed {
            tenant: "acme".into(),
            gateway_id: "gw-a".into(),
            connections: vec![internal::ClosedConnection {
                instance_uid: vec![1; 16],
                connection_id: 0,
            }],
            ..Default::default()
        };
        assert!(
            ConnectionsClosed::from_wire(closed).is_err(),
            "a close of no connection"
        );
    }

    #[test]
    fn liveness_keeps_only_valid_entries() {
        let wire = internal::LivenessBatch {
            tenant: "acme".into(),
            gateway_id: "gw-a".into(),
            agents: vec![
                internal::Liveness {
                    instance_uid: vec![1; 16],
                    connection_id: 5,
                    sequence_num: 9,
                    seen_unix_ms: 1,
                },
                internal::Liveness {
                    instance_uid: vec![1; 3],
                    connection_id: 5,
                    ..Default::default()
                },
            ],
            ..Default::default()
        };
        let batch = LivenessBatch::from_wire(wire).unwrap();
        assert_eq!(batch.agents.len(), 1);
        assert_eq!(batch.agents[0].sequence_num, 9);
        assert_eq!(LivenessBatch::from_wire(batch.clone().into_wire()).unwrap(), batch);
    }
}
