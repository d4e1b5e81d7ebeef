//! Reading and building OTLP-style attributes (`KeyValue`/`AnyValue`).

use crate::opamp::{AgentDescription, AnyValue, KeyValue, any_value::Value};

/// A string attribute, the common case in agent descriptions.
pub fn string_kv(key: impl Into<String>, value: impl Into<String>) -> KeyValue {
    KeyValue {
        key: key.into(),
        value: Some(AnyValue {
            value: Some(Value::StringValue(value.into())),
        }),
    }
}

/// The text form of a value, used by label selectors: strings as they are,
/// scalars in their usual text, arrays and maps in a JSON-like form.
pub fn value_text(value: &AnyValue) -> String {
    match &value.value {
        None => String::new(),
        Some(Value::StringValue(s)) => s.clone(),
        Some(Value::BoolValue(b)) => b.to_string(),
        Some(Value::IntValue(i)) => i.to_string(),
        Some(Value::DoubleValue(d)) => d.to_string(),
        Some(Value::BytesValue(b)) => hex::encode(b),
        Some(Value::ArrayValue(a)) => {
            let items: Vec<String> = a.values.iter().map(value_text).collect();
            format!("[{}]", items.join(","))
        }
        Some(Value::KvlistValue(kv)) => {
            let items: Vec<String> = kv
                .values
                .iter()
                .map(|kv| format!("{}={}", kv.key, kv.value.as_ref().map(value_text).unwrap_or_default()))
                .collect();
            format!("{{{}}}", items.join(","))
        }
    }
}

/// Looks an attribute up by key, identifying attributes first (they win when an
/// agent sends the same key in both lists).
pub fn find<'a>(description: &'a AgentDescription, key: &str) -> Option<&'a AnyValue> {
    description
        .identifying_attributes
        .iter()
        .chain(&description.non_identifying_attributes)
        .find(|kv| kv.key == key)
        .and_then(|kv| kv.value.as_ref())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identifying_attributes_win() {
        let description = AgentDescription {
            identifying_attributes: vec![string_kv("service.name", "checkout")],
            non_identifying_attributes: vec![
                string_kv("service.name", "shadow"),
                KeyValue {
                    key: "host.cpus".into(),
                    value: Some(AnyValue {
                        value: Some(Value::IntValue(8)),
                    }),
                },
            ],
        };
        assert_eq!(
            find(&description, "service.name").map(value_text).as_deref(),
            Some("checkout")
        );
        assert_eq!(find(&description, "host.cpus").map(value_text).as_deref(), Some("8"));
        assert!(find(&description, "absent").is_none());
    }
}
