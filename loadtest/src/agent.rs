//! What every simulated agent does whatever its transport: react to replies
//! (apply configs, honour Unavailable), churn its status, and record what it
//! saw. The behaviour is the test kit's `AgentCore`, the same simulated agent
//! the integration tests use.

use std::{
    sync::{Arc, Mutex},
    time::Duration,
};

use fleetplane_proto::{
    ConfigHash,
    opamp::{AgentToServer, ServerErrorResponseType, ServerToAgent, server_error_response::Details},
};
use fleetplane_testkit::agent::{AgentCore, AgentOptions};

use crate::{SimConfig, Summary, summary::now_ms};

/// The fleet's shared record.
#[derive(Debug, Default)]
pub(crate) struct Record {
    pub summary: Summary,
    /// Agents currently connected (WebSocket) or answered at their last poll (HTTP).
    pub connected: usize,
}

/// A handle on the shared record.
#[derive(Debug, Default, Clone)]
pub(crate) struct Recorder(Arc<Mutex<Record>>);

impl Recorder {
    pub fn with<T>(&self, f: impl FnOnce(&mut Record) -> T) -> T {
        f(&mut self.0.lock().unwrap_or_else(|p| p.into_inner()))
    }

    pub fn error(&self, kind: impl Into<String>) {
        self.with(|r| *r.summary.errors.entry(kind.into()).or_default() += 1);
    }
}

/// What a reply asks of the agent.
pub(crate) enum Reaction {
    /// Send these (possibly nothing) and carry on.
    Send(Vec<AgentToServer>),
    /// The server is unavailable: go away for at least this long.
    Leave(Duration),
}

/// One simulated agent's state across its connections.
pub(crate) struct SimulatedAgent {
    pub core: AgentCore,
    pub recorder: Recorder,
    rejects: bool,
    /// The config the agent was last sent: a re-offer of it counts once.
    current: Option<ConfigHash>,
    /// The agent sent a config status and waits for its acknowledgement.
    awaiting_ack: bool,
    /// Next health to report when churning.
    healthy: bool,
    /// When each reconnection was answered (ms since the epoch).
    pub returns: Vec<u64>,
}

impl SimulatedAgent {
    pub fn new(config: &SimConfig, index: usize, recorder: Recorder) -> Self {
        let mut options = AgentOptions::default().attr("service.name", &config.service_name);
        let rejects = (index as f64) < config.reject_share * config.agents as f64;
        if rejects {
            options = options.reject_configs("rejected by the simulator");
        }
        Self {
            core: AgentCore::new(options),
            recorder,
            rejects,
            current: None,
            awaiting_ack: false,
            healthy: false,
            returns: Vec::new(),
        }
    }

    /// A health change: the agent flips between healthy and failing.
    pub fn status_change(&mut self) -> AgentToServer {
        self.recorder.with(|r| r.summary.status_changes += 1);
        let healthy = self.healthy;
        self.healthy = !healthy;
        self.core
            .health_report(healthy, if healthy { "" } else { "simulated failure" })
    }

    pub fn heartbeat(&mut self) -> AgentToServer {
        self.recorder.with(|r| r.summary.heartbeats += 1);
        self.core.heartbeat()
    }

    /// Reacts to one server message.
    pub fn on_reply(&mut self, reply: ServerToAgent) -> Reaction {
        let now = now_ms();
        let acked = std::mem::take(&mut self.awaiting_ack) && reply.error_response.is_none();
        self.recorder.with(|r| {
            r.summary.replies += 1;
            if acked {
                r.summary.config_acked.push(now);
            }
        });
        if let Some(error) = &reply.error_response
            && error.r#type == ServerErrorResponseType::Unavailable as i32
        {
            let floor = match &error.details {
                Some(Details::RetryInfo(info)) => Duration::from_nanos(info.retry_after_nanoseconds),
                None => Duration::ZERO,
            };
            self.recorder.error("unavailable");
            return Reaction::Leave(floor);
        }
        let config_hash = reply
            .remote_config
            .as_ref()
            .and_then(|r| ConfigHash::from_slice(&r.config_hash).ok());
        let out = self.core.on_reply(reply);
        // A config counts when it differs from the one the agent runs: a
        // re-sent offer is not a change, a return to an earlier one is.
        if let Some(hash) = config_hash.filter(|h| self.current != Some(*h)) {
            self.current = Some(hash);
            let rejects = self.rejects;
            self.awaiting_ack = !out.is_empty();
            self.recorder.with(|r| {
                r.summary.configs.entry(hash).or_default().push(now);
                if rejects {
                    r.summary.failed += 1
                } else {
                    r.summary.applied += 1
                }
            });
        }
        Reaction::Send(out)
    }
}
