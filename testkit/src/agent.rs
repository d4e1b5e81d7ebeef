//! A simulated OpAMP agent over the real protocol.
//!
//! The agent's behaviour lives in [`AgentCore`], which is transport-free: it
//! builds reports and reacts to server messages the way the spec asks of a
//! client. [`SimAgent`] runs a core over a WebSocket or plain HTTP and
//! publishes what it has seen ([`Seen`]) so tests can wait on it.

use std::{collections::VecDeque, time::Duration};

use anyhow::{Context, bail};
use fleetplane_proto::{
    ConfigHash, InstanceUid, Message,
    attributes::string_kv,
    capabilities::{AgentCaps, ServerFlags},
    framing,
    http::{CONTENT_TYPE_PROTOBUF, HEADER_INSTANCE_UID},
    opamp::{
        AgentCapabilities, AgentConfigMap, AgentDescription, AgentDisconnect, AgentToServer, AgentToServerFlags,
        AvailableComponents, ComponentDetails, ComponentHealth, ConnectionSettingsOffers, ConnectionSettingsStatus,
        ConnectionSettingsStatuses, CustomCapabilities, CustomMessage, EffectiveConfig, PackageStatus,
        PackageStatusEnum, PackageStatuses, PackagesAvailable, RemoteConfigStatus, RemoteConfigStatuses,
        ServerErrorResponse, ServerErrorResponseType, ServerToAgent, ServerToAgentFlags,
        server_error_response::Details,
    },
};
use futures_util::{SinkExt, StreamExt};
use tokio::{
    sync::{mpsc, watch},
    task::JoinHandle,
};
use tokio_tungstenite::tungstenite::Message as WsMessage;

use crate::wait::DEFAULT_DEADLINE;

/// How a simulated agent behaves.
#[derive(Debug, Clone)]
pub struct AgentOptions {
    /// Identifying attributes (service.name, ...).
    pub identifying: Vec<(String, String)>,
    /// Non-identifying attributes (host.arch, ...).
    pub non_identifying: Vec<(String, String)>,
    /// What the agent says it can do.
    pub capabilities: AgentCaps,
    /// Report every pushed config FAILED with this error text.
    pub reject_configs: Option<String>,
    /// Report FAILED for configs whose files contain this text (a "bad"
    /// config that only some agents choke on).
    pub reject_containing: Option<String>,
    /// Start with a temporary uid and ask the server for one.
    pub request_uid: bool,
    /// Send heartbeats at this interval (WebSocket) or poll at it (HTTP).
    pub heartbeat: Option<Duration>,
    /// Gzip HTTP request bodies.
    pub gzip: bool,
    /// Use this uid instead of a fresh UUIDv7.
    pub uid: Option<InstanceUid>,
    /// Present this API key (`Authorization: Bearer <key>`).
    pub api_key: Option<String>,
    /// Custom capabilities the agent lists; every custom message it
    /// receives under one of them is answered with the same data, type
    /// suffixed `.reply`.
    pub custom_capabilities: Vec<String>,
    /// Component inventory: kind → component types. Announced by hash; the
    /// full map only when the server asks (spec 4.I.48).
    pub components: Option<Vec<(String, Vec<String>)>>,
    /// Fail installing offered packages with this error (else they install).
    pub fail_packages: Option<String>,
    /// Fails only packages whose offered version contains this text (the
    /// error names the version); others install.
    pub fail_versions_containing: Option<String>,
    /// Reports FAILED for connection settings offers naming an endpoint that
    /// contains this text (own telemetry or OpAMP); applies others.
    pub reject_endpoints_containing: Option<String>,
}

impl Default for AgentOptions {
    fn default() -> Self {
        Self {
            identifying: Vec::new(),
            non_identifying: Vec::new(),
            capabilities: AgentCaps::of(&[
                AgentCapabilities::ReportsStatus,
                AgentCapabilities::AcceptsRemoteConfig,
                AgentCapabilities::ReportsEffectiveConfig,
                AgentCapabilities::ReportsRemoteConfig,
                AgentCapabilities::ReportsHealth,
            ]),
            reject_configs: None,
            reject_containing: None,
            request_uid: false,
            heartbeat: None,
            gzip: false,
            uid: None,
            api_key: None,
            custom_capabilities: Vec::new(),
            components: None,
            fail_packages: None,
            fail_versions_containing: None,
            reject_endpoints_containing: None,
        }
    }
}

impl AgentOptions {
    /// Presents `key` as a bearer token.
    #[must_use]
    pub fn api_key(mut self, key: &str) -> Self {
        self.api_key = Some(key.to_owned());
        self
    }

    /// Adds an identifying attribute.
    #[must_use]
    pub fn attr(mut self, key: &str, value: &str) -> Self {
        self.identifying.push((key.into(), value.into()));
        self
    }

    /// Adds a non-identifying attribute.
    #[must_use]
    pub fn non_identifying(mut self, key: &str, value: &str) -> Self {
        self.non_identifying.push((key.into(), value.into()));
        self
    }

    /// Rejects every config with this error text.
    #[must_use]
    pub fn reject_configs(mut self, error: &str) -> Self {
        self.reject_configs = Some(error.into());
        self
    }

    /// Lists a custom capability (and echoes its messages).
    #[must_use]
    pub fn custom_capability(mut self, name: &str) -> Self {
        self.custom_capabilities.push(name.into());
        self
    }

    /// Has these components of `kind` (and says so, with ReportsAvailableComponents).
    #[must_use]
    pub fn components(mut self, kind: &str, types: &[&str]) -> Self {
        self.capabilities = self.capabilities.with(AgentCapabilities::ReportsAvailableComponents);
        self.components
            .get_or_insert_with(Vec::new)
            .push((kind.into(), types.iter().map(|t| (*t).to_owned()).collect()));
        self
    }

    /// Adds a capability bit.
    #[must_use]
    pub fn with(mut self, capability: AgentCapabilities) -> Self {
        self.capabilities = self.capabilities.with(capability);
        self
    }
}

/// What an agent has seen so far.
#[derive(Debug, Clone, Default)]
pub struct Seen {
    /// The uid the agent uses now.
    pub uid: Option<InstanceUid>,
    /// Server messages received.
    pub replies: u64,
    /// Hashes of every remote config received, in order.
    pub configs: Vec<ConfigHash>,
    /// The config last applied (not rejected).
    pub applied: Option<AgentConfigMap>,
    /// Times the server set ReportFullState.
    pub full_state_requests: u64,
    /// Error responses received.
    pub errors: Vec<ServerErrorResponse>,
    /// Capabilities from the server's first message.
    pub server_capabilities: u64,
    /// Heartbeat interval the server offered.
    pub heartbeat_interval: Option<u64>,
    /// Non-200 HTTP statuses received.
    pub http_statuses: Vec<u16>,
    /// The transport is up.
    pub connected: bool,
    /// WebSocket connections made so far.
    pub connections: u32,
    /// The URL of the current (or last) connection.
    pub url: String,
    /// Restart commands received.
    pub restarts: u32,
    /// Messages that carried a command together with other fields (which
    /// the agent must ignore, so the server should never send them).
    pub commands_with_extras: u32,
    /// Custom messages received.
    pub custom_messages: Vec<CustomMessage>,
    /// Times the server asked for the full component inventory.
    pub component_requests: u32,
    /// Every connection settings offer received, in order.
    pub connection_offers: Vec<ConnectionSettingsOffers>,
    /// Every package offer received, in order.
    pub package_offers: Vec<PackagesAvailable>,
}

/// The transport-free behaviour of an agent.
#[derive(Debug)]
pub struct AgentCore {
    options: AgentOptions,
    uid: InstanceUid,
    sequence_num: u64,
    health: ComponentHealth,
    effective: Option<AgentConfigMap>,
    status: Option<RemoteConfigStatus>,
    /// What the agent has seen.
    pub seen: Seen,
}

impl AgentCore {
    /// A new agent with its uid chosen.
    pub fn new(options: AgentOptions) -> Self {
        let uid = options.uid.unwrap_or_else(InstanceUid::new_v7);
        Self {
            options,
            uid,
            sequence_num: 0,
            health: ComponentHealth {
                healthy: true,
                start_time_unix_nano: 1,
                status: "StatusOK".into(),
                ..Default::default()
            },
            effective: None,
            status: None,
            seen: Seen {
                uid: Some(uid),
                ..Default::default()
            },
        }
    }

    /// The uid in use.
    pub fn uid(&self) -> InstanceUid {
        self.uid
    }

    fn base(&mut self) -> AgentToServer {
        self.sequence_num += 1;
        AgentToServer {
            instance_uid: self.uid.to_vec(),
            sequence_num: self.sequence_num,
            capabilities: self.options.capabilities.bits(),
            ..Default::default()
        }
    }

    fn caps(&self) -> AgentCaps {
        self.options.capabilities
    }

    /// Every status field, as on a fresh start or after ReportFullState.
    pub fn full_report(&mut self) -> AgentToServer {
        let mut msg = self.base();
        msg.agent_description = Some(AgentDescription {
            identifying_attributes: self.options.identifying.iter().map(|(k, v)| string_kv(k, v)).collect(),
            non_identifying_attributes: self
                .options
                .non_identifying
                .iter()
                .map(|(k, v)| string_kv(k, v))
                .collect(),
        });
        if self.caps().has(AgentCapabilities::ReportsHealth) {
            msg.health = Some(self.health.clone());
        }
        if self.caps().has(AgentCapabilities::ReportsEffectiveConfig) {
            msg.effective_config = Some(EffectiveConfig {
                config_map: Some(self.effective.clone().unwrap_or_default()),
            });
        }
        if self.caps().has(AgentCapabilities::ReportsRemoteConfig) {
            msg.remote_config_status = self.status.clone();
        }
        if self.options.request_uid {
            msg.flags |= AgentToServerFlags::RequestInstanceUid as u64;
        }
        if !self.options.custom_capabilities.is_empty() {
            msg.custom_capabilities = Some(CustomCapabilities {
                capabilities: self.options.custom_capabilities.clone(),
            });
        }
        msg.available_components = self.components(false);
        msg
    }

    /// The component inventory: hash only, or with the full map.
    fn components(&self, full: bool) -> Option<AvailableComponents> {
        let kinds = self.options.components.as_ref()?;
        let mut hasher = std::hash::DefaultHasher::new();
        std::hash::Hash::hash(kinds, &mut hasher);
        let hash = std::hash::Hasher::finish(&hasher).to_be_bytes().to_vec();
        let components = if full {
            kinds
                .iter()
                .map(|(kind, types)| {
                    let sub = types.iter().map(|t| (t.clone(), ComponentDetails::default())).collect();
                    (
                        kind.clone(),
                        ComponentDetails {
                            metadata: Vec::new(),
                            sub_component_map: sub,
                        },
                    )
                })
                .collect()
        } else {
            Default::default()
        };
        Some(AvailableComponents { components, hash })
    }

    /// A heartbeat: nothing changed.
    pub fn heartbeat(&mut self) -> AgentToServer {
        self.base()
    }

    /// A health change report.
    pub fn health_report(&mut self, healthy: bool, error: &str) -> AgentToServer {
        self.health.healthy = healthy;
        self.health.last_error = error.into();
        let mut msg = self.base();
        msg.health = Some(self.health.clone());
        msg
    }

    /// The goodbye message.
    pub fn disconnect(&mut self) -> AgentToServer {
        let mut msg = self.base();
        msg.agent_disconnect = Some(AgentDisconnect {});
        msg
    }

    /// Reacts to a server message; returns what the agent sends in answer.
    pub fn on_reply(&mut self, reply: ServerToAgent) -> Vec<AgentToServer> {
        self.seen.replies += 1;
        if let Some(error) = reply.error_response {
            self.seen.errors.push(error);
            return Vec::new();
        }
        if self.seen.server_capabilities == 0 {
            self.seen.server_capabilities = reply.capabilities;
        }
        if reply.command.is_some() {
            // As a real agent does: a command is acted on alone.
            self.seen.restarts += 1;
            if reply.remote_config.is_some() || reply.custom_message.is_some() || reply.flags != 0 {
                self.seen.commands_with_extras += 1;
            }
            return vec![self.full_report()];
        }
        let mut out = Vec::new();
        if let Some(message) = reply.custom_message {
            self.seen.custom_messages.push(message.clone());
            if self.options.custom_capabilities.contains(&message.capability) {
                let mut answer = self.base();
                answer.custom_message = Some(CustomMessage {
                    capability: message.capability,
                    r#type: format!("{}.reply", message.r#type),
                    data: message.data,
                });
                out.push(answer);
            }
        }
        if ServerFlags(reply.flags).has(ServerToAgentFlags::ReportAvailableComponents) {
            self.seen.component_requests += 1;
            let mut msg = self.base();
            msg.available_components = self.components(true);
            out.push(msg);
        }
        if let Some(id) = reply.agent_identification
            && let Ok(uid) = InstanceUid::from_slice(&id.new_instance_uid)
        {
            self.uid = uid;
            self.seen.uid = Some(uid);
            self.options.request_uid = false;
        }
        if let Some(interval) = reply
            .connection_settings
            .as_ref()
            .and_then(|c| c.opamp.as_ref())
            .map(|o| o.heartbeat_interval_seconds)
        {
            self.seen.heartbeat_interval = Some(interval);
        }
        if let Some(offer) = reply.packages_available {
            self.seen.package_offers.push(offer.clone());
            // "Installs" each at once (or fails, as told), and says so.
            let packages = offer
                .packages
                .iter()
                .map(|(name, p)| {
                    let failure = self.options.fail_packages.clone().or_else(|| {
                        self.options
                            .fail_versions_containing
                            .as_ref()
                            .filter(|marker| p.version.contains(marker.as_str()))
                            .map(|_| format!("version {} does not start", p.version))
                    });
                    let status = PackageStatus {
                        name: name.clone(),
                        agent_has_version: if failure.is_some() {
                            String::new()
                        } else {
                            p.version.clone()
                        },
                        agent_has_hash: if failure.is_some() { Vec::new() } else { p.hash.clone() },
                        server_offered_version: p.version.clone(),
                        server_offered_hash: p.hash.clone(),
                        status: if failure.is_some() {
                            PackageStatusEnum::InstallFailed as i32
                        } else {
                            PackageStatusEnum::Installed as i32
                        },
                        error_message: failure.clone().unwrap_or_default(),
                        download_details: None,
                    };
                    (name.clone(), status)
                })
                .collect();
            let mut msg = self.base();
            msg.package_statuses = Some(PackageStatuses {
                packages,
                server_provided_all_packages_hash: offer.all_packages_hash,
                error_message: String::new(),
            });
            out.push(msg);
        }
        if let Some(offers) = reply.connection_settings {
            let hash = offers.hash.clone();
            self.seen.connection_offers.push(offers);
            if self.caps().has(AgentCapabilities::ReportsConnectionSettingsStatus) {
                // Taken as offered (a real agent would verify first), unless
                // told to refuse an endpoint.
                let offered = self.seen.connection_offers.last().expect("just pushed");
                let endpoints = [&offered.own_metrics, &offered.own_traces, &offered.own_logs]
                    .into_iter()
                    .flatten()
                    .map(|t| t.destination_endpoint.as_str())
                    .chain(offered.opamp.as_ref().map(|o| o.destination_endpoint.as_str()));
                let refused = self
                    .options
                    .reject_endpoints_containing
                    .as_deref()
                    .and_then(|marker| endpoints.into_iter().find(|e| e.contains(marker)))
                    .map(|e| format!("cannot reach {e}"));
                let mut msg = self.base();
                msg.connection_settings_status = Some(ConnectionSettingsStatus {
                    last_connection_settings_hash: hash,
                    status: if refused.is_some() {
                        ConnectionSettingsStatuses::Failed as i32
                    } else {
                        ConnectionSettingsStatuses::Applied as i32
                    },
                    error_message: refused.unwrap_or_default(),
                });
                out.push(msg);
            }
        }
        if let Some(remote) = reply.remote_config {
            if let Ok(hash) = ConfigHash::from_slice(&remote.config_hash) {
                self.seen.configs.push(hash);
            }
            let marker_hit = self.options.reject_containing.as_ref().and_then(|marker| {
                let hit = remote.config.as_ref().is_some_and(|c| {
                    c.config_map
                        .values()
                        .any(|f| String::from_utf8_lossy(&f.body).contains(marker.as_str()))
                });
                hit.then(|| format!("config rejected: contains {marker:?}"))
            });
            let rejection = self.options.reject_configs.clone().or(marker_hit);
            let status = match &rejection {
                Some(error) => RemoteConfigStatus {
                    last_remote_config_hash: remote.config_hash.clone(),
                    status: RemoteConfigStatuses::Failed as i32,
                    error_message: error.clone(),
                },
                None => {
                    self.effective = remote.config.clone();
                    self.seen.applied = remote.config;
                    RemoteConfigStatus {
                        last_remote_config_hash: remote.config_hash,
                        status: RemoteConfigStatuses::Applied as i32,
                        error_message: String::new(),
                    }
                }
            };
            self.status = Some(status.clone());
            let mut msg = self.base();
            if self.caps().has(AgentCapabilities::ReportsRemoteConfig) {
                msg.remote_config_status = Some(status);
            }
            if self.caps().has(AgentCapabilities::ReportsEffectiveConfig) && rejection.is_none() {
                msg.effective_config = Some(EffectiveConfig {
                    config_map: self.effective.clone(),
                });
            }
            out.push(msg);
        }
        if ServerFlags(reply.flags).has(ServerToAgentFlags::ReportFullState) {
            self.seen.full_state_requests += 1;
            out.push(self.full_report());
        }
        out
    }
}

#[derive(Debug)]
enum Command {
    Send(Box<AgentToServer>),
    Reconnect,
    Heartbeat,
    Health(bool, String),
    Disconnect,
}

/// A simulated agent running over a real transport.
#[derive(Debug)]
pub struct SimAgent {
    seen: watch::Receiver<Seen>,
    commands: mpsc::Sender<Command>,
    task: JoinHandle<anyhow::Result<()>>,
}

impl SimAgent {
    /// Connects over WebSocket to `url` (`ws://host:port/v1/opamp`) and sends
    /// the first, full status report. Does not reconnect.
    pub async fn connect_ws(url: &str, options: AgentOptions) -> anyhow::Result<Self> {
        Self::start_ws(vec![url.to_owned()], false, options).await
    }

    /// Connects to the first of `urls`; whenever the connection is lost,
    /// reconnects to the next one (round robin, like a load balancer would),
    /// with backoff.
    pub async fn connect_ws_any(urls: &[String], options: AgentOptions) -> anyhow::Result<Self> {
        Self::start_ws(urls.to_vec(), true, options).await
    }

    async fn start_ws(urls: Vec<String>, reconnect: bool, options: AgentOptions) -> anyhow::Result<Self> {
        let first = urls.first().context("no url")?.clone();
        let (socket, _) = ws_connect(&first, options.api_key.as_deref())
            .await
            .with_context(|| format!("websocket connect to {first}"))?;
        let mut core = AgentCore::new(options);
        core.seen.connected = true;
        core.seen.connections = 1;
        core.seen.url = first;
        let (seen_tx, seen) = watch::channel(core.seen.clone());
        let (commands, rx) = mpsc::channel(16);
        let task = tokio::spawn(run_ws(socket, urls, reconnect, core, seen_tx, rx));
        Ok(Self { seen, commands, task })
    }

    /// Starts polling `url` (`http://host:port/v1/opamp`) over plain HTTP.
    pub async fn connect_http(url: &str, options: AgentOptions) -> anyhow::Result<Self> {
        let core = AgentCore::new(options);
        let (seen_tx, seen) = watch::channel(core.seen.clone());
        let (commands, rx) = mpsc::channel(16);
        let task = tokio::spawn(run_http(url.to_owned(), core, seen_tx, rx));
        Ok(Self { seen, commands, task })
    }

    /// The uid the agent uses now.
    pub fn uid(&self) -> InstanceUid {
        self.seen.borrow().uid.unwrap_or(InstanceUid::from_array([0; 16]))
    }

    /// What the agent has seen so far.
    pub fn seen(&self) -> Seen {
        self.seen.borrow().clone()
    }

    /// Waits until `condition` holds for what the agent has seen.
    pub async fn wait_for(&self, what: &str, condition: impl Fn(&Seen) -> bool) -> anyhow::Result<Seen> {
        let mut rx = self.seen.clone();
        match tokio::time::timeout(DEFAULT_DEADLINE, rx.wait_for(|s| condition(s))).await {
            Ok(Ok(seen)) => Ok(seen.clone()),
            Ok(Err(_)) => bail!("agent stopped before {what}; saw {:?}", self.seen()),
            Err(_) => bail!("timed out waiting for {what}; saw {:?}", self.seen()),
        }
    }

    /// Waits until the agent received (and applied or rejected) config `hash`.
    pub async fn wait_for_config(&self, hash: &ConfigHash) -> anyhow::Result<Seen> {
        self.wait_for(&format!("config {hash}"), |s| s.configs.last() == Some(hash))
            .await
    }

    /// Drops the connection and reconnects to the next URL (only for
    /// [`SimAgent::connect_ws_any`]): an agent moving between gateways.
    pub async fn reconnect(&self) -> anyhow::Result<()> {
        self.command(Command::Reconnect).await
    }

    /// Sends a heartbeat now.
    pub async fn heartbeat(&self) -> anyhow::Result<()> {
        self.command(Command::Heartbeat).await
    }

    /// Reports a health change.
    pub async fn set_health(&self, healthy: bool, error: &str) -> anyhow::Result<()> {
        self.command(Command::Health(healthy, error.into())).await
    }

    /// Sends an arbitrary message (for protocol-edge tests).
    pub async fn send(&self, message: AgentToServer) -> anyhow::Result<()> {
        self.command(Command::Send(Box::new(message))).await
    }

    async fn command(&self, command: Command) -> anyhow::Result<()> {
        self.commands.send(command).await.context("agent task has stopped")
    }

    /// Says goodbye (`agent_disconnect`), closes, and waits for the task.
    pub async fn disconnect(self) -> anyhow::Result<()> {
        self.command(Command::Disconnect).await?;
        self.task.await.context("agent task panicked")?
    }

    /// Drops the connection without a goodbye, like a crashed agent.
    pub fn kill(self) {
        self.task.abort();
    }
}

pub type Socket = tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// How one WebSocket connection ended.
enum SessionEnd {
    /// The agent said goodbye (or its handle was dropped).
    Goodbye,
    /// The connection dropped, the server closed it, or the test asked for a
    /// move. `unacked`: a sent status may not have been processed.
    Lost { unacked: bool },
    /// The server said Unavailable: reconnect no sooner than this, and
    /// re-send the state the refused message carried.
    RetryAfter(Duration),
}

/// Runs one connection until it ends.
async fn session(
    socket: &mut Socket,
    opening: AgentToServer,
    core: &mut AgentCore,
    seen: &watch::Sender<Seen>,
    commands: &mut mpsc::Receiver<Command>,
) -> SessionEnd {
    let mut outbox = VecDeque::from([opening]);
    let mut ticker = core.options.heartbeat.map(tokio::time::interval);
    // Replies owed by the server for messages sent on this connection.
    let mut owed = 0usize;
    loop {
        while let Some(msg) = outbox.pop_front() {
            if socket
                .send(WsMessage::Binary(framing::encode_ws(&msg).into()))
                .await
                .is_err()
            {
                return SessionEnd::Lost { unacked: true };
            }
            owed += 1;
        }
        seen.send_replace(core.seen.clone());
        tokio::select! {
            frame = socket.next() => match frame {
                Some(Ok(WsMessage::Binary(bytes))) => {
                    let Ok(reply) = framing::decode_ws::<ServerToAgent>(&bytes, usize::MAX) else {
                        return SessionEnd::Lost { unacked: true };
                    };
                    // Counts pushes as replies too: close enough for a test agent,
                    // which only uses this to choose full or compressed resumes.
                    owed = owed.saturating_sub(1);
                    let unavailable = reply.error_response.as_ref().and_then(|e| {
                        (e.r#type == ServerErrorResponseType::Unavailable as i32).then(|| match &e.details {
                            Some(Details::RetryInfo(info)) => Duration::from_nanos(info.retry_after_nanoseconds),
                            None => Duration::ZERO,
                        })
                    });
                    outbox.extend(core.on_reply(reply));
                    if let Some(wait) = unavailable {
                        // The spec: disconnect, wait, reconnect.
                        seen.send_replace(core.seen.clone());
                        let _ = socket.close(None).await;
                        return SessionEnd::RetryAfter(wait);
                    }
                }
                Some(Ok(WsMessage::Close(_))) | None | Some(Err(_)) => return SessionEnd::Lost { unacked: owed > 0 },
                Some(Ok(_)) => {}
            },
            command = commands.recv() => match command {
                Some(Command::Send(msg)) => outbox.push_back(*msg),
                Some(Command::Heartbeat) => outbox.push_back(core.heartbeat()),
                Some(Command::Health(healthy, error)) => outbox.push_back(core.health_report(healthy, &error)),
                Some(Command::Reconnect) => {
                    let _ = socket.close(None).await;
                    return SessionEnd::Lost { unacked: owed > 0 };
                }
                Some(Command::Disconnect) | None => {
                    let bye = core.disconnect();
                    let _ = socket.send(WsMessage::Binary(framing::encode_ws(&bye).into())).await;
                    let _ = socket.close(None).await;
                    return SessionEnd::Goodbye;
                }
            },
            _ = async { match ticker.as_mut() { Some(t) => { t.tick().await; } None => std::future::pending().await } } => {
                outbox.push_back(core.heartbeat());
            }
        }
    }
}

/// Runs WebSocket sessions; with `reconnect`, a lost connection is retried
/// against the next URL with full-jitter backoff (honouring the server's
/// retry hint), and the agent resumes with a compressed report, as the spec
/// allows: a server that shares state across gateways knows the rest.
async fn run_ws(
    mut socket: Socket,
    urls: Vec<String>,
    reconnect: bool,
    mut core: AgentCore,
    seen: watch::Sender<Seen>,
    mut commands: mpsc::Receiver<Command>,
) -> anyhow::Result<()> {
    let mut backoff = fleetplane_proto::retry::Backoff::new(Duration::from_millis(50), Duration::from_secs(1));
    let mut next = 0;
    let mut opening = core.full_report();
    loop {
        let end = session(&mut socket, opening, &mut core, &seen, &mut commands).await;
        core.seen.connected = false;
        seen.send_replace(core.seen.clone());
        let (floor, resend_all) = match end {
            SessionEnd::Goodbye => return Ok(()),
            _ if !reconnect => return Ok(()),
            SessionEnd::Lost { unacked } => (Duration::ZERO, unacked),
            SessionEnd::RetryAfter(wait) => (wait, true),
        };
        // Reconnect until a server takes us, or the test says goodbye.
        socket = loop {
            let wait = backoff.next_wait(floor);
            tokio::select! {
                // The agent's reconnect backoff, as the spec asks of clients.
                _ = tokio::time::sleep(wait) => {}
                command = commands.recv() => if matches!(command, Some(Command::Disconnect) | None) {
                    return Ok(());
                },
            }
            next = (next + 1) % urls.len();
            if let Ok((socket, _)) = ws_connect(&urls[next], core.options.api_key.as_deref()).await {
                break socket;
            }
        };
        backoff.reset();
        core.seen.connections += 1;
        core.seen.url = urls[next].clone();
        core.seen.connected = true;
        // Nothing unacknowledged: a compressed report (the server has our
        // state). Otherwise the full state, so nothing refused is lost.
        opening = if resend_all {
            core.full_report()
        } else {
            core.heartbeat()
        };
    }
}

/// Opens a WebSocket to `url`, presenting `api_key` if given.
pub async fn ws_connect(
    url: &str,
    api_key: Option<&str>,
) -> Result<(Socket, tokio_tungstenite::tungstenite::handshake::client::Response), tokio_tungstenite::tungstenite::Error>
{
    use tokio_tungstenite::tungstenite::client::IntoClientRequest;
    let mut request = url.into_client_request()?;
    if let Some(key) = api_key
        && let Ok(value) = format!("Bearer {key}").parse()
    {
        request.headers_mut().insert("authorization", value);
    }
    tokio_tungstenite::connect_async(request).await
}

async fn post(
    client: &reqwest::Client,
    url: &str,
    msg: &AgentToServer,
    gzip: bool,
    api_key: Option<&str>,
) -> anyhow::Result<Result<ServerToAgent, u16>> {
    let body = msg.encode_to_vec();
    let uid = InstanceUid::from_slice(&msg.instance_uid)
        .map(|u| u.to_uuid_string())
        .unwrap_or_default();
    let mut request = client
        .post(url)
        .header("content-type", CONTENT_TYPE_PROTOBUF)
        .header(HEADER_INSTANCE_UID, uid);
    if let Some(key) = api_key {
        request = request.bearer_auth(key);
    }
    request = if gzip {
        let mut encoder = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        std::io::Write::write_all(&mut encoder, &body)?;
        request.header("content-encoding", "gzip").body(encoder.finish()?)
    } else {
        request.body(body)
    };
    let response = request.send().await?;
    if !response.status().is_success() {
        return Ok(Err(response.status().as_u16()));
    }
    let bytes = response.bytes().await?;
    Ok(Ok(framing::decode(&bytes, usize::MAX)?))
}

async fn run_http(
    url: String,
    mut core: AgentCore,
    seen: watch::Sender<Seen>,
    mut commands: mpsc::Receiver<Command>,
) -> anyhow::Result<()> {
    let client = reqwest::Client::new();
    let poll = core.options.heartbeat.unwrap_or(Duration::from_millis(200));
    let gzip = core.options.gzip;
    let mut outbox = VecDeque::from([core.full_report()]);
    loop {
        while let Some(msg) = outbox.pop_front() {
            match post(&client, &url, &msg, gzip, core.options.api_key.as_deref()).await? {
                Ok(reply) => {
                    core.seen.connected = true;
                    outbox.extend(core.on_reply(reply));
                }
                Err(status) => {
                    core.seen.http_statuses.push(status);
                    // Retried with the next poll, as the latest state.
                    seen.send_replace(core.seen.clone());
                    break;
                }
            }
            seen.send_replace(core.seen.clone());
        }
        tokio::select! {
            // The polling interval: how an HTTP agent asks for pending messages.
            _ = tokio::time::sleep(poll) => outbox.push_back(core.heartbeat()),
            command = commands.recv() => match command {
                Some(Command::Send(msg)) => outbox.push_back(*msg),
                Some(Command::Heartbeat) => outbox.push_back(core.heartbeat()),
                // Plain HTTP has no connection to move.
                Some(Command::Reconnect) => {}
                Some(Command::Health(healthy, error)) => outbox.push_back(core.health_report(healthy, &error)),
                Some(Command::Disconnect) | None => {
                    let bye = core.disconnect();
                    let _ = post(&client, &url, &bye, gzip, core.options.api_key.as_deref()).await?;
                    break;
                }
            },
        }
    }
    core.seen.connected = false;
    seen.send_replace(core.seen.clone());
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use fleetplane_proto::opamp::{AgentConfigFile, AgentIdentification, AgentRemoteConfig};

    fn config_reply(uid: &InstanceUid) -> ServerToAgent {
        let mut map = AgentConfigMap::default();
        map.config_map.insert(
            "".into(),
            AgentConfigFile {
                body: b"a: 1".to_vec(),
                ..Default::default()
            },
        );
        ServerToAgent {
            instance_uid: uid.to_vec(),
            remote_config: Some(AgentRemoteConfig {
                config_hash: ConfigHash::of_config(&map).to_vec(),
                config: Some(map),
            }),
            ..Default::default()
        }
    }

    #[test]
    fn applies_and_reports_configs() {
        let mut core = AgentCore::new(AgentOptions::default());
        let first = core.full_report();
        assert_eq!(first.sequence_num, 1);
        assert!(first.agent_description.is_some());
        let out = core.on_reply(config_reply(&core.uid()));
        assert_eq!(out.len(), 1);
        let status = out[0].remote_config_status.as_ref().unwrap();
        assert_eq!(status.status, RemoteConfigStatuses::Applied as i32);
        assert_eq!(out[0].sequence_num, 2);
        assert!(core.seen.applied.is_some());
    }

    #[test]
    fn rejects_when_told_to() {
        let mut core = AgentCore::new(AgentOptions::default().reject_configs("bad pipeline"));
        let out = core.on_reply(config_reply(&core.uid()));
        let status = out[0].remote_config_status.as_ref().unwrap();
        assert_eq!(status.status, RemoteConfigStatuses::Failed as i32);
        assert_eq!(status.error_message, "bad pipeline");
        assert!(core.seen.applied.is_none());
    }

    #[test]
    fn adopts_new_uid_and_answers_full_state() {
        let mut core = AgentCore::new(AgentOptions {
            request_uid: true,
            ..Default::default()
        });
        assert_eq!(core.full_report().flags, 1);
        let new = InstanceUid::new_v7();
        let out = core.on_reply(ServerToAgent {
            agent_identification: Some(AgentIdentification {
                new_instance_uid: new.to_vec(),
            }),
            flags: ServerToAgentFlags::ReportFullState as u64,
            ..Default::default()
        });
        assert_eq!(core.uid(), new);
        assert_eq!(out[0].instance_uid, new.to_vec());
        assert_eq!(out[0].flags, 0, "the new uid is not temporary");
    }
}
