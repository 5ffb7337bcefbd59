//! JSON to and from `jsonb`, losslessly.
//!
//! Values are serialized once with `serde_json` and sent as text cast to `jsonb`. `jsonb`
//! keeps numbers as `numeric` (exact: `u64::MAX`, `i64::MIN` and every `f64` survive;
//! floats are written with a fractional part so they come back as floats, see
//! [`PlainFloats`]), strings as UTF-8, and objects as sets of keys, which is what
//! `serde_json::Map` is; so a value read back is equal (`==`) to the value written. The
//! sign of a negative zero is not kept (`numeric` has no `-0`); it is still equal. The one thing `jsonb` cannot
//! hold is U+0000: values containing it are rejected with [`PortError::InvalidInput`]
//! before anything is sent (the in-memory backend rejects them too).
//!
//! Reading back goes through `serde_json` with its `float_roundtrip` feature (enabled by
//! this crate's manifest): without it, parsing is best-effort and a float such as
//! `f64::MAX` may not come back exactly. The parser stops at 128 levels of nesting; an
//! instance's state document uses four of them.

use std::{fmt, io};

use hephaestus_engine_core::ports::PortError;
use serde::Serialize;

/// Serializes `value` to JSON text for a `$n::jsonb` parameter; rejects U+0000.
pub(crate) fn to_jsonb_text<T: Serialize + ?Sized>(
    what: &str,
    value: &T,
) -> Result<String, PortError> {
    let mut out = Vec::with_capacity(128);
    let mut serializer = serde_json::Serializer::with_formatter(&mut out, PlainFloats);
    value
        .serialize(&mut serializer)
        .map_err(|e| PortError::InvalidInput(format!("{what} cannot be encoded as JSON: {e}")))?;
    let text = String::from_utf8(out)
        .map_err(|e| PortError::InvalidInput(format!("{what} is not UTF-8 JSON: {e}")))?;
    if has_escaped_nul(&text) {
        return Err(nul_error(what));
    }
    // The last line of defence (the engine refuses values past its own,
    // lower, limit where they enter): a document the decoder cannot read
    // back would make every later read of its row fail.
    if nesting_of(&text) > MAX_READABLE_NESTING {
        return Err(PortError::InvalidInput(format!(
            "{what} is nested deeper than {MAX_READABLE_NESTING} levels, which could not be read back"
        )));
    }
    Ok(text)
}

/// The deepest nesting `serde_json` reads back (its parser stops at 128).
const MAX_READABLE_NESTING: usize = 127;

/// How deeply arrays and objects nest in JSON text produced by `serde_json`
/// (brackets inside strings are skipped, as are escaped quotes).
fn nesting_of(json: &str) -> usize {
    let mut depth: usize = 0;
    let mut deepest: usize = 0;
    let mut in_string = false;
    let mut escaped = false;
    for b in json.bytes() {
        if in_string {
            if escaped {
                escaped = false;
            } else if b == b'\\' {
                escaped = true;
            } else if b == b'"' {
                in_string = false;
            }
            continue;
        }
        match b {
            b'"' => in_string = true,
            b'[' | b'{' => {
                depth += 1;
                deepest = deepest.max(depth);
            }
            b']' | b'}' => depth = depth.saturating_sub(1),
            _ => {}
        }
    }
    deepest
}

/// `serde_json`'s formatter, except that floats are written in plain decimal notation
/// with a fractional part (`1e16` as `10000000000000000.0`).
///
/// `jsonb` stores numbers as `numeric` and prints them back without exponent, keeping
/// the digits after the decimal point. `serde_json` writes `1e16_f64` as `1e+16`, which
/// would come back as `10000000000000000`: an integer, no longer equal to the float.
/// With a fractional part it comes back as the float it was. Rust's `Display` for
/// floats prints the shortest digits that read back as the same value, never with an
/// exponent.
struct PlainFloats;

impl serde_json::ser::Formatter for PlainFloats {
    fn write_f32<W: ?Sized + io::Write>(&mut self, writer: &mut W, value: f32) -> io::Result<()> {
        write_plain(writer, &value)
    }

    fn write_f64<W: ?Sized + io::Write>(&mut self, writer: &mut W, value: f64) -> io::Result<()> {
        write_plain(writer, &value)
    }
}

/// Writes a finite float (`serde_json` writes non-finite ones as `null` itself).
fn write_plain<W: ?Sized + io::Write>(writer: &mut W, value: &dyn fmt::Display) -> io::Result<()> {
    let text = value.to_string();
    writer.write_all(text.as_bytes())?;
    if !text.contains('.') {
        writer.write_all(b".0")?;
    }
    Ok(())
}

/// Rejects a plain text value PostgreSQL cannot store.
pub(crate) fn check_text(what: &str, text: &str) -> Result<(), PortError> {
    if text.contains('\0') {
        Err(nul_error(what))
    } else {
        Ok(())
    }
}

fn nul_error(what: &str) -> PortError {
    PortError::InvalidInput(format!(
        "{what} contains U+0000, which PostgreSQL cannot store"
    ))
}

/// Whether JSON text produced by `serde_json` contains the escape `\u0000`.
///
/// Backslashes appear only inside strings, always as the start of an escape, so skipping
/// each escape as a whole finds exactly the escaped NULs (`\\u0000` is a backslash
/// followed by the text `u0000`, not a NUL). `serde_json` never writes a raw control
/// character.
fn has_escaped_nul(json: &str) -> bool {
    let bytes = json.as_bytes();
    let mut at = 0;
    while let Some(offset) = bytes[at..].iter().position(|b| *b == b'\\') {
        let escape = at + offset;
        if bytes.get(escape + 1..escape + 6) == Some(b"u0000".as_slice()) {
            return true;
        }
        at = escape + 2;
        if at >= bytes.len() {
            return false;
        }
    }
    false
}

#[cfg(test)]
mod tests {
    use hephaestus_engine_core::context::contains_nul;
    use proptest::prelude::*;
    use serde_json::{Value, json};

    use super::*;

    #[test]
    fn nesting_skips_strings() {
        assert_eq!(nesting_of(r#"{"a":[1,{"b":"[[[{"}],"c\\"":"]]"}"#), 3);
        assert_eq!(nesting_of("1"), 0);
        let deep = hephaestus_engine_core::limits::nested(128);
        assert!(to_jsonb_text("state", &deep).is_err());
        let fine = hephaestus_engine_core::limits::nested(127);
        assert!(to_jsonb_text("state", &fine).is_ok());
        let read: serde_json::Value =
            serde_json::from_str(&to_jsonb_text("state", &fine).unwrap()).unwrap();
        assert_eq!(read, fine, "the deepest accepted document reads back");
    }

    #[test]
    fn finds_escaped_nuls_only() {
        for (value, expected) in [
            (json!("plain"), false),
            (json!("a\u{0}b"), true),
            (json!({"k\u{0}": 1}), true),
            (json!(["\\u0000"]), false),
            (json!("\\\u{0}"), true),
            (json!("\\"), false),
            (json!("\u{1}\u{1f}"), false),
            (json!([{"deep": [null, "x\u{0}"]}]), true),
        ] {
            let text = serde_json::to_string(&value).unwrap();
            assert_eq!(has_escaped_nul(&text), expected, "{text}");
            assert_eq!(
                to_jsonb_text("value", &value).is_err(),
                expected,
                "{value:?}"
            );
        }
        assert!(check_text("event", "a\u{0}").is_err());
        assert!(check_text("event", "done").is_ok());
    }

    #[test]
    fn floats_keep_a_fractional_part_and_round_trip() {
        for f in [
            1e16_f64,
            -1e17,
            1e20,
            1.5e300,
            f64::MAX,
            f64::MIN_POSITIVE,
            5e-324,
            1e-7,
            0.1,
            3.0,
            -0.0,
            123_456.789,
        ] {
            let text = to_jsonb_text("float", &f).unwrap();
            assert!(text.contains('.') && !text.contains('e'), "{f:e} -> {text}");
            let back: Value = serde_json::from_str(&text).unwrap();
            assert!(back.is_f64(), "{text}");
            assert_eq!(back.as_f64(), Some(f), "{text}");
        }
        assert_eq!(to_jsonb_text("f32", &1.5_f32).unwrap(), "1.5");
        assert_eq!(
            to_jsonb_text("mixed", &json!({"i": u64::MAX, "n": i64::MIN, "f": 2.0})).unwrap(),
            r#"{"f":2.0,"i":18446744073709551615,"n":-9223372036854775808}"#
        );
    }

    fn json_value() -> impl Strategy<Value = Value> {
        let leaf = prop_oneof![
            Just(Value::Null),
            any::<bool>().prop_map(Value::Bool),
            any::<i64>().prop_map(Value::from),
            "[\\\\\\x00-\\x1fa-z\"u0]{0,8}".prop_map(Value::String),
        ];
        leaf.prop_recursive(3, 24, 4, |inner| {
            prop_oneof![
                prop::collection::vec(inner.clone(), 0..4).prop_map(Value::Array),
                prop::collection::btree_map("[\\\\\\x00a-z0u]{0,4}", inner, 0..4)
                    .prop_map(|m| Value::Object(m.into_iter().collect())),
            ]
        })
    }

    proptest! {
        #[test]
        fn agrees_with_contains_nul(value in json_value()) {
            let text = serde_json::to_string(&value).unwrap();
            prop_assert_eq!(has_escaped_nul(&text), contains_nul(&value));
        }
    }
}
