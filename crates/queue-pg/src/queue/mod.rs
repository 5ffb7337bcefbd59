//! [`PgQueue`]: every SQL statement of the queue, each with a pooled form and
//! an `*_using(conn)` twin that runs on the caller's connection or
//! transaction (`&mut *tx`), so jobs can be enqueued, cancelled or settled
//! atomically with the caller's own writes.

mod cancel;
mod census;
mod fetch;
mod insert;
mod inspect;
mod maintenance;
mod settle;

use std::sync::Arc;

use hephaestus_migrations_gen::SchemaPrefix;
use hephaestus_pg_pooling::{Acquired, Pooled, Pooling};
use sqlx::PgPool;

use hephaestus_engine_core::clock::{Clock, SystemClock};

pub use cancel::CancelFilter;
pub use census::QueueCensus;
pub use inspect::{FinishedCount, JobFilter, QueueDepth, RecentError};
pub use maintenance::StaleJob;
pub(crate) use maintenance::rescue_error;
pub use settle::Settled;

/// The job queue on one schema: a pool, the validated schema prefix, the
/// clock behind scheduling decisions and how the pool's connections reach
/// PostgreSQL ([`Pooling`]). Cheap to clone (one `Arc`).
#[derive(Debug, Clone)]
pub struct PgQueue {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    pool: PgPool,
    prefix: SchemaPrefix,
    clock: Arc<dyn Clock>,
    pooling: Pooling,
    channel: String,
    sql: Statements,
}

impl PgQueue {
    /// A queue on the jobs table in `prefix`, with the system clock. The
    /// table must exist ([`crate::migrate`]).
    pub fn new(pool: PgPool, prefix: SchemaPrefix) -> Self {
        Self::build(pool, prefix, Arc::new(SystemClock), Pooling::Session)
    }

    /// The same queue with another clock (tests move time with
    /// [`crate::ManualClock`]).
    #[must_use]
    pub fn with_clock(&self, clock: impl Clock) -> Self {
        Self::build(
            self.inner.pool.clone(),
            self.inner.prefix.clone(),
            Arc::new(clock),
            self.inner.pooling,
        )
    }

    /// The same queue for a pool whose connections reach PostgreSQL the
    /// `pooling` way (default [`Pooling::Session`]: direct connections).
    /// Under [`Pooling::Transaction`] (PgBouncer's `pool_mode =
    /// transaction`; connect the pool with [`Pooling::connect_options`])
    /// every statement is unnamed and runs inside a transaction: the
    /// caller's for the `*_using` forms (give them a transaction, not a
    /// bare connection), else one of its own; and a [`crate::QueueRuntime`]
    /// polls instead of listening.
    #[must_use]
    pub fn with_pooling(&self, pooling: Pooling) -> Self {
        Self::build(
            self.inner.pool.clone(),
            self.inner.prefix.clone(),
            Arc::clone(&self.inner.clock),
            pooling,
        )
    }

    fn build(pool: PgPool, prefix: SchemaPrefix, clock: Arc<dyn Clock>, pooling: Pooling) -> Self {
        let sql = Statements::render(&prefix);
        let channel = channel_name(&prefix);
        Self {
            inner: Arc::new(Inner {
                pool,
                prefix,
                clock,
                pooling,
                channel,
                sql,
            }),
        }
    }

    /// The pool.
    pub fn pool(&self) -> &PgPool {
        &self.inner.pool
    }

    /// How the pool's connections reach PostgreSQL (see
    /// [`PgQueue::with_pooling`]).
    pub fn pooling(&self) -> Pooling {
        self.inner.pooling
    }

    /// The executor for one statement that is no part of a caller's
    /// transaction (the pool itself under session pooling).
    pub(crate) fn db(&self) -> Pooled<'_> {
        self.inner.pooling.on(&self.inner.pool)
    }

    /// A connection for statements that are no part of a caller's
    /// transaction ([`Pooling::acquire`]: `finish` it).
    pub(crate) async fn acquire(&self) -> Result<Acquired, sqlx::Error> {
        self.inner.pooling.acquire(&self.inner.pool).await
    }

    /// sqlx's `persistent` for every statement with parameters: named and
    /// cached under session pooling only.
    pub(crate) fn persistent(&self) -> bool {
        self.inner.pooling.persistent_statements()
    }

    /// The schema prefix.
    pub fn prefix(&self) -> &SchemaPrefix {
        &self.inner.prefix
    }

    /// The current time of the queue's clock.
    pub fn now(&self) -> chrono::DateTime<chrono::Utc> {
        self.inner.clock.now()
    }

    /// The clock.
    pub fn clock(&self) -> &Arc<dyn Clock> {
        &self.inner.clock
    }

    /// The LISTEN/NOTIFY channel of this schema's queue.
    pub fn channel(&self) -> &str {
        &self.inner.channel
    }

    fn sql(&self) -> &Statements {
        &self.inner.sql
    }
}

/// The notification channel for `prefix`: `hephaestus_jobs_<prefix>`, or a
/// stable hash of the prefix when that would exceed PostgreSQL's 63-byte
/// identifier limit.
fn channel_name(prefix: &SchemaPrefix) -> String {
    let plain = format!("hephaestus_jobs_{}", prefix.as_str());
    if plain.len() <= 63 {
        return plain;
    }
    // FNV-1a: deterministic across processes and versions.
    let hash = prefix
        .as_str()
        .bytes()
        .fold(0xcbf2_9ce4_8422_2325_u64, |h, b| {
            (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
        });
    format!("hephaestus_jobs_{hash:016x}")
}

/// Replaces `{prefix}` with the quoted prefix.
fn render(template: &str, prefix: &SchemaPrefix) -> String {
    template.replace("{prefix}", &prefix.quoted())
}

/// `and` conditions built from fixed fragments and placeholder numbers only:
/// values always travel as binds.
#[derive(Debug)]
struct Conditions {
    sql: String,
    /// The next placeholder number.
    next: usize,
}

impl Conditions {
    fn new(first: usize) -> Self {
        Self {
            sql: String::new(),
            next: first,
        }
    }

    /// Appends `and {before}$n{after}` and returns `n`.
    fn add(&mut self, before: &str, after: &str) -> usize {
        let n = self.next;
        self.next += 1;
        self.sql.push_str("\n  and ");
        self.sql.push_str(before);
        self.sql.push('$');
        self.sql.push_str(&n.to_string());
        self.sql.push_str(after);
        n
    }
}

/// Every statement, rendered once for the prefix.
#[derive(Debug)]
struct Statements {
    insert: String,
    insert_plain: String,
    insert_complete: String,
    insert_plain_complete: String,
    find_unique: String,
    fetch: String,
    fetch_any_queue: String,
    complete: String,
    complete_delete: String,
    retry: String,
    discard: String,
    snooze: String,
    cancel_own: String,
    cancel_one: String,
    cancel_group: String,
    cancel_where_base: String,
    notify_cancelled: String,
    notify_queues: String,
    job: String,
    jobs_base: String,
    live_by_args: String,
    live_by_group: String,
    depth: String,
    finished_per_minute: String,
    heartbeat: String,
    stale: String,
    rescue: String,
    release: String,
    lease_holder: String,
    delete_groups: String,
    prune: String,
}

impl Statements {
    fn render(prefix: &SchemaPrefix) -> Self {
        let r = |t: &str| render(t, prefix);
        let cols = |t: &str| {
            r(t).replace("{job_columns}", crate::job::JOB_COLUMNS)
                .replace("{lease_columns}", crate::job::LEASE_COLUMNS)
        };
        Self {
            insert: r(&insert::insert_statement(true, false)),
            insert_plain: r(&insert::insert_statement(false, false)),
            insert_complete: r(&insert::insert_statement(true, true)),
            insert_plain_complete: r(&insert::insert_statement(false, true)),
            find_unique: r(insert::FIND_UNIQUE),
            fetch: cols(fetch::FETCH),
            fetch_any_queue: cols(fetch::FETCH_ANY_QUEUE),
            complete: r(settle::COMPLETE),
            complete_delete: r(settle::COMPLETE_DELETE),
            retry: r(settle::RETRY),
            discard: r(settle::DISCARD),
            snooze: r(settle::SNOOZE),
            cancel_own: r(settle::CANCEL_OWN),
            cancel_one: r(cancel::CANCEL_ONE),
            cancel_group: r(cancel::CANCEL_GROUP),
            cancel_where_base: r(cancel::CANCEL_WHERE_BASE),
            notify_cancelled: r(cancel::NOTIFY_CANCELLED),
            notify_queues: r(maintenance::NOTIFY_QUEUES),
            job: cols(inspect::JOB),
            jobs_base: cols(inspect::JOBS_BASE),
            live_by_args: cols(inspect::LIVE_BY_ARGS),
            live_by_group: cols(inspect::LIVE_BY_GROUP),
            depth: r(inspect::DEPTH),
            finished_per_minute: r(inspect::FINISHED_PER_MINUTE),
            heartbeat: r(maintenance::HEARTBEAT),
            stale: cols(maintenance::STALE),
            rescue: r(maintenance::RESCUE),
            release: r(maintenance::RELEASE),
            lease_holder: r(maintenance::LEASE_HOLDER),
            delete_groups: r(maintenance::DELETE_GROUPS),
            prune: r(maintenance::PRUNE),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn channel_names_fit_postgres_identifiers() {
        assert_eq!(
            channel_name(&SchemaPrefix::default()),
            "hephaestus_jobs_public"
        );
        let long = SchemaPrefix::new(&"a".repeat(60)).unwrap();
        let name = channel_name(&long);
        assert!(name.len() <= 63, "{name}");
        assert_eq!(name, channel_name(&long));
    }

    #[test]
    fn statements_are_schema_qualified() {
        let prefix = SchemaPrefix::new("tenant_x").unwrap();
        let sql = Statements::render(&prefix);
        for statement in [
            &sql.insert,
            &sql.fetch,
            &sql.complete,
            &sql.cancel_one,
            &sql.prune,
            &sql.job,
        ] {
            assert!(statement.contains("\"tenant_x\".hephaestus_jobs"));
            assert!(!statement.contains('{') || !statement.contains("{prefix}"));
            assert!(!statement.contains("{job_columns}"));
        }
    }
}
