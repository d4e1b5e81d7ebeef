//! Merging agent reports into the agent's record.
//!
//! OpAMP agents compress their reports: a sub-message that did not change is
//! omitted, and an omitted sub-message means "unchanged", never "cleared". A
//! present sub-message replaces the stored one whole (spec 4.C.14). This module
//! is pure: it takes the stored record and one message, and says what changed
//! and whether the agent must re-send its full state.

use fleetplane_proto::{
    GatewayId, Link,
    internal::{AgentRecord, ReceivedCustomMessage},
    opamp::AgentToServer,
};

/// Where and when a report arrived.
#[derive(Debug, Clone)]
pub struct Arrival<'a> {
    /// Gateway the message came through.
    pub gateway: &'a GatewayId,
    /// The WebSocket connection on that gateway, or a plain-HTTP poll.
    pub link: Link,
    /// URL the agent used, restated in connection-settings offers.
    pub endpoint: &'a str,
    /// Wall-clock arrival time.
    pub now_unix_ms: u64,
    /// Highest sequence number the gateway answered itself on this
    /// connection (its liveness batch may still be on the way).
    pub acked_sequence_num: u64,
}

/// What merging one report found.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Merged {
    /// The server lacks state for this agent and must set `ReportFullState`:
    /// an unknown agent that did not describe itself, or a sequence gap.
    pub full_state_needed: bool,
    /// First report ever seen from this uid.
    pub new_agent: bool,
    /// The agent said goodbye (`agent_disconnect`).
    pub disconnected: bool,
    /// A late copy of an older message from an agent that has since said
    /// goodbye; it was not applied.
    pub stale: bool,
    /// The agent announced a component inventory (by hash) that the record
    /// does not hold in full: ask for it with `ReportAvailableComponents`.
    pub components_needed: bool,
}

/// Custom messages kept per agent (the newest).
pub const KEPT_CUSTOM_MESSAGES: usize = 16;

/// Bytes of each kept custom message's data (the rest is cut, and said so).
pub const KEPT_CUSTOM_MESSAGE_BYTES: usize = 64 * 1024;

/// How far below a goodbye's sequence number a message still counts as a
/// straggler of it: a client retries a handful of messages, not thousands.
pub const STRAGGLER_WINDOW: u64 = 16;

/// Whether the record was last written through this link: plain HTTP (any
/// gateway: polls belong to no connection), or this very WebSocket
/// connection of this gateway.
pub fn on_link(record: &AgentRecord, gateway: &GatewayId, link: Link) -> bool {
    record.transport == link.transport() as i32
        && match link {
            Link::Http => true,
            Link::WebSocket(connection) => {
                record.gateway_id == gateway.as_str() && record.connection_id == connection.get()
            }
        }
}

/// A record for an agent never seen before.
pub fn new_record(tenant: &str, uid: &[u8]) -> AgentRecord {
    AgentRecord {
        tenant: tenant.to_owned(),
        instance_uid: uid.to_vec(),
        ..Default::default()
    }
}

/// Applies one report to the agent's record.
///
/// Sequence numbers: the next report must carry the previous number + 1. A
/// larger number means reports were lost, so we ask for full state. A number
/// that is not larger is a retry, a duplicate, or an agent that restarted its
/// counter; those carry their own state and are merged without complaint
/// (real clients, such as the Python one, repeat numbers on retries, and
/// answering each with ReportFullState would loop).
///
/// After a goodbye, a message numbered at or just below the goodbye's (within
/// [`STRAGGLER_WINDOW`]), without a description, on the same connection (or
/// plain HTTP again), is a straggler (a retried heartbeat that was queued as
/// the agent stopped, as the Python client does); it must not bring the agent
/// back online, so it is ignored. The window and the connection check keep a
/// forged goodbye with a huge sequence number from silencing the agent: its
/// real messages, far below that number or on a new connection, are merged.
pub fn merge(record: &mut AgentRecord, msg: &AgentToServer, arrival: &Arrival<'_>) -> Merged {
    let new_agent = record.first_seen_unix_ms == 0;
    let same_connection = on_link(record, arrival.gateway, arrival.link);
    if !new_agent
        && !record.connected
        && same_connection
        && msg.sequence_num <= record.sequence_num
        && record.sequence_num - msg.sequence_num < STRAGGLER_WINDOW
        && msg.agent_description.is_none()
        && msg.agent_disconnect.is_none()
    {
        return Merged {
            stale: true,
            ..Default::default()
        };
    }
    let baseline = record.sequence_num.max(arrival.acked_sequence_num);
    let gap = !new_agent && msg.sequence_num > baseline.saturating_add(1);
    let undescribed = msg.agent_description.is_none() && record.description.is_none();
    let disconnected = msg.agent_disconnect.is_some();

    record.sequence_num = msg.sequence_num;
    record.capabilities = msg.capabilities;
    replace_if_present(&mut record.description, &msg.agent_description);
    replace_if_present(&mut record.health, &msg.health);
    replace_if_present(&mut record.effective_config, &msg.effective_config);
    if msg.effective_config.is_some()
        && let Some(map) = record.effective_config.as_mut().and_then(|e| e.config_map.as_mut())
    {
        // Alternative views (the Collector's `raw`) may hold literal secrets:
        // their bodies are never kept.
        crate::drift::redact_alternative_views(map);
    }
    replace_if_present(&mut record.remote_config_status, &msg.remote_config_status);
    replace_if_present(&mut record.package_statuses, &msg.package_statuses);
    replace_if_present(&mut record.custom_capabilities, &msg.custom_capabilities);
    let components_needed = merge_components(record, msg);
    if let Some(message) = &msg.custom_message {
        if record.custom_messages.len() >= KEPT_CUSTOM_MESSAGES {
            record.custom_messages.remove(0);
        }
        // Bounded: a message may be as large as the transport allows, and
        // the record is rewritten on every report.
        let truncated = message.data.len() > KEPT_CUSTOM_MESSAGE_BYTES;
        let mut kept = message.clone();
        kept.data.truncate(KEPT_CUSTOM_MESSAGE_BYTES);
        record.custom_messages.push(ReceivedCustomMessage {
            message: Some(kept),
            unix_ms: arrival.now_unix_ms,
            truncated,
        });
    }
    replace_if_present(&mut record.connection_settings_status, &msg.connection_settings_status);

    if new_agent {
        record.first_seen_unix_ms = arrival.now_unix_ms;
    }
    record.last_seen_unix_ms = arrival.now_unix_ms;
    record.connected = !disconnected;
    record.gateway_id = arrival.gateway.to_string();
    record.connection_id = fleetplane_proto::ConnectionId::wire(arrival.link.connection());
    record.transport = arrival.link.transport() as i32;
    if !arrival.endpoint.is_empty() {
        record.endpoint = arrival.endpoint.to_owned();
    }

    Merged {
        full_state_needed: !disconnected && (gap || undescribed),
        new_agent,
        disconnected,
        stale: false,
        components_needed: components_needed && !disconnected,
    }
}

/// Available components (spec 4.I.48): agents send the hash alone while it
/// is unchanged. A hash-only report keeps the stored map when the hash
/// matches; a new hash without its map replaces the record's (so the view
/// never shows an old map under a new hash) and asks for the map.
fn merge_components(record: &mut AgentRecord, msg: &AgentToServer) -> bool {
    let Some(reported) = &msg.available_components else {
        return false;
    };
    if !reported.components.is_empty() {
        let mut kept = reported.clone();
        cap_inventory(&mut kept);
        record.available_components = Some(kept);
        return false;
    }
    let known = record
        .available_components
        .as_ref()
        .is_some_and(|stored| stored.hash == reported.hash && !stored.components.is_empty());
    if !known {
        record.available_components = Some(reported.clone());
    }
    !known && !reported.hash.is_empty()
}

/// Bytes (encoded) of an inventory kept whole in a record: a Collector's is
/// a few KiB. The record is rewritten on every report.
pub const KEPT_INVENTORY_BYTES: usize = 256 * 1024;

/// Component types kept per record when an inventory is larger than
/// [`KEPT_INVENTORY_BYTES`].
pub const KEPT_COMPONENT_TYPES: usize = 2_000;

/// Bounds an inventory an agent sent: one larger than any real agent's
/// keeps its categories and at most [`KEPT_COMPONENT_TYPES`] types, without
/// metadata. It still counts as known (not asked for again), so an agent
/// cannot make every report carry it.
fn cap_inventory(inventory: &mut fleetplane_proto::opamp::AvailableComponents) {
    const CATEGORIES: usize = 64;
    const NAME_BYTES: usize = 128;
    if fleetplane_proto::Message::encoded_len(inventory) <= KEPT_INVENTORY_BYTES {
        return;
    }
    let mut categories = 0;
    inventory.components.retain(|name, _| {
        let keep = categories < CATEGORIES && name.len() <= NAME_BYTES;
        categories += usize::from(keep);
        keep
    });
    let mut left = KEPT_COMPONENT_TYPES;
    for details in inventory.components.values_mut() {
        details.metadata.clear();
        let types: Vec<String> = details
            .sub_component_map
            .keys()
            .filter(|t| t.len() <= NAME_BYTES)
            .take(left)
            .cloned()
            .collect();
        left -= types.len();
        details.sub_component_map = types.into_iter().map(|t| (t, Default::default())).collect();
    }
}

fn replace_if_present<T: Clone>(stored: &mut Option<T>, reported: &Option<T>) {
    if let Some(value) = reported {
        *stored = Some(value.clone());
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use fleetplane_proto::{
        attributes::string_kv,
        opamp::{AgentDescription, AgentDisconnect, ComponentHealth, RemoteConfigStatus},
    };

    static GATEWAY: std::sync::LazyLock<GatewayId> = std::sync::LazyLock::new(|| GatewayId::new("gw-1").unwrap());

    fn arrival(now: u64) -> Arrival<'static> {
        Arrival {
            gateway: &GATEWAY,
            link: Link::WebSocket(fleetplane_proto::ConnectionId::new(1).unwrap()),
            endpoint: "ws://127.0.0.1:4320/v1/opamp",
            now_unix_ms: now,
            acked_sequence_num: 0,
        }
    }

    fn full(seq: u64) -> AgentToServer {
        AgentToServer {
            instance_uid: vec![1; 16],
            sequence_num: seq,
            capabilities: 0x1,
            agent_description: Some(AgentDescription {
                identifying_attributes: vec![string_kv("service.name", "checkout")],
                non_identifying_attributes: vec![],
            }),
            health: Some(ComponentHealth {
                healthy: true,
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    fn heartbeat(seq: u64) -> AgentToServer {
        AgentToServer {
            instance_uid: vec![1; 16],
            sequence_num: seq,
            capabilities: 0x1,
            ..Default::default()
        }
    }

    #[test]
    fn omitted_fields_keep_their_values() {
        let mut record = new_record("default", &[1; 16]);
        let first = merge(&mut record, &full(1), &arrival(10));
        assert_eq!(
            first,
            Merged {
                new_agent: true,
                ..Default::default()
            }
        );
        let second = merge(&mut record, &heartbeat(2), &arrival(20));
        assert_eq!(second, Merged::default());
        assert!(record.description.is_some());
        assert!(record.health.as_ref().unwrap().healthy);
        assert_eq!(record.first_seen_unix_ms, 10);
        assert_eq!(record.last_seen_unix_ms, 20);
    }

    #[test]
    fn present_fields_replace_whole() {
        let mut record = new_record("default", &[1; 16]);
        merge(&mut record, &full(1), &arrival(1));
        let mut msg = heartbeat(2);
        msg.remote_config_status = Some(RemoteConfigStatus {
            last_remote_config_hash: vec![3; 32],
            status: 3,
            error_message: "boom".into(),
        });
        msg.health = Some(ComponentHealth::default());
        merge(&mut record, &msg, &arrival(2));
        assert!(!record.health.as_ref().unwrap().healthy);
        assert_eq!(record.remote_config_status.as_ref().unwrap().error_message, "boom");
    }

    #[test]
    fn unknown_agent_without_description_must_report_full_state() {
        let mut record = new_record("default", &[1; 16]);
        let merged = merge(&mut record, &heartbeat(7), &arrival(1));
        assert!(merged.full_state_needed);
        assert!(merged.new_agent);
    }

    #[test]
    fn a_sequence_gap_asks_for_full_state_once() {
        let mut record = new_record("default", &[1; 16]);
        merge(&mut record, &full(1), &arrival(1));
        assert!(merge(&mut record, &heartbeat(5), &arrival(2)).full_state_needed);
        assert!(!merge(&mut record, &full(6), &arrival(3)).full_state_needed);
    }

    #[test]
    fn heartbeats_answered_by_the_gateway_are_not_gaps() {
        let mut record = new_record("default", &[1; 16]);
        merge(&mut record, &full(1), &arrival(1));
        // Heartbeats 2..=5 were answered by the gateway; their liveness batch
        // has not arrived yet, but the report says so.
        let mut at = arrival(2);
        at.acked_sequence_num = 5;
        assert!(!merge(&mut record, &heartbeat(6), &at).full_state_needed);
    }

    #[test]
    fn retries_and_restarts_are_not_gaps() {
        let mut record = new_record("default", &[1; 16]);
        merge(&mut record, &full(4), &arrival(1));
        assert!(!merge(&mut record, &heartbeat(4), &arrival(2)).full_state_needed);
        assert!(!merge(&mut record, &heartbeat(0), &arrival(3)).full_state_needed);
    }

    #[test]
    fn a_straggler_after_goodbye_does_not_revive_the_agent() {
        let mut record = new_record("default", &[1; 16]);
        merge(&mut record, &full(1), &arrival(1));
        let mut bye = heartbeat(2);
        bye.agent_disconnect = Some(AgentDisconnect {});
        merge(&mut record, &bye, &arrival(2));
        let late = merge(&mut record, &heartbeat(2), &arrival(3));
        assert!(late.stale);
        assert!(!record.connected);
        assert_eq!(record.last_seen_unix_ms, 2);
        // A real return (next number) brings it back.
        assert!(!merge(&mut record, &heartbeat(3), &arrival(4)).stale);
        assert!(record.connected);
    }

    #[test]
    fn a_forged_goodbye_with_a_huge_sequence_number_does_not_silence_the_agent() {
        let mut record = new_record("default", &[1; 16]);
        merge(&mut record, &full(1), &arrival(1));
        let mut forged = heartbeat(1 << 62);
        forged.agent_disconnect = Some(AgentDisconnect {});
        merge(&mut record, &forged, &arrival(2));
        assert!(!record.connected);
        // The agent's own next message, far below the forged number, is merged.
        let mut status = heartbeat(2);
        status.health = Some(ComponentHealth::default());
        let merged = merge(&mut record, &status, &arrival(3));
        assert!(!merged.stale);
        assert!(record.connected);
        assert!(!record.health.as_ref().unwrap().healthy, "its status was saved");
    }

    #[test]
    fn a_message_on_a_new_connection_after_goodbye_is_not_a_straggler() {
        let mut record = new_record("default", &[1; 16]);
        merge(&mut record, &full(1), &arrival(1));
        let mut bye = heartbeat(5);
        bye.agent_disconnect = Some(AgentDisconnect {});
        merge(&mut record, &bye, &arrival(2));
        let elsewhere = Arrival {
            link: Link::WebSocket(fleetplane_proto::ConnectionId::new(2).unwrap()),
            ..arrival(3)
        };
        assert!(!merge(&mut record, &heartbeat(5), &elsewhere).stale);
        assert!(record.connected);
    }

    #[test]
    fn disconnect_marks_offline() {
        let mut record = new_record("default", &[1; 16]);
        merge(&mut record, &full(1), &arrival(1));
        assert!(record.connected);
        let mut bye = heartbeat(9);
        bye.agent_disconnect = Some(AgentDisconnect {});
        let merged = merge(&mut record, &bye, &arrival(2));
        assert!(merged.disconnected);
        assert!(!merged.full_state_needed, "never ask a leaving agent for more");
        assert!(!record.connected);
    }

    /// A huge inventory is kept bounded and still counts as known: the agent
    /// is not asked for it again, so it cannot make every report carry it.
    #[test]
    fn a_huge_inventory_is_kept_bounded_and_not_asked_for_again() {
        use fleetplane_proto::opamp::{AvailableComponents, ComponentDetails};
        let mut record = new_record("default", &[1; 16]);
        merge(&mut record, &full(1), &arrival(10));
        let details = |n: usize| ComponentDetails {
            metadata: vec![string_kv("code.namespace", "x".repeat(100))],
            sub_component_map: (0..n)
                .map(|i| (format!("type-{i}"), ComponentDetails::default()))
                .collect(),
        };
        let mut msg = heartbeat(2);
        msg.available_components = Some(AvailableComponents {
            hash: vec![9; 8],
            components: [
                ("receivers".to_owned(), details(30_000)),
                ("exporters".to_owned(), details(30_000)),
                ("x".repeat(10_000), details(1)),
            ]
            .into(),
        });
        assert!(!merge(&mut record, &msg, &arrival(20)).components_needed);
        let kept = record.available_components.as_ref().unwrap();
        assert!(fleetplane_proto::Message::encoded_len(kept) <= KEPT_INVENTORY_BYTES);
        let types: usize = kept.components.values().map(|d| d.sub_component_map.len()).sum();
        assert_eq!(types, KEPT_COMPONENT_TYPES);
        assert!(kept.components.keys().all(|c| c.len() <= 128));
        let mut again = heartbeat(3);
        again.available_components = Some(AvailableComponents {
            hash: vec![9; 8],
            components: Default::default(),
        });
        assert!(
            !merge(&mut record, &again, &arrival(30)).components_needed,
            "known: not asked again"
        );
    }

    #[test]
    fn components_are_asked_for_once_per_new_hash_and_kept_while_it_holds() {
        use fleetplane_proto::opamp::{AvailableComponents, ComponentDetails, CustomMessage};
        let mut record = new_record("default", &[1; 16]);
        merge(&mut record, &full(1), &arrival(10));
        let announce = |seq, hash: u8, full: bool| {
            let mut msg = heartbeat(seq);
            msg.available_components = Some(AvailableComponents {
                hash: vec![hash; 8],
                components: if full {
                    [("receivers".to_owned(), ComponentDetails::default())].into()
                } else {
                    Default::default()
                },
            });
            msg
        };
        assert!(merge(&mut record, &announce(2, 1, false), &arrival(20)).components_needed);
        assert!(!merge(&mut record, &announce(3, 1, true), &arrival(30)).components_needed);
        // The same hash alone again: nothing to ask, the map is kept.
        assert!(!merge(&mut record, &announce(4, 1, false), &arrival(40)).components_needed);
        assert_eq!(record.available_components.as_ref().unwrap().components.len(), 1);
        // A new hash: the old map goes, the new one is asked for.
        assert!(merge(&mut record, &announce(5, 2, false), &arrival(50)).components_needed);
        assert!(record.available_components.as_ref().unwrap().components.is_empty());

        // Custom messages from the agent are kept, the newest few.
        for seq in 6..6 + KEPT_CUSTOM_MESSAGES as u64 + 3 {
            let mut msg = heartbeat(seq);
            msg.custom_message = Some(CustomMessage {
                capability: "io.example.echo".into(),
                r#type: format!("t{seq}"),
                data: vec![],
            });
            merge(&mut record, &msg, &arrival(seq));
        }
        assert_eq!(record.custom_messages.len(), KEPT_CUSTOM_MESSAGES);
        let last = record.custom_messages.last().unwrap().message.as_ref().unwrap();
        assert_eq!(last.r#type, format!("t{}", 5 + KEPT_CUSTOM_MESSAGES as u64 + 3));
    }
}
