//! Carrying trace context inside bus envelopes, so that one trace shows an
//! agent message's whole path: gateway → bus → coordinator → store → back.
//!
//! The context travels in the envelope itself (not in NATS headers), so the
//! in-process and NATS buses carry it the same way. The format is W3C trace
//! context, through whatever propagator the process installed (none: nothing
//! is carried, nothing breaks).

use std::collections::BTreeMap;

use opentelemetry::propagation::{Extractor, Injector};
use tracing_opentelemetry::OpenTelemetrySpanExt;

struct Carrier<'a>(&'a mut BTreeMap<String, String>);

impl Injector for Carrier<'_> {
    fn set(&mut self, key: &str, value: String) {
        self.0.insert(key.to_owned(), value);
    }
}

struct Reader<'a>(&'a BTreeMap<String, String>);

impl Extractor for Reader<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).map(String::as_str)
    }

    fn keys(&self) -> Vec<&str> {
        self.0.keys().map(String::as_str).collect()
    }
}

/// The context of `span`, for an envelope's `trace_context` field.
pub fn inject(span: &tracing::Span) -> BTreeMap<String, String> {
    let mut carrier = BTreeMap::new();
    let context = span.context();
    opentelemetry::global::get_text_map_propagator(|p| p.inject_context(&context, &mut Carrier(&mut carrier)));
    carrier
}

/// Makes `span` a child of the context carried in an envelope.
pub fn attach(span: &tracing::Span, carrier: &BTreeMap<String, String>) {
    if carrier.is_empty() {
        return;
    }
    let parent = opentelemetry::global::get_text_map_propagator(|p| p.extract(&Reader(carrier)));
    let _ = span.set_parent(parent);
}
