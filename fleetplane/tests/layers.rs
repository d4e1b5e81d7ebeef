//! Config objects by key (layers) over the real protocol, in both modes: a
//! Supervisor-style agent gets a fleet base and a team overlay under their
//! own keys in one config map, changed one at a time; an OpenTelemetry
//! Operator bridge-style agent gets one key per Collector pool
//! (`namespace/name`), and a change to one pool leaves the other as it was.

mod common;

use fleetplane_proto::ConfigHash;
use fleetplane_testkit::{
    admin::Admin,
    agent::{AgentOptions, SimAgent},
};
use reqwest::Method;
use serde_json::json;

async fn put_layer(admin: &Admin, name: &str, selector: &str, config: &str, key: &str) -> (u16, serde_json::Value) {
    admin
        .request(
            Method::PUT,
            &format!("/api/v1/assignments/{name}"),
            Some(json!({ "selector": selector, "config": config, "key": key })),
        )
        .await
        .unwrap()
}

fn body_of(agent: &SimAgent, key: &str) -> Option<String> {
    let seen = agent.seen();
    let map = seen.applied?;
    map.config_map
        .get(key)
        .map(|f| String::from_utf8_lossy(&f.body).into_owned())
}

async fn layers_scenario(admin: &Admin, ws_url: &str) {
    let supervisor = SimAgent::connect_ws(
        ws_url,
        AgentOptions::default()
            .attr("service.name", "layered")
            .non_identifying("team", "payments"),
    )
    .await
    .unwrap();
    let bridge = SimAgent::connect_ws(ws_url, AgentOptions::default().attr("service.name", "bridge"))
        .await
        .unwrap();
    for (config, body) in [
        ("fleet-base", "exporters: {otlp: {endpoint: gateway:4317}}"),
        ("payments", "receivers: {otlp: {}}"),
        ("collector-a", "mode: deployment # a"),
        ("collector-b", "mode: daemonset # b"),
    ] {
        admin.create_config(config, "c.yaml", body, "text/yaml").await.unwrap();
    }
    // Layers: the fleet base and the team overlay, by key.
    assert_eq!(
        put_layer(admin, "base", "service.name=layered", "fleet-base", "00-base")
            .await
            .0,
        200
    );
    assert_eq!(
        put_layer(admin, "team", "team=payments", "payments", "10-team").await.0,
        200
    );
    let seen = supervisor
        .wait_for("both layers", |s| {
            s.applied
                .as_ref()
                .is_some_and(|m| m.config_map.contains_key("00-base") && m.config_map.contains_key("10-team"))
        })
        .await
        .unwrap();
    assert_eq!(seen.applied.unwrap().config_map.len(), 2, "exactly the two keys");
    // The agent's view: one hash over both keys, and which layers gave it.
    let detail = admin
        .wait_for_agent(supervisor.uid(), "the whole map APPLIED", |a| {
            a["remote_config"]["status"] == "APPLIED" && a["desired_config"]["hash"] == a["remote_config"]["hash"]
        })
        .await
        .unwrap();
    let layers = detail["desired_config"]["layers"].as_array().unwrap().clone();
    assert_eq!(layers, vec![json!("base"), json!("team")]);

    // Changing the team's layer changes that key only.
    admin
        .create_config(
            "payments",
            "c.yaml",
            "receivers: {otlp: {}, prometheus: {}}",
            "text/yaml",
        )
        .await
        .unwrap();
    supervisor
        .wait_for("the new team layer", |s| {
            s.applied
                .as_ref()
                .and_then(|m| m.config_map.get("10-team"))
                .is_some_and(|f| String::from_utf8_lossy(&f.body).contains("prometheus"))
        })
        .await
        .unwrap();
    assert_eq!(
        body_of(&supervisor, "00-base").as_deref(),
        Some("exporters: {otlp: {endpoint: gateway:4317}}")
    );

    // The bridge: one key per Collector pool.
    assert_eq!(
        put_layer(
            admin,
            "pool-a",
            "service.name=bridge",
            "collector-a",
            "observability/collector-a"
        )
        .await
        .0,
        200
    );
    assert_eq!(
        put_layer(
            admin,
            "pool-b",
            "service.name=bridge",
            "collector-b",
            "observability/collector-b"
        )
        .await
        .0,
        200
    );
    bridge
        .wait_for("both pools", |s| {
            s.applied.as_ref().is_some_and(|m| m.config_map.len() == 2)
        })
        .await
        .unwrap();
    admin
        .create_config("collector-a", "c.yaml", "mode: statefulset # a2", "text/yaml")
        .await
        .unwrap();
    bridge
        .wait_for("pool a changed", |s| {
            s.applied
                .as_ref()
                .and_then(|m| m.config_map.get("observability/collector-a"))
                .is_some_and(|f| f.body.ends_with(b"a2"))
        })
        .await
        .unwrap();
    assert_eq!(
        body_of(&bridge, "observability/collector-b").as_deref(),
        Some("mode: daemonset # b"),
        "the other pool untouched"
    );

    // Drift, pool by pool: the bridge reports what it applied.
    admin
        .wait_for_agent(bridge.uid(), "both pools in sync", |a| {
            a["config_keys"] == json!({"observability/collector-a": "in_sync", "observability/collector-b": "in_sync"})
        })
        .await
        .unwrap();
    // A bridge that runs pool a as desired (reformatted), pool b otherwise,
    // and reports the Collector's `raw` view with a literal secret: the view
    // is neither compared, nor shown, nor kept.
    let mut drifting = common::RawAgent::connect(ws_url, fleetplane_proto::InstanceUid::new_v7()).await;
    let mut hello = drifting.hello("bridge");
    let file = |body: &str| fleetplane_proto::opamp::AgentConfigFile {
        body: body.as_bytes().to_vec(),
        content_type: "text/yaml".into(),
        role: String::new(),
    };
    hello.effective_config = Some(fleetplane_proto::opamp::EffectiveConfig {
        config_map: Some(fleetplane_proto::opamp::AgentConfigMap {
            config_map: [
                ("observability/collector-a".to_owned(), file("mode:   statefulset")),
                ("observability/collector-b".to_owned(), file("mode: deployment")),
                ("raw".to_owned(), file("token: hunter2-literal")),
            ]
            .into(),
        }),
    });
    drifting.send(&hello).await;
    let page = admin
        .wait_for_agent(drifting.uid, "drift computed", |a| {
            a["config_keys"].as_object().is_some_and(|k| !k.is_empty())
        })
        .await
        .unwrap();
    assert_eq!(page["config_keys"]["observability/collector-a"], "in_sync", "{page}");
    assert_eq!(page["config_keys"]["observability/collector-b"], "differs", "{page}");
    assert!(page["config_keys"].get("raw").is_none(), "{page}");
    assert_eq!(page["redacted_views"], json!(["raw"]));
    assert!(page["effective_config"].get("raw").is_none(), "{page}");
    assert!(
        !page.to_string().contains("hunter2"),
        "the secret is never shown: {page}"
    );

    // Refused: a layer from a config of several files, a bad key, a rollout
    // of a layer, and a rollout to agents that also get layers.
    let files = json!({ "files": {
        "a.yaml": { "body": "a", "content_type": "text/yaml" },
        "b.yaml": { "body": "b", "content_type": "text/yaml" }
    }});
    admin
        .request(Method::POST, "/api/v1/configs/two-files/versions", Some(files))
        .await
        .unwrap();
    let (status, body) = put_layer(admin, "two", "service.name=bridge", "two-files", "k").await;
    assert_eq!(status, 400, "{body}");
    let (status, body) = put_layer(admin, "bad-key", "service.name=bridge", "collector-a", "a b").await;
    assert_eq!(status, 400, "{body}");
    let (status, body) = admin
        .request(
            Method::POST,
            "/api/v1/rollouts",
            Some(json!({ "assignment": "pool-a", "config": "collector-a" })),
        )
        .await
        .unwrap();
    assert_eq!(status, 400, "{body}");
    admin
        .request(
            Method::PUT,
            "/api/v1/assignments/whole",
            Some(json!({ "selector": "service.name=layered", "config": "fleet-base", "version": 1 })),
        )
        .await
        .unwrap();
    let (status, body) = admin
        .request(
            Method::POST,
            "/api/v1/rollouts",
            Some(json!({ "assignment": "whole", "config": "fleet-base" })),
        )
        .await
        .unwrap();
    assert_eq!(status, 409, "{body}");
    assert!(body["error"].as_str().unwrap().contains("layers"), "{body}");
    // With a whole-config assignment too, its files sit next to the layers.
    let with_base = supervisor
        .wait_for("the base config's file next to the layers", |s| {
            s.applied
                .as_ref()
                .is_some_and(|m| m.config_map.len() == 3 && m.config_map.contains_key("c.yaml"))
        })
        .await
        .unwrap();
    let hash = with_base.configs.last().unwrap();
    assert_ne!(*hash, ConfigHash::parse(&"0".repeat(64)).unwrap());
}

#[tokio::test]
async fn all_in_one_delivers_layers_by_key() {
    let server = common::Server::start().await;
    layers_scenario(&server.admin, &server.ws_url()).await;
}

#[tokio::test]
async fn scaled_delivers_layers_by_key() {
    let fleet = common::scaled(1, 2).await;
    layers_scenario(&fleet.admin(1), &fleet.ws_urls()[0]).await;
}
