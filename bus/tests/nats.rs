//! The NATS bus against a real nats-server of the test's own.

use std::time::Duration;

use fleetplane_bus::{
    Bus, BusError, ConnectionsClosed, CoordinatorInput, Delivery, GatewayPresence, Report,
    nats::{NatsBus, NatsConfig},
};
use fleetplane_proto::{
    ConnectionId, GatewayId, InstanceUid, Link, Message, TenantId,
    opamp::{AgentToServer, ServerToAgent},
};
use fleetplane_testkit::services::NatsServer;

async fn bus(server: &NatsServer) -> NatsBus {
    NatsBus::connect(NatsConfig {
        url: server.url(),
        request_timeout: Duration::from_secs(2),
        ..Default::default()
    })
    .await
    .unwrap()
}

fn gw(id: &str) -> GatewayId {
    GatewayId::new(id).unwrap()
}

fn report(seq: u64) -> Report {
    let uid = InstanceUid::from_array([1; 16]);
    Report::new(
        TenantId::default_tenant(),
        uid,
        gw("gw-a"),
        Link::WebSocket(ConnectionId::new(3).unwrap()),
        AgentToServer {
            instance_uid: uid.to_vec(),
            sequence_num: seq,
            ..Default::default()
        },
    )
}

/// A coordinator that answers each report with its sequence number in `flags`.
async fn echo_coordinator(bus: &NatsBus) -> tokio::sync::mpsc::Receiver<CoordinatorInput> {
    let mut inputs = bus.subscribe_coordinator().await.unwrap();
    let (tx, rx) = tokio::sync::mpsc::channel(64);
    tokio::spawn(async move {
        while let Some(input) = inputs.recv().await {
            match input {
                CoordinatorInput::Report(request) => {
                    let seq = request.report.message.sequence_num;
                    request.respond(ServerToAgent {
                        flags: seq,
                        ..Default::default()
                    });
                }
                CoordinatorInput::Closed(notice) => {
                    let (closed, ack) = notice.into_parts();
                    ack.done();
                    let (notice, _) = fleetplane_bus::ClosedNotice::new(closed);
                    let _ = tx.send(CoordinatorInput::Closed(notice)).await;
                }
                other => {
                    let _ = tx.send(other).await;
                }
            }
        }
    });
    rx
}

#[tokio::test]
async fn reports_are_answered_by_a_coordinator_across_processes_of_the_bus() {
    let server = NatsServer::start().unwrap();
    let gateway = bus(&server).await;
    assert_eq!(gateway.report(report(1)).await, Err(BusError::NoCoordinator));

    let coordinator = bus(&server).await;
    let mut events = echo_coordinator(&coordinator).await;
    for seq in 1..=20 {
        assert_eq!(gateway.report(report(seq)).await.unwrap().flags, seq);
    }

    gateway
        .connections_closed(ConnectionsClosed {
            tenant: TenantId::default_tenant(),
            gateway: gw("gw-a"),
            connections: vec![(InstanceUid::from_array([1; 16]), ConnectionId::new(9).unwrap())],
        })
        .await
        .unwrap();
    gateway
        .announce(GatewayPresence {
            gateway: gw("gw-a"),
            agents: 0,
            sent_unix_ms: 1,
            leaving: false,
        })
        .await
        .unwrap();
    // One replica's change notice reaches every replica (here, a bus of
    // another process than the one that publishes).
    let other_replica = bus(&server).await;
    other_replica
        .desired_changed(&TenantId::new("acme").unwrap())
        .await
        .unwrap();
    let mut saw_closed = false;
    let mut saw_presence = false;
    let mut saw_change = false;
    while !(saw_closed && saw_presence && saw_change) {
        match tokio::time::timeout(Duration::from_secs(5), events.recv())
            .await
            .unwrap()
            .unwrap()
        {
            CoordinatorInput::Closed(c) => saw_closed = c.closed.connections[0].1.get() == 9,
            CoordinatorInput::Presence(p) => saw_presence = p.gateway == gw("gw-a"),
            CoordinatorInput::DesiredChanged(tenant) => saw_change = tenant.as_str() == "acme",
            CoordinatorInput::Report(_) | CoordinatorInput::Liveness(_) | CoordinatorInput::KeyLookup(_) => {
                unreachable!()
            }
        }
    }
}

/// Envelopes that no gateway of this build writes (a report whose tenant is
/// not its subject's, a uid of the wrong length, a WebSocket report without
/// a connection) are dropped where they leave NATS: the coordinator never
/// sees them, and the good report after them is answered.
#[tokio::test]
async fn forged_envelopes_stop_at_the_edge_of_the_bus() {
    let server = NatsServer::start().unwrap();
    let coordinator = bus(&server).await;
    let mut inputs = coordinator.subscribe_coordinator().await.unwrap();
    let raw = async_nats::connect(server.url()).await.unwrap();
    let mut other_tenant = report(1).into_wire();
    other_tenant.tenant = "victim".into();
    let mut bad_uid = report(2).into_wire();
    bad_uid.message.as_mut().unwrap().instance_uid = vec![1; 3];
    let mut no_connection = report(3).into_wire();
    no_connection.connection_id = 0;
    for forged in [other_tenant, bad_uid, no_connection] {
        let request = async_nats::Request::new()
            .payload(forged.encode_to_vec().into())
            .timeout(Some(Duration::from_millis(300)));
        let answer = raw.send_request("fp.v1.report.default", request).await;
        assert!(answer.is_err(), "a forged envelope got an answer");
    }
    let gateway = bus(&server).await;
    let answered = tokio::spawn(async move { gateway.report(report(4)).await });
    match tokio::time::timeout(Duration::from_secs(5), inputs.recv())
        .await
        .unwrap()
        .unwrap()
    {
        CoordinatorInput::Report(request) => {
            assert_eq!(
                request.report.message.sequence_num, 4,
                "the first input is the good report"
            );
            request.respond(ServerToAgent::default());
        }
        _ => panic!("expected the good report"),
    }
    assert!(answered.await.unwrap().is_ok());
}

#[tokio::test]
async fn key_lookups_are_answered_by_a_coordinator() {
    let server = NatsServer::start().unwrap();
    let gateway = bus(&server).await;
    let coordinator = bus(&server).await;
    assert!(matches!(
        gateway.lookup_key("0011223344556677").await,
        Err(fleetplane_bus::BusError::NoCoordinator)
    ));
    let mut inputs = coordinator.subscribe_coordinator().await.unwrap();
    tokio::spawn(async move {
        while let Some(input) = inputs.recv().await {
            if let CoordinatorInput::KeyLookup(lookup) = input {
                let known = lookup.id == "0011223344556677";
                let key = known.then(|| fleetplane_proto::internal::ApiKey {
                    id: lookup.id.clone(),
                    tenant: "acme".into(),
                    ..Default::default()
                });
                lookup.respond(key);
            }
        }
    });
    let found = gateway.lookup_key("0011223344556677").await.unwrap().unwrap();
    assert_eq!(found.tenant, "acme");
    assert_eq!(gateway.lookup_key("ffffffffffffffff").await.unwrap(), None);
}

#[tokio::test]
async fn two_coordinator_replicas_share_the_reports() {
    let server = NatsServer::start().unwrap();
    let gateway = bus(&server).await;
    let replicas = [bus(&server).await, bus(&server).await];
    let mut counts = Vec::new();
    for replica in &replicas {
        let mut inputs = replica.subscribe_coordinator().await.unwrap();
        let (tx, rx) = tokio::sync::watch::channel(0u32);
        tokio::spawn(async move {
            while let Some(CoordinatorInput::Report(request)) = inputs.recv().await {
                tx.send_modify(|n| *n += 1);
                request.respond(ServerToAgent::default());
            }
        });
        counts.push(rx);
    }
    for seq in 0..200 {
        gateway.report(report(seq)).await.unwrap();
    }
    let (a, b) = (*counts[0].borrow(), *counts[1].borrow());
    assert_eq!(a + b, 200, "each report answered exactly once");
    assert!(a > 0 && b > 0, "the queue group spreads reports: {a}/{b}");
}

#[tokio::test]
async fn deliveries_reach_only_the_addressed_gateway() {
    let server = NatsServer::start().unwrap();
    let coordinator = bus(&server).await;
    let a = bus(&server).await;
    let b = bus(&server).await;
    let mut to_a = a.subscribe_deliveries(&GatewayId::new("gw-a").unwrap()).await.unwrap();
    let mut to_b = b.subscribe_deliveries(&GatewayId::new("gw-b").unwrap()).await.unwrap();
    coordinator
        .deliver(Delivery {
            tenant: TenantId::default_tenant(),
            uid: InstanceUid::from_array([2; 16]),
            gateway: gw("gw-b"),
            connection: ConnectionId::new(42).unwrap(),
            message: ServerToAgent {
                instance_uid: vec![2; 16],
                ..Default::default()
            },
        })
        .await
        .unwrap();
    let got = tokio::time::timeout(Duration::from_secs(5), to_b.recv())
        .await
        .unwrap()
        .unwrap();
    assert_eq!((got.connection.get(), got.uid), (42, InstanceUid::from_array([2; 16])));
    assert!(to_a.try_recv().is_err());
}

#[tokio::test]
async fn a_nats_restart_is_survived_and_announced_through_the_epoch() {
    let mut server = NatsServer::start().unwrap();
    let gateway = bus(&server).await;
    let coordinator = bus(&server).await;
    let _events = echo_coordinator(&coordinator).await;
    gateway.report(report(1)).await.unwrap();
    let mut epoch = gateway.epoch();
    let before = *epoch.borrow_and_update();

    server.kill();
    assert!(gateway.report(report(2)).await.is_err(), "no broker, no answer");
    server.restart().unwrap();

    tokio::time::timeout(Duration::from_secs(15), epoch.wait_for(|e| *e > before))
        .await
        .expect("reconnected")
        .unwrap();
    // Subscriptions are restored by the client; requests flow again.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    loop {
        match gateway.report(report(3)).await {
            Ok(reply) => {
                assert_eq!(reply.flags, 3);
                break;
            }
            Err(e) if tokio::time::Instant::now() < deadline => {
                // The coordinator's connection may come back a moment later.
                let _ = e;
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(e) => panic!("bus did not recover: {e}"),
        }
    }
    assert!(gateway.is_connected());
}
