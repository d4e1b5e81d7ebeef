//! Operators acting on agents over the real protocol, in both modes:
//! restarts (only where the agent advertises AcceptsRestartCommand, sent
//! alone), custom messages both ways (only under a capability the agent
//! lists), and the available-components handshake (hash first, the full map
//! only when asked).

mod common;

use std::time::Duration;

use fleetplane_proto::opamp::AgentCapabilities;
use fleetplane_testkit::{
    admin::Admin,
    agent::{AgentOptions, SimAgent},
    wait::{DEFAULT_DEADLINE, eventually},
};
use reqwest::Method;
use serde_json::{Value, json};

const ECHO: &str = "io.fleetplane.test.echo";

async fn post(admin: &Admin, path: &str, body: Option<Value>) -> (u16, Value) {
    admin.request(Method::POST, path, body).await.unwrap()
}

/// The whole scenario, against any control plane.
async fn restarts_and_custom_messages(admin: &Admin, ws_url: &str, http_url: &str) {
    let restartable = SimAgent::connect_ws(
        ws_url,
        AgentOptions::default()
            .attr("service.name", "cmd")
            .with(AgentCapabilities::AcceptsRestartCommand)
            .custom_capability(ECHO)
            .components("receivers", &["otlp", "filelog"]),
    )
    .await
    .unwrap();
    let plain = SimAgent::connect_ws(ws_url, AgentOptions::default().attr("service.name", "cmd"))
        .await
        .unwrap();
    let poller = SimAgent::connect_http(
        http_url,
        AgentOptions {
            heartbeat: Some(Duration::from_millis(200)),
            ..AgentOptions::default()
                .attr("service.name", "cmd")
                .with(AgentCapabilities::AcceptsRestartCommand)
        },
    )
    .await
    .unwrap();

    // Components: announced by hash, asked for once, shown in full.
    let listed = admin
        .wait_for_agent(restartable.uid(), "components known", |a| {
            a["available_components"]["receivers"]
                .as_array()
                .is_some_and(|r| r.len() == 2)
        })
        .await
        .unwrap();
    assert_eq!(listed["available_components"]["receivers"], json!(["filelog", "otlp"]));
    assert_eq!(restartable.seen().component_requests, 1);
    admin.wait_for_agent(plain.uid(), "listed", |_| true).await.unwrap();
    admin.wait_for_agent(poller.uid(), "listed", |_| true).await.unwrap();

    // A restart for an agent that cannot take one is refused, and audited.
    let (status, body) = post(admin, &format!("/api/v1/agents/{}/restart", plain.uid()), None).await;
    assert_eq!(status, 409, "{body}");
    assert!(
        body["error"].as_str().unwrap().contains("AcceptsRestartCommand"),
        "{body}"
    );
    let (status, _) = post(admin, &format!("/api/v1/agents/{}/restart", uuid_like()), None).await;
    assert_eq!(status, 404);

    // WebSocket: pushed at once, alone.
    let (status, body) = post(admin, &format!("/api/v1/agents/{}/restart", restartable.uid()), None).await;
    assert_eq!((status, body["delivery"].as_str()), (202, Some("pushed")), "{body}");
    let seen = restartable.wait_for("restart", |s| s.restarts == 1).await.unwrap();
    assert_eq!(seen.commands_with_extras, 0, "a command comes alone");

    // HTTP: in the reply to the next poll.
    let (status, body) = post(admin, &format!("/api/v1/agents/{}/restart", poller.uid()), None).await;
    assert_eq!((status, body["delivery"].as_str()), (202, Some("next_poll")), "{body}");
    poller.wait_for("restart", |s| s.restarts == 1).await.unwrap();

    // By selector: those that accept are asked, the others listed with why.
    let (status, body) = post(admin, "/api/v1/commands/restart", Some(json!({ "selector": " " }))).await;
    assert_eq!(status, 400, "an empty selector never means everyone: {body}");
    let (status, body) = post(
        admin,
        "/api/v1/commands/restart",
        Some(json!({ "selector": "service.name=cmd" })),
    )
    .await;
    assert_eq!(status, 202, "{body}");
    assert_eq!(body["requested"].as_array().unwrap().len(), 2, "{body}");
    assert_eq!(body["refused"][0]["instance_uid"], plain.uid().to_string(), "{body}");
    restartable
        .wait_for("second restart", |s| s.restarts == 2)
        .await
        .unwrap();
    poller.wait_for("second restart", |s| s.restarts == 2).await.unwrap();
    assert_eq!(plain.seen().restarts, 0);

    // Custom messages: only under a capability the agent lists.
    let message = json!({ "capability": ECHO, "type": "ping", "text": "hello" });
    let (status, body) = post(
        admin,
        &format!("/api/v1/agents/{}/custom-messages", plain.uid()),
        Some(message.clone()),
    )
    .await;
    assert_eq!(status, 409, "{body}");
    let (status, body) = post(
        admin,
        &format!("/api/v1/agents/{}/custom-messages", restartable.uid()),
        Some(json!({ "capability": "io.example.other", "type": "ping", "text": "x" })),
    )
    .await;
    assert_eq!(status, 409, "{body}");
    assert!(
        body["error"].as_str().unwrap().contains(ECHO),
        "names what it lists: {body}"
    );
    let (status, body) = post(
        admin,
        &format!("/api/v1/agents/{}/custom-messages", restartable.uid()),
        Some(json!({ "capability": ECHO, "type": "ping", "data": "not base64!" })),
    )
    .await;
    assert_eq!(status, 400, "{body}");
    let (status, body) = post(
        admin,
        &format!("/api/v1/agents/{}/custom-messages", restartable.uid()),
        Some(message),
    )
    .await;
    assert_eq!(status, 202, "{body}");
    let seen = restartable
        .wait_for("custom message", |s| !s.custom_messages.is_empty())
        .await
        .unwrap();
    assert_eq!(seen.custom_messages[0].data, b"hello");
    // The agent's answer is collected.
    let path = format!("/api/v1/agents/{}/custom-messages", restartable.uid());
    let replies = eventually("the agent's reply", DEFAULT_DEADLINE, || async {
        let (_, replies) = admin.request(Method::GET, &path, None).await?;
        Ok(replies.as_array().filter(|r| !r.is_empty()).cloned())
    })
    .await
    .unwrap();
    assert_eq!(replies[0]["type"], "ping.reply");
    // And it is on the event log.
    let path = format!(
        "/api/v1/event-log?subject={}&kind=agent.custom_message",
        restartable.uid()
    );
    let logged = eventually("the reply on the event log", DEFAULT_DEADLINE, || async {
        let (_, events) = admin.request(Method::GET, &path, None).await?;
        Ok(events.as_array().filter(|e| !e.is_empty()).cloned())
    })
    .await
    .unwrap();
    assert!(
        logged[0]["message"].as_str().unwrap().contains("ping.reply"),
        "{logged:?}"
    );
    assert_eq!(replies[0]["text"], "hello");
    assert_eq!(replies[0]["capability"], ECHO);

    // Every ask is in the audit log, refused ones with their status.
    let (_, audit) = admin
        .request(Method::GET, "/api/v1/audit?limit=100", None)
        .await
        .unwrap();
    let statuses: Vec<(String, u64)> = audit
        .as_array()
        .unwrap()
        .iter()
        .map(|e| (e["action"].as_str().unwrap().to_owned(), e["status"].as_u64().unwrap()))
        .collect();
    let restart_plain = format!("POST /api/v1/agents/{}/restart", plain.uid());
    assert!(statuses.contains(&(restart_plain, 409)), "{statuses:?}");
    assert!(
        statuses.contains(&("POST /api/v1/commands/restart".to_owned(), 202)),
        "{statuses:?}"
    );
}

fn uuid_like() -> String {
    fleetplane_proto::InstanceUid::new_v7().to_string()
}

#[tokio::test]
async fn all_in_one_restarts_and_relays_custom_messages() {
    let server = common::Server::start().await;
    restarts_and_custom_messages(&server.admin, &server.ws_url(), &server.http_url()).await;
}

#[tokio::test]
async fn scaled_restarts_and_relays_custom_messages() {
    let fleet = common::two_by_two().await;
    let ws = fleet.ws_urls();
    let http = fleet.http_urls();
    // WebSocket agents on one gateway, the poller on the other, the operator
    // on the second coordinator.
    restarts_and_custom_messages(&fleet.admin(1), &ws[0], &http[1]).await;
}
