//! Versioned, idempotent DDL for the Hephaestus tables, in PostgreSQL's dialect or in
//! SQLite's ([`Dialect`]).
//!
//! A [`Component`] is a set of tables owned by one crate (for example `storage`, the
//! workflow instances and their step results, defined by `hephaestus_storage_pg::schema()`)
//! with an ordered list of [`SchemaVersion`]s. This crate renders, for a validated
//! [`SchemaPrefix`] (a PostgreSQL schema, default `public`), the SQL that migrates a
//! component between ANY two versions, and the sqlx-compatible files that
//! `cargo xtask gen-migration` writes into `migrations/` for a [`Registry`] of components.
//! A component written for SQLite ([`Component::with_dialect`] with [`Dialect::Sqlite`])
//! renders the same way without schemas or advisory locks: a SQLite file is one namespace,
//! and SQLite serializes migrators with its own write lock.
//! It depends on no other crate of the workspace and knows no table of its own.
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
//! use hephaestus_migrations_gen::{render_down, render_up, Component, Down, Registry, SchemaPrefix, SchemaVersion};
//!
//! // A component is defined by the crate that owns its tables.
//! static VERSIONS: [SchemaVersion; 1] = [SchemaVersion {
//!     number: 1,
//!     sqlx_version: 20_260_101_000_001,
//!     description: "notes",
//!     up: &["create table if not exists {prefix}.notes (id bigint primary key, body text not null)"],
//!     down: Down::Statements(&["drop table if exists {prefix}.notes"]),
//! }];
//! let notes = Component::new("notes", &VERSIONS)?;
//! let registry = Registry::new(vec![notes])?;
//! let notes = registry.get("notes")?;
//! let prefix = SchemaPrefix::new("tenant_a")?;
//!
//! let up = render_up(notes, &prefix, 0, notes.latest())?;
//! assert_eq!(up.versions(), &[1]);
//! assert!(up.to_sql().contains("create table if not exists \"tenant_a\".notes"));
//!
//! // Already at the target: nothing to do, no error.
//! assert!(render_up(notes, &prefix, 1, 1)?.is_empty());
//!
//! // Down to 0 drops everything the component created.
//! let down = render_down(notes, &prefix, notes.latest(), 0)?;
//! assert!(down.to_sql().contains("drop table if exists \"tenant_a\".notes"));
//! # Ok::<(), hephaestus_migrations_gen::Error>(())
//! ```

mod component;
mod error;
pub mod files;
#[cfg(test)]
mod fixture;
mod prefix;
mod registry;
mod render;

pub use component::{Component, Dialect, Down, PREFIX_PLACEHOLDER, SchemaVersion};
pub use error::{Error, PrefixRule};
pub use prefix::SchemaPrefix;
pub use registry::Registry;
pub use render::{
    Direction, Migrated, Script, VERSIONS_TABLE, current_version_sql, down_versions, render_down,
    render_up, sqlite_current_version_sql, sqlite_versions_table_exists_sql, up_versions,
    versions_table_exists_sql,
};
