//! PostgreSQL storage for Hephaestus: workflow instances and their step results, the
//! Postgres implementation of the engine-core ports [`UnitOfWork`], [`InstanceStore`]
//! and [`StepResultStore`].
//!
//! [`PgStore`] is a cheap handle over a `sqlx::PgPool` and a schema prefix. Its unit of
//! work is a plain `sqlx::Transaction<'static, Postgres>` ([`Tx`]), the same type
//! `hephaestus-queue-pg` uses, so "apply results + persist instance + mark processed +
//! enqueue next jobs" is one transaction. Every operation also has an inherent
//! `*_using` form that runs on a connection or transaction of the caller's, so an
//! application can start a workflow inside its own transaction. The tables and their
//! versioned DDL ([`schema()`], registered with `hephaestus-migrations-gen`) are owned by
//! this crate: no other crate has SQL for them. One read here reaches beyond them:
//! [`PgStore::reconcile_page`] also reads the queue's jobs table in the same schema (the
//! reconciler's page, one statement instead of three round trips per instance).
//! Operators and benchmarks read and upkeep the tables through documented functions
//! ([`PgStore::census`], [`PgStore::analyze`], [`migrate_to`], [`schema_version`], ...),
//! never through SQL of their own.
//!
//! # Invariants
//!
//! - **Business ids (G11, G12).** Instances have a UUID v7 key; the business id is not
//!   unique. A partial unique index keeps each uniqueness claim (scope workflow, version
//!   or global; none has no claim) unique among ACTIVE instances, so of concurrent starts
//!   of one business id exactly one commits and the others get
//!   [`PortError::AlreadyRunning`] naming the holder. Finished instances stay as history:
//!   nothing is ever overwritten by a start.
//! - **Single writer (G23).** [`InstanceStore::lock`] takes
//!   `pg_advisory_xact_lock(key)` with a namespaced 64-bit key ([`instance_lock_key`])
//!   and reads the row `for no key update` in one statement; two writers of one instance
//!   run one after the other, and the second sees what the first committed.
//!   [`InstanceStore::update`] writes only an instance that its transaction locked or
//!   inserted.
//! - **Inbox (G23).** Step results are recorded idempotently per (instance, step,
//!   activation, kind), ordered by an identity column `seq` (never by a timestamp), read
//!   through a partial index of unprocessed rows, marked processed in one statement, and
//!   pruned by age of processing.
//! - **Errors are returned (G15).** Every failure is a [`PortError`]; `sqlx::Error` never
//!   leaves the crate (unique violation: `AlreadyExists` / `AlreadyRunning`; missing
//!   instance: `NotFound`; not locked, deadlock, serialization: `Conflict`; check
//!   constraint or out-of-range value: `InvalidInput`; undecodable row: `Corrupt`;
//!   connection, pool and server failures: `Unavailable`).
//! - **Lossless JSON (G16).** Context, configs, metadata, outputs and errors round-trip
//!   exactly (`==`) through `jsonb`; values containing U+0000, which `jsonb` cannot
//!   store, are rejected with [`PortError::InvalidInput`] before anything is sent.
//!   Timestamps in columns (`created_at`, `updated_at`, `inserted_at`) keep
//!   microseconds, PostgreSQL's precision; timestamps inside the JSON state keep
//!   nanoseconds.
//! - **Filters in SQL (G28).** [`InstanceStore::list`] and [`PgStore::query`] push every
//!   filter into SQL; [`InstanceQuery`] is a typed struct, so an unknown filter cannot
//!   be expressed.
//!
//! # Cost
//!
//! Each port call on the hot path is one statement, so one round trip once sqlx has
//! prepared it on the connection: insert, lock + load, pending, update, mark processed,
//! record. A unit of work adds `BEGIN` and `COMMIT`, and sqlx's pool pings a connection
//! when it is acquired unless `PgPoolOptions::test_before_acquire(false)` is set.
//!
//! Through PgBouncer's transaction pooling ([`PgStore::with_pooling`] with
//! [`Pooling::Transaction`]) no statement is kept prepared, so each one is parsed at
//! every call (two round trips), and a statement outside a unit of work runs in a
//! transaction of its own (four).
//!
//! # Example
//!
//! ```no_run
//! use hephaestus_engine_core::ports::{InstanceStore, UnitOfWork};
//! use hephaestus_migrations_gen::SchemaPrefix;
//! use hephaestus_storage_pg::PgStore;
//! # async fn example(instance: hephaestus_engine_core::Instance) -> Result<(), Box<dyn std::error::Error>> {
//! let pool = sqlx::PgPool::connect("postgres://localhost/app").await?;
//! let store = PgStore::new(pool.clone(), SchemaPrefix::new("hephaestus")?);
//! store.migrate().await?;
//!
//! // Through the port traits, as the runner does.
//! let mut tx = store.begin().await?;
//! store.insert(&mut tx, &instance).await?;
//! store.commit(tx).await?;
//!
//! // Or inside the application's own transaction.
//! let mut tx = pool.begin().await?;
//! sqlx::query("update accounts set onboarding = true").execute(&mut *tx).await?;
//! let mut next = instance.clone();
//! next.id = uuid::Uuid::now_v7();
//! store.insert_using(&mut tx, &next).await?;
//! tx.commit().await?;
//! # Ok(())
//! # }
//! ```

mod batch;
mod census;
mod error;
mod instances;
mod json;
mod lock;
mod migrate;
mod query;
mod reconcile;
mod results;
mod retention;
mod schema;
mod store;
mod upkeep;

#[cfg(doc)]
use hephaestus_engine_core::ports::{InstanceStore, PortError, StepResultStore, UnitOfWork};

pub use batch::ExecutionCheck;
pub use census::StorageCensus;
pub use hephaestus_pg_pooling::Pooling;
pub use instances::RawInstance;
pub use lock::{LOCK_NAMESPACE, instance_lock_key};
pub use migrate::{Migrated, migrate, migrate_to, schema_version};
pub use query::{
    Cursor, Direction, InstanceCount, InstanceQuery, Order, Page, SortKey, TimeRange, Undecodable,
};
pub use reconcile::{ReconcileCandidate, ReconcilePage};
pub use retention::PrunedInstances;
pub use schema::{COMPONENT, schema};
pub use store::{PRUNE_BATCH, PgStore, Tx};
