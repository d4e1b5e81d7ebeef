//! `fleetplane`: runs the all-in-one control plane.
//!
//! ```text
//! fleetplane [--config FILE]
//! ```

use std::path::PathBuf;

use anyhow::{Context, bail};
use fleetplane::{AllInOne, Config, config::LogFormat};
use tracing_subscriber::EnvFilter;

const USAGE: &str = "usage: fleetplane [--config FILE]\n\nRuns the all-in-one OpAMP control plane. See README.md for the configuration.";

fn parse_args() -> anyhow::Result<Option<PathBuf>> {
    let mut args = std::env::args().skip(1);
    let mut config = None;
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--config" | "-c" => config = Some(PathBuf::from(args.next().context("--config needs a file")?)),
            "--help" | "-h" => {
                println!("{USAGE}");
                std::process::exit(0);
            }
            "all-in-one" => {}
            other => bail!("unknown argument {other:?}\n\n{USAGE}"),
        }
    }
    Ok(config)
}

fn init_logging(config: &Config) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(&config.log.filter));
    let builder = tracing_subscriber::fmt().with_env_filter(filter);
    match config.log.format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
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
    let path = parse_args()?;
    let config = Config::load(path.as_deref(), |name| std::env::var(name).ok())?;
    init_logging(&config);
    let server = AllInOne::start(&config).await?;
    // The one line a new user needs; also what scripts wait for.
    println!(
        "fleetplane ready: opamp ws://{0}/v1/opamp and http://{0}/v1/opamp, admin http://{1}/api/v1",
        server.opamp_addr, server.admin_addr
    );
    shutdown_signal().await;
    tracing::info!("shutting down");
    server.stop().await
}
