//! A small smoke of the fleet simulator against a live all-in-one control
//! plane: a few hundred agents over two loopback source addresses, a config
//! push mid-run, a share of agents rejecting it. Proves the tool works; the
//! benchmark itself is not a test.

use std::{net::IpAddr, time::Duration};

use fleetplane::{AllInOne, Config};
use fleetplane_loadtest::{SimConfig, run};
use fleetplane_testkit::{admin::Admin, wait::eventually};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_hundred_simulated_agents_connect_and_take_a_pushed_config() {
    let data = tempfile::tempdir().unwrap();
    let mut config = Config::default();
    config.opamp.listen = "127.0.0.1:0".parse().unwrap();
    config.admin.listen = "127.0.0.1:0".parse().unwrap();
    config.store.data_dir = data.path().to_owned();
    config.gateway.drain_ms = 0;
    let server = AllInOne::start(&config).await.unwrap();
    let admin = Admin::new(server.admin_addr);

    let sim = SimConfig {
        url: format!("ws://{}/v1/opamp", server.opamp_addr),
        agents: 300,
        source_ips: vec![IpAddr::from([127, 0, 0, 1]), IpAddr::from([127, 0, 0, 2])],
        heartbeat: Some(Duration::from_secs(1)),
        reject_share: 0.1,
        connect_rate: 0,
        service_name: "smoke".into(),
    };
    let push_admin = admin.clone();
    let summary = run(sim, Duration::from_secs(5), async move {
        push_admin
            .create_config("smoke", "c.yaml", "smoke: true", "text/yaml")
            .await
            .unwrap();
        push_admin.assign("smoke", "service.name=smoke", "smoke").await.unwrap();
    })
    .await;
    println!("{}", summary.report());

    assert_eq!(summary.connected, 300, "every agent held a connection");
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
