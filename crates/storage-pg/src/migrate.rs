//! Runtime migration: the same SQL `cargo xtask gen-migration` writes into `migrations/`,
//! applied without a migration tool.

use hephaestus_engine_core::ports::PortError;
use hephaestus_migrations_gen::{
    SchemaPrefix, current_version_sql, render_up, versions_table_exists_sql,
};
use sqlx::{Executor, PgPool};

use crate::error::port_error;
use crate::schema::{COMPONENT, schema};

/// What [`migrate`] did.
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

/// Brings the storage tables in schema `prefix` from their recorded version to the
/// latest, in one transaction: the rendered up script of the versions in between (it
/// creates the schema if needed, serializes concurrent migrators with an advisory lock,
/// and records the version in `<prefix>.hephaestus_schema_versions`, exactly like the
/// generated files). Running it again is a no-op. Databases migrated with the generated
/// files instead are recognized through the same versions table.
pub async fn migrate(pool: &PgPool, prefix: &SchemaPrefix) -> Result<Migrated, PortError> {
    let component = schema();
    let mut tx = pool.begin().await.map_err(port_error)?;
    let has_versions: bool = sqlx::query_scalar(&versions_table_exists_sql(prefix))
        .fetch_one(&mut *tx)
        .await
        .map_err(port_error)?;
    let recorded: i32 = if has_versions {
        sqlx::query_scalar(&current_version_sql(prefix))
            .bind(COMPONENT)
            .fetch_one(&mut *tx)
            .await
            .map_err(port_error)?
    } else {
        0
    };
    let from = u32::try_from(recorded).map_err(|_| {
        PortError::Corrupt(format!(
            "the recorded {COMPONENT} schema version {recorded} is negative"
        ))
    })?;
    let latest = component.latest();
    // Cannot fail: `latest` is a known version; a `from` beyond it is an empty plan.
    let script = render_up(&component, prefix, from, latest)
        .map_err(|e| PortError::InvalidInput(e.to_string()))?;
    if script.is_empty() {
        return Ok(Migrated { from, to: from });
    }
    // A query without parameters runs through the simple protocol: several statements.
    let sql = script.to_sql();
    (&mut *tx).execute(sql.as_str()).await.map_err(port_error)?;
    tx.commit().await.map_err(port_error)?;
    tracing::info!(
        prefix = prefix.as_str(),
        from,
        to = latest,
        "hephaestus storage schema migrated"
    );
    Ok(Migrated { from, to: latest })
}
