//! Contexts: several control planes in one file, as kubectl has.
//!
//! `$FLEETCTL_CONFIG`, else `$XDG_CONFIG_HOME/fleetctl/config.toml`, else
//! `~/.config/fleetctl/config.toml`:
//!
//! ```toml
//! current = "prod"
//! [contexts.prod]
//! server = "https://fleet.example.com:4321"
//! token = "..."
//! tenant = "acme"
//! ```

use std::{collections::BTreeMap, path::PathBuf};

use anyhow::{Context as _, bail};
use serde::{Deserialize, Serialize};

#[derive(Debug, Default, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Contexts {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub current: Option<String>,
    #[serde(default)]
    pub contexts: BTreeMap<String, Context>,
}

#[derive(Debug, Default, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Context {
    pub server: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tenant: Option<String>,
}

/// Where the contexts file is.
pub fn path() -> anyhow::Result<PathBuf> {
    if let Some(path) = std::env::var_os("FLEETCTL_CONFIG") {
        return Ok(PathBuf::from(path));
    }
    let base = match std::env::var_os("XDG_CONFIG_HOME") {
        Some(dir) => PathBuf::from(dir),
        None => {
            PathBuf::from(std::env::var_os("HOME").context("neither FLEETCTL_CONFIG nor HOME is set")?).join(".config")
        }
    };
    Ok(base.join("fleetctl").join("config.toml"))
}

impl Contexts {
    /// The file's contexts (none if there is no file).
    pub fn load() -> anyhow::Result<Self> {
        let path = path()?;
        match std::fs::read_to_string(&path) {
            Ok(text) => {
                toml::from_str(&text).with_context(|| format!("{} is not a valid contexts file", path.display()))
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Self::default()),
            Err(e) => Err(e).with_context(|| format!("reading {}", path.display())),
        }
    }

    /// Writes the file (owner-only: it holds tokens).
    pub fn save(&self) -> anyhow::Result<()> {
        let path = path()?;
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        }
        let text = toml::to_string_pretty(self)?;
        let mut options = std::fs::OpenOptions::new();
        options.write(true).create(true).truncate(true);
        #[cfg(unix)]
        {
            // Created owner-only, never readable by others even briefly.
            use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
            options.mode(0o600);
            if path.exists() {
                std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))?;
            }
        }
        let mut file = options
            .open(&path)
            .with_context(|| format!("writing {}", path.display()))?;
        std::io::Write::write_all(&mut file, text.as_bytes()).with_context(|| format!("writing {}", path.display()))?;
        Ok(())
    }

    /// The named context, or the current one; `None` when neither exists.
    pub fn pick(&self, name: Option<&str>) -> anyhow::Result<Option<&Context>> {
        match name.or(self.current.as_deref()) {
            None => Ok(None),
            Some(name) => match self.contexts.get(name) {
                Some(context) => Ok(Some(context)),
                None => bail!("no context {name:?} (see `fleetctl context list`)"),
            },
        }
    }
}
