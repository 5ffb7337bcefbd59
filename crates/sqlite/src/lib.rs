//! # hephaestus-sqlite
//!
//! The durable embedded backend: workflow instances, step results and the
//! job queue in ONE SQLite file, through sqlx's SQLite driver (SQLite itself
//! is compiled in: nothing to install). It implements the engine-core ports
//! (`InstanceStore`, `StepResultStore`, `JobQueue` over one unit of work)
//! and passes the same conformance suites as the in-memory and PostgreSQL
//! backends. The runner's hot path is answered by batched statements (a
//! JSON array parameter read with `json_each`: one statement per batch
//! where the ports take one per row), and its settling enqueue claims
//! continuations as on PostgreSQL: see [`SqliteBackend::try_lock_many_in`],
//! [`SqliteBackend::write_rounds_in`] and
//! [`SqliteBackend::enqueue_claiming_and_complete`].
//!
//! ```no_run
//! # async fn f() -> Result<(), hephaestus_sqlite::Error> {
//! use hephaestus_sqlite::{SqliteBackend, SqliteOptions};
//! let backend = SqliteBackend::open_migrated(SqliteOptions::new("hephaestus.db")).await?;
//! // One worker per file: hold this while the runtime runs jobs.
//! let _worker = backend.lock_worker().await?;
//! // hephaestus_runner::Runtime::builder(backend.clone()) ... .run(shutdown)
//! # Ok(()) }
//! ```
//!
//! # The file
//!
//! WAL mode (readers never wait for the writer), `synchronous=FULL` by
//! default (a commit is on disk when it returns; [`Durability::Normal`]
//! trades the last commits in a power loss for speed), `busy_timeout` 5 s,
//! foreign keys on. The tables mirror PostgreSQL's (see the [`schema`](mod@schema) module); they
//! are created by [`SqliteBackend::migrate`] from the same rendered SQL that
//! `cargo xtask gen-migration` writes into `migrations/sqlite/`.
//!
//! # Single writer per instance, without advisory locks
//!
//! SQLite lets one connection write at a time: a unit of work that writes
//! holds the database's write lock from its first write (`begin immediate`)
//! to its commit, so every write, of any instance, is serialized. The
//! single-writer-per-instance guarantee adds two things to that:
//!
//! - **In this process**, [`InstanceStore::lock`](hephaestus_engine_core::ports::InstanceStore::lock)
//!   takes the instance's lock in the backend's lock table and holds it
//!   until the unit of work ends, writes or not: two units of work locking
//!   one instance run one after the other, and the second reads what the
//!   first committed. Locks of different instances do not wait for each
//!   other. A wait that would deadlock (a unit of work holding the write
//!   lock waits for an instance whose holder waits for the write lock) fails
//!   at once with `PortError::Conflict`.
//! - **Across processes** (a CLI `cancel` while the worker runs), there is
//!   no shared lock table: each instance row carries a `lock_version` read
//!   by `lock` and bumped by every write, and an update is fenced by it. A
//!   write another process made since the lock was taken is never
//!   overwritten: the update fails with `PortError::Conflict`, and the job
//!   that tried is retried and reads the new state.
//!
//! # Claims
//!
//! A claim is `begin immediate` and ONE `update .. where id in (select ..
//! order by priority, scheduled_at, id limit n) returning ..`: it marks the
//! jobs executing, bumps their attempt (the fence of every later update of
//! the job) and starts their heartbeat. No other claimer can see those jobs
//! as due: there is no `skip locked` to need, because there is no second
//! writer.
//!
//! # Processes
//!
//! One worker process per file, enforced at start: [`SqliteBackend::lock_worker`]
//! takes an OS lock the process keeps until it ends ([`worker`]); a second
//! worker gets [`Error::WorkerRunning`]. Other processes (`hephaestus
//! instances`, `jobs`, `cancel`, `resume`, `prune`, `migrate`) read and write
//! the same file at any time: their writes wait for the worker's current
//! commit (at most the busy timeout). Jobs a killed worker left executing
//! are rescued when the next worker starts, and by heartbeat age like on
//! PostgreSQL. Wake-ups are in process: [`SqliteBackend::enqueued`] is
//! notified at every commit that enqueued jobs (and the runner wakes its own
//! run loop); another process's jobs are seen at the next poll. Side by
//! side with PostgreSQL: `docs/sqlite.md`.

mod backend;
mod batch;
pub mod error;
mod inspect;
mod instances;
mod jobs;
mod locks;
mod maintenance;
mod results;
pub mod schema;
mod time;
mod tx;
pub mod worker;

pub use backend::{Durability, Migrated, SqliteBackend, SqliteOptions};
pub use batch::EnqueuedAndCompleted;
pub use error::Error;
pub use inspect::{JobError, JobRecord, QueueDepth};
pub use maintenance::InstanceRetention;
pub use schema::schema;
pub use tx::SqliteTx;
pub use worker::WorkerLock;
