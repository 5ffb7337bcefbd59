//! A comparable snapshot of what a schema contains: tables, columns, indexes and
//! constraints, with the schema name removed so two schemas can be compared.

use sqlx::PgPool;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Column {
    pub table: String,
    pub name: String,
    pub data_type: String,
    pub nullable: bool,
    pub default: Option<String>,
    /// `ALWAYS`, `BY DEFAULT` or empty.
    pub identity: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Index {
    pub table: String,
    pub name: String,
    pub definition: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Constraint {
    pub table: String,
    pub name: String,
    pub definition: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Catalog {
    pub tables: Vec<String>,
    pub columns: Vec<Column>,
    pub indexes: Vec<Index>,
    pub constraints: Vec<Constraint>,
}

impl Catalog {
    pub fn has_table(&self, table: &str) -> bool {
        self.tables.iter().any(|t| t == table)
    }

    pub fn column(&self, table: &str, name: &str) -> &Column {
        self.columns
            .iter()
            .find(|c| c.table == table && c.name == name)
            .unwrap_or_else(|| panic!("no column {table}.{name} in {:#?}", self.columns))
    }

    pub fn index(&self, name: &str) -> &Index {
        self.indexes
            .iter()
            .find(|i| i.name == name)
            .unwrap_or_else(|| panic!("no index {name} in {:#?}", self.indexes))
    }

    /// The entries that differ between two catalogs, one per line (`-` only in `self`,
    /// `+` only in `other`); empty when they are equal.
    pub fn diff(&self, other: &Self) -> String {
        fn side<T: PartialEq + std::fmt::Debug>(lines: &mut Vec<String>, ours: &[T], theirs: &[T]) {
            lines.extend(
                ours.iter()
                    .filter(|x| !theirs.contains(x))
                    .map(|x| format!("- {x:?}")),
            );
            lines.extend(
                theirs
                    .iter()
                    .filter(|x| !ours.contains(x))
                    .map(|x| format!("+ {x:?}")),
            );
        }
        let mut lines = Vec::new();
        side(&mut lines, &self.tables, &other.tables);
        side(&mut lines, &self.columns, &other.columns);
        side(&mut lines, &self.indexes, &other.indexes);
        side(&mut lines, &self.constraints, &other.constraints);
        if lines.is_empty() && self != other {
            lines.push("same entries in a different order".to_owned());
        }
        lines.join("\n")
    }

    pub fn constraint(&self, name: &str) -> &Constraint {
        self.constraints
            .iter()
            .find(|c| c.name == name)
            .unwrap_or_else(|| panic!("no constraint {name} in {:#?}", self.constraints))
    }
}

/// Tables whose presence depends on the tool that applied the migrations, not on them.
const IGNORED_TABLES: &[&str] = &["_sqlx_migrations"];

/// Describes `schema`. Schema qualifiers (`schema.` and `"schema".`) are removed from
/// definitions, so the same DDL applied to two schemas gives equal catalogs.
pub async fn describe(pool: &PgPool, schema: &str) -> Catalog {
    let strip = |text: String| {
        text.replace(&format!("\"{schema}\"."), "")
            .replace(&format!("{schema}."), "")
    };
    let ignored = |table: &str| IGNORED_TABLES.contains(&table);

    let tables: Vec<String> = sqlx::query_scalar(
        "select table_name::text from information_schema.tables
         where table_schema = $1 order by 1",
    )
    .bind(schema)
    .fetch_all(pool)
    .await
    .expect("list tables");

    let columns = sqlx::query_as::<_, (String, String, String, String, Option<String>, String)>(
        "select table_name::text, column_name::text, data_type::text, is_nullable::text,
                column_default::text, coalesce(identity_generation::text, '')
         from information_schema.columns
         where table_schema = $1
         order by table_name, ordinal_position",
    )
    .bind(schema)
    .fetch_all(pool)
    .await
    .expect("list columns")
    .into_iter()
    .filter(|row| !ignored(&row.0))
    .map(
        |(table, name, data_type, nullable, default, identity)| Column {
            table,
            name,
            data_type,
            nullable: nullable == "YES",
            default: default.map(strip),
            identity,
        },
    )
    .collect();

    let indexes = sqlx::query_as::<_, (String, String, String)>(
        "select tablename::text, indexname::text, indexdef
         from pg_indexes where schemaname = $1 order by indexname",
    )
    .bind(schema)
    .fetch_all(pool)
    .await
    .expect("list indexes")
    .into_iter()
    .filter(|row| !ignored(&row.0))
    .map(|(table, name, definition)| Index {
        table,
        name,
        definition: strip(definition),
    })
    .collect();

    let constraints = sqlx::query_as::<_, (String, String, String)>(
        "select c.relname::text, con.conname::text, pg_get_constraintdef(con.oid)
         from pg_constraint con
         join pg_class c on c.oid = con.conrelid
         join pg_namespace n on n.oid = c.relnamespace
         where n.nspname = $1
         order by 1, 2",
    )
    .bind(schema)
    .fetch_all(pool)
    .await
    .expect("list constraints")
    .into_iter()
    .filter(|row| !ignored(&row.0))
    .map(|(table, name, definition)| Constraint {
        table,
        name,
        definition: strip(definition),
    })
    .collect();

    Catalog {
        tables: tables.into_iter().filter(|t| !ignored(t)).collect(),
        columns,
        indexes,
        constraints,
    }
}
