//! What an operator asks of one agent: a restart (spec 4.I.46), a custom
//! message (4.I.47), or a new client certificate (4.G.36, server-generated).
//! A certificate goes out in the agent's connection-settings offer, like the
//! one issued for a CSR.
//!
//! An ask is written into the agent's record first (at most one of each
//! kind, the latest winning, spec 4.I.51), then pushed through the agent's
//! shard like any other missing state. That makes one path for both
//! transports: a WebSocket agent gets it at once, a polling HTTP agent in
//! the reply to its next poll, an offline agent when it comes back. Asks the
//! agent does not advertise it can take are refused here, before anything
//! is stored, so nothing is ever sent that the agent cannot accept.

use fleetplane_proto::{
    InstanceUid, TenantId,
    capabilities::AgentCaps,
    internal::{AgentRecord, Transport},
    opamp::{AgentCapabilities, CustomMessage, ServerToAgentCommand},
};

use crate::{
    Coordinator,
    conflict::{Conflict, retry_conflicts},
    reconcile::agent_custom_capabilities,
    store::StoreError,
    worker::{Job, now_unix_ms},
};

/// Largest custom message payload an operator may send (bytes).
pub const MAX_CUSTOM_MESSAGE_BYTES: usize = 256 * 1024;

/// What an operator asks of an agent.
#[derive(Debug, Clone)]
pub enum Ask {
    /// Restart (`CommandType::Restart`).
    Restart,
    /// A custom message under one of the agent's custom capabilities.
    Custom(CustomMessage),
    /// A new client certificate (and key) from the tenant's issuing CA,
    /// replacing the one it has.
    Certificate,
}

/// When the agent will get it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Delivery {
    /// Connected over WebSocket: pushed now.
    Pushed,
    /// Polling over HTTP: in the reply to its next poll.
    NextPoll,
    /// Not connected: when it comes back (unless replaced before).
    OnReconnect,
}

/// Why an ask was refused.
#[derive(Debug, thiserror::Error)]
pub enum AskError {
    #[error("no agent {0}")]
    UnknownAgent(InstanceUid),
    /// The agent does not advertise what the ask needs.
    #[error("agent {uid} cannot take this: {reason}")]
    NotAccepted { uid: InstanceUid, reason: String },
    #[error("custom message data is {0} bytes; at most {MAX_CUSTOM_MESSAGE_BYTES}")]
    TooLarge(usize),
    /// No issuing CA for the tenant, or signing failed.
    #[error(transparent)]
    Certificate(#[from] crate::certificates::CertificateError),
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl Conflict for AskError {
    fn is_conflict(&self) -> bool {
        matches!(self, AskError::Store(e) if e.is_conflict())
    }
}

/// Whether `record`'s agent can take `ask`; the reason when not.
pub fn check(record: &AgentRecord, ask: &Ask) -> Result<(), String> {
    match ask {
        Ask::Restart => AgentCaps(record.capabilities)
            .has(AgentCapabilities::AcceptsRestartCommand)
            .then_some(())
            .ok_or_else(|| "it does not advertise AcceptsRestartCommand".to_owned()),
        Ask::Certificate => AgentCaps(record.capabilities)
            .has(AgentCapabilities::AcceptsOpAmpConnectionSettings)
            .then_some(())
            .ok_or_else(|| "it does not advertise AcceptsOpAMPConnectionSettings".to_owned()),
        Ask::Custom(message) => {
            let listed = agent_custom_capabilities(record);
            if listed.contains(&message.capability) {
                Ok(())
            } else if listed.is_empty() {
                Err(format!(
                    "it lists no custom capabilities, so not {:?}",
                    message.capability
                ))
            } else {
                Err(format!(
                    "it does not list custom capability {:?} (it lists {})",
                    message.capability,
                    listed.join(", ")
                ))
            }
        }
    }
}

impl Coordinator {
    /// Records `ask` for the agent and pushes it if the agent is connected
    /// over WebSocket. Refused when the agent does not advertise it can take it.
    pub async fn ask(&self, tenant: &TenantId, uid: &InstanceUid, ask: Ask) -> Result<Delivery, AskError> {
        if let Ask::Custom(message) = &ask
            && message.data.len() > MAX_CUSTOM_MESSAGE_BYTES
        {
            return Err(AskError::TooLarge(message.data.len()));
        }
        // Issued once, outside the write loop (a retried write offers the
        // same certificate), and only for an agent that can take it.
        let issued = match ask {
            Ask::Certificate => {
                let record = self
                    .store()
                    .agent(tenant, uid)
                    .await?
                    .ok_or(AskError::UnknownAgent(*uid))?;
                check(&record, &ask).map_err(|reason| AskError::NotAccepted { uid: *uid, reason })?;
                Some(self.issuers.issue(tenant, uid)?)
            }
            _ => None,
        };
        let store = self.store().clone();
        let delivery = retry_conflicts(|| {
            let store = store.clone();
            let ask = ask.clone();
            let issued = issued.clone();
            async move {
                let mut record = store.agent(tenant, uid).await?.ok_or(AskError::UnknownAgent(*uid))?;
                check(&record, &ask).map_err(|reason| AskError::NotAccepted { uid: *uid, reason })?;
                match ask {
                    Ask::Restart => {
                        record.pending_command = Some(ServerToAgentCommand::default());
                        record.pending_command_unix_ms = now_unix_ms();
                    }
                    Ask::Custom(message) => record.pending_custom_message = Some(message),
                    Ask::Certificate => {
                        if let Some((certificate, id)) = issued {
                            // The certificate being replaced may go on
                            // speaking for the agent until it uses the new one.
                            if !record.owner_certificate.is_empty() {
                                record.previous_owner_certificate = std::mem::take(&mut record.owner_certificate);
                            }
                            record.issued_certificate = Some(certificate);
                            record.owner_certificate = id;
                        }
                    }
                }
                let delivery = if !record.connected {
                    Delivery::OnReconnect
                } else if record.transport == Transport::Websocket as i32 {
                    Delivery::Pushed
                } else {
                    Delivery::NextPoll
                };
                store.put_agent(record).await?;
                Ok::<_, AskError>(delivery)
            }
        })
        .await?;
        if delivery == Delivery::Pushed {
            self.shards
                .send(Job::Reconcile {
                    tenant: tenant.clone(),
                    uid: *uid,
                })
                .await;
        }
        Ok(delivery)
    }
}

#[cfg(test)]
mod tests {
    use fleetplane_proto::opamp::CustomCapabilities;

    use super::*;

    fn custom(capability: &str) -> Ask {
        Ask::Custom(CustomMessage {
            capability: capability.into(),
            r#type: "ping".into(),
            data: b"{}".to_vec(),
        })
    }

    #[test]
    fn only_what_the_agent_advertises_is_accepted() {
        let mut record = AgentRecord::default();
        assert!(
            check(&record, &Ask::Restart)
                .unwrap_err()
                .contains("AcceptsRestartCommand")
        );
        record.capabilities = AgentCapabilities::AcceptsRestartCommand as u64;
        assert!(check(&record, &Ask::Restart).is_ok());

        assert!(
            check(&record, &custom("io.example.echo"))
                .unwrap_err()
                .contains("no custom")
        );
        record.custom_capabilities = Some(CustomCapabilities {
            capabilities: vec!["io.example.echo".into()],
        });
        assert!(check(&record, &custom("io.example.echo")).is_ok());
        let refused = check(&record, &custom("io.example.other")).unwrap_err();
        assert!(refused.contains("io.example.echo"), "{refused}");
    }
}
