//! A small component for this crate's own tests: two tables, the second referencing the
//! first, in two versions. The real components live in the crates that own their tables
//! (for example `hephaestus_storage_pg::schema()`).

use crate::component::{Component, Down, SchemaVersion};
use crate::registry::Registry;

static VERSIONS: [SchemaVersion; 2] = [
    SchemaVersion {
        number: 1,
        sqlx_version: 20_000_101_000_001,
        description: "parents and their children",
        up: &[
            "create table if not exists {prefix}.fixture_parents (id bigint primary key)",
            r"create table if not exists {prefix}.fixture_children (
    id bigint primary key,
    parent_id bigint not null references {prefix}.fixture_parents (id) on delete cascade
)",
            "create index if not exists fixture_children_parent_idx on {prefix}.fixture_children (parent_id)",
        ],
        down: Down::Statements(&[
            "drop table if exists {prefix}.fixture_children",
            "drop table if exists {prefix}.fixture_parents",
        ]),
    },
    SchemaVersion {
        number: 2,
        sqlx_version: 20_000_101_000_002,
        description: "a name for parents",
        up: &["alter table {prefix}.fixture_parents add column if not exists name text"],
        down: Down::Statements(&[
            "alter table {prefix}.fixture_parents drop column if exists name",
        ]),
    },
];

/// The `fixture` component.
pub(crate) fn component() -> Component {
    Component::new("fixture", &VERSIONS).unwrap()
}

/// A registry holding only the `fixture` component.
pub(crate) fn registry() -> Registry {
    Registry::new(vec![component()]).unwrap()
}
