//! JSON as collapsible HTML: objects and arrays are `<details>` (open at
//! the top level), scalars are spans classed by type. Built as one string
//! with escaping, so a 1 MB context renders in milliseconds.

use std::fmt::Write as _;

use maud::{Markup, PreEscaped};
use serde_json::Value;

/// Children of one object or array shown before the rest is cut (the raw
/// JSON link has everything).
const MAX_CHILDREN: usize = 1_000;

fn escape_into(out: &mut String, text: &str) {
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
}

/// `value` as a collapsible tree.
pub(crate) fn tree(value: &Value) -> Markup {
    let mut out = String::new();
    out.push_str(r#"<div class="json">"#);
    node(&mut out, None, value, 0);
    out.push_str("</div>");
    PreEscaped(out)
}

fn key_into(out: &mut String, key: Option<&str>) {
    if let Some(key) = key {
        out.push_str(r#"<span class="json-key">"#);
        escape_into(out, key);
        out.push_str("</span>: ");
    }
}

fn node(out: &mut String, key: Option<&str>, value: &Value, depth: usize) {
    match value {
        Value::Object(map) if !map.is_empty() => {
            container(out, key, depth, '{', '}', map.len(), |out| {
                for (k, v) in map.iter().take(MAX_CHILDREN) {
                    node(out, Some(k), v, depth + 1);
                }
            });
        }
        Value::Array(items) if !items.is_empty() => {
            container(out, key, depth, '[', ']', items.len(), |out| {
                for (i, v) in items.iter().take(MAX_CHILDREN).enumerate() {
                    node(out, Some(&i.to_string()), v, depth + 1);
                }
            });
        }
        scalar => {
            out.push_str(r#"<div class="json-row">"#);
            key_into(out, key);
            let class = match scalar {
                Value::Null => "null",
                Value::Bool(_) => "bool",
                Value::Number(_) => "number",
                Value::String(_) => "string",
                Value::Object(_) | Value::Array(_) => "empty",
            };
            let _ = write!(out, r#"<span class="json-{class}">"#);
            escape_into(out, &scalar.to_string());
            out.push_str("</span></div>");
        }
    }
}

fn container(
    out: &mut String,
    key: Option<&str>,
    depth: usize,
    open: char,
    close: char,
    len: usize,
    children: impl FnOnce(&mut String),
) {
    let _ = write!(
        out,
        r#"<details class="json-node"{}><summary>"#,
        if depth == 0 { " open" } else { "" }
    );
    key_into(out, key);
    let _ = write!(
        out,
        r#"{open}<span class="json-count">{len} {}</span>{close}</summary><div class="json-children">"#,
        match (open, len) {
            ('{', 1) => "key",
            ('{', _) => "keys",
            (_, 1) => "item",
            _ => "items",
        }
    );
    children(out);
    if len > MAX_CHILDREN {
        let _ = write!(
            out,
            r#"<div class="json-row json-cut">… {} more not shown</div>"#,
            len - MAX_CHILDREN
        );
    }
    out.push_str("</div></details>");
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn objects_and_arrays_collapse_and_text_is_escaped() {
        let html = tree(&json!({"a": [1, "<b>"], "c": {}})).into_string();
        assert!(html.starts_with(r#"<div class="json"><details class="json-node" open>"#));
        assert!(html.contains(
            r#"<span class="json-key">a</span>: [<span class="json-count">2 items</span>]"#
        ));
        assert!(html.contains(r#"<span class="json-string">&quot;&lt;b&gt;&quot;</span>"#));
        assert!(
            html.contains(r#"<span class="json-key">c</span>: <span class="json-empty">{}</span>"#)
        );
        assert_eq!(html.matches("<details").count(), 2);
    }
}
