//! The scaled form: gateways and coordinators as separate processes of the
//! real binary, over a real nats-server and redis-server of the test's own.

use fleetplane_proto::{ConfigHash, InstanceUid};
use fleetplane_testkit::{
    admin::Admin,
    agent::{AgentOptions, SimAgent},
    fleet::Fleet,
    wait::{DEFAULT_DEADLINE, eventually},
};
use serde_json::Value;

const BINARY: &str = env!("CARGO_BIN_EXE_fleetplane");

fn hash_of(version: &Value) -> ConfigHash {
    ConfigHash::parse(version["hash"].as_str().unwrap()).unwrap()
}

async fn agent_where(admin: &Admin, uid: InstanceUid, what: &str, check: impl Fn(&Value) -> bool) -> Value {
    admin.wait_for_agent(uid, what, check).await.unwrap()
}

async fn fleet(gateways: usize, coordinators: usize) -> Fleet {
    Fleet::builder(BINARY)
        .gateways(gateways)
        .coordinators(coordinators)
        .start()
        .await
        .unwrap()
}

#[tokio::test]
async fn an_agent_moving_between_gateways_keeps_its_config_and_status() {
    let fleet = fleet(2, 2).await;
    let admin = fleet.admin(0);
    let urls = fleet.ws_urls();
    let agent = SimAgent::connect_ws_any(&urls, AgentOptions::default().attr("service.name", "mover"))
        .await
        .unwrap();
    let version = admin
        .create_config("mover", "c.yaml", "v: 1", "text/yaml")
        .await
        .unwrap();
    admin.assign("mover", "service.name=mover", "mover").await.unwrap();
    agent.wait_for_config(&hash_of(&version)).await.unwrap();
    agent_where(&admin, agent.uid(), "APPLIED via gw-0", |a| {
        a["remote_config"]["status"] == "APPLIED" && a["gateway_id"] == "gw-0"
    })
    .await;

    agent.reconnect().await.unwrap();
    let seen = agent
        .wait_for("moved to gw-1", |s| s.connections == 2 && s.connected)
        .await
        .unwrap();
    assert_eq!(seen.url, urls[1]);
    agent.heartbeat().await.unwrap();
    // The other coordinator answers for the agent on the other gateway, from
    // the shared state: no full-state request, no config sent again.
    let detail = agent_where(&fleet.admin(1), agent.uid(), "listed on gw-1", |a| {
        a["gateway_id"] == "gw-1"
    })
    .await;
    assert_eq!(detail["remote_config"]["status"], "APPLIED");
    assert_eq!(detail["remote_config"]["hash"], hash_of(&version).to_string());
    assert_eq!(detail["identifying_attributes"]["service.name"], "mover");
    let seen = agent.wait_for("heartbeat answered", |s| s.replies >= 3).await.unwrap();
    assert_eq!(seen.full_state_requests, 0);
    assert_eq!(seen.configs, vec![hash_of(&version)]);
    agent.disconnect().await.unwrap();
}

#[tokio::test]
async fn a_config_change_reaches_agents_on_both_gateways() {
    let fleet = fleet(2, 2).await;
    let urls = fleet.ws_urls();
    let mut agents = Vec::new();
    for i in 0..6 {
        let url = &urls[i % 2];
        agents.push(
            SimAgent::connect_ws(url, AgentOptions::default().attr("service.name", "edge"))
                .await
                .unwrap(),
        );
    }
    let http = SimAgent::connect_http(
        &fleet.http_urls()[1],
        AgentOptions::default().attr("service.name", "edge"),
    )
    .await
    .unwrap();
    agents.push(http);
    let admin = fleet.admin(1);
    let v1 = admin
        .create_config("edge", "c.yaml", "v: 1", "text/yaml")
        .await
        .unwrap();
    admin.assign("edge", "service.name=edge", "edge").await.unwrap();
    for agent in &agents {
        agent.wait_for_config(&hash_of(&v1)).await.unwrap();
    }
    let v2 = fleet
        .admin(0)
        .create_config("edge", "c.yaml", "v: 2", "text/yaml")
        .await
        .unwrap();
    assert_eq!(v2["version"], 2);
    for agent in &agents {
        agent.wait_for_config(&hash_of(&v2)).await.unwrap();
    }
    let statuses = eventually("all APPLIED v2", DEFAULT_DEADLINE, || async {
        let groups = admin.config_status().await?;
        Ok(groups
            .into_iter()
            .find(|g| g["hash"] == hash_of(&v2).to_string() && g["statuses"]["APPLIED"] == 7))
    })
    .await
    .unwrap();
    assert_eq!(statuses["version"], 2);
    for agent in agents {
        agent.disconnect().await.unwrap();
    }
}

#[tokio::test]
async fn a_killed_gateways_agents_move_to_the_other_with_their_state() {
    let mut fleet = fleet(2, 2).await;
    let admin = fleet.admin(0);
    let urls = fleet.ws_urls();
    let version = admin
        .create_config("base", "c.yaml", "v: 1", "text/yaml")
        .await
        .unwrap();
    admin.assign("all", "", "base").await.unwrap();
    let mut movers = Vec::new();
    for _ in 0..4 {
        let agent = SimAgent::connect_ws_any(&urls, AgentOptions::default().attr("service.name", "m"))
            .await
            .unwrap();
        agent.wait_for_config(&hash_of(&version)).await.unwrap();
        movers.push(agent);
    }
    // One agent that will not come back (no reconnect).
    let stranded = SimAgent::connect_ws(&urls[0], AgentOptions::default()).await.unwrap();
    let stranded_uid = stranded.uid();
    stranded.wait_for_config(&hash_of(&version)).await.unwrap();
    for agent in &movers {
        agent_where(&admin, agent.uid(), "APPLIED on gw-0", |a| {
            a["remote_config"]["status"] == "APPLIED" && a["gateway_id"] == "gw-0"
        })
        .await;
    }

    fleet.gateways[0].kill().await;

    for agent in &movers {
        // An agent back within a couple of seconds may be told to retry once
        // or twice: until the coordinators stop hearing the killed gateway,
        // its connection still holds the agent's uid (spec 4.B.11).
        agent
            .wait_for("reconnected", |s| s.connections >= 2 && s.connected && s.url == urls[1])
            .await
            .unwrap();
        agent.heartbeat().await.unwrap();
        let detail = agent_where(&admin, agent.uid(), "connected on gw-1", |a| {
            a["gateway_id"] == "gw-1" && a["connected"] == true
        })
        .await;
        assert_eq!(detail["remote_config"]["status"], "APPLIED");
        assert_eq!(detail["remote_config"]["hash"], hash_of(&version).to_string());
        let seen = agent.seen();
        assert_eq!(seen.configs.len(), 1, "state intact: nothing re-sent");
    }
    // The agent that stayed away counts as disconnected once the coordinators
    // notice the gateway is gone.
    agent_where(&admin, stranded_uid, "stranded agent disconnected", |a| {
        a["connected"] == false
    })
    .await;
    for agent in movers {
        agent.disconnect().await.unwrap();
    }
}

#[tokio::test]
async fn killing_a_coordinator_loses_no_update() {
    let mut fleet = fleet(2, 2).await;
    let urls = fleet.ws_urls();
    let mut agents = Vec::new();
    for i in 0..6 {
        agents.push(
            SimAgent::connect_ws_any(
                &[urls[i % 2].clone(), urls[(i + 1) % 2].clone()],
                AgentOptions::default().attr("service.name", "busy"),
            )
            .await
            .unwrap(),
        );
    }
    for agent in &agents {
        agent.wait_for("first reply", |s| s.replies >= 1).await.unwrap();
    }
    // Health changes in flight while one coordinator dies.
    for round in 0..5 {
        for agent in &agents {
            agent
                .set_health(round % 2 == 0, &format!("round {round}"))
                .await
                .unwrap();
        }
        if round == 2 {
            fleet.coordinators[0].kill().await;
        }
    }
    let admin = fleet.admin(1);
    for agent in &agents {
        let detail = agent_where(&admin, agent.uid(), "last health recorded", |a| {
            a["health"]["last_error"] == "round 4"
        })
        .await;
        assert_eq!(detail["healthy"], true);
    }
    // And the survivor serves configs to everyone.
    let version = admin.create_config("after", "c", "x", "text/plain").await.unwrap();
    admin.assign("busy", "service.name=busy", "after").await.unwrap();
    for agent in &agents {
        agent.wait_for_config(&hash_of(&version)).await.unwrap();
    }
    for agent in agents {
        agent.disconnect().await.unwrap();
    }
}

#[tokio::test]
async fn a_redis_restart_heals() {
    let mut fleet = fleet(1, 2).await;
    let admin = fleet.admin(0);
    let agent = SimAgent::connect_ws_any(&fleet.ws_urls(), AgentOptions::default().attr("service.name", "r"))
        .await
        .unwrap();
    agent_where(&admin, agent.uid(), "listed", |_| true).await;

    fleet.redis.server().expect("one Redis server").kill();
    let (status, _) = admin
        .request(reqwest::Method::GET, "/api/v1/agents", None)
        .await
        .unwrap();
    assert_eq!(status, 503, "the admin API says the store is unavailable");
    let (status, _) = admin.request(reqwest::Method::GET, "/readyz", None).await.unwrap();
    assert_eq!(status, 503);
    agent.set_health(false, "during outage").await.unwrap();
    agent
        .wait_for("told to retry", |s| s.errors.iter().any(|e| e.r#type == 2))
        .await
        .unwrap();

    fleet.redis.server().expect("one Redis server").restart().unwrap();
    // The refused report is re-sent in full after the retry hint.
    let detail = agent_where(&admin, agent.uid(), "outage-time health recorded", |a| {
        a["health"]["last_error"] == "during outage"
    })
    .await;
    assert_eq!(detail["connected"], true);
    let version = admin.create_config("healed", "c", "x", "text/plain").await.unwrap();
    admin.assign("r", "service.name=r", "healed").await.unwrap();
    agent.wait_for_config(&hash_of(&version)).await.unwrap();
    agent.disconnect().await.unwrap();
}

async fn ready(addr: std::net::SocketAddr) -> bool {
    let url = format!("http://{addr}/readyz");
    matches!(reqwest::get(url).await, Ok(r) if r.status() == 200)
}

#[tokio::test]
async fn a_nats_outage_keeps_agents_connected_and_heals() {
    let mut fleet = fleet(1, 1).await;
    let admin = fleet.admin(0);
    let agent = SimAgent::connect_ws(&fleet.ws_urls()[0], AgentOptions::default().attr("service.name", "n"))
        .await
        .unwrap();
    agent_where(&admin, agent.uid(), "listed", |_| true).await;
    let gateway_health = fleet.gateways[0].health.unwrap();
    let coordinator = fleet.coordinators[0].addr;

    fleet.nats.kill();
    eventually("gateway not ready without its bus", DEFAULT_DEADLINE, || async {
        Ok((!ready(gateway_health).await).then_some(()))
    })
    .await
    .unwrap();
    // The gateway keeps the agent's connection through the outage.
    assert!(agent.seen().connected);

    fleet.nats.restart().unwrap();
    for (addr, what) in [(gateway_health, "gateway"), (coordinator, "coordinator")] {
        eventually(&format!("{what} ready again"), DEFAULT_DEADLINE, || async {
            Ok(ready(addr).await.then_some(()))
        })
        .await
        .unwrap();
    }
    // Messages may have been lost in the gap: the agent is asked for its full
    // state on its next message, on the same connection.
    let before = agent.seen().replies;
    agent.heartbeat().await.unwrap();
    let seen = agent
        .wait_for("reply after the outage", |s| s.replies > before)
        .await
        .unwrap();
    assert_eq!(seen.full_state_requests, 1, "{seen:?}");
    assert_eq!(seen.connections, 1, "the gateway kept the connection");
    // Pushes flow again through the restored subscriptions.
    let version = admin.create_config("after-nats", "c", "x", "text/plain").await.unwrap();
    admin.assign("n", "service.name=n", "after-nats").await.unwrap();
    agent.wait_for_config(&hash_of(&version)).await.unwrap();
    agent.disconnect().await.unwrap();
}

#[tokio::test]
async fn heartbeats_that_change_nothing_are_answered_by_the_gateway_and_batched() {
    let fleet = fleet(1, 1).await;
    let admin = fleet.admin(0);
    let agent = SimAgent::connect_ws(&fleet.ws_urls()[0], AgentOptions::default().attr("service.name", "hb"))
        .await
        .unwrap();
    agent.wait_for("first reply", |s| s.replies >= 1).await.unwrap();
    for n in 0..20 {
        agent.heartbeat().await.unwrap();
        agent.wait_for("heartbeat reply", |s| s.replies >= 2 + n).await.unwrap();
    }
    // The gateway answered them itself...
    let scrape = fleetplane_testkit::fleet::scrape(fleet.gateways[0].health.unwrap())
        .await
        .unwrap();
    let local: f64 = scrape
        .lines()
        .find(|l| l.starts_with("fleetplane_gateway_messages_out_total{") && l.contains("type=\"local_reply\""))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0);
    assert_eq!(local, 20.0, "every heartbeat answered at the gateway:\n{scrape}");
    // ...and the coordinator still learns of them, in batches.
    let last_seq = 21;
    agent_where(&admin, agent.uid(), "liveness recorded", |a| {
        a["sequence_num"] == last_seq
    })
    .await;
    let coordinator_scrape = fleetplane_testkit::fleet::scrape(fleet.coordinators[0].addr)
        .await
        .unwrap();
    let reports: f64 = coordinator_scrape
        .lines()
        .filter(|l| l.starts_with("fleetplane_coordinator_reports_total{"))
        .filter_map(|l| l.rsplit(' ').next().and_then(|v| v.parse::<f64>().ok()))
        .sum();
    assert!(
        reports < 5.0,
        "heartbeats did not each cost a coordinator report: {reports}"
    );

    // A change of desired state still reaches the agent, and the next real
    // report continues the sequence without a false gap.
    let version = admin.create_config("hb", "c", "x", "text/plain").await.unwrap();
    admin.assign("hb", "service.name=hb", "hb").await.unwrap();
    agent.wait_for_config(&hash_of(&version)).await.unwrap();
    agent_where(&admin, agent.uid(), "APPLIED", |a| {
        a["remote_config"]["status"] == "APPLIED"
    })
    .await;
    assert_eq!(agent.seen().full_state_requests, 0);
    agent.disconnect().await.unwrap();
}

fn signal(pid: u32, which: &str) {
    let status = std::process::Command::new("kill")
        .args([which, &pid.to_string()])
        .status()
        .unwrap();
    assert!(status.success(), "kill {which} {pid}");
}

/// A frozen coordinator (SIGSTOP: connected, answering nothing) leaves
/// reports pending at the gateway. At `max_pending_reports` the gateway
/// refuses new WebSockets and plain-HTTP reports with 503 and a retry hint
/// instead of piling more onto the bus, and admits again once answers (here:
/// timeouts) free the slots.
#[tokio::test]
async fn a_gateway_sheds_instead_of_queueing_while_coordinators_are_behind() {
    use fleetplane_proto::{Message, framing, http::CONTENT_TYPE_PROTOBUF, opamp::AgentToServer};
    use futures_util::SinkExt;
    use tokio_tungstenite::tungstenite::{Error as WsError, Message as WsMessage};

    let fleet = Fleet::builder(BINARY)
        .gateways(1)
        .coordinators(1)
        .env("FLEETPLANE_MAX_PENDING_REPORTS", "1")
        .start()
        .await
        .unwrap();
    let ws_url = fleet.ws_urls()[0].clone();
    let http_url = fleet.http_urls()[0].clone();
    let coordinator = fleet.coordinators[0].pid().unwrap();
    let hello = |uid: InstanceUid| AgentToServer {
        instance_uid: uid.to_vec(),
        sequence_num: 1,
        agent_description: Some(Default::default()),
        ..Default::default()
    };
    signal(coordinator, "-STOP");
    // This agent's hello goes to the frozen coordinator and stays pending.
    let (mut waiting, _) = tokio_tungstenite::connect_async(&ws_url).await.unwrap();
    waiting
        .send(WsMessage::Binary(
            framing::encode_ws(&hello(InstanceUid::new_v7())).into(),
        ))
        .await
        .unwrap();
    let refused = eventually("a new connection refused", DEFAULT_DEADLINE, || async {
        Ok(match tokio_tungstenite::connect_async(&ws_url).await {
            Err(WsError::Http(response)) => Some(response),
            _ => None,
        })
    })
    .await;
    let post = || async {
        reqwest::Client::new()
            .post(&http_url)
            .header("content-type", CONTENT_TYPE_PROTOBUF)
            .body(hello(InstanceUid::new_v7()).encode_to_vec())
            .send()
            .await
            .unwrap()
    };
    let http_refused = post().await;
    signal(coordinator, "-CONT");
    let refused = refused.unwrap();
    assert_eq!(refused.status(), 503);
    let retry_after: u64 = refused.headers()["retry-after"].to_str().unwrap().parse().unwrap();
    assert!(retry_after >= 1, "a retry hint: {retry_after}");
    let why = String::from_utf8_lossy(refused.body().as_deref().unwrap_or_default()).into_owned();
    assert!(why.contains("control_plane_busy"), "refused for pending reports: {why}");
    assert_eq!(http_refused.status(), 503, "plain HTTP is refused too");
    assert!(http_refused.headers().contains_key("retry-after"));
    let why = http_refused.text().await.unwrap();
    assert!(why.contains("control_plane_busy"), "refused, not timed out: {why}");

    // Thawed, the coordinator answers the pending report, the slot frees and
    // both transports are admitted again.
    let agent = eventually("a new connection admitted", DEFAULT_DEADLINE, || async {
        Ok(SimAgent::connect_ws(&ws_url, AgentOptions::default()).await.ok())
    })
    .await
    .unwrap();
    // The agent's own hello may still be pending (the limit here is one).
    eventually("a poll answered", DEFAULT_DEADLINE, || async {
        Ok((post().await.status() == 200).then_some(()))
    })
    .await
    .unwrap();
    drop(agent);
}

/// `n` agents of `service`, spread over the gateways (each listing them all,
/// starting from a different one).
async fn spread_agents(urls: &[String], n: usize, service: &str) -> Vec<SimAgent> {
    let mut agents = Vec::new();
    for i in 0..n {
        let mut order = urls.to_vec();
        order.rotate_left(i % urls.len());
        let agent = SimAgent::connect_ws_any(&order, AgentOptions::default().attr("service.name", service))
            .await
            .unwrap();
        agents.push(agent);
    }
    agents
}

/// Every agent has received `version` and its APPLIED status is recorded.
async fn all_applied(admin: &Admin, agents: &[SimAgent], version: &Value) {
    let expected = hex::encode(hash_of(version).as_bytes());
    for agent in agents {
        agent.wait_for_config(&hash_of(version)).await.unwrap();
        agent_where(admin, agent.uid(), "APPLIED recorded", |a| {
            a["remote_config"]["hash"] == expected.as_str() && a["remote_config"]["status"] == "APPLIED"
        })
        .await;
    }
}

/// A NATS cluster of three routed servers, one of them SIGKILLed while the
/// agents' APPLIED reports are on their way: every gateway and coordinator
/// holds all three URLs and moves to a live node. A report caught in flight
/// is answered Unavailable after the bus timeout and its agent reconnects,
/// as the spec asks; no agent state is lost (it is in Redis): a new config
/// reaches every agent and its APPLIED is recorded, every record is kept,
/// and a new agent gets in.
#[tokio::test]
async fn a_nats_cluster_loses_a_node_and_no_agent_state_is_lost() {
    let mut fleet = Fleet::builder(BINARY)
        .gateways(2)
        .coordinators(2)
        .nats_nodes(3)
        .start()
        .await
        .unwrap();
    let admin = fleet.admin(1);
    let urls = fleet.ws_urls();
    let agents = spread_agents(&urls, 6, "cluster").await;
    let v1 = admin.create_config("clustered", "c", "v1", "text/plain").await.unwrap();
    admin.assign("cl", "service.name=cluster", "clustered").await.unwrap();
    for agent in &agents {
        agent.wait_for_config(&hash_of(&v1)).await.unwrap();
    }

    fleet.nats.kill();
    for peer in &fleet.nats_peers {
        peer.wait_routes(1).await.unwrap();
    }
    let nodes: Vec<std::net::SocketAddr> = fleet
        .gateways
        .iter()
        .map(|g| g.health.unwrap())
        .chain(fleet.coordinators.iter().map(|c| c.addr))
        .collect();
    for addr in nodes {
        eventually("every node on a live NATS node", DEFAULT_DEADLINE, || async {
            Ok(ready(addr).await.then_some(()))
        })
        .await
        .unwrap();
    }

    let v2 = admin.create_config("clustered", "c", "v2", "text/plain").await.unwrap();
    all_applied(&fleet.admin(0), &agents, &v2).await;
    let listed = admin.agents("selector=service.name%3Dcluster").await.unwrap();
    assert_eq!(listed.len(), agents.len(), "every record kept");
    assert!(listed.iter().all(|a| a["connected"] == true), "{listed:?}");
    let late = SimAgent::connect_ws(&urls[1], AgentOptions::default().attr("service.name", "cluster"))
        .await
        .unwrap();
    late.wait_for_config(&hash_of(&v2)).await.unwrap();
}

/// The store on a three-primary Redis Cluster (each primary with a
/// replica) and the bus on a three-node NATS cluster: agents' records spread
/// over the primaries, and when the primary holding the tenant's own keys
/// (configs, assignments, rollouts) is SIGKILLed and its replica promoted,
/// nothing acknowledged is lost and config changes go on reaching every
/// agent.
#[tokio::test]
async fn a_redis_cluster_loses_a_primary_and_no_agent_state_is_lost() {
    let mut fleet = Fleet::builder(BINARY)
        .gateways(2)
        .coordinators(2)
        .nats_nodes(3)
        .redis_cluster(3)
        .start()
        .await
        .unwrap();
    let admin = fleet.admin(0);
    let urls = fleet.ws_urls();
    let agents = spread_agents(&urls, 8, "sharded").await;
    let v1 = admin.create_config("sharded", "c", "v1", "text/plain").await.unwrap();
    admin.assign("sh", "service.name=sharded", "sharded").await.unwrap();
    all_applied(&admin, &agents, &v1).await;
    let cluster = fleet.redis.cluster().expect("a Redis Cluster");
    let holding: Vec<(u16, u64)> = cluster.keys_per_primary().unwrap();
    assert!(
        holding.iter().filter(|(_, keys)| *keys > 0).count() >= 2,
        "one tenant's keys spread over the primaries: {holding:?}"
    );

    // The primary of the tenant's own slot: configs, assignments, rollouts.
    let primary = cluster.primary_of("{fp:v2:t:default}").unwrap();
    cluster.wait_replicated(primary).unwrap();
    cluster.kill_primary(primary).unwrap();

    // Admin writes land on the promoted replica and reach every agent.
    let v2 = eventually("config written after the failover", DEFAULT_DEADLINE, || async {
        Ok(admin.create_config("sharded", "c", "v2", "text/plain").await.ok())
    })
    .await
    .unwrap();
    assert_eq!(v2["version"], 2, "version 1 survived the failover: {v2}");
    all_applied(&fleet.admin(1), &agents, &v2).await;
    let listed = admin.agents("selector=service.name%3Dsharded").await.unwrap();
    assert_eq!(listed.len(), agents.len(), "every record kept: {listed:?}");
    assert!(listed.iter().all(|a| a["connected"] == true), "{listed:?}");
    let late = SimAgent::connect_ws(&urls[1], AgentOptions::default().attr("service.name", "sharded"))
        .await
        .unwrap();
    late.wait_for_config(&hash_of(&v2)).await.unwrap();
}
