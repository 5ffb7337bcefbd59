//! Runtime migration: the same SQL `cargo xtask gen-migration` writes into `migrations/`,
//! applied without a migration tool, up to the latest version ([`migrate`]) or up or
//! down to any version ([`migrate_to`]), and the recorded version ([`schema_version`]).

use hephaestus_engine_core::ports::PortError;
pub use hephaestus_migrations_gen::Migrated;
use hephaestus_migrations_gen::{
    Direction, SchemaPrefix, current_version_sql, render_down, render_up, versions_table_exists_sql,
};
use sqlx::{Executor, PgConnection, PgPool};

use crate::error::port_error;
use crate::schema::{COMPONENT, schema};

/// The storage component's version recorded in schema `prefix`
/// (`<prefix>.hephaestus_schema_versions`), 0 when it was never migrated (no versions
/// table, or no row for it). Two statements on `conn`; pass a transaction (`&mut *tx`)
/// to read it together with other components' versions. They are never prepared under a
/// name (a read at start or in a check, not on the hot path), so in a transaction they
/// run through any pooler, PgBouncer's transaction pooling included.
pub async fn schema_version(
    conn: &mut PgConnection,
    prefix: &SchemaPrefix,
) -> Result<u32, PortError> {
    let has_versions: bool = sqlx::query_scalar(&versions_table_exists_sql(prefix))
        .persistent(false)
        .fetch_one(&mut *conn)
        .await
        .map_err(port_error)?;
    if !has_versions {
        return Ok(0);
    }
    let recorded: i32 = sqlx::query_scalar(&current_version_sql(prefix))
        .persistent(false)
        .bind(COMPONENT)
        .fetch_one(&mut *conn)
        .await
        .map_err(port_error)?;
    u32::try_from(recorded).map_err(|_| {
        PortError::Corrupt(format!(
            "the recorded {COMPONENT} schema version {recorded} is negative"
        ))
    })
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
    let from = schema_version(&mut tx, prefix).await?;
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

/// Moves the storage tables in schema `prefix` `direction` to version `target`, in one
/// transaction that reads the recorded version and runs the rendered script (down to 0
/// drops every storage table and what it holds). Already at `target`: nothing runs.
///
/// # Errors
///
/// [`PortError::Conflict`] when the recorded version is beyond this build's latest (a
/// newer release migrated it; this build does not know its down scripts) or on the
/// other side of `target` than `direction` goes; [`PortError::InvalidInput`] for a
/// `target` this build does not know or an irreversible version on the way down.
pub async fn migrate_to(
    pool: &PgPool,
    prefix: &SchemaPrefix,
    direction: Direction,
    target: u32,
) -> Result<Migrated, PortError> {
    let component = schema();
    let mut tx = pool.begin().await.map_err(port_error)?;
    let from = schema_version(&mut tx, prefix).await?;
    if from > component.latest() {
        return Err(PortError::Conflict(format!(
            "{COMPONENT} is at version {from}, beyond this build's {}",
            component.latest()
        )));
    }
    let script = match direction {
        Direction::Up if target < from => Err(format!("above {target}: migrate down instead")),
        Direction::Down if target > from => Err(format!("below {target}: migrate up instead")),
        Direction::Up => Ok(render_up(&component, prefix, from, target)),
        Direction::Down => Ok(render_down(&component, prefix, from, target)),
    }
    .map_err(|side| PortError::Conflict(format!("{COMPONENT} is at version {from}, {side}")))?
    .map_err(|e| PortError::InvalidInput(e.to_string()))?;
    if script.is_empty() {
        return Ok(Migrated { from, to: from });
    }
    (&mut *tx)
        .execute(script.to_sql().as_str())
        .await
        .map_err(port_error)?;
    tx.commit().await.map_err(port_error)?;
    tracing::info!(
        prefix = prefix.as_str(),
        from,
        to = target,
        "hephaestus storage schema migrated"
    );
    Ok(Migrated { from, to: target })
}
