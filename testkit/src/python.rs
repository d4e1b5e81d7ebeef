//! The official Python OpAMP client (`opentelemetry-opamp-client`), run from a
//! throwaway virtual environment: an interop peer we did not write.
//!
//! [`PythonEnv::create`] makes the venv and installs the pinned client from
//! `testkit/python/requirements.txt`; [`PythonEnv::spawn_agent`] runs
//! `testkit/python/opamp_agent.py`, whose JSON-lines events on stdout are
//! collected for waits.

use std::{path::PathBuf, process::Stdio, time::Duration};

use anyhow::{Context, bail};
use serde_json::Value;
use tokio::{
    io::{AsyncBufReadExt, BufReader},
    process::{Child, Command},
    sync::watch,
};

use crate::wait::DEFAULT_DEADLINE;

fn python_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("python")
}

/// A virtual environment with the official client installed.
#[derive(Debug)]
pub struct PythonEnv {
    dir: tempfile::TempDir,
}

impl PythonEnv {
    /// Creates the venv and installs the client from the Python package index.
    pub async fn create() -> anyhow::Result<Self> {
        let dir = tempfile::Builder::new().prefix("fleetplane-opamp-venv").tempdir()?;
        let python = std::env::var("PYTHON").unwrap_or_else(|_| "python3".into());
        run(Command::new(&python).arg("-m").arg("venv").arg(dir.path())).await?;
        let pip = dir.path().join("bin/pip");
        run(Command::new(pip)
            .args(["install", "--quiet", "--disable-pip-version-check", "-r"])
            .arg(python_dir().join("requirements.txt")))
        .await
        .context("installing opentelemetry-opamp-client from the Python package index")?;
        Ok(Self { dir })
    }

    /// Starts the driver against `endpoint` (`http://host:port/v1/opamp`).
    /// `args` are extra driver flags such as `--attr service.name=x`.
    pub fn spawn_agent(&self, endpoint: &str, args: &[&str]) -> anyhow::Result<PythonAgent> {
        let mut child = Command::new(self.dir.path().join("bin/python"))
            .arg(python_dir().join("opamp_agent.py"))
            .args(["--endpoint", endpoint, "--timeout", "120", "--poll-interval", "0.5"])
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .kill_on_drop(true)
            .spawn()
            .context("starting the python driver")?;
        let stdout = child.stdout.take().context("driver stdout")?;
        let (tx, events) = watch::channel(Vec::<Value>::new());
        tokio::spawn(async move {
            let mut lines = BufReader::new(stdout).lines();
            while let Ok(Some(line)) = lines.next_line().await {
                if let Ok(event) = serde_json::from_str::<Value>(&line) {
                    tx.send_modify(|all| all.push(event));
                }
            }
        });
        Ok(PythonAgent { child, events })
    }
}

async fn run(command: &mut Command) -> anyhow::Result<()> {
    let output = command.output().await.context("running a python command")?;
    if !output.status.success() {
        bail!(
            "{:?} failed: {}\n{}",
            command.as_std(),
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
    }
    Ok(())
}

/// A running official-client agent.
#[derive(Debug)]
pub struct PythonAgent {
    child: Child,
    events: watch::Receiver<Vec<Value>>,
}

impl PythonAgent {
    /// Waits for an event matching `condition`; returns it.
    pub async fn wait_for(&self, what: &str, condition: impl Fn(&Value) -> bool) -> anyhow::Result<Value> {
        let mut rx = self.events.clone();
        let found = tokio::time::timeout(DEFAULT_DEADLINE, rx.wait_for(|all| all.iter().any(&condition))).await;
        match found {
            Ok(Ok(all)) => Ok(all.iter().find(|e| condition(e)).cloned().unwrap_or_default()),
            _ => bail!("python agent: no {what}; events so far: {:?}", self.events.borrow()),
        }
    }

    /// Closes stdin (the driver's signal to stop), waits for a clean exit.
    pub async fn stop(mut self) -> anyhow::Result<()> {
        drop(self.child.stdin.take());
        let status = tokio::time::timeout(Duration::from_secs(30), self.child.wait())
            .await
            .context("python agent did not stop")??;
        if !status.success() {
            bail!("python agent exited with {status}");
        }
        Ok(())
    }
}
