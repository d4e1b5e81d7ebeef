use super::*;
use fleetplane_proto::{
    internal::ConfigFile,
    opamp::{ConnectionSettingsStatus, RemoteConfigStatus, RemoteConfigStatuses},
};
use std::collections::BTreeMap;

const ACCEPTS: u64 = AgentCapabilities::ReportsStatus as u64 | AgentCapabilities::AcceptsRemoteConfig as u64;
const REPORTS: u64 = AgentCapabilities::ReportsRemoteConfig as u64;
const HEARTBEAT: u64 =
    AgentCapabilities::AcceptsOpAmpConnectionSettings as u64 | AgentCapabilities::ReportsHeartbeat as u64;

fn settings() -> ReplySettings {
    ReplySettings {
        heartbeat_interval: Duration::from_secs(30),
        issuers: Default::default(),
    }
}

fn config(hash: u8) -> ConfigVersion {
    ConfigVersion {
        name: "base".into(),
        version: 1,
        hash: vec![hash; 32],
        files: BTreeMap::from([(
            "c.yaml".into(),
            ConfigFile {
                body: b"x".to_vec(),
                content_type: "text/yaml".into(),
            },
        )]),
        ..Default::default()
    }
}

fn record(caps: u64) -> AgentRecord {
    AgentRecord {
        instance_uid: vec![1; 16],
        capabilities: caps,
        endpoint: "ws://127.0.0.1:4320/v1/opamp".into(),
        ..Default::default()
    }
}

fn reported(record: &mut AgentRecord, hash: u8, status: RemoteConfigStatuses) {
    record.remote_config_status = Some(RemoteConfigStatus {
        last_remote_config_hash: vec![hash; 32],
        status: status as i32,
        error_message: String::new(),
    });
}

#[test]
fn every_reply_advertises_capabilities_and_addresses_the_agent() {
    let mut r = record(ACCEPTS);
    let reply = plan(&mut r, None, Extras::default(), Some(&Merged::default()), &settings());
    assert_eq!(reply.capabilities & 1, 1);
    assert_eq!(reply.instance_uid, vec![1; 16]);
    assert!(reply.remote_config.is_none());
    assert!(reply.error_response.is_none());
    assert!(reply.command.is_none(), "an empty command means restart: never set it");
}

fn reply() -> Option<&'static Merged> {
    static MERGED: Merged = Merged {
        full_state_needed: false,
        new_agent: false,
        disconnected: false,
        stale: false,
        components_needed: false,
    };
    Some(&MERGED)
}

#[test]
fn config_is_sent_until_the_agent_reports_its_hash() {
    let mut r = record(ACCEPTS | REPORTS);
    let desired = config(7);
    assert!(
        plan(&mut r, Some(&desired), Extras::default(), reply(), &settings())
            .remote_config
            .is_some()
    );
    // Still not reported (heartbeat crossed the offer): offered again.
    assert!(
        plan(&mut r, Some(&desired), Extras::default(), reply(), &settings())
            .remote_config
            .is_some()
    );
    reported(&mut r, 7, RemoteConfigStatuses::Applied);
    assert!(
        plan(&mut r, Some(&desired), Extras::default(), reply(), &settings())
            .remote_config
            .is_none()
    );
}

#[test]
fn pushes_do_not_repeat_an_offer_on_its_way() {
    let mut r = record(ACCEPTS | REPORTS);
    let desired = config(7);
    assert!(
        plan(&mut r, Some(&desired), Extras::default(), None, &settings())
            .remote_config
            .is_some()
    );
    assert!(
        plan(&mut r, Some(&desired), Extras::default(), None, &settings())
            .remote_config
            .is_none()
    );
    // The agent's next report still gets it if it never arrived.
    assert!(
        plan(&mut r, Some(&desired), Extras::default(), reply(), &settings())
            .remote_config
            .is_some()
    );
    // A new version is pushed.
    assert!(
        plan(&mut r, Some(&config(8)), Extras::default(), None, &settings())
            .remote_config
            .is_some()
    );
}

#[test]
fn a_failed_current_hash_is_not_resent() {
    let mut r = record(ACCEPTS | REPORTS);
    reported(&mut r, 7, RemoteConfigStatuses::Failed);
    assert!(
        plan(&mut r, Some(&config(7)), Extras::default(), None, &settings())
            .remote_config
            .is_none()
    );
    // A new config version is offered even after a failure.
    let reply = plan(&mut r, Some(&config(8)), Extras::default(), None, &settings());
    assert_eq!(reply.remote_config.unwrap().config_hash, vec![8; 32]);
}

#[test]
fn agents_without_status_reports_get_each_config_once() {
    let mut r = record(ACCEPTS);
    assert!(
        plan(&mut r, Some(&config(7)), Extras::default(), None, &settings())
            .remote_config
            .is_some()
    );
    assert!(
        plan(&mut r, Some(&config(7)), Extras::default(), None, &settings())
            .remote_config
            .is_none()
    );
    assert!(
        plan(&mut r, Some(&config(8)), Extras::default(), None, &settings())
            .remote_config
            .is_some()
    );
}

#[test]
fn no_config_for_agents_that_do_not_accept_it() {
    let mut r = record(AgentCapabilities::ReportsStatus as u64);
    assert!(
        plan(&mut r, Some(&config(7)), Extras::default(), None, &settings())
            .remote_config
            .is_none()
    );
}

#[test]
fn full_state_flag_follows_the_merge() {
    let mut r = record(ACCEPTS);
    let merged = Merged {
        full_state_needed: true,
        ..Default::default()
    };
    let reply = plan(&mut r, None, Extras::default(), Some(&merged), &settings());
    assert_eq!(reply.flags, ServerToAgentFlags::ReportFullState as u64);
}

#[test]
fn a_leaving_agent_gets_a_bare_acknowledgement() {
    let mut r = record(ACCEPTS | HEARTBEAT);
    let merged = Merged {
        disconnected: true,
        ..Default::default()
    };
    let reply = plan(&mut r, Some(&config(7)), Extras::default(), Some(&merged), &settings());
    assert!(reply.remote_config.is_none() && reply.connection_settings.is_none());
}

#[test]
fn heartbeat_offer_restates_endpoint_and_is_sent_once() {
    let mut r = record(ACCEPTS | HEARTBEAT);
    let offer = plan(&mut r, None, Extras::default(), None, &settings())
        .connection_settings
        .unwrap();
    let opamp = offer.opamp.unwrap();
    assert_eq!(opamp.destination_endpoint, "ws://127.0.0.1:4320/v1/opamp");
    assert_eq!(opamp.heartbeat_interval_seconds, 30);
    assert!(
        plan(&mut r, None, Extras::default(), None, &settings())
            .connection_settings
            .is_none()
    );
    // A changed interval is a new offer.
    let faster = ReplySettings {
        heartbeat_interval: Duration::from_secs(10),
        issuers: Default::default(),
    };
    assert!(
        plan(&mut r, None, Extras::default(), None, &faster)
            .connection_settings
            .is_some()
    );
}

#[test]
fn heartbeat_offer_follows_reported_status_when_available() {
    let mut r = record(ACCEPTS | HEARTBEAT | AgentCapabilities::ReportsConnectionSettingsStatus as u64);
    let offer = plan(&mut r, None, Extras::default(), None, &settings())
        .connection_settings
        .unwrap();
    assert!(
        plan(&mut r, None, Extras::default(), None, &settings())
            .connection_settings
            .is_some()
    );
    r.connection_settings_status = Some(ConnectionSettingsStatus {
        last_connection_settings_hash: offer.hash,
        status: 1,
        error_message: String::new(),
    });
    assert!(
        plan(&mut r, None, Extras::default(), None, &settings())
            .connection_settings
            .is_none()
    );
}

#[test]
fn no_heartbeat_offer_without_both_capabilities() {
    let mut r = record(ACCEPTS | AgentCapabilities::ReportsHeartbeat as u64);
    assert!(
        plan(&mut r, None, Extras::default(), None, &settings())
            .connection_settings
            .is_none()
    );
    let mut r = record(ACCEPTS | HEARTBEAT);
    let off = ReplySettings {
        heartbeat_interval: Duration::ZERO,
        issuers: Default::default(),
    };
    assert!(
        plan(&mut r, None, Extras::default(), None, &off)
            .connection_settings
            .is_none()
    );
}

#[test]
fn an_agent_offered_another_hash_gets_its_desired_one_whatever_it_reported() {
    // Runs hash 1, was offered 9 (a rollout's target) and never reported it;
    // the rollout rolled back, so 1 is desired again.
    let mut r = record(ACCEPTS | REPORTS);
    reported(&mut r, 1, RemoteConfigStatuses::Applied);
    r.offered_config_hash = vec![9; 32];
    let push = plan(&mut r, Some(&config(1)), Extras::default(), None, &settings());
    let offer = push.remote_config.expect("the previous config is pushed again");
    assert_eq!(offer.config_hash, vec![1; 32]);
    assert_eq!(r.offered_config_hash, vec![1; 32]);
    // Once offered, nothing more is sent while it reports the desired hash.
    let reply = plan(
        &mut r,
        Some(&config(1)),
        Extras::default(),
        Some(&Merged::default()),
        &settings(),
    );
    assert!(reply.remote_config.is_none());
}

#[test]
fn a_pending_restart_goes_alone_and_only_to_agents_that_accept_it() {
    let restartable = ACCEPTS | AgentCapabilities::AcceptsRestartCommand as u64;
    let mut r = record(restartable);
    r.pending_command = Some(ServerToAgentCommand::default());
    r.pending_command_unix_ms = 5;
    let reply = plan(
        &mut r,
        Some(&config(7)),
        Extras::default(),
        Some(&Merged::default()),
        &settings(),
    );
    assert!(reply.command.is_some());
    assert!(
        reply.remote_config.is_none() && reply.flags == 0,
        "nothing beside a command"
    );
    assert!(
        r.pending_command.is_none() && r.pending_command_unix_ms == 0,
        "sent once"
    );
    // The config follows on the next message.
    let next = plan(
        &mut r,
        Some(&config(7)),
        Extras::default(),
        Some(&Merged::default()),
        &settings(),
    );
    assert!(next.command.is_none() && next.remote_config.is_some());

    // An agent that stopped advertising the capability never gets it.
    let mut r = record(ACCEPTS);
    r.pending_command = Some(ServerToAgentCommand::default());
    let reply = plan(&mut r, None, Extras::default(), Some(&Merged::default()), &settings());
    assert!(reply.command.is_none());
    assert!(r.pending_command.is_none(), "dropped, not kept forever");
}

#[test]
fn a_custom_message_goes_only_under_a_capability_the_agent_lists() {
    let message = fleetplane_proto::opamp::CustomMessage {
        capability: "io.example.echo".into(),
        r#type: "ping".into(),
        data: vec![1],
    };
    let mut r = record(ACCEPTS);
    r.custom_capabilities = Some(CustomCapabilities {
        capabilities: vec!["io.example.echo".into()],
    });
    r.pending_custom_message = Some(message.clone());
    let reply = plan(&mut r, None, Extras::default(), None, &settings());
    assert!(worth_pushing(&reply));
    assert_eq!(reply.custom_message, Some(message.clone()));
    assert_eq!(
        reply.custom_capabilities.map(|c| c.capabilities),
        Some(vec!["io.example.echo".to_owned()]),
        "both sides must have listed it"
    );
    assert!(r.pending_custom_message.is_none());

    r.custom_capabilities = None;
    r.pending_custom_message = Some(message);
    let reply = plan(&mut r, None, Extras::default(), None, &settings());
    assert!(reply.custom_message.is_none() && !worth_pushing(&reply));
}

#[test]
fn an_unknown_component_hash_asks_for_the_full_list() {
    let mut r = record(ACCEPTS);
    let merged = Merged {
        components_needed: true,
        ..Merged::default()
    };
    let reply = plan(&mut r, None, Extras::default(), Some(&merged), &settings());
    assert_eq!(reply.flags, ServerToAgentFlags::ReportAvailableComponents as u64);
}

#[test]
fn connection_settings_go_part_by_part_to_agents_that_advertise_them() {
    use fleetplane_proto::opamp::TelemetryConnectionSettings;
    let destination = |url: &str| {
        Some(TelemetryConnectionSettings {
            destination_endpoint: url.into(),
            ..Default::default()
        })
    };
    let settings_for_all = ConnectionSettingsAssignment {
        name: "telemetry".into(),
        own_metrics: destination("https://m.example/v1/metrics"),
        own_logs: destination("https://l.example/v1/logs"),
        ..Default::default()
    };
    // Reports its own metrics, not its logs; takes no OpAMP settings.
    let mut r = record(ACCEPTS | AgentCapabilities::ReportsOwnMetrics as u64);
    let answer = plan(
        &mut r,
        None,
        Extras {
            connection: Some(&settings_for_all),
            ..Extras::default()
        },
        reply(),
        &settings(),
    );
    let offer = answer.connection_settings.expect("own metrics offered");
    assert!(offer.own_metrics.is_some() && offer.own_logs.is_none() && offer.opamp.is_none());
    assert!(!offer.hash.is_empty());
    // Nothing it can take: no offer at all.
    let mut r = record(ACCEPTS);
    assert!(
        plan(
            &mut r,
            None,
            Extras {
                connection: Some(&settings_for_all),
                ..Extras::default()
            },
            reply(),
            &settings()
        )
        .connection_settings
        .is_none()
    );
    // With OpAMP settings accepted, its endpoint and heartbeat are restated.
    let mut r = record(ACCEPTS | HEARTBEAT | AgentCapabilities::ReportsOwnMetrics as u64);
    let offer = plan(
        &mut r,
        None,
        Extras {
            connection: Some(&settings_for_all),
            ..Extras::default()
        },
        reply(),
        &settings(),
    )
    .connection_settings
    .unwrap();
    let opamp = offer.opamp.unwrap();
    assert_eq!(opamp.destination_endpoint, r.endpoint);
    assert_eq!(opamp.heartbeat_interval_seconds, 30);
}

#[test]
fn a_heartbeat_only_offer_keeps_its_earlier_hash() {
    // sha256(endpoint || interval as u64 little-endian), as before connection
    // settings by selector existed: an upgrade re-offers nothing.
    let mut r = record(ACCEPTS | HEARTBEAT);
    let offer = plan(&mut r, None, Extras::default(), reply(), &settings())
        .connection_settings
        .unwrap();
    let mut hasher = Sha256::new();
    hasher.update(r.endpoint.as_bytes());
    hasher.update(30u64.to_le_bytes());
    assert_eq!(offer.hash, hasher.finalize().to_vec());
}

#[test]
fn an_issued_certificate_is_restated_in_every_offer() {
    let mut r = record(ACCEPTS | HEARTBEAT);
    let plain = plan(&mut r, None, Extras::default(), reply(), &settings())
        .connection_settings
        .unwrap();
    assert!(plain.opamp.as_ref().unwrap().certificate.is_none());
    r.issued_certificate = Some(fleetplane_proto::opamp::TlsCertificate {
        cert: b"-----BEGIN CERTIFICATE-----".to_vec(),
        private_key: Vec::new(),
        ca_cert: b"ca".to_vec(),
    });
    let with = plan(&mut r, None, Extras::default(), reply(), &settings())
        .connection_settings
        .unwrap();
    assert_eq!(
        with.opamp.as_ref().unwrap().certificate,
        r.issued_certificate,
        "an opamp offer without it would tell the agent to drop it"
    );
    assert_ne!(with.hash, plain.hash);
    assert_eq!(
        with.opamp.unwrap().heartbeat_interval_seconds,
        30,
        "heartbeats still restated"
    );
}

#[test]
fn packages_go_to_agents_that_take_them_until_they_report_the_set() {
    use fleetplane_proto::{
        internal::PackageSet,
        opamp::{PackageAvailable, PackageStatuses, PackagesAvailable},
    };
    let set = PackageSet {
        name: "collector".into(),
        packages: Some(PackagesAvailable {
            packages: [("".to_owned(), PackageAvailable::default())].into(),
            all_packages_hash: vec![9; 32],
        }),
        ..Default::default()
    };
    let extras = Extras {
        packages: Some(&set),
        ..Extras::default()
    };
    let mut r = record(ACCEPTS);
    assert!(
        plan(&mut r, None, extras, reply(), &settings())
            .packages_available
            .is_none()
    );
    let mut r = record(ACCEPTS | AgentCapabilities::AcceptsPackages as u64);
    // It reports an older set.
    r.package_statuses = Some(PackageStatuses {
        server_provided_all_packages_hash: vec![1; 32],
        ..Default::default()
    });
    assert!(
        plan(&mut r, None, extras, reply(), &settings())
            .packages_available
            .is_some()
    );
    // A push does not repeat a set already on its way; a reply does, until
    // the agent reports it.
    assert!(
        plan(&mut r, None, extras, None, &settings())
            .packages_available
            .is_none()
    );
    assert!(
        plan(&mut r, None, extras, reply(), &settings())
            .packages_available
            .is_some()
    );
    r.package_statuses = Some(PackageStatuses {
        server_provided_all_packages_hash: vec![9; 32],
        ..Default::default()
    });
    assert!(
        plan(&mut r, None, extras, reply(), &settings())
            .packages_available
            .is_none()
    );
    // An agent that reports no statuses gets each set once.
    let mut quiet = record(ACCEPTS | AgentCapabilities::AcceptsPackages as u64);
    assert!(
        plan(&mut quiet, None, extras, reply(), &settings())
            .packages_available
            .is_some()
    );
    assert!(
        plan(&mut quiet, None, extras, reply(), &settings())
            .packages_available
            .is_none()
    );
    // Never an empty set: agents remove what is not offered.
    let empty = PackageSet::default();
    let mut r = record(ACCEPTS | AgentCapabilities::AcceptsPackages as u64);
    let none = Extras {
        packages: Some(&empty),
        ..Extras::default()
    };
    assert!(
        plan(&mut r, None, none, reply(), &settings())
            .packages_available
            .is_none()
    );
}
