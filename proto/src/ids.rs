//! Typed identities shared by every crate, so that a tenant is never confused
//! with a gateway or a hash with a uid.

use std::fmt;

use sha2::{Digest, Sha256};

use crate::opamp::AgentConfigMap;

/// Why a text is not a valid identifier.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IdError {
    /// Tenant and gateway ids are used in NATS subjects and Redis keys, so they
    /// are limited to characters that are safe in both.
    #[error("{kind} id {value:?} must be 1 to 64 characters of [a-z0-9_-]")]
    BadName {
        /// Which id was bad.
        kind: &'static str,
        /// The offending text.
        value: String,
    },
    /// A config hash is a SHA-256: 32 bytes, 64 hex digits.
    #[error("config hash must be 32 bytes (64 hex digits), got {0:?}")]
    BadHash(String),
}

fn check_name(kind: &'static str, value: &str) -> Result<(), IdError> {
    let ok = !value.is_empty()
        && value.len() <= 64
        && value
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_');
    if ok {
        Ok(())
    } else {
        Err(IdError::BadName {
            kind,
            value: value.to_owned(),
        })
    }
}

macro_rules! name_id {
    ($(#[$doc:meta])* $name:ident, $kind:literal) => {
        $(#[$doc])*
        #[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
        pub struct $name(String);

        impl $name {
            /// Validates and wraps an id.
            pub fn new(value: impl Into<String>) -> Result<Self, IdError> {
                let value = value.into();
                check_name($kind, &value)?;
                Ok(Self(value))
            }

            /// The id as text.
            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        /// Maps keyed by the id can be looked up with the text a record
        /// holds (hash and equality are the text's).
        impl std::borrow::Borrow<str> for $name {
            fn borrow(&self) -> &str {
                &self.0
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }

        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "{}({:?})", stringify!($name), self.0)
            }
        }
    };
}

name_id!(
    /// The tenant a record belongs to. Every record carries one so that one
    /// control plane can serve many customers; until authentication maps
    /// credentials to tenants, everything lives in [`TenantId::default_tenant`].
    TenantId,
    "tenant"
);

name_id!(
    /// One gateway process. Coordinators address server-to-agent messages to
    /// the gateway that holds the agent's connection.
    GatewayId,
    "gateway"
);

impl TenantId {
    /// The tenant used when no authentication maps an agent to another.
    pub fn default_tenant() -> Self {
        Self("default".to_owned())
    }
}

impl Default for TenantId {
    fn default() -> Self {
        Self::default_tenant()
    }
}

impl GatewayId {
    /// A random id for a gateway that was not given one.
    pub fn random() -> Self {
        Self(format!("gw-{}", uuid::Uuid::now_v7().simple()))
    }
}

/// SHA-256 of a configuration's canonical encoding: what `AgentRemoteConfig.config_hash`
/// carries and what agents report back in `RemoteConfigStatus.last_remote_config_hash`.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ConfigHash([u8; 32]);

impl ConfigHash {
    /// Hashes a config map canonically: files in name order, each as
    /// length-prefixed name, content type and body. The same files always give
    /// the same hash, whatever order they were given in.
    ///
    /// ```
    /// # use fleetplane_proto::{ConfigHash, opamp::{AgentConfigMap, AgentConfigFile}};
    /// let mut map = AgentConfigMap::default();
    /// map.config_map.insert("".into(), AgentConfigFile { body: b"receivers: {}".to_vec(), content_type: "text/yaml".into(), role: String::new() });
    /// let a = ConfigHash::of_config(&map);
    /// map.config_map.get_mut("").unwrap().body.push(b'\n');
    /// assert_ne!(a, ConfigHash::of_config(&map));
    /// ```
    pub fn of_config(config: &AgentConfigMap) -> Self {
        let mut hasher = Sha256::new();
        hasher.update(b"fleetplane-config-v1");
        for (name, file) in &config.config_map {
            for part in [
                name.as_bytes(),
                file.content_type.as_bytes(),
                file.role.as_bytes(),
                &file.body,
            ] {
                hasher.update((part.len() as u64).to_le_bytes());
                hasher.update(part);
            }
        }
        Self(hasher.finalize().into())
    }

    /// Wraps a hash taken from the wire or a store.
    pub fn from_slice(bytes: &[u8]) -> Result<Self, IdError> {
        <[u8; 32]>::try_from(bytes)
            .map(Self)
            .map_err(|_| IdError::BadHash(hex::encode(bytes)))
    }

    /// Parses 64 hex digits.
    pub fn parse(text: &str) -> Result<Self, IdError> {
        let mut bytes = [0u8; 32];
        hex::decode_to_slice(text, &mut bytes).map_err(|_| IdError::BadHash(text.to_owned()))?;
        Ok(Self(bytes))
    }

    /// The raw 32 bytes.
    pub const fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }

    /// The bytes as an owned vector, for prost fields.
    pub fn to_vec(&self) -> Vec<u8> {
        self.0.to_vec()
    }
}

impl fmt::Display for ConfigHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&hex::encode(self.0))
    }
}

impl fmt::Debug for ConfigHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ConfigHash({self})")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::opamp::AgentConfigFile;

    fn file(body: &str) -> AgentConfigFile {
        AgentConfigFile {
            body: body.as_bytes().to_vec(),
            content_type: "text/yaml".into(),
            role: String::new(),
        }
    }

    #[test]
    fn ids_reject_unsafe_text() {
        assert!(TenantId::new("acme-prod_1").is_ok());
        for bad in ["", "Acme", "a.b", "a*", "a b", &"x".repeat(65)] {
            assert!(TenantId::new(bad).is_err(), "{bad:?} accepted");
        }
        assert!(GatewayId::new(GatewayId::random().as_str()).is_ok());
    }

    #[test]
    fn hash_is_canonical_and_sensitive() {
        let mut a = AgentConfigMap::default();
        a.config_map.insert("a.yaml".into(), file("x"));
        a.config_map.insert("b.yaml".into(), file("y"));
        let mut b = AgentConfigMap::default();
        b.config_map.insert("b.yaml".into(), file("y"));
        b.config_map.insert("a.yaml".into(), file("x"));
        assert_eq!(ConfigHash::of_config(&a), ConfigHash::of_config(&b));

        // Moving bytes between name and body must change the hash.
        let mut c = AgentConfigMap::default();
        c.config_map.insert("a.yamlx".into(), file(""));
        c.config_map.insert("b.yaml".into(), file("y"));
        assert_ne!(ConfigHash::of_config(&a), ConfigHash::of_config(&c));
    }

    #[test]
    fn hash_text_round_trip() {
        let h = ConfigHash::of_config(&AgentConfigMap::default());
        assert_eq!(ConfigHash::parse(&h.to_string()), Ok(h));
        assert_eq!(ConfigHash::from_slice(h.as_bytes()), Ok(h));
        assert!(ConfigHash::from_slice(&[1, 2, 3]).is_err());
    }
}
