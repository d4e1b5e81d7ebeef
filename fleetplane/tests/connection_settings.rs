//! Connection settings by selector over the real protocol, in both modes:
//! own-telemetry destinations and OpAMP settings offered only to agents that
//! advertise the capability for each part, acknowledged, changed, and never
//! shown with their header values.

mod common;

use fleetplane_proto::opamp::AgentCapabilities;
use fleetplane_testkit::{
    admin::Admin,
    agent::{AgentOptions, SimAgent},
};
use reqwest::Method;
use serde_json::json;

const SECRET: &str = "s3cret-header-value";
const OTHER_SECRET: &str = "s3cret-setting-value";

async fn own_telemetry_and_opamp_settings(admin: &Admin, ws_url: &str) {
    let collector = SimAgent::connect_ws(
        ws_url,
        AgentOptions::default()
            .attr("service.name", "tele")
            .with(AgentCapabilities::ReportsOwnMetrics)
            .with(AgentCapabilities::AcceptsOtherConnectionSettings)
            .with(AgentCapabilities::AcceptsOpAmpConnectionSettings)
            .with(AgentCapabilities::ReportsHeartbeat)
            .with(AgentCapabilities::ReportsConnectionSettingsStatus),
    )
    .await
    .unwrap();
    let plain = SimAgent::connect_ws(ws_url, AgentOptions::default().attr("service.name", "tele"))
        .await
        .unwrap();
    admin.wait_for_agent(plain.uid(), "listed", |_| true).await.unwrap();
    admin.wait_for_agent(collector.uid(), "listed", |_| true).await.unwrap();

    // Bad input is refused with the reason.
    for (body, why) in [
        (json!({ "selector": "service.name=tele" }), "nothing to offer"),
        (
            json!({ "own_metrics": { "endpoint": "ftp://x/v1/metrics" } }),
            "not an http(s) URL",
        ),
        (
            json!({ "own_metrics": { "endpoint": "https://x/v1/metrics", "headers": { "bad key": "v" } } }),
            "not a header name",
        ),
        (json!({ "opamp": { "ca_pem": "not a certificate" } }), "not PEM"),
        (
            json!({ "own_metrics": { "endpoint": "https://x", "extra": 1 } }),
            "unknown field",
        ),
        (
            json!({ "other_connections": { "kafka": { "endpoint": "user:pw@kafka:9092" } } }),
            "credentials in a shown endpoint",
        ),
        (
            json!({ "other_connections": { "bad name": { "endpoint": "kafka:9092" } } }),
            "a name with a space",
        ),
    ] {
        let (status, answer) = admin
            .request(Method::PUT, "/api/v1/connection-settings/bad", Some(body))
            .await
            .unwrap();
        assert_eq!(status, 400, "{why}: {answer}");
    }

    let (status, answer) = admin
        .request(
            Method::PUT,
            "/api/v1/connection-settings/telemetry",
            Some(json!({
                "selector": "service.name=tele",
                "own_metrics": { "endpoint": "https://otlp.example.com/v1/metrics", "headers": { "api-key": SECRET } },
                "own_logs": { "endpoint": "https://otlp.example.com/v1/logs" },
                "opamp": { "heartbeat_interval_seconds": 15 },
                "other_connections": {
                    "kafka/exporter": { "endpoint": "kafka-1:9092", "settings": { "sasl.password": OTHER_SECRET } }
                }
            })),
        )
        .await
        .unwrap();
    assert_eq!(status, 200, "{answer}");
    assert_eq!(answer["own_metrics"]["headers"], json!(["api-key"]));
    assert_eq!(
        answer["other_connections"]["kafka/exporter"]["settings"],
        json!(["sasl.password"])
    );
    assert!(
        !answer.to_string().contains(SECRET) && !answer.to_string().contains(OTHER_SECRET),
        "header and setting values never shown: {answer}"
    );

    let seen = collector
        // (A heartbeat-only offer may have come first, where the server
        // offers a heartbeat interval.)
        .wait_for("connection settings", |s| {
            s.connection_offers.last().is_some_and(|o| o.own_metrics.is_some())
        })
        .await
        .unwrap();
    let offer = seen.connection_offers.last().unwrap();
    let metrics = offer.own_metrics.as_ref().expect("own metrics offered");
    assert_eq!(metrics.destination_endpoint, "https://otlp.example.com/v1/metrics");
    assert_eq!(metrics.headers.as_ref().unwrap().headers[0].value, SECRET);
    assert!(offer.own_logs.is_none(), "the agent does not report its own logs");
    let kafka = &offer.other_connections["kafka/exporter"];
    assert_eq!(kafka.destination_endpoint, "kafka-1:9092");
    assert_eq!(kafka.other_settings["sasl.password"], OTHER_SECRET);
    let opamp = offer.opamp.as_ref().expect("opamp restated");
    assert_eq!(opamp.destination_endpoint, ws_url, "the endpoint it uses, restated");
    assert_eq!(opamp.heartbeat_interval_seconds, 15);
    let hash = hex::encode(&offer.hash);
    let detail = admin
        .wait_for_agent(collector.uid(), "settings acknowledged", |a| {
            a["connection_settings"]["reported_hash"] == hash.as_str()
        })
        .await
        .unwrap();
    assert_eq!(detail["connection_settings"]["status"], "APPLIED");
    assert_eq!(detail["connection_settings"]["offered_hash"], hash);

    // A change reaches the agent; the plain agent never got anything.
    let (status, _) = admin
        .request(
            Method::PUT,
            "/api/v1/connection-settings/telemetry",
            Some(json!({
                "selector": "service.name=tele",
                "own_metrics": { "endpoint": "https://otlp.example.net/v1/metrics" }
            })),
        )
        .await
        .unwrap();
    assert_eq!(status, 200);
    let seen = collector
        .wait_for("changed settings", |s| {
            s.connection_offers
                .last()
                .and_then(|o| o.own_metrics.as_ref())
                .map(|m| m.destination_endpoint.as_str())
                == Some("https://otlp.example.net/v1/metrics")
        })
        .await
        .unwrap();
    let last = seen.connection_offers.last().unwrap();
    assert!(
        last.opamp.is_some(),
        "heartbeats stay on: the interval is always restated"
    );
    assert!(plain.seen().connection_offers.is_empty());

    let (_, audit) = admin.request(Method::GET, "/api/v1/audit", None).await.unwrap();
    assert!(
        !audit.to_string().contains(SECRET) && !audit.to_string().contains(OTHER_SECRET),
        "header and setting values never audited"
    );
    let (status, _) = admin
        .request(Method::DELETE, "/api/v1/connection-settings/telemetry", None)
        .await
        .unwrap();
    assert_eq!(status, 204);
    let (status, _) = admin
        .request(Method::DELETE, "/api/v1/connection-settings/telemetry", None)
        .await
        .unwrap();
    assert_eq!(status, 404);
}

#[tokio::test]
async fn all_in_one_offers_connection_settings_by_selector() {
    let server = common::Server::start().await;
    own_telemetry_and_opamp_settings(&server.admin, &server.ws_url()).await;
}

#[tokio::test]
async fn scaled_offers_connection_settings_by_selector() {
    let fleet = common::two_by_two().await;
    own_telemetry_and_opamp_settings(&fleet.admin(1), &fleet.ws_urls()[1]).await;
}

/// The own-metrics destination of `agent`'s last connection settings offer.
fn last_metrics_endpoint(agent: &SimAgent) -> Option<String> {
    agent
        .seen()
        .connection_offers
        .last()
        .and_then(|o| o.own_metrics.as_ref())
        .map(|m| m.destination_endpoint.clone())
}

/// Every agent was last offered `endpoint` and reports those settings
/// APPLIED.
async fn all_on(admin: &Admin, agents: &[SimAgent], endpoint: &str) {
    for agent in agents {
        agent
            .wait_for(&format!("offered {endpoint}"), |s| {
                s.connection_offers
                    .last()
                    .and_then(|o| o.own_metrics.as_ref())
                    .is_some_and(|m| m.destination_endpoint == endpoint)
            })
            .await
            .unwrap();
        let hash = hex::encode(&agent.seen().connection_offers.last().unwrap().hash);
        admin
            .wait_for_agent(agent.uid(), "settings APPLIED", |a| {
                a["connection_settings"]["reported_hash"] == hash.as_str()
                    && a["connection_settings"]["status"] == "APPLIED"
            })
            .await
            .unwrap();
    }
}

/// Connection settings moved in stages with automatic rollback, through the
/// rollout engine configs use: two canaries (one refusing the new endpoint,
/// within the first stage's tolerance), then the rest, where another
/// refuses, so every changed agent is offered the previous destination again
/// and the settings keep it; a destination every agent takes completes and
/// becomes the settings'.
async fn connection_rollout_scenario(admin: &Admin, ws_urls: &[String]) {
    let mut agents = Vec::new();
    for i in 0..6 {
        let mut options = AgentOptions::default()
            .attr("service.name", "tele-ro")
            .with(AgentCapabilities::ReportsOwnMetrics)
            .with(AgentCapabilities::ReportsConnectionSettingsStatus);
        if [1, 4].contains(&i) {
            options.reject_endpoints_containing = Some("unreachable".into());
        }
        agents.push(
            SimAgent::connect_ws(&ws_urls[i % ws_urls.len()], options)
                .await
                .unwrap(),
        );
    }
    let good = "https://otlp-1.example.com/v1/metrics";
    let (status, body) = admin
        .request(
            Method::PUT,
            "/api/v1/connection-settings/ro-tele",
            Some(json!({ "selector": "service.name=tele-ro", "own_metrics": { "endpoint": good } })),
        )
        .await
        .unwrap();
    assert_eq!(status, 200, "{body}");
    all_on(admin, &agents, good).await;

    let canaries = [agents[0].uid().to_string(), agents[1].uid().to_string()];
    let rollout = |endpoint: &str| {
        json!({
            "connection_settings": "ro-tele",
            "settings": { "own_metrics": { "endpoint": endpoint } },
            "canaries": canaries,
            "stages": [{ "count": 2 }, 100],
            "first_stage_max_failures_percent": 50,
            "bake_seconds": 0
        })
    };
    let (status, created) = admin
        .request(
            Method::POST,
            "/api/v1/rollouts",
            Some(rollout("https://unreachable.example.com/v1/metrics")),
        )
        .await
        .unwrap();
    assert_eq!(status, 201, "{created}");
    assert_eq!(created["kind"], "connection_settings");
    let rolled_back = admin
        .wait_for_rollout(created["id"].as_str().unwrap(), "ROLLED_BACK")
        .await
        .unwrap();
    let stages = rolled_back["stages"].as_array().unwrap();
    assert_eq!(stages[0]["failures"].as_array().unwrap().len(), 1, "{rolled_back}");
    assert!(!stages[1]["failures"].as_array().unwrap().is_empty(), "{rolled_back}");
    assert!(rolled_back.to_string().contains("cannot reach"), "{rolled_back}");
    all_on(admin, &agents, good).await;
    let (_, kept) = admin
        .request(Method::GET, "/api/v1/connection-settings/ro-tele", None)
        .await
        .unwrap();
    assert_eq!(kept["own_metrics"]["endpoint"], good, "{kept}");

    let better = "https://otlp-2.example.com/v1/metrics";
    admin.roll_out(rollout(better), "COMPLETED").await.unwrap();
    all_on(admin, &agents, better).await;
    let (_, promoted) = admin
        .request(Method::GET, "/api/v1/connection-settings/ro-tele", None)
        .await
        .unwrap();
    assert_eq!(promoted["own_metrics"]["endpoint"], better, "{promoted}");
    assert_eq!(
        promoted["selector"], "service.name=tele-ro",
        "selector kept: {promoted}"
    );
    assert_eq!(last_metrics_endpoint(&agents[1]).as_deref(), Some(better));
}

#[tokio::test]
async fn all_in_one_rolls_out_connection_settings_in_stages_and_back() {
    let server = common::Server::start().await;
    connection_rollout_scenario(&server.admin, &[server.ws_url()]).await;
}

#[tokio::test]
async fn scaled_rolls_out_connection_settings_in_stages_and_back() {
    let fleet = common::two_by_two().await;
    connection_rollout_scenario(&fleet.admin(1), &fleet.ws_urls()).await;
}
