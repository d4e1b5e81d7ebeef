//! Shared set-up for the all-in-one integration tests.
#![allow(dead_code)]

use std::path::Path;

use fleetplane::{AllInOne, Config};
use fleetplane_testkit::admin::Admin;

/// An all-in-one server on ephemeral loopback ports with its own data dir.
pub struct Server {
    pub server: AllInOne,
    pub data: tempfile::TempDir,
    pub admin: Admin,
}

pub fn config(data_dir: &Path) -> Config {
    let mut config = Config::default();
    config.opamp.listen = "127.0.0.1:0".parse().unwrap();
    config.admin.listen = "127.0.0.1:0".parse().unwrap();
    config.store.data_dir = data_dir.to_owned();
    // Tests stop servers often; closing at once keeps them quick.
    config.gateway.drain_ms = 0;
    config
}

impl Server {
    pub async fn start() -> Self {
        let data = tempfile::tempdir().unwrap();
        Self::start_with(data, |_| {}).await
    }

    pub async fn start_with(data: tempfile::TempDir, tweak: impl FnOnce(&mut Config)) -> Self {
        let mut config = config(data.path());
        tweak(&mut config);
        let server = AllInOne::start(&config).await.unwrap();
        let mut admin = Admin::new(server.admin_addr);
        if let Some(token) = &config.admin.token {
            admin = admin.with_token(token);
        }
        Self { server, data, admin }
    }

    pub fn ws_url(&self) -> String {
        format!("ws://{}/v1/opamp", self.server.opamp_addr)
    }

    pub fn http_url(&self) -> String {
        format!("http://{}/v1/opamp", self.server.opamp_addr)
    }

    /// Stops the server, keeping its data directory for a restart.
    pub async fn stop(self) -> tempfile::TempDir {
        self.server.stop().await.unwrap();
        self.data
    }
}
