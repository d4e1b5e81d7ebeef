//! `fleetplane`: runs the control plane.
//!
//! ```text
//! fleetplane [all-in-one | gateway | coordinator] [--config FILE]
//! ```

use std::path::PathBuf;

use anyhow::{Context, bail};
use fleetplane::{AllInOne, Config, CoordinatorNode, GatewayNode, telemetry_config};
use fleetplane_telemetry::Telemetry;

/// mimalloc instead of the system allocator: a gateway's memory is tens of
/// thousands of small per-connection allocations, and after a reconnect storm
/// glibc's malloc kept the storm's peak resident (9.7 KiB per agent an idle
/// minute later, against 6.5 KiB before it), while mimalloc returns freed
/// pages to the system.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

const USAGE: &str = "usage: fleetplane [all-in-one | gateway | coordinator] [--config FILE]

  all-in-one   (default) gateway and coordinator in one process, embedded store, no external services
  gateway      a stateless OpAMP gateway on NATS
  coordinator  a coordinator replica on NATS and Redis, serving the admin API

See README.md for the configuration.";

#[derive(Debug, Clone, Copy)]
enum Mode {
    AllInOne,
    Gateway,
    Coordinator,
}

fn parse_args() -> anyhow::Result<(Mode, Option<PathBuf>)> {
    let mut args = std::env::args().skip(1);
    let mut config = None;
    let mut mode = Mode::AllInOne;
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--config" | "-c" => config = Some(PathBuf::from(args.next().context("--config needs a file")?)),
            "--help" | "-h" => {
                println!("{USAGE}");
                std::process::exit(0);
            }
            "all-in-one" => mode = Mode::AllInOne,
            "gateway" => mode = Mode::Gateway,
            "coordinator" => mode = Mode::Coordinator,
            other => bail!("unknown argument {other:?}\n\n{USAGE}"),
        }
    }
    Ok((mode, config))
}

/// Every agent connection is an open file: raise the soft limit to the hard
/// one, and say clearly when that is still below the connection cap.
fn raise_open_file_limit(max_connections: usize) {
    match rlimit::increase_nofile_limit(u64::MAX) {
        Ok(limit) => {
            // Room for listeners, the bus, the store and log files.
            let needed = max_connections as u64 + 256;
            if max_connections > 0 && limit < needed {
                tracing::warn!(
                    open_file_limit = limit,
                    max_connections,
                    "the open-file limit is lower than the connection cap: connections beyond about {} will fail; \
                     raise the hard limit (ulimit -Hn, LimitNOFILE) or lower gateway.max_connections",
                    limit.saturating_sub(256)
                );
            } else {
                tracing::info!(open_file_limit = limit, "open-file limit");
            }
        }
        Err(e) => tracing::warn!(error = %e, "could not raise the open-file limit"),
    }
}

async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(term) => term,
            Err(_) => {
                let _ = ctrl_c.await;
                return;
            }
        };
        tokio::select! {
            _ = ctrl_c => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    let _ = ctrl_c.await;
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let (mode, path) = parse_args()?;
    let mut config = Config::load(path.as_deref(), |name| std::env::var(name).ok())?;
    if matches!(mode, Mode::Gateway) && config.gateway.id.is_none() {
        // Chosen here so that logs, telemetry and the bus all use one id.
        config.gateway.id = Some(fleetplane_proto::GatewayId::random().to_string());
    }
    let (service, instance) = match mode {
        Mode::AllInOne => ("fleetplane", "all-in-one".to_owned()),
        Mode::Gateway => (
            "fleetplane-gateway",
            config.gateway.id.clone().unwrap_or_else(|| "gateway".into()),
        ),
        Mode::Coordinator => ("fleetplane-coordinator", format!("coordinator-{}", std::process::id())),
    };
    let telemetry = Telemetry::init(&telemetry_config(&config, service, &instance))?;
    if matches!(mode, Mode::AllInOne | Mode::Gateway) {
        raise_open_file_limit(config.gateway.max_connections);
    }
    let metrics = telemetry.metrics_router();
    let result = run(mode, &config, metrics).await;
    telemetry.shutdown();
    result
}

async fn run(mode: Mode, config: &Config, metrics: axum::Router) -> anyhow::Result<()> {
    match mode {
        Mode::AllInOne => {
            let server = AllInOne::start_with(config, metrics).await?;
            println!(
                "fleetplane ready: opamp ws://{0}/v1/opamp and http://{0}/v1/opamp, admin http://{1}/api/v1",
                server.opamp_addr, server.admin_addr
            );
            shutdown_signal().await;
            tracing::info!("shutting down");
            server.stop().await
        }
        Mode::Gateway => {
            let gateway = GatewayNode::start(config, metrics).await?;
            println!(
                "fleetplane gateway ready: opamp ws://{0}/v1/opamp and http://{0}/v1/opamp, health http://{1}/readyz",
                gateway.opamp_addr, gateway.health_addr
            );
            shutdown_signal().await;
            tracing::info!("draining");
            gateway.stop().await
        }
        Mode::Coordinator => {
            let coordinator = CoordinatorNode::start(config, metrics).await?;
            println!(
                "fleetplane coordinator ready: admin http://{}/api/v1",
                coordinator.admin_addr
            );
            shutdown_signal().await;
            tracing::info!("shutting down");
            coordinator.stop().await
        }
    }
}
