//! Micro-benchmarks of the per-message hot paths: WebSocket frame decode and
//! encode, merging a report into an agent record, selector matching, and
//! config hashing, and an agent's credential check on a warm cache.
//! `cargo bench -p fleetplane-benches` prints the figures.

use std::hint::black_box;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use fleetplane_coordinator::{
    inventory::{self, Arrival},
    selector::{Facts, Selector},
};
use fleetplane_proto::{
    ConfigHash,
    attributes::string_kv,
    framing,
    opamp::{
        AgentConfigFile, AgentConfigMap, AgentDescription, AgentToServer, ComponentHealth, RemoteConfigStatus,
        ServerToAgent,
    },
};

fn full_report(seq: u64) -> AgentToServer {
    AgentToServer {
        instance_uid: vec![7; 16],
        sequence_num: seq,
        capabilities: 0x3fff,
        agent_description: Some(AgentDescription {
            identifying_attributes: vec![
                string_kv("service.name", "checkout"),
                string_kv("service.instance.id", "checkout-7d9f8b-xk2p4"),
            ],
            non_identifying_attributes: vec![
                string_kv("host.arch", "arm64"),
                string_kv("os.type", "linux"),
                string_kv("cloud.region", "eu-west-1"),
            ],
        }),
        health: Some(ComponentHealth {
            healthy: true,
            start_time_unix_nano: 1_700_000_000_000_000_000,
            ..Default::default()
        }),
        remote_config_status: Some(RemoteConfigStatus {
            last_remote_config_hash: vec![3; 32],
            status: 1,
            error_message: String::new(),
        }),
        ..Default::default()
    }
}

fn heartbeat(seq: u64) -> AgentToServer {
    AgentToServer {
        instance_uid: vec![7; 16],
        sequence_num: seq,
        capabilities: 0x3fff,
        ..Default::default()
    }
}

fn framing_benches(c: &mut Criterion) {
    let mut group = c.benchmark_group("framing");
    for (name, message) in [("heartbeat", heartbeat(2)), ("full_report", full_report(1))] {
        let frame = framing::encode_ws(&message);
        group.throughput(Throughput::Bytes(frame.len() as u64));
        group.bench_function(format!("decode_{name}"), |b| {
            b.iter(|| framing::decode_ws::<AgentToServer>(black_box(&frame), 64 << 20).unwrap())
        });
        group.bench_function(format!("encode_{name}"), |b| {
            b.iter(|| framing::encode_ws(black_box(&message)))
        });
    }
    let reply = ServerToAgent {
        instance_uid: vec![7; 16],
        capabilities: 0x37,
        ..Default::default()
    };
    group.bench_function("encode_ack", |b| b.iter(|| framing::encode_ws(black_box(&reply))));
    group.finish();
}

fn merge_benches(c: &mut Criterion) {
    let gateway = fleetplane_proto::GatewayId::new("gw-a").expect("valid id");
    let arrival = Arrival {
        gateway: &gateway,
        link: fleetplane_proto::Link::WebSocket(fleetplane_proto::ConnectionId::FIRST),
        endpoint: "ws://127.0.0.1:4320/v1/opamp",
        now_unix_ms: 1,
        acked_sequence_num: 0,
    };
    let mut record = inventory::new_record("default", &[7; 16]);
    inventory::merge(&mut record, &full_report(1), &arrival);
    let mut group = c.benchmark_group("merge");
    group.bench_function("heartbeat", |b| {
        let mut seq = 1;
        b.iter(|| {
            seq += 1;
            inventory::merge(black_box(&mut record), &heartbeat(seq), &arrival)
        })
    });
    let full = full_report(1);
    group.bench_function("full_report", |b| {
        b.iter(|| inventory::merge(black_box(&mut record), black_box(&full), &arrival))
    });
    group.finish();
}

fn selector_benches(c: &mut Criterion) {
    let description = full_report(1).agent_description.unwrap();
    let selector = Selector::parse("service.name=checkout,host.arch=arm64,!canary,cloud.region!=us-east-1").unwrap();
    c.bench_function("selector/match_4_terms", |b| {
        b.iter(|| selector.matches(black_box(Facts::described(Some(&description)))))
    });
    c.bench_function("selector/parse_cached_4_terms", |b| {
        b.iter(|| {
            Selector::parse_cached(black_box(
                "service.name=checkout,host.arch=arm64,!canary,cloud.region!=us-east-1",
            ))
        })
    });
    c.bench_function("selector/parse_4_terms", |b| {
        b.iter(|| {
            Selector::parse(black_box(
                "service.name=checkout,host.arch=arm64,!canary,cloud.region!=us-east-1",
            ))
        })
    });
}

fn hash_benches(c: &mut Criterion) {
    let mut group = c.benchmark_group("config_hash");
    for size in [1 << 10, 64 << 10, 1 << 20] {
        let mut map = AgentConfigMap::default();
        map.config_map.insert(
            "collector.yaml".into(),
            AgentConfigFile {
                body: vec![b'x'; size],
                content_type: "text/yaml".into(),
                role: String::new(),
            },
        );
        group.throughput(Throughput::Bytes(size as u64));
        group.bench_function(format!("{}KiB", size >> 10), |b| {
            b.iter(|| ConfigHash::of_config(black_box(&map)))
        });
    }
    group.finish();
}

/// One handshake's credential check with the key already cached: parse the
/// bearer token, find the key, hash and compare the secret.
fn auth_benches(c: &mut Criterion) {
    use std::sync::Arc;

    use axum::http::{HeaderMap, HeaderValue, header};
    use fleetplane_bus::{Bus, CoordinatorInput, memory::MemoryBus};
    use fleetplane_gateway::auth::{AuthConfig, Authenticator};
    use fleetplane_proto::{credentials::MintedKey, internal::ApiKey};

    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let minted = MintedKey::generate();
    let auth = runtime.block_on(async {
        let bus = Arc::new(MemoryBus::default());
        let mut inputs = bus.subscribe_coordinator().await.unwrap();
        let stored = ApiKey {
            id: minted.id().to_owned(),
            tenant: "acme".into(),
            secret_sha256: minted.secret_sha256().to_vec(),
            ..Default::default()
        };
        tokio::spawn(async move {
            while let Some(input) = inputs.recv().await {
                if let CoordinatorInput::KeyLookup(lookup) = input {
                    lookup.respond(Some(stored.clone()));
                }
            }
        });
        let bus: Arc<dyn Bus> = bus;
        Authenticator::new(
            AuthConfig {
                cache_ttl: std::time::Duration::from_secs(3600),
                ..Default::default()
            },
            bus,
        )
    });
    let mut headers = HeaderMap::new();
    headers.insert(
        header::AUTHORIZATION,
        HeaderValue::from_str(&format!("Bearer {}", minted.token())).unwrap(),
    );
    let peer = std::net::IpAddr::from([127, 0, 0, 1]);
    // Warm the cache.
    runtime.block_on(auth.authenticate(&headers, peer, None)).unwrap();
    c.bench_function("auth/api_key_warm_cache", |b| {
        b.iter(|| {
            runtime
                .block_on(auth.authenticate(black_box(&headers), peer, None))
                .unwrap()
        })
    });
}

criterion_group!(
    benches,
    framing_benches,
    merge_benches,
    selector_benches,
    hash_benches,
    auth_benches
);
criterion_main!(benches);
