//! Liveness of agents whose heartbeats a gateway answered itself.
//!
//! A gateway reports them in batches, about one bus message per second. Each
//! batch costs the store two round trips per chunk of agents (read every
//! record, then write the changed ones, each a compare-and-set on its
//! revision) instead of two per agent. A record that another writer changed
//! in between (the agent's own report, handled by its shard) is redone
//! through the agent's shard, which serialises it with that report.
//!
//! Close events pass through the same queue, so a batch that a gateway sent
//! before a connection closed is written before that close is applied. A
//! batch that still arrives after the close (through another coordinator
//! replica) finds the connection id cleared and changes nothing.

use std::sync::Arc;

use fleetplane_bus::{ClosedAck, ClosedNotice, Heartbeat, LivenessBatch};
use fleetplane_proto::{GatewayId, InstanceUid, internal::AgentRecord};
use tokio::sync::mpsc;
use tokio_util::{sync::CancellationToken, task::TaskTracker};

use crate::{
    store::{Store, StoreError},
    worker::{Job, Shards},
};

/// Agents per store round trip.
const CHUNK: usize = 500;

/// Events waiting; beyond this the coordinator is behind: liveness batches
/// are dropped (each agent's next heartbeat records it again), close events
/// wait for room.
const QUEUE: usize = 64;

/// What the writer handles, in arrival order.
#[derive(Debug)]
pub(crate) enum Event {
    Batch(LivenessBatch),
    Closed(ClosedNotice),
}

/// Acknowledges a gateway's close notice once every connection in it is
/// recorded. A connection that could not be (a store error, a job dropped on
/// shutdown) leaves it unacknowledged, and the gateway sends the notice again.
#[derive(Debug)]
pub(crate) struct Recorded {
    ack: std::sync::Mutex<Option<ClosedAck>>,
    remaining: std::sync::atomic::AtomicUsize,
}

impl Recorded {
    fn new(ack: ClosedAck, connections: usize) -> Arc<Self> {
        Arc::new(Self {
            ack: std::sync::Mutex::new(Some(ack)),
            remaining: std::sync::atomic::AtomicUsize::new(connections),
        })
    }

    /// One more connection is recorded; the last one acknowledges.
    pub(crate) fn one_done(&self) {
        if self.remaining.fetch_sub(1, std::sync::atomic::Ordering::AcqRel) == 1 {
            let ack = self.ack.lock().unwrap_or_else(|p| p.into_inner()).take();
            if let Some(ack) = ack {
                ack.done();
            }
        }
    }
}

/// Records one heartbeat on a record: the agent is alive on this connection
/// at this sequence number. False when it changes nothing: the record belongs
/// to another connection (the agent moved) or already has a newer message.
pub(crate) fn apply(record: &mut AgentRecord, gateway: &GatewayId, entry: &Heartbeat) -> bool {
    let current = record.gateway_id == gateway.as_str() && record.connection_id == entry.connection.get();
    if !current || entry.sequence_num <= record.sequence_num {
        return false;
    }
    record.sequence_num = entry.sequence_num;
    record.last_seen_unix_ms = record.last_seen_unix_ms.max(entry.seen_unix_ms);
    record.connected = true;
    true
}

/// Starts the writer; returns where to send events.
pub(crate) fn start(
    store: Arc<dyn Store>,
    shards: Shards,
    tracker: &TaskTracker,
    shutdown: CancellationToken,
) -> mpsc::Sender<Event> {
    let (tx, mut rx) = mpsc::channel::<Event>(QUEUE);
    tracker.spawn(async move {
        loop {
            let event = tokio::select! {
                _ = shutdown.cancelled() => return,
                event = rx.recv() => event,
            };
            match event {
                None => return,
                Some(Event::Batch(batch)) => {
                    if let Err(e) = record(store.as_ref(), &shards, batch).await {
                        tracing::debug!(error = %e, "liveness batch not recorded; each agent's next heartbeat is");
                    }
                }
                Some(Event::Closed(closed)) => close(&shards, closed).await,
            }
        }
    });
    tx
}

/// Hands each closed connection to its agent's shard; the gateway hears
/// back once all are recorded.
async fn close(shards: &Shards, notice: ClosedNotice) {
    let (closed, ack) = notice.into_parts();
    if closed.connections.is_empty() {
        ack.done();
        return;
    }
    let recorded = Recorded::new(ack, closed.connections.len());
    for (uid, connection) in closed.connections {
        shards
            .send(Job::Closed {
                tenant: closed.tenant.clone(),
                uid,
                gateway: closed.gateway.clone(),
                connection,
                reported: true,
                recorded: Some(recorded.clone()),
            })
            .await;
    }
}

/// Writes one batch.
async fn record(store: &dyn Store, shards: &Shards, batch: LivenessBatch) -> Result<(), StoreError> {
    let tenant = &batch.tenant;
    for chunk in batch.agents.chunks(CHUNK) {
        let uids: Vec<InstanceUid> = chunk.iter().map(|entry| entry.uid).collect();
        let records = store.agents_by_uid(tenant, &uids).await?;
        let mut changed = Vec::new();
        let mut changed_entries = Vec::new();
        for (entry, record) in chunk.iter().zip(records) {
            if let Some(mut record) = record
                && apply(&mut record, &batch.gateway, entry)
            {
                changed.push(record);
                changed_entries.push(*entry);
            }
        }
        let outcomes = store.put_agents(changed).await?;
        for (outcome, entry) in outcomes.into_iter().zip(changed_entries) {
            if matches!(outcome, Err(StoreError::Conflict(_))) {
                shards
                    .send(Job::Liveness {
                        tenant: tenant.clone(),
                        uid: entry.uid,
                        gateway: batch.gateway.clone(),
                        entry,
                    })
                    .await;
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record() -> AgentRecord {
        AgentRecord {
            gateway_id: "gw-a".into(),
            connection_id: 7,
            sequence_num: 10,
            last_seen_unix_ms: 1_000,
            connected: false,
            ..Default::default()
        }
    }

    fn beat(connection: u64, sequence_num: u64) -> Heartbeat {
        Heartbeat {
            uid: InstanceUid::from_array([1; 16]),
            connection: fleetplane_proto::ConnectionId::new(connection).unwrap(),
            sequence_num,
            seen_unix_ms: 2_000,
        }
    }

    fn gw(id: &str) -> GatewayId {
        GatewayId::new(id).unwrap()
    }

    #[test]
    fn a_newer_heartbeat_on_the_current_connection_counts() {
        let mut r = record();
        assert!(apply(&mut r, &gw("gw-a"), &beat(7, 11)));
        assert_eq!((r.sequence_num, r.last_seen_unix_ms, r.connected), (11, 2_000, true));
    }

    /// A gateway's batch sent just before a connection closed, and the
    /// close: applied in that order, the agent ends disconnected with the
    /// batch's sequence number (the close does not lose the heartbeat, the
    /// heartbeat does not revive the closed connection).
    #[tokio::test]
    async fn liveness_never_revives_an_agent_whose_close_the_gateway_reported() {
        use std::time::Duration;

        use fleetplane_bus::ConnectionsClosed;
        use fleetplane_proto::TenantId;

        use crate::{reconcile::ReplySettings, store::embedded::EmbeddedStore, worker::WorkerContext};

        let dir = tempfile::tempdir().unwrap();
        let store: Arc<dyn Store> = Arc::new(EmbeddedStore::open(dir.path()).unwrap());
        let tenant = TenantId::default_tenant();
        let uid = InstanceUid::new_v7();
        store
            .put_agent(AgentRecord {
                tenant: tenant.to_string(),
                instance_uid: uid.to_vec(),
                connected: true,
                ..record()
            })
            .await
            .unwrap();
        let (tracker, shutdown) = (TaskTracker::new(), CancellationToken::new());
        let context = WorkerContext {
            store: store.clone(),
            events: crate::events::Events::start(store.clone(), 100, &tracker, shutdown.clone()),
            bus: Arc::new(fleetplane_bus::memory::MemoryBus::default()),
            settings: ReplySettings {
                heartbeat_interval: Duration::ZERO,
                issuers: Default::default(),
            },
            retry_after: Duration::from_secs(1),
            presence: Arc::new(std::sync::Mutex::new(crate::presence::Presence::new(
                Duration::from_secs(5),
                tokio::time::Instant::now(),
            ))),
            inventories: Default::default(),
        };
        let shards = crate::worker::start(2, 16, context, &tracker, &shutdown);
        let events = start(store.clone(), shards, &tracker, shutdown.clone());
        let mut entry = beat(7, 11);
        entry.uid = uid;
        let batch = LivenessBatch {
            tenant: tenant.clone(),
            gateway: gw("gw-a"),
            agents: vec![entry],
        };
        let closed = ConnectionsClosed {
            tenant: tenant.clone(),
            gateway: gw("gw-a"),
            connections: vec![(uid, entry.connection)],
        };
        events.send(Event::Batch(batch)).await.unwrap();
        let (notice, recorded) = ClosedNotice::new(closed);
        events.send(Event::Closed(notice)).await.unwrap();
        // Acknowledged only once written, so the gateway may stop retrying.
        tokio::time::timeout(Duration::from_secs(10), recorded)
            .await
            .expect("acknowledged within 10 s")
            .expect("recorded, not refused");
        let written = store.agent(&tenant, &uid).await.unwrap().unwrap();
        assert!(!written.connected, "written before the acknowledgement");
        let until = |check: fn(&AgentRecord) -> bool, uid: InstanceUid| {
            let store = store.clone();
            let tenant = tenant.clone();
            async move {
                tokio::time::timeout(Duration::from_secs(10), async {
                    loop {
                        let r = store.agent(&tenant, &uid).await.unwrap().unwrap();
                        if check(&r) {
                            return r;
                        }
                        tokio::task::yield_now().await;
                    }
                })
                .await
                .expect("applied within 10 s")
            }
        };
        let settled = until(|r| r.sequence_num == 11 && !r.connected, uid).await;
        assert_eq!(settled.connection_id, 0, "a reported close clears the connection id");

        // A batch for the closed connection that arrives after the close (as
        // through another replica) changes nothing. A second agent's batch,
        // queued behind it, shows when it was handled.
        let witness = InstanceUid::new_v7();
        store
            .put_agent(AgentRecord {
                tenant: tenant.to_string(),
                instance_uid: witness.to_vec(),
                ..record()
            })
            .await
            .unwrap();
        let mut late = beat(7, 12);
        late.uid = uid;
        let mut other = beat(7, 11);
        other.uid = witness;
        for entry in [late, other] {
            let batch = LivenessBatch {
                tenant: tenant.clone(),
                gateway: gw("gw-a"),
                agents: vec![entry],
            };
            events.send(Event::Batch(batch)).await.unwrap();
        }
        until(|r| r.sequence_num == 11 && r.connected, witness).await;
        let after = store.agent(&tenant, &uid).await.unwrap().unwrap();
        assert_eq!((after.sequence_num, after.connected), (11, false), "not revived");
        shutdown.cancel();
        tracker.close();
        tracker.wait().await;
    }

    #[test]
    fn stale_or_foreign_heartbeats_change_nothing() {
        let mut r = record();
        assert!(!apply(&mut r, &gw("gw-a"), &beat(7, 10)), "not newer");
        assert!(!apply(&mut r, &gw("gw-a"), &beat(8, 11)), "another connection");
        assert!(!apply(&mut r, &gw("gw-b"), &beat(7, 11)), "another gateway");
        assert_eq!(r, record());
    }
}
