//! A job queue on PostgreSQL, usable on its own or as the Hephaestus
//! runner's queue (it implements the engine-core [`JobQueue`] port).
//!
//! - **Jobs**: kind (worker name), queue, JSON args and meta, tags,
//!   priority, attempt / max_attempts, due time, every failed attempt's
//!   error, and the states `available`, `scheduled`, `executing`,
//!   `retryable`, `completed`, `discarded`, `cancelled`, each transition
//!   timestamped ([`Job`]).
//! - **Insert** ([`PgQueue::insert_many`]): a whole batch in ONE statement
//!   (UNNEST arrays), on the caller's transaction with the `*_using(conn)`
//!   forms; scheduled jobs; unique jobs through a partial unique index over
//!   a caller-chosen key and set of states (a conflict returns the existing
//!   job, race-free). The wake-up `NOTIFY` is part of the insert, so it is
//!   delivered at commit and never for a rolled-back job.
//! - **Workers** ([`Worker`], [`Workers`], [`QueueRuntime`]): per-queue
//!   concurrency; producers fetch with `FOR UPDATE SKIP LOCKED` in batches
//!   sized to free slots; LISTEN/NOTIFY wake-ups with a poll fallback, or
//!   poll-only; user code runs on its own task outside any transaction,
//!   panics captured; completions batched into one statement.
//! - **Failures**: retries with the engine-core [`RetryPolicy`] (backoff
//!   strategies with jitter), discard when attempts run out or on a fatal
//!   error with a [`DiscardHook`] inside the discarding transaction, snooze.
//! - **Cancel** by id or by predicate over args/meta ([`CancelFilter`]),
//!   executing jobs included: their worker is told to stop.
//! - **Operations**: heartbeats, a rescuer for jobs whose worker died
//!   (seconds to a minute, configurable), pruning after a retention, leader
//!   election for those, graceful shutdown with a grace period, [`JobEvent`]s
//!   (tracing + a broadcast subscription) and metrics (see [`events`](crate::Events)).
//! - **Connection pooling**: direct connections by default; through
//!   PgBouncer's transaction pooling with [`PgQueue::with_pooling`] and
//!   [`Pooling::Transaction`] (no prepared statement kept, every statement
//!   in a transaction, producers polling).
//! - **Tests**: [`drain`] runs due jobs synchronously and reports counts;
//!   [`ManualClock`] moves time.
//!
//! # Invariants
//!
//! - **The claim is one statement** that locks due rows (`skip locked`),
//!   marks them `executing`, bumps `attempt` and starts the heartbeat.
//! - **The attempt fences every later update**: complete, retry, discard,
//!   snooze, heartbeat and rescue only apply while the job is `executing` at
//!   the lease's attempt. A late acknowledgement from a rescued or cancelled
//!   attempt changes nothing (and is reported as [`JobEventKind::Fenced`]).
//!   Attempts never decrease (a snooze grants one more attempt instead).
//! - **User code never runs inside a transaction**; a discard hook runs
//!   inside the discarding transaction, and its error rolls the discard back
//!   (the job stays `retryable`, the hook failure recorded).
//! - **Scheduling decisions use the injected [`Clock`]**, passed to SQL as a
//!   bind, never SQL `now()`.
//! - **SQL** is lower-case, schema-qualified by the validated prefix (the
//!   only interpolated value); every value is a typed bind.
//! - Delivery is at least once: a job whose worker dies is run again after
//!   `rescue_after`; make workers idempotent.
//!
//! # Example
//!
//! ```no_run
//! use std::time::Duration;
//!
//! use hephaestus_migrations_gen::SchemaPrefix;
//! use hephaestus_queue_pg::{JobContext, JobError, PgQueue, QueueRuntime, Worker, Workers};
//! use serde::{Deserialize, Serialize};
//!
//! #[derive(Serialize, Deserialize)]
//! struct Email {
//!     to: String,
//! }
//!
//! struct SendEmail;
//!
//! #[async_trait::async_trait]
//! impl Worker for SendEmail {
//!     const KIND: &'static str = "send_email";
//!     const QUEUE: &'static str = "mailers";
//!     type Args = Email;
//!
//!     async fn perform(&self, job: &JobContext, email: Email) -> Result<(), JobError> {
//!         if email.to.is_empty() {
//!             return Err(JobError::fatal("no recipient"));
//!         }
//!         println!("attempt {} to {}", job.attempt(), email.to);
//!         Ok(())
//!     }
//! }
//!
//! # async fn demo(pool: sqlx::PgPool) -> Result<(), Box<dyn std::error::Error>> {
//! let prefix = SchemaPrefix::default();
//! hephaestus_queue_pg::migrate(&pool, &prefix).await?;
//! let queue = PgQueue::new(pool.clone(), prefix);
//!
//! // Enqueue inside your own transaction: the job exists iff you commit.
//! let mut tx = pool.begin().await?;
//! let job = SendEmail::new_job(&Email { to: "ada@example.com".into() })?;
//! queue.insert_using(&mut tx, &job).await?;
//! tx.commit().await?;
//!
//! let runtime = QueueRuntime::builder(queue, Workers::new().register(SendEmail))
//!     .queue("mailers", 10)
//!     .start()
//!     .await?;
//! // ...
//! runtime.shutdown(Duration::from_secs(30)).await;
//! # Ok(()) }
//! ```
//!
//! [`JobQueue`]: hephaestus_engine_core::ports::JobQueue
//! [`RetryPolicy`]: hephaestus_engine_core::retry::RetryPolicy

mod database;
mod drain;
mod error;
mod events;
mod execute;
mod hook;
mod job;
mod port;
mod queue;
mod runtime;
pub mod schema;
mod worker;

pub use database::{ServerCounters, drop_schema, server_counters, server_version};
pub use drain::{DrainOptions, DrainReport, drain, drain_with_events};
pub use error::{BoxError, Error};
pub use events::{EventCounts, Events, JobEvent, JobEventKind};
pub use hephaestus_engine_core::clock::{Clock, ManualClock, SystemClock};
pub use hephaestus_pg_pooling::Pooling;
pub use hook::{DiscardHook, DiscardedJob};
pub use job::Job;
pub use queue::{
    CancelFilter, FinishedCount, JobFilter, PgQueue, QueueCensus, QueueDepth, RecentError, Settled,
    StaleJob,
};
pub use runtime::{
    QueueRuntime, RescueReport, RuntimeBuilder, RuntimeConfig, ShutdownReport, connections_held,
};
pub use schema::{migrate, migrate_to, schema, schema_version};
pub use worker::{AdoptedJob, Adopter, DynWorker, JobContext, JobError, Worker, Workers};
