//! The all-in-one control plane with the project's simulated agents, over
//! WebSocket and HTTP: inventory, configs, assignments, statuses, identity,
//! liveness and persistence.

mod common;

use std::time::Duration;

use common::Server;
use fleetplane_proto::{
    ConfigHash, InstanceUid,
    opamp::{AgentCapabilities, AgentToServer},
};
use fleetplane_testkit::agent::{AgentOptions, SimAgent};
use serde_json::Value;

fn hash_of(version: &Value) -> ConfigHash {
    ConfigHash::parse(version["hash"].as_str().unwrap()).unwrap()
}

async fn agent_json(server: &Server, uid: InstanceUid, what: &str, check: impl Fn(&Value) -> bool) -> Value {
    server.admin.wait_for_agent(uid, what, check).await.unwrap()
}

#[tokio::test]
async fn websocket_agent_is_listed_and_receives_its_assigned_config() {
    let server = Server::start().await;
    let agent = SimAgent::connect_ws(
        &server.ws_url(),
        AgentOptions::default()
            .attr("service.name", "checkout")
            .non_identifying("host.arch", "arm64"),
    )
    .await
    .unwrap();
    let uid = agent.uid();

    let listed = agent_json(&server, uid, "agent listed", |_| true).await;
    assert_eq!(listed["identifying_attributes"]["service.name"], "checkout");
    assert_eq!(listed["non_identifying_attributes"]["host.arch"], "arm64");
    assert_eq!(listed["connected"], true);
    assert_eq!(listed["transport"], "websocket");
    assert_eq!(listed["healthy"], true);
    assert!(
        listed["capability_names"]
            .as_array()
            .unwrap()
            .iter()
            .any(|c| c == "AcceptsRemoteConfig")
    );

    // First reply advertises the server's capabilities, AcceptsStatus included.
    let seen = agent.wait_for("first reply", |s| s.replies > 0).await.unwrap();
    assert_eq!(seen.server_capabilities & 1, 1);

    let version = server
        .admin
        .create_config("collector", "collector.yaml", "receivers: {otlp: {}}\n", "text/yaml")
        .await
        .unwrap();
    assert_eq!(version["version"], 1);
    assert_eq!(version["created"], true);
    let hash = hash_of(&version);
    server
        .admin
        .assign("checkout-arm", "service.name=checkout,host.arch=arm64", "collector")
        .await
        .unwrap();

    // Pushed over the open WebSocket, without waiting for a heartbeat.
    let seen = agent.wait_for_config(&hash).await.unwrap();
    let applied = seen.applied.unwrap();
    assert_eq!(applied.config_map["collector.yaml"].body, b"receivers: {otlp: {}}\n");

    let detail = agent_json(&server, uid, "status APPLIED", |a| {
        a["remote_config"]["status"] == "APPLIED"
    })
    .await;
    assert_eq!(detail["remote_config"]["hash"], hash.to_string());
    assert_eq!(detail["desired_config"]["config"], "collector");
    assert_eq!(detail["desired_config"]["assignment"], "checkout-arm");
    assert_eq!(
        detail["effective_config"]["collector.yaml"]["body"],
        "receivers: {otlp: {}}\n"
    );

    let groups = server.admin.config_status().await.unwrap();
    let group = groups.iter().find(|g| g["hash"] == hash.to_string()).unwrap();
    assert_eq!(group["config"], "collector");
    assert_eq!(group["statuses"]["APPLIED"], 1);
    assert_eq!(group["agents"][0]["instance_uid"], uid.to_string());

    let filtered = server
        .admin
        .agents(&format!("config_hash={hash}&status=APPLIED"))
        .await
        .unwrap();
    assert_eq!(filtered.len(), 1);

    agent.disconnect().await.unwrap();
    server.stop().await;
}

#[tokio::test]
async fn http_agent_collects_its_config_on_the_next_poll() {
    let server = Server::start().await;
    let version = server
        .admin
        .create_config("base", "", "{\"exporters\":[]}", "application/json")
        .await
        .unwrap();
    server.admin.assign("everyone", "", "base").await.unwrap();
    let agent = SimAgent::connect_http(
        &server.http_url(),
        AgentOptions {
            gzip: true,
            ..AgentOptions::default().attr("service.name", "lambda")
        },
    )
    .await
    .unwrap();
    agent.wait_for_config(&hash_of(&version)).await.unwrap();
    let detail = agent_json(&server, agent.uid(), "http agent APPLIED", |a| {
        a["remote_config"]["status"] == "APPLIED"
    })
    .await;
    assert_eq!(detail["transport"], "http");

    // A new version reaches the polling agent too.
    let v2 = server
        .admin
        .create_config("base", "", "{\"exporters\":[\"otlp\"]}", "application/json")
        .await
        .unwrap();
    assert_eq!(v2["version"], 2);
    agent.wait_for_config(&hash_of(&v2)).await.unwrap();

    agent.disconnect().await.unwrap();
    agent_json(&server, detail_uid(&detail), "http agent offline after goodbye", |a| {
        a["connected"] == false
    })
    .await;
    server.stop().await;
}

fn detail_uid(detail: &Value) -> InstanceUid {
    InstanceUid::parse(detail["instance_uid"].as_str().unwrap()).unwrap()
}

#[tokio::test]
async fn a_rejected_config_is_recorded_failed_with_the_agents_error_and_not_resent() {
    let server = Server::start().await;
    let agent = SimAgent::connect_ws(
        &server.ws_url(),
        AgentOptions::default()
            .attr("service.name", "cart")
            .reject_configs("unknown exporter \"otlpx\""),
    )
    .await
    .unwrap();
    let version = server
        .admin
        .create_config("broken", "c.yaml", "exporters: {otlpx: {}}", "text/yaml")
        .await
        .unwrap();
    server
        .admin
        .assign("cart", "service.name=cart", "broken")
        .await
        .unwrap();
    agent.wait_for_config(&hash_of(&version)).await.unwrap();
    let detail = agent_json(&server, agent.uid(), "status FAILED", |a| {
        a["remote_config"]["status"] == "FAILED"
    })
    .await;
    assert_eq!(detail["remote_config"]["error_message"], "unknown exporter \"otlpx\"");

    // Heartbeats after the failure do not bring the same config back.
    let before = agent.seen().replies;
    for _ in 0..3 {
        agent.heartbeat().await.unwrap();
    }
    let seen = agent
        .wait_for("three heartbeat replies", |s| s.replies >= before + 3)
        .await
        .unwrap();
    assert_eq!(seen.configs.len(), 1, "a FAILED current hash must not be re-sent");

    let failed = server.admin.agents("status=FAILED").await.unwrap();
    assert_eq!(failed.len(), 1);
    agent.disconnect().await.unwrap();
    server.stop().await;
}

#[tokio::test]
async fn selectors_pick_agents_and_the_most_specific_assignment_wins() {
    let server = Server::start().await;
    let arm = SimAgent::connect_ws(
        &server.ws_url(),
        AgentOptions::default()
            .attr("service.name", "checkout")
            .attr("host.arch", "arm64"),
    )
    .await
    .unwrap();
    let amd = SimAgent::connect_ws(
        &server.ws_url(),
        AgentOptions::default()
            .attr("service.name", "checkout")
            .attr("host.arch", "amd64"),
    )
    .await
    .unwrap();
    let other = SimAgent::connect_http(
        &server.http_url(),
        AgentOptions::default().attr("service.name", "search"),
    )
    .await
    .unwrap();
    for agent in [&arm, &amd] {
        agent_json(&server, agent.uid(), "listed", |_| true).await;
    }
    let general = server
        .admin
        .create_config("general", "c.yaml", "general", "text/yaml")
        .await
        .unwrap();
    let special = server
        .admin
        .create_config("special", "c.yaml", "special", "text/yaml")
        .await
        .unwrap();
    server
        .admin
        .assign("checkout", "service.name=checkout", "general")
        .await
        .unwrap();
    server
        .admin
        .assign("checkout-arm", "service.name=checkout,host.arch=arm64", "special")
        .await
        .unwrap();

    arm.wait_for_config(&hash_of(&special)).await.unwrap();
    amd.wait_for_config(&hash_of(&general)).await.unwrap();
    // The unmatched HTTP agent keeps polling and never gets a config.
    let polls = other.seen().replies;
    let seen = other.wait_for("more polls", |s| s.replies >= polls + 3).await.unwrap();
    assert!(seen.configs.is_empty());

    let listed = server.admin.agents("selector=host.arch%3Darm64").await.unwrap();
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0]["instance_uid"], arm.uid().to_string());

    for agent in [arm, amd, other] {
        agent.disconnect().await.unwrap();
    }
    server.stop().await;
}

#[tokio::test]
async fn sequence_gaps_and_unknown_agents_get_report_full_state() {
    let server = Server::start().await;
    let agent = SimAgent::connect_ws(&server.ws_url(), AgentOptions::default().attr("service.name", "gap"))
        .await
        .unwrap();
    agent.wait_for("first reply", |s| s.replies > 0).await.unwrap();
    assert_eq!(agent.seen().full_state_requests, 0);
    // Skip ahead: reports 2..=9 "were lost".
    agent
        .send(AgentToServer {
            instance_uid: agent.uid().to_vec(),
            sequence_num: 10,
            capabilities: AgentCapabilities::ReportsStatus as u64,
            ..Default::default()
        })
        .await
        .unwrap();
    agent
        .wait_for("ReportFullState after a gap", |s| s.full_state_requests == 1)
        .await
        .unwrap();

    // An agent the server never saw, sending a bare heartbeat.
    let stranger = SimAgent::connect_ws(&server.ws_url(), AgentOptions::default())
        .await
        .unwrap();
    stranger
        .send(AgentToServer {
            instance_uid: InstanceUid::new_v7().to_vec(),
            sequence_num: 5,
            capabilities: 1,
            ..Default::default()
        })
        .await
        .unwrap();
    stranger
        .wait_for("ReportFullState for an unknown agent", |s| s.full_state_requests >= 1)
        .await
        .unwrap();
    agent.disconnect().await.unwrap();
    stranger.disconnect().await.unwrap();
    server.stop().await;
}

#[tokio::test]
async fn an_agent_that_asks_for_a_uid_gets_a_fresh_one() {
    let server = Server::start().await;
    let agent = SimAgent::connect_ws(
        &server.ws_url(),
        AgentOptions {
            request_uid: true,
            ..AgentOptions::default().attr("service.name", "new")
        },
    )
    .await
    .unwrap();
    let temporary = agent.uid();
    let seen = agent.wait_for("new uid", |s| s.uid != Some(temporary)).await.unwrap();
    let assigned = seen.uid.unwrap();
    let detail = agent_json(&server, assigned, "agent under its new uid", |_| true).await;
    assert_eq!(detail["identifying_attributes"]["service.name"], "new");
    assert!(
        server.admin.agent(temporary).await.unwrap().is_none(),
        "the temporary uid is forgotten"
    );

    // Pushes reach the agent under its new uid.
    let version = server.admin.create_config("c", "c", "x", "text/plain").await.unwrap();
    server.admin.assign("new", "service.name=new", "c").await.unwrap();
    agent.wait_for_config(&hash_of(&version)).await.unwrap();
    agent.disconnect().await.unwrap();
    server.stop().await;
}

#[tokio::test]
async fn heartbeat_interval_is_offered_to_agents_that_accept_it() {
    let server = Server::start_with(tempfile::tempdir().unwrap(), |c| c.agents.heartbeat_interval_secs = 15).await;
    let agent = SimAgent::connect_ws(
        &server.ws_url(),
        AgentOptions::default()
            .with(AgentCapabilities::ReportsHeartbeat)
            .with(AgentCapabilities::AcceptsOpAmpConnectionSettings),
    )
    .await
    .unwrap();
    let seen = agent
        .wait_for("heartbeat offer", |s| s.heartbeat_interval.is_some())
        .await
        .unwrap();
    assert_eq!(seen.heartbeat_interval, Some(15));

    // Agents without the capabilities are never offered connection settings.
    let plain = SimAgent::connect_ws(&server.ws_url(), AgentOptions::default())
        .await
        .unwrap();
    plain.heartbeat().await.unwrap();
    let seen = plain.wait_for("two replies", |s| s.replies >= 2).await.unwrap();
    assert_eq!(seen.heartbeat_interval, None);
    agent.disconnect().await.unwrap();
    plain.disconnect().await.unwrap();
    server.stop().await;
}

#[tokio::test]
async fn agents_go_offline_on_goodbye_on_a_dropped_socket_and_on_silence() {
    let server = Server::start_with(tempfile::tempdir().unwrap(), |c| c.agents.http_offline_after_secs = 1).await;
    let polite = SimAgent::connect_ws(&server.ws_url(), AgentOptions::default())
        .await
        .unwrap();
    let crashed = SimAgent::connect_ws(&server.ws_url(), AgentOptions::default())
        .await
        .unwrap();
    let silent = SimAgent::connect_http(
        &server.http_url(),
        AgentOptions {
            heartbeat: Some(Duration::from_secs(3600)),
            ..Default::default()
        },
    )
    .await
    .unwrap();
    let (polite_uid, crashed_uid, silent_uid) = (polite.uid(), crashed.uid(), silent.uid());
    for uid in [polite_uid, crashed_uid, silent_uid] {
        agent_json(&server, uid, "connected", |a| a["connected"] == true).await;
    }
    polite.disconnect().await.unwrap();
    crashed.kill();
    agent_json(&server, polite_uid, "offline after agent_disconnect", |a| {
        a["connected"] == false
    })
    .await;
    agent_json(&server, crashed_uid, "offline after the socket dropped", |a| {
        a["connected"] == false
    })
    .await;
    // The HTTP agent never says goodbye and stops polling: the sweep expires it.
    agent_json(&server, silent_uid, "silent http agent expired", |a| {
        a["connected"] == false
    })
    .await;
    let connected = server.admin.agents("connected=true").await.unwrap();
    assert!(connected.is_empty(), "{connected:?}");
    silent.kill();
    server.stop().await;
}

#[tokio::test]
async fn agents_configs_and_assignments_survive_a_restart() {
    let server = Server::start().await;
    let uid = InstanceUid::new_v7();
    let options = AgentOptions {
        uid: Some(uid),
        ..AgentOptions::default().attr("service.name", "durable")
    };
    let agent = SimAgent::connect_ws(&server.ws_url(), options.clone()).await.unwrap();
    let version = server
        .admin
        .create_config("keep", "k.yaml", "kept: true", "text/yaml")
        .await
        .unwrap();
    server
        .admin
        .assign("durable", "service.name=durable", "keep")
        .await
        .unwrap();
    agent.wait_for_config(&hash_of(&version)).await.unwrap();
    agent_json(&server, uid, "APPLIED before restart", |a| {
        a["remote_config"]["status"] == "APPLIED"
    })
    .await;
    agent.kill();
    let data = server.stop().await;

    let server = Server::start_with(data, |_| {}).await;
    let detail = server
        .admin
        .agent(uid)
        .await
        .unwrap()
        .expect("agent kept across restart");
    assert_eq!(detail["identifying_attributes"]["service.name"], "durable");
    assert_eq!(detail["remote_config"]["status"], "APPLIED");
    assert_eq!(detail["remote_config"]["hash"], hash_of(&version).to_string());
    let (status, configs) = server
        .admin
        .request(reqwest::Method::GET, "/api/v1/configs/keep", None)
        .await
        .unwrap();
    assert_eq!(status, 200);
    assert_eq!(configs.as_array().unwrap().len(), 1);
    let (_, assignments) = server
        .admin
        .request(reqwest::Method::GET, "/api/v1/assignments", None)
        .await
        .unwrap();
    assert_eq!(assignments[0]["name"], "durable");

    // The persisted assignment and config are live: a new agent that
    // matches the selector receives the config, without being asked for
    // full state.
    let fresh = AgentOptions { uid: None, ..options };
    let back = SimAgent::connect_ws(&server.ws_url(), fresh).await.unwrap();
    let seen = back.wait_for_config(&hash_of(&version)).await.unwrap();
    assert_eq!(seen.configs, vec![hash_of(&version)]);
    assert_eq!(seen.full_state_requests, 0);
    back.disconnect().await.unwrap();
    server.stop().await;
}

/// Every route the admin API serves is in its OpenAPI document.
#[test]
fn openapi_document_covers_every_route() {
    let doc = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/admin-api.yaml")).unwrap();
    for path in [
        "/livez:",
        "/readyz:",
        "/api/v1/agents:",
        "/api/v1/agents/{uid}:",
        "/api/v1/agents/{uid}/restart:",
        "/api/v1/agents/{uid}/certificate:",
        "/api/v1/agents/{uid}/custom-messages:",
        "/api/v1/commands/restart:",
        "/api/v1/commands/certificate:",
        "/api/v1/packages:",
        "/api/v1/packages/{name}:",
        "/api/v1/connection-settings:",
        "/api/v1/connection-settings/{name}:",
        "/api/v1/configs:",
        "/api/v1/configs/{name}:",
        "/api/v1/configs/{name}/versions:",
        "/api/v1/configs/{name}/diff:",
        "/api/v1/configs/{name}/versions/{version}:",
        "/api/v1/assignments:",
        "/api/v1/assignments/{name}:",
        "/api/v1/config-status:",
        "/api/v1/rollouts:",
        "/api/v1/rollouts/{id}:",
        "/api/v1/rollouts/{id}/{action}:",
        "/api/v1/keys:",
        "/api/v1/keys/{id}:",
        "/api/v1/audit:",
        "/api/v1/events:",
        "/api/v1/event-log:",
    ] {
        assert!(doc.contains(&format!("\n  {path}\n")), "{path} is not documented");
    }
}

#[tokio::test]
async fn admin_api_rejects_bad_requests_with_clear_errors() {
    let server = Server::start_with(tempfile::tempdir().unwrap(), |c| c.admin.token = Some("s3cret".into())).await;
    let anonymous = fleetplane_testkit::admin::Admin::new(server.server.admin_addr);
    let (status, body) = anonymous
        .request(reqwest::Method::GET, "/api/v1/agents", None)
        .await
        .unwrap();
    assert_eq!(status, 401);
    assert_eq!(body["error"], "missing bearer token");
    let wrong = fleetplane_testkit::admin::Admin::new(server.server.admin_addr).with_token("nope");
    assert_eq!(
        wrong
            .request(reqwest::Method::GET, "/api/v1/agents", None)
            .await
            .unwrap()
            .0,
        401
    );
    // Health endpoints stay open for probes.
    assert_eq!(
        anonymous.request(reqwest::Method::GET, "/livez", None).await.unwrap().0,
        200
    );

    let admin = &server.admin;
    let (status, body) = admin
        .request(reqwest::Method::GET, "/api/v1/agents?selector=%3Dx", None)
        .await
        .unwrap();
    assert_eq!(status, 400, "{body}");
    assert!(body["error"].as_str().unwrap().contains("no key"));
    assert_eq!(
        admin
            .request(reqwest::Method::GET, "/api/v1/agents/not-a-uid", None)
            .await
            .unwrap()
            .0,
        400
    );
    let unknown = InstanceUid::new_v7();
    assert_eq!(
        admin
            .request(reqwest::Method::GET, &format!("/api/v1/agents/{unknown}"), None)
            .await
            .unwrap()
            .0,
        404
    );
    let (status, body) = admin
        .request(
            reqwest::Method::PUT,
            "/api/v1/assignments/a",
            Some(serde_json::json!({ "selector": "", "config": "missing" })),
        )
        .await
        .unwrap();
    assert_eq!(status, 404, "{body}");
    let (status, _) = admin
        .request(
            reqwest::Method::POST,
            "/api/v1/configs/Bad%20Name/versions",
            Some(serde_json::json!({ "files": { "a": { "body": "x" } } })),
        )
        .await
        .unwrap();
    assert_eq!(status, 400);
    let (status, body) = admin
        .request(
            reqwest::Method::POST,
            "/api/v1/configs/ok/versions",
            Some(serde_json::json!({ "files": {}, "extra": 1 })),
        )
        .await
        .unwrap();
    assert_eq!(status, 400, "{body}");
    let (status, _) = admin
        .request(
            reqwest::Method::POST,
            "/api/v1/configs/ok/versions",
            Some(serde_json::json!({ "files": {} })),
        )
        .await
        .unwrap();
    assert_eq!(status, 400);

    let huge = "x".repeat(17 * 1024 * 1024);
    let (status, body) = admin
        .request(
            reqwest::Method::POST,
            "/api/v1/configs/huge/versions",
            Some(serde_json::json!({ "files": { "a": { "body": huge } } })),
        )
        .await
        .unwrap();
    assert_eq!(status, 413, "{body}");
    admin.create_config("pinned", "f", "x", "text/plain").await.unwrap();
    let (status, _) = admin
        .request(
            reqwest::Method::PUT,
            "/api/v1/assignments/a",
            Some(serde_json::json!({ "config": "pinned", "version": 0 })),
        )
        .await
        .unwrap();
    assert_eq!(status, 400, "version 0 is not a version");
    assert_eq!(admin.agents("limit=0").await.unwrap().len(), 0);
    // The scheme is case-insensitive, as HTTP says.
    let lower = reqwest::Client::new()
        .get(format!("http://{}/api/v1/agents", server.server.admin_addr))
        .header("authorization", "bearer s3cret")
        .send()
        .await
        .unwrap();
    assert_eq!(lower.status(), 200);

    // Creating the same files twice is idempotent.
    let first = admin.create_config("same", "f", "x", "text/plain").await.unwrap();
    let again = admin.create_config("same", "f", "x", "text/plain").await.unwrap();
    assert_eq!(again["created"], false);
    assert_eq!(again["version"], first["version"]);
    server.stop().await;
}

/// One raw HTTP/1.1 request (no client-side path normalisation): the status
/// line's code, the headers and the body.
async fn raw_request(addr: std::net::SocketAddr, method: &str, path: &str, body: &str) -> (u16, String, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    let request = format!(
        "{method} {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).await.unwrap();
    let (head, body) = response.split_once("\r\n\r\n").unwrap_or((&response, ""));
    let code = head.split(' ').nth(1).unwrap_or_default().parse().unwrap_or(0);
    (code, head.to_ascii_lowercase(), body.to_owned())
}

#[tokio::test]
async fn admin_errors_are_json_with_nosniff_and_dot_names_are_refused() {
    let server = Server::start().await;
    let addr = server.server.admin_addr;
    // A query the extractor rejects (unknown field, wrong type) gets the
    // documented JSON error body, not text/plain.
    for query in ["/api/v1/agents?connected=maybe", "/api/v1/agents?bogus=1"] {
        let (code, head, body) = raw_request(addr, "GET", query, "").await;
        assert_eq!(code, 400, "{query}: {body}");
        assert!(head.contains("content-type: application/json"), "{query}: {head}");
        assert!(head.contains("x-content-type-options: nosniff"), "{query}: {head}");
        let parsed: Value = serde_json::from_str(&body).unwrap_or_else(|e| panic!("{query}: {e}: {body:?}"));
        assert!(parsed["error"].as_str().is_some_and(|e| !e.is_empty()), "{parsed}");
    }
    let (code, head, _) = raw_request(addr, "GET", "/api/v1/agents", "").await;
    assert_eq!(code, 200);
    assert!(head.contains("x-content-type-options: nosniff"), "{head}");
    for name in [".", "..", ".hidden"] {
        let (code, _, body) = raw_request(
            addr,
            "POST",
            &format!("/api/v1/configs/{name}/versions"),
            r#"{"files": {"a": {"body": "x"}}}"#,
        )
        .await;
        assert_eq!(code, 400, "config {name:?}: {body}");
        let (code, _, body) = raw_request(
            addr,
            "PUT",
            &format!("/api/v1/assignments/{name}"),
            r#"{"selector": "", "config": "x"}"#,
        )
        .await;
        assert_eq!(code, 400, "assignment {name:?}: {body}");
    }
    server.stop().await;
}
