//! The instance context: the start input plus every completed step's output,
//! namespaced by step key so parallel branches never collide.

use std::collections::BTreeMap;

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::Value;

/// The JSON context of an instance. Identical in memory and in storage.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct Context {
    /// The input given at start. The engine never changes it.
    pub initial: Value,
    /// Each completed step's output, under its step key.
    pub steps: BTreeMap<String, Value>,
}

impl Context {
    /// A context with the given start input and no step outputs.
    pub fn new(initial: Value) -> Self {
        Self {
            initial,
            steps: BTreeMap::new(),
        }
    }

    /// The output stored under `step_key`, if that step completed.
    pub fn step(&self, step_key: &str) -> Option<&Value> {
        self.steps.get(step_key)
    }

    /// The start input decoded as `T`.
    pub fn initial_as<T: DeserializeOwned>(&self) -> Result<T, serde_json::Error> {
        T::deserialize(&self.initial)
    }

    /// A step's output decoded as `T`; `None` when the step has no output yet.
    pub fn step_as<T: DeserializeOwned>(
        &self,
        step_key: &str,
    ) -> Option<Result<T, serde_json::Error>> {
        self.steps.get(step_key).map(T::deserialize)
    }

    /// Stores a step's output, replacing any earlier one (no deep merge).
    pub fn put_step_output(&mut self, step_key: impl Into<String>, output: Value) {
        self.steps.insert(step_key.into(), output);
    }
}

/// Whether a JSON value contains U+0000 in any string or key. PostgreSQL's
/// `jsonb` cannot store it, so both backends reject such values.
pub fn contains_nul(value: &Value) -> bool {
    match value {
        Value::String(s) => s.contains('\0'),
        Value::Array(items) => items.iter().any(contains_nul),
        Value::Object(map) => map.iter().any(|(k, v)| k.contains('\0') || contains_nul(v)),
        Value::Null | Value::Bool(_) | Value::Number(_) => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn typed_access_through_serde() {
        #[derive(Deserialize, Debug, PartialEq)]
        struct Order {
            id: u64,
        }
        let mut ctx = Context::new(json!({"id": 7}));
        assert_eq!(ctx.initial_as::<Order>().unwrap(), Order { id: 7 });
        assert!(ctx.step_as::<Order>("charge").is_none());
        ctx.put_step_output("charge", json!({"id": 9}));
        assert_eq!(
            ctx.step_as::<Order>("charge").unwrap().unwrap(),
            Order { id: 9 }
        );
        ctx.put_step_output("charge", json!({"other": true}));
        assert_eq!(
            ctx.step("charge"),
            Some(&json!({"other": true})),
            "replaced, not merged"
        );
        assert!(ctx.step_as::<Order>("charge").unwrap().is_err());
    }

    #[test]
    fn nul_detection_is_deep() {
        assert!(!contains_nul(&json!({"a": [1, "b", {"c": null}]})));
        assert!(contains_nul(&json!({"a": [1, "b\u{0}"]})));
        assert!(contains_nul(&json!({"k\u{0}": 1})));
        assert!(contains_nul(&json!("\u{0}")));
    }

    #[test]
    fn serialized_shape_is_initial_and_steps() {
        let mut ctx = Context::new(json!({"x": 1}));
        ctx.put_step_output("a", json!({}));
        assert_eq!(
            serde_json::to_value(&ctx).unwrap(),
            json!({"initial": {"x": 1}, "steps": {"a": {}}})
        );
    }
}
