//! Components (a set of tables owned together) and their ordered schema versions.

use crate::error::Error;
use crate::prefix::is_identifier;

/// The placeholder in statement templates that is replaced by the quoted schema prefix.
pub const PREFIX_PLACEHOLDER: &str = "{prefix}";

/// How a version is reverted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Down {
    /// Statement templates that undo the version's `up`, run in order.
    Statements(&'static [&'static str]),
    /// The version cannot be reverted (for example a lossy type conversion).
    ///
    /// [`crate::render_down`] returns [`Error::Irreversible`] for any range that contains
    /// it, and the generated `.down.sql` file for it raises an exception, so an attempt to
    /// revert it fails loudly instead of silently doing nothing.
    Irreversible {
        /// Why; shown in the error and in the generated down file.
        reason: &'static str,
    },
}

/// One version of a component's schema.
///
/// Statement templates are lower-case SQL without a trailing `;`, with every table
/// schema-qualified as `{prefix}.table_name`. They must be idempotent (`if not exists`,
/// `if exists`, `do` blocks) and transaction-safe (no `concurrently`, no transaction
/// control), because a rendered script runs inside one transaction.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SchemaVersion {
    /// 1, 2, 3, ... in order, without gaps.
    pub number: u32,
    /// The fixed sqlx migration version used in the file name, e.g. `20261126000001`.
    /// Never derived from the clock at generation time, so output is deterministic.
    pub sqlx_version: i64,
    /// One line, shown in generated files.
    pub description: &'static str,
    /// Statement templates that bring the schema from `number - 1` to `number`.
    pub up: &'static [&'static str],
    /// How to go back from `number` to `number - 1`.
    pub down: Down,
}

/// The SQL dialect a component's statements are written in: it decides the scaffolding
/// [`crate::render_up`] and [`crate::render_down`] put around them (the migrators' lock,
/// the schema, the versions table and how a version is recorded).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub enum Dialect {
    /// PostgreSQL: tables in a schema (`{prefix}`), concurrent migrators serialized by a
    /// transaction-scoped advisory lock.
    #[default]
    Postgres,
    /// SQLite: a database file is one namespace, so templates name tables without a
    /// `{prefix}` (the prefix passed to the renderers is ignored); concurrent migrators
    /// are serialized by SQLite's own write lock (run a script in a `begin immediate`
    /// transaction).
    Sqlite,
}

impl Dialect {
    /// `postgres` or `sqlite`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Postgres => "postgres",
            Self::Sqlite => "sqlite",
        }
    }
}

/// A named, ordered list of schema versions for tables that one crate owns.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Component {
    name: &'static str,
    dialect: Dialect,
    versions: &'static [SchemaVersion],
}

impl Component {
    /// Validates and builds a component.
    ///
    /// Rules: the name matches `^[a-z_][a-z0-9_]*$`; there is at least one version;
    /// versions are numbered 1, 2, 3, ... in order; sqlx versions are positive and
    /// strictly increasing; descriptions and irreversibility reasons are one line without
    /// `'`, `$`, `%` or `\` (they are embedded in comments and messages); templates contain
    /// no placeholder other than `{prefix}`, no trailing `;`, no `concurrently` and no
    /// transaction control.
    pub fn new(name: &'static str, versions: &'static [SchemaVersion]) -> Result<Self, Error> {
        Self::with_dialect(name, Dialect::Postgres, versions)
    }

    /// Validates and builds a component whose statements are written in `dialect`, with
    /// the rules of [`Component::new`]; a [`Dialect::Sqlite`] template must not contain
    /// `{prefix}` (a SQLite file has no schemas).
    pub fn with_dialect(
        name: &'static str,
        dialect: Dialect,
        versions: &'static [SchemaVersion],
    ) -> Result<Self, Error> {
        let invalid = |problem: String| Error::InvalidComponent {
            component: name.to_owned(),
            problem,
        };
        if !is_identifier(name) {
            return Err(invalid("the name must match ^[a-z_][a-z0-9_]*$".to_owned()));
        }
        if versions.is_empty() {
            return Err(invalid("it has no versions".to_owned()));
        }
        let mut previous_sqlx = 0_i64;
        for (expected, version) in (1_u32..).zip(versions) {
            if version.number != expected {
                return Err(invalid(format!(
                    "version #{expected} is numbered {} (versions must be 1, 2, 3, ... in order)",
                    version.number
                )));
            }
            if version.sqlx_version <= previous_sqlx {
                return Err(invalid(format!(
                    "v{expected} has sqlx version {}, which is not greater than {previous_sqlx}",
                    version.sqlx_version
                )));
            }
            previous_sqlx = version.sqlx_version;
            check_text(version.description)
                .map_err(|p| invalid(format!("v{expected} description {p}")))?;
            if version.up.is_empty() {
                return Err(invalid(format!("v{expected} has no up statements")));
            }
            for statement in version.up {
                check_template(statement, dialect)
                    .map_err(|p| invalid(format!("v{expected} up: {p}")))?;
            }
            match version.down {
                Down::Statements(statements) => {
                    for statement in statements {
                        check_template(statement, dialect)
                            .map_err(|p| invalid(format!("v{expected} down: {p}")))?;
                    }
                }
                Down::Irreversible { reason } => {
                    check_text(reason)
                        .map_err(|p| invalid(format!("v{expected} irreversibility reason {p}")))?;
                }
            }
        }
        Ok(Self {
            name,
            dialect,
            versions,
        })
    }

    /// The dialect its statements are written in.
    pub fn dialect(&self) -> Dialect {
        self.dialect
    }

    /// The component name, e.g. `storage`.
    pub fn name(&self) -> &'static str {
        self.name
    }

    /// All versions, oldest first.
    pub fn versions(&self) -> &'static [SchemaVersion] {
        self.versions
    }

    /// The latest version number (`versions().len()`).
    pub fn latest(&self) -> u32 {
        self.versions.last().map_or(0, |v| v.number)
    }

    /// The version with this number, if it exists (numbers start at 1).
    pub fn version(&self, number: u32) -> Option<&'static SchemaVersion> {
        let index = usize::try_from(number.checked_sub(1)?).ok()?;
        self.versions.get(index)
    }
}

fn check_text(text: &str) -> Result<(), String> {
    if text.trim().is_empty() {
        return Err("is empty".to_owned());
    }
    if let Some(c) = text
        .chars()
        .find(|c| c.is_control() || matches!(c, '\'' | '$' | '%' | '\\'))
    {
        return Err(format!("contains the forbidden character {c:?}"));
    }
    Ok(())
}

fn check_template(template: &str, dialect: Dialect) -> Result<(), String> {
    let trimmed = template.trim();
    if trimmed.is_empty() {
        return Err("empty statement".to_owned());
    }
    if dialect == Dialect::Sqlite && template.contains("{prefix") {
        return Err(format!(
            "a SQLite statement names its tables without {{prefix}} (a SQLite file has no schemas): {trimmed}"
        ));
    }
    if trimmed.ends_with(';') {
        return Err(format!(
            "statement ends with ';' (the renderer adds it): {trimmed}"
        ));
    }
    if template.replace(PREFIX_PLACEHOLDER, "").contains("{prefix") {
        return Err(format!("malformed {{prefix}} placeholder in: {trimmed}"));
    }
    let lower = trimmed.to_ascii_lowercase();
    if lower.split_whitespace().any(|word| word == "concurrently") {
        return Err(format!(
            "`concurrently` cannot run inside a transaction: {trimmed}"
        ));
    }
    let first = lower.split_whitespace().next().unwrap_or_default();
    if matches!(
        first,
        "begin" | "commit" | "rollback" | "start" | "end" | "savepoint" | "release"
    ) {
        return Err(format!(
            "transaction control is not allowed (the runner owns the transaction): {trimmed}"
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const fn version(number: u32, sqlx_version: i64) -> SchemaVersion {
        SchemaVersion {
            number,
            sqlx_version,
            description: "test",
            up: &["create table if not exists {prefix}.t (id int)"],
            down: Down::Statements(&["drop table if exists {prefix}.t"]),
        }
    }

    fn problem(result: Result<Component, Error>) -> String {
        match result {
            Err(Error::InvalidComponent { problem, .. }) => problem,
            other => panic!("expected InvalidComponent, got {other:?}"),
        }
    }

    static VERSIONS: [SchemaVersion; 2] = [version(1, 10), version(2, 20)];
    static ONE: [SchemaVersion; 1] = [version(1, 10)];
    static GAP: [SchemaVersion; 2] = [version(1, 10), version(3, 20)];
    static SAME: [SchemaVersion; 2] = [version(1, 10), version(2, 10)];
    static ZERO: [SchemaVersion; 1] = [version(1, 0)];
    static SEMI: [SchemaVersion; 1] = [SchemaVersion {
        up: &["create table if not exists {prefix}.t (id int);"],
        ..version(1, 1)
    }];
    static PLACEHOLDER: [SchemaVersion; 1] = [SchemaVersion {
        up: &["create table if not exists {prefix_x}.t (id int)"],
        ..version(1, 1)
    }];
    static CONCURRENT: [SchemaVersion; 1] = [SchemaVersion {
        up: &["create index concurrently if not exists i on {prefix}.t (id)"],
        ..version(1, 1)
    }];
    static TX: [SchemaVersion; 1] = [SchemaVersion {
        down: Down::Statements(&["commit"]),
        ..version(1, 1)
    }];
    static NEWLINE: [SchemaVersion; 1] = [SchemaVersion {
        description: "two\nlines",
        ..version(1, 1)
    }];
    static QUOTE: [SchemaVersion; 1] = [SchemaVersion {
        down: Down::Irreversible {
            reason: "it's lossy",
        },
        ..version(1, 1)
    }];

    #[test]
    fn accepts_a_well_formed_component() {
        let c = Component::new("queue", &VERSIONS).unwrap();
        assert_eq!(c.name(), "queue");
        assert_eq!(c.latest(), 2);
        assert_eq!(c.version(2).unwrap().sqlx_version, 20);
        assert!(c.version(0).is_none());
        assert!(c.version(3).is_none());
    }

    #[test]
    fn rejects_bad_names_numbering_and_sqlx_versions() {
        assert!(problem(Component::new("Bad", &ONE)).contains("name"));
        assert!(problem(Component::new("empty", &[])).contains("no versions"));
        assert!(problem(Component::new("c", &GAP)).contains("numbered 3"));
        assert!(problem(Component::new("c", &SAME)).contains("not greater"));
        assert!(problem(Component::new("c", &ZERO)).contains("not greater"));
    }

    #[test]
    fn sqlite_templates_have_no_prefix() {
        static PREFIXED: [SchemaVersion; 1] = [version(1, 1)];
        static PLAIN: [SchemaVersion; 1] = [SchemaVersion {
            up: &["create table if not exists t (id integer)"],
            down: Down::Statements(&["drop table if exists t"]),
            ..version(1, 1)
        }];
        assert!(
            problem(Component::with_dialect("c", Dialect::Sqlite, &PREFIXED))
                .contains("without {prefix}")
        );
        let plain = Component::with_dialect("c", Dialect::Sqlite, &PLAIN).unwrap();
        assert_eq!(plain.dialect(), Dialect::Sqlite);
        assert_eq!(
            Component::new("c", &PREFIXED).unwrap().dialect(),
            Dialect::Postgres
        );
    }

    #[test]
    fn rejects_unsafe_templates_and_texts() {
        assert!(problem(Component::new("c", &SEMI)).contains("ends with ';'"));
        assert!(problem(Component::new("c", &PLACEHOLDER)).contains("placeholder"));
        assert!(problem(Component::new("c", &CONCURRENT)).contains("concurrently"));
        assert!(problem(Component::new("c", &TX)).contains("transaction control"));
        assert!(problem(Component::new("c", &NEWLINE)).contains("forbidden character"));
        assert!(problem(Component::new("c", &QUOTE)).contains("forbidden character"));
    }
}
