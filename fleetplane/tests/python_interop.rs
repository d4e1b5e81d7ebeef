//! Interop with a client we did not write: the official OpenTelemetry Python
//! OpAMP client (`opentelemetry-opamp-client`, plain HTTP), installed from the
//! Python package index into a throwaway virtual environment.

mod common;

use common::Server;
use fleetplane_proto::InstanceUid;
use fleetplane_testkit::python::PythonEnv;
use serde_json::Value;

async fn agent_where(server: &Server, uid: InstanceUid, what: &str, check: impl Fn(&Value) -> bool) -> Value {
    server.admin.wait_for_agent(uid, what, check).await.unwrap()
}

fn uid_of(event: &Value) -> InstanceUid {
    InstanceUid::parse(event["instance_uid"].as_str().unwrap()).unwrap()
}

#[tokio::test]
async fn the_official_python_client_is_listed_configured_and_its_status_recorded() {
    let server = Server::start().await;
    let python = PythonEnv::create().await.unwrap();

    let accepting = python
        .spawn_agent(
            &server.http_url(),
            &[
                "--attr",
                "service.name=py-collector",
                "--non-id-attr",
                "host.name=ci-runner",
            ],
        )
        .unwrap();
    let rejecting = python
        .spawn_agent(
            &server.http_url(),
            &["--attr", "service.name=py-strict", "--reject-config"],
        )
        .unwrap();
    let accepting_uid = uid_of(&accepting.wait_for("start", |e| e["event"] == "started").await.unwrap());
    let rejecting_uid = uid_of(&rejecting.wait_for("start", |e| e["event"] == "started").await.unwrap());

    // The server lists the agent with the description the client sent.
    let listed = agent_where(&server, accepting_uid, "python agent listed", |_| true).await;
    assert_eq!(listed["identifying_attributes"]["service.name"], "py-collector");
    assert_eq!(listed["non_identifying_attributes"]["host.name"], "ci-runner");
    assert_eq!(listed["transport"], "http");
    assert_eq!(listed["connected"], true);
    assert!(
        listed["capability_names"]
            .as_array()
            .unwrap()
            .iter()
            .any(|c| c == "AcceptsRemoteConfig")
    );

    // A config assigned through the admin API reaches the client...
    let version = server
        .admin
        .create_config("py", "config.json", "{\"sampling\": 0.25}", "application/json")
        .await
        .unwrap();
    let hash = version["hash"].as_str().unwrap().to_owned();
    server
        .admin
        .assign("python", "service.name=py-collector", "py")
        .await
        .unwrap();
    server
        .admin
        .assign("python-strict", "service.name=py-strict", "py")
        .await
        .unwrap();
    let received = accepting
        .wait_for("config", |e| e["event"] == "config" && e["hash"] == hash.as_str())
        .await
        .unwrap();
    assert_eq!(received["files"]["config.json"], "{\"sampling\": 0.25}");

    // ...and the status the client reports is recorded, error text included.
    let applied = agent_where(&server, accepting_uid, "APPLIED from python", |a| {
        a["remote_config"]["status"] == "APPLIED"
    })
    .await;
    assert_eq!(applied["remote_config"]["hash"], hash.as_str());
    let failed = agent_where(&server, rejecting_uid, "FAILED from python", |a| {
        a["remote_config"]["status"] == "FAILED"
    })
    .await;
    assert_eq!(failed["remote_config"]["error_message"], "rejected by test");

    let groups = server.admin.config_status().await.unwrap();
    let group = groups.iter().find(|g| g["hash"] == hash.as_str()).unwrap();
    assert_eq!(group["statuses"]["APPLIED"], 1);
    assert_eq!(group["statuses"]["FAILED"], 1);

    // The client says goodbye on stop; the server marks it offline.
    accepting.stop().await.unwrap();
    rejecting.stop().await.unwrap();
    agent_where(&server, accepting_uid, "python agent offline", |a| {
        a["connected"] == false
    })
    .await;
    server.stop().await;
}

/// The official client with an API key in its headers lands in the key's
/// tenant and gets that tenant's config; without the key it gets nowhere.
#[tokio::test]
async fn the_official_python_client_authenticates_with_an_api_key() {
    let server = Server::start_with(tempfile::tempdir().unwrap(), |c| {
        c.agents.auth = fleetplane::config::AgentAuth::ApiKey;
    })
    .await;
    let acme = server.admin.clone().for_tenant("acme");
    let (key, _) = acme.create_key("python agents").await.unwrap();
    let python = PythonEnv::create().await.unwrap();
    let header = format!("Authorization=Bearer {key}");
    let keyed = python
        .spawn_agent(
            &server.http_url(),
            &["--attr", "service.name=py-keyed", "--header", &header],
        )
        .unwrap();
    let keyless = python
        .spawn_agent(&server.http_url(), &["--attr", "service.name=py-keyless"])
        .unwrap();
    let uid = uid_of(&keyed.wait_for("start", |e| e["event"] == "started").await.unwrap());
    keyless.wait_for("start", |e| e["event"] == "started").await.unwrap();
    let version = acme
        .create_config("py", "config.json", "{\"tenant\": \"acme\"}", "application/json")
        .await
        .unwrap();
    acme.assign("python", "", "py").await.unwrap();
    let hash = version["hash"].as_str().unwrap().to_owned();
    keyed
        .wait_for("config", |e| e["event"] == "config" && e["hash"] == hash.as_str())
        .await
        .unwrap();
    let listed = acme
        .wait_for_agent(uid, "APPLIED in acme", |a| a["remote_config"]["status"] == "APPLIED")
        .await
        .unwrap();
    assert_eq!(listed["identifying_attributes"]["service.name"], "py-keyed");
    let everyone = acme.agents("").await.unwrap();
    assert_eq!(everyone.len(), 1, "the keyless client never got in: {everyone:?}");
    assert!(server.admin.agents("").await.unwrap().is_empty());
    keyed.stop().await.unwrap();
    keyless.stop().await.unwrap();
    server.stop().await;
}

/// The official client advertises remote config only (its 0.5b0 release
/// surfaces nothing else to the agent: no connection settings, packages,
/// commands or custom messages). Against a server where all of those are
/// configured for it: layers arrive as one multi-file map and a layer's
/// rollout completes with its status recorded; connection settings and
/// packages are never offered to it; a restart and a custom message are
/// refused with 409 and nothing is sent.
#[tokio::test]
async fn the_official_python_client_gets_layers_and_nothing_it_does_not_advertise() {
    use reqwest::Method;
    use serde_json::json;
    let server = Server::start().await;
    let python = PythonEnv::create().await.unwrap();
    let agent = python
        .spawn_agent(&server.http_url(), &["--attr", "service.name=py-layers"])
        .unwrap();
    let uid = uid_of(&agent.wait_for("start", |e| e["event"] == "started").await.unwrap());
    agent_where(&server, uid, "listed", |_| true).await;
    let admin = &server.admin;

    let (status, body) = admin
        .request(
            Method::PUT,
            "/api/v1/connection-settings/py",
            Some(json!({ "selector": "service.name=py-layers",
                         "own_metrics": { "endpoint": "https://otlp.example.com/v1/metrics" } })),
        )
        .await
        .unwrap();
    assert_eq!(status, 200, "{body}");
    let (status, body) = admin
        .request(
            Method::PUT,
            "/api/v1/packages/py",
            Some(json!({ "selector": "service.name=py-layers", "packages": { "": {
                "version": "v1", "download_url": "https://downloads.example.com/a.tar.gz",
                "content_hash": "9f2c4e1a7b3d5f60812a4c6e8b0d2f4a6c8e0b2d4f6a8c0e2b4d6f8a0c2e4b6d" } } })),
        )
        .await
        .unwrap();
    assert_eq!(status, 200, "{body}");

    admin
        .create_config("py-base", "b", "base: 1", "text/yaml")
        .await
        .unwrap();
    admin
        .create_config("py-team", "t", "team: 1", "text/yaml")
        .await
        .unwrap();
    for (name, config, key) in [("py-base", "py-base", "00-base"), ("py-team", "py-team", "10-team")] {
        let (status, body) = admin
            .request(
                Method::PUT,
                &format!("/api/v1/assignments/{name}"),
                Some(json!({ "selector": "service.name=py-layers", "config": config, "key": key, "version": 1 })),
            )
            .await
            .unwrap();
        assert_eq!(status, 200, "{body}");
    }
    let both = agent
        .wait_for("both layers", |e| {
            e["event"] == "config" && e["files"].as_object().is_some_and(|f| f.len() == 2)
        })
        .await
        .unwrap();
    assert_eq!(both["files"]["00-base"], "base: 1");
    assert_eq!(both["files"]["10-team"], "team: 1");
    let map_hash = both["hash"].as_str().unwrap().to_owned();
    agent_where(&server, uid, "the map APPLIED", |a| {
        a["remote_config"]["hash"] == map_hash.as_str() && a["remote_config"]["status"] == "APPLIED"
    })
    .await;

    // One layer rolled out: the client's next map changes that key only.
    admin
        .create_config("py-team", "t", "team: 2", "text/yaml")
        .await
        .unwrap();
    admin
        .roll_out(
            json!({ "assignment": "py-team", "config": "py-team", "version": 2, "express": true }),
            "COMPLETED",
        )
        .await
        .unwrap();
    let moved = agent
        .wait_for("team v2", |e| {
            e["event"] == "config" && e["files"]["10-team"] == "team: 2"
        })
        .await
        .unwrap();
    assert_eq!(moved["files"]["00-base"], "base: 1");

    // Refused, nothing stored or sent: what the client does not advertise.
    let (status, body) = admin
        .request(Method::POST, &format!("/api/v1/agents/{uid}/restart"), None)
        .await
        .unwrap();
    assert_eq!(status, 409, "{body}");
    let (status, body) = admin
        .request(
            Method::POST,
            &format!("/api/v1/agents/{uid}/custom-messages"),
            Some(json!({ "capability": "io.example.echo", "type": "ping", "text": "hi" })),
        )
        .await
        .unwrap();
    assert_eq!(status, 409, "{body}");
    let page = agent_where(&server, uid, "the page", |_| true).await;
    assert_eq!(page["packages"], json!({}), "never offered packages: {page}");
    assert!(page["connection_settings"].is_null(), "never offered settings: {page}");
    assert!(page["pending_restart_since_unix_ms"].is_null(), "{page}");
    assert!(page["pending_custom_message"].is_null(), "{page}");
    agent.stop().await.unwrap();
    server.stop().await;
}
