//! Simulator processes: the benchmark runs each group of agents as a
//! `fleetplane-sim` child (a process holds at most 20,000 open files here),
//! stops it with SIGTERM and reads its JSON summary.

use std::{path::Path, process::Stdio};

use anyhow::{Context, bail};
use serde_json::Value;
use tokio::{
    io::AsyncReadExt,
    process::{Child, Command},
};

/// One running `fleetplane-sim`.
#[derive(Debug)]
pub struct Sim {
    child: Child,
    pub agents: usize,
}

/// Where and how a group of agents connects.
#[derive(Debug, Clone)]
pub struct SimSpec {
    pub url: String,
    pub agents: usize,
    pub heartbeat_secs: f64,
    pub status_every_secs: f64,
    /// Source addresses 127.0.0.`first` onwards.
    pub first_source_ip: u8,
    pub source_ips: u8,
    pub connect_rate: u32,
}

impl SimSpec {
    pub fn idle(url: String, agents: usize, first_source_ip: u8) -> Self {
        Self {
            url,
            agents,
            heartbeat_secs: 30.0,
            status_every_secs: 0.0,
            first_source_ip,
            source_ips: 2,
            connect_rate: 5000,
        }
    }
}

/// The API key every simulator started from now on presents (the control
/// plane under test changes between phases, and with it the key).
static API_KEY: std::sync::Mutex<Option<String>> = std::sync::Mutex::new(None);

/// Makes simulators started from now on present `key`.
pub fn use_api_key(key: String) {
    *API_KEY.lock().unwrap_or_else(|p| p.into_inner()) = Some(key);
}

impl Sim {
    pub fn start(binary: &Path, spec: &SimSpec) -> anyhow::Result<Self> {
        let mut command = Command::new(binary);
        if let Some(key) = API_KEY.lock().unwrap_or_else(|p| p.into_inner()).clone() {
            // Through the environment, not the command line: no secret in `ps`.
            command.env("FLEETPLANE_SIM_API_KEY", key);
        }
        let child = command
            .args(["--url", &spec.url, "--agents", &spec.agents.to_string()])
            .args(["--duration-secs", "3600", "--json", "--service-name", "bench"])
            .args(["--heartbeat-secs", &spec.heartbeat_secs.to_string()])
            .args(["--status-every-secs", &spec.status_every_secs.to_string()])
            .args(["--first-source-ip", &spec.first_source_ip.to_string()])
            .args(["--source-ips", &spec.source_ips.to_string()])
            .args(["--connect-rate", &spec.connect_rate.to_string()])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("starting {}", binary.display()))?;
        Ok(Self {
            child,
            agents: spec.agents,
        })
    }

    /// SIGTERM (the agents say goodbye), then the summary.
    pub async fn stop(mut self) -> anyhow::Result<Value> {
        let pid = self.child.id().context("simulator already gone")?;
        let status = std::process::Command::new("kill")
            .args(["-TERM", &pid.to_string()])
            .status()?;
        if !status.success() {
            bail!("kill -TERM {pid} failed");
        }
        let mut out = String::new();
        let mut stdout = self.child.stdout.take().context("stdout")?;
        tokio::time::timeout(std::time::Duration::from_secs(120), stdout.read_to_string(&mut out))
            .await
            .context("simulator did not finish within 120 s")??;
        self.child.wait().await?;
        serde_json::from_str(out.trim()).with_context(|| format!("simulator summary {out:?}"))
    }
}
