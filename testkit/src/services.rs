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

impl RedisServer {
    /// Starts one on a free port.
    pub fn start() -> anyhow::Result<Self> {
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
            // Every write on disk before it is acknowledged: tests kill the
            // server (SIGKILL) and expect what was acknowledged to survive;
            // with `everysec` Redis may hold back up to 2 s of writes.
            "--appendfsync",
            "always",
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

/// A plain core-NATS `nats-server` on a free port.
#[derive(Debug)]
pub struct NatsServer {
    process: Process,
}

impl NatsServer {
    /// Starts one on a free port.
    pub fn start() -> anyhow::Result<Self> {
        let port = free_port()?;
        let args = ["-a", "127.0.0.1", "-p", &port.to_string()].map(String::from).to_vec();
        let process = Process::start("nats-server", find("nats-server")?, args, port)?;
        Ok(Self { process })
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
