//! The WebSocket transport (spec 3.2): one task per connection.
//!
//! The task reads one agent message at a time, asks a coordinator, and writes
//! the answer; between messages it writes whatever coordinators pushed for the
//! agents on this connection. One connection may carry several agents (a
//! multiplexing proxy), so every uid seen on it is bound to it in the registry.
//! When the connection ends without `agent_disconnect`, the coordinators are
//! told, so those agents count as disconnected until they come back.
//!
//! A connection cannot be held hostage: its first OpAMP message must arrive
//! within `first_message_timeout`; after `idle_timeout / 2` of silence it is
//! pinged and after `idle_timeout` closed; a peer that stops reading is
//! dropped when a send does not complete within `send_timeout`; frames
//! larger than 64 KiB cost memory only as their bytes arrive
//! ([`FrameGuard`]); and an agent's close frame is answered (the closing
//! handshake) before the socket is dropped.

use std::{
    pin::Pin,
    sync::{Arc, atomic::Ordering},
    time::Duration,
};

use axum::{
    extract::Request,
    http::{HeaderValue, StatusCode, header},
    response::{IntoResponse, Response},
};
use fleetplane_proto::{
    ConnectionId, InstanceUid, TenantId,
    errors::error_reply,
    framing,
    http::WS_CLOSE_TOO_BIG,
    opamp::{AgentToServer, ServerErrorResponseType, ServerToAgent, ServerToAgentFlags},
    retry,
};
use futures_util::{SinkExt, StreamExt};
use hyper_util::rt::TokioIo;
use tokio::{sync::mpsc, time::Instant};
use tokio_tungstenite::{
    WebSocketStream,
    tungstenite::{
        self, Message as WsMessage,
        handshake::derive_accept_key,
        protocol::{CloseFrame, Role, WebSocketConfig, frame::coding::CloseCode},
    },
};
use tracing::Instrument;

use crate::{
    Shared,
    admission::ConnectionPermit,
    auth::{KeyWatch, Principal},
    frame_guard::FrameGuard,
    http::bad_request,
    listener::ConnectionSlot,
    metrics::message_kind,
    registry::Registration,
    validate,
};

/// Frames up to this size pass straight to the WebSocket layer; larger ones
/// are held until their bytes have arrived (see [`FrameGuard`]).
const HOLD_FRAMES_OVER: usize = 64 * 1024;

/// How long a new connection waits for another connection of this gateway
/// to let go of a uid before asking the coordinators anyway.
const HOLDER_PATIENCE: Duration = Duration::from_millis(250);

/// Close code for a connection that broke the server's rules (RFC 6455 7.4.1).
const WS_CLOSE_POLICY: u16 = 1008;

/// The socket a session speaks on.
type Socket = WebSocketStream<FrameGuard<TokioIo<hyper::upgrade::Upgraded>>>;

/// Why a request to `/v1/opamp` is not a WebSocket upgrade we can accept.
#[derive(Debug, thiserror::Error)]
pub(crate) enum NotAnUpgrade {
    #[error("not an OpAMP request: send a WebSocket upgrade (GET) or a POST with content type application/x-protobuf")]
    NotWebSocket,
    #[error("unsupported WebSocket version: use 13")]
    Version,
    #[error("missing Sec-WebSocket-Key")]
    NoKey,
}

impl IntoResponse for NotAnUpgrade {
    fn into_response(self) -> Response {
        let status = match self {
            Self::Version => StatusCode::UPGRADE_REQUIRED,
            Self::NotWebSocket | Self::NoKey => StatusCode::BAD_REQUEST,
        };
        let mut response = (status, self.to_string()).into_response();
        if status == StatusCode::UPGRADE_REQUIRED {
            response
                .headers_mut()
                .insert(header::SEC_WEBSOCKET_VERSION, HeaderValue::from_static("13"));
        }
        response
    }
}

/// The upgrade's `Sec-WebSocket-Key`, if the request is an upgrade we take.
pub(crate) fn check_upgrade(request: &Request) -> Result<HeaderValue, NotAnUpgrade> {
    let headers = request.headers();
    let has = |name: header::HeaderName, token: &str| {
        headers
            .get_all(name)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .any(|v| v.split(',').any(|t| t.trim().eq_ignore_ascii_case(token)))
    };
    if request.method() != axum::http::Method::GET
        || !has(header::UPGRADE, "websocket")
        || !has(header::CONNECTION, "upgrade")
    {
        return Err(NotAnUpgrade::NotWebSocket);
    }
    if headers.get(header::SEC_WEBSOCKET_VERSION).and_then(|v| v.to_str().ok()) != Some("13") {
        return Err(NotAnUpgrade::Version);
    }
    match headers.get(header::SEC_WEBSOCKET_KEY) {
        Some(key) if !key.is_empty() => Ok(key.clone()),
        _ => Err(NotAnUpgrade::NoKey),
    }
}

/// Accepts the upgrade and starts the session, with small, capped buffers.
/// The connection's accept slot and admission permit live as long as it.
pub(crate) fn upgrade(
    shared: Arc<Shared>,
    mut request: Request,
    key: HeaderValue,
    host: Option<String>,
    permit: ConnectionPermit,
    principal: Principal,
) -> Response {
    let config = &shared.config;
    let limit = config.max_message_bytes;
    let ws_config = WebSocketConfig::default()
        .read_buffer_size(config.ws_read_buffer_bytes)
        .write_buffer_size(config.ws_write_buffer_bytes)
        .max_write_buffer_size(limit.saturating_add(config.ws_write_buffer_bytes).max(1))
        .max_message_size(Some(limit))
        .max_frame_size(Some(limit));
    let on_upgrade = hyper::upgrade::on(&mut request);
    let slot = request.extensions().get::<ConnectionSlot>().cloned();
    let endpoint = shared.endpoint("ws", host.as_deref());
    let key_watch = shared.auth.watch(&principal);
    let identity = principal.report_identity();
    let session = Session::new(shared.clone(), endpoint, principal.tenant, key_watch, identity);
    let span = tracing::info_span!(
        "opamp.connection",
        transport = "websocket",
        connection = %session.connection,
        gateway_id = %shared.config.gateway_id,
        tenant = %session.tenant,
    );
    shared.sessions.spawn(
        async move {
            let upgraded = match on_upgrade.await {
                Ok(upgraded) => upgraded,
                Err(e) => {
                    tracing::debug!(error = %e, "upgrade failed");
                    return;
                }
            };
            let guarded = FrameGuard::new(TokioIo::new(upgraded), HOLD_FRAMES_OVER, limit);
            let socket = WebSocketStream::from_raw_socket(guarded, Role::Server, Some(ws_config)).await;
            session.shared.metrics.connection_opened("websocket");
            session.run(socket).await;
            drop(permit);
            drop(slot);
        }
        .instrument(span),
    );
    let mut response = StatusCode::SWITCHING_PROTOCOLS.into_response();
    let headers = response.headers_mut();
    headers.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
    headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    if let Ok(accept) = HeaderValue::from_str(&derive_accept_key(key.as_bytes())) {
        headers.insert(header::SEC_WEBSOCKET_ACCEPT, accept);
    }
    response
}

/// One agent on this connection, as far as answering its heartbeats goes.
#[derive(Debug, Default)]
struct Link {
    /// Highest sequence number seen (forwarded or answered here).
    last_seq: u64,
    /// Capabilities of the last forwarded message.
    capabilities: u64,
    /// The coordinator's last answer carried nothing but an acknowledgement,
    /// and nothing was pushed since: the agent is in its desired state.
    settled: bool,
    /// When a message of this agent last went to a coordinator.
    forwarded_at: Option<tokio::time::Instant>,
    /// Highest sequence number answered here since the last forward.
    acked_here: u64,
}

/// The agents of one connection, sorted by uid. Nearly every connection
/// carries one agent, for which a vector costs one small allocation where a
/// hash map costs several hundred bytes; a multiplexing proxy's thousands are
/// still found by binary search.
#[derive(Debug, Default)]
struct Links(Vec<(InstanceUid, Link)>);

impl Links {
    fn get_mut(&mut self, uid: &InstanceUid) -> Option<&mut Link> {
        let i = self.0.binary_search_by_key(uid, |(u, _)| *u).ok()?;
        Some(&mut self.0[i].1)
    }

    fn contains(&self, uid: &InstanceUid) -> bool {
        self.get(uid).is_some()
    }

    fn get(&self, uid: &InstanceUid) -> Option<&Link> {
        let i = self.0.binary_search_by_key(uid, |(u, _)| *u).ok()?;
        Some(&self.0[i].1)
    }

    /// Adds `uid` with a fresh link; false if it was already here.
    fn insert(&mut self, uid: InstanceUid) -> bool {
        match self.0.binary_search_by_key(&uid, |(u, _)| *u) {
            Ok(_) => false,
            Err(i) => {
                self.0.insert(i, (uid, Link::default()));
                true
            }
        }
    }

    fn remove(&mut self, uid: &InstanceUid) -> Option<Link> {
        let i = self.0.binary_search_by_key(uid, |(u, _)| *u).ok()?;
        Some(self.0.remove(i).1)
    }

    fn uids(&self) -> Vec<InstanceUid> {
        self.0.iter().map(|(uid, _)| *uid).collect()
    }
}

struct Session {
    shared: Arc<Shared>,
    connection: ConnectionId,
    endpoint: String,
    /// The tenant of this connection's credentials: every agent on it
    /// belongs to it, whatever the agents say about themselves.
    tenant: TenantId,
    /// The connection's API key, watched for revocation (`None` in open mode).
    key_watch: Option<KeyWatch>,
    /// Who this connection is, as reports say it: the API key's id or the
    /// client certificate's (`None` in open mode).
    identity: Option<String>,
    /// Agents bound to this connection that have not said goodbye, with what
    /// the gateway needs to answer their heartbeats itself.
    agents: Links,
    outbound_tx: mpsc::Sender<Box<ServerToAgent>>,
    outbound_rx: mpsc::Receiver<Box<ServerToAgent>>,
    /// Bus epoch this session last saw; a change means messages may have been
    /// lost, so the next reply asks for a full state report.
    bus_epoch: u64,
}

/// How a session ended.
enum End {
    /// The socket failed, or the gateway cut the session short.
    Closed,
    /// The agent sent a close frame: answer it (the closing handshake), so
    /// that clients such as opamp-go see a clean close, not 1006.
    ClosedByAgent,
    /// We close with this code and reason.
    CloseWith(u16, String),
}

/// What the session's one timer is set for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Wake {
    /// No OpAMP message yet: the connection is dropped at this moment.
    FirstMessage,
    /// Silent for half the idle timeout: ping, so a live client answers.
    Ping,
    /// Silent for the whole idle timeout: the peer is gone.
    Idle,
    /// The gateway is draining: this connection's turn to close.
    Drain,
    /// Nothing to wait for.
    Never,
}

/// A moment far enough away to mean "never" for a timer.
fn far_future() -> Instant {
    Instant::now() + Duration::from_secs(86_400 * 365)
}

impl Session {
    fn new(
        shared: Arc<Shared>,
        endpoint: String,
        tenant: TenantId,
        key_watch: Option<KeyWatch>,
        identity: Option<String>,
    ) -> Self {
        // Numbered from 1, so never 0; the max is for the (theoretical) wrap.
        let number = shared.next_connection.fetch_add(1, Ordering::Relaxed).max(1);
        let connection = ConnectionId::new(number).unwrap_or(ConnectionId::FIRST);
        let (outbound_tx, outbound_rx) = mpsc::channel(shared.config.outbound_queue.max(1));
        let bus_epoch = *shared.bus_epoch.borrow();
        Self {
            bus_epoch,
            shared,
            connection,
            endpoint,
            tenant,
            key_watch,
            identity,
            agents: Links::default(),
            outbound_tx,
            outbound_rx,
        }
    }

    /// Serves the connection, then closes it and reports its agents gone.
    /// Stops at once when the gateway's drain grace has run out.
    async fn run(mut self, mut socket: Socket) {
        let hard_stop = self.shared.hard_stop.clone();
        let end = tokio::select! {
            end = self.serve(&mut socket) => end,
            _ = hard_stop.cancelled() => End::Closed,
        };
        // Let go of the agents at once, before the closing handshake and the
        // bus, so that an agent reconnecting right away finds its uid free.
        self.release();
        let closing = async {
            match end {
                End::CloseWith(code, reason) => {
                    let frame = CloseFrame {
                        code: CloseCode::from(code),
                        reason: reason.into(),
                    };
                    let _ = socket.close(Some(frame)).await;
                }
                // Flushes the reply the WebSocket layer queued to the agent's
                // close frame (sending another close would be refused).
                End::ClosedByAgent => {
                    let _ = SinkExt::close(&mut socket).await;
                }
                End::Closed => {}
            }
        };
        let _ = tokio::time::timeout(self.shared.config.send_timeout, closing).await;
        drop(socket);
        Box::pin(self.finish()).await;
    }

    /// When the timer next fires, and why.
    fn next_wake(
        &self,
        heard_message: bool,
        last_heard: Instant,
        pinged: bool,
        close_at: Option<Instant>,
    ) -> (Instant, Wake) {
        if let Some(at) = close_at {
            return (at, Wake::Drain);
        }
        let config = &self.shared.config;
        if !heard_message && !config.first_message_timeout.is_zero() {
            return (last_heard + config.first_message_timeout, Wake::FirstMessage);
        }
        if config.idle_timeout.is_zero() {
            return (far_future(), Wake::Never);
        }
        if pinged {
            (last_heard + config.idle_timeout, Wake::Idle)
        } else {
            (last_heard + config.idle_timeout / 2, Wake::Ping)
        }
    }

    /// Sends one frame; a peer that does not take it within the send
    /// timeout (it stopped reading) counts as gone.
    async fn send(&self, socket: &mut Socket, message: WsMessage) -> bool {
        matches!(
            tokio::time::timeout(self.shared.config.send_timeout, socket.send(message)).await,
            Ok(Ok(()))
        )
    }

    async fn serve(&mut self, socket: &mut Socket) -> End {
        let shutdown = self.shared.shutdown.clone();
        let revoked = self.key_watch.as_ref().map(|w| w.revoked.clone()).unwrap_or_default();
        // Set when the gateway starts draining: the moment this connection closes.
        let mut close_at: Option<Instant> = None;
        let mut last_heard = Instant::now();
        let mut heard_message = false;
        let mut pinged = false;
        let mut timer: Pin<Box<tokio::time::Sleep>> = Box::pin(tokio::time::sleep_until(far_future()));
        loop {
            let (at, wake) = self.next_wake(heard_message, last_heard, pinged, close_at);
            if timer.deadline() != at {
                timer.as_mut().reset(at);
            }
            tokio::select! {
                _ = revoked.cancelled() => {
                    return End::CloseWith(WS_CLOSE_POLICY, "credentials revoked".into());
                }
                _ = shutdown.cancelled(), if close_at.is_none() => {
                    close_at = Some(Instant::now() + retry::uniform(self.shared.config.drain_period));
                }
                _ = timer.as_mut() => match wake {
                    Wake::Drain => {
                        // Tell every agent here when to come back, then close.
                        let wait = retry::spread(self.shared.config.retry_after, 1.0);
                        for uid in self.agents.uids() {
                            let bye = frame(&error_reply(
                                uid.as_bytes(),
                                ServerErrorResponseType::Unavailable,
                                "gateway draining; reconnect after the retry hint",
                                Some(wait),
                            ));
                            if !self.send(socket, bye).await {
                                break;
                            }
                        }
                        return End::CloseWith(1001, "gateway draining".into());
                    }
                    Wake::FirstMessage => {
                        self.shared.metrics.connection_timeout("first_message");
                        return End::CloseWith(WS_CLOSE_POLICY, "no OpAMP message in time".into());
                    }
                    Wake::Ping => {
                        pinged = true;
                        if !self.send(socket, WsMessage::Ping(Default::default())).await {
                            return End::Closed;
                        }
                    }
                    Wake::Idle => {
                        self.shared.metrics.connection_timeout("idle");
                        return End::CloseWith(1001, "idle: nothing received in time".into());
                    }
                    Wake::Never => {}
                },
                Some(push) = self.outbound_rx.recv() => {
                    self.shared.metrics.message_out("websocket", "push");
                    // A push means the agent's desired state moved: its next
                    // heartbeat goes to a coordinator.
                    if let Some(link) = InstanceUid::from_slice(&push.instance_uid).ok().and_then(|u| self.agents.get_mut(&u)) {
                        link.settled = false;
                    }
                    let out = frame(&push);
                    drop(push);
                    if !self.send(socket, out).await {
                        return End::Closed;
                    }
                }
                received = socket.next() => {
                    last_heard = Instant::now();
                    pinged = false;
                    match received {
                        None => return End::Closed,
                        Some(Err(e)) => {
                            let end = classify(e, self.shared.config.max_message_bytes);
                            if matches!(end, End::CloseWith(..)) {
                                self.shared.metrics.decode_error("websocket", "too_large");
                            }
                            return end;
                        }
                        Some(Ok(WsMessage::Binary(bytes))) => {
                            heard_message = true;
                            // Boxed: handling a message (decode, bus request) needs
                            // kilobytes of future state that an idle connection's
                            // task must not carry.
                            let out = {
                                let reply = Box::pin(self.handle(&bytes)).await;
                                self.shared.metrics.message_out("websocket", if reply.error_response.is_some() { "error" } else { "reply" });
                                frame(&reply)
                            };
                            // The frame's buffer is released before the next await.
                            drop(bytes);
                            if !self.send(socket, out).await {
                                return End::Closed;
                            }
                        }
                        Some(Ok(WsMessage::Text(_))) => {
                            self.shared.metrics.decode_error("websocket", "text_frame");
                            let reply = frame(&bad_request(&[], "text frames are not OpAMP: send binary frames".into()));
                            if !self.send(socket, reply).await {
                                return End::Closed;
                            }
                        }
                        Some(Ok(WsMessage::Close(_))) => return End::ClosedByAgent,
                        // Pings are answered by the WebSocket layer; any frame
                        // counts as a sign of life.
                        Some(Ok(WsMessage::Ping(_) | WsMessage::Pong(_) | WsMessage::Frame(_))) => {}
                    }
                }
            }
        }
    }

    /// Decodes, validates and forwards one agent message; returns the answer.
    async fn handle(&mut self, frame: &[u8]) -> ServerToAgent {
        let message: AgentToServer = match framing::decode_ws(frame, self.shared.config.max_message_bytes) {
            Ok(message) => message,
            Err(e) => {
                self.shared.metrics.decode_error("websocket", "malformed");
                return bad_request(&[], e.to_string());
            }
        };
        let uid = match validate(&message) {
            Ok(uid) => uid,
            Err(e) => {
                self.shared.metrics.decode_error("websocket", "bad_instance_uid");
                return bad_request(&message.instance_uid, e);
            }
        };
        if let Err(refused) = self.shared.admission.admit_message(&uid) {
            self.shared.metrics.admission("shed", refused.limit.reason());
            return error_reply(
                uid.as_bytes(),
                ServerErrorResponseType::Unavailable,
                format!("over the {} limit; retry later", refused.limit.reason()),
                Some(refused.retry_after),
            );
        }
        let kind = message_kind(&message);
        self.shared.metrics.message_in("websocket", kind);
        if kind == "heartbeat"
            && let Some(reply) = self.answer_heartbeat(uid, &message)
        {
            return reply;
        }
        let span = tracing::info_span!(
            "opamp.message",
            otel.kind = "server",
            transport = "websocket",
            instance_uid = %uid,
            sequence_num = message.sequence_num,
        );
        self.forward(uid, message).instrument(span).await
    }

    /// Answers a heartbeat here when it changes nothing: the agent is settled
    /// (its last coordinator answer was a bare acknowledgement and nothing was
    /// pushed since), its sequence continues, its capabilities are the same,
    /// the bus did not reconnect, and a coordinator heard from it recently.
    /// The heartbeat then joins the next liveness batch instead of the bus.
    fn answer_heartbeat(&mut self, uid: InstanceUid, message: &AgentToServer) -> Option<ServerToAgent> {
        let forward_every = self.shared.config.heartbeat_forward_interval;
        let bus_epoch = *self.shared.bus_epoch.borrow();
        let link = self.agents.get_mut(&uid)?;
        let fresh = link.forwarded_at.is_some_and(|at| at.elapsed() < forward_every);
        if !link.settled
            || !fresh
            || message.sequence_num != link.last_seq + 1
            || message.capabilities != link.capabilities
            || bus_epoch != self.bus_epoch
        {
            return None;
        }
        link.last_seq = message.sequence_num;
        link.acked_here = message.sequence_num;
        self.shared
            .note_liveness(&self.tenant, uid, self.connection, message.sequence_num);
        self.shared.metrics.message_out("websocket", "local_reply");
        Some(ServerToAgent {
            instance_uid: uid.to_vec(),
            ..Default::default()
        })
    }

    /// Hands a valid message to a coordinator and returns its answer.
    async fn forward(&mut self, uid: InstanceUid, message: AgentToServer) -> ServerToAgent {
        // Counted, never refused: connected agents' reports come in bursts the
        // control plane caused itself (a push's statuses); shedding happens
        // at new connections and polls, and a report that waits too long
        // expires at the coordinator.
        let _pending = self.shared.admission.track_report();
        let leaving = message.agent_disconnect.is_some();
        let (seq, capabilities) = (message.sequence_num, message.capabilities);
        // Another live connection here holds this uid: bind only if the
        // coordinator lets this one take over, so that a duplicate cannot
        // divert the holder's pushes (spec 4.B.11).
        let mut other_here = self
            .shared
            .registry
            .other_holder(&self.tenant, &uid, Some(self.connection));
        if other_here.is_some() && !self.agents.contains(&uid) {
            // Usually the same agent, reconnected before its old connection's
            // close was handled here: give that a moment.
            other_here = self
                .shared
                .registry
                .wait_released(&self.tenant, &uid, self.connection, HOLDER_PATIENCE)
                .await;
        }
        if other_here.is_none() {
            self.bind(uid);
        }
        let mut report = self.shared.envelope(
            &self.tenant,
            uid,
            message,
            fleetplane_proto::Link::WebSocket(self.connection),
            &self.endpoint,
            self.identity.clone(),
        );
        report.other_live_connection = other_here;
        if let Some(link) = self.agents.get(&uid) {
            report.acked_sequence_num = link.acked_here;
        }
        let mut reply = match self.shared.ask(report).await {
            Ok(reply) => reply,
            Err(e) => {
                tracing::debug!(%uid, error = %e, "no coordinator answer for a websocket agent");
                self.shared.unanswered.note(
                    "agents told to retry: no coordinator answered (count since the last such line)",
                    &e,
                );
                let wait = retry::spread(self.shared.config.retry_after, 1.0);
                return error_reply(
                    uid.as_bytes(),
                    ServerErrorResponseType::Unavailable,
                    format!("control plane unavailable: {e}"),
                    Some(wait),
                );
            }
        };
        if let Some(new_uid) = reply
            .agent_identification
            .as_ref()
            .and_then(|id| InstanceUid::from_slice(&id.new_instance_uid).ok())
        {
            // Only this connection's own binding of the old uid goes; one
            // held by another connection stays where it is.
            self.unbind(&uid);
            self.bind(new_uid);
        } else if other_here.is_some() && reply.error_response.is_none() {
            // The coordinator let this connection take the uid over.
            self.bind(uid);
        }
        if leaving {
            self.unbind(&uid);
        }
        let epoch = *self.shared.bus_epoch.borrow();
        if epoch != self.bus_epoch && !leaving {
            self.bus_epoch = epoch;
            reply.flags |= ServerToAgentFlags::ReportFullState as u64;
        }
        let answered_as = InstanceUid::from_slice(&reply.instance_uid).unwrap_or(uid);
        if let Some(link) = self.agents.get_mut(&answered_as) {
            link.last_seq = link.last_seq.max(seq);
            link.capabilities = capabilities;
            link.forwarded_at = Some(tokio::time::Instant::now());
            link.acked_here = 0;
            link.settled = is_bare_ack(&reply);
        }
        reply
    }

    fn bind(&mut self, uid: InstanceUid) {
        if self.agents.insert(uid) {
            self.shared.registry.register(
                &self.tenant,
                uid,
                Registration {
                    connection: self.connection,
                    outbound: self.outbound_tx.clone(),
                },
            );
        }
    }

    fn unbind(&mut self, uid: &InstanceUid) {
        if self.agents.remove(uid).is_some() {
            self.shared.registry.unregister(&self.tenant, uid, self.connection);
        }
    }

    /// Unbinds every agent of this connection from the registry and drops
    /// their pending liveness (which must not revive them after the close).
    fn release(&self) {
        let agents = self.agents.uids();
        self.shared.forget_liveness(&self.tenant, &agents, self.connection);
        for uid in &agents {
            self.shared.registry.unregister(&self.tenant, uid, self.connection);
        }
    }

    /// Tells the coordinators about the agents that left without saying
    /// goodbye (after [`Session::release`]).
    async fn finish(self) {
        self.shared.metrics.connection_closed("websocket");
        let agents = self.agents.uids();
        if agents.is_empty() {
            return;
        }
        let closed = fleetplane_bus::ConnectionsClosed {
            tenant: self.tenant.clone(),
            gateway: self.shared.config.gateway_id.clone(),
            connections: agents.iter().map(|uid| (*uid, self.connection)).collect(),
        };
        // Sent again until a coordinator acknowledges it: a notice lost with
        // a replica would leave the agent's record claiming this connection,
        // and every other gateway refusing the agent as a duplicate. Bounded:
        // a bus that went away must not hold the session forever, nor the
        // gateway's shutdown (then one try: the goodbye that follows tells
        // the coordinators every agent here is gone).
        let grace = self.shared.config.shutdown_grace;
        let deadline = tokio::time::Instant::now() + CLOSE_NOTICE_PATIENCE;
        let mut backoff = fleetplane_proto::retry::Backoff::new(Duration::from_millis(200), Duration::from_secs(2));
        loop {
            let error = match tokio::time::timeout(grace, self.shared.bus.connections_closed(closed.clone())).await {
                Ok(Ok(())) => return,
                Ok(Err(e)) => e.to_string(),
                Err(_) => "timed out".to_owned(),
            };
            let wait = backoff.next_wait(Duration::ZERO);
            if self.shared.shutdown.is_cancelled() || tokio::time::Instant::now() + wait >= deadline {
                self.shared.unanswered.note(
                    "closed connections not reported: bus unavailable (count since the last such line)",
                    &error,
                );
                return;
            }
            tokio::select! {
                _ = tokio::time::sleep(wait) => {}
                _ = self.shared.hard_stop.cancelled() => return,
            }
        }
    }
}

/// How long a session keeps sending its close notice before giving up; past
/// that the coordinators learn of the close only when this gateway leaves or
/// goes silent.
const CLOSE_NOTICE_PATIENCE: Duration = Duration::from_secs(30);

/// A reply that only acknowledges: nothing for the agent to do.
fn is_bare_ack(reply: &ServerToAgent) -> bool {
    reply.error_response.is_none()
        && reply.remote_config.is_none()
        && reply.connection_settings.is_none()
        && reply.packages_available.is_none()
        && reply.flags == 0
        && reply.agent_identification.is_none()
        && reply.command.is_none()
        && reply.custom_message.is_none()
}

/// One message as a WebSocket frame, encoded before any await so the
/// message itself is not kept in the session's future.
fn frame(message: &ServerToAgent) -> WsMessage {
    WsMessage::Binary(framing::encode_ws(message).into())
}

/// An oversized message closes with 1009 (spec 3.2); other errors just end.
fn classify(error: tungstenite::Error, limit: usize) -> End {
    match error {
        tungstenite::Error::Capacity(_) => End::CloseWith(WS_CLOSE_TOO_BIG, format!("message exceeds {limit} bytes")),
        // The peer broke the protocol (say, an unmasked frame): close with
        // 1002 rather than drop without a word.
        tungstenite::Error::Protocol(e) => End::CloseWith(1002, e.to_string()),
        _ => End::Closed,
    }
}
