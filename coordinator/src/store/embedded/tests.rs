use super::*;

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
async fn writes_from_a_stale_read_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let store = EmbeddedStore::open(dir.path()).unwrap();
    let uid = InstanceUid::new_v7();
    store.put_agent(record(uid, 1)).await.unwrap();
    let first = store.agent(&tenant(), &uid).await.unwrap().unwrap();
    let second = first.clone();
    assert_eq!(first.revision, 1);
    store.put_agent(AgentRecord { sequence_num: 2, ..first }).await.unwrap();
    let err = store.put_agent(AgentRecord { sequence_num: 3, ..second }).await.unwrap_err();
    assert!(matches!(err, StoreError::Conflict(_)), "{err}");
    assert_eq!(store.agent(&tenant(), &uid).await.unwrap().unwrap().sequence_num, 2);
    // A second "new" agent with the same uid is a conflict too.
    assert!(matches!(store.put_agent(record(uid, 9)).await, Err(StoreError::Conflict(_))));
}

#[tokio::test]
async fn a_second_open_of_the_same_directory_fails_clearly() {
    let dir = tempfile::tempdir().unwrap();
    let _first = EmbeddedStore::open(dir.path()).unwrap();
    let err = EmbeddedStore::open(dir.path()).unwrap_err();
    assert!(err.to_string().contains("cannot open"), "{err}");
}

#[tokio::test]
async fn config_versions_count_up_and_dedupe_by_hash() {
    let dir = tempfile::tempdir().unwrap();
    let store = EmbeddedStore::open(dir.path()).unwrap();
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
        Some(v2.version.clone())
    );
    assert_eq!(
        store.config_version(&tenant(), "base", 1).await.unwrap(),
        Some(v1.version.clone())
    );
    let hash = ConfigHash::from_slice(&v1.version.hash).unwrap();
    assert_eq!(store.config_by_hash(&tenant(), &hash).await.unwrap(), Some(v1.version));
    assert_eq!(store.config_names(&tenant()).await.unwrap(), vec!["base".to_owned()]);
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

#[tokio::test]
async fn tenants_do_not_see_each_other() {
    let dir = tempfile::tempdir().unwrap();
    let store = EmbeddedStore::open(dir.path()).unwrap();
    let other = TenantId::new("other").unwrap();
    store.put_agent(record(InstanceUid::new_v7(), 1)).await.unwrap();
    assert!(store.agents(&other).await.unwrap().is_empty());
    store
        .create_config_version(&other, "base", files("x"), 1)
        .await
        .unwrap();
    assert!(store.config_names(&tenant()).await.unwrap().is_empty());
}
