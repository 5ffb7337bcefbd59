//! Range planning and rendering of up/down scripts.

use std::fmt::Write as _;

use crate::component::{Component, Dialect, Down, PREFIX_PLACEHOLDER};
use crate::error::Error;
use crate::prefix::SchemaPrefix;

/// Name of the table that records the applied version of every component.
pub const VERSIONS_TABLE: &str = "hephaestus_schema_versions";

/// Which way a script migrates.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    /// Towards a newer version.
    Up,
    /// Towards an older version.
    Down,
}

impl Direction {
    fn as_str(self) -> &'static str {
        match self {
            Self::Up => "up",
            Self::Down => "down",
        }
    }
}

/// What a migration run did: the component's recorded version before and
/// after. Returned by the runtime migrators of the crates that own
/// components (`hephaestus_storage_pg::migrate_to`,
/// `hephaestus_queue_pg::migrate_to`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Migrated {
    /// The version recorded before (0: none).
    pub from: u32,
    /// The version recorded now. Equal to `from` when there was nothing to do, including
    /// a database that a newer release already migrated further (it is left alone).
    pub to: u32,
}

impl Migrated {
    /// Whether any DDL ran.
    pub fn changed(&self) -> bool {
        self.from != self.to
    }
}

/// A rendered migration: the statements that take a component from one version to another.
///
/// An empty script (see [`Script::is_empty`]) is a valid no-op plan.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Script {
    component: &'static str,
    dialect: Dialect,
    prefix: SchemaPrefix,
    direction: Direction,
    from: u32,
    to: u32,
    versions: Vec<u32>,
    statements: Vec<String>,
}

impl Script {
    /// The component this script migrates.
    pub fn component(&self) -> &'static str {
        self.component
    }

    /// Up or down.
    pub fn direction(&self) -> Direction {
        self.direction
    }

    /// The version the script starts from, as requested.
    pub fn from(&self) -> u32 {
        self.from
    }

    /// The version the script leads to, as requested.
    pub fn to(&self) -> u32 {
        self.to
    }

    /// The versions whose `up` (or `down`) runs, in execution order.
    pub fn versions(&self) -> &[u32] {
        &self.versions
    }

    /// True when there is nothing to do.
    pub fn is_empty(&self) -> bool {
        self.statements.is_empty()
    }

    /// The individual statements, without trailing `;`, in execution order.
    pub fn statements(&self) -> &[String] {
        &self.statements
    }

    /// The whole script as SQL text: a comment header, then each statement followed by `;`.
    ///
    /// It contains no transaction control: run it inside one transaction (sqlx does that
    /// for every migration file; with psql use `--single-transaction`). An empty script
    /// renders as a comment only.
    pub fn to_sql(&self) -> String {
        let mut sql = String::new();
        // Writing to a String cannot fail.
        let target = match self.dialect {
            Dialect::Postgres => format!("schema {}", self.prefix.quoted()),
            Dialect::Sqlite => "SQLite".to_owned(),
        };
        let _ = writeln!(
            sql,
            "-- hephaestus {}: {} from v{} to v{}, {target}",
            self.component,
            self.direction.as_str(),
            self.from,
            self.to,
        );
        if self.is_empty() {
            sql.push_str("-- nothing to do\n");
            return sql;
        }
        sql.push_str(match self.dialect {
            Dialect::Postgres => "-- idempotent; run inside one transaction (sqlx wraps each migration file in one; with psql use --single-transaction)\n",
            Dialect::Sqlite => "-- idempotent; run inside one `begin immediate` transaction (sqlx wraps each migration file in one)\n",
        });
        for statement in &self.statements {
            sql.push('\n');
            sql.push_str(statement.trim());
            sql.push_str(";\n");
        }
        sql
    }
}

/// The versions whose `up` runs to go from `from` to `to`.
///
/// `from` is the currently applied version (0 when nothing is applied): the result is
/// `(from + 1)..=to`, empty when `from >= to` (including a database that is ahead of this
/// library, which is left alone). `to` beyond the latest version is an error.
pub fn up_versions(component: &Component, from: u32, to: u32) -> Result<Vec<u32>, Error> {
    check_known(component, to)?;
    Ok(if from >= to {
        Vec::new()
    } else {
        (from + 1..=to).collect()
    })
}

/// The versions whose `down` runs to go from `from` to `to`, newest first.
///
/// The result is `from, from - 1, ..., to + 1`, empty when `to >= from`. Both versions
/// must be known: reverting a version this library does not know is impossible.
pub fn down_versions(component: &Component, from: u32, to: u32) -> Result<Vec<u32>, Error> {
    check_known(component, to)?;
    check_known(component, from)?;
    Ok(if to >= from {
        Vec::new()
    } else {
        (to + 1..=from).rev().collect()
    })
}

fn check_known(component: &Component, version: u32) -> Result<(), Error> {
    if version > component.latest() {
        return Err(Error::UnknownVersion {
            component: component.name().to_owned(),
            version,
            latest: component.latest(),
        });
    }
    Ok(())
}

/// Renders the script that migrates `component` up from version `from` to version `to`.
///
/// A non-empty script takes a transaction-scoped advisory lock (so concurrent migrators of
/// one schema serialize), creates the schema and the versions table if needed, runs the
/// `up` of every version in [`up_versions`], and finally records `to` as the component's
/// version (never lowering a version that is already recorded higher).
///
/// ```
/// use hephaestus_migrations_gen::{render_up, Component, Down, SchemaPrefix, SchemaVersion};
/// static VERSIONS: [SchemaVersion; 1] = [SchemaVersion {
///     number: 1,
///     sqlx_version: 20_260_101_000_001,
///     description: "notes",
///     up: &["create table if not exists {prefix}.notes (id bigint primary key)"],
///     down: Down::Statements(&["drop table if exists {prefix}.notes"]),
/// }];
/// let notes = Component::new("notes", &VERSIONS).unwrap();
/// let script = render_up(&notes, &SchemaPrefix::default(), 0, notes.latest()).unwrap();
/// assert!(script.to_sql().contains("create table if not exists \"public\".notes"));
/// assert!(render_up(&notes, &SchemaPrefix::default(), 1, 1).unwrap().is_empty());
/// ```
pub fn render_up(
    component: &Component,
    prefix: &SchemaPrefix,
    from: u32,
    to: u32,
) -> Result<Script, Error> {
    let versions = up_versions(component, from, to)?;
    let dialect = component.dialect();
    let mut statements = Vec::new();
    if !versions.is_empty() {
        if dialect == Dialect::Postgres {
            statements.push(lock_statement(prefix));
            statements.push(format!("create schema if not exists {}", prefix.quoted()));
        }
        statements.push(create_versions_table(dialect, prefix));
        for number in &versions {
            let version = known(component, *number);
            statements.extend(version.up.iter().map(|t| fill(t, prefix)));
        }
        statements.push(record_up(component, prefix, to));
    }
    Ok(Script {
        component: component.name(),
        dialect,
        prefix: prefix.clone(),
        direction: Direction::Up,
        from,
        to,
        versions,
        statements,
    })
}

/// Renders the script that migrates `component` down from version `from` to version `to`.
///
/// A non-empty script takes the same advisory lock as [`render_up`], runs the `down` of
/// every version in [`down_versions`] (newest first), and records `to` (deleting the
/// component's row when `to` is 0). `to = 0` drops every table the component created.
/// The versions table itself is never dropped; it is shared by all components.
///
/// Returns [`Error::Irreversible`] when the range contains an irreversible version.
pub fn render_down(
    component: &Component,
    prefix: &SchemaPrefix,
    from: u32,
    to: u32,
) -> Result<Script, Error> {
    let versions = down_versions(component, from, to)?;
    let dialect = component.dialect();
    let mut statements = Vec::new();
    if !versions.is_empty() {
        if dialect == Dialect::Postgres {
            statements.push(lock_statement(prefix));
        }
        for number in &versions {
            match known(component, *number).down {
                Down::Statements(templates) => {
                    statements.extend(templates.iter().map(|t| fill(t, prefix)));
                }
                Down::Irreversible { reason } => {
                    return Err(Error::Irreversible {
                        component: component.name().to_owned(),
                        version: *number,
                        reason: reason.to_owned(),
                    });
                }
            }
        }
        statements.push(record_down(component, prefix, to));
    }
    Ok(Script {
        component: component.name(),
        dialect,
        prefix: prefix.clone(),
        direction: Direction::Down,
        from,
        to,
        versions,
        statements,
    })
}

/// A statement that aborts the transaction: the down script of an irreversible version.
pub(crate) fn irreversible_statement(component: &Component, number: u32, reason: &str) -> String {
    // `reason` has no quotes, `$`, `%` or backslashes: checked by `Component::new`.
    if component.dialect() == Dialect::Sqlite {
        // SQLite has no procedural blocks: `raise` outside a trigger is an error, so the
        // script stops here, with the reason in the statement the error names.
        return format!(
            "select raise(abort, 'hephaestus {} v{number} is irreversible: {reason}')",
            component.name()
        );
    }
    format!(
        "do $$\nbegin\n    raise exception 'hephaestus {} v{number} is irreversible: {reason}';\nend\n$$",
        component.name()
    )
}

/// SQL that tells whether the versions table exists in `prefix`; returns one boolean.
///
/// Run it before [`current_version_sql`], which fails when the table is missing.
pub fn versions_table_exists_sql(prefix: &SchemaPrefix) -> String {
    format!(
        "select to_regclass('{}.{VERSIONS_TABLE}') is not null",
        prefix.quoted()
    )
}

/// SQL that reads the applied version of one component; bind the component name as `$1`.
///
/// Returns one `integer` row: the recorded version, or 0 when the component has no row.
pub fn current_version_sql(prefix: &SchemaPrefix) -> String {
    format!(
        "select coalesce(max(version), 0) as version from {}.{VERSIONS_TABLE} where component = $1",
        prefix.quoted()
    )
}

fn known(component: &Component, number: u32) -> &'static crate::SchemaVersion {
    // Cannot fail: callers only pass numbers from up_versions/down_versions, which are
    // within 1..=latest.
    component
        .version(number)
        .expect("planned versions are known")
}

/// SQL that tells whether the versions table exists in a SQLite database; returns one
/// integer (1 or 0).
pub fn sqlite_versions_table_exists_sql() -> String {
    format!(
        "select exists (select 1 from sqlite_master where type = 'table' and name = '{VERSIONS_TABLE}')"
    )
}

/// SQL that reads the applied version of one component in a SQLite database; bind the
/// component name as `?1`. Returns one integer row: the recorded version, or 0.
pub fn sqlite_current_version_sql() -> String {
    format!(
        "select coalesce(max(version), 0) as version from {VERSIONS_TABLE} where component = ?1"
    )
}

fn fill(template: &str, prefix: &SchemaPrefix) -> String {
    template
        .trim()
        .replace(PREFIX_PLACEHOLDER, &prefix.quoted())
}

fn lock_statement(prefix: &SchemaPrefix) -> String {
    format!(
        "select pg_advisory_xact_lock(hashtext('hephaestus_migrations'), hashtext({}))",
        prefix.literal()
    )
}

fn create_versions_table(dialect: Dialect, prefix: &SchemaPrefix) -> String {
    if dialect == Dialect::Sqlite {
        return format!(
            "create table if not exists {VERSIONS_TABLE} (
    component text primary key,
    version integer not null check (version >= 0),
    applied_at text not null
) strict"
        );
    }
    format!(
        "create table if not exists {}.{VERSIONS_TABLE} (
    component text primary key,
    version integer not null check (version >= 0),
    applied_at timestamptz not null default now()
)",
        prefix.quoted()
    )
}

fn record_up(component: &Component, prefix: &SchemaPrefix, to: u32) -> String {
    // The component name matches ^[a-z_][a-z0-9_]*$ (checked by `Component::new`).
    if component.dialect() == Dialect::Sqlite {
        // `applied_at` is for operators only: nothing decides on it.
        return format!(
            "insert into {VERSIONS_TABLE} (component, version, applied_at)
values ('{c}', {to}, strftime('%Y-%m-%dT%H:%M:%fZ', 'now'))
on conflict (component) do update
    set version = excluded.version, applied_at = excluded.applied_at
    where {VERSIONS_TABLE}.version < excluded.version",
            c = component.name(),
        );
    }
    format!(
        "insert into {p}.{VERSIONS_TABLE} as v (component, version)
values ('{c}', {to})
on conflict (component) do update
    set version = excluded.version, applied_at = now()
    where v.version < excluded.version",
        p = prefix.quoted(),
        c = component.name(),
    )
}

fn record_down(component: &Component, prefix: &SchemaPrefix, to: u32) -> String {
    let c = component.name();
    if component.dialect() == Dialect::Sqlite {
        // The up script created the versions table: no existence check is needed.
        return if to == 0 {
            format!("delete from {VERSIONS_TABLE} where component = '{c}'")
        } else {
            format!(
                "update {VERSIONS_TABLE} set version = {to}, applied_at = strftime('%Y-%m-%dT%H:%M:%fZ', 'now') where component = '{c}' and version > {to}"
            )
        };
    }
    let table = format!("{}.{VERSIONS_TABLE}", prefix.quoted());
    let change = if to == 0 {
        format!("delete from {table} where component = '{c}';")
    } else {
        format!(
            "update {table} set version = {to}, applied_at = now() where component = '{c}' and version > {to};"
        )
    };
    format!(
        "do $$
begin
    if to_regclass('{table}') is not null then
        {change}
    end if;
end
$$"
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::component::SchemaVersion;

    const fn version(number: u32, down: Down) -> SchemaVersion {
        SchemaVersion {
            number,
            sqlx_version: match number {
                1 => 101,
                2 => 102,
                _ => 103,
            },
            description: "test",
            up: &["create table if not exists {prefix}.t (id int)"],
            down,
        }
    }

    static THREE: [SchemaVersion; 3] = [
        version(1, Down::Statements(&["drop table if exists {prefix}.t"])),
        version(2, Down::Statements(&["select 2"])),
        version(3, Down::Statements(&["select 3"])),
    ];
    static WITH_IRREVERSIBLE: [SchemaVersion; 3] = [
        version(1, Down::Statements(&["drop table if exists {prefix}.t"])),
        version(
            2,
            Down::Irreversible {
                reason: "ids were converted to text",
            },
        ),
        version(3, Down::Statements(&["select 3"])),
    ];

    fn components() -> Vec<Component> {
        let mut all = crate::fixture::registry().components().to_vec();
        all.push(Component::new("three", &THREE).unwrap());
        all
    }

    #[test]
    fn up_ranges_follow_the_rules_for_every_pair() {
        for c in components() {
            let latest = c.latest();
            for from in 0..=latest + 2 {
                for to in 0..=latest + 2 {
                    let result = up_versions(&c, from, to);
                    if to > latest {
                        assert!(
                            matches!(result, Err(Error::UnknownVersion { version, .. }) if version == to),
                            "up {from}->{to}"
                        );
                        continue;
                    }
                    let versions = result.unwrap();
                    let expected: Vec<u32> =
                        (1..=latest).filter(|v| *v > from && *v <= to).collect();
                    assert_eq!(versions, expected, "up {from}->{to}");
                    let script = render_up(&c, &SchemaPrefix::default(), from, to).unwrap();
                    assert_eq!(script.versions(), expected.as_slice());
                    assert_eq!(script.is_empty(), expected.is_empty());
                }
            }
        }
    }

    #[test]
    fn down_ranges_follow_the_rules_for_every_pair() {
        for c in components() {
            let latest = c.latest();
            for from in 0..=latest + 2 {
                for to in 0..=latest + 2 {
                    let result = down_versions(&c, from, to);
                    if to > latest || from > latest {
                        assert!(
                            matches!(result, Err(Error::UnknownVersion { .. })),
                            "down {from}->{to}"
                        );
                        assert!(render_down(&c, &SchemaPrefix::default(), from, to).is_err());
                        continue;
                    }
                    let versions = result.unwrap();
                    let expected: Vec<u32> = (1..=latest)
                        .rev()
                        .filter(|v| *v > to && *v <= from)
                        .collect();
                    assert_eq!(versions, expected, "down {from}->{to}");
                    let script = render_down(&c, &SchemaPrefix::default(), from, to).unwrap();
                    assert_eq!(script.versions(), expected.as_slice());
                    assert_eq!(script.is_empty(), expected.is_empty());
                }
            }
        }
    }

    #[test]
    fn empty_plans_render_as_a_comment_only() {
        let c = Component::new("three", &THREE).unwrap();
        let prefix = SchemaPrefix::default();
        for script in [
            render_up(&c, &prefix, 3, 3).unwrap(),
            render_up(&c, &prefix, 3, 1).unwrap(),
            render_up(&c, &prefix, 7, 2).unwrap(),
            render_down(&c, &prefix, 1, 1).unwrap(),
            render_down(&c, &prefix, 0, 0).unwrap(),
            render_down(&c, &prefix, 1, 3).unwrap(),
        ] {
            assert!(script.is_empty());
            assert!(script.statements().is_empty());
            assert!(script.to_sql().lines().all(|line| line.starts_with("--")));
        }
    }

    #[test]
    fn up_records_the_target_and_down_to_zero_deletes_the_row() {
        let c = Component::new("three", &THREE).unwrap();
        let prefix = SchemaPrefix::new("tenant").unwrap();
        let up = render_up(&c, &prefix, 0, 2).unwrap();
        let last = up.statements().last().unwrap();
        assert!(last.contains("values ('three', 2)"), "{last}");
        assert!(up.statements()[0].starts_with("select pg_advisory_xact_lock"));
        assert!(
            up.statements()[2]
                .contains("create table if not exists \"tenant\".hephaestus_schema_versions")
        );

        let down = render_down(&c, &prefix, 3, 0).unwrap();
        assert_eq!(down.versions(), &[3, 2, 1]);
        let sql = down.to_sql();
        assert!(sql.contains(
            "delete from \"tenant\".hephaestus_schema_versions where component = 'three'"
        ));
        assert!(!sql.contains("drop table if exists \"tenant\".hephaestus_schema_versions"));
        let pos3 = sql.find("select 3").unwrap();
        let pos2 = sql.find("select 2").unwrap();
        let pos1 = sql.find("drop table if exists \"tenant\".t").unwrap();
        assert!(pos3 < pos2 && pos2 < pos1, "downs run newest first");

        let partial = render_down(&c, &prefix, 3, 1).unwrap().to_sql();
        assert!(partial.contains("set version = 1"));
        assert!(!partial.contains("delete from"));
    }

    #[test]
    fn irreversible_versions_are_a_typed_error_only_when_in_range() {
        let c = Component::new("irr", &WITH_IRREVERSIBLE).unwrap();
        let prefix = SchemaPrefix::default();
        for (from, to) in [(2, 1), (2, 0), (3, 1), (3, 0)] {
            let err = render_down(&c, &prefix, from, to).unwrap_err();
            assert!(
                matches!(err, Error::Irreversible { version: 2, .. }),
                "{from}->{to}: {err}"
            );
            assert!(err.to_string().contains("ids were converted to text"));
        }
        assert_eq!(render_down(&c, &prefix, 3, 2).unwrap().versions(), &[3]);
        assert_eq!(render_down(&c, &prefix, 1, 0).unwrap().versions(), &[1]);
    }

    #[test]
    fn rendered_sql_uses_the_prefix_everywhere() {
        for c in components() {
            for p in ["public", "tenant_a", "user"] {
                let prefix = SchemaPrefix::new(p).unwrap();
                let up = render_up(&c, &prefix, 0, c.latest()).unwrap().to_sql();
                let down = render_down(&c, &prefix, c.latest(), 0).unwrap().to_sql();
                for sql in [&up, &down] {
                    assert!(!sql.contains("{prefix"), "placeholder left in {sql}");
                    assert!(sql.contains(&format!("\"{p}\".")));
                    assert!(!sql.contains("\"\""), "empty identifier in {sql}");
                    // Every table or index reference is schema-qualified.
                    for keyword in [
                        " table if not exists ",
                        " on ",
                        " references ",
                        " table if exists ",
                    ] {
                        for (index, _) in sql.match_indices(keyword) {
                            let rest = &sql[index + keyword.len()..];
                            if ["conflict", "delete ", "update "]
                                .iter()
                                .any(|w| rest.starts_with(w))
                            {
                                continue;
                            }
                            assert!(
                                rest.starts_with(&format!("\"{p}\".")),
                                "unqualified name after {keyword:?}: {}",
                                &rest[..rest.len().min(60)]
                            );
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn rendering_is_deterministic() {
        for c in components() {
            let prefix = SchemaPrefix::new("tenant_a").unwrap();
            let first = render_up(&c, &prefix, 0, c.latest()).unwrap();
            let second = render_up(&c, &prefix, 0, c.latest()).unwrap();
            assert_eq!(first, second);
            assert_eq!(first.to_sql(), second.to_sql());
            let down1 = render_down(&c, &prefix, c.latest(), 0).unwrap().to_sql();
            let down2 = render_down(&c, &prefix, c.latest(), 0).unwrap().to_sql();
            assert_eq!(down1, down2);
        }
    }

    #[test]
    fn version_queries_are_schema_qualified() {
        let prefix = SchemaPrefix::new("tenant_a").unwrap();
        assert_eq!(
            versions_table_exists_sql(&prefix),
            "select to_regclass('\"tenant_a\".hephaestus_schema_versions') is not null"
        );
        let sql = current_version_sql(&prefix);
        assert!(sql.contains("from \"tenant_a\".hephaestus_schema_versions where component = $1"));
    }
}
