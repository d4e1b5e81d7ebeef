//! The admin API's event stream over HTTP (Server-Sent Events), in both
//! modes: agents connecting, config status with the agent's own error text,
//! rollout transitions and audit entries; tenant isolation; resuming from an
//! event id on another coordinator replica; a position trimmed from the log
//! answered with `lagged`.

mod common;

use fleetplane_testkit::{
    admin::Admin,
    agent::{AgentOptions, SimAgent},
};

/// `acme` and `acme_elsewhere` see the agents' tenant (through two
/// coordinator replicas in the scaled form); `globex` another tenant.
async fn events_scenario(acme: &Admin, globex: &Admin, acme_elsewhere: &Admin, ws_url: &str) {
    let mut stream = acme.events(None).await.unwrap();
    let mut other_tenant = globex.events(None).await.unwrap();

    let agent = SimAgent::connect_ws(
        ws_url,
        AgentOptions::default()
            .attr("service.name", "ev")
            .reject_configs("bad pipeline: no receivers"),
    )
    .await
    .unwrap();
    let uid = agent.uid().to_string();
    let connected = stream
        .wait_for("agent.connected", |e| e.event == "agent.connected")
        .await
        .unwrap();
    assert_eq!(connected.data["subject"], uid);
    let first_id = connected.id.clone().unwrap();

    acme.create_config("ev", "c.yaml", "v: 1", "text/yaml").await.unwrap();
    acme.assign("ev", "service.name=ev", "ev").await.unwrap();
    let audit = stream.wait_for("audit entry", |e| e.event == "audit").await.unwrap();
    assert!(
        audit.data["message"]
            .as_str()
            .unwrap()
            .contains("POST /api/v1/configs/ev/versions"),
        "{audit:?}"
    );
    let failed = stream
        .wait_for("config status", |e| e.event == "agent.config_status")
        .await
        .unwrap();
    assert_eq!(failed.data["fields"]["status"], "FAILED");
    assert!(
        failed.data["message"]
            .as_str()
            .unwrap()
            .contains("bad pipeline: no receivers"),
        "the agent's own error text: {failed:?}"
    );

    // Resume after the first event, on another replica: the same events follow.
    let mut resumed = acme_elsewhere.events(Some(&first_id)).await.unwrap();
    let next = resumed.next().await.unwrap().unwrap();
    assert_ne!(next.id.as_deref(), Some(first_id.as_str()));
    assert!(next.id.is_some());
    resumed
        .wait_for("the same config status", |e| e.id == failed.id)
        .await
        .unwrap();
    // Bad ids are refused up front.
    let (status, body) = acme
        .request(reqwest::Method::GET, "/api/v1/events?since=yesterday", None)
        .await
        .unwrap();
    assert_eq!(status, 400, "{body}");

    // Tenant isolation: globex's stream saw none of it. Something of its own
    // arrives, and it is the first thing it sees.
    globex.create_config("g", "c.yaml", "v: 1", "text/yaml").await.unwrap();
    let own = other_tenant.next().await.unwrap().unwrap();
    assert_eq!(own.event, "audit");
    assert!(own.data["message"].as_str().unwrap().contains("/configs/g/"), "{own:?}");
}

#[tokio::test]
async fn all_in_one_streams_a_tenants_events_and_only_its_own() {
    let server = common::Server::start().await;
    // Open mode puts agents in `default`; `globex` is another tenant.
    let globex = server.admin.clone().for_tenant("globex");
    events_scenario(&server.admin, &globex, &server.admin, &server.ws_url()).await;
}

#[tokio::test]
async fn scaled_streams_resume_on_another_replica() {
    let fleet = common::scaled(1, 2).await;
    let here = fleet.admin(0);
    let elsewhere = fleet.admin(1);
    let other = fleet.admin(0).for_tenant("globex");
    events_scenario(&here, &other, &elsewhere, &fleet.ws_urls()[0]).await;
}

#[tokio::test]
async fn a_position_trimmed_from_the_log_is_told_it_lagged() {
    let server = common::Server::start_with(tempfile::tempdir().unwrap(), |c| {
        c.coordinator.events_retained = 5;
    })
    .await;
    let admin = server.admin.clone();
    let mut stream = admin.events(None).await.unwrap();
    admin.create_config("lag", "c.yaml", "v: 0", "text/yaml").await.unwrap();
    let first = stream.next().await.unwrap().unwrap();
    for i in 1..=8 {
        admin
            .create_config("lag", "c.yaml", &format!("v: {i}"), "text/yaml")
            .await
            .unwrap();
    }
    // One audit event per version: once the ninth is read, the first is
    // out of the five kept.
    for _ in 1..=8 {
        let event = stream.next().await.unwrap().unwrap();
        assert_eq!(event.event, "audit");
    }
    let mut late = admin.events(first.id.as_deref()).await.unwrap();
    let told = late.next().await.unwrap().unwrap();
    assert_eq!(told.event, "lagged", "{told:?}");
    assert!(late.next().await.unwrap().is_none(), "and the stream ends");
    // From the oldest kept: exactly the retained five.
    let mut oldest = admin.events(Some("0")).await.unwrap();
    let mut seen = Vec::new();
    for _ in 0..5 {
        seen.push(oldest.next().await.unwrap().unwrap().id.unwrap());
    }
    assert!(!seen.contains(&first.id.clone().unwrap()));
}
