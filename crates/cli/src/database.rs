//! The database options every command that reads or changes instances and
//! jobs takes (`--database-url`, `--schema`, `--pgbouncer`), the connection, and the check
//! that the schema is migrated to what this build expects: a missing or
//! stale schema is an error that says what to run, not a SQL error about a
//! missing table.

use anyhow::{Context as _, Result, bail};
use clap::Args;
use hephaestus_migrations_gen::SchemaPrefix;
use hephaestus_queue_pg::{PgQueue, Pooling};
use hephaestus_storage_pg::PgStore;
use sqlx::PgPool;

use crate::migrate::{connect, current, registry};

/// `--database-url`, `--schema` and `--pgbouncer`.
#[derive(Debug, Clone, Args)]
pub struct DatabaseArgs {
    /// PostgreSQL URL, or `sqlite://FILE` for a SQLite database file.
    #[arg(long, env = "DATABASE_URL", hide_env_values = true)]
    pub database_url: String,
    /// The schema (prefix) holding Hephaestus's tables.
    #[arg(long, default_value = SchemaPrefix::DEFAULT)]
    pub schema: String,
    #[command(flatten)]
    pub pooling: PoolingArgs,
}

/// `--pgbouncer`: how the connections reach PostgreSQL.
#[derive(Debug, Clone, Copy, Args)]
pub struct PoolingArgs {
    /// The URL is a PgBouncer in transaction pooling (`pool_mode =
    /// transaction`) or another pooler that shares server sessions between
    /// transactions: no prepared statement is kept, every statement runs
    /// in a transaction, no startup parameter PgBouncer refuses is sent
    /// (and a worker polls instead of listening).
    #[arg(long)]
    pub pgbouncer: bool,
}

impl PoolingArgs {
    /// The pooling these arguments ask for.
    pub fn pooling(self) -> Pooling {
        if self.pgbouncer {
            Pooling::Transaction
        } else {
            Pooling::Session
        }
    }
}

/// The components a command reads or writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Needs {
    /// Instances and step results (`storage`) and jobs (`queue`).
    Both,
    /// Jobs only.
    Queue,
}

/// A connected, checked database.
#[derive(Debug, Clone)]
pub struct Database {
    /// The pool.
    pub pool: PgPool,
    /// The validated schema.
    pub prefix: SchemaPrefix,
    /// How the pool's connections reach PostgreSQL.
    pub pooling: Pooling,
}

impl Database {
    /// Validates the schema name, connects, and checks that the components
    /// the command `needs` are migrated to this build's versions.
    pub async fn open(args: &DatabaseArgs, needs: Needs) -> Result<Self> {
        let prefix = SchemaPrefix::new(&args.schema).with_context(|| {
            format!(
                "invalid --schema {:?} (lower-case letters, digits and underscores, not starting with a digit)",
                args.schema
            )
        })?;
        let pooling = args.pooling.pooling();
        let pool = connect(&args.database_url, pooling).await?;
        let registry = registry()?;
        let mut tx = pool.begin().await.context("starting a transaction")?;
        let schema = prefix.as_str();
        for component in registry.components() {
            if needs == Needs::Queue && component.name() != "queue" {
                continue;
            }
            let database = current(&mut tx, &prefix, component).await?;
            let latest = component.latest();
            let name = component.name();
            if database == 0 {
                bail!(
                    "schema {schema} is not migrated (no {name} tables): run `hephaestus migrate --schema {schema} up`"
                );
            }
            if database < latest {
                bail!(
                    "schema {schema} is behind this build ({name} is at version {database}, this build needs {latest}): run `hephaestus migrate --schema {schema} up`"
                );
            }
            if database > latest {
                bail!(crate::migrate::ahead_message(
                    schema, name, database, latest
                ));
            }
        }
        tx.rollback().await.context("ending the check")?;
        Ok(Self {
            pool,
            prefix,
            pooling,
        })
    }

    /// The instance store.
    pub fn store(&self) -> PgStore {
        PgStore::new(self.pool.clone(), self.prefix.clone()).with_pooling(self.pooling)
    }

    /// The job queue.
    pub fn queue(&self) -> PgQueue {
        PgQueue::new(self.pool.clone(), self.prefix.clone()).with_pooling(self.pooling)
    }

    /// The schema's name.
    pub fn schema(&self) -> &str {
        self.prefix.as_str()
    }
}

/// The database a command works on: PostgreSQL (a schema) or a SQLite file.
#[derive(Debug)]
pub enum Target {
    /// PostgreSQL.
    Postgres(Database),
    /// A SQLite file (opened through `hephaestus-sqlite`, checked to be
    /// migrated to this build's version).
    Sqlite(hephaestus_sqlite::SqliteBackend),
}

impl Target {
    /// Opens `args`' database: a `sqlite://` URL is a SQLite file, anything
    /// else PostgreSQL ([`Database::open`]).
    pub async fn open(args: &DatabaseArgs, needs: Needs) -> Result<Self> {
        if hephaestus_sqlite::SqliteOptions::is_sqlite_url(&args.database_url) {
            return Ok(Self::Sqlite(open_sqlite(&args.database_url).await?));
        }
        Ok(Self::Postgres(Database::open(args, needs).await?))
    }
}

/// Opens the SQLite file of `url` and checks that it is migrated to this
/// build's version (a missing or older schema says what to run).
pub async fn open_sqlite(url: &str) -> Result<hephaestus_sqlite::SqliteBackend> {
    let options = hephaestus_sqlite::SqliteOptions::from_url(url)?;
    let backend = hephaestus_sqlite::SqliteBackend::open(options).await?;
    backend.check_migrated().await?;
    Ok(backend)
}
