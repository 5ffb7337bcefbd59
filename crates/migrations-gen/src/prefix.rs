//! The validated schema prefix: the one value ever interpolated into generated SQL.

use std::fmt;

use crate::error::{Error, PrefixRule};

/// PostgreSQL's identifier limit (`NAMEDATALEN - 1`).
const MAX_IDENTIFIER_BYTES: usize = 63;

/// PostgreSQL's own schemas that do not start with `pg_` (those that do are
/// all reserved).
const SYSTEM_SCHEMAS: [&str; 1] = ["information_schema"];

/// True when `s` matches `^[a-z_][a-z0-9_]*$`.
pub(crate) fn is_identifier(s: &str) -> bool {
    let mut bytes = s.bytes();
    match bytes.next() {
        Some(first) if first.is_ascii_lowercase() || first == b'_' => {}
        _ => return false,
    }
    bytes.all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
}

/// A PostgreSQL schema name that is safe to interpolate into SQL.
///
/// It matches `^[a-z_][a-z0-9_]*$`, is at most 63 bytes long, does not start with `pg_`
/// and is not `information_schema` (system schemas are not backed up by `pg_dump`).
/// It is still always quoted as an identifier (see [`SchemaPrefix::quoted`]), so reserved
/// words such as `user` or `order` work too.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SchemaPrefix(String);

impl SchemaPrefix {
    /// The default prefix, `public`.
    pub const DEFAULT: &'static str = "public";

    /// Validates `prefix`.
    ///
    /// ```
    /// use hephaestus_migrations_gen::SchemaPrefix;
    /// assert!(SchemaPrefix::new("tenant_42").is_ok());
    /// let err = SchemaPrefix::new("Bad-Prefix").unwrap_err();
    /// assert_eq!(err.to_string(), "invalid prefix \"Bad-Prefix\" — must match ^[a-z_][a-z0-9_]*$");
    /// ```
    pub fn new(prefix: &str) -> Result<Self, Error> {
        let rule = if !is_identifier(prefix) {
            Some(PrefixRule::Pattern)
        } else if prefix.len() > MAX_IDENTIFIER_BYTES {
            Some(PrefixRule::TooLong)
        } else if prefix.starts_with("pg_") {
            Some(PrefixRule::Reserved)
        } else if SYSTEM_SCHEMAS.contains(&prefix) {
            Some(PrefixRule::System)
        } else {
            None
        };
        match rule {
            Some(rule) => Err(Error::InvalidPrefix {
                prefix: prefix.to_owned(),
                rule,
            }),
            None => Ok(Self(prefix.to_owned())),
        }
    }

    /// The bare name, e.g. `public`.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The name quoted as an identifier, e.g. `"public"`. Safe because the name never
    /// contains a double quote.
    pub fn quoted(&self) -> String {
        format!("\"{}\"", self.0)
    }

    /// The name as a SQL string literal, e.g. `'public'`. Safe because the name never
    /// contains a single quote.
    pub fn literal(&self) -> String {
        format!("'{}'", self.0)
    }
}

impl Default for SchemaPrefix {
    fn default() -> Self {
        Self(Self::DEFAULT.to_owned())
    }
}

impl fmt::Display for SchemaPrefix {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::str::FromStr for SchemaPrefix {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::new(s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_valid_prefixes() {
        for p in [
            "public",
            "a",
            "_",
            "_x",
            "tenant_42",
            "t_0123456789abcdef",
            "user",
            "order",
            "pg",
            "pgx_a",
            &"a".repeat(63),
        ] {
            let prefix = SchemaPrefix::new(p).unwrap_or_else(|e| panic!("{p:?} rejected: {e}"));
            assert_eq!(prefix.as_str(), p);
            assert_eq!(prefix.quoted(), format!("\"{p}\""));
            assert_eq!(prefix.literal(), format!("'{p}'"));
        }
    }

    #[test]
    fn rejects_invalid_prefixes_with_the_documented_message() {
        for p in [
            "",
            "Public",
            "1abc",
            "a-b",
            "a b",
            " a",
            "a\"b",
            "a'b",
            "x; drop table y",
            "é",
            "a.b",
            "tenant\n",
            "ÄBC",
        ] {
            let err = SchemaPrefix::new(p).expect_err(p);
            assert!(matches!(
                err,
                Error::InvalidPrefix {
                    rule: PrefixRule::Pattern,
                    ..
                }
            ));
            assert_eq!(
                err.to_string(),
                format!("invalid prefix \"{p}\" — must match ^[a-z_][a-z0-9_]*$")
            );
        }
    }

    #[test]
    fn rejects_too_long_and_reserved_prefixes() {
        let long = "a".repeat(64);
        let err = SchemaPrefix::new(&long).unwrap_err();
        assert!(matches!(
            err,
            Error::InvalidPrefix {
                rule: PrefixRule::TooLong,
                ..
            }
        ));
        assert!(err.to_string().starts_with(&format!(
            "invalid prefix \"{long}\" — must match ^[a-z_][a-z0-9_]*$"
        )));

        for p in ["pg_catalog", "pg_temp", "pg_"] {
            let err = SchemaPrefix::new(p).unwrap_err();
            assert!(matches!(
                err,
                Error::InvalidPrefix {
                    rule: PrefixRule::Reserved,
                    ..
                }
            ));
            assert!(err.to_string().contains("pg_"));
        }
        let err = SchemaPrefix::new("information_schema").unwrap_err();
        assert!(matches!(
            err,
            Error::InvalidPrefix {
                rule: PrefixRule::System,
                ..
            }
        ));
        assert!(err.to_string().contains("system schema"), "{err}");
    }

    #[test]
    fn default_is_public() {
        assert_eq!(SchemaPrefix::default().as_str(), "public");
        assert_eq!(
            "public".parse::<SchemaPrefix>().unwrap(),
            SchemaPrefix::default()
        );
    }
}
