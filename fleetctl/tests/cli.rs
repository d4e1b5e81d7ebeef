//! The real `fleetctl` binary against a live control plane, all-in-one and
//! scaled (gateways and coordinators over NATS and Redis): list and describe
//! agents, apply and diff a config, assign it, run a rollout to completion
//! while `watch` prints its stages, watch one roll back, follow events, use
//! contexts, and see bad input answered with one line and a non-zero exit.

use std::{path::Path, process::Output};

use fleetplane_testkit::{
    agent::{AgentOptions, SimAgent},
    fleet::Fleet,
};
use serde_json::Value;

const FLEETCTL: &str = env!("CARGO_BIN_EXE_fleetctl");

/// Runs fleetctl with `args`, its contexts file in `home`.
async fn fleetctl(home: &Path, args: &[&str]) -> Output {
    let args: Vec<String> = args.iter().map(|a| (*a).to_owned()).collect();
    let config = home.join("fleetctl.toml");
    tokio::task::spawn_blocking(move || {
        std::process::Command::new(FLEETCTL)
            .args(&args)
            .env("FLEETCTL_CONFIG", config)
            .env_remove("FLEETCTL_SERVER")
            .env_remove("FLEETCTL_TOKEN")
            .env_remove("FLEETCTL_TENANT")
            .output()
            .expect("fleetctl runs")
    })
    .await
    .unwrap()
}

fn stdout(output: &Output) -> String {
    String::from_utf8_lossy(&output.stdout).into_owned()
}

fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

/// Succeeds, or fails the test with what fleetctl said.
fn ok(output: Output) -> String {
    assert!(
        output.status.success(),
        "fleetctl failed ({:?}): {}{}",
        output.status.code(),
        stdout(&output),
        stderr(&output)
    );
    stdout(&output)
}

/// Fails with exactly one line on stderr, `error: ...`.
fn one_line_error(output: &Output, code: i32) -> String {
    assert_eq!(output.status.code(), Some(code), "{}{}", stdout(output), stderr(output));
    let err = stderr(output);
    assert_eq!(err.lines().count(), 1, "one line: {err:?}");
    assert!(err.starts_with("error: "), "{err:?}");
    err
}

async fn scenario(server: &str, token: Option<&str>, ws_url: &str) {
    let home = tempfile::tempdir().unwrap();
    let dir = home.path();
    // A context, so that later commands need no flags.
    let mut set = vec!["context", "set", "plane", "--server", server];
    if let Some(token) = token {
        set.extend(["--token", token]);
    }
    ok(fleetctl(dir, &set).await);
    let contexts = ok(fleetctl(dir, &["context", "list"]).await);
    assert!(
        contexts
            .lines()
            .any(|l| l.starts_with('*') && l.contains("plane") && l.contains(server)),
        "{contexts}"
    );

    let mut agents = Vec::new();
    for i in 0..6 {
        let mut options = AgentOptions::default().attr("service.name", "cli");
        if i == 0 {
            // The one agent that chokes on a "boom" config: the canary below.
            options.reject_containing = Some("boom".into());
        }
        agents.push(SimAgent::connect_ws(ws_url, options).await.unwrap());
    }
    let canary = agents[0].uid().to_string();

    // Apply a config from a directory; assign it.
    let config_dir = dir.join("config");
    std::fs::create_dir(&config_dir).unwrap();
    std::fs::write(config_dir.join("collector.yaml"), "receivers:\n  otlp: {}\n").unwrap();
    let applied = ok(fleetctl(dir, &["apply", "cli", "-f", config_dir.to_str().unwrap()]).await);
    assert!(applied.contains("created version 1"), "{applied}");
    // Pinned, so that later versions go out through rollouts.
    ok(fleetctl(
        dir,
        &[
            "assign",
            "cli",
            "--config",
            "cli",
            "--version",
            "1",
            "-l",
            "service.name=cli",
        ],
    )
    .await);

    // List: table, JSON and YAML, filtered by selector.
    let listed =
        fleetplane_testkit::wait::eventually("agents listed", fleetplane_testkit::wait::DEFAULT_DEADLINE, || async {
            let out = fleetctl(dir, &["get", "agents", "-l", "service.name=cli", "-o", "json"]).await;
            let agents: Value = serde_json::from_slice(&out.stdout)?;
            Ok(agents
                .as_array()
                .filter(|a| a.len() == 6 && a.iter().all(|a| a["remote_config"]["status"] == "APPLIED"))
                .cloned())
        })
        .await
        .unwrap();
    assert_eq!(listed.len(), 6);
    let table = ok(fleetctl(dir, &["get", "agents", "-l", "service.name=cli"]).await);
    assert!(table.starts_with("UID"), "{table}");
    assert_eq!(table.lines().count(), 7, "a header and six agents: {table}");
    assert!(table.contains(&canary));
    let yaml = ok(fleetctl(dir, &["get", "agents", "-o", "yaml"]).await);
    assert!(yaml.contains(&format!("instance_uid: {canary}")), "{yaml}");
    let described = ok(fleetctl(dir, &["describe", "agent", &canary]).await);
    assert!(
        described.contains("capability_names:") && described.contains("AcceptsRemoteConfig"),
        "{described}"
    );

    // Diff, then apply version 2, and roll it out while watching.
    std::fs::write(
        config_dir.join("collector.yaml"),
        "receivers:\n  otlp: {}\n  hostmetrics: {}\n",
    )
    .unwrap();
    let diff = ok(fleetctl(dir, &["diff", "cli", "-f", config_dir.to_str().unwrap()]).await);
    assert!(
        diff.contains("changes against version 1") && diff.contains("hostmetrics"),
        "{diff}"
    );
    assert!(
        ok(fleetctl(dir, &["apply", "cli", "-f", config_dir.to_str().unwrap()]).await).contains("created version 2")
    );
    let watched = ok(fleetctl(
        dir,
        &[
            "rollout",
            "start",
            "--assignment",
            "cli",
            "--config",
            "cli",
            "--stages",
            "50,100",
            "--bake",
            "0.2",
            "--watch",
        ],
    )
    .await);
    assert!(
        watched.contains("stage 1/2") && watched.contains("stage 2/2"),
        "{watched}"
    );
    assert!(watched.contains("COMPLETED"), "{watched}");
    assert!(
        watched.contains("6/6 applied") || watched.contains("3/3 applied"),
        "{watched}"
    );

    // Version 3 breaks the canary: the rollout rolls back, watch says so and fails.
    std::fs::write(config_dir.join("collector.yaml"), "receivers:\n  boom: {}\n").unwrap();
    ok(fleetctl(dir, &["apply", "cli", "-f", config_dir.to_str().unwrap()]).await);
    let rolled_back = fleetctl(
        dir,
        &[
            "rollout",
            "start",
            "--assignment",
            "cli",
            "--config",
            "cli",
            "--stages",
            "20,100",
            "--canary",
            &canary,
            "--watch",
        ],
    )
    .await;
    assert_eq!(rolled_back.status.code(), Some(1));
    assert!(stderr(&rolled_back).contains("ROLLED_BACK"), "{}", stderr(&rolled_back));
    assert!(stdout(&rolled_back).contains("failed"), "{}", stdout(&rolled_back));
    let rollouts = ok(fleetctl(dir, &["get", "rollouts"]).await);
    assert!(
        rollouts.contains("ROLLED_BACK") && rollouts.contains("COMPLETED"),
        "{rollouts}"
    );

    // A layer (for agents no rollout here touches), and the package sets.
    let layer = ok(fleetctl(
        dir,
        &[
            "assign",
            "base-layer",
            "--config",
            "cli",
            "--key",
            "00-base",
            "-l",
            "service.name=nobody",
        ],
    )
    .await);
    assert!(layer.contains("KEY") && layer.contains("00-base"), "{layer}");
    assert!(ok(fleetctl(dir, &["get", "packages"]).await).starts_with("SET"));

    // Events: the log so far, as JSON lines.
    let events = ok(fleetctl(dir, &["events", "--since", "0", "--count", "3", "-o", "json"]).await);
    assert_eq!(events.lines().count(), 3, "{events}");
    for line in events.lines() {
        let event: Value = serde_json::from_str(line).unwrap();
        assert!(event["id"].is_string() && event["kind"].is_string(), "{event}");
    }

    // Bad input: one line, non-zero.
    one_line_error(&fleetctl(dir, &["get", "agents", "--no-such-flag"]).await, 2);
    let err = one_line_error(
        &fleetctl(dir, &["get", "agents", "--server", "http://127.0.0.1:1"]).await,
        1,
    );
    assert!(err.contains("cannot reach"), "{err}");
    let err = one_line_error(&fleetctl(dir, &["describe", "agent", "not-a-uid"]).await, 1);
    assert!(err.contains("HTTP 400"), "{err}");
    let err = one_line_error(&fleetctl(dir, &["get", "agents", "--context", "nope"]).await, 1);
    assert!(err.contains("no context"), "{err}");
    if token.is_some() {
        let err = one_line_error(&fleetctl(dir, &["get", "agents", "--token", "wrong"]).await, 1);
        assert!(err.contains("HTTP 401"), "{err}");
    }
}

#[tokio::test]
async fn fleetctl_drives_an_all_in_one_control_plane() {
    let data = tempfile::tempdir().unwrap();
    let mut config = fleetplane::Config::default();
    config.opamp.listen = "127.0.0.1:0".parse().unwrap();
    config.admin.listen = "127.0.0.1:0".parse().unwrap();
    config.store.data_dir = data.path().to_owned();
    config.gateway.drain_ms = 0;
    config.agents.auth = fleetplane::config::AgentAuth::None;
    config.admin.token = Some("operator-secret".into());
    let plane = fleetplane::AllInOne::start(&config).await.unwrap();
    scenario(
        &format!("http://{}", plane.admin_addr),
        Some("operator-secret"),
        &format!("ws://{}/v1/opamp", plane.opamp_addr),
    )
    .await;
    plane.stop().await.unwrap();
}

#[tokio::test]
async fn fleetctl_drives_a_scaled_control_plane() {
    // The server binary sits next to fleetctl in the one target directory.
    let binary = Path::new(FLEETCTL).with_file_name("fleetplane");
    assert!(
        binary.exists(),
        "{} missing: build the workspace first (cargo build --workspace)",
        binary.display()
    );
    let fleet = Fleet::builder(binary.to_str().unwrap())
        .gateways(2)
        .coordinators(2)
        .start()
        .await
        .unwrap();
    let admin = fleet.admin(1);
    let server = admin.base_url();
    scenario(&server, None, &fleet.ws_urls()[0]).await;
}
