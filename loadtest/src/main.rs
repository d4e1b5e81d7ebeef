//! `fleetplane-sim`: runs a fleet of simulated OpAMP agents against a control
//! plane and prints what it saw.
//!
//! ```text
//! fleetplane-sim --url ws://127.0.0.1:4320/v1/opamp --agents 1000 --duration-secs 60 \
//!     [--heartbeat-secs 30] [--reject-share 0.1] [--source-ips 4] [--connect-rate 5000] \
//!     [--push-config 127.0.0.1:4321]
//! ```
//!
//! `--source-ips N` spreads connections over 127.0.0.1 … 127.0.0.N (one
//! source address reaches one port about 28,000 times). `--push-config ADMIN`
//! runs the config-push scenario: once the fleet is up it creates a config
//! version and assigns it to the simulated agents through the admin API, and
//! the summary shows how fast it reached them.

use std::{net::IpAddr, time::Duration};

use anyhow::{Context, bail};
use fleetplane_loadtest::{SimConfig, run};
use fleetplane_testkit::admin::Admin;

fn main() -> anyhow::Result<()> {
    let mut config = SimConfig {
        url: "ws://127.0.0.1:4320/v1/opamp".into(),
        agents: 100,
        source_ips: vec![IpAddr::from([127, 0, 0, 1])],
        heartbeat: Some(Duration::from_secs(30)),
        reject_share: 0.0,
        connect_rate: 0,
        service_name: "fleetplane-sim".into(),
    };
    let mut duration = Duration::from_secs(30);
    let mut push_config: Option<String> = None;
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        let mut value = || args.next().with_context(|| format!("{arg} needs a value"));
        match arg.as_str() {
            "--url" => config.url = value()?,
            "--agents" => config.agents = value()?.parse()?,
            "--duration-secs" => duration = Duration::from_secs_f64(value()?.parse()?),
            "--heartbeat-secs" => {
                let secs: f64 = value()?.parse()?;
                config.heartbeat = (secs > 0.0).then(|| Duration::from_secs_f64(secs));
            }
            "--reject-share" => config.reject_share = value()?.parse()?,
            "--connect-rate" => config.connect_rate = value()?.parse()?,
            "--service-name" => config.service_name = value()?,
            "--source-ips" => {
                let n: u8 = value()?.parse()?;
                config.source_ips = (1..=n.max(1)).map(|i| IpAddr::from([127, 0, 0, i])).collect();
            }
            "--push-config" => push_config = Some(value()?),
            "--help" | "-h" => {
                println!("see the module documentation: fleetplane-sim --url URL --agents N --duration-secs S ...");
                return Ok(());
            }
            other => bail!("unknown argument {other:?}"),
        }
    }
    let runtime = tokio::runtime::Runtime::new()?;
    let service = config.service_name.clone();
    let summary = runtime.block_on(run(config, duration, async move {
        if let Some(admin) = push_config {
            let admin = Admin::new(admin);
            let body = format!(
                "simulated: {}",
                std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .unwrap_or_default()
                    .as_nanos()
            );
            match admin.create_config(&service, "sim.yaml", &body, "text/yaml").await {
                Ok(_) => {
                    if let Err(e) = admin
                        .assign(&service, &format!("service.name={service}"), &service)
                        .await
                    {
                        eprintln!("assigning the config failed: {e:#}");
                    }
                }
                Err(e) => eprintln!("creating the config failed: {e:#}"),
            }
        }
    }));
    println!("{}", summary.report());
    Ok(())
}
