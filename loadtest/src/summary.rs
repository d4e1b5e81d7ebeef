//! What a simulated fleet saw, as a printed report and as JSON for the macro
//! benchmark, which combines the figures of several simulator processes.

use std::{collections::BTreeMap, time::Duration};

use fleetplane_proto::ConfigHash;
use serde_json::{Value, json};

/// Milliseconds since the Unix epoch: the clock every simulator process and
/// the benchmark share, so their instants can be compared.
pub use fleetplane_proto::clock::unix_ms as now_ms;

/// What happened, per kind.
#[derive(Debug, Default, Clone)]
pub struct Summary {
    pub agents: usize,
    /// Agents connected once the fleet was up (before the mid-run scenario).
    pub connected: usize,
    /// Agents connected when the run ended.
    pub held_at_end: usize,
    /// Time from starting to connect to the first reply, per connection.
    pub connect_latencies: Vec<Duration>,
    /// Configs received, by hash: when each agent got it (ms since the epoch).
    pub configs: BTreeMap<ConfigHash, Vec<u64>>,
    /// When the control plane acknowledged an agent's APPLIED or FAILED
    /// status for a received config (ms since the epoch): the whole path.
    pub config_acked: Vec<u64>,
    /// When the scenario pushed a config (ms since the epoch), if it did.
    pub pushed_at: Option<u64>,
    pub applied: usize,
    pub failed: usize,
    pub heartbeats: usize,
    /// Health changes sent (status churn).
    pub status_changes: usize,
    /// Server messages received.
    pub replies: usize,
    pub reconnects: usize,
    /// Per agent, when each reconnection was answered (ms since the epoch).
    pub returns: Vec<Vec<u64>>,
    /// Errors by kind (`connect`, `http_503`, `unavailable`, `closed`, ...).
    pub errors: BTreeMap<String, usize>,
}

/// A percentile of a set of durations.
pub fn percentile(values: &[Duration], p: f64) -> Option<Duration> {
    if values.is_empty() {
        return None;
    }
    let mut sorted = values.to_vec();
    sorted.sort();
    let rank = ((p / 100.0) * (sorted.len() - 1) as f64).round() as usize;
    sorted.get(rank).copied()
}

/// Durations from `origin` to each of `instants` (ms since the epoch).
pub fn since(origin: u64, instants: &[u64]) -> Vec<Duration> {
    instants
        .iter()
        .map(|t| Duration::from_millis(t.saturating_sub(origin)))
        .collect()
}

/// `p50 … p99 …` of a set of durations, in milliseconds.
pub fn p50_p99(values: &[Duration]) -> String {
    let ms = |d: Option<Duration>| d.map_or("-".into(), |d| format!("{:.1} ms", d.as_secs_f64() * 1000.0));
    format!(
        "p50 {}  p99 {}",
        ms(percentile(values, 50.0)),
        ms(percentile(values, 99.0))
    )
}

impl Summary {
    /// The summary as printed: one line per figure.
    pub fn report(&self) -> String {
        let mut lines = vec![
            format!("agents                {}", self.agents),
            format!(
                "connections held      {} (at the end: {})",
                self.connected, self.held_at_end
            ),
            format!("connect latency       {}", p50_p99(&self.connect_latencies)),
            format!("heartbeats sent       {}", self.heartbeats),
            format!("status changes sent   {}", self.status_changes),
            format!("replies received      {}", self.replies),
            format!("reconnects            {}", self.reconnects),
            format!("configs applied       {}  failed {}", self.applied, self.failed),
        ];
        for (hash, times) in &self.configs {
            let first = times.iter().min().copied().unwrap_or_default();
            let origin = self.pushed_at.unwrap_or(first);
            let from = if self.pushed_at.is_some() {
                "from the push"
            } else {
                "after the first"
            };
            lines.push(format!(
                "config {}…  reached {} agents; {from}: {}",
                &hash.to_string()[..12],
                times.len(),
                p50_p99(&since(origin, times))
            ));
        }
        if let Some(pushed) = self.pushed_at {
            lines.push(format!(
                "config status acked   {} agents; from the push: {}",
                self.config_acked.len(),
                p50_p99(&since(pushed, &self.config_acked))
            ));
        }
        if self.errors.is_empty() {
            lines.push("errors                none".into());
        }
        for (kind, n) in &self.errors {
            lines.push(format!("errors                {kind}: {n}"));
        }
        lines.join("\n")
    }

    /// Everything, for a program: instants in ms since the epoch.
    pub fn to_json(&self) -> Value {
        let ms = |d: Option<Duration>| d.map(|d| d.as_secs_f64() * 1000.0);
        json!({
            "agents": self.agents,
            "connected": self.connected,
            "held_at_end": self.held_at_end,
            "connect_p50_ms": ms(percentile(&self.connect_latencies, 50.0)),
            "connect_p99_ms": ms(percentile(&self.connect_latencies, 99.0)),
            "configs": self.configs.iter().map(|(h, t)| (h.to_string(), json!(t))).collect::<serde_json::Map<_, _>>(),
            "config_acked": self.config_acked,
            "pushed_at": self.pushed_at,
            "applied": self.applied,
            "failed": self.failed,
            "heartbeats": self.heartbeats,
            "status_changes": self.status_changes,
            "replies": self.replies,
            "reconnects": self.reconnects,
            "returns": self.returns,
            "errors": self.errors,
        })
    }
}
