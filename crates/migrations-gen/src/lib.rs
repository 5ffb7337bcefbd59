//! Versioned, idempotent PostgreSQL DDL for the Hephaestus tables.
//!
//! A [`Component`] is a set of tables owned by one crate (today: `storage`, the workflow
//! instances and their step results) with an ordered list of [`SchemaVersion`]s. This
//! crate renders, for a validated [`SchemaPrefix`] (a PostgreSQL schema, default
//! `public`), the SQL that migrates a component between ANY two versions, and the
//! sqlx-compatible files that `cargo xtask gen-migration` writes into `migrations/`.
//! It does no I/O against a database and has no async code: runtime crates embed the
//! rendered text and run it themselves.
//!
//! # Invariants
//!
//! - The validated prefix (`^[a-z_][a-z0-9_]*$`, at most 63 bytes, not `pg_*`) is the
//!   only value interpolated into SQL, and it is always quoted as an identifier.
//! - Every statement is idempotent (`if not exists`, `if exists`, `do` blocks) and
//!   transaction-safe; a rendered script contains no transaction control and is meant to
//!   run inside one transaction (sqlx runs each migration file in one).
//! - Applied versions are recorded per component in
//!   `<prefix>.hephaestus_schema_versions (component, version, applied_at)`: every up
//!   script creates that table if needed and ends by recording its target; a down script
//!   records its target, deleting the row at 0. The versions table is never dropped.
//! - Range rules (fixing the original's defect G24): up from `from` runs
//!   `(from + 1)..=to` and is an empty, valid plan when `from >= to`; down runs the downs
//!   of `from..=to + 1`, newest first, and is empty when `to >= from`; down to 0 drops
//!   every table the component created. A version beyond the latest is
//!   [`Error::UnknownVersion`]. An irreversible version ([`Down::Irreversible`]) makes
//!   [`render_down`] return [`Error::Irreversible`], and its generated down file raises an
//!   exception: reverting it never silently does nothing.
//! - Output is deterministic: no clock or randomness is involved.
//!
//! # Example
//!
//! ```
//! use hephaestus_migrations_gen::{render_down, render_up, Registry, SchemaPrefix};
//!
//! let registry = Registry::builtin();
//! let storage = registry.get("storage")?;
//! let prefix = SchemaPrefix::new("tenant_a")?;
//!
//! let up = render_up(storage, &prefix, 0, storage.latest())?;
//! assert_eq!(up.versions(), &[1]);
//! assert!(up.to_sql().contains("\"tenant_a\".hephaestus_step_results"));
//!
//! // Already at the target: nothing to do, no error.
//! assert!(render_up(storage, &prefix, 1, 1)?.is_empty());
//!
//! // Down to 0 drops everything the component created.
//! let down = render_down(storage, &prefix, storage.latest(), 0)?;
//! assert!(down.to_sql().contains("drop table if exists \"tenant_a\".hephaestus_instances"));
//! # Ok::<(), hephaestus_migrations_gen::Error>(())
//! ```

mod component;
pub mod components;
mod error;
pub mod files;
mod prefix;
mod registry;
mod render;

pub use component::{Component, Down, PREFIX_PLACEHOLDER, SchemaVersion};
pub use error::{Error, PrefixRule};
pub use prefix::SchemaPrefix;
pub use registry::Registry;
pub use render::{
    Direction, Script, VERSIONS_TABLE, current_version_sql, down_versions, render_down, render_up,
    up_versions, versions_table_exists_sql,
};
