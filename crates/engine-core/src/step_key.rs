//! Derivation of a step's default context key from its short name.
//!
//! The rule (fixed here, and tested): the first character is lower-cased; an
//! upper-case letter later in the name gets a `_` before it when the next
//! character is lower-case (`SAPExample` → `sap_example`), or when the
//! previous character is neither upper-case nor `_` (`StepA` → `step_a`);
//! digits never start a new word (`V2` → `v2`, `Step2B` → `step2_b`); every
//! other character is copied lower-cased. Non-ASCII characters are copied as
//! they are.

/// Converts a `CamelCase` short name to `snake_case`.
pub fn underscore(name: &str) -> String {
    let chars: Vec<char> = name.chars().collect();
    let mut out = String::with_capacity(name.len() + 4);
    for (i, &c) in chars.iter().enumerate() {
        if i == 0 {
            out.push(c.to_ascii_lowercase());
            continue;
        }
        if c.is_ascii_uppercase() {
            let prev = chars[i - 1];
            let next = chars.get(i + 1).copied();
            let next_starts_word = next.is_some_and(|n| n.is_ascii_lowercase());
            let prev_ends_word = !prev.is_ascii_uppercase() && prev != '_';
            if (next_starts_word && prev != '_') || prev_ends_word {
                out.push('_');
            }
            out.push(c.to_ascii_lowercase());
        } else {
            out.push(c.to_ascii_lowercase());
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::underscore;

    #[test]
    fn reference_vectors_from_the_original() {
        for (input, expected) in [
            ("ValidateOrder", "validate_order"),
            ("StepA", "step_a"),
            ("ParallelB", "parallel_b"),
            ("PassWithContextStep", "pass_with_context_step"),
            ("WaitForEvent", "wait_for_event"),
            ("Done", "done"),
            ("SAPExample", "sap_example"),
            ("V2", "v2"),
        ] {
            assert_eq!(underscore(input), expected, "{input}");
        }
    }

    #[test]
    fn digits_and_underscores() {
        assert_eq!(underscore("Step2B"), "step2_b");
        assert_eq!(underscore("already_snake"), "already_snake");
        assert_eq!(underscore("With_Under"), "with_under");
        assert_eq!(underscore("HTTPRequest2"), "http_request2");
        assert_eq!(underscore(""), "");
    }
}
