//! `fleetplane`: runs the control plane.
//!
//! ```text
//! fleetplane [all-in-one | gateway | coordinator] [--config FILE]
//! ```
//!
//! Once it serves, the process prints one JSON line on stdout
//! ([`fleetplane::ReadyLine`]): `{"event":"ready","role":...,"opamp":...}`.
//! Exit status: 0 after a clean shutdown, 64 for a bad configuration (the
//! message names the setting), 2 for bad arguments, 1 when starting failed
//! (a port taken, NATS or Redis unreachable).

use std::{path::PathBuf, process::ExitCode};

use clap::{Parser, Subcommand};
use fleetplane::{Config, Node, Role, telemetry_config};
use fleetplane_telemetry::Telemetry;

/// mimalloc instead of the system allocator: a gateway's memory is tens of
/// thousands of small per-connection allocations, and after a reconnect storm
/// glibc's malloc kept the storm's peak resident (9.7 KiB per agent an idle
/// minute later, against 6.5 KiB before it), while mimalloc returns freed
/// pages to the system.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Exit status for a configuration that cannot be used (EX_USAGE).
const EXIT_BAD_CONFIG: u8 = 64;

/// Fleetplane: an OpAMP control plane for fleets of telemetry agents.
///
/// Agents (OpenTelemetry Collectors, supervisors, SDKs) connect over OpAMP,
/// WebSocket or plain HTTP, at /v1/opamp; operators use the admin API at
/// /api/v1. Settings come from a TOML file (--config) and FLEETPLANE_*
/// environment variables; see README.md.
#[derive(Debug, Parser)]
#[command(name = "fleetplane", version, about, long_about)]
struct Cli {
    /// Which parts to run (default: all-in-one).
    #[command(subcommand)]
    role: Option<RoleArg>,
    /// TOML configuration file; FLEETPLANE_* environment variables override it.
    #[arg(short, long, global = true, value_name = "FILE", env = "FLEETPLANE_CONFIG")]
    config: Option<PathBuf>,
}

#[derive(Debug, Clone, Copy, Subcommand)]
enum RoleArg {
    /// Gateway and coordinator in one process, embedded store, no external
    /// services. For a first run and small fleets.
    AllInOne,
    /// A stateless OpAMP gateway on NATS; health at /livez and /readyz on
    /// admin.listen. Run several behind a load balancer.
    Gateway,
    /// A coordinator replica on NATS and Redis, serving the admin API. Run
    /// two or more; all are active.
    Coordinator,
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

fn main() -> ExitCode {
    let cli = Cli::parse();
    let role = match cli.role.unwrap_or(RoleArg::AllInOne) {
        RoleArg::AllInOne => Role::AllInOne,
        RoleArg::Gateway => Role::Gateway,
        RoleArg::Coordinator => Role::Coordinator,
    };
    let mut config = match Config::load(cli.config.as_deref(), |name| std::env::var(name).ok()) {
        Ok(config) => config,
        Err(e) => {
            eprintln!("fleetplane: bad configuration: {e}");
            return ExitCode::from(EXIT_BAD_CONFIG);
        }
    };
    if role == Role::Gateway && config.gateway.id.is_none() {
        // Chosen here so that logs, telemetry and the bus all use one id.
        config.gateway.id = Some(fleetplane_proto::GatewayId::random().to_string());
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("fleetplane: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(role, &config)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("fleetplane: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(role: Role, config: &Config) -> anyhow::Result<()> {
    let instance = match role {
        Role::AllInOne => "all-in-one".to_owned(),
        Role::Gateway => config.gateway.id.clone().unwrap_or_else(|| "gateway".into()),
        Role::Coordinator => format!("coordinator-{}", std::process::id()),
    };
    let service = match role {
        Role::AllInOne => "fleetplane",
        Role::Gateway => "fleetplane-gateway",
        Role::Coordinator => "fleetplane-coordinator",
    };
    let telemetry = Telemetry::init(&telemetry_config(config, service, &instance))?;
    if role != Role::Coordinator {
        raise_open_file_limit(config.gateway.max_connections);
    }
    let metrics = guard_metrics(telemetry.metrics_router(), config.telemetry.metrics_token.clone());
    let result = serve(role, config, metrics).await;
    telemetry.shutdown();
    result
}

/// `/metrics` behind `telemetry.metrics_token`, when one is set (compared
/// in constant time; the answer never repeats what was presented).
fn guard_metrics(metrics: axum::Router, token: Option<String>) -> axum::Router {
    use axum::{
        extract::Request,
        http::{StatusCode, header},
        middleware::{self, Next},
        response::{IntoResponse, Response},
    };
    let Some(token) = token.filter(|t| !t.is_empty()) else {
        return metrics;
    };
    let token = std::sync::Arc::new(token);
    metrics.layer(middleware::from_fn(move |request: Request, next: Next| {
        let token = token.clone();
        async move {
            let presented = request
                .headers()
                .get(header::AUTHORIZATION)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.strip_prefix("Bearer "))
                .unwrap_or_default();
            let equal = presented.len() == token.len()
                && presented
                    .bytes()
                    .zip(token.bytes())
                    .fold(0u8, |acc, (a, b)| acc | (a ^ b))
                    == 0;
            if equal {
                next.run(request).await
            } else {
                let response: Response = (StatusCode::UNAUTHORIZED, "metrics need the metrics token").into_response();
                response
            }
        }
    }))
}

async fn serve(role: Role, config: &Config, metrics: axum::Router) -> anyhow::Result<()> {
    let node = Node::start(role, config, metrics).await?;
    println!("{}", serde_json::to_string(&node.ready_line())?);
    shutdown_signal().await;
    tracing::info!(role = role.name(), "shutting down; a second signal stops at once");
    tokio::select! {
        result = node.stop() => result,
        _ = shutdown_signal() => {
            tracing::warn!("second signal: stopping without finishing the drain");
            Ok(())
        }
    }
}
