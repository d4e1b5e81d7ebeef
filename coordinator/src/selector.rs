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
//! ```
//!
//! Keys are looked up in the identifying attributes first, then the
//! non-identifying ones. Values compare as text (see
//! `fleetplane_proto::attributes::value_text`), so `host.cpus=8` matches an
//! integer attribute 8.

use std::fmt;

use fleetplane_proto::{
    attributes::{find, value_text},
    opamp::AgentDescription,
};

/// Why a selector does not parse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SelectorError {
    /// A term has no key, as in `=x` or `a=1,,b=2`.
    #[error("selector term {0:?} has no key")]
    EmptyKey(String),
    /// A key contains characters that make the selector ambiguous.
    #[error("selector key {0:?} may not contain '=', '!' or ','")]
    BadKey(String),
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Term {
    Equals(String, String),
    NotEquals(String, String),
    Exists(String),
    Absent(String),
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
                    Ok(Term::NotEquals(key(k, term)?, v.trim().to_owned()))
                } else if let Some((k, v)) = term.split_once('=') {
                    Ok(Term::Equals(key(k, term)?, v.trim().to_owned()))
                } else if let Some(k) = term.trim().strip_prefix('!') {
                    Ok(Term::Absent(key(k, term)?))
                } else {
                    Ok(Term::Exists(key(term, term)?))
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

    /// Whether an agent with this description matches. An agent that has not
    /// described itself yet has no attributes.
    pub fn matches(&self, description: Option<&AgentDescription>) -> bool {
        let empty = AgentDescription::default();
        let description = description.unwrap_or(&empty);
        self.terms.iter().all(|term| match term {
            Term::Equals(k, v) => find(description, k).is_some_and(|value| value_text(value) == *v),
            Term::NotEquals(k, v) => find(description, k).is_none_or(|value| value_text(value) != *v),
            Term::Exists(k) => find(description, k).is_some(),
            Term::Absent(k) => find(description, k).is_none(),
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
        assert!(s.matches(Some(&agent(&[("service.name", "checkout"), ("host.arch", "arm64")]))));
        assert!(!s.matches(Some(&agent(&[("service.name", "checkout"), ("host.arch", "amd64")]))));
        assert!(!s.matches(Some(&agent(&[("service.name", "checkout")]))));
        assert!(!s.matches(None));
    }

    #[test]
    fn negation_and_existence() {
        let s = Selector::parse("env!=prod, region, !canary").unwrap();
        assert!(s.matches(Some(&agent(&[("region", "eu")]))));
        assert!(s.matches(Some(&agent(&[("region", "eu"), ("env", "dev")]))));
        assert!(!s.matches(Some(&agent(&[("region", "eu"), ("env", "prod")]))));
        assert!(!s.matches(Some(&agent(&[("region", "eu"), ("canary", "yes")]))));
        assert!(!s.matches(Some(&agent(&[]))));
    }

    #[test]
    fn empty_selector_matches_everything() {
        let s = Selector::parse(" ").unwrap();
        assert!(s.is_empty());
        assert!(s.matches(None));
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
                let _ = selector.matches(None);
            }
        }
    }
}
