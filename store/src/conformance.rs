//! One behaviour suite that every [`Store`] implementation must pass, so the
//! all-in-one and scaled modes behave the same.

use std::{collections::BTreeMap, sync::Arc};

use fleetplane_proto::{
    ConfigHash, InstanceUid, TenantId,
    internal::{AgentRecord, Assignment, ConfigFile},
};

use super::{Store, StoreError};

fn tenant() -> TenantId {
    TenantId::default_tenant()
}

pub fn record(uid: InstanceUid, seq: u64) -> AgentRecord {
    AgentRecord {
        tenant: tenant().to_string(),
        instance_uid: uid.to_vec(),
        sequence_num: seq,
        connected: true,
        ..Default::default()
    }
}

pub fn files(body: &str) -> BTreeMap<String, ConfigFile> {
    BTreeMap::from([(
        "collector.yaml".to_owned(),
        ConfigFile {
            body: body.as_bytes().to_vec(),
            content_type: "text/yaml".into(),
        },
    )])
}

pub async fn agents_round_trip_with_revisions(store: &dyn Store) {
    let uid = InstanceUid::new_v7();
    assert_eq!(store.agent(&tenant(), &uid).await.unwrap(), None);
    store.put_agent(record(uid, 1)).await.unwrap();
    let stored = store.agent(&tenant(), &uid).await.unwrap().unwrap();
    assert_eq!(stored.revision, 1);
    assert_eq!(stored.sequence_num, 1);
    assert_eq!(store.tenants().await.unwrap(), vec![tenant()]);
    store.remove_agent(&tenant(), &uid).await.unwrap();
    assert_eq!(store.agent(&tenant(), &uid).await.unwrap(), None);
    assert!(store.agents(&tenant()).await.unwrap().is_empty());
}

pub async fn batches_read_in_order_and_refuse_stale_writes_one_by_one(store: &dyn Store) {
    let uids: Vec<InstanceUid> = (0..5).map(|_| InstanceUid::new_v7()).collect();
    let unknown = InstanceUid::new_v7();
    let outcomes = store
        .put_agents(uids.iter().map(|uid| record(*uid, 1)).collect())
        .await
        .unwrap();
    assert!(outcomes.iter().all(Result::is_ok), "{outcomes:?}");
    let mut asked = uids.clone();
    asked.insert(2, unknown);
    let read = store.agents_by_uid(&tenant(), &asked).await.unwrap();
    assert_eq!(read.len(), 6);
    assert_eq!(read[2], None, "an unknown agent reads as None in its place");
    let found: Vec<AgentRecord> = read.into_iter().flatten().collect();
    assert_eq!(
        found.iter().map(|r| r.instance_uid.clone()).collect::<Vec<_>>(),
        uids.iter().map(|u| u.to_vec()).collect::<Vec<_>>()
    );
    assert!(found.iter().all(|r| r.revision == 1));
    // Another writer changes the third record between our read and write.
    store
        .put_agent(AgentRecord {
            sequence_num: 9,
            ..found[2].clone()
        })
        .await
        .unwrap();
    let next: Vec<AgentRecord> = found
        .into_iter()
        .map(|r| AgentRecord { sequence_num: 2, ..r })
        .collect();
    let outcomes = store.put_agents(next).await.unwrap();
    assert!(matches!(outcomes[2], Err(StoreError::Conflict(_))), "{outcomes:?}");
    assert_eq!(outcomes.iter().filter(|o| o.is_ok()).count(), 4);
    let after = store.agents_by_uid(&tenant(), &uids).await.unwrap();
    let seqs: Vec<u64> = after.iter().flatten().map(|r| r.sequence_num).collect();
    assert_eq!(seqs, vec![2, 2, 9, 2, 2], "the other writer's change survived");
    assert!(store.agents_by_uid(&tenant(), &[]).await.unwrap().is_empty());
    assert!(store.put_agents(Vec::new()).await.unwrap().is_empty());
}

pub async fn stale_writes_are_refused(store: &dyn Store) {
    let uid = InstanceUid::new_v7();
    store.put_agent(record(uid, 1)).await.unwrap();
    let first = store.agent(&tenant(), &uid).await.unwrap().unwrap();
    let second = first.clone();
    store
        .put_agent(AgentRecord {
            sequence_num: 2,
            ..first
        })
        .await
        .unwrap();
    let err = store
        .put_agent(AgentRecord {
            sequence_num: 3,
            ..second
        })
        .await
        .unwrap_err();
    assert!(matches!(err, StoreError::Conflict(_)), "{err}");
    let now = store.agent(&tenant(), &uid).await.unwrap().unwrap();
    assert_eq!((now.sequence_num, now.revision), (2, 2));
    assert!(matches!(
        store.put_agent(record(uid, 9)).await,
        Err(StoreError::Conflict(_))
    ));
}

/// Many writers racing on one agent: every increment lands exactly once.
pub async fn racing_writers_lose_no_update(store: Arc<dyn Store>) {
    let uid = InstanceUid::new_v7();
    store.put_agent(record(uid, 0)).await.unwrap();
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..8 {
        let store = store.clone();
        tasks.spawn(async move {
            for _ in 0..10 {
                loop {
                    let mut r = store.agent(&tenant(), &uid).await.unwrap().unwrap();
                    r.sequence_num += 1;
                    match store.put_agent(r).await {
                        Ok(()) => break,
                        Err(StoreError::Conflict(_)) => continue,
                        Err(e) => panic!("{e}"),
                    }
                }
            }
        });
    }
    while let Some(done) = tasks.join_next().await {
        done.unwrap();
    }
    assert_eq!(store.agent(&tenant(), &uid).await.unwrap().unwrap().sequence_num, 80);
}

pub async fn many_agents_list_back(store: &dyn Store) {
    let uids: Vec<InstanceUid> = (0..1500).map(|_| InstanceUid::new_v7()).collect();
    for uid in &uids {
        store.put_agent(record(*uid, 1)).await.unwrap();
    }
    let listed = store.agents(&tenant()).await.unwrap();
    assert_eq!(listed.len(), uids.len());
    assert!(listed.iter().all(|r| r.revision == 1));
    let other = TenantId::new("other").unwrap();
    assert!(store.agents(&other).await.unwrap().is_empty());
}

pub async fn config_versions_count_up_and_dedupe(store: &dyn Store) {
    let v1 = store
        .create_config_version(&tenant(), "base", files("a"), 1)
        .await
        .unwrap();
    assert!(v1.created);
    assert_eq!(v1.version.version, 1);
    let again = store
        .create_config_version(&tenant(), "base", files("a"), 2)
        .await
        .unwrap();
    assert!(!again.created);
    assert_eq!(again.version, v1.version);
    let v2 = store
        .create_config_version(&tenant(), "base", files("b"), 3)
        .await
        .unwrap();
    assert_eq!(v2.version.version, 2);
    assert_eq!(
        store.config_version(&tenant(), "base", 0).await.unwrap(),
        Some(std::sync::Arc::new(v2.version.clone()))
    );
    assert_eq!(
        store.config_version(&tenant(), "base", 1).await.unwrap(),
        Some(std::sync::Arc::new(v1.version.clone()))
    );
    assert_eq!(store.config_version(&tenant(), "base", 3).await.unwrap(), None);
    assert_eq!(store.config_version(&tenant(), "none", 0).await.unwrap(), None);
    let hash = ConfigHash::from_slice(&v1.version.hash).unwrap();
    assert_eq!(
        store.config_by_hash(&tenant(), &hash).await.unwrap(),
        Some(std::sync::Arc::new(v1.version.clone()))
    );
    assert_eq!(
        store.config_versions(&tenant(), "base").await.unwrap(),
        vec![v1.version, v2.version]
    );
    assert_eq!(store.config_names(&tenant()).await.unwrap(), vec!["base".to_owned()]);
}

/// Concurrent creators never share a version number.
pub async fn concurrent_versions_get_distinct_numbers(store: Arc<dyn Store>) {
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..10 {
        let store = store.clone();
        tasks.spawn(async move {
            store
                .create_config_version(&tenant(), "race", files(&format!("body {i}")), 1)
                .await
                .unwrap()
                .version
                .version
        });
    }
    let mut numbers = Vec::new();
    while let Some(n) = tasks.join_next().await {
        numbers.push(n.unwrap());
    }
    numbers.sort();
    assert_eq!(numbers, (1..=10).collect::<Vec<u32>>());
}

pub async fn assignments_round_trip(store: &dyn Store) {
    let a = Assignment {
        tenant: tenant().to_string(),
        name: "all".into(),
        selector: "a=b".into(),
        config_name: "base".into(),
        priority: 3,
        ..Default::default()
    };
    store.put_assignment(a.clone()).await.unwrap();
    assert_eq!(store.assignments(&tenant()).await.unwrap(), vec![a]);
    assert!(store.remove_assignment(&tenant(), "all").await.unwrap());
    assert!(!store.remove_assignment(&tenant(), "all").await.unwrap());
    assert!(store.assignments(&tenant()).await.unwrap().is_empty());
}

pub async fn connection_settings_round_trip(store: &dyn Store) {
    use fleetplane_proto::{internal::ConnectionSettingsAssignment, opamp::TelemetryConnectionSettings};
    let s = ConnectionSettingsAssignment {
        tenant: tenant().to_string(),
        name: "metrics".into(),
        selector: "a=b".into(),
        own_metrics: Some(TelemetryConnectionSettings {
            destination_endpoint: "https://otlp.example.com/v1/metrics".into(),
            ..Default::default()
        }),
        ..Default::default()
    };
    store.put_connection_settings(s.clone()).await.unwrap();
    assert_eq!(store.connection_settings(&tenant()).await.unwrap(), vec![s]);
    // Apart from config assignments of the same name.
    assert!(store.assignments(&tenant()).await.unwrap().is_empty());
    let other = TenantId::new("other-tenant").unwrap();
    assert!(store.connection_settings(&other).await.unwrap().is_empty());
    assert!(store.remove_connection_settings(&tenant(), "metrics").await.unwrap());
    assert!(!store.remove_connection_settings(&tenant(), "metrics").await.unwrap());
    assert!(store.connection_settings(&tenant()).await.unwrap().is_empty());
}

pub async fn events_are_capped_ordered_and_resumable(store: &dyn Store) {
    use fleetplane_proto::internal::FleetEvent;
    let event = |n: u64| FleetEvent {
        unix_ms: 1_000 + n,
        kind: "test".into(),
        message: format!("e{n}"),
        ..Default::default()
    };
    assert_eq!(store.latest_event_id(&tenant()).await.unwrap(), None);
    let empty = store.events_after(&tenant(), None, 10).await.unwrap();
    assert!(empty.events.is_empty() && !empty.lagged);
    assert!(store.events_after(&tenant(), Some("1-0"), 10).await.unwrap().lagged);

    store
        .append_events(&tenant(), vec![event(1), event(2)], 3)
        .await
        .unwrap();
    let first = store.events_after(&tenant(), None, 10).await.unwrap().events;
    assert_eq!(first.len(), 2);
    let oldest = first[0].id.clone();
    store
        .append_events(&tenant(), vec![event(3), event(4), event(5)], 3)
        .await
        .unwrap();
    let kept = store.events_after(&tenant(), None, 10).await.unwrap().events;
    let messages: Vec<&str> = kept.iter().map(|e| e.message.as_str()).collect();
    assert_eq!(messages, ["e3", "e4", "e5"], "the newest, in order");
    let ids: Vec<(u64, u64)> = kept.iter().map(|e| super::parse_event_id(&e.id).unwrap()).collect();
    assert!(ids.windows(2).all(|w| w[0] < w[1]), "ids increase: {ids:?}");
    assert_eq!(
        store.latest_event_id(&tenant()).await.unwrap(),
        Some(kept[2].id.clone())
    );
    // Resume after one; a trimmed position or a foreign id says "lagged".
    let rest = store.events_after(&tenant(), Some(&kept[0].id), 1).await.unwrap();
    assert_eq!(
        (rest.events.len(), rest.events[0].message.as_str(), rest.lagged),
        (1, "e4", false)
    );
    assert!(store.events_after(&tenant(), Some(&oldest), 10).await.unwrap().lagged);
    assert!(store.events_after(&tenant(), Some("garbage"), 10).await.unwrap().lagged);
    let other = TenantId::new("other-tenant").unwrap();
    assert!(store.events_after(&other, None, 10).await.unwrap().events.is_empty());
}

pub async fn package_sets_round_trip(store: &dyn Store) {
    use fleetplane_proto::internal::PackageSet;
    let s = PackageSet {
        tenant: tenant().to_string(),
        name: "collector".into(),
        selector: "a=b".into(),
        priority: 1,
        ..Default::default()
    };
    store.put_package_set(s.clone()).await.unwrap();
    assert_eq!(store.package_sets(&tenant()).await.unwrap(), vec![s]);
    let other = TenantId::new("other-tenant").unwrap();
    assert!(store.package_sets(&other).await.unwrap().is_empty());
    assert!(store.remove_package_set(&tenant(), "collector").await.unwrap());
    assert!(!store.remove_package_set(&tenant(), "collector").await.unwrap());
    assert!(store.package_sets(&tenant()).await.unwrap().is_empty());
}

pub async fn rollouts_round_trip_with_revisions(store: &dyn Store) {
    use fleetplane_proto::internal::Rollout;
    assert!(store.rollouts(&tenant()).await.unwrap().is_empty());
    let r = Rollout {
        tenant: tenant().to_string(),
        id: "r1".into(),
        created_unix_ms: 5,
        ..Default::default()
    };
    let written = store.put_rollout(r.clone()).await.unwrap();
    let stored = store.rollout(&tenant(), "r1").await.unwrap().unwrap();
    assert_eq!(stored.revision, 1);
    assert_eq!(written, stored, "the write returns the rollout as stored");
    store
        .put_rollout(Rollout {
            stage: 2,
            ..stored.clone()
        })
        .await
        .unwrap();
    assert!(matches!(store.put_rollout(stored).await, Err(StoreError::Conflict(_))));
    store
        .put_rollout(Rollout {
            id: "r0".into(),
            created_unix_ms: 1,
            ..r
        })
        .await
        .unwrap();
    let all = store.rollouts(&tenant()).await.unwrap();
    assert_eq!(all.iter().map(|r| r.id.as_str()).collect::<Vec<_>>(), vec!["r0", "r1"]);
    assert_eq!(all[1].stage, 2);
    assert!(store.rollout(&tenant(), "nope").await.unwrap().is_none());
}

pub async fn api_keys_round_trip_and_stay_in_their_tenant(store: &dyn Store) {
    use fleetplane_proto::internal::ApiKey;
    let other = TenantId::new("other".to_owned()).unwrap();
    let key = ApiKey {
        id: "00112233aabbccdd".into(),
        tenant: tenant().to_string(),
        name: "prod".into(),
        secret_sha256: vec![7; 32],
        created_unix_ms: 5,
        revoked_unix_ms: 0,
    };
    assert!(store.api_key(&key.id).await.unwrap().is_none());
    store.put_api_key(key.clone()).await.unwrap();
    store
        .put_api_key(ApiKey {
            id: "ffeeddccbbaa9988".into(),
            tenant: other.to_string(),
            ..key.clone()
        })
        .await
        .unwrap();
    assert_eq!(store.api_key(&key.id).await.unwrap(), Some(key.clone()));
    assert_eq!(store.api_keys(&tenant()).await.unwrap(), vec![key.clone()]);
    assert_eq!(store.api_keys(&other).await.unwrap().len(), 1);
    let revoked = ApiKey {
        revoked_unix_ms: 9,
        ..key.clone()
    };
    store.put_api_key(revoked.clone()).await.unwrap();
    assert_eq!(store.api_key(&key.id).await.unwrap(), Some(revoked));
}

pub async fn audit_entries_append_and_list_newest_first_per_tenant(store: &dyn Store) {
    use fleetplane_proto::internal::AuditEntry;
    let other = TenantId::new("other".to_owned()).unwrap();
    for (i, tenant) in [tenant(), tenant(), other.clone(), tenant()].iter().enumerate() {
        store
            .append_audit(AuditEntry {
                tenant: tenant.to_string(),
                unix_ms: 100,
                actor: format!("op-{i}"),
                action: "POST /api/v1/configs/a/versions".into(),
                status: 201,
                detail: String::new(),
            })
            .await
            .unwrap();
    }
    let mine = store.audit(&tenant(), 10).await.unwrap();
    let actors: Vec<&str> = mine.iter().map(|e| e.actor.as_str()).collect();
    assert_eq!(actors, vec!["op-3", "op-1", "op-0"], "newest first, own tenant only");
    assert_eq!(store.audit(&tenant(), 2).await.unwrap().len(), 2);
    assert_eq!(store.audit(&other, 10).await.unwrap()[0].actor, "op-2");
}

macro_rules! conformance_tests {
    ($make:expr) => {
        #[tokio::test]
        async fn audit_entries_append_and_list_newest_first_per_tenant() {
            let (store, _guard) = $make.await;
            crate::conformance::audit_entries_append_and_list_newest_first_per_tenant(store.as_ref()).await;
        }
        #[tokio::test]
        async fn api_keys_round_trip_and_stay_in_their_tenant() {
            let (store, _guard) = $make.await;
            crate::conformance::api_keys_round_trip_and_stay_in_their_tenant(store.as_ref()).await;
        }
        #[tokio::test]
        async fn agents_round_trip_with_revisions() {
            let (store, _guard) = $make.await;
            crate::conformance::agents_round_trip_with_revisions(store.as_ref()).await;
        }
        #[tokio::test]
        async fn stale_writes_are_refused() {
            let (store, _guard) = $make.await;
            crate::conformance::stale_writes_are_refused(store.as_ref()).await;
        }
        #[tokio::test]
        async fn batches_read_in_order_and_refuse_stale_writes_one_by_one() {
            let (store, _guard) = $make.await;
            crate::conformance::batches_read_in_order_and_refuse_stale_writes_one_by_one(store.as_ref()).await;
        }
        #[tokio::test]
        async fn racing_writers_lose_no_update() {
            let (store, _guard) = $make.await;
            crate::conformance::racing_writers_lose_no_update(store).await;
        }
        #[tokio::test]
        async fn many_agents_list_back() {
            let (store, _guard) = $make.await;
            crate::conformance::many_agents_list_back(store.as_ref()).await;
        }
        #[tokio::test]
        async fn config_versions_count_up_and_dedupe() {
            let (store, _guard) = $make.await;
            crate::conformance::config_versions_count_up_and_dedupe(store.as_ref()).await;
        }
        #[tokio::test]
        async fn concurrent_versions_get_distinct_numbers() {
            let (store, _guard) = $make.await;
            crate::conformance::concurrent_versions_get_distinct_numbers(store).await;
        }
        #[tokio::test]
        async fn rollouts_round_trip_with_revisions() {
            let (store, _guard) = $make.await;
            crate::conformance::rollouts_round_trip_with_revisions(store.as_ref()).await;
        }
        #[tokio::test]
        async fn assignments_round_trip() {
            let (store, _guard) = $make.await;
            crate::conformance::assignments_round_trip(store.as_ref()).await;
        }
        #[tokio::test]
        async fn events_are_capped_ordered_and_resumable() {
            let (store, _guard) = $make.await;
            crate::conformance::events_are_capped_ordered_and_resumable(store.as_ref()).await;
        }
        #[tokio::test]
        async fn package_sets_round_trip() {
            let (store, _guard) = $make.await;
            crate::conformance::package_sets_round_trip(store.as_ref()).await;
        }
        #[tokio::test]
        async fn connection_settings_round_trip() {
            let (store, _guard) = $make.await;
            crate::conformance::connection_settings_round_trip(store.as_ref()).await;
        }
    };
}
pub(crate) use conformance_tests;

/// Retries a store call until it stops failing (after a backend restart),
/// within a deadline.
pub async fn eventually_ok<T, F, Fut>(mut call: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, StoreError>>,
{
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(15);
    loop {
        match call().await {
            Ok(value) => return value,
            Err(e) if tokio::time::Instant::now() > deadline => panic!("store did not recover: {e}"),
            // Reconnect in progress; the deadline bounds the wait.
            Err(_) => tokio::time::sleep(std::time::Duration::from_millis(50)).await,
        }
    }
}
