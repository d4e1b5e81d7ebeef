//! The fleet simulator: N OpAMP agents over WebSocket from one process, with
//! the client behaviour the spec asks for (exponential backoff with full
//! jitter, honouring `Retry-After` and `RetryInfo`, heartbeats, applying pushed
//! configs and reporting APPLIED, or FAILED for a chosen share), spread over
//! many loopback source addresses (127.0.0.x) to get past one address's port
//! range. It prints connections held, connect and config-push latencies
//! (p50/p99) and errors by kind.
//!
//! Each agent is one task; its behaviour is the test kit's `AgentCore`, the
//! same simulated agent the integration tests use.

use std::{
    collections::BTreeMap,
    net::{IpAddr, SocketAddr},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use fleetplane_proto::{
    ConfigHash, framing,
    opamp::{ServerErrorResponseType, ServerToAgent, server_error_response::Details},
    retry::Backoff,
};
use fleetplane_testkit::agent::{AgentCore, AgentOptions};
use futures_util::{SinkExt, StreamExt};
use tokio::net::TcpSocket;
use tokio_tungstenite::tungstenite::{Error as WsError, Message as WsMessage};

/// What to simulate.
#[derive(Debug, Clone)]
pub struct SimConfig {
    /// `ws://host:port/v1/opamp`.
    pub url: String,
    /// Number of agents.
    pub agents: usize,
    /// Source addresses, used round-robin (127.0.0.1, 127.0.0.2, ...).
    pub source_ips: Vec<IpAddr>,
    /// Heartbeat interval; `None`: no heartbeats.
    pub heartbeat: Option<Duration>,
    /// Share of agents (0.0 to 1.0) that report pushed configs FAILED.
    pub reject_share: f64,
    /// New connections started per second (0: all at once).
    pub connect_rate: u32,
    /// `service.name` of every agent (assignments select on it).
    pub service_name: String,
}

/// What happened, per kind.
#[derive(Debug, Default, Clone)]
pub struct Summary {
    pub agents: usize,
    /// Agents connected at the end.
    pub connected: usize,
    /// Time from starting to connect to the first reply, per connection.
    pub connect_latencies: Vec<Duration>,
    /// Configs received, by hash: receive time after the run started.
    pub configs: BTreeMap<ConfigHash, Vec<Duration>>,
    pub applied: usize,
    pub failed: usize,
    pub heartbeats: usize,
    pub reconnects: usize,
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

impl Summary {
    /// The summary as printed: one line per figure.
    pub fn report(&self) -> String {
        let ms = |d: Option<Duration>| d.map_or("-".into(), |d| format!("{:.1} ms", d.as_secs_f64() * 1000.0));
        let mut lines = vec![
            format!("agents                {}", self.agents),
            format!("connections held      {}", self.connected),
            format!(
                "connect latency       p50 {}  p99 {}",
                ms(percentile(&self.connect_latencies, 50.0)),
                ms(percentile(&self.connect_latencies, 99.0))
            ),
            format!("heartbeats sent       {}", self.heartbeats),
            format!("reconnects            {}", self.reconnects),
            format!("configs applied       {}  failed {}", self.applied, self.failed),
        ];
        for (hash, times) in &self.configs {
            let first = times.iter().min().copied().unwrap_or_default();
            let spread: Vec<Duration> = times.iter().map(|t| *t - first).collect();
            lines.push(format!(
                "config {}…  reached {} agents; after the first: p50 {}  p99 {}",
                &hash.to_string()[..12],
                times.len(),
                ms(percentile(&spread, 50.0)),
                ms(percentile(&spread, 99.0))
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
}

#[derive(Debug, Default)]
struct Shared {
    summary: Summary,
    connected: usize,
}

type Socket = tokio_tungstenite::WebSocketStream<tokio::net::TcpStream>;

async fn connect(url: &str, source: IpAddr) -> Result<Socket, (String, Duration)> {
    let request = url.trim_start_matches("ws://");
    let authority = request.split('/').next().unwrap_or_default();
    let addr: SocketAddr = tokio::net::lookup_host(authority)
        .await
        .ok()
        .and_then(|mut a| a.next())
        .ok_or_else(|| ("resolve".to_owned(), Duration::ZERO))?;
    let socket = if addr.is_ipv4() {
        TcpSocket::new_v4()
    } else {
        TcpSocket::new_v6()
    }
    .map_err(|e| (format!("socket: {}", e.kind()), Duration::ZERO))?;
    socket
        .bind(SocketAddr::new(source, 0))
        .map_err(|e| (format!("bind: {}", e.kind()), Duration::ZERO))?;
    let stream = socket
        .connect(addr)
        .await
        .map_err(|e| (format!("connect: {}", e.kind()), Duration::ZERO))?;
    match tokio_tungstenite::client_async(url, stream).await {
        Ok((socket, _)) => Ok(socket),
        Err(WsError::Http(response)) => {
            let wait = response
                .headers()
                .get("retry-after")
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.parse::<u64>().ok())
                .map_or(Duration::ZERO, Duration::from_secs);
            Err((format!("http_{}", response.status().as_u16()), wait))
        }
        Err(e) => Err((format!("handshake: {e}"), Duration::ZERO)),
    }
}

/// One agent's life until `until`.
async fn run_agent(config: Arc<SimConfig>, index: usize, started: Instant, until: Instant, shared: Arc<Mutex<Shared>>) {
    let source = config.source_ips[index % config.source_ips.len()];
    let mut options = AgentOptions::default().attr("service.name", &config.service_name);
    let rejects = (index as f64) < config.reject_share * config.agents as f64;
    if rejects {
        options = options.reject_configs("rejected by the simulator");
    }
    let mut core = AgentCore::new(options);
    let mut backoff = Backoff::new(Duration::from_millis(200), Duration::from_secs(30));
    let mut first = true;
    // A config re-offered before the agent's status arrived counts once.
    let mut received = std::collections::HashSet::new();
    let record = |f: &dyn Fn(&mut Shared)| {
        let mut s = shared.lock().unwrap_or_else(|p| p.into_inner());
        f(&mut s);
    };
    while Instant::now() < until {
        let attempt = Instant::now();
        let mut socket = match connect(&config.url, source).await {
            Ok(socket) => socket,
            Err((kind, floor)) => {
                record(&|s| *s.summary.errors.entry(kind.clone()).or_default() += 1);
                tokio::time::sleep(backoff.next_wait(floor)).await;
                continue;
            }
        };
        let opening = if first { core.full_report() } else { core.heartbeat() };
        if !first {
            record(&|s| s.summary.reconnects += 1);
        }
        first = false;
        if socket
            .send(WsMessage::Binary(framing::encode_ws(&opening).into()))
            .await
            .is_err()
        {
            continue;
        }
        let mut answered = false;
        let mut retry_floor = Duration::ZERO;
        let mut ticker = config.heartbeat.map(|every| {
            // Agents started together do not beat together.
            tokio::time::interval_at(
                tokio::time::Instant::now() + fleetplane_proto::retry::uniform(every),
                every,
            )
        });
        let deadline = tokio::time::Instant::from_std(until);
        loop {
            tokio::select! {
                _ = tokio::time::sleep_until(deadline) => break,
                _ = async { match ticker.as_mut() { Some(t) => { t.tick().await; } None => std::future::pending().await } } => {
                    let beat = core.heartbeat();
                    record(&|s| s.summary.heartbeats += 1);
                    if socket.send(WsMessage::Binary(framing::encode_ws(&beat).into())).await.is_err() {
                        record(&|s| *s.summary.errors.entry("send".into()).or_default() += 1);
                        break;
                    }
                }
                frame = socket.next() => {
                    let bytes = match frame {
                        Some(Ok(WsMessage::Binary(bytes))) => bytes,
                        Some(Ok(WsMessage::Close(_))) | None | Some(Err(_)) => {
                            record(&|s| *s.summary.errors.entry("closed".into()).or_default() += 1);
                            break;
                        }
                        Some(Ok(_)) => continue,
                    };
                    let Ok(reply) = framing::decode_ws::<ServerToAgent>(&bytes, usize::MAX) else {
                        record(&|s| *s.summary.errors.entry("undecodable".into()).or_default() += 1);
                        break;
                    };
                    if !answered {
                        answered = true;
                        backoff.reset();
                        let latency = attempt.elapsed();
                        record(&|s| {
                            s.summary.connect_latencies.push(latency);
                            s.connected += 1;
                        });
                    }
                    if let Some(error) = &reply.error_response
                        && error.r#type == ServerErrorResponseType::Unavailable as i32
                    {
                        retry_floor = match &error.details {
                            Some(Details::RetryInfo(info)) => Duration::from_nanos(info.retry_after_nanoseconds),
                            None => Duration::ZERO,
                        };
                        record(&|s| *s.summary.errors.entry("unavailable".into()).or_default() += 1);
                        break;
                    }
                    let config_hash = reply
                        .remote_config
                        .as_ref()
                        .and_then(|r| ConfigHash::from_slice(&r.config_hash).ok());
                    let out = core.on_reply(reply);
                    if let Some(hash) = config_hash.filter(|h| received.insert(*h)) {
                        let at = started.elapsed();
                        record(&|s| {
                            s.summary.configs.entry(hash).or_default().push(at);
                            if rejects { s.summary.failed += 1 } else { s.summary.applied += 1 }
                        });
                    }
                    for message in out {
                        if socket.send(WsMessage::Binary(framing::encode_ws(&message).into())).await.is_err() {
                            break;
                        }
                    }
                }
            }
        }
        if answered {
            record(&|s| s.connected -= 1);
        }
        if Instant::now() >= until {
            // Say goodbye properly at the end of the run.
            let bye = core.disconnect();
            let _ = socket.send(WsMessage::Binary(framing::encode_ws(&bye).into())).await;
            let _ = socket.close(None).await;
            break;
        }
        tokio::time::sleep(backoff.next_wait(retry_floor)).await;
    }
}

/// Runs the fleet for `duration`; `mid_run` is awaited once every agent is
/// connected (or after the connect phase), for scenarios such as a config
/// push, and returns the summary measured at the end.
pub async fn run<F>(config: SimConfig, duration: Duration, mid_run: F) -> Summary
where
    F: std::future::Future<Output = ()>,
{
    let config = Arc::new(config);
    let shared = Arc::new(Mutex::new(Shared::default()));
    let started = Instant::now();
    let until = started + duration;
    let mut tasks = tokio::task::JoinSet::new();
    for index in 0..config.agents {
        if config.connect_rate > 0 && index > 0 && index % config.connect_rate as usize == 0 {
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
        tasks.spawn(run_agent(config.clone(), index, started, until, shared.clone()));
    }
    // Wait for the fleet to be up (bounded by the run), then the scenario.
    let up_by = started + duration / 2;
    while Instant::now() < up_by {
        if shared.lock().map(|s| s.connected >= config.agents).unwrap_or(false) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let connected_mid_run = shared.lock().map(|s| s.connected).unwrap_or(0);
    mid_run.await;
    while tasks.join_next().await.is_some() {}
    let mut summary = shared.lock().map(|s| s.summary.clone()).unwrap_or_default();
    summary.agents = config.agents;
    summary.connected = connected_mid_run;
    summary
}
