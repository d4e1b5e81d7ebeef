//! The fleet simulator: N OpAMP agents over WebSocket or plain HTTP from one
//! process, with the client behaviour the spec asks for (exponential backoff
//! with full jitter, honouring `Retry-After` and `RetryInfo`, heartbeats,
//! status churn, applying pushed configs and reporting APPLIED, or FAILED for
//! a chosen share), spread over many loopback source addresses (127.0.0.x) to
//! get past one address's port range. It reports connections held, connect
//! and config-push latencies (p50/p99), reconnections and errors by kind, as
//! text or as JSON for the macro benchmark.
//!
//! Each agent is one task; its behaviour is the test kit's `AgentCore`, the
//! same simulated agent the integration tests use.
// Load tools and tests measure wall-clock time on purpose.
#![allow(clippy::disallowed_types)]

mod agent;
mod http_agent;
pub mod summary;
mod ws_agent;

use std::{
    net::IpAddr,
    time::{Duration, Instant},
};

use tokio_util::sync::CancellationToken;

use crate::agent::{Recorder, SimulatedAgent};
pub use crate::summary::{Summary, percentile};

/// What to simulate.
#[derive(Debug, Clone)]
pub struct SimConfig {
    /// `ws://host:port/v1/opamp` (WebSocket agents) or
    /// `http://host:port/v1/opamp` (plain-HTTP agents, polling).
    pub url: String,
    /// Number of agents.
    pub agents: usize,
    /// Source addresses, used round-robin (127.0.0.1, 127.0.0.2, ...).
    pub source_ips: Vec<IpAddr>,
    /// Heartbeat interval (the poll interval of HTTP agents); `None`: no
    /// heartbeats (HTTP agents then poll every 30 s).
    pub heartbeat: Option<Duration>,
    /// Status churn: each agent reports a health change this often.
    pub status_every: Option<Duration>,
    /// Share of agents (0.0 to 1.0) that report pushed configs FAILED.
    pub reject_share: f64,
    /// New connections started per second (0: all at once).
    pub connect_rate: u32,
    /// `service.name` of every agent (assignments select on it).
    pub service_name: String,
    /// API key presented by every agent (`Authorization: Bearer`).
    pub api_key: Option<String>,
}

impl Default for SimConfig {
    fn default() -> Self {
        Self {
            url: "ws://127.0.0.1:4320/v1/opamp".into(),
            agents: 100,
            source_ips: vec![IpAddr::from([127, 0, 0, 1])],
            heartbeat: Some(Duration::from_secs(30)),
            status_every: None,
            reject_share: 0.0,
            connect_rate: 0,
            service_name: "fleetplane-sim".into(),
            api_key: None,
        }
    }
}

impl SimConfig {
    fn is_http(&self) -> bool {
        self.url.starts_with("http://")
    }
}

/// Runs the fleet until `duration` passes or `stop` is cancelled. `mid_run`
/// is awaited once every agent is connected (or after half the run), for
/// scenarios such as a config push; the summary is measured at the end.
pub async fn run<F>(config: SimConfig, duration: Duration, stop: CancellationToken, mid_run: F) -> Summary
where
    F: std::future::Future<Output = ()>,
{
    let config = std::sync::Arc::new(config);
    let recorder = Recorder::default();
    let started = Instant::now();
    let deadline = {
        let stop = stop.clone();
        tokio::spawn(async move {
            tokio::time::sleep(duration).await;
            stop.cancel();
        })
    };
    // HTTP agents share one connection pool per source address.
    let clients: Vec<reqwest::Client> = if config.is_http() {
        config
            .source_ips
            .iter()
            .map(|ip| {
                reqwest::Client::builder()
                    .local_address(*ip)
                    .build()
                    .expect("an HTTP client with a local address")
            })
            .collect()
    } else {
        Vec::new()
    };
    let mut tasks = tokio::task::JoinSet::new();
    for index in 0..config.agents {
        if config.connect_rate > 0 && index > 0 && index % config.connect_rate as usize == 0 {
            tokio::select! {
                _ = stop.cancelled() => break,
                _ = tokio::time::sleep(Duration::from_secs(1)) => {}
            }
        }
        let agent = SimulatedAgent::new(&config, index, recorder.clone());
        let (config, stop) = (config.clone(), stop.clone());
        let slot = index % config.source_ips.len();
        if config.is_http() {
            let client = clients[slot].clone();
            tasks.spawn(async move { http_agent::run(&config, client, agent, stop).await });
        } else {
            let source = config.source_ips[slot];
            tasks.spawn(async move { ws_agent::run(&config, source, agent, stop).await });
        }
    }
    // Wait for the fleet to be up (bounded by half the run), then the scenario.
    let up_by = started + duration / 2;
    while Instant::now() < up_by && !stop.is_cancelled() {
        if recorder.with(|r| r.connected >= config.agents) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let connected_mid_run = recorder.with(|r| r.connected);
    tokio::select! {
        _ = stop.cancelled() => {}
        _ = mid_run => {}
    }
    stop.cancelled().await;
    let mut returns = Vec::with_capacity(config.agents);
    while let Some(result) = tasks.join_next().await {
        returns.push(result.unwrap_or_default());
    }
    deadline.abort();
    // Agents stop counting themselves when a connection fails, not when the run ends.
    let held_at_end = recorder.with(|r| r.connected);
    let mut summary = recorder.with(|r| std::mem::take(&mut r.summary));
    summary.agents = config.agents;
    summary.connected = connected_mid_run;
    summary.held_at_end = held_at_end;
    summary.returns = returns;
    summary
}
