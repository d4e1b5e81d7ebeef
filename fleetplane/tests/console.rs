//! The web console in a real browser: this test starts an all-in-one
//! control plane with an operator token and simulated agents, then runs the
//! console's Playwright test (`console/tests/console.test.mjs`) in headless
//! Chromium against it, and fails with its output if any step fails.
//! `scripts/test.sh` installs what it needs (Debian's chromium, the
//! console's npm packages). Screenshots land in `target/console-screenshots`.

mod common;

use std::path::Path;

use fleetplane_testkit::agent::{AgentOptions, SimAgent};

const AGENTS: usize = 8;

#[tokio::test]
async fn the_console_shows_the_fleet_and_runs_a_rollout_in_a_real_browser() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let console = root.join("console");
    let chromium = std::env::var("CHROMIUM").unwrap_or_else(|_| "/usr/bin/chromium".into());
    assert!(
        console.join("node_modules/playwright-core").exists() && Path::new(&chromium).exists(),
        "the console test needs {chromium} and console/node_modules: run scripts/test.sh, which installs both"
    );
    let server = common::Server::start_with(tempfile::tempdir().unwrap(), |c| {
        c.admin.token = Some("console-operator".into());
    })
    .await;
    let admin = server.admin.clone();
    let mut agents = Vec::new();
    for i in 0..AGENTS {
        let options = AgentOptions::default()
            .attr("service.name", "web")
            .attr("service.version", if i % 2 == 0 { "0.110.0" } else { "0.111.0" })
            .with(fleetplane_proto::opamp::AgentCapabilities::ReportsAvailableComponents)
            .components("receivers", &["otlp", "hostmetrics"])
            .components("exporters", &["debug"]);
        agents.push(SimAgent::connect_ws(&server.ws_url(), options).await.unwrap());
    }
    let v1 = admin
        .create_config(
            "web",
            "collector.yaml",
            "receivers:\n  otlp: {}\nexporters:\n  debug: {}\n",
            "text/yaml",
        )
        .await
        .unwrap();
    let (status, body) = admin
        .request(
            reqwest::Method::PUT,
            "/api/v1/assignments/web",
            Some(serde_json::json!({ "selector": "service.name=web", "config": "web", "version": 1 })),
        )
        .await
        .unwrap();
    assert_eq!(status, 200, "{body}");
    let v1_hash = fleetplane_proto::ConfigHash::parse(v1["hash"].as_str().unwrap()).unwrap();
    for agent in &agents {
        agent.wait_for_config(&v1_hash).await.unwrap();
    }
    admin
        .create_config(
            "web",
            "collector.yaml",
            "receivers:\n  otlp: {}\n  hostmetrics: {}\nexporters:\n  debug: {}\n",
            "text/yaml",
        )
        .await
        .unwrap();

    let shots = root.join("target/console-screenshots");
    let url = format!("http://{}", server.server.admin_addr);
    let output = tokio::task::spawn_blocking(move || {
        std::process::Command::new("node")
            .args(["--test", "--test-reporter=spec", "tests/"])
            .current_dir(&console)
            .env("CONSOLE_URL", url)
            .env("CONSOLE_TOKEN", "console-operator")
            .env("CONSOLE_AGENTS", AGENTS.to_string())
            .env("CONSOLE_ASSIGNMENT", "web")
            .env("CONSOLE_CONFIG", "web")
            .env("CHROMIUM", chromium)
            .env("SCREENSHOTS", shots)
            .output()
            .expect("node runs")
    })
    .await
    .unwrap();
    let report = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(output.status.success(), "the browser test failed:\n{report}");
    assert!(
        report.contains("pass 4") && report.contains("fail 0"),
        "four browser steps passed:\n{report}"
    );
    // What the browser did is what the server saw.
    let rollouts = admin
        .request(reqwest::Method::GET, "/api/v1/rollouts", None)
        .await
        .unwrap()
        .1;
    assert_eq!(rollouts[0]["state"], "COMPLETED", "{rollouts}");
}
