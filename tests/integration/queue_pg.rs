//! queue-pg against PostgreSQL: the engine-core conformance suite, the SQL
//! layer (every state transition, unique races, fencing, cancel, prune) and
//! the worker runtime (LISTEN/NOTIFY and poll-only delivery, retries with
//! an injected clock, discard-hook atomicity, heartbeats and rescue,
//! graceful shutdown, the drain helper).

mod conformance;
mod drain;
mod runtime;
mod sql;

use std::str::FromStr;
use std::time::Duration;

use hephaestus_queue_pg::PgQueue;
use sqlx::PgPool;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};

use crate::support::db::{TestSchema, database_url};

/// A fresh schema with the queue's tables, a pool large enough for the
/// concurrency cases (the conformance suite needs at least 9 connections)
/// and a queue on it.
pub struct QueueDb {
    schema: TestSchema,
    pub pool: PgPool,
    pub queue: PgQueue,
}

impl QueueDb {
    pub async fn new() -> Self {
        Self::with_connections(12).await
    }

    pub async fn with_connections(max: u32) -> Self {
        let schema = TestSchema::new().await;
        // Like TestSchema's pool: a search_path that names no schema, so an
        // unqualified table name fails.
        let options = PgConnectOptions::from_str(database_url())
            .expect("DATABASE_URL is a valid PostgreSQL URL")
            .options([("search_path", "hephaestus_no_such_schema")]);
        let pool = PgPoolOptions::new()
            .max_connections(max)
            .acquire_timeout(Duration::from_secs(30))
            .connect_with(options)
            .await
            .expect("connect to the test PostgreSQL");
        hephaestus_queue_pg::migrate(&pool, &schema.prefix)
            .await
            .expect("migrate the queue schema");
        let queue = PgQueue::new(pool.clone(), schema.prefix.clone());
        Self {
            schema,
            pool,
            queue,
        }
    }

    pub async fn teardown(self) {
        // `close` waits for every checked-out connection (a live PgListener
        // holds one): bound it so a leak fails the test instead of hanging it.
        tokio::time::timeout(SAFETY_NET, self.pool.close())
            .await
            .expect("the pool closes: drop every listener before teardown");
        self.schema.teardown().await;
    }
}

/// Waits for the first job event matching `matches`, skipping others.
pub async fn wait_for_event(
    events: &mut tokio::sync::broadcast::Receiver<hephaestus_queue_pg::JobEvent>,
    what: &str,
    matches: impl FnMut(&hephaestus_queue_pg::JobEvent) -> bool,
) -> hephaestus_queue_pg::JobEvent {
    crate::support::wait::for_event(events, what, matches).await
}

pub use crate::support::wait::SAFETY_NET;
