//! The server's configuration: a TOML file, then environment overrides, with a
//! default for everything, validated before anything binds.
//!
//! ```toml
//! [opamp]
//! listen = "127.0.0.1:4320"        # OpAMP, WebSocket and HTTP, path /v1/opamp
//! max_message_bytes = 67108864     # inbound limit after decompression
//! # public_url = "wss://opamp.example.com/v1/opamp"
//!
//! [admin]
//! listen = "127.0.0.1:4321"        # admin API, /livez, /readyz
//! # token = "secret"               # require Authorization: Bearer <token>
//!
//! [store]
//! data_dir = "./fleetplane-data"   # embedded database
//!
//! [agents]
//! heartbeat_interval_secs = 30     # offered to agents; 0 = offer none
//! http_offline_after_secs = 90     # silent HTTP agents count as offline
//!
//! [log]
//! format = "text"                  # or "json"
//! filter = "info"                  # RUST_LOG syntax; RUST_LOG wins when set
//! ```
//!
//! Environment overrides: `FLEETPLANE_OPAMP_LISTEN`, `FLEETPLANE_ADMIN_LISTEN`,
//! `FLEETPLANE_ADMIN_TOKEN`, `FLEETPLANE_DATA_DIR`,
//! `FLEETPLANE_HEARTBEAT_INTERVAL_SECS`, `FLEETPLANE_LOG_FORMAT`.

use std::{net::SocketAddr, path::PathBuf};

use serde::Deserialize;

/// Why the configuration is unusable.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read config file {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The file is not valid TOML for this schema (unknown keys included).
    #[error("invalid config file {path}: {message}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// The parser's message, with line and column.
        message: String,
    },
    /// An environment variable holds a value of the wrong form.
    #[error("environment variable {name}={value:?} is invalid: {reason}")]
    Env {
        /// The variable.
        name: &'static str,
        /// Its value.
        value: String,
        /// Why it is wrong.
        reason: String,
    },
    /// A value is out of range.
    #[error("{0}")]
    Invalid(String),
}

/// The whole configuration of the all-in-one server.
#[derive(Debug, Clone, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// The agent-facing OpAMP listener.
    pub opamp: OpampConfig,
    /// The operators' admin API.
    pub admin: AdminConfig,
    /// Durable state.
    pub store: StoreConfig,
    /// Behaviour towards agents.
    pub agents: AgentsConfig,
    /// Logging.
    pub log: LogConfig,
}

/// `[opamp]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct OpampConfig {
    /// Address for OpAMP over WebSocket and HTTP. Default 127.0.0.1:4320.
    pub listen: SocketAddr,
    /// Largest inbound message in bytes, after decompression. Default 64 MiB.
    pub max_message_bytes: usize,
    /// URL agents use to reach us, restated in connection-settings offers.
    pub public_url: Option<String>,
}

impl Default for OpampConfig {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], fleetplane_proto::http::DEFAULT_PORT)),
            max_message_bytes: fleetplane_proto::http::DEFAULT_MAX_MESSAGE_BYTES,
            public_url: None,
        }
    }
}

/// `[admin]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AdminConfig {
    /// Address of the admin API. Default 127.0.0.1:4321.
    pub listen: SocketAddr,
    /// Bearer token required on `/api`; none by default (bind to loopback).
    pub token: Option<String>,
}

impl Default for AdminConfig {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 4321)),
            token: None,
        }
    }
}

/// `[store]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct StoreConfig {
    /// Directory of the embedded database. Default `./fleetplane-data`.
    pub data_dir: PathBuf,
}

impl Default for StoreConfig {
    fn default() -> Self {
        Self {
            data_dir: PathBuf::from("fleetplane-data"),
        }
    }
}

/// `[agents]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AgentsConfig {
    /// Heartbeat interval offered to agents (seconds). 0 offers none. Default 30.
    pub heartbeat_interval_secs: u64,
    /// HTTP agents silent this long count as offline (seconds). Default 90.
    pub http_offline_after_secs: u64,
}

impl Default for AgentsConfig {
    fn default() -> Self {
        Self {
            heartbeat_interval_secs: 30,
            http_offline_after_secs: 90,
        }
    }
}

/// Log output format.
#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Human-readable lines.
    #[default]
    Text,
    /// One JSON object per line.
    Json,
}

/// `[log]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LogConfig {
    /// Text or JSON.
    pub format: LogFormat,
    /// Filter in `RUST_LOG` syntax; `RUST_LOG` overrides it. Default "info".
    pub filter: String,
}

impl Default for LogConfig {
    fn default() -> Self {
        Self {
            format: LogFormat::Text,
            filter: "info".into(),
        }
    }
}

impl Config {
    /// Reads `path` (if given), applies environment overrides from `env`, and
    /// validates. `env` is a parameter so tests never touch the process env.
    pub fn load(path: Option<&std::path::Path>, env: impl Fn(&str) -> Option<String>) -> Result<Self, ConfigError> {
        let mut config = match path {
            Some(path) => {
                let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
                    path: path.to_owned(),
                    source,
                })?;
                toml::from_str(&text).map_err(|e| ConfigError::Parse {
                    path: path.to_owned(),
                    message: e.to_string(),
                })?
            }
            None => Config::default(),
        };
        config.apply_env(env)?;
        config.validate()?;
        Ok(config)
    }

    fn apply_env(&mut self, env: impl Fn(&str) -> Option<String>) -> Result<(), ConfigError> {
        fn parse<T: std::str::FromStr>(name: &'static str, value: String) -> Result<T, ConfigError>
        where
            T::Err: std::fmt::Display,
        {
            value.parse().map_err(|e: T::Err| ConfigError::Env {
                name,
                reason: e.to_string(),
                value,
            })
        }
        if let Some(v) = env("FLEETPLANE_OPAMP_LISTEN") {
            self.opamp.listen = parse("FLEETPLANE_OPAMP_LISTEN", v)?;
        }
        if let Some(v) = env("FLEETPLANE_ADMIN_LISTEN") {
            self.admin.listen = parse("FLEETPLANE_ADMIN_LISTEN", v)?;
        }
        if let Some(v) = env("FLEETPLANE_ADMIN_TOKEN") {
            self.admin.token = Some(v);
        }
        if let Some(v) = env("FLEETPLANE_DATA_DIR") {
            self.store.data_dir = PathBuf::from(v);
        }
        if let Some(v) = env("FLEETPLANE_HEARTBEAT_INTERVAL_SECS") {
            self.agents.heartbeat_interval_secs = parse("FLEETPLANE_HEARTBEAT_INTERVAL_SECS", v)?;
        }
        if let Some(v) = env("FLEETPLANE_LOG_FORMAT") {
            self.log.format = match v.as_str() {
                "text" => LogFormat::Text,
                "json" => LogFormat::Json,
                _ => {
                    return Err(ConfigError::Env {
                        name: "FLEETPLANE_LOG_FORMAT",
                        value: v,
                        reason: "expected text or json".into(),
                    });
                }
            };
        }
        Ok(())
    }

    fn validate(&self) -> Result<(), ConfigError> {
        if self.opamp.max_message_bytes < 1024 {
            return Err(ConfigError::Invalid(format!(
                "opamp.max_message_bytes = {} is too small (at least 1024)",
                self.opamp.max_message_bytes
            )));
        }
        if self.opamp.listen == self.admin.listen && self.opamp.listen.port() != 0 {
            return Err(ConfigError::Invalid(format!(
                "opamp.listen and admin.listen are both {}",
                self.opamp.listen
            )));
        }
        if let Some(url) = &self.opamp.public_url
            && !["ws://", "wss://", "http://", "https://"]
                .iter()
                .any(|s| url.starts_with(s))
        {
            return Err(ConfigError::Invalid(format!(
                "opamp.public_url {url:?} must start with ws://, wss://, http:// or https://"
            )));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn no_env(_: &str) -> Option<String> {
        None
    }

    fn write(text: &str) -> tempfile::NamedTempFile {
        let file = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(file.path(), text).unwrap();
        file
    }

    #[test]
    fn defaults_listen_on_loopback_4320() {
        let config = Config::load(None, no_env).unwrap();
        assert_eq!(config.opamp.listen.to_string(), "127.0.0.1:4320");
        assert_eq!(config.admin.listen.to_string(), "127.0.0.1:4321");
        assert_eq!(config.agents.heartbeat_interval_secs, 30);
    }

    #[test]
    fn file_then_env() {
        let file = write("[opamp]\nlisten = \"127.0.0.1:5000\"\n[agents]\nheartbeat_interval_secs = 5\n");
        let env = |name: &str| (name == "FLEETPLANE_HEARTBEAT_INTERVAL_SECS").then(|| "7".to_owned());
        let config = Config::load(Some(file.path()), env).unwrap();
        assert_eq!(config.opamp.listen.port(), 5000);
        assert_eq!(config.agents.heartbeat_interval_secs, 7);
    }

    #[test]
    fn unknown_keys_are_errors() {
        let file = write("[opamp]\nlisten_addr = \"127.0.0.1:5000\"\n");
        let err = Config::load(Some(file.path()), no_env).unwrap_err();
        assert!(err.to_string().contains("listen_addr"), "{err}");
    }

    #[test]
    fn bad_env_values_name_the_variable() {
        let env = |name: &str| (name == "FLEETPLANE_OPAMP_LISTEN").then(|| "nowhere".to_owned());
        let err = Config::load(None, env).unwrap_err();
        assert!(err.to_string().contains("FLEETPLANE_OPAMP_LISTEN"), "{err}");
    }

    #[test]
    fn clashing_ports_are_refused() {
        let file = write("[opamp]\nlisten = \"127.0.0.1:5000\"\n[admin]\nlisten = \"127.0.0.1:5000\"\n");
        assert!(matches!(
            Config::load(Some(file.path()), no_env),
            Err(ConfigError::Invalid(_))
        ));
    }
}
