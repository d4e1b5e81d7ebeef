//! Drift: whether what an agent runs, key by key, is what it should run.
//!
//! The desired config map (base files and layers, by key) is compared with
//! the effective config the agent reports, key by key. A key compares as
//! YAML structure when both sides parse (formatting, comments, quoting of
//! plain scalars and key order do not count), else as bytes. An agent that
//! merges its keys itself (the Collector's Supervisor reports its merged
//! config under `""` alone) cannot be compared key by key, and says so.
//!
//! Some agents report alternative views of one config next to it: the
//! Collector's OpAMP extension adds `raw`, the config before its variables
//! are expanded, which may hold literal secrets. Those keys are kept out of
//! drift, and their bodies are never stored (see [`redact_alternative_views`]).

use std::collections::BTreeMap;

use fleetplane_proto::{internal::ConfigFile, opamp::AgentConfigMap};
use yaml_rust2::{Event, parser::EventReceiver};

/// Effective-config keys that are alternative views of the same config.
pub const ALTERNATIVE_VIEWS: [&str; 1] = ["raw"];

/// Whether a reported key is an alternative view.
pub fn is_alternative_view(key: &str) -> bool {
    ALTERNATIVE_VIEWS.contains(&key)
}

/// Empties the bodies of alternative views in a reported map, so secrets
/// they may hold are never written to the store, shown or compared. Returns
/// the keys emptied.
pub fn redact_alternative_views(map: &mut AgentConfigMap) -> Vec<String> {
    let mut redacted = Vec::new();
    for (key, file) in &mut map.config_map {
        if is_alternative_view(key) {
            file.body.clear();
            redacted.push(key.clone());
        }
    }
    redacted
}

/// How one key of an agent's config compares.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyState {
    /// The agent reports this key as desired.
    InSync,
    /// The agent reports this key with other content.
    Differs,
    /// Desired, but the agent reports no such key.
    NotReported,
    /// Reported, but no assignment gives the agent this key.
    Unmanaged,
    /// The agent merges its keys and reports only the result: not
    /// comparable key by key.
    MergedByAgent,
}

impl KeyState {
    /// The name the API shows.
    pub fn name(self) -> &'static str {
        match self {
            KeyState::InSync => "in_sync",
            KeyState::Differs => "differs",
            KeyState::NotReported => "not_reported",
            KeyState::Unmanaged => "unmanaged",
            KeyState::MergedByAgent => "merged_by_agent",
        }
    }
}

/// Drift per key; empty when there is nothing to compare (no desired config,
/// or no effective config reported).
///
/// ```
/// # use fleetplane_coordinator::drift::{per_key, KeyState};
/// # use fleetplane_proto::{internal::ConfigFile, opamp::{AgentConfigMap, AgentConfigFile}};
/// let desired = [("".to_owned(), ConfigFile { body: b"a: 1\nb: [x]\n".to_vec(), content_type: "text/yaml".into() })].into();
/// let mut reported = AgentConfigMap::default();
/// reported.config_map.insert("".into(), AgentConfigFile { body: b"b: [\"x\"] # same\na: 1".to_vec(), ..Default::default() });
/// assert_eq!(per_key(Some(&desired), Some(&reported))[""], KeyState::InSync);
/// ```
pub fn per_key(
    desired: Option<&BTreeMap<String, ConfigFile>>,
    reported: Option<&AgentConfigMap>,
) -> BTreeMap<String, KeyState> {
    let (Some(desired), Some(reported)) = (desired, reported) else {
        return BTreeMap::new();
    };
    let reported: BTreeMap<&str, &[u8]> = reported
        .config_map
        .iter()
        .filter(|(key, _)| !is_alternative_view(key))
        .map(|(key, file)| (key.as_str(), file.body.as_slice()))
        .collect();
    let merges_itself = desired.len() > 1 && reported.len() == 1 && reported.contains_key("");
    let mut states = BTreeMap::new();
    for (key, file) in desired {
        let state = if merges_itself {
            KeyState::MergedByAgent
        } else {
            match reported.get(key.as_str()) {
                None => KeyState::NotReported,
                Some(body) if same(&file.body, body) => KeyState::InSync,
                Some(_) => KeyState::Differs,
            }
        };
        states.insert(key.clone(), state);
    }
    // The merged result of an agent that merges its keys is not a key of
    // its own.
    let merged_result = |key: &str| merges_itself && key.is_empty();
    for key in reported.keys() {
        if !desired.contains_key(*key) && !merged_result(key) {
            states.insert((*key).to_owned(), KeyState::Unmanaged);
        }
    }
    states
}

/// Whether two bodies say the same: equal bytes, or equal YAML structure.
fn same(a: &[u8], b: &[u8]) -> bool {
    if a == b {
        return true;
    }
    match (structure(a), structure(b)) {
        (Some(a), Some(b)) => a == b,
        _ => false,
    }
}

/// A YAML document as a value: maps with sorted entries, scalars as text.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
enum Node {
    Scalar(String),
    Seq(Vec<Node>),
    Map(Vec<(Node, Node)>),
}

/// Nodes read before a body counts as too large to compare.
const MAX_NODES: usize = 100_000;
/// Nesting read before a body counts as too deep to compare.
const MAX_DEPTH: usize = 64;

/// The first document of a body as a [`Node`]; `None` when it is not YAML,
/// uses aliases (never expanded here), or is too large or deep to compare.
fn structure(body: &[u8]) -> Option<Node> {
    let text = std::str::from_utf8(body).ok()?;
    let mut builder = Builder::default();
    crate::yaml::read(text, &mut builder).ok()?;
    if builder.unsupported {
        return None;
    }
    builder.root
}

#[derive(Default)]
struct Builder {
    stack: Vec<Partial>,
    root: Option<Node>,
    nodes: usize,
    unsupported: bool,
}

enum Partial {
    Seq(Vec<Node>),
    Map(Vec<(Node, Node)>, Option<Node>),
}

impl Builder {
    fn value(&mut self, node: Node) {
        self.nodes += 1;
        if self.nodes > MAX_NODES {
            self.unsupported = true;
            return;
        }
        match self.stack.last_mut() {
            None => {
                if self.root.is_none() {
                    self.root = Some(node);
                }
            }
            Some(Partial::Seq(items)) => items.push(node),
            Some(Partial::Map(entries, pending)) => match pending.take() {
                None => *pending = Some(node),
                Some(key) => entries.push((key, node)),
            },
        }
    }

    fn open(&mut self, partial: Partial) {
        if self.stack.len() >= MAX_DEPTH {
            self.unsupported = true;
        } else {
            self.stack.push(partial);
        }
    }
}

impl EventReceiver for Builder {
    fn on_event(&mut self, event: Event) {
        if self.unsupported {
            return;
        }
        match event {
            Event::Scalar(text, ..) => self.value(Node::Scalar(text)),
            Event::SequenceStart(..) => self.open(Partial::Seq(Vec::new())),
            Event::MappingStart(..) => self.open(Partial::Map(Vec::new(), None)),
            Event::SequenceEnd => {
                if let Some(Partial::Seq(items)) = self.stack.pop() {
                    self.value(Node::Seq(items));
                }
            }
            Event::MappingEnd => {
                if let Some(Partial::Map(mut entries, _)) = self.stack.pop() {
                    entries.sort();
                    self.value(Node::Map(entries));
                }
            }
            Event::Alias(_) => self.unsupported = true,
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use fleetplane_proto::opamp::AgentConfigFile;

    fn desired(files: &[(&str, &str)]) -> BTreeMap<String, ConfigFile> {
        files
            .iter()
            .map(|(k, v)| {
                (
                    (*k).to_owned(),
                    ConfigFile {
                        body: v.as_bytes().to_vec(),
                        content_type: "text/yaml".into(),
                    },
                )
            })
            .collect()
    }

    fn reported(files: &[(&str, &str)]) -> AgentConfigMap {
        AgentConfigMap {
            config_map: files
                .iter()
                .map(|(k, v)| {
                    (
                        (*k).to_owned(),
                        AgentConfigFile {
                            body: v.as_bytes().to_vec(),
                            ..Default::default()
                        },
                    )
                })
                .collect(),
        }
    }

    fn names(states: &BTreeMap<String, KeyState>) -> Vec<(String, &'static str)> {
        states.iter().map(|(k, s)| (k.clone(), s.name())).collect()
    }

    #[test]
    fn pools_compare_key_by_key() {
        let want = desired(&[
            ("ns/a", "receivers: {otlp: {}}\n"),
            ("ns/b", "exporters: {debug: {}}\n"),
        ]);
        let have = reported(&[
            ("ns/a", "receivers:\n  otlp: {}   # reformatted\n"),
            ("ns/b", "exporters: {kafka: {}}\n"),
            ("ns/c", "x: 1"),
            ("raw", "password: hunter2"),
        ]);
        assert_eq!(
            names(&per_key(Some(&want), Some(&have))),
            [
                ("ns/a".into(), "in_sync"),
                ("ns/b".into(), "differs"),
                ("ns/c".into(), "unmanaged"),
            ],
            "raw is an alternative view, never compared"
        );
        let partial = reported(&[("ns/a", "receivers: {otlp: {}}")]);
        assert_eq!(per_key(Some(&want), Some(&partial))["ns/b"], KeyState::NotReported);
    }

    #[test]
    fn an_agent_that_merges_its_layers_is_not_compared_key_by_key() {
        let want = desired(&[("00-base", "a: 1"), ("10-team", "b: 2")]);
        let merged = reported(&[("", "a: 1\nb: 2"), ("raw", "a: ${env:A}")]);
        assert_eq!(
            names(&per_key(Some(&want), Some(&merged))),
            [
                ("00-base".into(), "merged_by_agent"),
                ("10-team".into(), "merged_by_agent")
            ]
        );
    }

    #[test]
    fn nothing_to_compare_gives_no_states() {
        let want = desired(&[("", "a: 1")]);
        assert!(per_key(Some(&want), None).is_empty());
        assert!(per_key(None, Some(&reported(&[("", "a: 1")]))).is_empty());
    }

    #[test]
    fn structure_ignores_form_but_not_content() {
        assert!(same(
            b"a: 1\nb: {c: [1, 2]}\n",
            b"b:\n  c:\n    - 1\n    - 2\na: 1 # c\n"
        ));
        assert!(!same(b"a: 1", b"a: 2"));
        assert!(!same(b"a: [1, 2]", b"a: [2, 1]"), "sequences keep their order");
        assert!(
            !same(b"a: &x 1\nb: *x", b"a: 1\nb: 1"),
            "aliases are not expanded: bytes only"
        );
        assert!(same(b"a: &x 1\nb: *x", b"a: &x 1\nb: *x"));
        let deep = format!("{}1{}", "[".repeat(200), "]".repeat(200));
        assert!(
            !same(deep.as_bytes(), format!(" {deep}").as_bytes()),
            "too deep: bytes only"
        );
        // An agent's body nested to overflow the parser's stack is compared
        // as bytes, never parsed.
        let hostile = format!("{}x", "- ".repeat(200_000));
        assert!(!same(hostile.as_bytes(), format!("{hostile} ").as_bytes()));
        assert!(same(hostile.as_bytes(), hostile.as_bytes()));
        assert!(!same(b"\xff", b"\xfe"));
    }

    #[test]
    fn alternative_views_lose_their_bodies() {
        let mut map = reported(&[("", "a: 1"), ("raw", "token: secret")]);
        assert_eq!(redact_alternative_views(&mut map), ["raw"]);
        assert!(map.config_map["raw"].body.is_empty());
        assert_eq!(map.config_map[""].body, b"a: 1");
    }
}
