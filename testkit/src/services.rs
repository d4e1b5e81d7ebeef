//! Real `redis-server` and `nats-server` processes for tests, each on its own
//! loopback port with its own data directory, killed when dropped. Tests never
//! touch the machine's shared instances, and can restart a server in place
//! (same port, same data) to test recovery.

use std::{
    net::TcpListener,
    path::PathBuf,
    process::{Child, Command, Stdio},
    time::Duration,
};

use anyhow::{Context, bail};

/// A free loopback port (the OS picks; released before the server binds it).
pub fn free_port() -> anyhow::Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// Finds a server binary on PATH or in the sbin directories Debian uses.
fn find(binary: &str) -> anyhow::Result<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/sbin", "/usr/local/sbin", "/usr/bin"].map(PathBuf::from))
        .map(|dir| dir.join(binary))
        .find(|candidate| candidate.is_file())
        .with_context(|| format!("{binary} not found: install it (scripts/test.sh does)"))
}

/// Waits until something accepts TCP connections on `port`.
fn wait_listening(port: u16, child: &mut Child, name: &str) -> anyhow::Result<()> {
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    loop {
        if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
            return Ok(());
        }
        if let Some(status) = child.try_wait()? {
            bail!("{name} exited with {status} before listening on {port}");
        }
        if std::time::Instant::now() > deadline {
            bail!("{name} did not listen on {port} within 15 s");
        }
        // Polling a port that is not open yet; bounded by the deadline above.
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A test-owned server process.
#[derive(Debug)]
struct Process {
    name: &'static str,
    binary: PathBuf,
    args: Vec<String>,
    port: u16,
    child: Option<Child>,
}

impl Process {
    fn start(name: &'static str, binary: PathBuf, args: Vec<String>, port: u16) -> anyhow::Result<Self> {
        let mut process = Self {
            name,
            binary,
            args,
            port,
            child: None,
        };
        process.spawn()?;
        Ok(process)
    }

    fn spawn(&mut self) -> anyhow::Result<()> {
        let mut child = Command::new(&self.binary)
            .args(&self.args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            // Their logs are noise in test output; a server that fails to
            // start is reported by wait_listening.
            .stderr(Stdio::null())
            .spawn()
            .with_context(|| format!("starting {}", self.binary.display()))?;
        wait_listening(self.port, &mut child, self.name)?;
        self.child = Some(child);
        Ok(())
    }

    fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A `redis-server` with append-only persistence in a temporary directory, so
/// that a restart keeps the data, as a production Redis for Fleetplane must.
#[derive(Debug)]
pub struct RedisServer {
    process: Process,
    _dir: tempfile::TempDir,
}

/// When Redis writes its append-only file to disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fsync {
    /// Before every write is acknowledged: what tests need, since they
    /// SIGKILL the server and expect what was acknowledged to survive.
    Always,
    /// Once a second, as production Redis usually runs: what benchmarks
    /// measure against.
    EverySecond,
}

impl RedisServer {
    /// Starts one on a free port, every write on disk before it is
    /// acknowledged.
    pub fn start() -> anyhow::Result<Self> {
        Self::start_with(Fsync::Always)
    }

    /// Starts one on a free port with this fsync policy.
    pub fn start_with(fsync: Fsync) -> anyhow::Result<Self> {
        let dir = tempfile::Builder::new().prefix("fleetplane-redis").tempdir()?;
        let port = free_port()?;
        let args = [
            "--port",
            &port.to_string(),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "yes",
            // With `everysec` Redis may hold back up to 2 s of writes that
            // a SIGKILL loses.
            "--appendfsync",
            match fsync {
                Fsync::Always => "always",
                Fsync::EverySecond => "everysec",
            },
            "--dir",
            &dir.path().display().to_string(),
        ]
        .map(String::from)
        .to_vec();
        let process = Process::start("redis-server", find("redis-server")?, args, port)?;
        Ok(Self { process, _dir: dir })
    }

    /// `redis://127.0.0.1:PORT/0`
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/0", self.process.port)
    }

    /// Kills the server (SIGKILL).
    pub fn kill(&mut self) {
        self.process.kill();
    }

    /// Starts it again on the same port with the same data.
    pub fn restart(&mut self) -> anyhow::Result<()> {
        self.process.kill();
        self.process.spawn()
    }
}

/// A Redis Cluster of test-owned `redis-server`s on loopback: `masters`
/// primaries, each with one replica, created with `redis-cli --cluster
/// create`, with a 1 s node timeout so that a killed primary's replica takes
/// over within a few seconds. Every write is on disk before it is
/// acknowledged, as with [`RedisServer`].
#[derive(Debug)]
pub struct RedisCluster {
    nodes: Vec<Process>,
    _dir: tempfile::TempDir,
}

/// One line of `CLUSTER NODES`.
#[derive(Debug, Clone)]
struct ClusterNode {
    port: u16,
    primary: bool,
    failed: bool,
    slots: Vec<(u16, u16)>,
}

impl RedisCluster {
    /// Starts `masters` primaries and as many replicas and waits until the
    /// cluster serves every slot.
    pub fn start(masters: usize) -> anyhow::Result<Self> {
        let dir = tempfile::Builder::new().prefix("fleetplane-redis-cluster").tempdir()?;
        let binary = find("redis-server")?;
        let mut nodes = Vec::new();
        for _ in 0..masters * 2 {
            let (port, bus) = (free_port()?, free_port()?);
            let node_dir = dir.path().join(port.to_string());
            std::fs::create_dir(&node_dir)?;
            let args = [
                "--port",
                &port.to_string(),
                "--bind",
                "127.0.0.1",
                "--cluster-enabled",
                "yes",
                "--cluster-port",
                &bus.to_string(),
                "--cluster-config-file",
                "nodes.conf",
                "--cluster-node-timeout",
                "1000",
                // A replica may always take over, however long it was cut off.
                "--cluster-replica-validity-factor",
                "0",
                "--save",
                "",
                "--appendonly",
                "yes",
                "--appendfsync",
                "always",
                "--dir",
                &node_dir.display().to_string(),
            ]
            .map(String::from)
            .to_vec();
            nodes.push(Process::start("redis-server", binary.clone(), args, port)?);
        }
        let mut create = Command::new(find("redis-cli")?);
        create.arg("--cluster").arg("create");
        for node in &nodes {
            create.arg(format!("127.0.0.1:{}", node.port));
        }
        let out = create
            .args(["--cluster-replicas", "1", "--cluster-yes"])
            .stdin(Stdio::null())
            .output()
            .context("running redis-cli --cluster create")?;
        if !out.status.success() {
            bail!(
                "redis-cli --cluster create failed: {}",
                String::from_utf8_lossy(&out.stdout)
            );
        }
        let cluster = Self { nodes, _dir: dir };
        cluster.wait_healthy(masters)?;
        Ok(cluster)
    }

    /// Every node's URL, comma-separated (what `FLEETPLANE_REDIS_URL` takes).
    pub fn url(&self) -> String {
        self.live_ports()
            .map(|port| format!("redis://127.0.0.1:{port}"))
            .collect::<Vec<_>>()
            .join(",")
    }

    fn live_ports(&self) -> impl Iterator<Item = u16> + '_ {
        self.nodes.iter().filter(|n| n.child.is_some()).map(|n| n.port)
    }

    /// Runs `redis-cli -p PORT ARGS…` and returns its output.
    fn cli(port: u16, args: &[&str]) -> anyhow::Result<String> {
        let out = Command::new(find("redis-cli")?)
            .args(["-p", &port.to_string()])
            .args(args)
            .stdin(Stdio::null())
            .output()?;
        if !out.status.success() {
            bail!("redis-cli {args:?} on {port} failed");
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    fn nodes_seen_by(port: u16) -> anyhow::Result<Vec<ClusterNode>> {
        let text = Self::cli(port, &["cluster", "nodes"])?;
        let mut nodes = Vec::new();
        for line in text.lines().filter(|l| !l.trim().is_empty()) {
            let fields: Vec<&str> = line.split_whitespace().collect();
            let (Some(addr), Some(flags)) = (fields.get(1), fields.get(2)) else {
                continue;
            };
            let port = addr
                .split('@')
                .next()
                .and_then(|a| a.rsplit(':').next())
                .and_then(|p| p.parse().ok())
                .context("node address")?;
            let slots = fields
                .iter()
                .skip(8)
                .filter(|s| !s.starts_with('['))
                .filter_map(|range| {
                    let (from, to) = range.split_once('-').unwrap_or((range, range));
                    Some((from.parse().ok()?, to.parse().ok()?))
                })
                .collect();
            nodes.push(ClusterNode {
                port,
                primary: flags.contains("master"),
                failed: flags.split(',').any(|f| f == "fail" || f == "fail?"),
                slots,
            });
        }
        Ok(nodes)
    }

    /// Waits until every live node sees `masters` live primaries serving
    /// all 16,384 slots and reports `cluster_state:ok`.
    pub fn wait_healthy(&self, masters: usize) -> anyhow::Result<()> {
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        loop {
            let healthy = self.live_ports().all(|port| {
                let ok = Self::cli(port, &["cluster", "info"]).is_ok_and(|info| info.contains("cluster_state:ok"));
                let served: u32 = Self::nodes_seen_by(port)
                    .map(|nodes| {
                        let primaries: Vec<_> = nodes.iter().filter(|n| n.primary && !n.failed).collect();
                        if primaries.len() != masters || !primaries.iter().all(|n| self.is_live(n.port)) {
                            return 0;
                        }
                        primaries
                            .iter()
                            .flat_map(|n| &n.slots)
                            .map(|(from, to)| u32::from(to - from) + 1)
                            .sum()
                    })
                    .unwrap_or(0);
                ok && served == 16_384
            });
            if healthy {
                return Ok(());
            }
            if std::time::Instant::now() > deadline {
                bail!("the Redis Cluster is not healthy after 30 s");
            }
            // Cluster gossip has no event to wait on; bounded by the deadline.
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn is_live(&self, port: u16) -> bool {
        self.live_ports().any(|p| p == port)
    }

    /// The port of the primary serving `key`'s slot.
    pub fn primary_of(&self, key: &str) -> anyhow::Result<u16> {
        let any = self.live_ports().next().context("no live node")?;
        let slot: u16 = Self::cli(any, &["cluster", "keyslot", key])?.trim().parse()?;
        Self::nodes_seen_by(any)?
            .into_iter()
            .find(|n| n.primary && !n.failed && n.slots.iter().any(|(from, to)| (*from..=*to).contains(&slot)))
            .map(|n| n.port)
            .context("no primary serves the slot")
    }

    /// The number of keys each live primary holds, by port.
    pub fn keys_per_primary(&self) -> anyhow::Result<Vec<(u16, u64)>> {
        let any = self.live_ports().next().context("no live node")?;
        Self::nodes_seen_by(any)?
            .into_iter()
            .filter(|n| n.primary && !n.failed && self.is_live(n.port))
            .map(|n| Ok((n.port, Self::cli(n.port, &["dbsize"])?.trim().parse()?)))
            .collect()
    }

    /// Waits until the replicas of the primary on `port` hold every write it
    /// acknowledged (replication is asynchronous: a primary killed before
    /// that loses the difference, as a real one would).
    pub fn wait_replicated(&self, port: u16) -> anyhow::Result<()> {
        let deadline = std::time::Instant::now() + Duration::from_secs(15);
        loop {
            let info = Self::cli(port, &["info", "replication"])?;
            let offset = info
                .lines()
                .find_map(|l| l.strip_prefix("master_repl_offset:"))
                .and_then(|v| v.trim().parse::<u64>().ok())
                .context("master_repl_offset")?;
            let replicas: Vec<u64> = info
                .lines()
                .filter(|l| l.starts_with("slave") && l.contains("state=online"))
                .filter_map(|l| l.split(',').find_map(|f| f.strip_prefix("offset="))?.parse().ok())
                .collect();
            if !replicas.is_empty() && replicas.iter().all(|r| *r >= offset) {
                return Ok(());
            }
            if std::time::Instant::now() > deadline {
                bail!("replicas of {port} at {replicas:?}, primary at {offset}, after 15 s");
            }
            // Replication acknowledgements arrive once a second.
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// SIGKILLs the primary on `port` and waits until its replica has taken
    /// over and the cluster serves every slot again.
    pub fn kill_primary(&mut self, port: u16) -> anyhow::Result<()> {
        let masters = self
            .live_ports()
            .next()
            .map(Self::nodes_seen_by)
            .transpose()?
            .map(|nodes| nodes.iter().filter(|n| n.primary && !n.failed).count())
            .unwrap_or(0);
        let node = self.nodes.iter_mut().find(|n| n.port == port).context("no such node")?;
        node.kill();
        self.wait_healthy(masters)
    }
}

/// A plain core-NATS `nats-server` on a free port, alone or one node of a
/// cluster.
#[derive(Debug)]
pub struct NatsServer {
    process: Process,
    /// The HTTP monitoring port of a cluster node (to see its routes).
    monitor: Option<u16>,
}

impl NatsServer {
    /// Starts one on a free port.
    pub fn start() -> anyhow::Result<Self> {
        let port = free_port()?;
        let args = ["-a", "127.0.0.1", "-p", &port.to_string()].map(String::from).to_vec();
        let process = Process::start("nats-server", find("nats-server")?, args, port)?;
        Ok(Self { process, monitor: None })
    }

    /// Starts `nodes` servers routed to each other as one cluster (each
    /// lists every other's route, so any two may go and come back). Wait
    /// for [`NatsServer::wait_routes`] before relying on the mesh.
    pub fn start_cluster(nodes: usize) -> anyhow::Result<Vec<Self>> {
        let binary = find("nats-server")?;
        let ports: Vec<(u16, u16, u16)> = (0..nodes)
            .map(|_| Ok((free_port()?, free_port()?, free_port()?)))
            .collect::<anyhow::Result<_>>()?;
        let route = |cluster: u16| format!("nats://127.0.0.1:{cluster}");
        ports
            .iter()
            .map(|(client, cluster, monitor)| {
                let routes: Vec<String> = ports
                    .iter()
                    .filter(|(_, other, _)| other != cluster)
                    .map(|(_, other, _)| route(*other))
                    .collect();
                let args = [
                    "-a".to_owned(),
                    "127.0.0.1".to_owned(),
                    "-p".to_owned(),
                    client.to_string(),
                    "-m".to_owned(),
                    monitor.to_string(),
                    "--cluster_name".to_owned(),
                    "fleetplane-test".to_owned(),
                    "--cluster".to_owned(),
                    route(*cluster),
                    "--routes".to_owned(),
                    routes.join(","),
                ]
                .to_vec();
                let process = Process::start("nats-server", binary.clone(), args, *client)?;
                Ok(Self {
                    process,
                    monitor: Some(*monitor),
                })
            })
            .collect()
    }

    /// Waits until this cluster node has routes to `peers` other nodes.
    pub async fn wait_routes(&self, peers: usize) -> anyhow::Result<()> {
        let Some(monitor) = self.monitor else {
            bail!("not a cluster node");
        };
        let url = format!("http://127.0.0.1:{monitor}/routez");
        let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
        loop {
            let routes = match reqwest::get(&url).await {
                Ok(response) => response
                    .json::<serde_json::Value>()
                    .await
                    .ok()
                    .and_then(|v| v["num_routes"].as_u64())
                    .unwrap_or(0),
                Err(_) => 0,
            };
            if routes as usize >= peers {
                return Ok(());
            }
            if tokio::time::Instant::now() > deadline {
                bail!(
                    "NATS node on {} has {routes} of {peers} routes after 15 s",
                    self.process.port
                );
            }
            // Route gossip has no event to wait on; bounded by the deadline.
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// `nats://127.0.0.1:PORT`
    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.process.port)
    }

    /// Kills the server (SIGKILL).
    pub fn kill(&mut self) {
        self.process.kill();
    }

    /// Starts it again on the same port.
    pub fn restart(&mut self) -> anyhow::Result<()> {
        self.process.kill();
        self.process.spawn()
    }
}
