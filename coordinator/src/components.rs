//! Which components a config needs, which an agent has, and the gap.
//!
//! An OpenTelemetry Collector refuses a config that declares a component its
//! build lacks (`unknown type: "kafka"`), and it says which components it has
//! in `AvailableComponents` (spec: `components` by category, each category's
//! `sub_component_map` by type). Comparing the two before anything is sent is
//! the pre-flight check of rollouts and assignments.
//!
//! A config's components are the keys of its top-level `receivers`,
//! `processors`, `exporters`, `extensions` and `connectors` mappings (`otlp`,
//! `otlp/secondary`: type `otlp`). The YAML is read as a stream of events
//! ([`crate::yaml`]), never built into a tree, so anchors and aliases cost
//! nothing (no "billion laughs"); a body that is not YAML, or not a Collector
//! config, declares no components and is never flagged.

use std::{
    collections::{BTreeSet, HashMap},
    sync::{Arc, Mutex},
};

use fleetplane_proto::{TenantId, opamp::AvailableComponents};
use yaml_rust2::{Event, parser::EventReceiver};

/// The Collector's component categories, as config sections and as the
/// keys of `AvailableComponents.components`.
pub const CATEGORIES: [&str; 5] = ["receivers", "processors", "exporters", "extensions", "connectors"];

/// A component a config declares: its category and type (`receivers/otlp`).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ComponentRef {
    /// One of [`CATEGORIES`].
    pub category: String,
    /// The type, without the instance name (`otlp` for `otlp/2`).
    pub kind: String,
}

impl std::fmt::Display for ComponentRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.category, self.kind)
    }
}

/// The components the config files declare (all files together: a layered
/// agent merges them).
///
/// ```
/// # use fleetplane_coordinator::components::declared;
/// let config = b"receivers:\n  otlp:\n  otlp/2: {}\nexporters:\n  debug: {}\nservice: {}\n";
/// let found: Vec<String> = declared([&config[..]]).iter().map(|c| c.to_string()).collect();
/// assert_eq!(found, ["exporters/debug", "receivers/otlp"]);
/// ```
pub fn declared<'a>(bodies: impl IntoIterator<Item = &'a [u8]>) -> BTreeSet<ComponentRef> {
    let mut found = BTreeSet::new();
    for body in bodies {
        let Ok(text) = std::str::from_utf8(body) else {
            continue;
        };
        let mut reader = Sections::default();
        // A body that is not YAML (or nested too deep to read safely)
        // declares what was read before the error, usually nothing: the
        // check is advice, not validation.
        let _ = crate::yaml::read(text, &mut reader);
        found.extend(reader.found);
    }
    found
}

/// What of `declared` the agent's inventory lacks; `None` when the agent
/// sent no full inventory (nothing to check against).
pub fn missing(
    declared: &BTreeSet<ComponentRef>,
    inventory: Option<&AvailableComponents>,
) -> Option<Vec<ComponentRef>> {
    let inventory = inventory.filter(|i| !i.components.is_empty())?;
    Some(
        declared
            .iter()
            .filter(|c| !has(inventory, &c.category, &c.kind))
            .cloned()
            .collect(),
    )
}

/// Whether the inventory lists this type in this category (or in any, for
/// an empty category).
pub fn has(inventory: &AvailableComponents, category: &str, kind: &str) -> bool {
    let in_category =
        |details: &fleetplane_proto::opamp::ComponentDetails| details.sub_component_map.contains_key(kind);
    if category.is_empty() {
        inventory.components.values().any(in_category)
    } else {
        inventory.components.get(category).is_some_and(in_category)
    }
}

/// Reads the keys two levels down under the category sections of the first
/// document.
#[derive(Default)]
struct Sections {
    /// Open containers: `true` for a mapping whose next scalar is a key.
    stack: Vec<Frame>,
    /// The category section being read, while inside it.
    section: Option<String>,
    found: BTreeSet<ComponentRef>,
}

#[derive(Debug)]
enum Frame {
    Mapping { expecting_key: bool, key: Option<String> },
    Sequence,
}

impl Sections {
    /// A value (scalar, alias or container) was completed in the innermost
    /// container: a mapping goes back to expecting a key.
    fn value_done(&mut self) {
        if let Some(Frame::Mapping { expecting_key, key }) = self.stack.last_mut() {
            *expecting_key = true;
            *key = None;
        }
    }
}

impl EventReceiver for Sections {
    fn on_event(&mut self, event: Event) {
        match event {
            Event::MappingStart(..) => {
                // Entering the value of a top-level category key.
                if self.stack.len() == 1
                    && let Some(Frame::Mapping { key: Some(key), .. }) = self.stack.last()
                    && CATEGORIES.contains(&key.as_str())
                {
                    self.section = Some(key.clone());
                }
                self.stack.push(Frame::Mapping {
                    expecting_key: true,
                    key: None,
                });
            }
            Event::SequenceStart(..) => self.stack.push(Frame::Sequence),
            Event::MappingEnd | Event::SequenceEnd => {
                self.stack.pop();
                if self.stack.len() == 1 {
                    self.section = None;
                }
                self.value_done();
            }
            Event::Scalar(text, ..) => {
                let depth = self.stack.len();
                match self.stack.last_mut() {
                    Some(Frame::Mapping { expecting_key, key }) if *expecting_key => {
                        if depth == 2
                            && let Some(category) = &self.section
                        {
                            let kind = text.split('/').next().unwrap_or_default().trim().to_owned();
                            if !kind.is_empty() {
                                self.found.insert(ComponentRef {
                                    category: category.clone(),
                                    kind,
                                });
                            }
                        }
                        *expecting_key = false;
                        *key = Some(text);
                    }
                    _ => self.value_done(),
                }
            }
            Event::Alias(_) => self.value_done(),
            _ => {}
        }
    }
}

/// Inventories by hash, per tenant, as agents sent them in full: agents of
/// one build share one inventory, so an agent whose hash is known here is
/// not asked for its list (`ReportAvailableComponents`) again. Per process
/// and bounded in entries and bytes (cleared when full; an inventory larger
/// than a real Collector's is not kept): a miss only costs one ask.
#[derive(Debug, Default)]
pub struct InventoryCache {
    by_hash: Mutex<(Inventories, usize)>,
}

/// Full inventories by tenant and hash.
type Inventories = HashMap<(TenantId, Vec<u8>), Arc<AvailableComponents>>;

/// Inventories kept per coordinator.
const INVENTORIES_MAX: usize = 1024;
/// Bytes (encoded) of one inventory kept; a Collector's is a few KiB.
const INVENTORY_MAX_BYTES: usize = 256 * 1024;
/// Bytes of all inventories kept.
const INVENTORIES_MAX_BYTES: usize = 16 * 1024 * 1024;

impl InventoryCache {
    /// The full inventory with this hash, if an agent of the tenant sent it.
    pub fn get(&self, tenant: &TenantId, hash: &[u8]) -> Option<Arc<AvailableComponents>> {
        if hash.is_empty() {
            return None;
        }
        self.lock().0.get(&(tenant.clone(), hash.to_vec())).cloned()
    }

    /// Remembers a full inventory under its hash.
    pub fn put(&self, tenant: &TenantId, inventory: &AvailableComponents) {
        let size = fleetplane_proto::Message::encoded_len(inventory);
        if inventory.hash.is_empty() || inventory.components.is_empty() || size > INVENTORY_MAX_BYTES {
            return;
        }
        let mut guard = self.lock();
        let (cache, bytes) = &mut *guard;
        let key = (tenant.clone(), inventory.hash.clone());
        if cache.contains_key(&key) {
            return;
        }
        if cache.len() >= INVENTORIES_MAX || *bytes + size > INVENTORIES_MAX_BYTES {
            cache.clear();
            *bytes = 0;
        }
        cache.insert(key, Arc::new(inventory.clone()));
        *bytes += size;
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, (Inventories, usize)> {
        self.by_hash.lock().unwrap_or_else(|p| p.into_inner())
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use fleetplane_proto::opamp::ComponentDetails;

    fn names(body: &str) -> Vec<String> {
        declared([body.as_bytes()]).iter().map(ToString::to_string).collect()
    }

    pub(crate) fn inventory(hash: u8, parts: &[(&str, &str)]) -> AvailableComponents {
        let mut components: std::collections::BTreeMap<String, ComponentDetails> = Default::default();
        for (category, kind) in parts {
            components
                .entry((*category).to_owned())
                .or_default()
                .sub_component_map
                .insert((*kind).to_owned(), ComponentDetails::default());
        }
        AvailableComponents {
            components,
            hash: vec![hash; 8],
        }
    }

    #[test]
    fn components_are_the_keys_of_the_category_sections() {
        let config = "\
receivers:
  otlp:
    protocols: {grpc: {}}
  filelog/app:
    include: [/var/log/app.log]
processors: {batch: {}, \"memory_limiter\": {limit_mib: 400}}
exporters:
  otlphttp/backend:
    endpoint: https://example.com
service:
  pipelines:
    logs: {receivers: [filelog/app], exporters: [otlphttp/backend]}
";
        assert_eq!(
            names(config),
            [
                "exporters/otlphttp",
                "processors/batch",
                "processors/memory_limiter",
                "receivers/filelog",
                "receivers/otlp"
            ]
        );
    }

    #[test]
    fn other_bodies_declare_nothing_and_aliases_are_not_expanded() {
        assert!(names("just text").is_empty());
        assert!(names("{\"a\": 1}").is_empty());
        assert!(names("receivers: [otlp]").is_empty(), "a sequence declares no ids");
        assert!(names("key: [unclosed").is_empty());
        assert!(declared([&[0xff, 0xfe][..]]).is_empty());
        // A billion-laughs body is read as events: no expansion, no blowup.
        let mut bomb = String::from("a: &a [x, x, x, x, x, x, x, x, x]\n");
        for i in 1..30 {
            bomb.push_str(
                &format!("a{i}: &a{i} [*a{}, *a{}, *a{}, *a{}]\n", i - 1, i - 1, i - 1, i - 1).replace("*a0", "*a"),
            );
        }
        bomb.push_str("receivers: {otlp: *a29}\n");
        assert_eq!(names(&bomb), ["receivers/otlp"]);
        // Nested to overflow the parser's stack: not read at all.
        assert!(names(&format!("receivers:\n  otlp:\n    {}x", "- ".repeat(200_000))).is_empty());
    }

    #[test]
    fn the_gap_is_what_the_inventory_lacks() {
        let declared = declared([&b"receivers: {otlp: {}}\nexporters: {kafka: {}, debug: {}}"[..]]);
        let have = inventory(1, &[("receivers", "otlp"), ("exporters", "debug")]);
        let gap = missing(&declared, Some(&have)).unwrap();
        assert_eq!(
            gap.iter().map(ToString::to_string).collect::<Vec<_>>(),
            ["exporters/kafka"]
        );
        assert_eq!(missing(&declared, None), None, "no inventory, nothing to check");
        assert_eq!(
            missing(
                &declared,
                Some(&AvailableComponents {
                    hash: vec![1],
                    ..Default::default()
                })
            ),
            None,
            "a hash alone is not an inventory"
        );
        assert!(has(&have, "", "debug") && !has(&have, "receivers", "debug"));
    }

    #[test]
    fn inventories_are_shared_by_hash_within_a_tenant_only() {
        let cache = InventoryCache::default();
        let acme = TenantId::new("acme").unwrap();
        let other = TenantId::new("other").unwrap();
        let full = inventory(7, &[("receivers", "otlp")]);
        cache.put(&acme, &full);
        cache.put(
            &acme,
            &AvailableComponents {
                hash: vec![9; 8],
                ..Default::default()
            },
        );
        assert_eq!(cache.get(&acme, &[7; 8]).as_deref(), Some(&full));
        assert!(cache.get(&other, &[7; 8]).is_none(), "tenants never share");
        assert!(cache.get(&acme, &[9; 8]).is_none(), "a hash alone is not kept");
        assert!(cache.get(&acme, &[]).is_none());
        // An inventory larger than any Collector's is not kept.
        let types: Vec<String> = (0..20_000).map(|i| format!("receiver-type-{i}")).collect();
        let huge = inventory(8, &types.iter().map(|t| ("receivers", t.as_str())).collect::<Vec<_>>());
        cache.put(&acme, &huge);
        assert!(cache.get(&acme, &[8; 8]).is_none());
    }
}
