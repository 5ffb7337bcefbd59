//! [`PgStore`]: the handle, its pre-rendered SQL, and the port trait implementations.

use std::fmt;
use std::sync::Arc;

use hephaestus_engine_core::clock::{self, Clock, SharedClock};

use chrono::{DateTime, Utc};
use hephaestus_engine_core::ids::StepId;
use hephaestus_engine_core::instance::Instance;
use hephaestus_engine_core::ports::{
    InstanceFilter, InstanceStore, NewStepResult, PortError, Recorded, Refused, StepResult,
    StepResultStore, UnitOfWork,
};
use hephaestus_migrations_gen::SchemaPrefix;
use hephaestus_pg_pooling::{Pooled, Pooling};
use sqlx::{PgPool, Postgres, Transaction};
use uuid::Uuid;

use crate::error::port_error;
use crate::migrate::{Migrated, migrate};

/// The unit of work of [`PgStore`]: a PostgreSQL transaction. `hephaestus-queue-pg`
/// uses the same type, so storage and queue writes can share one transaction.
pub type Tx = Transaction<'static, Postgres>;

/// How many processed step results one `delete` statement of
/// [`StepResultStore::prune_processed`] removes at most.
pub const PRUNE_BATCH: u32 = 5_000;

/// The transaction-local setting that lists the instances this transaction locked or
/// inserted (space-separated ids); [`PgStore::update_using`] writes only those.
pub(crate) const HELD_SETTING: &str = "hephaestus.held_instances";

/// Instances and step results in one PostgreSQL schema. A cheap handle: clones share the
/// pool and the pre-rendered SQL.
#[derive(Clone)]
pub struct PgStore {
    pub(crate) pool: PgPool,
    pub(crate) prefix: SchemaPrefix,
    pub(crate) sql: Arc<Sql>,
    pub(crate) clock: SharedClock,
    pub(crate) pooling: Pooling,
}

impl fmt::Debug for PgStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PgStore")
            .field("prefix", &self.prefix)
            .field("pool", &self.pool)
            .field("pooling", &self.pooling)
            .finish_non_exhaustive()
    }
}

impl PgStore {
    /// A store over the tables in schema `prefix` (see [`PgStore::migrate`] to create
    /// them). The pool needs as many connections as units of work run at once.
    pub fn new(pool: PgPool, prefix: SchemaPrefix) -> Self {
        let sql = Arc::new(Sql::render(&prefix));
        Self {
            pool,
            prefix,
            sql,
            clock: clock::system(),
            pooling: Pooling::Session,
        }
    }

    /// The same store for a pool whose connections reach PostgreSQL the `pooling` way
    /// (default [`Pooling::Session`]: direct connections). Under
    /// [`Pooling::Transaction`] (PgBouncer's `pool_mode = transaction`; connect the pool
    /// with [`Pooling::connect_options`]) every statement is unnamed and runs inside a
    /// transaction: the caller's for the `*_using` forms (give them a transaction, not a
    /// bare connection or the pool: see [`PgStore::pooled`]), else one of its own.
    #[must_use]
    pub fn with_pooling(mut self, pooling: Pooling) -> Self {
        self.pooling = pooling;
        self
    }

    /// How the pool's connections reach PostgreSQL (see [`PgStore::with_pooling`]).
    pub fn pooling(&self) -> Pooling {
        self.pooling
    }

    /// An executor for one statement that is no part of a transaction, as the pooling
    /// allows it: the pool itself under session pooling, a transaction of the
    /// statement's own under transaction pooling. Pass it to the `*_using` forms in
    /// place of the pool.
    pub fn pooled(&self) -> Pooled<'_> {
        self.pooling.on(&self.pool)
    }

    /// sqlx's `persistent` for every statement with parameters: named and cached under
    /// session pooling only.
    pub(crate) fn persistent(&self) -> bool {
        self.pooling.persistent_statements()
    }

    /// The same store with another clock: the times it writes (when a step
    /// result arrived, when it was processed) come from `clock`, never from
    /// the server, so a [`ManualClock`](hephaestus_engine_core::clock::ManualClock)
    /// governs them in tests.
    #[must_use]
    pub fn with_clock(mut self, clock: impl Clock) -> Self {
        self.clock = Arc::new(clock);
        self
    }

    /// The current time of the store's clock.
    pub fn now(&self) -> chrono::DateTime<chrono::Utc> {
        self.clock.now()
    }

    /// Creates or upgrades this store's tables to the latest version, in one transaction
    /// (see [`crate::migrate`]).
    pub async fn migrate(&self) -> Result<Migrated, PortError> {
        migrate(&self.pool, &self.prefix).await
    }

    /// The pool.
    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    /// The schema holding the tables.
    pub fn prefix(&self) -> &SchemaPrefix {
        &self.prefix
    }
}

/// Every statement, rendered once per store for its schema. The schema prefix (validated
/// by [`SchemaPrefix`]) is the only value interpolated; everything else is a bind
/// parameter. Identical text per statement also lets sqlx reuse its prepared statement.
#[derive(Debug)]
pub(crate) struct Sql {
    pub(crate) insert_instance: String,
    pub(crate) insert_conflict: String,
    pub(crate) lock_instance: String,
    pub(crate) update_instance: String,
    pub(crate) get_instance: String,
    pub(crate) claim_holder: String,
    pub(crate) select_instances: String,
    pub(crate) count_instances: String,
    pub(crate) instance_counts: String,
    pub(crate) record_result: String,
    pub(crate) instance_exists: String,
    pub(crate) pending_results: String,
    pub(crate) mark_processed: String,
    pub(crate) is_recorded: String,
    pub(crate) cancel_status_only: String,
    pub(crate) get_raw: String,
    pub(crate) refuse_results: String,
    pub(crate) refused_results: String,
    pub(crate) prune_processed: String,
    pub(crate) batch: crate::batch::BatchSql,
}

/// The instance columns every read selects, in the order `decode_instance` reads them.
pub(crate) const INSTANCE_COLUMNS: &str = "i.id, i.business_id, i.workflow_id, i.workflow_version, i.status, i.unique_claim, \
     i.state, i.failure, i.telemetry_metadata, i.revision, i.inserted_at, i.updated_at";

const ACTIVE: &str = "('pending', 'running', 'waiting')";

impl Sql {
    fn render(prefix: &SchemaPrefix) -> Self {
        let p = prefix.quoted();
        let instances = format!("{p}.hephaestus_instances");
        let results = format!("{p}.hephaestus_step_results");
        let held = HELD_SETTING;
        // Appends the id to the held list; `set_config(.., true)` is transaction-local.
        let mark_held = format!(
            "set_config('{held}', coalesce(current_setting('{held}', true), '') || ' ' || id::text, true)"
        );
        Self {
            batch: crate::batch::BatchSql::render(prefix),
            // `on conflict do nothing` without a target covers the primary key and the
            // partial unique index of active claims. A conflicting insert of another
            // transaction that is still open makes this one wait for its outcome.
            insert_instance: format!(
                r"with inserted as (
    insert into {instances} (id, business_id, workflow_id, workflow_version, status, unique_claim,
        state, failure, telemetry_metadata, revision, inserted_at, updated_at)
    values ($1, $2, $3, $4, $5, $6, $7::jsonb, $8::jsonb, $9::jsonb, $10, $11, $12)
    on conflict do nothing
    returning id
)
select {mark_held} from inserted"
            ),
            insert_conflict: format!(
                r"select
    exists (select 1 from {instances} where id = $1) as id_taken,
    (select id from {instances}
        where unique_claim = $2 and status in {ACTIVE} and id <> $1
        limit 1) as holder"
            ),
            // The row is found first (the lateral reference makes the lock the inner side
            // of the join, so a missing instance takes no lock), then the advisory lock is
            // taken, then the row is locked `for no key update`: if the previous holder
            // changed the row after this statement's snapshot was taken, PostgreSQL
            // re-reads the newest committed version before returning it.
            // `no key update` does not conflict with the `key share` lock that inserting
            // a step result takes on its instance, so recording never waits for it.
            lock_instance: format!(
                r"select {INSTANCE_COLUMNS}, {mark_held}
from {instances} i
cross join lateral (select pg_advisory_xact_lock($2) where i.id is not null) as single_writer
where i.id = $1
for no key update of i"
            ),
            update_instance: format!(
                r"with target as (
    select id, coalesce(strpos(current_setting('{held}', true), id::text) > 0, false) as held
    from {instances}
    where id = $1
), written as (
    update {instances} as i
    set business_id = $2, workflow_id = $3, workflow_version = $4, status = $5,
        unique_claim = $6, state = $7::jsonb, failure = $8::jsonb,
        telemetry_metadata = $9::jsonb, revision = $10, inserted_at = $11, updated_at = $12
    from target
    where i.id = target.id and target.held
    returning i.id
)
select exists (select 1 from target) as found, exists (select 1 from written) as written"
            ),
            get_instance: format!("select {INSTANCE_COLUMNS} from {instances} i where i.id = $1"),
            cancel_status_only: format!(
                r"update {instances} set status = 'cancelled', updated_at = $2
where id = $1 and status in {ACTIVE}
returning id"
            ),
            get_raw: format!(
                r"select id, business_id, workflow_id, workflow_version, status, revision,
    inserted_at, updated_at, left(state::text, $2) as state, left(failure::text, $2) as failure
from {instances} where id = $1"
            ),
            claim_holder: format!(
                "select id from {instances} where unique_claim = $1 and status in {ACTIVE} and id <> $2 limit 1"
            ),
            select_instances: format!("select {INSTANCE_COLUMNS} from {instances} i"),
            // `build` appends its conditions and order; the count wraps them.
            count_instances: format!("select count(*) from (select i.id from {instances} i"),
            instance_counts: format!(
                "select workflow_id, workflow_version, status, count(*) from {instances} \
                 group by workflow_id, workflow_version, status \
                 order by workflow_id, workflow_version, status"
            ),
            // Inserting through `select .. where exists` instead of relying on the foreign
            // key keeps the caller's transaction usable when the instance is missing.
            record_result: format!(
                r"insert into {results} (instance_id, step_id, activation, kind, event, output, metadata, detail,
    inserted_at)
select $1, $2, $3, $4, $5, $6::jsonb, $7::jsonb, $8::jsonb, $9::timestamptz
where exists (select 1 from {instances} where id = $1)
on conflict do nothing
returning seq"
            ),
            instance_exists: format!("select exists (select 1 from {instances} where id = $1)"),
            pending_results: format!(
                r"select seq, instance_id, step_id, activation, kind, event, output, metadata, detail, inserted_at
from {results}
where instance_id = $1 and processed_at is null
order by seq"
            ),
            mark_processed: format!(
                r"update {results} set processed_at = $3::timestamptz
where instance_id = $1 and seq = any($2) and processed_at is null"
            ),
            is_recorded: format!(
                r"select exists (
    select 1 from {results}
    where instance_id = $1 and step_id = $2 and activation = $3
        and kind in ('completed', 'async', 'failed') and refusal is null
)"
            ),
            refuse_results: format!(
                r"update {results} as r set processed_at = $4::timestamptz, refusal = x.reason
from unnest($2::bigint[], $3::text[]) as x(seq, reason)
where r.instance_id = $1 and r.seq = x.seq and r.processed_at is null"
            ),
            refused_results: format!(
                r"select seq, step_id, activation, kind, refusal
from {results}
where instance_id = $1 and refusal is not null
order by seq"
            ),
            prune_processed: format!(
                r"delete from {results}
where seq in (
    select seq from {results}
    where processed_at < $1
    limit $2
    for update skip locked
)"
            ),
        }
    }
}

#[async_trait::async_trait]
impl UnitOfWork for PgStore {
    type Tx = Tx;

    async fn begin(&self) -> Result<Tx, PortError> {
        self.pool.begin().await.map_err(port_error)
    }

    async fn commit(&self, tx: Tx) -> Result<(), PortError> {
        tx.commit().await.map_err(port_error)
    }
}

#[async_trait::async_trait]
impl InstanceStore for PgStore {
    async fn insert(&self, tx: &mut Tx, instance: &Instance) -> Result<(), PortError> {
        self.insert_using(tx, instance).await
    }

    async fn lock(&self, tx: &mut Tx, id: Uuid) -> Result<Option<Instance>, PortError> {
        self.lock_using(tx, id).await
    }

    async fn update(&self, tx: &mut Tx, instance: &Instance) -> Result<(), PortError> {
        self.update_using(tx, instance).await
    }

    async fn cancel_status_only(
        &self,
        tx: &mut Tx,
        id: Uuid,
        now: DateTime<Utc>,
    ) -> Result<bool, PortError> {
        let cancelled: Option<Uuid> = sqlx::query_scalar(&self.sql.cancel_status_only)
            .persistent(self.persistent())
            .bind(id)
            .bind(now)
            .fetch_optional(&mut **tx)
            .await
            .map_err(port_error)?;
        Ok(cancelled.is_some())
    }

    async fn get(&self, id: Uuid) -> Result<Option<Instance>, PortError> {
        self.get_using(self.pooled(), id).await
    }

    async fn list(&self, filter: &InstanceFilter) -> Result<Vec<Instance>, PortError> {
        self.list_using(self.pooled(), filter).await
    }
}

#[async_trait::async_trait]
impl StepResultStore for PgStore {
    async fn record(&self, tx: &mut Tx, result: &NewStepResult) -> Result<Recorded, PortError> {
        self.record_using(tx, result).await
    }

    async fn pending(&self, tx: &mut Tx, instance_id: Uuid) -> Result<Vec<StepResult>, PortError> {
        self.pending_using(&mut **tx, instance_id).await
    }

    async fn mark_processed(
        &self,
        tx: &mut Tx,
        instance_id: Uuid,
        seqs: &[i64],
    ) -> Result<(), PortError> {
        self.mark_processed_using(&mut **tx, instance_id, seqs)
            .await
    }

    async fn refuse(
        &self,
        tx: &mut Tx,
        instance_id: Uuid,
        refused: &[(i64, String)],
    ) -> Result<(), PortError> {
        self.refuse_using(&mut **tx, instance_id, refused).await
    }

    async fn refused(&self, instance_id: Uuid) -> Result<Vec<Refused>, PortError> {
        self.refused_using(self.pooled(), instance_id).await
    }

    async fn is_recorded(
        &self,
        instance_id: Uuid,
        step: &StepId,
        activation: u32,
    ) -> Result<bool, PortError> {
        self.is_recorded_using(self.pooled(), instance_id, step, activation)
            .await
    }

    async fn prune_processed(&self, before: DateTime<Utc>) -> Result<u64, PortError> {
        self.prune_processed_in_batches(before, PRUNE_BATCH).await
    }
}
