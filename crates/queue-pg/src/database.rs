//! Database-wide operations that belong to no table: the server's version
//! and activity counters (read around a benchmark's timed phase), and
//! dropping a whole schema (a benchmark's or a test's own).

use hephaestus_migrations_gen::SchemaPrefix;
use sqlx::PgPool;

use crate::error::Error;

/// Server-wide counters: read them before and after a timed phase and
/// subtract.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct ServerCounters {
    /// Committed transactions in the current database
    /// (`pg_stat_database.xact_commit`).
    pub commits: i64,
    /// The WAL position in bytes.
    pub wal_bytes: i64,
    /// Checkpoints so far (timed and requested); `None` when the statistics
    /// view cannot be read.
    pub checkpoints: Option<i64>,
}

/// The server's version (`show server_version`), for reports.
pub async fn server_version(pool: &PgPool) -> Result<String, Error> {
    Ok(sqlx::query_scalar("show server_version")
        .fetch_one(pool)
        .await?)
}

/// The server's commit count, WAL position and checkpoint count now. A
/// backend flushes its statistics when it exits, so read this on a fresh
/// connection after the measured connections closed.
pub async fn server_counters(pool: &PgPool) -> Result<ServerCounters, Error> {
    let (commits, wal_bytes): (i64, i64) = sqlx::query_as(
        "select xact_commit, (pg_current_wal_lsn() - '0/0'::pg_lsn)::bigint
         from pg_stat_database where datname = current_database()",
    )
    .fetch_one(pool)
    .await?;
    // pg_stat_bgwriter up to PostgreSQL 16, pg_stat_checkpointer from 17.
    let checkpoints = match sqlx::query_scalar(
        "select checkpoints_timed + checkpoints_req from pg_stat_bgwriter",
    )
    .fetch_one(pool)
    .await
    {
        Ok(n) => Some(n),
        Err(_) => sqlx::query_scalar("select num_timed + num_requested from pg_stat_checkpointer")
            .fetch_one(pool)
            .await
            .ok(),
    };
    Ok(ServerCounters {
        commits,
        wal_bytes,
        checkpoints,
    })
}

/// Drops schema `prefix` and everything in it (`drop schema .. cascade`):
/// both components' tables, the versions table, and any table of the
/// application's there. For a benchmark's or a test's own schema; a
/// missing schema is not an error. Not undoable.
pub async fn drop_schema(pool: &PgPool, prefix: &SchemaPrefix) -> Result<(), Error> {
    let sql = format!("drop schema if exists {} cascade", prefix.quoted());
    sqlx::raw_sql(&sql).execute(pool).await?;
    Ok(())
}
