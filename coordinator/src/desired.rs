//! Which config an agent should run: the assignment that wins for it.
//!
//! When several assignments match one agent, the winner is the one with the
//! highest `priority`; among equal priorities the most specific selector (most
//! terms); among equals the first name in alphabetical order. The rule is total,
//! so every coordinator replica picks the same winner.

use fleetplane_proto::{
    ConfigHash, TenantId,
    internal::{AgentRecord, Assignment, ConfigVersion, ConnectionSettingsAssignment, PackageSet},
};

use crate::{
    selector::{Facts, Selector},
    store::{Store, StoreError},
};

/// The config an agent should run, and why.
#[derive(Debug, Clone, PartialEq)]
pub struct Desired {
    /// Name of the winning assignment.
    pub assignment: String,
    /// The config version it points at (shared with the store's cache:
    /// file bodies are not copied per report).
    pub config: std::sync::Arc<ConfigVersion>,
    /// The rollout overriding the assignment for this agent, if any.
    pub rollout: Option<String>,
    /// Layers (keyed assignments) that add keys to it, by name.
    pub layers: Vec<String>,
    /// The version hash of the base config (or the pin standing for it),
    /// before layers are merged in; empty with layers only.
    pub base_hash: Vec<u8>,
    /// The version hash of each layer's config (or the rollout pin standing
    /// for it), by config-map key.
    pub layer_hashes: std::collections::BTreeMap<String, Vec<u8>>,
}

impl Desired {
    /// Notes in `record` what the config just offered to it is made of
    /// (see `AgentRecord.offered_base_hash`).
    pub fn note_offer(&self, record: &mut AgentRecord) {
        record.offered_base_hash = self.base_hash.clone();
        record.offered_layer_hashes = self.layer_hashes.clone();
    }
}

/// What reaches agents by selector, under the one precedence rule.
pub trait Targeted {
    fn name(&self) -> &str;
    fn selector(&self) -> &str;
    fn priority(&self) -> i32;
}

/// Everything picked by selector has a name, a selector and a priority.
macro_rules! targeted {
    ($($kind:ty),*) => {$(
        impl Targeted for $kind {
            fn name(&self) -> &str {
                &self.name
            }
            fn selector(&self) -> &str {
                &self.selector
            }
            fn priority(&self) -> i32 {
                self.priority
            }
        }
    )*};
}

targeted!(Assignment, ConnectionSettingsAssignment, PackageSet);

/// The winner for an agent among `candidates` (assignments, connection
/// settings), if any matches.
pub fn pick<'a, T: Targeted>(candidates: &'a [T], facts: Facts<'_>) -> Option<&'a T> {
    candidates
        .iter()
        .filter_map(|a| match Selector::parse_cached(a.selector()) {
            Ok(selector) => selector.matches(facts).then_some((a, selector.len())),
            Err(e) => {
                // Selectors are validated on write; a bad one here was stored by
                // another version. Skip it rather than fail every report.
                tracing::warn!(assignment = %a.name(), error = %e, "skipping assignment with invalid selector");
                None
            }
        })
        .max_by(|(a, a_len), (b, b_len)| {
            a.priority()
                .cmp(&b.priority())
                .then(a_len.cmp(b_len))
                .then(b.name().cmp(a.name()))
        })
        .map(|(a, _)| a)
}

/// Resolves the desired config of one agent: a rollout's pin on the agent
/// wins over its base assignment; the layers (keyed assignments) that match
/// it add their keys.
pub async fn resolve(
    store: &dyn Store,
    tenant: &TenantId,
    record: &AgentRecord,
) -> Result<Option<Desired>, StoreError> {
    let assignments = store.assignments(tenant).await?;
    resolve_among(store, tenant, record, &assignments).await
}

/// [`resolve`] with the tenant's assignments already read.
pub async fn resolve_among(
    store: &dyn Store,
    tenant: &TenantId,
    record: &AgentRecord,
    assignments: &[Assignment],
) -> Result<Option<Desired>, StoreError> {
    let facts = Facts::from(record);
    let base = base_assignments(assignments);
    let winner = pick(&base, facts);
    let pinned = match ConfigHash::from_slice(&record.pinned_hash) {
        Ok(hash) => store.config_by_hash(tenant, &hash).await?,
        Err(_) => None,
    };
    // A pin without a key stands for the base config; with a key, for that
    // key's layer only.
    let (base_pin, key_pin) = match pinned {
        Some(config) if record.pinned_key.is_empty() => (Some(config), None),
        Some(config) => (None, Some(config)),
        None => (None, None),
    };
    let mut desired = if let Some(config) = base_pin {
        Some(Desired {
            assignment: winner.map(|w| w.name.clone()).unwrap_or_default(),
            base_hash: config.hash.clone(),
            config,
            rollout: Some(record.pinned_by.clone()),
            layers: Vec::new(),
            layer_hashes: Default::default(),
        })
    } else {
        match winner {
            Some(winner) => store
                .config_version(tenant, &winner.config_name, winner.config_version)
                .await?
                .map(|config| Desired {
                    assignment: winner.name.clone(),
                    base_hash: config.hash.clone(),
                    config,
                    rollout: None,
                    layers: Vec::new(),
                    layer_hashes: Default::default(),
                }),
            None => None,
        }
    };
    let layers = layers_for(assignments, facts);
    if layers.is_empty() && key_pin.is_none() {
        return Ok(desired);
    }
    let mut files = desired.as_ref().map(|d| d.config.files.clone()).unwrap_or_default();
    let mut names = Vec::new();
    let mut layer_hashes = std::collections::BTreeMap::new();
    let mut parts: Vec<(String, String, std::sync::Arc<ConfigVersion>)> = Vec::new();
    for layer in layers {
        if key_pin.is_some() && layer.config_key == record.pinned_key {
            // The rollout's pin stands in for this layer (below).
            names.push(layer.name.clone());
            continue;
        }
        if let Some(config) = store
            .config_version(tenant, &layer.config_name, layer.config_version)
            .await?
        {
            parts.push((layer.name.clone(), layer.config_key.clone(), config));
        }
    }
    if let Some(config) = &key_pin {
        // Held even if the agent stopped matching the layer: the rollout
        // decides when it lets go.
        parts.push((String::new(), record.pinned_key.clone(), config.clone()));
    }
    for (name, key, config) in parts {
        // A layer's config has one file (checked when it is assigned; a
        // later version of several files is left out, said loudly); its body
        // goes under the layer's key, over a base file of that name.
        match config.files.values().next() {
            Some(file) if config.files.len() == 1 => {
                files.insert(key.clone(), file.clone());
                layer_hashes.insert(key, config.hash.clone());
                if !name.is_empty() {
                    names.push(name);
                }
            }
            _ => tracing::warn!(
                layer = %name,
                key = %key,
                config = %config.name,
                version = config.version,
                "layer skipped: its config no longer has exactly one file"
            ),
        }
    }
    if layer_hashes.is_empty() {
        return Ok(desired);
    }
    let rollout = key_pin.as_ref().map(|_| record.pinned_by.clone());
    let hash = crate::store::files_hash(&files);
    let merged = ConfigVersion {
        tenant: tenant.to_string(),
        name: desired.as_ref().map(|d| d.config.name.clone()).unwrap_or_default(),
        version: desired.as_ref().map_or(0, |d| d.config.version),
        hash: hash.to_vec(),
        files,
        created_unix_ms: 0,
    };
    Ok(Some(match desired.take() {
        Some(base) => Desired {
            config: std::sync::Arc::new(merged),
            layers: names,
            layer_hashes,
            rollout: base.rollout.or(rollout),
            ..base
        },
        None => Desired {
            assignment: String::new(),
            config: std::sync::Arc::new(merged),
            rollout,
            layers: names,
            base_hash: Vec::new(),
            layer_hashes,
        },
    }))
}

/// The assignments that give an agent its whole config (no key).
pub fn base_assignments(assignments: &[Assignment]) -> Vec<Assignment> {
    assignments
        .iter()
        .filter(|a| a.config_key.is_empty())
        .cloned()
        .collect()
}

/// The winning layer (keyed assignment) per key for an agent, by key.
pub fn layers_for(assignments: &[Assignment], facts: Facts<'_>) -> Vec<Assignment> {
    let mut by_key: std::collections::BTreeMap<&str, Vec<Assignment>> = std::collections::BTreeMap::new();
    for a in assignments.iter().filter(|a| !a.config_key.is_empty()) {
        by_key.entry(a.config_key.as_str()).or_default().push(a.clone());
    }
    by_key
        .values()
        .filter_map(|candidates| pick(candidates, facts).cloned())
        .collect()
}

/// The package set an agent should have, if any matches it (with a package
/// rollout's pinned contents in place of the set's own).
pub async fn package_set(
    store: &dyn Store,
    tenant: &TenantId,
    record: &AgentRecord,
) -> Result<Option<PackageSet>, StoreError> {
    let all = store.package_sets(tenant).await?;
    let picked = pick(&all, Facts::from(record)).cloned();
    // A package rollout's pin stands in for the set's contents.
    match &record.pinned_packages {
        Some(pinned) if !record.pinned_packages_by.is_empty() => Ok(Some(PackageSet {
            tenant: tenant.to_string(),
            packages: Some((**pinned).clone()),
            ..picked.unwrap_or_default()
        })),
        _ => Ok(picked),
    }
}

/// The connection settings an agent should be offered, if any match it (a
/// connection-settings rollout's pinned settings in place of those).
pub async fn connection_settings(
    store: &dyn Store,
    tenant: &TenantId,
    record: &AgentRecord,
) -> Result<Option<ConnectionSettingsAssignment>, StoreError> {
    let all = store.connection_settings(tenant).await?;
    let picked = pick(&all, Facts::from(record)).cloned();
    // A connection-settings rollout's pin stands in for the settings.
    match &record.pinned_connection {
        Some(pinned) if !record.pinned_connection_by.is_empty() => Ok(Some((**pinned).clone())),
        _ => Ok(picked),
    }
}

/// The content hash of connection settings: what is offered from them (the
/// destinations, OpAMP settings and other connections), not their name,
/// selector or priority.
pub fn settings_hash(settings: &ConnectionSettingsAssignment) -> Vec<u8> {
    use sha2::{Digest, Sha256};
    let content = ConnectionSettingsAssignment {
        own_metrics: settings.own_metrics.clone(),
        own_traces: settings.own_traces.clone(),
        own_logs: settings.own_logs.clone(),
        opamp: settings.opamp.clone(),
        other_connections: settings.other_connections.clone(),
        ..Default::default()
    };
    // Maps are BTreeMaps: the encoding is deterministic.
    Sha256::digest(fleetplane_proto::Message::encode_to_vec(&content)).to_vec()
}

#[cfg(test)]
mod tests {
    use super::*;
    use fleetplane_proto::{attributes::string_kv, opamp::AgentDescription};

    fn assignment(name: &str, selector: &str, priority: i32) -> Assignment {
        Assignment {
            name: name.into(),
            selector: selector.into(),
            priority,
            ..Default::default()
        }
    }

    fn agent(attrs: &[(&str, &str)]) -> AgentDescription {
        AgentDescription {
            identifying_attributes: attrs.iter().map(|(k, v)| string_kv(*k, *v)).collect(),
            non_identifying_attributes: vec![],
        }
    }

    #[test]
    fn priority_then_specificity_then_name() {
        let all = vec![
            assignment("everyone", "", 0),
            assignment("checkout", "service.name=checkout", 0),
            assignment("checkout-arm", "service.name=checkout,host.arch=arm64", 0),
            assignment("b-arm", "host.arch=arm64", 0),
            assignment("a-arm", "host.arch=arm64", 0),
        ];
        let arm = agent(&[("service.name", "checkout"), ("host.arch", "arm64")]);
        assert_eq!(pick(&all, Facts::described(Some(&arm))).unwrap().name, "checkout-arm");
        let other_arm = agent(&[("service.name", "cart"), ("host.arch", "arm64")]);
        assert_eq!(pick(&all, Facts::described(Some(&other_arm))).unwrap().name, "a-arm");
        assert_eq!(
            pick(&all, Facts::described(Some(&agent(&[])))).unwrap().name,
            "everyone"
        );

        let mut boosted = all.clone();
        boosted.push(assignment("override", "", 10));
        assert_eq!(pick(&boosted, Facts::described(Some(&arm))).unwrap().name, "override");
    }

    #[test]
    fn nothing_matches() {
        let all = vec![assignment("checkout", "service.name=checkout", 0)];
        assert!(pick(&all, Facts::described(Some(&agent(&[("service.name", "cart")])))).is_none());
        assert!(pick::<Assignment>(&[], Facts::default()).is_none());
    }
}
