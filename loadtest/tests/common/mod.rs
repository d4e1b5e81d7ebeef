//! What the load-tool smokes share: a live all-in-one control plane.

use fleetplane::{AllInOne, Config};

/// An all-in-one control plane on loopback ports with its data in a
/// temporary directory (kept alive by the returned guard).
pub async fn all_in_one() -> (AllInOne, tempfile::TempDir) {
    let data = tempfile::tempdir().unwrap();
    let mut config = Config::default();
    config.opamp.listen = "127.0.0.1:0".parse().unwrap();
    config.admin.listen = "127.0.0.1:0".parse().unwrap();
    config.store.data_dir = data.path().to_owned();
    config.gateway.drain_ms = 0;
    // The load tools' agents present no credentials: open mode.
    config.agents.auth = fleetplane::config::AgentAuth::None;
    let server = AllInOne::start(&config).await.unwrap();
    (server, data)
}
