//! A small smoke of the fleet simulator against a live all-in-one control
//! plane: a few hundred agents over two loopback source addresses, a config
//! push mid-run, a share of agents rejecting it. Proves the tool works; the
//! benchmark itself is not a test.

mod common;

use std::{net::IpAddr, time::Duration};

use fleetplane_loadtest::{SimConfig, run};
use fleetplane_testkit::{admin::Admin, wait::eventually};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_hundred_simulated_agents_connect_and_take_a_pushed_config() {
    let (server, _data) = common::all_in_one().await;
    let admin = Admin::new(server.admin_addr);

    let sim = SimConfig {
        url: format!("ws://{}/v1/opamp", server.opamp_addr),
        agents: 300,
        source_ips: vec![IpAddr::from([127, 0, 0, 1]), IpAddr::from([127, 0, 0, 2])],
        heartbeat: Some(Duration::from_secs(1)),
        reject_share: 0.1,
        service_name: "smoke".into(),
        ..SimConfig::default()
    };
    let push_admin = admin.clone();
    let summary = run(sim, Duration::from_secs(5), Default::default(), async move {
        push_admin
            .create_config("smoke", "c.yaml", "smoke: true", "text/yaml")
            .await
            .unwrap();
        push_admin.assign("smoke", "service.name=smoke", "smoke").await.unwrap();
    })
    .await;
    println!("{}", summary.report());

    assert_eq!(summary.connected, 300, "every agent held a connection");
    assert_eq!(summary.held_at_end, 300, "and still held it at the end");
    assert_eq!(summary.connect_latencies.len(), 300);
    assert_eq!(summary.configs.len(), 1);
    assert_eq!(
        summary.configs.values().next().unwrap().len(),
        300,
        "the push reached everyone"
    );
    assert_eq!((summary.applied, summary.failed), (270, 30));
    assert!(summary.heartbeats > 300, "heartbeats flowed: {}", summary.heartbeats);
    assert!(summary.errors.is_empty(), "{:?}", summary.errors);
    // The control plane recorded the same.
    let groups = eventually("statuses recorded", Duration::from_secs(20), || async {
        let groups = admin.config_status().await?;
        Ok(groups
            .into_iter()
            .find(|g| g["statuses"]["APPLIED"] == 270 && g["statuses"]["FAILED"] == 30))
    })
    .await
    .unwrap();
    assert_eq!(groups["config"], "smoke");
    server.stop().await.unwrap();
}

/// Plain-HTTP agents polling, with status churn: every poll answered, the
/// pushed config applied, and the health changes recorded by the control plane.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn polling_http_agents_churn_their_status_and_take_a_pushed_config() {
    let (server, _data) = common::all_in_one().await;
    let admin = Admin::new(server.admin_addr);

    let sim = SimConfig {
        url: format!("http://{}/v1/opamp", server.opamp_addr),
        agents: 100,
        heartbeat: Some(Duration::from_millis(500)),
        status_every: Some(Duration::from_millis(700)),
        service_name: "polling".into(),
        ..SimConfig::default()
    };
    let push_admin = admin.clone();
    let summary = run(sim, Duration::from_secs(5), Default::default(), async move {
        push_admin
            .create_config("polling", "c.yaml", "polling: true", "text/yaml")
            .await
            .unwrap();
        push_admin
            .assign("polling", "service.name=polling", "polling")
            .await
            .unwrap();
    })
    .await;
    println!("{}", summary.report());

    assert_eq!(summary.connected, 100, "every agent was answered");
    assert_eq!(summary.held_at_end, 100);
    assert_eq!(summary.applied, 100, "the push reached everyone");
    assert_eq!(summary.config_acked.len(), 100, "every APPLIED status was acknowledged");
    assert!(
        summary.status_changes >= 100,
        "status churned: {}",
        summary.status_changes
    );
    assert!(summary.errors.is_empty(), "{:?}", summary.errors);
    // Both health states arrived: churn went through the whole path.
    let agents = admin.agents("selector=service.name%3Dpolling").await.unwrap();
    assert_eq!(agents.len(), 100);
    let unhealthy = agents.iter().filter(|a| a["healthy"] == false).count();
    let healthy = agents.iter().filter(|a| a["healthy"] == true).count();
    assert_eq!(healthy + unhealthy, 100, "every agent reported health: {agents:?}");
    assert!(agents.iter().all(|a| a["transport"] == "http"), "{:?}", agents[0]);
    server.stop().await.unwrap();
}
