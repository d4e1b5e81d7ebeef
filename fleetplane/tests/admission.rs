//! Admission control and graceful drain: the gateway sheds load with jittered
//! retry hints instead of queueing, and a draining gateway closes its agents
//! in spread-out waves.
// Load tools and tests measure wall-clock time on purpose.
#![allow(clippy::disallowed_types)]

mod common;

use std::time::{Duration, Instant};

use common::Server;
use fleetplane_proto::{
    InstanceUid, Message, framing,
    http::CONTENT_TYPE_PROTOBUF,
    opamp::{AgentToServer, ServerErrorResponseType, ServerToAgent, server_error_response::Details},
};
use fleetplane_testkit::agent::{AgentOptions, SimAgent};
use futures_util::{SinkExt, StreamExt};
use tokio_tungstenite::tungstenite::{Error as WsError, Message as WsMessage};

fn hello(uid: InstanceUid, seq: u64) -> AgentToServer {
    AgentToServer {
        instance_uid: uid.to_vec(),
        sequence_num: seq,
        capabilities: 1,
        agent_description: Some(Default::default()),
        ..Default::default()
    }
}

#[tokio::test]
async fn the_connection_cap_refuses_upgrades_with_a_retry_after() {
    let server = Server::start_with(tempfile::tempdir().unwrap(), |c| {
        c.gateway.max_connections = 2;
        c.gateway.retry_after_secs = 3;
    })
    .await;
    let a = SimAgent::connect_ws(&server.ws_url(), AgentOptions::default())
        .await
        .unwrap();
    let b = SimAgent::connect_ws(&server.ws_url(), AgentOptions::default())
        .await
        .unwrap();
    let refused = tokio_tungstenite::connect_async(server.ws_url()).await.unwrap_err();
    let WsError::Http(response) = refused else {
        panic!("expected an HTTP refusal, got {refused:?}")
    };
    assert_eq!(response.status(), 503);
    let retry_after: u64 = response.headers()["retry-after"].to_str().unwrap().parse().unwrap();
    assert!(
        (3..=6).contains(&retry_after),
        "jittered between the base and twice it: {retry_after}"
    );
    // A slot frees when an agent leaves.
    a.disconnect().await.unwrap();
    let c = tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            if let Ok((socket, _)) = tokio_tungstenite::connect_async(server.ws_url()).await {
                return socket;
            }
            // The close is processed asynchronously; the deadline bounds the wait.
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .expect("a freed slot admits a new connection");
    drop(c);
    b.disconnect().await.unwrap();
    server.stop().await;
}

#[tokio::test]
async fn chatty_agents_are_slowed_with_retry_hints_on_both_transports() {
    let server = Server::start_with(tempfile::tempdir().unwrap(), |c| {
        c.gateway.messages_per_agent_per_minute = 8;
        c.gateway.retry_after_secs = 1;
    })
    .await;
    // WebSocket: the burst (5) passes, then Unavailable with RetryInfo.
    let (mut socket, _) = tokio_tungstenite::connect_async(server.ws_url()).await.unwrap();
    let uid = InstanceUid::new_v7();
    let mut refusals = Vec::new();
    for seq in 1..=8 {
        socket
            .send(WsMessage::Binary(framing::encode_ws(&hello(uid, seq)).into()))
            .await
            .unwrap();
        let reply = loop {
            if let WsMessage::Binary(bytes) = socket.next().await.unwrap().unwrap() {
                break framing::decode_ws::<ServerToAgent>(&bytes, usize::MAX).unwrap();
            }
        };
        if let Some(error) = reply.error_response {
            assert_eq!(error.r#type, ServerErrorResponseType::Unavailable as i32);
            let Some(Details::RetryInfo(info)) = error.details else {
                panic!("a refusal carries RetryInfo")
            };
            refusals.push(Duration::from_nanos(info.retry_after_nanoseconds));
        }
    }
    assert_eq!(refusals.len(), 3, "5 admitted, 3 refused");
    assert!(refusals.iter().all(|d| *d >= Duration::from_secs(1)));

    // HTTP: 429 with Retry-After once the burst is spent.
    let other = InstanceUid::new_v7();
    let client = reqwest::Client::new();
    let mut statuses = Vec::new();
    for seq in 1..=7 {
        let response = client
            .post(server.http_url())
            .header("content-type", CONTENT_TYPE_PROTOBUF)
            .body(hello(other, seq).encode_to_vec())
            .send()
            .await
            .unwrap();
        if response.status() == 429 {
            assert!(response.headers().contains_key("retry-after"));
        }
        statuses.push(response.status().as_u16());
    }
    assert_eq!(statuses, vec![200, 200, 200, 200, 200, 429, 429]);
    server.stop().await;
}

#[tokio::test]
async fn a_draining_gateway_closes_agents_in_spread_out_waves_with_retry_hints() {
    let server = Server::start_with(tempfile::tempdir().unwrap(), |c| {
        c.gateway.drain_ms = 1500;
        c.gateway.retry_after_secs = 5;
    })
    .await;
    let mut sockets = Vec::new();
    for _ in 0..20 {
        let (mut socket, _) = tokio_tungstenite::connect_async(server.ws_url()).await.unwrap();
        socket
            .send(WsMessage::Binary(
                framing::encode_ws(&hello(InstanceUid::new_v7(), 1)).into(),
            ))
            .await
            .unwrap();
        // The hello's answer.
        socket.next().await.unwrap().unwrap();
        sockets.push(socket);
    }
    let started = Instant::now();
    let watchers: Vec<_> = sockets
        .into_iter()
        .map(|mut socket| {
            tokio::spawn(async move {
                let mut hint = None;
                while let Some(Ok(frame)) = socket.next().await {
                    match frame {
                        WsMessage::Binary(bytes) => {
                            let reply: ServerToAgent = framing::decode_ws(&bytes, usize::MAX).unwrap();
                            if let Some(Details::RetryInfo(info)) = reply.error_response.and_then(|e| e.details) {
                                hint = Some(Duration::from_nanos(info.retry_after_nanoseconds));
                            }
                        }
                        WsMessage::Close(frame) => return (started.elapsed(), hint, frame.map(|f| u16::from(f.code))),
                        _ => {}
                    }
                }
                (started.elapsed(), hint, None)
            })
        })
        .collect();
    let stopping = tokio::spawn(server.stop());
    let mut closed_at = Vec::new();
    for watcher in watchers {
        let (at, hint, code) = watcher.await.unwrap();
        let hint = hint.expect("every agent is told when to come back");
        assert!(
            hint >= Duration::from_secs(5) && hint <= Duration::from_secs(10),
            "{hint:?}"
        );
        assert_eq!(code, Some(1001), "going away");
        closed_at.push(at);
    }
    stopping.await.unwrap();
    closed_at.sort();
    let spread = closed_at[closed_at.len() - 1] - closed_at[0];
    assert!(
        spread >= Duration::from_millis(300),
        "closes spread over the drain period, not at once: {closed_at:?}"
    );
    assert!(
        closed_at[closed_at.len() - 1] < Duration::from_secs(5),
        "and done within it"
    );
}
