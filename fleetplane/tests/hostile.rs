//! Clients that try to hold the endpoint or poison other agents: half-sent
//! headers, silent and idle WebSockets, forged goodbyes, stolen uids, a
//! second connection with someone else's uid; and the opamp-go-style Stop
//! that must get a clean close. Each test says what the attacker gets and
//! shows that the victim is still served, its record intact and its configs
//! delivered.

mod common;

use std::time::Duration;

use common::{RawAgent, Server};
use fleetplane_proto::{
    ConfigHash, InstanceUid, Message,
    http::CONTENT_TYPE_PROTOBUF,
    opamp::{AgentDisconnect, AgentToServer, AgentToServerFlags, ServerErrorResponseType, ServerToAgent},
};
use fleetplane_testkit::{
    agent::{AgentOptions, SimAgent},
    fleet::Fleet,
    wait::eventually,
};
use futures_util::{SinkExt, StreamExt};
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_tungstenite::tungstenite::{Error as WsError, Message as WsMessage};

const DEADLINE: Duration = Duration::from_secs(30);
const BINARY: &str = env!("CARGO_BIN_EXE_fleetplane");

fn hash_of(version: &Value) -> ConfigHash {
    ConfigHash::parse(version["hash"].as_str().unwrap()).unwrap()
}

/// Whether the server closes a socket that trickles a request's headers one
/// byte at a time, before `DEADLINE`.
async fn trickling_headers_are_cut_off(addr: std::net::SocketAddr, path: &str) -> bool {
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    let request = format!("GET {path} HTTP/1.1\r\nHost: x\r\nX-Slow: ");
    stream.write_all(request.as_bytes()).await.unwrap();
    let deadline = tokio::time::Instant::now() + DEADLINE;
    let mut buf = [0u8; 256];
    loop {
        tokio::select! {
            // Closed (or answered, which a request never completed cannot
            // be but by a timeout): cut off either way.
            _ = stream.read(&mut buf) => return true,
            // One more header byte every 100 ms: never a complete request.
            _ = tokio::time::sleep(Duration::from_millis(100)) => {
                if stream.write_all(b"a").await.is_err() {
                    return true;
                }
            }
            _ = tokio::time::sleep_until(deadline) => return false,
        }
    }
}

#[tokio::test]
async fn half_sent_headers_are_dropped_on_both_listeners() {
    let server = Server::start_with(tempfile::tempdir().unwrap(), |c| {
        c.gateway.header_read_timeout_ms = 500;
    })
    .await;
    assert!(
        trickling_headers_are_cut_off(server.server.opamp_addr, "/v1/opamp").await,
        "the OpAMP listener holds a trickling client"
    );
    assert!(
        trickling_headers_are_cut_off(server.server.admin_addr, "/api/v1/agents").await,
        "the admin listener holds a trickling client"
    );
    // Complete requests are unaffected.
    assert!(server.admin.agents("").await.is_ok());
    server.stop().await;
}

#[tokio::test]
async fn silent_websockets_are_closed_and_a_full_cap_admits_a_real_agent_after() {
    let server = Server::start_with(tempfile::tempdir().unwrap(), |c| {
        c.gateway.max_connections = 3;
        c.gateway.first_message_timeout_secs = 1;
    })
    .await;
    let mut silent = Vec::new();
    for _ in 0..3 {
        let (socket, _) = tokio_tungstenite::connect_async(server.ws_url()).await.unwrap();
        silent.push(socket);
    }
    // The cap holds while they sit there.
    let refused = tokio_tungstenite::connect_async(server.ws_url()).await.unwrap_err();
    assert!(
        matches!(refused, WsError::Http(ref r) if r.status() == 503),
        "{refused:?}"
    );
    // Each is closed with 1008 once its first-message deadline passes.
    for mut socket in silent {
        let close = tokio::time::timeout(DEADLINE, async {
            while let Some(Ok(frame)) = socket.next().await {
                if let WsMessage::Close(frame) = frame {
                    return frame.map(|f| u16::from(f.code));
                }
            }
            None
        })
        .await
        .expect("a silent socket is closed");
        assert_eq!(close, Some(1008));
    }
    // Now a real agent gets in and is answered.
    let agent = eventually("a real agent admitted", DEADLINE, || async {
        Ok(SimAgent::connect_ws(&server.ws_url(), AgentOptions::default())
            .await
            .ok())
    })
    .await
    .unwrap();
    agent
        .wait_for("answered", |s| s.replies >= 1 && s.errors.is_empty())
        .await
        .unwrap();
    agent.disconnect().await.unwrap();
    server.stop().await;
}

#[tokio::test]
async fn an_idle_websocket_is_pinged_and_closed_but_one_that_answers_pings_stays() {
    let server = Server::start_with(tempfile::tempdir().unwrap(), |c| {
        c.agents.heartbeat_interval_secs = 1;
        c.gateway.idle_timeout_secs = 2;
    })
    .await;
    // A client that keeps reading answers the server's pings (the WebSocket
    // layer does) and stays connected well past the idle timeout.
    let mut lively = RawAgent::connect(&server.ws_url(), InstanceUid::new_v7()).await;
    let hello = lively.hello("idle");
    lively.ask(&hello).await;
    let mut pinged = false;
    let watched_until = tokio::time::Instant::now() + Duration::from_secs(5);
    while let Ok(frame) = tokio::time::timeout_at(watched_until, lively.socket().next()).await {
        match frame {
            Some(Ok(WsMessage::Ping(_))) => pinged = true,
            Some(Ok(WsMessage::Close(frame))) => panic!("a client answering pings was closed: {frame:?}"),
            None | Some(Err(_)) => panic!("a client answering pings was dropped"),
            Some(Ok(_)) => {}
        }
    }
    assert!(pinged, "silence is met with a ping first");
    // A client that reads nothing answers nothing: its silence is the test's
    // subject, so the wait here is the scenario itself.
    let mut mute = RawAgent::connect(&server.ws_url(), InstanceUid::new_v7()).await;
    let hello = mute.hello("idle");
    mute.ask(&hello).await;
    tokio::time::sleep(Duration::from_secs(4)).await;
    let close = tokio::time::timeout(DEADLINE, async {
        while let Some(Ok(frame)) = mute.socket().next().await {
            if let WsMessage::Close(frame) = frame {
                return frame.map(|f| u16::from(f.code));
            }
        }
        None
    })
    .await
    .expect("the mute client is closed");
    assert_eq!(close, Some(1001));
    server.stop().await;
}

#[tokio::test]
async fn an_opamp_go_style_stop_gets_a_clean_close() {
    let server = Server::start().await;
    let mut agent = RawAgent::connect(&server.ws_url(), InstanceUid::new_v7()).await;
    let hello = agent.hello("stopper");
    agent.ask(&hello).await;
    // opamp-go's Stop: agent_disconnect, then a close frame.
    agent.seq += 1;
    let bye = AgentToServer {
        instance_uid: agent.uid.to_vec(),
        sequence_num: agent.seq,
        agent_disconnect: Some(AgentDisconnect {}),
        ..Default::default()
    };
    agent.ask(&bye).await;
    agent.socket().send(WsMessage::Close(None)).await.unwrap();
    let answered = tokio::time::timeout(DEADLINE, async {
        loop {
            match agent.socket().next().await {
                Some(Ok(WsMessage::Close(_))) => return Ok(()),
                Some(Ok(_)) => continue,
                Some(Err(e)) => return Err(format!("{e}")),
                None => return Err("socket ended without a close frame".into()),
            }
        }
    })
    .await
    .expect("an answer to the close frame");
    assert_eq!(
        answered,
        Ok(()),
        "the server answers the closing handshake (no 1006 for the agent)"
    );
    server.stop().await;
}

/// A victim agent on `url`, running v1 of config `name` assigned to it.
async fn victim_with_config(server: &Server, name: &str) -> (SimAgent, fleetplane_testkit::admin::Admin) {
    let admin = server.admin.clone();
    let victim = SimAgent::connect_ws(&server.ws_url(), AgentOptions::default().attr("service.name", name))
        .await
        .unwrap();
    let v1 = admin.create_config(name, "c.yaml", "v: 1", "text/yaml").await.unwrap();
    admin.assign(name, &format!("service.name={name}"), name).await.unwrap();
    victim.wait_for_config(&hash_of(&v1)).await.unwrap();
    (victim, admin)
}

/// The victim is still connected, on its own connection, and gets v2.
async fn victim_still_served(victim: &SimAgent, admin: &fleetplane_testkit::admin::Admin, name: &str) {
    let record = admin
        .agent(victim.uid())
        .await
        .unwrap()
        .expect("the victim's record is intact");
    assert_eq!(record["connected"], true, "{record}");
    assert_eq!(record["identifying_attributes"]["service.name"], name, "{record}");
    let v2 = admin.create_config(name, "c.yaml", "v: 2", "text/yaml").await.unwrap();
    victim.wait_for_config(&hash_of(&v2)).await.unwrap();
    assert!(victim.seen().errors.is_empty(), "{:?}", victim.seen().errors);
}

#[tokio::test]
async fn a_request_for_a_new_uid_cannot_delete_a_live_agent() {
    let server = Server::start().await;
    let (victim, admin) = victim_with_config(&server, "victim-a").await;
    let mut attacker = RawAgent::connect(&server.ws_url(), victim.uid()).await;
    let mut forged = attacker.hello("attacker");
    forged.flags = AgentToServerFlags::RequestInstanceUid as u64;
    let reply = attacker.ask(&forged).await;
    // The attacker gets a uid of its own, nothing of the victim's.
    let new_uid = reply.agent_identification.expect("a fresh uid").new_instance_uid;
    assert_ne!(new_uid, victim.uid().to_vec());
    victim_still_served(&victim, &admin, "victim-a").await;
    server.stop().await;
}

#[tokio::test]
async fn a_forged_http_goodbye_cannot_disconnect_or_silence_a_websocket_agent() {
    let server = Server::start().await;
    let (victim, admin) = victim_with_config(&server, "victim-b").await;
    let forged = AgentToServer {
        instance_uid: victim.uid().to_vec(),
        sequence_num: 1 << 62,
        agent_disconnect: Some(AgentDisconnect {}),
        ..Default::default()
    };
    let response = reqwest::Client::new()
        .post(server.http_url())
        .header("content-type", CONTENT_TYPE_PROTOBUF)
        .body(forged.encode_to_vec())
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let reply = ServerToAgent::decode(response.bytes().await.unwrap()).unwrap();
    let error = reply.error_response.expect("refused");
    assert_eq!(error.r#type, ServerErrorResponseType::Unavailable as i32);
    assert!(
        error.error_message.contains("in use by another live connection"),
        "{error:?}"
    );
    // The victim's own status is still saved...
    victim.set_health(false, "disk full").await.unwrap();
    eventually("the victim's status saved", DEADLINE, || async {
        let record = admin.agent(victim.uid()).await?.unwrap_or_default();
        Ok((record["health"]["healthy"] == false).then_some(()))
    })
    .await
    .unwrap();
    // ...and it is still served.
    victim_still_served(&victim, &admin, "victim-b").await;
    server.stop().await;
}

#[tokio::test]
async fn a_second_live_websocket_with_the_same_uid_is_refused() {
    let server = Server::start().await;
    let (victim, admin) = victim_with_config(&server, "victim-c").await;
    let mut twin = RawAgent::connect(&server.ws_url(), victim.uid()).await;
    let hello = twin.hello("twin");
    let reply = twin.ask(&hello).await;
    let error = reply.error_response.expect("the newcomer is refused");
    assert_eq!(error.r#type, ServerErrorResponseType::Unavailable as i32);
    // The twin never got a config and the victim's record kept its description.
    assert!(reply.remote_config.is_none());
    victim_still_served(&victim, &admin, "victim-c").await;
    assert!(
        twin.recv(Duration::from_millis(500)).await.is_none(),
        "the victim's pushes never reach the twin"
    );
    server.stop().await;
}

#[tokio::test]
async fn a_second_live_websocket_on_another_gateway_is_refused() {
    let fleet = Fleet::builder(BINARY)
        .gateways(2)
        .coordinators(1)
        .start()
        .await
        .unwrap();
    let admin = fleet.admin(0);
    let urls = fleet.ws_urls();
    let victim = SimAgent::connect_ws(&urls[0], AgentOptions::default().attr("service.name", "victim-d"))
        .await
        .unwrap();
    let v1 = admin
        .create_config("victim-d", "c.yaml", "v: 1", "text/yaml")
        .await
        .unwrap();
    admin
        .assign("victim-d", "service.name=victim-d", "victim-d")
        .await
        .unwrap();
    victim.wait_for_config(&hash_of(&v1)).await.unwrap();
    let mut twin = RawAgent::connect(&urls[1], victim.uid()).await;
    let hello = twin.hello("twin");
    let reply = twin.ask(&hello).await;
    assert!(
        reply.error_response.is_some(),
        "the newcomer on the other gateway is refused"
    );
    let record = admin.agent(victim.uid()).await.unwrap().unwrap();
    assert_eq!(record["gateway_id"], "gw-0", "{record}");
    let v2 = admin
        .create_config("victim-d", "c.yaml", "v: 2", "text/yaml")
        .await
        .unwrap();
    victim.wait_for_config(&hash_of(&v2)).await.unwrap();
}

#[tokio::test]
async fn during_a_drain_agents_are_served_until_their_turn() {
    let server = Server::start_with(tempfile::tempdir().unwrap(), |c| {
        c.gateway.drain_ms = 2000;
    })
    .await;
    let mut agents = Vec::new();
    for _ in 0..8 {
        let mut agent = RawAgent::connect(&server.ws_url(), InstanceUid::new_v7()).await;
        let hello = agent.hello("drain");
        agent.ask(&hello).await;
        agents.push(agent);
    }
    let stopping = tokio::spawn(server.stop());
    let talkers: Vec<_> = agents
        .into_iter()
        .map(|mut agent| {
            tokio::spawn(async move {
                let (mut served, mut refused) = (0, Vec::new());
                loop {
                    let status = agent.status(&[1; 32], fleetplane_proto::opamp::RemoteConfigStatuses::Applied);
                    agent.send(&status).await;
                    let Some(reply) = agent.recv(DEADLINE).await else {
                        return (served, refused);
                    };
                    match reply.error_response {
                        None => served += 1,
                        Some(e) if e.error_message.contains("draining") => return (served, refused),
                        Some(e) => refused.push(e.error_message),
                    }
                    // The agent's pace (within the per-agent message rate),
                    // not a synchronisation.
                    tokio::time::sleep(Duration::from_millis(150)).await;
                }
            })
        })
        .collect();
    let mut total = 0;
    for talker in talkers {
        let (served, refused) = talker.await.unwrap();
        assert!(refused.is_empty(), "answered normally until the goodbye: {refused:?}");
        total += served;
    }
    assert!(
        total >= 8,
        "agents kept being served during the drain ({total} answers)"
    );
    stopping.await.unwrap();
}

/// A peer that never reads: it floods text frames, so every answer the
/// server writes piles up until its socket buffers are full and its sends
/// block.
async fn never_reading_peer(url: &str) -> tokio::task::JoinHandle<()> {
    let (mut socket, _) = tokio_tungstenite::connect_async(url).await.unwrap();
    tokio::spawn(async move {
        loop {
            if socket.send(WsMessage::Text("x".into())).await.is_err() {
                return;
            }
        }
    })
}

#[tokio::test]
async fn sigterm_ends_an_all_in_one_within_its_bounds_with_a_peer_that_never_reads() {
    let data = tempfile::tempdir().unwrap();
    let env = vec![
        ("FLEETPLANE_OPAMP_LISTEN".to_owned(), "127.0.0.1:0".to_owned()),
        ("FLEETPLANE_ADMIN_LISTEN".to_owned(), "127.0.0.1:0".to_owned()),
        ("FLEETPLANE_DATA_DIR".to_owned(), data.path().display().to_string()),
        ("FLEETPLANE_GATEWAY_DRAIN_MS".to_owned(), "1000".to_owned()),
        ("FLEETPLANE_GATEWAY_SHUTDOWN_GRACE_MS".to_owned(), "1000".to_owned()),
        // Longer than the whole test: only the shutdown bound can end it.
        ("FLEETPLANE_GATEWAY_SEND_TIMEOUT_SECS".to_owned(), "600".to_owned()),
        ("FLEETPLANE_AGENTS_AUTH".to_owned(), "none".to_owned()),
    ];
    let mut node = fleetplane_testkit::fleet::NodeProcess::spawn(&std::path::PathBuf::from(BINARY), "all-in-one", env)
        .await
        .unwrap();
    let opamp = node.opamp.unwrap();
    let url = format!("ws://{opamp}/v1/opamp");
    let agent = SimAgent::connect_ws(&url, AgentOptions::default()).await.unwrap();
    agent.wait_for("answered", |s| s.replies >= 1).await.unwrap();
    let flood = never_reading_peer(&url).await;
    node.signal_term().unwrap();
    // Drain 1 s, then at most a few grace periods of 1 s each.
    let status = node.wait_exit(Duration::from_secs(20)).await.unwrap();
    assert!(status.success(), "{status}");
    flood.abort();
}

#[tokio::test]
async fn sigterm_ends_a_gateway_whose_nats_is_gone_mid_drain() {
    let mut fleet = Fleet::builder(BINARY)
        .gateways(1)
        .coordinators(1)
        .env("FLEETPLANE_GATEWAY_DRAIN_MS", "2000")
        .env("FLEETPLANE_GATEWAY_SHUTDOWN_GRACE_MS", "1000")
        .start()
        .await
        .unwrap();
    let urls = fleet.ws_urls();
    let mut agents = Vec::new();
    for _ in 0..5 {
        let agent = SimAgent::connect_ws(&urls[0], AgentOptions::default()).await.unwrap();
        agent.wait_for("answered", |s| s.replies >= 1).await.unwrap();
        agents.push(agent);
    }
    let flood = never_reading_peer(&urls[0]).await;
    fleet.coordinators[0].kill().await;
    fleet.gateways[0].signal_term().unwrap();
    fleet.nats.kill();
    let status = fleet.gateways[0].wait_exit(Duration::from_secs(30)).await.unwrap();
    assert!(status.success(), "{status}");
    flood.abort();
}
