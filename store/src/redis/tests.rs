use std::sync::Arc;

use super::*;
use crate::conformance::{conformance_tests, record};
use fleetplane_testkit::services::{RedisCluster, RedisServer};

async fn store() -> (Arc<dyn Store>, RedisServer) {
    let server = RedisServer::start().unwrap();
    let store = RedisStore::connect(&server.url(), "fptest").await.unwrap();
    (Arc::new(store), server)
}

conformance_tests!(store());

/// The same suite on a three-primary Redis Cluster: every script and
/// pipeline stays within one slot, or the cluster refuses it (CROSSSLOT).
mod cluster {
    use super::*;

    async fn store() -> (Arc<dyn Store>, RedisCluster) {
        let cluster = RedisCluster::start(3).unwrap();
        let store = RedisStore::connect(&cluster.url(), "fptest").await.unwrap();
        assert!(store.is_cluster());
        (Arc::new(store), cluster)
    }

    conformance_tests!(store());
}

#[tokio::test]
async fn a_prefix_with_hash_tag_braces_is_refused() {
    let server = RedisServer::start().unwrap();
    let err = RedisStore::connect(&server.url(), "fp{x}").await.unwrap_err();
    assert!(matches!(err, StoreError::Config(_)), "{err}");
}

#[tokio::test]
async fn prefixes_keep_deployments_apart() {
    let server = RedisServer::start().unwrap();
    let a = RedisStore::connect(&server.url(), "a").await.unwrap();
    let b = RedisStore::connect(&server.url(), "b").await.unwrap();
    let uid = InstanceUid::new_v7();
    a.put_agent(record(uid, 1)).await.unwrap();
    assert!(b.agent(&TenantId::default_tenant(), &uid).await.unwrap().is_none());
    assert!(b.tenants().await.unwrap().is_empty());
}

#[tokio::test]
async fn an_outage_is_a_backend_error_and_data_survives_a_restart() {
    let mut server = RedisServer::start().unwrap();
    let store = RedisStore::connect(&server.url(), "fp").await.unwrap();
    let uid = InstanceUid::new_v7();
    store.put_agent(record(uid, 1)).await.unwrap();
    store
        .create_config_version(&TenantId::default_tenant(), "c", crate::conformance::files("x"), 1)
        .await
        .unwrap();

    server.kill();
    let err = store.agent(&TenantId::default_tenant(), &uid).await.unwrap_err();
    assert!(matches!(err, StoreError::Backend(_)), "{err}");

    server.restart().unwrap();
    // The connection comes back by itself; appendonly kept the data.
    let tenant = TenantId::default_tenant();
    let found = crate::conformance::eventually_ok(|| store.agent(&tenant, &uid)).await;
    assert_eq!(found.unwrap().sequence_num, 1);
    assert!(
        store
            .config_version(&TenantId::default_tenant(), "c", 0)
            .await
            .unwrap()
            .is_some()
    );
}
