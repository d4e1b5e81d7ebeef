//! The scaled form as separate processes: real `nats-server` and
//! `redis-server` of the test's own, N gateway and M coordinator processes of
//! the `fleetplane` binary, on loopback ports.
//!
//! ```ignore
//! let fleet = Fleet::builder(env!("CARGO_BIN_EXE_fleetplane")).gateways(2).coordinators(2).start().await?;
//! ```

use std::{net::SocketAddr, path::PathBuf, process::Stdio, time::Duration};

use anyhow::{Context, bail};
use tokio::{
    io::{AsyncBufReadExt, BufReader},
    process::{Child, Command},
};

use crate::{
    admin::Admin,
    services::{NatsServer, RedisCluster, RedisServer},
};

/// One `fleetplane` process.
#[derive(Debug)]
pub struct NodeProcess {
    child: Child,
    /// The OpAMP address (gateways) or admin address (coordinators).
    pub addr: SocketAddr,
    /// Gateway health endpoint.
    pub health: Option<SocketAddr>,
    /// The OpAMP address of a gateway or an all-in-one node.
    pub opamp: Option<SocketAddr>,
    mode: &'static str,
    env: Vec<(String, String)>,
    binary: PathBuf,
}

/// The Prometheus text a node serves at `/metrics` on `addr`.
pub async fn scrape(addr: SocketAddr) -> anyhow::Result<String> {
    Ok(reqwest::get(format!("http://{addr}/metrics")).await?.text().await?)
}

/// The fields of the server's JSON ready line that tests use (the line is
/// documented in the server binary: `{"event":"ready","role":...}`).
#[derive(Debug, serde::Deserialize)]
struct ReadyLine {
    event: String,
    opamp: Option<SocketAddr>,
    admin: Option<SocketAddr>,
    health: Option<SocketAddr>,
}

impl NodeProcess {
    /// Starts `fleetplane MODE` with `env` and waits for its ready line.
    pub async fn spawn(binary: &PathBuf, mode: &'static str, env: Vec<(String, String)>) -> anyhow::Result<Self> {
        let mut child = Command::new(binary)
            .arg(mode)
            .envs(env.iter().cloned())
            .env(
                "RUST_LOG",
                std::env::var("FLEETPLANE_TEST_LOG").unwrap_or_else(|_| "warn".into()),
            )
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("starting {} {mode}", binary.display()))?;
        let stdout = child.stdout.take().context("stdout")?;
        let mut lines = BufReader::new(stdout).lines();
        let line = tokio::time::timeout(Duration::from_secs(30), lines.next_line())
            .await
            .with_context(|| format!("{mode} did not become ready within 30 s"))??
            .with_context(|| format!("{mode} exited before it was ready"))?;
        // Keep draining stdout so the process never blocks on a full pipe.
        tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
        let ready: ReadyLine =
            serde_json::from_str(&line).with_context(|| format!("{mode}: not a ready line: {line:?}"))?;
        if ready.event != "ready" {
            bail!("{mode}: unexpected first line {line:?}");
        }
        let (addr, health) = match mode {
            "gateway" => (ready.opamp, ready.health),
            _ => (ready.admin, None),
        };
        let addr = addr.with_context(|| format!("no address in ready line {line:?}"))?;
        Ok(Self {
            child,
            addr,
            health,
            opamp: ready.opamp,
            mode,
            env,
            binary: binary.clone(),
        })
    }

    /// The process id, while the process runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.id()
    }

    /// SIGKILL: no goodbye, no drain.
    pub async fn kill(&mut self) {
        let _ = self.child.kill().await;
    }

    /// Sends SIGTERM without waiting.
    pub fn signal_term(&self) -> anyhow::Result<()> {
        let pid = self.child.id().context("process already gone")?;
        let status = std::process::Command::new("kill")
            .arg("-TERM")
            .arg(pid.to_string())
            .status()?;
        if !status.success() {
            bail!("kill -TERM {pid} failed");
        }
        Ok(())
    }

    /// Waits up to `within` for the process to exit; its exit status.
    pub async fn wait_exit(&mut self, within: Duration) -> anyhow::Result<std::process::ExitStatus> {
        Ok(tokio::time::timeout(within, self.child.wait())
            .await
            .with_context(|| format!("{} still running after {within:?}", self.mode))??)
    }

    /// SIGTERM, then waits for a clean exit.
    pub async fn terminate(&mut self) -> anyhow::Result<()> {
        self.signal_term()?;
        let exit = self.wait_exit(Duration::from_secs(30)).await?;
        if !exit.success() {
            bail!("{} exited with {exit}", self.mode);
        }
        Ok(())
    }

    /// Starts the same node again (new process, same settings).
    pub async fn respawn(&self) -> anyhow::Result<Self> {
        Self::spawn(&self.binary, self.mode, self.env.clone()).await
    }
}

/// Builds a [`Fleet`].
#[derive(Debug)]
pub struct FleetBuilder {
    binary: PathBuf,
    gateways: usize,
    coordinators: usize,
    nats_nodes: usize,
    redis_masters: usize,
    env: Vec<(String, String)>,
}

impl FleetBuilder {
    /// Number of gateway processes.
    #[must_use]
    pub fn gateways(mut self, n: usize) -> Self {
        self.gateways = n;
        self
    }

    /// Number of coordinator processes.
    #[must_use]
    pub fn coordinators(mut self, n: usize) -> Self {
        self.coordinators = n;
        self
    }

    /// A NATS cluster of `nodes` routed servers instead of one; every node
    /// is given all their URLs.
    #[must_use]
    pub fn nats_nodes(mut self, nodes: usize) -> Self {
        self.nats_nodes = nodes.max(1);
        self
    }

    /// A Redis Cluster of `masters` primaries (each with a replica) instead
    /// of one `redis-server`.
    #[must_use]
    pub fn redis_cluster(mut self, masters: usize) -> Self {
        self.redis_masters = masters;
        self
    }

    /// An environment variable for every node.
    #[must_use]
    pub fn env(mut self, key: &str, value: impl Into<String>) -> Self {
        self.env.push((key.to_owned(), value.into()));
        self
    }

    /// Starts NATS, Redis, the coordinators, then the gateways.
    pub async fn start(self) -> anyhow::Result<Fleet> {
        let (nats, nats_peers) = if self.nats_nodes > 1 {
            let mut nodes = NatsServer::start_cluster(self.nats_nodes)?;
            for node in &nodes {
                node.wait_routes(self.nats_nodes - 1).await?;
            }
            let first = nodes.remove(0);
            (first, nodes)
        } else {
            (NatsServer::start()?, Vec::new())
        };
        let redis = if self.redis_masters > 0 {
            Redis::Cluster(RedisCluster::start(self.redis_masters)?)
        } else {
            Redis::Server(RedisServer::start()?)
        };
        let mut fleet = Fleet {
            extra_env: self.env,
            binary: self.binary,
            nats,
            nats_peers,
            redis,
            gateways: Vec::new(),
            coordinators: Vec::new(),
        };
        for i in 0..self.coordinators {
            let node = NodeProcess::spawn(&fleet.binary, "coordinator", fleet.coordinator_env()).await?;
            tracing::debug!(i, addr = %node.addr, "coordinator up");
            fleet.coordinators.push(node);
        }
        for i in 0..self.gateways {
            let node = NodeProcess::spawn(&fleet.binary, "gateway", fleet.gateway_env(i)).await?;
            fleet.gateways.push(node);
        }
        Ok(fleet)
    }
}

/// A fleet's store: one Redis server or a Redis Cluster.
#[derive(Debug)]
pub enum Redis {
    /// One `redis-server`.
    Server(RedisServer),
    /// A Redis Cluster ([`FleetBuilder::redis_cluster`]).
    Cluster(RedisCluster),
}

impl Redis {
    /// The URL the nodes are given (every node's, comma-separated, for a
    /// cluster).
    pub fn url(&self) -> String {
        match self {
            Self::Server(server) => server.url(),
            Self::Cluster(cluster) => cluster.url(),
        }
    }

    /// The one server, unless this is a cluster.
    pub fn server(&mut self) -> Option<&mut RedisServer> {
        match self {
            Self::Server(server) => Some(server),
            Self::Cluster(_) => None,
        }
    }

    /// The cluster, unless this is one server.
    pub fn cluster(&mut self) -> Option<&mut RedisCluster> {
        match self {
            Self::Server(_) => None,
            Self::Cluster(cluster) => Some(cluster),
        }
    }
}

/// NATS, Redis, gateways and coordinators, all real processes.
#[derive(Debug)]
pub struct Fleet {
    binary: PathBuf,
    extra_env: Vec<(String, String)>,
    /// The bus (the first node of a NATS cluster).
    pub nats: NatsServer,
    /// The other nodes of a NATS cluster (none with one server).
    pub nats_peers: Vec<NatsServer>,
    /// The store.
    pub redis: Redis,
    /// Gateway processes.
    pub gateways: Vec<NodeProcess>,
    /// Coordinator processes.
    pub coordinators: Vec<NodeProcess>,
}

fn common_env(nats: &[&NatsServer]) -> Vec<(String, String)> {
    let urls: Vec<String> = nats.iter().map(|n| n.url()).collect();
    [
        ("FLEETPLANE_NATS_URL", urls.join(",")),
        ("FLEETPLANE_OPAMP_LISTEN", "127.0.0.1:0".into()),
        ("FLEETPLANE_ADMIN_LISTEN", "127.0.0.1:0".into()),
        // Short retry hints and failure detection keep recovery tests quick.
        ("FLEETPLANE_RETRY_AFTER_SECS", "1".into()),
        ("FLEETPLANE_GATEWAY_DEAD_AFTER_SECS", "3".into()),
        // Open mode unless a test sets FLEETPLANE_AGENTS_AUTH=api_key itself
        // (the builder's env comes after this).
        ("FLEETPLANE_AGENTS_AUTH", "none".into()),
    ]
    .map(|(k, v)| (k.to_owned(), v))
    .to_vec()
}

impl Fleet {
    /// A builder for the `fleetplane` binary at `binary`.
    pub fn builder(binary: impl Into<PathBuf>) -> FleetBuilder {
        FleetBuilder {
            binary: binary.into(),
            gateways: 1,
            coordinators: 1,
            nats_nodes: 1,
            redis_masters: 0,
            env: Vec::new(),
        }
    }

    /// Every NATS node, the first one first.
    fn nats_nodes(&self) -> Vec<&NatsServer> {
        std::iter::once(&self.nats).chain(&self.nats_peers).collect()
    }

    fn coordinator_env(&self) -> Vec<(String, String)> {
        let mut env = common_env(&self.nats_nodes());
        env.push(("FLEETPLANE_REDIS_URL".into(), self.redis.url()));
        env.extend(self.extra_env.iter().cloned());
        env
    }

    fn gateway_env(&self, i: usize) -> Vec<(String, String)> {
        let mut env = common_env(&self.nats_nodes());
        env.push(("FLEETPLANE_GATEWAY_ID".into(), format!("gw-{i}")));
        env.extend(self.extra_env.iter().cloned());
        env
    }

    /// `ws://…/v1/opamp` of every gateway, in order.
    pub fn ws_urls(&self) -> Vec<String> {
        self.gateways
            .iter()
            .map(|g| format!("ws://{}/v1/opamp", g.addr))
            .collect()
    }

    /// `http://…/v1/opamp` of every gateway, in order.
    pub fn http_urls(&self) -> Vec<String> {
        self.gateways
            .iter()
            .map(|g| format!("http://{}/v1/opamp", g.addr))
            .collect()
    }

    /// The admin API of coordinator `i`.
    pub fn admin(&self, i: usize) -> Admin {
        Admin::new(self.coordinators[i].addr)
    }

    /// An admin client on the first coordinator still listed.
    pub fn any_admin(&self) -> Admin {
        self.admin(0)
    }
}
