//! Which agent is on which of this gateway's connections.
//!
//! The only per-agent state a gateway keeps: enough to route a coordinator's
//! message to the right socket. A uid maps to the connection that last spoke
//! for it; the connection id guards against a message meant for an older
//! connection of the same agent reaching a newer one.

use std::{collections::HashMap, sync::Mutex};

use fleetplane_proto::{ConnectionId, InstanceUid, TenantId, opamp::ServerToAgent};
use tokio::sync::mpsc;

/// The sending half of one WebSocket session's outbound queue. Messages are
/// boxed: a tokio channel allocates its slots a block at a time, and a block
/// of unboxed `ServerToAgent`s would cost every idle connection kilobytes.
#[derive(Debug, Clone)]
pub(crate) struct Registration {
    pub connection: ConnectionId,
    pub outbound: mpsc::Sender<Box<ServerToAgent>>,
}

/// An agent as the registry knows it: uids are unique within a tenant only,
/// so an agent of one tenant can never take over another tenant's routing.
pub(crate) type AgentKey = (TenantId, InstanceUid);

/// (tenant, uid) → live connection.
#[derive(Debug, Default)]
pub(crate) struct Registry {
    agents: Mutex<HashMap<AgentKey, Registration>>,
    /// Woken whenever a binding is removed, for connections waiting for
    /// another one to let go of a uid.
    released: tokio::sync::Notify,
}

/// Why a message could not be handed to a connection.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum RouteError {
    /// The agent is not (or no longer) on this gateway, or on another connection.
    NotHere,
    /// The connection's outbound queue is full; the message was dropped and the
    /// agent's next report gets the same answer.
    Full,
}

impl Registry {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<AgentKey, Registration>> {
        self.agents.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Binds `uid` to a connection, replacing an older binding.
    pub fn register(&self, tenant: &TenantId, uid: InstanceUid, registration: Registration) {
        self.lock().insert((tenant.clone(), uid), registration);
    }

    /// Unbinds `uid` if it is still bound to `connection`.
    pub fn unregister(&self, tenant: &TenantId, uid: &InstanceUid, connection: ConnectionId) -> bool {
        let mut agents = self.lock();
        let key = (tenant.clone(), *uid);
        if agents.get(&key).is_some_and(|r| r.connection == connection) {
            agents.remove(&key);
            self.released.notify_waiters();
            true
        } else {
            false
        }
    }

    /// Hands a message to `uid` if `connection` still holds it.
    pub fn route(
        &self,
        tenant: &TenantId,
        uid: &InstanceUid,
        connection: ConnectionId,
        message: ServerToAgent,
    ) -> Result<(), RouteError> {
        let outbound = match self.lock().get(&(tenant.clone(), *uid)) {
            Some(r) if r.connection == connection => r.outbound.clone(),
            _ => return Err(RouteError::NotHere),
        };
        outbound.try_send(Box::new(message)).map_err(|e| match e {
            mpsc::error::TrySendError::Full(_) => RouteError::Full,
            mpsc::error::TrySendError::Closed(_) => RouteError::NotHere,
        })
    }

    /// The live connection holding `uid`, if it is not `asking` (`None`:
    /// a plain-HTTP poll, which no connection is).
    pub fn other_holder(
        &self,
        tenant: &TenantId,
        uid: &InstanceUid,
        asking: Option<ConnectionId>,
    ) -> Option<ConnectionId> {
        self.lock()
            .get(&(tenant.clone(), *uid))
            .filter(|r| Some(r.connection) != asking && !r.outbound.is_closed())
            .map(|r| r.connection)
    }

    /// Waits up to `patience` for connection `holder` to let go of `uid`
    /// (an agent that reconnects right after closing often says hello before
    /// its old connection's close has been handled). Returns the holder still
    /// there after the wait, if any.
    pub async fn wait_released(
        &self,
        tenant: &TenantId,
        uid: &InstanceUid,
        asking: ConnectionId,
        patience: std::time::Duration,
    ) -> Option<ConnectionId> {
        let deadline = tokio::time::Instant::now() + patience;
        loop {
            let notified = self.released.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            let holder = self.other_holder(tenant, uid, Some(asking))?;
            tokio::select! {
                _ = notified => {}
                _ = tokio::time::sleep_until(deadline) => return Some(holder),
            }
        }
    }

    /// Number of agents bound to live connections.
    pub fn len(&self) -> usize {
        self.lock().len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t() -> TenantId {
        TenantId::default_tenant()
    }

    fn c(n: u64) -> ConnectionId {
        ConnectionId::new(n).unwrap()
    }

    #[test]
    fn tenants_never_share_a_route() {
        let registry = Registry::default();
        let uid = InstanceUid::from_array([3; 16]);
        let other = TenantId::new("other".to_owned()).unwrap();
        let (a_tx, mut a_rx) = mpsc::channel(1);
        let (b_tx, _b_rx) = mpsc::channel(1);
        registry.register(
            &t(),
            uid,
            Registration {
                connection: c(1),
                outbound: a_tx,
            },
        );
        registry.register(
            &other,
            uid,
            Registration {
                connection: c(2),
                outbound: b_tx,
            },
        );
        assert_eq!(registry.route(&t(), &uid, c(1), ServerToAgent::default()), Ok(()));
        assert!(
            a_rx.try_recv().is_ok(),
            "the other tenant's same uid did not replace it"
        );
        assert_eq!(registry.other_holder(&other, &uid, Some(c(2))), None);
    }

    #[test]
    fn routes_only_to_the_current_connection() {
        let registry = Registry::default();
        let uid = InstanceUid::from_array([1; 16]);
        let (old_tx, _old_rx) = mpsc::channel(1);
        let (new_tx, mut new_rx) = mpsc::channel(1);
        registry.register(
            &t(),
            uid,
            Registration {
                connection: c(1),
                outbound: old_tx,
            },
        );
        registry.register(
            &t(),
            uid,
            Registration {
                connection: c(2),
                outbound: new_tx,
            },
        );
        assert_eq!(
            registry.route(&t(), &uid, c(1), ServerToAgent::default()),
            Err(RouteError::NotHere)
        );
        assert_eq!(registry.route(&t(), &uid, c(2), ServerToAgent::default()), Ok(()));
        assert!(new_rx.try_recv().is_ok());
        assert!(
            !registry.unregister(&t(), &uid, c(1)),
            "an old connection must not unbind the new one"
        );
        assert!(registry.unregister(&t(), &uid, c(2)));
        assert_eq!(registry.len(), 0);
    }

    #[test]
    fn a_full_queue_drops_instead_of_growing() {
        let registry = Registry::default();
        let uid = InstanceUid::from_array([2; 16]);
        let (tx, _rx) = mpsc::channel(1);
        registry.register(
            &t(),
            uid,
            Registration {
                connection: c(5),
                outbound: tx,
            },
        );
        assert_eq!(registry.route(&t(), &uid, c(5), ServerToAgent::default()), Ok(()));
        assert_eq!(
            registry.route(&t(), &uid, c(5), ServerToAgent::default()),
            Err(RouteError::Full)
        );
    }
}
