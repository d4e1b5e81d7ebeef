//! Agents that prove who they are, and tenants that never meet: API keys on
//! the OpAMP endpoint (missing, wrong, revoked, another tenant's), tenant
//! isolation through the admin API, in all-in-one mode and in the scaled
//! form.

mod common;

use std::time::Duration;

use common::{RawAgent, Server};
use fleetplane_proto::{ConfigHash, InstanceUid, Message, http::CONTENT_TYPE_PROTOBUF, opamp::AgentToServer};
use fleetplane_testkit::{
    agent::{AgentOptions, SimAgent, ws_connect},
    fleet::Fleet,
    wait::eventually,
};
use futures_util::StreamExt;
use serde_json::Value;
use tokio_tungstenite::tungstenite::{Error as WsError, Message as WsMessage};

const DEADLINE: Duration = Duration::from_secs(30);
const BINARY: &str = env!("CARGO_BIN_EXE_fleetplane");

fn hash_of(version: &Value) -> ConfigHash {
    ConfigHash::parse(version["hash"].as_str().unwrap()).unwrap()
}

async fn secured() -> Server {
    Server::start_with(tempfile::tempdir().unwrap(), |c| {
        c.agents.auth = fleetplane::config::AgentAuth::ApiKey;
        c.agents.key_cache_ttl_ms = 300;
    })
    .await
}

/// The HTTP status a WebSocket upgrade with `key` gets (101 when accepted).
async fn upgrade_status(url: &str, key: Option<&str>) -> (u16, Option<String>) {
    match ws_connect(url, key).await {
        Ok(_) => (101, None),
        Err(WsError::Http(response)) => (
            response.status().as_u16(),
            response
                .headers()
                .get("retry-after")
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned),
        ),
        Err(e) => panic!("unexpected failure: {e}"),
    }
}

async fn post_status(url: &str, key: Option<&str>) -> u16 {
    let message = AgentToServer {
        instance_uid: InstanceUid::new_v7().to_vec(),
        sequence_num: 1,
        ..Default::default()
    };
    let mut request = reqwest::Client::new()
        .post(url)
        .header("content-type", CONTENT_TYPE_PROTOBUF)
        .body(message.encode_to_vec());
    if let Some(key) = key {
        request = request.bearer_auth(key);
    }
    request.send().await.unwrap().status().as_u16()
}

#[tokio::test]
async fn missing_wrong_and_unknown_keys_are_refused_before_anything_is_read() {
    let server = secured().await;
    let (key, _) = server.admin.create_key("prod").await.unwrap();
    let unknown = fleetplane_proto::credentials::MintedKey::generate();
    let mut wrong = key.clone();
    let last = wrong.pop().unwrap();
    wrong.push(if last == '0' { '1' } else { '0' });
    for (what, presented) in [
        ("no credentials", None),
        ("a bogus bearer token", Some("bogus")),
        ("an unknown key", Some(unknown.token())),
        ("a wrong secret", Some(wrong.as_str())),
    ] {
        let (status, retry_after) = upgrade_status(&server.ws_url(), presented).await;
        assert_eq!(status, 401, "WebSocket with {what}");
        let retry_after: u64 = retry_after.expect("a Retry-After").parse().unwrap();
        assert!(retry_after >= 1, "{what}");
        assert_eq!(
            post_status(&server.http_url(), presented).await,
            401,
            "HTTP with {what}"
        );
    }
    assert_eq!(upgrade_status(&server.ws_url(), Some(&key)).await.0, 101);
    assert_eq!(post_status(&server.http_url(), Some(&key)).await, 200);
    // Nothing refused reached the inventory.
    assert_eq!(
        server.admin.agents("").await.unwrap().len(),
        1,
        "only the keyed HTTP agent"
    );
    server.stop().await;
}

#[tokio::test]
async fn a_revoked_key_is_refused_and_its_open_connections_closed() {
    let server = secured().await;
    let (key, id) = server.admin.create_key("soon revoked").await.unwrap();
    let (other_key, _) = server.admin.create_key("kept").await.unwrap();
    let (mut socket, _) = ws_connect(&server.ws_url(), Some(&key)).await.unwrap();
    let kept = SimAgent::connect_ws(&server.ws_url(), AgentOptions::default().api_key(&other_key))
        .await
        .unwrap();
    kept.wait_for("answered", |s| s.replies >= 1).await.unwrap();
    let (status, body) = server
        .admin
        .request(reqwest::Method::DELETE, &format!("/api/v1/keys/{id}"), None)
        .await
        .unwrap();
    assert_eq!(status, 200, "{body}");
    assert!(body["revoked_unix_ms"].as_u64().is_some(), "{body}");
    // The open connection is closed with a policy violation...
    let close = tokio::time::timeout(DEADLINE, async {
        while let Some(Ok(frame)) = socket.next().await {
            if let WsMessage::Close(frame) = frame {
                return frame.map(|f| (u16::from(f.code), f.reason.to_string()));
            }
        }
        None
    })
    .await
    .expect("the revoked key's connection is closed");
    assert_eq!(close.map(|(code, _)| code), Some(1008));
    // ...new ones are refused, and the other key's agent is untouched.
    assert_eq!(upgrade_status(&server.ws_url(), Some(&key)).await.0, 401);
    kept.heartbeat().await.unwrap();
    kept.wait_for("still served", |s| s.replies >= 2 && s.connected)
        .await
        .unwrap();
    // Listing shows the revocation, never a secret.
    let (_, keys) = server
        .admin
        .request(reqwest::Method::GET, "/api/v1/keys", None)
        .await
        .unwrap();
    let listed = keys.as_array().unwrap();
    assert_eq!(listed.len(), 2);
    assert!(listed.iter().all(|k| k.get("key").is_none()), "{keys}");
    assert!(!keys.to_string().contains(&key[20..]), "no secret in the listing");
    server.stop().await;
}

#[tokio::test]
async fn tenants_never_meet() {
    let server = secured().await;
    let acme = server.admin.clone().for_tenant("acme");
    let globex = server.admin.clone().for_tenant("globex");
    let (acme_key, acme_key_id) = acme.create_key("acme agents").await.unwrap();
    let (globex_key, _) = globex.create_key("globex agents").await.unwrap();
    // One uid in both tenants, and acme's agent claiming globex's attributes.
    let uid = InstanceUid::new_v7();
    let acme_agent = SimAgent::connect_ws(
        &server.ws_url(),
        AgentOptions {
            uid: Some(uid),
            ..AgentOptions::default()
                .api_key(&acme_key)
                .attr("service.name", "checkout")
                .attr("tenant", "globex")
        },
    )
    .await
    .unwrap();
    let globex_agent = SimAgent::connect_ws(
        &server.ws_url(),
        AgentOptions {
            uid: Some(uid),
            ..AgentOptions::default()
                .api_key(&globex_key)
                .attr("service.name", "checkout")
        },
    )
    .await
    .unwrap();
    // Each tenant's config reaches its own agent only.
    let acme_v = acme
        .create_config("base", "c.yaml", "owner: acme", "text/yaml")
        .await
        .unwrap();
    acme.assign("all", "", "base").await.unwrap();
    let globex_v = globex
        .create_config("base", "c.yaml", "owner: globex", "text/yaml")
        .await
        .unwrap();
    globex.assign("all", "", "base").await.unwrap();
    acme_agent.wait_for_config(&hash_of(&acme_v)).await.unwrap();
    globex_agent.wait_for_config(&hash_of(&globex_v)).await.unwrap();
    assert_eq!(acme_agent.seen().configs, vec![hash_of(&acme_v)]);
    assert_eq!(globex_agent.seen().configs, vec![hash_of(&globex_v)]);
    assert!(acme_agent.seen().errors.is_empty() && globex_agent.seen().errors.is_empty());
    // Each admin view holds its own tenant's agent, with its own attributes.
    for (admin, claimed) in [(&acme, Some("globex")), (&globex, None)] {
        let agents = eventually("listed", DEADLINE, || async {
            let agents = admin.agents("").await?;
            Ok((agents.len() == 1).then_some(agents))
        })
        .await
        .unwrap();
        assert_eq!(agents[0]["instance_uid"], uid.to_string());
        let detail = admin.agent(uid).await.unwrap().unwrap();
        assert_eq!(
            detail["identifying_attributes"]["tenant"].as_str(),
            claimed,
            "what an agent says about itself never moves it"
        );
    }
    // Another tenant's ids are not found, not forbidden-but-visible.
    let (status, _) = globex
        .request(reqwest::Method::DELETE, &format!("/api/v1/keys/{acme_key_id}"), None)
        .await
        .unwrap();
    assert_eq!(status, 404);
    let (_, globex_keys) = globex
        .request(reqwest::Method::GET, "/api/v1/keys", None)
        .await
        .unwrap();
    assert_eq!(globex_keys.as_array().unwrap().len(), 1);
    let (_, default_agents) = server
        .admin
        .request(reqwest::Method::GET, "/api/v1/agents", None)
        .await
        .unwrap();
    assert_eq!(default_agents, Value::Array(vec![]), "the default tenant sees neither");
    server.stop().await;
}

#[tokio::test]
async fn a_raw_agent_with_another_tenants_uid_cannot_touch_it() {
    let server = secured().await;
    let acme = server.admin.clone().for_tenant("acme");
    let globex = server.admin.clone().for_tenant("globex");
    let (acme_key, _) = acme.create_key("a").await.unwrap();
    let (globex_key, _) = globex.create_key("g").await.unwrap();
    let victim = SimAgent::connect_ws(&server.ws_url(), AgentOptions::default().api_key(&acme_key))
        .await
        .unwrap();
    victim.wait_for("answered", |s| s.replies >= 1).await.unwrap();
    // globex's agent uses acme's uid: it only ever speaks for globex's own
    // record of that uid.
    let mut intruder = RawAgent::connect_with(&server.ws_url(), victim.uid(), Some(&globex_key)).await;
    let hello = intruder.hello("intruder");
    intruder.ask(&hello).await;
    let record = acme.agent(victim.uid()).await.unwrap().unwrap();
    assert_eq!(record["connected"], true);
    assert!(record["identifying_attributes"]["service.name"].is_null(), "{record}");
    let v = acme.create_config("base", "c.yaml", "x: 1", "text/yaml").await.unwrap();
    acme.assign("all", "", "base").await.unwrap();
    victim.wait_for_config(&hash_of(&v)).await.unwrap();
    assert!(
        intruder
            .recv(Duration::from_millis(300))
            .await
            .and_then(|m| m.remote_config)
            .is_none(),
        "acme's config never reaches globex's connection"
    );
    server.stop().await;
}

#[tokio::test]
async fn keys_work_across_gateways_and_coordinators() {
    let fleet = Fleet::builder(BINARY)
        .gateways(2)
        .coordinators(2)
        .env("FLEETPLANE_AGENTS_AUTH", "api_key")
        .env("FLEETPLANE_AGENTS_KEY_CACHE_TTL_MS", "300")
        .start()
        .await
        .unwrap();
    let acme = fleet.admin(0).for_tenant("acme");
    let (key, id) = acme.create_key("fleet").await.unwrap();
    let urls = fleet.ws_urls();
    let mut wrong = key.clone();
    let last = wrong.pop().unwrap();
    wrong.push(if last == '0' { '1' } else { '0' });
    for url in &urls {
        assert_eq!(upgrade_status(url, None).await.0, 401, "no key at {url}");
        assert_eq!(upgrade_status(url, Some(&wrong)).await.0, 401, "wrong secret at {url}");
    }
    let agent = SimAgent::connect_ws(&urls[1], AgentOptions::default().api_key(&key))
        .await
        .unwrap();
    let v = acme.create_config("base", "c.yaml", "x: 1", "text/yaml").await.unwrap();
    acme.assign("all", "", "base").await.unwrap();
    agent.wait_for_config(&hash_of(&v)).await.unwrap();
    // Another tenant's key, with acme's agent's uid, on the other gateway:
    // it speaks for globex's record of that uid only, never for acme's agent.
    let globex = fleet.admin(0).for_tenant("globex");
    let (globex_key, _) = globex.create_key("fleet").await.unwrap();
    let intruder = SimAgent::connect_ws(
        &urls[0],
        AgentOptions {
            uid: Some(agent.uid()),
            ..AgentOptions::default().api_key(&globex_key)
        },
    )
    .await
    .unwrap();
    intruder.wait_for("answered", |s| s.replies >= 1).await.unwrap();
    assert!(
        intruder.seen().configs.is_empty(),
        "acme's config never reaches globex's agent"
    );
    assert_eq!(globex.agents("").await.unwrap().len(), 1);
    // The other coordinator sees acme's agent in acme, on its own gateway.
    let other = fleet.admin(1);
    assert!(other.agents("").await.unwrap().is_empty());
    let listed = other.clone().for_tenant("acme").agents("").await.unwrap();
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0]["gateway_id"], "gw-1", "{listed:?}");
    // Revoked through one coordinator, refused by every gateway.
    let (status, _) = other
        .for_tenant("acme")
        .request(reqwest::Method::DELETE, &format!("/api/v1/keys/{id}"), None)
        .await
        .unwrap();
    assert_eq!(status, 200);
    eventually("revoked everywhere", DEADLINE, || async {
        let a = upgrade_status(&urls[0], Some(&key)).await.0;
        let b = upgrade_status(&urls[1], Some(&key)).await.0;
        Ok((a == 401 && b == 401).then_some(()))
    })
    .await
    .unwrap();
    agent.wait_for("closed", |s| !s.connected).await.unwrap();
}

#[tokio::test]
async fn operators_have_roles_and_scopes_and_every_mutation_is_audited() {
    use fleetplane::config::OperatorTokenSection;
    use fleetplane_coordinator::admin::access::Role;
    let token = |name: &str, role: Role, tenant: &str| OperatorTokenSection {
        name: name.into(),
        token: format!("token-of-{name}-0123456789"),
        role,
        tenant: tenant.into(),
    };
    let server = Server::start_with(tempfile::tempdir().unwrap(), move |c| {
        c.admin.tokens = vec![
            token("root", Role::Admin, "*"),
            token("acme-editor", Role::ConfigEditor, "acme"),
            token("acme-release", Role::RolloutOperator, "acme"),
            token("acme-viewer", Role::Viewer, "acme"),
        ];
    })
    .await;
    let as_op = |name: &str| {
        fleetplane_testkit::admin::Admin::new(server.server.admin_addr)
            .with_token(&format!("token-of-{name}-0123456789"))
    };
    let (root, editor, release, viewer) = (
        as_op("root").for_tenant("acme"),
        as_op("acme-editor"),
        as_op("acme-release"),
        as_op("acme-viewer"),
    );
    let config_body =
        |v: u32| serde_json::json!({ "files": { "c.yaml": { "body": format!("version: {v}\nshared: yes\n") } } });
    let post_config = |admin: fleetplane_testkit::admin::Admin, v: u32| async move {
        admin
            .request(
                reqwest::Method::POST,
                "/api/v1/configs/base/versions",
                Some(config_body(v)),
            )
            .await
            .unwrap()
    };
    // A viewer reads and cannot write.
    assert_eq!(
        viewer
            .request(reqwest::Method::GET, "/api/v1/agents", None)
            .await
            .unwrap()
            .0,
        200
    );
    let (status, body) = post_config(viewer.clone(), 1).await;
    assert_eq!(status, 403, "{body}");
    // The config editor edits configs in its tenant (no header needed)...
    assert_eq!(post_config(editor.clone(), 1).await.0, 201);
    assert_eq!(post_config(editor.clone(), 2).await.0, 201);
    let (status, _) = editor
        .request(
            reqwest::Method::PUT,
            "/api/v1/assignments/all",
            Some(serde_json::json!({ "selector": "", "config": "base", "version": 1 })),
        )
        .await
        .unwrap();
    assert_eq!(status, 200);
    // ...but starts no rollout, manages no key, and never acts on another tenant.
    let rollout = serde_json::json!({ "assignment": "all", "config": "base", "version": 2 });
    let (status, _) = editor
        .request(reqwest::Method::POST, "/api/v1/rollouts", Some(rollout.clone()))
        .await
        .unwrap();
    assert_eq!(status, 403);
    assert_eq!(
        editor
            .request(reqwest::Method::GET, "/api/v1/keys", None)
            .await
            .unwrap()
            .0,
        403
    );
    let (status, _) = post_config(editor.clone().for_tenant("globex"), 1).await;
    assert_eq!(status, 403);
    // The release manager starts rollouts and edits no config.
    assert_eq!(post_config(release.clone(), 3).await.0, 403);
    let (rollout_status, body) = release
        .request(reqwest::Method::POST, "/api/v1/rollouts", Some(rollout))
        .await
        .unwrap();
    assert_ne!(rollout_status, 403, "{body}");
    // Unknown tokens are refused outright.
    let stranger = fleetplane_testkit::admin::Admin::new(server.server.admin_addr).with_token("not-a-token-at-all");
    assert_eq!(
        stranger
            .request(reqwest::Method::GET, "/api/v1/agents", None)
            .await
            .unwrap()
            .0,
        401
    );

    // acme's audit log has every mutation, allowed or not, with its actor.
    let (status, log) = root.request(reqwest::Method::GET, "/api/v1/audit", None).await.unwrap();
    assert_eq!(status, 200, "{log}");
    let entries = log.as_array().unwrap();
    let line = |e: &Value| {
        format!(
            "{} {} {}",
            e["actor"].as_str().unwrap(),
            e["action"].as_str().unwrap(),
            e["status"]
        )
    };
    let lines: Vec<String> = entries.iter().rev().map(line).collect();
    assert_eq!(
        lines,
        vec![
            "acme-viewer POST /api/v1/configs/base/versions 403",
            "acme-editor POST /api/v1/configs/base/versions 201",
            "acme-editor POST /api/v1/configs/base/versions 201",
            "acme-editor PUT /api/v1/assignments/all 200",
            "acme-editor POST /api/v1/rollouts 403",
            "acme-release POST /api/v1/configs/base/versions 403",
            format!("acme-release POST /api/v1/rollouts {rollout_status}").as_str(),
        ],
        "{log:#}"
    );
    // The second version's entry carries its diff.
    let detail = entries[entries.len() - 3]["detail"].as_str().unwrap();
    assert!(detail.contains("- version: 1\n+ version: 2"), "{detail}");
    // globex's log shows the editor's attempt on it.
    let (_, globex_log) = as_op("root")
        .for_tenant("globex")
        .request(reqwest::Method::GET, "/api/v1/audit", None)
        .await
        .unwrap();
    assert_eq!(globex_log.as_array().unwrap().len(), 1, "{globex_log}");
    assert_eq!(globex_log[0]["actor"], "acme-editor");
    // A viewer of acme reads acme's log only.
    let (status, _) = viewer
        .clone()
        .for_tenant("globex")
        .request(reqwest::Method::GET, "/api/v1/audit", None)
        .await
        .unwrap();
    assert_eq!(status, 403);
    server.stop().await;
}

#[tokio::test]
async fn a_uid_belongs_to_the_key_that_registered_it_until_that_key_is_revoked() {
    let server = secured().await;
    let (first, first_id) = server.admin.create_key("first").await.unwrap();
    let (second, _) = server.admin.create_key("second").await.unwrap();
    let owner = SimAgent::connect_ws(&server.ws_url(), AgentOptions::default().api_key(&first))
        .await
        .unwrap();
    owner.wait_for("answered", |s| s.replies >= 1).await.unwrap();
    let uid = owner.uid();
    owner.disconnect().await.unwrap();
    let claim = |key: String| {
        let url = server.http_url();
        async move {
            let message = AgentToServer {
                instance_uid: uid.to_vec(),
                sequence_num: 9,
                agent_description: Some(Default::default()),
                ..Default::default()
            };
            let response = reqwest::Client::new()
                .post(url)
                .header("content-type", CONTENT_TYPE_PROTOBUF)
                .bearer_auth(key)
                .body(message.encode_to_vec())
                .send()
                .await
                .unwrap();
            assert_eq!(response.status(), 200);
            fleetplane_proto::opamp::ServerToAgent::decode(response.bytes().await.unwrap()).unwrap()
        }
    };
    // Another key of the same tenant cannot speak for the uid...
    let refused = claim(second.clone()).await;
    let error = refused.error_response.expect("refused");
    assert!(error.error_message.contains("another API key"), "{error:?}");
    // ...its owner can...
    assert!(claim(first.clone()).await.error_response.is_none());
    // ...and once the owner's key is revoked, the uid passes on (key rotation).
    let (status, _) = server
        .admin
        .request(reqwest::Method::DELETE, &format!("/api/v1/keys/{first_id}"), None)
        .await
        .unwrap();
    assert_eq!(status, 200);
    assert!(claim(second).await.error_response.is_none());
    server.stop().await;
}
