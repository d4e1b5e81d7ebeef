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

    // Refused: a layer from a config of several files, and a bad key.
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
    admin
        .request(
            Method::PUT,
            "/api/v1/assignments/whole",
            Some(json!({ "selector": "service.name=layered", "config": "fleet-base", "version": 1 })),
        )
        .await
        .unwrap();
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

/// A pinned layer at `version`.
async fn put_pinned_layer(admin: &Admin, name: &str, selector: &str, config: &str, key: &str, version: u32) {
    let (status, body) = admin
        .request(
            Method::PUT,
            &format!("/api/v1/assignments/{name}"),
            Some(json!({ "selector": selector, "config": config, "key": key, "version": version })),
        )
        .await
        .unwrap();
    assert_eq!(status, 200, "{body}");
}

/// The Operator bridge's two Collector pools, each its own layer: a staged
/// rollout of pool A's config moves only the key `obs/collector-a` of the
/// bridge's map. A version the bridge rejects is rolled back to the exact map
/// it ran (pool B's object the same in every map it was sent); a good one
/// completes and is promoted, pool B's layer untouched throughout. A whole-
/// config rollout to an agent that also gets layers follows its base part.
async fn layer_rollout_scenario(admin: &Admin, ws_url: &str) {
    let mut options = AgentOptions::default().attr("service.name", "bridge-ro");
    options.reject_containing = Some("BAD".into());
    let bridge = SimAgent::connect_ws(ws_url, options).await.unwrap();
    let a1 = admin
        .create_config("ro-pool-a", "c.yaml", "mode: deployment # a1", "text/yaml")
        .await
        .unwrap();
    admin
        .create_config("ro-pool-b", "c.yaml", "mode: daemonset # b1", "text/yaml")
        .await
        .unwrap();
    put_pinned_layer(
        admin,
        "ro-a",
        "service.name=bridge-ro",
        "ro-pool-a",
        "obs/collector-a",
        1,
    )
    .await;
    put_pinned_layer(
        admin,
        "ro-b",
        "service.name=bridge-ro",
        "ro-pool-b",
        "obs/collector-b",
        1,
    )
    .await;
    let both = bridge
        .wait_for("both pools", |s| {
            s.applied.as_ref().is_some_and(|m| m.config_map.len() == 2)
        })
        .await
        .unwrap();
    let before = *both.configs.last().unwrap();
    assert_eq!(
        body_of(&bridge, "obs/collector-a").as_deref(),
        Some("mode: deployment # a1")
    );
    admin
        .wait_for_agent(bridge.uid(), "the pools' map APPLIED", |a| {
            a["remote_config"]["hash"] == before.to_string().as_str() && a["remote_config"]["status"] == "APPLIED"
        })
        .await
        .unwrap();

    // Pool A v2 is rejected by the bridge: rolled back, pool B untouched.
    admin
        .create_config("ro-pool-a", "c.yaml", "mode: deployment # a2 BAD", "text/yaml")
        .await
        .unwrap();
    let rolled_back = admin
        .roll_out(
            json!({ "assignment": "ro-a", "config": "ro-pool-a", "version": 2, "express": true }),
            "ROLLED_BACK",
        )
        .await
        .unwrap();
    assert_eq!(rolled_back["key"], "obs/collector-a", "{rolled_back}");
    let agent_entry = &rolled_back["agents"][0];
    assert!(
        agent_entry["reason"].as_str().unwrap_or_default().contains("FAILED"),
        "{rolled_back}"
    );
    assert_eq!(
        agent_entry["previous_hash"], a1["hash"],
        "the layer's own version: {rolled_back}"
    );
    let back = bridge
        .wait_for("the map it ran before", |s| {
            s.configs.len() >= 3 && s.configs.last() == Some(&before)
        })
        .await
        .unwrap();
    // Offered from the pools' map on (a repeated offer aside): the map with
    // pool A's v2 and pool B's object as it was (rejected), then the pools'
    // map again.
    let mut bad_map = both.applied.clone().unwrap();
    bad_map.config_map.get_mut("obs/collector-a").unwrap().body = b"mode: deployment # a2 BAD".to_vec();
    let bad = ConfigHash::of_config(&bad_map);
    let from = back.configs.iter().position(|h| *h == before).unwrap();
    let mut offered = back.configs[from..].to_vec();
    offered.dedup();
    assert_eq!(offered, vec![before, bad, before], "{:?}", back.configs);
    assert_eq!(
        body_of(&bridge, "obs/collector-a").as_deref(),
        Some("mode: deployment # a1")
    );
    assert_eq!(
        body_of(&bridge, "obs/collector-b").as_deref(),
        Some("mode: daemonset # b1")
    );

    // Pool A v3 is good: completed, promoted, pool B still at v1.
    admin
        .create_config("ro-pool-a", "c.yaml", "mode: deployment # a3", "text/yaml")
        .await
        .unwrap();
    admin
        .roll_out(
            json!({ "assignment": "ro-a", "config": "ro-pool-a", "version": 3, "express": true }),
            "COMPLETED",
        )
        .await
        .unwrap();
    bridge
        .wait_for("pool A v3", |s| {
            s.applied.as_ref().is_some_and(|m| {
                m.config_map
                    .get("obs/collector-a")
                    .is_some_and(|f| f.body == b"mode: deployment # a3")
            })
        })
        .await
        .unwrap();
    assert_eq!(
        body_of(&bridge, "obs/collector-b").as_deref(),
        Some("mode: daemonset # b1")
    );
    let assignments = admin.request(Method::GET, "/api/v1/assignments", None).await.unwrap().1;
    let version_of = |name: &str| {
        assignments
            .as_array()
            .and_then(|all| all.iter().find(|a| a["name"] == name))
            .map(|a| a["version"].clone())
    };
    assert_eq!(version_of("ro-a"), Some(json!(3)), "{assignments}");
    assert_eq!(version_of("ro-b"), Some(json!(1)), "{assignments}");

    // A whole-config rollout to an agent that also gets a layer follows the
    // whole config's part of its map.
    let supervisor = SimAgent::connect_ws(ws_url, AgentOptions::default().attr("service.name", "sup-ro"))
        .await
        .unwrap();
    let w1 = admin
        .create_config("ro-whole", "collector.yaml", "receivers: {otlp: {}} # w1", "text/yaml")
        .await
        .unwrap();
    admin
        .request(
            Method::PUT,
            "/api/v1/assignments/ro-whole",
            Some(json!({ "selector": "service.name=sup-ro", "config": "ro-whole", "version": 1 })),
        )
        .await
        .unwrap();
    put_pinned_layer(admin, "ro-overlay", "service.name=sup-ro", "ro-pool-b", "10-overlay", 1).await;
    supervisor
        .wait_for("base and overlay", |s| {
            s.applied.as_ref().is_some_and(|m| m.config_map.len() == 2)
        })
        .await
        .unwrap();
    admin
        .create_config("ro-whole", "collector.yaml", "receivers: {otlp: {}} # w2", "text/yaml")
        .await
        .unwrap();
    let completed = admin
        .roll_out(
            json!({ "assignment": "ro-whole", "config": "ro-whole", "version": 2, "express": true }),
            "COMPLETED",
        )
        .await
        .unwrap();
    assert_eq!(completed["agents"][0]["previous_hash"], w1["hash"], "{completed}");
    let map = supervisor.seen().applied.unwrap();
    assert_eq!(map.config_map["collector.yaml"].body, b"receivers: {otlp: {}} # w2");
    assert_eq!(map.config_map["10-overlay"].body, b"mode: daemonset # b1");
}

#[tokio::test]
async fn all_in_one_rolls_out_one_layer_and_back() {
    let server = common::Server::start().await;
    layer_rollout_scenario(&server.admin, &server.ws_url()).await;
}

#[tokio::test]
async fn scaled_rolls_out_one_layer_and_back() {
    let fleet = common::scaled(1, 2).await;
    layer_rollout_scenario(&fleet.admin(1), &fleet.ws_urls()[0]).await;
}
