//! JSON containment as PostgreSQL's `jsonb @>` defines it, for backends
//! that match jobs by their arguments without a database.

use serde_json::{Number, Value};

/// JSON containment with PostgreSQL's `jsonb @>` semantics: an object
/// contains an object when every key of the needle is present with a
/// contained value; an array contains an array when every needle element is
/// contained in some element; scalars contain equal scalars (numbers compare
/// numerically). At the top level only, an array also contains a scalar it
/// has as an element.
pub fn json_contains(haystack: &Value, needle: &Value) -> bool {
    match (haystack, needle) {
        (
            Value::Array(items),
            Value::Null | Value::Bool(_) | Value::Number(_) | Value::String(_),
        ) => items.iter().any(|item| scalars_equal(item, needle)),
        _ => contains(haystack, needle),
    }
}

fn contains(haystack: &Value, needle: &Value) -> bool {
    match (haystack, needle) {
        (Value::Object(h), Value::Object(n)) => n
            .iter()
            .all(|(key, value)| h.get(key).is_some_and(|hv| contains(hv, value))),
        (Value::Array(h), Value::Array(n)) => {
            n.iter().all(|nv| h.iter().any(|hv| contains(hv, nv)))
        }
        (Value::Object(_) | Value::Array(_), _) | (_, Value::Object(_) | Value::Array(_)) => false,
        _ => scalars_equal(haystack, needle),
    }
}

fn scalars_equal(a: &Value, b: &Value) -> bool {
    match (a, b) {
        (Value::Null, Value::Null) => true,
        (Value::Bool(x), Value::Bool(y)) => x == y,
        (Value::String(x), Value::String(y)) => x == y,
        (Value::Number(x), Value::Number(y)) => numbers_equal(x, y),
        _ => false,
    }
}

#[allow(clippy::float_cmp, reason = "jsonb compares numbers by value: 1 = 1.0")]
fn numbers_equal(a: &Number, b: &Number) -> bool {
    if let (Some(x), Some(y)) = (a.as_i64(), b.as_i64()) {
        return x == y;
    }
    if let (Some(x), Some(y)) = (a.as_u64(), b.as_u64()) {
        return x == y;
    }
    match (a.as_f64(), b.as_f64()) {
        (Some(x), Some(y)) => x == y,
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn json_containment_follows_jsonb() {
        let yes = [
            (json!({"a": 1, "b": 2}), json!({"a": 1})),
            (json!({"a": 1}), json!({})),
            (json!({"a": {"b": 1, "c": 2}}), json!({"a": {"b": 1}})),
            (json!([1, 2, 3]), json!([3, 1])),
            (json!([1, 2, 3]), json!([1, 1])),
            (json!([1, [2, 3]]), json!([[3]])),
            (json!([{"a": 1, "b": 2}]), json!([{"a": 1}])),
            (json!(["foo", "bar"]), json!("bar")),
            (json!({"n": 1}), json!({"n": 1.0})),
            (json!("x"), json!("x")),
            (json!(null), json!(null)),
            (json!([]), json!([])),
        ];
        for (haystack, needle) in yes {
            assert!(json_contains(&haystack, &needle), "{haystack} @> {needle}");
        }
        let no = [
            (json!({"a": 1}), json!({"a": 2})),
            (json!({"a": 1}), json!({"b": 1})),
            (json!({"foo": {"bar": "baz"}}), json!({"bar": "baz"})),
            (json!([1, [2, 3]]), json!([2])),
            (json!([1, 2]), json!({"0": 1})),
            (json!("foo"), json!(["foo"])),
            (json!({"tags": ["x", "y"]}), json!({"tags": "y"})),
            (json!({"n": 1}), json!({"n": "1"})),
            (json!({"n": -1}), json!({"n": u64::MAX})),
            (json!([[1]]), json!(1)),
            (json!(true), json!(1)),
        ];
        for (haystack, needle) in no {
            assert!(
                !json_contains(&haystack, &needle),
                "not {haystack} @> {needle}"
            );
        }
    }
}
