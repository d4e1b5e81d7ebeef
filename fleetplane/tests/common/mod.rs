//! Shared set-up for the all-in-one integration tests.
#![allow(dead_code)]

use std::path::Path;

use fleetplane::{AllInOne, Config};
use fleetplane_testkit::admin::Admin;

/// An all-in-one server on ephemeral loopback ports with its own data dir.
pub struct Server {
    pub server: AllInOne,
    pub data: tempfile::TempDir,
    pub admin: Admin,
}

pub fn config(data_dir: &Path) -> Config {
    let mut config = Config::default();
    config.opamp.listen = "127.0.0.1:0".parse().unwrap();
    config.admin.listen = "127.0.0.1:0".parse().unwrap();
    config.store.data_dir = data_dir.to_owned();
    // Tests stop servers often; closing at once keeps them quick.
    config.gateway.drain_ms = 0;
    // Open mode unless a test is about credentials (tests/tenancy.rs).
    config.agents.auth = fleetplane::config::AgentAuth::None;
    config
}

impl Server {
    pub async fn start() -> Self {
        let data = tempfile::tempdir().unwrap();
        Self::start_with(data, |_| {}).await
    }

    pub async fn start_with(data: tempfile::TempDir, tweak: impl FnOnce(&mut Config)) -> Self {
        let mut config = config(data.path());
        tweak(&mut config);
        let server = AllInOne::start(&config).await.unwrap();
        let mut admin = Admin::new(server.admin_addr);
        if let Some(token) = &config.admin.token {
            admin = admin.with_token(token);
        }
        Self { server, data, admin }
    }

    pub fn ws_url(&self) -> String {
        format!("ws://{}/v1/opamp", self.server.opamp_addr)
    }

    pub fn http_url(&self) -> String {
        format!("http://{}/v1/opamp", self.server.opamp_addr)
    }

    /// Stops the server, keeping its data directory for a restart.
    pub async fn stop(self) -> tempfile::TempDir {
        self.server.stop().await.unwrap();
        self.data
    }
}

/// A hand-driven OpAMP WebSocket client: sends exactly what a test says and
/// reads what comes back, for agents that misbehave (fall silent, forge,
/// duplicate) in ways the simulated agents never would.
pub struct RawAgent {
    socket: tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>,
    pub uid: fleetplane_proto::InstanceUid,
    pub seq: u64,
}

/// Capabilities of an agent that takes and reports remote config.
pub const CONFIGURABLE: u64 = fleetplane_proto::opamp::AgentCapabilities::ReportsStatus as u64
    | fleetplane_proto::opamp::AgentCapabilities::AcceptsRemoteConfig as u64
    | fleetplane_proto::opamp::AgentCapabilities::ReportsRemoteConfig as u64;

impl RawAgent {
    pub async fn connect(url: &str, uid: fleetplane_proto::InstanceUid) -> Self {
        Self::connect_with(url, uid, None).await
    }

    /// Connects presenting `api_key`.
    pub async fn connect_with(url: &str, uid: fleetplane_proto::InstanceUid, api_key: Option<&str>) -> Self {
        let (socket, _) = fleetplane_testkit::agent::ws_connect(url, api_key).await.unwrap();
        Self { socket, uid, seq: 0 }
    }

    /// A full first report describing `service`.
    pub fn hello(&mut self, service: &str) -> fleetplane_proto::opamp::AgentToServer {
        use fleetplane_proto::opamp::{AgentDescription, AgentToServer};
        self.seq += 1;
        AgentToServer {
            instance_uid: self.uid.to_vec(),
            sequence_num: self.seq,
            capabilities: CONFIGURABLE,
            agent_description: Some(AgentDescription {
                identifying_attributes: vec![fleetplane_proto::attributes::string_kv("service.name", service)],
                non_identifying_attributes: vec![],
            }),
            ..Default::default()
        }
    }

    /// A status report: `hash` applied (or failed).
    pub fn status(
        &mut self,
        hash: &[u8],
        status: fleetplane_proto::opamp::RemoteConfigStatuses,
    ) -> fleetplane_proto::opamp::AgentToServer {
        use fleetplane_proto::opamp::{AgentToServer, RemoteConfigStatus};
        self.seq += 1;
        AgentToServer {
            instance_uid: self.uid.to_vec(),
            sequence_num: self.seq,
            capabilities: CONFIGURABLE,
            remote_config_status: Some(RemoteConfigStatus {
                last_remote_config_hash: hash.to_vec(),
                status: status as i32,
                error_message: String::new(),
            }),
            ..Default::default()
        }
    }

    pub async fn send(&mut self, message: &fleetplane_proto::opamp::AgentToServer) {
        use futures_util::SinkExt;
        let frame = fleetplane_proto::framing::encode_ws(message);
        self.socket
            .send(tokio_tungstenite::tungstenite::Message::Binary(frame.into()))
            .await
            .unwrap();
    }

    /// The next message from the server, within `within`.
    pub async fn recv(&mut self, within: std::time::Duration) -> Option<fleetplane_proto::opamp::ServerToAgent> {
        use futures_util::StreamExt;
        let deadline = tokio::time::Instant::now() + within;
        loop {
            let frame = tokio::time::timeout_at(deadline, self.socket.next())
                .await
                .ok()??
                .ok()?;
            if let tokio_tungstenite::tungstenite::Message::Binary(bytes) = frame {
                return fleetplane_proto::framing::decode_ws(&bytes, usize::MAX).ok();
            }
        }
    }

    /// Reads until a message satisfies `check`, within `within`.
    pub async fn recv_until(
        &mut self,
        within: std::time::Duration,
        check: impl Fn(&fleetplane_proto::opamp::ServerToAgent) -> bool,
    ) -> fleetplane_proto::opamp::ServerToAgent {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            match self.recv(left).await {
                Some(message) if check(&message) => return message,
                Some(_) => continue,
                None => panic!("no matching message from the server within {within:?}"),
            }
        }
    }

    /// Sends `message` and returns the server's answer to it (skipping pushes
    /// that are not addressed as a reply is not possible to tell apart, so
    /// the next message is taken).
    pub async fn ask(
        &mut self,
        message: &fleetplane_proto::opamp::AgentToServer,
    ) -> fleetplane_proto::opamp::ServerToAgent {
        self.send(message).await;
        self.recv(std::time::Duration::from_secs(30)).await.expect("an answer")
    }

    /// The raw socket, for closing handshakes and the like.
    pub fn socket(
        &mut self,
    ) -> &mut tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>> {
        &mut self.socket
    }
}

/// The scaled form most scenarios run in: two gateways and two coordinator
/// processes over a NATS and a Redis of their own.
pub async fn two_by_two() -> fleetplane_testkit::fleet::Fleet {
    scaled(2, 2).await
}

/// The scaled form with this many gateway and coordinator processes.
pub async fn scaled(gateways: usize, coordinators: usize) -> fleetplane_testkit::fleet::Fleet {
    fleetplane_testkit::fleet::Fleet::builder(env!("CARGO_BIN_EXE_fleetplane"))
        .gateways(gateways)
        .coordinators(coordinators)
        .start()
        .await
        .unwrap()
}
