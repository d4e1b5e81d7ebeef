use super::*;
use crate::attributes::string_kv;
use crate::opamp::{
    AgentConfigFile, AgentConfigMap, AgentDescription, AgentDisconnect, AgentToServer, AvailableComponents,
    ComponentHealth, CustomCapabilities, EffectiveConfig, PackageStatus, PackageStatuses, RemoteConfigStatus,
    RemoteConfigStatuses, RetryInfo, ServerErrorResponse, ServerErrorResponseType, ServerToAgent,
    server_error_response::Details,
};

const LIMIT: usize = 1024 * 1024;

/// A message with every compressible status field set, as on a fresh start.
fn full_report() -> AgentToServer {
    let mut config = AgentConfigMap::default();
    config.config_map.insert(
        "collector.yaml".into(),
        AgentConfigFile {
            body: b"receivers: {otlp: {}}".to_vec(),
            content_type: "text/yaml".into(),
            role: String::new(),
        },
    );
    let mut packages = PackageStatuses::default();
    packages.packages.insert(
        "otelcol".into(),
        PackageStatus {
            name: "otelcol".into(),
            agent_has_version: "0.120.0".into(),
            ..Default::default()
        },
    );
    AgentToServer {
        instance_uid: vec![7; 16],
        sequence_num: 42,
        agent_description: Some(AgentDescription {
            identifying_attributes: vec![string_kv("service.name", "checkout")],
            non_identifying_attributes: vec![string_kv("host.arch", "arm64")],
        }),
        capabilities: 0x3fff,
        health: Some(ComponentHealth {
            healthy: true,
            start_time_unix_nano: 1_700_000_000_000_000_000,
            ..Default::default()
        }),
        effective_config: Some(EffectiveConfig {
            config_map: Some(config),
        }),
        remote_config_status: Some(RemoteConfigStatus {
            last_remote_config_hash: vec![9; 32],
            status: RemoteConfigStatuses::Failed as i32,
            error_message: "bad yaml".into(),
        }),
        package_statuses: Some(packages),
        custom_capabilities: Some(CustomCapabilities {
            capabilities: vec!["io.fleetplane.echo/v1".into()],
        }),
        available_components: Some(AvailableComponents {
            hash: vec![1, 2, 3],
            ..Default::default()
        }),
        ..Default::default()
    }
}

#[test]
fn round_trip_over_websocket_keeps_every_field() {
    let report = full_report();
    let frame = encode_ws(&report);
    assert_eq!(frame[0], 0x00);
    assert_eq!(decode_ws::<AgentToServer>(&frame, LIMIT), Ok(report));
}

#[test]
fn empty_disconnect_is_present_on_the_wire() {
    // agent_disconnect is an empty message: its presence is the signal.
    let msg = AgentToServer {
        agent_disconnect: Some(AgentDisconnect {}),
        ..Default::default()
    };
    assert_eq!(msg.encode_to_vec(), [0x4a, 0x00]);
    let back: AgentToServer = decode(&[0x4a, 0x00], LIMIT).unwrap();
    assert!(back.agent_disconnect.is_some());
}

#[test]
fn golden_status_report() {
    let msg = AgentToServer {
        instance_uid: vec![1; 16],
        sequence_num: 1,
        capabilities: 0x3003,
        health: Some(ComponentHealth {
            healthy: true,
            start_time_unix_nano: 1_700_000_000_000_000_000,
            ..Default::default()
        }),
        ..Default::default()
    };
    let mut golden = vec![0x0a, 0x10];
    golden.extend([0x01; 16]);
    // sequence_num=1, capabilities=0x3003 (varint 0x83 0x60), then health with
    // healthy=true and a fixed64 start time (tag 0x11, 8 little-endian bytes).
    golden.extend([0x10, 0x01, 0x20, 0x83, 0x60, 0x2a, 0x0b, 0x08, 0x01, 0x11]);
    golden.extend(1_700_000_000_000_000_000u64.to_le_bytes());
    assert_eq!(msg.encode_to_vec(), golden);
    assert_eq!(decode::<AgentToServer>(&golden, LIMIT), Ok(msg));
}

#[test]
fn golden_unavailable_with_retry_info() {
    let msg = ServerToAgent {
        error_response: Some(ServerErrorResponse {
            r#type: ServerErrorResponseType::Unavailable as i32,
            error_message: "busy".into(),
            details: Some(Details::RetryInfo(RetryInfo {
                retry_after_nanoseconds: 5_000_000_000,
            })),
        }),
        ..Default::default()
    };
    let golden = [
        0x00, // websocket header
        0x12, 0x10, // error_response, 16 bytes
        0x08, 0x02, // type = Unavailable
        0x12, 0x04, b'b', b'u', b's', b'y', // error_message
        0x1a, 0x06, 0x08, 0x80, 0xe4, 0x97, 0xd0, 0x12, // retry_info, 5e9 ns
    ];
    assert_eq!(encode_ws(&msg), golden);
    assert_eq!(decode_ws::<ServerToAgent>(&golden, LIMIT), Ok(msg));
}

#[test]
fn header_only_frame_is_an_empty_message() {
    assert_eq!(decode_ws::<AgentToServer>(&[0x00], LIMIT), Ok(AgentToServer::default()));
}

#[test]
fn legacy_headerless_frame_is_accepted() {
    let report = full_report();
    let bare = report.encode_to_vec();
    assert_eq!(decode_ws::<AgentToServer>(&bare, LIMIT), Ok(report));
}

#[test]
fn empty_frame_is_rejected() {
    assert_eq!(decode_ws::<AgentToServer>(&[], LIMIT), Err(DecodeError::EmptyFrame));
}

#[test]
fn non_zero_header_is_malformed() {
    // 0x01 is not a valid protobuf tag (field number 0), so neither reading works.
    let err = decode_ws::<AgentToServer>(&[0x01, 0x0a, 0x00], LIMIT).unwrap_err();
    assert!(matches!(err, DecodeError::Malformed(_)), "{err:?}");
}

#[test]
fn every_truncation_is_rejected_with_an_error() {
    let frame = encode_ws(&full_report());
    let mut rejected = 0;
    for cut in 1..frame.len() {
        // Some prefixes end on a field boundary and are valid, shorter messages;
        // none may panic, and all that end mid-field must be reported malformed.
        match decode_ws::<AgentToServer>(&frame[..cut], LIMIT) {
            Ok(_) => {}
            Err(DecodeError::Malformed(text)) => {
                assert!(!text.is_empty());
                rejected += 1;
            }
            Err(other) => panic!("unexpected error at cut {cut}: {other:?}"),
        }
    }
    assert!(rejected > frame.len() / 2, "only {rejected} truncations rejected");
}

#[test]
fn oversized_input_is_rejected_before_decoding() {
    let frame = encode_ws(&full_report());
    let limit = frame.len() - 1;
    assert_eq!(
        decode_ws::<AgentToServer>(&frame, limit),
        Err(DecodeError::TooLarge {
            size: frame.len(),
            limit
        })
    );
    let body = full_report().encode_to_vec();
    assert!(matches!(
        decode::<AgentToServer>(&body, 10),
        Err(DecodeError::TooLarge { limit: 10, .. })
    ));
}

#[test]
fn unknown_fields_are_skipped() {
    // Field 99 (varint) from a newer client must not break decoding.
    let mut bytes = full_report().encode_to_vec();
    bytes.extend([0x98, 0x06, 0x01]);
    assert_eq!(decode::<AgentToServer>(&bytes, LIMIT), Ok(full_report()));
}

/// Property tests over arbitrary input (the fuzzing the stable toolchain
/// allows): decoding never panics, refuses what it must, and what encodes
/// decodes back. Failures proptest finds are kept in
/// `proptest-regressions/` and replayed on every run.
mod properties {
    use proptest::prelude::*;

    use crate::{
        attributes::string_kv,
        framing::{decode, decode_ws, encode_ws},
        opamp::{AgentDescription, AgentToServer, ComponentHealth},
    };

    fn agent_message() -> impl Strategy<Value = AgentToServer> {
        (
            proptest::collection::vec(any::<u8>(), 0..20),
            any::<u64>(),
            any::<u64>(),
            proptest::collection::vec((".{0,12}", ".{0,24}"), 0..6),
            proptest::option::of((any::<bool>(), ".{0,40}")),
        )
            .prop_map(|(uid, seq, caps, attrs, health)| AgentToServer {
                instance_uid: uid,
                sequence_num: seq,
                capabilities: caps,
                agent_description: Some(AgentDescription {
                    identifying_attributes: attrs.iter().map(|(k, v)| string_kv(k, v)).collect(),
                    non_identifying_attributes: vec![],
                }),
                health: health.map(|(healthy, error)| ComponentHealth {
                    healthy,
                    last_error: error,
                    ..Default::default()
                }),
                ..Default::default()
            })
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(512))]

        #[test]
        fn arbitrary_frames_never_panic_and_respect_the_limit(bytes in proptest::collection::vec(any::<u8>(), 0..2048), limit in 0usize..4096) {
            let result = decode_ws::<AgentToServer>(&bytes, limit);
            if bytes.len() > limit {
                prop_assert!(result.is_err());
            }
            let _ = decode::<AgentToServer>(&bytes, limit);
        }

        #[test]
        fn messages_survive_a_round_trip(message in agent_message()) {
            let frame = encode_ws(&message);
            prop_assert_eq!(frame[0], 0);
            let back: AgentToServer = decode_ws(&frame, usize::MAX).unwrap();
            prop_assert_eq!(back, message);
        }

        #[test]
        fn a_corrupted_frame_is_refused_or_decodes_but_never_panics(message in agent_message(), flips in proptest::collection::vec((any::<usize>(), any::<u8>()), 1..8)) {
            let mut frame = encode_ws(&message);
            for (at, byte) in flips {
                let at = at % frame.len();
                frame[at] ^= byte;
            }
            let _ = decode_ws::<AgentToServer>(&frame, 1 << 20);
        }
    }
}
