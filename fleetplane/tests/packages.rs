//! Package sets by selector over the real protocol, in both modes: offered
//! only to agents that accept packages, each agent's PackageStatuses (its
//! own error text on a failed install) shown on its page, a new version
//! offered again, download header values never shown, bad input refused.

mod common;

use fleetplane_proto::opamp::{AgentCapabilities, PackageType};
use fleetplane_testkit::{
    admin::Admin,
    agent::{AgentOptions, SimAgent},
};
use reqwest::Method;
use serde_json::{Value, json};

const SECRET: &str = "Bearer download-secret";
const HASH: &str = "9f2c4e1a7b3d5f60812a4c6e8b0d2f4a6c8e0b2d4f6a8c0e2b4d6f8a0c2e4b6d";

fn set(version: &str) -> Value {
    json!({
        "selector": "service.name=pkg",
        "packages": {
            "": {
                "version": version,
                "download_url": format!("https://downloads.example.com/otelcol-{version}.tar.gz"),
                "content_hash": HASH,
                "signature": "c2lnbmF0dXJl",
                "headers": { "authorization": SECRET }
            }
        }
    })
}

async fn packages_scenario(admin: &Admin, ws_url: &str) {
    let taker = SimAgent::connect_ws(
        ws_url,
        AgentOptions::default()
            .attr("service.name", "pkg")
            .with(AgentCapabilities::AcceptsPackages)
            .with(AgentCapabilities::ReportsPackageStatuses),
    )
    .await
    .unwrap();
    let failing = SimAgent::connect_ws(
        ws_url,
        AgentOptions {
            fail_packages: Some("disk full".into()),
            ..AgentOptions::default()
                .attr("service.name", "pkg")
                .with(AgentCapabilities::AcceptsPackages)
                .with(AgentCapabilities::ReportsPackageStatuses)
        },
    )
    .await
    .unwrap();
    let plain = SimAgent::connect_ws(ws_url, AgentOptions::default().attr("service.name", "pkg"))
        .await
        .unwrap();
    for agent in [&taker, &failing, &plain] {
        admin.wait_for_agent(agent.uid(), "listed", |_| true).await.unwrap();
    }

    for (body, why) in [
        (
            json!({ "selector": "service.name=pkg", "packages": {} }),
            "an empty set",
        ),
        (
            json!({ "packages": { "x": { "version": "1", "download_url": "https://d/x", "content_hash": "abc" } } }),
            "a short hash",
        ),
        (
            json!({ "packages": { "x": { "version": "1", "download_url": "https://u:p@d/x", "content_hash": HASH } } }),
            "credentials in the URL",
        ),
        (
            json!({ "packages": { "x": { "type": "plugin", "version": "1", "download_url": "https://d/x", "content_hash": HASH } } }),
            "an unknown type",
        ),
    ] {
        let (status, answer) = admin
            .request(Method::PUT, "/api/v1/packages/bad", Some(body))
            .await
            .unwrap();
        assert_eq!(status, 400, "{why}: {answer}");
    }

    let (status, answer) = admin
        .request(Method::PUT, "/api/v1/packages/collector", Some(set("v0.110.0")))
        .await
        .unwrap();
    assert_eq!(status, 200, "{answer}");
    assert!(
        !answer.to_string().contains(SECRET),
        "header values never shown: {answer}"
    );
    assert_eq!(answer["packages"][""]["type"], "top_level");

    let seen = taker
        .wait_for("a package offer", |s| !s.package_offers.is_empty())
        .await
        .unwrap();
    let offer = &seen.package_offers[0];
    let collector = &offer.packages[""];
    assert_eq!(collector.r#type, PackageType::TopLevel as i32);
    assert_eq!(collector.version, "v0.110.0");
    let file = collector.file.as_ref().unwrap();
    assert_eq!(hex::encode(&file.content_hash), HASH);
    assert_eq!(
        file.headers.as_ref().unwrap().headers[0].value,
        SECRET,
        "offered to the agent"
    );
    assert!(!offer.all_packages_hash.is_empty());

    let installed = admin
        .wait_for_agent(taker.uid(), "installed", |a| a["packages"][""]["status"] == "Installed")
        .await
        .unwrap();
    assert_eq!(installed["packages"][""]["version"], "v0.110.0");
    let failed = admin
        .wait_for_agent(failing.uid(), "install failed", |a| {
            a["packages"][""]["status"] == "InstallFailed"
        })
        .await
        .unwrap();
    assert_eq!(failed["packages"][""]["error_message"], "disk full");

    // A new version is a new offer; the agent without the capability never
    // got anything.
    let (status, _) = admin
        .request(Method::PUT, "/api/v1/packages/collector", Some(set("v0.111.0")))
        .await
        .unwrap();
    assert_eq!(status, 200);
    admin
        .wait_for_agent(taker.uid(), "upgraded", |a| a["packages"][""]["version"] == "v0.111.0")
        .await
        .unwrap();
    assert!(plain.seen().package_offers.is_empty());
    let (_, audit) = admin.request(Method::GET, "/api/v1/audit", None).await.unwrap();
    assert!(!audit.to_string().contains(SECRET), "header values never audited");
    let (status, _) = admin
        .request(Method::DELETE, "/api/v1/packages/collector", None)
        .await
        .unwrap();
    assert_eq!(status, 204);
}

#[tokio::test]
async fn all_in_one_offers_package_sets_by_selector() {
    let server = common::Server::start().await;
    packages_scenario(&server.admin, &server.ws_url()).await;
}

#[tokio::test]
async fn scaled_offers_package_sets_by_selector() {
    let fleet = common::two_by_two().await;
    packages_scenario(&fleet.admin(1), &fleet.ws_urls()[0]).await;
}

/// A package set's agents moved to new packages in stages, through the
/// rollout engine configs use: four named canaries first (one failing,
/// within the first stage's tolerance), then the rest, where two more fail,
/// so the rollout rolls back: every changed agent is offered the previous
/// packages again and installs them, and the set keeps its contents. A
/// version that installs everywhere completes and becomes the set's.
async fn package_rollout_scenario(admin: &Admin, ws_urls: &[String]) {
    let mut agents = Vec::new();
    for i in 0..10 {
        let mut options = AgentOptions::default()
            .attr("service.name", "pkg-ro")
            .with(AgentCapabilities::AcceptsPackages)
            .with(AgentCapabilities::ReportsPackageStatuses);
        if [1, 4, 7].contains(&i) {
            options.fail_versions_containing = Some("-rc".into());
        }
        agents.push(
            SimAgent::connect_ws(&ws_urls[i % ws_urls.len()], options)
                .await
                .unwrap(),
        );
    }
    let versioned = |version: &str| {
        let mut body = set(version);
        body["selector"] = json!("service.name=pkg-ro");
        body
    };
    let (status, v1) = admin
        .request(Method::PUT, "/api/v1/packages/ro", Some(versioned("v1.0.0")))
        .await
        .unwrap();
    assert_eq!(status, 200, "{v1}");
    for agent in &agents {
        admin
            .wait_for_agent(agent.uid(), "v1 installed", |a| {
                a["packages"][""]["version"] == "v1.0.0" && a["packages"][""]["status"] == "Installed"
            })
            .await
            .unwrap();
    }

    let canaries: Vec<String> = [0, 1, 2, 3].iter().map(|i| agents[*i].uid().to_string()).collect();
    let rollout = |version: &str| {
        json!({
            "package_set": "ro",
            "packages": versioned(version)["packages"].clone(),
            "canaries": canaries,
            "stages": [{ "count": 4 }, 100],
            "first_stage_max_failures_percent": 30,
            "bake_seconds": 0
        })
    };
    let (status, created) = admin
        .request(Method::POST, "/api/v1/rollouts", Some(rollout("v2.0.0-rc1")))
        .await
        .unwrap();
    assert_eq!(status, 201, "{created}");
    assert_eq!(created["kind"], "packages");
    let id = created["id"].as_str().unwrap().to_owned();
    let rolled_back = admin.wait_for_rollout(&id, "ROLLED_BACK").await.unwrap();
    let stages = rolled_back["stages"].as_array().unwrap();
    assert_eq!(stages[0]["failures"].as_array().unwrap().len(), 1, "{rolled_back}");
    assert!(!stages[1]["failures"].as_array().unwrap().is_empty(), "{rolled_back}");
    assert!(
        rolled_back.to_string().contains("does not start"),
        "the agents' own error text is kept: {rolled_back}"
    );
    for agent in &agents {
        admin
            .wait_for_agent(agent.uid(), "back on v1", |a| {
                a["packages"][""]["version"] == "v1.0.0" && a["packages"][""]["status"] == "Installed"
            })
            .await
            .unwrap();
    }
    let (_, kept) = admin.request(Method::GET, "/api/v1/packages/ro", None).await.unwrap();
    assert_eq!(kept["all_packages_hash"], v1["all_packages_hash"], "{kept}");

    // Refused: the same packages again, an unknown set, a mixed request.
    let (status, body) = admin
        .request(Method::POST, "/api/v1/rollouts", Some(rollout("v1.0.0")))
        .await
        .unwrap();
    assert_eq!(status, 400, "{body}");
    let mut unknown = rollout("v3.0.0");
    unknown["package_set"] = json!("nope");
    let (status, body) = admin
        .request(Method::POST, "/api/v1/rollouts", Some(unknown))
        .await
        .unwrap();
    assert_eq!(status, 404, "{body}");
    let mut mixed = rollout("v3.0.0");
    mixed["config"] = json!("collector");
    let (status, body) = admin
        .request(Method::POST, "/api/v1/rollouts", Some(mixed))
        .await
        .unwrap();
    assert_eq!(status, 400, "{body}");

    admin.roll_out(rollout("v2.0.0"), "COMPLETED").await.unwrap();
    let (_, promoted) = admin.request(Method::GET, "/api/v1/packages/ro", None).await.unwrap();
    assert_eq!(promoted["packages"][""]["version"], "v2.0.0", "{promoted}");
    for agent in &agents {
        admin
            .wait_for_agent(agent.uid(), "v2 installed", |a| {
                a["packages"][""]["version"] == "v2.0.0"
            })
            .await
            .unwrap();
    }
}

#[tokio::test]
async fn all_in_one_rolls_out_packages_in_stages_and_back() {
    let server = common::Server::start().await;
    package_rollout_scenario(&server.admin, &[server.ws_url()]).await;
}

#[tokio::test]
async fn scaled_rolls_out_packages_in_stages_and_back() {
    let fleet = common::two_by_two().await;
    package_rollout_scenario(&fleet.admin(1), &fleet.ws_urls()).await;
}
