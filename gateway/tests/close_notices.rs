//! A gateway's notice that an agent's connection closed is sent again until
//! a coordinator acknowledges it: a notice lost with a coordinator replica
//! would leave the agent's record claiming the connection, and every other
//! gateway refusing the agent as a duplicate of itself.

use std::{sync::Arc, time::Duration};

use fleetplane_bus::{Bus, CoordinatorInput, memory::MemoryBus};
use fleetplane_gateway::{GatewayConfig, auth::AuthMode};
use fleetplane_proto::{
    InstanceUid, framing,
    opamp::{AgentToServer, ServerToAgent},
};
use futures_util::{SinkExt, StreamExt};
use tokio_tungstenite::tungstenite::Message as WsMessage;
use tokio_util::sync::CancellationToken;

#[tokio::test]
async fn a_close_notice_no_coordinator_acknowledged_is_sent_again() {
    let bus = Arc::new(MemoryBus::default());
    let mut inputs = bus.subscribe_coordinator().await.unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    let mut config = GatewayConfig::default();
    config.auth.mode = AuthMode::None;
    let shutdown = CancellationToken::new();
    let gateway = tokio::spawn(fleetplane_gateway::serve(
        listener,
        bus.clone(),
        config,
        shutdown.clone(),
    ));

    let (mut socket, _) = tokio_tungstenite::connect_async(format!("ws://{address}/v1/opamp"))
        .await
        .unwrap();
    let uid = InstanceUid::new_v7();
    let hello = AgentToServer {
        instance_uid: uid.to_vec(),
        sequence_num: 1,
        ..Default::default()
    };
    socket
        .send(WsMessage::Binary(framing::encode_ws(&hello).into()))
        .await
        .unwrap();

    // The coordinator answers the hello; the agent then vanishes without a
    // goodbye. The first close notice is lost (taken, never acknowledged, as
    // by a replica killed while holding it); the second is acknowledged.
    let mut notices = Vec::new();
    let mut socket = Some(socket);
    while notices.len() < 2 {
        let input = tokio::time::timeout(Duration::from_secs(20), inputs.recv())
            .await
            .expect("the gateway keeps talking")
            .expect("bus open");
        match input {
            CoordinatorInput::Report(request) => {
                request.respond(ServerToAgent {
                    instance_uid: uid.to_vec(),
                    ..Default::default()
                });
                let mut socket = socket.take().expect("one hello");
                // Wait for the reply, so the agent is known, then cut the TCP
                // connection without a close frame.
                let reply = socket.next().await.unwrap().unwrap();
                assert!(matches!(reply, WsMessage::Binary(_)), "{reply:?}");
                drop(socket);
            }
            CoordinatorInput::Closed(notice) => {
                let (closed, ack) = notice.into_parts();
                assert_eq!(closed.connections.len(), 1);
                assert_eq!(closed.connections[0].0, uid);
                notices.push(closed);
                if notices.len() == 2 {
                    ack.done();
                } else {
                    drop(ack);
                }
            }
            CoordinatorInput::Presence(_)
            | CoordinatorInput::Liveness(_)
            | CoordinatorInput::KeyLookup(_)
            | CoordinatorInput::DesiredChanged(_) => {}
        }
    }
    assert_eq!(notices[0], notices[1], "the same notice, sent again");
    shutdown.cancel();
    tokio::time::timeout(Duration::from_secs(30), gateway)
        .await
        .expect("the gateway stops")
        .unwrap()
        .unwrap();
}
