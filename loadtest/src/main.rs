//! `fleetplane-sim`: runs a fleet of simulated OpAMP agents against a control
//! plane and prints what it saw. Agents present an API key with `--api-key
//! KEY` or `FLEETPLANE_SIM_API_KEY`.
//!
//! ```text
//! fleetplane-sim --url ws://127.0.0.1:4320/v1/opamp --agents 1000 --duration-secs 60 \
//!     [--heartbeat-secs 30] [--status-every-secs 10] [--reject-share 0.1] [--source-ips 4] \
//!     [--first-source-ip 1] [--connect-rate 5000] [--push-config 127.0.0.1:4321] [--json]
//! ```
//!
//! `--url http://…` simulates plain-HTTP agents polling at the heartbeat
//! interval. `--source-ips N` spreads connections over 127.0.0.F … 127.0.0.F+N-1
//! (F from `--first-source-ip`; one source address reaches one port about
//! 28,000 times). `--status-every-secs S` makes every agent report a health
//! change every S seconds. `--push-config ADMIN` runs the config-push
//! scenario: once the fleet is up it creates a config version and assigns it
//! to the simulated agents through the admin API, and the summary shows how
//! fast it reached them. The run ends after `--duration-secs` or on SIGTERM or
//! Ctrl-C, with goodbyes; `--json` prints the summary as one JSON object.
// Load tools and tests measure wall-clock time on purpose.
#![allow(clippy::disallowed_types)]

use std::{
    net::IpAddr,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use anyhow::{Context, bail};
use fleetplane_loadtest::{SimConfig, run, summary::now_ms};
use fleetplane_testkit::admin::Admin;
use tokio_util::sync::CancellationToken;

fn main() -> anyhow::Result<()> {
    let mut config = SimConfig {
        // The bench hands its key over the environment (no secret in `ps`).
        api_key: std::env::var("FLEETPLANE_SIM_API_KEY").ok().filter(|k| !k.is_empty()),
        ..SimConfig::default()
    };
    let mut duration = Duration::from_secs(30);
    let mut push_config: Option<String> = None;
    let (mut source_ips, mut first_source_ip) = (1u8, 1u8);
    let mut json = false;
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
            "--status-every-secs" => {
                let secs: f64 = value()?.parse()?;
                config.status_every = (secs > 0.0).then(|| Duration::from_secs_f64(secs));
            }
            "--reject-share" => config.reject_share = value()?.parse()?,
            "--connect-rate" => config.connect_rate = value()?.parse()?,
            "--service-name" => config.service_name = value()?,
            "--source-ips" => source_ips = value()?.parse::<u8>()?.max(1),
            "--first-source-ip" => first_source_ip = value()?.parse::<u8>()?.max(1),
            "--push-config" => push_config = Some(value()?),
            "--json" => json = true,
            "--api-key" => config.api_key = Some(value()?),
            "--help" | "-h" => {
                println!("see the module documentation: fleetplane-sim --url URL --agents N --duration-secs S ...");
                return Ok(());
            }
            other => bail!("unknown argument {other:?}"),
        }
    }
    if !config.url.starts_with("ws://") && !config.url.starts_with("http://") {
        bail!("--url must start with ws:// or http://, not {:?}", config.url);
    }
    config.source_ips = (0..source_ips)
        .map(|i| IpAddr::from([127, 0, 0, first_source_ip.saturating_add(i)]))
        .collect();
    let runtime = tokio::runtime::Runtime::new()?;
    let service = config.service_name.clone();
    let pushed_at = Arc::new(AtomicU64::new(0));
    let pushed = pushed_at.clone();
    let stop = CancellationToken::new();
    let summary = runtime.block_on(async move {
        let on_signal = stop.clone();
        tokio::spawn(async move {
            let mut term =
                tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).expect("a SIGTERM handler");
            tokio::select! {
                _ = term.recv() => {}
                _ = tokio::signal::ctrl_c() => {}
            }
            on_signal.cancel();
        });
        run(config, duration, stop, async move {
            if let Some(admin) = push_config {
                push(&Admin::new(admin), &service, &pushed).await;
            }
        })
        .await
    });
    let mut summary = summary;
    summary.pushed_at = Some(pushed_at.load(Ordering::Relaxed)).filter(|t| *t > 0);
    if json {
        println!("{}", summary.to_json());
    } else {
        println!("{}", summary.report());
    }
    Ok(())
}

/// Creates a config version and assigns it to the simulated agents.
async fn push(admin: &Admin, service: &str, pushed_at: &AtomicU64) {
    let body = format!("simulated: {}", now_ms());
    if let Err(e) = admin.create_config(service, "sim.yaml", &body, "text/yaml").await {
        eprintln!("creating the config failed: {e:#}");
        return;
    }
    pushed_at.store(now_ms(), Ordering::Relaxed);
    if let Err(e) = admin.assign(service, &format!("service.name={service}"), service).await {
        eprintln!("assigning the config failed: {e:#}");
    }
}
