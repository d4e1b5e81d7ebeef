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
//! before a connection closed is written before that close is applied (and
//! cannot mark the closed connection's agent connected again).

use std::sync::Arc;

use fleetplane_proto::{
    InstanceUid, TenantId,
    internal::{AgentRecord, ConnectionsClosed, Liveness, LivenessBatch},
};
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
    Closed(ConnectionsClosed),
}

/// Records one heartbeat on a record: the agent is alive on this connection
/// at this sequence number. False when it changes nothing: the record belongs
/// to another connection (the agent moved) or already has a newer message.
pub(crate) fn apply(record: &mut AgentRecord, gateway_id: &str, entry: &Liveness) -> bool {
    let current = record.gateway_id == gateway_id && record.connection_id == entry.connection_id;
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

/// Hands each closed connection to its agent's shard.
async fn close(shards: &Shards, closed: ConnectionsClosed) {
    let Ok(tenant) = TenantId::new(closed.tenant.clone()) else {
        tracing::warn!(tenant = %closed.tenant, "close event for an invalid tenant");
        return;
    };
    for connection in closed.connections {
        let Ok(uid) = InstanceUid::from_slice(&connection.instance_uid) else {
            continue;
        };
        shards
            .send(Job::Closed {
                tenant: tenant.clone(),
                uid,
                gateway_id: closed.gateway_id.clone(),
                connection_id: connection.connection_id,
            })
            .await;
    }
}

/// Writes one batch.
async fn record(store: &dyn Store, shards: &Shards, batch: LivenessBatch) -> Result<(), StoreError> {
    let Ok(tenant) = TenantId::new(batch.tenant.clone()) else {
        tracing::warn!(tenant = %batch.tenant, "liveness for an invalid tenant");
        return Ok(());
    };
    let entries: Vec<(InstanceUid, Liveness)> = batch
        .agents
        .into_iter()
        .filter_map(|entry| Some((InstanceUid::from_slice(&entry.instance_uid).ok()?, entry)))
        .collect();
    for chunk in entries.chunks(CHUNK) {
        let uids: Vec<InstanceUid> = chunk.iter().map(|(uid, _)| *uid).collect();
        let records = store.agents_by_uid(&tenant, &uids).await?;
        let mut changed = Vec::new();
        let mut changed_entries = Vec::new();
        for ((uid, entry), record) in chunk.iter().zip(records) {
            if let Some(mut record) = record
                && apply(&mut record, &batch.gateway_id, entry)
            {
                changed.push(record);
                changed_entries.push((*uid, entry));
            }
        }
        let outcomes = store.put_agents(changed).await?;
        for (outcome, (uid, entry)) in outcomes.into_iter().zip(changed_entries) {
            if matches!(outcome, Err(StoreError::Conflict(_))) {
                shards
                    .send(Job::Liveness {
                        tenant: tenant.clone(),
                        uid,
                        gateway_id: batch.gateway_id.clone(),
                        entry: entry.clone(),
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

    fn beat(connection_id: u64, sequence_num: u64) -> Liveness {
        Liveness {
            instance_uid: vec![1; 16],
            connection_id,
            sequence_num,
            seen_unix_ms: 2_000,
        }
    }

    #[test]
    fn a_newer_heartbeat_on_the_current_connection_counts() {
        let mut r = record();
        assert!(apply(&mut r, "gw-a", &beat(7, 11)));
        assert_eq!((r.sequence_num, r.last_seen_unix_ms, r.connected), (11, 2_000, true));
    }

    #[test]
    fn stale_or_foreign_heartbeats_change_nothing() {
        let mut r = record();
        assert!(!apply(&mut r, "gw-a", &beat(7, 10)), "not newer");
        assert!(!apply(&mut r, "gw-a", &beat(8, 11)), "another connection");
        assert!(!apply(&mut r, "gw-b", &beat(7, 11)), "another gateway");
        assert_eq!(r, record());
    }
}
