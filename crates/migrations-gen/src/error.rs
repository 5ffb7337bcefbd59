//! The crate's one error type.

use std::path::PathBuf;

/// Why a schema prefix was rejected (see [`crate::SchemaPrefix::new`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum PrefixRule {
    /// Not of the form `^[a-z_][a-z0-9_]*$` (this includes the empty string).
    Pattern,
    /// Longer than PostgreSQL's identifier limit of 63 bytes.
    TooLong,
    /// Starts with `pg_`, which PostgreSQL reserves for system schemas.
    Reserved,
    /// A schema of PostgreSQL's own (`information_schema`): tables created
    /// there are left out of `pg_dump` backups.
    System,
}

impl PrefixRule {
    fn suffix(self) -> &'static str {
        match self {
            Self::Pattern => "",
            Self::TooLong => " and be at most 63 bytes long",
            Self::Reserved => {
                " and must not start with pg_ (reserved for PostgreSQL system schemas)"
            }
            Self::System => {
                " and must not be a PostgreSQL system schema (pg_dump does not back up tables created there)"
            }
        }
    }
}

/// Everything that can go wrong while validating, rendering or writing migrations.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The schema prefix is not a safe PostgreSQL identifier.
    #[error("invalid prefix \"{prefix}\" — must match ^[a-z_][a-z0-9_]*${}", rule.suffix())]
    InvalidPrefix {
        /// The rejected input, verbatim.
        prefix: String,
        /// Which rule it broke.
        rule: PrefixRule,
    },

    /// A requested version does not exist for the component.
    #[error(
        "unknown version {version} of component \"{component}\" (known versions: 0..={latest})"
    )]
    UnknownVersion {
        /// Component name.
        component: String,
        /// The version that was asked for.
        version: u32,
        /// The latest version this library knows.
        latest: u32,
    },

    /// No component of that name is registered.
    #[error("unknown component \"{0}\"")]
    UnknownComponent(String),

    /// The down range contains a version that cannot be reverted.
    #[error("{component} v{version} is irreversible and cannot be migrated down: {reason}")]
    Irreversible {
        /// Component name.
        component: String,
        /// The irreversible version.
        version: u32,
        /// Why it cannot be reverted.
        reason: String,
    },

    /// A component or registry definition breaks one of the rules in [`crate::Component::new`].
    #[error("invalid definition of component \"{component}\": {problem}")]
    InvalidComponent {
        /// Component name.
        component: String,
        /// What is wrong.
        problem: String,
    },

    /// A migration file exists with different content; released migrations are append-only.
    #[error(
        "refusing to overwrite {} (its content differs from the generated migration; released migrations are append-only: add a new version instead)",
        path.display()
    )]
    WouldOverwrite {
        /// The existing file.
        path: PathBuf,
    },

    /// Reading or writing a migration file or directory failed.
    #[error("I/O error on {}", path.display())]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
}
