use std::sync::Arc;

use super::*;
use crate::conformance::conformance_tests;

async fn store() -> (Arc<dyn Store>, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let store = EmbeddedStore::open(dir.path()).unwrap();
    (Arc::new(store), dir)
}

conformance_tests!(store());

fn tenant() -> TenantId {
    TenantId::default_tenant()
}

fn record(uid: InstanceUid, seq: u64) -> AgentRecord {
    AgentRecord {
        tenant: tenant().to_string(),
        instance_uid: uid.to_vec(),
        sequence_num: seq,
        connected: true,
        ..Default::default()
    }
}

fn files(body: &str) -> BTreeMap<String, ConfigFile> {
    BTreeMap::from([(
        "collector.yaml".to_owned(),
        ConfigFile {
            body: body.as_bytes().to_vec(),
            content_type: "text/yaml".into(),
        },
    )])
}

#[tokio::test]
async fn records_survive_a_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let uid = InstanceUid::new_v7();
    {
        let store = EmbeddedStore::open(dir.path()).unwrap();
        store.put_agent(record(uid, 3)).await.unwrap();
        store
            .create_config_version(&tenant(), "base", files("a"), 1)
            .await
            .unwrap();
        store
            .put_assignment(Assignment {
                tenant: tenant().to_string(),
                name: "all".into(),
                config_name: "base".into(),
                ..Default::default()
            })
            .await
            .unwrap();
    }
    let store = EmbeddedStore::open(dir.path()).unwrap();
    let mut expected = record(uid, 3);
    expected.revision = 1;
    assert_eq!(store.agent(&tenant(), &uid).await.unwrap(), Some(expected));
    assert_eq!(
        store
            .config_version(&tenant(), "base", 0)
            .await
            .unwrap()
            .unwrap()
            .version,
        1
    );
    assert_eq!(store.assignments(&tenant()).await.unwrap().len(), 1);
}

#[tokio::test]
async fn a_second_open_of_the_same_directory_fails_clearly() {
    let dir = tempfile::tempdir().unwrap();
    let _first = EmbeddedStore::open(dir.path()).unwrap();
    let err = EmbeddedStore::open(dir.path()).unwrap_err();
    assert!(err.to_string().contains("cannot open"), "{err}");
}

#[tokio::test]
async fn concurrent_agent_writes_are_all_durable() {
    let dir = tempfile::tempdir().unwrap();
    let uids: Vec<InstanceUid> = (0..500).map(|_| InstanceUid::new_v7()).collect();
    {
        let store = std::sync::Arc::new(EmbeddedStore::open(dir.path()).unwrap());
        let mut tasks = tokio::task::JoinSet::new();
        for uid in uids.clone() {
            let store = store.clone();
            tasks.spawn(async move { store.put_agent(record(uid, 1)).await });
        }
        while let Some(result) = tasks.join_next().await {
            result.unwrap().unwrap();
        }
        store.remove_agent(&tenant(), &uids[0]).await.unwrap();
    }
    let store = EmbeddedStore::open(dir.path()).unwrap();
    assert_eq!(store.agents(&tenant()).await.unwrap().len(), uids.len() - 1);
    assert_eq!(store.agent(&tenant(), &uids[0]).await.unwrap(), None);
}
