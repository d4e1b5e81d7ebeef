//! Component inventories over the real protocol, in both modes: agents of
//! one build are asked for their list once, selectors pick agents by the
//! components they have, and assigning or rolling out a config that declares
//! a component some agent lacks is flagged before anything is sent.

mod common;

use fleetplane_proto::{ConfigHash, opamp::AgentCapabilities};
use fleetplane_testkit::{
    admin::Admin,
    agent::{AgentOptions, SimAgent},
};
use reqwest::Method;
use serde_json::{Value, json};

fn hash_of(version: &Value) -> ConfigHash {
    ConfigHash::parse(version["hash"].as_str().unwrap()).unwrap()
}

fn options(components: &[(&str, &[&str])]) -> AgentOptions {
    let mut options = AgentOptions::default()
        .attr("service.name", "pf")
        .with(AgentCapabilities::AcceptsRemoteConfig)
        .with(AgentCapabilities::ReportsRemoteConfig);
    for (kind, types) in components {
        options = options.components(kind, types);
    }
    options
}

async fn put(admin: &Admin, path: &str, body: Value) -> (u16, Value) {
    admin.request(Method::PUT, path, Some(body)).await.unwrap()
}

/// The scenario; `one_coordinator` when every report meets the same
/// inventory cache.
async fn preflight(admin: &Admin, ws_url: &str, one_coordinator: bool) {
    let full = SimAgent::connect_ws(ws_url, options(&[("receivers", &["otlp"]), ("exporters", &["debug"])]))
        .await
        .unwrap();
    admin
        .wait_for_agent(full.uid(), "inventory known", |a| {
            a["available_components"]["exporters"] == json!(["debug"])
        })
        .await
        .unwrap();
    let twin = SimAgent::connect_ws(ws_url, options(&[("receivers", &["otlp"]), ("exporters", &["debug"])]))
        .await
        .unwrap();
    let lacking = SimAgent::connect_ws(ws_url, options(&[("receivers", &["otlp"])]))
        .await
        .unwrap();
    let blind = SimAgent::connect_ws(ws_url, options(&[])).await.unwrap();
    for agent in [&twin, &lacking, &blind] {
        admin.wait_for_agent(agent.uid(), "listed", |_| true).await.unwrap();
    }
    // The twin announced a hash another agent had sent in full.
    let listed = admin
        .wait_for_agent(twin.uid(), "inventory known", |a| {
            a["available_components"]["exporters"] == json!(["debug"])
        })
        .await
        .unwrap();
    assert_eq!(listed["available_components"]["receivers"], json!(["otlp"]));
    if one_coordinator {
        assert_eq!(twin.seen().component_requests, 0, "known by hash: not asked");
    } else {
        assert!(twin.seen().component_requests <= 1, "asked at most by one replica");
    }
    assert_eq!(full.seen().component_requests, 1);

    // A config every agent can run is assigned as before.
    let base = admin
        .create_config("pf-base", "collector.yaml", "receivers:\n  otlp: {}\n", "text/yaml")
        .await
        .unwrap();
    // Pinned to its version, so that rollouts can move it.
    let (status, body) = put(
        admin,
        "/api/v1/assignments/pf",
        json!({"selector": "service.name=pf", "config": "pf-base", "version": 1}),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    for agent in [&full, &twin, &lacking, &blind] {
        agent.wait_for_config(&hash_of(&base)).await.unwrap();
    }

    // One that declares an exporter the lacking agent does not have is
    // refused, naming it; the assignment is unchanged.
    let debugging = admin
        .create_config(
            "pf-debug",
            "collector.yaml",
            "receivers:\n  otlp: {}\nexporters:\n  debug/verbose: {verbosity: detailed}\nservice:\n  pipelines:\n    traces: {receivers: [otlp], exporters: [debug/verbose]}\n",
            "text/yaml",
        )
        .await
        .unwrap();
    let (status, body) = put(
        admin,
        "/api/v1/assignments/pf",
        json!({"selector": "service.name=pf", "config": "pf-debug"}),
    )
    .await;
    assert_eq!(status, 409, "{body}");
    let error = body["error"].as_str().unwrap();
    assert!(
        error.contains(&lacking.uid().to_string()) && error.contains("exporters/debug"),
        "{error}"
    );
    assert!(
        !error.contains(&blind.uid().to_string()),
        "no inventory, no finding: {error}"
    );
    let (_, kept) = admin
        .request(Method::GET, "/api/v1/assignments/pf", None)
        .await
        .unwrap();
    assert_eq!(kept["config"], "pf-base", "{kept}");

    // Selectors on components: only the agents that have the exporter.
    let (status, body) = put(
        admin,
        "/api/v1/assignments/pf-debug",
        json!({"selector": "service.name=pf, component:exporters/debug", "config": "pf-debug", "priority": 5}),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    for agent in [&full, &twin] {
        agent.wait_for_config(&hash_of(&debugging)).await.unwrap();
    }
    let lacking_page = admin.agent(lacking.uid()).await.unwrap().unwrap();
    assert_eq!(lacking_page["desired_config"]["assignment"], "pf", "{lacking_page}");
    assert!(!lacking.seen().configs.contains(&hash_of(&debugging)));
    assert!(!blind.seen().configs.contains(&hash_of(&debugging)));

    // A rollout of the same config to the rest is refused too, then goes
    // ahead when the operator says so, with the findings on the rollout.
    let rollout = json!({"assignment": "pf", "config": "pf-debug", "express": true});
    let (status, body) = admin
        .request(Method::POST, "/api/v1/rollouts", Some(rollout.clone()))
        .await
        .unwrap();
    assert_eq!(status, 409, "{body}");
    assert!(body["error"].as_str().unwrap().contains("exporters/debug"), "{body}");
    let mut anyway = rollout;
    anyway["allow_missing_components"] = json!(true);
    let (status, created) = admin
        .request(Method::POST, "/api/v1/rollouts", Some(anyway))
        .await
        .unwrap();
    assert_eq!(status, 201, "{created}");
    assert_eq!(created["preflight"]["unchecked"], 1, "{created}");
    assert_eq!(created["preflight"]["checked"], 1, "{created}");
    assert_eq!(
        created["preflight"]["missing"],
        json!([{"instance_uid": lacking.uid().to_string(), "components": ["exporters/debug"]}])
    );
}

#[tokio::test]
async fn all_in_one_flags_missing_components_before_sending() {
    let server = common::Server::start().await;
    preflight(&server.admin, &server.ws_url(), true).await;
}

#[tokio::test]
async fn scaled_flags_missing_components_before_sending() {
    let fleet = common::two_by_two().await;
    let ws = fleet.ws_urls();
    preflight(&fleet.admin(1), &ws[1], false).await;
}
