//! Label selectors over agent attributes, as used by config assignments.
//!
//! Grammar (terms are ANDed; whitespace around terms and operators is ignored):
//!
//! ```text
//! selector := "" | term ("," term)*
//! term     := key "=" value     attribute present with exactly this value
//!           | key "!=" value    attribute absent, or present with another value
//!           | key               attribute present, any value
//!           | "!" key           attribute absent
//!           | "component:" ref  the agent's component inventory lists it
//!           | "!component:" ref the agent's inventory does not list it
//! ref      := category "/" type (`receivers/otlp`) | type (`otlp`, any category)
//! ```
//!
//! Keys are looked up in the identifying attributes first, then the
//! non-identifying ones. Values compare as text (see
//! `fleetplane_proto::attributes::value_text`), so `host.cpus=8` matches an
//! integer attribute 8. Component terms look at the `AvailableComponents` the
//! agent sent in full; an agent that sent none has no components (so
//! `!component:x` matches it): the key `component:...` is never an attribute.

use std::fmt;

use fleetplane_proto::{
    attributes::{find, value_text},
    internal::AgentRecord,
    opamp::{AgentDescription, AvailableComponents},
};

/// The prefix of component terms.
const COMPONENT: &str = "component:";

/// Why a selector does not parse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SelectorError {
    /// A term has no key, as in `=x` or `a=1,,b=2`.
    #[error("selector term {0:?} has no key")]
    EmptyKey(String),
    /// A key contains characters that make the selector ambiguous.
    #[error("selector key {0:?} may not contain '=', '!' or ','")]
    BadKey(String),
    /// A component term with a value, as in `component:otlp=1`.
    #[error("selector term {0:?}: component terms take no value (write component:receivers/otlp or !component:otlp)")]
    ComponentValue(String),
}

/// What selectors look at: an agent's description and its component
/// inventory.
#[derive(Debug, Clone, Copy, Default)]
pub struct Facts<'a> {
    /// Its attributes (none until it describes itself).
    pub description: Option<&'a AgentDescription>,
    /// Its inventory, if it sent one.
    pub components: Option<&'a AvailableComponents>,
}

impl<'a> Facts<'a> {
    /// An agent known only by its description.
    pub fn described(description: Option<&'a AgentDescription>) -> Self {
        Self {
            description,
            components: None,
        }
    }
}

impl<'a> From<&'a AgentRecord> for Facts<'a> {
    fn from(record: &'a AgentRecord) -> Self {
        Self {
            description: record.description.as_ref(),
            components: record.available_components.as_ref(),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Term {
    Equals(String, String),
    NotEquals(String, String),
    Exists(String),
    Absent(String),
    /// `component:` (present) or `!component:` (absent): category (may be
    /// empty: any) and type.
    Component {
        category: String,
        kind: String,
        present: bool,
    },
}

/// A component term from a key that starts with `component:`.
fn component(key: &str, present: bool) -> Option<Term> {
    let reference = key.strip_prefix(COMPONENT)?.trim();
    let (category, kind) = reference.split_once('/').unwrap_or(("", reference));
    Some(Term::Component {
        category: category.trim().to_owned(),
        kind: kind.trim().to_owned(),
        present,
    })
}

/// A parsed selector.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Selector {
    terms: Vec<Term>,
}

fn key(text: &str, term: &str) -> Result<String, SelectorError> {
    let key = text.trim();
    if key.is_empty() {
        return Err(SelectorError::EmptyKey(term.to_owned()));
    }
    if key.contains(['=', '!', ',']) {
        return Err(SelectorError::BadKey(key.to_owned()));
    }
    Ok(key.to_owned())
}

/// Parsed selectors by text, for the report path: every report picks among
/// the tenant's assignments and connection settings, and parsing each
/// selector each time cost more than matching it. Bounded: cleared when
/// full (selectors are few; texts come from stored assignments, validated
/// when written).
static PARSED: std::sync::LazyLock<std::sync::Mutex<std::collections::HashMap<String, std::sync::Arc<Selector>>>> =
    std::sync::LazyLock::new(Default::default);

/// Most selectors kept parsed.
const PARSED_MAX: usize = 4096;

impl Selector {
    /// [`Selector::parse`], remembered: the same text parses once.
    pub fn parse_cached(text: &str) -> Result<std::sync::Arc<Self>, SelectorError> {
        let mut parsed = PARSED.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(selector) = parsed.get(text) {
            return Ok(selector.clone());
        }
        let selector = std::sync::Arc::new(Self::parse(text)?);
        if parsed.len() >= PARSED_MAX {
            parsed.clear();
        }
        parsed.insert(text.to_owned(), selector.clone());
        Ok(selector)
    }

    /// Parses a selector.
    ///
    /// ```
    /// # use fleetplane_coordinator::selector::Selector;
    /// let s = Selector::parse("service.name=checkout, host.arch!=amd64, !canary").unwrap();
    /// assert_eq!(s.len(), 3);
    /// assert!(Selector::parse("=x").is_err());
    /// ```
    pub fn parse(text: &str) -> Result<Self, SelectorError> {
        if text.trim().is_empty() {
            return Ok(Self::default());
        }
        let terms = text
            .split(',')
            .map(|term| {
                if let Some((k, v)) = term.split_once("!=") {
                    let k = key(k, term)?;
                    if k.starts_with(COMPONENT) {
                        return Err(SelectorError::ComponentValue(term.trim().to_owned()));
                    }
                    Ok(Term::NotEquals(k, v.trim().to_owned()))
                } else if let Some((k, v)) = term.split_once('=') {
                    let k = key(k, term)?;
                    if k.starts_with(COMPONENT) {
                        return Err(SelectorError::ComponentValue(term.trim().to_owned()));
                    }
                    Ok(Term::Equals(k, v.trim().to_owned()))
                } else if let Some(k) = term.trim().strip_prefix('!') {
                    let k = key(k, term)?;
                    Ok(component(&k, false).unwrap_or(Term::Absent(k)))
                } else {
                    let k = key(term, term)?;
                    Ok(component(&k, true).unwrap_or(Term::Exists(k)))
                }
            })
            .collect::<Result<_, _>>()?;
        Ok(Self { terms })
    }

    /// Number of terms; more terms means a more specific selector.
    pub fn len(&self) -> usize {
        self.terms.len()
    }

    /// True for the empty selector, which matches every agent.
    pub fn is_empty(&self) -> bool {
        self.terms.is_empty()
    }

    /// Whether an agent matches. An agent that has not described itself yet
    /// has no attributes; one that sent no inventory has no components.
    pub fn matches(&self, facts: Facts<'_>) -> bool {
        let empty = AgentDescription::default();
        let description = facts.description.unwrap_or(&empty);
        self.terms.iter().all(|term| match term {
            Term::Equals(k, v) => find(description, k).is_some_and(|value| value_text(value) == *v),
            Term::NotEquals(k, v) => find(description, k).is_none_or(|value| value_text(value) != *v),
            Term::Exists(k) => find(description, k).is_some(),
            Term::Absent(k) => find(description, k).is_none(),
            Term::Component {
                category,
                kind,
                present,
            } => {
                facts
                    .components
                    .is_some_and(|inventory| crate::components::has(inventory, category, kind))
                    == *present
            }
        })
    }
}

impl fmt::Display for Selector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let terms: Vec<String> = self
            .terms
            .iter()
            .map(|t| match t {
                Term::Equals(k, v) => format!("{k}={v}"),
                Term::NotEquals(k, v) => format!("{k}!={v}"),
                Term::Exists(k) => k.clone(),
                Term::Absent(k) => format!("!{k}"),
                Term::Component {
                    category,
                    kind,
                    present,
                } => {
                    let not = if *present { "" } else { "!" };
                    if category.is_empty() {
                        format!("{not}{COMPONENT}{kind}")
                    } else {
                        format!("{not}{COMPONENT}{category}/{kind}")
                    }
                }
            })
            .collect();
        f.write_str(&terms.join(","))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use fleetplane_proto::attributes::string_kv;

    fn agent(attrs: &[(&str, &str)]) -> AgentDescription {
        AgentDescription {
            identifying_attributes: attrs.iter().map(|(k, v)| string_kv(*k, *v)).collect(),
            non_identifying_attributes: vec![],
        }
    }

    #[test]
    fn component_terms_look_at_the_inventory() {
        let inventory = crate::components::tests::inventory(1, &[("receivers", "otlp"), ("exporters", "kafka")]);
        let facts = Facts {
            description: None,
            components: Some(&inventory),
        };
        for (text, expected) in [
            ("component:receivers/otlp", true),
            ("component:otlp", true),
            ("component:exporters/otlp", false),
            ("!component:exporters/kafka", false),
            ("!component:processors/batch", true),
            ("component:kafka, !component:batch", true),
        ] {
            let selector = Selector::parse(text).unwrap();
            assert_eq!(selector.matches(facts), expected, "{text}");
            assert_eq!(
                Selector::parse(&selector.to_string()).unwrap(),
                selector,
                "{text} prints back"
            );
        }
        assert!(
            !Selector::parse("component:otlp").unwrap().matches(Facts::default()),
            "no inventory"
        );
        assert!(Selector::parse("!component:otlp").unwrap().matches(Facts::default()));
        assert!(matches!(
            Selector::parse("component:otlp=1"),
            Err(SelectorError::ComponentValue(_))
        ));
    }

    #[test]
    fn a_cached_parse_is_the_same_selector_and_errors_are_not_kept() {
        let a = Selector::parse_cached("service.name=cached,region").unwrap();
        let b = Selector::parse_cached("service.name=cached,region").unwrap();
        assert!(std::sync::Arc::ptr_eq(&a, &b), "parsed once");
        assert_eq!(*a, Selector::parse("service.name=cached,region").unwrap());
        assert!(Selector::parse_cached("=x").is_err());
        assert!(Selector::parse_cached("=x").is_err());
    }

    #[test]
    fn all_terms_must_match() {
        let s = Selector::parse("service.name=checkout,host.arch=arm64").unwrap();
        assert!(s.matches(Facts::described(Some(&agent(&[
            ("service.name", "checkout"),
            ("host.arch", "arm64")
        ])))));
        assert!(!s.matches(Facts::described(Some(&agent(&[
            ("service.name", "checkout"),
            ("host.arch", "amd64")
        ])))));
        assert!(!s.matches(Facts::described(Some(&agent(&[("service.name", "checkout")])))));
        assert!(!s.matches(Facts::default()));
    }

    #[test]
    fn negation_and_existence() {
        let s = Selector::parse("env!=prod, region, !canary").unwrap();
        assert!(s.matches(Facts::described(Some(&agent(&[("region", "eu")])))));
        assert!(s.matches(Facts::described(Some(&agent(&[("region", "eu"), ("env", "dev")])))));
        assert!(!s.matches(Facts::described(Some(&agent(&[("region", "eu"), ("env", "prod")])))));
        assert!(!s.matches(Facts::described(Some(&agent(&[("region", "eu"), ("canary", "yes")])))));
        assert!(!s.matches(Facts::described(Some(&agent(&[])))));
    }

    #[test]
    fn empty_selector_matches_everything() {
        let s = Selector::parse(" ").unwrap();
        assert!(s.is_empty());
        assert!(s.matches(Facts::default()));
    }

    #[test]
    fn bad_selectors_are_rejected() {
        assert_eq!(Selector::parse("a=1,,b=2"), Err(SelectorError::EmptyKey("".into())));
        assert!(matches!(Selector::parse("!=x"), Err(SelectorError::EmptyKey(_))));
        assert!(matches!(Selector::parse("a!b"), Err(SelectorError::BadKey(_))));
    }

    #[test]
    fn display_round_trips() {
        let s = Selector::parse(" a = 1 , b!=2,c,!d").unwrap();
        assert_eq!(s.to_string(), "a=1,b!=2,c,!d");
        assert_eq!(Selector::parse(&s.to_string()).unwrap(), s);
    }
}

#[cfg(test)]
mod properties {
    use proptest::prelude::*;

    use super::*;

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(1024))]

        /// Any text: parsed or refused with an error, never a panic; what
        /// parses prints back to a selector that parses to the same thing.
        #[test]
        fn arbitrary_selectors_parse_or_fail_cleanly(text in "[a-z=!, .\\-_]{0,60}|.{0,60}") {
            if let Ok(selector) = Selector::parse(&text) {
                let printed = selector.to_string();
                let again = Selector::parse(&printed).unwrap();
                prop_assert_eq!(again.to_string(), printed);
                let _ = selector.matches(Facts::default());
            }
        }
    }
}
