//! A simulated agent over WebSocket: one long-lived connection, heartbeats
//! and status changes on timers, reconnection with backoff.

use std::{
    net::{IpAddr, SocketAddr},
    time::{Duration, Instant},
};

use fleetplane_proto::{framing, opamp::ServerToAgent, retry::Backoff};
use futures_util::{SinkExt, StreamExt};
use tokio::net::TcpSocket;
use tokio_tungstenite::tungstenite::{Error as WsError, Message as WsMessage, protocol::WebSocketConfig};
use tokio_util::sync::CancellationToken;

use crate::{
    SimConfig,
    agent::{Reaction, SimulatedAgent},
    summary::now_ms,
};

type Socket = tokio_tungstenite::WebSocketStream<tokio::net::TcpStream>;

/// Why a connection attempt failed, and the server's retry hint if any.
struct ConnectError {
    kind: String,
    retry_after: Duration,
}

impl ConnectError {
    fn new(kind: String) -> Self {
        Self {
            kind,
            retry_after: Duration::ZERO,
        }
    }
}

async fn connect(url: &str, source: IpAddr, api_key: Option<&str>) -> Result<Socket, ConnectError> {
    let authority = url.trim_start_matches("ws://").split('/').next().unwrap_or_default();
    let addr: SocketAddr = tokio::net::lookup_host(authority)
        .await
        .ok()
        .and_then(|mut a| a.next())
        .ok_or_else(|| ConnectError::new("resolve".into()))?;
    let socket = if addr.is_ipv4() {
        TcpSocket::new_v4()
    } else {
        TcpSocket::new_v6()
    }
    .map_err(|e| ConnectError::new(format!("socket: {}", e.kind())))?;
    socket
        .bind(SocketAddr::new(source, 0))
        .map_err(|e| ConnectError::new(format!("bind: {}", e.kind())))?;
    let stream = socket
        .connect(addr)
        .await
        .map_err(|e| ConnectError::new(format!("connect: {}", e.kind())))?;
    // Small buffers, as on the gateway: one process simulates tens of
    // thousands of agents, and the default read buffer is 128 KiB each.
    let buffers = WebSocketConfig::default().read_buffer_size(4096).write_buffer_size(0);
    let mut request = tokio_tungstenite::tungstenite::client::IntoClientRequest::into_client_request(url)
        .map_err(|e| ConnectError::new(format!("request: {e}")))?;
    if let Some(key) = api_key
        && let Ok(value) = format!("Bearer {key}").parse()
    {
        request.headers_mut().insert("authorization", value);
    }
    match tokio_tungstenite::client_async_with_config(request, stream, Some(buffers)).await {
        Ok((socket, _)) => Ok(socket),
        Err(WsError::Http(response)) => Err(ConnectError {
            kind: format!("http_{}", response.status().as_u16()),
            retry_after: response
                .headers()
                .get("retry-after")
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.parse::<u64>().ok())
                .map_or(Duration::ZERO, Duration::from_secs),
        }),
        Err(e) => Err(ConnectError::new(format!("handshake: {e}"))),
    }
}

fn frame(message: &fleetplane_proto::opamp::AgentToServer) -> WsMessage {
    WsMessage::Binary(framing::encode_ws(message).into())
}

/// A timer that may be off.
async fn tick(timer: &mut Option<tokio::time::Interval>) {
    match timer {
        Some(t) => {
            t.tick().await;
        }
        None => std::future::pending().await,
    }
}

/// A timer of period `every`, started at a random phase so that agents
/// started together do not act together.
fn timer(every: Option<Duration>) -> Option<tokio::time::Interval> {
    every.map(|every| {
        let mut t = tokio::time::interval_at(
            tokio::time::Instant::now() + fleetplane_proto::retry::uniform(every),
            every,
        );
        t.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        t
    })
}

/// One agent's life until `stop`.
pub(crate) async fn run(
    config: &SimConfig,
    source: IpAddr,
    mut agent: SimulatedAgent,
    stop: CancellationToken,
) -> Vec<u64> {
    let recorder = agent.recorder.clone();
    let mut backoff = Backoff::new(Duration::from_millis(200), Duration::from_secs(30));
    let mut first = true;
    while !stop.is_cancelled() {
        let attempt = Instant::now();
        let connected = tokio::select! {
            _ = stop.cancelled() => break,
            connected = connect(&config.url, source, config.api_key.as_deref()) => connected,
        };
        let mut socket = match connected {
            Ok(socket) => socket,
            Err(e) => {
                recorder.error(e.kind);
                tokio::select! {
                    _ = stop.cancelled() => break,
                    _ = tokio::time::sleep(backoff.next_wait(e.retry_after)) => continue,
                }
            }
        };
        let opening = if first {
            agent.core.full_report()
        } else {
            agent.core.heartbeat()
        };
        let returning = !first;
        if returning {
            recorder.with(|r| r.summary.reconnects += 1);
        }
        first = false;
        if socket.send(frame(&opening)).await.is_err() {
            recorder.error("send");
            continue;
        }
        let mut answered = false;
        let mut retry_floor = Duration::ZERO;
        let mut heartbeats = timer(config.heartbeat);
        let mut churn = timer(config.status_every);
        loop {
            let out = tokio::select! {
                _ = stop.cancelled() => break,
                _ = tick(&mut heartbeats) => vec![agent.heartbeat()],
                _ = tick(&mut churn) => vec![agent.status_change()],
                received = socket.next() => {
                    let bytes = match received {
                        Some(Ok(WsMessage::Binary(bytes))) => bytes,
                        Some(Ok(WsMessage::Close(_))) | None | Some(Err(_)) => {
                            recorder.error("closed");
                            break;
                        }
                        Some(Ok(_)) => continue,
                    };
                    let Ok(reply) = framing::decode_ws::<ServerToAgent>(&bytes, usize::MAX) else {
                        recorder.error("undecodable");
                        break;
                    };
                    // Admitted: a reply that is not an error (an agent told
                    // `Unavailable` on its first message was not let in).
                    if !answered && reply.error_response.is_none() {
                        answered = true;
                        backoff.reset();
                        let latency = attempt.elapsed();
                        if returning {
                            agent.returns.push(now_ms());
                        }
                        recorder.with(|r| {
                            r.summary.connect_latencies.push(latency);
                            r.connected += 1;
                        });
                    }
                    match agent.on_reply(reply) {
                        Reaction::Send(out) => out,
                        Reaction::Leave(floor) => {
                            retry_floor = floor;
                            break;
                        }
                    }
                }
            };
            let mut failed = false;
            for message in out {
                if socket.send(frame(&message)).await.is_err() {
                    failed = true;
                    break;
                }
            }
            if failed {
                recorder.error("send");
                break;
            }
        }
        if stop.is_cancelled() {
            // Say goodbye properly at the end of the run (still counted as
            // held: the run ended, the connection did not fail).
            let bye = agent.core.disconnect();
            let _ = socket.send(frame(&bye)).await;
            let _ = socket.close(None).await;
            break;
        }
        if answered {
            recorder.with(|r| r.connected -= 1);
        }
        tokio::select! {
            _ = stop.cancelled() => break,
            _ = tokio::time::sleep(backoff.next_wait(retry_floor)) => {}
        }
    }
    agent.returns
}
