//! Staged rollouts with the project's simulated agents over the real
//! protocol, in all-in-one mode and in the scaled form (separate gateway and
//! coordinator processes over real NATS and Redis).

mod common;

use std::time::Duration;

use fleetplane_proto::{ConfigHash, InstanceUid};
use fleetplane_testkit::{
    admin::Admin,
    agent::{AgentOptions, SimAgent},
    fleet::Fleet,
    wait::eventually,
};
use serde_json::{Value, json};

const BINARY: &str = env!("CARGO_BIN_EXE_fleetplane");
const DEADLINE: Duration = Duration::from_secs(60);

/// A running control plane in either form.
enum Plane {
    AllInOne(common::Server),
    Scaled(Fleet),
}

impl Plane {
    async fn all_in_one() -> Self {
        Plane::AllInOne(common::Server::start().await)
    }

    async fn scaled() -> Self {
        Plane::Scaled(
            Fleet::builder(BINARY)
                .gateways(2)
                .coordinators(2)
                .start()
                .await
                .unwrap(),
        )
    }

    fn admin(&self) -> Admin {
        match self {
            Plane::AllInOne(s) => s.admin.clone(),
            Plane::Scaled(f) => f.admin(0),
        }
    }

    fn ws_urls(&self) -> Vec<String> {
        match self {
            Plane::AllInOne(s) => vec![s.ws_url()],
            Plane::Scaled(f) => f.ws_urls(),
        }
    }
}

fn hash_of(version: &Value) -> ConfigHash {
    ConfigHash::parse(version["hash"].as_str().unwrap()).unwrap()
}

/// `n` agents of service `service`, the ones for which `reject(i)` holds
/// refusing configs that contain "BAD".
async fn fleet_of(plane: &Plane, service: &str, n: usize, reject: impl Fn(usize) -> bool) -> Vec<SimAgent> {
    let urls = plane.ws_urls();
    let mut agents = Vec::with_capacity(n);
    for i in 0..n {
        let mut options = AgentOptions::default().attr("service.name", service);
        if reject(i) {
            options.reject_containing = Some("BAD".into());
        }
        agents.push(SimAgent::connect_ws(&urls[i % urls.len()], options).await.unwrap());
    }
    agents
}

/// Config v1 pinned by assignment `name`, every agent running it.
async fn baseline(admin: &Admin, name: &str, agents: &[SimAgent]) -> ConfigHash {
    let v1 = admin
        .create_config(name, "c.yaml", "version: 1", "text/yaml")
        .await
        .unwrap();
    let (status, body) = admin
        .request(
            reqwest::Method::PUT,
            &format!("/api/v1/assignments/{name}"),
            Some(json!({ "selector": format!("service.name={name}"), "config": name, "version": 1 })),
        )
        .await
        .unwrap();
    assert_eq!(status, 200, "{body}");
    let hash = hash_of(&v1);
    for agent in agents {
        agent.wait_for_config(&hash).await.unwrap();
    }
    // And the control plane has recorded it: that is the "previous config" a
    // rollout returns agents to.
    eventually("v1 APPLIED everywhere", DEADLINE, || async {
        let groups = admin.config_status().await?;
        Ok(groups
            .iter()
            .find(|g| g["hash"] == hash.to_string() && g["statuses"]["APPLIED"].as_u64() == Some(agents.len() as u64))
            .map(|_| ()))
    })
    .await
    .unwrap();
    hash
}

async fn start_rollout(admin: &Admin, body: Value) -> Value {
    let (status, rollout) = admin
        .request(reqwest::Method::POST, "/api/v1/rollouts", Some(body))
        .await
        .unwrap();
    assert_eq!(status, 201, "{rollout}");
    rollout
}

async fn rollout_in_state(admin: &Admin, id: &str, states: &[&str]) -> Value {
    let found = eventually(&format!("rollout {id} in {states:?}"), DEADLINE, || async {
        let (status, rollout) = admin
            .request(reqwest::Method::GET, &format!("/api/v1/rollouts/{id}"), None)
            .await?;
        anyhow::ensure!(status == 200, "HTTP {status}: {rollout}");
        Ok(states
            .contains(&rollout["state"].as_str().unwrap_or_default())
            .then_some(rollout))
    })
    .await;
    match found {
        Ok(rollout) => rollout,
        Err(e) => {
            let (_, last) = admin
                .request(reqwest::Method::GET, &format!("/api/v1/rollouts/{id}"), None)
                .await
                .unwrap_or_default();
            let summary = json!({ "state": last["state"], "stage": last["stage"], "reason": last["reason"],
                "stages": last["stages"], "events": last["events"] });
            panic!("{e:#}\nlast seen: {summary:#}");
        }
    }
}
/// The configs an agent went through, repeats of the same one collapsed (a
/// re-sent offer of the same hash is not a change).
fn changes(agent: &SimAgent) -> Vec<ConfigHash> {
    let mut seen = agent.seen().configs;
    seen.dedup();
    seen
}

fn messages(rollout: &Value) -> Vec<String> {
    rollout["events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["message"].as_str().unwrap().to_owned())
        .collect()
}

async fn completes_stage_by_stage(plane: Plane) {
    let admin = plane.admin();
    let agents = fleet_of(&plane, "stages", 200, |_| false).await;
    baseline(&admin, "stages", &agents).await;
    // Other systems follow rollouts on NATS (scaled form).
    let mut notices = match &plane {
        Plane::Scaled(fleet) => {
            let client = async_nats::connect(fleet.nats.url()).await.unwrap();
            let sub = client.subscribe("fp.v1.rollouts.default").await.unwrap();
            client.flush().await.unwrap();
            Some((client, sub))
        }
        Plane::AllInOne(_) => None,
    };
    let v2 = admin
        .create_config("stages", "c.yaml", "version: 2", "text/yaml")
        .await
        .unwrap();
    let rollout = start_rollout(
        &admin,
        json!({ "assignment": "stages", "config": "stages", "version": 2, "bake_seconds": 0.3 }),
    )
    .await;
    assert_eq!(rollout["state"], "PROGRESSING");
    let cumulative: Vec<u64> = rollout["stages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["cumulative"].as_u64().unwrap())
        .collect();
    assert_eq!(cumulative, vec![2, 20, 100, 200], "default stages 1%, 10%, 50%, 100%");

    let done = rollout_in_state(
        &admin,
        rollout["id"].as_str().unwrap(),
        &["COMPLETED", "ROLLING_BACK", "ROLLED_BACK"],
    )
    .await;
    assert_eq!(done["state"], "COMPLETED", "{done}");
    let events = messages(&done);
    let order: Vec<&String> = events.iter().filter(|m| m.starts_with("stage")).collect();
    assert_eq!(
        order,
        vec![
            "stage 1 of 4 done: 2 applied, 0 failed; baking",
            "stage 2 of 4 started",
            "stage 2 of 4 done: 18 applied, 0 failed; baking",
            "stage 3 of 4 started",
            "stage 3 of 4 done: 80 applied, 0 failed; baking",
            "stage 4 of 4 started",
            "stage 4 of 4 done: 100 applied, 0 failed; baking",
        ]
    );
    for agent in &agents {
        agent.wait_for_config(&hash_of(&v2)).await.unwrap();
        assert_eq!(
            changes(agent).len(),
            2,
            "each agent changed exactly once: {:?}",
            agent.seen().configs
        );
    }
    // The assignment now points at the target version (promoted by the
    // replica that wrote COMPLETED, just after that write).
    eventually("the assignment promoted", DEADLINE, || async {
        let (_, assignment) = admin
            .request(reqwest::Method::GET, "/api/v1/assignments/stages", None)
            .await?;
        Ok((assignment["version"] == 2).then_some(()))
    })
    .await
    .unwrap();
    if let Some((_client, sub)) = notices.as_mut() {
        use futures_util::StreamExt;
        use prost::Message;
        let mut states = Vec::new();
        while states.last().map(String::as_str) != Some("COMPLETED") {
            let message = tokio::time::timeout(DEADLINE, sub.next()).await.unwrap().unwrap();
            let notice = fleetplane_proto::internal::RolloutNotice::decode(message.payload).unwrap();
            assert_eq!(notice.rollout_id, done["id"].as_str().unwrap());
            states.push(notice.state);
        }
        assert!(states.len() >= 8, "one notice per decision: {states:?}");
    }
}

async fn rejection_rolls_back_to_previous_hashes(plane: Plane) {
    let admin = plane.admin();
    let agents = fleet_of(&plane, "risky", 100, |i| i % 5 == 0).await;
    let v1 = baseline(&admin, "risky", &agents).await;
    admin
        .create_config("risky", "c.yaml", "version: 2 BAD", "text/yaml")
        .await
        .unwrap();
    let rollout = start_rollout(
        &admin,
        json!({ "assignment": "risky", "config": "risky", "stages": [10, 50, 100], "bake_seconds": 0.2 }),
    )
    .await;
    let id = rollout["id"].as_str().unwrap();
    let done = rollout_in_state(&admin, id, &["ROLLED_BACK", "COMPLETED"]).await;
    assert_eq!(done["state"], "ROLLED_BACK", "{done}");
    assert!(done["reason"].as_str().unwrap().contains("failed"), "{done}");
    let failures: Vec<&Value> = done["stages"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|s| s["failures"].as_array().unwrap())
        .collect();
    assert!(!failures.is_empty());
    assert!(
        failures
            .iter()
            .any(|f| f["reason"] == "agent reported FAILED: config rejected: contains \"BAD\""),
        "the agent's own error text is kept: {failures:?}"
    );
    // Every changed agent is back on its exact previous hash.
    let changed: Vec<&Value> = done["agents"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|a| a["phase"] != "PENDING")
        .collect();
    assert!(!changed.is_empty());
    for agent in &agents {
        let entry = done["agents"]
            .as_array()
            .unwrap()
            .iter()
            .find(|a| a["instance_uid"] == agent.uid().to_string())
            .unwrap();
        if entry["phase"] == "PENDING" {
            assert_eq!(changes(agent), vec![v1], "unchanged agents never saw the target");
        } else {
            assert_eq!(entry["phase"], "REVERTED", "{entry}");
            assert_eq!(entry["previous_hash"], v1.to_string());
            let seen = agent
                .wait_for("back on v1", |s| s.configs.last() == Some(&v1))
                .await
                .unwrap();
            assert!(seen.configs.len() >= 3, "v1, target, v1 again: {:?}", seen.configs);
        }
    }
    // The store agrees: every agent reports v1 again.
    eventually("all agents report v1", DEADLINE, || async {
        let groups = admin.config_status().await?;
        Ok(groups
            .iter()
            .find(|g| g["hash"] == v1.to_string())
            .filter(|g| g["agents"].as_array().map(Vec::len) == Some(100))
            .map(|_| ()))
    })
    .await
    .unwrap();
}

async fn overlapping_rollouts_are_refused(plane: Plane) {
    let admin = plane.admin();
    let agents = fleet_of(&plane, "busy", 4, |_| false).await;
    baseline(&admin, "busy", &agents).await;
    admin
        .create_config("busy", "c.yaml", "version: 2", "text/yaml")
        .await
        .unwrap();
    let first = start_rollout(
        &admin,
        json!({ "assignment": "busy", "config": "busy", "bake_seconds": 3600 }),
    )
    .await;
    let (status, body) = admin
        .request(
            reqwest::Method::POST,
            "/api/v1/rollouts",
            Some(json!({ "assignment": "busy", "config": "busy", "version": 1 })),
        )
        .await
        .unwrap();
    assert_eq!(status, 409, "{body}");
    assert!(
        body["error"].as_str().unwrap().contains(first["id"].as_str().unwrap()),
        "{body}"
    );
    // Operator commands: pause, resume, abort.
    let id = first["id"].as_str().unwrap();
    for (action, state) in [
        ("pause", "PAUSED"),
        ("resume", "BAKING|PROGRESSING"),
        ("abort", "ABORTED"),
    ] {
        let (status, body) = admin
            .request(reqwest::Method::POST, &format!("/api/v1/rollouts/{id}/{action}"), None)
            .await
            .unwrap();
        assert_eq!(status, 200, "{action}: {body}");
        assert!(state.split('|').any(|s| body["state"] == s), "{action}: {body}");
    }
    let (status, _) = admin
        .request(reqwest::Method::POST, &format!("/api/v1/rollouts/{id}/resume"), None)
        .await
        .unwrap();
    assert_eq!(status, 409, "an aborted rollout cannot resume");
    // An assignment that follows the latest version cannot be rolled out:
    // new versions reach its agents at once.
    admin.assign("follower", "service.name=nobody", "busy").await.unwrap();
    let (status, body) = admin
        .request(
            reqwest::Method::POST,
            "/api/v1/rollouts",
            Some(json!({ "assignment": "follower", "config": "busy" })),
        )
        .await
        .unwrap();
    assert_eq!(status, 400, "{body}");
    assert!(
        body["error"].as_str().unwrap().contains("follows the latest version"),
        "{body}"
    );
    // Once it is over, a new rollout on the assignment is accepted.
    start_rollout(
        &admin,
        json!({ "assignment": "busy", "config": "busy", "express": true }),
    )
    .await;
}

#[tokio::test]
async fn all_in_one_rollout_completes_stage_by_stage() {
    completes_stage_by_stage(Plane::all_in_one().await).await;
}

#[tokio::test]
async fn scaled_rollout_completes_stage_by_stage() {
    completes_stage_by_stage(Plane::scaled().await).await;
}

#[tokio::test]
async fn all_in_one_rejection_rolls_back() {
    rejection_rolls_back_to_previous_hashes(Plane::all_in_one().await).await;
}

#[tokio::test]
async fn scaled_rejection_rolls_back() {
    rejection_rolls_back_to_previous_hashes(Plane::scaled().await).await;
}

#[tokio::test]
async fn all_in_one_overlapping_rollouts_are_refused() {
    overlapping_rollouts_are_refused(Plane::all_in_one().await).await;
}

#[tokio::test]
async fn scaled_overlapping_rollouts_are_refused() {
    overlapping_rollouts_are_refused(Plane::scaled().await).await;
}

#[tokio::test]
async fn all_in_one_silent_agent_counts_as_failed() {
    silent_agent_counts_as_failed(Plane::all_in_one().await).await;
}

#[tokio::test]
async fn scaled_silent_agent_counts_as_failed() {
    silent_agent_counts_as_failed(Plane::scaled().await).await;
}

async fn silent_agent_counts_as_failed(plane: Plane) {
    let admin = plane.admin();
    let mut agents = fleet_of(&plane, "quiet", 10, |_| false).await;
    baseline(&admin, "quiet", &agents).await;
    admin
        .create_config("quiet", "c.yaml", "version: 2", "text/yaml")
        .await
        .unwrap();
    let silent = agents.remove(0);
    let silent_uid: InstanceUid = silent.uid();
    silent.kill();
    let rollout = start_rollout(
        &admin,
        json!({
            "assignment": "quiet", "config": "quiet", "stages": [10, 100],
            "canaries": [silent_uid.to_string()], "disconnect_grace_seconds": 1
        }),
    )
    .await;
    let done = rollout_in_state(&admin, rollout["id"].as_str().unwrap(), &["ROLLED_BACK", "COMPLETED"]).await;
    assert_eq!(done["state"], "ROLLED_BACK", "{done}");
    let canary = done["agents"]
        .as_array()
        .unwrap()
        .iter()
        .find(|a| a["instance_uid"] == silent_uid.to_string())
        .unwrap();
    assert_eq!(canary["stage"], 1);
    assert!(
        canary["reason"]
            .as_str()
            .unwrap()
            .contains("disconnected for more than 1 s"),
        "{canary}"
    );
    // Nobody else was touched: the failure was in the canary stage.
    for agent in &agents {
        assert_eq!(changes(agent).len(), 1);
    }
}

#[tokio::test]
async fn a_new_coordinator_resumes_a_rollout_whose_coordinator_died() {
    let mut fleet = Fleet::builder(BINARY)
        .gateways(2)
        .coordinators(2)
        .start()
        .await
        .unwrap();
    let plane_admin = fleet.admin(0);
    let urls = fleet.ws_urls();
    let mut agents = Vec::new();
    for i in 0..50 {
        // Reconnecting agents: a report in flight to the killed coordinator
        // is answered Unavailable, and the agent comes back, as real ones do.
        let order = [urls[i % 2].clone(), urls[(i + 1) % 2].clone()];
        agents.push(
            SimAgent::connect_ws_any(&order, AgentOptions::default().attr("service.name", "resume"))
                .await
                .unwrap(),
        );
    }
    baseline(&plane_admin, "resume", &agents).await;
    let v2 = plane_admin
        .create_config("resume", "c.yaml", "version: 2", "text/yaml")
        .await
        .unwrap();
    let rollout = start_rollout(
        &plane_admin,
        json!({ "assignment": "resume", "config": "resume", "stages": [10, 50, 100], "bake_seconds": 1.5 }),
    )
    .await;
    let id = rollout["id"].as_str().unwrap().to_owned();
    eventually("stage 2 reached", DEADLINE, || async {
        let (_, r) = plane_admin
            .request(reqwest::Method::GET, &format!("/api/v1/rollouts/{id}"), None)
            .await?;
        Ok((r["stage"].as_u64() >= Some(2)).then_some(()))
    })
    .await
    .unwrap();
    fleet.coordinators[0].kill().await;
    // A replacement joins; with the survivor it finishes the rollout.
    let replacement = fleet.coordinators[0].respawn().await.unwrap();
    fleet.coordinators[0] = replacement;
    let admin = fleet.admin(1);
    let settled = eventually("rollout settles", DEADLINE, || async {
        let (_, r) = admin
            .request(reqwest::Method::GET, &format!("/api/v1/rollouts/{id}"), None)
            .await?;
        Ok(["COMPLETED", "ROLLED_BACK"]
            .contains(&r["state"].as_str().unwrap_or_default())
            .then_some(()))
    })
    .await;
    if settled.is_err() {
        // What the agents still changing saw, and what their records say.
        let (_, r) = admin
            .request(reqwest::Method::GET, &format!("/api/v1/rollouts/{id}"), None)
            .await
            .unwrap();
        for a in r["agents"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|a| a["phase"] == "CHANGING")
        {
            let uid = a["instance_uid"].as_str().unwrap();
            let record = admin.agent(uid).await.unwrap();
            let sim = agents.iter().find(|s| s.uid().to_string() == uid).map(|s| s.seen());
            eprintln!("STUCK {a}\nRECORD {record:?}\nSEEN {sim:?}");
        }
    }
    let done = rollout_in_state(&admin, &id, &["COMPLETED", "ROLLED_BACK"]).await;
    assert_eq!(done["state"], "COMPLETED", "{done}");
    let events = messages(&done);
    for stage in 2..=3 {
        let started = format!("stage {stage} of 3 started");
        assert_eq!(
            events.iter().filter(|m| **m == started).count(),
            1,
            "no stage runs twice: {events:?}"
        );
    }
    for agent in &agents {
        agent.wait_for_config(&hash_of(&v2)).await.unwrap();
        assert_eq!(
            changes(agent).len(),
            2,
            "same end state, each agent changed once: {:?}",
            agent.seen().configs
        );
    }
}

/// Three simulated agents of `service` and one hand-driven canary, all
/// running version 1 of config `service` through a pinned assignment, as
/// the store records it; the canary and v1's hash.
async fn canary_on_v1(plane: &Plane, service: &str) -> (Vec<SimAgent>, common::RawAgent, ConfigHash) {
    use fleetplane_proto::opamp::RemoteConfigStatuses;
    let admin = plane.admin();
    let others = fleet_of(plane, service, 3, |_| false).await;
    let mut canary = common::RawAgent::connect(&plane.ws_urls()[0], InstanceUid::new_v7()).await;
    let hello = canary.hello(service);
    canary.send(&hello).await;
    let v1 = hash_of(
        &admin
            .create_config(service, "c.yaml", "version: 1", "text/yaml")
            .await
            .unwrap(),
    );
    let (status, body) = admin
        .request(
            reqwest::Method::PUT,
            &format!("/api/v1/assignments/{service}"),
            Some(json!({ "selector": format!("service.name={service}"), "config": service, "version": 1 })),
        )
        .await
        .unwrap();
    assert_eq!(status, 200, "{body}");
    canary
        .recv_until(DEADLINE, |m| {
            m.remote_config.as_ref().is_some_and(|c| c.config_hash == v1.as_bytes())
        })
        .await;
    let applied = canary.status(v1.as_bytes(), RemoteConfigStatuses::Applied);
    canary.send(&applied).await;
    let uid = canary.uid;
    eventually("canary runs v1", DEADLINE, || async {
        let Some(agent) = admin.agent(uid).await? else {
            return Ok(None);
        };
        Ok((agent["remote_config"]["hash"] == v1.to_string()).then_some(()))
    })
    .await
    .unwrap();
    (others, canary, v1)
}

/// A canary that receives the target and then falls silent: the rollback
/// must send it its previous config (its last instruction is the target),
/// and it counts as reverted only once it reports that config.
#[tokio::test]
async fn a_silent_canary_is_sent_its_previous_config_on_rollback() {
    use fleetplane_proto::opamp::RemoteConfigStatuses;
    let plane = Plane::all_in_one().await;
    let admin = plane.admin();
    let (_others, mut canary, v1) = canary_on_v1(&plane, "hang").await;

    let v2 = hash_of(
        &admin
            .create_config("hang", "c.yaml", "version: 2", "text/yaml")
            .await
            .unwrap(),
    );
    let rollout = start_rollout(
        &admin,
        json!({ "assignment": "hang", "config": "hang", "version": 2, "stages": [25, 100],
                "canaries": [canary.uid.to_string()], "apply_timeout_seconds": 2, "bake_seconds": 0.2 }),
    )
    .await;
    let id = rollout["id"].as_str().unwrap().to_owned();
    // The canary gets the target and stays silent.
    canary
        .recv_until(DEADLINE, |m| {
            m.remote_config.as_ref().is_some_and(|c| c.config_hash == v2.as_bytes())
        })
        .await;
    // It never reports APPLIED: the stage fails, the rollout rolls back, and
    // the canary is sent v1 again although its record still says v1.
    canary
        .recv_until(DEADLINE, |m| {
            m.remote_config.as_ref().is_some_and(|c| c.config_hash == v1.as_bytes())
        })
        .await;
    let (_, during) = admin
        .request(reqwest::Method::GET, &format!("/api/v1/rollouts/{id}"), None)
        .await
        .unwrap();
    let canary_uid = canary.uid.to_string();
    let entry = |rollout: &Value| {
        rollout["agents"]
            .as_array()
            .unwrap()
            .iter()
            .find(|a| a["instance_uid"] == canary_uid)
            .cloned()
            .unwrap()
    };
    assert_eq!(during["state"], "ROLLING_BACK", "{during}");
    assert_eq!(
        entry(&during)["phase"],
        "REVERTING",
        "not back before it reports v1: {during}"
    );
    // It reports v1: now it is back, and the rollout is rolled back.
    let back = canary.status(v1.as_bytes(), RemoteConfigStatuses::Applied);
    canary.send(&back).await;
    let done = rollout_in_state(&admin, &id, &["ROLLED_BACK"]).await;
    assert_eq!(entry(&done)["phase"], "REVERTED", "{done}");
}

/// A canary that got the target and went offline before reporting it: when
/// it comes back after the rollback, still reporting its previous hash, its
/// first answer carries the previous config again (its last instruction
/// was the rolled-back one).
#[tokio::test]
async fn a_canary_offline_during_the_rollback_gets_its_previous_config_when_back() {
    use fleetplane_proto::opamp::RemoteConfigStatuses;
    let plane = Plane::all_in_one().await;
    let admin = plane.admin();
    let (_others, mut canary, v1) = canary_on_v1(&plane, "away").await;
    let uid = canary.uid;
    let v2 = hash_of(
        &admin
            .create_config("away", "c.yaml", "version: 2", "text/yaml")
            .await
            .unwrap(),
    );
    let rollout = start_rollout(
        &admin,
        json!({ "assignment": "away", "config": "away", "version": 2, "stages": [25, 100],
                "canaries": [uid.to_string()], "disconnect_grace_seconds": 0.5, "apply_timeout_seconds": 30,
                "bake_seconds": 0.2 }),
    )
    .await;
    let id = rollout["id"].as_str().unwrap().to_owned();
    canary
        .recv_until(DEADLINE, |m| {
            m.remote_config.as_ref().is_some_and(|c| c.config_hash == v2.as_bytes())
        })
        .await;
    // Gone without a word, before reporting anything about v2.
    drop(canary);
    rollout_in_state(&admin, &id, &["ROLLING_BACK", "ROLLED_BACK"]).await;
    // Back, still on v1 as far as it knows: its first answer restores v1.
    let mut back = common::RawAgent::connect(&plane.ws_urls()[0], uid).await;
    back.seq = 10;
    let mut hello = back.hello("away");
    hello.remote_config_status = Some(fleetplane_proto::opamp::RemoteConfigStatus {
        last_remote_config_hash: v1.as_bytes().to_vec(),
        status: RemoteConfigStatuses::Applied as i32,
        error_message: String::new(),
    });
    // Refused at most while the server still counts the old connection as
    // live; the agent honours the retry hint it is given, as the spec asks.
    let deadline = tokio::time::Instant::now() + DEADLINE;
    let answer = loop {
        let answer = back.ask(&hello).await;
        let Some(error) = &answer.error_response else {
            break answer;
        };
        assert!(tokio::time::Instant::now() < deadline, "never let back in: {error:?}");
        let wait = match &error.details {
            Some(fleetplane_proto::opamp::server_error_response::Details::RetryInfo(info)) => {
                Duration::from_nanos(info.retry_after_nanoseconds)
            }
            None => Duration::from_secs(1),
        };
        tokio::time::sleep(wait).await;
        back.seq += 1;
        hello.sequence_num = back.seq;
    };
    let offer = answer.remote_config.expect("the previous config, offered again");
    assert_eq!(offer.config_hash, v1.as_bytes());
}

/// A slow canary that reports the target APPLIED only after the rollback
/// began: it is told its previous config again on that very report, and
/// counts as reverted only when it reports the previous config.
#[tokio::test]
async fn a_slow_canary_reporting_the_target_late_is_sent_back_to_its_previous_config() {
    use fleetplane_proto::opamp::RemoteConfigStatuses;
    let plane = Plane::all_in_one().await;
    let admin = plane.admin();
    let (_others, mut canary, v1) = canary_on_v1(&plane, "slow").await;
    let uid = canary.uid;
    let v2 = hash_of(
        &admin
            .create_config("slow", "c.yaml", "version: 2", "text/yaml")
            .await
            .unwrap(),
    );
    let rollout = start_rollout(
        &admin,
        json!({ "assignment": "slow", "config": "slow", "version": 2, "stages": [25, 100],
                "canaries": [uid.to_string()], "apply_timeout_seconds": 2, "bake_seconds": 0.2 }),
    )
    .await;
    let id = rollout["id"].as_str().unwrap().to_owned();
    canary
        .recv_until(DEADLINE, |m| {
            m.remote_config.as_ref().is_some_and(|c| c.config_hash == v2.as_bytes())
        })
        .await;
    // Too slow: the rollback's push of v1 arrives first.
    canary
        .recv_until(DEADLINE, |m| {
            m.remote_config.as_ref().is_some_and(|c| c.config_hash == v1.as_bytes())
        })
        .await;
    // Then its late report of v2 comes in: the answer is v1 again.
    let late = canary.status(v2.as_bytes(), RemoteConfigStatuses::Applied);
    let answer = canary.ask(&late).await;
    let offer = answer.remote_config.expect("sent back to v1");
    assert_eq!(offer.config_hash, v1.as_bytes());
    let (_, during) = admin
        .request(reqwest::Method::GET, &format!("/api/v1/rollouts/{id}"), None)
        .await
        .unwrap();
    let phase = |rollout: &Value| {
        rollout["agents"]
            .as_array()
            .unwrap()
            .iter()
            .find(|a| a["instance_uid"] == uid.to_string())
            .unwrap()["phase"]
            .clone()
    };
    assert_eq!(phase(&during), "REVERTING", "{during}");
    let back = canary.status(v1.as_bytes(), RemoteConfigStatuses::Applied);
    canary.send(&back).await;
    let done = rollout_in_state(&admin, &id, &["ROLLED_BACK"]).await;
    assert_eq!(phase(&done), "REVERTED");
}
