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
