//! What a JSON value must be to enter an instance: the limits every value
//! is checked against at the boundary, before anything is stored.
//!
//! Every JSON value that enters the system — a start input, caller
//! metadata, a resume payload, a step's output and metadata, a step config,
//! a workflow's metadata — becomes part of a stored document that every
//! later read must decode. A value the decoder cannot read back would poison
//! the instance for good (its jobs fail, its business key stays held, every
//! listing that meets it fails), so a value is refused where it enters,
//! with a typed [`InvalidJson`] naming what it was and what is wrong:
//!
//! - it must not contain U+0000 in a string or key (PostgreSQL's `jsonb`
//!   cannot hold it);
//! - it must not be nested deeper than [`MAX_DEPTH`] arrays and objects
//!   (decoders stop at 128 levels, and an instance's state document wraps
//!   each value in a few levels of its own);
//! - it must not be larger than [`MAX_BYTES`] once serialized (the state
//!   document is rewritten at every advance);
//! - a start input must be a JSON object (its keys are the context's).
//!
//! Anything accepted is stored and read back identically on every backend.

use std::fmt;
use std::io;

use serde::Serialize;
use serde_json::Value;

/// The deepest nesting of arrays and objects a value may have: `{}` is one
/// level, `{"a": [1]}` two, a scalar none.
pub const MAX_DEPTH: usize = 64;

/// The largest a value may be, in bytes of compact JSON.
pub const MAX_BYTES: usize = 16 * 1024 * 1024;

/// Which value a check was about.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum JsonRole {
    /// The input given at start (`context.initial`).
    Input,
    /// Caller metadata carried on telemetry events.
    TelemetryMetadata,
    /// The payload of a resume.
    ResumePayload,
    /// The output a step completed with.
    StepOutput,
    /// The metadata a step completed with.
    StepMetadata,
    /// A step's config (literal in the definition or picked by a route).
    StepConfig,
    /// A workflow definition's metadata.
    WorkflowMetadata,
}

impl JsonRole {
    /// The role in words, as error messages name it.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Input => "the start input",
            Self::TelemetryMetadata => "the telemetry metadata",
            Self::ResumePayload => "the resume payload",
            Self::StepOutput => "the step output",
            Self::StepMetadata => "the step metadata",
            Self::StepConfig => "the step config",
            Self::WorkflowMetadata => "the workflow metadata",
        }
    }
}

impl fmt::Display for JsonRole {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What is wrong with a value.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum JsonProblem {
    /// It had to be an object and is not.
    #[error("is {found}, not a JSON object")]
    NotAnObject {
        /// What it is (`an array`, `a string`, `null`, ...).
        found: &'static str,
    },
    /// A string or key holds U+0000.
    #[error("contains U+0000, which cannot be stored")]
    ContainsNul,
    /// Arrays and objects nest deeper than allowed.
    #[error("is nested deeper than {max} levels of arrays and objects")]
    TooDeep {
        /// The limit ([`MAX_DEPTH`]).
        max: usize,
    },
    /// The serialized value is larger than allowed.
    #[error("is larger than {max} bytes of JSON")]
    TooLarge {
        /// The limit ([`MAX_BYTES`]).
        max: usize,
    },
}

/// A JSON value refused at the boundary: which one, and why.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{role} {problem}")]
pub struct InvalidJson {
    /// Which value.
    pub role: JsonRole,
    /// What is wrong with it.
    pub problem: JsonProblem,
}

/// Checks that `value` can be stored and read back: no U+0000, at most
/// [`MAX_DEPTH`] levels, at most [`MAX_BYTES`] bytes.
pub fn check(role: JsonRole, value: &Value) -> Result<(), InvalidJson> {
    check_problem(value).map_err(|problem| InvalidJson { role, problem })
}

/// [`check`] for a value that must also be a JSON object (a start input).
pub fn check_object(role: JsonRole, value: &Value) -> Result<(), InvalidJson> {
    if !value.is_object() {
        return Err(InvalidJson {
            role,
            problem: JsonProblem::NotAnObject {
                found: kind_of(value),
            },
        });
    }
    check(role, value)
}

/// [`check`] for a map (metadata).
pub fn check_map(role: JsonRole, map: &serde_json::Map<String, Value>) -> Result<(), InvalidJson> {
    if map.is_empty() {
        return Ok(());
    }
    // One level for the map itself, as when it is stored as an object.
    let mut problem = None;
    let mut bytes: usize = 2;
    for (key, value) in map {
        if key.contains('\0') {
            problem = Some(JsonProblem::ContainsNul);
            break;
        }
        match walk(value, MAX_DEPTH - 1) {
            Ok(bound) => {
                bytes = bytes
                    .saturating_add(bound)
                    .saturating_add(key.len() * 6 + 4);
            }
            Err(p) => {
                problem = Some(p);
                break;
            }
        }
    }
    if let Some(problem) = problem {
        return Err(InvalidJson { role, problem });
    }
    if bytes <= MAX_BYTES {
        return Ok(());
    }
    check_size(map).map_err(|problem| InvalidJson { role, problem })
}

fn check_problem(value: &Value) -> Result<(), JsonProblem> {
    if walk(value, MAX_DEPTH)? <= MAX_BYTES {
        return Ok(());
    }
    // The bound assumed every character escaped: count for real.
    check_size(value)
}

/// Walks `value` without recursion (a value built in memory may be nested
/// far deeper than the stack allows), stopping at the first problem, and
/// returns an upper bound of its size in bytes of compact JSON (every
/// character of a string counted as escaped), so that only a value that
/// may be too large is serialized to count it exactly.
fn walk(value: &Value, max_depth: usize) -> Result<usize, JsonProblem> {
    let mut bound: usize = 0;
    let mut stack: Vec<(&Value, usize)> = vec![(value, 0)];
    while let Some((value, depth)) = stack.pop() {
        // A separator, then the value.
        bound = bound.saturating_add(1);
        match value {
            Value::String(s) => {
                if s.contains('\0') {
                    return Err(JsonProblem::ContainsNul);
                }
                bound = bound.saturating_add(s.len().saturating_mul(6).saturating_add(2));
            }
            Value::Array(items) => {
                if depth + 1 > max_depth {
                    return Err(JsonProblem::TooDeep { max: MAX_DEPTH });
                }
                bound = bound.saturating_add(2);
                stack.extend(items.iter().map(|item| (item, depth + 1)));
            }
            Value::Object(map) => {
                if depth + 1 > max_depth {
                    return Err(JsonProblem::TooDeep { max: MAX_DEPTH });
                }
                bound = bound.saturating_add(2);
                for (key, item) in map {
                    if key.contains('\0') {
                        return Err(JsonProblem::ContainsNul);
                    }
                    bound = bound.saturating_add(key.len().saturating_mul(6).saturating_add(3));
                    stack.push((item, depth + 1));
                }
            }
            // Numbers print in at most 24 bytes (`-1.7976931348623157e308`).
            Value::Null | Value::Bool(_) | Value::Number(_) => bound = bound.saturating_add(24),
        }
    }
    Ok(bound)
}

/// Serializes into a counter that gives up past [`MAX_BYTES`].
fn check_size<T: Serialize + ?Sized>(value: &T) -> Result<(), JsonProblem> {
    let mut counter = Counter { bytes: 0 };
    match serde_json::to_writer(&mut counter, value) {
        Ok(()) => Ok(()),
        Err(_) => Err(JsonProblem::TooLarge { max: MAX_BYTES }),
    }
}

struct Counter {
    bytes: usize,
}

impl io::Write for Counter {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.bytes += buf.len();
        if self.bytes > MAX_BYTES {
            Err(io::Error::other("too large"))
        } else {
            Ok(buf.len())
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

fn kind_of(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// A value nested `depth` levels deep (arrays inside an object), for tests
/// of the limit: `nested(1)` is `{"v": 0}`... each further level wraps the
/// value in an array.
#[doc(hidden)]
pub fn nested(depth: usize) -> Value {
    let mut value = Value::from(0);
    for _ in 1..depth {
        value = Value::Array(vec![value]);
    }
    serde_json::json!({ "v": value })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn depth_counts_arrays_and_objects() {
        assert!(check(JsonRole::Input, &json!(1)).is_ok());
        assert!(check(JsonRole::Input, &nested(MAX_DEPTH)).is_ok());
        assert_eq!(
            check(JsonRole::StepOutput, &nested(MAX_DEPTH + 1)),
            Err(InvalidJson {
                role: JsonRole::StepOutput,
                problem: JsonProblem::TooDeep { max: MAX_DEPTH }
            })
        );
        let deep = nested(MAX_DEPTH);
        let text = serde_json::to_string(&deep).unwrap();
        assert_eq!(
            text.matches('[').count() + text.matches('{').count(),
            MAX_DEPTH
        );
    }

    #[test]
    fn a_value_far_too_deep_is_refused_without_recursion() {
        // Deeper than any recursive walk could go on a test thread's stack.
        let mut value = json!(0);
        for _ in 0..200_000 {
            value = Value::Array(vec![value]);
        }
        assert_eq!(
            check(JsonRole::ResumePayload, &value).unwrap_err().problem,
            JsonProblem::TooDeep { max: MAX_DEPTH }
        );
        // Dropping it recursively would overflow the stack: take it apart.
        while let Value::Array(mut items) = value {
            value = items.pop().unwrap_or(Value::Null);
        }
    }

    #[test]
    fn nul_in_strings_and_keys() {
        for bad in [
            json!({"a": [1, "b\u{0}"]}),
            json!({"k\u{0}": 1}),
            json!("\u{0}"),
        ] {
            assert_eq!(
                check(JsonRole::Input, &bad).unwrap_err().problem,
                JsonProblem::ContainsNul
            );
        }
    }

    #[test]
    fn size_is_bounded() {
        let big = json!({ "s": "x".repeat(MAX_BYTES) });
        let err = check(JsonRole::StepOutput, &big).unwrap_err();
        assert_eq!(err.problem, JsonProblem::TooLarge { max: MAX_BYTES });
        let many = Value::Array(vec![json!("0123456789"); MAX_BYTES / 12]);
        assert!(check(JsonRole::StepOutput, &many).is_err());
        let fits = json!({ "s": "x".repeat(MAX_BYTES - 100) });
        assert!(check(JsonRole::StepOutput, &fits).is_ok());
    }

    #[test]
    fn inputs_must_be_objects() {
        for (bad, found) in [
            (json!([]), "an array"),
            (json!("s"), "a string"),
            (json!(null), "null"),
            (json!(1), "a number"),
            (json!(true), "a boolean"),
        ] {
            let err = check_object(JsonRole::Input, &bad).unwrap_err();
            assert_eq!(err.problem, JsonProblem::NotAnObject { found });
            assert_eq!(
                err.to_string(),
                format!("the start input is {found}, not a JSON object")
            );
        }
        assert!(check_object(JsonRole::Input, &json!({})).is_ok());
    }

    #[test]
    fn maps_count_their_own_level() {
        let mut map = serde_json::Map::new();
        map.insert("k".into(), nested(MAX_DEPTH - 1));
        assert!(check_map(JsonRole::TelemetryMetadata, &map).is_ok());
        map.insert("k".into(), nested(MAX_DEPTH));
        assert!(check_map(JsonRole::TelemetryMetadata, &map).is_err());
        let mut nul = serde_json::Map::new();
        nul.insert("k\u{0}".into(), json!(1));
        assert_eq!(
            check_map(JsonRole::StepMetadata, &nul).unwrap_err().problem,
            JsonProblem::ContainsNul
        );
    }
}
