//! A simulated agent over plain HTTP (spec 3.3): it polls, one POST per
//! heartbeat interval, and sends what a reply asks for (a config status, a
//! full report) at once in the next POST.

use std::time::{Duration, Instant};

use fleetplane_proto::{
    Message, framing,
    http::CONTENT_TYPE_PROTOBUF,
    opamp::{AgentToServer, ServerToAgent},
    retry::Backoff,
};
use tokio_util::sync::CancellationToken;

use crate::{
    SimConfig,
    agent::{Reaction, SimulatedAgent},
};

/// Polls of an agent that did not set a heartbeat interval.
const DEFAULT_POLL: Duration = Duration::from_secs(30);

enum PostError {
    /// Refused with this status and retry hint.
    Status(u16, Duration),
    /// No answer: connection refused, reset, or a body that is not OpAMP.
    Transport(String),
}

async fn post(
    client: &reqwest::Client,
    url: &str,
    message: &AgentToServer,
    api_key: Option<&str>,
) -> Result<ServerToAgent, PostError> {
    let mut request = client
        .post(url)
        .header(reqwest::header::CONTENT_TYPE, CONTENT_TYPE_PROTOBUF);
    if let Some(key) = api_key {
        request = request.bearer_auth(key);
    }
    let response = request.body(message.encode_to_vec()).send().await.map_err(|e| {
        PostError::Transport(if e.is_connect() {
            "connect".into()
        } else {
            "request".into()
        })
    })?;
    let status = response.status();
    if !status.is_success() {
        let retry_after = response
            .headers()
            .get(reqwest::header::RETRY_AFTER)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok())
            .map_or(Duration::ZERO, Duration::from_secs);
        return Err(PostError::Status(status.as_u16(), retry_after));
    }
    let body = response
        .bytes()
        .await
        .map_err(|_| PostError::Transport("body".into()))?;
    framing::decode(&body, usize::MAX).map_err(|_| PostError::Transport("undecodable".into()))
}

/// One agent's life until `stop`.
pub(crate) async fn run(
    config: &SimConfig,
    client: reqwest::Client,
    mut agent: SimulatedAgent,
    stop: CancellationToken,
) -> Vec<u64> {
    let recorder = agent.recorder.clone();
    let poll = config.heartbeat.unwrap_or(DEFAULT_POLL);
    let mut backoff = Backoff::new(Duration::from_millis(200), Duration::from_secs(30));
    let mut answered_once = false;
    // After a failed poll the next answer is a return, as after a reconnection.
    let mut failed_since_answer = false;
    let mut next_churn = config
        .status_every
        .map(|every| Instant::now() + fleetplane_proto::retry::uniform(every));
    let mut pending: Vec<AgentToServer> = vec![agent.core.full_report()];
    // Agents started together do not poll together.
    let mut wait = fleetplane_proto::retry::uniform(poll.min(Duration::from_secs(1)));
    loop {
        tokio::select! {
            _ = stop.cancelled() => break,
            _ = tokio::time::sleep(wait) => {}
        }
        let message = if let Some(message) = pending.pop() {
            message
        } else if let Some(at) = next_churn.filter(|at| *at <= Instant::now()) {
            next_churn = config.status_every.map(|every| at + every);
            agent.status_change()
        } else {
            agent.heartbeat()
        };
        let attempt = Instant::now();
        match post(&client, &config.url, &message, config.api_key.as_deref()).await {
            Ok(reply) if reply.error_response.is_some() => match agent.on_reply(reply) {
                Reaction::Leave(floor) => {
                    failed_since_answer = true;
                    pending.push(message);
                    wait = backoff.next_wait(floor);
                }
                // Other errors (BadRequest) are not retried, as the spec says.
                Reaction::Send(_) => wait = poll,
            },
            Ok(reply) => {
                backoff.reset();
                if !answered_once {
                    answered_once = true;
                    recorder.with(|r| {
                        r.summary.connect_latencies.push(attempt.elapsed());
                        r.connected += 1;
                    });
                } else if std::mem::take(&mut failed_since_answer) {
                    agent.returns.push(crate::summary::now_ms());
                    recorder.with(|r| r.summary.reconnects += 1);
                }
                if let Reaction::Send(out) = agent.on_reply(reply) {
                    // Answers go first (popped from the end), nothing queued is lost.
                    pending.extend(out.into_iter().rev());
                }
                wait = if pending.is_empty() { poll } else { Duration::ZERO };
            }
            Err(PostError::Status(code, retry_after)) => {
                recorder.error(format!("http_{code}"));
                failed_since_answer = true;
                pending.push(message);
                wait = backoff.next_wait(retry_after);
            }
            Err(PostError::Transport(kind)) => {
                recorder.error(kind);
                failed_since_answer = true;
                pending.push(message);
                wait = backoff.next_wait(Duration::ZERO);
            }
        }
    }
    if answered_once {
        // Say goodbye properly at the end of the run.
        let _ = post(
            &client,
            &config.url,
            &agent.core.disconnect(),
            config.api_key.as_deref(),
        )
        .await;
    }
    agent.returns
}
