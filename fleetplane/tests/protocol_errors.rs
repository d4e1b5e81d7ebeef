//! Bad input on both transports gets a clear protocol error, and neither
//! crashes the server nor loses what it stored.

mod common;

use std::{io::Write, sync::Arc};

use common::Server;
use fleetplane_bus::memory::MemoryBus;
use fleetplane_gateway::GatewayConfig;
use fleetplane_proto::{
    InstanceUid, Message, framing,
    http::{CONTENT_TYPE_PROTOBUF, HEADER_INSTANCE_UID},
    opamp::{AgentToServer, ServerErrorResponseType, ServerToAgent, server_error_response::Details},
};
use fleetplane_testkit::agent::{AgentOptions, SimAgent};
use futures_util::{SinkExt, StreamExt};
use tokio_tungstenite::tungstenite::{Message as WsMessage, protocol::frame::coding::CloseCode};
use tokio_util::sync::CancellationToken;

type Socket = tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

const LIMIT: usize = 4096;

async fn small_limit_server() -> Server {
    Server::start_with(tempfile::tempdir().unwrap(), |c| c.opamp.max_message_bytes = LIMIT).await
}

async fn raw_socket(server: &Server) -> Socket {
    tokio_tungstenite::connect_async(server.ws_url()).await.unwrap().0
}

/// Sends one frame and returns the decoded answer.
async fn exchange(socket: &mut Socket, frame: WsMessage) -> ServerToAgent {
    socket.send(frame).await.unwrap();
    loop {
        match socket.next().await.expect("socket open").unwrap() {
            WsMessage::Binary(bytes) => return framing::decode_ws(&bytes, usize::MAX).unwrap(),
            WsMessage::Ping(_) | WsMessage::Pong(_) => continue,
            other => panic!("unexpected frame {other:?}"),
        }
    }
}

fn error_of(reply: &ServerToAgent) -> (ServerErrorResponseType, String) {
    let error = reply.error_response.as_ref().expect("an error response");
    assert!(
        reply.remote_config.is_none() && reply.capabilities == 0,
        "errors travel alone"
    );
    (
        ServerErrorResponseType::try_from(error.r#type).unwrap(),
        error.error_message.clone(),
    )
}

fn hello(uid: InstanceUid) -> AgentToServer {
    AgentToServer {
        instance_uid: uid.to_vec(),
        sequence_num: 1,
        capabilities: 1,
        agent_description: Some(Default::default()),
        ..Default::default()
    }
}

#[tokio::test]
async fn websocket_bad_frames_get_bad_request_and_the_connection_survives() {
    let server = small_limit_server().await;
    let mut socket = raw_socket(&server).await;

    let truncated = exchange(&mut socket, WsMessage::Binary(vec![0x00, 0x0a, 0x10, 0x01].into())).await;
    let (kind, text) = error_of(&truncated);
    assert_eq!(kind, ServerErrorResponseType::BadRequest);
    assert!(text.starts_with("malformed protobuf"), "{text}");

    let empty = exchange(&mut socket, WsMessage::Binary(Vec::new().into())).await;
    assert!(error_of(&empty).1.contains("empty websocket frame"));

    let text_frame = exchange(&mut socket, WsMessage::Text("hello".into())).await;
    assert!(error_of(&text_frame).1.contains("binary"));

    let mut short_uid = hello(InstanceUid::new_v7());
    short_uid.instance_uid = b"01ARZ3NDEKTSV4RRFFQ69G5FAV".to_vec();
    let reply = exchange(&mut socket, WsMessage::Binary(framing::encode_ws(&short_uid).into())).await;
    let (kind, text) = error_of(&reply);
    assert_eq!(kind, ServerErrorResponseType::BadRequest);
    assert_eq!(text, "instance_uid must be 16 bytes, got 26");
    assert_eq!(
        reply.instance_uid, short_uid.instance_uid,
        "the error is addressed to the sender"
    );

    // Unknown fields from a newer client are skipped, and the same socket
    // still carries a valid exchange.
    let uid = InstanceUid::new_v7();
    let mut frame = framing::encode_ws(&hello(uid));
    frame.extend([0x98, 0x06, 0x01]);
    let ok = exchange(&mut socket, WsMessage::Binary(frame.into())).await;
    assert!(ok.error_response.is_none());
    assert_eq!(ok.instance_uid, uid.to_vec());
    assert_eq!(ok.capabilities & 1, 1);
    assert!(server.admin.agent(uid).await.unwrap().is_some());
    server.stop().await;
}

#[tokio::test]
async fn an_oversized_websocket_message_closes_with_1009_and_loses_nothing() {
    let server = small_limit_server().await;
    let good = SimAgent::connect_ws(&server.ws_url(), AgentOptions::default().attr("service.name", "keep"))
        .await
        .unwrap();
    good.wait_for("reply", |s| s.replies > 0).await.unwrap();

    let mut socket = raw_socket(&server).await;
    let mut big = hello(InstanceUid::new_v7());
    big.agent_description = Some(fleetplane_proto::opamp::AgentDescription {
        identifying_attributes: vec![fleetplane_proto::attributes::string_kv("blob", "x".repeat(LIMIT * 2))],
        non_identifying_attributes: vec![],
    });
    socket
        .send(WsMessage::Binary(framing::encode_ws(&big).into()))
        .await
        .unwrap();
    let close = loop {
        match socket.next().await {
            Some(Ok(WsMessage::Close(frame))) => break frame,
            Some(Ok(_)) => continue,
            other => panic!("expected a close frame, got {other:?}"),
        }
    };
    assert_eq!(close.unwrap().code, CloseCode::Size, "1009 message too big");

    // The server is still up and the other agent's state is intact.
    good.heartbeat().await.unwrap();
    good.wait_for("reply after the oversized message", |s| s.replies >= 2)
        .await
        .unwrap();
    let detail = server.admin.agent(good.uid()).await.unwrap().unwrap();
    assert_eq!(detail["identifying_attributes"]["service.name"], "keep");
    good.disconnect().await.unwrap();
    server.stop().await;
}

async fn post(server: &Server, content_type: &str, extra: &[(&str, &str)], body: Vec<u8>) -> reqwest::Response {
    let mut request = reqwest::Client::new()
        .post(server.http_url())
        .header("content-type", content_type)
        .body(body);
    for (k, v) in extra {
        request = request.header(*k, *v);
    }
    request.send().await.unwrap()
}

async fn decoded(response: reqwest::Response) -> ServerToAgent {
    assert_eq!(response.status(), 200);
    framing::decode(&response.bytes().await.unwrap(), usize::MAX).unwrap()
}

fn gzip(bytes: &[u8]) -> Vec<u8> {
    let mut encoder = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::best());
    encoder.write_all(bytes).unwrap();
    encoder.finish().unwrap()
}

#[tokio::test]
async fn http_bad_requests_get_the_statuses_the_spec_names() {
    let server = small_limit_server().await;
    let uid = InstanceUid::new_v7();
    let body = hello(uid).encode_to_vec();

    let wrong_type = post(&server, "text/plain", &[], body.clone()).await;
    assert_eq!(wrong_type.status(), 415);
    assert!(wrong_type.text().await.unwrap().contains(CONTENT_TYPE_PROTOBUF));

    let get = reqwest::Client::new()
        .get(server.http_url())
        .header("content-type", CONTENT_TYPE_PROTOBUF)
        .send()
        .await
        .unwrap();
    assert_eq!(get.status(), 405);

    let garbage = decoded(post(&server, CONTENT_TYPE_PROTOBUF, &[], vec![0x0a, 0xff, 0x01]).await).await;
    assert_eq!(error_of(&garbage).0, ServerErrorResponseType::BadRequest);

    let too_big = post(&server, CONTENT_TYPE_PROTOBUF, &[], vec![0u8; LIMIT + 1]).await;
    assert_eq!(too_big.status(), 413);

    // Small on the wire, over the limit once inflated.
    let bomb = gzip(&vec![0u8; LIMIT * 4]);
    assert!(bomb.len() < LIMIT);
    let inflated = post(&server, CONTENT_TYPE_PROTOBUF, &[("content-encoding", "gzip")], bomb).await;
    assert_eq!(inflated.status(), 413);

    let bad_gzip = post(
        &server,
        CONTENT_TYPE_PROTOBUF,
        &[("content-encoding", "gzip")],
        body.clone(),
    )
    .await;
    assert_eq!(bad_gzip.status(), 400);
    let brotli = post(
        &server,
        CONTENT_TYPE_PROTOBUF,
        &[("content-encoding", "br")],
        body.clone(),
    )
    .await;
    assert_eq!(brotli.status(), 415);

    let other = InstanceUid::new_v7().to_uuid_string();
    let mismatch = decoded(
        post(
            &server,
            CONTENT_TYPE_PROTOBUF,
            &[(HEADER_INSTANCE_UID, &other)],
            body.clone(),
        )
        .await,
    )
    .await;
    assert!(error_of(&mismatch).1.contains("does not match"));

    // None of that touched the store; a good request still works, gzipped.
    let header = uid.to_uuid_string();
    let ok = decoded(
        post(
            &server,
            CONTENT_TYPE_PROTOBUF,
            &[(HEADER_INSTANCE_UID, &header), ("content-encoding", "gzip")],
            gzip(&body),
        )
        .await,
    )
    .await;
    assert!(ok.error_response.is_none());
    assert_eq!(ok.instance_uid, uid.to_vec());
    let agents = server.admin.agents("").await.unwrap();
    assert_eq!(agents.len(), 1, "only the valid agent was recorded: {agents:?}");
    server.stop().await;
}

/// A gateway whose coordinators are gone answers Unavailable with a jittered
/// retry hint on both transports, instead of hanging or crashing.
#[tokio::test]
async fn without_a_coordinator_agents_are_told_to_retry_later() {
    let bus = Arc::new(MemoryBus::default());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let shutdown = CancellationToken::new();
    let config = GatewayConfig {
        retry_after: std::time::Duration::from_secs(5),
        drain_period: std::time::Duration::ZERO,
        auth: fleetplane_gateway::auth::AuthConfig {
            mode: fleetplane_gateway::auth::AuthMode::None,
            ..Default::default()
        },
        ..Default::default()
    };
    let gateway = tokio::spawn(fleetplane_gateway::serve(listener, bus, config, shutdown.clone()));

    let uid = InstanceUid::new_v7();
    let response = reqwest::Client::new()
        .post(format!("http://{addr}/v1/opamp"))
        .header("content-type", CONTENT_TYPE_PROTOBUF)
        .body(hello(uid).encode_to_vec())
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 503);
    let retry_after: u64 = response.headers()["retry-after"].to_str().unwrap().parse().unwrap();
    assert!(
        (5..=10).contains(&retry_after),
        "jittered within [base, 2*base]: {retry_after}"
    );

    let (mut socket, _) = tokio_tungstenite::connect_async(format!("ws://{addr}/v1/opamp"))
        .await
        .unwrap();
    let reply = exchange(&mut socket, WsMessage::Binary(framing::encode_ws(&hello(uid)).into())).await;
    let error = reply.error_response.unwrap();
    assert_eq!(error.r#type, ServerErrorResponseType::Unavailable as i32);
    let Some(Details::RetryInfo(info)) = error.details else {
        panic!("Unavailable must carry RetryInfo")
    };
    assert!((5_000_000_000..=10_000_000_000).contains(&info.retry_after_nanoseconds));

    shutdown.cancel();
    gateway.await.unwrap().unwrap();
}
